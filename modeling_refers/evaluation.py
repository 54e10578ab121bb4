"""REFERS fine-tuning metrics: per-class ROC AUC (scikit-learn), the bundled `evaluate` module, ROC plots.

The paper reports the area under the ROC curve per class and its mean over classes. A class whose references are
all one value (no positive or no negative in the split) has no AUC: it is reported as `None`, left out of the mean
and named in a `UndefinedAUCWarning`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .file_utils import atomic_open


METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "multilabel_auc"
"""Folder of the `evaluate` module shipped with the package (`evaluate.load(str(METRIC_PATH))`)."""


class UndefinedAUCWarning(UserWarning):
    """A class had references of a single value, so its ROC AUC is undefined and it was left out of the mean."""


def _as_float_array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().float().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be numeric array-like, got {type(value).__name__}: {err}") from None
    return array


def _prepare(
    references: Any, scores: Any, label_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate inputs and return (multi-hot references (N, C) int, scores (N, C) float64, C names)."""
    scores_arr = _as_float_array(scores, "scores")
    refs_arr = _as_float_array(references, "references")
    if scores_arr.ndim == 1:  # a single binary task: scores (N,) for the positive class
        if refs_arr.ndim != 1:
            raise ValueError(
                f"`scores` is 1-D (a single binary class) so `references` must be 1-D too, got shape {refs_arr.shape}"
            )
        scores_arr, refs_arr = scores_arr[:, None], refs_arr[:, None]
    if scores_arr.ndim != 2:
        raise ValueError(f"`scores` must have shape (N, C) (or (N,) for one binary class), got {scores_arr.shape}")
    n, num_classes = scores_arr.shape
    if n == 0 or num_classes == 0:
        raise ValueError(f"`scores` is empty (shape {scores_arr.shape}): need at least one example and one class")
    if not np.all(np.isfinite(scores_arr)):
        bad = np.argwhere(~np.isfinite(scores_arr))[0]
        raise ValueError(f"`scores` contains NaN or infinite values (first at row {bad[0]}, class {bad[1]})")
    if not np.all(np.isfinite(refs_arr)):
        raise ValueError("`references` contains NaN or infinite values")

    if refs_arr.ndim == 2:
        if refs_arr.shape != scores_arr.shape:
            raise ValueError(
                f"`references` has shape {refs_arr.shape} but `scores` has shape {scores_arr.shape}; multi-label "
                "references must be multi-hot with the same (N, C) shape"
            )
        if not np.all((refs_arr == 0) | (refs_arr == 1)):
            values = np.unique(refs_arr[(refs_arr != 0) & (refs_arr != 1)])[:5]
            raise ValueError(f"multi-label `references` must contain only 0 and 1, found {values.tolist()}")
        onehot = refs_arr.astype(np.int64)
    elif refs_arr.ndim == 1:
        if refs_arr.shape[0] != n:
            raise ValueError(f"`references` has {refs_arr.shape[0]} class ids but `scores` has {n} rows")
        if not np.all(refs_arr == np.round(refs_arr)):
            raise ValueError("single-label `references` must be integer class ids")
        ids = refs_arr.astype(np.int64)
        if num_classes == 1:  # (N,) binary labels with (N, 1) scores
            if not np.all((ids == 0) | (ids == 1)):
                raise ValueError("`references` for a single binary class must be 0 or 1")
            onehot = ids[:, None]
        else:
            if ids.min() < 0 or ids.max() >= num_classes:
                raise ValueError(
                    f"single-label `references` must be class ids in [0, {num_classes}), found values in "
                    f"[{ids.min()}, {ids.max()}]"
                )
            onehot = np.eye(num_classes, dtype=np.int64)[ids]
    else:
        raise ValueError(f"`references` must have shape (N, C) multi-hot or (N,) class ids, got {refs_arr.shape}")

    if label_names is None:
        names = [f"class_{i}" for i in range(num_classes)]
    else:
        names = [str(x) for x in label_names]
        if len(names) != num_classes:
            raise ValueError(f"`label_names` has {len(names)} names but `scores` has {num_classes} classes")
        if len(set(names)) != len(names):
            raise ValueError(f"`label_names` contains duplicates: {names}")
    return onehot, scores_arr, names


def multilabel_auc(references: Any, scores: Any, label_names: Sequence[str] | None = None) -> dict:
    """Per-class ROC AUC (one-vs-rest) and its mean over the classes where it is defined.

    Args:
        references: (N, C) multi-hot 0/1 labels (multi-label), or (N,) integer class ids (single-label; each
            class is scored one-vs-rest), or (N,) 0/1 with 1-D `scores` for one binary class.
        scores: (N, C) scores (probabilities or logits; AUC only depends on their order), or (N,).
        label_names: C class names; defaults to `class_0`, `class_1`, ...

    Returns:
        `{"per_class": {name: AUC in [0, 1] or None}, "mean_auc": float or None, "undefined": [names]}`; a class is
        undefined (None, left out of `mean_auc`, named in an `UndefinedAUCWarning`) when its references are all 0
        or all 1. `mean_auc` is None when no class is defined.

    Raises:
        ValueError: shapes that do not match, NaN/infinite scores, non-binary multi-hot references, class ids out
            of range, or `label_names` of the wrong length.
    """
    from sklearn.metrics import roc_auc_score

    onehot, scores_arr, names = _prepare(references, scores, label_names)
    per_class: dict[str, float | None] = {}
    undefined: list[str] = []
    for c, name in enumerate(names):
        column = onehot[:, c]
        if column.min() == column.max():
            per_class[name] = None
            undefined.append(name)
            continue
        per_class[name] = float(roc_auc_score(column, scores_arr[:, c]))
    if undefined:
        details = ", ".join(f"'{n}' (all {int(onehot[0, names.index(n)])})" for n in undefined)
        warnings.warn(
            f"ROC AUC is undefined for {len(undefined)} of {len(names)} classes whose references are all one value: "
            f"{details}; they are reported as None and left out of mean_auc.",
            UndefinedAUCWarning,
            stacklevel=2,
        )
    defined = [v for v in per_class.values() if v is not None]
    mean_auc = float(np.mean(defined)) if defined else None
    return {"per_class": per_class, "mean_auc": mean_auc, "undefined": undefined}


def roc_curve_png(
    references: Any,
    scores: Any,
    label_names: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Plot one ROC curve per class (with its AUC in the legend) to a PNG at `path`, written atomically.

    Inputs as for `multilabel_auc`; classes with an undefined AUC are left out of the plot (and warned about).
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    onehot, scores_arr, names = _prepare(references, scores, label_names)
    result = multilabel_auc(onehot, scores_arr, names)

    fig = Figure(figsize=(6.4, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c, name in enumerate(names):
        auc = result["per_class"][name]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], scores_arr[:, c])
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=0.8, label="chance")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    mean = result["mean_auc"]
    ax.set_title(title or (f"ROC curves (mean AUC {mean:.3f})" if mean is not None else "ROC curves"))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()

    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def load_multilabel_auc_metric(**kwargs):
    """`evaluate.load` of the `multilabel_auc` module shipped in the package (no Hub access needed).

    The returned `evaluate.Metric` takes `predictions` (C scores per example) and `references` (C 0/1 labels, or
    one class id, per example) and `compute(label_names=...)` returns the same dict as `multilabel_auc`.
    """
    import evaluate

    return evaluate.load(str(METRIC_PATH), **kwargs)


__all__ = ["METRIC_PATH", "UndefinedAUCWarning", "load_multilabel_auc_metric", "multilabel_auc", "roc_curve_png"]
