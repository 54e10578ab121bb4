"""Shared pieces of the data-set builders: features, validation, split lists and split assignment.

Every builder reads the files as distributed, validates everything (tables, image files, labels) in
Python, and only then creates in-memory `datasets.Dataset`s with `Dataset.from_dict`. No Arrow cache is
written, so a failed build leaves nothing behind and a re-run after fixing the input always re-reads the
files. (What builders write, e.g. VinBigData's DICOM -> 8-bit PNG conversion and the id files, is written
atomically through `modeling_refers.file_utils`.) Image columns hold absolute file paths; `datasets.Image()` decodes them lazily.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, NamedSplit, Value
from datasets.utils.tqdm import tqdm

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# File stems of split lists, per split (the paper's lists use val.txt or valid.txt).
SPLIT_FILE_STEMS = {"train": ("train",), "validation": ("val", "valid", "validation"), "test": ("test",)}
UNKNOWN_VIEW = "UNKNOWN"
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


class InvalidDataError(ValueError):
    """Bad input files: the message names the file, the row (or line) and what was expected.

    "row N" is the N-th data record of a table (1-based, header not counted); "line N" is the N-th text line.
    """


# ----------------------------------------------------------------------------------------------- features
def study_features() -> Features:
    """Source-domain rows: one study = several images (+ their view positions) and one report."""
    return Features(
        {
            "study_id": Value("string"),
            "patient_id": Value("string"),
            "images": List(Image()),
            "view_positions": List(Value("string")),
            "report": Value("string"),
        }
    )


def multi_label_features(label_names: Sequence[str]) -> Features:
    """Target-domain rows with a multi-hot float32 vector of length C (`label_names` order)."""
    return Features(
        {
            "image_id": Value("string"),
            "patient_id": Value("string"),
            "image": Image(),
            "labels": List(Value("float32"), length=len(label_names)),
        }
    )


def single_label_features(label_names: Sequence[str]) -> Features:
    """Target-domain rows with one class index (`datasets.ClassLabel`)."""
    return Features(
        {
            "image_id": Value("string"),
            "patient_id": Value("string"),
            "image": Image(),
            "labels": ClassLabel(names=list(label_names)),
        }
    )


# --------------------------------------------------------------------------------------------- validation
class InvalidEntries:
    """Raises `InvalidDataError` for a bad entry, or (with `skip_invalid=True`) counts it per reason."""

    def __init__(self, dataset_name: str, skip_invalid: bool = False):
        self.dataset_name = dataset_name
        self.skip_invalid = skip_invalid
        self.counts: Counter[str] = Counter()

    def __call__(self, reason: str, message: str) -> None:
        if not self.skip_invalid:
            raise InvalidDataError(message)
        self.counts[reason] += 1
        logger.debug("%s: skipped: %s", self.dataset_name, message)

    def log_summary(self) -> None:
        if self.counts:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
            logger.warning("%s: skipped %d invalid entries (%s)", self.dataset_name, sum(self.counts.values()), detail)


def read_table(path: str | os.PathLike, required_columns: Sequence[str]) -> pd.DataFrame:
    """Reads a CSV (plain or .gz) as strings (blank cells are ""), checking that `required_columns` exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as err:
        raise InvalidDataError(f"{path}: cannot be read as CSV ({err})") from err
    missing = [c for c in required_columns if c not in table.columns]
    if missing:
        raise InvalidDataError(
            f"{path}: missing column(s) {missing}; expected {list(required_columns)}, found {list(table.columns)}"
        )
    return table


def image_decode_error(path: str | os.PathLike) -> str | None:
    """None if the image file decodes, else the error. PNG: chunk CRCs checked; JPEG: decoded at 1/8 scale."""
    try:
        with PIL.Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("L", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except Exception as err:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}"
    return None


def check_images(
    entries: Sequence[tuple[Path, str]],
    invalid: InvalidEntries,
    verify_images: bool = True,
    desc: str = "Checking images",
) -> list[bool]:
    """Checks that each image exists (and decodes when `verify_images`); returns one ok-flag per entry.

    `entries` are `(path, where)` pairs; `where` names the listing file and row for the error message.
    The first bad entry (in order) raises unless `invalid.skip_invalid`.
    """
    ok = [True] * len(entries)
    errors: dict[int, tuple[str, str]] = {}
    for i, (path, where) in enumerate(entries):
        if not path.is_file():
            errors[i] = ("missing image", f"{where}: image {path} not found")
    if verify_images:
        todo = [i for i in range(len(entries)) if i not in errors]
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(image_decode_error, [entries[i][0] for i in todo], chunksize=64)
            for i, err in zip(todo, tqdm(results, total=len(todo), desc=desc, disable=len(todo) < 1000)):
                if err is not None:
                    errors[i] = ("corrupt image", f"{entries[i][1]}: image file {entries[i][0]} is corrupt ({err})")
    for i in sorted(errors):
        reason, message = errors[i]
        invalid(reason, message)
        ok[i] = False
    return ok


