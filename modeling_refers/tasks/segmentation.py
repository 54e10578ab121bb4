"""Semantic segmentation on the REFERS / MRM radiograph transformer: MRM's SIIM-ACR recipe on transformers' UperNet.

    python examples/run_segment.py --dataset_name siim_acr_pneumothorax --data_dir /data/siim \
        --model_name_or_path runs/mrm --output_dir runs/siim --do_train

The model is transformers' `UperNetForSemanticSegmentation` on a [`RefersBackbone`] (`AutoBackbone`) whose feature
maps are blocks 4, 6, 8, 12 rescaled x4 / x2 / x1 / x0.5 by MRM's Feature2Pyramid neck (part of the backbone:
`RefersConfig.feature_pyramid_rescales`), initialised from any REFERS / MRM checkpoint folder (only the neck and the
heads are new) or at random. [`RefersUperNetForSemanticSegmentation`] only replaces UperNet's cross-entropy with
MRM's losses; its folders load as plain `UperNetForSemanticSegmentation` too (after `import modeling_refers`).

Matched to MRM's official configuration (RL4M/MRM-pytorch, `Siim_Segmentation/configs/_base_/models/upernet_mrm.py`
and `configs/mrm/upernet_mrm-base_fp16_8x2_512x512_160k_siim.py`, read for this module):
- backbone `out_indices=[3, 5, 7, 11]` (0-based: blocks 4, 6, 8, 12), no final norm, patch tokens only; neck
  `Feature2Pyramid(rescales=[4, 2, 1, 0.5])` (its SyncBN is a BatchNorm2d here);
- `UPerHead` channels 768 (`hidden_size` = the backbone width), pool scales (1, 2, 3, 6), 2 classes;
  `FCNHead` auxiliary on level 3 (`in_index=2`), 256 channels, 1 convolution, no input concatenation;
- losses (mmseg's `FocalLoss` defaults: sigmoid, gamma 2.0, alpha 0.5; `DiceLoss` defaults: smooth 1, exponent 2):
  decode head `FocalLoss(loss_weight=2.0) + DiceLoss(loss_weight=1.0, class_weight=[0, 1])`, auxiliary head
  `FocalLoss(loss_weight=0.8) + DiceLoss(loss_weight=0.4, class_weight=[0, 1])` (so "focal 2.0" in the paper's
  summary is the focal term's weight; its gamma is 2.0 too). Dice is on the pneumothorax class only;
- backbone stochastic depth: drop path rising linearly to 0.1 over the blocks (`--drop_path_rate`);
- data: pixels normalized with mean 0.4978, std 0.2449 (x 255 in mmseg), random horizontal flip 0.5 in training;
  images resized to `image_size` (MRM: 512, keep-ratio resize + pad; SIIM images are square, so the same);
- metric: MRM's `medDice`, the mean over images of the per-image Dice on the pneumothorax class, an image with an
  empty true mask scoring 1 when the prediction is empty and 0 otherwise (the Kaggle SIIM metric);
- optimiser: AdamW lr 2e-5, betas (0.9, 0.999), weight decay 0.05 (none on biases, norms, position embedding and the
  aggregation token), layer-wise lr decay 0.65 (`--layer_decay`), linear warm-up 1,500 steps then poly (power 1 =
  linear) decay to 0; batch 2 x 8 GPUs; validation Dice every 500 steps, the best checkpoint kept.
Not reproduced: the official backbone is mmseg's BEiT block with a relative position bias (zero-initialised) and
layer scale (init 1.0): at initialisation it computes what these blocks compute, but it trains the extra parameters; MRM's heads have dropout 0.1 before the classifier (transformers' UperNet has none); the
position table is interpolated (bicubic) at every forward instead of once at load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
from transformers import HfArgumentParser, Trainer, TrainingArguments, UperNetConfig, UperNetForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..configuration_refers import RefersConfig
from ..file_utils import atomic_write_text
from ..loading import from_pretrained_checked
from ..modeling_refers import RefersBackbone
from ..training.trainer import EvaluationCollatorMixin

logger = logging.getLogger(__name__)

MRM_OUT_INDICES = [4, 6, 8, 12]  # MRM's out_indices (3, 5, 7, 11), 0-based, as stage numbers of a 12-block ViT
MRM_PYRAMID_RESCALES = [4, 2, 1, 0.5]
MRM_PIXEL_MEAN, MRM_PIXEL_STD = 0.4978, 0.2449
# (focal weight, Dice weight) per head, MRM's upernet_mrm.py
DECODE_LOSS_WEIGHTS = (2.0, 1.0)
AUXILIARY_LOSS_WEIGHTS = (0.8, 0.4)
LABEL_NAMES = ("background", "pneumothorax")


# ----------------------------------------------------------------------------------------------------------------------
# Losses and metric (mmseg's definitions, MRM's weights)
# ----------------------------------------------------------------------------------------------------------------------


def _one_hot(labels: torch.Tensor, num_classes: int, dtype) -> torch.Tensor:
    """`(B, H, W)` class ids -> `(B, C, H, W)` one-hot."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"segmentation labels must be class ids in [0, {num_classes - 1}], got values in "
                         f"[{int(labels.min())}, {int(labels.max())}] (a 0/255 mask must be divided by 255).")
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(dtype)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """mmseg's `FocalLoss(use_sigmoid=True)`: torchvision's sigmoid focal loss of every class channel against the
    one-hot labels, averaged over batch, classes and pixels. `logits` `(B, C, H, W)`, `labels` `(B, H, W)`."""
    targets = _one_hot(labels, logits.shape[1], torch.float32)
    return torchvision.ops.sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma, reduction="mean")


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, class_weight=(0.0, 1.0), smooth: float = 1.0,
              exponent: int = 2) -> torch.Tensor:
    """mmseg's `DiceLoss`: softmax probabilities p, one-hot t; per image and class `1 - (2 sum(p t) + smooth) /
    (sum(p^e) + sum(t^e) + smooth)`; the classes weighted by `class_weight` (MRM: [0, 1], pneumothorax only), summed
    and divided by the number of classes; the mean over images. `logits` `(B, C, H, W)`, `labels` `(B, H, W)`."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1).flatten(2)
    targets = _one_hot(labels, num_classes, torch.float32).flatten(2)
    numerator = 2 * (probs * targets).sum(-1) + smooth
    denominator = probs.pow(exponent).sum(-1) + targets.pow(exponent).sum(-1) + smooth
    per_class = 1 - numerator / denominator  # (B, C)
    weight = torch.as_tensor(class_weight, dtype=per_class.dtype, device=per_class.device)
    return ((per_class * weight).sum(dim=1) / num_classes).mean()


def mrm_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor,
                          auxiliary_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MRM's loss: `2.0 focal + 1.0 Dice` on the decode head's logits and `0.8 focal + 0.4 Dice` on the auxiliary
    head's (both at the labels' size). Returns `loss` and its four terms (unweighted)."""
    terms = {"focal": focal_loss(logits, labels), "dice": dice_loss(logits, labels)}
    loss = DECODE_LOSS_WEIGHTS[0] * terms["focal"] + DECODE_LOSS_WEIGHTS[1] * terms["dice"]
    if auxiliary_logits is not None:
        terms["auxiliary_focal"] = focal_loss(auxiliary_logits, labels)
        terms["auxiliary_dice"] = dice_loss(auxiliary_logits, labels)
        loss = loss + AUXILIARY_LOSS_WEIGHTS[0] * terms["auxiliary_focal"] + \
            AUXILIARY_LOSS_WEIGHTS[1] * terms["auxiliary_dice"]
    return {"loss": loss, **terms}


