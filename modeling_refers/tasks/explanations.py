"""Explanations for a fine-tuned REFERS classifier, as the paper evaluates them: a class activation map per image and
class, turned into boxes by a fixed threshold (normalize to [0, 1], threshold, connected components, bounding boxes),
scored by IoU against radiologists' boxes.

Maps: Grad-CAM (and the other gradient CAMs of pytorch-grad-cam) on the last transformer block, with the patch
tokens reshaped to the patch grid (14 x 14 for ViT-B/16 at 224 px); the same function takes a CNN and its target
layers. Attention maps read the aggregation token's attention to the patches (last layer, or rolled out over all
layers, Abnar & Zuidema 2020). Connected components: scipy.ndimage; IoU: torchvision.ops.box_iou.

Boxes are `(x_min, y_min, x_max, y_max)` in pixels with exclusive max, so a box covering pixel columns 2..4 is
`(2, *, 5, *)` and its area is `(x_max - x_min) * (y_max - y_min)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import new_figure, pixels_to_display, save_figure


def _grad_cam_library():
    try:
        import pytorch_grad_cam
    except ImportError as err:
        raise ImportError("Grad-CAM maps need pytorch-grad-cam: pip install grad-cam  (or pip install -e '.[test]')"
                          ) from err
    return pytorch_grad_cam


CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam")
ATTENTION_METHODS = ("attention", "rollout")


class RefersLogits(nn.Module):
    """`RefersForImageClassification` (or any model with `.logits` in its output) as a module returning the logits
    tensor `(B, num_labels)`, which is what pytorch-grad-cam calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values)
        return out.logits if hasattr(out, "logits") else out


def patch_grid(model) -> tuple[int, int]:
    """(rows, columns) of the patch grid of a REFERS model's input: `image_size / patch_size` each way."""
    config = model.config
    side = config.image_size // config.patch_size
    return side, side


