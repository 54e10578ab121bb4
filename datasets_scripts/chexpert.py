"""CheXpert (`CheXpert-v1.0-small`) with MRM's split lists -> multi-label DatasetDict of the 5 competition tasks.

Layout (as distributed): `<data_dir>/CheXpert-v1.0-small/train.csv` and `valid.csv` (column `Path`, e.g.
`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`, relative to `<data_dir>`, and one column per
observation: 1.0 positive, 0.0 negative, -1.0 uncertain, blank not mentioned), images at those paths. `data_dir` may
also be the `CheXpert-v1.0-small` folder itself.

Labels: `CHEXPERT_LABEL_NAMES` = Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion (the competition
tasks, the order of MRM's lists). MRM's lists (`<split_dir>/*.txt`, default `<data_dir>/../splits/mrm/CheXpert`) give
every image its 5 labels as 0/1, uncertain labels already resolved: listed images take the list's labels. How MRM
resolved them is not written anywhere; the lists' prevalences fit the CheXpert paper's best per-task policy (U-Ones
for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly, Consolidation; blank = 0): positive fractions
measured in train_10.txt are 0.303 / 0.124 / 0.069 / 0.291 / 0.445, and by the paper's Table 1 (224,316 images)
Atelectasis is about 0.15 positive but 0.30 positive-or-uncertain, Consolidation about 0.07 positive but 0.19
positive-or-uncertain, Edema about 0.23 / 0.29. Not checked row by row (train.csv is not in ../shared/data).
That policy (`CHEXPERT_UNCERTAIN_AS`) is applied to train.csv only for images no list names
(label_ratio=1.0 without `train_list.txt`, see below); where a list names an image, train.csv's labels under the
policy are compared with the list's and disagreements are counted in a log warning (the list wins).

Splits (MRM's): `train` = `train_1.txt` (label_ratio=0.01, 2,184 images), `train_10.txt` (0.1, 21,841) or
`train_list.txt` (1.0); `validation` = `val_list.txt` (5,000 images of the official train set); `test` =
`test_list.txt` = the official validation set (234 images, `valid.csv`). Frontal and lateral views are both kept, as
the lists have them. MRM's full `train_list.txt` is not in ../shared/data (over its size limit): when `split_dir` has
none, label_ratio=1.0 takes every train.csv image that is not in `val_list.txt` (labels by `CHEXPERT_UNCERTAIN_AS`).

Missing images and unknown entries: a list entry not in train.csv / valid.csv, or whose image file is absent, is an
InvalidDataError naming the list, line and path; `skip_invalid=True` leaves such entries out (counted in a log
warning): the partial mode for a copy that holds only some of the images.

Licence: Stanford's CheXpert Dataset Research Use Agreement (non-commercial research; register at
stanfordmlgroup.github.io/competitions/chexpert); cite `CHEXPERT_CITATION`. MRM's lists: MIT.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from datasets import DatasetDict

from .common import (
    InvalidDataError,
    InvalidEntries,
    build_dataset_dict,
    check_images,
    compare_with_listed_labels,
    multi_label_features,
    read_table,
    resolve_split_dir,
    warn_missing_positives,
)
from .mrm_lists import MRM_SPLITS_CITATION, check_label_ratio, mrm_list_files, read_mrm_list

logger = logging.getLogger(__name__)

CHEXPERT_LABEL_NAMES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# Uncertain (-1) -> this value, per task (the CheXpert paper's best policy; what MRM's lists show, see above).
CHEXPERT_UNCERTAIN_AS = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                         "Pleural Effusion": 1.0}
CHEXPERT_FOLDER = "CheXpert-v1.0-small"
TABLES = ("train.csv", "valid.csv")
REQUIRED_COLUMNS = ("Path",) + CHEXPERT_LABEL_NAMES
DEFAULT_SPLIT_DIR = "mrm/CheXpert"
CHEXPERT_LICENSE = "other"
CHEXPERT_CITATION = (
    "Irvin J, Rajpurkar P, Ko M, et al. CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert "
    "Comparison. AAAI 2019 (Stanford CheXpert Dataset Research Use Agreement). " + MRM_SPLITS_CITATION
)
_PATIENT = re.compile(r"/(patient\d+)/")


def chexpert_value(value: str, name: str, where: str) -> float:
    """One train.csv / valid.csv cell -> 0/1: 1.0 -> 1, 0.0 or blank -> 0, -1.0 -> `CHEXPERT_UNCERTAIN_AS[name]`."""
    value = value.strip()
    if value in ("", "0", "0.0"):
        return 0.0
    if value in ("1", "1.0"):
        return 1.0
    if value in ("-1", "-1.0"):
        return CHEXPERT_UNCERTAIN_AS[name]
    raise InvalidDataError(f"{where}: column {name!r} holds {value!r}; expected 1.0, 0.0, -1.0 or blank")


def _root(data_dir: Path) -> Path:
    """The folder that holds `CheXpert-v1.0-small/` (the `Path` column and the lists are relative to it)."""
    if (data_dir / CHEXPERT_FOLDER).is_dir():
        return data_dir
    if data_dir.name == CHEXPERT_FOLDER:
        return data_dir.parent
    raise FileNotFoundError(f"{data_dir}: no {CHEXPERT_FOLDER}/ folder (expected {CHEXPERT_FOLDER}/train.csv, "
                            "valid.csv and the images as distributed)")


def load_chexpert(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    label_ratio: float = 1.0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """CheXpert as a DatasetDict (train/validation/test) of `image_id` (the `Path` as in the CSV and the lists),
    `patient_id` (`patientNNNNN`), `image`, `labels` (float32 x 5, CHEXPERT_LABEL_NAMES order). `label_ratio` (0.01,
    0.1 or 1.0) picks MRM's training list. See the module docstring."""
    label_ratio = check_label_ratio(label_ratio)
    root = _root(Path(data_dir).absolute())
    invalid = InvalidEntries("chexpert", skip_invalid)
    table: dict[str, tuple[list[float], str]] = {}  # Path -> (labels under CHEXPERT_UNCERTAIN_AS, where)
    in_train_csv: list[str] = []
    for name in TABLES:
        path = root / CHEXPERT_FOLDER / name
        for row_no, record in enumerate(read_table(path, REQUIRED_COLUMNS).to_dict("records"), start=1):
            where = f"{path}, row {row_no}"
            key = record["Path"].strip()
            if key in table:
                raise InvalidDataError(f"{where}: Path {key!r} is already listed ({table[key][1]})")
            table[key] = ([chexpert_value(record[c], c, where) for c in CHEXPERT_LABEL_NAMES], where)
            if name == "train.csv":
                in_train_csv.append(key)

    files = mrm_list_files(resolve_split_dir(root, split_dir, DEFAULT_SPLIT_DIR), label_ratio, "CheXpert",
                           full_list_optional=True)
    listed = {split: read_mrm_list(path, len(CHEXPERT_LABEL_NAMES))
              for split, path in files.items() if path is not None}
    if files["train"] is None:
        in_validation = {e.entry for e in listed["validation"]}
        logger.info("chexpert: no train_list.txt in %s; train = the %d train.csv images not in val_list.txt "
                    "(uncertain labels as %s)", files["validation"].parent, len(in_train_csv), CHEXPERT_UNCERTAIN_AS)
        unlisted_train = [k for k in in_train_csv if k not in in_validation]
    else:
        unlisted_train = []

    rows, splits, entries, compared = [], [], [], {}
    for split in ("train", "validation", "test"):
        items = [(e.entry, list(e.labels), e.where) for e in listed.get(split, [])]
        items += [(k, table[k][0], table[k][1]) for k in (unlisted_train if split == "train" else [])]
        for key, labels, where in items:
            if key not in table:
                invalid("unknown list entry",
                        f"{where}: {key!r} is in neither {CHEXPERT_FOLDER}/train.csv nor valid.csv")
                continue
            match = _PATIENT.search(key)
            rows.append({"image_id": key, "patient_id": match.group(1) if match else key, "image": str(root / key),
                         "labels": labels})
            splits.append(split)
            entries.append((root / key, where))
            compared[key] = (split, tuple(labels))
    ok = check_images(entries, invalid, verify_images, desc="Checking CheXpert images")
    rows = [r for r, good in zip(rows, ok) if good]
    splits = [s for s, good in zip(splits, ok) if good]
    invalid.log_summary()
    compare_with_listed_labels([r["image_id"] for r in rows], [table[r["image_id"]][0] for r in rows], compared,
                               "chexpert")
    dataset = build_dataset_dict(rows, splits, multi_label_features(CHEXPERT_LABEL_NAMES))
    logger.info("chexpert (label_ratio %s): %s", label_ratio, {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, CHEXPERT_LABEL_NAMES, "chexpert")
    return dataset


__all__ = ["CHEXPERT_LABEL_NAMES", "CHEXPERT_UNCERTAIN_AS", "CHEXPERT_LICENSE", "CHEXPERT_CITATION", "chexpert_value",
           "load_chexpert"]
