"""Tiny-config tests of the REFERS radiograph transformer family (transformers' model-test pattern)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from modeling_refers import RefersConfig, RefersForImageClassification, RefersModel, RefersViewFusion
from modeling_refers.loading import load_timm_weights

AGGREGATIONS = ("recurrent_concat", "cls_add", "none")
FUSIONS = ("softmax", "sigmoid_gate")


def tiny_config(**overrides) -> RefersConfig:
    values = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        view_fusion_hidden_size=16,
        hidden_dropout_prob=0.0,
    )
    values.update(overrides)
    return RefersConfig(**values)


@pytest.fixture(autouse=True)
def _real_pixels(radiographs):
    """Pixels in these tests are real chest X-rays (tests/conftest.py), not noise."""
    global real_images
    real_images = radiographs


def images(n, size=32, offset=0):
    return real_images(n, size=size, offset=offset)


def study_batch(batch=2, views=3, size=32):
    return images(batch * views, size=size).reshape(batch, views, 3, size, size)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_model_shapes_images_and_studies(aggregation, fusion):
    config = tiny_config(aggregation=aggregation, view_fusion=fusion)
    model = RefersModel(config).eval()
    seq, d, v = 1 + config.num_patches, config.hidden_size, config.num_views

    single = model(images(4, size=32))
    assert single.last_hidden_state.shape == (4, seq, d)
    assert single.pooler_output.shape == (4, d)
    # A single image is a one-view study: weight 1 on it, 0 on the V - 1 absent views, its own feature fused.
    assert single.view_weights.shape == (4, v) and torch.all(single.view_weights[:, 1:] == 0)
    assert torch.equal(single.study_pooled_output, single.pooler_output)
    one_view = torch.zeros(4, v, 3, 32, 32)
    one_view[:, 0] = images(4, size=32)
    as_study = model(one_view, view_mask=torch.tensor([[1] + [0] * (v - 1)] * 4))
    torch.testing.assert_close(single.view_weights, as_study.view_weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(single.study_embeds, as_study.study_embeds, atol=1e-6, rtol=0)

    studies = model(study_batch(), view_mask=torch.tensor([[1, 1, 1], [1, 0, 1]]))
    assert studies.last_hidden_state.shape == (2, v, seq, d)
    assert studies.pooler_output.shape == (2, v, d)
    assert studies.study_embeds.shape == (2, v * d)
    assert studies.study_pooled_output.shape == (2, d)
    assert studies.study_hidden_states.shape == (2, v * config.num_patches, d)
    assert studies.study_attention_mask.shape == (2, v * config.num_patches)
    assert studies.view_weights.shape == (2, v)
    assert torch.equal(studies.view_mask, torch.tensor([[1, 1, 1], [1, 0, 1]]))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_classification_shapes_images_and_studies(fusion):
    config = tiny_config(num_labels=5, view_fusion=fusion)
    model = RefersForImageClassification(config).eval()
    assert model(images(3, size=32)).logits.shape == (3, 5)
    out = model(study_batch())
    assert out.logits.shape == (2, 5)
    assert out.view_weights.shape == (2, 3)


def test_hidden_states_and_attentions_are_returned():
    config = tiny_config(attn_implementation="eager")
    model = RefersModel(config).eval()
    out = model(study_batch(), view_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), output_hidden_states=True,
                output_attentions=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    # batch * V = 6 images, views in order (the masked one is computed on zeroed pixels, then dropped by the mask)
    assert out.hidden_states[0].shape == (6, 1 + config.num_patches, config.hidden_size)
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape == (6, config.num_attention_heads, 1 + config.num_patches, 1 + config.num_patches)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(6, 4, 1 + config.num_patches))
    # The last hidden state of view (study 1, view 2) is hidden_states[-1] row 5 after the final LayerNorm.
    torch.testing.assert_close(out.last_hidden_state[1, 2], model.layernorm(out.hidden_states[-1][5]))


# ---------------------------------------------------------------------------------------------------------------------
# What each aggregation mode computes
# ---------------------------------------------------------------------------------------------------------------------


def test_cls_add_adds_final_aggregation_token_to_every_patch():
    torch.manual_seed(1)
    plain = RefersModel(tiny_config(aggregation="none")).eval()
    cls_add = RefersModel(tiny_config(aggregation="cls_add")).eval()
    cls_add.load_state_dict(plain.state_dict())
    x = images(2, size=32)
    reference = plain(x).last_hidden_state
    out = cls_add(x).last_hidden_state
    torch.testing.assert_close(out[:, 0], reference[:, 0])
    torch.testing.assert_close(out[:, 1:], reference[:, 1:] + reference[:, :1])


def test_recurrent_concat_projects_patch_and_aggregation_before_last_layer():
    config = tiny_config(aggregation="recurrent_concat")
    model = RefersModel(config).eval()
    # Initialised to [I | 0]: identical to the plain ViT with the same weights.
    plain = RefersModel(tiny_config(aggregation="none")).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    x = images(2, size=32)
    torch.testing.assert_close(model(x).last_hidden_state, plain(x).last_hidden_state)

    # Hand computation of the last layer's input with a random projection.
    with torch.no_grad():
        model.recurrent_concat.weight.normal_(std=0.1)
        model.recurrent_concat.bias.normal_(std=0.1)
        hidden = model.embeddings(x)
        hidden = model.layers[0](hidden, None)
        w, b = model.recurrent_concat.weight, model.recurrent_concat.bias
        d = config.hidden_size
        patches = hidden[:, 1:] @ w[:, :d].T + hidden[:, :1] @ w[:, d:].T + b
        expected = model.layernorm(model.layers[1](torch.cat([hidden[:, :1], patches], 1), None))
        torch.testing.assert_close(model(x).last_hidden_state, expected)
        assert not torch.allclose(model(x).last_hidden_state, plain(x).last_hidden_state, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# View fusion
# ---------------------------------------------------------------------------------------------------------------------


def test_softmax_fusion_matches_hand_computation():
    config = tiny_config(view_fusion="softmax")
    fusion = RefersViewFusion(config).eval()
    feats, tokens = torch.randn(2, 3, 32), torch.randn(2, 3, 16, 32)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    out = fusion(feats, tokens, mask)

    masked_feats = feats * mask[..., None]
    hidden = torch.nn.functional.gelu(masked_feats.flatten(1) @ fusion.score_dense.weight.T + fusion.score_dense.bias)
    scores = hidden @ fusion.score_out.weight.T + fusion.score_out.bias
    weights = torch.stack([scores[0].softmax(-1), torch.zeros(3)])
    weights[1, [0, 2]] = scores[1, [0, 2]].softmax(-1)
    torch.testing.assert_close(out.view_weights, weights)
    torch.testing.assert_close(out.study_embeds, (weights[..., None] * masked_feats).flatten(1))
    torch.testing.assert_close(out.study_pooled_output, (weights[..., None] * feats).sum(1))
    torch.testing.assert_close(out.study_hidden_states[1, 16:32], torch.zeros(16, 32))  # masked view's tokens
    assert out.study_attention_mask[1].tolist() == [1] * 16 + [0] * 16 + [1] * 16


def test_sigmoid_gate_fusion_matches_hand_computation():
    config = tiny_config(view_fusion="sigmoid_gate")
    fusion = RefersViewFusion(config).eval()
    feats, tokens = torch.randn(1, 3, 32), torch.randn(1, 3, 16, 32)
    out = fusion(feats, tokens, torch.ones(1, 3))
    for p in range(16):
        concatenated = tokens[0, :, p].flatten()  # views' tokens at position p, (3 * 32,)
        gates = torch.sigmoid(fusion.gate.weight @ concatenated + fusion.gate.bias)
        for v in range(3):
            torch.testing.assert_close(out.study_hidden_states[0, v * 16 + p], gates[v] * tokens[0, v, p])
    torch.testing.assert_close(out.study_embeds, feats.flatten(1))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_masked_views_change_nothing(fusion):
    model = RefersForImageClassification(tiny_config(num_labels=3, view_fusion=fusion)).eval()
    x = study_batch()
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    changed = x.clone()
    changed[0, 1] = torch.rand(3, 32, 32) * 100
    changed[1, 2] = -changed[1, 2]
    a = model(x, view_mask=mask)
    b = model(changed, view_mask=mask)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.view_weights, b.view_weights)
    assert a.view_weights[0, 1] == 0 and a.view_weights[1, 2] == 0
    base_a = model.refers(x, view_mask=mask)
    base_b = model.refers(changed, view_mask=mask)
    for key in ("study_embeds", "study_hidden_states", "last_hidden_state"):
        assert torch.equal(base_a[key], base_b[key]), key


def test_one_view_study_classifies_like_the_single_image():
    model = RefersForImageClassification(tiny_config(num_labels=4)).eval()
    x = study_batch()
    study = model(x, view_mask=torch.tensor([[1, 0, 0], [0, 0, 1]])).logits
    single = model(torch.stack([x[0, 0], x[1, 2]])).logits
    torch.testing.assert_close(study, single)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def test_losses_follow_problem_type():
    x = images(4, size=32)
    multi = RefersForImageClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float)
    out = multi(x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels))

    single = RefersForImageClassification(tiny_config(num_labels=3, problem_type="single_label_classification"))
    labels = torch.tensor([0, 2, 1, 2])
    out = single(x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))

    regression = RefersForImageClassification(tiny_config(num_labels=1, problem_type="regression"))
    targets = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = regression(x, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))

    study_out = multi(study_batch(batch=2), labels=torch.tensor([[1.0, 0, 0], [0, 1, 1]]))
    assert study_out.loss.ndim == 0 and torch.isfinite(study_out.loss)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradient_reaches_every_parameter(aggregation, fusion):
    model = RefersForImageClassification(tiny_config(num_labels=2, aggregation=aggregation, view_fusion=fusion))
    model.train()
    loss = model(study_batch(), labels=torch.tensor([0, 1])).loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == []


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(3)
    model = RefersForImageClassification(tiny_config(num_labels=2)).train()
    x, labels = study_batch(), torch.tensor([1, 0])
    model(x, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    model(x, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)


def test_eager_and_sdpa_agree():
    sdpa = RefersModel(tiny_config(attn_implementation="sdpa")).eval()
    eager = RefersModel(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    x = study_batch()
    a, b = sdpa(x), eager(x)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.study_embeds, b.study_embeds, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load, Auto classes, remote code
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [RefersModel, RefersForImageClassification])
def test_save_load_round_trip_is_bit_exact(tmp_path, model_class):
    model = model_class(tiny_config(num_labels=3, view_fusion="sigmoid_gate", aggregation="cls_add")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    stored = load_file(tmp_path / "model.safetensors")
    own = model.state_dict()
    assert set(stored) == set(own)
    assert all(torch.equal(stored[k], own[k]) for k in own)

    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert reloaded.config.aggregation == "cls_add" and reloaded.config.view_fusion == "sigmoid_gate"
    x = study_batch()
    first, second = model(x), reloaded(x)
    key = "logits" if model_class is RefersForImageClassification else "study_embeds"
    assert torch.equal(first[key], second[key])


def test_auto_classes_after_import(tmp_path):
    config = tiny_config(num_labels=2)
    RefersForImageClassification(config).save_pretrained(tmp_path / "clf")
    RefersModel(config).save_pretrained(tmp_path / "base")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "base"), RefersConfig)
    assert type(AutoModel.from_pretrained(tmp_path / "base")) is RefersModel
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "clf")) is RefersForImageClassification
    assert type(AutoModel.from_config(config)) is RefersModel
    # A classification checkpoint loads into the base model with only the head left out.
    base = AutoModel.from_pretrained(tmp_path / "clf")
    clf = RefersForImageClassification.from_pretrained(tmp_path / "clf")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in clf.refers.state_dict().items())


def test_trust_remote_code_in_a_fresh_process(tmp_path):
    model = RefersForImageClassification(tiny_config(num_labels=2)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_refers.RefersForImageClassification"
    assert (tmp_path / "ckpt" / "modeling_refers.py").is_file()
    assert (tmp_path / "ckpt" / "configuration_refers.py").is_file()
    x = study_batch(batch=1)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).logits, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert "modeling_refers" not in sys.modules, "the package was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        logits = model.eval()(torch.load({str(tmp_path / "x.pt")!r})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "expected.pt")!r}))
        print("remote-ok")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    # Run from an empty folder so the repository is not importable from the working directory.
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "remote-ok" in run.stdout


# ---------------------------------------------------------------------------------------------------------------------
# timm weights
# ---------------------------------------------------------------------------------------------------------------------


def tiny_timm_vit() -> VisionTransformer:
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                            num_classes=7).eval()
    with torch.no_grad():
        for param in vit.parameters():  # random init everywhere, zero-init biases and cls included
            param.normal_(std=0.2)
    return vit


def test_timm_weights_give_timm_features(tmp_path):
    vit = tiny_timm_vit()
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    model = RefersModel(tiny_config(aggregation="none")).eval()
    report = load_timm_weights(model, path)
    assert report.unexpected_keys == ["head.bias", "head.weight"]
    assert all(key.startswith("view_fusion.") for key in report.missing_keys)
    x = images(3, size=32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, vit.forward_features(x), atol=1e-5, rtol=0)
        # Every view of a study goes through the same backbone.
        study = model(x[None])
        torch.testing.assert_close(study.last_hidden_state[0], vit.forward_features(x), atol=1e-5, rtol=0)


def test_timm_weights_into_classifier_and_recurrent_concat_report():
    vit = tiny_timm_vit()
    model = RefersForImageClassification(tiny_config(num_labels=2, aggregation="recurrent_concat"))
    report = load_timm_weights(model, vit.state_dict())
    assert {"recurrent_concat.weight", "recurrent_concat.bias"} <= set(report.missing_keys)
    torch.testing.assert_close(model.refers.embeddings.position_embeddings, vit.pos_embed)


def test_timm_weights_that_do_not_fit_are_refused(tmp_path):
    vit = tiny_timm_vit()
    state = vit.state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    model = RefersModel(tiny_config(aggregation="none"))
    with pytest.raises(ValueError, match=r"Missing: \['layers.1.mlp.fc2.weight'\]"):
        load_timm_weights(model, state)
    load_timm_weights(model, state, strict=False)  # loads what matches
    wide = RefersModel(tiny_config(hidden_size=64, num_attention_heads=4))
    with pytest.raises(ValueError, match="expects"):
        load_timm_weights(wide, vit.state_dict())
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_timm_weights(model, tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = RefersModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="Expected 3 but got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"Input image size \(48\*48\) doesn't match model \(32\*32\)"):
        model(images(2, size=48))
    with pytest.raises(ValueError, match=r"Study 1 of the batch .* every view masked"):
        model(study_batch(), view_mask=torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="config.num_views is 3"):
        model(study_batch(views=2))
    with pytest.raises(ValueError, match=r"view_mask. must have shape"):
        model(study_batch(), view_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(batch, C, H, W\) or \(batch, V, C, H, W\)"):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(aggregation="mean"), "aggregation must be one of"),
        (dict(view_fusion="max"), "view_fusion must be one of"),
        (dict(image_size=30), "image_size \\(30\\) must be divisible by patch_size \\(8\\)"),
        (dict(hidden_size=30), "hidden_size \\(30\\) must be divisible by num_attention_heads"),
        (dict(num_views=0), "num_views must be a positive integer"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob must be in"),
    ],
)
def test_config_rejects_impossible_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_defaults_are_the_papers():
    config = RefersConfig()
    assert (config.image_size, config.patch_size, config.hidden_size) == (224, 16, 768)
    assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (12, 12, 3072)
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu", 1e-6)
    assert (config.aggregation, config.view_fusion, config.num_views) == ("recurrent_concat", "softmax", 3)
    assert config.num_patches == 196
    assert RefersConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_aggregation_embedding_is_zero_initialised():
    model = RefersModel(tiny_config())
    assert torch.count_nonzero(model.embeddings.cls_token) == 0
    assert model.embeddings.position_embeddings.std() > 0
