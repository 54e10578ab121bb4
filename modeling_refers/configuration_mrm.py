"""MRM (masked record modeling; Zhou et al., ICLR 2023) model configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_refers import RefersConfig

# MRM's switches: field -> (the paper's reading, the default; the official code's value (RL4M/MRM-pytorch)).
MRM_SWITCHES = {
    "mrm_position_embeddings": ("learned", "sincos"),
    "mrm_report_condition": ("word_embeddings", "embeddings_output"),
    "mrm_report_masking": ("whole_word", "official"),
    "mrm_report_loss_positions": ("masked", "all"),
    "mrm_image_augmentation": ("processor", "official"),
    "mrm_initialization": ("refers", "xavier"),
}
MRM_RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")

# The official report encoder (bert/bert_encoder.py's BertConfig), trained from scratch on mimic_wordpiece.json.
MRM_OFFICIAL_TEXT_CONFIG = dict(
    model_type="bert", vocab_size=30000, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
    intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=100, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)

# Everything else the official code fixes (model_mrm.mrm(), main_pretrain.py, run.sh, util/pretrain_datasets.py).
MRM_OFFICIAL = dict(
    image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, aggregation="none", use_view_fusion=False, num_views=1, max_report_length=100,
    pad_token_id=0, bos_token_id=2, eos_token_id=None, mrm_mask_ratio=0.75, mrm_norm_pix_loss=True,
    mrm_decoder_hidden_size=768, mrm_decoder_num_hidden_layers=4, mrm_decoder_num_attention_heads=6,
    mrm_decoder_intermediate_size=3072, mrm_report_mask_ratio=0.5, mrm_resize_mode="bicubic",
    mrm_resize_antialias=False, **{field: values[1] for field, values in MRM_SWITCHES.items()},
)


@strict(accept_kwargs=True)
class MRMConfig(RefersConfig):
    r"""
    Configuration of [`MRMForPreTraining`]: REFERS's radiograph transformer and BERT report encoder (every field of
    [`RefersConfig`]) with MRM's defaults (no report decoder, no view fusion, plain ViT aggregation) and MRM's own
    fields.

    Args:
        mrm_mask_ratio (`float`, defaults to 0.75): share of every view's patches masked (MAE).
        mrm_norm_pix_loss (`bool`, defaults to `True`): reconstruct per-patch normalized pixels.
        mrm_reconstruction_size (`int`, *optional*): a larger target image (the official code's 448 for 224): each
            input patch then predicts `(patch_size * mrm_reconstruction_size / image_size) ** 2` pixels.
        mrm_decoder_hidden_size (`int`, defaults to 512), mrm_decoder_num_hidden_layers (`int`, defaults to 8),
        mrm_decoder_num_attention_heads (`int`, defaults to 16), mrm_decoder_intermediate_size (`int`, defaults to
            2048): the light MAE image decoder (transformers' `ViTMAEDecoder`).
        mrm_report_mask_ratio (`float`, defaults to 0.5): share of report words masked (whole words, by the collator).
        tie_word_embeddings (`bool`, defaults to `True`): the masked-LM head's output layer is BERT's word embedding
            matrix (as transformers' BertForMaskedLM and the official code); `False` keeps (and saves) its own.

        MRM's official code where it differs (each field: the paper's reading by default, the official value after
        the slash; [`MRMConfig.from_official`] sets them all):

        mrm_position_embeddings (`str`, `"learned"` / `"sincos"`): the encoder's position table learned, or MRM's
            fixed 2-D sin-cos table (not trained). The image decoder's is the fixed sin-cos table either way.
        mrm_resize_mode (`str`, `"bilinear"` / `"bicubic"`), mrm_resize_antialias (`bool`, `True` / `False`): how the
            `mrm_reconstruction_size` image is resized to `image_size` for the encoder (`torch.nn.functional.interpolate`).
        mrm_report_condition (`str`, `"word_embeddings"` / `"embeddings_output"`): where the projected image latent
            enters BERT: added to the word embeddings (before position embeddings and LayerNorm), or to the
            embeddings' output (after their LayerNorm and dropout, bert/bert.py).
        mrm_report_masking (`str`, `"whole_word"` / `"official"`): the collator's report masking: transformers'
            whole-word masking, or MRM's ('[CLS] ' + report as text, no [SEP], padded to `max_report_length`, `##`
            pieces joined to the token before them).
        mrm_report_loss_positions (`str`, `"masked"` / `"all"`): the report loss over the masked tokens only, or over
            every position ([CLS], visible words and padding included): the collator's labels.
        mrm_image_augmentation (`str`, `"processor"` / `"official"`): the processor's studies, or one radiograph per
            report through RandomResizedCrop(448, scale 0.2-1.0, bicubic) + flip, normalized 0.4978 / 0.2449.
        mrm_initialization (`str`, `"refers"` / `"xavier"`): REFERS's truncated normal (std `initializer_range`), or
            xavier-uniform for every Linear (q, k, v as timm's fused qkv), the patch embedding as a Linear, the class
            and mask tokens N(0, 0.02), BERT's word embeddings the same xavier matrix as the tied masked-LM decoder.
    """

    model_type = "mrm"

    use_report_generation: bool = False
    use_study_report_consistency: bool = True
    use_view_fusion: bool = False
    aggregation: str = "none"
    mrm_mask_ratio: float = 0.75
    mrm_norm_pix_loss: bool = True
    mrm_reconstruction_size: int | None = None
    mrm_decoder_hidden_size: int = 512
    mrm_decoder_num_hidden_layers: int = 8
    mrm_decoder_num_attention_heads: int = 16
    mrm_decoder_intermediate_size: int = 2048
    mrm_report_mask_ratio: float = 0.5
    mrm_position_embeddings: str = "learned"
    mrm_resize_mode: str = "bilinear"
    mrm_resize_antialias: bool = True
    mrm_report_condition: str = "word_embeddings"
    mrm_report_masking: str = "whole_word"
    mrm_report_loss_positions: str = "masked"
    mrm_image_augmentation: str = "processor"
    mrm_initialization: str = "refers"

    @classmethod
    def from_official(cls, **overrides) -> "MRMConfig":
        """MRM exactly as its official code runs (RL4M/MRM-pytorch, MIT; `MRM_OFFICIAL`): ViT-B/16 on 224 px without
        dropout, the 448-px super-resolution target (`2 * image_size` when `image_size` is overridden) resized
        bicubic without antialias, decoder 768 wide, 4 blocks, 6 heads, MLP 3072, fixed sin-cos positions, BERT
        from scratch at 384 / 6 layers / 6 heads / FFN 1536 / 100 positions on the 30,000-token
        `mimic_wordpiece.json` with the latent after its embeddings' LayerNorm, MRM's report masking and loss over
        all positions, its image pipeline and xavier initialisation; then `overrides` (a `text_config` dict is
        merged into the official one)."""
        values = {**MRM_OFFICIAL, **overrides}
        if "mrm_reconstruction_size" not in overrides:
            values["mrm_reconstruction_size"] = 2 * values["image_size"]  # decoder_pred predicts (2 patch)^2 pixels
        text = overrides.get("text_config")
        if text is None or isinstance(text, dict):
            values["text_config"] = {**MRM_OFFICIAL_TEXT_CONFIG, **(text or {})}
        return cls(**values)

    def check_architecture(self):
        super().check_architecture()
        name = type(self).__name__
        if self.backbone != "vit" or self.aggregation == "recurrent_concat":
            raise ValueError(f"MRM masks patches of the radiograph transformer: {name} needs backbone='vit' and "
                             f"aggregation 'none' or 'cls_add', got backbone={self.backbone!r}, "
                             f"aggregation={self.aggregation!r}.")
        if self.use_report_generation or not self.use_study_report_consistency:
            raise ValueError(f"MRM's branches are masked patches and masked report words: {name} needs "
                             "use_report_generation=False and use_study_report_consistency=True.")
        for field_name in ("mrm_decoder_hidden_size", "mrm_decoder_num_hidden_layers",
                           "mrm_decoder_num_attention_heads", "mrm_decoder_intermediate_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field_name} must be a positive integer, got {value!r}.")
        if self.mrm_decoder_hidden_size % self.mrm_decoder_num_attention_heads:
            raise ValueError(f"{name}.mrm_decoder_hidden_size ({self.mrm_decoder_hidden_size}) must be divisible by "
                             f"mrm_decoder_num_attention_heads ({self.mrm_decoder_num_attention_heads}).")
        for field_name, allowed in MRM_SWITCHES.items():
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"{name}.{field_name} must be one of {allowed} (the paper's reading, the official "
                                 f"code's), got {getattr(self, field_name)!r}.")
        if self.mrm_resize_mode not in MRM_RESIZE_MODES:
            raise ValueError(f"{name}.mrm_resize_mode must be one of {MRM_RESIZE_MODES}, got {self.mrm_resize_mode!r}.")
        if not isinstance(self.mrm_resize_antialias, bool) or (
                self.mrm_resize_antialias and self.mrm_resize_mode not in ("bilinear", "bicubic")):
            raise ValueError(f"{name}.mrm_resize_antialias must be a bool, and True only with mrm_resize_mode "
                             f"'bilinear' or 'bicubic'; got {self.mrm_resize_antialias!r} with {self.mrm_resize_mode!r}.")
        if self.mrm_position_embeddings == "sincos" and self.hidden_size % 4:
            raise ValueError(f"{name}.mrm_position_embeddings='sincos' needs hidden_size divisible by 4, got "
                             f"{self.hidden_size}.")
        if self.mrm_image_augmentation == "official" and self.mrm_report_masking != "official":
            raise ValueError(f"{name}.mrm_image_augmentation='official' goes with mrm_report_masking='official' (one "
                             "collator makes both as the official code does), got "
                             f"mrm_report_masking={self.mrm_report_masking!r}.")
        for field_name in ("mrm_mask_ratio", "mrm_report_mask_ratio"):
            if not 0.0 < getattr(self, field_name) < 1.0:
                raise ValueError(f"{name}.{field_name} must be in (0, 1), got {getattr(self, field_name)!r}.")
        if self.mrm_reconstruction_size is not None and (
                self.mrm_reconstruction_size < self.image_size or self.mrm_reconstruction_size % self.image_size):
            raise ValueError(
                f"{name}.mrm_reconstruction_size ({self.mrm_reconstruction_size}) must be None or a multiple of "
                f"image_size ({self.image_size}), e.g. 448 for 224 (the official code's super-resolution target)."
            )

    @property
    def input_image_size(self) -> int:
        """Side of the images the processor must deliver: `mrm_reconstruction_size` when set, else `image_size`."""
        return self.mrm_reconstruction_size or self.image_size


__all__ = ["MRMConfig", "MRM_OFFICIAL", "MRM_OFFICIAL_TEXT_CONFIG", "MRM_SWITCHES"]
