"""Registry of data sets (TARGET_DATASETS / SOURCE_DATASETS) and the embedded sample in sample_data/."""

import csv
import dataclasses
import filecmp
import importlib.util
import warnings

import pytest

import datasets
from datasets_scripts import (
    SAMPLE_DATA_DIR,
    SOURCE_DATASETS,
    TARGET_DATASETS,
    load_covid19_studies,
    load_nih_chestxray14,
    load_source_dataset,
    load_target_dataset,
)


def test_target_specs():
    assert sorted(TARGET_DATASETS) == ["covid19", "covid19_viral_bacterial", "nih_chestxray14", "shenzhen_tb", "vinbigdata"]
    expected = {"nih_chestxray14": (14, "multi_label_classification", "nih_chestxray14"),
                "vinbigdata": (14, "multi_label_classification", "vinbigdata"),
                "shenzhen_tb": (2, "single_label_classification", "shenzhen_tb"),
                "covid19": (2, "single_label_classification", "covid19_collection"),
                "covid19_viral_bacterial": (2, "single_label_classification", "covid19_collection")}
    for name, spec in TARGET_DATASETS.items():
        assert spec.name == name
        assert (len(spec.label_names), spec.problem_type, spec.default_split_dir) == expected[name]
        assert spec.num_labels == len(spec.label_names)
        assert isinstance(spec.label_names, tuple) and all(isinstance(n, str) for n in spec.label_names)
        assert callable(spec.loader)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"
    assert sorted(SOURCE_DATASETS) == ["covid19_studies", "iu_xray", "mimic_cxr", "study_folder"]


def test_default_split_dirs_exist_in_shared_data(shared_data_dir):
    for spec in TARGET_DATASETS.values():
        assert (shared_data_dir / "splits" / spec.default_split_dir).is_dir(), spec.name


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown target data set 'chexpert'; valid names: covid19, covid19_viral_bacterial, "
                                         r"nih_chestxray14, shenzhen_tb, vinbigdata"):
        load_target_dataset("chexpert", ".")
    with pytest.raises(ValueError, match=r"task is fixed by the data set name 'covid19'"):
        load_target_dataset("covid19", ".", task="viral_bacterial")
    with pytest.raises(ValueError, match=r"unknown source data set 'padchest'; valid names: covid19_studies, iu_xray, "
                                         r"mimic_cxr, study_folder"):
        load_source_dataset("padchest", ".")


# ------------------------------------------------------------------------------------------ sample data
def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_sample_is_small_and_licensed():
    total = sum(p.stat().st_size for p in _files(SAMPLE_DATA_DIR))
    blocks = sum(p.stat().st_blocks * 512 for p in _files(SAMPLE_DATA_DIR))
    assert total < 5 * 2**20 and blocks < 5 * 2**20, (total, blocks)
    with open(SAMPLE_DATA_DIR / "covid19_collection" / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with open(SAMPLE_DATA_DIR / "covid19_collection" / "metadata.csv", newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header[:3] == ["patientid", "offset", "sex"] and "license" in header and "original_filename" in header
    assert {r["license"] for r in rows} <= {"CC BY", "CC BY 3.0", "CC BY 4.0", "CC BY-SA", "CC BY-NC-SA", "CC BY-NC-SA 4.0"}
    attribution = (SAMPLE_DATA_DIR / "ATTRIBUTION.md").read_text()
    assert all(f"| {r['filename']} | {r['patientid']} | {r['license']} |" in attribution for r in rows)
    for name in ("README.md", "LICENSE", "make_sample.py"):
        assert (SAMPLE_DATA_DIR / name).is_file()


def test_loaders_run_on_the_sample():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nih = load_nih_chestxray14(SAMPLE_DATA_DIR / "nih_chestxray14_sample")
        official = load_nih_chestxray14(SAMPLE_DATA_DIR / "nih_chestxray14_sample", split="official")
        covid = load_target_dataset("covid19", SAMPLE_DATA_DIR / "covid19_collection")
        viral = load_target_dataset("covid19_viral_bacterial", SAMPLE_DATA_DIR / "covid19_collection")
    studies = load_covid19_studies(SAMPLE_DATA_DIR / "covid19_collection")
    assert {k: len(v) for k, v in nih.items()} == {"train": 349, "validation": 57, "test": 77}
    assert len(official["test"]) == 105 and len(official["train"]) + len(official["validation"]) == 378
    assert sum(len(d) for d in covid.values()) == 88  # 128 images - 40 unlabelled ("todo")
    assert covid["train"].features["labels"].names == list(TARGET_DATASETS["covid19"].label_names)
    assert viral["train"].features["labels"].names == list(TARGET_DATASETS["covid19_viral_bacterial"].label_names)
    assert nih["train"].features["labels"] == datasets.List(datasets.Value("float32"), length=14)
    assert sum(len(d) for d in studies.values()) == 68
    assert max(len(v) for v in studies["train"]["view_positions"]) >= 3
    study = studies["train"][0]
    assert len(study["images"]) == len(study["view_positions"]) and len(study["report"].split()) >= 3


def test_make_sample_reproduces_the_sample(shared_data_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE_DATA_DIR / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_sample(shared_data_dir, tmp_path)
    made = [p.relative_to(tmp_path) for p in _files(tmp_path)]
    shipped = [p.relative_to(SAMPLE_DATA_DIR) for p in _files(SAMPLE_DATA_DIR)
               if p.relative_to(SAMPLE_DATA_DIR).parts[0] in module.MANAGED]
    assert made == shipped
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, SAMPLE_DATA_DIR, [str(p) for p in made], shallow=False)
    assert not mismatch and not errors


def test_sample_rows_are_the_original_rows(shared_data_dir):
    def read(path):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            return next(reader), [tuple(r) for r in reader]

    for table in ("covid19_collection/metadata.csv", "nih_chestxray14_sample/Data_Entry_2017.csv"):
        header, rows = read(SAMPLE_DATA_DIR / table)
        shared_header, shared_rows = read(shared_data_dir / table)
        assert header == shared_header
        assert set(rows) <= set(shared_rows) and len(set(rows)) == len(rows)
