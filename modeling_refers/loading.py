"""Weights from elsewhere into REFERS models, and checked loading of REFERS checkpoints.

- `read_state_dict`: one reader for weight files (`.safetensors`, or `.pth`/`.bin`/`.pt` with
  `torch.load(weights_only=True)`), unwrapping `{"model": ...}` / `{"state_dict": ...}` and `module.` prefixes; the
  converters of the official checkpoints read with it too.
- `convert_timm_vit_state_dict` / `load_timm_weights`: timm ViT weights (renamed, qkv split, position embedding
  resampled by `resample_position_embeddings`) or timm CNN weights into a model's backbone, with a `TimmLoadReport`.
- `from_pretrained_checked`: `from_pretrained` that refuses a checkpoint of another architecture or one cut short
  (`incomplete_weights`) and replaces transformers' per-key load table with a `CheckpointLoadReport`.

Not shipped in checkpoint folders (the modeling files do not import it), so it may import anything of the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from transformers.utils import logging

from .configuration_refers import RefersConfig


logger = logging.get_logger(__name__)

REFERS_ONLY_PREFIXES = ("view_fusion.", "recurrent_concat.")
TIMM_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.")
CHECKPOINT_WRAPPERS = ("model", "state_dict")


# ----------------------------------------------------------------------------------------------------------------------
# Reading weight files
# ----------------------------------------------------------------------------------------------------------------------


def read_state_dict(state_dict_or_path, argument: str = "state_dict_or_path",
                    expected: str = "a local timm ViT state dict (.safetensors, .pth or .bin)") -> dict:
    """The (unwrapped) state dict of a weight file, or `state_dict_or_path` itself when it is a dict already.

    `.safetensors` is read with safetensors; anything else with `torch.load(weights_only=True)`: a pickle holding
    anything but tensors and plain containers is refused with a `ValueError` saying how to re-save it. Errors name
    `argument` and say what was `expected`. Nothing is downloaded.
    """
    if isinstance(state_dict_or_path, Mapping):
        return unwrap_state_dict(state_dict_or_path)
    path = os.fspath(state_dict_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argument} {path!r} is not a file; pass {expected}. Nothing is downloaded.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        details = " ".join(str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        if "Unsupported global" not in details:
            raise ValueError(
                f"Cannot read {path!r} with torch.load(weights_only=True); it is not a PyTorch checkpoint "
                f"or is damaged ({details})."
            ) from err
        refused = details.split(" was not an allowed global")[0]
        raise ValueError(
            f"Refused to load {path!r}: it holds Python objects other than tensors and plain containers "
            f"({refused}), and it is read with torch.load(weights_only=True), which never runs code from the file. "
            "If you trust its source, re-save only the weights, e.g. "
            "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth'), and convert that."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"Cannot read {path!r} as a PyTorch checkpoint: {err}") from err
    return unwrap_state_dict(checkpoint, source=path)


def unwrap_state_dict(checkpoint, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """`{"model": sd}` / `{"state_dict": sd}` -> `sd` (repeatedly); `module.` (DataParallel) prefixes removed."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}, expected a state dict (a dict of tensors).")
    for _ in range(4):
        wrapper = next((name for name in CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(name), Mapping)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    state_dict = {}
    for key, value in checkpoint.items():
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        state_dict[key] = value
    return state_dict


# ----------------------------------------------------------------------------------------------------------------------
# timm weights
# ----------------------------------------------------------------------------------------------------------------------


def resample_position_embeddings(position: torch.Tensor, grid: int) -> torch.Tensor:
    """ViT position embeddings `(1, 1 + n * n, d)` (one prefix token) resampled with timm to a `grid` x `grid`
    patch grid: `(1, 1 + grid * grid, d)`."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(position, new_size=(grid, grid), num_prefix_tokens=1)


def convert_timm_vit_state_dict(
    state_dict: dict[str, torch.Tensor], config: RefersConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map timm ViT keys (`blocks.N.attn.qkv`, `patch_embed.proj`, ...) to `RefersModel` keys.

    Returns `(converted, unused)`: the REFERS state dict and the timm keys that have no REFERS counterpart. The fused
    `qkv` weight `(3d, d)` is split into query/key/value; the position embedding is resampled with timm when the grid
    differs from `config.image_size / config.patch_size`.
    """
    renames = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
        "fc_norm.weight": "fc_norm.weight",  # timm global_pool="avg", fc_norm=True (classifier_pooling="mean")
        "fc_norm.bias": "fc_norm.bias",
    }
    block_renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    converted, unused = {}, []
    for key, value in state_dict.items():
        if key in renames:
            converted[renames[key]] = value
            continue
        parts = key.split(".")
        if parts[0] != "blocks" or len(parts) < 4:
            unused.append(key)
            continue
        prefix, inner, leaf = f"layers.{parts[1]}", ".".join(parts[2:-1]), parts[-1]
        if inner == "attn.qkv":
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}.attention.{name}.{leaf}"] = chunk
        elif inner in block_renames:
            converted[f"{prefix}.{block_renames[inner]}.{leaf}"] = value
        else:
            unused.append(key)

    position = converted.get("embeddings.position_embeddings")
    grid = config.image_size // config.patch_size
    if position is not None and position.shape[1] != grid * grid + 1:
        converted["embeddings.position_embeddings"] = resample_position_embeddings(position, grid)
    return converted, unused


