#!/usr/bin/env python
"""Class activation maps of a fine-tuned REFERS classifier, turned into boxes and scored against radiologists' boxes.

    python examples/run_explain.py --model_name_or_path runs/finetune-nih \
        --data_dir ../shared/data/nih_chestxray14_sample --output_dir runs/explain

For every image with ground-truth boxes and every labelled finding on it, each `--methods` map (Grad-CAM from
pytorch-grad-cam on the last transformer block; the aggregation token's attention, last layer or rolled out) is
normalized to [0, 1], thresholded at `--threshold`, split into connected components and boxed (the paper's
procedure); each radiologist box gets the IoU of the best box from the map. The radiograph is resized whole to the
model's input, so every box maps by a plain scale.

Ground truth: NIH's `BBox_List_2017.csv` (in `--data_dir`, or `--bbox_file`; 984 boxes on 880 images in the full
release, 9 on the 64-px sample) or VinBigData's per-radiologist boxes (`--dataset_name vinbigdata`, `train.csv`).
Writes `results.json` (mean IoU, share of boxes with IoU > 0.5 and > 0.3, per method and per class), `boxes.jsonl`,
`overlays/<method>/<image>_<label>.png` (radiograph, heat map, predicted and true boxes), `explanations_<method>.png`
(a contact sheet) and `iou.png` (the IoU distribution).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path


from datasets_scripts.nih_chestxray14 import BBOX_FILE, index_images, load_nih_bounding_boxes
from datasets_scripts.vinbigdata import load_vinbigdata
from modeling_refers import RefersForImageClassification, RefersImageProcessor
from modeling_refers.tasks.common import check_model_folder
from modeling_refers.tasks.explanations import (
    ATTENTION_METHODS,
    CAM_METHODS,
    explanation_grid_png,
    explanation_png,
    iou_histogram_png,
    localise,
    summarise_localisation,
)
from modeling_refers.file_utils import atomic_write_text

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A fine-tuned classifier (run_finetune.py).")
    parser.add_argument("--data_dir", required=True, help="NIH folder with images/ and BBox_List_2017.csv, or the "
                                                          "VinBigData folder with train.csv.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset_name", default="nih_chestxray14", choices=("nih_chestxray14", "vinbigdata"))
    parser.add_argument("--bbox_file", default=None, help=f"NIH only: the box table (default: <data_dir>/{BBOX_FILE}).")
    parser.add_argument("--methods", nargs="+", default=["gradcam", "attention"],
                        choices=CAM_METHODS + ATTENTION_METHODS)
    parser.add_argument("--threshold", type=float, default=0.5, help="On the map normalized to [0, 1].")
    parser.add_argument("--max_images", type=int, default=None, help="Only the first N images with boxes.")
    parser.add_argument("--max_overlays", type=int, default=200, help="Overlay PNGs written per method.")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}")
    return args


def boxed_images(args) -> tuple[list[str], list[str], list[list[dict]]]:
    """(image ids, image paths, boxes per image) of every image with at least one box."""
    if args.dataset_name == "nih_chestxray14":
        boxes = load_nih_bounding_boxes(args.data_dir, args.bbox_file)
        paths = index_images(Path(args.data_dir).absolute())
        ids = list(boxes)
        return ids, [str(paths[i]) for i in ids], [boxes[i] for i in ids]
    data = load_vinbigdata(args.data_dir, with_boxes=True)
    ids, paths, boxes = [], [], []
    for split in data.values():
        for image_id, path, group in zip(split["image_id"], split.cast_column("image", _undecoded())["image"],
                                         split["boxes"]):
            if group:
                ids.append(image_id), paths.append(path["path"]), boxes.append(group)
    return ids, paths, boxes


def _undecoded():
    from datasets import Image

    return Image(decode=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    folder = check_model_folder(args.model_name_or_path)
    model = RefersForImageClassification.from_pretrained(folder).eval()
    image_processor = RefersImageProcessor.from_pretrained(folder)
    ids, paths, boxes = boxed_images(args)
    if args.max_images:
        ids, paths, boxes = ids[: args.max_images], paths[: args.max_images], boxes[: args.max_images]
    if not ids:
        raise ValueError(f"--data_dir {args.data_dir}: no image with a ground-truth box is there")
    logger.info("%d images with %d boxes", len(ids), sum(len(b) for b in boxes))

    out = Path(args.output_dir)
    entries, lines, sheets, written = [], [], {m: [] for m in args.methods}, {m: 0 for m in args.methods}
    for entry in localise(model, image_processor, paths, boxes, methods=args.methods, threshold=args.threshold,
                          image_ids=ids, batch_size=args.batch_size):
        method = entry["method"]
        ious = ", ".join(f"{v:.2f}" for v in entry["ious"])
        title = f"{entry['image_id']}  {entry['label']}  ({method})  IoU {ious}"
        if written[method] < args.max_overlays:
            stem = re.sub(r"[^0-9A-Za-z_.-]+", "_", f"{Path(entry['image_id']).stem}_{entry['label']}")
            explanation_png(entry["pixel_values"], entry["cam"], entry["predicted"], entry["truth"],
                            out / "overlays" / method / f"{stem}.png", title=title)
            written[method] += 1
        if len(sheets[method]) < 16:
            sheets[method].append(dict(entry, title=f"{entry['image_id']}\n{entry['label']} IoU {ious}"))
        entries.append({k: entry[k] for k in ("image_id", "label", "method", "ious", "truth", "predicted")})
        lines.append(json.dumps(entries[-1]))

    summary = summarise_localisation(entries)
    atomic_write_text(out / "boxes.jsonl", "\n".join(lines) + "\n")
    for method, sheet in sheets.items():
        explanation_grid_png(sheet, out / f"explanations_{method}.png")
    iou_histogram_png(entries, out / "iou.png",
                      title=f"{len(ids)} images, {sum(len(b) for b in boxes)} boxes, threshold {args.threshold}")
    results = {
        "model": os.path.abspath(args.model_name_or_path), "dataset": args.dataset_name,
        "data_dir": os.path.abspath(args.data_dir), "num_images": len(ids),
        "num_boxes": sum(len(b) for b in boxes), "threshold": args.threshold, "input_size": model.config.image_size,
        "methods": summary,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    for method, values in summary.items():
        logger.info("%s: %s", method, values["all"])
    return results


if __name__ == "__main__":
    main()