def vit_reshape_transform(grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Token activations `(B, 1 + h * w, d)` -> `(B, d, h, w)`: the aggregation token dropped, the patch tokens laid
    on the patch grid (pytorch-grad-cam's `reshape_transform` for vision transformers)."""
    height, width = grid

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:, :]
        if patches.shape[1] != height * width:
            raise ValueError(f"expected {height * width} patch tokens for a {height} x {width} grid, got "
                             f"{patches.shape[1]}")
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def refers_target_layers(model) -> list[nn.Module]:
    """The layer Grad-CAM reads in a REFERS classifier: the first LayerNorm of the last transformer block (its
    output holds every patch token entering the last attention, the usual ViT choice of pytorch-grad-cam)."""
    return [model.base_model.layers[-1].layernorm_before]


def grad_cam_maps(
    model: nn.Module, pixel_values: torch.Tensor, class_indices: Sequence[int], method: str = "gradcam",
    target_layers: Sequence[nn.Module] | None = None, reshape_transform: Callable | None = None,
) -> np.ndarray:
    """Gradient class activation maps with pytorch-grad-cam.

    Args:
        model: a `RefersForImageClassification` (target layers and the token reshape are then found) or any CNN
            returning logits `(B, C)` (pass `target_layers`, e.g. `[resnet.layer4[-1]]`).
        pixel_values: `(B, C, H, W)` images as the model takes them.
        class_indices: B class ids, the class explained for each image.
        method: one of `CAM_METHODS`.

    Returns:
        `(B, H, W)` float32 maps in [0, 1] (min-max per map, upsampled to the input by the library).
    """
    library = _grad_cam_library()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {"gradcam": library.GradCAM, "gradcam++": library.GradCAMPlusPlus, "xgradcam": library.XGradCAM,
               "hirescam": library.HiResCAM, "layercam": library.LayerCAM, "eigengradcam": library.EigenGradCAM}
    if method not in classes:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    if len(class_indices) != pixel_values.shape[0]:
        raise ValueError(f"class_indices has {len(class_indices)} entries for {pixel_values.shape[0]} images")
    is_refers = hasattr(model, "config") and getattr(model.config, "model_type", None) == "refers"
    if target_layers is None:
        if not is_refers:
            raise ValueError("target_layers is needed for a model that is not a REFERS classifier (e.g. "
                             "[resnet.layer4[-1]] for a ResNet)")
        target_layers = refers_target_layers(model)
    if reshape_transform is None and is_refers:
        reshape_transform = vit_reshape_transform(patch_grid(model))
    cam = classes[method](model=RefersLogits(model), target_layers=list(target_layers),
                          reshape_transform=reshape_transform)
    try:
        maps = cam(input_tensor=pixel_values, targets=[ClassifierOutputTarget(int(c)) for c in class_indices])
    finally:
        cam.activations_and_grads.release()
    return np.asarray(maps, dtype=np.float32)


def _set_attention(model, implementation: str) -> None:
    """`model.set_attn_implementation` without transformers' notes about the report encoder / decoder sub-configs
    a classifier carries from its pretraining checkpoint but does not build."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model.set_attn_implementation(implementation)
    finally:
        logging.set_verbosity(verbosity)


@torch.no_grad()
def attention_maps(model, pixel_values: torch.Tensor, rollout: bool = False) -> np.ndarray:
    """The aggregation token's attention to the patches of a REFERS classifier (class-agnostic).

    `rollout=False`: the last layer's attention, averaged over heads. `rollout=True`: attention rollout over all
    layers (heads averaged, the identity added for the residual path, rows renormalized, layers multiplied).
    Runs with eager attention (SDPA returns no weights). Returns `(B, H, W)` float32 maps in [0, 1], upsampled to the
    input with pytorch-grad-cam's `scale_cam_image`.
    """
    _grad_cam_library()
    from pytorch_grad_cam.utils.image import scale_cam_image

    previous = model.config._attn_implementation
    try:
        if previous != "eager":
            _set_attention(model, "eager")
        attentions = model(pixel_values, output_attentions=True).attentions
    finally:
        if previous != "eager":
            _set_attention(model, previous)
    if not attentions:
        raise ValueError("the model returned no attention weights")
    per_layer = [a.mean(dim=1) for a in attentions]  # (B, seq, seq) each
    if rollout:
        eye = torch.eye(per_layer[0].shape[-1], dtype=per_layer[0].dtype)
        joint = eye.expand_as(per_layer[0])
        for attn in per_layer:
            step = 0.5 * attn + 0.5 * eye
            joint = (step / step.sum(dim=-1, keepdim=True)) @ joint
        weights = joint[:, 0, 1:]
    else:
        weights = per_layer[-1][:, 0, 1:]
    height, width = patch_grid(model)
    grid = weights.reshape(-1, height, width).float().numpy()
    return scale_cam_image(grid, (pixel_values.shape[-1], pixel_values.shape[-2]))


def explanation_maps(model, pixel_values: torch.Tensor, class_indices: Sequence[int], method: str) -> np.ndarray:
    """`(B, H, W)` maps in [0, 1] by `method`: a Grad-CAM family member (`CAM_METHODS`) or `ATTENTION_METHODS`."""
    if method in ATTENTION_METHODS:
        return attention_maps(model, pixel_values, rollout=method == "rollout")
    return grad_cam_maps(model, pixel_values, class_indices, method=method)


# --------------------------------------------------------------------------------------------------- maps -> boxes
def map_to_boxes(cam: np.ndarray, threshold: float = 0.5) -> list[tuple[float, float, float, float]]:
    """The paper's map-to-box step: min-max normalize `cam` `(H, W)` to [0, 1], keep pixels >= `threshold`, label the
    8-connected components (scipy.ndimage), one bounding box `(x_min, y_min, x_max, y_max)` (exclusive max) each,
    largest area first. A constant map gives no box."""
    from scipy import ndimage

    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"a map must be (H, W), got shape {cam.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    low, high = cam.min(), cam.max()
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return []
    mask = (cam - low) / (high - low) >= threshold
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = [(float(sx.start), float(sy.start), float(sx.stop), float(sy.stop))
             for sy, sx in ndimage.find_objects(labels) if sy is not None]
    return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """`(N, M)` IoU of boxes `(N, 4)` and `(M, 4)` in `(x_min, y_min, x_max, y_max)` (torchvision.ops.box_iou)."""
    from torchvision.ops import box_iou as tv_box_iou

    a = torch.as_tensor(np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4))
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    for name, boxes in (("boxes_a", a), ("boxes_b", b)):
        if bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
            raise ValueError(f"{name}: every box needs x_max >= x_min and y_max >= y_min")
    return tv_box_iou(a, b).numpy()


def best_iou(predicted: Sequence[Sequence[float]], truth: Sequence[float]) -> float:
    """The IoU of the predicted box that overlaps the true box most (0 without predicted boxes)."""
    return float(box_iou(predicted, [truth]).max()) if len(predicted) else 0.0


def summarise_ious(ious: Sequence[float], thresholds: Sequence[float] = (0.5, 0.3)) -> dict:
    """`{"num_boxes", "mean_iou", "iou>0.5", "iou>0.3"}`: mean IoU and the share of true boxes whose best IoU
    exceeds each threshold (the paper reports IoU mostly > 0.5)."""
    values = np.asarray(ious, dtype=np.float64)
    out = {"num_boxes": int(len(values)), "mean_iou": float(values.mean()) if len(values) else None}
    for t in thresholds:
        out[f"iou>{t}"] = float((values > t).mean()) if len(values) else None
    return out


def scale_boxes(boxes: Sequence[Mapping[str, float]], from_size: tuple[int, int], to_size: tuple[int, int]) -> list:
    """Boxes (`{"x_min", ...}` dicts) from an image of `from_size` (width, height) to one of `to_size`, as
    `(x_min, y_min, x_max, y_max)` tuples (what a plain resize of the whole image does to them)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return [(b["x_min"] * sx, b["y_min"] * sy, b["x_max"] * sx, b["y_max"] * sy) for b in boxes]


# ------------------------------------------------------------------------------------------------- the whole task
def whole_image_inputs(image_processor, images: Sequence[Any], image_size: int) -> torch.Tensor:
    """`(B, C, image_size, image_size)`: each radiograph resized whole to the model's input (no centre crop), so every
    radiologist box stays inside and maps to it by a plain scale."""
    size = {"height": image_size, "width": image_size}
    return image_processor(list(images), size=size, do_center_crop=False, do_train_augment=False,
                           return_tensors="pt")["pixel_values"]


def localise(model, image_processor, images: Sequence[Any], boxes: Sequence[Sequence[Mapping[str, Any]]],
             methods: Sequence[str] = ("gradcam",), threshold: float = 0.5, image_ids: Sequence[str] | None = None,
             batch_size: int = 8):
    """Explain every (image, labelled class) with each method and score the map's boxes against the true ones.

    Args:
        model: a fine-tuned `RefersForImageClassification` whose `config.label2id` has the boxes' labels.
        images: N radiographs (paths, PIL images, arrays); `boxes`: per image, `{"label", "x_min", "y_min", "x_max",
            "y_max"}` dicts in that image's pixels (e.g. `load_nih_bounding_boxes`).

    Yields per (image, label, method) a dict: `image_id`, `label`, `method`, `truth` and `predicted` boxes in the
    model's input frame, `ious` (the best IoU of each true box), `cam` `(H, W)`, `pixel_values` `(C, H, W)`.
    """
    from tqdm.auto import tqdm

    from ..radiograph_io import load_radiograph

    unknown = sorted({b["label"] for group in boxes for b in group} - set(model.config.label2id))
    if unknown:
        raise ValueError(f"the classifier has no class {unknown} (its labels: {list(model.config.label2id)}); "
                         "explain with a classifier fine-tuned on the boxes' data set")
    for method in methods:
        if method not in CAM_METHODS + ATTENTION_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {CAM_METHODS + ATTENTION_METHODS}")
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
    image_ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(images))]
    side = model.config.image_size
    jobs = [(i, label) for i, group in enumerate(boxes) for label in dict.fromkeys(b["label"] for b in group)]
    model.eval()
    for start in tqdm(range(0, len(jobs), batch_size), desc="Explaining", unit="batch"):
        chunk = jobs[start : start + batch_size]
        arrays = [load_radiograph(images[i]) for i, _ in chunk]
        pixels = whole_image_inputs(image_processor, arrays, side)
        classes = [model.config.label2id[label] for _, label in chunk]
        for method in methods:
            maps = explanation_maps(model, pixels, classes, method)
            for (i, label), array, cam, pixel in zip(chunk, arrays, maps, pixels):
                height, width = array.shape[:2]
                truth = scale_boxes([b for b in boxes[i] if b["label"] == label], (width, height), (side, side))
                predicted = map_to_boxes(cam, threshold)
                yield {"image_id": image_ids[i], "label": label, "method": method, "truth": truth,
                       "predicted": predicted, "ious": [best_iou(predicted, t) for t in truth], "cam": cam,
                       "pixel_values": pixel}


