"""Kermany pediatric pneumonia builder on the real data (../shared/data/kermany_pneumonia): README counts, patient-level
splits, labels from the folders, errors on bad folders, and the fine-tuning / zero-shot scripts end to end."""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

import datasets
from datasets_scripts import (
    KERMANY_BACTERIAL_VIRAL_LABEL_NAMES,
    KERMANY_PNEUMONIA_LABEL_NAMES,
    TARGET_DATASETS,
    InvalidDataError,
    kermany_records,
    load_kermany_pneumonia,
    load_target_dataset,
)
from datasets_scripts.kermany_pneumonia import parse_kermany_name
from modeling_refers.tasks.zero_shot import load_prompts

KERMANY = "kermany_pneumonia"
WHY = "the Kermany pediatric pneumonia images are not in sample_data/"
# README of ../shared/data, section kermany_pneumonia/: per official split, (normal, bacterial, viral).
README_COUNTS = {"train": (1341, 2530, 1345), "test": (234, 242, 148)}
TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "view_fusion_hidden_size=16")


@pytest.fixture(scope="module")
def kermany_dir(shared_data_dir, data_source):
    """The module-scoped form of `need_shared_data(f"{KERMANY}/train", f"{KERMANY}/test")` (loaded once per module)."""
    missing = [p for p in (f"{KERMANY}/train", f"{KERMANY}/test") if not (shared_data_dir / p).is_dir()]
    if data_source != "shared" or missing:
        pytest.skip(f"{WHY}; needs {', '.join(missing or [KERMANY])} of the full shared data: provide ../shared/data "
                    f"or point REFERS_SHARED_DATA at it (now looked in {shared_data_dir})")
    return shared_data_dir / KERMANY


@pytest.fixture(scope="module")
def pneumonia(kermany_dir):
    return load_kermany_pneumonia(kermany_dir)  # images decoded once here (verify_images=True)


@pytest.fixture(scope="module")
def bacterial_viral(kermany_dir):
    return load_kermany_pneumonia(kermany_dir, task="bacterial_viral", verify_images=False)


def _patients(dataset):
    return {split: set(d["patient_id"]) for split, d in dataset.items()}


def _ids(dataset):
    return {split: list(d["image_id"]) for split, d in dataset.items()}


# ------------------------------------------------------------------------------------------------ counts
def test_records_match_the_readme_counts(need_shared_data):
    root = need_shared_data(f"{KERMANY}/train", f"{KERMANY}/test", why=WHY)
    records = kermany_records(root / KERMANY)
    counts = Counter((r["split"], r["finding"]) for r in records)
    for split, (normal, bacteria, virus) in README_COUNTS.items():
        assert (counts[split, "normal"], counts[split, "bacteria"], counts[split, "virus"]) == (normal, bacteria, virus)
    assert len(records) == 5840 and set(records[0]) == {"path", "split", "patient_id", "finding"}
    for r in records:  # the finding agrees with the folder the file is in
        folder = Path(r["path"]).parent
        assert (folder.parent.name, folder.name) == (r["split"], "NORMAL" if r["finding"] == "normal" else "PNEUMONIA")
        assert Path(r["path"]).is_absolute() and Path(r["path"]).is_file()


def test_pneumonia_task_counts_and_features(pneumonia):
    assert pneumonia["train"].features["labels"] == datasets.ClassLabel(names=list(KERMANY_PNEUMONIA_LABEL_NAMES))
    assert pneumonia["train"].column_names == ["image_id", "patient_id", "image", "labels"]
    train_val = Counter(pneumonia["train"]["labels"]) + Counter(pneumonia["validation"]["labels"])
    assert (train_val[0], train_val[1]) == (1341, 3875)
    test = Counter(pneumonia["test"]["labels"])
    assert (test[0], test[1]) == (234, 390)
    # 10% of the training patients (seed 0) form the validation split: measured 529 images of 365 patients.
    assert {s: len(d) for s, d in pneumonia.items()} == {"train": 4687, "validation": 529, "test": 624}
    n_patients = len(_patients(pneumonia)["train"]) + len(_patients(pneumonia)["validation"])
    assert len(_patients(pneumonia)["validation"]) == round(0.1 * n_patients)
    image = pneumonia["test"][0]["image"]
    assert image.size == (224, 224)


