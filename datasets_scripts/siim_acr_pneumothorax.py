"""SIIM-ACR Pneumothorax Segmentation (DICOM + run-length-encoded masks) with MRM's split lists.

Interface (`load_target_dataset("siim_acr_pneumothorax", data_dir)` / `load_siim_acr_pneumothorax(data_dir)`): a
DatasetDict with splits `train`, `validation`, `test`, rows
- `image_id` (string): the SOP Instance UID (the Kaggle `ImageId`, the DICOM file's stem);
- `patient_id` (string): the DICOM's Patient ID (the image id when the tag is empty);
- `image` (`Image()`): 8-bit grayscale PNG converted from the DICOM;
- `mask` (`Image()`): mode "L" PNG of the same size as `image`, pixel value 1 = pneumothorax, 0 elsewhere (the union
  of every region of the image);
- `labels` (`ClassLabel`, `SIIM_LABEL_NAMES` = ("no pneumothorax", "pneumothorax")): 1 when the mask is not empty.

Layout (Kaggle "siim-acr-pneumothorax-segmentation", stage 1 as distributed): `<data_dir>/train-rle.csv` (columns
`ImageId, EncodedPixels`; the file's header has a space before `EncodedPixels`, column names are stripped) and the
DICOMs anywhere under `<data_dir>` (`dicom-images-train/<study>/<series>/<ImageId>.dcm`, `dicom-images-test/...`),
found by file name. `EncodedPixels` is "-1" for an image without pneumothorax; an image with several regions has one
row per region, and the regions are unioned. An image with both "-1" and a region is an error.

RLE (the competition's `mask_functions.py`): pairs `start length`, positions counted down each column, then column
by column (column-major, i.e. over the transposed image), starting at 0; every `start` after the first is relative
to the end of the previous run. E.g. "3 2 5 2" on a 3 x 4 (rows x columns) image sets (0, 1), (1, 1) (positions 3,
4) and (1, 3), (2, 3) (positions 10, 11). `rle_decode` / `rle_encode` implement it (stage 2's `stage_2_train.csv`
uses absolute starts instead and is not read here).

Splits: MRM's lists (`<split_dir>`, default `<data_dir>/../splits/mrm/SIIM-ACR_Pneumothorax`; one ImageId per line,
no labels): `train` = `train_1.txt` (label_ratio=0.01; published by MRM but not in ../shared/data: put it in
`split_dir` to use it), `train_10.txt` (0.1, 797 ids) or `train_list.txt` (1.0, 7,969); `validation` =
`val_list.txt` (1,898); `test` = `test_list.txt` (1,904). The lists are used as published, and they overlap: in
../shared/data 494 test ids are also in `train_list.txt` (49 in `train_10.txt`), 124 test ids in `val_list.txt`, 478
validation ids in `train_list.txt` (55 in `train_10.txt`); an image in two lists is a row of both splits, and the
overlap is logged as a warning. MRM trained on masks from its own `siim.csv` / PNG export (`images/training`,
`annotations/training`, ...), which is not published and is not reachable here; the masks here are decoded from
Kaggle's `train-rle.csv`, so they can differ from MRM's where MRM's export did.

Errors: a list id not in train-rle.csv, a missing DICOM, a malformed RLE (odd number of values, a negative value, a
run outside the image) or a missing CSV column is an InvalidDataError naming the file and line / row;
`skip_invalid=True` leaves such images out (counted in a log warning): the partial mode for a copy that holds only
some of the images.

Images and masks are written once per build to `converted_dir` (default: under the `datasets` cache): the image by
the package's one DICOM reader (`modeling_refers.radiograph_io.load_dicom`, through VinBigData's
`convert_dicom`; longer side at most `dicom_max_size`, the mask then resized with nearest neighbour),
`masks/<ImageId>.png` from the RLE.

Licence: the competition's data terms (Kaggle competition rules; images from NIH ChestX-ray14); cite
`SIIM_CITATION`. MRM's lists: MIT.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
from datasets import ClassLabel, DatasetDict, Features, Image, Value

from modeling_refers.file_utils import atomic_open

from .common import InvalidDataError, InvalidEntries, build_dataset_dict, resolve_split_dir, warn_missing_positives
from .mrm_lists import (
    MRM_SPLITS_CITATION,
    check_label_ratio,
    convert_dicoms,
    default_converted_dir,
    mrm_list_files,
    read_mrm_list,
)

logger = logging.getLogger(__name__)

SIIM_LABEL_NAMES = ("no pneumothorax", "pneumothorax")
RLE_FILE = "train-rle.csv"
REQUIRED_COLUMNS = ("ImageId", "EncodedPixels")
NO_PNEUMOTHORAX = "-1"
DEFAULT_SPLIT_DIR = "mrm/SIIM-ACR_Pneumothorax"
SIIM_LICENSE = "other"
SIIM_CITATION = (
    "Zawacki A, Wu C, Shih G, Elliott J, Fomitchev M, Hussain M, Lakhani P, Culliton P, Bao S. SIIM-ACR Pneumothorax "
    "Segmentation. Kaggle, 2019. " + MRM_SPLITS_CITATION
)


def siim_features() -> Features:
    return Features({"image_id": Value("string"), "patient_id": Value("string"), "image": Image(), "mask": Image(),
                     "labels": ClassLabel(names=list(SIIM_LABEL_NAMES))})


def rle_decode(rle: str, width: int, height: int) -> np.ndarray:
    """`(height, width)` uint8 mask (1 inside the runs) of one Kaggle RLE string (see the module docstring); "-1" or
    "" is the empty mask. ValueError for a malformed string."""
    mask = np.zeros(width * height, dtype=np.uint8)
    text = rle.strip()
    if text in ("", NO_PNEUMOTHORAX):
        return mask.reshape(width, height).T.copy()
    try:
        values = np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"RLE must be whitespace-separated integers, got {text[:40]!r}") from None
    if len(values) % 2:
        raise ValueError(f"RLE needs pairs 'start length', got {len(values)} values")
    if (values < 0).any() or (values[1::2] == 0).any():
        raise ValueError("RLE starts must be >= 0 and lengths > 0")
    ends = np.cumsum(values)  # end of each run (exclusive), positions relative to the previous run's end
    starts = ends[1::2] - values[1::2]
    if len(ends) and ends[-1] > mask.size:
        raise ValueError(f"RLE run ends at position {int(ends[-1])}, beyond the {width} x {height} image "
                         f"({mask.size} pixels)")
    for start, end in zip(starts, ends[1::2]):
        mask[start:end] = 1
    return mask.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray) -> str:
    """The Kaggle RLE string of a `(height, width)` mask (nonzero = inside); "-1" for an empty mask."""
    flat = (np.asarray(mask).T.reshape(-1) != 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    if not len(edges):
        return NO_PNEUMOTHORAX
    starts, ends = edges[0::2], edges[1::2]
    relative = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s} {e - a}" for s, a, e in zip(relative, starts, ends))


def read_rle_table(path: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """`({ImageId: [EncodedPixels, ...]}, {ImageId: first row})` of train-rle.csv (column names stripped)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected Kaggle's {RLE_FILE}: ImageId, EncodedPixels)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as err:
        raise InvalidDataError(f"{path}: cannot be read as CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InvalidDataError(f"{path}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)}, found "
                               f"{list(table.columns)}")
    regions: dict[str, list[str]] = defaultdict(list)
    first_row: dict[str, int] = {}
    for row_no, (image_id, rle) in enumerate(zip(table["ImageId"], table["EncodedPixels"]), start=1):
        image_id = image_id.strip()
        regions[image_id].append(rle.strip())
        first_row.setdefault(image_id, row_no)
    return dict(regions), first_row


