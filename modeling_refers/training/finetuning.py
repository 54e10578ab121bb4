"""Fine-tune a REFERS radiograph transformer on a labelled target data set with 1%, 10% or 100% of the labels.

    python examples/run_finetune.py --dataset_name nih_chestxray14 --data_dir /data/nih \
        --model_name_or_path runs/pretrain --label_ratio 0.01 --seed 0 --output_dir runs/nih-1pct --do_train --do_predict

Initialisation (`init` in results.json): a REFERS checkpoint folder (`--model_name_or_path`, a pretraining or
fine-tuning checkpoint; only the classifier head is new), a local timm ViT state dict (`--timm_weights`, e.g. an
ImageNet ViT-B/16 you downloaded), or random (neither). The paper's recipe is the default: SGD momentum 0.9, lr 3e-3,
linear warm-up then cosine decay, batch 128, the pretraining augmentations; BCE for multi-label, cross entropy for
single-label data sets, gradients clipped at norm 10 (the official code's value). The checkpoint with the best
validation mean AUC is kept and evaluated on test, and `results.json` records per-class AUC, mean AUC, config, seed,
ratio, the label ids used, the data (folder, image size, images per split) and the steps trained.

Nothing is written before the inputs are known good. A run in an `--output_dir` that holds checkpoints resumes them
only when they come from the same run (`run_signature.json`: data, label ratio, seed, starting point and recipe);
otherwise it stops with the fields that differ. `--start_fresh` deletes the old checkpoints and starts again. `--push_to_hub
--hub_model_id org/name` pushes the model with a model card filled from those results, to a private repo unless
`--hub_private_repo false`; only model files go (`modeling_refers.hub.upload`): per-image files only with
`--hub_include_predictions` / `--hub_include_label_ids`. Paths in `results.json` are relative to `--output_dir`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import EvalPrediction, HfArgumentParser, set_seed


from .trainer import (
    PRETRAINING_RECIPES,
    RESIZE_MODES,
    ImageLabelCollator,
    RefersTrainer,
    RefersTrainingArguments,
    processor_sizes,
    resume_checkpoint,
    write_run_signature,
)

from datasets import Image as ImageFeature
from PIL import Image

from datasets_scripts import (
    SAMPLE_DATA_DIR,
    TARGET_DATASETS,
    load_target_dataset,
    sample_label_ratio,
    select_by_ids,
)
from .. import RefersConfig, RefersForImageClassification, RefersImageProcessor
from ..metrics import multilabel_auc, roc_curve_png
from ..file_utils import atomic_open, atomic_write_text
from ..hub.model_card import dataset_display_name, make_model_card, save_model_card
from ..loading import from_pretrained_checked, load_timm_weights
from .run_signature import absolute, checkpoint_sha256, ids_sha256, prepared_data_fields, training_fields
from datasets_scripts.common import resolve_split_dir
from datasets_scripts.labelled_images import NAME as LABELLED_IMAGES
from datasets_scripts.prepared_images import load_prepared_dataset, read_prepared_metadata, warn_if_upscaled
from datasets_scripts.label_ratio import ID_FILE_FORMAT

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIRS = {
    "nih_chestxray14": SAMPLE_DATA_DIR / "nih_chestxray14_sample",
    "covid19": SAMPLE_DATA_DIR / "covid19_collection",
    "covid19_viral_bacterial": SAMPLE_DATA_DIR / "covid19_collection",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A REFERS checkpoint folder (pretraining, backbone or fine-tuned)."})
    timm_weights: str | None = field(
        default=None, metadata={"help": "A local timm ViT state dict (.pth/.safetensors), e.g. ImageNet ViT-B/16."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated RefersConfig changes for timm/random initialisation."})
    classifier_pooling: str | None = field(default=None, metadata={
        "choices": ["cls", "mean"],
        "help": "'cls' (the aggregation token; REFERS) or 'mean' (fc_norm of the mean patch token, the final "
                "LayerNorm dropped; MRM's fine-tuning). Default: the checkpoint's (cls for a new model)."})
    drop_path_rate: float | None = field(default=None, metadata={
        "help": "Stochastic depth of the last block, linear from 0 over the blocks (MRM's fine-tuning: 0.1). "
                "Default: the checkpoint's (0)."})
    classifier_initializer_range: float | None = field(default=None, metadata={
        "help": "Std of the new classifier's truncated-normal init (MRM's fine-tuning: 2e-5). Default: the "
                "config's initializer_range."})


@dataclass
class DataArguments:
    dataset_name: str = field(default="nih_chestxray14", metadata={"help": f"One of {sorted(TARGET_DATASETS)}."})
    data_dir: str | None = field(default=None, metadata={"help": "The data set as distributed (default: sample)."})
    split_dir: str | None = field(default=None, metadata={"help": "The paper's split lists (default: "
                                                                  "<data_dir>/../splits/<name>)."})
    prepared_data_dir: str | None = field(default=None, metadata={
        "help": "A folder written by examples/prepare_images.py for this --dataset_name: its images (decoded once, "
                "short side >= the resize) are read instead of --data_dir's originals."})
    label_ratio: float = field(default=1.0, metadata={"help": "Fraction of the training labels used, in (0, 1]."})
    label_ids_path: str | None = field(
        default=None, metadata={"help": "Re-use the training ids of an earlier run (its label_ids.json)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_predict_samples: int | None = field(default=None)
    resize: str = field(default="square", metadata={
        "help": "'square' resizes to 256 x 256 (the paper), 'shortest_edge' keeps the aspect ratio (the official "
                "fine-tuning code's transforms.Resize); then the 224 crop (sizes scale with image_size)."})
    start_fresh: bool = field(
        default=False, metadata={"help": "Delete the checkpoints of an earlier run in --output_dir and start again. "
                                         "Without it, a run in a folder that holds checkpoints of a run with other "
                                         "settings (data, label ratio, seed, starting point, recipe) is refused, and "
                                         "the same run is resumed."})
    # --dataset_name labelled_images (your own data; datasets_scripts/labelled_images.py): how to read --data_dir.
    labels_csv: str | None = field(default=None, metadata={
        "help": "labelled_images: the labels CSV, one row per image (default <data_dir>/labels.csv; a relative path "
                "not found as given is looked up in --data_dir). Without one, --data_dir may be a save_to_disk or "
                "imagefolder data set."})
    label_columns: list[str] | None = field(default=None, metadata={
        "help": "labelled_images: the label columns (several 0/1 columns: multi-label; one column of class names: "
                "multi-class); default every column but the image, id, patient and split columns."})
    problem_type: str | None = field(default=None, metadata={
        "help": "labelled_images: multi_label_classification or single_label_classification (default: inferred "
                "from the labels, and logged)."})
    image_column: str | None = field(default=None, metadata={"help": "labelled_images: the image path column."})
    split_column: str | None = field(default=None, metadata={
        "help": "labelled_images: the train/validation/test column (default 'split' when present; else a seeded "
                "patient-level split)."})
    patient_column: str | None = field(default=None, metadata={
        "help": "labelled_images: the patient id column (default 'patient_id' or 'patient'; else one per image)."})
    split_fractions: list[float] | None = field(default=None, metadata={
        "help": "labelled_images: train, validation and test fractions of the seeded split (default 0.7 0.1 0.2)."})
    split_seed: int | None = field(default=None, metadata={"help": "labelled_images: seed of that split (default 0)."})


@dataclass
class FinetuningArguments(RefersTrainingArguments):
    """TrainingArguments with the paper's fine-tuning defaults."""

    learning_rate: float = field(default=3e-3)
    sgd_momentum: float = field(default=0.9)
    optimizer: str = field(default="sgd", metadata={
        "help": "'sgd' (the paper's: momentum --sgd_momentum) or 'adamw' (AdamW (0.9, 0.999); what a randomly "
                "initialised ViT needs to learn in hundreds of steps)."})
    augment: bool = field(default=True, metadata={
        "help": "The pretraining augmentations in training (the paper's); --augment false trains on the evaluation "
                "transform (at a few hundred steps a small ViT learns several times faster without them)."})
    weight_decay: float = field(default=0.0)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=10_000 / 300_000, metadata={"help": "Ratio (<1) or steps."})
    max_grad_norm: float = field(
        default=10.0, metadata={"help": "Gradient clipping (global L2 norm). 10, as the official REFERS code "
                                        "(clip_grad_norm_ at args.max_grad_norm = 10); the paper does not say. "
                                        "Set here rather than inheriting the Trainer's 1.0."})
    per_device_train_batch_size: int = field(default=128)
    per_device_eval_batch_size: int = field(default=128)
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: str | None = field(default="mean_auc")
    greater_is_better: bool | None = field(default=True)
    hub_include_predictions: bool = field(default=False, metadata={
        "help": "--push_to_hub also uploads predictions.csv: the test labels and scores of every image (kept local "
                "by default)."})
    hub_include_label_ids: bool = field(default=False, metadata={
        "help": "--push_to_hub also uploads label_ids.json: the ids of the training images used (kept local by "
                "default)."})

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")


