"""Cross-modal retrieval with a REFERS pretraining checkpoint: study and report embeddings (the two sides of the
study-report consistency loss), their cosine similarity, Recall@K / median rank both ways
(`evaluation.retrieval_metrics`), the top reports per study, and pictures of both."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import ModelOutput

from .common import batches, grayscale, new_figure, save_figure
from ..metrics import retrieval_metrics


@dataclass
class RefersRetrievalOutput(ModelOutput):
    """
    Output of [`retrieve`].

    Args:
        study_embeds (`(num_studies, projection_dim)`): L2-normalized study embeddings.
        report_embeds (`(num_reports, projection_dim)`): L2-normalized report embeddings.
        similarity (`(num_studies, num_reports)`): cosine similarity.
        relevance (`(num_studies, num_reports)` bool): True where the report is a correct match of the study.
        metrics (`dict`): `evaluation.retrieval_metrics(similarity, relevance)`.
    """

    study_embeds: torch.FloatTensor | None = None
    report_embeds: torch.FloatTensor | None = None
    similarity: torch.FloatTensor | None = None
    relevance: torch.BoolTensor | None = None
    metrics: dict | None = None


def study_embeddings(model, pixel_values: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, projection_dim)` L2-normalized study embeddings (`get_study_features`) of studies `(B, V, C, H, W)`.
    Without view fusion (one row per real view), a study's embedding is the mean of its views' normalized ones."""
    features = model.get_study_features(pixel_values, view_mask).pooler_output
    batch_size = pixel_values.shape[0]
    if features.shape[0] != batch_size:  # use_view_fusion=False: rows are the real views, in order
        per_view = torch.nn.functional.normalize(features, dim=-1)
        counts = (view_mask.sum(dim=1) if view_mask is not None else
                  torch.full((batch_size,), pixel_values.shape[1])).tolist()
        features = torch.stack([chunk.mean(dim=0) for chunk in per_view.split(counts)])
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def encode_studies(model, processor, studies: Sequence[Sequence[Any]], batch_size: int = 16) -> torch.Tensor:
    """`(N, projection_dim)` L2-normalized study embeddings of N studies (lists of views), see `study_embeddings`."""
    out = []
    for batch in batches(list(studies), batch_size, "Encoding studies"):
        inputs = processor(images=batch, do_train_augment=False, return_tensors="pt")
        out.append(study_embeddings(model, inputs["pixel_values"], inputs["view_mask"]))
    return torch.cat(out)


