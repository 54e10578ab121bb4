"""Report generation with a REFERS pretraining checkpoint: batched `generate()` (greedy / beam search), decoding, and
pictures of the written reports beside the radiographs and the references."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .common import batches, grayscale, new_figure, save_figure


@torch.no_grad()
def generate_reports(
    model, processor, studies: Sequence[Sequence[Any]], tokenizer=None, batch_size: int = 8,
    desc: str = "Generating reports", **generate_kwargs,
) -> list[str]:
    """Write one report per study.

    Args:
        model: a `RefersForPreTraining` with a report decoder.
        processor: its `RefersProcessor` (views picked deterministically, no augmentation).
        studies: N studies, each a list of views (paths, PIL images, arrays).
        tokenizer: decodes the generated ids (the decoder's vocabulary); default: `processor.tokenizer`.
        generate_kwargs: to `model.generate` (`num_beams`, `max_new_tokens`, ...); greedy by default.

    Returns:
        N report strings (special tokens dropped).
    """
    tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
    if model.report_decoder is None:
        raise ValueError("this model has no report decoder (use_report_generation=False)")
    reports: list[str] = []
    for batch in batches(list(studies), batch_size, desc):
        inputs = processor(images=batch, do_train_augment=False, return_tensors="pt")
        ids = model.generate(inputs["pixel_values"], inputs["view_mask"], **generate_kwargs)
        reports += [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return reports


def report_examples_png(
    studies: Sequence[Sequence[Any]], generated: Mapping[str, Sequence[str]], references: Sequence[str],
    path: str | os.PathLike, study_ids: Sequence[str] | None = None, max_views: int = 3, width: int = 70,
) -> Path:
    """One row per study: its views, then the reference and each decoding's report (`generated`: name -> N texts).
    Returns the PNG path."""
    n = len(studies)
    if n == 0:
        raise ValueError("report_examples_png needs at least one study")
    for name, texts in generated.items():
        if len(texts) != n:
            raise ValueError(f"generated[{name!r}] has {len(texts)} reports for {n} studies")
    views = min(max_views, max(len(s) for s in studies))
    fig = new_figure(2.2 * views + 7.5, 2.6 * n)
    grid = fig.add_gridspec(n, views + 1, width_ratios=[1] * views + [3.4])
    for row, study in enumerate(studies):
        for col in range(views):
            ax = fig.add_subplot(grid[row, col])
            ax.axis("off")
            if col < len(study):
                ax.imshow(grayscale(study[col]), cmap="gray")
        ax = fig.add_subplot(grid[row, views])
        ax.axis("off")
        lines = [f"study {study_ids[row]}" if study_ids is not None else f"study {row}", ""]
        for name, text in [("reference", references[row])] + [(k, v[row]) for k, v in generated.items()]:
            wrapped = textwrap.shorten(text or "(empty)", width=3 * width, placeholder=" ...")
            lines += textwrap.wrap(f"{name}: {wrapped}", width=width) + [""]
        ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.5,
                transform=ax.transAxes)
    fig.tight_layout()
    return save_figure(fig, path)


def metrics_bar_png(scores: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike,
                    metrics: Sequence[str] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr"),
                    title: str = "Report generation") -> Path:
    """Grouped bars: one group per metric, one bar per decoding (`scores`: decoding -> metric -> value)."""
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    shown = [m for m in metrics if any(s.get(m) is not None for s in scores.values())]
    width = 0.8 / max(len(scores), 1)
    for index, (name, values) in enumerate(scores.items()):
        heights = [values.get(m) or 0.0 for m in shown]
        xs = [i + index * width for i in range(len(shown))]
        bars = ax.bar(xs, heights, width=width, label=name)
        ax.bar_label(bars, labels=[f"{h:.3f}" for h in heights], fontsize=6, rotation=90, padding=2)
    ax.set_xticks([i + width * (len(scores) - 1) / 2 for i in range(len(shown))], shown)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.margins(y=0.25)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["generate_reports", "metrics_bar_png", "report_examples_png"]
