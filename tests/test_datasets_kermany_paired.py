"""Paired-by-finding source data: Kermany training radiographs with Open-i reports of the same finding."""

import functools

import numpy as np
import pytest
from datasets import Image, List

from datasets_scripts import SOURCE_DATASETS, kermany_records, load_kermany_paired_reports, load_kermany_pneumonia
from datasets_scripts.iu_xray import iter_report_xmls, parse_report_xml
from datasets_scripts.kermany_paired_reports import report_finding


@pytest.fixture
def kermany_dir(need_shared_data):
    root = need_shared_data("kermany_pneumonia/train", "iu_xray/NLMCXR_reports.tgz",
                            why="the whole Kermany training folder and the Open-i reports")
    return root / "kermany_pneumonia"


@functools.lru_cache(maxsize=None)
def _paired(kermany_dir, seed):
    return load_kermany_paired_reports(kermany_dir, seed=seed)


@pytest.fixture
def paired(kermany_dir):
    return _paired(kermany_dir, 0)


@pytest.fixture
def open_i(kermany_dir):
    reports = {}
    for where, content in iter_report_xmls(kermany_dir.parent / "iu_xray" / "NLMCXR_reports.tgz"):
        report = parse_report_xml(content, where)
        reports[report["study_id"]] = report
    return reports


def test_report_finding_reads_mesh_major_terms():
    assert report_finding(["normal"]) == "normal"
    assert report_finding(["normal", "Opacity/lung"]) is None  # "only normal" means exactly that
    assert report_finding(["Airspace Disease/lung/upper lobe/right"]) == "pneumonia"
    assert report_finding(["Cardiomegaly/mild", "Consolidation/lung/base/left"]) == "pneumonia"
    assert report_finding(["Infiltrate/lung"]) == "pneumonia"
    assert report_finding(["Cardiomegaly", "Pleural Effusion"]) is None
    assert report_finding([]) is None


def test_every_study_is_a_training_radiograph_with_a_real_report_of_its_finding(paired, kermany_dir, open_i):
    records = {r["path"]: r for r in kermany_records(kermany_dir)}
    assert len(paired["test"]) == 0
    for split in ("train", "validation"):
        rows = paired[split].cast_column("images", List(Image(decode=False)))
        for row in rows:
            (path,) = [image["path"] for image in row["images"]]
            record = records[path]
            assert record["split"] == "train"  # the official test patients are never used
            assert record["patient_id"] == row["patient_id"]
            assert row["finding"] == ("normal" if record["finding"] == "normal" else "pneumonia")
            source = open_i[row["report_id"]]
            assert report_finding(source["mesh_major"]) == row["finding"]
            # the report text is Open-i's FINDINGS + IMPRESSION, unchanged
            assert row["report"] == " ".join(t for t in (source["findings"], source["impression"]) if t)


def test_patients_and_reports_of_validation_are_never_seen_in_training(paired, kermany_dir):
    train_patients, val_patients = set(paired["train"]["patient_id"]), set(paired["validation"]["patient_id"])
    assert not train_patients & val_patients
    assert not set(paired["train"]["report_id"]) & set(paired["validation"]["report_id"])
    # the same validation patients as the fine-tuning builder with the same seed and fraction
    target = load_kermany_pneumonia(kermany_dir, split_seed=0, verify_images=False)
    assert val_patients == set(target["validation"]["patient_id"])
    total = sum(1 for r in kermany_records(kermany_dir) if r["split"] == "train")
    assert len(paired["train"]) + len(paired["validation"]) == total == 5216


def test_reports_are_reused_evenly_and_the_pairing_follows_the_seed(paired, kermany_dir):
    for split in ("train", "validation"):
        for finding in ("normal", "pneumonia"):
            ids = [i for i, f in zip(paired[split]["report_id"], paired[split]["finding"]) if f == finding]
            counts = np.unique(ids, return_counts=True)[1]
            assert counts.max() - counts.min() <= 1, (split, finding, counts.min(), counts.max())
    other = _paired(kermany_dir, 1)
    assert other["train"]["report_id"] != paired["train"]["report_id"]
    again = load_kermany_paired_reports(kermany_dir, seed=0)
    assert again["train"]["report_id"] == paired["train"]["report_id"]


def test_registered_as_a_source_data_set_and_clear_errors(kermany_dir, tmp_path):
    assert SOURCE_DATASETS["kermany_paired_reports"].loader is load_kermany_paired_reports
    with pytest.raises(FileNotFoundError, match="reports_path"):
        load_kermany_paired_reports(kermany_dir, reports_path=tmp_path / "missing.tgz")
    with pytest.raises(ValueError, match="val_fraction"):
        load_kermany_paired_reports(kermany_dir, val_fraction=1.5)


def test_rows_come_in_random_order_so_a_prefix_samples_both_findings(paired):
    findings = paired["train"]["finding"]
    share = np.mean([f == "pneumonia" for f in findings])
    prefix = np.mean([f == "pneumonia" for f in findings[:200]])
    assert abs(prefix - share) < 0.1, (prefix, share)
