"""Classifier pooling (`classifier_pooling`: aggregation token vs fc_norm of the mean patch token), stochastic depth
(`drop_path_rate`) and the head's init std (`classifier_initializer_range`), against timm's VisionTransformer on the
same weights; the defaults keep the earlier outputs."""

import pytest
import timm
import torch

from modeling_refers import RefersConfig, RefersForImageClassification
from modeling_refers.loading import load_timm_weights
from modeling_refers.training.finetuning import ModelArguments, build_model
from modeling_refers.modeling_refers import drop_path_rates

TINY = dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, view_fusion_hidden_size=32)


def _timm_vit(global_pool: str, drop_path_rate: float = 0.0, depth: int = 2) -> torch.nn.Module:
    """timm's ViT at the tiny size with random (not default-initialised) weights, LayerNorms included."""
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=32, depth=depth,
        num_heads=2, mlp_ratio=2, num_classes=3, global_pool=global_pool, fc_norm=global_pool == "avg",
        drop_path_rate=drop_path_rate, drop_rate=0.0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + (parameter == 1) * 1.0)
    return model


def _refers_from_timm(timm_model, **config) -> RefersForImageClassification:
    refers = RefersForImageClassification(RefersConfig(**{**TINY, **config}, num_labels=3, aggregation="none",
                                                       use_view_fusion=False))
    report = load_timm_weights(refers, timm_model.state_dict())
    assert [key for key in report.unexpected_keys if not key.startswith("head.")] == []
    with torch.no_grad():
        refers.classifier.weight.copy_(timm_model.head.weight)
        refers.classifier.bias.copy_(timm_model.head.bias)
    return refers