def per_image_dice(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """MRM's `medDice` per image: `2 |P & T| / (|P| + |T|)` on binary masks `(N, H, W)`; 1 when both are empty,
    0 when only the truth is empty."""
    predicted, true = predicted.reshape(len(predicted), -1) > 0, true.reshape(len(true), -1) > 0
    intersection = (predicted & true).sum(1)
    total = predicted.sum(1) + true.sum(1)
    return np.where(true.sum(1) == 0, (predicted.sum(1) == 0).astype(float),
                    2.0 * intersection / np.maximum(total, 1))


class DiceMetric:
    """`compute_metrics` for the Trainer with `batch_eval_metrics=True` (no full-resolution prediction is kept):
    per-image Dice of the argmax prediction, averaged on `compute_result=True` as `dice`."""

    def __init__(self):
        self.scores: list[np.ndarray] = []

    def __call__(self, prediction, compute_result: bool = False) -> dict | None:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        labels = prediction.label_ids
        logits = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(logits)
        labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        self.scores.append(per_image_dice(logits.argmax(1).cpu().numpy(), labels.cpu().numpy()))
        if not compute_result:
            return None
        scores = np.concatenate(self.scores)
        self.scores = []
        return {"dice": float(scores.mean()), "num_images": int(len(scores))}


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class RefersUperNetForSemanticSegmentation(UperNetForSemanticSegmentation):
    """transformers' UperNet (any backbone; here a [`RefersBackbone`]) trained with MRM's losses: with `labels`
    `(batch, H, W)` (class ids), `loss` = [`mrm_segmentation_loss`] of the decode and auxiliary heads' logits, both
    upsampled (bilinear) to the input size as UperNet does. `logits` `(batch, num_labels, H, W)`."""

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> SemanticSegmenterOutput | tuple:
        outputs = self.backbone.forward_with_filtered_kwargs(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        size = pixel_values.shape[2:]
        logits = F.interpolate(self.decode_head(outputs.feature_maps), size=size, mode="bilinear", align_corners=False)
        loss = None
        if labels is not None:
            auxiliary_logits = None
            if self.auxiliary_head is not None:
                auxiliary_logits = F.interpolate(self.auxiliary_head(outputs.feature_maps), size=size,
                                                 mode="bilinear", align_corners=False)
            loss = mrm_segmentation_loss(logits, labels, auxiliary_logits)["loss"]
        output = SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)
        return output if return_dict is not False else output.to_tuple()


def default_out_indices(num_hidden_layers: int, levels: int = 4) -> list[int]:
    """MRM's blocks 4, 6, 8, 12 of 12, scaled to another depth (e.g. 2, 3, 4, 6 of 6); needs 4 distinct blocks."""
    indices = [max(1, round(num_hidden_layers * k / 12)) for k in MRM_OUT_INDICES[:levels]]
    if len(set(indices)) != len(indices):
        raise ValueError(f"A {num_hidden_layers}-block model has no 4 distinct MRM levels ({indices}): pass "
                         "--out_indices (one per --feature_pyramid_rescales factor).")
    return indices


def segmentation_backbone_config(config: RefersConfig, out_indices: list[int] | None = None,
                                 rescales: list[float] | None = None, drop_path_rate: float = 0.1) -> RefersConfig:
    """A copy of `config` with the backbone outputs set: `out_indices` (default: MRM's blocks, scaled to the depth),
    the pyramid `rescales` (default MRM's [4, 2, 1, 0.5]) and the stochastic depth (MRM's 0.1)."""
    config = RefersConfig.from_dict(config.to_dict())
    config.drop_path_rate = drop_path_rate
    rescales = list(MRM_PYRAMID_RESCALES if rescales is None else rescales)
    config.out_indices = list(out_indices) if out_indices else default_out_indices(config.num_hidden_layers,
                                                                                 len(rescales))
    config.feature_pyramid_rescales = rescales
    return config


def upernet_config(backbone_config: RefersConfig) -> UperNetConfig:
    """MRM's heads: UPerHead with `hidden_size` channels = the backbone width (768 for ViT-B), pool scales
    (1, 2, 3, 6); FCN auxiliary head on level 3, 256 channels, 1 convolution; 2 classes."""
    if len(backbone_config.out_features) < 3:
        raise ValueError(f"UperNet's auxiliary head reads the third feature map (MRM's in_index=2); the backbone gives "
                         f"{len(backbone_config.out_features)} ({backbone_config.out_features}): give at least 3 "
                         "--out_indices (a 2-block model: 0 1 2, the embeddings and both blocks).")
    return UperNetConfig(
        backbone_config=backbone_config, hidden_size=backbone_config.hidden_size, pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True, auxiliary_channels=256, auxiliary_num_convs=1, auxiliary_concat_input=False,
        num_labels=len(LABEL_NAMES), id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: index for index, name in enumerate(LABEL_NAMES)},
    )


