"""RadTex (Quigley et al., 2022): image-captioning pretraining. A CNN encodes each radiograph and a transformer decoder
is trained only to generate its report; the CNN is then transferred (fine-tuned like any REFERS backbone).

It is REFERS's report-generation task alone on a CNN view encoder, so it is built from REFERS's parts by
configuration ([`RadTexConfig`], `model_type="radtex"`: `backbone`, `use_view_fusion=False`,
`use_study_report_consistency=False`), not copied: the same backbone wrapper, decoder, checkpoints and fine-tuning path.
"""

from .configuration_radtex import RadTexConfig
from .modeling_refers import RefersForImageClassification, RefersForPreTraining, RefersModel, WithoutTextFeatures


class RadTexModel(RefersModel):
    """[`RefersModel`] for a RadTex folder (`model_type="radtex"`): what `AutoModel` loads from it (the CNN)."""

    config_class = RadTexConfig
    _loadable_by = {"AutoModel": "modeling_radtex.RadTexModel",
                    "AutoModelForImageClassification": "modeling_radtex.RadTexForImageClassification"}


class RadTexForImageClassification(RefersForImageClassification):
    """[`RefersForImageClassification`] for a RadTex folder: what `AutoModelForImageClassification` loads from it,
    only the head new."""

    config_class = RadTexConfig
    _loadable_by = RadTexModel._loadable_by


class RadTexForPreTraining(WithoutTextFeatures, RefersForPreTraining):
    """RadTex pretraining: `loss = loss_report` of REFERS's report decoder reading each view's CNN feature-map cells.

    Build the config with [`RadTexForPreTraining.default_config`]; saved folders load with `AutoModel`,
    `AutoModelForImageClassification` (only the head new) and `AutoModelForPreTraining`, also with
    `trust_remote_code=True` where this package is not installed.
    """

    config_class = RadTexConfig
    _loadable_by = {**RadTexModel._loadable_by, "AutoModelForPreTraining": "modeling_radtex.RadTexForPreTraining"}
    # No report embedding (`get_text_features` of REFERS / CLIP): the inherited method is hidden (`hasattr` is False)
    _no_get_text_features = ("RadTexForPreTraining has no `get_text_features`: RadTex has no report encoder (it only "
                             "generates reports).")

    @classmethod
    def default_config(cls, **overrides) -> RadTexConfig:
        """A [`RadTexConfig`] (RadTex's architecture), then `overrides`."""
        return RadTexConfig(**overrides)


__all__ = ["RadTexForImageClassification", "RadTexForPreTraining", "RadTexModel"]
