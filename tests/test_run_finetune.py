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
from modeling_refers.metrics import multilabel_auc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import push_refers_to_hub  # noqa: E402
from modeling_refers.training import finetuning as run_finetune  # noqa: E402
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

    # The label ids written reproduce the training subset; results.json names them relative to the output folder.
    assert stored["label_ids_path"] == "label_ids.json" and stored["best_checkpoint"].startswith("checkpoint-")
    assert str(tmp_path) not in (out / "results.json").read_text()
    ids = json.loads((out / stored["label_ids_path"]).read_text())
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
    arch = "ViT 32px/8, width 32, 2 layers, 4 heads, MLP 64, recurrent_concat, 3 views"  # the tiny checkpoint's
    n_train = json.loads((out / "random" / "ratio-1" / "seed-0" / "results.json").read_text())["num_train_images"]
    assert f"| refers | {arch} | 1 | {n_train} | 64 | 2 |" in markdown
    assert f"| random | {arch} | 1 | {n_train} | 64 | 2 |" in markdown
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
    with pytest.raises(ValueError, match="unknown --dataset_name 'padchest'; valid: chexpert, covid19"):
        run_finetune.main(base + ["--dataset_name", "padchest"])
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


# What a fine-tuned model repo holds: model files only (modeling_refers.hub.upload), never training_args.bin (the
# token), results.json / run_signature.json (local paths) or per-image files.
FINETUNED_REPO_FILES = {".gitattributes", "README.md", "config.json", "configuration_refers.py",
                        "image_processing_refers.py", "model.safetensors", "modeling_refers.py",
                        "preprocessor_config.json", "radiograph_io.py"}  # the image processor's decoding module


def _every_file_ever_pushed(local_hub, repo_id: str) -> dict:
    """path -> bytes, over every commit of the repo (the pushes at each save during training included)."""
    repo = local_hub.repos[("model", repo_id)]
    files = {}
    for commit in repo.commits.values():
        for path, entry in commit.files.items():
            files[(commit.oid, path)] = (entry.content if entry.lfs_sha256 is None
                                         else local_hub.lfs_objects[entry.lfs_sha256])
    return files


def test_push_to_hub_through_the_trainer_and_the_script(tmp_path, nih_dir, tiny_refers_checkpoint, local_hub):
    out = tmp_path / "ft"
    results = run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path",
                                 tiny_refers_checkpoint, "--do_train", "--do_predict", "--push_to_hub",
                                 "--hub_model_id", "org/refers-vit-nih", "--hub_token", local_hub.token, *FAST])
    # The output folder holds what must stay local: the token in training_args.bin, per-image files.
    local = {path.name for path in out.iterdir()}
    assert {"training_args.bin", "results.json", "run_signature.json", "label_ids.json", "predictions.csv"} <= local
    assert local_hub.token.encode() in (out / "training_args.bin").read_bytes()

    # Exactly the model files arrived, at the end and in every push during training; the repo is private.
    repo = local_hub.repos[("model", "org/refers-vit-nih")]
    assert repo.private is True
    assert set(local_hub.list_files("org/refers-vit-nih")) == FINETUNED_REPO_FILES
    assert any(commit.title.startswith("Training in progress") for commit in repo.commits.values())
    pushed = _every_file_ever_pushed(local_hub, "org/refers-vit-nih")
    assert {path for _, path in pushed} == FINETUNED_REPO_FILES
    # No pushed file holds the output folder's absolute path or the token.
    for (oid, path), data in pushed.items():
        for secret in (str(out.resolve()), str(out), str(tmp_path), local_hub.token):
            assert secret.encode() not in data, f"{path} (commit {oid[:8]}) contains {secret!r}"
    pulled = AutoModelForImageClassification.from_pretrained("org/refers-vit-nih").eval()
    local = RefersForImageClassification.from_pretrained(out).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    assert torch.equal(pulled(x).logits, local(x).logits)
    card = local_hub.file_bytes("org/refers-vit-nih", "README.md").decode()
    assert f"{results['mean_auc']}"[:6] in card

    # The fine-tuned folder through push_refers_to_hub.py: the same model files, private; per-image files only when
    # asked for by name.
    push_refers_to_hub.main(["--model_dir", str(out), "--repo_id", "org/refers-nih-script"])
    assert set(local_hub.list_files("org/refers-nih-script")) == FINETUNED_REPO_FILES
    assert local_hub.repos[("model", "org/refers-nih-script")].private is True
    push_refers_to_hub.main(["--model_dir", str(out), "--repo_id", "org/refers-nih-script", "--include_predictions"])
    assert set(local_hub.list_files("org/refers-nih-script")) == FINETUNED_REPO_FILES | {"predictions.csv"}
    for (oid, path), data in _every_file_ever_pushed(local_hub, "org/refers-nih-script").items():
        assert str(tmp_path).encode() not in data and local_hub.token.encode() not in data, path

    # A pretrained folder through push_refers_to_hub.py, public on request: weights, config, modeling code, card.
    push_refers_to_hub.main(["--model_dir", tiny_refers_checkpoint, "--repo_id", "org/refers-vit",
                             "--hub_private_repo", "false"])
    files = set(local_hub.list_files("org/refers-vit"))
    assert files == {".gitattributes", "config.json", "configuration_refers.py", "model.safetensors",
                     "modeling_refers.py", "README.md"}
    assert local_hub.repos[("model", "org/refers-vit")].private is False
    backbone = AutoModel.from_pretrained("org/refers-vit")
    assert type(backbone) is RefersModel
    pretrained = RefersForPreTraining.from_pretrained(tiny_refers_checkpoint)
    for key, value in pretrained.refers.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    classifier = AutoModelForImageClassification.from_pretrained("org/refers-vit", num_labels=3)
    assert torch.equal(classifier.refers.embeddings.position_embeddings, backbone.embeddings.position_embeddings)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_refers_to_hub.main(["--model_dir", str(tmp_path / "empty"), "--repo_id", "org/nothing"])