@torch.no_grad()
def encode_reports(model, processor, reports: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """`(M, projection_dim)` L2-normalized report embeddings (`get_text_features`) of M report strings."""
    out = []
    for batch in batches(list(reports), batch_size, "Encoding reports"):
        inputs = processor(text=batch, return_tensors="pt")
        out.append(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def same_text_relevance(study_reports: Sequence[str], reports: Sequence[str]) -> np.ndarray:
    """`(N, M)` bool: True where report j has the same text (whitespace and case ignored) as study i's report, so a
    report shared by several studies counts as correct for each of them."""
    def key(text: str) -> str:
        return " ".join(text.lower().split())

    keys = [key(r) for r in reports]
    return np.array([[key(s) == k for k in keys] for s in study_reports], dtype=bool)


def retrieve(model, processor, studies: Sequence[Sequence[Any]], reports: Sequence[str],
             relevance: Any | None = None, batch_size: int = 16, ks: Sequence[int] = (1, 5, 10)) -> RefersRetrievalOutput:
    """Image-to-report and report-to-image retrieval of N studies against M reports.

    `relevance` `(N, M)` bool marks correct pairs; default: `same_text_relevance(reports, reports)` (N == M, study i
    goes with report i, identical texts all count)."""
    if model.text_encoder is None:
        raise ValueError("retrieval needs a checkpoint with a report encoder (use_study_report_consistency=True)")
    if relevance is None:
        if len(studies) != len(reports):
            raise ValueError(f"{len(studies)} studies but {len(reports)} reports: without `relevance`, give one "
                             "report per study")
        relevance = same_text_relevance(reports, reports)
    studies_embeds = encode_studies(model, processor, studies, batch_size)
    report_embeds = encode_reports(model, processor, reports, batch_size)
    similarity = studies_embeds @ report_embeds.T
    relevance = np.asarray(relevance, dtype=bool)
    metrics = retrieval_metrics(similarity.numpy(), relevance, ks)
    return RefersRetrievalOutput(study_embeds=studies_embeds, report_embeds=report_embeds, similarity=similarity,
                                 relevance=torch.from_numpy(relevance), metrics=metrics)


def top_k(similarity: Any, k: int) -> np.ndarray:
    """`(num_queries, k)` candidate indices by decreasing similarity (ties: lower index first)."""
    sim = np.asarray(similarity.numpy() if hasattr(similarity, "numpy") else similarity, dtype=np.float64)
    return np.argsort(-sim, axis=1, kind="stable")[:, : min(k, sim.shape[1])]


def similarity_png(similarity: Any, relevance: Any, path: str | os.PathLike, title: str = "") -> Path:
    """Heat map of the `(N, M)` study-report similarity with the correct pairs outlined; returns the PNG path."""
    sim = np.asarray(similarity, dtype=np.float64)
    rel = np.asarray(relevance, dtype=bool)
    fig = new_figure(6.4, 5.6)
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(sim, cmap="viridis", aspect="auto", interpolation="nearest")
    rows, cols = np.nonzero(rel)
    ax.scatter(cols, rows, s=8, facecolors="none", edgecolors="red", linewidths=0.6, label="correct report")
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    ax.set_xlabel("report")
    ax.set_ylabel("study")
    ax.set_title(title or "Study-report similarity")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def retrieval_examples_png(
    studies: Sequence[Sequence[Any]], reports: Sequence[str], similarity: Any, relevance: Any,
    path: str | os.PathLike, queries: Sequence[int], k: int = 3, width: int = 80,
) -> Path:
    """For each query study in `queries`: its first view, its own report (grey) and the rank the model gives it,
    then its top-k reports with their similarity, correct ones marked [ok] and drawn green. Returns the PNG path."""
    sim = np.asarray(similarity, dtype=np.float64)
    rel = np.asarray(relevance, dtype=bool)
    best = top_k(sim, k)
    ranks = retrieval_metrics(sim, rel, ks=(1,))["ranks"]["image_to_report"]
    row_height, font = 2.4, 7.5
    line = font * 1.35 / 72 / (row_height * 0.85)  # one text line as a fraction of the text panel's height
    fig = new_figure(11.0, row_height * len(queries))
    grid = fig.add_gridspec(len(queries), 2, width_ratios=[1, 4])
    for row, q in enumerate(queries):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(grayscale(studies[q][0]), cmap="gray")
        ax.set_title(f"study {q}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(grid[row, 1])
        ax.axis("off")
        entries = [(f"own report (ranked {ranks[q]} of {sim.shape[1]}): {reports[q]}", "0.45")]
        entries += [(f"{r}. {'[ok]' if rel[q, j] else '    '} ({sim[q, j]:+.3f}) {reports[j]}",
                     "green" if rel[q, j] else "black") for r, j in enumerate(best[q], start=1)]
        y = 1.0
        for text, colour in entries:
            wrapped = textwrap.wrap(textwrap.shorten(text, width=2 * width, placeholder=" ..."), width=width)
            ax.text(0.0, y, "\n".join(wrapped), va="top", ha="left", family="monospace", fontsize=font,
                    transform=ax.transAxes, color=colour)
            y -= line * (len(wrapped) + 0.6)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["RefersRetrievalOutput", "encode_reports", "encode_studies", "study_embeddings", "retrieval_examples_png", "retrieve",
           "same_text_relevance", "similarity_png", "top_k"]
