"""NIH ChestX-ray14 builder on the real 1,000-image sample: counts, labels, splits, label order, bad input."""

import csv
import math
import shutil

import numpy as np
import pytest

import datasets
from datasets_scripts import NIH_LABEL_NAMES, NIH_SPLIT_FILE_LABEL_ORDER, InvalidDataError, load_nih_chestxray14


def _data_entry(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _split_list(path):
    out = {}
    for line in open(path):
        parts = line.split()
        out[parts[0].split("/")[-1]] = np.array(parts[1:], dtype=float)
    return out


# Counts of the data `shared_data_dir` holds, as documented in its README.md (../shared/data/README.md,
# "nih_chestxray14_sample/"; sample_data/README.md, "Counts"); the tests also derive each from
# Data_Entry_2017.csv and the REFERS split lists directly.
COUNTS = {
    "shared": {"splits": {"validation": 94, "test": 181, "train": 725}, "no_finding": 499, "listed": 275,
               "agree_chexnet_order": 274, "agree_alphabetical": 136,  # the one difference: 00000150_002.png
               "labels": {"Effusion": 170, "Infiltration": 162, "Atelectasis": 95, "Cardiomegaly": 83,
                          "Consolidation": 42, "Pneumothorax": 40, "Nodule": 39, "Emphysema": 37, "Mass": 35,
                          "Fibrosis": 32, "Edema": 31, "Pleural_Thickening": 29, "Pneumonia": 11, "Hernia": 9}},
    "sample": {"splits": {"validation": 57, "test": 77, "train": 349}, "no_finding": 190, "listed": 134,
               "agree_chexnet_order": 134, "agree_alphabetical": 60,  # 00000150_002.png is not in the sample
               "labels": {"Infiltration": 120, "Effusion": 81, "Cardiomegaly": 58, "Atelectasis": 45, "Edema": 30,
                          "Emphysema": 26, "Consolidation": 25, "Nodule": 22, "Pneumothorax": 21,
                          "Pleural_Thickening": 20, "Fibrosis": 20, "Mass": 19, "Pneumonia": 9, "Hernia": 8}},
}


@pytest.fixture(scope="module")
def counts(data_source):
    return COUNTS[data_source]


def _hand_labels(finding_labels, order):
    names = finding_labels.split("|")
    return np.array([1.0 if n in names else 0.0 for n in order], dtype=np.float32)


@pytest.fixture(scope="module")
def nih_dir(shared_data_dir):
    return shared_data_dir / "nih_chestxray14_sample"


@pytest.fixture(scope="module")
def refers(nih_dir):
    with pytest.warns(UserWarning, match="no positive example of class"):
        return load_nih_chestxray14(nih_dir)


def test_refers_split_counts_membership_and_labels(refers, nih_dir, shared_data_dir, counts):
    val = _split_list(shared_data_dir / "splits/nih_chestxray14/val.txt")
    test = _split_list(shared_data_dir / "splits/nih_chestxray14/test.txt")
    rows = _data_entry(nih_dir / "Data_Entry_2017.csv")
    names = [r["Image Index"] for r in rows]
    expected = {"validation": {n for n in names if n in val}, "test": {n for n in names if n in test}}
    expected["train"] = set(names) - expected["validation"] - expected["test"]
    # README: 94 of the val list and 181 of the test list are in the 1,000 images (sample_data: 57 and 77 of 483)
    assert {k: len(v) for k, v in expected.items()} == counts["splits"]
    for split, ids in expected.items():
        assert set(refers[split]["image_id"]) == ids
    assert refers["train"].features["labels"] == datasets.List(datasets.Value("float32"), length=14)
    assert isinstance(refers["train"].features["image"], datasets.Image)

    by_name = {r["Image Index"]: r for r in rows}
    for split in ("train", "validation", "test"):
        ds = refers[split].select_columns(["image_id", "patient_id", "labels"])
        for row in ds:
            entry = by_name[row["image_id"]]
            np.testing.assert_array_equal(np.array(row["labels"], np.float32), _hand_labels(entry["Finding Labels"], NIH_LABEL_NAMES))
            assert row["patient_id"] == entry["Patient ID"]
    # "No Finding" images are all-zero; counts per class equal the table's and the README's label counts
    all_labels = np.concatenate([np.array(refers[s]["labels"]) for s in refers])
    in_table = {name: sum(name in r["Finding Labels"].split("|") for r in rows) for name in NIH_LABEL_NAMES + ("No Finding",)}
    assert dict(zip(NIH_LABEL_NAMES, all_labels.sum(0).astype(int).tolist())) == counts["labels"]
    assert counts["labels"] == {k: v for k, v in in_table.items() if k != "No Finding"}
    assert int((all_labels.sum(1) == 0).sum()) == in_table["No Finding"] == counts["no_finding"]


def test_refers_split_is_patient_level_and_images_decode(refers):
    patients = {s: set(refers[s]["patient_id"]) for s in refers}
    assert not patients["train"] & patients["test"]
    assert not patients["train"] & patients["validation"]
    assert not patients["validation"] & patients["test"]
    image = refers["test"][0]["image"]
    assert image.size == (64, 64)
    assert all(len(ds.cache_files) == 0 for ds in refers.values())  # in memory: nothing cached


def test_split_file_columns_are_chexnet_order_not_alphabetical(nih_dir, shared_data_dir, counts):
    """The REFERS lists' 14 columns follow NIH_SPLIT_FILE_LABEL_ORDER (CheXNet order), not NIH_LABEL_NAMES."""
    listed = {**_split_list(shared_data_dir / "splits/nih_chestxray14/val.txt"),
              **_split_list(shared_data_dir / "splits/nih_chestxray14/test.txt")}
    rows = [r for r in _data_entry(nih_dir / "Data_Entry_2017.csv") if r["Image Index"] in listed]
    assert len(rows) == counts["listed"] == sum(counts["splits"][s] for s in ("validation", "test"))

    def agree(order):
        return sum(np.array_equal(_hand_labels(r["Finding Labels"], order), listed[r["Image Index"]]) for r in rows)

    assert agree(NIH_SPLIT_FILE_LABEL_ORDER) == counts["agree_chexnet_order"]  # 00000150_002.png: relabelled in 2020
    assert agree(NIH_LABEL_NAMES) == counts["agree_alphabetical"]
    assert counts["agree_alphabetical"] < counts["listed"] / 2
    assert sorted(NIH_SPLIT_FILE_LABEL_ORDER) == sorted(NIH_LABEL_NAMES) == list(NIH_LABEL_NAMES)


def test_official_split(nih_dir):
    with pytest.warns(UserWarning):
        ds = load_nih_chestxray14(nih_dir, split="official")
    test_names = set(open(nih_dir / "test_list.txt").read().split())
    train_val = set(open(nih_dir / "train_val_list.txt").read().split())
    assert set(ds["test"]["image_id"]) == test_names
    assert set(ds["train"]["image_id"]) | set(ds["validation"]["image_id"]) == train_val
    assert not set(ds["train"]["patient_id"]) & set(ds["validation"]["patient_id"])
    # patient-level cut of the train_val patients at floor(7/8 n + 0.5) (official_val_fraction 1/8); image
    # shares follow the patients' image counts, so only the patient counts are exact
    n = len(set(ds["train"]["patient_id"]) | set(ds["validation"]["patient_id"]))
    assert len(set(ds["validation"]["patient_id"])) == n - math.floor(0.875 * n + 0.5)
    with pytest.raises(ValueError, match="split must be"):
        load_nih_chestxray14(nih_dir, split="random")


def test_missing_split_lists_raise(nih_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="split lists"):
        load_nih_chestxray14(nih_dir, split_dir=tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small_nih(nih_dir, shared_data_dir, tmp_path):
    """12 real images + their Data_Entry rows in the official layout (images_001/images/)."""
    rows = _data_entry(nih_dir / "Data_Entry_2017.csv")[:12]
    root = tmp_path / "nih"
    (root / "images_001" / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(nih_dir / "images" / r["Image Index"], root / "images_001" / "images" / r["Image Index"])
    _write_entry(root / "Data_Entry_2017.csv", rows)
    shutil.copytree(shared_data_dir / "splits" / "nih_chestxray14", tmp_path / "splits" / "nih_chestxray14")
    return root, rows


def _write_entry(path, rows, fields=None):
    fields = fields or list(rows[0])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_small_layout_loads(small_nih):
    root, rows = small_nih
    with pytest.warns(UserWarning):
        ds = load_nih_chestxray14(root)
    assert sum(len(d) for d in ds.values()) == 12


def test_missing_column(small_nih):
    root, rows = small_nih
    _write_entry(root / "Data_Entry_2017.csv", rows, [f for f in rows[0] if f != "Finding Labels"])
    with pytest.raises(InvalidDataError, match=r"Data_Entry_2017\.csv: missing column\(s\) \['Finding Labels'\]"):
        load_nih_chestxray14(root)


def test_unknown_label_names_file_row_and_label(small_nih):
    root, rows = small_nih
    rows[4]["Finding Labels"] = "Effusion|Covid"
    _write_entry(root / "Data_Entry_2017.csv", rows)
    with pytest.raises(InvalidDataError, match=r"Data_Entry_2017\.csv, row 5: unknown label 'Covid'"):
        load_nih_chestxray14(root)
    with pytest.warns(UserWarning):
        ds = load_nih_chestxray14(root, skip_invalid=True)
    assert sum(len(d) for d in ds.values()) == 11


def test_duplicate_row(small_nih):
    root, rows = small_nih
    _write_entry(root / "Data_Entry_2017.csv", rows + [rows[0]])
    with pytest.raises(InvalidDataError, match=rf"row 13: image {rows[0]['Image Index']} is already listed in row 1"):
        load_nih_chestxray14(root)


def test_missing_image_names_file_and_row(small_nih, caplog):
    root, rows = small_nih
    (root / "images_001" / "images" / rows[2]["Image Index"]).unlink()
    with pytest.raises(InvalidDataError, match=rf"Data_Entry_2017\.csv, row 3 \({rows[2]['Image Index']}\): image .* not found"):
        load_nih_chestxray14(root)
    with pytest.warns(UserWarning):
        ds = load_nih_chestxray14(root, skip_invalid=True)
    assert sum(len(d) for d in ds.values()) == 11
    assert "skipped 1 invalid entries (1 missing image)" in caplog.text


def test_corrupt_image_fails_and_nothing_is_cached(small_nih, tmp_path, monkeypatch):
    root, rows = small_nih
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    bad = root / "images_001" / "images" / rows[7]["Image Index"]
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated PNG
    with pytest.raises(InvalidDataError, match=rf"row 8 .*{rows[7]['Image Index']} is corrupt"):
        load_nih_chestxray14(root)
    assert not cache.exists() or not any(cache.rglob("*"))
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InvalidDataError, match="is corrupt"):
        load_nih_chestxray14(root)
    # fixed file: the next build sees it (no stale state from the failed one)
    bad.write_bytes(good_bytes)
    with pytest.warns(UserWarning):
        ds = load_nih_chestxray14(root)
    assert rows[7]["Image Index"] in set().union(*(set(d["image_id"]) for d in ds.values()))
    assert not cache.exists() or not any(cache.rglob("*"))