def test_checkpoint_and_final_weights_follow_the_umask(tmp_path, nih_dir):
    """safetensors 0.8 writes weights through a 0600 temporary file (safetensors issue #782): every weights file the
    Trainer saves (checkpoints and the final model) gets the mode open() gives, 0666 less the umask, as the rest."""
    import os
    import stat

    out = tmp_path / "ft"
    previous = os.umask(0o027)
    try:
        run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--config_overrides", TINY, "--do_train",
                           *FAST])
    finally:
        os.umask(previous)
    modes = {path.relative_to(out).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in out.rglob("*")
             if path.is_file()}
    assert {"model.safetensors", "checkpoint-1/model.safetensors", "checkpoint-2/model.safetensors"} <= set(modes)
    assert modes == {path: 0o640 for path in modes}


def test_metric_agrees_with_sklearn_on_logits_and_probabilities():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) > 0.6).astype(int)
    logits = rng.standard_normal((40, 3))
    scores = run_finetune.scores_from_logits(logits, "multi_label_classification")
    from sklearn.metrics import roc_auc_score
    assert math.isclose(multilabel_auc(labels, scores)["mean_auc"], roc_auc_score(labels, logits, average="macro"))


# ---------------------------------------------------------------------------------------------- trust: best checkpoint
def _eval_log(checkpoint_dir: Path) -> list[dict]:
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "eval_mean_auc" in entry]


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_the_checkpoint_with_the_highest_validation_auc_is_kept_and_tested(tmp_path, nih_dir):
    """5 steps, evaluated and saved at each. With this seed the eval loss falls every step (lowest = last = step 5)
    while the validation mean AUC peaks earlier, so keeping the last or the lowest-loss checkpoint, or ranking AUC
    the wrong way, or not restoring the best one, all give other numbers than those asserted here."""
    from safetensors.torch import load_file

    def run(seed):
        out = tmp_path / f"best-{seed}"
        results = run_finetune.main([
            "--output_dir", str(out), "--data_dir", nih_dir, "--config_overrides", TINY, "--max_steps", "5",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--max_eval_samples", "64",
            "--max_predict_samples", "32", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy",
            "steps", "--save_steps", "1", "--use_cpu", "--dataloader_pin_memory", "false", "--seed", str(seed),
            "--learning_rate", "0.1", "--warmup_steps", "0", "--do_train", "--do_predict"])
        return out, results, _eval_log(_checkpoints(out)[-1])

    # A run that discriminates: the best-AUC step is neither the last, nor the lowest-loss, nor the worst-AUC one
    # (seed 3 on ../shared/data, 2 on sample_data/; the next seeds in case a library changes the numbers).
    for seed in (3, 2, 0, 4, 1):
        out, results, log = run(seed)
        assert [e["step"] for e in log] == [1, 2, 3, 4, 5]
        best = max(log, key=lambda e: e["eval_mean_auc"])
        lowest_loss = min(log, key=lambda e: e["eval_loss"])
        worst = min(log, key=lambda e: e["eval_mean_auc"])
        if best["step"] not in (5, lowest_loss["step"], worst["step"]):
            break
    else:
        pytest.fail(f"no seed gave a run whose best-AUC step is not the last / lowest-loss one: {log}")

    assert results["best_checkpoint"] and Path(results["best_checkpoint"]).name == f"checkpoint-{best['step']}"
    assert results["training"]["best_step"] == best["step"] and results["training"]["global_step"] == 5
    # The validation AUC reported is the re-evaluated restored model's, and equals the best logged one.
    assert math.isclose(results["validation_mean_auc"], best["eval_mean_auc"], rel_tol=1e-9)
    assert math.isclose(results["validation_mean_auc"], max(e["eval_mean_auc"] for e in log), rel_tol=1e-9)

    # The saved model is the best checkpoint's weights, not the last one's.
    saved = load_file(out / "model.safetensors")
    kept = load_file(out / f"checkpoint-{best['step']}" / "model.safetensors")
    last = load_file(out / "checkpoint-5" / "model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)

    # The test predictions are the best checkpoint's: recompute them from that folder.
    from modeling_refers import RefersImageProcessor

    model = RefersForImageClassification.from_pretrained(out / f"checkpoint-{best['step']}").eval()
    processor = RefersImageProcessor.from_pretrained(out)
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    images_dir = Path(nih_dir) / "images"
    images = []
    for row in rows:
        with Image.open(images_dir / row["image_id"]) as image:
            images.append(image.copy())
    with torch.no_grad():
        expected = model(**processor(images, return_tensors="pt")).logits.sigmoid().numpy()
    written = np.array([[float(r[f"score_{n}"]) for n in results["label_names"]] for r in rows])
    np.testing.assert_allclose(written, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- trust: defaults
def test_gradient_clipping_is_set_explicitly_to_the_official_codes_10(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser((run_finetune.ModelArguments, run_finetune.DataArguments,
                               run_finetune.FinetuningArguments))
    *_, training_args = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path / "o")])
    assert training_args.max_grad_norm == 10.0  # the Trainer's own default is 1.0
    field = run_finetune.FinetuningArguments.__dataclass_fields__["max_grad_norm"]
    assert "official REFERS code" in field.metadata["help"] and "paper does not say" in field.metadata["help"]
    *_, training_args = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path / "o"),
                                                                 "--max_grad_norm", "1"])
    assert training_args.max_grad_norm == 1.0


