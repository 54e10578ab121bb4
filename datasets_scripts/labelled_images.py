"""Your own labelled radiographs -> a target-domain DatasetDict (train / validation / test).

Two inputs, told apart by what `data_dir` holds:

(a) Image files + a labels CSV (`labels_csv`; default `<data_dir>/labels.csv`; a relative path that does not exist
    as given is looked up in `data_dir`). One row per image:

        file_name,patient_id,split,Effusion,Nodule        (multi-label: one 0/1 column per label)
        img001.png,p1,train,1,0
        file_name,finding                                  (multi-class: one column of class names)
        img001.dcm,pneumonia

    `image_column` (default: the first of file_name / image / path / filename / image_path present) holds paths
    relative to `image_dir` (default `data_dir`): PNG, JPEG or DICOM (`.dcm` / `.dicom`: converted once to 8-bit
    PNG by the DICOM path of the VinBigData builder, `vinbigdata.convert_dicom`, into `converted_dir`, default
    `vinbigdata.default_converted_dir(image_dir)` in the `datasets` cache, reused while newer than the DICOM).
(b) A `datasets` data set: a folder written by `DatasetDict.save_to_disk` / `Dataset.save_to_disk`, or else the
    `imagefolder` layout (`load_dataset("imagefolder", data_dir=...)`: `train/<class>/x.png`, ... or a
    `metadata.csv`), with an image column (`image_column`, default: the first `Image()` column) and scalar label
    columns (ClassLabel, 0/1 numbers, or class-name strings).

Labels: `label_columns` (default: every column that is not the image, id, patient or split column). Several
0/1 columns are multi-label (float32 multi-hot `labels`, column order); one column of class names is multi-class
(`labels` a ClassLabel: the ClassLabel's own order, else the sorted names). One 0/1 column counts as multi-label
(one binary label). `problem_type` ("multi_label_classification" / "single_label_classification") overrides the
inference (logged): single-label over several 0/1 columns reads them as one-hot (exactly one 1 per row).

Splits: the `split_column` (default "split" when present; train / val / valid / validation / dev / test; CSV only)
or, for (b), the DatasetDict's split names; missing splits are cut from the train rows, and without any split
every row gets the seeded patient-level split (`split_fractions`, default 70/10/20, `split_seed`). Patients:
`patient_column` (default "patient_id" or "patient" when present); without one each image is its own patient.

Errors (`InvalidDataError`, naming the file and CSV line): an unknown column (listing those that exist), a missing
or unreadable image, an image listed twice, a label cell that fits neither form, a train split without a positive
example of a class (or without any example of a class, multi-class). A validation / test split without a positive
of a class warns (`warn_missing_positives`). The result's features are `multi_label_features` /
`single_label_features`; the label names and problem type ride along in `info.description` (see `label_info`),
so the fine-tuning run reads them from the data (`TargetDatasetSpec.with_labels_of`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Image, Value, load_dataset, load_from_disk

from .common import (
    DEFAULT_SPLIT_FRACTIONS,
    SPLITS,
    InvalidDataError,
    InvalidEntries,
    build_dataset_dict,
    check_images,
    image_decode_error,
    label_presence,
    multi_label_features,
    normalize_split_name,
    read_table,
    seeded_patient_split,
    single_label_features,
    warn_missing_positives,
)
from .vinbigdata import DICOM_EXTENSIONS, convert_dicom, default_converted_dir

logger = logging.getLogger(__name__)

NAME = "labelled_images"
MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"
PROBLEM_TYPES = (MULTI_LABEL, SINGLE_LABEL)
DEFAULT_LABELS_CSV = "labels.csv"
IMAGE_COLUMN_CANDIDATES = ("file_name", "image", "path", "filename", "image_path")
ID_COLUMN_CANDIDATES = ("image_id", "id")
PATIENT_COLUMN_CANDIDATES = ("patient_id", "patient")
DEFAULT_SPLIT_COLUMN = "split"
LABEL_INFO_PREFIX = "refers labels: "
_BINARY = {"0": "0", "1": "1", "0.0": "0", "1.0": "1", "false": "0", "true": "1"}


# ------------------------------------------------------------------------------------------- label info
def label_info(dataset: Dataset) -> tuple[tuple[str, ...], str] | None:
    """`(label_names, problem_type)` of a split built here (from `info.description`, which `select`, `map`
    and `save_to_disk` keep), or of any split with a ClassLabel `labels` column; None when unknown."""
    description = dataset.info.description or ""
    if description.startswith(LABEL_INFO_PREFIX):
        stored = json.loads(description[len(LABEL_INFO_PREFIX):])
        return tuple(stored["label_names"]), stored["problem_type"]
    feature = dataset.features.get("labels")
    if isinstance(feature, ClassLabel):
        return tuple(feature.names), SINGLE_LABEL
    return None


# ------------------------------------------------------------------------------------------------ helpers
def _pick_column(name: str | None, columns: Sequence[str], candidates: Sequence[str], what: str, where: str,
                 required: bool = True) -> str | None:
    if name is not None:
        if name not in columns:
            raise InvalidDataError(f"{where}: unknown {what} column {name!r}; the columns are {list(columns)}")
        return name
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise InvalidDataError(f"{where}: no {what} column (looked for {list(candidates)}); the columns are "
                               f"{list(columns)}; name it with the {what}_column argument")
    return found


def _resolve_labels_csv(data_dir: Path, labels_csv: str | os.PathLike) -> Path:
    given = Path(labels_csv)
    if given.is_file():
        return given.absolute()
    inside = data_dir / given
    if inside.is_file() or given.is_absolute():
        return inside
    raise FileNotFoundError(f"labels CSV {str(labels_csv)!r} not found (looked at {given.absolute()} and {inside})")


def _label_names_and_vectors(values: list[list[str]], columns: Sequence[str], problem_type: str | None,
                             wheres: Sequence[str], class_order: Sequence[str] | None
                             ) -> tuple[tuple[str, ...], str, list]:
    """From per-row label cells (strings, one per label column): names, problem type, per-row labels."""
    for row, where in zip(values, wheres):
        for column, cell in zip(columns, row):
            if cell == "":
                raise InvalidDataError(f"{where}: empty label in column {column!r}")
    binary = all(cell.lower() in _BINARY for row in values for cell in row)
    if problem_type is None:
        if binary:
            problem_type = MULTI_LABEL
        elif len(columns) == 1:
            problem_type = SINGLE_LABEL
        else:
            bad = next((w, c, cell) for row, w in zip(values, wheres) for c, cell in zip(columns, row)
                       if cell.lower() not in _BINARY)
            raise InvalidDataError(
                f"{bad[0]}: label {bad[2]!r} in column {bad[1]!r}: several label columns {list(columns)} must hold "
                "0/1 values (multi-label); for multi-class give one column of class names")
        logger.info("%s: label columns %s: inferred %s (pass problem_type to choose)", NAME, list(columns),
                    problem_type)
    elif problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None (inferred), got {problem_type!r}")
    if problem_type == MULTI_LABEL or len(columns) > 1:
        for row, where in zip(values, wheres):
            for column, cell in zip(columns, row):
                if cell.lower() not in _BINARY:
                    raise InvalidDataError(f"{where}: label {cell!r} in column {column!r}: expected 0 or 1 (one 0/1 "
                                           f"column per label for {problem_type})")
        vectors = [[float(_BINARY[cell.lower()]) for cell in row] for row in values]
        if problem_type == MULTI_LABEL:
            return tuple(columns), problem_type, vectors
        for vector, where in zip(vectors, wheres):  # single-label over one-hot columns
            if sum(vector) != 1:
                raise InvalidDataError(f"{where}: single_label_classification over the one-hot columns "
                                       f"{list(columns)} needs exactly one 1 per row, found {int(sum(vector))}")
        return tuple(columns), problem_type, [vector.index(1.0) for vector in vectors]
    cells = [row[0] for row in values]
    names = tuple(class_order) if class_order is not None else tuple(sorted(set(cells)))
    index = {name: i for i, name in enumerate(names)}
    return names, problem_type, [index[cell] for cell in cells]


def _fill_splits(named: list[str | None], patients: Sequence[str], fractions: Sequence[float], seed: int,
                 source: str) -> list[str]:
    """Given splits kept; splits that no row names are cut from the train rows by patient (seeded); no names at
    all: the seeded patient-level split of every row."""
    present = {s for s in named if s is not None}
    if present >= set(SPLITS):
        return named  # type: ignore[return-value]
    if not present:
        seeded = seeded_patient_split(patients, seed, fractions)
        logger.info("%s: seeded patient-level split %s (seed %d) of %d images", NAME, tuple(fractions), seed,
                    len(patients))
        return [seeded[p] for p in patients]
    if "train" not in present:
        raise InvalidDataError(f"{source}: the splits {sorted(present)} have no 'train' split")
    missing = [s for s in SPLITS if s not in present]
    share = {s: f for s, f in zip(SPLITS, fractions) if s == "train" or s in missing}
    total = sum(share.values())
    if total <= 0 or all(share[s] == 0 for s in missing):
        raise InvalidDataError(f"{source}: no {' / '.join(missing)} split given and split_fractions {tuple(fractions)} "
                               "leave none to cut from train")
    cut = tuple(share.get(s, 0.0) / total for s in SPLITS)
    pool = [p for s, p in zip(named, patients) if s == "train"]
    seeded = seeded_patient_split(pool, seed, cut)
    logger.info("%s: no %s split given: cut from the %d train images by patient (fractions %s, seed %d)", NAME,
                " / ".join(missing), len(pool), tuple(round(c, 4) for c in cut), seed)
    return [seeded[p] if s == "train" else s for s, p in zip(named, patients)]  # type: ignore[misc]


def _convert(source: Path, target: Path) -> str | None:
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return None
    try:
        convert_dicom(source, target)
    except Exception as err:  # pydicom/numpy raise many types for broken files
        return f"{type(err).__name__}: {err}"
    return None


def _check_files(records: list[dict], invalid: InvalidEntries, verify_images: bool, image_dir: Path,
                 converted_dir: str | os.PathLike | None) -> list[bool]:
    """Missing / undecodable images (PNG, JPEG checked by `check_images`, DICOM converted to PNG, embedded bytes
    decoded); DICOM rows get the converted PNG as their image. One ok-flag per record."""
    ok = [True] * len(records)
    files = [i for i, r in enumerate(records) if isinstance(r["image"], Path)]
    dicom = [i for i in files if records[i]["image"].suffix.lower() in DICOM_EXTENSIONS]
    raster = sorted(set(files) - set(dicom))
    for i, good in zip(raster, check_images([(records[i]["image"], records[i]["where"]) for i in raster], invalid,
                                            verify_images, desc="Checking images")):
        ok[i] = good
    for i in dicom:
        if not records[i]["image"].is_file():
            invalid("missing image", f"{records[i]['where']}: image {records[i]['image']} not found")
            ok[i] = False
    present = [i for i in dicom if ok[i]]
    if present:
        out_dir = Path(converted_dir) if converted_dir is not None else default_converted_dir(image_dir, None)
        targets = {}
        for i in present:
            key = hashlib.sha1(str(records[i]["image"].resolve()).encode()).hexdigest()[:10]
            targets[i] = out_dir / f"{records[i]['image'].stem}-{key}.png"
        logger.info("%s: converting %d DICOM files to 8-bit PNG in %s", NAME, len(present), out_dir)
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            errors = list(pool.map(_convert, [records[i]["image"] for i in present], [targets[i] for i in present]))
        for i, err in zip(present, errors):
            if err is not None:
                invalid("corrupt image", f"{records[i]['where']}: image file {records[i]['image']} is corrupt ({err})")
                ok[i] = False
            else:
                records[i]["image"] = targets[i]
    for i, record in enumerate(records):
        image = record["image"]
        if isinstance(image, dict) and image.get("bytes") is not None and verify_images:
            err = image_decode_error(io.BytesIO(image["bytes"]))
            if err is not None:
                invalid("corrupt image", f"{record['where']}: embedded image {image.get('path')!r} is corrupt ({err})")
                ok[i] = False
    return ok


# ---------------------------------------------------------------------------------------------- readers
def _records_from_csv(data_dir: Path, table_path: Path, image_dir: Path, image_column, label_columns, split_column,
                      patient_column):
    table = read_table(table_path, [])
    columns = list(table.columns)
    image_column = _pick_column(image_column, columns, IMAGE_COLUMN_CANDIDATES, "image", str(table_path))
    split_column = _pick_column(split_column, columns, (DEFAULT_SPLIT_COLUMN,), "split", str(table_path), False)
    patient_column = _pick_column(patient_column, columns, PATIENT_COLUMN_CANDIDATES, "patient", str(table_path),
                                  False)
    used = {image_column, split_column, patient_column, *ID_COLUMN_CANDIDATES}
    label_columns = _label_columns(label_columns, columns, used, str(table_path))
    records, first_line = [], {}
    for row_no, record in enumerate(table.to_dict("records"), start=1):
        where = f"{table_path}, line {row_no + 1}"
        name = record[image_column].strip()
        if not name:
            raise InvalidDataError(f"{where}: empty image path in column {image_column!r}")
        path = (image_dir / name).absolute()
        key = os.path.normpath(path)
        if key in first_line:
            raise InvalidDataError(f"{where}: image {name!r} is listed twice (also at line {first_line[key]})")
        first_line[key] = row_no + 1
        split = None
        if split_column is not None:
            split = normalize_split_name(record[split_column])
            if split is None:
                raise InvalidDataError(f"{where}: split {record[split_column]!r} in column {split_column!r}; expected "
                                       "train, validation (val, valid, dev) or test")
        patient = record[patient_column].strip() if patient_column else name
        if not patient:
            raise InvalidDataError(f"{where}: empty patient id in column {patient_column!r}")
        records.append({"image_id": name.replace("\\", "/"), "patient_id": patient, "image": path, "split": split,
                        "where": where, "cells": [record[c].strip() for c in label_columns]})
    return records, label_columns, None


def _label_columns(label_columns, columns: Sequence[str], used: set, where: str) -> list[str]:
    if label_columns:
        unknown = [c for c in label_columns if c not in columns]
        if unknown:
            raise InvalidDataError(f"{where}: unknown label column(s) {unknown}; the columns are {list(columns)}")
        if len(set(label_columns)) != len(label_columns):
            raise ValueError(f"label_columns lists a column twice: {list(label_columns)}")
        return list(label_columns)
    inferred = [c for c in columns if c not in used]
    if not inferred:
        raise InvalidDataError(f"{where}: no label columns (the columns are {list(columns)}); name them with "
                               "label_columns")
    logger.info("%s: label columns inferred from %s: %s", NAME, where, inferred)
    return inferred


def _cell(value, feature) -> str:
    if isinstance(feature, ClassLabel):
        return feature.int2str(int(value))
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str):
        return value.strip()
    return repr(value)


def _records_from_datasets(data_dir: Path, image_column, label_columns, patient_column):
    if (data_dir / "dataset_dict.json").is_file() or (data_dir / "state.json").is_file():
        loaded, how = load_from_disk(str(data_dir)), "save_to_disk folder"
    else:
        if not any(p.is_file() for p in data_dir.rglob("*")):
            raise FileNotFoundError(f"{data_dir}: holds no {DEFAULT_LABELS_CSV}, no save_to_disk data set and no "
                                    "images (imagefolder layout); pass labels_csv")
        loaded, how = load_dataset("imagefolder", data_dir=str(data_dir)), "imagefolder"
    splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"": loaded})
    first = next(iter(splits.values()))
    columns, source = list(first.column_names), f"{data_dir} ({how})"
    image_features = [c for c, f in first.features.items() if isinstance(f, Image)]
    image_column = _pick_column(image_column, columns, image_features, "image", source)
    if not isinstance(first.features[image_column], Image):
        raise InvalidDataError(f"{source}: column {image_column!r} is {first.features[image_column]}, expected Image()")
    patient_column = _pick_column(patient_column, columns, PATIENT_COLUMN_CANDIDATES, "patient", source, False)
    id_column = next((c for c in ID_COLUMN_CANDIDATES if c in columns), None)
    label_columns = _label_columns(label_columns, columns, {image_column, patient_column, id_column,
                                                            DEFAULT_SPLIT_COLUMN}, source)
    for c in label_columns:
        if not isinstance(first.features[c], (ClassLabel, Value)):
            raise InvalidDataError(f"{source}: label column {c!r} is {first.features[c]}; expected a scalar column "
                                   "(ClassLabel, 0/1 number or class name) per label")
    class_order = None
    if len(label_columns) == 1 and isinstance(first.features[label_columns[0]], ClassLabel):
        class_order = first.features[label_columns[0]].names
    records, first_row = [], {}
    for split_name, split in splits.items():
        split_value = None
        if split_name:
            split_value = normalize_split_name(split_name)
            if split_value is None:
                raise InvalidDataError(f"{source}: split {split_name!r}; expected train, validation (val, valid, dev) "
                                       "or test")
        if list(split.column_names) != columns:
            raise InvalidDataError(f"{source}: split {split_name!r} has columns {split.column_names}, split "
                                   f"{next(iter(splits))!r} has {columns}")
        rows = split.cast_column(image_column, Image(decode=False)).with_format(None)
        for index, row in enumerate(rows):
            where = f"{source}, split {split_name or 'all'!r}, row {index + 1}"
            image = row[image_column]
            path = image.get("path")
            if image.get("bytes") is None:
                if not path:
                    raise InvalidDataError(f"{where}: image has neither a path nor bytes")
                image = Path(path) if os.path.isabs(path) else (data_dir / path).absolute()
            if id_column is not None:
                image_id = str(row[id_column])
            elif isinstance(image, Path):  # a file: its path inside data_dir (imagefolder: train/<class>/x.png)
                image_id = os.path.relpath(image, data_dir) if image.is_relative_to(data_dir) else str(image)
            else:  # embedded bytes (save_to_disk): the original file name, else the split and row
                image_id = path or f"{split_name or 'row'}-{index}"
            key = image_id if isinstance(image, dict) else os.path.normpath(image)
            if key in first_row:
                raise InvalidDataError(f"{where}: image {image_id!r} is listed twice (also {first_row[key]})")
            first_row[key] = where
            patient = str(row[patient_column]).strip() if patient_column else image_id
            records.append({"image_id": image_id.replace("\\", "/"), "patient_id": patient, "image": image,
                            "split": split_value, "where": where,
                            "cells": [_cell(row[c], first.features[c]) for c in label_columns]})
    return records, label_columns, class_order


# ------------------------------------------------------------------------------------------------ builder
def load_labelled_images(
    data_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    label_columns: Sequence[str] | None = None,
    problem_type: str | None = None,
    image_column: str | None = None,
    split_column: str | None = None,
    patient_column: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
    image_dir: str | os.PathLike | None = None,
    converted_dir: str | os.PathLike | None = None,
    split_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Your labelled images as a DatasetDict of `image_id`, `patient_id`, `image`, `labels`. See the module
    docstring. `split_dir` exists for the fine-tuning run's common call and must stay None (splits come from the
    split column or the seeded split)."""
    if split_dir is not None:
        raise ValueError(f"{NAME}: split lists (split_dir={str(split_dir)!r}) are not read; give splits in a "
                         "split column of the labels CSV, or let the seeded split make them")
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None (inferred), got {problem_type!r}")
    if len(split_fractions) != 3 or any(f < 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers (train, validation, test) summing to "
                         f"1, got {tuple(split_fractions)}")
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder")
    image_dir = Path(image_dir).absolute() if image_dir is not None else data_dir
    if labels_csv is None and (data_dir / DEFAULT_LABELS_CSV).is_file():
        labels_csv = DEFAULT_LABELS_CSV
    if labels_csv is not None:
        source = str(_resolve_labels_csv(data_dir, labels_csv))
        records, label_columns, class_order = _records_from_csv(
            data_dir, Path(source), image_dir, image_column, label_columns, split_column, patient_column)
    else:
        if split_column is not None:
            raise ValueError(f"{NAME}: split_column applies to a labels CSV; a `datasets` folder's splits are its "
                             "split names")
        source = str(data_dir)
        records, label_columns, class_order = _records_from_datasets(data_dir, image_column, label_columns,
                                                                     patient_column)
    if not records:
        raise InvalidDataError(f"{source}: no images listed")
    invalid = InvalidEntries(NAME, skip_invalid)
    ok = _check_files(records, invalid, verify_images, image_dir, converted_dir)
    records = [r for r, good in zip(records, ok) if good]
    invalid.log_summary()

    names, problem_type, labels = _label_names_and_vectors(
        [r["cells"] for r in records], label_columns, problem_type, [r["where"] for r in records], class_order)
    splits = _fill_splits([r["split"] for r in records], [r["patient_id"] for r in records], split_fractions,
                          split_seed, source)
    rows = [{"image_id": r["image_id"], "patient_id": r["patient_id"],
             "image": str(r["image"]) if isinstance(r["image"], Path) else r["image"], "labels": y}
            for r, y in zip(records, labels)]
    features = multi_label_features(names) if problem_type == MULTI_LABEL else single_label_features(names)
    dataset = build_dataset_dict(rows, splits, features)
    description = LABEL_INFO_PREFIX + json.dumps({"label_names": list(names), "problem_type": problem_type})
    for split in dataset.values():
        split.info.description = description
    logger.info("%s: %s, %s %s; %s", NAME, source, problem_type, list(names), {k: len(v) for k, v in dataset.items()})
    check_train_positives(dataset, names, source)
    warn_missing_positives(DatasetDict({s: dataset[s] for s in ("validation", "test")}), names, NAME)
    return dataset


def check_train_positives(dataset: DatasetDict, label_names: Sequence[str], source: str) -> None:
    """InvalidDataError when the train split is empty or has no positive example of a class (naming them)."""
    train = dataset["train"]
    if len(train) == 0:
        raise InvalidDataError(f"{source}: the train split is empty")
    present = label_presence(train).any(axis=0)
    missing = [name for name, p in zip(label_names, present) if not p]
    if missing:
        raise InvalidDataError(
            f"{source}: split 'train' ({len(train)} images) has no positive example of class(es) "
            f"{', '.join(repr(m) for m in missing)}; a class without a positive training image cannot be learnt "
            "(add positives to train, or leave the class out of label_columns)")


__all__ = ["load_labelled_images", "label_info", "check_train_positives"]