def test_bacterial_viral_task_counts(bacterial_viral, pneumonia):
    assert bacterial_viral["train"].features["labels"].names == list(KERMANY_BACTERIAL_VIRAL_LABEL_NAMES)
    train_val = Counter(bacterial_viral["train"]["labels"]) + Counter(bacterial_viral["validation"]["labels"])
    assert [train_val[i] for i in range(3)] == [1341, 2530, 1345]
    test = Counter(bacterial_viral["test"]["labels"])
    assert [test[i] for i in range(3)] == [234, 242, 148]
    assert _ids(bacterial_viral) == _ids(pneumonia)  # the two tasks share rows and splits


# ------------------------------------------------------------------------------------------------ labels
def test_labels_agree_with_folder_names(bacterial_viral):
    by_name = {}
    for split, d in bacterial_viral.items():
        paths = d.cast_column("image", datasets.Image(decode=False))["image"]
        for image_id, label, image in zip(d["image_id"], d["labels"], paths):
            folder = Path(image["path"]).parent
            assert folder.parent.name == ("test" if split == "test" else "train")
            expected = 0 if folder.name == "NORMAL" else 1 if "_bacteria_" in image_id else 2
            assert folder.name in ("NORMAL", "PNEUMONIA") and label == expected, image_id
            by_name[image_id] = label
    assert by_name["IM-0115-0001.jpeg"] == 0 and by_name["NORMAL2-IM-1406-0001.jpeg"] == 0
    assert by_name["person1000_bacteria_2931.jpeg"] == 1 and by_name["person1000_virus_1681.jpeg"] == 2


def test_patient_ids_from_names():
    assert parse_kermany_name("IM-0115-0001.jpeg", "NORMAL") == ("IM-0115", "normal")
    assert parse_kermany_name("IM-0117-0001-0002.jpeg", "NORMAL") == ("IM-0117", "normal")
    assert parse_kermany_name("NORMAL2-IM-1427-0001.jpeg", "NORMAL") == ("NORMAL2-IM-1427", "normal")
    assert parse_kermany_name("person1000_bacteria_2931.jpeg", "PNEUMONIA") == ("person1000_bacteria", "bacteria")
    assert parse_kermany_name("person447_virus_921_1.jpeg", "PNEUMONIA") == ("person447_virus", "virus")
    assert parse_kermany_name("person1000_virus_1681.jpeg", "NORMAL") is None
    assert parse_kermany_name("IM-0115-0001.jpeg", "PNEUMONIA") is None


# ------------------------------------------------------------------------------------------------ splits
def test_no_patient_in_two_splits(pneumonia):
    patients = _patients(pneumonia)
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]


def test_official_split_shares_bare_numbers_but_no_series_id(kermany_dir):
    """Why patient ids keep their series (NORMAL2-, _bacteria/_virus): the bare numbers cross the official split."""
    records = kermany_records(kermany_dir)
    by_split = {s: {r["patient_id"] for r in records if r["split"] == s} for s in ("train", "test")}
    assert not by_split["train"] & by_split["test"]
    bare = {s: {p.replace("NORMAL2-", "").split("_")[0] for p in ids} for s, ids in by_split.items()}
    assert len(bare["train"] & bare["test"]) == 170 + 94


