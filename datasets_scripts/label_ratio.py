"""Label-ratio subsets of a training split (the paper's 1% / 10% / 100% settings), reproducible by id file.

`sample_label_ratio(train, ratio, seed)` keeps `max(1, floor(ratio * N + 0.5))` rows: a
`numpy.random.default_rng(seed)` permutation of the rows, first rows taken. Then every class with a
positive in the full split that has none in the subset gets one: the first positive of that class in the
permutation after the cut is swapped in for the last-drawn row whose removal leaves every class it covers
still covered (when no such row exists the positive is added, so the subset can grow by at most C rows).
The subset keeps the dataset's row order. With `output_path` the chosen ids are written as JSON (atomic
write); `select_by_ids(dataset, path)` re-creates the same subset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset

from modeling_refers.file_utils import atomic_write_json

from .common import InvalidDataError, label_presence

logger = logging.getLogger(__name__)

ID_FILE_FORMAT = "refers-label-ratio-ids/1"


def _id_column(dataset: Dataset, id_column: str | None) -> str:
    if id_column is not None:
        if id_column not in dataset.column_names:
            raise ValueError(f"id_column '{id_column}' is not a column of the dataset ({dataset.column_names})")
        return id_column
    for name in ("image_id", "study_id"):
        if name in dataset.column_names:
            return name
    raise ValueError(f"no id column: pass id_column (the dataset has {dataset.column_names})")


def _class_names(dataset: Dataset, label_column: str, num_classes: int, label_names: Sequence[str] | None):
    feature = dataset.features[label_column]
    if label_names is not None:
        if len(label_names) != num_classes:
            raise ValueError(f"label_names has {len(label_names)} names for {num_classes} classes")
        return list(label_names)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [f"class {i}" for i in range(num_classes)]


def sample_label_ratio(
    dataset: Dataset,
    ratio: float,
    seed: int,
    label_column: str = "labels",
    output_path: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    id_column: str | None = None,
) -> Dataset:
    """Subset of `dataset` (a training split) with about `ratio` of its rows; deterministic per `seed`.

    Args:
        dataset: rows with an id column (`image_id`/`study_id`) and `label_column` (multi-hot list or ClassLabel).
        ratio: fraction in (0, 1].
        seed: seed of the permutation.
        output_path: where to write the chosen ids (JSON), or None.
        label_names: class names for messages (default: the ClassLabel names, else "class i").
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if label_column not in dataset.column_names:
        raise ValueError(f"label_column '{label_column}' is not a column of the dataset ({dataset.column_names})")
    id_name = _id_column(dataset, id_column)
    ids = list(dataset.with_format(None, columns=[id_name])[id_name])
    if len(set(ids)) != len(ids):
        raise ValueError(f"ids in column '{id_name}' are not unique")
    n_rows = len(dataset)
    if n_rows == 0:
        raise ValueError("cannot sample from an empty dataset")
    presence = label_presence(dataset, label_column)
    names = _class_names(dataset, label_column, presence.shape[1], label_names)

    order = np.random.default_rng(seed).permutation(n_rows)
    n_keep = max(1, math.floor(float(ratio) * n_rows + 0.5))
    chosen = [int(i) for i in order[:n_keep]]
    pool = [int(i) for i in order[n_keep:]]
    counts = presence[chosen].sum(axis=0).astype(np.int64)
    for c in np.flatnonzero(presence.any(axis=0)):
        if counts[c] > 0:
            continue
        positive = next(i for i in pool if presence[i, c])
        pool.remove(positive)
        removable = next(
            (k for k in range(len(chosen) - 1, -1, -1) if not np.any(presence[chosen[k]] & (counts == 1))), None
        )
        if removable is not None:
            counts -= presence[chosen[removable]]
            pool.append(chosen.pop(removable))
        chosen.append(positive)
        counts += presence[positive]
    indices = sorted(chosen)
    subset = dataset.select(indices)

    missing = [names[c] for c in range(presence.shape[1]) if counts[c] == 0]
    if missing:
        warnings.warn(
            f"label-ratio subset ({len(indices)} of {n_rows} rows, ratio {ratio}, seed {seed}) has no positive "
            f"example of class(es) {', '.join(repr(m) for m in missing)} (none in the full split either)",
            stacklevel=2,
        )
    logger.info("label ratio %s, seed %d: %d of %d rows", ratio, seed, len(indices), n_rows)
    if output_path is not None:
        atomic_write_json(
            output_path,
            {
                "format": ID_FILE_FORMAT,
                "ratio": float(ratio),
                "seed": int(seed),
                "label_column": label_column,
                "id_column": id_name,
                "num_rows_full": n_rows,
                "ids": [ids[i] for i in indices],
            },
        )
    return subset


def read_ids(ids_path: str | os.PathLike) -> tuple[list[str], str | None]:
    """The ids (and id column, if recorded) of an id file written by `sample_label_ratio` (or a JSON list)."""
    path = Path(ids_path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidDataError(f"{path}: not a JSON id file ({err})") from err
    if isinstance(content, list):
        ids, column = content, None
    elif isinstance(content, dict) and isinstance(content.get("ids"), list):
        ids, column = content["ids"], content.get("id_column")
    else:
        raise InvalidDataError(f"{path}: expected a JSON list of ids or an object with an 'ids' list")
    if not all(isinstance(i, str) for i in ids):
        raise InvalidDataError(f"{path}: every id must be a string")
    return ids, column


def select_by_ids(dataset: Dataset, ids_path: str | os.PathLike, id_column: str | None = None) -> Dataset:
    """The rows of `dataset` whose ids are listed in `ids_path`, in the dataset's order. Every listed id must
    exist (InvalidDataError naming the file and the first missing ids)."""
    ids, recorded_column = read_ids(ids_path)
    id_name = _id_column(dataset, id_column or recorded_column)
    position = {value: i for i, value in enumerate(dataset.with_format(None, columns=[id_name])[id_name])}
    missing = [i for i in ids if i not in position]
    if missing:
        raise InvalidDataError(
            f"{ids_path}: {len(missing)} id(s) not found in column '{id_name}' of the dataset, e.g. {missing[:5]}"
        )
    return dataset.select(sorted(position[i] for i in ids))