def _index_dicoms(data_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for folder, _, names in os.walk(data_dir):
        for name in names:
            if name.lower().endswith(".dcm"):
                stem = name[:-4]
                if stem in index:
                    raise InvalidDataError(f"{Path(folder) / name}: ImageId {stem} is also at {index[stem]}")
                index[stem] = Path(folder) / name
    return index


def _dicom_header(path: Path) -> tuple[int, int, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Columns), int(ds.Rows), str(ds.get("PatientID", "") or "").strip()


def load_siim_acr_pneumothorax(
    data_dir: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    label_ratio: float = 1.0,
    converted_dir: str | os.PathLike | None = None,
    dicom_max_size: int | None = None,
    skip_invalid: bool = False,
) -> DatasetDict:
    """SIIM-ACR pneumothorax as a DatasetDict (train/validation/test) of `image_id`, `patient_id`, `image`, `mask`,
    `labels`; `label_ratio` (0.01, 0.1 or 1.0) picks MRM's training list. See the module docstring."""
    label_ratio = check_label_ratio(label_ratio)
    data_dir = Path(data_dir).absolute()
    table_path = data_dir / RLE_FILE
    regions, first_row = read_rle_table(table_path)
    files = mrm_list_files(resolve_split_dir(data_dir, split_dir, DEFAULT_SPLIT_DIR), label_ratio,
                           "SIIM-ACR_Pneumothorax")
    lists = {split: read_mrm_list(path, 0) for split, path in files.items()}
    invalid = InvalidEntries("siim_acr_pneumothorax", skip_invalid)
    dicoms = _index_dicoms(data_dir)
    out_dir = Path(converted_dir) if converted_dir is not None else default_converted_dir(
        "siim_acr_pneumothorax", data_dir, dicom_max_size)

    wanted: dict[str, str] = {}  # ImageId -> where (first list line naming it)
    for split in ("train", "validation", "test"):
        for e in lists[split]:
            if e.entry in wanted:
                continue
            if e.entry not in regions:
                invalid("unknown list entry", f"{e.where}: ImageId {e.entry!r} is not in {table_path}")
                continue
            if e.entry not in dicoms:
                invalid("missing image", f"{e.where}: image {e.entry}.dcm not found under {data_dir}")
                continue
            wanted[e.entry] = e.where
    ids = list(wanted)
    errors = convert_dicoms([dicoms[i] for i in ids], [out_dir / f"{i}.png" for i in ids], dicom_max_size)
    built: dict[str, dict] = {}
    for image_id, err in zip(ids, errors):
        where = f"{table_path}, row {first_row[image_id]} (ImageId {image_id}, listed at {wanted[image_id]})"
        if err is not None:
            invalid("corrupt image", f"{where}: image file {dicoms[image_id]} is corrupt ({err})")
            continue
        width, height, patient = _dicom_header(dicoms[image_id])
        rles = regions[image_id]
        if NO_PNEUMOTHORAX in rles and len(rles) > 1:
            invalid("bad mask", f"{where}: both '-1' (no pneumothorax) and {len(rles) - 1} region(s)")
            continue
        mask = np.zeros((height, width), dtype=np.uint8)
        try:
            for rle in rles:
                mask |= rle_decode(rle, width, height)
        except ValueError as error:
            invalid("bad mask", f"{where}: EncodedPixels: {error}")
            continue
        image_path = out_dir / f"{image_id}.png"
        mask_image = PIL.Image.fromarray(mask)
        with PIL.Image.open(image_path) as png:
            if png.size != mask_image.size:
                mask_image = mask_image.resize(png.size, PIL.Image.Resampling.NEAREST)
        mask_path = out_dir / "masks" / f"{image_id}.png"
        with atomic_open(mask_path, "wb") as handle:
            mask_image.save(handle, format="PNG")
        built[image_id] = {"image_id": image_id, "patient_id": patient or image_id, "image": str(image_path),
                           "mask": str(mask_path), "labels": int(mask.any())}
    invalid.log_summary()

    members = {split: [e.entry for e in lists[split] if e.entry in built] for split in lists}
    overlaps = {f"{a}&{b}": len(set(members[a]) & set(members[b]))
                for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))}
    if any(overlaps.values()):
        logger.warning("siim_acr_pneumothorax: MRM's lists overlap (images in two splits, kept in both): %s", overlaps)
    rows = [built[i] for split in ("train", "validation", "test") for i in members[split]]
    splits = [split for split in ("train", "validation", "test") for _ in members[split]]
    dataset = build_dataset_dict(rows, splits, siim_features())
    logger.info("siim_acr_pneumothorax (label_ratio %s): %s", label_ratio, {k: len(v) for k, v in dataset.items()})
    warn_missing_positives(dataset, SIIM_LABEL_NAMES, "siim_acr_pneumothorax")
    return dataset


__all__ = ["SIIM_LABEL_NAMES", "SIIM_LICENSE", "SIIM_CITATION", "rle_decode", "rle_encode", "read_rle_table",
           "siim_features", "load_siim_acr_pneumothorax"]