# TrainingArguments fields that decide what a fine-tuning run computes (and so whether a checkpoint can be resumed).
SIGNATURE_TRAINING_FIELDS = (
    "learning_rate", "sgd_momentum", "optimizer", "augment", "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "max_grad_norm", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "seed", "data_seed", "bf16", "fp16", "eval_strategy", "eval_steps", "metric_for_best_model", "greater_is_better",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Images in the full public releases, to say when the data used is a subset.
# Kermany: ChestXRay2017 has 5,856 images (5,232 train, 16 val, 624 test); copies without val/ hold 5,840.
FULL_RELEASE_IMAGES = {"nih_chestxray14": 112_120, "kermany_pneumonia": 5_856, "kermany_bacterial_viral": 5_856}


# DataArguments that only --dataset_name labelled_images reads (passed to its loader when given).
OWN_DATA_OPTIONS = ("labels_csv", "label_columns", "problem_type", "image_column", "split_column", "patient_column",
                    "split_fractions", "split_seed")


def own_data_options(data_args: DataArguments) -> dict:
    """The labelled_images loader's options that were given; ValueError naming them for another --dataset_name."""
    given = {name: getattr(data_args, name) for name in OWN_DATA_OPTIONS if getattr(data_args, name) is not None}
    if given and data_args.dataset_name != LABELLED_IMAGES:
        raise ValueError(f"{', '.join('--' + name for name in given)} only apply to --dataset_name {LABELLED_IMAGES} "
                         f"(your own labelled images), not {data_args.dataset_name!r}")
    return given


def initialisation(model_args: ModelArguments) -> str:
    if model_args.model_name_or_path and model_args.timm_weights:
        raise ValueError("Pass --model_name_or_path (a REFERS checkpoint) or --timm_weights, not both.")
    return "refers" if model_args.model_name_or_path else "timm" if model_args.timm_weights else "random"


def is_hub_id(text: str) -> bool:
    """`name` or `org/name` with Hub characters only (a relative path like `runs/pretrain` has the same form)."""
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text


def check_model_arguments(model_args: ModelArguments) -> str:
    """Refuse a starting point that cannot exist, naming the argument and the path, before anything is read or
    written. Returns the initialisation (`refers`, `timm` or `random`)."""
    init = initialisation(model_args)
    path = model_args.model_name_or_path
    if path:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(
                    f"--model_name_or_path {path!r} is a folder without config.json; expected a REFERS checkpoint "
                    "folder (config.json + model.safetensors), e.g. the --output_dir of run_pretrain.py")
        elif os.path.exists(path):
            raise ValueError(f"--model_name_or_path {path!r} is a file; expected a REFERS checkpoint folder "
                             "(config.json + model.safetensors) or a Hub model id")
        elif not is_hub_id(path):
            raise FileNotFoundError(
                f"--model_name_or_path {path!r}: no such folder ({os.path.abspath(path)}); expected a REFERS "
                "checkpoint folder (config.json + model.safetensors) or a Hub model id 'org/name'")
    if model_args.timm_weights and not os.path.isfile(model_args.timm_weights):
        raise FileNotFoundError(f"--timm_weights {model_args.timm_weights!r}: no such file; expected a timm ViT "
                                "state dict (.pth/.bin/.safetensors)")
    return init


def classifier_options(model_args: ModelArguments) -> dict:
    """The classifier's pooling / stochastic depth / head-init flags that were given (they override any config)."""
    names = ("classifier_pooling", "drop_path_rate", "classifier_initializer_range")
    options = {name: getattr(model_args, name) for name in names if getattr(model_args, name, None) is not None}
    if options.get("classifier_pooling", "cls") not in ("cls", "mean"):
        raise ValueError(f"--classifier_pooling must be 'cls' or 'mean', got {options['classifier_pooling']!r}")
    if not 0.0 <= options.get("drop_path_rate", 0.0) < 1.0:
        raise ValueError(f"--drop_path_rate must be in [0, 1), got {options['drop_path_rate']!r}")
    if options.get("classifier_initializer_range", 1.0) <= 0:
        raise ValueError(f"--classifier_initializer_range must be > 0, got {options['classifier_initializer_range']!r}")
    return options


def build_model(model_args: ModelArguments, label_kwargs: dict) -> RefersForImageClassification:
    init = check_model_arguments(model_args)
    label_kwargs = {**label_kwargs, **classifier_options(model_args)}
    if init == "refers":
        path = model_args.model_name_or_path
        try:
            model, report = from_pretrained_checked(RefersForImageClassification, path, **label_kwargs)
        except OSError as err:
            if os.path.isdir(path):
                raise
            raise FileNotFoundError(
                f"--model_name_or_path {path!r}: no such folder ({os.path.abspath(path)}), and loading it as a Hub "
                f"model id failed too ({type(err).__name__}: {str(err)[:300]})") from err
        logger.info(f"Initialised from {path}: {report}")
        return model
    config = RefersConfig(**label_kwargs)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    for name, value in classifier_options(model_args).items():  # the flags win over --config_overrides
        setattr(config, name, value)
    config.check_architecture()
    model = RefersForImageClassification(config)
    if init == "timm":
        logger.info(str(load_timm_weights(model, model_args.timm_weights)))
    return model


def starting_point_name(model_args: ModelArguments) -> str | None:
    """The starting checkpoint by name, never a local path: a folder's (or file's) basename, or the Hub id."""
    path = model_args.model_name_or_path or model_args.timm_weights
    if not path:
        return None
    if os.path.exists(path):
        return os.path.basename(os.path.normpath(path))
    return path


def starting_point_signature(model_args: ModelArguments) -> dict:
    """Where the weights come from, by absolute path (or Hub id) and by content, so that a rewritten starting
    checkpoint counts as another starting point."""
    path = model_args.model_name_or_path
    if path:  # a local folder by absolute path and content, a Hub id by name (no local bytes: model_sha256 None)
        return {"model_name_or_path": absolute(path) if os.path.exists(path) else path,
                "model_sha256": checkpoint_sha256(path)}
    if model_args.timm_weights:
        return {"timm_weights": absolute(model_args.timm_weights),
                "timm_weights_sha256": checkpoint_sha256(model_args.timm_weights)}
    return {}


def run_signature(model_args, data_args, training_args, init, data_dir, split_dir, train_set, eval_set,
                  test_set) -> dict:
    """Everything that decides what this run computes; a run in the same --output_dir resumes only when it matches."""
    train_ids = list(train_set.with_format(None, columns=["image_id"])["image_id"])
    signature = {
        "script": "run_finetune",
        "dataset_name": data_args.dataset_name,
        "data_dir": absolute(data_dir),
        "split_dir": absolute(split_dir),
        "label_ratio": data_args.label_ratio,
        "resize": data_args.resize,
        **prepared_data_fields(data_args.prepared_data_dir),
        "label_ids_path": absolute(data_args.label_ids_path),
        **({"data_options": own_data_options(data_args)} if own_data_options(data_args) else {}),
        "train_ids_sha256": ids_sha256(train_ids),
        "num_train_images": len(train_set),
        "num_eval_images": len(eval_set),
        "num_test_images": len(test_set),
        "init": init,
        "config_overrides": model_args.config_overrides if init != "refers" else None,
        **({"classifier_options": classifier_options(model_args)} if classifier_options(model_args) else {}),
        "world_size": training_args.world_size,
        **starting_point_signature(model_args),
        **training_fields(training_args, SIGNATURE_TRAINING_FIELDS),
    }
    return signature


def image_size_text(dataset) -> str:
    """The pixel size of a split's images, read from the files' (or embedded bytes') headers (e.g. "64x64 px")."""
    rows = dataset.cast_column("image", ImageFeature(decode=False)).with_format(None, columns=["image"])["image"]
    sizes = set()
    for row in rows:
        source = io.BytesIO(row["bytes"]) if row.get("bytes") else row.get("path")
        if source is None:
            continue
        with Image.open(source) as image:
            sizes.add(image.size)
    if not sizes:
        return "unknown size"
    if len(sizes) == 1:
        (width, height), = sizes
        return f"{width}x{height} px"
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    shorter = [min(w, h) for w, h in sizes]
    return (f"{min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px (shorter side "
            f"{min(shorter)}-{max(shorter)} px)")


def describe_data(spec, data_dir, full, train_set, eval_set, test_set) -> dict:
    """What the run was trained and evaluated on, derived from the data actually used (for results.json and the
    model card): the data set's name, its folder's name (no local path), the images per split and their size."""
    total = sum(len(full[split]) for split in ("train", "validation", "test"))
    release = FULL_RELEASE_IMAGES.get(spec.name)
    test_size = image_size_text(test_set)
    text = f"{dataset_display_name(spec.name)}, folder `{os.path.basename(os.path.normpath(str(data_dir)))}`"
    if release and total < release:
        text += f" (a {total:,}-image subset of the {release:,}-image release)"
    n_test, n_split = len(test_set), len(full["test"])
    text += (f", {test_size}: test split of {n_test} images" if n_test == n_split
             else f", {test_size}: the first {n_test} of the test split's {n_split} images")
    return {
        "name": dataset_display_name(spec.name),
        "folder": os.path.basename(os.path.normpath(str(data_dir))),
        "total_images": total,
        "split_images": {split: len(full[split]) for split in ("train", "validation", "test")},
        "used_images": {"train": len(train_set), "validation": len(eval_set), "test": len(test_set)},
        "test_image_size": test_size,
        "test_set": text,
    }


def scores_from_logits(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Probabilities: sigmoid per class (multi-label) or softmax over classes (single-label). `logits` may be the
    Trainer's tuple of output fields (`logits`, `view_weights`): the first is the logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return (logits.sigmoid() if problem_type == "multi_label_classification" else logits.softmax(-1)).numpy()


def make_compute_metrics(spec):
    def compute_metrics(prediction: EvalPrediction) -> dict:
        scores = scores_from_logits(prediction.predictions, spec.problem_type)
        auc = multilabel_auc(prediction.label_ids, scores, list(spec.label_names))
        metrics = {"mean_auc": float("nan") if auc["mean_auc"] is None else auc["mean_auc"]}
        metrics.update({f"auc_{name}": value for name, value in auc["per_class"].items() if value is not None})
        return metrics

    return compute_metrics


def first(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def write_predictions(path: str, ids, references, scores, label_names) -> None:
    references = np.asarray(references)
    if references.ndim == 1:  # class ids -> one-hot
        references = np.eye(len(label_names), dtype=int)[references]
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", *[f"score_{n}" for n in label_names], *[f"label_{n}" for n in label_names]])
        for image_id, score, label in zip(ids, scores, references):
            writer.writerow([image_id, *[f"{s:.9g}" for s in score], *[int(v) for v in label]])


def write_label_ids(path: str, train_set, full_train, ratio: float, seed: int) -> None:
    """The chosen training ids, in the format of `sample_label_ratio(output_path=...)` (`--label_ids_path` reads it)."""
    ids = list(train_set.with_format(None, columns=["image_id"])["image_id"])
    atomic_write_text(path, json.dumps({
        "format": ID_FILE_FORMAT, "ratio": float(ratio), "seed": int(seed), "label_column": "labels",
        "id_column": "image_id", "num_rows_full": len(full_train), "ids": ids}, indent=1) + "\n")


# Outputs of an earlier run that --start_fresh deletes with its checkpoints, so none is mistaken for the new run's.
STALE_OUTPUTS = ("results.json", "predictions.csv", "roc_curve.png")


def locate_data(data_args: DataArguments):
    """The target data set's registry entry, its rows when `--prepared_data_dir` holds them (else None: loaded after
    the model arguments are checked) and its source folder; bad arguments raise before anything is read."""
    if not 0.0 < data_args.label_ratio <= 1.0:
        raise ValueError(f"--label_ratio must be in (0, 1], got {data_args.label_ratio}")
    if data_args.resize not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {RESIZE_MODES}, got {data_args.resize!r}")
    if data_args.dataset_name not in TARGET_DATASETS:
        raise ValueError(f"unknown --dataset_name {data_args.dataset_name!r}; valid: {', '.join(sorted(TARGET_DATASETS))}")
    spec = TARGET_DATASETS[data_args.dataset_name]
    own_data_options(data_args)  # refuses the labelled_images options for another data set
    if data_args.prepared_data_dir:
        data = load_prepared_dataset(data_args.prepared_data_dir, dataset_name=spec.name)
        data_dir = (data_args.data_dir or read_prepared_metadata(data_args.prepared_data_dir)["source"].get("data_dir")
                    or data_args.prepared_data_dir)
        return spec, data, data_dir
    data_dir = data_args.data_dir or DEFAULT_DATA_DIRS.get(spec.name)
    if data_dir is None:
        raise ValueError(f"--data_dir is required for {spec.name} (no sample of it ships with refers)")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {str(data_dir)!r}: no such folder; expected {spec.name} as distributed")
    return spec, None, data_dir


def select_splits(data, spec, data_args: DataArguments, training_args: FinetuningArguments):
    """(training ids file, training rows at --label_ratio or from --label_ids_path, validation rows, test rows), each
    cut to its --max_*_samples."""
    full_train = data["train"]
    ids_path = data_args.label_ids_path or os.path.join(training_args.output_dir, "label_ids.json")
    if data_args.label_ids_path:
        train_set = select_by_ids(full_train, data_args.label_ids_path)
    else:  # deterministic per seed; the chosen ids are written (by main) so the run can be repeated exactly
        train_set = sample_label_ratio(full_train, data_args.label_ratio, training_args.seed,
                                       label_names=list(spec.label_names))
    train_set = first(train_set, data_args.max_train_samples)
    eval_set = first(data["validation"], data_args.max_eval_samples)
    test_set = first(data["test"], data_args.max_predict_samples)
    logger.info(f"{spec.name}: {len(train_set)} training images (ratio {data_args.label_ratio}), "
                f"{len(eval_set)} validation, {len(test_set)} test")
    return ids_path, train_set, eval_set, test_set


def resume_or_start(training_args: FinetuningArguments, data_args: DataArguments, signature: dict) -> str | None:
    """The checkpoint to resume from (None: a new run), after `resume_checkpoint` refused (writing nothing) an
    --output_dir holding checkpoints of another run; --start_fresh also deletes the earlier run's outputs."""
    if not training_args.do_train:
        return None
    checkpoint = resume_checkpoint(training_args, signature=signature, start_fresh=data_args.start_fresh)
    if data_args.start_fresh and training_args.should_save:
        for name in STALE_OUTPUTS:
            stale = os.path.join(training_args.output_dir, name)
            if os.path.isfile(stale):
                os.remove(stale)
    return checkpoint


def build_trainer(model, spec, data_args: DataArguments, training_args: FinetuningArguments, train_set, eval_set):
    """The image processor for the model's size and --resize, and the RefersTrainer (augmenting training collator,
    plain evaluation collator, mean-AUC metrics)."""
    sizes = processor_sizes(model.config.image_size, data_args.resize)
    warn_if_upscaled(data_args.prepared_data_dir, sizes["size"])
    image_processor = RefersImageProcessor(**sizes)
    trainer = RefersTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=ImageLabelCollator(image_processor, train=training_args.augment),
        eval_data_collator=ImageLabelCollator(image_processor, train=False),
        processing_class=image_processor,
        compute_metrics=make_compute_metrics(spec),
        sgd_momentum=training_args.sgd_momentum,
        optimizer_name=training_args.optimizer,
        adam_betas=PRETRAINING_RECIPES["adamw"]["adam_betas"],  # the same AdamW as pretraining's --recipe adamw
    )
    return trainer, image_processor


def training_summary(training_args: FinetuningArguments, state) -> dict:
    """results.json's "training": how far the run went and with which optimization settings."""
    return {
        "global_step": state.global_step if training_args.do_train else 0,
        "epochs": round(float(state.epoch or 0.0), 4) if training_args.do_train else 0.0,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value",
                                         training_args.lr_scheduler_type)),
        "warmup_steps": training_args.warmup_steps,
        "sgd_momentum": training_args.sgd_momentum,
        "weight_decay": training_args.weight_decay,
        "max_grad_norm": training_args.max_grad_norm,
        "best_step": best_step(state.best_model_checkpoint),
    }


