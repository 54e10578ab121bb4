"""Convert a checkpoint of the official MRM code (github.com/RL4M/MRM-pytorch, MIT) to a `refers` safetensors folder.

Two kinds of checkpoint are read (after unwrapping `{"model": ...}` and `module.`):

- pretraining (`main_pretrain.py` saves `{"model": model_mrm.MRM.state_dict(), "optimizer", "epoch", "scaler",
  "args"}`; `args`, an `argparse.Namespace`, is the one non-container object allowed), timm names:

      cls_token (1, 1, D), pos_embed (1, 1 + P, D) fixed 2-D sin-cos, patch_embed.proj.{weight,bias} (D, C, p, p)
      blocks.N.{norm1, attn.qkv (3D, D), attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}, norm.{weight,bias}
      decoder_embed (Dd, D), mask_token (1, 1, Dd), decoder_pos_embed (1, 1 + P, Dd) fixed sin-cos,
      decoder_blocks.N.* (as blocks), decoder_norm, decoder_pred ((2p)^2 C, Dd): the 448-px target of a 224 input
      bert_encoder.model.bert.{embeddings, encoder.layer.N, pooler}.*   transformers' BertModel, built from scratch
      bert_encoder.model.cls.predictions.*                              its masked-LM head (decoder tied to the words)
      bert_mlp (384, D)                                                 the image latent into BERT's width

  -> [`MRMForPreTraining`] (loads with `AutoModelForPreTraining`; `AutoModelForImageClassification` takes its
  backbone with a new head);
- fine-tuned (`NIH_ChestX-ray/models_vit.py`, a bare `state_dict()`): the encoder keys, `fc_norm` instead of `norm`
  (`global_pool=True`) and `head` -> [`RefersForImageClassification`] with `classifier_pooling="mean"`.

Every size is read from the shapes; the number of attention heads is not in the weights: it defaults to a 64-wide
head for the encoder and BERT (the released ViT-B: 12 heads of 768, BERT: 6 of 384) and a 128-wide head for the
image decoder (the released `mrm()`: 6 heads of 768), each replaceable by a flag. Every key is placed or named in the
[`MRMConversionReport`] with the reason it has no place; a key the official code does not have is refused unless
`allow_unknown_keys` (`--allow_unknown_keys`), and the refusal lists them.

    python -m modeling_refers.convert_mrm_original_checkpoint --checkpoint_path MRM.pth --output_dir mrm-converted \
        [--num_attention_heads 12] [--text_num_attention_heads 6] [--decoder_num_attention_heads 6] \
        [--allow_unknown_keys] [--overwrite]

The reader and the report are the REFERS converter's ([`convert_refers_original_checkpoint`]); the folder is written
atomically by `file_utils.write_folder_atomically`, as there.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_mrm import MRMConfig
from .configuration_refers import RefersConfig
from .convert_refers_original_checkpoint import ConversionReport
from .file_utils import write_folder_atomically
from .modeling_mrm import MRMForPreTraining
from .loading import convert_timm_vit_state_dict, read_state_dict
from .modeling_refers import RefersForImageClassification
from transformers.utils import logging


logger = logging.get_logger(__name__)

BERT_PREFIX = "bert_encoder.model.bert."
MLM_PREFIX = "bert_encoder.model.cls."
ENCODER_HEAD_WIDTH, TEXT_HEAD_WIDTH, DECODER_HEAD_WIDTH = 64, 64, 128

# The official keys, by pattern (a key matching none is unknown). Pretraining: encoder, decoder, BERT, bert_mlp;
# fine-tuned: encoder, fc_norm, head.
_ENCODER_KEYS = r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|" \
                r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
_DECODER_KEYS = r"mask_token|decoder_pos_embed|decoder_(embed|norm|pred)\.(weight|bias)|" \
                r"decoder_blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
_BERT_KEYS = (
    re.escape(BERT_PREFIX) + r"(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\."
    r"(weight|bias)|embeddings\.(position_ids|token_type_ids)|pooler\.dense\.(weight|bias)|encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.(dense|LayerNorm)|intermediate\.dense|output\.(dense|"
    r"LayerNorm))\.(weight|bias))"
    r"|" + re.escape(MLM_PREFIX) + r"predictions\.(bias|decoder\.(weight|bias)|transform\.(dense|LayerNorm)\."
    r"(weight|bias))|bert_mlp\.(weight|bias)"
)
OFFICIAL_PRETRAINING_KEYS = re.compile(f"(?:{_ENCODER_KEYS})|(?:{_DECODER_KEYS})|(?:{_BERT_KEYS})")
OFFICIAL_FINETUNED_KEYS = re.compile(f"(?:{_ENCODER_KEYS})|fc_norm\\.(weight|bias)|head\\.(weight|bias)")

# Official keys that are not weights of the model, or that the model here does not have, and why.
NO_PLACE_REASONS: dict[str, str] = {
    BERT_PREFIX + "embeddings.position_ids": "a buffer (arange of the positions), not a weight; checked to be arange",
    BERT_PREFIX + "embeddings.token_type_ids": "a buffer (zeros), not a weight",
    BERT_PREFIX + "pooler.": "BERT's pooler: the official MyBertModel builds one (its add_pooling_layer=False is not "
                             "passed on) but MRM never reads it (no gradient); the text encoder here has none",
    # (a key is looked up here only when the model built has no place for it)
}

# Our weights that are tied to another in the official model: filled from it when the file lacks them.
TIED_COPIES = {
    "report_head.predictions.decoder.bias": "report_head.predictions.bias",
    "report_head.predictions.bias": "report_head.predictions.decoder.bias",
    "report_head.predictions.decoder.weight": "text_encoder.embeddings.word_embeddings.weight",
}

# How the official behaviour maps onto the converted model (its configuration is `MRMConfig.from_official`).
BEHAVIOUR_NOTES = (
    "position embeddings: the official encoder and decoder tables are fixed 2-D sin-cos buffers "
    "(requires_grad=False); here they are placed in the tables `refers.embeddings.position_embeddings` and "
    "`image_decoder.decoder_pos_embed`, kept fixed by the official switch (mrm_position_embeddings='sincos')",
    "report conditioning: officially bert_mlp maps every visible patch token to BERT's width, the mean over them is "
    "added to the embedding output AFTER BERT's embedding LayerNorm and dropout (bert/bert.py: embedding_output + "
    "latent); its weights are placed in `report_condition` (Linear of the mean = mean of the Linear), added there by "
    "the official switch (mrm_report_condition='embeddings_output'; the paper's reading, the default, adds it to the "
    "word embeddings)",
    "the masked-LM decoder: officially tied to BERT's word embeddings; here `report_head.predictions.decoder.weight` "
    "holds a copy of the same values (it is untied)",
)


@dataclass
class MRMConversionReport(ConversionReport):
    """[`ConversionReport`] of an MRM conversion, plus `checkpoint_kind` (`"pretraining"` or `"fine-tuned"`),
    `no_place` (official key -> why it has no place here), `unknown_keys` (kept out with `allow_unknown_keys`) and
    the inferred `sizes`."""

    checkpoint_kind: str = "pretraining"
    no_place: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    sizes: dict[str, int | None] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"official MRM {self.checkpoint_kind} checkpoint; sizes: "
                 + ", ".join(f"{name}={value}" for name, value in self.sizes.items()),
                 f"mapped: {len(self.mapped)} official tensors"]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.no_place.items():
            by_reason.setdefault(reason, []).append(key)
        lines += [f"no place ({len(keys)}): {', '.join(sorted(keys))}: {reason}" for reason, keys in by_reason.items()]
        if self.unknown_keys:
            lines.append(f"unknown, not converted ({len(self.unknown_keys)}): {', '.join(self.unknown_keys)}")
        lines.append(f"missing (kept at initialisation): {self.missing_keys or 'none'}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


# ----------------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------------


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Size:
    if key not in state_dict:
        raise ValueError(f"The checkpoint has no '{key}'; cannot infer {what}. Is it an official MRM checkpoint?")
    return state_dict[key].shape


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = sorted({int(match.group(1)) for key in state_dict if (match := pattern.match(key))})
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"Expected blocks '{prefix}0.' ... '{prefix}N.' numbered without gaps, found {indices}.")
    return len(indices)


def _heads(width: int, given: int | None, head_width: int, flag: str, where: str) -> int:
    """Heads of a `width`-wide attention: `given`, else `width / head_width`; a `ValueError` naming `flag` when it
    does not divide."""
    if given is not None:
        if given < 1 or width % given:
            raise ValueError(f"{flag} {given} does not divide the {where}'s width {width}.")
        return given
    if width % head_width:
        raise ValueError(
            f"The {where} is {width} wide, not a multiple of the {head_width}-wide heads assumed; the number of heads "
            f"is not stored in the weights: pass the one the checkpoint was trained with ({flag})."
        )
    return width // head_width


def checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """`"pretraining"` (model_mrm.MRM) or `"fine-tuned"` (models_vit.VisionTransformer); a `ValueError` otherwise."""
    if "decoder_embed.weight" in state_dict or any(key.startswith("bert_encoder.") for key in state_dict):
        return "pretraining"
    if "patch_embed.proj.weight" in state_dict and ("head.weight" in state_dict or "fc_norm.weight" in state_dict):
        return "fine-tuned"
    shown = ", ".join(list(state_dict)[:8]) + (f", ... ({len(state_dict)} keys)" if len(state_dict) > 8 else "")
    raise ValueError(
        "This is not an official MRM checkpoint: a pretraining one (model_mrm.MRM) has 'decoder_embed.weight' and "
        "'bert_encoder.model.bert.*', a fine-tuned one (models_vit) 'patch_embed.proj.weight' with 'fc_norm.*' or "
        f"'head.*'. Its keys start with: {shown or 'nothing (empty state dict)'}."
    )


def infer_encoder_sizes(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None) -> dict:
    """The radiograph transformer's `RefersConfig` fields from the timm-named encoder keys."""
    patch = _shape(state_dict, "patch_embed.proj.weight", "the width and patch size")
    if len(patch) != 4 or patch[-1] != patch[-2]:
        raise ValueError(f"'patch_embed.proj.weight' has shape {tuple(patch)}; expected (D, C, p, p).")
    hidden_size, num_channels, patch_size = int(patch[0]), int(patch[1]), int(patch[-1])
    num_patches = _shape(state_dict, "pos_embed", "the image size")[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"'pos_embed' has {num_patches + 1} positions; expected 1 + a square number of patches.")
    return dict(
        hidden_size=hidden_size, num_channels=num_channels, patch_size=patch_size, image_size=grid * patch_size,
        num_hidden_layers=_count(state_dict, "blocks."),
        intermediate_size=int(_shape(state_dict, "blocks.0.mlp.fc1.weight", "the MLP size")[0]),
        num_attention_heads=_heads(hidden_size, num_attention_heads, ENCODER_HEAD_WIDTH, "--num_attention_heads",
                                   "radiograph transformer"),
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        hidden_act="gelu", layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        aggregation="none", use_view_fusion=False,
    )


