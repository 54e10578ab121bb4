#!/usr/bin/env python
"""Zero-shot classification with a REFERS pretraining checkpoint (no labels, no fine-tuning), scored by ROC-AUC.

    python examples/run_zero_shot.py --model_name_or_path runs/pretrain --dataset_name nih_chestxray14 \
        --output_dir runs/zero-shot-nih

Per class, a positive and a negative sentence (the data set's `zero_shot_prompts` on its
`datasets_scripts.TARGET_DATASETS` entry, or your own `--prompts_file`, in the form of the `prompts.json` this script
writes) are encoded by the report encoder and compared with the study embedding; the class probability is
CheXzero's softmax over the pair. Writes `results.json` (per-class and mean AUC, prompts), `prompts.json`,
`predictions.csv`, `roc_curve.png`, `auc_bars.png` and `examples.png` (radiographs with their true labels and top zero-shot probabilities).

The same model runs in transformers' pipeline:
    import modeling_refers.tasks.zero_shot; from transformers import pipeline
    pipe = pipeline("zero-shot-image-classification", model="runs/pretrain")
    pipe("image.png", candidate_labels=["There is cardiomegaly.", "There is no cardiomegaly."], hypothesis_template="{}")
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os

import numpy as np


from datasets_scripts import TARGET_DATASETS, load_target_dataset
from modeling_refers.tasks.common import load_pretraining_folder
from modeling_refers.metrics import multilabel_auc, roc_curve_png
from modeling_refers.file_utils import atomic_write_text
from modeling_refers.training.finetuning import DEFAULT_DATA_DIRS  # the sample each target data set defaults to
from modeling_refers.tasks.zero_shot import (
    auc_bars_png,
    load_prompts,
    prompts_to_json,
    zero_shot_classify,
    zero_shot_examples_png,
)

logger = logging.getLogger(__name__)



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A run_pretrain.py output folder.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset_name", default="nih_chestxray14", choices=sorted(TARGET_DATASETS))
    parser.add_argument("--data_dir", default=None, help="The data set as distributed (default: the sample).")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--prompts_file", default=None, help="JSON {label: {positive, negative}} (default: built in).")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_examples", type=int, default=8, help="Radiographs drawn in examples.png.")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        if args.dataset_name not in DEFAULT_DATA_DIRS:
            parser.error(f"--data_dir is needed for {args.dataset_name} (no sample is shipped)")
        args.data_dir = str(DEFAULT_DATA_DIRS[args.dataset_name])
    return args


def truth_names(label, label_names) -> list[str]:
    if isinstance(label, (list, tuple, np.ndarray)):
        return [n for n, v in zip(label_names, label) if v]
    return [label_names[int(label)]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    spec = TARGET_DATASETS[args.dataset_name]
    prompts = load_prompts(args.prompts_file, spec.label_names, args.dataset_name)
    model, processor, _ = load_pretraining_folder(args.model_name_or_path, need_text_encoder=True)
    rows = load_target_dataset(args.dataset_name, args.data_dir)[args.split]
    if args.max_samples:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    if len(rows) == 0:
        raise ValueError(f"--split {args.split} of {args.dataset_name} at {args.data_dir} has no images")
    images, labels, ids = rows["image"], rows["labels"], rows["image_id"]
    out = zero_shot_classify(model, processor, images, prompts, batch_size=args.batch_size)
    scores = out.scores.numpy()
    auc = multilabel_auc(np.asarray(labels), scores, spec.label_names)

    os.makedirs(args.output_dir, exist_ok=True)
    title = f"Zero-shot, {len(rows)} {args.split} images of {args.dataset_name}"
    roc_curve_png(np.asarray(labels), scores, spec.label_names, os.path.join(args.output_dir, "roc_curve.png"),
                  title=title + (f" (mean AUC {auc['mean_auc']:.3f})" if auc["mean_auc"] is not None else ""))
    truths = [truth_names(x, spec.label_names) for x in labels]
    positives = {n: sum(n in t for t in truths) for n in spec.label_names}
    auc_bars_png(auc["per_class"], os.path.join(args.output_dir, "auc_bars.png"), title=title, positives=positives)
    shown = min(args.num_examples, len(rows))
    zero_shot_examples_png(images[:shown], scores[:shown], spec.label_names, truths[:shown],
                           os.path.join(args.output_dir, "examples.png"))
    atomic_write_text(os.path.join(args.output_dir, "prompts.json"), prompts_to_json(prompts))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_id", *[f"score_{n}" for n in spec.label_names], "labels"])
    for image_id, row, label in zip(ids, scores, labels):
        writer.writerow([image_id, *[repr(float(v)) for v in row], "|".join(truth_names(label, spec.label_names))])
    atomic_write_text(os.path.join(args.output_dir, "predictions.csv"), buffer.getvalue())
    results = {
        "model": os.path.abspath(args.model_name_or_path), "dataset": args.dataset_name,
        "data_dir": os.path.abspath(args.data_dir), "split": args.split, "num_images": len(rows),
        "mean_auc": auc["mean_auc"], "per_class_auc": auc["per_class"], "undefined_classes": auc["undefined"],
        "positives": positives,
        "prompts": {k: {"positive": p, "negative": n} for k, (p, n) in prompts.items()},
        "temperature": model.config.contrastive_temperature,
    }
    atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    logger.info("%s: mean AUC %s", title, auc["mean_auc"])
    return results


if __name__ == "__main__":
    main()
