"""Convert a checkpoint of the official REFERS code (github.com/funnyzhou/REFERS) to a `refers` safetensors folder.

The official code is built on jeonsworld's ViT-pytorch. Its state dicts name the radiograph transformer

    transformer.embeddings.patch_embeddings.{weight,bias}          Conv2d (d, C, p, p)
    transformer.embeddings.position_embeddings                     (1, 1 + num_patches, d)
    transformer.embeddings.cls_token                               (1, 1, d)
    transformer.encoder.layer.N.attention_norm.{weight,bias}
    transformer.encoder.layer.N.attn.{query,key,value,out}.{weight,bias}
    transformer.encoder.layer.N.ffn_norm.{weight,bias}
    transformer.encoder.layer.N.ffn.{fc1,fc2}.{weight,bias}
    transformer.encoder.encoder_norm.{weight,bias}

plus `head.{weight,bias}` in fine-tuning checkpoints (`Fine-tune/*/models/modeling.py`, saved as a bare state dict).
Pretraining checkpoints (`Pre-train/refers/utils/checkpointing.py`: `{"model": ..., "optimizer": ...,
"iteration": ...}`) nest the backbone under `visual.vit.` beside

    fusion.fc1, fusion.fc2, fusion.fc3      one Linear(3 * d, 1) per view (`Pre-train/refers/modules/Fusion.py`)
    contrastive_bert.text_encoder.*         Bio_ClinicalBERT (transformers BertModel keys)
    contrastive_bert.fc.*                   Linear(d, 3 * d) projection of the report feature
    textual.*                               VirTex-style report decoder

The backbone and the view fusion are mapped; `contrastive_bert.*` and `textual.*` are NOT (they belong to
pretraining only and have another layout than `RefersForPreTraining`'s text encoder and report decoder): they are
listed as unmapped in the [`ConversionReport`]. A `module.` prefix (DataParallel) and `{"model": ...}` /
`{"state_dict": ...}` wrappers are accepted.

The official code adds the final aggregation token to every patch token (`visual_features[:, 1:] +
visual_features[:, 0:1]`) and gates views with sigmoids, so converted configs use `aggregation="cls_add"` and
`view_fusion="sigmoid_gate"` unless the caller passes another config. The number of attention heads cannot be read
from the weights: it defaults to the paper's 12 (`--num_attention_heads`).

    python -m modeling_refers.convert_refers_original_checkpoint --checkpoint_path refers_checkpoint.pth \
        --output_dir refers-vit-base [--task classification --num_labels 14] [--num_attention_heads 12] \
        [--aggregation cls_add] [--image_size 384] [--config folder] [--save_image_processor] [--overwrite]

The output folder is written to a temporary sibling, read back, and only then renamed into place.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_refers import AGGREGATION_MODES, RefersConfig
from .file_utils import write_folder_atomically
from .loading import (REFERS_ONLY_PREFIXES, count_by_module, read_state_dict, resample_position_embeddings,
                      unwrap_state_dict)
from .modeling_refers import RefersForImageClassification, RefersModel
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Where the official code puts its ViT, tried in this order (keys relative to the checkpoint after unwrapping and
# stripping `module.`). `visual.vit.` is the pretraining model's `ViTBackbone.vit`.
OFFICIAL_BACKBONE_PREFIXES: tuple[str, ...] = ("visual.vit.transformer.", "vit.transformer.", "transformer.")

# Backbone keys outside the blocks: official (relative to the backbone prefix) -> ours (relative to `RefersModel`).
OFFICIAL_TO_REFERS_KEYS: dict[str, str] = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.patch_embeddings.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.bias": "embeddings.patch_embeddings.projection.bias",
    "encoder.encoder_norm.weight": "layernorm.weight",
    "encoder.encoder_norm.bias": "layernorm.bias",
}

# Modules of block N: official `encoder.layer.N.<key>` -> ours `layers.N.<value>` (each with `.weight` and `.bias`).
OFFICIAL_TO_REFERS_LAYER_MODULES: dict[str, str] = {
    "attention_norm": "layernorm_before",
    "attn.query": "attention.q_proj",
    "attn.key": "attention.k_proj",
    "attn.value": "attention.v_proj",
    "attn.out": "attention.o_proj",
    "ffn_norm": "layernorm_after",
    "ffn.fc1": "mlp.fc1",
    "ffn.fc2": "mlp.fc2",
}

# The official sigmoid-gate view fusion: one `Linear(V * d, 1)` per view. Each pattern is (module name template,
# index of the first view); view v's gate is `template.format(first + v)`. Our `view_fusion.gate` is one
# `Linear(V * d, V)` whose row v is view v's gate, so the V official layers are stacked in view order. The input of
# both is the V views' tokens at one patch position concatenated in view order (`torch.cat((x1, x2, x3), 1)` in the
# official code). Add a pattern here to accept another naming (e.g. `("fusion.gates.{}", 0)` for a ModuleList).
OFFICIAL_VIEW_FUSION_GATE_PATTERNS: tuple[tuple[str, int], ...] = (
    ("fusion.fc{}", 1),  # funnyzhou/REFERS Pre-train/refers/modules/Fusion.py: fc1, fc2, fc3
)

# Official modules that are deliberately not converted, with the reason shown in the report.
NOT_CONVERTED_PREFIXES: dict[str, str] = {
    "contrastive_bert.": "pretraining text encoder (Bio_ClinicalBERT + fc projection); not mapped",
    "textual.": "pretraining report decoder (VirTex-style); not mapped",
    "head.": "classifier of a fine-tuning checkpoint; kept only with task='classification'",
}

TASKS = ("backbone", "classification")
BASE_PREFIX = RefersModel.base_model_prefix  # "refers"


@dataclass
class ConversionReport:
    """What [`convert_official_state_dict`] did.

    Args:
        config: the `RefersConfig` the converted weights fit (inferred from the shapes unless one was given).
        backbone_prefix: where the ViT was found in the checkpoint, e.g. `"visual.vit.transformer."`.
        mapped: official key -> our key (`refers.`-prefixed, `classifier.` for the head); the V fusion gates all map
            to `refers.view_fusion.gate.{weight,bias}`.
        unmapped_official_keys: checkpoint keys not converted (text encoder, report decoder, head, ...).
        missing_keys: our keys the checkpoint did not provide; they keep their initialisation.
        notes: anything else worth knowing (position embeddings resampled, fusion not found, ...).
    """

    config: RefersConfig
    backbone_prefix: str
    mapped: dict[str, str] = field(default_factory=dict)
    unmapped_official_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def unmapped_by_module(self) -> dict[str, int]:
        """Unmapped tensors counted per top-level module, e.g. `{"textual": 40, "contrastive_bert": 201}`."""
        return count_by_module(self.unmapped_official_keys)

    def __str__(self) -> str:
        reasons = {prefix.rstrip("."): reason for prefix, reason in NOT_CONVERTED_PREFIXES.items()}
        unmapped = "; ".join(
            f"{name} ({count} tensors{': ' + reasons[name] if name in reasons else ''})"
            for name, count in self.unmapped_by_module().items()
        )
        lines = [
            f"backbone found under '{self.backbone_prefix}'",
            f"mapped: {len(self.mapped)} official tensors",
            f"unmapped official tensors: {unmapped or 'none'}",
            f"missing (kept at initialisation): {self.missing_keys or 'none'}",
        ]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


# ----------------------------------------------------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------------------------------------------------


def find_backbone_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The prefix under which the official ViT lives; a `ValueError` naming the keys looked for when none fits."""
    anchor = "embeddings.patch_embeddings.weight"
    for prefix in OFFICIAL_BACKBONE_PREFIXES:
        if prefix + anchor in state_dict:
            return prefix
    looked_for = ", ".join(f"'{prefix}{anchor}'" for prefix in OFFICIAL_BACKBONE_PREFIXES)
    shown = ", ".join(list(state_dict)[:8]) + (f", ... ({len(state_dict)} keys)" if len(state_dict) > 8 else "")
    raise ValueError(
        f"This is not an official REFERS checkpoint: none of {looked_for} is in it (nor the other ViT keys "
        "'<prefix>encoder.layer.N.attn.query.weight', '<prefix>encoder.encoder_norm.weight'). "
        f"Its keys start with: {shown or 'nothing (empty state dict)'}."
    )


