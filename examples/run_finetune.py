#!/usr/bin/env python
"""Fine-tune a REFERS radiograph transformer on a labelled target data set with 1%, 10% or 100% of the labels.

    python examples/run_finetune.py --dataset_name nih_chestxray14 --data_dir /data/nih \
        --model_name_or_path runs/pretrain --label_ratio 0.01 --seed 0 --output_dir runs/nih-1pct --do_train --do_predict

Initialisation (`init` in results.json): a REFERS checkpoint folder (`--model_name_or_path`, a pretraining or
fine-tuning checkpoint; only the classifier head is new), a local timm ViT state dict (`--timm_weights`, e.g. an
ImageNet ViT-B/16 you downloaded), or random (neither). The paper's recipe is the default: SGD momentum 0.9, lr 3e-3,
linear warm-up then cosine decay, batch 128, the pretraining augmentations; BCE for multi-label, cross entropy for
single-label data sets. The checkpoint with the best validation mean AUC is kept and evaluated on test, and
`results.json` records per-class AUC, mean AUC, config, seed, ratio and the label ids used. `--push_to_hub
--hub_model_id org/name` pushes the model with a model card filled from those results.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import EvalPrediction, HfArgumentParser, TrainingArguments, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from modeling_refers.training_refers import ImageLabelCollator, RefersTrainer, processor_sizes, resume_checkpoint  # noqa: E402

from datasets_scripts import (  # noqa: E402
    SAMPLE_DATA_DIR,
    TARGET_DATASETS,
    load_target_dataset,
    sample_label_ratio,
    select_by_ids,
)
from modeling_refers import RefersConfig, RefersForImageClassification, RefersImageProcessor  # noqa: E402
from modeling_refers.evaluation import multilabel_auc, roc_curve_png  # noqa: E402
from modeling_refers.file_utils import atomic_open, atomic_write_text  # noqa: E402
from modeling_refers.model_card import make_model_card, save_model_card  # noqa: E402

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


@dataclass
class DataArguments:
    dataset_name: str = field(default="nih_chestxray14", metadata={"help": f"One of {sorted(TARGET_DATASETS)}."})
    data_dir: str | None = field(default=None, metadata={"help": "The data set as distributed (default: sample)."})
    split_dir: str | None = field(default=None, metadata={"help": "The paper's split lists (default: "
                                                                  "<data_dir>/../splits/<name>)."})
    label_ratio: float = field(default=1.0, metadata={"help": "Fraction of the training labels used, in (0, 1]."})
    label_ids_path: str | None = field(
        default=None, metadata={"help": "Re-use the training ids of an earlier run (its label_ids.json)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_predict_samples: int | None = field(default=None)


@dataclass
class FinetuningArguments(TrainingArguments):
    """TrainingArguments with the paper's fine-tuning defaults."""

    learning_rate: float = field(default=3e-3)
    sgd_momentum: float = field(default=0.9)
    weight_decay: float = field(default=0.0)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=10_000 / 300_000, metadata={"help": "Ratio (<1) or steps."})
    per_device_train_batch_size: int = field(default=128)
    per_device_eval_batch_size: int = field(default=128)
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: str | None = field(default="mean_auc")
    greater_is_better: bool | None = field(default=True)
    remove_unused_columns: bool = field(default=False)
    report_to: None | str | list[str] = field(default="none")
    logging_steps: float = field(default=10)


def initialisation(model_args: ModelArguments) -> str:
    if model_args.model_name_or_path and model_args.timm_weights:
        raise ValueError("Pass --model_name_or_path (a REFERS checkpoint) or --timm_weights, not both.")
    return "refers" if model_args.model_name_or_path else "timm" if model_args.timm_weights else "random"


def build_model(model_args: ModelArguments, label_kwargs: dict) -> RefersForImageClassification:
    init = initialisation(model_args)
    if init == "refers":
        model, report = RefersForImageClassification.from_pretrained_checked(
            model_args.model_name_or_path, **label_kwargs)
        logger.info(f"Initialised from {model_args.model_name_or_path}: {report}")
        return model
    config = RefersConfig(**label_kwargs)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        config.check_architecture()
    model = RefersForImageClassification(config)
    if init == "timm":
        logger.info(str(model.load_timm_vit_weights(model_args.timm_weights)))
    return model


