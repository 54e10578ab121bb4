"""Your own labelled images (datasets_scripts/labelled_images.py) on real NIH radiographs and their real label rows:
a labels CSV (multi-label 0/1 columns, one class-name column, DICOM files), a save_to_disk folder, the imagefolder
layout, the split rules, every input error, and the registry entry that reads its labels from the data."""

import csv
import shutil

import numpy as np
import PIL.Image
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from test_datasets_vinbigdata import write_dicom

from datasets_scripts import (TARGET_DATASETS, InvalidDataError, dicom_to_uint8, label_info, load_labelled_images,
                              load_target_dataset)
from datasets_scripts.labelled_images import check_train_positives

LABELS = ("Infiltration", "Effusion")
N_IMAGES = 48


@pytest.fixture(scope="module")
def nih_rows(shared_data_dir):
    """The first N_IMAGES real Data_Entry_2017.csv rows whose PNG is present (file, patient, findings)."""
    root = shared_data_dir / "nih_chestxray14_sample"
    with open(root / "Data_Entry_2017.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if (root / "images" / r["Image Index"]).is_file()]
    rows = rows[:N_IMAGES]
    for r in rows:
        r["path"] = root / "images" / r["Image Index"]
        r["findings"] = set(r["Finding Labels"].split("|"))
    assert all(any(name in r["findings"] for r in rows) for name in LABELS)
    return rows


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def multi_hot(row):
    return [float(name in row["findings"]) for name in LABELS]


def copy_images(rows, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        shutil.copy(r["path"], folder / r["Image Index"])


def given_splits(rows):
    """train / val / Test (spellings as users write them), every class positive in train."""
    splits = ["train"] * len(rows)
    for i in range(len(rows) - 12, len(rows) - 6):
        splits[i] = "val" if i % 2 else "Valid"
    for i in range(len(rows) - 6, len(rows)):
        splits[i] = "Test"
    return splits


@pytest.fixture
def own(tmp_path, nih_rows):
    """data_dir with the PNGs and labels.csv: file_name, patient_id, split, one 0/1 column per label."""
    folder = tmp_path / "own"
    copy_images(nih_rows, folder)
    write_csv(folder / "labels.csv", ["file_name", "patient_id", "split", *LABELS],
              [[r["Image Index"], r["Patient ID"], s, *map(int, multi_hot(r))]
               for r, s in zip(nih_rows, given_splits(nih_rows))])
    return folder


def by_id(dataset_dict):
    return {row["image_id"]: (split, row) for split, ds in dataset_dict.items()
            for row in ds.cast_column("image", Image(decode=False))}


# --------------------------------------------------------------------------------------------- CSV forms
def test_multi_label_csv_with_a_split_column(own, nih_rows, caplog):
    caplog.set_level("INFO")
    data = load_labelled_images(own)
    assert label_info(data["train"]) == (LABELS, "multi_label_classification")
    assert "inferred multi_label_classification" in caplog.text and "label columns inferred" in caplog.text
    assert data["train"].features["labels"].length == 2
    rows = by_id(data)
    assert len(rows) == N_IMAGES
    expected_split = {"train": "train", "val": "validation", "Valid": "validation", "Test": "test"}
    for r, s in zip(nih_rows, given_splits(nih_rows)):
        split, row = rows[r["Image Index"]]
        assert split == expected_split[s] and row["patient_id"] == r["Patient ID"]
        assert row["labels"] == multi_hot(r)
        assert row["image"]["path"] == str(own / r["Image Index"])
    first = data["train"][0]["image"]
    with PIL.Image.open(own / data["train"][0]["image_id"]) as original:
        np.testing.assert_array_equal(np.asarray(first), np.asarray(original))


def test_multi_class_csv_seeded_patient_split(tmp_path, nih_rows, caplog):
    folder = tmp_path / "mc"
    copy_images(nih_rows, folder / "images")
    finding = ["effusion" if "Effusion" in r["findings"] else "normal" if r["findings"] == {"No Finding"} else "other"
               for r in nih_rows]
    write_csv(folder / "my_labels.csv", ["image", "patient", "finding", "notes"],
              [[f"images/{r['Image Index']}", r["Patient ID"], f, "x"] for r, f in zip(nih_rows, finding)])
    caplog.set_level("INFO")
    data = load_labelled_images(folder, labels_csv="my_labels.csv", label_columns=["finding"],
                                split_fractions=(0.5, 0.25, 0.25), split_seed=1)
    assert "inferred single_label_classification" in caplog.text
    assert data["train"].features["labels"] == ClassLabel(names=["effusion", "normal", "other"])
    assert label_info(data["test"]) == (("effusion", "normal", "other"), "single_label_classification")
    rows = by_id(data)
    assert {k: r["labels"] for k, (_, r) in rows.items()} == {
        f"images/{r['Image Index']}": ["effusion", "normal", "other"].index(f) for r, f in zip(nih_rows, finding)}
    # patient-level: no patient in two splits; the cut follows the fractions over patients
    split_of = {}
    for split, row in rows.values():
        assert split_of.setdefault(row["patient_id"], split) == split
    patients = sorted(split_of)
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "validation", "test")}
    assert counts["train"] == int(0.5 * len(patients) + 0.5)
    again = load_labelled_images(folder, labels_csv=folder / "my_labels.csv", label_columns=["finding"],
                                 split_fractions=(0.5, 0.25, 0.25), split_seed=1)
    assert by_id(again).keys() == rows.keys() and all(by_id(again)[k][0] == rows[k][0] for k in rows)
    other_seed = load_labelled_images(folder, labels_csv="my_labels.csv", label_columns=["finding"],
                                      split_fractions=(0.5, 0.25, 0.25), split_seed=2)
    assert any(by_id(other_seed)[k][0] != rows[k][0] for k in rows)