def _layer_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    return sorted({int(match.group(1)) for key in state_dict if (match := pattern.match(key))})


def _find_fusion_gates(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names of the official view gates in view order (empty when the checkpoint has none)."""
    for template, first in OFFICIAL_VIEW_FUSION_GATE_PATTERNS:
        names = []
        while f"{template.format(first + len(names))}.weight" in state_dict:
            names.append(template.format(first + len(names)))
        if names:
            return names
    return []


def infer_official_config(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int = 12, **overrides
) -> RefersConfig:
    """A `RefersConfig` for an official state dict: width, depth, MLP size, patch size, channels, image size and
    number of views read from the shapes; `num_attention_heads` (not in the weights) from the argument;
    `aggregation="cls_add"`, `view_fusion="sigmoid_gate"`, LayerNorm eps 1e-6 and GELU as in the official code.
    `overrides` replace any field (e.g. `aggregation="none"`)."""
    state_dict = unwrap_state_dict(state_dict)
    prefix = find_backbone_prefix(state_dict)
    patch = state_dict[prefix + "embeddings.patch_embeddings.weight"]
    if patch.ndim != 4 or patch.shape[-1] != patch.shape[-2]:
        raise ValueError(
            f"'{prefix}embeddings.patch_embeddings.weight' has shape {tuple(patch.shape)}; expected a square Conv2d "
            "kernel (hidden_size, channels, patch, patch)."
        )
    hidden_size, num_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    position_key = prefix + "embeddings.position_embeddings"
    if position_key not in state_dict:
        raise ValueError(f"The checkpoint has no '{position_key}'; cannot infer the image size.")
    num_patches = state_dict[position_key].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(
            f"'{position_key}' has {num_patches + 1} positions; expected 1 + a square number of patches."
        )
    layers = _layer_indices(state_dict, prefix)
    if not layers or layers != list(range(len(layers))):
        raise ValueError(
            f"Expected blocks '{prefix}encoder.layer.0.' ... '{prefix}encoder.layer.N.' numbered without gaps, "
            f"found indices {layers}."
        )
    fc1_key = f"{prefix}encoder.layer.0.ffn.fc1.weight"
    if fc1_key not in state_dict:
        raise ValueError(f"The checkpoint has no '{fc1_key}'; cannot infer the MLP size.")
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} does not divide the checkpoint's hidden size {hidden_size}; "
            "the number of heads is not stored in the weights: pass the one the checkpoint was trained with "
            "(--num_attention_heads)."
        )
    gates = _find_fusion_gates(state_dict)
    fields = dict(
        hidden_size=int(hidden_size),
        num_hidden_layers=len(layers),
        num_attention_heads=int(num_attention_heads),
        intermediate_size=int(state_dict[fc1_key].shape[0]),
        patch_size=int(patch_size),
        num_channels=int(num_channels),
        image_size=int(grid * patch_size),
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        qkv_bias=f"{prefix}encoder.layer.0.attn.query.bias" in state_dict,
        aggregation="cls_add",
        view_fusion="sigmoid_gate",
        num_views=len(gates) if gates else 3,
    )
    fields.update(overrides)
    return RefersConfig(**fields)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------------


def _expected_backbone_shapes(config: RefersConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = RefersModel(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: RefersConfig | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an official REFERS state dict to ours.

    Args:
        state_dict: official keys (wrappers and `module.` prefixes are removed first).
        config: the target `RefersConfig`; inferred with [`infer_official_config`] (12 heads) when omitted. When its
            image size differs from the checkpoint's, the position embeddings are resampled (timm, bicubic).

    Returns:
        `(converted, report)`: `converted` uses `RefersForImageClassification`'s names (`refers.`-prefixed backbone,
        `classifier.*` from the official `head.*` when the checkpoint has one); `report` is a [`ConversionReport`]
        whose `missing_keys` are the backbone keys (`refers.`-prefixed) the checkpoint did not provide.

    Raises:
        ValueError: nothing official in the state dict (names what it looked for), a backbone key that cannot be
            placed (e.g. a hybrid ResNet stem), or a shape that does not fit `config` (names key and shapes).
    """
    state_dict = unwrap_state_dict(state_dict)
    prefix = find_backbone_prefix(state_dict)
    config = config if config is not None else infer_official_config(state_dict)
    expected = _expected_backbone_shapes(config)
    report = ConversionReport(config=config, backbone_prefix=prefix)
    converted: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    _map_backbone(state_dict, prefix, converted, report, consumed)
    _resample_position_embeddings(converted, expected, config, report)
    _map_view_gates(state_dict, config, converted, report, consumed)
    if "head.weight" in state_dict:
        for leaf in ("weight", "bias"):
            if f"head.{leaf}" in state_dict:
                converted[f"classifier.{leaf}"] = state_dict[f"head.{leaf}"]
                report.mapped[f"head.{leaf}"] = f"classifier.{leaf}"
                consumed.add(f"head.{leaf}")
    _check_backbone_shapes(converted, expected, config, report)
    report.unmapped_official_keys = sorted(key for key in state_dict if key not in consumed)
    report.missing_keys = sorted(
        f"{BASE_PREFIX}.{key}" for key in expected if f"{BASE_PREFIX}.{key}" not in converted
    )
    return converted, report


def _map_backbone(state_dict: Mapping[str, torch.Tensor], prefix: str, converted: dict, report: ConversionReport,
                  consumed: set) -> None:
    """The official backbone keys (under `prefix`) -> ours in `converted` (`refers.`-prefixed); ValueError naming the
    keys that have no place in a REFERS ViT."""
    def put(official: str, ours: str, value: torch.Tensor):
        converted[f"{BASE_PREFIX}.{ours}"] = value
        report.mapped[official] = f"{BASE_PREFIX}.{ours}"
        consumed.add(official)

    stray_backbone: list[str] = []
    layer_pattern = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        relative = key[len(prefix):]
        if relative in OFFICIAL_TO_REFERS_KEYS:
            put(key, OFFICIAL_TO_REFERS_KEYS[relative], value)
            continue
        match = layer_pattern.fullmatch(relative)
        if match and match.group(2) in OFFICIAL_TO_REFERS_LAYER_MODULES:
            index, module, leaf = match.groups()
            put(key, f"layers.{index}.{OFFICIAL_TO_REFERS_LAYER_MODULES[module]}.{leaf}", value)
            continue
        stray_backbone.append(key)
    if stray_backbone:
        raise ValueError(
            f"These backbone weights of the checkpoint have no place in a REFERS ViT: {stray_backbone[:12]}"
            f"{f' ... ({len(stray_backbone)} in all)' if len(stray_backbone) > 12 else ''}. Expected only "
            f"'{prefix}' + {sorted(OFFICIAL_TO_REFERS_KEYS)} and 'encoder.layer.N.' + "
            f"{sorted(OFFICIAL_TO_REFERS_LAYER_MODULES)}. Is it a hybrid (ResNet + ViT) model?"
        )


def _resample_position_embeddings(converted: dict, expected: dict, config: RefersConfig,
                                  report: ConversionReport) -> None:
    """Position embeddings of another patch grid than `config`'s are resampled (timm, bicubic), with a note."""
    position_key = f"{BASE_PREFIX}.embeddings.position_embeddings"
    position = converted.get(position_key)
    wanted = expected["embeddings.position_embeddings"]
    if (isinstance(position, torch.Tensor) and position.ndim == 3 and position.shape[-1] == wanted[-1]
            and position.shape != wanted):
        old_grid, new_grid = math.isqrt(position.shape[1] - 1), math.isqrt(wanted[1] - 1)
        converted[position_key] = resample_position_embeddings(position, new_grid)
        report.notes.append(
            f"position embeddings resampled from a {old_grid}x{old_grid} to a {new_grid}x{new_grid} patch grid "
            f"(image_size {config.image_size})"
        )


def _map_view_gates(state_dict: Mapping[str, torch.Tensor], config: RefersConfig, converted: dict,
                    report: ConversionReport, consumed: set) -> None:
    """The official per-view sigmoid gates, stacked into our one `view_fusion.gate` when the config fuses views that
    way (otherwise a note says the fusion keeps its initialisation)."""
    gates = _find_fusion_gates(state_dict)
    if gates and config.view_fusion == "sigmoid_gate":
        if len(gates) != config.num_views:
            raise ValueError(
                f"The checkpoint has {len(gates)} view gates ({', '.join(gates)}) but config.num_views is "
                f"{config.num_views}."
            )
        for name in gates:
            for leaf in ("weight", "bias"):
                if f"{name}.{leaf}" not in state_dict:
                    raise ValueError(f"The checkpoint has '{name}.weight' but no '{name}.{leaf}'.")
                gate = state_dict[f"{name}.{leaf}"]
                if not isinstance(gate, torch.Tensor) or gate.ndim == 0 or gate.shape[0] != 1:
                    raise ValueError(
                        f"'{name}.{leaf}' is {getattr(gate, 'shape', type(gate).__name__)}; an official view "
                        "gate is a Linear(num_views * hidden_size, 1)."
                    )
        for leaf in ("weight", "bias"):
            official = [f"{name}.{leaf}" for name in gates]
            stacked = torch.cat([state_dict[key] for key in official], dim=0)
            converted[f"{BASE_PREFIX}.view_fusion.gate.{leaf}"] = stacked
            for key in official:
                report.mapped[key] = f"{BASE_PREFIX}.view_fusion.gate.{leaf}"
                consumed.add(key)
    elif gates:
        report.notes.append(
            f"the official sigmoid-gate fusion ({', '.join(gates)}) is not converted because config.view_fusion is "
            f"{config.view_fusion!r}; the fusion keeps its initialisation"
        )
    else:
        report.notes.append("no official view fusion in the checkpoint; view_fusion keeps its initialisation")


def _check_backbone_shapes(converted: dict, expected: dict, config: RefersConfig, report: ConversionReport) -> None:
    """ValueError naming the official key when a converted backbone weight has no place or another shape in a
    RefersModel of `config`."""
    for key, value in converted.items():
        if not key.startswith(BASE_PREFIX + "."):
            continue
        ours = key[len(BASE_PREFIX) + 1:]
        official = next(name for name, target in report.mapped.items() if target == key)
        if ours not in expected:
            raise ValueError(
                f"'{official}' maps to '{key}', which a RefersModel with this config does not have "
                f"(num_hidden_layers={config.num_hidden_layers}, aggregation={config.aggregation!r})."
            )
        if not isinstance(value, torch.Tensor) or value.shape != expected[ours]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"'{official}' has shape {shape} but '{key}' of this config needs {tuple(expected[ours])}; check "
                "hidden_size / num_hidden_layers / intermediate_size / patch_size / num_views of the config."
            )


