"""MIMIC-CXR-JPG (+ the MIMIC-CXR free-text reports) -> source-domain studies with the official split.

Layout (PhysioNet, as distributed):
- `<data_dir>/mimic-cxr-2.0.0-split.csv.gz`: `dicom_id, study_id, subject_id, split` (train/validate/test);
- `<data_dir>/mimic-cxr-2.0.0-metadata.csv.gz`: `dicom_id, ..., ViewPosition, ...`;
- images `<data_dir>/files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg`;
- reports (from MIMIC-CXR, not -JPG): `mimic-cxr-reports.zip` or its extracted folder, holding
  `files/p<xx>/p<subject_id>/s<study_id>.txt`. By default the first of `<data_dir>/mimic-cxr-reports.zip`,
  `<data_dir>/mimic-cxr-reports/`, `<data_dir>` that holds the reports is used.

One row per study (images in split-file order); `report` = findings + impression
(`extract_findings_impression`); studies whose report has fewer than `min_report_tokens` whitespace
tokens are dropped and counted (the paper: fewer than 3 tokens, 217k studies remain). A study whose
report file is missing is an error (or a counted skip with `skip_invalid=True`).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

from datasets import DatasetDict

from .common import (
    InvalidEntries,
    build_dataset_dict,
    check_images,
    count_tokens,
    normalize_split_name,
    normalize_view,
    read_table,
    study_features,
)
from .reports import extract_findings_impression

logger = logging.getLogger(__name__)

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = ("dicom_id", "ViewPosition")
_REPORT_NAME = re.compile(r"(?:^|/)p\d+/p(?P<subject>\d+)/s(?P<study>\d+)\.txt$")


class MimicReports:
    """Report texts by (subject_id, study_id), from `mimic-cxr-reports.zip` or a folder of `.txt` files."""

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None
        names = self._zip.namelist() if self._zip else None
        self._members: dict[tuple[str, str], str] | None = None
        if names is not None:
            self._members = {}
            for name in names:
                match = _REPORT_NAME.search(name)
                if match:
                    self._members[(match.group("subject"), match.group("study"))] = name

    def where(self, subject_id: str, study_id: str) -> str:
        relative = f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"
        return f"{self.path}!{relative}" if self._zip else str(self.path / relative)

    def read(self, subject_id: str, study_id: str) -> str | None:
        if self._zip is not None:
            member = self._members.get((subject_id, study_id))
            return self._zip.read(member).decode("utf-8", errors="replace") if member else None
        path = self.path / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def find_reports(data_dir: Path) -> Path:
    for candidate in (data_dir / "mimic-cxr-reports.zip", data_dir / "mimic-cxr-reports"):
        if candidate.exists():
            return candidate
    if any((data_dir / "files").glob("p*/p*/s*.txt")):
        return data_dir
    raise FileNotFoundError(
        f"{data_dir}: no MIMIC-CXR reports (looked for mimic-cxr-reports.zip, mimic-cxr-reports/, files/p*/p*/s*.txt); "
        "pass reports_path="
    )


def load_mimic_cxr(
    data_dir: str | os.PathLike,
    reports_path: str | os.PathLike | None = None,
    split_path: str | os.PathLike | None = None,
    metadata_path: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    min_report_tokens: int = 3,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """MIMIC-CXR-JPG studies as a DatasetDict (train/validation/test) of `study_id`, `patient_id`
    (subject_id), `images`, `view_positions` (ViewPosition, blank -> "UNKNOWN"), `report`."""
    data_dir = Path(data_dir).absolute()
    split_path = Path(split_path) if split_path is not None else data_dir / SPLIT_FILE
    metadata_path = Path(metadata_path) if metadata_path is not None else data_dir / METADATA_FILE
    image_dir = Path(image_dir).absolute() if image_dir is not None else data_dir / "files"
    split_table = read_table(split_path, SPLIT_COLUMNS)
    metadata = read_table(metadata_path, METADATA_COLUMNS)
    view_of = dict(zip(metadata["dicom_id"].str.strip(), metadata["ViewPosition"]))
    invalid = InvalidEntries("mimic_cxr", skip_invalid)

    studies: dict[str, dict] = {}
    for row_no, record in enumerate(split_table.to_dict("records"), start=1):
        where = f"{split_path}, row {row_no}"
        dicom_id, study_id, subject_id = (record[c].strip() for c in ("dicom_id", "study_id", "subject_id"))
        split = normalize_split_name(record["split"])
        if split is None:
            invalid("unknown split", f"{where}: unknown split {record['split']!r} (expected train, validate or test)")
            continue
        study = studies.setdefault(study_id, {"subject": subject_id, "split": split, "images": [], "where": where})
        if study["subject"] != subject_id or study["split"] != split:
            invalid("inconsistent study", f"{where}: study {study_id} has subject/split {subject_id}/{split} here "
                    f"but {study['subject']}/{study['split']} at {study['where']}")
            continue
        path = image_dir / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"
        study["images"].append((path, normalize_view(view_of.get(dicom_id)), f"{where} (dicom {dicom_id})"))

    entries = [(path, where) for study in studies.values() for path, _, where in study["images"]]
    ok = check_images(entries, invalid, verify_images, desc="Checking MIMIC-CXR images")
    offset = 0
    reports = MimicReports(Path(reports_path) if reports_path is not None else find_reports(data_dir))
    rows, splits, n_short, n_no_image = [], [], 0, 0
    try:
        for study_id, study in studies.items():
            flags = ok[offset : offset + len(study["images"])]
            offset += len(study["images"])
            images = [(str(p), v) for (p, v, _), good in zip(study["images"], flags) if good]
            if not images:
                n_no_image += 1
                continue
            text = reports.read(study["subject"], study_id)
            if text is None:
                invalid("missing report", f"{study['where']}: report {reports.where(study['subject'], study_id)} "
                        f"of study {study_id} not found")
                continue
            report = extract_findings_impression(text)
            if count_tokens(report) < min_report_tokens:
                n_short += 1
                continue
            rows.append({"study_id": study_id, "patient_id": study["subject"], "images": [p for p, _ in images],
                         "view_positions": [v for _, v in images], "report": report})
            splits.append(study["split"])
    finally:
        reports.close()
    invalid.log_summary()
    logger.info(
        "mimic_cxr: %d studies kept; %d dropped with fewer than %d report tokens, %d with no valid image",
        len(rows), n_short, min_report_tokens, n_no_image,
    )
    dataset = build_dataset_dict(rows, splits, study_features())
    logger.info("mimic_cxr: %s", {k: len(v) for k, v in dataset.items()})
    return dataset
