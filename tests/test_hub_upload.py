"""What a push uploads (modeling_refers/hub/upload.py): an allow-list of model files, private repos by default."""

import json
import os

import pytest
from huggingface_hub import HfApi
from transformers import HfArgumentParser, TrainingArguments

from modeling_refers import RefersConfig, RefersForImageClassification, RefersImageProcessor
from modeling_refers.training.finetuning import FinetuningArguments
from modeling_refers.hub.upload import check_hub_arguments, hub_files, upload_model_folder
from modeling_refers.training.pretraining import PretrainingArguments
from modeling_refers.training.trainer import RefersTrainer

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, view_fusion_hidden_size=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved classifier with its processor, and the local-only files of a run beside them."""
    folder = tmp_path_factory.mktemp("model")
    RefersForImageClassification(RefersConfig(**TINY, num_labels=2)).save_pretrained(folder)
    RefersImageProcessor().save_pretrained(folder)
    for name in ("training_args.bin", "results.json", "run_signature.json", "predictions.csv", "label_ids.json",
                 "trainer_state.json", "roc_curve.png", "other_plot.png"):
        (folder / name).write_text(f"{name} of {folder}")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "optimizer.pt").write_text("state")
    return folder


BASE = ["config.json", "configuration_refers.py", "image_processing_refers.py", "model.safetensors",
        "modeling_refers.py", "preprocessor_config.json", "radiograph_io.py"]


def test_only_model_files_unless_per_image_files_are_asked_for(model_dir):
    assert hub_files(model_dir) == BASE
    assert hub_files(model_dir, include_predictions=True) == sorted(BASE + ["predictions.csv"])
    assert hub_files(model_dir, include_label_ids=True) == sorted(BASE + ["label_ids.json"])


def test_the_card_and_the_figures_it_shows(model_dir, tmp_path):
    card = model_dir / "README.md"
    card.write_text("# card\n\n![ROC](roc_curve.png)\n<img src='https://example.org/x.png'>\n![up](../secret.png)\n")
    (model_dir.parent / "secret.png").write_text("outside")
    try:
        assert hub_files(model_dir) == sorted(BASE + ["README.md", "roc_curve.png"])  # not other_plot.png
    finally:
        card.unlink()


def test_code_named_in_auto_map_and_the_report_tokenizer(tmp_path):
    folder = tmp_path / "pretrain"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModel": "other-org/repo--modeling_y.Y"}}))
    (folder / "configuration_x.py").write_text("from .helpers_x import A\n")
    (folder / "helpers_x.py").write_text("A = 1\n")
    (folder / "modeling_y.py").write_text("# lives in other-org/repo: not ours to upload\n")
    (folder / "unrelated.py").write_text("")
    (folder / "report_tokenizer").mkdir()
    for name in ("tokenizer_config.json", "vocab.txt", "notes.txt"):
        (folder / "report_tokenizer" / name).write_text("{}")
    assert hub_files(folder) == ["config.json", "configuration_x.py", "helpers_x.py",
                                 "report_tokenizer/tokenizer_config.json", "report_tokenizer/vocab.txt"]
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: not a JSON object"):
        hub_files(folder)


def test_a_folder_without_config_is_not_pushed(tmp_path, local_hub):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no config.json: nothing to push"):
        upload_model_folder(tmp_path, "org/nothing")
    assert ("model", "org/nothing") not in local_hub.repos


def test_a_push_removes_local_only_files_an_earlier_push_left(model_dir, local_hub):
    api = HfApi()
    api.create_repo("org/old", private=True)
    api.upload_folder(folder_path=str(model_dir), repo_id="org/old")  # what the old code pushed: everything
    assert "training_args.bin" in local_hub.list_files("org/old")
    upload_model_folder(model_dir, "org/old")
    assert set(local_hub.list_files("org/old")) == {".gitattributes", *BASE, "other_plot.png", "roc_curve.png"}
    upload_model_folder(model_dir, "org/old", include_predictions=True)
    assert "predictions.csv" in local_hub.list_files("org/old")


@pytest.mark.parametrize("arguments", [FinetuningArguments, PretrainingArguments])
def test_repos_are_private_unless_hub_private_repo_false(arguments, tmp_path):
    parser = HfArgumentParser(arguments)
    assert parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])[0].hub_private_repo is True
    public = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--hub_private_repo", "false"])[0]
    assert public.hub_private_repo is False


@pytest.mark.parametrize("private", [True, False])
def test_the_trainer_creates_the_repo_as_hub_private_repo_says(private, tmp_path, local_hub):
    args = FinetuningArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id=f"org/vis-{private}",
                               hub_private_repo=private, use_cpu=True, eval_strategy="no", save_strategy="no",
                               load_best_model_at_end=False)
    RefersTrainer(model=RefersForImageClassification(RefersConfig(**TINY, num_labels=2)), args=args)
    assert local_hub.repos[("model", f"org/vis-{private}")].private is private


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategies_that_upload_whole_checkpoints_are_refused(strategy, tmp_path, local_hub):
    argv = ["--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_strategy", strategy]
    for arguments in (FinetuningArguments, PretrainingArguments):
        with pytest.raises(ValueError, match=f"--hub_strategy '{strategy}' uploads whole training checkpoints"):
            HfArgumentParser(arguments).parse_args_into_dataclasses(argv)
    # The Trainer given plain TrainingArguments refuses before it creates the repo.
    args = TrainingArguments(output_dir=str(tmp_path / "out"), push_to_hub=True, hub_strategy=strategy,
                             hub_model_id="org/ckpt", use_cpu=True)
    with pytest.raises(ValueError, match="Use --hub_strategy every_save or end"):
        RefersTrainer(model=RefersForImageClassification(RefersConfig(**TINY, num_labels=2)), args=args)
    assert ("model", "org/ckpt") not in local_hub.repos and not os.path.exists(tmp_path / "out")
    check_hub_arguments(TrainingArguments(output_dir=str(tmp_path), hub_strategy=strategy))  # no push: no error
