"""RSNA Pneumonia builder with MRM's lists: the Kaggle stage-2 layout in tmp_path (real NIH radiographs written as
DICOM with pydicom: 8-bit MONOCHROME2 as RSNA's files, one 16-bit MONOCHROME1), `stage_2_train_labels.csv` with box
rows, and MRM's list lines for those images (copied from ../shared/data/splits/mrm/RSNA_Pneumonia)."""

import csv

import numpy as np
import PIL.Image
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from datasets_scripts import TARGET_DATASETS, InvalidDataError, load_target_dataset
from datasets_scripts.label_ratio import select_by_ids
from datasets_scripts.mrm_lists import write_mrm_label_ids
from datasets_scripts.rsna_pneumonia import RSNA_PNEUMONIA_LABEL_NAMES, load_rsna_pneumonia
from modeling_refers.radiograph_io import load_dicom

pytestmark = pytest.mark.filterwarnings("ignore:rsna_pneumonia. split")  # tiny splits without one of the classes
T = "stage_2_train_images/"
TRAIN_1 = [f"{T}f1d1ceac-9e6d-4ca8-b0da-f918df585511.dcm 0 ", f"{T}a681ac25-1798-4c81-8e28-a1c5014e00bf.dcm 1 ",
           f"{T}02b7b018-0fed-44c2-a9c2-93b2b3952efc.dcm 1 "]
TRAIN_10 = [f"{T}000db696-cf54-4385-b10b-6b16fbb3f985.dcm 1 ", f"{T}02b7b018-0fed-44c2-a9c2-93b2b3952efc.dcm 1 ",
            f"{T}0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm 0 "]
TRAIN_LIST = [TRAIN_10[2], TRAIN_10[0], TRAIN_10[1], TRAIN_1[1], TRAIN_1[0]]
VAL = [f"{T}f3167256-c029-4656-9d51-a96fb895d498.dcm 0 ", f"{T}f31a958a-66bf-4ccc-9fd7-79bbb9d17e7a.dcm 1 "]
TEST = ["stage_2_test_images/2d29c5d7-cd1e-4fb7-896b-c55b69ca6c96.dcm 1 ",
        "stage_2_test_images/23fe0fe9-6021-401d-a981-9c9766bf96b9.dcm 0 "]
CSV_FIELDS = ["patientId", "x", "y", "width", "height", "Target"]


def _entries(lines):
    return {line.split()[0]: int(line.split()[1]) for line in lines}


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=8):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientID = path.stem
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _stretch(values):
    """Independent reference: the image's own minimum to maximum onto 0..255 (no VOI transform in these files)."""
    values = values.astype(np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


def _write_labels(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f for f in CSV_FIELDS if f in rows[0]])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def rsna(shared_data_dir, tmp_path):
    root = tmp_path / "rsna"
    nih = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))
    listed = {**_entries(TRAIN_LIST), **_entries(VAL), **_entries(TEST)}
    pixels, rows = {}, []
    for k, (entry, source) in enumerate(zip(listed, nih)):
        gray = np.asarray(PIL.Image.open(source).convert("L"))
        pixels[entry.split("/")[1][:-4]] = gray
        if k == 1:  # 16-bit MONOCHROME1: stored values inverted
            write_dicom(root / entry, (65535 - gray.astype(np.uint16) * 257).astype(np.uint16), "MONOCHROME1", 16)
        else:
            write_dicom(root / entry, gray)
        if entry.startswith(T):
            patient = entry[len(T):-4]
            if listed[entry]:  # a positive image has one row per box
                rows += [{"patientId": patient, "x": 100 + 50 * b, "y": 200, "width": 80, "height": 120, "Target": 1}
                         for b in range(2)]
            else:
                rows.append({"patientId": patient, "x": "", "y": "", "width": "", "height": "", "Target": 0})
    _write_labels(root / "stage_2_train_labels.csv", rows)
    split_dir = tmp_path / "splits" / "mrm" / "RSNA_Pneumonia"
    split_dir.mkdir(parents=True)
    for name, lines in (("train_1", TRAIN_1), ("train_10", TRAIN_10), ("train_list", TRAIN_LIST), ("val_list", VAL),
                        ("test_list", TEST)):
        (split_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, "split_dir": split_dir, "pixels": pixels, "rows": rows, "png": tmp_path / "png"}


def _check_split(dataset, lines):
    expected = _entries(lines)
    assert dataset["image_id"] == [e.split("/")[1][:-4] for e in expected]  # exactly the listed images, in order
    assert dataset["patient_id"] == dataset["image_id"]
    assert dataset["labels"] == list(expected.values())


