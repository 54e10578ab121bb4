"""VinBigData chest X-ray abnormalities: `train.csv` (per-radiologist boxes) + images -> 14 image labels.

Layout (Kaggle "vinbigdata-chest-xray-abnormalities-detection"): `<data_dir>/train.csv` with columns
`image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max` (one row per box; three radiologists
read each image) and images `<data_dir>/train/<image_id>.dicom` (or `.dcm`, or 8-bit `.png`/`.jpg`
conversions, which are used as they are).

Labels: `labels[c] = 1.0` when ANY radiologist drew a box of class `VINBIGDATA_LABEL_NAMES[c]` on the
image; "No finding" (class id 14) adds nothing (an image only "No finding" is all-zero). An unknown
`class_name`, or a `class_id` that disagrees with the competition's id of that name, is an error.

Label order. `VINBIGDATA_LABEL_NAMES` is the paper's order (DESIGN.md), which differs from the
competition's class ids (`VINBIGDATA_CLASS_IDS`, 0..13 alphabetical-ish, 14 = No finding). The REFERS
split lists (`splits/vinbigdata/*.txt`, 14 float columns) use the paper's order; we checked this on the
lists alone (train.csv is not in ../shared/data): the column sums over the 15,000 listed images are
3067, 186, 96, 1322, 1981, 386, 1617, 452, 1032, 353, 2300, 1134, 826, 613, which are the competition's
image counts "any radiologist" of Aortic enlargement (3067), Atelectasis (186), Pneumothorax (96), Lung
Opacity, Pleural thickening (1981), ILD (386), Pulmonary fibrosis (1617), Calcification, Pleural effusion,
Consolidation, Cardiomegaly (2300), Other lesion, Nodule/Mass, Infiltration; 10,606 rows are all-zero
(the competition's "No finding"-only images); and the strongest co-occurrence is columns 0 and 10
(1,973 images: aortic enlargement with cardiomegaly). In the competition's id order column 2 would be
Calcification and column 10 Pleural effusion, which fits none of this. So split-file columns ==
`VINBIGDATA_LABEL_NAMES`, and labels computed from train.csv are compared with the lists (disagreements
are counted in a log warning).

Splits: the paper's `train.txt`/`val.txt`/`test.txt` (default `<data_dir>/../splits/vinbigdata`), matched
on image id; images not listed (and all images when there are no lists) get a seeded 70/10/20 split
(no patient ids are published, so each image is its own patient).

DICOM: converted once to 8-bit PNG in `converted_dir` (see `dicom_to_uint8`), written atomically and
reused while newer than the DICOM; `datasets.Image()` then decodes the PNG lazily.

Boxes: `boxes_from_table` reads every radiologist's box (`x_min, y_min, x_max, y_max`, pixels of the original
image) per image; `load_vinbigdata(..., with_boxes=True)` adds them as a `boxes` column of `{label, rad_id, x_min,
y_min, x_max, y_max}` (label in `VINBIGDATA_LABEL_NAMES`; "No finding" rows have no box), scaled to the PNG when a
DICOM was shrunk by `dicom_max_size`. PNG/JPEG inputs are used as they are, so their boxes stay in train.csv's
coordinates (the original DICOM's pixels).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import DatasetDict, List, Value

from modeling_refers.file_utils import atomic_open
from modeling_refers.radiograph_io import load_dicom

from .common import (
    InvalidDataError,
    InvalidEntries,
    assign_splits,
    build_dataset_dict,
    check_images,
    compare_with_listed_labels,
    multi_label_features,
    read_split_lists,
    read_table,
    resolve_split_dir,
    warn_missing_positives,
)

logger = logging.getLogger(__name__)

VINBIGDATA_LABEL_NAMES = (
    "Aortic enlargement", "Atelectasis", "Pneumothorax", "Lung Opacity", "Pleural thickening", "ILD",
    "Pulmonary fibrosis", "Calcification", "Pleural effusion", "Consolidation", "Cardiomegaly", "Other lesion",
    "Nodule/Mass", "Infiltration",
)
VINBIGDATA_CLASS_IDS = {
    "Aortic enlargement": 0, "Atelectasis": 1, "Calcification": 2, "Cardiomegaly": 3, "Consolidation": 4,
    "ILD": 5, "Infiltration": 6, "Lung Opacity": 7, "Nodule/Mass": 8, "Other lesion": 9, "Pleural effusion": 10,
    "Pleural thickening": 11, "Pneumothorax": 12, "Pulmonary fibrosis": 13, "No finding": 14,
}
NO_FINDING = "No finding"
DEFAULT_SPLIT_DIR = "vinbigdata"
REQUIRED_COLUMNS = ("image_id", "class_name")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dicom", ".dcm")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
BOX_FEATURE = List({"label": Value("string"), "rad_id": Value("string"), "x_min": Value("float32"),
                    "y_min": Value("float32"), "x_max": Value("float32"), "y_max": Value("float32")})
DICOM_EXTENSIONS = (".dicom", ".dcm")
DICOM_READER_TAG = "v2"  # part of default_converted_dir: bump when dicom_to_uint8's pixels change


def dicom_to_uint8(path: str | os.PathLike, use_voi_lut: bool = True) -> np.ndarray:
    """[H, W] uint8 image of a single-frame grayscale DICOM: the processor's reader
    (`modeling_refers.radiograph_io.load_dicom`: modality LUT -> VOI LUT or window, incl. SIGMOID ->
    its output range to 0..255 (min-max without one) -> inverted for MONOCHROME1 / Presentation LUT Shape
    INVERSE), so that the PNGs trained on hold the pixels a DICOM gets at inference."""
    image = load_dicom(path, use_voi_lut=use_voi_lut)
    if image.ndim != 2:
        raise ValueError(f"DICOM file '{os.fspath(path)}': expected one grayscale frame, got pixel array of shape "
                         f"{image.shape}")
    return image


def convert_dicom(source: Path, target: Path, max_size: int | None = None) -> None:
    """Writes `dicom_to_uint8(source)` as PNG to `target` (atomically), shrunk so that its longer side is
    at most `max_size` when given."""
    image = PIL.Image.fromarray(dicom_to_uint8(source), mode="L")
    if max_size is not None and max(image.size) > max_size:
        image.thumbnail((max_size, max_size), PIL.Image.Resampling.LANCZOS)
    with atomic_open(target, "wb") as handle:
        image.save(handle, format="PNG")


def _convert_or_error(source: Path, target: Path, max_size: int | None) -> str | None:
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return None
    try:
        convert_dicom(source, target, max_size)
    except Exception as err:  # pydicom/numpy raise many types for broken files
        return f"{type(err).__name__}: {err}"
    return None


def default_converted_dir(image_dir: Path, max_size: int | None) -> Path:
    """`<datasets cache>/refers_vinbigdata_png/<hash of the image folder>-<size>-<reader>`: the reader tag changes
    when `dicom_to_uint8` gives other pixels (v2: the processor's `load_dicom`, VOI output range instead of a
    min-max stretch after the VOI), so PNGs made by an older reader are not reused."""
    import datasets.config

    digest = hashlib.sha1(str(image_dir.resolve()).encode()).hexdigest()[:12]
    return Path(datasets.config.HF_DATASETS_CACHE) / "refers_vinbigdata_png" / f"{digest}-{max_size or 'full'}-{DICOM_READER_TAG}"


def labels_from_boxes(table, table_path: Path, invalid: InvalidEntries) -> dict[str, list[float]]:
    """`{image_id: multi-hot}` from the per-radiologist rows of train.csv (any radiologist -> positive)."""
    has_ids = "class_id" in table.columns
    labels: dict[str, list[float]] = {}
    bad_images: set[str] = set()
    for row_no, record in enumerate(table.to_dict("records"), start=1):
        image_id = record["image_id"].strip()
        name = record["class_name"].strip()
        where = f"{table_path}, row {row_no}"
        if not image_id:
            invalid("empty image id", f"{where}: empty 'image_id'")
            continue
        vector = labels.setdefault(image_id, [0.0] * len(VINBIGDATA_LABEL_NAMES))
        if name not in VINBIGDATA_CLASS_IDS:
            invalid("unknown label", f"{where}: unknown label '{name}' in 'class_name' (image {image_id}); expected "
                    f"one of {list(VINBIGDATA_CLASS_IDS)}")
            bad_images.add(image_id)
            continue
        if has_ids and record["class_id"].strip() and record["class_id"].strip() != str(VINBIGDATA_CLASS_IDS[name]):
            invalid("unknown label", f"{where}: class_id {record['class_id']!r} does not match class_name '{name}' "
                    f"(competition id {VINBIGDATA_CLASS_IDS[name]})")
            bad_images.add(image_id)
            continue
        if name != NO_FINDING:
            vector[VINBIGDATA_LABEL_NAMES.index(name)] = 1.0
    return {k: v for k, v in labels.items() if k not in bad_images}


def boxes_from_table(table, table_path: Path, invalid: InvalidEntries) -> dict[str, list[dict]]:
    """`{image_id: [{"label", "rad_id", "x_min", "y_min", "x_max", "y_max"}, ...]}`: every radiologist's box of a
    finding (in train.csv's pixel coordinates); "No finding" and unknown labels give none. A finding row without
    four numbers, or with `x_max <= x_min` / `y_max <= y_min`, is an invalid entry (file and row named)."""
    missing = [c for c in BOX_COLUMNS if c not in table.columns]
    if missing:
        raise InvalidDataError(f"{table_path}: boxes need the columns {list(BOX_COLUMNS)}; missing {missing}")
    has_rad = "rad_id" in table.columns
    boxes: dict[str, list[dict]] = {}
    for row_no, record in enumerate(table.to_dict("records"), start=1):
        name = record["class_name"].strip()
        if name == NO_FINDING or name not in VINBIGDATA_CLASS_IDS:
            continue
        where = f"{table_path}, row {row_no}"
        try:
            x0, y0, x1, y1 = (float(record[c]) for c in BOX_COLUMNS)
        except ValueError:
            invalid("bad box", f"{where}: a {name!r} row needs numbers in {list(BOX_COLUMNS)}, got "
                    f"{[record[c] for c in BOX_COLUMNS]}")
            continue
        if not (x1 > x0 and y1 > y0):
            invalid("bad box", f"{where}: box ({x0}, {y0}, {x1}, {y1}) needs x_max > x_min and y_max > y_min")
            continue
        boxes.setdefault(record["image_id"].strip(), []).append(
            {"label": name, "rad_id": record["rad_id"].strip() if has_rad else "", "x_min": x0, "y_min": y0,
             "x_max": x1, "y_max": y1})
    return boxes


def _scale_boxes(boxes: list[dict], sx: float, sy: float) -> list[dict]:
    return [dict(b, x_min=b["x_min"] * sx, x_max=b["x_max"] * sx, y_min=b["y_min"] * sy, y_max=b["y_max"] * sy)
            for b in boxes]


def _dicom_size(path: Path) -> tuple[int, int]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Columns), int(ds.Rows)


def _convert_dicom_rows(rows: list[dict], sources: list[str], dicom: list[int], ok: list[bool], invalid,
                       image_dir: Path, converted_dir, dicom_max_size: int | None, boxes: dict | None) -> None:
    """Convert the DICOM rows (indices `dicom`) to 8-bit PNG in place: each good row's `image` becomes its PNG,
    missing or corrupt ones are reported to `invalid` and marked False in `ok`; with `dicom_max_size` the boxes
    of a downsized image are rescaled to the PNG's pixels."""
    present = [i for i in dicom if rows[i]["image"].is_file()]
    for i in sorted(set(dicom) - set(present)):
        invalid("missing image", f"{sources[i]}: image {rows[i]['image']} not found")
        ok[i] = False
    out_dir = Path(converted_dir) if converted_dir is not None else default_converted_dir(image_dir, dicom_max_size)
    targets = {i: out_dir / f"{rows[i]['image_id']}.png" for i in present}
    logger.info("vinbigdata: converting %d DICOM files to 8-bit PNG in %s", len(present), out_dir)
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) if len(present) > 64 else \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        errors = list(pool.map(_convert_or_error, [rows[i]["image"] for i in present], [targets[i] for i in present],
                               [dicom_max_size] * len(present)))
    for i, err in zip(present, errors):
        if err is not None:
            invalid("corrupt image", f"{sources[i]}: image file {rows[i]['image']} is corrupt ({err})")
            ok[i] = False
        else:
            if boxes is not None and dicom_max_size is not None and rows[i]["image_id"] in boxes:
                width, height = _dicom_size(rows[i]["image"])
                with PIL.Image.open(targets[i]) as png:
                    sx, sy = png.width / width, png.height / height
                boxes[rows[i]["image_id"]] = _scale_boxes(boxes[rows[i]["image_id"]], sx, sy)
            rows[i]["image"] = targets[i]


