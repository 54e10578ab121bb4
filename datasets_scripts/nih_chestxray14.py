"""NIH ChestX-ray14: `Data_Entry_2017.csv` + PNG images -> multi-label DatasetDict (14 findings).

Layout (as distributed): `<data_dir>/Data_Entry_2017.csv` (columns `Image Index`, `Finding Labels`,
`Patient ID`), images in `<data_dir>/images/` or `<data_dir>/images_XXX/images/` (the official archives),
and the official `train_val_list.txt` / `test_list.txt`.

Labels: `labels[c] = 1.0` when `NIH_LABEL_NAMES[c]` is among the `|`-separated `Finding Labels`; "No Finding"
is the all-zero vector; any other name is an error. `NIH_LABEL_NAMES` is the paper's (alphabetical) order.

Splits:
- `split="refers"` (default): the paper's lists `<split_dir>/val.txt` and `test.txt` (default split_dir:
  `<data_dir>/../splits/nih_chestxray14`); every other image of the table is train (the paper's split is
  70/10/20 and patient-level: its val and test lists share no patient).
- `split="official"`: NIH's `test_list.txt` is test; `train_val_list.txt` is cut patient-level (seeded)
  into train and validation (`official_val_fraction`, default 1/8, so about 70/10/20 overall).

The REFERS split lists carry 14 label columns in the CheXNet order (`NIH_SPLIT_FILE_LABEL_ORDER`:
Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule, Pneumonia, Pneumothorax, Consolidation,
Edema, Emphysema, Fibrosis, Pleural_Thickening, Hernia), NOT the alphabetical order: on the 275 images of
the shared 1,000-image sample that are in the lists, 274 label vectors agree with Data_Entry_2017 in that
order (the one difference, 00000150_002.png, has Pneumonia added by the 2020 relabelling), while the
alphabetical order disagrees on 139 of them. The lists are used for membership only; labels come from
Data_Entry (disagreements with the lists are counted in a log warning).

Boxes: `BBox_List_2017.csv` (NIH's 984 radiologist boxes on 880 images, 8 findings, `x, y, w, h` in pixels of the
1024 x 1024 PNGs; the table says "Infiltrate" for the label "Infiltration") is read by `load_nih_bounding_boxes`,
which scales every box to the pixels of the image file at hand (x 64/1024 for the 64-px sample), and
`load_nih_chestxray14(..., with_boxes=True)` adds them as a `boxes` column (empty for images without boxes).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import PIL.Image
from datasets import DatasetDict, List, Value

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
    seeded_patient_split,
    warn_missing_positives,
)

logger = logging.getLogger(__name__)

NIH_LABEL_NAMES = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NIH_SPLIT_FILE_LABEL_ORDER = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
DEFAULT_SPLIT_DIR = "nih_chestxray14"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
BBOX_FILE = "BBox_List_2017.csv"
BBOX_FRAME_SIZE = 1024  # the box table's coordinates are pixels of the 1024 x 1024 PNG release
BBOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}  # box-table name -> NIH_LABEL_NAMES
BOX_FEATURE = List({"label": Value("string"), "x_min": Value("float32"), "y_min": Value("float32"),
                    "x_max": Value("float32"), "y_max": Value("float32")})


def index_images(data_dir: Path) -> dict[str, Path]:
    """`{file name: path}` for PNGs in `images/`, `images_*/images/` and `images_*/`."""
    index: dict[str, Path] = {}
    folders = [data_dir / "images"]
    folders += sorted(p for p in data_dir.glob("images_*") if p.is_dir())
    folders += sorted(p / "images" for p in data_dir.glob("images_*") if (p / "images").is_dir())
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(".png") and entry.name not in index:
                    index[entry.name] = Path(entry.path)
    return index


def parse_finding_labels(value: str, where: str) -> list[float]:
    """`"Effusion|Mass"` -> multi-hot vector in NIH_LABEL_NAMES order (InvalidDataError for an unknown name)."""
    names = [n.strip() for n in value.split("|") if n.strip()]
    if not names:
        raise InvalidDataError(f"{where}: empty 'Finding Labels'")
    vector = [0.0] * len(NIH_LABEL_NAMES)
    for name in names:
        if name == NO_FINDING:
            continue
        if name not in NIH_LABEL_NAMES:
            raise InvalidDataError(
                f"{where}: unknown label '{name}' in 'Finding Labels' (expected {NO_FINDING!r} or one of "
                f"{list(NIH_LABEL_NAMES)})"
            )
        vector[NIH_LABEL_NAMES.index(name)] = 1.0
    return vector


def _read_name_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: official split list not found")
    return [line.strip().rsplit("/", 1)[-1] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_nih_bounding_boxes(
    data_dir: str | os.PathLike, bbox_file: str | os.PathLike | None = None, only_present: bool = True,
) -> dict[str, list[dict]]:
    """`{image name: [{"label", "x_min", "y_min", "x_max", "y_max"}, ...]}` from NIH's `BBox_List_2017.csv`.

    Coordinates are pixels of the image file found in `data_dir` (the table's 1024-px coordinates times
    `width / 1024` and `height / 1024` of that file), `x_max = x + w`, `y_max = y + h`; labels are
    `NIH_LABEL_NAMES` names. With `only_present` (default) images not in `data_dir` are left out (and counted in
    the log); otherwise they are kept in the 1024-px frame. A malformed row raises InvalidDataError naming the file
    and the row.
    """
    data_dir = Path(data_dir).absolute()
    path = Path(bbox_file) if bbox_file is not None else data_dir / BBOX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NIH box table not found; expected {BBOX_FILE} (columns Image Index, Finding "
                                "Label, Bbox [x,y,w,h]) from the NIH ChestX-ray14 release")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0][:2]] != ["Image Index", "Finding Label"]:
        raise InvalidDataError(f"{path}: header must start with 'Image Index,Finding Label,Bbox [x,y,w,h]', "
                               f"found {rows[0][:3] if rows else 'an empty file'}")
    images = index_images(data_dir)
    boxes: dict[str, list[dict]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    absent = 0
    for row_no, row in enumerate(rows[1:], start=1):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}, row {row_no}"
        name, label = row[0].strip(), BBOX_LABEL_ALIASES.get(row[1].strip(), row[1].strip()) if len(row) > 1 else ""
        if label not in NIH_LABEL_NAMES:
            raise InvalidDataError(f"{where}: unknown finding {label!r} (expected one of {list(NIH_LABEL_NAMES)} or "
                                   f"{list(BBOX_LABEL_ALIASES)})")
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise InvalidDataError(f"{where}: expected four numbers x, y, w, h after the label, got {row[2:6]}") from None
        if w <= 0 or h <= 0:
            raise InvalidDataError(f"{where}: box width and height must be positive, got w={w}, h={h}")
        if name not in images:
            absent += 1
            if only_present:
                continue
            sx = sy = 1.0
        else:
            if name not in sizes:
                with PIL.Image.open(images[name]) as image:
                    sizes[name] = image.size
            sx, sy = sizes[name][0] / BBOX_FRAME_SIZE, sizes[name][1] / BBOX_FRAME_SIZE
        boxes.setdefault(name, []).append(
            {"label": label, "x_min": x * sx, "y_min": y * sy, "x_max": (x + w) * sx, "y_max": (y + h) * sy})
    if absent:
        logger.info("nih_chestxray14: %d of %d boxes are on images not in %s%s", absent, len(rows) - 1, data_dir,
                    " (left out)" if only_present else " (kept in the 1024-px frame)")
    return boxes


def load_nih_chestxray14(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    split: str = "refers",
    official_val_fraction: float = 0.125,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
    with_boxes: bool = False,
    bbox_file: str | os.PathLike | None = None,
) -> DatasetDict:
    """NIH ChestX-ray14 as a DatasetDict (train/validation/test) of `image_id`, `patient_id`, `image`,
    `labels` (float32 x 14, NIH_LABEL_NAMES order), and with `with_boxes` a `boxes` column (see
    `load_nih_bounding_boxes`; reads `bbox_file`, default `<data_dir>/BBox_List_2017.csv`). See the module
    docstring."""
    if split not in {"refers", "official"}:
        raise ValueError(f"split must be 'refers' or 'official', got {split!r}")
    data_dir = Path(data_dir).absolute()
    table_path = data_dir / "Data_Entry_2017.csv"
    table = read_table(table_path, REQUIRED_COLUMNS)
    invalid = InvalidEntries("nih_chestxray14", skip_invalid)
    image_index = index_images(data_dir)

    rows, entries, seen = [], [], {}
    for row_no, record in enumerate(table.to_dict("records"), start=1):
        where = f"{table_path}, row {row_no}"
        name = record["Image Index"].strip()
        if name in seen:
            invalid("duplicate image", f"{where}: image {name} is already listed in row {seen[name]}")
            continue
        seen[name] = row_no
        try:
            labels = parse_finding_labels(record["Finding Labels"], where)
        except InvalidDataError as err:
            invalid("unknown label", str(err))
            continue
        path = image_index.get(name, data_dir / "images" / name)
        rows.append({"image_id": name, "patient_id": record["Patient ID"].strip(), "image": str(path), "labels": labels})
        entries.append((path, f"{where} ({name})"))
    ok = check_images(entries, invalid, verify_images, desc="Checking NIH ChestX-ray14 images")
    rows = [r for r, good in zip(rows, ok) if good]
    invalid.log_summary()

    keys = [r["image_id"] for r in rows]
    patients = [r["patient_id"] for r in rows]
    if split == "refers":
        lists_dir = resolve_split_dir(data_dir, split_dir, DEFAULT_SPLIT_DIR)
        if not lists_dir.is_dir():
            raise FileNotFoundError(
                f"{lists_dir}: REFERS split lists (val.txt, test.txt) not found; pass split_dir= or split='official'"
            )
        listed = read_split_lists(lists_dir, len(NIH_SPLIT_FILE_LABEL_ORDER), splits=("validation", "test"))
        order = [NIH_LABEL_NAMES.index(n) for n in NIH_SPLIT_FILE_LABEL_ORDER]
        compare_with_listed_labels(keys, [[r["labels"][i] for i in order] for r in rows], listed, "nih_chestxray14")
        splits = assign_splits(keys, patients, listed, split_seed, "nih_chestxray14", unlisted="train")
    else:
        train_val = set(_read_name_list(data_dir / "train_val_list.txt"))
        test = set(_read_name_list(data_dir / "test_list.txt"))
        in_train_val = [p for k, p in zip(keys, patients) if k in train_val]
        val_fraction = float(official_val_fraction)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"official_val_fraction must be in [0, 1), got {official_val_fraction}")
        cut = seeded_patient_split(in_train_val, split_seed, (1.0 - val_fraction, val_fraction, 0.0))
        splits = []
        for key, patient in zip(keys, patients):
            splits.append("test" if key in test else cut[patient] if key in train_val else None)
        n_unlisted = sum(s is None for s in splits)
        if n_unlisted:
            logger.warning("nih_chestxray14: %d images are in neither official list; left out", n_unlisted)
    features = multi_label_features(NIH_LABEL_NAMES)
    if with_boxes:
        boxes = load_nih_bounding_boxes(data_dir, bbox_file)
        for row in rows:
            row["boxes"] = boxes.get(row["image_id"], [])
        features["boxes"] = BOX_FEATURE
    dataset = build_dataset_dict(rows, splits, features)
    logger.info("nih_chestxray14 (%s split): %s", split, {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, NIH_LABEL_NAMES, "nih_chestxray14")
    return dataset
