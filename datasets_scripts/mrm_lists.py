"""MRM's split lists (Zhou et al., ICLR 2023; RL4M/MRM-pytorch `DatasetsSplits/`, MIT) and the DICOM -> PNG step shared
by the CheXpert, RSNA Pneumonia and SIIM-ACR builders.

A list is a text file, one entry per line: an image path or id, then `num_labels` 0/1 labels (none for SIIM). The
label-ratio settings of the paper are separate training lists: `train_1.txt` (1%), `train_10.txt` (10%),
`train_list.txt` (100%); `val_list.txt` is validation and `test_list.txt` test. `label_ratio` (0.01, 0.1 or 1.0)
picks the training list: the loaders take it, as they take `split_dir`. run_finetune loads the full (1.0) training
split and samples its own `--label_ratio`; to train there on MRM's exact 1% / 10% images, write the list's ids with
`write_mrm_label_ids(name, split_dir, 0.01, "ids.json")` and pass `--label_ids_path ids.json`.

List entries whose image is absent: an InvalidDataError naming the list file, its line and the path looked for; with
`skip_invalid=True` (the builders' usual switch) they are left out and counted in a log warning. That is the partial
mode used when only some of a list's images are at hand (the tests' fixtures).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .common import InvalidDataError
from .vinbigdata import DICOM_READER_TAG, _convert_or_error

logger = logging.getLogger(__name__)

MRM_TRAIN_LISTS = {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train_list.txt"}
MRM_EVAL_LISTS = {"validation": "val_list.txt", "test": "test_list.txt"}
MRM_SPLITS_CITATION = (
    "Split lists: Zhou H-Y, Lian C, Wang L, Yu Y. Advancing Radiograph Representation Learning with Masked Record "
    "Modeling. ICLR 2023 (RL4M/MRM-pytorch, DatasetsSplits/, MIT)."
)


@dataclass(frozen=True)
class ListedEntry:
    """One line of an MRM list: the entry (path or id as written), its labels, and where it was read."""

    entry: str
    labels: tuple[float, ...]
    list_path: Path
    line_no: int

    @property
    def where(self) -> str:
        return f"{self.list_path}, line {self.line_no}"


def check_label_ratio(label_ratio) -> float:
    """0.01, 0.1 or 1.0 (MRM's 1% / 10% / 100% training lists); ValueError otherwise."""
    if (isinstance(label_ratio, bool) or not isinstance(label_ratio, (int, float))
            or float(label_ratio) not in MRM_TRAIN_LISTS):
        raise ValueError(f"label_ratio must be one of {sorted(MRM_TRAIN_LISTS)} (MRM's lists "
                         f"{', '.join(MRM_TRAIN_LISTS.values())}), got {label_ratio!r}")
    return float(label_ratio)


def read_mrm_list(path: Path, num_labels: int) -> list[ListedEntry]:
    """The entries of one MRM list, in file order. A line with another number of fields than `1 + num_labels`, a
    label other than 0/1, or an entry listed twice is an InvalidDataError naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MRM split list not found")
    entries: list[ListedEntry] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}, line {line_no}"
            if len(parts) != 1 + num_labels:
                raise InvalidDataError(f"{where}: expected an image entry and {num_labels} label(s) (0/1), found "
                                       f"{len(parts)} field(s): {line.strip()!r}")
            if any(v not in ("0", "1") for v in parts[1:]):
                raise InvalidDataError(f"{where}: labels must be 0 or 1, found {parts[1:]}")
            entry = parts[0].replace("\\", "/")
            if entry in first_line:
                raise InvalidDataError(f"{where}: {entry!r} is already listed on line {first_line[entry]}")
            first_line[entry] = line_no
            entries.append(ListedEntry(entry, tuple(float(v) for v in parts[1:]), path, line_no))
    return entries


def mrm_list_files(split_dir: Path, label_ratio: float, folder: str, full_list_optional: bool = False) -> dict:
    """`{"train": path or None, "validation": path, "test": path}` in `split_dir` for `label_ratio`. A missing file is
    a FileNotFoundError naming it and where MRM publishes it; with `full_list_optional` a missing `train_list.txt`
    gives None (CheXpert: the loader then takes every train.csv image outside val_list)."""
    label_ratio = check_label_ratio(label_ratio)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: MRM split lists not found (expected the folder "
                                f"DatasetsSplits/{folder}/ of RL4M/MRM-pytorch, e.g. "
                                f"../shared/data/splits/mrm/{folder}); pass split_dir=")
    files: dict[str, Path | None] = {"train": split_dir / MRM_TRAIN_LISTS[label_ratio]}
    files.update({split: split_dir / name for split, name in MRM_EVAL_LISTS.items()})
    for split, path in files.items():
        if path is not None and not path.is_file():
            if split == "train" and label_ratio == 1.0 and full_list_optional:
                files[split] = None
                continue
            raise FileNotFoundError(f"{path}: MRM's {split} list for label_ratio={label_ratio} not found in "
                                    f"{split_dir} (published as DatasetsSplits/{folder}/{path.name} in "
                                    "RL4M/MRM-pytorch)")
    return files


# How each builder names a list entry in its `image_id` column.
_ID_OF_ENTRY = {"chexpert": lambda e: e, "rsna_pneumonia": lambda e: Path(e).stem, "siim_acr_pneumothorax": lambda e: e}
_FOLDERS = {"chexpert": "CheXpert", "rsna_pneumonia": "RSNA_Pneumonia",
            "siim_acr_pneumothorax": "SIIM-ACR_Pneumothorax"}


def write_mrm_label_ids(dataset_name: str, split_dir: str | os.PathLike, label_ratio: float,
                        output_path: str | os.PathLike) -> list[str]:
    """Writes the `image_id`s of MRM's training list for `label_ratio` as an id file of `sample_label_ratio`'s format,
    so that `select_by_ids(full_train, output_path)` (run_finetune's `--label_ids_path`) trains on exactly MRM's 1% /
    10% images of the full (label_ratio=1.0) training split. Returns the ids, in list order."""
    from modeling_refers.file_utils import atomic_write_json

    from .label_ratio import ID_FILE_FORMAT

    if dataset_name not in _ID_OF_ENTRY:
        raise ValueError(f"dataset_name must be one of {sorted(_ID_OF_ENTRY)}, got {dataset_name!r}")
    label_ratio = check_label_ratio(label_ratio)
    path = Path(split_dir) / MRM_TRAIN_LISTS[label_ratio]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MRM's train list for label_ratio={label_ratio} not found (published as "
                                f"DatasetsSplits/{_FOLDERS[dataset_name]}/{path.name} in RL4M/MRM-pytorch)")
    num_labels = {"chexpert": 5, "rsna_pneumonia": 1, "siim_acr_pneumothorax": 0}[dataset_name]
    ids = [_ID_OF_ENTRY[dataset_name](e.entry) for e in read_mrm_list(path, num_labels)]
    atomic_write_json(output_path, {"format": ID_FILE_FORMAT, "ratio": label_ratio, "seed": None,
                                    "label_column": "labels", "id_column": "image_id", "source": str(path),
                                    "ids": ids})
    return ids


def default_converted_dir(dataset_name: str, image_dir: Path, max_size: int | None) -> Path:
    """`<datasets cache>/refers_<name>_png/<hash of image_dir>-<size>-<DICOM reader tag>` (as VinBigData's)."""
    import datasets.config

    digest = hashlib.sha1(str(image_dir.resolve()).encode()).hexdigest()[:12]
    return (Path(datasets.config.HF_DATASETS_CACHE) / f"refers_{dataset_name}_png"
            / f"{digest}-{max_size or 'full'}-{DICOM_READER_TAG}")


def convert_dicoms(sources: list[Path], targets: list[Path], max_size: int | None) -> list[str | None]:
    """Converts each DICOM to an 8-bit PNG with VinBigData's converter (the package's one DICOM reader, `load_dicom`;
    atomic writes; a PNG newer than its DICOM is reused). One error string (or None) per file."""
    workers = min(8, os.cpu_count() or 1)
    pool_type = concurrent.futures.ProcessPoolExecutor if len(sources) > 64 else concurrent.futures.ThreadPoolExecutor
    with pool_type(max_workers=workers if len(sources) > 64 else 1) as pool:
        return list(pool.map(_convert_or_error, sources, targets, [max_size] * len(sources)))


__all__ = ["MRM_TRAIN_LISTS", "MRM_EVAL_LISTS", "MRM_SPLITS_CITATION", "ListedEntry", "check_label_ratio",
           "read_mrm_list", "write_mrm_label_ids", "mrm_list_files", "default_converted_dir", "convert_dicoms"]