def convert_refers_original_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: RefersConfig | str | os.PathLike | None = None,
    num_labels: int | None = None,
    task: str = "backbone",
    num_attention_heads: int = 12,
    config_overrides: Mapping | None = None,
    label_names: Sequence[str] | None = None,
    problem_type: str | None = None,
    save_image_processor: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert an official REFERS checkpoint file into a folder `AutoModel` (or `AutoModelForImageClassification`)
    loads after `import modeling_refers`.

    Args:
        checkpoint_path: the official `.pth` (read with `torch.load(weights_only=True)`) or a `.safetensors` file.
        output_dir: the folder to write (safetensors weights + config); written to a temporary sibling and renamed
            into place, so nothing half-written is ever there.
        config: a `RefersConfig` (or a folder / config.json it loads from); inferred from the shapes when omitted.
        num_labels: classification only: number of labels; defaults to the rows of the checkpoint's `head.weight`.
            Without a `head.*` in the checkpoint the classifier is new (initialised).
        task: `"backbone"` ([`RefersModel`]) or `"classification"` ([`RefersForImageClassification`]).
        num_attention_heads: used when inferring the config (not stored in the weights; the paper uses 12).
        config_overrides: fields replaced in the inferred or given config (e.g. `{"aggregation": "none"}`,
            `{"image_size": 384}` to resample the position embeddings).
        label_names: classification only: `id2label` names in class order.
        problem_type: classification only: e.g. `"multi_label_classification"` (the official NIH/VinBigData
            fine-tuning uses BCE).
        save_image_processor: also save a `RefersImageProcessor` with the official fine-tuning evaluation transform
            (resize the shortest edge to the image size, centre crop, ImageNet mean/std).
        overwrite: replace a non-empty `output_dir`.

    Returns:
        The output folder. The [`ConversionReport`] is logged.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if task == "backbone" and (num_labels is not None or label_names is not None or problem_type is not None):
        raise ValueError("num_labels, label_names and problem_type only apply to task='classification'.")
    output_dir = Path(output_dir)
    state_dict = read_state_dict(checkpoint_path, argument="checkpoint_path",
                                 expected="an official REFERS .pth file")
    config = _target_config(state_dict, config, num_attention_heads, config_overrides)
    converted, report = convert_official_state_dict(state_dict, config)
    config = report.config
    if task == "classification":
        _set_classifier_config(config, converted.get("classifier.weight"), checkpoint_path, num_labels, label_names,
                               problem_type)
        model = RefersForImageClassification(config)
        weights = converted
        allowed_missing = tuple(f"{BASE_PREFIX}.{prefix}" for prefix in REFERS_ONLY_PREFIXES) + ("classifier.",)
    else:
        model = RefersModel(config)
        weights = {
            key[len(BASE_PREFIX) + 1:]: value for key, value in converted.items() if key.startswith(BASE_PREFIX + ".")
        }
        for key in ("classifier.weight", "classifier.bias"):
            if key in converted:
                official = key.replace("classifier.", "head.")
                report.mapped.pop(official, None)
                report.unmapped_official_keys = sorted(report.unmapped_official_keys + [official])
        allowed_missing = REFERS_ONLY_PREFIXES
    _load_converted(model, weights, allowed_missing, report, checkpoint_path)
    write_folder_atomically(lambda folder: _save_checked(model, folder, save_image_processor), output_dir, overwrite)
    logger.warning(
        f"Converted {os.fspath(checkpoint_path)} -> {os.fspath(output_dir)} ({type(model).__name__}):\n{report}"
    )
    return output_dir


