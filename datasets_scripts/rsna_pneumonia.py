"""RSNA Pneumonia Detection Challenge (DICOM) with MRM's split lists -> single-label DatasetDict (normal / pneumonia).

Layout (Kaggle "rsna-pneumonia-detection-challenge", stage 2): `<data_dir>/stage_2_train_images/<patientId>.dcm`,
`<data_dir>/stage_2_test_images/<patientId>.dcm`, and (optional) `<data_dir>/stage_2_train_labels.csv` (columns
`patientId, x, y, width, height, Target`; one row per box, `Target` 0/1). One image per `patientId`, so `image_id` =
`patient_id` = the patientId.

Labels and splits: MRM's lists (`<split_dir>/*.txt`, default `<data_dir>/../splits/mrm/RSNA_Pneumonia`; each line
`stage_2_train_images/<id>.dcm <0|1>`, the path relative to `<data_dir>`) give the split and the label: `train` =
`train_1.txt` (label_ratio=0.01, 251 images), `train_10.txt` (0.1, 2,518) or `train_list.txt` (1.0, 25,184);
`validation` = `val_list.txt` (1,500); together 26,684 = every stage-2 training image; `test` = `test_list.txt`
(3,000 images of `stage_2_test_images/`, whose labels Kaggle's CSV does not carry: the list is their only label
source). With `stage_2_train_labels.csv` present, every listed training image must be in it (else an
InvalidDataError naming the list line) and its label (any `Target` 1) is compared with the list's; disagreements are
counted in a log warning (the list wins, as in MRM). A missing column of the CSV is an InvalidDataError.

Images: each DICOM is converted once to an 8-bit PNG in `converted_dir` (default: under the `datasets` cache) by the
package's one DICOM reader (`modeling_refers.radiograph_io.load_dicom`, through VinBigData's
`convert_dicom`; longer side at most `dicom_max_size` when given); `datasets.Image()` decodes the PNGs lazily.

Missing images: a list entry whose DICOM is absent is an InvalidDataError naming the list, line and path;
`skip_invalid=True` leaves such entries out (counted in a log warning): the partial mode for a copy that holds only
some of the images.

Licence: the challenge's data terms (Kaggle competition rules; images from NIH ChestX-ray14, annotations by RSNA and
STR radiologists); cite `RSNA_PNEUMONIA_CITATION`. MRM's lists: MIT.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from datasets import DatasetDict

from .common import (
    InvalidEntries,
    build_dataset_dict,
    compare_with_listed_labels,
    read_table,
    resolve_split_dir,
    single_label_features,
    warn_missing_positives,
)
from .mrm_lists import (
    MRM_SPLITS_CITATION,
    check_label_ratio,
    convert_dicoms,
    default_converted_dir,
    mrm_list_files,
    read_mrm_list,
)

logger = logging.getLogger(__name__)

RSNA_PNEUMONIA_LABEL_NAMES = ("normal", "pneumonia")
LABELS_FILE = "stage_2_train_labels.csv"
REQUIRED_COLUMNS = ("patientId", "Target")
DEFAULT_SPLIT_DIR = "mrm/RSNA_Pneumonia"
RSNA_PNEUMONIA_LICENSE = "other"
RSNA_PNEUMONIA_CITATION = (
    "Shih G, Wu CC, Halabi SS, et al. Augmenting the National Institutes of Health Chest Radiograph Dataset with "
    "Expert Annotations of Possible Pneumonia. Radiology: Artificial Intelligence 1(1):e180041, 2019 (RSNA Pneumonia "
    "Detection Challenge, Kaggle 2018). " + MRM_SPLITS_CITATION
)


def read_rsna_labels(path: Path, invalid: InvalidEntries) -> dict[str, float]:
    """`{patientId: 1.0 if any row has Target 1 else 0.0}` from `stage_2_train_labels.csv`."""
    labels: dict[str, float] = {}
    for row_no, record in enumerate(read_table(path, REQUIRED_COLUMNS).to_dict("records"), start=1):
        target = record["Target"].strip()
        if target not in ("0", "1"):
            invalid("bad label", f"{path}, row {row_no}: 'Target' must be 0 or 1, got {record['Target']!r}")
            continue
        key = record["patientId"].strip()
        labels[key] = max(labels.get(key, 0.0), float(target))
    return labels


def load_rsna_pneumonia(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    label_ratio: float = 1.0,
    converted_dir: str | os.PathLike | None = None,
    dicom_max_size: int | None = None,
    skip_invalid: bool = False,
) -> DatasetDict:
    """RSNA Pneumonia as a DatasetDict (train/validation/test) of `image_id` (= `patient_id`, the patientId),
    `image` (8-bit PNG converted from the DICOM), `labels` (ClassLabel: normal, pneumonia). `label_ratio` (0.01, 0.1
    or 1.0) picks MRM's training list. See the module docstring."""
    label_ratio = check_label_ratio(label_ratio)
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder (expected stage_2_train_images/, stage_2_test_images/)")
    invalid = InvalidEntries("rsna_pneumonia", skip_invalid)
    files = mrm_list_files(resolve_split_dir(data_dir, split_dir, DEFAULT_SPLIT_DIR), label_ratio, "RSNA_Pneumonia")
    csv_path = data_dir / LABELS_FILE
    csv_labels = read_rsna_labels(csv_path, invalid) if csv_path.is_file() else None
    if csv_labels is None:
        logger.info("rsna_pneumonia: no %s in %s; labels from MRM's lists only", LABELS_FILE, data_dir)

    rows, splits, sources, in_csv = [], [], [], {}
    for split, path in files.items():
        for e in read_mrm_list(path, 1):
            source = data_dir / e.entry
            image_id = Path(e.entry).stem
            if csv_labels is not None and e.entry.startswith("stage_2_train_images/"):
                if image_id not in csv_labels:
                    invalid("unknown list entry", f"{e.where}: patientId {image_id!r} is not in {csv_path}")
                    continue
                in_csv[image_id] = (split, e.labels)
            if not source.is_file():
                invalid("missing image", f"{e.where}: image {source} not found")
                continue
            rows.append({"image_id": image_id, "patient_id": image_id, "labels": int(e.labels[0])})
            splits.append(split)
            sources.append((source, e.where))

    out_dir = Path(converted_dir) if converted_dir is not None else default_converted_dir(
        "rsna_pneumonia", data_dir, dicom_max_size)
    targets = [out_dir / f"{row['image_id']}.png" for row in rows]
    logger.info("rsna_pneumonia: converting %d DICOM files to 8-bit PNG in %s", len(rows), out_dir)
    errors = convert_dicoms([s for s, _ in sources], targets, dicom_max_size)
    keep = []
    for row, target, (source, where), err in zip(rows, targets, sources, errors):
        if err is not None:
            invalid("corrupt image", f"{where}: image file {source} is corrupt ({err})")
        row["image"] = str(target)
        keep.append(err is None)
    rows = [r for r, k in zip(rows, keep) if k]
    splits = [s for s, k in zip(splits, keep) if k]
    invalid.log_summary()
    if csv_labels is not None:
        kept = [r["image_id"] for r in rows if r["image_id"] in in_csv]
        compare_with_listed_labels(kept, [[csv_labels[k]] for k in kept], in_csv, "rsna_pneumonia")
    dataset = build_dataset_dict(rows, splits, single_label_features(RSNA_PNEUMONIA_LABEL_NAMES))
    logger.info("rsna_pneumonia (label_ratio %s): %s", label_ratio, {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, RSNA_PNEUMONIA_LABEL_NAMES, "rsna_pneumonia")
    return dataset


__all__ = ["RSNA_PNEUMONIA_LABEL_NAMES", "RSNA_PNEUMONIA_LICENSE", "RSNA_PNEUMONIA_CITATION", "read_rsna_labels",
           "load_rsna_pneumonia"]
