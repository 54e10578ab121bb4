"""Registry of data sets (TARGET_DATASETS / SOURCE_DATASETS) and the embedded sample in sample_data/."""

import csv
import dataclasses
import filecmp
import gzip
import importlib.util
import tarfile
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
    assert sorted(TARGET_DATASETS) == ["chexpert", "covid19", "covid19_viral_bacterial", "kermany_bacterial_viral",
                                       "kermany_pneumonia", "labelled_images", "nih_chestxray14", "rsna_pneumonia",
                                       "shenzhen_tb", "siim_acr_pneumothorax", "vinbigdata"]
    expected = {"nih_chestxray14": (14, "multi_label_classification", "nih_chestxray14"),
                "vinbigdata": (14, "multi_label_classification", "vinbigdata"),
                "shenzhen_tb": (2, "single_label_classification", "shenzhen_tb"),
                "covid19": (2, "single_label_classification", "covid19_collection"),
                "covid19_viral_bacterial": (2, "single_label_classification", "covid19_collection"),
                "kermany_pneumonia": (2, "single_label_classification", "kermany_pneumonia"),
                "kermany_bacterial_viral": (3, "single_label_classification", "kermany_pneumonia"),
                # MRM's downstream tasks with MRM's lists (tests/test_datasets_{chexpert,rsna,siim}.py)
                "chexpert": (5, "multi_label_classification", "mrm/CheXpert"),
                "rsna_pneumonia": (2, "single_label_classification", "mrm/RSNA_Pneumonia"),
                "siim_acr_pneumothorax": (2, "single_label_classification", "mrm/SIIM-ACR_Pneumothorax"),
                # labels from the data (TargetDatasetSpec.with_labels_of; tests/test_datasets_labelled_images.py)
                "labelled_images": (0, "", "labelled_images")}
    for name, spec in TARGET_DATASETS.items():
        assert spec.name == name
        assert (len(spec.label_names), spec.problem_type, spec.default_split_dir) == expected[name]
        assert spec.num_labels == len(spec.label_names)
        assert isinstance(spec.label_names, tuple) and all(isinstance(n, str) for n in spec.label_names)
        assert callable(spec.loader)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"
    assert sorted(SOURCE_DATASETS) == ["covid19_studies", "iu_xray", "kermany_paired_reports", "mimic_cxr", "study_folder"]


# official test folder + seeded validation; your own data: its split column or a seeded split
WITHOUT_SPLIT_LISTS = {"kermany_pneumonia", "kermany_bacterial_viral", "labelled_images"}


def test_default_split_dirs_exist_in_shared_data(shared_data_dir, data_source):  # ../shared/data, else sample_data/
    for spec in TARGET_DATASETS.values():
        if spec.name in WITHOUT_SPLIT_LISTS:
            assert not (shared_data_dir / "splits" / spec.default_split_dir).exists(), spec.name
            continue
        if spec.default_split_dir.startswith("mrm/") and data_source == "sample":
            continue  # MRM's lists are in ../shared/data/splits/mrm only (no sample of those data sets here)
        assert (shared_data_dir / "splits" / spec.default_split_dir).is_dir(), spec.name


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown target data set 'padchest'; valid names: chexpert, covid19, "
                                         r"covid19_viral_bacterial, kermany_bacterial_viral, kermany_pneumonia, "
                                         r"labelled_images, nih_chestxray14, rsna_pneumonia, shenzhen_tb, "
                                         r"siim_acr_pneumothorax, vinbigdata"):
        load_target_dataset("padchest", ".")
    with pytest.raises(ValueError, match=r"task is fixed by the data set name 'covid19'"):
        load_target_dataset("covid19", ".", task="viral_bacterial")
    with pytest.raises(ValueError, match=r"unknown source data set 'padchest'; valid names: covid19_studies, iu_xray, "
                                         r"kermany_paired_reports, mimic_cxr, study_folder"):
        load_source_dataset("padchest", ".")


# ------------------------------------------------------------------------------------------ sample data
def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_sample_is_small_and_licensed():
    # the bytes shipped (what a clone, a pack or an sdist carries); disk blocks depend on the file system (with 4 KB
    # blocks each of the ~1,100 small images takes a whole block), so they are not the limit
    total = sum(p.stat().st_size for p in _files(SAMPLE_DATA_DIR))
    assert total < 5 * 2**20, total
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
    licence = (SAMPLE_DATA_DIR / "LICENSE").read_text()
    for folder in {p.relative_to(SAMPLE_DATA_DIR).parts[0] for p in _files(SAMPLE_DATA_DIR)} - {"README.md", "LICENSE", "make_sample.py", "ATTRIBUTION.md"}:
        assert f"{folder}/" in licence and f"`{folder}/`" in attribution, folder  # every folder's terms and source
    assert "CC BY-NC-ND 4.0" in licence and "CC BY-NC-ND 4.0" in attribution  # the Open-i reports' licence


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


