"""Any folder of studies described by `metadata.jsonl` -> source-domain studies.

One JSON object per line:
    {"file_names": ["s1/frontal.png", "s1/lateral.png"], "report": "...",
     "views": ["PA", "LATERAL"], "split": "train", "study_id": "s1", "patient_id": "p1"}
`file_names` (paths relative to the folder, at least one; absolute paths and `..` are refused) and `report` are required; `views` (same length
as `file_names`; default "UNKNOWN"), `split` (train / validation (or val, valid, validate) / test),
`study_id` (default: "line<N>") and `patient_id` (default: the study id) are optional. Either every line
has a `split` or none has; without splits a seeded 70/10/20 patient-level split is made. Studies with
fewer than `min_report_tokens` report tokens are dropped (counted).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from datasets import DatasetDict

from .common import (
    InvalidDataError,
    InvalidEntries,
    build_dataset_dict,
    check_images,
    count_tokens,
    normalize_split_name,
    normalize_view,
    seeded_patient_split,
    study_features,
)

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"


def _escapes_folder(name: str) -> bool:
    """True for an absolute path (POSIX or Windows, incl. `C:x` and `\\\\server\\share`) or one with a `..` part."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return (posix.is_absolute() or bool(windows.drive) or windows.root != ""
            or ".." in posix.parts or ".." in windows.parts)


def _parse_line(line: str, where: str, line_no: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InvalidDataError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise InvalidDataError(f"{where}: expected a JSON object")
    for field in ("file_names", "report"):
        if field not in record:
            raise InvalidDataError(f"{where}: missing field '{field}'")
    names = record["file_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidDataError(f"{where}: 'file_names' must be a non-empty list of relative paths")
    for name in names:
        if _escapes_folder(name):
            raise InvalidDataError(
                f"{where}: file name {name!r} is not a relative path inside the folder (absolute paths, drive "
                "letters and '..' are refused); give it relative to the folder of metadata.jsonl"
            )
    if not isinstance(record["report"], str):
        raise InvalidDataError(f"{where}: 'report' must be a string")
    views = record.get("views")
    if views is not None and (not isinstance(views, list) or len(views) != len(names)):
        raise InvalidDataError(f"{where}: 'views' must be a list as long as 'file_names' ({len(names)})")
    split = None
    if record.get("split") is not None:
        split = normalize_split_name(str(record["split"]))
        if split is None:
            raise InvalidDataError(f"{where}: unknown split {record['split']!r} (expected train, validation or test)")
    study_id = str(record.get("study_id", f"line{line_no}"))
    return {
        "study_id": study_id,
        "patient_id": str(record.get("patient_id", study_id)),
        "file_names": names,
        "views": [normalize_view(str(v)) for v in views] if views is not None else None,
        "report": " ".join(record["report"].split()),
        "split": split,
    }


def load_study_folder(
    data_dir: str | os.PathLike,
    min_report_tokens: int = 3,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Studies of `<data_dir>/metadata.jsonl` as a DatasetDict (train/validation/test) of `study_id`,
    `patient_id`, `images`, `view_positions`, `report`."""
    data_dir = Path(data_dir).absolute()
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    invalid = InvalidEntries("study_folder", skip_invalid)
    records, entries, seen = [], [], {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = _parse_line(line, where, line_no)
                if record["study_id"] in seen:
                    raise InvalidDataError(f"{where}: study_id {record['study_id']!r} already used on line {seen[record['study_id']]}")
            except InvalidDataError as err:
                invalid("malformed line", str(err))
                continue
            seen[record["study_id"]] = line_no
            record["paths"] = [data_dir / name for name in record["file_names"]]
            entries.extend((p, f"{where} ({name})") for p, name in zip(record["paths"], record["file_names"]))
            records.append(record)
    with_split = [r["split"] is not None for r in records]
    if any(with_split) and not all(with_split):
        first = with_split.index(False) if with_split[0] else with_split.index(True)
        raise InvalidDataError(
            f"{path}: 'split' is given for some studies but not others (first differing study: "
            f"{records[first]['study_id']!r}); give it on every line or on none"
        )
    ok = check_images(entries, invalid, verify_images, desc="Checking study images")

    rows, splits, offset, n_short, n_no_image = [], [], 0, 0, 0
    for record in records:
        flags = ok[offset : offset + len(record["paths"])]
        offset += len(record["paths"])
        views = record["views"] or [normalize_view(None)] * len(record["paths"])
        kept = [(str(p), v) for p, v, good in zip(record["paths"], views, flags) if good]
        if not kept:
            n_no_image += 1
            continue
        if count_tokens(record["report"]) < min_report_tokens:
            n_short += 1
            continue
        rows.append({"study_id": record["study_id"], "patient_id": record["patient_id"], "images": [p for p, _ in kept],
                     "view_positions": [v for _, v in kept], "report": record["report"]})
        splits.append(record["split"])
    invalid.log_summary()
    logger.info("study_folder: %d studies kept; %d dropped with fewer than %d report tokens, %d with no valid image",
                len(rows), n_short, min_report_tokens, n_no_image)
    if rows and splits[0] is None:
        split_of = seeded_patient_split([r["patient_id"] for r in rows], split_seed)
        splits = [split_of[r["patient_id"]] for r in rows]
    dataset = build_dataset_dict(rows, splits, study_features())
    logger.info("study_folder: %s", {k: len(v) for k, v in dataset.items()})
    return dataset
