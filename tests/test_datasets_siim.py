"""SIIM-ACR pneumothorax builder: the Kaggle RLE against hand-drawn masks, and the Kaggle stage-1 layout in tmp_path
(real NIH radiographs written as DICOM under dicom-images-train/<study>/<series>/, `train-rle.csv` with the original
header `ImageId, EncodedPixels`, hand-made masks) with MRM's image ids (from ../shared/data/splits/mrm)."""

import numpy as np
import PIL.Image
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

import datasets
from datasets_scripts import TARGET_DATASETS, InvalidDataError, load_target_dataset
from datasets_scripts.siim_acr_pneumothorax import SIIM_LABEL_NAMES, load_siim_acr_pneumothorax, rle_decode, rle_encode
from modeling_refers.radiograph_io import load_dicom

pytestmark = pytest.mark.filterwarnings("ignore:siim_acr_pneumothorax. split")
U = "1.2.276.0.7230010.3.1.4.8323329."
A, B, C = U + "3474.1517875178.8467", U + "32678.1517875161.759787", U + "1608.1517875168.577144"
D, E, F = U + "10000.1517875220.938530", U + "10003.1517875220.942420", U + "10006.1517875220.954474"
# A: train_10.txt line 1 and test_list.txt line 3 in MRM's lists (they overlap); B: train_10; C: train_list only;
# D, E: val_list only; F: test_list only.
LISTS = {"train_10": [A, B], "train_list": [C, A, B], "val_list": [D, E], "test_list": [F, A]}
SIZE = 64  # the NIH sample's images are 64 x 64


def _hand_masks():
    """Masks drawn by slicing, and the CSV rows of each image (several rows = several regions)."""
    a1, a2 = np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
    a1[10:20, 5:15] = 1  # two overlapping regions, unioned
    a2[15:30, 12:20] = 1
    c = np.zeros((SIZE, SIZE), np.uint8)
    c[40:60, 30:35] = 1
    c[np.arange(20), np.arange(20) + 40] = 1  # a diagonal: one pixel per column
    d = np.zeros((SIZE, SIZE), np.uint8)
    d[5:10, 10:12] = 1  # by hand: positions 10*64+5 = 645 (5 pixels, ending at 650) and 11*64+5 = 709 = 650 + 59
    f = np.zeros((SIZE, SIZE), np.uint8)
    f[0:3, 63] = 1
    f[61:64, 0] = 1
    masks = {A: a1 | a2, B: np.zeros_like(a1), C: c, D: d, E: np.zeros_like(a1), F: f}
    rows = {A: [rle_encode(a1), rle_encode(a2)], B: ["-1"], C: [rle_encode(c)], D: ["645 5 59 5"], E: ["-1"],
            F: [rle_encode(f)]}
    return masks, rows


def test_rle_against_hand_drawn_masks():
    # the docstring's example: a 3 x 4 (rows x columns) mask, positions counted down each column
    drawn = np.array([[0, 1, 0, 0],
                      [0, 1, 0, 1],
                      [0, 0, 0, 1]], np.uint8)
    assert rle_encode(drawn) == "3 2 5 2"
    np.testing.assert_array_equal(rle_decode("3 2 5 2", width=4, height=3), drawn)
    masks, rows = _hand_masks()
    np.testing.assert_array_equal(rle_decode(rows[D][0], SIZE, SIZE), masks[D])
    assert rle_encode(masks[D]) == "645 5 59 5"
    # a run across a column boundary: the last 2 pixels of column 0 and the first 2 of column 1
    across = np.zeros((5, 3), np.uint8)
    across[3:, 0] = across[:2, 1] = 1
    assert rle_encode(across) == "3 4"
    # empty masks
    assert rle_encode(np.zeros((4, 4))) == "-1"
    np.testing.assert_array_equal(rle_decode("-1", 4, 2), np.zeros((2, 4), np.uint8))
    # round trips: random masks of a non-square shape, and a full one
    rng = np.random.default_rng(0)
    for p in (0.05, 0.5, 0.95):
        mask = (rng.random((37, 53)) < p).astype(np.uint8)
        np.testing.assert_array_equal(rle_decode(rle_encode(mask), width=53, height=37), mask)
    assert rle_encode(np.ones((3, 2))) == "0 6"
    for bad, match in (("3 2 5", "pairs"), ("3 -2", ">= 0"), ("3 0", "lengths > 0"), ("3 2 5 x", "integers"),
                       ("10 3", "beyond the 4 x 3 image")):
        with pytest.raises(ValueError, match=match):
            rle_decode(bad, 4, 3)


