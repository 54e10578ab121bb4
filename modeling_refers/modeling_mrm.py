"""MRM, masked record modeling (Zhou et al., ICLR 2023; official code RL4M/MRM-pytorch).

- Image branch: MAE on the radiograph transformer. `mrm_mask_ratio` (75%) of every view's patches are masked at
  random and only the visible ones enter the encoder (gathered: no compute on masked patches); transformers' ViT-MAE
  decoder (8 blocks, width 512, 16 heads) reconstructs the masked patches; the loss is the MSE on masked patches only,
  against per-patch normalized pixels (`mrm_norm_pix_loss`). With `mrm_reconstruction_size` (the official code's
  448 for 224) the target is the larger image: each 16-px input patch predicts its 32 x 32 pixels.
- Report branch: `mrm_report_mask_ratio` (50%) of the report's words are masked (whole words, by the collator), the
  BERT report encoder predicts them, conditioned on the image by adding the projected mean of the visible patch
  features of the study to every token embedding; cross-entropy on masked positions only.
- Loss = image + report, 1:1.

`MRMConfig.from_official()` runs MRM as its official code does instead (decoder 768 x 4 blocks, fixed sin-cos
positions, the 448-px target resized bicubic without antialias, the latent after BERT's embeddings' LayerNorm, xavier
initialisation; the data side in `training/mrm_official.py`); each difference is one `MRMConfig` field.

Built on REFERS's radiograph transformer and BERT report encoder (subclass of `RefersForPreTraining`); configured by
[`MRMConfig`] (`model_type="mrm"`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, ViTMAEConfig
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import BertLMPredictionHead, BertOnlyMLMHead
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder
from transformers.utils.output_capturing import capture_outputs

from .configuration_mrm import MRMConfig
from .modeling_refers import (
    RefersBackbone,
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
    WithoutTextFeatures,
)


def random_patch_masking(num_images: int, num_patches: int, mask_ratio: float, generator=None, device=None,
                         noise: torch.Tensor | None = None):
    """MAE's per-image random masking: `(ids_keep (n, K), mask (n, P), ids_restore (n, P))` with
    `K = int(P * (1 - mask_ratio))` visible patches, `mask` 1 on masked patches (in patch order). The patches with the
    smallest `noise` `(n, P)` are kept (uniform noise drawn from `generator` when not given, as ViT-MAE's `noise`)."""
    keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(num_images, num_patches, generator=generator, device=device)
    elif tuple(noise.shape) != (num_images, num_patches):
        raise ValueError(f"`noise` must have shape (real views, patches) = {(num_images, num_patches)}, got "
                         f"{tuple(noise.shape)}.")
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(num_images, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def mrm_2d_sincos_position_embedding(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MRM's fixed 2-D sin-cos position table (`model_mrm.py` builds both the encoder's and the decoder's with the
    `get_2d_sincos_pos_embed` of MAE's `util/pos_embed.py`): `(1 + grid_size**2, embed_dim)` with `cls_token` (a zero
    first row), patches in row-major order. A patch in row r, column c gets `[sin(c w), cos(c w), sin(r w), cos(r w)]`
    with `w_i = 1 / 10000 ** (i / (embed_dim / 4))`, i < embed_dim / 4: the column first (MAE's grid is
    `meshgrid(w, h)`). Computed in float64, returned in float32."""
    if embed_dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width that is a multiple of 4, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                   torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([one_axis(columns), one_axis(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table])
    return table.float()


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(n, C, H, W)` -> `(n, (H / p) * (W / p), p * p * C)`, row-major patches, pixels (p, p, C) inside (as MAE)."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def masked_patch_loss(target: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor,
                      norm_pix_loss: bool = True) -> torch.Tensor:
    """MAE's loss: mean squared error per patch, averaged over the masked patches only (`mask` 1 = masked);
    with `norm_pix_loss` every target patch is normalized by its own mean and variance (eps 1e-6)."""
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


@dataclass
class MRMForPreTrainingOutput(ModelOutput):
    """loss = loss_image + loss_report. `reconstruction` `(n, P, p * p * C)` for the n real views; `mask` `(n, P)`
    1 on masked patches; `report_logits` `(B, T, vocab)`."""

    loss: torch.Tensor | None = None
    loss_image: torch.Tensor | None = None
    loss_report: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    report_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class MRMBackbone(RefersBackbone):
    """[`RefersBackbone`] for a MRM folder: what `AutoBackbone` loads from it (feature maps for dense heads such as
    UperNet)."""

    config_class = MRMConfig
    _loadable_by = {"AutoBackbone": "modeling_mrm.MRMBackbone"}


class MRMModel(RefersModel):
    """[`RefersModel`] for an MRM folder (`model_type="mrm"`): what `AutoModel` loads from it (the image decoder and
    report branch are dropped)."""

    config_class = MRMConfig
    _loadable_by = {"AutoBackbone": "modeling_mrm.MRMBackbone", "AutoModel": "modeling_mrm.MRMModel",
                    "AutoModelForImageClassification": "modeling_mrm.MRMForImageClassification"}


class MRMForImageClassification(RefersForImageClassification):
    """[`RefersForImageClassification`] for an MRM folder: what `AutoModelForImageClassification` loads from it, only
    the head new."""

    config_class = MRMConfig
    _loadable_by = MRMModel._loadable_by


class MRMForPreTraining(WithoutTextFeatures, RefersForPreTraining):
    """MRM pretraining on REFERS's radiograph transformer and BERT report encoder; see the module docstring.

    Inputs: studies `(B, V, C, H, W)` + `view_mask` (or images `(B, C, H, W)`), the masked report `input_ids`,
    `attention_mask` and `labels` (-100 except at masked tokens; `MaskedReportCollator` makes them). With
    `mrm_reconstruction_size`, `pixel_values` are at that size and the encoder sees them resized to `image_size`.
    """

    config_class = MRMConfig
    _loadable_by = {**MRMModel._loadable_by, "AutoModelForPreTraining": "modeling_mrm.MRMForPreTraining"}
    # MRM predicts report words; it does not embed whole reports (no `text_projection`)
    _no_get_text_features = ("MRMForPreTraining has no `get_text_features`: MRM predicts masked report words and has "
                             "no text_projection; its report encoder is `model.text_encoder`.")

    _report_head_tied_weights_keys = {
        "report_head.predictions.decoder.weight": "text_encoder.embeddings.word_embeddings.weight",
        "report_head.predictions.decoder.bias": "report_head.predictions.bias",
    }

    def _build_text_encoder(self, config: MRMConfig) -> nn.Module:
        # MRM reads the report tokens, never a pooled report: BERT without its pooler (it would get no gradient)
        return AutoModel.from_config(config.text_config, add_pooling_layer=False)

    def _build_modules(self, config: MRMConfig) -> None:
        # use_view_fusion=True is allowed (the fusion is not trained by MRM; it keeps its initialisation), so that
        # an MRM checkpoint has the architecture of a REFERS one for a fair fine-tuning comparison.
        super()._build_modules(config)
        scale = (config.mrm_reconstruction_size or config.image_size) // config.image_size
        mae = ViTMAEConfig(
            hidden_size=config.hidden_size, decoder_hidden_size=config.mrm_decoder_hidden_size,
            decoder_num_hidden_layers=config.mrm_decoder_num_hidden_layers,
            decoder_num_attention_heads=config.mrm_decoder_num_attention_heads,
            decoder_intermediate_size=config.mrm_decoder_intermediate_size, patch_size=config.patch_size * scale,
            num_channels=config.num_channels, image_size=config.image_size * scale, layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act, qkv_bias=config.qkv_bias, initializer_range=config.initializer_range,
        )
        mae._attn_implementation = config._attn_implementation or "sdpa"  # the decoder follows the model's choice
        self.image_decoder = ViTMAEDecoder(mae, num_patches=config.num_patches)
        self.report_condition = nn.Linear(config.hidden_size, config.text_config.hidden_size)
        self.report_head = BertOnlyMLMHead(config.text_config)
        if config.tie_word_embeddings:
            # as BertForMaskedLM (and the official MyBertMaskedLM): the masked-LM output layer is BERT's word embedding
            # matrix, its bias the head's `predictions.bias`; tied copies are not stored
            self._tied_weights_keys = {**self._tied_weights_keys, **self._report_head_tied_weights_keys}
            self._keys_to_ignore_on_save = list(self._tied_weights_keys)
        else:
            # untied, the output layer keeps its own bias and this copy would sit idle
            self.report_head.predictions.bias.requires_grad_(False)
        self.text_projection = None  # MRM predicts report words; it does not embed whole reports
        self._freeze_fixed_tables()

    def _freeze_fixed_tables(self) -> None:
        # the fixed sin-cos tables stay frozen (requires_grad=False): the image decoder's in every mode (ViT-MAE's),
        # the encoder's with mrm_position_embeddings="sincos"; again after loading (from_pretrained runs
        # `initialize_weights`), where transformers hands back trainable parameters
        self.image_decoder.decoder_pos_embed.requires_grad_(False)
        if self.config.mrm_position_embeddings == "sincos":
            self.refers.embeddings.position_embeddings.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ViTMAEDecoder):  # fixed 2-D sin-cos positions, mask token N(0, 0.02), as ViT-MAE
            module.initialize_weights(self.config.num_patches)
        elif isinstance(module, BertLMPredictionHead):  # its output bias (tied into the decoder Linear), as BERT's
            init.zeros_(module.bias)

    @torch.no_grad()
    def initialize_weights(self):
        """transformers' initialisation (every sub-model's own, BERT's included), then, where the config asks, the
        official code's on top (model_mrm.MRM.initialize_weights also runs after BertForMaskedLM's) and the fixed
        sin-cos encoder table. Through `transformers.initialization`, so weights loaded from a checkpoint are kept."""
        super().initialize_weights()
        self._freeze_fixed_tables()
        if self.config.mrm_initialization == "xavier":
            self._init_official_weights()
        if self.config.mrm_position_embeddings == "sincos":
            table = mrm_2d_sincos_position_embedding(self.config.hidden_size, self.config.image_size // self.config.patch_size)
            positions = self.refers.embeddings.position_embeddings
            init.copy_(positions, table[None].to(positions.device, positions.dtype))

    @torch.no_grad()
    def _init_official_weights(self) -> None:
        """The official initialisation (model_mrm.MRM.initialize_weights on top of BERT's own): xavier-uniform for every
        Linear with zero bias, the encoder's and decoder's q, k, v with the bounds of timm's fused qkv Linear(d, 3d),
        the patch embedding's weight as a Linear (its bias PyTorch's default), class and mask tokens N(0, 0.02),
        LayerNorms 1 / 0; BERT's word embeddings get the xavier matrix of the masked-LM decoder tied to them (copied,
        where `tie_word_embeddings=False` keeps the two separate)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
        for part in (self.refers, self.image_decoder):
            for module in part.modules():
                if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
                    for projection in (module.q_proj, module.k_proj, module.v_proj):
                        width = projection.in_features
                        bound = (6.0 / (width + 3 * width)) ** 0.5
                        init.uniform_(projection.weight, -bound, bound)
        patches = self.refers.embeddings.patch_embeddings.projection
        fan_in = patches.weight[0].numel()
        bound = (6.0 / (fan_in + patches.weight.shape[0])) ** 0.5
        init.uniform_(patches.weight, -bound, bound)
        if patches.bias is not None:
            init.uniform_(patches.bias, -fan_in**-0.5, fan_in**-0.5)
        init.normal_(self.refers.embeddings.cls_token, std=0.02)
        init.normal_(self.image_decoder.mask_token, std=0.02)
        init.copy_(self.text_encoder.embeddings.word_embeddings.weight, self.report_head.predictions.decoder.weight)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """As transformers', and the MAE image decoder (a plain module with its own `ViTMAEConfig`) follows."""
        result = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.image_decoder.config._attn_implementation = self.config._attn_implementation
        return result

    @classmethod
    def default_config(cls, **overrides) -> MRMConfig:
        """An [`MRMConfig`] (MRM's defaults), then `overrides`."""
        return MRMConfig(**overrides)

    def encoder_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """`(n, C, S, S)` -> `(n, C, image_size, image_size)`: with the super-resolution target (S =
        `mrm_reconstruction_size`) the encoder sees the image resized by `mrm_resize_mode` / `mrm_resize_antialias`
        (the paper's reading: bilinear with antialias; the official code: bicubic without); at `image_size`, as is."""
        if images.shape[-1] == self.config.image_size:
            return images
        mode = self.config.mrm_resize_mode
        return nn.functional.interpolate(images, size=(self.config.image_size,) * 2, mode=mode,
                                         antialias=self.config.mrm_resize_antialias,
                                         align_corners=False if mode in ("bilinear", "bicubic") else None)

    def encode_visible(self, pixel_values: torch.Tensor, ids_keep: torch.Tensor, **kwargs) -> torch.Tensor:
        """The radiograph transformer on the visible patches only: `(n, C, H, W)`, `ids_keep` `(n, K)` ->
        `(n, 1 + K, d)` (aggregation token first)."""
        vit = self.refers
        embeddings = vit.embeddings.patch_embeddings(pixel_values) + vit.embeddings.position_embeddings[:, 1:]
        visible = torch.gather(embeddings, 1, ids_keep[..., None].expand(-1, -1, embeddings.shape[-1]))
        cls = (vit.embeddings.cls_token + vit.embeddings.position_embeddings[:, :1]).expand(visible.shape[0], -1, -1)
        hidden_states = torch.cat([cls, visible], dim=1)
        for layer in vit.layers:
            hidden_states = layer(hidden_states, None, **kwargs)
        hidden_states = vit.layernorm(hidden_states)
        if self.config.aggregation == "cls_add":
            hidden_states = torch.cat([hidden_states[:, :1], hidden_states[:, 1:] + hidden_states[:, :1]], dim=1)
        return hidden_states

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values=None, view_mask=None, input_ids=None, attention_mask=None, labels=None,
                generator=None, noise=None, return_loss=True, **kwargs) -> MRMForPreTrainingOutput:
        r"""
        pixel_values (`(B, V, C, H, W)` or `(B, C, H, W)`), view_mask (`(B, V)`): the studies (H = W =
            `mrm_reconstruction_size` when set, else `image_size`).
        input_ids, attention_mask, labels (`(B, T)`): the masked report and the original ids at masked positions.
        generator (`torch.Generator`, *optional*): randomness of the patch masking.
        noise (`(n, num_patches)`, *optional*): the masking's noise for the n real views (as ViT-MAE's): the patches
            with the smallest values are kept; for deterministic outputs (tests, comparisons).
        output_hidden_states, output_attentions, return_dict: as in transformers; the hidden states and attentions
            are the radiograph transformer's on the visible patches, `(n, 1 + K, d)` per layer (embeddings first).
        """
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        batch_size, num_views = pixel_values.shape[:2]
        real = (torch.ones(batch_size, num_views, dtype=torch.bool, device=pixel_values.device) if view_mask is None
                else view_mask.bool())
        images = pixel_values[real]  # (n, C, H, W): the real views
        owner = real.nonzero()[:, 0]  # the study of each real view
        inputs = self.encoder_inputs(images)
        ids_keep, mask, ids_restore = random_patch_masking(inputs.shape[0], self.config.num_patches,
                                                           self.config.mrm_mask_ratio, generator, inputs.device,
                                                           noise=noise)
        flags = {k: v for k, v in kwargs.items() if k in ("output_hidden_states", "output_attentions")}
        encoded = self.encode_visible(inputs, ids_keep, **flags)
        reconstruction = self.image_decoder(encoded, ids_restore).logits  # (n, P, (p * scale)^2 * C)
        loss_image = masked_patch_loss(patchify(images, self.image_decoder.config.patch_size), reconstruction,
                                       mask, self.config.mrm_norm_pix_loss) if return_loss else None

        loss_report = report_logits = None
        if input_ids is not None:
            visible_mean = encoded[:, 1:].mean(dim=1)  # (n, d) per view, then the mean over the study's views
            study_mean = torch.zeros(batch_size, visible_mean.shape[-1], dtype=visible_mean.dtype,
                                     device=visible_mean.device).index_add(0, owner, visible_mean)
            study_mean = study_mean / real.sum(dim=1, keepdim=True).clamp_min(1)
            condition = self.report_condition(study_mean)[:, None]  # (B, 1, text width)
            if self.config.mrm_report_condition == "embeddings_output":  # official: after LayerNorm and dropout
                hook = self.text_encoder.embeddings.register_forward_hook(lambda module, args, out: out + condition)
                try:
                    text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
                finally:
                    hook.remove()
            else:  # the paper's reading: added to the word embeddings, before positions and LayerNorm
                embeddings = self.text_encoder.embeddings.word_embeddings(input_ids) + condition
                text = self.text_encoder(inputs_embeds=embeddings, attention_mask=attention_mask)
            report_logits = self.report_head(text.last_hidden_state)
            if labels is not None and return_loss:
                loss_report = nn.functional.cross_entropy(report_logits.flatten(0, 1), labels.flatten(),
                                                          ignore_index=-100)
        parts = [part for part in (loss_image, loss_report) if part is not None]
        loss = torch.stack(parts).sum() if parts and return_loss else None
        return MRMForPreTrainingOutput(loss=loss, loss_image=loss_image, loss_report=loss_report,
                                       reconstruction=reconstruction, mask=mask, report_logits=report_logits)


__all__ = ["MRMBackbone", "MRMForImageClassification", "MRMForPreTraining", "MRMModel", "masked_patch_loss",
           "mrm_2d_sincos_position_embedding", "patchify", "random_patch_masking"]