def test_mean_pooling_equals_timm_avg_pool_with_fc_norm():
    timm_model = _timm_vit("avg").eval()
    refers = _refers_from_timm(timm_model, classifier_pooling="mean").eval()
    assert "refers.layernorm.weight" not in refers.state_dict() and "refers.fc_norm.weight" in refers.state_dict()
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = timm_model(pixels)
        outputs = refers(pixels, output_hidden_states=True)
        features = refers.refers(pixels).pooler_output
        expected_features = timm_model.forward_head(timm_model.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(outputs.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features, expected_features, atol=1e-5, rtol=1e-5)
    # and by hand: the mean of the last block's patch tokens (no final LayerNorm), then fc_norm, then the head
    last = outputs.hidden_states[-1]
    by_hand = refers.classifier(torch.nn.functional.layer_norm(
        last[:, 1:].mean(dim=1), (32,), refers.refers.fc_norm.weight, refers.refers.fc_norm.bias, eps=1e-6))
    torch.testing.assert_close(outputs.logits, by_hand, atol=1e-5, rtol=1e-5)


def test_cls_pooling_equals_timm_token_pool():
    timm_model = _timm_vit("token").eval()
    refers = _refers_from_timm(timm_model).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(refers(pixels).logits, timm_model(pixels), atol=1e-5, rtol=1e-5)


def test_mean_pooling_feeds_the_view_fusion():
    """A study with one real view gets that view's mean-pooled feature, as the image itself does."""
    model = RefersForImageClassification(RefersConfig(**TINY, num_labels=2, classifier_pooling="mean")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    study = torch.stack([pixels, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)], dim=1)
    with torch.no_grad():
        image_logits = model(pixels).logits
        study_logits = model(study, view_mask=torch.tensor([[1, 0, 0], [1, 0, 0]])).logits
    torch.testing.assert_close(study_logits, image_logits, atol=1e-5, rtol=1e-5)


def test_drop_path_rates_rise_linearly_and_match_timm_in_training():
    config = RefersConfig(**{**TINY, "num_hidden_layers": 4}, drop_path_rate=0.6)
    assert drop_path_rates(config) == pytest.approx([0.0, 0.2, 0.4, 0.6])
    model = RefersForImageClassification(config)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.refers.layers]
    assert rates == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert isinstance(model.refers.layers[0].drop_path, torch.nn.Identity)

    # same weights, same seed: the same samples' branches are dropped in timm and here (placement and rate)
    timm_model = _timm_vit("avg", drop_path_rate=0.6, depth=4)
    refers = _refers_from_timm(timm_model, classifier_pooling="mean", num_hidden_layers=4, drop_path_rate=0.6,
                               hidden_dropout_prob=0.0)
    pixels = torch.randn(16, 3, 32, 32)
    timm_model.train(), refers.train()
    torch.manual_seed(11)
    expected = timm_model(pixels)
    torch.manual_seed(11)
    got = refers(pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    refers.eval(), timm_model.eval()
    with torch.no_grad():  # in eval stochastic depth is the identity: the train outputs differ, the eval ones agree
        evaluated = refers(pixels).logits
        torch.testing.assert_close(evaluated, timm_model(pixels), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(evaluated, got.detach(), atol=1e-3)


def test_drop_path_drops_whole_samples_at_its_rate_and_rescales():
    model = RefersForImageClassification(RefersConfig(**{**TINY, "num_hidden_layers": 3}, drop_path_rate=0.3))
    layer = model.refers.layers[2].train()
    out = layer.drop_path(torch.ones(20000, 5, 4))
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample[:, None, None].expand_as(out))  # one draw per sample
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert abs((per_sample == 0).float().mean().item() - 0.3) < 0.015
    # the middle block's rate is half: 0.15
    middle = model.refers.layers[1].train().drop_path(torch.ones(20000, 1, 1)).flatten()
    assert abs((middle == 0).float().mean().item() - 0.15) < 0.012
    layer.eval()
    x = torch.randn(4, 5, 32)
    assert torch.equal(layer.drop_path(x), x)


def test_defaults_keep_the_earlier_outputs():
    """Values computed with the code before pooling / drop path existed (same seed, same config, CPU float32)."""
    torch.manual_seed(0)
    config = RefersConfig(**TINY, num_labels=3, aggregation="recurrent_concat")
    assert (config.classifier_pooling, config.drop_path_rate, config.classifier_initializer_range) == ("cls", 0.0, None)
    model = RefersForImageClassification(config).eval()
    assert len(model.state_dict()) == 46 and "refers.layernorm.weight" in model.state_dict()
    assert all(isinstance(layer.drop_path, torch.nn.Identity) for layer in model.refers.layers)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixels).logits
        study = model(torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))).logits
    before = torch.tensor([[-0.009971484541893005, -0.0012376680970191956, -0.09679875522851944],
                           [-0.0024339742958545685, -0.02849263697862625, -0.07135864347219467]])
    before_study = torch.tensor([[-0.005099281668663025, -0.04312865436077118, -0.08825947344303131],
                                 [0.010025501251220703, -0.008767828345298767, -0.08634841442108154]])
    torch.testing.assert_close(logits, before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(study, before_study, atol=1e-6, rtol=1e-5)
    model.train()
    torch.manual_seed(3)  # training mode (dropout 0.1): the same random draws as before
    before_train = torch.tensor([[0.05352770537137985, -0.034381065517663956, -0.05493682622909546],
                                 [-0.09961532801389694, -0.04651729017496109, -0.24881844222545624]])
    torch.testing.assert_close(model(pixels).logits, before_train, atol=1e-6, rtol=1e-5)


def test_run_finetune_flags_turn_a_cls_checkpoint_into_mrm_style_fine_tuning(tmp_path):
    torch.manual_seed(0)
    pretrained = RefersForImageClassification(RefersConfig(**TINY, num_labels=2))
    pretrained.save_pretrained(tmp_path / "ckpt")
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "ckpt"), classifier_pooling="mean",
                                drop_path_rate=0.1, classifier_initializer_range=2e-5)
    model = build_model(model_args, dict(num_labels=14, problem_type="multi_label_classification"))
    assert model.config.classifier_pooling == "mean" and model.config.drop_path_rate == 0.1
    assert [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.refers.layers] == pytest.approx([0.0, 0.1])
    # the backbone's blocks are the checkpoint's; the final LayerNorm is gone, fc_norm and the head are new
    torch.testing.assert_close(model.refers.layers[1].mlp.fc2.weight, pretrained.refers.layers[1].mlp.fc2.weight)
    assert torch.equal(model.refers.fc_norm.weight, torch.ones(32))
    assert torch.equal(model.refers.fc_norm.bias, torch.zeros(32))
    std = model.classifier.weight.std().item()
    assert 1.5e-5 < std < 2.5e-5 and model.classifier.weight.abs().max().item() < 1.5e-4  # default init: std 0.02
    assert torch.equal(model.classifier.bias, torch.zeros(14))
    # a new model through --config_overrides: the flags win
    scratch = build_model(ModelArguments(config_overrides="hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
                                         "intermediate_size=64,image_size=32,view_fusion_hidden_size=32",
                                         classifier_pooling="mean"), dict(num_labels=3))
    assert scratch.refers.fc_norm is not None and isinstance(scratch.refers.layernorm, torch.nn.Identity)