def count_tokens(text: str) -> int:
    """Whitespace tokens: the unit of the paper's "fewer than 3 tokens" filter."""
    return len(text.split())


def normalize_view(view: str | None) -> str:
    """Strips a view position; blank, "?" and similar placeholders become "UNKNOWN"."""
    view = (view or "").strip()
    return view if view and view not in {"?", "nan", "None"} else UNKNOWN_VIEW


def normalize_split_name(name: str) -> str | None:
    """"train"/"val"/"valid"/"validate"/"validation"/"test" -> a name of SPLITS (None if unknown)."""
    name = name.strip().lower()
    if name in {"val", "valid", "validate", "validation", "dev"}:
        return "validation"
    return name if name in SPLITS else None


# ------------------------------------------------------------------------------------------------- splits
def resolve_split_dir(data_dir: str | os.PathLike, split_dir: str | os.PathLike | None, default_name: str) -> Path:
    """`split_dir`, or `<data_dir>/../splits/<default_name>` (the layout of ../shared/data and sample_data)."""
    if split_dir is not None:
        return Path(split_dir)
    return Path(data_dir).resolve().parent / "splits" / default_name


def read_split_lists(
    split_dir: Path,
    num_label_columns: int,
    splits: Sequence[str] = SPLITS,
    key: str = "name",
) -> dict[str, tuple[str, tuple[float, ...]]]:
    """Reads REFERS split lists (`<path> <label_1> ... <label_C>` per line) from `split_dir`.

    Returns `{key: (split, labels)}`; `key` is the base file name (`"name"`) or the name without extension
    (`"stem"`). Every split in `splits` must have a list file (stems in SPLIT_FILE_STEMS).
    """
    listed: dict[str, tuple[str, tuple[float, ...]]] = {}
    where: dict[str, str] = {}
    for split in splits:
        candidates = [split_dir / f"{stem}.txt" for stem in SPLIT_FILE_STEMS[split]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{split_dir}: no split list for '{split}' (looked for {[p.name for p in candidates]})")
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 1 + num_label_columns:
                    raise InvalidDataError(
                        f"{path}, line {line_no}: expected a file name and {num_label_columns} label columns, "
                        f"found {len(parts)} fields"
                    )
                try:
                    labels = tuple(float(x) for x in parts[1:])
                except ValueError as err:
                    raise InvalidDataError(f"{path}, line {line_no}: label columns must be numbers ({err})") from err
                name = parts[0].replace("\\", "/").rsplit("/", 1)[-1]
                if key == "stem":
                    name = name.rsplit(".", 1)[0]
                if name in listed:
                    raise InvalidDataError(f"{path}, line {line_no}: '{name}' is already listed ({where[name]})")
                listed[name] = (split, labels)
                where[name] = f"{path.name}, line {line_no}"
    return listed


def seeded_patient_split(
    patients: Sequence[str], seed: int, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> dict[str, str]:
    """Patient-level split: sorted unique patients, permuted with `numpy.random.default_rng(seed)`, cut at
    floor(f_train * n + 0.5) and floor((f_train + f_val) * n + 0.5). Returns `{patient: split}`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_train = math.floor(fractions[0] * len(unique) + 0.5)
    n_train_val = math.floor((fractions[0] + fractions[1]) * len(unique) + 0.5)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[unique[index]] = "train" if rank < n_train else "validation" if rank < n_train_val else "test"
    return split_of


def assign_splits(
    keys: Sequence[str],
    patients: Sequence[str],
    listed: Mapping[str, tuple[str, tuple[float, ...]]] | None,
    seed: int,
    dataset_name: str,
    unlisted: str | None = None,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> list[str]:
    """One split per row. Rows whose key is in `listed` take the listed split. Other rows: `unlisted` if
    given (e.g. NIH: everything outside the val/test lists is train); else the split of their patient's
    listed rows (most common); else a seeded patient-level split (`seeded_patient_split`) of the
    remaining patients. `listed=None` means no lists: all rows get the seeded split."""
    listed = listed or {}
    splits: list[str | None] = [listed[k][0] if k in listed else None for k in keys]
    n_listed = sum(s is not None for s in splits)
    n_inherited = n_seeded = 0
    if unlisted is not None:
        splits = [s if s is not None else unlisted for s in splits]
    else:
        by_patient: dict[str, Counter] = {}
        for split, patient in zip(splits, patients):
            if split is not None:
                by_patient.setdefault(patient, Counter())[split] += 1
        for i, patient in enumerate(patients):
            if splits[i] is None and patient in by_patient:
                counts = by_patient[patient]
                splits[i] = max(SPLITS, key=lambda s: (counts[s], -SPLITS.index(s)))
                n_inherited += 1
        rest = [p for s, p in zip(splits, patients) if s is None]
        if rest:
            seeded = seeded_patient_split(rest, seed, fractions)
            for i, patient in enumerate(patients):
                if splits[i] is None:
                    splits[i] = seeded[patient]
                    n_seeded += 1
    n_absent = len(set(listed) - set(keys))
    logger.info(
        "%s: %d rows from the split lists, %d placed with their patient's listed rows, %d by the seeded "
        "patient-level split (seed %d)%s; %d list entries not in the data",
        dataset_name, n_listed, n_inherited, n_seeded, seed,
        f", {len(keys) - n_listed - n_inherited - n_seeded} set to '{unlisted}'" if unlisted else "", n_absent,
    )
    return splits  # type: ignore[return-value]


def compare_with_listed_labels(
    keys: Sequence[str],
    labels: Sequence[Sequence[float]],
    listed: Mapping[str, tuple[str, tuple[float, ...]]],
    dataset_name: str,
) -> int:
    """Counts rows whose label vector (already in the split-file column order) differs from the split list's;
    logs a warning with examples. Returns the count."""
    mismatched = [
        (k, tuple(y), listed[k][1]) for k, y in zip(keys, labels) if k in listed and tuple(float(v) for v in y) != listed[k][1]
    ]
    if mismatched:
        examples = "; ".join(f"{k}: data {d} vs list {l}" for k, d, l in mismatched[:3])
        logger.warning(
            "%s: %d of %d listed rows have labels that differ from the split lists (labels are taken from the "
            "data's own table); e.g. %s",
            dataset_name, len(mismatched), sum(k in listed for k in keys), examples,
        )
    return len(mismatched)


# ---------------------------------------------------------------------------------------------- building
def build_dataset_dict(rows: Sequence[Mapping], splits: Sequence[str], features: Features) -> DatasetDict:
    """Groups `rows` (dicts with the columns of `features`) by split into an in-memory DatasetDict with
    the three splits (an empty split stays, with the same features)."""
    columns = list(features)
    out = {}
    for split in SPLITS:
        chosen = [row for row, s in zip(rows, splits) if s == split]
        data = {c: [row[c] for row in chosen] for c in columns}
        out[split] = Dataset.from_dict(data, features=features, split=NamedSplit(split))
    return DatasetDict(out)


def label_presence(dataset: Dataset, label_column: str = "labels") -> np.ndarray:
    """[N, C] bool matrix: multi-hot vectors thresholded at 0.5, or one-hot of a ClassLabel column."""
    feature = dataset.features[label_column]
    values = dataset.with_format("numpy", columns=[label_column])[label_column]
    if isinstance(feature, ClassLabel):
        y = np.asarray(values, dtype=np.int64).reshape(-1)
        return np.eye(feature.num_classes, dtype=bool)[y] if len(y) else np.zeros((0, feature.num_classes), bool)
    length = getattr(feature, "length", -1)
    if len(dataset) == 0:
        return np.zeros((0, max(length, 0)), dtype=bool)
    return np.stack([np.asarray(v, dtype=np.float32) for v in values]) > 0.5


def warn_missing_positives(
    dataset_dict: DatasetDict, label_names: Sequence[str], dataset_name: str, label_column: str = "labels"
) -> None:
    """`warnings.warn` for every split and class without a positive example (such a class has no AUC)."""
    for split, dataset in dataset_dict.items():
        if len(dataset) == 0:
            warnings.warn(f"{dataset_name}: split '{split}' is empty", stacklevel=3)
            continue
        present = label_presence(dataset, label_column).any(axis=0)
        missing = [name for name, p in zip(label_names, present) if not p]
        if missing:
            warnings.warn(
                f"{dataset_name}: split '{split}' ({len(dataset)} rows) has no positive example of class(es) "
                f"{', '.join(repr(m) for m in missing)}",
                stacklevel=3,
            )