# ---------------------------------------------------------------------------------------------- trust: inputs first
def _listing(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.exists() else None


def test_a_missing_model_folder_is_named_and_nothing_is_written(tmp_path, nih_dir):
    out = tmp_path / "out"
    missing = tmp_path / "no" / "such" / "pretrain"
    with pytest.raises(FileNotFoundError, match=rf"--model_name_or_path '{missing}': no such folder"):
        run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path", str(missing),
                           "--do_train", *FAST])
    assert not out.exists()
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"--model_name_or_path '{empty}' is a folder without config.json"):
        run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path", str(empty),
                           "--do_train", *FAST])
    assert not out.exists()


def test_bad_calls_leave_no_file_behind(tmp_path, nih_dir):
    out = tmp_path / "out"
    base = ["--output_dir", str(out), "--config_overrides", TINY, "--do_train", *FAST]
    bad_calls = [
        (["--data_dir", nih_dir, "--label_ratio", "0"], ValueError, r"--label_ratio must be in \(0, 1\]"),
        (["--data_dir", nih_dir, "--dataset_name", "padchest"], ValueError, "unknown --dataset_name"),
        (["--data_dir", str(tmp_path / "nowhere")], FileNotFoundError, "--data_dir .*nowhere.*: no such folder"),
        (["--data_dir", str(tmp_path)], FileNotFoundError, "Data_Entry_2017.csv"),
        (["--data_dir", nih_dir, "--timm_weights", str(tmp_path / "vit.pth")], FileNotFoundError,
         "--timm_weights .*vit.pth.*: no such file"),
        (["--data_dir", nih_dir, "--label_ids_path", str(tmp_path / "ids.json")], FileNotFoundError, "ids.json"),
    ]
    for extra, error, match in bad_calls:
        with pytest.raises(error, match=match):
            run_finetune.main(base + extra)
        assert not out.exists(), extra
    # An existing folder is left exactly as it was.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra, error, match in bad_calls:
        with pytest.raises(error, match=match):
            run_finetune.main(base + extra)
        assert _listing(out) == {"notes.txt": b"mine"}, extra