def summarise_localisation(entries: Sequence[Mapping[str, Any]]) -> dict:
    """`{method: {"all": summarise_ious(...), "per_class": {label: summarise_ious(...)}}}` over `localise` entries."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(e["method"] for e in entries):
        chosen = [e for e in entries if e["method"] == method]
        labels = dict.fromkeys(e["label"] for e in chosen)
        out[method] = {"all": summarise_ious([v for e in chosen for v in e["ious"]]),
                       "per_class": {label: summarise_ious([v for e in chosen if e["label"] == label for v in e["ious"]])
                                     for label in labels}}
    return out


# ---------------------------------------------------------------------------------------------------------- pictures
def _draw_boxes(ax, boxes, colour, style, label):
    from matplotlib.patches import Rectangle

    for index, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.6,
                               linestyle=style, label=label if index == 0 else None))


def explanation_png(pixel_values: Any, cam: np.ndarray, predicted: Sequence, truth: Sequence, path: str | os.PathLike,
                    title: str = "") -> Path:
    """Two panels: the radiograph as the model saw it, and the same with the heat map, the predicted boxes (red,
    dashed) and the radiologists' boxes (green). Returns the PNG path."""
    image = pixels_to_display(pixel_values)
    fig = new_figure(7.2, 4.0)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.imshow(image, cmap="gray", vmin=0, vmax=1)
    _draw_boxes(left, truth, "lime", "-", "radiologist")
    left.set_title("radiograph + radiologist box", fontsize=8)
    right.imshow(image, cmap="gray", vmin=0, vmax=1)
    right.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    _draw_boxes(right, truth, "lime", "-", "radiologist")
    _draw_boxes(right, predicted, "red", "--", "from the map")
    right.set_title("heat map + boxes", fontsize=8)
    for ax in (left, right):
        ax.axis("off")
    if predicted or truth:
        right.legend(loc="lower right", fontsize=6, framealpha=0.7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def explanation_grid_png(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: int = 4) -> Path:
    """A contact sheet: per entry (`pixel_values`, `cam`, `predicted`, `truth`, `title`) the heat map over the
    radiograph with both kinds of boxes. Returns the PNG path."""
    if not entries:
        raise ValueError("explanation_grid_png needs at least one entry")
    columns = min(columns, len(entries))
    rows = (len(entries) + columns - 1) // columns
    fig = new_figure(2.8 * columns, 3.0 * rows)
    for index, entry in enumerate(entries):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(pixels_to_display(entry["pixel_values"]), cmap="gray", vmin=0, vmax=1)
        ax.imshow(entry["cam"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        _draw_boxes(ax, entry["truth"], "lime", "-", None)
        _draw_boxes(ax, entry["predicted"], "red", "--", None)
        ax.set_title(entry.get("title", ""), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def iou_histogram_png(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Distribution of the best IoU per true box, one histogram per method, with the 0.3 and 0.5 marks."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0.0, 1.0, 21)
    for method in dict.fromkeys(e["method"] for e in entries):
        values = [v for e in entries if e["method"] == method for v in e["ious"]]
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5,
                label=f"{method} (mean {np.mean(values):.3f}, >0.5: {np.mean(np.asarray(values) > 0.5):.0%})")
    for mark in (0.3, 0.5):
        ax.axvline(mark, color="0.5", linestyle=":", linewidth=0.8)
    ax.set_xlabel("IoU of the best box from the map with the radiologist's box")
    ax.set_ylabel("true boxes")
    ax.set_title(title or "Localisation", fontsize=9)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["ATTENTION_METHODS", "CAM_METHODS", "RefersLogits", "attention_maps", "best_iou", "box_iou",
           "explanation_grid_png", "explanation_maps", "explanation_png", "grad_cam_maps", "iou_histogram_png",
           "localise", "map_to_boxes", "patch_grid", "refers_target_layers", "scale_boxes", "summarise_ious",
           "summarise_localisation", "vit_reshape_transform", "whole_image_inputs"]
