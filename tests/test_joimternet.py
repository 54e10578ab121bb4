"""JoImTeRNet: DAMSM region-word scores and the matching losses against hand computations, the model on real
radiographs (gradient, masking, checkpoints) and `run_pretrain.py --method joimternet`."""

import math

import pytest
import torch

from modeling_refers import JoImTeRNetForPreTraining, RefersForImageClassification
from modeling_refers.loading import from_pretrained_checked
from modeling_refers.modeling_joimternet import damsm_scores, matching_losses

VOCAB = 64


def test_damsm_scores_match_a_loop_over_words_and_regions():
    """AttnGAN's func_attention + words_loss pooling, written out word by word for every (study, report) pair."""
    torch.manual_seed(0)
    regions, words = torch.randn(2, 4, 3), torch.randn(3, 5, 3)
    region_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    word_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    got = damsm_scores(regions, region_mask, words, word_mask, gamma1=4.0, gamma2=5.0)
    expected = torch.zeros(2, 3)
    for i in range(2):
        rs = [regions[i, r] for r in range(4) if region_mask[i, r]]
        for j in range(3):
            ws = [words[j, w] for w in range(5) if word_mask[j, w]]
            # softmax over the words for each region, then gamma1-sharpened softmax over the regions for each word
            over_words = [[math.exp(float(r @ w)) for w in ws] for r in rs]
            over_words = [[e / sum(row) for e in row] for row in over_words]
            total = 0.0
            for k, w in enumerate(ws):
                weights = [math.exp(4.0 * over_words[m][k]) for m in range(len(rs))]
                context = sum(wt / sum(weights) * r for wt, r in zip(weights, rs))
                cosine = float(context @ w / (context.norm() * w.norm()))
                total += math.exp(5.0 * cosine)
            expected[i, j] = math.log(total) / 5.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_matching_losses_by_hand():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.4, 0.5, 0.7]])
    losses = matching_losses(scores, gamma3=10.0, margin=0.5)
    # hardest negatives: rows 0.6, 0.3, 0.5 -> [0.5 - 0.9 + 0.6]+ = 0.2, 0.0, 0.3; columns 0.4, 0.5, 0.6 -> 0, .2, .4
    assert losses["triplet_study_to_report"].item() == pytest.approx((0.2 + 0.0 + 0.3) / 3, abs=1e-6)
    assert losses["triplet_report_to_study"].item() == pytest.approx((0.0 + 0.2 + 0.4) / 3, abs=1e-6)

    def ce(rows):
        return sum(-10 * row[i] + math.log(sum(math.exp(10 * v) for v in row)) for i, row in enumerate(rows)) / 3

    rows = scores.tolist()
    assert losses["ce_study_to_report"].item() == pytest.approx(ce(rows), rel=1e-5)
    assert losses["ce_report_to_study"].item() == pytest.approx(ce([list(c) for c in zip(*rows)]), rel=1e-5)


def tiny_config(**overrides):
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, view_fusion_hidden_size=16, projection_dim=16, hidden_dropout_prob=0.0,
                  text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    values.update(overrides)
    return JoImTeRNetForPreTraining.default_config(**values)


@pytest.fixture
def studies(radiographs):
    ids = torch.randint(5, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return dict(pixel_values=radiographs(9, size=32).reshape(3, 3, 3, 32, 32),
                view_mask=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]), input_ids=ids, attention_mask=mask)


def test_model_trains_every_part_ignores_masked_views_and_round_trips(studies, tmp_path):
    torch.manual_seed(0)
    model = JoImTeRNetForPreTraining(tiny_config())
    assert model.report_decoder is None
    out = model(**studies)
    assert out.loss.item() == pytest.approx(out.loss_global.item() + out.loss_local.item(), rel=1e-6)
    assert out.local_scores.shape == out.global_scores.shape == (3, 3)
    out.loss.backward()
    for name in ("region_projection.weight", "study_projection.weight", "text_projection.weight",
                 "refers.embeddings.patch_embeddings.projection.weight", "text_encoder.embeddings.word_embeddings.weight",
                 "refers.view_fusion.score_dense.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    model.eval()
    changed = dict(studies, pixel_values=studies["pixel_values"].clone())
    changed["pixel_values"][1, 2] = torch.rand(3, 32, 32)  # a masked view
    with torch.no_grad():
        torch.testing.assert_close(model(**changed).local_scores, model(**studies).local_scores)
    model.save_pretrained(tmp_path / "joim")
    again = JoImTeRNetForPreTraining.from_pretrained(tmp_path / "joim").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**studies).loss, model(**studies).loss)
    _, report = from_pretrained_checked(RefersForImageClassification, tmp_path / "joim", num_labels=2)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    assert "region_projection" in report.dropped_by_module()


@pytest.mark.parametrize("overrides, match", [
    (dict(use_report_generation=True), "generates nothing"),
    (dict(use_study_projection=False, projection_dim=None), "use_study_projection must be True"),
])
def test_bad_joimternet_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        JoImTeRNetForPreTraining(tiny_config(**overrides))


def test_run_pretrain_method_joimternet(tmp_path, shared_data_dir):
    from modeling_refers.training import pretraining

    out = tmp_path / "run"
    trainer = pretraining.main([
        "--method", "joimternet", "--output_dir", str(out), "--data_dir", str(shared_data_dir / "covid19_collection"),
        "--config_overrides", "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,"
        "intermediate_size=64,view_fusion_hidden_size=16,projection_dim=16", "--text_encoder_name_or_path", "none",
        "--report_tokenizer_vocab_size", "300", "--text_config_overrides",
        "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_train_samples", "8",
        "--max_eval_samples", "4", "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--logging_steps",
        "1", "--max_report_length", "32", "--use_cpu", "--dataloader_pin_memory", "false", "--do_train"])
    assert type(trainer.model) is JoImTeRNetForPreTraining
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2
    for entry in logged:
        assert entry["loss_global"] + entry["loss_local"] == pytest.approx(entry["loss"], abs=2e-4)
    assert trainer.state.best_model_checkpoint is not None  # evaluation loss computed and compared
    assert "method `joimternet`" in (out / "README.md").read_text()
