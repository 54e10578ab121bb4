"""REFERS for the Hugging Face ecosystem. Importing this package registers the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from .configuration_refers import RefersConfig
from .modeling_refers import (
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
    RefersPreTrainedModel,
    RefersViewFusion,
    TimmLoadReport,
    convert_timm_vit_state_dict,
)


AutoConfig.register("refers", RefersConfig, exist_ok=True)
AutoModel.register(RefersConfig, RefersModel, exist_ok=True)
AutoModelForImageClassification.register(RefersConfig, RefersForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(RefersConfig, RefersForPreTraining, exist_ok=True)

# A folder written by save_pretrained carries `auto_map` and the modeling files, so it loads with
# trust_remote_code=True where this package is not installed.
RefersConfig.register_for_auto_class()
RefersModel.register_for_auto_class("AutoModel")
RefersForImageClassification.register_for_auto_class("AutoModelForImageClassification")
RefersForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "RefersConfig",
    "RefersForImageClassification",
    "RefersForPreTraining",
    "RefersModel",
    "RefersPreTrainedModel",
    "RefersViewFusion",
    "TimmLoadReport",
    "convert_timm_vit_state_dict",
]