def collect_results(spec, model_args, data_args, training_args, init, auc, validation, model, state, train_set,
                    data_description, ids_path) -> dict:
    """results.json: test AUCs, the validation mean AUC, where the run started from, its data and training."""
    start_path = model_args.model_name_or_path or model_args.timm_weights
    return {
        "dataset": spec.name,
        "label_names": list(spec.label_names),
        "per_class_auc": auc["per_class"],
        "mean_auc": auc["mean_auc"],
        "undefined_classes": auc["undefined"],
        "validation_mean_auc": validation.get("eval_mean_auc"),
        "label_ratio": data_args.label_ratio,
        "seed": training_args.seed,
        "init": init,
        "init_from": starting_point_name(model_args),
        "init_from_path": (relative_to_output(start_path, training_args.output_dir)
                           if starting_point_name(model_args) and os.path.exists(start_path) else None),
        "num_train_images": len(train_set),
        "data": data_description,
        "training": training_summary(training_args, state),
        "best_checkpoint": relative_to_output(state.best_model_checkpoint, training_args.output_dir),
        "config": {key: value for key, value in model.config.to_dict().items()
                   if (isinstance(value, (int, float, str, bool)) or value is None)
                   and not key.startswith("_") and key != "transformers_version"},
        "label_ids_path": (relative_to_output(ids_path, training_args.output_dir) if os.path.exists(ids_path)
                           else None),
    }


