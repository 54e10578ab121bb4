"""MRM (masked record modeling; Zhou et al., ICLR 2023) model configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_refers import RefersConfig


@strict(accept_kwargs=True)
class MRMConfig(RefersConfig):
    r"""
    Configuration of [`MRMForPreTraining`]: REFERS's radiograph transformer and BERT report encoder (every field of
    [`RefersConfig`]) with MRM's defaults (no report decoder, no view fusion, plain ViT aggregation) and MRM's own
    fields.

    Args:
        mrm_mask_ratio (`float`, defaults to 0.75): share of every view's patches masked (MAE).
        mrm_norm_pix_loss (`bool`, defaults to `True`): reconstruct per-patch normalised pixels.
        mrm_reconstruction_size (`int`, *optional*): a larger target image (the official code's 448 for 224): each
            input patch then predicts `(patch_size * mrm_reconstruction_size / image_size) ** 2` pixels.
        mrm_decoder_hidden_size (`int`, defaults to 512), mrm_decoder_num_hidden_layers (`int`, defaults to 8),
        mrm_decoder_num_attention_heads (`int`, defaults to 16), mrm_decoder_intermediate_size (`int`, defaults to
            2048): the light MAE image decoder (transformers' `ViTMAEDecoder`).
        mrm_report_mask_ratio (`float`, defaults to 0.5): share of report words masked (whole words, by the collator).
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


__all__ = ["MRMConfig"]
