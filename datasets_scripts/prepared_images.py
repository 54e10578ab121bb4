"""Prepared data sets: every radiograph decoded once, resized to a short side (256 by default) and saved with
`datasets` (`map` with `num_proc`, `save_to_disk` Arrow shards), so training reads small images instead of decoding
full-resolution originals (MIMIC-CXR-JPG: ~2,500 x 3,000 JPEGs; NIH ChestX-ray14: 1024 x 1024 PNGs) every epoch.

    prepared = prepare_images(load_covid19_studies(data_dir), "prepared/covid19-256", short_side=256, num_proc=8)
    prepared = load_prepared_dataset("prepared/covid19-256")      # the same DatasetDict, later

What a prepared data set is: the source `DatasetDict` with the same splits, rows, row order, columns and features
(labels, reports, ids, view positions unchanged); only the image columns (`image`: `Image()`, or `images`:
`List(Image())` for studies) hold new pixels, as bytes inside the Arrow files, with the source file's name as
`path`. Each image goes through the image processor's own loading (`RefersImageProcessor.process_image`: 16-bit /
DICOM windowing, alpha dropped, grey kept as one channel, JPEGs decoded with PIL's `draft()` at the smallest scale
that is still >= the short side) and, when its short side is larger than `short_side`, the processor's own resize
(`size={"shortest_edge": short_side}`, bilinear, long side `int(short_side * long / short)` of the original's sides,
drafted or not). Images already at or below `short_side` keep their size (never upscaled). A `boxes` column (NIH,
VinBigData: pixels of the original image) is refused rather than left wrong.

Encoding: PNG (lossless) by default. The prepared pixels are then exactly what the processor's first step computes
from the original (with `size={"shortest_edge": short_side}` the processor's output from a prepared image is
bit-identical to its output from the original file; with the paper's 256 x 256 square resize it differs only by a
second bilinear resample of the long side), and nothing new is lost on top of the source's own compression. A grey
256-px PNG is ~30 KB and decodes in ~1.5 ms, small beside the training transform. `image_format="JPEG"` (quality
`jpeg_quality`, 95 by default) halves the size and decodes ~3x faster, at the cost of a second lossy step.

Resuming: the work goes to `<output_dir>.incomplete/` beside `output_dir`. Each split is mapped in chunks of
`rows_per_chunk` rows, each chunk (and, with `num_proc`, each of its per-process shards) written by `datasets` to an
Arrow cache file there, atomically; the settings are written there first (`refers_prepared.json`). A run interrupted
and started again with the same source and settings reuses every finished cache file (datasets' own
`load_from_cache_file`), so only unfinished chunks are decoded again; with other settings (or another source) the
folder is deleted and the work starts over. At the end the chunks are saved with `save_to_disk` into
`<output_dir>.incomplete/final`, the metadata file is added, and that folder is renamed to `output_dir` (one
atomic rename on the same file system): `output_dir` either does not exist or is complete. A second call with the
same source and settings finds `output_dir` with matching metadata and returns it without decoding anything; a
prepared folder made with other settings is refused (naming the fields that differ) unless `overwrite=True`.
Two preparations of the same `output_dir` at once are serialised by a lock file `<output_dir>.lock` (left in place).

"Same source" means the same `datasets` fingerprint per split (a hash of the rows: for the builders' in-memory data
sets, the file paths and labels), not the bytes of the image files: rewriting an image file in place is not noticed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL
import PIL.Image
from datasets import Dataset, DatasetDict, Features, Image, List, concatenate_datasets, load_from_disk
from filelock import FileLock

from modeling_refers.file_utils import atomic_write_json

logger = logging.getLogger(__name__)

PREPARED_METADATA_FILE = "refers_prepared.json"
PREPARED_FORMAT = "refers-prepared-images/1"
IMAGE_FORMATS = ("PNG", "JPEG")
INCOMPLETE_SUFFIX = ".incomplete"
# Metadata fields that must agree for an existing prepared folder (or an interrupted one) to be reused.
_SETTINGS_FIELDS = ("format", "short_side", "image_format", "jpeg_quality", "jpeg_draft", "image_columns", "splits")


class NotAPreparedDatasetError(ValueError):
    """A folder that should hold a prepared data set does not (the message names the folder and what is missing)."""


# ----------------------------------------------------------------------------------------------------- columns
def _is_image_feature(feature: Any) -> bool:
    return isinstance(feature, Image)


def _is_image_list_feature(feature: Any) -> bool:
    inner = getattr(feature, "feature", None)
    return isinstance(feature, (List, datasets.Sequence, datasets.LargeList)) and isinstance(inner, Image)


def image_columns_of(features: Features) -> list[str]:
    """The columns holding images: `Image()` (target domain, `image`) or a list of `Image()` (studies, `images`)."""
    return [name for name, feature in features.items() if _is_image_feature(feature) or _is_image_list_feature(feature)]


def _undecoded(feature: Any) -> Any:
    """The same image feature with `decode=False` (rows give `{"bytes", "path"}`, so JPEGs can be drafted)."""
    if _is_image_feature(feature):
        return Image(mode=feature.mode, decode=False)
    return List(Image(mode=feature.feature.mode, decode=False), length=getattr(feature, "length", -1))


# ------------------------------------------------------------------------------------------------ one image
class _ImagePreparer:
    """Picklable map function: image columns of a batch of rows -> prepared `{"bytes", "path"}` values."""

    def __init__(self, image_columns: Sequence[str], list_columns: Sequence[str], short_side: int,
                 image_format: str, jpeg_quality: int, jpeg_draft: bool):
        self.image_columns = list(image_columns)
        self.list_columns = set(list_columns)
        self.short_side = int(short_side)
        self.image_format = image_format
        self.jpeg_quality = int(jpeg_quality)
        self.jpeg_draft = bool(jpeg_draft)
        self._processor = None

    def __getstate__(self) -> dict:  # the processor is rebuilt in each process (and kept out of map's fingerprint)
        return {**self.__dict__, "_processor": None}

    def _get_processor(self):
        if self._processor is None:
            from modeling_refers.image_processing_refers import RefersImageProcessor

            self._processor = RefersImageProcessor(size={"shortest_edge": self.short_side})
        return self._processor

    def prepare_one(self, value: Mapping | None) -> dict | None:
        if value is None:
            return None
        path, data = value.get("path"), value.get("bytes")
        where = path or "an image given as bytes"
        if data is None and path is None:
            raise ValueError(f"an image value has neither 'bytes' nor 'path': {value!r}")
        processor = self._get_processor()
        try:  # opening the bytes too: bytes that are not an image are named like a file that is not one
            source = PIL.Image.open(io.BytesIO(data)) if data is not None else path
            array = processor.process_image(source, do_convert_rgb=True, do_jpeg_draft=self.jpeg_draft,
                                            do_resize=True, size=processor.size)
        except (OSError, ValueError, TypeError) as err:
            raise type(err)(f"preparing image {where}: {err}") from err
        array = resize_short_side(array, self.short_side, processor)
        image = PIL.Image.fromarray(array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1))
        buffer = io.BytesIO()
        if self.image_format == "PNG":
            image.save(buffer, format="PNG")
        else:
            image.save(buffer, format="JPEG", quality=self.jpeg_quality)
        return {"bytes": buffer.getvalue(), "path": os.path.basename(path) if path else None}

    def __call__(self, *columns) -> dict:
        out = {}
        for name, values in zip(self.image_columns, columns):
            if name in self.list_columns:
                out[name] = [None if views is None else [self.prepare_one(v) for v in views] for views in values]
            else:
                out[name] = [self.prepare_one(v) for v in values]
        return out


def resize_short_side(array: np.ndarray, short_side: int, processor=None) -> np.ndarray:
    """A uint8 `(C, H, W)` image with its short side brought down to `short_side` by the processor's own
    `size={"shortest_edge": short_side}` resize (bilinear); an image whose short side is already <= `short_side` is
    returned as it is (never upscaled)."""
    if min(array.shape[1:]) <= short_side:
        return array
    if processor is None:
        from modeling_refers.image_processing_refers import RefersImageProcessor

        processor = RefersImageProcessor(size={"shortest_edge": short_side})
    from transformers.image_utils import SizeDict

    return processor.resize(array, SizeDict(shortest_edge=int(short_side)), resample=processor.resample)


# ----------------------------------------------------------------------------------------------- metadata
def read_prepared_metadata(folder: str | os.PathLike) -> dict:
    """The metadata of a prepared folder (`refers_prepared.json`); `NotAPreparedDatasetError` naming the folder
    when it is missing or unreadable, `FileNotFoundError` when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = _incomplete_hint(folder)
        raise FileNotFoundError(f"{folder}: no prepared data set here (no such folder){hint}; make one with "
                                "examples/prepare_images.py or datasets_scripts.prepare_images")
    meta_path = folder / PREPARED_METADATA_FILE
    if not meta_path.is_file():
        raise NotAPreparedDatasetError(
            f"{folder}: not a prepared data set (no {PREPARED_METADATA_FILE}){_incomplete_hint(folder)}; make one "
            "with examples/prepare_images.py or datasets_scripts.prepare_images")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NotAPreparedDatasetError(f"{meta_path}: unreadable prepared-data metadata ({err})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != PREPARED_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise NotAPreparedDatasetError(f"{meta_path}: format {found!r}, expected {PREPARED_FORMAT!r}")
    return metadata


def _incomplete_hint(folder: Path) -> str:
    work = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
    if work.is_dir():
        return (f" (an interrupted preparation is in {work}: run prepare_images / examples/prepare_images.py again "
                "with the same settings to finish it)")
    return ""


def _settings_differences(found: Mapping, wanted: Mapping) -> list[str]:
    return [f"{name}: {found.get(name)!r} there, {wanted.get(name)!r} asked"
            for name in _SETTINGS_FIELDS if found.get(name) != wanted.get(name)]


def warn_if_upscaled(folder: str | os.PathLike | None, size: Mapping[str, int]) -> bool:
    """Warn (and return True) when `folder` was prepared at a short side below the processor's resize `size`
    (`{"height", "width"}` or `{"shortest_edge"}`): its images would be upscaled."""
    if not folder:
        return False
    side, short = min(size.values()), read_prepared_metadata(folder)["short_side"]
    if short >= side:
        return False
    logger.warning(f"prepared data {folder}: short side {short} px, below the {side} px resize; the images are "
                   f"upscaled (prepare with --short_side {side})")
    return True


def load_prepared_dataset(
    folder: str | os.PathLike, min_short_side: int | None = None, dataset_name: str | None = None
) -> DatasetDict:
    """The `DatasetDict` saved by `prepare_images` in `folder` (memory-mapped Arrow files, `load_from_disk`).

    Errors name the folder: `FileNotFoundError` when it does not exist, `NotAPreparedDatasetError` when it holds no
    prepared data set (no metadata, another format, or splits / row counts that disagree with the metadata).
    `min_short_side`: refuse (ValueError) a folder prepared at a smaller short side (the processor would upscale
    it: e.g. the 256 that `processor_sizes(224)` resizes to). `dataset_name`: refuse a folder whose metadata names
    another source data set (`prepare_images(..., source={"dataset_name": ...})`, as examples/prepare_images.py
    writes it).
    """
    folder = Path(folder)
    metadata = read_prepared_metadata(folder)
    if min_short_side is not None and metadata["short_side"] < min_short_side:
        raise ValueError(f"{folder}: prepared at a short side of {metadata['short_side']} px, but the images are "
                         f"resized to {min_short_side} px; prepare them again with short_side >= {min_short_side}")
    prepared_from = (metadata.get("source") or {}).get("dataset_name")
    if dataset_name is not None and prepared_from is not None and prepared_from != dataset_name:
        raise ValueError(f"{folder}: prepared from the data set {prepared_from!r}, not {dataset_name!r}")
    try:
        loaded = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise NotAPreparedDatasetError(f"{folder}: has {PREPARED_METADATA_FILE} but `datasets` cannot load it "
                                       f"({err}); prepare it again (prepare_images(..., overwrite=True))") from err
    if not isinstance(loaded, DatasetDict):
        raise NotAPreparedDatasetError(f"{folder}: holds a single Dataset, expected the DatasetDict prepare_images "
                                       "saves")
    expected = {name: split["num_rows"] for name, split in metadata["splits"].items()}
    found = {name: len(split) for name, split in loaded.items()}
    if expected != found:
        raise NotAPreparedDatasetError(f"{folder}: splits and row counts {found} differ from its metadata {expected}")
    return loaded


# ---------------------------------------------------------------------------------------------- preparation
def prepare_images(
    dataset_or_dict: Dataset | DatasetDict,
    output_dir: str | os.PathLike,
    short_side: int = 256,
    num_proc: int | None = None,
    image_columns: Sequence[str] | None = None,
    image_format: str = "PNG",
    jpeg_quality: int = 95,
    jpeg_draft: bool = True,
    num_shards: int | Mapping[str, int] | None = None,
    rows_per_chunk: int = 10_000,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> DatasetDict:
    """Decode every image of `dataset_or_dict` once, bring its short side down to `short_side`, re-encode it
    (PNG lossless, or JPEG `jpeg_quality`) and save the result to `output_dir` with `save_to_disk`; returns it as
    `load_prepared_dataset(output_dir)` does. See the module docstring (what is kept, resuming, atomicity).

    Args:
        dataset_or_dict: a builder's `DatasetDict` (or one `Dataset`, saved as the split `dataset.split` or "train").
        output_dir: the folder to create (it must not exist, or hold this very preparation, or be empty).
        short_side: target short side in pixels (the paper resizes to 256 before cropping 224).
        num_proc: processes for `Dataset.map` (None: this process only).
        image_columns: the columns to prepare; default every `Image()` / `List(Image())` column.
        image_format: "PNG" (default) or "JPEG".
        jpeg_quality: JPEG quality when `image_format="JPEG"`.
        jpeg_draft: decode JPEG sources with PIL's `draft()` (at the smallest scale still >= `short_side`).
        num_shards: Arrow files per split for `save_to_disk` (int or `{split: n}`; default: datasets' 500 MB shards).
        rows_per_chunk: rows mapped (and cached) at a time; an interrupted run redoes at most the chunks in progress.
        source: free-form description stored in the metadata (e.g. `{"dataset_name": ..., "data_dir": ...}`).
        overwrite: replace a prepared folder made from another source or with other settings.
    """
    dataset_or_dict = _as_dataset_dict(dataset_or_dict)
    image_format = _check_encoding_arguments(short_side, image_format, jpeg_quality, num_proc, rows_per_chunk)
    features = next(iter(dataset_or_dict.values())).features
    image_columns = _columns_to_prepare(dataset_or_dict, features, image_columns)
    output_dir = Path(output_dir).absolute()
    metadata = {
        "format": PREPARED_FORMAT,
        "short_side": int(short_side),
        "image_format": image_format,
        "jpeg_quality": int(jpeg_quality) if image_format == "JPEG" else None,
        "jpeg_draft": bool(jpeg_draft),
        "resample": "bilinear (RefersImageProcessor.resize, size={'shortest_edge': short_side}); never upscaled",
        "image_columns": image_columns,
        "splits": {name: {"num_rows": len(split), "source_fingerprint": split._fingerprint}
                   for name, split in dataset_or_dict.items()},
        "source": dict(source or {}),
        "features": features.to_dict(),
        "versions": {"datasets": datasets.__version__, "pillow": PIL.__version__},
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output_dir.with_name(output_dir.name + ".lock"))):
        if output_dir.exists():
            reused = _existing_output(output_dir, metadata, overwrite)
            if reused is not None:
                return reused
        work = output_dir.with_name(output_dir.name + INCOMPLETE_SUFFIX)
        _open_work_folder(work, metadata)

        preparer = _ImagePreparer(image_columns, [c for c in image_columns if _is_image_list_feature(features[c])],
                                  short_side, image_format, jpeg_quality, jpeg_draft)
        undecoded = Features({name: _undecoded(f) if name in image_columns else f for name, f in features.items()})
        prepared = {}
        for name, split in dataset_or_dict.items():
            prepared[name] = _prepare_split(split.cast(undecoded), name, work, preparer, features, num_proc,
                                            rows_per_chunk)
        _save_and_publish(prepared, work, output_dir, metadata, num_shards)
        logger.info("prepared %s at short side %d (%s) in %s", {n: len(s) for n, s in prepared.items()}, short_side,
                    image_format, output_dir)
    return load_prepared_dataset(output_dir)


def _as_dataset_dict(dataset_or_dict) -> DatasetDict:
    """A `DatasetDict` with at least one split (one `Dataset` becomes the split `dataset.split`, or "train")."""
    if isinstance(dataset_or_dict, Dataset):
        split_name = str(dataset_or_dict.split) if dataset_or_dict.split is not None else "train"
        dataset_or_dict = DatasetDict({split_name: dataset_or_dict})
    if not isinstance(dataset_or_dict, DatasetDict):
        raise TypeError("prepare_images expects a datasets.Dataset or DatasetDict, got "
                        f"{type(dataset_or_dict).__name__}")
    if not dataset_or_dict:
        raise ValueError("prepare_images got an empty DatasetDict (no splits)")
    return dataset_or_dict


def _check_encoding_arguments(short_side, image_format, jpeg_quality, num_proc, rows_per_chunk) -> str:
    """ValueError naming a bad argument of `prepare_images`; returns the upper-case image format."""
    if isinstance(short_side, bool) or not isinstance(short_side, (int, np.integer)) or short_side < 1:
        raise ValueError(f"short_side must be a positive integer, got {short_side!r}")
    image_format = str(image_format).upper()
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1 or None, got {num_proc}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    return image_format


def _columns_to_prepare(dataset_dict: DatasetDict, features: Features, image_columns) -> list[str]:
    """The image columns to prepare (default: every `Image()` / `List(Image())` column); errors for splits with other
    features, columns that are not images, no image column, or a pixel-coordinate `boxes` column."""
    for name, split in dataset_dict.items():
        if split.features != features:
            raise ValueError(f"split {name!r} has other features than the first split: {split.features} vs {features}")
    found_columns = image_columns_of(features)
    if image_columns is None:
        image_columns = found_columns
    image_columns = list(image_columns)
    not_images = [c for c in image_columns if c not in found_columns]
    if not_images:
        raise ValueError(f"image_columns {not_images} are not Image() / List(Image()) columns; the data set's image "
                         f"columns are {found_columns} (all columns: {list(features)})")
    if not image_columns:
        raise ValueError(f"the data set has no Image() / List(Image()) column to prepare (columns: {list(features)})")
    if "boxes" in features:
        raise ValueError("the data set has a 'boxes' column: box coordinates in pixels of the original images, which "
                         "prepare_images does not rescale; drop it first (dataset.remove_columns('boxes')) and read "
                         "the boxes with the originals")
    return image_columns


def _save_and_publish(prepared: dict, work: Path, output_dir: Path, metadata: dict, num_shards) -> None:
    """`save_to_disk` the prepared splits into `work`/final with their metadata, then move them to `output_dir` in one
    rename (a folder being replaced is swapped out first) and remove `work`."""
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)  # a save_to_disk that was interrupted: redone from the chunk caches
    # One process: the images are encoded already, this only copies Arrow records (and datasets' num_proc here
    # starts a multiprocess Manager, seconds per split). An empty split gets one (empty) shard: left to
    # datasets it would get none, and load_from_disk could not read it back.
    shards = {name: (num_shards.get(name) if isinstance(num_shards, Mapping) else num_shards) for name in prepared}
    shards = {name: 1 if len(prepared[name]) == 0 else n for name, n in shards.items()}
    DatasetDict(prepared).save_to_disk(str(final), num_shards=shards)
    atomic_write_json(final / PREPARED_METADATA_FILE, metadata)
    if output_dir.exists():  # overwrite=True, or an empty folder: swap it out, then drop it
        old = work / "replaced"
        os.replace(output_dir, old)
    os.replace(final, output_dir)
    shutil.rmtree(work)


