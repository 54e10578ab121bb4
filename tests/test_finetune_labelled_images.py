"""Fine-tuning and the label-efficiency grid on your own labelled images (--dataset_name labelled_images): label
names and problem type come from the data, the loader options pass through the command line."""

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from test_run_finetune import FAST, TINY

from datasets_scripts import load_labelled_images
from modeling_refers import RefersForImageClassification
from modeling_refers.training import finetuning as run_finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import run_label_efficiency  # noqa: E402

N_IMAGES = 40


@pytest.fixture(scope="module")
def own_dir(shared_data_dir, tmp_path_factory):
    """Real NIH PNGs in a subfolder and labels.csv (file_name, patient, two 0/1 columns and a finding column), rows
    from Data_Entry_2017.csv."""
    root = shared_data_dir / "nih_chestxray14_sample"
    with open(root / "Data_Entry_2017.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if (root / "images" / r["Image Index"]).is_file()][:N_IMAGES]
    folder = tmp_path_factory.mktemp("own")
    (folder / "xr").mkdir()
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "patient", "Infiltration", "Effusion", "finding"])
        for r in rows:
            shutil.copy(root / "images" / r["Image Index"], folder / "xr" / r["Image Index"])
            findings = r["Finding Labels"].split("|")
            writer.writerow([f"xr/{r['Image Index']}", r["Patient ID"], int("Infiltration" in findings),
                             int("Effusion" in findings), "normal" if findings == ["No Finding"] else "abnormal"])
    return folder


def test_finetune_multi_label_on_own_data(tmp_path, own_dir):
    out = tmp_path / "ft"
    results = run_finetune.main([
        "--output_dir", str(out), "--dataset_name", "labelled_images", "--data_dir", str(own_dir),
        "--labels_csv", "labels.csv", "--label_columns", "Infiltration", "Effusion", "--split_fractions", "0.6", "0.2",
        "0.2", "--split_seed", "0", "--config_overrides", TINY, "--do_train", "--do_predict", *FAST])
    assert results["dataset"] == "labelled_images" and results["label_names"] == ["Infiltration", "Effusion"]
    assert set(results["per_class_auc"]) == {"Infiltration", "Effusion"} and results["training"]["global_step"] == 2
    # the split options reached the loader: the split is the builder's with them, not with its defaults
    counts = {split: len(ds) for split, ds in load_labelled_images(
        own_dir, label_columns=["Infiltration", "Effusion"], split_fractions=(0.6, 0.2, 0.2)).items()}
    default = {split: len(ds) for split, ds in load_labelled_images(
        own_dir, label_columns=["Infiltration", "Effusion"]).items()}
    assert results["data"]["split_images"] == counts != default and sum(counts.values()) == N_IMAGES
    model = RefersForImageClassification.from_pretrained(out)
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.id2label == {0: "Infiltration", 1: "Effusion"}
    with open(out / "predictions.csv") as handle:
        assert next(csv.reader(handle)) == ["image_id", "score_Infiltration", "score_Effusion", "label_Infiltration",
                                            "label_Effusion"]
    signature = json.loads((out / "run_signature.json").read_text())
    assert signature["data_options"]["label_columns"] == ["Infiltration", "Effusion"]


def test_finetune_multi_class_on_own_data(tmp_path, own_dir):
    out = tmp_path / "mc"
    results = run_finetune.main([
        "--output_dir", str(out), "--dataset_name", "labelled_images", "--data_dir", str(own_dir),
        "--label_columns", "finding", "--patient_column", "patient", "--config_overrides", TINY, "--do_train", *FAST])
    assert results["label_names"] == ["abnormal", "normal"]
    model = RefersForImageClassification.from_pretrained(out)
    assert model.config.problem_type == "single_label_classification" and model.config.num_labels == 2


def test_own_data_options_are_refused_for_a_registry_data_set(tmp_path, own_dir):
    with pytest.raises(ValueError, match=r"--labels_csv, --label_columns only apply to --dataset_name labelled_images"):
        run_finetune.main(["--output_dir", str(tmp_path / "x"), "--dataset_name", "nih_chestxray14", "--labels_csv",
                           "labels.csv", "--label_columns", "A", "--do_train", "--use_cpu"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"--data_dir is required for labelled_images"):
        run_finetune.main(["--output_dir", str(tmp_path / "y"), "--dataset_name", "labelled_images", "--use_cpu"])


def test_label_efficiency_grid_on_own_data(tmp_path, own_dir):
    rows = run_label_efficiency.main([
        "--output_dir", str(tmp_path / "grid"), "--dataset_name", "labelled_images", "--data_dir", str(own_dir),
        "--ratios", "1.0", "--seeds", "0", "--inits", "random", "--",
        "--label_columns", "Infiltration", "Effusion", "--config_overrides", TINY, *FAST])
    assert len(rows) == 1 and rows[0]["init"] == "random" and rows[0]["label_ratio"] == 1.0
    cell = json.loads((tmp_path / "grid" / "random" / "ratio-1" / "seed-0" / "results.json").read_text())
    assert cell["label_names"] == ["Infiltration", "Effusion"]
    assert "labelled_images" in (tmp_path / "grid" / "label_efficiency.md").read_text()
