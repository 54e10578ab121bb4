"""Paired-by-finding studies: Kermany pediatric radiographs, each with a real Open-i report of the same finding.

A controlled check of the pretraining mechanism on real images and real report language, NOT paired clinical data:
the report of a study comes from another patient (an adult, in Indiana), chosen only because its MeSH tags give it
the same finding as the radiograph's label. What a model can learn from these pairs is the finding, through report
language with its negations ("no focal consolidation"), which is what study-report consistency and report
generation must pick up.

- Images: the Kermany `train/` folder only (`kermany_records`); the official `test/` patients are never used, so a
  model pretrained here can be fine-tuned and tested on `load_kermany_pneumonia` without leakage.
- Reports (`NLMCXR_reports.tgz`, Open-i, CC BY-NC-ND 4.0, text unchanged): FINDINGS + IMPRESSION;
  `normal` = reports whose only MeSH major term is "normal"; `pneumonia` = reports with a MeSH major term of airspace
  disease, consolidation, infiltrate or pneumonia. Reports with fewer than `min_report_tokens` tokens are dropped.
- Split: Kermany training patients are split train/validation by a seeded patient-level split (`val_fraction`);
  the report pools are split the same way by report, so validation studies carry reports never seen in training
  (held-out retrieval). Within a split each report of a finding is used in turn over a seeded shuffle (a pool
  smaller than its images is reused evenly). Rows come in a seeded random order, so the first N rows of a split (e.g.
  `--max_train_samples`) are a random sample of both findings.

Rows: the source-domain columns (`study_id`, `patient_id`, `images`, `view_positions`, `report`) plus `finding`
(`normal` / `pneumonia`) and `report_id` (the Open-i report's uId).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from datasets import DatasetDict, Value

from .common import InvalidDataError, build_dataset_dict, count_tokens, seeded_patient_split, study_features
from .iu_xray import iter_report_xmls, parse_report_xml
from .kermany_pneumonia import kermany_records

logger = logging.getLogger(__name__)

FINDINGS = ("normal", "pneumonia")
PNEUMONIA_MESH_TERMS = ("airspace disease", "consolidation", "infiltrate", "pneumonia")
DEFAULT_REPORTS = Path("..") / "iu_xray" / "NLMCXR_reports.tgz"


def report_finding(major_terms: list[str]) -> str | None:
    """`normal` when the MeSH major terms are exactly "normal"; `pneumonia` when one of them (its part before the
    first '/') is airspace disease, consolidation, infiltrate or pneumonia; else None."""
    heads = [term.split("/")[0].strip().lower() for term in major_terms if term.strip()]
    if heads == ["normal"]:
        return "normal"
    if any(head in PNEUMONIA_MESH_TERMS for head in heads):
        return "pneumonia"
    return None


def load_finding_reports(reports_path: str | os.PathLike, min_report_tokens: int = 3) -> dict[str, list[dict]]:
    """`{finding: [{"report_id", "report"}, ...]}` from Open-i's XML reports (sorted by report id)."""
    pools: dict[str, list[dict]] = {finding: [] for finding in FINDINGS}
    for where, content in iter_report_xmls(Path(reports_path)):
        report = parse_report_xml(content, where)
        finding = report_finding(report["mesh_major"])
        text = " ".join(t for t in (report["findings"], report["impression"]) if t)
        if finding is not None and count_tokens(text) >= min_report_tokens:
            pools[finding].append({"report_id": report["study_id"], "report": text})
    for finding in FINDINGS:
        pools[finding].sort(key=lambda r: r["report_id"])
        if not pools[finding]:
            raise InvalidDataError(f"{reports_path}: no Open-i report tagged {finding!r} (MeSH major terms)")
    return pools


def _split_reports(reports: list[dict], seed: int, val_fraction: float) -> dict[str, list[dict]]:
    order = np.random.default_rng(seed).permutation(len(reports))
    n_val = max(1, int(round(val_fraction * len(reports)))) if val_fraction > 0 else 0
    return {"validation": [reports[i] for i in order[:n_val]], "train": [reports[i] for i in order[n_val:]]}


def load_kermany_paired_reports(
    data_dir: str | os.PathLike,
    reports_path: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    min_report_tokens: int = 3,
) -> DatasetDict:
    """Kermany training radiographs paired by finding with Open-i reports (see the module docstring): a DatasetDict
    with `train` and `validation` (and an empty `test`). `reports_path` defaults to `../iu_xray/NLMCXR_reports.tgz`
    next to `data_dir` (the layout of ../shared/data)."""
    data_dir = Path(data_dir).absolute()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    reports_path = Path(reports_path) if reports_path is not None else data_dir / DEFAULT_REPORTS
    if not reports_path.exists():
        raise FileNotFoundError(
            f"{reports_path}: Open-i reports not found; pass reports_path= (the NLMCXR_reports.tgz archive or its "
            "extracted folder of XMLs)")
    records = [r for r in kermany_records(data_dir) if r["split"] == "train"]
    pools = load_finding_reports(reports_path, min_report_tokens)
    split_of = seeded_patient_split([r["patient_id"] for r in records], seed, (1.0 - val_fraction, val_fraction, 0.0))
    rng = np.random.default_rng(seed + 1)
    report_splits = {f: _split_reports(pools[f], seed + 2, val_fraction) for f in FINDINGS}

    rows, splits = [], []
    for split in ("train", "validation"):
        for finding in FINDINGS:
            chosen = [r for r in records if split_of[r["patient_id"]] == split and _finding(r) == finding]
            pool = report_splits[finding][split]
            if chosen and not pool:
                raise InvalidDataError(f"{reports_path}: no {finding!r} report left for the {split} split")
            order = rng.permutation(len(pool))
            for i, record in enumerate(chosen):
                report = pool[order[i % len(pool)]]
                rows.append({"study_id": Path(record["path"]).stem, "patient_id": record["patient_id"],
                             "images": [record["path"]], "view_positions": ["AP"], "report": report["report"],
                             "finding": finding, "report_id": report["report_id"]})
                splits.append(split)
    order = np.random.default_rng(seed + 3).permutation(len(rows))  # findings interleaved: any prefix is a sample
    rows, splits = [rows[i] for i in order], [splits[i] for i in order]
    features = study_features()
    features["finding"] = Value("string")
    features["report_id"] = Value("string")
    dataset = build_dataset_dict(rows, splits, features)
    logger.info("kermany_paired_reports: %s studies; reports: %s", {k: len(v) for k, v in dataset.items()},
                {f: {s: len(p) for s, p in report_splits[f].items()} for f in FINDINGS})
    return dataset


def _finding(record: dict) -> str:
    return "normal" if record["finding"] == "normal" else "pneumonia"
