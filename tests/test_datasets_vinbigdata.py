"""VinBigData builder: made-up per-radiologist train.csv rows for real image ids of the paper's split
lists, real NIH pixels as PNG and as DICOM (MONOCHROME1/2, 12- and 16-bit, windowed)."""

import csv
import os
import shutil

import numpy as np
import PIL.Image
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

import datasets
from datasets_scripts import VINBIGDATA_CLASS_IDS, VINBIGDATA_LABEL_NAMES, InvalidDataError, dicom_to_uint8, load_vinbigdata

FIELDS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
NIH_IMAGES = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png", "00000003_001.png",
              "00000004_000.png", "00000005_000.png", "00000005_001.png", "00000005_002.png", "00000005_003.png",
              "00000005_004.png"]


def _lists(shared_data_dir):
    out = {}
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        for line in open(shared_data_dir / "splits" / "vinbigdata" / f"{name}.txt"):
            parts = line.split()
            out[parts[0][:-4]] = (split, np.array(parts[1:], dtype=np.float32))
    return out


def test_split_file_columns_are_the_paper_order(need_shared_data):
    """Column sums of the 15,000 listed images = the competition's per-class image counts ("any
    radiologist") in VINBIGDATA_LABEL_NAMES order; see the module docstring of datasets_scripts.vinbigdata."""
    root = need_shared_data(*(f"splits/vinbigdata/{n}.txt" for n in ("train", "val", "test")),
                            why="the competition's per-class counts are sums over all 15,000 listed images "
                                "(sample_data/splits/vinbigdata has the first 10 lines of each list)")
    y = np.stack([v for _, v in _lists(root).values()])
    assert y.shape == (15000, 14)
    counts = dict(zip(VINBIGDATA_LABEL_NAMES, y.sum(0).astype(int).tolist()))
    assert counts["Aortic enlargement"] == 3067 and counts["Cardiomegaly"] == 2300
    assert counts["Pleural thickening"] == 1981 and counts["Pulmonary fibrosis"] == 1617
    assert counts["Pneumothorax"] == 96 and counts["Atelectasis"] == 186 and counts["ILD"] == 386
    assert int((y.sum(1) == 0).sum()) == 10606  # the competition's "No finding"-only images
    co = y.T @ y
    np.fill_diagonal(co, 0)
    i, j = np.unravel_index(co.argmax(), co.shape)
    assert {VINBIGDATA_LABEL_NAMES[i], VINBIGDATA_LABEL_NAMES[j]} == {"Aortic enlargement", "Cardiomegaly"}
    assert set(VINBIGDATA_LABEL_NAMES) == set(VINBIGDATA_CLASS_IDS) - {"No finding"}


def _write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _box_rows(image_id, vector):
    """Three radiologists: R1 boxes every positive class, R2 only the first one, R3 says "No finding"."""
    positives = [VINBIGDATA_LABEL_NAMES[c] for c in np.flatnonzero(vector)]
    if not positives:
        return [{"image_id": image_id, "class_name": "No finding", "class_id": 14, "rad_id": f"R{r}"} for r in (1, 2, 3)]
    rows = [{"image_id": image_id, "class_name": n, "class_id": VINBIGDATA_CLASS_IDS[n], "rad_id": "R1",
             "x_min": 10, "y_min": 10, "x_max": 40, "y_max": 40} for n in positives]
    rows.append(dict(rows[0], rad_id="R2"))
    rows.append({"image_id": image_id, "class_name": "No finding", "class_id": 14, "rad_id": "R3"})
    return rows