def write_outputs(trainer, results: dict, spec, model_args, training_args, test_set, prediction, scores) -> None:
    """On the main process: results.json, with --do_predict the test predictions and ROC curve, after training the
    model card (also what a push uploads)."""
    if not trainer.is_world_process_zero():
        return
    atomic_write_text(os.path.join(training_args.output_dir, "results.json"), json.dumps(results, indent=2))
    if training_args.do_predict:
        write_predictions(os.path.join(training_args.output_dir, "predictions.csv"), test_set["image_id"],
                          prediction.label_ids, scores, spec.label_names)
        roc_curve_png(prediction.label_ids, scores, list(spec.label_names),
                      os.path.join(training_args.output_dir, "roc_curve.png"),
                      title=f"{spec.name}: test ROC (mean AUC {results['mean_auc'] or float('nan'):.3f})")
    if training_args.do_train:
        card = make_model_card(
            results, model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
            base_model=model_args.model_name_or_path if model_args.model_name_or_path and
            is_hub_id(model_args.model_name_or_path) and not os.path.exists(model_args.model_name_or_path)
            else None,
            datasets=[spec.name], repo_id=training_args.hub_model_id)  # the data licence: from the registry
        save_model_card(card, os.path.join(training_args.output_dir, "README.md"))
        trainer.model_card = card


