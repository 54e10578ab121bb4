"""multilabel_auc against a hand count and scikit-learn; the bundled evaluate module offline; the ROC PNG."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from modeling_refers.metrics import (
    METRIC_PATH,
    UndefinedAUCWarning,
    load_multilabel_auc_metric,
    multilabel_auc,
    roc_curve_png,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


def _auc_by_counting_pairs(labels, scores) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2: the Mann-Whitney reading of ROC AUC."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_matches_hand_count_on_tiny_example():
    references = [[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]]
    scores = [[0.9, 0.3, 0.5], [0.2, 0.8, 0.5], [0.6, 0.3, 0.1], [0.6, 0.1, 0.7], [0.4, 0.5, 0.9]]
    result = multilabel_auc(references, scores, label_names=["a", "b", "c"])
    expected = {}
    for c, name in enumerate("abc"):
        expected[name] = _auc_by_counting_pairs([r[c] for r in references], [s[c] for s in scores])
    # Class a: positives 0.9, 0.6, 0.4 vs negatives 0.2, 0.6 -> (2 + 1.5 + 1) / 6 (one tie).
    assert expected["a"] == pytest.approx(4.5 / 6)
    assert result["per_class"] == pytest.approx(expected, abs=1e-12)
    assert result["mean_auc"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    assert result["undefined"] == []
    json.dumps(result)  # plain Python floats, ready for results.json


def test_matches_sklearn_on_random_multilabel_data():
    rng = np.random.default_rng(0)
    references = (rng.random((300, 6)) < 0.3).astype(int)
    scores = rng.normal(size=(300, 6)) + references * rng.uniform(0.0, 2.0, size=6)
    result = multilabel_auc(references, scores)
    expected = roc_auc_score(references, scores, average=None)
    assert list(result["per_class"]) == [f"class_{i}" for i in range(6)]
    np.testing.assert_allclose(list(result["per_class"].values()), expected, rtol=0, atol=1e-12)
    assert result["mean_auc"] == pytest.approx(roc_auc_score(references, scores, average="macro"), abs=1e-12)
    # torch tensors are accepted as well
    torch_result = multilabel_auc(torch.from_numpy(references), torch.from_numpy(scores))
    assert torch_result["per_class"] == pytest.approx(result["per_class"], abs=1e-6)


def test_undefined_class_is_warned_named_and_left_out_of_the_mean():
    rng = np.random.default_rng(1)
    references = (rng.random((50, 4)) < 0.5).astype(int)
    references[:, 1] = 0  # no positive: 'hernia'
    references[:, 3] = 1  # no negative: 'edema'
    scores = rng.random((50, 4))
    names = ["effusion", "hernia", "nodule", "edema"]
    with pytest.warns(UndefinedAUCWarning, match=r"'hernia' \(all 0\).*'edema' \(all 1\)"):
        result = multilabel_auc(references, scores, label_names=names)
    assert result["per_class"]["hernia"] is None and result["per_class"]["edema"] is None
    assert result["undefined"] == ["hernia", "edema"]
    defined = [roc_auc_score(references[:, c], scores[:, c]) for c in (0, 2)]
    assert result["mean_auc"] == pytest.approx(np.mean(defined), abs=1e-12)

    with pytest.warns(UndefinedAUCWarning):
        nothing = multilabel_auc([[0], [0]], [[0.1], [0.2]])
    assert nothing == {"per_class": {"class_0": None}, "mean_auc": None, "undefined": ["class_0"]}


def test_single_label_class_ids_are_scored_one_vs_rest():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=120)
    logits = rng.normal(size=(120, 3)) + np.eye(3)[labels] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    result = multilabel_auc(labels, probs, label_names=["normal", "viral", "bacterial"])
    for c, name in enumerate(["normal", "viral", "bacterial"]):
        assert result["per_class"][name] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
    ovr_macro = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert result["mean_auc"] == pytest.approx(ovr_macro, abs=1e-12)

    # binary: (N,) 0/1 labels with (N, 2) scores, or (N,) scores of the positive class
    binary = rng.integers(0, 2, size=40)
    positive_score = rng.random(40) + 0.3 * binary
    two_col = multilabel_auc(binary, np.stack([1 - positive_score, positive_score], axis=1))
    one_col = multilabel_auc(binary, positive_score)
    assert one_col["per_class"]["class_0"] == pytest.approx(roc_auc_score(binary, positive_score), abs=1e-12)
    assert two_col["per_class"]["class_1"] == pytest.approx(one_col["per_class"]["class_0"], abs=1e-12)


@pytest.mark.parametrize(
    "references, scores, kwargs, match",
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), {}, "`references` has shape"),
        (np.zeros((5,)), np.zeros((4, 2)), {}, "`references` has 5 class ids"),
        (np.zeros((4, 3)), np.zeros((4, 3, 1)), {}, "`scores` must have shape"),
        (np.zeros((4, 2)), np.array([[0.1, np.nan]] * 4), {}, "`scores` contains NaN"),
        (np.array([[0, 2]] * 4), np.zeros((4, 2)), {}, "only 0 and 1"),
        (np.array([0, 1, 3, 1]), np.zeros((4, 3)), {}, r"class ids in \[0, 3\)"),
        (np.array([0, 1.5, 1, 0]), np.zeros((4, 3)), {}, "integer class ids"),
        (np.zeros((4, 2)), np.zeros((4, 2)), {"label_names": ["a"]}, "`label_names` has 1 names"),
        (np.zeros((0, 2)), np.zeros((0, 2)), {}, "empty"),
        ([["x", "y"]], [[0.1, 0.2]], {}, "`references` must be numeric"),
    ],
)
def test_bad_input_raises_naming_the_argument(references, scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        multilabel_auc(references, scores, **kwargs)


def test_torch_scores_that_require_grad_are_accepted():
    # np.asarray cannot convert a tensor that requires grad: the tensor must be detached first.
    rng = np.random.default_rng(6)
    references = (rng.random((30, 3)) < 0.5).astype(int)
    scores = torch.tensor(rng.random((30, 3)), dtype=torch.float32, requires_grad=True)
    result = multilabel_auc(references, scores)
    expected = roc_auc_score(references, scores.detach().numpy(), average=None)
    np.testing.assert_allclose(list(result["per_class"].values()), expected, rtol=0, atol=1e-12)


def test_bad_input_messages_name_the_argument_its_type_and_the_bad_values():
    with pytest.raises(ValueError, match=r"^`scores` must be numeric array-like, got list: "):
        multilabel_auc([[0, 1]], [["x", "y"]])
    with pytest.raises(ValueError, match=r"^`references` must be numeric array-like, got tuple: "):
        multilabel_auc((("x", "y"),), [[0.1, 0.2]])
    # The first non-finite score in row-major order is named: row 2, class 1 (the inf at row 3 comes later).
    scores = np.zeros((4, 3))
    scores[2, 1], scores[3, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"first at row 2, class 1\)$"):
        multilabel_auc(np.zeros((4, 3)), scores)
    # Multi-hot references with values other than 0/1: only those are listed, sorted, at most five of them.
    references = np.array([[0, 1, 2], [1, -1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=re.escape("must contain only 0 and 1, found [-1.0, 2.0]") + "$"):
        multilabel_auc(references, np.zeros((3, 3)))
    references = np.array([[7, 0, 1, 3], [0, 6, 1, -1], [5, 4, 2, 0]])
    invalid = sorted({float(v) for v in references.ravel() if v not in (0, 1)})  # -1, 2, 3, 4, 5, 6, 7
    with pytest.raises(ValueError, match=re.escape(f"found {invalid[:5]}") + "$"):
        multilabel_auc(references, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"^single-label `references` must be integer class ids$"):
        multilabel_auc(np.array([0, 0.5, 1, 2]), np.zeros((4, 3)))


def test_undefined_auc_warning_names_each_class_constant_and_points_at_the_caller():
    # One example: every class is undefined, and the warning gives that example's label for each class.
    with pytest.warns(UndefinedAUCWarning) as record:
        result = multilabel_auc([[1, 0, 1]], [[0.3, 0.4, 0.5]], label_names=["a", "b", "c"])
    assert result == {"per_class": {"a": None, "b": None, "c": None}, "mean_auc": None, "undefined": ["a", "b", "c"]}
    assert len(record) == 1
    assert "3 of 3 classes" in str(record[0].message)
    assert "'a' (all 1), 'b' (all 0), 'c' (all 1);" in str(record[0].message)
    assert record[0].filename == __file__  # stacklevel: the line that called multilabel_auc


def test_load_multilabel_auc_metric_passes_its_arguments_to_evaluate_load():
    default = load_multilabel_auc_metric()
    assert default.experiment_id != "refers-test" and not default.keep_in_memory
    metric = load_multilabel_auc_metric(experiment_id="refers-test", keep_in_memory=True)
    assert metric.experiment_id == "refers-test" and metric.keep_in_memory


def test_evaluate_module_gives_the_same_numbers_in_process():
    rng = np.random.default_rng(3)
    references = (rng.random((64, 4)) < 0.4).astype(int)
    scores = rng.random((64, 4))
    names = ["a", "b", "c", "d"]
    metric = load_multilabel_auc_metric()
    for start in range(0, 64, 16):  # streamed in batches like a Trainer evaluation loop
        metric.add_batch(predictions=scores[start : start + 16], references=references[start : start + 16])
    assert metric.compute(label_names=names) == multilabel_auc(references, scores, label_names=names)

    labels = rng.integers(0, 4, size=64)
    assert load_multilabel_auc_metric().compute(predictions=scores, references=labels) == multilabel_auc(labels, scores)


def test_evaluate_module_loads_offline_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(4)
    references = (rng.random((40, 3)) < 0.5).astype(int).tolist()
    scores = rng.random((40, 3)).tolist()
    script = (
        "import json, sys, evaluate\n"
        f"metric = evaluate.load({str(METRIC_PATH)!r})\n"
        "data = json.loads(sys.stdin.read())\n"
        "print(json.dumps(metric.compute(predictions=data['scores'], references=data['references'],"
        " label_names=['x', 'y', 'z'])))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # empty caches: nothing can come from an earlier download
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: a network call would fail loudly
    }
    out = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps({"scores": scores, "references": references}),
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == multilabel_auc(references, scores, label_names=["x", "y", "z"])
    assert list((tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics").glob("multilabel_auc/*/*.py"))


def test_roc_curve_png_is_a_valid_png_written_atomically(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    references = (rng.random((80, 3)) < 0.4).astype(int)
    references[:, 2] = 0  # undefined class: skipped in the plot, warned
    scores = rng.random((80, 3)) + references
    out = tmp_path / "plots" / "roc.png"
    with pytest.warns(UndefinedAUCWarning, match="'hernia'"):
        written = roc_curve_png(references, scores, ["effusion", "nodule", "hernia"], out)
    assert written == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert [p.name for p in out.parent.iterdir()] == ["roc.png"]  # no temp file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="label_names"):
            roc_curve_png(references, scores, ["only-one"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
