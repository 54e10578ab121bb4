"""REFERS for the Hugging Face ecosystem. Importing this package registers the Auto classes."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .configuration_joimternet import JoImTeRNetConfig
from .configuration_mrm import MRMConfig
from .configuration_radtex import RadTexConfig
from .configuration_refers import RefersConfig
from .metrics import load_multilabel_auc_metric, multilabel_auc, roc_curve_png
from .image_processing_refers import RefersImageProcessor
from .loading import (
    CheckpointLoadReport,
    TimmLoadReport,
    convert_timm_vit_state_dict,
    from_pretrained_checked,
    load_timm_weights,
)
from .modeling_refers import (
    RefersBackbone,
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
    RefersPreTrainedModel,
    RefersViewFusion,
)
from .processing_refers import RefersProcessor, select_views, swap_left_right
from .radiograph_io import load_dicom, load_radiograph, window_to_uint8
from .training.report_tokenizer import train_report_tokenizer
from .tasks.zero_shot import RefersForZeroShotImageClassification  # registers the zero-shot Auto class
from .modeling_joimternet import (
    JoImTeRNetBackbone,
    JoImTeRNetForImageClassification,
    JoImTeRNetForPreTraining,
    JoImTeRNetModel,
)
from .modeling_mrm import MRMBackbone, MRMForImageClassification, MRMForPreTraining, MRMModel
from .modeling_radtex import RadTexForImageClassification, RadTexForPreTraining, RadTexModel


AutoConfig.register("refers", RefersConfig, exist_ok=True)
AutoModel.register(RefersConfig, RefersModel, exist_ok=True)
AutoModelForImageClassification.register(RefersConfig, RefersForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(RefersConfig, RefersForPreTraining, exist_ok=True)
# One PIL-backend class serves both backends, so a request for the (default) torchvision backend finds it directly.
AutoImageProcessor.register(
    RefersConfig, image_processor_classes={"pil": RefersImageProcessor, "torchvision": RefersImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(RefersConfig, RefersProcessor, exist_ok=True)

# Every pretraining method is its own model_type: its folder loads as its own class with every Auto class, and its
# backbone / classifier are REFERS's (subclasses that only name the method's configuration, as transformers requires).
METHOD_AUTO_CLASSES = {
    MRMConfig: (MRMModel, MRMForImageClassification, MRMForPreTraining),
    JoImTeRNetConfig: (JoImTeRNetModel, JoImTeRNetForImageClassification, JoImTeRNetForPreTraining),
    RadTexConfig: (RadTexModel, RadTexForImageClassification, RadTexForPreTraining),
}
# The radiograph-transformer methods' folders also load as backbones for dense heads (RadTex's CNN: timm's TimmBackbone).
for _config_class, _backbone in ((MRMConfig, MRMBackbone), (JoImTeRNetConfig, JoImTeRNetBackbone)):
    AutoBackbone.register(_config_class, _backbone, exist_ok=True)
    _backbone.register_for_auto_class("AutoBackbone")
for _config_class, (_base, _classifier, _pretraining) in METHOD_AUTO_CLASSES.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _base, exist_ok=True)
    AutoModelForImageClassification.register(_config_class, _classifier, exist_ok=True)
    AutoModelForPreTraining.register(_config_class, _pretraining, exist_ok=True)
    AutoImageProcessor.register(
        _config_class, image_processor_classes={"pil": RefersImageProcessor, "torchvision": RefersImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(_config_class, RefersProcessor, exist_ok=True)
    _config_class.register_for_auto_class()
    _base.register_for_auto_class("AutoModel")
    _classifier.register_for_auto_class("AutoModelForImageClassification")
    _pretraining.register_for_auto_class("AutoModelForPreTraining")

# A folder written by save_pretrained carries `auto_map` and the modeling files, so it loads with
# trust_remote_code=True where this package is not installed.
RefersConfig.register_for_auto_class()
RefersModel.register_for_auto_class("AutoModel")
RefersForImageClassification.register_for_auto_class("AutoModelForImageClassification")
RefersForPreTraining.register_for_auto_class("AutoModelForPreTraining")
RefersImageProcessor.register_for_auto_class("AutoImageProcessor")
RefersProcessor.register_for_auto_class("AutoProcessor")
# The radiograph transformer as a backbone for dense heads (UperNet; modeling_refers.tasks.segmentation).
AutoBackbone.register(RefersConfig, RefersBackbone, exist_ok=True)
RefersBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "RefersBackbone",
    "JoImTeRNetBackbone",
    "JoImTeRNetConfig",
    "JoImTeRNetForImageClassification",
    "JoImTeRNetModel",
    "MRMBackbone",
    "MRMConfig",
    "MRMForImageClassification",
    "MRMModel",
    "RadTexConfig",
    "RadTexForImageClassification",
    "RadTexModel",
    "RefersConfig",
    "RefersImageProcessor",
    "RefersProcessor",
    "load_dicom",
    "load_multilabel_auc_metric",
    "multilabel_auc",
    "roc_curve_png",
    "load_radiograph",
    "select_views",
    "swap_left_right",
    "train_report_tokenizer",
    "window_to_uint8",
    "RefersForImageClassification",
    "RefersForPreTraining",
    "RefersForZeroShotImageClassification",
    "RadTexForPreTraining",
    "JoImTeRNetForPreTraining",
    "MRMForPreTraining",
    "RefersModel",
    "RefersPreTrainedModel",
    "RefersViewFusion",
    "CheckpointLoadReport",
    "TimmLoadReport",
    "convert_timm_vit_state_dict",
    "from_pretrained_checked",
    "load_timm_weights",
]