def test_ratio_lists_select_exactly_the_listed_images(rsna, caplog):
    for ratio, lines in ((0.01, TRAIN_1), (0.1, TRAIN_10), (1.0, TRAIN_LIST)):
        ds = load_target_dataset("rsna_pneumonia", rsna["root"], label_ratio=ratio, converted_dir=rsna["png"])
        _check_split(ds["train"], lines)
        _check_split(ds["validation"], VAL)
        _check_split(ds["test"], TEST)
    ids = write_mrm_label_ids("rsna_pneumonia", rsna["split_dir"], 0.1, rsna["png"] / "ids.json")  # --label_ids_path
    assert ids == [e[len(T):-4] for e in _entries(TRAIN_10)]
    selected = select_by_ids(ds["train"], rsna["png"] / "ids.json")  # in the full split's order
    assert sorted(selected["image_id"]) == sorted(ids)
    assert ds["train"].features["labels"].names == list(RSNA_PNEUMONIA_LABEL_NAMES)
    assert TARGET_DATASETS["rsna_pneumonia"].label_names == RSNA_PNEUMONIA_LABEL_NAMES
    assert "differ from the split lists" not in caplog.text
    # the PNGs hold the DICOM pixels: the package's reader, and the original 8-bit radiograph stretched to 0..255
    for split in ("train", "validation", "test"):
        for row in ds[split]:
            image = np.asarray(row["image"])
            # (the reader computes in float32, this reference in float64: a .5 tie may round the other way)
            assert np.abs(image.astype(int) - _stretch(rsna["pixels"][row["image_id"]])).max() <= 1
            folder = "stage_2_test_images" if split == "test" else "stage_2_train_images"
            np.testing.assert_array_equal(image, load_dicom(rsna["root"] / folder / f"{row['image_id']}.dcm"))


def test_labels_csv_checks_and_the_list_winning(rsna, caplog):
    rows = [dict(r) for r in rsna["rows"]]
    first = TRAIN_1[0].split()[0][len(T):-4]
    next(r for r in rows if r["patientId"] == first)["Target"] = 1  # the CSV says pneumonia, MRM's list says 0
    _write_labels(rsna["root"] / "stage_2_train_labels.csv", rows)
    ds = load_rsna_pneumonia(rsna["root"], label_ratio=0.01, converted_dir=rsna["png"])
    assert ds["train"]["labels"][0] == 0
    assert "1 of 5 listed rows have labels that differ from the split lists" in caplog.text
    # a listed training image that the CSV does not know
    _write_labels(rsna["root"] / "stage_2_train_labels.csv", [r for r in rows if r["patientId"] != first])
    with pytest.raises(InvalidDataError, match=rf"train_1.txt, line 1: patientId '{first}' is not in .*labels.csv"):
        load_rsna_pneumonia(rsna["root"], label_ratio=0.01, converted_dir=rsna["png"])
    # a missing column
    _write_labels(rsna["root"] / "stage_2_train_labels.csv",
                  [{k: v for k, v in r.items() if k != "Target"} for r in rows])
    with pytest.raises(InvalidDataError, match=r"stage_2_train_labels.csv: missing column\(s\) \['Target'\]"):
        load_rsna_pneumonia(rsna["root"], label_ratio=0.01, converted_dir=rsna["png"])
    # without the CSV the lists are the only labels
    (rsna["root"] / "stage_2_train_labels.csv").unlink()
    _check_split(load_rsna_pneumonia(rsna["root"], label_ratio=0.1, converted_dir=rsna["png"])["train"], TRAIN_10)


def test_missing_images_and_bad_lists(rsna):
    root, split_dir = rsna["root"], rsna["split_dir"]
    missing = root / VAL[1].split()[0]
    missing.unlink()
    with pytest.raises(InvalidDataError, match=rf"val_list.txt, line 2: image {missing} not found"):
        load_rsna_pneumonia(root, label_ratio=0.1, converted_dir=rsna["png"])
    partial = load_rsna_pneumonia(root, label_ratio=0.1, converted_dir=rsna["png"], skip_invalid=True)
    _check_split(partial["validation"], VAL[:1])
    (split_dir / "test_list.txt").write_text(TEST[0] + "\n" + TEST[0] + "\n")
    with pytest.raises(InvalidDataError, match=r"test_list.txt, line 2: '.*2d29c5d7.*' is already listed on line 1"):
        load_rsna_pneumonia(root, label_ratio=0.1, converted_dir=rsna["png"], skip_invalid=True)
    with pytest.raises(ValueError, match=r"label_ratio must be one of"):
        load_rsna_pneumonia(root, label_ratio=10)


def test_dicom_max_size(rsna):
    ds = load_rsna_pneumonia(rsna["root"], label_ratio=0.01, converted_dir=rsna["png"], dicom_max_size=32)
    assert {row["image"].size for row in ds["train"]} == {(32, 32)}


def test_mrm_lists_partial_copy(need_shared_data, rsna):
    """MRM's real lists (251 / 2,518 / 25,184 / 1,500 / 3,000 lines) against the fixture's few images."""
    shared = need_shared_data("splits/mrm/RSNA_Pneumonia/train_1.txt", "splits/mrm/RSNA_Pneumonia/test_list.txt",
                              why="MRM's full RSNA Pneumonia lists")
    split_dir = shared / "splits" / "mrm" / "RSNA_Pneumonia"
    (rsna["root"] / "stage_2_train_labels.csv").unlink()
    with pytest.raises(InvalidDataError, match=r"train_1.txt, line 2: image .*71d63444-.*dcm not found"):
        load_rsna_pneumonia(rsna["root"], split_dir=split_dir, label_ratio=0.01, converted_dir=rsna["png"])
    ds = load_rsna_pneumonia(rsna["root"], split_dir=split_dir, label_ratio=0.01, converted_dir=rsna["png"],
                             skip_invalid=True)
    real = (split_dir / "train_1.txt").read_text().splitlines()
    _check_split(ds["train"], [line for line in real if line.split()[0] in _entries(TRAIN_LIST)])
    _check_split(ds["test"], [line for line in (split_dir / "test_list.txt").read_text().splitlines()
                              if line.split()[0] in _entries(TEST)])