def write_dicom(path, pixels, patient_id):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = path.stem
    ds.Modality = "CR"
    ds.PatientID = patient_id
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_rle(path, rows, header="ImageId, EncodedPixels"):
    lines = [header] + [f"{image_id}, {rle}" for image_id, rles in rows.items() for rle in rles]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def siim(shared_data_dir, tmp_path):
    root = tmp_path / "siim"
    nih = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))
    masks, rows = _hand_masks()
    paths, patients = {}, {}
    for k, (image_id, source) in enumerate(zip(masks, nih)):
        paths[image_id] = root / "dicom-images-train" / generate_uid() / generate_uid() / f"{image_id}.dcm"
        patients[image_id] = "" if image_id == C else f"patient-{k:03d}"
        write_dicom(paths[image_id], np.asarray(PIL.Image.open(source).convert("L")), patients[image_id])
    _write_rle(root / "train-rle.csv", rows)
    split_dir = tmp_path / "splits" / "mrm" / "SIIM-ACR_Pneumothorax"
    split_dir.mkdir(parents=True)
    for name, ids in LISTS.items():
        (split_dir / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return {"root": root, "split_dir": split_dir, "masks": masks, "rows": rows, "paths": paths, "patients": patients,
            "png": tmp_path / "png"}


def test_interface_masks_and_splits(siim, caplog):
    ds = load_target_dataset("siim_acr_pneumothorax", siim["root"], converted_dir=siim["png"])
    features = ds["train"].features
    assert isinstance(features["image"], datasets.Image) and isinstance(features["mask"], datasets.Image)
    assert features["labels"].names == list(SIIM_LABEL_NAMES)
    assert TARGET_DATASETS["siim_acr_pneumothorax"].label_names == SIIM_LABEL_NAMES
    assert list(features) == ["image_id", "patient_id", "image", "mask", "labels"]
    assert {s: d["image_id"] for s, d in ds.items()} == {"train": LISTS["train_list"], "validation": LISTS["val_list"],
                                                         "test": LISTS["test_list"]}
    assert "MRM's lists overlap" in caplog.text and "'train&test': 1" in caplog.text
    for split in ds:
        for row in ds[split]:
            image_id = row["image_id"]
            assert row["mask"].mode == "L" and row["mask"].size == row["image"].size
            np.testing.assert_array_equal(np.asarray(row["mask"]), siim["masks"][image_id])
            assert row["labels"] == int(siim["masks"][image_id].any())
            assert row["patient_id"] == (siim["patients"][image_id] or image_id)
            np.testing.assert_array_equal(np.asarray(row["image"]), load_dicom(siim["paths"][image_id]))
    assert ds["train"]["labels"] == [1, 1, 0]
    # label ratios: train_10 (here 2 ids), and train_1, which ../shared/data does not have
    ten = load_siim_acr_pneumothorax(siim["root"], label_ratio=0.1, converted_dir=siim["png"])
    assert ten["train"]["image_id"] == [A, B]
    with pytest.raises(FileNotFoundError, match=r"train_1.txt: MRM's train list .*DatasetsSplits/SIIM-ACR_Pneumothor"):
        load_siim_acr_pneumothorax(siim["root"], label_ratio=0.01)
    (siim["split_dir"] / "train_1.txt").write_text(C + "\n")
    one = load_siim_acr_pneumothorax(siim["root"], label_ratio=0.01, converted_dir=siim["png"])
    assert one["train"]["image_id"] == [C]


def test_masks_follow_a_shrunk_image(siim):
    ds = load_siim_acr_pneumothorax(siim["root"], label_ratio=0.1, converted_dir=siim["png"], dicom_max_size=32)
    row = ds["train"][0]
    assert row["image"].size == row["mask"].size == (32, 32)
    expected = PIL.Image.fromarray(siim["masks"][A]).resize((32, 32), PIL.Image.Resampling.NEAREST)
    np.testing.assert_array_equal(np.asarray(row["mask"]), np.asarray(expected))


def test_errors_name_the_file_and_row(siim):
    root, rows, split_dir = siim["root"], siim["rows"], siim["split_dir"]
    kw = {"converted_dir": siim["png"]}
    _write_rle(root / "train-rle.csv", rows, header="ImageId,Pixels")
    with pytest.raises(InvalidDataError, match=r"train-rle.csv: missing column\(s\) \['EncodedPixels'\]"):
        load_siim_acr_pneumothorax(root, **kw)
    # a list id that train-rle.csv does not have
    _write_rle(root / "train-rle.csv", {k: v for k, v in rows.items() if k != E})
    with pytest.raises(InvalidDataError, match=rf"val_list.txt, line 2: ImageId '{E}' is not in .*train-rle.csv"):
        load_siim_acr_pneumothorax(root, **kw)
    # "-1" together with a region; a malformed run
    _write_rle(root / "train-rle.csv", {**rows, E: ["-1", "645 5"]})
    with pytest.raises(InvalidDataError, match=r"train-rle.csv, row 6 \(ImageId .*10003.*\): both '-1'"):
        load_siim_acr_pneumothorax(root, **kw)
    _write_rle(root / "train-rle.csv", {**rows, E: ["4090 10"]})
    with pytest.raises(InvalidDataError, match=r"row 6 .*EncodedPixels: RLE run ends at position 4100, beyond"):
        load_siim_acr_pneumothorax(root, **kw)
    _write_rle(root / "train-rle.csv", rows)
    # a missing image: the list and line; skip_invalid leaves it out of every split
    siim["paths"][A].unlink()
    with pytest.raises(InvalidDataError, match=rf"train_list.txt, line 2: image {A}.dcm not found under"):
        load_siim_acr_pneumothorax(root, **kw)
    partial = load_siim_acr_pneumothorax(root, skip_invalid=True, **kw)
    assert {s: d["image_id"] for s, d in partial.items()} == {"train": [C, B], "validation": [D, E], "test": [F]}


def test_mrm_lists_partial_copy(need_shared_data, siim):
    """MRM's real lists (797 / 7,969 / 1,898 / 1,904 ids) against the fixture's six images."""
    shared = need_shared_data("splits/mrm/SIIM-ACR_Pneumothorax/train_list.txt",
                              why="MRM's full SIIM-ACR lists")
    split_dir = shared / "splits" / "mrm" / "SIIM-ACR_Pneumothorax"
    with pytest.raises(InvalidDataError, match=r"train_10.txt, line 3: ImageId .* is not in"):
        load_siim_acr_pneumothorax(siim["root"], split_dir=split_dir, label_ratio=0.1, converted_dir=siim["png"])
    ds = load_siim_acr_pneumothorax(siim["root"], split_dir=split_dir, label_ratio=0.1, converted_dir=siim["png"],
                                    skip_invalid=True)
    for split, name in (("train", "train_10"), ("validation", "val_list"), ("test", "test_list")):
        real = (split_dir / f"{name}.txt").read_text().split()
        assert ds[split]["image_id"] == [i for i in real if i in siim["masks"]]
    assert ds["train"]["image_id"] == [A, B]