def test_without_patient_column_each_image_is_its_own_patient(tmp_path, nih_rows):
    folder = tmp_path / "np"
    copy_images(nih_rows, folder)
    write_csv(folder / "labels.csv", ["file_name", *LABELS], [[r["Image Index"], *map(int, multi_hot(r))]
                                                                for r in nih_rows])
    data = load_labelled_images(folder, split_fractions=(0.8, 0.1, 0.1))
    rows = by_id(data)
    assert all(row["patient_id"] == key for key, (_, row) in rows.items())
    assert len(data["train"]) == int(0.8 * N_IMAGES + 0.5)


def test_problem_type_single_label_reads_one_hot_columns(tmp_path, nih_rows):
    folder = tmp_path / "oh"
    copy_images(nih_rows, folder)
    normal = [int(r["findings"] == {"No Finding"}) for r in nih_rows]
    write_csv(folder / "labels.csv", ["file_name", "split", "normal", "abnormal"],
              [[r["Image Index"], s, n, 1 - n] for r, s, n in zip(nih_rows, given_splits(nih_rows), normal)])
    data = load_labelled_images(folder, problem_type="single_label_classification")
    assert data["train"].features["labels"].names == ["normal", "abnormal"]
    assert {k: r["labels"] for k, (_, r) in by_id(data).items()} == {
        r["Image Index"]: 1 - n for r, n in zip(nih_rows, normal)}
    # the same two columns without problem_type are two binary labels
    assert label_info(load_labelled_images(folder)["train"])[1] == "multi_label_classification"
    rows = list(csv.reader(open(folder / "labels.csv")))
    rows[3][2] = rows[3][3] = "1"
    write_csv(folder / "labels.csv", rows[0], rows[1:])
    with pytest.raises(InvalidDataError, match=r"labels\.csv, line 4: single_label_classification over the "
                                               r"one-hot columns \['normal', 'abnormal'\] needs exactly one 1 per "
                                               r"row, found 2"):
        load_labelled_images(folder, problem_type="single_label_classification")