@pytest.mark.parametrize("field, value, message", [
    ("classifier_pooling", "max", "classifier_pooling must be one of"),
    ("drop_path_rate", 1.0, "drop_path_rate must be in [0, 1)"),
    ("classifier_initializer_range", 0.0, "classifier_initializer_range must be > 0"),
])
def test_bad_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        RefersConfig(**TINY, **{field: value})
    with pytest.raises(ValueError, match="--" + field):
        build_model(ModelArguments(**{field: value}), dict(num_labels=2))


def test_mean_pooling_needs_the_radiograph_transformer():
    with pytest.raises(ValueError, match="classifier_pooling='mean' pools the radiograph transformer"):
        RefersConfig(backbone="resnet18", hidden_size=512, aggregation="none", classifier_pooling="mean")


@pytest.mark.parametrize("method", ["refers", "mrm", "joimternet"])
def test_every_vit_method_classifies_with_mean_pooling_and_drop_path(method, tmp_path):
    """Each ViT method's configuration carries the fields; its pretraining checkpoint becomes a mean-pooled
    classifier with stochastic depth (the pretrained final LayerNorm dropped, fc_norm and the head new)."""
    from transformers import AutoModelForImageClassification

    from modeling_refers import JoImTeRNetForPreTraining, MRMForPreTraining, RefersForPreTraining

    pretraining_class = {"refers": RefersForPreTraining, "mrm": MRMForPreTraining,
                         "joimternet": JoImTeRNetForPreTraining}[method]
    text = dict(model_type="bert", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=20)
    overrides = dict(**TINY, text_config=text)
    config = (pretraining_class.default_config(**overrides) if hasattr(pretraining_class, "default_config")
              else RefersConfig(**overrides, decoder_hidden_size=32, decoder_num_attention_heads=2,
                                decoder_intermediate_size=64, projection_dim=96))
    torch.manual_seed(0)
    pretraining_class(config).save_pretrained(tmp_path / method)
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path / method, num_labels=2, classifier_pooling="mean", drop_path_rate=0.2).eval()
    assert [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.refers.layers] == pytest.approx([0.0, 0.2])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model(pixels, output_hidden_states=True)
    last = outputs.hidden_states[-1]  # the last block's output; no final LayerNorm with mean pooling
    if model.config.aggregation == "cls_add":
        last = torch.cat([last[:, :1], last[:, 1:] + last[:, :1]], dim=1)
    features = torch.nn.functional.layer_norm(last[:, 1:].mean(dim=1), (32,), model.refers.fc_norm.weight,
                                              model.refers.fc_norm.bias, eps=1e-6)
    # (with view fusion, a single image is a one-view study whose feature is its own)
    torch.testing.assert_close(outputs.logits, model.classifier(features), atol=1e-5, rtol=1e-5)


def test_models_with_drop_path_build_on_the_meta_device():
    """(as the REFERS converter and transformers' loading build them: no tensor has a value there)"""
    with torch.device("meta"):
        model = RefersForImageClassification(RefersConfig(**TINY, drop_path_rate=0.1, classifier_pooling="mean"))
    assert model.refers.layers[1].drop_path.drop_prob == pytest.approx(0.1)
