"""RadTex (Quigley et al., 2022) model configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_refers import RefersConfig


@strict(accept_kwargs=True)
class RadTexConfig(RefersConfig):
    r"""
    Configuration of [`RadTexForPreTraining`]: REFERS's report decoder on a CNN view encoder (every field of
    [`RefersConfig`]) with RadTex's defaults: timm ResNet-50 (2048-wide last feature map, 7 x 7 cells at 224 px),
    every view captioned on its own (no view fusion), no report encoder.
    """

    model_type = "radtex"

    backbone: str = "resnet50"
    aggregation: str = "none"
    hidden_size: int = 2048
    use_view_fusion: bool = False
    use_report_generation: bool = True
    use_study_report_consistency: bool = False

    def check_architecture(self):
        super().check_architecture()
        if self.use_study_report_consistency or not self.use_report_generation:
            raise ValueError(
                f"RadTex trains report generation only: {type(self).__name__} needs use_report_generation=True and "
                "use_study_report_consistency=False."
            )


__all__ = ["RadTexConfig"]