def _existing_output(output_dir: Path, metadata: dict, overwrite: bool) -> DatasetDict | None:
    """The prepared data set already in `output_dir` when it matches `metadata`; None when the folder may be
    (re)written; an error naming the folder otherwise."""
    if not output_dir.is_dir():
        raise FileExistsError(f"{output_dir}: exists and is not a folder; choose another output_dir")
    if (output_dir / PREPARED_METADATA_FILE).is_file():
        found = read_prepared_metadata(output_dir)
        differences = _settings_differences(found, metadata)
        if not differences:
            logger.info("%s: already prepared with these settings from this source; nothing to do", output_dir)
            return load_prepared_dataset(output_dir)
        if not overwrite:
            raise FileExistsError(f"{output_dir}: holds a prepared data set made from another source or with other "
                                  f"settings ({'; '.join(differences)}); pass overwrite=True (--overwrite) to replace "
                                  "it, or choose another output_dir")
        return None
    if any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir}: exists, is not empty and is not a prepared data set (no "
                              f"{PREPARED_METADATA_FILE}); choose another output_dir")
    return None


def _open_work_folder(work: Path, metadata: dict) -> None:
    """Keep an interrupted run's folder when it was made with the same source and settings; else start over."""
    meta_path = work / PREPARED_METADATA_FILE
    if work.exists():
        try:
            found = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            found = None
        differences = _settings_differences(found, metadata) if isinstance(found, dict) else ["no readable metadata"]
        if differences:
            logger.warning("%s: an interrupted preparation with other settings or another source (%s); starting over",
                           work, "; ".join(differences))
            shutil.rmtree(work)
        else:
            done = sorted(p.name for p in work.glob("*/chunk-*.arrow"))
            logger.info("%s: resuming an interrupted preparation (%d finished cache files reused)", work, len(done))
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, metadata)


def _prepare_split(split: Dataset, name: str, work: Path, preparer: _ImagePreparer, features: Features,
                   num_proc: int | None, rows_per_chunk: int) -> Dataset:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if len(split) == 0:
        return split.cast(features)
    num_chunks = -(-len(split) // rows_per_chunk)
    chunks = []
    for index in range(num_chunks):
        chunk = split.select(range(index * rows_per_chunk, min((index + 1) * rows_per_chunk, len(split))))
        chunks.append(chunk.map(
            preparer,
            input_columns=preparer.image_columns,
            batched=True,
            batch_size=16,
            writer_batch_size=256,
            features=features,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            cache_file_name=str(folder / f"chunk-{index:05d}.arrow"),
            load_from_cache_file=True,
            desc=f"Preparing {name} images" + (f" (chunk {index + 1}/{num_chunks})" if num_chunks > 1 else ""),
        ))
    return concatenate_datasets(chunks) if len(chunks) > 1 else chunks[0]


__all__ = [
    "IMAGE_FORMATS",
    "NotAPreparedDatasetError",
    "PREPARED_METADATA_FILE",
    "image_columns_of",
    "load_prepared_dataset",
    "prepare_images",
    "read_prepared_metadata",
    "resize_short_side",
]