def scores_from_logits(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Probabilities: sigmoid per class (multi-label) or softmax over classes (single-label)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
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


def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuningArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    if not 0.0 < data_args.label_ratio <= 1.0:
        raise ValueError(f"--label_ratio must be in (0, 1], got {data_args.label_ratio}")
    if data_args.dataset_name not in TARGET_DATASETS:
        raise ValueError(f"unknown --dataset_name {data_args.dataset_name!r}; valid: {', '.join(sorted(TARGET_DATASETS))}")
    spec = TARGET_DATASETS[data_args.dataset_name]
    data_dir = data_args.data_dir or DEFAULT_DATA_DIRS.get(spec.name)
    if data_dir is None:
        raise ValueError(f"--data_dir is required for {spec.name} (no sample of it ships with refers)")
    set_seed(training_args.seed)
    os.makedirs(training_args.output_dir, exist_ok=True)

    data = load_target_dataset(spec.name, data_dir, split_dir=data_args.split_dir)
    train_set, eval_set, test_set = data["train"], data["validation"], data["test"]
    ids_path = data_args.label_ids_path or os.path.join(training_args.output_dir, "label_ids.json")
    if data_args.label_ids_path:
        train_set = select_by_ids(train_set, data_args.label_ids_path)
    else:  # deterministic per seed; the chosen ids are written so the run can be repeated exactly
        train_set = sample_label_ratio(train_set, data_args.label_ratio, training_args.seed, output_path=ids_path,
                                       label_names=list(spec.label_names))
    train_set = first(train_set, data_args.max_train_samples)
    eval_set = first(eval_set, data_args.max_eval_samples)
    test_set = first(test_set, data_args.max_predict_samples)
    logger.info(f"{spec.name}: {len(train_set)} training images (ratio {data_args.label_ratio}), "
                f"{len(eval_set)} validation, {len(test_set)} test")

    label_kwargs = dict(
        num_labels=spec.num_labels, problem_type=spec.problem_type,
        id2label=dict(enumerate(spec.label_names)), label2id={n: i for i, n in enumerate(spec.label_names)},
    )
    model = build_model(model_args, label_kwargs)
    image_processor = RefersImageProcessor(**processor_sizes(model.config.image_size))
    trainer = RefersTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=ImageLabelCollator(image_processor, train=True),
        eval_data_collator=ImageLabelCollator(image_processor, train=False),
        processing_class=image_processor,
        compute_metrics=make_compute_metrics(spec),
        sgd_momentum=training_args.sgd_momentum,
    )

    if training_args.do_train:
        trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
        trainer.save_model()
        image_processor.save_pretrained(training_args.output_dir)
    validation = trainer.evaluate(eval_set, metric_key_prefix="eval")
    prediction = trainer.predict(test_set, metric_key_prefix="test")
    scores = scores_from_logits(prediction.predictions, spec.problem_type)
    auc = multilabel_auc(prediction.label_ids, scores, list(spec.label_names))
    results = {
        "dataset": spec.name,
        "label_names": list(spec.label_names),
        "per_class_auc": auc["per_class"],
        "mean_auc": auc["mean_auc"],
        "undefined_classes": auc["undefined"],
        "validation_mean_auc": validation.get("eval_mean_auc"),
        "label_ratio": data_args.label_ratio,
        "seed": training_args.seed,
        "init": initialisation(model_args),
        "init_from": model_args.model_name_or_path or model_args.timm_weights,
        "num_train_images": len(train_set),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "config": {key: value for key, value in model.config.to_dict().items()
                   if isinstance(value, (int, float, str, bool)) or value is None},
        "label_ids_path": os.path.abspath(ids_path) if os.path.exists(ids_path) else None,
    }
    if trainer.is_world_process_zero():
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
                "/" in model_args.model_name_or_path and not os.path.isdir(model_args.model_name_or_path) else None,
                datasets=[spec.name], repo_id=training_args.hub_model_id)
            save_model_card(card, os.path.join(training_args.output_dir, "README.md"))
            trainer.model_card = card
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(commit_message=f"REFERS fine-tuned on {spec.name} (mean AUC {results['mean_auc']})")
    return results


if __name__ == "__main__":
    main()
