"""Label-ratio subsets: determinism, class coverage, id files, reproduction, bad arguments."""

import json
import math

import numpy as np
import pytest

import datasets
from datasets_scripts import NIH_LABEL_NAMES, InvalidDataError, load_nih_chestxray14, sample_label_ratio, select_by_ids
from datasets_scripts.label_ratio import read_ids


@pytest.fixture(scope="module")
def nih_train(shared_data_dir):
    with pytest.warns(UserWarning):
        return load_nih_chestxray14(shared_data_dir / "nih_chestxray14_sample")["train"]


def _labels(ds):
    return np.array([row["labels"] for row in ds.select_columns(["labels"])])


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_every_class_with_positives_keeps_one(nih_train, ratio):
    full = _labels(nih_train)
    assert full.sum(0).min() > 0  # every class has positives in this train split (fewest: Hernia, 9; sample_data: 8)
    for seed in range(5):
        subset = sample_label_ratio(nih_train, ratio, seed)
        y = _labels(subset)
        assert (y.sum(0) > 0).all(), f"ratio {ratio} seed {seed}"
        target = max(1, math.floor(ratio * len(nih_train) + 0.5))
        # swaps keep the size; it only grows when the target is too small to hold one positive per class
        assert len(subset) == target or (len(subset) > target and len(subset) <= len(NIH_LABEL_NAMES))


def test_size_is_exact_when_room(nih_train):
    # floor(0.1 * N + 0.5): 73 for the 725 train images of ../shared/data, 35 for the 349 of sample_data
    assert len(sample_label_ratio(nih_train, 0.1, 0)) == math.floor(0.1 * len(nih_train) + 0.5)
    assert len(sample_label_ratio(nih_train, 1.0, 0)) == len(nih_train)
    assert list(sample_label_ratio(nih_train, 1.0, 0)["image_id"]) == list(nih_train["image_id"])


def test_deterministic_per_seed_and_ids_reproduce(nih_train, tmp_path):
    a = sample_label_ratio(nih_train, 0.1, seed=7, output_path=tmp_path / "ids" / "ratio10_seed7.json")
    b = sample_label_ratio(nih_train, 0.1, seed=7)
    c = sample_label_ratio(nih_train, 0.1, seed=8)
    assert list(a["image_id"]) == list(b["image_id"])
    assert list(a["image_id"]) != list(c["image_id"])
    content = json.loads((tmp_path / "ids" / "ratio10_seed7.json").read_text())
    assert content["ids"] == list(a["image_id"]) and content["seed"] == 7 and content["ratio"] == 0.1
    assert content["id_column"] == "image_id" and content["num_rows_full"] == len(nih_train)
    assert [p.name for p in (tmp_path / "ids").iterdir()] == ["ratio10_seed7.json"]  # no temp file left
    again = select_by_ids(nih_train, tmp_path / "ids" / "ratio10_seed7.json")
    assert list(again["image_id"]) == list(a["image_id"])
    np.testing.assert_array_equal(_labels(again), _labels(a))
    # the subset keeps the dataset's order
    position = {k: i for i, k in enumerate(nih_train["image_id"])}
    assert [position[k] for k in a["image_id"]] == sorted(position[k] for k in a["image_id"])


def test_first_draw_is_the_seeded_permutation(nih_train):
    """Where no swap is needed, the subset is exactly the first n rows of default_rng(seed).permutation(N)."""
    subset = sample_label_ratio(nih_train, 0.5, 3)
    n = len(nih_train)
    first = np.random.default_rng(3).permutation(n)[: math.floor(0.5 * n + 0.5)]
    y = _labels(nih_train)
    assert (y[first].sum(0) > 0).all()  # no swap was needed for this draw
    ids = list(nih_train["image_id"])
    assert list(subset["image_id"]) == [ids[i] for i in sorted(first)]


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, "0.1", None, True])
def test_bad_ratio(nih_train, ratio):
    with pytest.raises(ValueError, match="ratio"):
        sample_label_ratio(nih_train, ratio, 0)


def test_warns_for_class_without_positive_and_single_label():
    features = datasets.Features({"image_id": datasets.Value("string"),
                                  "labels": datasets.List(datasets.Value("float32"), length=3)})
    ds = datasets.Dataset.from_dict(
        {"image_id": [f"i{k}" for k in range(20)], "labels": [[1, 0, 0]] * 19 + [[0, 1, 0]]}, features=features)
    with pytest.warns(UserWarning, match=r"no positive example of class\(es\) 'Edema'"):
        subset = sample_label_ratio(ds, 0.1, 0, label_names=["Atelectasis", "Cardiomegaly", "Edema"])
    assert len(subset) == 2 and "i19" in subset["image_id"]  # the only Cardiomegaly row was swapped in

    single = datasets.Dataset.from_dict(
        {"image_id": [f"s{k}" for k in range(30)], "labels": [0] * 29 + [1]},
        features=datasets.Features({"image_id": datasets.Value("string"),
                                    "labels": datasets.ClassLabel(names=["normal", "tuberculosis"])}))
    for seed in range(4):
        subset = sample_label_ratio(single, 0.1, seed)
        assert len(subset) == 3 and "s29" in subset["image_id"]


def test_select_by_ids_errors(nih_train, tmp_path):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(["00000001_000.png", "nope.png"]))
    with pytest.raises(InvalidDataError, match=r"ids\.json: 1 id\(s\) not found in column 'image_id'.*nope\.png"):
        select_by_ids(nih_train, path)
    path.write_text("{broken")
    with pytest.raises(InvalidDataError, match="not a JSON id file"):
        read_ids(path)
    with pytest.raises(ValueError, match="label_column 'y'"):
        sample_label_ratio(nih_train, 0.1, 0, label_column="y")