def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuningArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # Inputs first: nothing is written into --output_dir before they are known good.
    spec, data, data_dir = locate_data(data_args)
    init = check_model_arguments(model_args)
    set_seed(training_args.seed)
    if data is None:
        data = load_target_dataset(spec.name, data_dir, split_dir=data_args.split_dir, **own_data_options(data_args))
    spec = spec.with_labels_of(data["train"])  # labelled_images: label names and problem type from the data
    ids_path, train_set, eval_set, test_set = select_splits(data, spec, data_args, training_args)

    label_kwargs = dict(
        num_labels=spec.num_labels, problem_type=spec.problem_type,
        id2label=dict(enumerate(spec.label_names)), label2id={n: i for i, n in enumerate(spec.label_names)},
    )
    model = build_model(model_args, label_kwargs)
    split_dir = data_args.split_dir or resolve_split_dir(data_dir, None, spec.default_split_dir)
    signature = run_signature(model_args, data_args, training_args, init, data_dir,
                              split_dir if os.path.isdir(split_dir) else None, train_set, eval_set, test_set)
    data_description = describe_data(spec, data_dir, data, train_set, eval_set, test_set)
    checkpoint = resume_or_start(training_args, data_args, signature)

    # From here on the inputs are known good.
    os.makedirs(training_args.output_dir, exist_ok=True)
    if training_args.do_train:
        write_run_signature(training_args, signature)
    if not data_args.label_ids_path and training_args.should_save:
        write_label_ids(ids_path, train_set, data["train"], data_args.label_ratio, training_args.seed)

    trainer, image_processor = build_trainer(model, spec, data_args, training_args, train_set, eval_set)
    if training_args.do_train:
        trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if training_args.should_save:  # one writer under several processes
            image_processor.save_pretrained(training_args.output_dir)
    # The model now holds the checkpoint with the best validation mean AUC (load_best_model_at_end): evaluate it.
    validation = trainer.evaluate(eval_set, metric_key_prefix="eval")
    prediction = trainer.predict(test_set, metric_key_prefix="test")
    scores = scores_from_logits(prediction.predictions, spec.problem_type)
    auc = multilabel_auc(prediction.label_ids, scores, list(spec.label_names))
    results = collect_results(spec, model_args, data_args, training_args, init, auc, validation, model,
                              trainer.state, train_set, data_description, ids_path)
    write_outputs(trainer, results, spec, model_args, training_args, test_set, prediction, scores)
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(commit_message=f"REFERS fine-tuned on {spec.name} (mean AUC {results['mean_auc']})")
    return results


def relative_to_output(path: str | None, output_dir: str) -> str | None:
    """`path` relative to `--output_dir` (results.json holds no absolute local path), or None."""
    if not path:
        return None
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))
    except ValueError:  # another drive (Windows): no relative path
        return None


def best_step(checkpoint: str | None) -> int | None:
    """The step of a `checkpoint-<step>` folder."""
    match = re.search(r"checkpoint-(\d+)$", os.path.normpath(checkpoint)) if checkpoint else None
    return int(match.group(1)) if match else None


if __name__ == "__main__":
    main()