def write_dicom(path, pixels, photometric, bits_stored, window=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.save_as(path, enforce_file_format=True)


def _stretch(values):
    values = values.astype(np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


@pytest.fixture
def vin(shared_data_dir, tmp_path):
    lists = _lists(shared_data_dir)
    by_split = {s: [k for k, (sp, _) in lists.items() if sp == s] for s in ("train", "validation", "test")}
    many = [k for k in by_split["test"] if lists[k][1].sum() >= 4][:2]
    ids = by_split["train"][:3] + by_split["validation"][:3] + by_split["test"][:3] + many
    root = tmp_path / "vinbigdata"
    (root / "train").mkdir(parents=True)
    nih = shared_data_dir / "nih_chestxray14_sample" / "images"
    pixels = {}
    for i, (image_id, source) in enumerate(zip(ids, NIH_IMAGES)):
        pixels[image_id] = np.asarray(PIL.Image.open(nih / source).convert("L"))
        if i == 0:  # 16-bit MONOCHROME2, full 0..65535 range
            write_dicom(root / "train" / f"{image_id}.dicom", pixels[image_id].astype(np.uint16) * 257, "MONOCHROME2", 16)
        elif i == 3:  # 16-bit MONOCHROME1: stored values inverted
            write_dicom(root / "train" / f"{image_id}.dicom", (65535 - pixels[image_id].astype(np.uint16) * 257).astype(np.uint16),
                        "MONOCHROME1", 16)
        else:
            shutil.copy(nih / source, root / "train" / f"{image_id}.png")
    rows = [r for image_id in ids for r in _box_rows(image_id, lists[image_id][1])]
    _write_csv(root / "train.csv", rows)
    (tmp_path / "splits").mkdir()
    os.symlink(shared_data_dir / "splits" / "vinbigdata", tmp_path / "splits" / "vinbigdata")
    return {"root": root, "ids": ids, "lists": lists, "pixels": pixels, "rows": rows, "converted": tmp_path / "png"}


def test_labels_splits_and_dicom_conversion(vin, caplog):
    with pytest.warns(UserWarning, match="no positive example"):
        ds = load_vinbigdata(vin["root"], converted_dir=vin["converted"])
    assert {s: len(d) for s, d in ds.items()} == {"train": 3, "validation": 3, "test": 5}
    assert ds["train"].features["labels"] == datasets.List(datasets.Value("float32"), length=14)
    for split, d in ds.items():
        for row in d.select_columns(["image_id", "patient_id", "labels"]):
            listed_split, listed_labels = vin["lists"][row["image_id"]]
            assert split == listed_split
            np.testing.assert_array_equal(np.array(row["labels"], np.float32), listed_labels)
            assert row["patient_id"] == row["image_id"]
    assert "differ from the split lists" not in caplog.text
    # the two DICOMs were converted to the original 8-bit pixels (both photometric interpretations)
    train = {r["image_id"]: r for r in ds["train"]}
    first = vin["ids"][0]
    np.testing.assert_array_equal(np.asarray(train[first]["image"]), _stretch(vin["pixels"][first]))
    val = {r["image_id"]: r for r in ds["validation"]}
    mono1 = vin["ids"][3]
    np.testing.assert_array_equal(np.asarray(val[mono1]["image"]), _stretch(vin["pixels"][mono1]))
    assert sorted(p.name for p in vin["converted"].iterdir()) == sorted([f"{first}.png", f"{mono1}.png"])


def test_labels_any_radiologist_hand_computed(vin):
    image_id = vin["ids"][1]
    rows = [{"image_id": image_id, "class_name": "Cardiomegaly", "class_id": 3, "rad_id": "R8"},
            {"image_id": image_id, "class_name": "Nodule/Mass", "class_id": 8, "rad_id": "R9"},
            {"image_id": image_id, "class_name": "Nodule/Mass", "class_id": 8, "rad_id": "R9"},
            {"image_id": image_id, "class_name": "No finding", "class_id": 14, "rad_id": "R10"}]
    _write_csv(vin["root"] / "train.csv", rows)
    with pytest.warns(UserWarning):
        ds = load_vinbigdata(vin["root"], converted_dir=vin["converted"])
    (row,) = ds["train"]
    expected = [0.0] * 14
    expected[10] = 1.0  # Cardiomegaly, paper order
    expected[12] = 1.0  # Nodule/Mass
    assert row["labels"] == expected


def test_dicom_windowing_12_bit_monochrome1(tmp_path, shared_data_dir):
    base = np.asarray(PIL.Image.open(shared_data_dir / "nih_chestxray14_sample/images/00000001_000.png").convert("L"))
    stored = (base.astype(np.uint16) * 16)  # 12-bit range 0..4080
    c, w = 2000.0, 1500.0
    write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME1", 12, window=(c, w))
    # DICOM PS3.3 C.11.2.1.2.1 linear window onto 0..4095, then invert (MONOCHROME1), then stretch to 0..255
    x = stored.astype(np.float64)
    y = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 4095, 0, 4095)
    expected = _stretch(y.max() - y)
    np.testing.assert_array_equal(dicom_to_uint8(tmp_path / "w.dcm"), expected)
    # without the VOI window: plain stretch of the inverted stored values
    np.testing.assert_array_equal(dicom_to_uint8(tmp_path / "w.dcm", use_voi_lut=False), _stretch(x.max() - x))


def test_seeded_split_without_lists(vin, tmp_path):
    with pytest.warns(UserWarning):
        a = load_vinbigdata(vin["root"], split_dir=tmp_path / "none", converted_dir=vin["converted"], split_seed=3)
    with pytest.warns(UserWarning):
        b = load_vinbigdata(vin["root"], split_dir=tmp_path / "none", converted_dir=vin["converted"], split_seed=3)
    assert {s: list(a[s]["image_id"]) for s in a} == {s: list(b[s]["image_id"]) for s in b}
    assert {s: len(d) for s, d in a.items()} == {"train": 8, "validation": 1, "test": 2}  # round(7.7), round(8.8)


def test_unknown_class_name_and_missing_column(vin):
    rows = list(vin["rows"])
    rows[4] = dict(rows[4], class_name="Pneumonia")
    _write_csv(vin["root"] / "train.csv", rows)
    with pytest.raises(InvalidDataError, match=r"train\.csv, row 5: unknown label 'Pneumonia'"):
        load_vinbigdata(vin["root"], converted_dir=vin["converted"])
    with pytest.warns(UserWarning):
        ds = load_vinbigdata(vin["root"], converted_dir=vin["converted"], skip_invalid=True)
    assert sum(len(d) for d in ds.values()) == len(vin["ids"]) - 1
    rows[4] = dict(vin["rows"][4], class_id="7")
    _write_csv(vin["root"] / "train.csv", rows)
    with pytest.raises(InvalidDataError, match=r"row 5: class_id '7' does not match"):
        load_vinbigdata(vin["root"], converted_dir=vin["converted"])
    with open(vin["root"] / "train.csv", "w") as handle:
        handle.write("image_id,rad_id\nabc,R1\n")
    with pytest.raises(InvalidDataError, match=r"train\.csv: missing column\(s\) \['class_name'\]"):
        load_vinbigdata(vin["root"])


def test_missing_and_corrupt_images(vin, tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    png_id, dicom_id = vin["ids"][2], vin["ids"][3]
    (vin["root"] / "train" / f"{png_id}.png").unlink()
    with pytest.raises(InvalidDataError, match=rf"train\.csv, row \d+ \(image {png_id}\): image .* not found"):
        load_vinbigdata(vin["root"])
    shutil.copy(vin["root"] / "train" / f"{vin['ids'][1]}.png", vin["root"] / "train" / f"{png_id}.png")
    dicom = vin["root"] / "train" / f"{dicom_id}.dicom"
    good = dicom.read_bytes()
    dicom.write_bytes(good[:300])
    with pytest.raises(InvalidDataError, match=rf"\(image {dicom_id}\): image file .*{dicom_id}\.dicom is corrupt"):
        load_vinbigdata(vin["root"])
    converted = list(cache.rglob("*.png"))
    assert f"{dicom_id}.png" not in {p.name for p in converted}  # nothing written for the broken file
    assert not list(cache.rglob("*.tmp"))
    dicom.write_bytes(good)
    with pytest.warns(UserWarning):
        ds = load_vinbigdata(vin["root"])  # default converted_dir: under the datasets cache
    assert {p.name for p in cache.rglob("*.png")} == {f"{vin['ids'][0]}.png", f"{dicom_id}.png"}
    assert all(len(d.cache_files) == 0 for d in ds.values())
    with pytest.warns(UserWarning):
        ds = load_vinbigdata(vin["root"], converted_dir=vin["converted"], skip_invalid=True)
    assert sum(len(d) for d in ds.values()) == len(vin["ids"])
