"""REFERS model configuration."""

import functools

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, BertConfig, PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

AGGREGATION_MODES = ("recurrent_concat", "cls_add", "none")

# The official code's report decoder: one post-norm layer, width 1024, 16 heads, FFN 4096, GELU, dropout 0.1,
# 100 tokens, causal self-attention + cross-attention to the study tokens.
DEFAULT_DECODER_CONFIG = dict(
    hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=100, is_decoder=True,
    add_cross_attention=True,
)

# Flat names of the report decoder's fields (kept for `config_overrides` strings): name -> `decoder_config` field(s).
DECODER_ALIASES = {
    "decoder_vocab_size": ("vocab_size",),
    "decoder_hidden_size": ("hidden_size",),
    "decoder_num_hidden_layers": ("num_hidden_layers",),
    "decoder_num_attention_heads": ("num_attention_heads",),
    "decoder_intermediate_size": ("intermediate_size",),
    "decoder_hidden_act": ("hidden_act",),
    "decoder_dropout_prob": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "max_report_length": ("max_position_embeddings",),
}


def _decoder_alias(name: str, fields: tuple[str, ...]) -> property:
    def get(self):
        return getattr(self.decoder_config, fields[0])

    def set(self, value):
        for field_name in fields:
            setattr(self.decoder_config, field_name, value)

    return property(get, set, doc=f"Alias of `decoder_config.{fields[0]}`.")
VIEW_FUSION_MODES = ("softmax", "sigmoid_gate")


class RefersDecoderConfig(BertConfig):
    """The report decoder's `BertConfig`. Its own class only for `base_config_key`: a REFERS folder holds two BERT
    sub-configs (`text_config`, `decoder_config`), and `RefersDecoderConfig.from_pretrained(folder)` must read the
    decoder's, not the last `bert` dict of the file (what a plain `BertConfig` takes)."""

    base_config_key = "decoder_config"

TEXT_POOLING_MODES = ("pooler", "mean", "cls")
CLASSIFIER_POOLING_MODES = ("cls", "mean")


