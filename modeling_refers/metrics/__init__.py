"""REFERS metrics: per-class ROC AUC (scikit-learn), the bundled `evaluate` module, ROC plots; report-generation
metrics (pycocoevalcap, rouge-score, sacrebleu); cross-modal retrieval metrics (Recall@K, median rank).

The paper reports the area under the ROC curve per class and its mean over classes. A class whose references are
all one value (no positive or no negative in the split) has no AUC: it is reported as `None`, left out of the mean
and named in a `UndefinedAUCWarning`.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..file_utils import atomic_open


METRIC_PATH = Path(__file__).resolve().parent / "multilabel_auc"
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


# ----------------------------------------------------------------------------------------------- report generation
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _require(module: str, pip_name: str, what: str):
    """Import `module` or raise an ImportError that names the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs `{pip_name}`: pip install {pip_name}  (or pip install -e '.[test]')") from err


def tokenize_report(text: str) -> list[str]:
    """Lower-cased words and numbers of `text`, punctuation dropped: `"No effusion. Heart size normal."` ->
    `["no", "effusion", "heart", "size", "normal"]`. This is what the COCO toolkit's PTBTokenizer (which needs
    Java) leaves of plain report prose, so the pycocoevalcap scorers can run on pre-tokenised text without Java."""
    if not isinstance(text, str):
        raise TypeError(f"a report must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _as_reference_lists(references: Sequence[str | Sequence[str]], n: int) -> list[list[str]]:
    if isinstance(references, str):
        raise TypeError("`references` must be a list (one reference, or a list of references, per prediction)")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != n:
        raise ValueError(f"`references` has {len(refs)} entries but `predictions` has {n}; give one per prediction")
    for index, group in enumerate(refs):
        if not group or not all(isinstance(r, str) for r in group):
            raise ValueError(f"`references[{index}]` must be a report string or a non-empty list of strings")
    return refs


def meteor_available() -> tuple[bool, str]:
    """(True, "") when pycocoevalcap's METEOR 1.5 can run (it is a Java program), else (False, the reason)."""
    if shutil.which("java") is None:
        return False, "METEOR (pycocoevalcap's meteor-1.5.jar) needs Java, and `java` is not on PATH"
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return False, "METEOR needs pycocoevalcap: pip install pycocoevalcap"
    return True, ""


def report_generation_metrics(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], meteor: bool | None = None
) -> dict:
    """Language metrics between generated and reference reports, as report-generation papers give them.

    Args:
        predictions: N generated reports.
        references: N references (a string, or a list of strings, per prediction).
        meteor: compute METEOR (pycocoevalcap, needs Java); default: when Java is found.

    Returns:
        `{"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "METEOR": corpus scores (pycocoevalcap on `tokenize_report` text;
        BLEU with the "closest" reference length, ROUGE-L the COCO F-measure with beta 1.2, CIDEr-D x 10),
        "ROUGE-L_F1": mean rouge-score rougeL F1 (beta 1), "sacreBLEU": sacrebleu corpus BLEU (0-100, its own 13a
        tokenizer, lower-cased), "num_reports": N, "per_report": {"BLEU-4", "ROUGE-L", "CIDEr" (and "METEOR"): N
        scores each},
        "notes": [...]}`; "METEOR" is None (with the reason in "notes") when it cannot run.
    """
    if isinstance(predictions, str):
        raise TypeError("`predictions` must be a list of generated report strings, not one string")
    predictions = list(predictions)
    if not predictions:
        raise ValueError("`predictions` is empty: need at least one generated report")
    for index, text in enumerate(predictions):
        if not isinstance(text, str):
            raise TypeError(f"`predictions[{index}]` must be a str, got {type(text).__name__}")
    refs = _as_reference_lists(references, len(predictions))
    _require("pycocoevalcap", "pycocoevalcap", "report_generation_metrics")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score", "report_generation_metrics")
    sacrebleu = _require("sacrebleu", "sacrebleu", "report_generation_metrics")

    # pycocoevalcap asserts on empty strings in places; an empty prediction is scored as one unknown token.
    res = {i: [" ".join(tokenize_report(p)) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(tokenize_report(r)) or "<empty>" for r in group] for i, group in enumerate(refs)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    result: dict[str, Any] = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    result.update({"ROUGE-L": float(rouge), "CIDEr": float(cider), "METEOR": None})
    notes = []
    run_meteor, why = meteor_available()
    if meteor is True and not run_meteor:
        raise RuntimeError(why)
    if meteor is False:
        notes.append("METEOR not computed (meteor=False)")
    elif run_meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            meteor_score, meteor_each = scorer.compute_score(gts, res)
        finally:
            del scorer  # closes the Java process
        result["METEOR"] = float(meteor_score)
    else:
        notes.append(why)

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    result["ROUGE-L_F1"] = float(np.mean([
        max(scorer.score(r, p)["rougeL"].fmeasure for r in group) for p, group in zip(predictions, refs)]))
    width = max(len(group) for group in refs)
    ref_streams = [[group[k] if k < len(group) else group[0] for group in refs] for k in range(width)]
    result["sacreBLEU"] = float(sacrebleu.corpus_bleu(predictions, ref_streams, lowercase=True).score)
    result["num_reports"] = len(predictions)
    result["per_report"] = {"BLEU-4": [float(x) for x in bleu_each[3]], "ROUGE-L": [float(x) for x in rouge_each],
                            "CIDEr": [float(x) for x in cider_each]}
    if result["METEOR"] is not None:
        result["per_report"]["METEOR"] = [float(x) for x in meteor_each]
    result["notes"] = notes + ["pycocoevalcap scorers on pre-tokenised text (tokenize_report); its PTBTokenizer "
                               "needs Java and is not used"]
    return result


# --------------------------------------------------------------------------------------------------------- retrieval
def _ranks(similarity: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """1-based rank of the best-placed relevant candidate for every query (row). Ties count against the query:
    rank = 1 + number of other candidates scoring at least as high as that relevant candidate."""
    ranks = np.empty(similarity.shape[0], dtype=np.int64)
    for q, (scores, relevant) in enumerate(zip(similarity, relevance)):
        best = scores[relevant].max()
        ranks[q] = int((scores >= best).sum())  # the relevant candidate itself is among them
        ranks[q] -= int((scores[relevant] >= best).sum()) - 1  # other relevant ones tied with it do not count
    return ranks


def _summarise_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out.update({"median_rank": float(np.median(ranks)), "mean_rank": float(np.mean(ranks)),
                "num_queries": int(len(ranks))})
    return out


def retrieval_metrics(similarity: Any, relevance: Any | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image-to-report and report-to-image retrieval metrics from a similarity matrix, as JoImTeRNet reports them.

    Args:
        similarity: `(num_studies, num_reports)` scores (e.g. cosine similarity of study and report embeddings).
        relevance: `(num_studies, num_reports)` bool, True where a report is a correct match for a study (e.g. the
            same text); default: the identity (study i <-> report i, square matrix). Every row and column needs one.
        ks: the K of Recall@K.

    Returns:
        `{"image_to_report": {"R@1", "R@5", "R@10" (percent of queries whose best relevant candidate ranks <= K),
        "median_rank", "mean_rank", "num_queries"}, "report_to_image": {...}, "ranks": {"image_to_report": [...],
        "report_to_image": [...]}}`. Ties count against the query.
    """
    sim = _as_float_array(similarity, "similarity")
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"`similarity` must be a non-empty (num_studies, num_reports) matrix, got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("`similarity` contains NaN or infinite values")
    if relevance is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"`similarity` has shape {sim.shape}; without `relevance` it must be square "
                             "(study i matches report i)")
        rel = np.eye(sim.shape[0], dtype=bool)
    else:
        rel = np.asarray(relevance, dtype=bool)
        if rel.shape != sim.shape:
            raise ValueError(f"`relevance` has shape {rel.shape} but `similarity` has shape {sim.shape}")
        for axis, name in ((1, "study (row)"), (0, "report (column)")):
            empty = np.flatnonzero(~rel.any(axis=axis))
            if len(empty):
                raise ValueError(f"`relevance`: {name} {int(empty[0])} has no relevant match ({len(empty)} in all)")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"`ks` must be positive integers, got {ks}")
    i2r, r2i = _ranks(sim, rel), _ranks(sim.T, rel.T)
    return {"image_to_report": _summarise_ranks(i2r, ks), "report_to_image": _summarise_ranks(r2i, ks),
            "ranks": {"image_to_report": i2r.tolist(), "report_to_image": r2i.tolist()}}


__all__ = [
    "METRIC_PATH", "UndefinedAUCWarning", "load_multilabel_auc_metric", "meteor_available", "multilabel_auc",
    "report_generation_metrics", "retrieval_metrics", "roc_curve_png", "tokenize_report",
]
