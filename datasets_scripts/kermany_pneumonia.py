"""Kermany pediatric pneumonia chest X-rays (ChestXRay2017, 5,840 JPEGs here) -> single-label DatasetDict.

Layout (as distributed, the official `val/` folder of 16 images may be absent):
`<data_dir>/{train,test}/{NORMAL,PNEUMONIA}/<name>.jpeg`. Names as released: normal `IM-0115-0001.jpeg`,
`NORMAL2-IM-1427-0001.jpeg` (also with a third number, `IM-0117-0001-0002.jpeg`); pneumonia
`person1000_bacteria_2931.jpeg`, `person1000_virus_1681.jpeg` (patient number, bacteria or virus, image number;
one file has a further `_1`). The class comes from the folder and, for pneumonia, bacteria/virus from the name;
a name that does not follow its folder's pattern (e.g. a `person..._virus_...` file in `NORMAL/`) is an error
naming the file. Files that are not `.jpeg`/`.jpg` (`.DS_Store`, `Thumbs.db`) are ignored.

Patients (`patient_id`): the release numbers patients in separate series, and the official train/test split is
patient-disjoint only on the series-qualified ids, so those are the ids used: normal `IM-0115` or `NORMAL2-IM-1427`
(`IM-0117` and `NORMAL2-IM-0117` are different series); pneumonia `person1000_bacteria` or `person1000_virus`.
Measured on the shared copy: by bare number, 170 `personN` numbers (always with bacteria on one side of the split
and virus on the other) and 94 `IM-XXXX` numbers (always `IM-` on one side and `NORMAL2-IM-` on the other) appear
in both train and test, while no series-qualified id does; 808 `personN` numbers of train carry both a bacteria
and a virus series.

Splits: `test` = the official `test/` folder; `validation` = a seeded patient-level `val_fraction` of the official
`train/` patients (`seeded_patient_split` with fractions `(1 - val_fraction, val_fraction, 0)`, the same cut as
`load_kermany_paired_reports` with the same seed and fraction); `train` = the other training patients. A patient in
two splits is an error.

Tasks: `task="pneumonia"`: ClassLabel ("normal", "pneumonia"); `task="bacterial_viral"`: ClassLabel ("normal",
"bacterial", "viral"). Both tasks have the same rows and the same splits.

Licence: CC BY 4.0; attribute Kermany et al., Cell 2018 (`KERMANY_CITATION`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from datasets import DatasetDict

from .common import (
    InvalidDataError,
    InvalidEntries,
    build_dataset_dict,
    check_images,
    seeded_patient_split,
    single_label_features,
    warn_missing_positives,
)

logger = logging.getLogger(__name__)

KERMANY_PNEUMONIA_LABEL_NAMES = ("normal", "pneumonia")
KERMANY_BACTERIAL_VIRAL_LABEL_NAMES = ("normal", "bacterial", "viral")
KERMANY_FINDINGS = ("normal", "bacteria", "virus")
TASKS = ("pneumonia", "bacterial_viral")
OFFICIAL_SPLITS = ("train", "test")
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg")
DEFAULT_VAL_FRACTION = 0.1
KERMANY_LICENSE = "cc-by-4.0"
KERMANY_CITATION = (
    "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases by Image-Based "
    "Deep Learning. Cell 172(5):1122-1131, 2018. Data: Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence "
    "Tomography (OCT) and Chest X-Ray Images for Classification. Mendeley Data v2, 2018, doi:10.17632/rscbjbr9sj.2"
)

NORMAL_PATTERN = re.compile(r"^(?P<patient>(?:NORMAL2-)?IM-\d{4})-\d{4}(?:-\d{4})?\.jpe?g$", re.IGNORECASE)
PNEUMONIA_PATTERN = re.compile(r"^(?P<person>person\d+)_(?P<finding>bacteria|virus)_\d+(?:_\d+)?\.jpe?g$",
                               re.IGNORECASE)
EXPECTED_NAMES = {
    "NORMAL": "IM-<4 digits>-<4 digits>[-<4 digits>].jpeg or NORMAL2-IM-<4 digits>-<4 digits>[-<4 digits>].jpeg",
    "PNEUMONIA": "person<N>_<bacteria|virus>_<N>.jpeg",
}
TASK_LABELS = {
    "pneumonia": {"normal": 0, "bacteria": 1, "virus": 1},
    "bacterial_viral": {"normal": 0, "bacteria": 1, "virus": 2},
}


def parse_kermany_name(name: str, class_folder: str) -> tuple[str, str] | None:
    """`(patient_id, finding)` for a file name of `class_folder` ("NORMAL" or "PNEUMONIA"), None if the name does
    not follow that folder's pattern. finding is "normal", "bacteria" or "virus"."""
    if class_folder == "NORMAL":
        match = NORMAL_PATTERN.match(name)
        return (match.group("patient"), "normal") if match else None
    match = PNEUMONIA_PATTERN.match(name)
    if match is None:
        return None
    finding = match.group("finding").lower()
    return f"{match.group('person')}_{finding}", finding