@strict(accept_kwargs=True)
class RefersConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a REFERS radiograph transformer (Zhou et al., Nature Machine Intelligence 4, 32-40, 2022).

    The vision fields keep `ViTConfig`'s names; the defaults are the paper's ViT-B/16 with the official code's choices
    where the two differ (GELU, position embedding added, LayerNorm eps 1e-6), so timm `vit_base_patch16_224` weights
    load.

    Args:
        backbone (`str`, defaults to `"vit"`): the view encoder: `"vit"` (the radiograph transformer) or a timm CNN
            name (`resnet50`, `resnet101` for the paper's CNN row, `densenet121`, ...). A CNN's last feature map
            (7 x 7 at 224 px for stride 32) gives the tokens (its cells) and the view feature (their mean); it needs
            `aggregation="none"` and `hidden_size` = the CNN's feature width (2048 for ResNet-50/101).
        image_size (`int`, defaults to 224): input height and width in pixels.
        patch_size (`int`, defaults to 16): side of a square patch; `image_size` must be a multiple of it.
        num_channels (`int`, defaults to 3): input channels (grayscale radiographs are repeated to 3).
        hidden_size (`int`, defaults to 768): model width d.
        num_hidden_layers (`int`, defaults to 12): number of pre-LayerNorm transformer blocks.
        num_attention_heads (`int`, defaults to 12): heads per attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): hidden size of the two-layer MLP.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (the paper's text says ReLU, its code GELU).
        hidden_dropout_prob (`float`, defaults to 0.1): dropout after embeddings, attention output and MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal init.
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projections.
        aggregation (`str`, defaults to `"recurrent_concat"`):
            - `"recurrent_concat"` (paper): before the last block, the aggregation token is concatenated to every patch
              token along the feature axis (2d) and a linear layer projects back to d.
            - `"cls_add"` (official code): the final aggregation token is added to every patch token.
            - `"none"`: plain ViT.
        num_views (`int`, defaults to 3): views per study V.
        view_fusion (`str`, defaults to `"softmax"`):
            - `"softmax"` (paper): an MLP scores the concatenated view features, softmax over views gives the weights.
            - `"sigmoid_gate"` (official code): per patch position, one sigmoid gate per view from the concatenated
              view tokens.
        view_fusion_hidden_size (`int`, defaults to 768): hidden width of the softmax fusion's scoring MLP.
        classifier_pooling (`str`, defaults to `"cls"`): how a view becomes one feature (`pooler_output`, what the
            classifier and the view fusion read): `"cls"`, the aggregation token after the final LayerNorm (REFERS,
            the paper); `"mean"`, the mean of the patch tokens through a LayerNorm `fc_norm`, the final LayerNorm
            removed (timm's `global_pool="avg", fc_norm=True`; MRM's fine-tuning, models_vit.py `global_pool=True`).
            Radiograph transformer only.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth: block i of L drops its attention and MLP
            residual branches per sample with probability `drop_path_rate * i / (L - 1)` in training (timm's
            linear rule; MRM fine-tunes with 0.1). 0 builds no drop-path module.
        classifier_initializer_range (`float`, *optional*): std of the truncated-normal init of a new classifier
            weight; `initializer_range` when unset (MRM's fine-tuning: 2e-5).
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*): the stages `RefersBackbone`
            returns as feature maps (`stage_names`: `stem`, `stage1` .. `stageL`; as `Dinov2Config`); the last stage
            when neither is set. MRM's segmentation uses `out_indices=[4, 6, 8, 12]`.
        feature_pyramid_rescales (`list[float]`, *optional*): MRM's Feature2Pyramid neck on the backbone's feature
            maps, one factor per out feature from 4, 2, 1, 0.5, 0.25 (MRM: `[4, 2, 1, 0.5]`); None: single scale.

        Pretraining ([`RefersForPreTraining`]); ignored by the backbone and classification models:

        text_config (`dict` or `PreTrainedConfig`, defaults to BERT-base): the report encoder of the study-report
            consistency task (any BERT-like `model_type`; a local folder's config when loaded from one).
        text_pooling (`str`, defaults to `"pooler"`): how the report encoder's tokens become one report vector before
            `text_projection`: `"pooler"` (BERT's pooler, tanh(dense(CLS)); the official code, Bio_ClinicalBERT),
            `"mean"` (the mean of the real tokens' last hidden states; what sentence-embedding models such as the
            default MiniLM were trained with: its pooler weights were never trained for that, and reports through
            them are nearly one vector) or `"cls"` (the [CLS] token's last hidden state).
            [`RefersForPreTraining.from_text_encoder_pretrained`] reads a sentence-transformers folder's
            `1_Pooling/config.json` and takes its pooling.
        projection_dim (`int`, defaults to the study width, `num_views * hidden_size`): width of the shared study/report embedding.
        contrastive_temperature (`float`, defaults to 0.1): InfoNCE temperature tau.
        contrastive_study_to_report_weight (`float`, defaults to 0.75): lambda; the report-to-study direction gets
            `1 - lambda`. Both directions get gradients (the official code's `.item()` drops one; not reproduced).
        contrastive_global_negatives (`bool`, defaults to `True`): with several processes (DDP / accelerate), InfoNCE
            scores each process's studies and reports against the whole global batch (embeddings all-gathered with
            gradient, as open_clip does), so 8 x 32 studies see 255 negatives, not 31. One process: no effect. The
            official code used each device's own negatives: set `False` to reproduce it.
        use_study_projection (`bool`, defaults to `False`): pass the study feature v_k through a learned
            `study_projection` before InfoNCE. Off by default: the paper scores cos(v_k, t_k) and the official code
            projects only the text side (BERT pooler -> Linear(768 -> V x 768)); then `projection_dim` must be the
            study width (`num_views * hidden_size`, or `hidden_size` without view fusion).
        decoder_config (`dict` or `BertConfig`, defaults to the official code's decoder): the report decoder, a
            sub-config like `text_config` (so `attn_implementation` reaches it): a post-norm BERT stack with causal
            self-attention and cross-attention to the fused study tokens (official code: 1 layer, width 1024, 16
            heads, FFN 4096, GELU, dropout 0.1, 100 tokens). Its vocabulary defaults to `text_config.vocab_size` (one
            shared report tokenizer).
        decoder_vocab_size, decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads,
        decoder_intermediate_size, decoder_hidden_act, decoder_dropout_prob, max_report_length: flat aliases of the
            `decoder_config` fields (accepted as keyword arguments and in `update_from_string`).
        pad_token_id, bos_token_id, eos_token_id (`int`): the report tokenizer's padding, start and end tokens
            (BERT's [PAD]=0, [CLS]=101, [SEP]=102 by default; `run_pretrain.py` sets them from the tokenizer).
        use_view_fusion (`bool`, defaults to `True`): ablation: `False` pairs every view with the report.
        use_report_generation (`bool`, defaults to `True`): ablation: `False` drops the report decoder.
        use_study_report_consistency (`bool`, defaults to `True`): ablation: `False` drops the text encoder.
        freeze_text_encoder (`bool`, defaults to `False`): keep the text encoder's weights fixed.
        tie_word_embeddings (`bool`, defaults to `True`): tie the report decoder's output weights to its input
            embeddings (official code); `False` keeps (and saves) a separate output layer.
    """

    model_type = "refers"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "decoder_config": SubConfigSpec(config_class=RefersDecoderConfig, init_kwargs=DEFAULT_DECODER_CONFIG),
    }

    backbone: str = "vit"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    qkv_bias: bool = True
    aggregation: str = "recurrent_concat"
    num_views: int = 3
    view_fusion: str = "softmax"
    view_fusion_hidden_size: int = 768
    classifier_pooling: str = "cls"
    drop_path_rate: float | int = 0.0
    classifier_initializer_range: float | None = None
    text_config: dict | PreTrainedConfig | None = None
    text_pooling: str = "pooler"
    projection_dim: int | None = None
    contrastive_temperature: float = 0.1
    contrastive_study_to_report_weight: float = 0.75
    contrastive_global_negatives: bool = True
    use_study_projection: bool = False
    decoder_config: dict | PreTrainedConfig | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 101
    eos_token_id: int | None = 102
    use_view_fusion: bool = True
    use_report_generation: bool = True
    use_study_report_consistency: bool = True
    freeze_text_encoder: bool = False
    tie_word_embeddings: bool = True
    # RefersBackbone (AutoBackbone, e.g. under UperNet): `out_features` / `out_indices` (BackboneConfigMixin; None until
    # given: the backbone then takes the last stage) and the Feature2Pyramid rescaling of its feature maps.
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    feature_pyramid_rescales: list[float | int] | None = None

    def __post_init__(self, **kwargs):
        backbone_outputs = {"out_features": kwargs.pop("out_features", None),
                            "out_indices": kwargs.pop("out_indices", None)}
        aliases = {name: kwargs.pop(name) for name in list(kwargs) if name in DECODER_ALIASES}
        decoder_given = self.decoder_config is not None
        super().__post_init__(**kwargs)
        if not decoder_given and "decoder_vocab_size" not in aliases:
            self.decoder_config.vocab_size = self.text_config.vocab_size
        for name, value in aliases.items():
            setattr(self, name, value)
        self.sync_decoder_config()
        self.check_architecture()
        if any(value is not None for value in backbone_outputs.values()):
            self.set_output_features_output_indices(**backbone_outputs)

    @property
    def contrastive_dim(self) -> int:
        """Width of the shared study/report embedding: `projection_dim`, or the study width when it is unset."""
        return self.projection_dim if self.projection_dim is not None else self.study_width

    @property
    def study_width(self) -> int:
        """Width of the study feature v_k: `num_views * hidden_size` with view fusion, `hidden_size` without."""
        return self.num_views * self.hidden_size if self.use_view_fusion else self.hidden_size

    def sync_decoder_config(self) -> None:
        """Copy the report tokenizer's special tokens, the tying choice and the initializer range into
        `decoder_config` (the decoder reads them from there); called on init and when the decoder is built."""
        decoder = self.decoder_config
        decoder.is_decoder, decoder.add_cross_attention = True, True
        decoder.pad_token_id, decoder.bos_token_id, decoder.eos_token_id = (
            self.pad_token_id, self.bos_token_id, self.eos_token_id)
        decoder.tie_word_embeddings = self.tie_word_embeddings
        decoder.initializer_range = self.initializer_range

    def get_decoder_config(self) -> BertConfig:
        """The report decoder's configuration (`decoder_config`, with the special tokens and tying synced)."""
        self.sync_decoder_config()
        return self.decoder_config

    def check_architecture(self):
        """Raise a `ValueError` that names the field when an architecture value is impossible."""
        self._check_sizes()
        self._check_modes()
        self._check_heads_and_objectives()

    def _check_sizes(self):
        """The integer sizes are positive, and the radiograph transformer's patches and heads divide evenly."""
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "num_views", "view_fusion_hidden_size",
                     "decoder_vocab_size", "decoder_hidden_size", "decoder_num_hidden_layers",
                     "decoder_num_attention_heads", "decoder_intermediate_size", "max_report_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}.")
        if self.backbone == "vit" and self.image_size % self.patch_size != 0:
            raise ValueError(
                f"{type(self).__name__}.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        if self.backbone == "vit" and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )

    def _check_modes(self):
        """The backbone is 'vit' or a timm CNN, and the aggregation / pooling / view-fusion choices exist and suit it."""
        if self.backbone != "vit":
            import timm

            if not timm.is_model(self.backbone):
                raise ValueError(
                    f"{type(self).__name__}.backbone must be 'vit' (the radiograph transformer) or the name of a timm CNN (e.g. "
                    f"resnet50, resnet101, densenet121); timm has no model {self.backbone!r}."
                )
            if self.aggregation != "none":
                raise ValueError(
                    f"{type(self).__name__}.aggregation={self.aggregation!r} is a radiograph-transformer choice; a CNN backbone "
                    f"({self.backbone}) pools its last feature map: set aggregation='none'."
                )
        if self.aggregation not in AGGREGATION_MODES:
            raise ValueError(
                f"{type(self).__name__}.aggregation must be one of {AGGREGATION_MODES}, got {self.aggregation!r}."
            )
        if self.text_pooling not in TEXT_POOLING_MODES:
            raise ValueError(
                f"{type(self).__name__}.text_pooling must be one of {TEXT_POOLING_MODES}, got {self.text_pooling!r}."
            )
        if self.classifier_pooling not in CLASSIFIER_POOLING_MODES:
            raise ValueError(f"{type(self).__name__}.classifier_pooling must be one of {CLASSIFIER_POOLING_MODES}, "
                             f"got {self.classifier_pooling!r}.")
        if self.classifier_pooling != "cls" and self.backbone != "vit":
            raise ValueError(f"{type(self).__name__}.classifier_pooling={self.classifier_pooling!r} pools the radiograph "
                             f"transformer's patch tokens; a CNN backbone ({self.backbone}) already pools its feature "
                             "map: keep classifier_pooling='cls'.")
        if not isinstance(self.drop_path_rate, (int, float)) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{type(self).__name__}.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}.")
        if self.classifier_initializer_range is not None and not self.classifier_initializer_range > 0:
            raise ValueError(f"{type(self).__name__}.classifier_initializer_range must be > 0 or None, got "
                             f"{self.classifier_initializer_range!r}.")
        if self.view_fusion not in VIEW_FUSION_MODES:
            raise ValueError(
                f"{type(self).__name__}.view_fusion must be one of {VIEW_FUSION_MODES}, got {self.view_fusion!r}."
            )

    def _check_heads_and_objectives(self):
        """The decoder, projection, contrastive and dropout settings are in range."""
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"{type(self).__name__}.decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                f"decoder_num_attention_heads ({self.decoder_num_attention_heads})."
            )
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ValueError(f"{type(self).__name__}.projection_dim must be a positive integer or None, got {self.projection_dim!r}.")
        if not self.use_study_projection and self.contrastive_dim != self.study_width:
            raise ValueError(
                f"{type(self).__name__}.projection_dim ({self.contrastive_dim}) must equal the study width ({self.study_width}: "
                "num_views * hidden_size with view fusion, hidden_size without) when use_study_projection=False (the "
                "study feature enters InfoNCE unprojected); set use_study_projection=True for another width."
            )
        if self.contrastive_temperature <= 0:
            raise ValueError(f"{type(self).__name__}.contrastive_temperature must be > 0, got {self.contrastive_temperature!r}.")
        if not 0.0 <= self.contrastive_study_to_report_weight <= 1.0:
            raise ValueError(
                f"{type(self).__name__}.contrastive_study_to_report_weight must be in [0, 1], got "
                f"{self.contrastive_study_to_report_weight!r}."
            )
        if not (self.use_report_generation or self.use_study_report_consistency):
            raise ValueError(
                f"{type(self).__name__}: at least one of use_report_generation and use_study_report_consistency must be True."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "decoder_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{type(self).__name__}.{name} must be in [0, 1), got {getattr(self, name)!r}.")

    @property
    def stage_names(self) -> list[str]:
        """The backbone's stages (`RefersBackbone`): `stem` (the embeddings) and `stage1` .. `stageL` (block i's
        output), so `out_indices=[4, 6, 8, 12]` are MRM's blocks 4, 6, 8, 12 (its 0-based `out_indices=(3, 5, 7, 11)`)."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    @property
    def num_recorded_layers(self) -> int:
        """How many `hidden_states` follow the first one: the radiograph transformer's blocks (`num_hidden_layers`) or,
        for a timm CNN, its feature levels after the stem's (timm's `feature_info`). transformers' output capturing
        reads it to resolve negative `output_hidden_states` indices."""
        if self.backbone == "vit":
            return self.num_hidden_layers
        return _timm_feature_levels(self.backbone, self.num_channels) - 1

    @property
    def input_image_size(self) -> int:
        """Side of the images the processor must deliver to the pretraining model (`image_size`; a method that reads
        larger images, e.g. MRM's super-resolution target, overrides it)."""
        return self.image_size

    @property
    def num_patches(self) -> int:
        """Patches per image: (image_size / patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2


@functools.lru_cache(maxsize=None)
def _timm_feature_levels(backbone: str, num_channels: int) -> int:
    """The feature levels timm's `backbone` returns from `forward_intermediates` (built on the meta device: no
    weights)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="", in_chans=num_channels)
    return len(model.feature_info)


for _name, _fields in DECODER_ALIASES.items():
    setattr(RefersConfig, _name, _decoder_alias(_name, _fields))


__all__ = ["RefersConfig", "RefersDecoderConfig", "DEFAULT_DECODER_CONFIG", "AGGREGATION_MODES", "VIEW_FUSION_MODES"]