def _target_config(state_dict, config, num_attention_heads: int, config_overrides: Mapping | None) -> RefersConfig:
    """The config to convert into: inferred from the shapes, or a copy of the given one (or the one a folder holds),
    `config_overrides` applied; ValueError naming an override RefersConfig does not have."""
    if config is None:
        return infer_official_config(state_dict, num_attention_heads=num_attention_heads, **(config_overrides or {}))
    if not isinstance(config, RefersConfig):
        config = RefersConfig.from_pretrained(os.fspath(config))
    config = copy.deepcopy(config)
    for name, value in (config_overrides or {}).items():
        if not hasattr(config, name):
            raise ValueError(f"config_overrides: RefersConfig has no field {name!r}.")
        setattr(config, name, value)
    config.check_architecture()
    return config


def _set_classifier_config(config: RefersConfig, head, checkpoint_path, num_labels: int | None,
                           label_names: Sequence[str] | None, problem_type: str | None) -> None:
    """Labels and problem type of a classification folder: `num_labels` from the names or the checkpoint's `head`,
    which must read the aggregation token and have one row per label (ValueError saying what to pass otherwise)."""
    if label_names is not None:
        label_names = list(label_names)
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(f"num_labels={num_labels} but {len(label_names)} label_names were given.")
        num_labels = len(label_names)
    if num_labels is None:
        if head is None:
            raise ValueError(
                f"{os.fspath(checkpoint_path)!r} has no classifier ('head.weight'); pass num_labels (--num_labels) "
                "to start a new one, or use task='backbone'."
            )
        num_labels = head.shape[0]
    if head is not None and (head.ndim != 2 or head.shape[1] != config.hidden_size):
        raise ValueError(
            f"The checkpoint's 'head.weight' has shape {tuple(head.shape)}: it reads {head.shape[-1]} features, "
            f"but RefersForImageClassification's classifier reads the aggregation token ({config.hidden_size}). "
            "(The official COVID-19 `modeling_2.py` head reads layers 6 and 12 concatenated; it has no "
            "counterpart here.) Use task='backbone' and fine-tune a new head."
        )
    if head is not None and head.shape[0] != num_labels:
        raise ValueError(
            f"The checkpoint's 'head.weight' has shape {tuple(head.shape)} but num_labels={num_labels} and "
            f"hidden_size={config.hidden_size} need ({num_labels}, {config.hidden_size}); pass the matching "
            "num_labels, or use task='backbone' and fine-tune a new head."
        )
    config.num_labels = num_labels
    if label_names is not None:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: index for index, name in enumerate(label_names)}
    if problem_type is not None:
        config.problem_type = problem_type