@dataclass
class TimmLoadReport:
    """Keys of this model left at their initialisation (`missing_keys`) and timm keys not used (`unexpected_keys`);
    `source` names what was loaded ("ViT", or the timm CNN's name)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    source: str = "ViT"

    def __str__(self) -> str:
        return (
            f"timm {self.source} weights loaded; missing (kept at init): {self.missing_keys or 'none'}; "
            f"unexpected (not loaded): {self.unexpected_keys or 'none'}"
        )


def load_timm_weights(model, state_dict_or_path, strict: bool = True) -> TimmLoadReport:
    """Load a timm state dict (a dict, or a local .safetensors/.pth/.bin file) into `model`'s backbone: a
    `vit_*_patch16_*` into the radiograph transformer, or the timm CNN's own state dict into `conv_backbone`.

    Returns a [`TimmLoadReport`] and logs it. With `strict=True`, raises a `ValueError` naming the keys when a
    backbone weight is missing or a timm weight other than the ImageNet head has no place here. REFERS-only
    modules (view fusion, recurrent concatenation) are reported as missing and keep their initialisation.
    """
    base = model.base_model
    state_dict = read_state_dict(state_dict_or_path)
    if base.conv_backbone is not None:
        return _load_timm_cnn_weights(base, state_dict, strict)
    converted, unexpected = convert_timm_vit_state_dict(state_dict, base.config)
    own = base.state_dict()
    for key, value in converted.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"timm weight for `{key}` has shape {tuple(value.shape)} but this REFERS config expects "
                f"{tuple(own[key].shape)}; check hidden_size/patch_size/num_channels."
            )
    unexpected += [key for key in converted if key not in own]
    converted = {key: value for key, value in converted.items() if key in own}
    result = base.load_state_dict(converted, strict=False)
    report = TimmLoadReport(missing_keys=list(result.missing_keys), unexpected_keys=sorted(unexpected))
    logger.warning(str(report))
    if strict:
        missing_backbone = [k for k in report.missing_keys if not k.startswith(REFERS_ONLY_PREFIXES)]
        unexpected_real = [k for k in report.unexpected_keys if not k.startswith(TIMM_HEAD_PREFIXES)]
        if missing_backbone or unexpected_real:
            raise ValueError(
                "The timm state dict does not match this REFERS backbone. Missing: "
                f"{missing_backbone}. Unexpected: {unexpected_real}. Pass strict=False to load what matches."
            )
    return report


def _load_timm_cnn_weights(base, state_dict: dict, strict: bool) -> TimmLoadReport:
    """A timm CNN state dict (its own key names) into `conv_backbone.model`; the ImageNet classifier is dropped."""
    cnn = base.conv_backbone.model
    own = cnn.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"timm weight for `{key}` has shape {tuple(value.shape)} but {base.config.backbone} "
                             f"here expects {tuple(own[key].shape)}; check num_channels.")
    result = cnn.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    unexpected = sorted(k for k in state_dict if k not in own)
    report = TimmLoadReport(missing_keys=[f"conv_backbone.model.{k}" for k in result.missing_keys],
                            unexpected_keys=unexpected, source=str(base.config.backbone))
    logger.warning(str(report))
    head = cnn.default_cfg.get("classifier", "fc") if hasattr(cnn, "default_cfg") else "fc"
    unexpected_real = [k for k in unexpected if not k.startswith((f"{head}.", "fc.", "classifier.", "head."))]
    if strict and (report.missing_keys or unexpected_real):
        raise ValueError(
            f"The timm state dict does not match {base.config.backbone}. Missing: {report.missing_keys}. "
            f"Unexpected: {unexpected_real}. Pass strict=False to load what matches."
        )
    return report


# ----------------------------------------------------------------------------------------------------------------------
# REFERS checkpoints, checked
# ----------------------------------------------------------------------------------------------------------------------


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the `.safetensors` file at `path` is not whole (cut short, e.g. by a crash while saving), or None.

    Reads only the header: an 8-byte little-endian length, that many bytes of JSON, then the tensor data, which must
    end exactly where the file ends (the largest `data_offsets` end equals file size - 8 - header length)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        return f"{path} is truncated: {size} bytes, fewer than the 8-byte safetensors header length"
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if 8 + header_length > size:
            return (f"{path} is truncated: its header length says {header_length} bytes of header, but only "
                    f"{size - 8} bytes follow")
        try:
            header = json.loads(handle.read(header_length))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path} has an unreadable safetensors header (not the JSON of a safetensors file)"
    data = size - 8 - header_length
    if end != data:
        return (f"{path} is truncated: its header says the tensor data is {end} bytes, but the file holds {data} "
                "bytes of data" if end > data else
                f"{path} is not a whole safetensors file: {data - end} bytes follow the last tensor")
    return None


def incomplete_weights(folder: str | os.PathLike) -> str | None:
    """Why the weights saved in `folder` are not whole, naming the file, or None when they are: every `*.safetensors`
    file passes [`safetensors_problem`], and every shard a `*.safetensors.index.json` names is there."""
    folder = os.fspath(folder)
    names = sorted(os.listdir(folder))
    for name in names:
        if not name.endswith(".safetensors.index.json"):
            continue
        index = os.path.join(folder, name)
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (ValueError, TypeError, KeyError, AttributeError):
            return f"{index} is not a readable shard index (JSON with a `weight_map`); it may be cut short"
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
        if missing:
            return f"{index} names shards that are not in the folder: {', '.join(missing)}"
    for name in names:
        if name.endswith(".safetensors") and os.path.isfile(os.path.join(folder, name)):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem is not None:
                return problem
    return None


def count_by_module(keys) -> dict[str, int]:
    """State-dict keys counted per top-level module (the part before the first dot), in order of first appearance."""
    return dict(Counter(key.split(".")[0] for key in keys))


@dataclass
class CheckpointLoadReport:
    """What `from_pretrained_checked` did: weights newly initialised, checkpoint weights dropped, shape mismatches."""

    new_keys: list[str]
    dropped_keys: list[str]
    mismatched_keys: list[str]

    def dropped_by_module(self) -> dict[str, int]:
        """Dropped tensors counted per top-level module, e.g. `{"text_encoder": 104, "report_decoder": 40}`."""
        return count_by_module(self.dropped_keys)

    def __str__(self) -> str:
        dropped = ", ".join(f"{name} ({count} tensors)" for name, count in self.dropped_by_module().items())
        return f"new (initialised): {self.new_keys or 'none'}; dropped from the checkpoint: {dropped or 'none'}"


def _not_a_load_report(record) -> bool:
    """Logging filter: False for transformers' per-key "LOAD REPORT" (replaced by [`CheckpointLoadReport`])."""
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def without_transformers_load_report() -> Iterator[None]:
    """Within the block, transformers' per-key loading table (dozens of UNEXPECTED lines for a pretraining
    checkpoint) is not logged; other messages of `transformers.modeling_utils` are."""
    load_logger = logging.get_logger("transformers.modeling_utils")  # where transformers logs its load report
    load_logger.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        load_logger.removeFilter(_not_a_load_report)


