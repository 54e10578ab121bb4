"""RadTex (Quigley et al., 2022): image-captioning pretraining. A CNN encodes each radiograph and a transformer decoder
is trained only to generate its report; the CNN is then transferred (fine-tuned like any REFERS backbone).

It is REFERS's report-generation task alone on a CNN view encoder, so it is built from REFERS's parts by
configuration (`backbone`, `use_view_fusion=False`, `use_study_report_consistency=False`), not copied: the same
backbone wrapper, decoder, checkpoints and fine-tuning path.
"""

from .configuration_refers import RefersConfig
from .modeling_refers import RefersForPreTraining

# The method's architecture: timm ResNet-50 (2048-wide last feature map, 7 x 7 cells at 224 px), every view captioned
# on its own (no view fusion), no study-report consistency.
RADTEX_DEFAULTS = dict(backbone="resnet50", aggregation="none", hidden_size=2048, use_view_fusion=False,
                       use_study_report_consistency=False)


class RadTexForPreTraining(RefersForPreTraining):
    """RadTex pretraining: `loss = loss_report` of REFERS's report decoder reading each view's CNN feature-map cells.

    Build the config with [`RadTexForPreTraining.default_config`]; saved folders load with `AutoModel`,
    `AutoModelForImageClassification` (only the head new) and `AutoModelForPreTraining`, also with
    `trust_remote_code=True` where this package is not installed.
    """

    _loadable_by = {**RefersForPreTraining._loadable_by, "AutoModelForPreTraining": "modeling_radtex.RadTexForPreTraining"}

    def __init__(self, config: RefersConfig):
        if config.use_study_report_consistency:
            raise ValueError(
                "RadTex trains report generation only: RefersConfig.use_study_report_consistency must be False "
                "(RadTexForPreTraining.default_config() sets it)."
            )
        super().__init__(config)

    @classmethod
    def default_config(cls, **overrides) -> RefersConfig:
        """A `RefersConfig` with RadTex's architecture (`RADTEX_DEFAULTS`), then `overrides`."""
        return RefersConfig(**{**RADTEX_DEFAULTS, **overrides})


__all__ = ["RADTEX_DEFAULTS", "RadTexForPreTraining"]
