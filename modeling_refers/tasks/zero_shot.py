"""Zero-shot classification with a REFERS pretraining checkpoint, as CheXzero does it: per class, a positive and a
negative sentence are encoded by the report encoder and scored against the study embedding; the class probability
is the softmax over the pair, `p = exp(s+ / tau) / (exp(s+ / tau) + exp(s- / tau))` with s the cosine similarity and
tau the checkpoint's contrastive temperature.

`RefersForZeroShotImageClassification` (same weights as `RefersForPreTraining`) returns CLIP-style
`logits_per_image`, so transformers' `pipeline("zero-shot-image-classification", model=folder)` drives it once this
module is imported (it registers the class with `AutoModelForZeroShotImageClassification`).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForZeroShotImageClassification
from transformers.modeling_outputs import ModelOutput

from ..configuration_refers import RefersConfig
from .common import batches, grayscale, new_figure, save_figure
from ..modeling_refers import RefersForPreTraining
from .retrieval import study_embeddings


def load_prompts(prompts: str | os.PathLike | Mapping | None, label_names: Sequence[str],
                 dataset_name: str | None = None) -> dict[str, tuple[str, str]]:
    """`{label: (positive, negative)}` for every label of `label_names`, from a JSON file (`{label: {"positive": ...,
    "negative": ...}}` or `{label: [positive, negative]}`), a dict of the same form, or, when `prompts` is None, the
    data set's own (`datasets_scripts.TARGET_DATASETS[dataset_name].zero_shot_prompts`). A missing label or a
    malformed entry raises ValueError naming it (and the file)."""
    where = "prompts"
    if prompts is None:
        from datasets_scripts import TARGET_DATASETS  # the registry holds each data set's prompts

        spec = TARGET_DATASETS.get(dataset_name)
        if spec is None or not spec.zero_shot_prompts:
            have = sorted(name for name, entry in TARGET_DATASETS.items() if entry.zero_shot_prompts)
            raise ValueError(f"no default prompts for {dataset_name!r} (have {have}); pass a prompts file")
        prompts = spec.zero_shot_prompts
    elif not isinstance(prompts, Mapping):
        where = os.fspath(prompts)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"prompts file {where!r} not found; expected a JSON object "
                                    '{label: {"positive": "...", "negative": "..."}}')
        try:
            prompts = json.loads(Path(where).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"prompts file {where!r} is not valid JSON: {err}") from None
        if not isinstance(prompts, Mapping):
            raise ValueError(f"prompts file {where!r} must hold a JSON object {{label: {{positive, negative}}}}")
    out = {}
    for label in label_names:
        if label not in prompts:
            raise ValueError(f"{where}: no prompts for label {label!r} (labels: {list(label_names)})")
        entry = prompts[label]
        pair = (entry.get("positive"), entry.get("negative")) if isinstance(entry, Mapping) else tuple(entry)
        if len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
            raise ValueError(f"{where}: label {label!r} needs a non-empty positive and negative sentence, got {entry!r}")
        out[label] = (pair[0], pair[1])
    return out


def prompts_to_json(prompts: Mapping[str, tuple[str, str]]) -> str:
    """The editable JSON form of `prompts` (what `load_prompts` reads)."""
    return json.dumps({k: {"positive": p, "negative": n} for k, (p, n) in prompts.items()}, indent=2) + "\n"


def zero_shot_scores(image_embeds: torch.Tensor, positive_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """CheXzero's positive-vs-negative softmax. `image_embeds` `(N, p)`, `positive_embeds` / `negative_embeds`
    `(C, p)` (any scale: all are L2-normalized here) -> `(N, C)` class probabilities."""
    image = torch.nn.functional.normalize(image_embeds, dim=-1)
    pos = image @ torch.nn.functional.normalize(positive_embeds, dim=-1).T
    neg = image @ torch.nn.functional.normalize(negative_embeds, dim=-1).T
    return torch.stack([pos, neg], dim=-1).div(temperature).softmax(dim=-1)[..., 0]


@dataclass
class RefersZeroShotOutput(ModelOutput):
    """
    Output of [`RefersForZeroShotImageClassification`] (CLIP's field names).

    Args:
        logits_per_image (`(num_images, num_texts)`): cosine similarity / contrastive temperature.
        logits_per_text (`(num_texts, num_images)`): its transpose.
        image_embeds (`(num_images, projection_dim)`), text_embeds (`(num_texts, projection_dim)`): L2-normalized.
    """

    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


def as_studies(pixel_values: torch.Tensor, view_mask: torch.Tensor | None, config: RefersConfig):
    """Single images `(B, C, H, W)` -> one-image studies `(B, V, C, H, W)` with the image repeated V times (what
    `RefersProcessor` does for a one-view study, the paper's padding); studies pass through."""
    if pixel_values.ndim == 5 or not config.use_view_fusion:
        return pixel_values, view_mask
    if pixel_values.ndim != 4:
        raise ValueError(f"`pixel_values` must be (B, C, H, W) or (B, V, C, H, W), got {tuple(pixel_values.shape)}")
    studies = pixel_values[:, None].expand(-1, config.num_views, -1, -1, -1)
    return studies, torch.ones(studies.shape[:2], dtype=torch.long, device=pixel_values.device)


class RefersForZeroShotImageClassification(RefersForPreTraining):
    """`RefersForPreTraining` (same weights, loads any pretraining checkpoint) with a CLIP-style forward: images or
    studies and a batch of texts in, `logits_per_image` out, for `pipeline("zero-shot-image-classification")`."""

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, view_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs) -> RefersZeroShotOutput:
        r"""
        input_ids, attention_mask (`(num_texts, T)`): the candidate sentences (`token_type_ids` is ignored: REFERS
            encodes reports without segment ids).
        pixel_values (`(num_images, C, H, W)` or `(num_images, V, C, H, W)`), view_mask (`(num_images, V)`).
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("RefersForZeroShotImageClassification needs `input_ids` (the candidate texts) and "
                             "`pixel_values`")
        if self.text_encoder is None:
            raise ValueError("zero-shot classification needs a report encoder (use_study_report_consistency=True)")
        pixel_values, view_mask = as_studies(pixel_values, view_mask, self.config)
        image_embeds = study_embeddings(self, pixel_values, view_mask)
        text_embeds = torch.nn.functional.normalize(
            self.get_text_features(input_ids, attention_mask).pooler_output, dim=-1)
        logits_per_image = image_embeds @ text_embeds.T / self.config.contrastive_temperature
        return RefersZeroShotOutput(logits_per_image=logits_per_image, logits_per_text=logits_per_image.T,
                                    image_embeds=image_embeds, text_embeds=text_embeds)


AutoModelForZeroShotImageClassification.register(RefersConfig, RefersForZeroShotImageClassification, exist_ok=True)


@dataclass
class RefersZeroShotClassification(ModelOutput):
    """
    Output of [`zero_shot_classify`].

    Args:
        scores (`(N, C)`): class probabilities (positive-vs-negative softmax per class).
        positive_similarity, negative_similarity (`(N, C)`): cosine similarity with each class's prompts.
        label_names (`list[str]`): the C classes, in order.
    """

    scores: torch.FloatTensor | None = None
    positive_similarity: torch.FloatTensor | None = None
    negative_similarity: torch.FloatTensor | None = None
    label_names: list | None = None


@torch.no_grad()
def zero_shot_classify(model, processor, images: Sequence[Any], prompts: Mapping[str, tuple[str, str]],
                       batch_size: int = 32) -> RefersZeroShotClassification:
    """Score N images (or studies: lists of views) against `prompts` (`{label: (positive, negative)}`)."""
    if model.text_encoder is None:
        raise ValueError("zero-shot classification needs a report encoder (use_study_report_consistency=True)")
    labels = list(prompts)
    texts = processor(text=[prompts[k][0] for k in labels] + [prompts[k][1] for k in labels], return_tensors="pt")
    text = torch.nn.functional.normalize(
        model.get_text_features(texts["input_ids"], texts["attention_mask"]).pooler_output, dim=-1)
    pos_text, neg_text = text[: len(labels)], text[len(labels):]
    studies = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
    embeds = []
    for batch in batches(studies, batch_size, "Zero-shot scoring"):
        inputs = processor(images=batch, do_train_augment=False, return_tensors="pt")
        embeds.append(study_embeddings(model, inputs["pixel_values"], inputs["view_mask"]))
    image = torch.cat(embeds)
    return RefersZeroShotClassification(
        scores=zero_shot_scores(image, pos_text, neg_text, model.config.contrastive_temperature),
        positive_similarity=image @ pos_text.T, negative_similarity=image @ neg_text.T, label_names=labels)


def auc_bars_png(per_class: Mapping[str, float | None], path: str | os.PathLike, title: str,
                 positives: Mapping[str, int] | None = None) -> Path:
    """Horizontal bars of the per-class ROC-AUC with the chance line at 0.5 (undefined classes marked n/a), each
    with its number of positive images when `positives` is given."""
    names = list(per_class)
    fig = new_figure(6.4, 0.32 * len(names) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    values = [per_class[n] if per_class[n] is not None else 0.0 for n in names]
    colours = ["tab:green" if (v or 0) > 0.5 else "tab:red" for v in values]
    ax.barh(range(len(names)), values, color=colours)
    for i, name in enumerate(names):
        text = "n/a" if per_class[name] is None else f"{values[i]:.3f}"
        if positives is not None:
            text += f"  ({positives.get(name, 0)} positive)"
        ax.text(max(values[i], 0.01) + 0.01, i, text, va="center", fontsize=7)
    ax.axvline(0.5, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("ROC-AUC (zero-shot)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def zero_shot_examples_png(images: Sequence[Any], scores: Any, label_names: Sequence[str],
                           truths: Sequence[Sequence[str]], path: str | os.PathLike, top: int = 3) -> Path:
    """A grid of radiographs, each titled with its true labels and its `top` zero-shot probabilities."""
    n = len(images)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = new_figure(3.2 * cols, 3.9 * rows)
    scores = np.asarray(scores)
    for index, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, index + 1)
        ax.imshow(grayscale(image[0] if isinstance(image, (list, tuple)) else image), cmap="gray")
        ax.axis("off")
        order = np.argsort(-scores[index])[:top]
        lines = [textwrap.shorten("true: " + (", ".join(truths[index]) or "none"), width=40, placeholder="...")]
        lines += [f"{label_names[c]} {scores[index, c]:.2f}" for c in order]
        ax.set_title("\n".join(lines), fontsize=7, loc="left")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["RefersForZeroShotImageClassification", "RefersZeroShotClassification",
           "RefersZeroShotOutput", "as_studies", "auc_bars_png", "load_prompts", "prompts_to_json",
           "zero_shot_classify", "zero_shot_examples_png", "zero_shot_scores"]