def test_seeded_validation_is_reproducible_and_seed_dependent(kermany_dir, pneumonia):
    again = load_kermany_pneumonia(kermany_dir, verify_images=False)
    other = load_kermany_pneumonia(kermany_dir, split_seed=1, verify_images=False)
    assert _ids(again) == _ids(pneumonia)
    assert _patients(other)["validation"] != _patients(pneumonia)["validation"]
    assert _ids(other)["test"] == _ids(pneumonia)["test"]  # the official test split does not move
    wider = load_kermany_pneumonia(kermany_dir, val_fraction=0.2, verify_images=False)
    n_patients = len(_patients(wider)["train"]) + len(_patients(wider)["validation"])
    assert len(_patients(wider)["validation"]) == round(0.2 * n_patients)


def test_registry_entries_load_both_tasks(kermany_dir, pneumonia, bacterial_viral):
    for name, label_names in (("kermany_pneumonia", KERMANY_PNEUMONIA_LABEL_NAMES),
                              ("kermany_bacterial_viral", KERMANY_BACTERIAL_VIRAL_LABEL_NAMES)):
        spec = TARGET_DATASETS[name]
        assert spec.label_names == label_names and spec.problem_type == "single_label_classification"
        assert spec.license == "cc-by-4.0" and "Kermany" in spec.citation and "10.17632/rscbjbr9sj.2" in spec.citation
        assert list(load_prompts(None, spec.label_names, name)) == list(label_names)  # zero-shot defaults exist
    with pytest.raises(ValueError, match="task is fixed by the data set name 'kermany_pneumonia'"):
        load_target_dataset("kermany_pneumonia", kermany_dir, task="bacterial_viral")


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def small_copy(kermany_dir, tmp_path):
    """train/ and test/ with 3 real images per class folder (different patients in train and test)."""
    root = tmp_path / "kermany"
    for split in ("train", "test"):
        for folder in ("NORMAL", "PNEUMONIA"):
            (root / split / folder).mkdir(parents=True)
            for source in sorted((kermany_dir / split / folder).iterdir())[:3]:
                shutil.copy(source, root / split / folder / source.name)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\1")
    (root / "test" / "PNEUMONIA" / "Thumbs.db").write_bytes(b"\0")
    return root


@pytest.mark.filterwarnings("ignore:kermany_pneumonia")
def test_small_copy_loads_and_ignores_non_images(small_copy):
    ds = load_kermany_pneumonia(small_copy, val_fraction=0.0)
    assert {s: len(d) for s, d in ds.items()} == {"train": 6, "validation": 0, "test": 6}
    assert len(kermany_records(small_copy)) == 12


def test_missing_folder_is_named(small_copy):
    shutil.rmtree(small_copy / "test" / "PNEUMONIA")
    with pytest.raises(FileNotFoundError, match=r"test/PNEUMONIA: folder not found; expected the Kermany layout"):
        load_kermany_pneumonia(small_copy)
    with pytest.raises(FileNotFoundError, match=r"test/PNEUMONIA: folder not found"):
        kermany_records(small_copy)
    with pytest.raises(FileNotFoundError, match="nowhere: folder not found"):
        load_kermany_pneumonia(small_copy / "nowhere")


@pytest.mark.filterwarnings("ignore:kermany_pneumonia")
def test_file_in_the_wrong_folder_is_an_error_naming_it(small_copy):
    source = next((small_copy / "train" / "PNEUMONIA").glob("*virus*"))
    shutil.copy(source, small_copy / "train" / "NORMAL" / "person9999_virus_1.jpeg")
    with pytest.raises(InvalidDataError, match=r"NORMAL/person9999_virus_1\.jpeg: file name does not match the "
                                               r"NORMAL folder's pattern; expected IM-"):
        load_kermany_pneumonia(small_copy)
    with pytest.raises(InvalidDataError, match=r"person9999_virus_1\.jpeg"):
        kermany_records(small_copy)
    ds = load_kermany_pneumonia(small_copy, skip_invalid=True, val_fraction=0.0)
    assert "person9999_virus_1.jpeg" not in ds["train"]["image_id"] and len(ds["train"]) == 6