def test_dicom_images_go_through_the_vinbigdata_dicom_path(tmp_path, nih_rows):
    folder = tmp_path / "dcm"
    copy_images(nih_rows, folder)
    pixels = {}
    names = []
    for i, r in enumerate(nih_rows):
        name = r["Image Index"]
        if i < 2:  # 16-bit MONOCHROME2, and MONOCHROME1 (stored values inverted)
            pixels[i] = np.asarray(PIL.Image.open(r["path"]).convert("L"))
            stored = pixels[i].astype(np.uint16) * 257
            write_dicom(folder / f"{r['Image Index'][:-4]}.dcm",
                        stored if i == 0 else (65535 - stored).astype(np.uint16),
                        "MONOCHROME2" if i == 0 else "MONOCHROME1", 16)
            (folder / name).unlink()
            name = f"{r['Image Index'][:-4]}.dcm"
        names.append(name)
    write_csv(folder / "labels.csv", ["file_name", "split", *LABELS],
              [[n, s, *map(int, multi_hot(r))] for n, r, s in zip(names, nih_rows, given_splits(nih_rows))])
    data = load_labelled_images(folder, converted_dir=tmp_path / "png")
    rows = by_id(data)
    for i in (0, 1):
        _, row = rows[names[i]]
        assert row["image"]["path"].startswith(str(tmp_path / "png")) and row["image"]["path"].endswith(".png")
        with PIL.Image.open(row["image"]["path"]) as converted:  # the package's DICOM reader, not another one
            converted = np.asarray(converted)
        np.testing.assert_array_equal(converted, dicom_to_uint8(folder / names[i]))
        assert np.corrcoef(converted.ravel(), pixels[i].ravel())[0, 1] > 0.99  # bright bone for both photometrics
        assert row["labels"] == multi_hot(nih_rows[i])
    # a DICOM that cannot be decoded is named with its CSV line
    broken = folder / names[0]
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(InvalidDataError, match=rf"labels\.csv, line 2: image file .*{names[0]} is corrupt"):
        load_labelled_images(folder, converted_dir=tmp_path / "png2")


# ----------------------------------------------------------------------------------------- datasets forms
def test_save_to_disk_folder(tmp_path, nih_rows):
    features = Features({"image": Image(), "Infiltration": Value("int64"), "Effusion": Value("int64"),
                         "patient_id": Value("string")})
    splits = given_splits(nih_rows)
    parts = {}
    for name, spellings in (("train", {"train"}), ("validation", {"val", "Valid"}), ("test", {"Test"})):
        chosen = [r for r, s in zip(nih_rows, splits) if s in spellings]
        parts[name] = Dataset.from_dict(
            {"image": [str(r["path"]) for r in chosen], "Infiltration": [int("Infiltration" in r["findings"])
                                                                          for r in chosen],
             "Effusion": [int("Effusion" in r["findings"]) for r in chosen],
             "patient_id": [r["Patient ID"] for r in chosen]}, features=features)
    DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    data = load_labelled_images(tmp_path / "saved", label_columns=list(LABELS))
    assert label_info(data["validation"]) == (LABELS, "multi_label_classification")
    rows = by_id(data)
    for r, s in zip(nih_rows, splits):
        split, row = rows[r["Image Index"]]  # embedded bytes keep the file name
        assert split == {"train": "train", "Test": "test"}.get(s, "validation")
        assert row["labels"] == multi_hot(r) and row["patient_id"] == r["Patient ID"]
        assert row["image"]["bytes"] == r["path"].read_bytes()


def test_imagefolder_layout(tmp_path, nih_rows):
    root = tmp_path / "folder"
    for i, r in enumerate(nih_rows):
        split = "test" if i >= N_IMAGES - 8 else "train"
        label = "effusion" if "Effusion" in r["findings"] else "no_effusion"
        copy_images([r], root / split / label)
    data = load_labelled_images(root, split_fractions=(0.6, 0.2, 0.2))
    assert data["train"].features["labels"].names == ["effusion", "no_effusion"]
    rows = by_id(data)
    assert len(rows) == N_IMAGES
    for i, r in enumerate(nih_rows):
        label = "effusion" if "Effusion" in r["findings"] else "no_effusion"
        split = "test" if i >= N_IMAGES - 8 else "train"
        got_split, row = rows[f"{split}/{label}/{r['Image Index']}"]
        assert row["labels"] == ["effusion", "no_effusion"].index(label)
        assert (got_split == "test") == (split == "test")
    # no validation folder: cut from train at validation / (train + validation) = 0.25 of the train images
    assert len(data["validation"]) == N_IMAGES - 8 - int(0.75 * (N_IMAGES - 8) + 0.5)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_columns_list_the_columns(own):
    with pytest.raises(InvalidDataError, match=r"unknown label column\(s\) \['Nodule'\]; the columns are "
                                               r"\['file_name', 'patient_id', 'split', 'Infiltration', 'Effusion'\]"):
        load_labelled_images(own, label_columns=["Infiltration", "Nodule"])
    with pytest.raises(InvalidDataError, match=r"unknown image column 'path'; the columns are \['file_name'"):
        load_labelled_images(own, image_column="path")
    with pytest.raises(InvalidDataError, match=r"unknown patient column 'Patient ID'"):
        load_labelled_images(own, patient_column="Patient ID")


