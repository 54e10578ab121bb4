"""Shenzhen tuberculosis chest X-rays (662 PNGs, binary) -> single-label DatasetDict.

Layout (as distributed, `ChinaSet_AllFiles`): `<data_dir>/CXR_png/CHNCXR_<nnnn>_<y>.png` (or the PNGs
directly in `<data_dir>`), where `<y>` is 0 (normal) or 1 (tuberculosis). The label comes from the file
name; other files (ClinicalReadings, Thumbs.db, ...) are ignored; a `CHNCXR_*` PNG whose name does not
follow the pattern, or whose label digit is not 0/1, is an error. Each number `<nnnn>` is one patient.

Splits: the paper's `train.txt`/`valid.txt`/`test.txt` (default `<data_dir>/../splits/shenzhen_tb`; two
one-hot columns, column 0 = normal, column 1 = tuberculosis, checked against the file-name label),
otherwise (and for unlisted images) a seeded 70/10/20 patient-level split.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from datasets import DatasetDict

from .common import (
    InvalidEntries,
    assign_splits,
    build_dataset_dict,
    check_images,
    compare_with_listed_labels,
    read_split_lists,
    resolve_split_dir,
    single_label_features,
    warn_missing_positives,
)

logger = logging.getLogger(__name__)

SHENZHEN_LABEL_NAMES = ("normal", "tuberculosis")
DEFAULT_SPLIT_DIR = "shenzhen_tb"
FILE_PATTERN = re.compile(r"^CHNCXR_(?P<number>\d{4})_(?P<label>\d+)\.png$", re.IGNORECASE)


def load_shenzhen_tb(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Shenzhen TB as a DatasetDict (train/validation/test) of `image_id` (file name), `patient_id`,
    `image`, `labels` (ClassLabel normal/tuberculosis)."""
    data_dir = Path(data_dir).absolute()
    image_dir = data_dir / "CXR_png" if (data_dir / "CXR_png").is_dir() else data_dir
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: folder not found")
    invalid = InvalidEntries("shenzhen_tb", skip_invalid)
    rows, entries = [], []
    for path in sorted(image_dir.iterdir()):
        if not (path.name.upper().startswith("CHNCXR_") and path.suffix.lower() == ".png"):
            continue
        match = FILE_PATTERN.match(path.name)
        if match is None or match.group("label") not in {"0", "1"}:
            label = match.group("label") if match else "?"
            invalid("unknown label", f"{path}: unknown label '{label}' in the file name; expected "
                    "CHNCXR_<4 digits>_<0 normal|1 tuberculosis>.png")
            continue
        rows.append({"image_id": path.name, "patient_id": match.group("number"), "image": str(path),
                     "labels": int(match.group("label"))})
        entries.append((path, str(path)))
    if not rows and not invalid.counts:
        raise FileNotFoundError(f"{image_dir}: no CHNCXR_*.png images found")
    ok = check_images(entries, invalid, verify_images, desc="Checking Shenzhen images")
    rows = [r for r, good in zip(rows, ok) if good]
    invalid.log_summary()

    keys = [r["image_id"] for r in rows]
    lists_dir = resolve_split_dir(data_dir, split_dir, DEFAULT_SPLIT_DIR)
    listed = None
    if lists_dir.is_dir():
        listed = read_split_lists(lists_dir, len(SHENZHEN_LABEL_NAMES))
        one_hot = [[1.0 - r["labels"], float(r["labels"])] for r in rows]
        compare_with_listed_labels(keys, one_hot, listed, "shenzhen_tb")
    else:
        logger.info("shenzhen_tb: no split lists at %s; seeded 70/10/20 patient-level split", lists_dir)
    splits = assign_splits(keys, [r["patient_id"] for r in rows], listed, split_seed, "shenzhen_tb")
    dataset = build_dataset_dict(rows, splits, single_label_features(SHENZHEN_LABEL_NAMES))
    logger.info("shenzhen_tb: %s", {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, SHENZHEN_LABEL_NAMES, "shenzhen_tb")
    return dataset