def test_corrupt_image_is_named(small_copy):
    bad = small_copy / "test" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(InvalidDataError, match=r"IM-9999-0001\.jpeg is corrupt"):
        load_kermany_pneumonia(small_copy)


def test_patient_in_train_and_test_is_an_error(small_copy):
    source = sorted((small_copy / "train" / "NORMAL").glob("IM-*.jpeg"))[0]
    patient = source.name[:7]
    shutil.copy(source, small_copy / "test" / "NORMAL" / f"{patient}-0009.jpeg")
    with pytest.raises(InvalidDataError, match=rf"1 patient\(s\) in more than one split, e.g. '{patient}' in "
                                               r"\['test', 'train'\]"):
        load_kermany_pneumonia(small_copy)


def test_bad_arguments(small_copy):
    with pytest.raises(ValueError, match="task must be one of"):
        load_kermany_pneumonia(small_copy, task="covid")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_kermany_pneumonia(small_copy, val_fraction=1.0)
    with pytest.raises(ValueError, match="Kermany has no split lists"):
        load_kermany_pneumonia(small_copy, split_dir=small_copy)


# ------------------------------------------------------------------------------------------------ scripts
def test_run_finetune_end_to_end_on_a_small_subset(kermany_dir, tmp_path):
    from modeling_refers.training import finetuning

    out = tmp_path / "ft"
    # 0.5% of the training labels (23 images, both classes); no evaluation during training; full validation + test.
    results = finetuning.main([
        "--output_dir", str(out), "--dataset_name", "kermany_bacterial_viral", "--data_dir", str(kermany_dir),
        "--config_overrides", TINY, "--label_ratio", "0.005", "--max_train_samples", "16", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "128", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--use_cpu", "--dataloader_pin_memory", "false",
        "--do_train", "--do_predict"])
    assert results["training"]["global_step"] == 2 and results["num_train_images"] == 16
    assert results["label_names"] == list(KERMANY_BACTERIAL_VIRAL_LABEL_NAMES)
    assert set(results["per_class_auc"]) == set(KERMANY_BACTERIAL_VIRAL_LABEL_NAMES)
    assert all(0.0 <= auc <= 1.0 for auc in results["per_class_auc"].values())  # all 3 classes are in test
    assert results["data"]["split_images"] == {"train": 4687, "validation": 529, "test": 624}
    assert "5,840-image subset of the 5,856-image release" in results["data"]["test_set"]
    assert json.loads((out / "results.json").read_text())["dataset"] == "kermany_bacterial_viral"
    card = (out / "README.md").read_text()
    assert "Fine-tuning data licence" in card and "cc-by-4.0" in card and "Kermany DS" in card
    assert "Multi-label" not in card  # a 3-class single-label task


def test_run_zero_shot_end_to_end(kermany_dir, shared_data_dir, tmp_path):
    from downstream_checkpoint import make_tiny_pretraining_checkpoint

    checkpoint = make_tiny_pretraining_checkpoint(tmp_path / "ckpt", shared_data_dir / "covid19_collection")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import run_zero_shot
    finally:
        sys.path.pop(0)
    results = run_zero_shot.main(["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "zs"),
                                  "--dataset_name", "kermany_pneumonia", "--data_dir", str(kermany_dir),
                                  "--max_samples", "240", "--num_examples", "2"])
    assert results["num_images"] == 240  # the test split's 234 normal images, then 6 with pneumonia
    assert results["prompts"]["pneumonia"] == {"positive": "There is pneumonia.", "negative": "There is no pneumonia."}
    # The default prompts of the two classes are each other's swapped: p(normal) = 1 - p(pneumonia), equal AUCs.
    auc = results["per_class_auc"]
    assert auc["pneumonia"] is not None and auc["normal"] == pytest.approx(auc["pneumonia"], abs=1e-6)