def load_vinbigdata(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    converted_dir: str | os.PathLike | None = None,
    dicom_max_size: int | None = None,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
    with_boxes: bool = False,
) -> DatasetDict:
    """VinBigData as a DatasetDict (train/validation/test) of `image_id`, `patient_id` (= image id), `image`,
    `labels` (float32 x 14, VINBIGDATA_LABEL_NAMES order), and with `with_boxes` the radiologists' `boxes`. See the
    module docstring."""
    data_dir = Path(data_dir).absolute()
    table_path = data_dir / "train.csv"
    table = read_table(table_path, REQUIRED_COLUMNS)
    invalid = InvalidEntries("vinbigdata", skip_invalid)
    image_dir = Path(image_dir).absolute() if image_dir is not None else data_dir / "train"
    labels = labels_from_boxes(table, table_path, invalid)
    boxes = boxes_from_table(table, table_path, invalid) if with_boxes else None

    first_row = {}
    for row_no, image_id in enumerate(table["image_id"].str.strip(), start=1):
        first_row.setdefault(image_id, row_no)
    rows, sources = [], []
    for image_id, vector in labels.items():
        where = f"{table_path}, row {first_row[image_id]} (image {image_id})"
        path = next((image_dir / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS if (image_dir / f"{image_id}{ext}").is_file()),
                    image_dir / f"{image_id}.dicom")
        rows.append({"image_id": image_id, "patient_id": image_id, "image": path, "labels": vector})
        sources.append(where)

    dicom = [i for i, r in enumerate(rows) if r["image"].suffix.lower() in DICOM_EXTENSIONS]
    raster = [i for i in range(len(rows)) if i not in set(dicom)]
    ok = [True] * len(rows)
    for i, good in zip(raster, check_images([(rows[i]["image"], sources[i]) for i in raster], invalid, verify_images,
                                            desc="Checking VinBigData images")):
        ok[i] = good
    if dicom:
        _convert_dicom_rows(rows, sources, dicom, ok, invalid, image_dir, converted_dir, dicom_max_size, boxes)
    rows = [dict(r, image=str(r["image"])) for r, good in zip(rows, ok) if good]
    if boxes is not None:
        for row in rows:
            row["boxes"] = boxes.get(row["image_id"], [])
    invalid.log_summary()

    keys = [r["image_id"] for r in rows]
    lists_dir = resolve_split_dir(data_dir, split_dir, DEFAULT_SPLIT_DIR)
    listed = None
    if lists_dir.is_dir():
        listed = read_split_lists(lists_dir, len(VINBIGDATA_LABEL_NAMES), key="stem")
        compare_with_listed_labels(keys, [r["labels"] for r in rows], listed, "vinbigdata")
    else:
        logger.info("vinbigdata: no split lists at %s; seeded 70/10/20 split", lists_dir)
    splits = assign_splits(keys, keys, listed, split_seed, "vinbigdata")
    features = multi_label_features(VINBIGDATA_LABEL_NAMES)
    if boxes is not None:
        features["boxes"] = BOX_FEATURE
    dataset = build_dataset_dict(rows, splits, features)
    logger.info("vinbigdata: %s", {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, VINBIGDATA_LABEL_NAMES, "vinbigdata")
    return dataset


__all__ = ["VINBIGDATA_LABEL_NAMES", "VINBIGDATA_CLASS_IDS", "boxes_from_table", "dicom_to_uint8", "convert_dicom",
           "load_vinbigdata"]