def build_segmentation_model(model_name_or_path: str | None = None, config_overrides: str | None = None,
                             out_indices: list[int] | None = None, rescales: list[float] | None = None,
                             drop_path_rate: float = 0.1) -> tuple[RefersUperNetForSemanticSegmentation, str]:
    """UperNet on a RefersBackbone initialised from a REFERS / MRM checkpoint folder (any of its classes: only the
    neck is new, the rest of the checkpoint's weights beyond the encoder are dropped; anything else missing raises),
    or random (`RefersConfig` + `config_overrides`). Returns the model and "checkpoint" or "random"."""
    if model_name_or_path:
        if not os.path.isdir(model_name_or_path):
            raise FileNotFoundError(f"--model_name_or_path {model_name_or_path!r}: no such folder (a REFERS or MRM "
                                    "checkpoint saved with save_pretrained)")
        config_dict, _ = RefersConfig.get_config_dict(model_name_or_path)
        config_dict = {k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")}
        base = RefersConfig.from_dict(config_dict)
        if config_overrides:
            base.update_from_string(config_overrides)
        config = segmentation_backbone_config(base, out_indices, rescales, drop_path_rate)
        backbone, report = from_pretrained_checked(RefersBackbone, model_name_or_path, config=config)
        logger.info(f"backbone from {model_name_or_path}: {report}")
    else:
        base = RefersConfig(aggregation="none", use_view_fusion=False)
        if config_overrides:
            base.update_from_string(config_overrides)
        config = segmentation_backbone_config(base, out_indices, rescales, drop_path_rate)
        backbone = None
    model = RefersUperNetForSemanticSegmentation(upernet_config(config))
    if backbone is not None:
        model.backbone = backbone
        model.config.backbone_config = backbone.config
    return model, ("checkpoint" if backbone is not None else "random")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def image_to_array(image: Image.Image, size: int) -> np.ndarray:
    """A radiograph (any PIL mode) -> `(3, size, size)` float32, bilinear resize, MRM's normalization."""
    gray = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return np.repeat(((gray - MRM_PIXEL_MEAN) / MRM_PIXEL_STD)[None], 3, axis=0)


def mask_to_array(mask: Image.Image, size: int, name: str = "mask") -> np.ndarray:
    """A mask (1 = pneumothorax, 0 elsewhere) -> `(size, size)` int64, nearest resize; other values raise."""
    array = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST), dtype=np.int64)
    if array.size and array.max() > 1:
        raise ValueError(f"{name}: mask values must be 0 (background) or 1 (pneumothorax), found "
                         f"{sorted(np.unique(array).tolist())[:6]}")
    return array


