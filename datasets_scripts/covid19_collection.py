"""COVID-19 image data collection (ieee8023): target tasks and a source-domain study set.

Layout (as in the upstream repository and ../shared/data/covid19_collection): `<data_dir>/metadata.csv`
(columns `patientid, finding, view, modality, date, offset, folder, filename, clinical_notes, license`,
... and, in the shared snapshot, `original_filename`) and the images at `<data_dir>/<folder>/<filename>`.

Rows used: `modality == "X-ray"` (upstream also lists CT slices). Duplicates: upstream lists the same
image files under two patient ids (285/339 and 287/340 share five files); rows are de-duplicated on
`filename`, keeping the first row, so each image appears once, under the lower patient id, and patients
339/340 disappear.

Splits (shared by both tasks and by the study set, so a patient is in the same split everywhere and
pretraining on `train` never sees a fine-tuning test patient): the paper's lists `train/val/test.txt`
(default `<data_dir>/../splits/covid19_collection`, matched on `original_filename` when that column
exists, else `filename`); an unlisted image follows its patient's listed images; remaining patients get a
seeded 70/10/20 patient-level split. (The paper's lists are patient-consistent on the shared snapshot.)

Target tasks, labels from the `finding` column (tokens split at "/" and ","; both the 2020 flat names,
e.g. "COVID-19, ARDS", and later hierarchical ones, e.g. "Pneumonia/Viral/COVID-19", are understood):
- `task="covid"`: ClassLabel ("non-COVID-19", "COVID-19"); COVID-19 when a token is "COVID-19", else any
  other known finding (including "No Finding"). Same column order as the paper's two one-hot columns.
- `task="viral_bacterial"`: ClassLabel ("bacterial", "viral"); only rows whose finding is a viral or a
  bacterial pneumonia (COVID-19 counts as viral); fungal, unspecified and non-pneumonia findings are left out.
Rows with finding "todo" (not yet labelled upstream) or blank are left out (counted in the log). A token
outside the known vocabulary is an error (file, row, label).

Source studies (`load_covid19_studies`): one study per patient and exam day. The snapshot's `date` is
often only a year (174 rows say "2020"), so the default key is (`patientid`, `date`, `offset`), offset =
days since symptom onset; pass `group_by=("patientid", "date")` to group on the date column alone.
Images keep table order; views come from `view` (blank or "?" -> "UNKNOWN"); the report is the distinct
non-empty `clinical_notes` of the study's rows joined in order; studies with fewer than
`min_report_tokens` whitespace tokens (including empty notes) are dropped and counted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from datasets import DatasetDict

from .common import (
    SPLITS,
    InvalidDataError,
    InvalidEntries,
    assign_splits,
    build_dataset_dict,
    check_images,
    compare_with_listed_labels,
    count_tokens,
    normalize_view,
    read_split_lists,
    read_table,
    resolve_split_dir,
    single_label_features,
    study_features,
    warn_missing_positives,
)

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_DIR = "covid19_collection"
COVID_LABEL_NAMES = ("non-COVID-19", "COVID-19")
VIRAL_BACTERIAL_LABEL_NAMES = ("bacterial", "viral")
TASKS = ("covid", "viral_bacterial")
REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "folder", "filename", "clinical_notes", "license")

UNLABELLED = frozenset({"todo", ""})
COVID = "COVID-19"
VIRAL = frozenset({"COVID-19", "Viral", "SARS", "MERS", "MERS-CoV", "Varicella", "Influenza", "Herpes", "H1N1",
                   "Herpes Simplex", "Adenovirus", "RSV"})
BACTERIAL = frozenset({"Bacterial", "Streptococcus", "Klebsiella", "Mycoplasma", "Mycoplasma Bacterial Pneumonia",
                       "Legionella", "E.Coli", "Chlamydophila", "Staphylococcus", "Staphylococcus aureus",
                       "Nocardia", "Mycobacterium", "Tuberculosis", "Pseudomonas", "Haemophilus"})
OTHER = frozenset({"Pneumonia", "No Finding", "ARDS", "Pneumocystis", "Fungal", "Aspergillosis", "Lipoid",
                   "Aspiration", "Unknown", "Cryptococcus", "Candida", "Lung Cancer", "Mass", "Edema"})
KNOWN_FINDINGS = VIRAL | BACTERIAL | OTHER


def finding_tokens(finding: str) -> list[str]:
    return [t.strip() for t in re.split(r"[/,]", finding) if t.strip()]


def classify_finding(finding: str, where: str) -> dict[str, int | None] | None:
    """`{"covid": 0|1, "viral_bacterial": 0|1|None}` for a `finding` value; None when unlabelled ("todo").
    InvalidDataError for a token outside the known vocabulary."""
    if finding.strip().lower() in UNLABELLED:
        return None
    tokens = finding_tokens(finding)
    unknown = [t for t in tokens if t not in KNOWN_FINDINGS]
    if unknown:
        raise InvalidDataError(f"{where}: unknown label '{unknown[0]}' in 'finding' ({finding!r})")
    viral, bacterial = any(t in VIRAL for t in tokens), any(t in BACTERIAL for t in tokens)
    return {"covid": int(COVID in tokens), "viral_bacterial": 1 if viral and not bacterial else 0 if bacterial and not viral else None}


def _read_rows(data_dir: Path) -> tuple[pd.DataFrame, Path]:
    """X-ray rows, de-duplicated on filename, with a `_row` column (1-based data row of metadata.csv)."""
    table_path = data_dir / "metadata.csv"
    table = read_table(table_path, REQUIRED_COLUMNS)
    table["_row"] = range(1, len(table) + 1)
    xray = table[table["modality"].str.strip() == "X-ray"]
    if len(xray) < len(table):
        logger.info("covid19_collection: %d non-X-ray rows left out", len(table) - len(xray))
    deduped = xray.drop_duplicates(subset="filename", keep="first")
    if len(deduped) < len(xray):
        dropped = xray[~xray.index.isin(deduped.index)]
        logger.info(
            "covid19_collection: %d rows repeat an image file already listed (patients %s); kept once",
            len(dropped), sorted(set(dropped["patientid"])),
        )
    return deduped.reset_index(drop=True), table_path


def _split_key_column(table: pd.DataFrame) -> str:
    return "original_filename" if "original_filename" in table.columns else "filename"


def _assign(table: pd.DataFrame, data_dir: Path, split_dir, split_seed: int, name: str):
    lists_dir = resolve_split_dir(data_dir, split_dir, DEFAULT_SPLIT_DIR)
    listed = None
    if lists_dir.is_dir():
        listed = read_split_lists(lists_dir, 2)
    else:
        logger.info("%s: no split lists at %s; seeded 70/10/20 patient-level split", name, lists_dir)
    keys = list(table[_split_key_column(table)].str.strip())
    splits = assign_splits(keys, list(table["patientid"].str.strip()), listed, split_seed, name)
    return dict(zip(table["filename"], splits)), listed


def load_covid19_collection(
    data_dir: str | os.PathLike,
    task: str = "covid",
    split_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """One classification task of the collection as a DatasetDict (train/validation/test) of `image_id`
    (file name), `patient_id`, `image`, `labels` (ClassLabel). `task`: "covid" or "viral_bacterial"."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    data_dir = Path(data_dir).absolute()
    table, table_path = _read_rows(data_dir)
    name = f"covid19_collection[{task}]"
    invalid = InvalidEntries(name, skip_invalid)
    split_of, listed = _assign(table, data_dir, split_dir, split_seed, name)

    rows, entries, keys, n_unlabelled, n_other = [], [], [], 0, 0
    for record in table.to_dict("records"):
        where = f"{table_path}, row {record['_row']}"
        try:
            classes = classify_finding(record["finding"], where)
        except InvalidDataError as err:
            invalid("unknown label", str(err))
            continue
        if classes is None:
            n_unlabelled += 1
            continue
        if classes[task] is None:
            n_other += 1
            continue
        path = data_dir / record["folder"].strip() / record["filename"].strip()
        rows.append({"image_id": record["filename"].strip(), "patient_id": record["patientid"].strip(),
                     "image": str(path), "labels": classes[task], "_split": split_of[record["filename"]]})
        entries.append((path, f"{where} ({record['filename']})"))
        keys.append(record[_split_key_column(table)].strip())
    logger.info("%s: %d unlabelled rows ('todo'/blank) and %d rows outside the task left out", name, n_unlabelled, n_other)
    ok = check_images(entries, invalid, verify_images, desc="Checking COVID-19 collection images")
    rows = [r for r, good in zip(rows, ok) if good]
    keys = [k for k, good in zip(keys, ok) if good]
    invalid.log_summary()
    if task == "covid" and listed:
        compare_with_listed_labels(keys, [[1.0 - r["labels"], float(r["labels"])] for r in rows], listed, name)
    label_names = COVID_LABEL_NAMES if task == "covid" else VIRAL_BACTERIAL_LABEL_NAMES
    dataset = build_dataset_dict(rows, [r.pop("_split") for r in rows], single_label_features(label_names))
    logger.info("%s: %s", name, {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, label_names, name)
    return dataset


def load_covid19_studies(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    group_by: Sequence[str] = ("patientid", "date", "offset"),
    min_report_tokens: int = 3,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Source-domain studies of the collection as a DatasetDict (train/validation/test) of `study_id`,
    `patient_id`, `images`, `view_positions`, `report` (the clinical notes). See the module docstring."""
    data_dir = Path(data_dir).absolute()
    table, table_path = _read_rows(data_dir)
    missing = [c for c in group_by if c not in table.columns]
    if missing or "patientid" not in group_by:
        raise ValueError(f"group_by must include 'patientid' and name columns of {table_path}; got {list(group_by)}")
    invalid = InvalidEntries("covid19_studies", skip_invalid)
    split_of, _ = _assign(table, data_dir, split_dir, split_seed, "covid19_studies")
    paths = [data_dir / f.strip() / n.strip() for f, n in zip(table["folder"], table["filename"])]
    ok = check_images([(p, f"{table_path}, row {r} ({p.name})") for p, r in zip(paths, table["_row"])], invalid,
                      verify_images, desc="Checking COVID-19 collection images")
    table = table.assign(_path=[str(p) for p in paths], _ok=ok)

    rows, splits, n_short, n_no_image = [], [], 0, 0
    for key, group in table.groupby(list(group_by), sort=False):
        group = group[group["_ok"]]
        if group.empty:
            n_no_image += 1
            continue
        notes = list(dict.fromkeys(n.strip() for n in group["clinical_notes"] if n.strip()))
        report = " ".join(" ".join(notes).split())
        if count_tokens(report) < min_report_tokens:
            n_short += 1
            continue
        key = key if isinstance(key, tuple) else (key,)
        study_id = "_".join(re.sub(r"[^0-9A-Za-z]+", "-", str(v)).strip("-") or "NA" for v in key)
        group_splits = [split_of[f] for f in group["filename"]]
        rows.append({"study_id": study_id, "patient_id": group["patientid"].iloc[0].strip(),
                     "images": list(group["_path"]), "view_positions": [normalize_view(v) for v in group["view"]],
                     "report": report})
        splits.append(max(SPLITS, key=lambda s: (group_splits.count(s), -SPLITS.index(s))))
    invalid.log_summary()
    logger.info(
        "covid19_studies: %d studies kept; %d dropped with fewer than %d report tokens, %d with no valid image",
        len(rows), n_short, min_report_tokens, n_no_image,
    )
    dataset = build_dataset_dict(rows, splits, study_features())
    logger.info("covid19_studies: %s", {k: len(v) for k, v in dataset.items()})
    return dataset