# ---------------------------------------------------------------------------------------------- trust: resume
def test_resume_only_the_same_run_and_start_fresh(tmp_path, nih_dir, tiny_refers_checkpoint, monkeypatch):
    resumed_from = []
    original_train = run_finetune.RefersTrainer.train

    def spy(self, *args, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(run_finetune.RefersTrainer, "train", spy)
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path", tiny_refers_checkpoint,
            "--label_ratio", "0.5", "--seed", "1", "--do_train", *FAST]
    first_results = run_finetune.main(argv)
    assert resumed_from == [None]
    signature = json.loads((out / "run_signature.json").read_text())
    assert signature["label_ratio"] == 0.5 and signature["seed"] == 1
    assert signature["data_dir"] == str(Path(nih_dir).absolute()) and signature["max_grad_norm"] == 10.0
    before = _listing(out)

    # Another ratio, seed, data set folder or starting point: refused, naming the field, and nothing changes.
    other_model = tmp_path / "other-pretrained"
    RefersForPreTraining.from_pretrained(tiny_refers_checkpoint).save_pretrained(other_model)
    sample_nih = str(Path(__file__).resolve().parents[1] / "sample_data" / "nih_chestxray14_sample")
    changes = [(["--label_ratio", "1.0"], r"label_ratio: saved 0\.5, now 1\.0"),
               (["--seed", "2"], r"seed: saved 1, now 2"),
               (["--learning_rate", "0.01"], r"learning_rate: saved 0\.003, now 0\.01"),
               (["--model_name_or_path", str(other_model)], r"model_name_or_path: saved"),
               (["--config_overrides", TINY, "--model_name_or_path", ""], r"init: saved 'refers', now 'random'")]
    if Path(sample_nih).resolve() != Path(nih_dir).resolve():
        changes.append((["--data_dir", sample_nih], r"data_dir: saved"))
    for change, match in changes:
        with pytest.raises(ValueError, match=match):
            run_finetune.main(argv + change)
        assert _listing(out) == before, change
    assert resumed_from == [None]

    # The same settings after an interruption (last checkpoint lost): resumes the checkpoint that is left.
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    again = run_finetune.main(argv)
    assert resumed_from == [None, str(out / "checkpoint-1")]
    assert again["training"]["global_step"] == 2 and again["num_train_images"] == first_results["num_train_images"]

    # --start_fresh: the old checkpoints go, the new run starts from step 0 with its own settings.
    fresh = run_finetune.main(argv + ["--label_ratio", "1.0", "--start_fresh"])
    assert resumed_from[-1] is None and fresh["label_ratio"] == 1.0
    assert json.loads((out / "run_signature.json").read_text())["label_ratio"] == 1.0
    ids = json.loads((out / "label_ids.json").read_text())
    assert len(ids["ids"]) == fresh["num_train_images"] > first_results["num_train_images"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_mean_auc" in e] == [1, 2]

    # A folder with checkpoints but no signature (written by an older version) is not resumed blindly.
    (out / "run_signature.json").unlink()
    with pytest.raises(ValueError, match="no run_signature.json"):
        run_finetune.main(argv + ["--label_ratio", "1.0"])


# ---------------------------------------------------------------------------------------------- trust: model card
def test_the_model_card_of_a_real_run_tells_the_truth(tmp_path, nih_dir, tiny_refers_checkpoint):
    from datasets_scripts import load_target_dataset

    out = tmp_path / "card-run"
    fast = [a for a in FAST]
    i = fast.index("--max_predict_samples")
    del fast[i:i + 2]  # the whole test split
    results = run_finetune.main(["--output_dir", str(out), "--data_dir", nih_dir, "--model_name_or_path",
                                 tiny_refers_checkpoint, "--max_steps", "3", "--do_train", *fast[2:]])
    text = (out / "README.md").read_text()

    # The evaluation set, derived independently from the data folder used.
    test_split = load_target_dataset("nih_chestxray14", nih_dir)["test"]
    sizes = set()
    for image_id in test_split["image_id"]:
        with Image.open(Path(nih_dir) / "images" / image_id) as image:
            sizes.add(image.size)
    (width, height), = sizes
    total = sum(len(load_target_dataset("nih_chestxray14", nih_dir)[s]) for s in ("train", "validation", "test"))
    evaluated = (f"NIH ChestX-ray14, folder `{Path(nih_dir).name}` (a {total:,}-image subset of the 112,120-image "
                 f"release), {width}x{height} px: test split of {len(test_split)} images")
    assert f"- evaluated on: {evaluated}" in text
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == evaluated.replace("`", "")

    # The real number of steps and epochs, and the kept checkpoint.
    n_train = results["num_train_images"]
    epochs = round(3 / math.ceil(n_train / 8), 4)  # the Trainer's epochs: steps over batches per epoch
    assert f"trained for 3 optimiser steps ({epochs:g} epochs) at batch 8" in text
    assert f"the kept checkpoint is the one of step {results['training']['best_step']}" in text
    assert f"({n_train} labelled training images)" in text

    # The starting checkpoint by name; no local absolute path anywhere.
    name = Path(tiny_refers_checkpoint).name
    assert f"initialisation: `refers` checkpoint `{name}`" in text
    for local in (str(tmp_path), tiny_refers_checkpoint, nih_dir, str(Path(nih_dir).parent), "/tmp/", "/home/"):
        assert local not in text, local
    import re

    assert not re.search(r"(^|[\s`'\"(\[|:])/[\w.-]+/", text.replace("https://", "")), "absolute path in the card"
    assert "base_model" not in metadata  # a local folder is not a Hub id


def test_prepared_data_is_what_the_run_reads(tmp_path, nih_dir):
    """--prepared_data_dir for a target data set: the same splits and labels as the originals, recorded in the
    run signature."""
    from datasets_scripts import load_nih_chestxray14
    from datasets_scripts.prepared_images import prepare_images

    original = load_nih_chestxray14(nih_dir)
    prepared_dir = tmp_path / "prepared"
    prepare_images(original, prepared_dir, short_side=48, source={"dataset_name": "nih_chestxray14",
                                                                   "data_dir": str(nih_dir)})
    out = tmp_path / "run"
    results = run_finetune.main(["--output_dir", str(out), "--prepared_data_dir", str(prepared_dir),
                                 "--config_overrides", TINY, "--do_train", *FAST])
    assert results["num_train_images"] == len(original["train"])
    signature = json.loads((out / "run_signature.json").read_text())
    assert signature["prepared_data_dir"] == str(prepared_dir) and signature["prepared_short_side"] == 48
    assert signature["data_dir"] == str(Path(nih_dir).absolute())
    ids = json.loads((out / "label_ids.json").read_text())["ids"]
    assert sorted(ids) == sorted(original["train"]["image_id"])


def test_optimizer_and_augment_flags_reach_the_trainer(tmp_path, nih_dir, monkeypatch):
    """--optimizer adamw trains with AdamW (weight decay groups kept), --augment false collates training batches with
    the evaluation transform; the defaults stay the paper's (SGD, augmentations)."""
    from modeling_refers.training import trainer as trainer_module

    seen = {"train_flags": [], "optimizers": []}

    class SpyCollator(trainer_module.ImageLabelCollator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["train_flags"].append(self.train)

    original = trainer_module.RefersTrainer.create_optimizer

    def spy_create_optimizer(self, model=None):
        optimizer = original(self, model)
        seen["optimizers"].append(optimizer)
        return optimizer

    monkeypatch.setattr(run_finetune, "ImageLabelCollator", SpyCollator)
    monkeypatch.setattr(trainer_module.RefersTrainer, "create_optimizer", spy_create_optimizer)
    for flags, optimizer_class, train_flag in ((["--optimizer", "adamw", "--augment", "false"], torch.optim.AdamW, False),
                                               ([], torch.optim.SGD, True)):
        seen["train_flags"].clear(), seen["optimizers"].clear()
        run_finetune.main(["--output_dir", str(tmp_path / f"run-{train_flag}"), "--data_dir", nih_dir,
                           "--config_overrides", TINY, "--do_train", "--weight_decay", "0.01", *flags, *FAST])
        assert seen["train_flags"] == [train_flag, False]  # training collator, then the evaluation one
        optimizer = seen["optimizers"][0]
        assert type(optimizer) is optimizer_class
        assert {group["weight_decay"] for group in optimizer.param_groups} == {0.01, 0.0}
    with pytest.raises(ValueError, match="--optimizer"):
        run_finetune.main(["--output_dir", str(tmp_path / "bad"), "--data_dir", nih_dir, "--optimizer", "lamb",
                           *FAST])