def _scan(data_dir: Path, invalid: InvalidEntries) -> list[dict]:
    records = []
    for split in OFFICIAL_SPLITS:
        for class_folder in CLASS_FOLDERS:
            folder = data_dir / split / class_folder
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder}: folder not found; expected the Kermany layout "
                    f"<data_dir>/{{{','.join(OFFICIAL_SPLITS)}}}/{{{','.join(CLASS_FOLDERS)}}}/*.jpeg"
                )
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                parsed = parse_kermany_name(path.name, class_folder)
                if parsed is None:
                    invalid("unexpected file name", f"{path}: file name does not match the {class_folder} folder's "
                                                    f"pattern; expected {EXPECTED_NAMES[class_folder]}")
                    continue
                patient_id, finding = parsed
                records.append({"path": str(path), "split": split, "patient_id": patient_id, "finding": finding})
    seen: dict[str, str] = {}
    for record in records:
        name = Path(record["path"]).name
        if name in seen:
            raise InvalidDataError(f"{record['path']}: file name already used by {seen[name]}; image ids must be unique")
        seen[name] = record["path"]
    return records


def kermany_records(data_dir: str | os.PathLike, skip_invalid: bool = False) -> list[dict]:
    """Every Kermany image as `{"path", "split", "patient_id", "finding"}`, sorted by split (train, test), class
    folder and file name. `path`: absolute; `split`: "train" or "test" (the official folders); `patient_id`: see the
    module docstring; `finding`: "normal", "bacteria" or "virus". A missing folder raises FileNotFoundError, a name
    that does not follow its folder's pattern InvalidDataError (or is skipped with `skip_invalid=True`). The images
    themselves are not opened."""
    invalid = InvalidEntries("kermany_pneumonia", skip_invalid)
    records = _scan(Path(data_dir).absolute(), invalid)
    invalid.log_summary()
    return records


def assert_patient_disjoint(patients: list[str], splits: list[str], where: str) -> None:
    """InvalidDataError naming a patient (and its splits) found in more than one split."""
    splits_of: dict[str, set[str]] = defaultdict(set)
    for patient, split in zip(patients, splits):
        splits_of[patient].add(split)
    shared = sorted(p for p, s in splits_of.items() if len(s) > 1)
    if shared:
        raise InvalidDataError(
            f"{where}: {len(shared)} patient(s) in more than one split, e.g. {shared[0]!r} in "
            f"{sorted(splits_of[shared[0]])}"
        )


def load_kermany_pneumonia(
    data_dir: str | os.PathLike,
    task: str = "pneumonia",
    split_dir: str | os.PathLike | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Kermany pediatric pneumonia as a DatasetDict (train/validation/test) of `image_id` (file name), `patient_id`,
    `image`, `labels` (ClassLabel). `task`: "pneumonia" (normal/pneumonia) or "bacterial_viral"
    (normal/bacterial/viral). Validation: a seeded patient-level `val_fraction` of the official train patients;
    test: the official test folder. `split_dir` is accepted for the common builder signature only: Kermany has no
    split lists, so passing one is an error."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    name = f"kermany_pneumonia[{task}]"
    if split_dir is not None:
        raise ValueError(f"{name}: split_dir {os.fspath(split_dir)!r} given, but Kermany has no split lists: test is "
                         "the official test/ folder and validation a seeded patient-level part of train/ "
                         "(val_fraction, split_seed)")
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: folder not found")
    invalid = InvalidEntries(name, skip_invalid)
    records = _scan(data_dir, invalid)
    if not records and not invalid.counts:
        raise FileNotFoundError(f"{data_dir}: no Kermany images (*.jpeg) in train/ and test/")
    ok = check_images([(Path(r["path"]), f"{data_dir}: {r['split']}") for r in records], invalid, verify_images,
                      desc="Checking Kermany images")
    records = [r for r, good in zip(records, ok) if good]
    invalid.log_summary()
    assert_patient_disjoint([r["patient_id"] for r in records], [r["split"] for r in records],
                            f"{data_dir} (official train/ and test/ folders)")

    validation_of = seeded_patient_split([r["patient_id"] for r in records if r["split"] == "train"], split_seed,
                                         (1.0 - val_fraction, val_fraction, 0.0))
    splits = [validation_of[r["patient_id"]] if r["split"] == "train" else "test" for r in records]
    assert_patient_disjoint([r["patient_id"] for r in records], splits, name)
    labels = TASK_LABELS[task]
    rows = [{"image_id": Path(r["path"]).name, "patient_id": r["patient_id"], "image": r["path"],
             "labels": labels[r["finding"]]} for r in records]
    label_names = KERMANY_PNEUMONIA_LABEL_NAMES if task == "pneumonia" else KERMANY_BACTERIAL_VIRAL_LABEL_NAMES
    dataset = build_dataset_dict(rows, splits, single_label_features(label_names))
    logger.info("%s: %s (validation: %d of %d training patients, seed %d)", name,
                {k: len(v) for k, v in dataset.items()}, sum(s == "validation" for s in validation_of.values()),
                len(validation_of), split_seed)
    warn_missing_positives(dataset, label_names, name)
    return dataset