def _make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE_DATA_DIR / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# what make_sample.py reads from ../shared/data (the sample's source)
SAMPLE_SOURCES = ("covid19_collection", "nih_chestxray14_sample", "iu_xray/NLMCXR_reports.tgz",
                  "iu_xray/nlmcxr_dicom_metadata.csv.gz", "splits")


def test_make_sample_reproduces_the_sample(need_shared_data, tmp_path):
    shared = need_shared_data(*SAMPLE_SOURCES, why="rebuilding sample_data/ needs the data it is cut from")
    module = _make_sample_module()
    module.make_sample(shared, tmp_path)
    made = [p.relative_to(tmp_path) for p in _files(tmp_path)]
    shipped = [p.relative_to(SAMPLE_DATA_DIR) for p in _files(SAMPLE_DATA_DIR)
               if p.relative_to(SAMPLE_DATA_DIR).parts[0] in module.MANAGED]
    assert made == shipped
    plain = [str(p) for p in made if p.suffix not in (".gz", ".tgz")]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, SAMPLE_DATA_DIR, plain, shallow=False)
    assert not mismatch and not errors
    # gzip streams: the same content (compressed bytes may differ between zlib builds), no name, no time
    for path in made:
        if path.suffix in (".gz", ".tgz"):
            assert gzip.decompress((tmp_path / path).read_bytes()) == gzip.decompress((SAMPLE_DATA_DIR / path).read_bytes()), path
            header = (SAMPLE_DATA_DIR / path).read_bytes()[:10]
            assert header[3] == 0 and header[4:8] == bytes(4), path  # FLG: no FNAME; MTIME 0


def test_sample_report_archive_is_the_first_reports_unchanged(need_shared_data):
    """iu_xray/: the first OPEN_I_REPORTS members of the Open-i archive, headers and bytes unchanged (the
    reports are CC BY-NC-ND: shared in part, never modified); the DICOM metadata rows are original rows."""
    shared = need_shared_data("iu_xray/NLMCXR_reports.tgz", "iu_xray/nlmcxr_dicom_metadata.csv.gz",
                              why="comparing the sample's Open-i files with the originals")
    module = _make_sample_module()
    ours = gzip.decompress((SAMPLE_DATA_DIR / "iu_xray" / "NLMCXR_reports.tgz").read_bytes())
    theirs = gzip.decompress((shared / "iu_xray" / "NLMCXR_reports.tgz").read_bytes())
    # the original tar stream's first bytes, then the end-of-archive marker (two zero blocks)
    assert ours[-2 * tarfile.BLOCKSIZE:] == bytes(2 * tarfile.BLOCKSIZE) and theirs.startswith(ours[:-2 * tarfile.BLOCKSIZE])
    with tarfile.open(SAMPLE_DATA_DIR / "iu_xray" / "NLMCXR_reports.tgz") as sample:
        assert sum(m.name.endswith(".xml") for m in sample.getmembers()) == module.OPEN_I_REPORTS

    def rows(path):
        with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
            return [tuple(r) for r in csv.reader(handle)]

    ours, theirs = rows(SAMPLE_DATA_DIR / "iu_xray" / "nlmcxr_dicom_metadata.csv.gz"), rows(shared / "iu_xray" / "nlmcxr_dicom_metadata.csv.gz")
    assert ours[0] == theirs[0] and set(ours[1:]) <= set(theirs[1:])


def test_sample_rows_are_the_original_rows(need_shared_data):
    shared_data_dir = need_shared_data("covid19_collection/metadata.csv", "nih_chestxray14_sample/Data_Entry_2017.csv",
                                       why="comparing the sample's table rows with the originals")
    def read(path):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            return next(reader), [tuple(r) for r in reader]

    for table in ("covid19_collection/metadata.csv", "nih_chestxray14_sample/Data_Entry_2017.csv"):
        header, rows = read(SAMPLE_DATA_DIR / table)
        shared_header, shared_rows = read(shared_data_dir / table)
        assert header == shared_header
        assert set(rows) <= set(shared_rows) and len(set(rows)) == len(rows)