def _load_converted(model, weights: dict, allowed_missing: tuple, report: ConversionReport, checkpoint_path) -> None:
    """Load `weights` into `model` (eval mode after); only keys under `allowed_missing` may be missing (the report
    lists them in the model's naming)."""
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:  # convert_official_state_dict checked every key; this is a safety net
        raise ValueError(f"Converted keys {result.unexpected_keys} do not exist in {type(model).__name__}.")
    not_allowed = [key for key in result.missing_keys if not key.startswith(allowed_missing)]
    if not_allowed:
        raise ValueError(
            f"The checkpoint {os.fspath(checkpoint_path)!r} lacks these weights of {type(model).__name__}: "
            f"{not_allowed[:12]}{' ...' if len(not_allowed) > 12 else ''}."
        )
    report.missing_keys = sorted(result.missing_keys)  # in the naming of the model built
    model.eval()


def _save_checked(model, folder: Path, save_image_processor: bool) -> None:
    """Save `model` (and with `save_image_processor` the official evaluation transform) into `folder`, then read it
    back: a folder that does not load identically is never published."""
    model.save_pretrained(folder, safe_serialization=True)
    if save_image_processor:
        from .image_processing_refers import RefersImageProcessor

        image_size = model.config.image_size
        RefersImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(folder)
    reloaded = type(model).from_pretrained(folder)
    mine, theirs = model.state_dict(), reloaded.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[key], theirs[key]) for key in mine):
        raise RuntimeError(f"The weights written to {os.fspath(folder)!r} do not read back identically.")


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_refers.convert_refers_original_checkpoint",
        description="Convert an official REFERS checkpoint (github.com/funnyzhou/REFERS) to a refers safetensors "
        "folder.",
    )
    parser.add_argument("--checkpoint_path", required=True, help="official .pth (or .safetensors) file")
    parser.add_argument("--output_dir", required=True, help="folder to write (refused if not empty, see --overwrite)")
    parser.add_argument("--task", choices=TASKS, default="backbone")
    parser.add_argument("--num_labels", type=int, default=None, help="classification: defaults to head.weight's rows")
    parser.add_argument("--label_names", default=None, help="classification: comma-separated class names, in order")
    parser.add_argument("--problem_type", default=None,
                        choices=("single_label_classification", "multi_label_classification", "regression"))
    parser.add_argument("--num_attention_heads", type=int, default=12,
                        help="not stored in the weights; the paper's ViT-B/16 uses 12")
    parser.add_argument("--aggregation", choices=AGGREGATION_MODES, default=None,
                        help="default cls_add, what the official code does (or the --config's value)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="resample the position embeddings to this input size (default: the checkpoint's)")
    parser.add_argument("--config", default=None, help="a RefersConfig folder or config.json instead of inferring one")
    parser.add_argument("--save_image_processor", action="store_true",
                        help="also save a RefersImageProcessor (official fine-tuning eval transform)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, name) for name in ("aggregation", "image_size") if getattr(args, name) is not None}
    label_names = [name.strip() for name in args.label_names.split(",")] if args.label_names else None
    output = convert_refers_original_checkpoint(
        args.checkpoint_path,
        args.output_dir,
        config=args.config,
        num_labels=args.num_labels,
        task=args.task,
        num_attention_heads=args.num_attention_heads,
        config_overrides=overrides,
        label_names=label_names,
        problem_type=args.problem_type,
        save_image_processor=args.save_image_processor,
        overwrite=args.overwrite,
    )
    print(f"wrote {output}")
    return output


__all__ = [
    "ConversionReport",
    "NOT_CONVERTED_PREFIXES",
    "OFFICIAL_BACKBONE_PREFIXES",
    "OFFICIAL_TO_REFERS_KEYS",
    "OFFICIAL_TO_REFERS_LAYER_MODULES",
    "OFFICIAL_VIEW_FUSION_GATE_PATTERNS",
    "convert_official_state_dict",
    "convert_refers_original_checkpoint",
    "infer_official_config",
    "main",
]


if __name__ == "__main__":
    main()
