"""Shenzhen TB builder: real file names of the paper's split lists, real NIH pixels as the images."""

import os
import shutil

import pytest

import datasets
from datasets_scripts import SHENZHEN_LABEL_NAMES, InvalidDataError, load_shenzhen_tb

LIST_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


@pytest.fixture
def shenzhen(shared_data_dir, tmp_path):
    """ChinaSet_AllFiles/CXR_png with 2 normal + 2 TB names from each split list, splits/ beside it."""
    chosen = {}
    for split, name in LIST_FILES.items():
        lines = [line.split() for line in open(shared_data_dir / "splits" / "shenzhen_tb" / name)]
        for digit in ("0", "1"):
            for file_name, *one_hot in [ln for ln in lines if ln[0].endswith(f"_{digit}.png")][:2]:
                chosen[file_name] = (split, int(digit), one_hot)
    root = tmp_path / "ChinaSet_AllFiles"
    (root / "CXR_png").mkdir(parents=True)
    (root / "ClinicalReadings").mkdir()
    nih = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").iterdir())
    for file_name, source in zip(chosen, nih):
        shutil.copy(source, root / "CXR_png" / file_name)
    (root / "CXR_png" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "splits").mkdir()
    os.symlink(shared_data_dir / "splits" / "shenzhen_tb", tmp_path / "splits" / "shenzhen_tb")
    return root, chosen


def test_labels_from_file_names_and_paper_splits(shenzhen, caplog):
    root, chosen = shenzhen
    ds = load_shenzhen_tb(root)
    assert {s: len(d) for s, d in ds.items()} == {"train": 4, "validation": 4, "test": 4}
    assert ds["train"].features["labels"] == datasets.ClassLabel(names=list(SHENZHEN_LABEL_NAMES))
    for split, d in ds.items():
        for row in d.select_columns(["image_id", "patient_id", "labels"]):
            listed_split, label, one_hot = chosen[row["image_id"]]
            assert (split, row["labels"]) == (listed_split, label)
            assert one_hot == (["1", "0"] if label == 0 else ["0", "1"])  # column 0 normal, column 1 TB
            assert row["patient_id"] == row["image_id"][7:11]
    assert "differ from the split lists" not in caplog.text
    assert ds["test"][0]["image"].size == (64, 64)


@pytest.mark.filterwarnings("ignore:shenzhen_tb. split")
def test_seeded_split_without_lists(shenzhen, tmp_path):
    root, chosen = shenzhen
    a = load_shenzhen_tb(root, split_dir=tmp_path / "none", split_seed=1)
    b = load_shenzhen_tb(root, split_dir=tmp_path / "none", split_seed=2)
    assert {s: len(d) for s, d in a.items()} == {"train": 8, "validation": 2, "test": 2}  # cuts at 8.4 -> 8, 9.6 -> 10
    assert sorted(sum((list(a[s]["image_id"]) for s in a), [])) == sorted(chosen)
    assert [list(a[s]["image_id"]) for s in a] != [list(b[s]["image_id"]) for s in b]


def test_bad_label_digit_and_corrupt_image(shenzhen):
    root, chosen = shenzhen
    shutil.copy(root / "CXR_png" / next(iter(chosen)), root / "CXR_png" / "CHNCXR_0999_2.png")
    with pytest.raises(InvalidDataError, match=r"CHNCXR_0999_2\.png: unknown label '2'"):
        load_shenzhen_tb(root)
    (root / "CXR_png" / "CHNCXR_0999_2.png").unlink()
    victim = root / "CXR_png" / list(chosen)[5]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InvalidDataError, match=rf"{victim.name} is corrupt"):
        load_shenzhen_tb(root)
    ds = load_shenzhen_tb(root, skip_invalid=True)
    assert sum(len(d) for d in ds.values()) == 11


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CHNCXR"):
        load_shenzhen_tb(tmp_path)