def _edit_csv(folder, edit):
    rows = list(csv.reader(open(folder / "labels.csv", newline="")))
    edit(rows)
    write_csv(folder / "labels.csv", rows[0], rows[1:])
    return rows


def test_unreadable_and_missing_images_name_file_and_line(own, nih_rows):
    victim = own / nih_rows[4]["Image Index"]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(InvalidDataError, match=rf"labels\.csv, line 6: image file .*{victim.name} is corrupt"):
        load_labelled_images(own)
    victim.unlink()
    with pytest.raises(InvalidDataError, match=rf"labels\.csv, line 6: image .*{victim.name} not found"):
        load_labelled_images(own)
    assert len(by_id(load_labelled_images(own, skip_invalid=True))) == N_IMAGES - 1


def test_image_listed_twice(own):
    def duplicate(rows):
        rows[9][0] = rows[3][0]
    _edit_csv(own, duplicate)
    with pytest.raises(InvalidDataError, match=r"labels\.csv, line 10: image '.*' is listed twice \(also at line 4\)"):
        load_labelled_images(own)


def test_bad_label_and_split_cells(own):
    _edit_csv(own, lambda rows: rows[7].__setitem__(3, "2"))
    with pytest.raises(InvalidDataError, match=r"labels\.csv, line 8: label '2' in column 'Infiltration': several "
                                               r"label columns"):
        load_labelled_images(own)
    with pytest.raises(InvalidDataError, match=r"line 8: label '2' in column 'Infiltration': expected 0 or 1"):
        load_labelled_images(own, problem_type="multi_label_classification")
    _edit_csv(own, lambda rows: (rows[7].__setitem__(3, "1"), rows[2].__setitem__(2, "holdout")))
    with pytest.raises(InvalidDataError, match=r"labels\.csv, line 3: split 'holdout' in column 'split'"):
        load_labelled_images(own)
    with pytest.raises(ValueError, match=r"problem_type must be one of"):
        load_labelled_images(own, problem_type="regression")


def test_train_without_a_positive_is_an_error_validation_a_warning(own, nih_rows):
    splits = given_splits(nih_rows)

    def move_effusion_out_of_train(rows):
        for row, s in zip(rows[1:], splits):
            if row[4] == "1" and s == "train":
                row[2] = "test"
    _edit_csv(own, move_effusion_out_of_train)
    with pytest.raises(InvalidDataError, match=r"labels\.csv: split 'train' \(\d+ images\) has no positive example "
                                               r"of class\(es\) 'Effusion'"):
        load_labelled_images(own)


def test_validation_without_a_positive_warns(own, nih_rows):
    def no_effusion_in_validation(rows):
        for row in rows[1:]:
            if row[2] in ("val", "Valid") and row[4] == "1":
                row[2] = "train"
    _edit_csv(own, no_effusion_in_validation)
    with pytest.warns(UserWarning, match=r"labelled_images: split 'validation' \(\d+ rows\) has no positive example "
                                         r"of class\(es\) 'Effusion'"):
        load_labelled_images(own)


def test_check_train_positives_for_an_empty_train_split(own):
    data = load_labelled_images(own)
    empty = DatasetDict({"train": data["train"].select([]), "validation": data["validation"], "test": data["test"]})
    with pytest.raises(InvalidDataError, match=r"x\.csv: the train split is empty"):
        check_train_positives(empty, LABELS, "x.csv")


# ---------------------------------------------------------------------------------------------- registry
def test_registry_entry_takes_its_labels_from_the_data(own):
    spec = TARGET_DATASETS["labelled_images"]
    assert spec.label_names == () and spec.num_labels == 0
    data = load_target_dataset("labelled_images", own, split_dir=None, label_columns=["Effusion"])
    resolved = spec.with_labels_of(data["train"])
    assert (resolved.label_names, resolved.problem_type, resolved.num_labels) == (
        ("Effusion",), "multi_label_classification", 1)
    nih = TARGET_DATASETS["nih_chestxray14"]
    assert nih.with_labels_of(data["train"]) is nih  # fixed labels stay
    plain = Dataset.from_dict({"labels": [[0.0]]})
    with pytest.raises(ValueError, match=r"labelled_images: the data set does not record its label names"):
        spec.with_labels_of(plain)
    with pytest.raises(ValueError, match=r"split lists .* are not read"):
        load_target_dataset("labelled_images", own, split_dir="splits")