def from_pretrained_checked(model_class, pretrained_model_name_or_path, **kwargs) -> tuple:
    """`model_class.from_pretrained` that refuses a checkpoint of the wrong architecture and says what it kept and
    dropped: returns `(model, CheckpointLoadReport)`.

    Only the class's head (`model_class._head_prefixes`, e.g. `classifier.`) may be missing from the checkpoint;
    anything else missing or of the wrong shape raises a `ValueError` naming the keys. Weights the checkpoint has and
    the class does not (the text encoder and report decoder of a pretraining checkpoint) are listed as dropped in the
    report. A local folder whose weights are cut short (a crash while saving) raises an `OSError` naming the
    truncated file.
    """
    folder = os.fspath(pretrained_model_name_or_path)
    folder = os.path.join(folder, kwargs["subfolder"]) if kwargs.get("subfolder") else folder
    if os.path.isdir(folder):
        problem = incomplete_weights(folder)
        if problem is not None:
            raise OSError(f"Cannot load {model_class.__name__} from {folder!r}: {problem}")
    kwargs.setdefault("ignore_mismatched_sizes", True)  # collect shape mismatches; refused below unless a head's
    with without_transformers_load_report():  # replaced by the one-line report below
        model, info = model_class.from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
    mismatched = [item[0] if isinstance(item, (tuple, list)) else str(item) for item in info.get("mismatched_keys", [])]
    report = CheckpointLoadReport(
        new_keys=sorted(info["missing_keys"]),
        dropped_keys=sorted(info["unexpected_keys"]),
        mismatched_keys=sorted(mismatched),
    )
    head_prefixes = getattr(model_class, "_head_prefixes", ())
    wrong = [key for key in report.new_keys + report.mismatched_keys if not key.startswith(head_prefixes)]
    if wrong:
        shown = ", ".join(wrong[:12]) + (f", ... ({len(wrong)} in all)" if len(wrong) > 12 else "")
        raise ValueError(
            f"The checkpoint {os.fspath(pretrained_model_name_or_path)!r} does not fit {model_class.__name__}: these "
            f"weights are missing from it or have another shape: {shown}. Is it a REFERS checkpoint of the same "
            "configuration?"
        )
    logger.warning(f"{model_class.__name__} from {os.fspath(pretrained_model_name_or_path)}: {report}")
    return model, report


__all__ = [
    "CheckpointLoadReport",
    "TimmLoadReport",
    "convert_timm_vit_state_dict",
    "count_by_module",
    "from_pretrained_checked",
    "incomplete_weights",
    "load_timm_weights",
    "read_state_dict",
    "resample_position_embeddings",
    "safetensors_problem",
    "unwrap_state_dict",
]