class SegmentationCollator:
    """Rows with `image` and `mask` (PIL images) -> `pixel_values` `(B, 3, s, s)` and `labels` `(B, s, s)`; in
    training each pair is flipped horizontally with probability 0.5 (MRM's RandomFlip)."""

    def __init__(self, image_size: int, train: bool = False):
        self.image_size, self.train = image_size, train

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels, labels = [], []
        for row in rows:
            name = f"mask of image {row.get('image_id', '?')!r}"
            image, mask = image_to_array(row["image"], self.image_size), mask_to_array(row["mask"], self.image_size,
                                                                                       name)
            if self.train and random.random() < 0.5:
                image, mask = image[:, :, ::-1], mask[:, ::-1]
            pixels.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(mask))
        return {"pixel_values": torch.from_numpy(np.stack(pixels)), "labels": torch.from_numpy(np.stack(labels))}


def _contour(mask: np.ndarray, width: int = 2) -> Image.Image:
    """The inner boundary (`width` pixels) of a binary mask, as a mode "L" image (255 on the boundary)."""
    region = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    return Image.fromarray(np.asarray(region) & ~np.asarray(region.filter(ImageFilter.MinFilter(2 * width + 1))))


def save_overlay(image: Image.Image, predicted: np.ndarray, true: np.ndarray, path: str, size: int = 256) -> None:
    """The radiograph at `size` x `size` with the true mask's contour in green and the predicted mask's in red (PNG);
    the masks (at the model's resolution) are enlarged with nearest neighbour before their contours are drawn."""
    base = image.convert("L").resize((size, size), Image.BILINEAR).convert("RGB")
    for mask, colour in ((true, (0, 255, 0)), (predicted, (255, 0, 0))):
        enlarged = np.asarray(Image.fromarray((mask > 0).astype(np.uint8)).resize((size, size), Image.NEAREST))
        base.paste(Image.new("RGB", (size, size), colour), mask=_contour(enlarged))
    base.save(path)


