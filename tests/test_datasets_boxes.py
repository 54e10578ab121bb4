"""Ground-truth boxes from the builders: NIH's BBox_List_2017.csv scaled to the image files, and VinBigData's
per-radiologist boxes (real NIH pixels as PNG and DICOM, boxes written for the test), scaled when DICOMs shrink."""

import csv
import shutil

import numpy as np
import PIL.Image
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from datasets_scripts import InvalidDataError, NIH_LABEL_NAMES
from datasets_scripts.nih_chestxray14 import load_nih_bounding_boxes, load_nih_chestxray14
from datasets_scripts.vinbigdata import load_vinbigdata
from test_explanations import OFFICIAL_ROWS


@pytest.fixture
def bbox_file(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(OFFICIAL_ROWS)
    return path


def test_nih_boxes_are_scaled_to_the_image_files(shared_data_dir, bbox_file):
    data_dir = shared_data_dir / "nih_chestxray14_sample"
    boxes = load_nih_bounding_boxes(data_dir, bbox_file)
    present = {p.name for p in (data_dir / "images").glob("*.png")}
    assert set(boxes) == {line.split(",")[0] for line in OFFICIAL_ROWS.splitlines()[1:]} & present
    # 00000211_016.png,Infiltrate,237.3079365,465.9470899,230.8063492,328.3301587 on a 64-px image: / 16
    if "00000211_016.png" in boxes:
        (box,) = boxes["00000211_016.png"]
        assert box["label"] == "Infiltration"  # the table's "Infiltrate"
        assert (box["x_min"], box["y_min"]) == (pytest.approx(237.3079365 / 16), pytest.approx(465.9470899 / 16))
        assert box["x_max"] == pytest.approx((237.3079365 + 230.8063492) / 16)
        assert box["y_max"] == pytest.approx((465.9470899 + 328.3301587) / 16)
    kept = load_nih_bounding_boxes(data_dir, bbox_file, only_present=False)  # absent images: 1024-px frame
    assert len(kept) == 9
    scale = 1 / 16 if "00000211_010.png" in present else 1.0
    assert kept["00000211_010.png"][0]["x_min"] == pytest.approx(353.0847458 * scale)


def test_nih_builder_column(shared_data_dir, bbox_file):
    with pytest.warns(UserWarning):
        data = load_nih_chestxray14(shared_data_dir / "nih_chestxray14_sample", with_boxes=True, bbox_file=bbox_file)
    expected = load_nih_bounding_boxes(shared_data_dir / "nih_chestxray14_sample", bbox_file)
    seen = {}
    for split in data.values():
        for image_id, group in zip(split["image_id"], split["boxes"]):
            if group:
                seen[image_id] = group
    assert set(seen) == set(expected)
    for image_id, group in seen.items():
        assert [b["label"] for b in group] == [b["label"] for b in expected[image_id]]
        assert group[0]["x_max"] == pytest.approx(expected[image_id][0]["x_max"], rel=1e-6)  # float32 column
        assert all(b["label"] in NIH_LABEL_NAMES for b in group)


def test_nih_full_box_table(need_shared_data):
    root = need_shared_data("nih_chestxray14_sample/BBox_List_2017.csv", why="NIH's official box table")
    boxes = load_nih_bounding_boxes(root / "nih_chestxray14_sample", only_present=False)
    assert len(boxes) == 880 and sum(map(len, boxes.values())) == 984  # the release's counts
    assert {b["label"] for group in boxes.values() for b in group} == {
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"}


@pytest.mark.parametrize("row, message", [
    ("00000211_016.png,Fracture,1,2,3,4", "row 1: unknown finding 'Fracture'"),
    ("00000211_016.png,Mass,1,2,three,4", "row 1: expected four numbers"),
    ("00000211_016.png,Mass,1,2,0,4", "row 1: box width and height must be positive"),
])
def test_nih_bad_rows_are_named(shared_data_dir, tmp_path, row, message):
    path = tmp_path / "b.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h]\n" + row + "\n")
    with pytest.raises(InvalidDataError, match=message):
        load_nih_bounding_boxes(shared_data_dir / "nih_chestxray14_sample", path)
    with pytest.raises(FileNotFoundError, match="BBox_List_2017.csv"):
        load_nih_bounding_boxes(tmp_path)


# ------------------------------------------------------------------------------------------------- VinBigData
def _dicom(path, pixels):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=8)
    ds.save_as(path, enforce_file_format=True)


def test_vinbigdata_boxes_per_radiologist(shared_data_dir, tmp_path):
    nih = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))
    root = tmp_path / "vin"
    (root / "train").mkdir(parents=True)
    shutil.copy(nih[0], root / "train" / "aaa.png")  # used as it is: boxes unscaled
    shutil.copy(nih[1], root / "train" / "ccc.png")
    with PIL.Image.open(nih[2]) as image:  # a 256-px DICOM, shrunk to 128 px: boxes halved
        _dicom(root / "train" / "bbb.dicom", np.asarray(image.convert("L").resize((256, 256))))
    rows = [
        ("aaa", "Cardiomegaly", 3, "R1", 10, 20, 40, 50), ("aaa", "Cardiomegaly", 3, "R2", 12, 22, 44, 52),
        ("aaa", "Nodule/Mass", 8, "R2", 5, 5, 9, 9), ("aaa", "No finding", 14, "R3", "", "", "", ""),
        ("bbb", "Pleural effusion", 10, "R1", 100, 60, 200, 180), ("ccc", "No finding", 14, "R1", "", "", "", ""),
    ]
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        writer.writerows(rows)
    data = load_vinbigdata(root, split_dir=tmp_path / "no_lists", converted_dir=tmp_path / "png", dicom_max_size=128,
                           with_boxes=True)
    boxes = {i: b for split in data.values() for i, b in zip(split["image_id"], split["boxes"])}
    assert [(b["label"], b["rad_id"], b["x_min"], b["y_max"]) for b in boxes["aaa"]] == [
        ("Cardiomegaly", "R1", 10, 50), ("Cardiomegaly", "R2", 12, 52), ("Nodule/Mass", "R2", 5, 9)]
    assert [(b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in boxes["bbb"]] == [(50, 30, 100, 90)]
    assert boxes["ccc"] == []
    assert "boxes" not in load_vinbigdata(root, split_dir=tmp_path / "no_lists", converted_dir=tmp_path / "png",
                                          dicom_max_size=128)["train"].features

    with open(root / "train.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["ccc", "Atelectasis", 1, "R2", 30, 30, 20, 40])
    with pytest.raises(InvalidDataError, match="row 7: box .* needs x_max > x_min"):
        load_vinbigdata(root, split_dir=tmp_path / "no_lists", converted_dir=tmp_path / "png", with_boxes=True)
