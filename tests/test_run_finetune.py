"""Fine-tuning, the label-efficiency grid, model cards from results, and the Hub round trip on real sample data."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import stats
from transformers import AutoModel, AutoModelForImageClassification

from modeling_refers import RefersConfig, RefersForImageClassification, RefersForPreTraining, RefersModel
from modeling_refers.evaluation import multilabel_auc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import push_refers_to_hub  # noqa: E402
import run_finetune  # noqa: E402
import run_label_efficiency  # noqa: E402

TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "view_fusion_hidden_size=16")
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--max_eval_samples", "64", "--max_predict_samples", "64", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--use_cpu", "--dataloader_pin_memory", "false"]


@pytest.fixture(scope="module")
def nih_dir(shared_data_dir):
    return str(shared_data_dir / "nih_chestxray14_sample")


@pytest.fixture(scope="module")
def tiny_refers_checkpoint(tmp_path_factory):
    """A tiny REFERS pretraining checkpoint (text encoder and decoder included) to start from."""
    path = tmp_path_factory.mktemp("pretrained")
    config = RefersConfig.from_dict(dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        view_fusion_hidden_size=16, decoder_hidden_size=32, decoder_num_attention_heads=4, decoder_intermediate_size=64,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100), bos_token_id=2, eos_token_id=3))
    RefersForPreTraining(config).save_pretrained(path)
    return str(path)


def test_finetune_from_a_refers_checkpoint_writes_results_predictions_and_card(
        tmp_path, nih_dir, tiny_refers_checkpoint):
    out = tmp_path / "ft"
    results = run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path",
                                 tiny_refers_checkpoint, "--label_ratio", "0.5", "--seed", "3", "--do_train",
                                 "--do_predict", *FAST])
    stored = json.loads((out / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert stored["init"] == "refers" and stored["seed"] == 3 and stored["label_ratio"] == 0.5
    assert len(stored["per_class_auc"]) == 14 and stored["best_checkpoint"]

    # The test AUCs equal scikit-learn on the written predictions (independent recomputation).
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = stored["label_names"]
    scores = np.array([[float(r[f"score_{n}"]) for n in names] for r in rows])
    labels = np.array([[int(r[f"label_{n}"]) for n in names] for r in rows])
    from sklearn.metrics import roc_auc_score
    for i, name in enumerate(names):
        if labels[:, i].min() != labels[:, i].max():
            assert math.isclose(stored["per_class_auc"][name], roc_auc_score(labels[:, i], scores[:, i]), rel_tol=1e-6)
        else:
            assert stored["per_class_auc"][name] is None and name in stored["undefined_classes"]
    assert math.isclose(stored["mean_auc"], np.mean([v for v in stored["per_class_auc"].values() if v is not None]))

    # The label ids written reproduce the training subset.
    ids = json.loads(Path(stored["label_ids_path"]).read_text())
    assert len(ids["ids"]) == stored["num_train_images"]
    with Image.open(out / "roc_curve.png") as image:
        assert image.format == "PNG"

    # Model card: YAML front matter with the measured AUCs in the model index.
    text = (out / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    mean = [m for m in metrics if m["name"] == "Mean AUC"][0]
    assert mean["type"] == "roc_auc" and math.isclose(mean["value"], stored["mean_auc"])

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.problem_type == "multi_label_classification" and model.config.num_labels == 14
    assert model.config.id2label[0] == "Atelectasis"


def test_label_efficiency_grid_table_csv_plot_and_resume(tmp_path, nih_dir, tiny_refers_checkpoint, monkeypatch):
    out = tmp_path / "grid"
    argv = ["--output_dir", str(out), "--data_dir", nih_dir, "--ratios", "1.0", "--seeds", "0", "1",
            "--inits", f"refers={tiny_refers_checkpoint}", "random", "--", "--config_overrides", TINY, *FAST]
    rows = run_label_efficiency.main(argv)
    assert {(r["init"], r["label_ratio"], r["runs"]) for r in rows} == {("refers", 1.0, 2), ("random", 1.0, 2)}

    cells = {init: [json.loads((out / init / "ratio-1" / f"seed-{s}" / "results.json").read_text())["mean_auc"]
                    for s in (0, 1)] for init in ("refers", "random")}
    for row in rows:
        mine, other = cells[row["init"]], cells["random" if row["init"] == "refers" else "refers"]
        assert math.isclose(row["mean_auc"], np.mean(mine))
        assert math.isclose(row["std_auc"], np.std(mine, ddof=1), abs_tol=1e-12)
        assert row["compared_with"] != row["init"]
        assert math.isclose(row["p_value"], stats.ttest_ind(mine, other).pvalue, rel_tol=1e-9) or (
            math.isnan(row["p_value"]) and math.isnan(stats.ttest_ind(mine, other).pvalue))

    with open(out / "label_efficiency.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and set(table[0]) == set(run_label_efficiency.COLUMNS)
    markdown = (out / "label_efficiency.md").read_text()
    assert "| refers | 1 | 2 |" in markdown and "| random | 1 | 2 |" in markdown
    with Image.open(out / "label_efficiency.png") as image:
        assert image.format == "PNG" and image.size[0] > 100

    # Run again: every cell is reused, none fine-tuned.
    calls = []
    monkeypatch.setattr(run_finetune, "main", lambda argv: calls.append(argv))
    again = run_label_efficiency.main(argv)
    assert calls == [] and again == rows


def test_timm_and_random_initialisation(tmp_path, nih_dir):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=0)
    weights = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), weights)
    results = run_finetune.main(["--output_dir", str(tmp_path / "timm"), "--data_dir", nih_dir, "--timm_weights",
                                 str(weights), "--config_overrides", TINY + ",aggregation=none", "--do_train", *FAST])
    assert results["init"] == "timm" and results["config"]["aggregation"] == "none"
    results = run_finetune.main(["--output_dir", str(tmp_path / "random"), "--data_dir", nih_dir,
                                 "--config_overrides", TINY, "--do_train", *FAST])
    assert results["init"] == "random"


def test_single_label_task_on_the_covid_collection(tmp_path, shared_data_dir):
    results = run_finetune.main(["--output_dir", str(tmp_path / "covid"), "--dataset_name", "covid19",
                                 "--data_dir", str(shared_data_dir / "covid19_collection"), "--config_overrides", TINY,
                                 "--do_train", "--do_predict", *FAST])
    assert results["dataset"] == "covid19" and len(results["per_class_auc"]) == 2
    model = RefersForImageClassification.from_pretrained(tmp_path / "covid")
    assert model.config.problem_type == "single_label_classification"
    # Binary task with softmax scores: both one-vs-rest AUCs are the same number.
    auc = list(results["per_class_auc"].values())
    assert math.isclose(auc[0], auc[1], rel_tol=1e-9)


def test_bad_inputs(tmp_path, nih_dir, tiny_refers_checkpoint):
    base = ["--output_dir", str(tmp_path / "x"), "--data_dir", nih_dir, "--config_overrides", TINY, *FAST]
    with pytest.raises(ValueError, match="unknown --dataset_name 'chexpert'; valid: covid19"):
        run_finetune.main(base + ["--dataset_name", "chexpert"])
    for ratio in ("0", "1.5", "-0.1"):
        with pytest.raises(ValueError, match=r"--label_ratio must be in \(0, 1\]"):
            run_finetune.main(base + ["--label_ratio", ratio])
    with pytest.warns(UserWarning, match="no positive example of class"):
        run_finetune.main(base + ["--label_ratio", "0.005", "--do_train"])

    # A checkpoint of another architecture (a transformers ViT classifier) names the weights it lacks.
    from transformers import ViTConfig, ViTForImageClassification

    wrong = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64)).save_pretrained(wrong)
    with pytest.raises(ValueError, match=r"does not fit RefersForImageClassification.*refers\.embeddings"):
        run_finetune.main(["--output_dir", str(tmp_path / "y"), "--data_dir", nih_dir, "--model_name_or_path",
                           str(wrong), *FAST])


def test_push_to_hub_through_the_trainer_and_the_script(tmp_path, nih_dir, tiny_refers_checkpoint, local_hub):
    out = tmp_path / "ft"
    results = run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path",
                                 tiny_refers_checkpoint, "--do_train", "--push_to_hub", "--hub_model_id",
                                 "org/refers-vit-nih", *FAST])
    assert "config.json" in local_hub.list_files("org/refers-vit-nih")
    pulled = AutoModelForImageClassification.from_pretrained("org/refers-vit-nih").eval()
    local = RefersForImageClassification.from_pretrained(out).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    assert torch.equal(pulled(x).logits, local(x).logits)
    card = local_hub.file_bytes("org/refers-vit-nih", "README.md").decode()
    assert f"{results['mean_auc']}"[:6] in card

    # A pretrained folder through push_refers_to_hub.py: weights, config, modeling code, model card.
    push_refers_to_hub.main(["--model_dir", tiny_refers_checkpoint, "--repo_id", "org/refers-vit"])
    files = set(local_hub.list_files("org/refers-vit"))
    assert {"config.json", "model.safetensors", "modeling_refers.py", "README.md"} <= files
    backbone = AutoModel.from_pretrained("org/refers-vit")
    assert type(backbone) is RefersModel
    pretrained = RefersForPreTraining.from_pretrained(tiny_refers_checkpoint)
    for key, value in pretrained.refers.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    classifier = AutoModelForImageClassification.from_pretrained("org/refers-vit", num_labels=3)
    assert torch.equal(classifier.refers.embeddings.position_embeddings, backbone.embeddings.position_embeddings)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_refers_to_hub.main(["--model_dir", str(tmp_path / "empty"), "--repo_id", "org/nothing"])


def test_metric_agrees_with_sklearn_on_logits_and_probabilities():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) > 0.6).astype(int)
    logits = rng.standard_normal((40, 3))
    scores = run_finetune.scores_from_logits(logits, "multi_label_classification")
    from sklearn.metrics import roc_auc_score
    assert math.isclose(multilabel_auc(labels, scores)["mean_auc"], roc_auc_score(labels, logits, average="macro"))