# ----------------------------------------------------------------------------------------------------------------------
# Optimiser: MRM's layer-wise learning-rate decay
# ----------------------------------------------------------------------------------------------------------------------


def layer_decay_parameter_groups(model: RefersUperNetForSemanticSegmentation, learning_rate: float,
                                 weight_decay: float, layer_decay: float) -> list[dict]:
    """mmseg's LayerDecayOptimizerConstructor as MRM uses it: the embeddings are layer 0, block i layer i + 1,
    everything else (neck, heads) layer L + 1; a parameter of layer l gets `lr * layer_decay ** (L + 1 - l)`; no
    weight decay on 1-D parameters (biases, norms), the position embedding and the aggregation token."""
    num_layers = model.config.backbone_config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("backbone.embeddings."):
            layer = 0
        elif name.startswith("backbone.layers."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = num_layers + 1
        no_decay = parameter.ndim == 1 or name.endswith((".bias", "position_embeddings", "cls_token"))
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": learning_rate * layer_decay ** (num_layers + 1 - layer)})
        group["params"].append(parameter)
    return list(groups.values())


class SegmentationTrainer(EvaluationCollatorMixin, Trainer):
    """Trainer with MRM's layer-wise lr decay (`layer_decay` < 1) in AdamW's parameter groups; evaluation and
    prediction batches come from `eval_data_collator` (no flip) and keep every image (`dataloader_drop_last` holds
    for training batches only)."""

    def __init__(self, *args, layer_decay: float = 1.0, eval_data_collator=None, **kwargs):
        self.layer_decay = layer_decay
        self.eval_data_collator = eval_data_collator
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _evaluation_batches(self):
        """Inside: the no-flip collator and no dropped last batch (the Trainer's public getters read both)."""
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            with super()._evaluation_batches():
                yield
        finally:
            self.args.dataloader_drop_last = drop_last

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.layer_decay != 1.0:
            groups = layer_decay_parameter_groups(self.model, self.args.learning_rate, self.args.weight_decay,
                                                  self.layer_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                               betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
            return self.optimizer
        return super().create_optimizer()


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentationArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A REFERS / MRM checkpoint folder (any class: pretraining, backbone, classifier); random without."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated RefersConfig changes (random initialisation: the architecture, e.g. "
                "'hidden_size=32,num_hidden_layers=2,...')."})
    out_indices: list[int] | None = field(default=None, metadata={
        "help": "Backbone stages (block numbers) giving the feature maps; default MRM's 4 6 8 12 (scaled to the "
                "depth)."})
    feature_pyramid_rescales: list[float] | None = field(default=None, metadata={
        "help": "Feature2Pyramid factors, one per out index; default MRM's 4 2 1 0.5."})
    image_size: int = field(default=512, metadata={"help": "Images and masks are resized to this square (MRM: 512)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A target data set builder with image and mask columns (siim_acr_pneumothorax), read from --data_dir."})
    data_dir: str | None = field(default=None, metadata={"help": "The data set as distributed (--dataset_name)."})
    label_ratio: float = field(default=1.0, metadata={"help": "--dataset_name: MRM's 1%% / 10%% / 100%% training list."})
    dataset_path: str | None = field(default=None, metadata={
        "help": "Instead of --dataset_name: a datasets.load_from_disk DatasetDict (train / validation / test) with "
                "image and mask columns."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_predict_samples: int | None = field(default=None)
    drop_path_rate: float = field(default=0.1, metadata={"help": "Backbone stochastic depth (MRM 0.1)."})
    layer_decay: float = field(default=0.65, metadata={"help": "Layer-wise lr decay (MRM 0.65; 1 = none)."})
    num_overlays: int = field(default=4, metadata={"help": "Test images drawn with predicted and true contours."})
    start_fresh: bool = field(default=False, metadata={
        "help": "Delete the checkpoints of an earlier run in --output_dir and start again (without it, the same run "
                "resumes and another run is refused)."})


@dataclass
class SegmentationTrainingArguments(TrainingArguments):
    """TrainingArguments with MRM's SIIM defaults."""

    learning_rate: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: float = 1500
    lr_scheduler_type: str = "linear"  # mmseg's poly with power 1 and min_lr 0
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    eval_strategy: str = "steps"
    eval_steps: float | None = 500
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = 2
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "dice"
    greater_is_better: bool | None = True
    batch_eval_metrics: bool = True
    remove_unused_columns: bool = False
    # UperNet's pyramid pooling has a BatchNorm on a 1 x 1 map: a training batch needs 2 images (mmseg's iteration
    # sampler never makes a short last batch)
    dataloader_drop_last: bool = True
    report_to: None | str | list[str] = "none"


def load_segmentation_data(args: SegmentationArguments):
    """The DatasetDict (train / validation / test, columns image and mask) of --dataset_name or --dataset_path."""
    from datasets import DatasetDict, Image as ImageFeature, load_from_disk

    if bool(args.dataset_name) == bool(args.dataset_path):
        raise ValueError("give exactly one of --dataset_name (with --data_dir) and --dataset_path")
    if args.dataset_path:
        if not os.path.isdir(args.dataset_path):
            raise FileNotFoundError(f"--dataset_path {args.dataset_path!r}: no such folder (a save_to_disk DatasetDict)")
        data = load_from_disk(args.dataset_path)
        source = args.dataset_path
    else:
        from datasets_scripts import load_target_dataset

        if not args.data_dir or not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"--data_dir {args.data_dir!r}: no such folder; expected {args.dataset_name} as "
                                    "distributed")
        kwargs = {"label_ratio": args.label_ratio} if args.label_ratio != 1.0 else {}
        data = load_target_dataset(args.dataset_name, args.data_dir, **kwargs)
        source = args.dataset_name
    if not isinstance(data, DatasetDict) or not {"train", "validation", "test"} <= set(data):
        raise ValueError(f"{source}: expected a DatasetDict with splits train, validation and test, got "
                         f"{sorted(data) if isinstance(data, DatasetDict) else type(data).__name__}")
    for split in ("train", "validation", "test"):
        missing = {"image", "mask"} - set(data[split].column_names)
        if missing:
            raise ValueError(f"{source}: split {split!r} lacks the column(s) {sorted(missing)} (has "
                             f"{data[split].column_names}); segmentation needs `image` and `mask` (1 = pneumothorax)")
        for column in ("image", "mask"):
            if not isinstance(data[split].features[column], ImageFeature):
                data[split] = data[split].cast_column(column, ImageFeature())
    return data


def finished_run(checkpoint: str | None, output_dir: str):
    """`(model folder, TrainerState)` when `checkpoint` is the last step of its run, else None: the model the run
    ended with (`output_dir`'s, saved after training: the best checkpoint with `load_best_model_at_end`), or that best
    checkpoint, or `checkpoint` itself when the run stopped before saving it."""
    from transformers import TrainerState

    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if not state.max_steps or state.global_step < state.max_steps:
        return None
    for source in (output_dir, state.best_model_checkpoint, checkpoint):
        if source and os.path.isfile(os.path.join(source, "model.safetensors")):
            return source, state
    return None


def _first(dataset, limit):
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _write_overlays(trainer, model, eval_collator, test_set, args, output_dir: str) -> list[dict]:
    """On the main process, save the first `args.num_overlays` test images with predicted and true masks to
    `output_dir/overlays/` and return `[{"file", "dice"}]` (an empty list elsewhere or with no overlays)."""
    overlays = []
    if trainer.is_world_process_zero() and args.num_overlays > 0:
        overlay_dir = os.path.join(output_dir, "overlays")
        os.makedirs(overlay_dir, exist_ok=True)
        rows = [test_set[index] for index in range(min(args.num_overlays, len(test_set)))]
        batch = eval_collator(rows)
        model.eval()
        with torch.no_grad():
            predicted = model(pixel_values=batch["pixel_values"].to(model.device)).logits.argmax(1).cpu().numpy()
        dice = per_image_dice(predicted, batch["labels"].numpy())
        for index, row in enumerate(rows):
            name = f"{index:02d}_{os.path.splitext(str(row.get('image_id', index)))[0]}.png"
            save_overlay(row["image"], predicted[index], batch["labels"][index].numpy(),
                         os.path.join(overlay_dir, name), size=max(256, args.image_size))
            overlays.append({"file": os.path.join("overlays", name), "dice": float(dice[index])})
    return overlays


def _results_summary(args, training_args, state, init, signature, validation, test, backbone_config, splits,
                     overlays) -> dict:
    """The run's `results.json` content: Dice and loss per split, data, initialisation, backbone and training."""
    train_set, eval_set, test_set = splits
    return {
        "task": "semantic segmentation (pneumothorax)",
        "data": signature["data"],
        "init": init,
        "init_from": args.model_name_or_path,
        "test_dice": test.get("test_dice"),
        "validation_dice": validation.get("eval_dice"),
        "test_loss": test.get("test_loss"),
        "num_test_images_scored": test.get("test_num_images"),
        "num_images": {"train": len(train_set), "validation": len(eval_set), "test": len(test_set)},
        "metric": "MRM's medDice: mean per-image Dice on the pneumothorax class (empty truth: 1 if the prediction is "
                  "empty, else 0)",
        "loss": "decode head 2.0 focal + 1.0 Dice, auxiliary head 0.8 focal + 0.4 Dice (MRM's upernet_mrm.py)",
        "backbone": {"out_features": backbone_config.out_features,
                     "feature_pyramid_rescales": backbone_config.feature_pyramid_rescales,
                     "hidden_size": backbone_config.hidden_size, "num_hidden_layers": backbone_config.num_hidden_layers},
        "image_size": args.image_size,
        "training": {"global_step": state.global_step, "max_steps": training_args.max_steps,
                     "learning_rate": training_args.learning_rate, "layer_decay": args.layer_decay,
                     "per_device_train_batch_size": training_args.per_device_train_batch_size,
                     "best_checkpoint": (os.path.relpath(state.best_model_checkpoint, training_args.output_dir)
                                         if state.best_model_checkpoint else None)},
        "overlays": overlays,
    }


def main(argv=None) -> dict:
    parser = HfArgumentParser((SegmentationArguments, SegmentationTrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from ..training.trainer import resume_checkpoint, write_run_signature

    # Inputs first: nothing is written before they are known good.
    if training_args.do_train and training_args.per_device_train_batch_size < 2:
        raise ValueError("--per_device_train_batch_size must be >= 2: UperNet's pyramid pooling normalizes a 1 x 1 "
                         "map with BatchNorm, which needs 2 images per batch in training (MRM: 2 per GPU)")
    data = load_segmentation_data(args)
    train_set = _first(data["train"], args.max_train_samples)
    eval_set = _first(data["validation"], args.max_eval_samples)
    test_set = _first(data["test"], args.max_predict_samples)
    model, init = build_segmentation_model(args.model_name_or_path, args.config_overrides, args.out_indices,
                                           args.feature_pyramid_rescales, args.drop_path_rate)
    backbone_config = model.config.backbone_config
    logger.info(f"UperNet on RefersBackbone, initialised from {init}"
                f"{' ' + args.model_name_or_path if args.model_name_or_path else ' (no checkpoint given)'}; "
                f"feature maps {backbone_config.out_features} x {backbone_config.feature_pyramid_rescales}; "
                f"{len(train_set)} training, {len(eval_set)} validation, {len(test_set)} test images")
    signature = {
        "data": args.dataset_path or f"{args.dataset_name}:{args.data_dir}:{args.label_ratio}",
        "num_images": [len(train_set), len(eval_set), len(test_set)], "init": init,
        "model_name_or_path": args.model_name_or_path, "config_overrides": args.config_overrides,
        "out_indices": backbone_config.out_indices, "rescales": backbone_config.feature_pyramid_rescales,
        "image_size": args.image_size, "seed": training_args.seed, "learning_rate": training_args.learning_rate,
        "layer_decay": args.layer_decay, "max_steps": training_args.max_steps, "drop_path_rate": args.drop_path_rate,
    }
    checkpoint = None
    if training_args.do_train:
        checkpoint = resume_checkpoint(training_args, signature=signature, start_fresh=args.start_fresh)
    os.makedirs(training_args.output_dir, exist_ok=True)
    if training_args.do_train:
        write_run_signature(training_args, signature)

    eval_collator = SegmentationCollator(args.image_size, train=False)
    trainer = SegmentationTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=SegmentationCollator(args.image_size, train=True), compute_metrics=DiceMetric(),
        layer_decay=args.layer_decay, eval_data_collator=eval_collator,
    )
    finished = finished_run(checkpoint, training_args.output_dir)
    if finished is not None:  # the Trainer would resume a finished run mid-epoch and train one step more
        source, state = finished
        logger.info(f"{checkpoint} ends the run (step {state.global_step} of {state.max_steps}): evaluating {source}")
        trainer.model = model = RefersUperNetForSemanticSegmentation.from_pretrained(source).to(trainer.args.device)
        trainer.state = state
    elif training_args.do_train:
        trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
    validation = trainer.evaluate(eval_set, metric_key_prefix="eval")
    test = trainer.evaluate(test_set, metric_key_prefix="test")

    overlays = _write_overlays(trainer, model, eval_collator, test_set, args, training_args.output_dir)

    results = _results_summary(args, training_args, trainer.state, init, signature, validation, test,
                               backbone_config, (train_set, eval_set, test_set), overlays)
    if trainer.is_world_process_zero():
        atomic_write_text(os.path.join(training_args.output_dir, "results.json"), json.dumps(results, indent=2))
    logger.info(f"test Dice {results['test_dice']}, validation Dice {results['validation_dice']}")
    return results


__all__ = [
    "DiceMetric",
    "RefersUperNetForSemanticSegmentation",
    "SegmentationCollator",
    "build_segmentation_model",
    "dice_loss",
    "focal_loss",
    "layer_decay_parameter_groups",
    "mrm_segmentation_loss",
    "per_image_dice",
    "segmentation_backbone_config",
    "upernet_config",
]
