"""REFERS model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

AGGREGATION_MODES = ("recurrent_concat", "cls_add", "none")
VIEW_FUSION_MODES = ("softmax", "sigmoid_gate")


@strict(accept_kwargs=True)
class RefersConfig(PreTrainedConfig):
    r"""
    Configuration of a REFERS radiograph transformer (Zhou et al., Nature Machine Intelligence 4, 32-40, 2022).

    The vision fields keep `ViTConfig`'s names; the defaults are the paper's ViT-B/16 with the official code's choices
    where the two differ (GELU, position embedding added, LayerNorm eps 1e-6), so timm `vit_base_patch16_224` weights
    load.

    Args:
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
    """

    model_type = "refers"

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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_architecture()

    def check_architecture(self):
        """Raise a `ValueError` that names the field when an architecture value is impossible."""
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "num_views", "view_fusion_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RefersConfig.{name} must be a positive integer, got {value!r}.")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"RefersConfig.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"RefersConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.aggregation not in AGGREGATION_MODES:
            raise ValueError(
                f"RefersConfig.aggregation must be one of {AGGREGATION_MODES}, got {self.aggregation!r}."
            )
        if self.view_fusion not in VIEW_FUSION_MODES:
            raise ValueError(
                f"RefersConfig.view_fusion must be one of {VIEW_FUSION_MODES}, got {self.view_fusion!r}."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RefersConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")

    @property
    def num_patches(self) -> int:
        """Patches per image: (image_size / patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2


__all__ = ["RefersConfig", "AGGREGATION_MODES", "VIEW_FUSION_MODES"]
