"""JoImTeRNet (Shaikh et al., MLMI 2021) model configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_refers import RefersConfig


@strict(accept_kwargs=True)
class JoImTeRNetConfig(RefersConfig):
    r"""
    Configuration of [`JoImTeRNetForPreTraining`]: REFERS's view encoder, view fusion and BERT report encoder (every
    field of [`RefersConfig`]) with JoImTeRNet's defaults: no report decoder, and the study feature, the regions and
    the words projected to a shared 256-d space (`use_study_projection=True`, `projection_dim=256`).
    """

    model_type = "joimternet"

    use_report_generation: bool = False
    use_study_report_consistency: bool = True
    use_view_fusion: bool = True
    use_study_projection: bool = True
    projection_dim: int | None = 256

    def check_architecture(self):
        super().check_architecture()
        name = type(self).__name__
        if self.use_report_generation or not self.use_study_report_consistency or not self.use_view_fusion:
            raise ValueError(
                f"JoImTeRNet matches studies with reports and generates nothing: {name} needs "
                "use_report_generation=False, use_study_report_consistency=True and use_view_fusion=True."
            )
        if not self.use_study_projection:
            raise ValueError(f"JoImTeRNet projects the study feature: {name}.use_study_projection must be True.")


__all__ = ["JoImTeRNetConfig"]