def infer_mrm_config(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None,
                     text_num_attention_heads: int | None = None, decoder_num_attention_heads: int | None = None,
                     **overrides):
    """The MRM configuration of an official pretraining state dict: `MRMConfig.from_official` (MRM as its official
    code runs), with the sizes read from the tensors."""
    fields = infer_encoder_sizes(state_dict, num_attention_heads)
    words = _shape(state_dict, BERT_PREFIX + "embeddings.word_embeddings.weight", "BERT's vocabulary and width")
    text_width = int(words[1])
    text_config = dict(
        model_type="bert", vocab_size=int(words[0]), hidden_size=text_width,
        num_hidden_layers=_count(state_dict, BERT_PREFIX + "encoder.layer."),
        num_attention_heads=_heads(text_width, text_num_attention_heads, TEXT_HEAD_WIDTH,
                                   "--text_num_attention_heads", "BERT report encoder"),
        intermediate_size=int(_shape(state_dict, BERT_PREFIX + "encoder.layer.0.intermediate.dense.weight",
                                     "BERT's FFN size")[0]),
        max_position_embeddings=int(_shape(state_dict, BERT_PREFIX + "embeddings.position_embeddings.weight",
                                           "BERT's positions")[0]),
        type_vocab_size=int(_shape(state_dict, BERT_PREFIX + "embeddings.token_type_embeddings.weight",
                                   "BERT's token types")[0]),
        hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        pad_token_id=0,
    )
    decoder_width = int(_shape(state_dict, "decoder_embed.weight", "the image decoder's width")[0])
    target = _shape(state_dict, "decoder_pred.weight", "the reconstruction target")[0]
    target_patch = math.isqrt(target // fields["num_channels"])
    if target_patch**2 * fields["num_channels"] != target or target_patch % fields["patch_size"]:
        raise ValueError(f"'decoder_pred.weight' predicts {target} values per patch; expected (k * patch_size)^2 * "
                         f"channels for patch_size {fields['patch_size']} and {fields['num_channels']} channels.")
    scale = target_patch // fields["patch_size"]
    fields.update(
        text_config=text_config,
        mrm_decoder_hidden_size=decoder_width,
        mrm_decoder_num_hidden_layers=_count(state_dict, "decoder_blocks."),
        mrm_decoder_num_attention_heads=_heads(decoder_width, decoder_num_attention_heads, DECODER_HEAD_WIDTH,
                                               "--decoder_num_attention_heads", "image decoder"),
        mrm_decoder_intermediate_size=int(_shape(state_dict, "decoder_blocks.0.mlp.fc1.weight",
                                                 "the decoder's MLP size")[0]),
        mrm_reconstruction_size=fields["image_size"] * scale if scale > 1 else None,
        mrm_norm_pix_loss=True, mrm_mask_ratio=0.75,  # run.sh: --norm_pix_loss --mask_ratio 0.75 (not in the weights)
    )
    fields.update(overrides)
    return MRMConfig.from_official(**fields)


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------------------------


def _timm_to_ours(key: str, value: torch.Tensor, config: RefersConfig) -> dict[str, torch.Tensor]:
    """One timm-named encoder key -> our `RefersModel` key(s) (the fused qkv gives three)."""
    converted, _ = convert_timm_vit_state_dict({key: value}, config)
    return converted


def official_to_ours(key: str, value: torch.Tensor, config: RefersConfig, kind: str) -> dict[str, torch.Tensor]:
    """Our key(s) and tensor(s) for one official key (empty when the key is not one the official code has)."""
    if kind == "fine-tuned" and key.startswith("head."):
        return {"classifier." + key[len("head."):]: value}
    if re.fullmatch(_ENCODER_KEYS, key) or key.startswith("fc_norm."):
        return {"refers." + name: tensor for name, tensor in _timm_to_ours(key, value, config).items()}
    if key.startswith("decoder_blocks."):
        block = _timm_to_ours("blocks." + key[len("decoder_blocks."):], value, config)
        return {"image_decoder.decoder_" + name: tensor for name, tensor in block.items()}
    if key in ("mask_token", "decoder_pos_embed") or key.startswith(("decoder_embed.", "decoder_norm.",
                                                                      "decoder_pred.")):
        return {"image_decoder." + key: value}
    if key.startswith(BERT_PREFIX):
        return {"text_encoder." + key[len(BERT_PREFIX):]: value}
    if key.startswith(MLM_PREFIX):
        return {"report_head." + key[len(MLM_PREFIX):]: value}
    if key.startswith("bert_mlp."):
        return {"report_condition." + key[len("bert_mlp."):]: value}
    return {}


def _no_place_reason(key: str) -> str | None:
    return next((reason for prefix, reason in NO_PLACE_REASONS.items() if key.startswith(prefix)), None)


def convert_mrm_state_dict(state_dict: Mapping[str, torch.Tensor], config: RefersConfig, kind: str,
                           model_keys: Mapping[str, torch.Size], allow_unknown_keys: bool = False,
                           ) -> tuple[dict[str, torch.Tensor], MRMConversionReport]:
    """Place every official tensor on our parameter names (`model_keys`: our state dict's shapes). Refuses, naming
    the keys, an unknown key (unless `allow_unknown_keys`), a key with no place and no known reason, a shape that
    does not fit, and any of our weights left without a tensor."""
    known = OFFICIAL_PRETRAINING_KEYS if kind == "pretraining" else OFFICIAL_FINETUNED_KEYS
    unknown = sorted(key for key in state_dict if not known.fullmatch(key))
    if unknown and not allow_unknown_keys:
        raise ValueError(
            f"The {kind} checkpoint has {len(unknown)} key(s) that the official MRM code does not have: "
            f"{', '.join(unknown)}. Pass allow_unknown_keys=True (--allow_unknown_keys) to convert the rest and list "
            "them in the report."
        )
    report = MRMConversionReport(config=config, backbone_prefix="", checkpoint_kind=kind, unknown_keys=unknown)
    converted, stray, wrong_shape = {}, [], []
    for key, value in state_dict.items():
        if key in unknown:
            continue
        ours = official_to_ours(key, value, config, kind)
        ours = {name: tensor for name, tensor in ours.items() if name in model_keys}
        if not ours:
            reason = _no_place_reason(key)
            if reason is None:
                stray.append(key)
            else:
                report.no_place[key] = reason
            continue
        for name, tensor in ours.items():
            if tuple(tensor.shape) != tuple(model_keys[name]):
                wrong_shape.append(f"{key} {tuple(tensor.shape)} -> {name} {tuple(model_keys[name])}")
            converted[name] = tensor
        report.mapped[key] = ", ".join(ours) if len(ours) > 1 else next(iter(ours))
    if stray or wrong_shape:
        raise ValueError(
            "The checkpoint does not fit the model inferred from it: "
            + (f"no place for {', '.join(stray)}; " if stray else "")
            + (f"shapes differ: {'; '.join(wrong_shape)}" if wrong_shape else "")
        )
    for target, source in TIED_COPIES.items():  # tied officially: one of the pair may be absent from a state dict
        if target in model_keys and target not in converted and source in converted:
            converted[target] = converted[source].clone()
            report.notes.append(f"{target} copied from {source} (tied in the official model, absent from the file)")
    missing = sorted(set(model_keys) - set(converted))
    if missing:
        raise ValueError(f"The checkpoint leaves these weights without a value: {', '.join(missing)}.")
    position_ids = state_dict.get(BERT_PREFIX + "embeddings.position_ids")
    if position_ids is not None and not torch.equal(position_ids.flatten().long(),
                                                    torch.arange(position_ids.numel())):
        raise ValueError(f"'{BERT_PREFIX}embeddings.position_ids' is not arange({position_ids.numel()}).")
    report.unmapped_official_keys = sorted(list(report.no_place) + unknown)
    report.sizes = _sizes(config, kind)
    return converted, report


def _sizes(config: RefersConfig, kind: str) -> dict:
    names = ["image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size"]
    sizes = {name: getattr(config, name) for name in names}
    if kind == "pretraining":
        sizes.update({name: getattr(config, name) for name in (
            "mrm_decoder_hidden_size", "mrm_decoder_num_hidden_layers", "mrm_decoder_num_attention_heads",
            "mrm_decoder_intermediate_size", "mrm_reconstruction_size")})
        text = config.text_config
        sizes.update({f"text_{name}": getattr(text, name) for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")})
    else:
        sizes.update(num_labels=config.num_labels)
    return sizes


# ----------------------------------------------------------------------------------------------------------------------
# Whole conversion
# ----------------------------------------------------------------------------------------------------------------------


def convert_mrm_original_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_attention_heads: int | None = None,
    text_num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    allow_unknown_keys: bool = False,
    problem_type: str | None = "multi_label_classification",
    overwrite: bool = False,
) -> tuple[Path, MRMConversionReport]:
    """Convert an official MRM checkpoint file (pretraining or fine-tuned, told apart by its keys) into a folder.

    Args:
        checkpoint_path: the official `.pth` (read with `torch.load(weights_only=True)`) or a `.safetensors` file.
        output_dir: the folder to write, through a temporary sibling renamed into place once it reads back.
        num_attention_heads, text_num_attention_heads, decoder_num_attention_heads: heads of the encoder, BERT and
            the image decoder (not in the weights): default 64-, 64- and 128-wide heads (the released checkpoint).
        allow_unknown_keys: convert a checkpoint with keys the official code does not have (listed in the report).
        problem_type: fine-tuned checkpoints: the config's `problem_type` (the official scripts train with BCE).
        overwrite: replace a non-empty `output_dir`.

    Returns:
        `(output_dir, report)`; the report is logged too.
    """
    output_dir = Path(output_dir)
    # main_pretrain.py saves its `args` (an argparse.Namespace of plain values) beside the weights: allowed to
    # unpickle; anything else that is not a tensor or a plain container is still refused by the reader
    with torch.serialization.safe_globals([argparse.Namespace]):
        state_dict = read_state_dict(checkpoint_path, argument="checkpoint_path",
                                     expected="an official MRM checkpoint (MRM.pth or a fine-tuned .pth)")
    kind = checkpoint_kind(state_dict)
    if kind == "pretraining":
        config = infer_mrm_config(state_dict, num_attention_heads, text_num_attention_heads,
                                  decoder_num_attention_heads)
        model = MRMForPreTraining(config)
    else:
        fields = infer_encoder_sizes(state_dict, num_attention_heads)
        head = state_dict.get("head.weight")
        if head is None:
            raise ValueError(f"{os.fspath(checkpoint_path)!r} is a fine-tuned models_vit checkpoint without 'head.*'.")
        # models_vit with global_pool=True: fc_norm of the mean patch token; without: the final norm on the CLS token
        pooling = "mean" if "fc_norm.weight" in state_dict else "cls"
        config = RefersConfig(**fields, num_labels=int(head.shape[0]), classifier_pooling=pooling,
                              drop_path_rate=0.1, classifier_initializer_range=2e-5,
                              **({"problem_type": problem_type} if problem_type else {}))
        model = RefersForImageClassification(config)
    model_keys = {key: value.shape for key, value in model.state_dict().items()}
    converted, report = convert_mrm_state_dict(state_dict, config, kind, model_keys, allow_unknown_keys)
    if kind == "pretraining":
        report.notes.extend(BEHAVIOUR_NOTES)
        report.notes.append("the pretrained folder keeps the final LayerNorm (classifier_pooling='cls'); MRM fine-tunes "
                            "with classifier_pooling='mean', drop_path_rate=0.1, classifier_initializer_range=2e-5 "
                            "(run_finetune flags of the same names)")
    else:
        report.notes.append(f"classifier_pooling={pooling!r} (models_vit global_pool={pooling == 'mean'}); "
                            "drop_path_rate=0.1 as the official fine-tuning (training only)")
    model.load_state_dict(converted, strict=True)
    model.eval()

    def save(folder: Path):
        model.save_pretrained(folder, safe_serialization=True)
        reloaded = type(model).from_pretrained(folder)  # a folder that does not read back is never published
        mine, theirs = model.state_dict(), reloaded.state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[key], theirs[key]) for key in mine):
            raise RuntimeError(f"The weights written to {os.fspath(folder)!r} do not read back identically.")

    write_folder_atomically(save, output_dir, overwrite)
    logger.warning(
        f"Converted {os.fspath(checkpoint_path)} -> {os.fspath(output_dir)} ({type(model).__name__}):\n{report}")
    return output_dir, report


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_refers.convert_mrm_original_checkpoint",
        description="Convert an official MRM checkpoint (github.com/RL4M/MRM-pytorch: the pretraining MRM.pth or a "
                    "fine-tuned models_vit state dict) to a refers safetensors folder.")
    parser.add_argument("--checkpoint_path", required=True, help="official .pth (or .safetensors) file")
    parser.add_argument("--output_dir", required=True, help="folder to write (refused if not empty, see --overwrite)")
    parser.add_argument("--num_attention_heads", type=int, default=None,
                        help="encoder heads (default: 64-wide heads, 12 for the released ViT-B)")
    parser.add_argument("--text_num_attention_heads", type=int, default=None,
                        help="BERT heads (default: 64-wide heads, 6 for the released 384-wide BERT)")
    parser.add_argument("--decoder_num_attention_heads", type=int, default=None,
                        help="image decoder heads (default: 128-wide heads, 6 for the released 768-wide decoder)")
    parser.add_argument("--allow_unknown_keys", action="store_true",
                        help="convert although the checkpoint has keys the official code does not (listed)")
    parser.add_argument("--problem_type", default="multi_label_classification",
                        choices=("single_label_classification", "multi_label_classification", "regression"),
                        help="fine-tuned checkpoints only")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    args = parser.parse_args(argv)
    output, report = convert_mrm_original_checkpoint(
        args.checkpoint_path, args.output_dir, num_attention_heads=args.num_attention_heads,
        text_num_attention_heads=args.text_num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads, allow_unknown_keys=args.allow_unknown_keys,
        problem_type=args.problem_type, overwrite=args.overwrite)
    print(f"wrote {output}\n{report}")
    return output


__all__ = [
    "MRMConversionReport",
    "NO_PLACE_REASONS",
    "checkpoint_kind",
    "convert_mrm_original_checkpoint",
    "convert_mrm_state_dict",
    "infer_encoder_sizes",
    "infer_mrm_config",
    "main",
    "official_to_ours",
]


if __name__ == "__main__":
    main()
