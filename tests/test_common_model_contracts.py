"""transformers' common model contracts (what its `ModelTesterMixin` checks for CLIP and ViT-MAE), for every class:
RefersModel, RefersForImageClassification, RefersForPreTraining, MRMForPreTraining, JoImTeRNetForPreTraining and
RadTexForPreTraining.

The mixin itself runs from `tests/transformers_mixin/` (outside the default suite; see its conftest.py and the
README's Tests section); this file keeps its contracts in the default suite, one test per contract over the six
classes, and where one cannot apply, a test says why, as transformers' own model tests do.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from modeling_refers import (
    JoImTeRNetConfig,
    JoImTeRNetForPreTraining,
    MRMConfig,
    MRMForPreTraining,
    RadTexConfig,
    RadTexForPreTraining,
    RefersConfig,
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
)
from modeling_refers.configuration_refers import RefersDecoderConfig

VOCAB = 64
TEXT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=VOCAB,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           hidden_dropout_prob=0.0, view_fusion_hidden_size=16, text_config=TEXT, decoder_hidden_size=40,
           decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=80,
           decoder_dropout_prob=0.0, max_report_length=16, decoder_vocab_size=VOCAB, bos_token_id=2, eos_token_id=3,
           pad_token_id=0)
MRM = dict(mrm_decoder_hidden_size=16, mrm_decoder_num_hidden_layers=1, mrm_decoder_num_attention_heads=2,
           mrm_decoder_intermediate_size=32)
RADTEX = dict(backbone="resnet18", hidden_size=512, image_size=64, text_config=TEXT, decoder_hidden_size=40,
              decoder_num_attention_heads=4, decoder_intermediate_size=80, decoder_dropout_prob=0.0,
              max_report_length=16, decoder_vocab_size=VOCAB, bos_token_id=2, eos_token_id=3, pad_token_id=0)

CLASSES = {
    "RefersModel": (RefersModel, lambda **kw: RefersConfig(**VIT, **kw)),
    "RefersForImageClassification": (RefersForImageClassification, lambda **kw: RefersConfig(**VIT, num_labels=3, **kw)),
    "RefersForPreTraining": (RefersForPreTraining, lambda **kw: RefersConfig(**VIT, **kw)),
    "MRMForPreTraining": (MRMForPreTraining, lambda **kw: MRMConfig(**VIT, **MRM, **kw)),
    "JoImTeRNetForPreTraining": (JoImTeRNetForPreTraining, lambda **kw: JoImTeRNetConfig(**VIT, projection_dim=16, **kw)),
    "RadTexForPreTraining": (RadTexForPreTraining, lambda **kw: RadTexConfig(**RADTEX, **kw)),
}
NAMES = list(CLASSES)


def build(name, **config_overrides):
    model_class, make_config = CLASSES[name]
    torch.manual_seed(0)
    return model_class(make_config(**config_overrides))


def inputs_for(name, config, batch=2):
    """Studies of 3 views (one padded) and reports, as each class reads them (the same every call)."""
    generator = torch.Generator().manual_seed(1)
    size = config.image_size
    pixels = torch.randn(batch, 3, config.num_channels, size, size, generator=generator)
    ids = torch.randint(5, VOCAB, (batch, 9), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    view_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])[:batch]
    if name == "RefersModel":
        return dict(pixel_values=pixels, view_mask=view_mask)
    if name == "RefersForImageClassification":
        return dict(pixel_values=pixels, view_mask=view_mask, labels=torch.tensor([0, 2])[:batch])
    if name == "MRMForPreTraining":
        labels = torch.full_like(ids, -100)
        labels[:, [2, 5]] = ids[:, [2, 5]]
        return dict(pixel_values=pixels, view_mask=view_mask, input_ids=ids, attention_mask=mask, labels=labels,
                    generator=torch.Generator().manual_seed(2))
    if name == "RadTexForPreTraining":
        return dict(pixel_values=pixels, view_mask=view_mask, labels=ids.masked_fill(mask == 0, -100))
    if name == "JoImTeRNetForPreTraining":
        return dict(pixel_values=pixels, view_mask=view_mask, input_ids=ids, attention_mask=mask)
    return dict(pixel_values=pixels, view_mask=view_mask, input_ids=ids, attention_mask=mask,
                labels=ids.masked_fill(mask == 0, -100))


def run(model, name, **flags):
    inputs = inputs_for(name, model.config)
    return model(**inputs, **flags)


def num_real_views(name):
    return 5  # 3 + 2 real views in `inputs_for`


def expected_hidden_states(name, config):
    """(count, shape of each) of the view encoder's hidden states for `inputs_for`'s batch."""
    if config.backbone != "vit":
        import timm

        cnn = timm.create_model(config.backbone, pretrained=False, num_classes=0, global_pool="")
        levels = cnn.forward_intermediates(torch.zeros(1, 3, config.image_size, config.image_size))[1]
        return len(levels), [(None, *level.shape[1:]) for level in levels]
    tokens = 1 + config.num_patches
    if name == "MRMForPreTraining":  # the encoder sees the visible patches only
        tokens = 1 + int(config.num_patches * (1 - config.mrm_mask_ratio))
    return config.num_hidden_layers + 1, [(None, tokens, config.hidden_size)] * (config.num_hidden_layers + 1)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: hidden states, attentions, tuples
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via_config", [False, True], ids=["kwargs", "config"])
@pytest.mark.parametrize("name", NAMES)
def test_hidden_states_output(name, via_config):
    model = build(name).eval()
    if via_config:
        model.config.output_hidden_states = True
        outputs = run(model, name)
    else:
        outputs = run(model, name, output_hidden_states=True)
    count, shapes = expected_hidden_states(name, model.config)
    hidden_states = outputs.hidden_states
    assert isinstance(hidden_states, tuple) and len(hidden_states) == count
    for state, shape in zip(hidden_states, shapes):
        assert tuple(state.shape[1:]) == shape[1:]
    if name in ("RefersModel", "RefersForPreTraining", "RefersForImageClassification", "JoImTeRNetForPreTraining"):
        assert hidden_states[0].shape[0] == 6  # every view slot of the 2 x 3 studies (a padded one is zeros)
    elif name == "MRMForPreTraining":
        assert hidden_states[0].shape[0] == num_real_views(name)  # only the real views are encoded
    plain = run(build(name).eval(), name)
    assert plain.get("hidden_states") is None  # not asked for: not returned


@pytest.mark.parametrize("name", NAMES)
def test_output_hidden_states_selects_layers_by_index(name):
    """transformers' `test_can_capture_specific_layers_hidden_states`: `output_hidden_states=[0, 2, -1]` returns the
    full tuple's length with only those entries (negative from the end), the rest None; a CNN's are its feature
    levels, counted by `config.num_recorded_layers`."""
    model = build(name).eval()
    torch.manual_seed(0)
    full = run(model, name, output_hidden_states=True).hidden_states
    assert len(full) == model.config.num_recorded_layers + 1
    torch.manual_seed(0)
    some = run(model, name, output_hidden_states=[0, 2, -1]).hidden_states
    assert len(some) == len(full)
    kept = {0, 2, len(full) - 1}
    for index, (selected, reference) in enumerate(zip(some, full)):
        if index in kept:
            torch.testing.assert_close(selected, reference)
        else:
            assert selected is None, index


def test_a_cnn_view_encoder_has_no_attentions():
    """RadTex's view encoder is a CNN: no attention to return (transformers' ResNet tests: `has_attentions=False`);
    its report decoder's attentions come as REFERS's (`decoder_attentions`, `cross_attentions`)."""
    model = build("RadTexForPreTraining", attn_implementation="eager").eval()
    outputs = run(model, "RadTexForPreTraining", output_attentions=True)
    assert outputs.attentions == ()
    assert len(outputs.decoder_attentions) == len(outputs.cross_attentions) == 1


@pytest.mark.parametrize("name", [name for name in NAMES if name != "RadTexForPreTraining"])
def test_attention_outputs(name):
    model = build(name, attn_implementation="eager").eval()
    outputs = run(model, name, output_attentions=True)
    config = model.config
    count, shapes = expected_hidden_states(name, config)
    tokens = shapes[0][1]
    assert len(outputs.attentions) == config.num_hidden_layers
    for attention in outputs.attentions:
        assert tuple(attention.shape[1:]) == (config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention.sum(-1)))  # softmax rows
    model.config.output_attentions = True  # the same through the config
    assert len(run(model, name).attentions) == config.num_hidden_layers


def test_pretraining_output_counts_its_three_hidden_state_kinds():
    """RefersForPreTraining carries three encoders' outputs (radiograph transformer, report encoder, report decoder),
    as CLIP carries two: asking for hidden states adds three entries to the output tuple, not one (transformers'
    test_attention_outputs: `num_hidden_states_types`); each attention tuple has its own module's length."""
    model = build("RefersForPreTraining", attn_implementation="eager").eval()
    with_attentions = run(model, "RefersForPreTraining", output_attentions=True)
    both = run(model, "RefersForPreTraining", output_attentions=True, output_hidden_states=True)
    assert len(both) == len(with_attentions) + 3
    assert [key for key in both if key.endswith("hidden_states")] == [
        "hidden_states", "decoder_hidden_states", "text_hidden_states"]
    assert len(both.attentions) == VIT["num_hidden_layers"]
    assert len(both.text_attentions) == TEXT["num_hidden_layers"]
    assert len(both.decoder_attentions) == len(both.cross_attentions) == VIT["decoder_num_hidden_layers"]
    assert len(both.text_hidden_states) == TEXT["num_hidden_layers"] + 1
    assert len(both.decoder_hidden_states) == VIT["decoder_num_hidden_layers"] + 1


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_false_gives_the_same_tuple(name):
    model = build(name).eval()
    as_dict = run(model, name, output_hidden_states=True)
    as_tuple = run(model, name, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())

    def flat(value):
        return [t for item in value for t in flat(item)] if isinstance(value, (tuple, list)) else [value]

    for left, right in zip(flat(as_tuple), flat(as_dict.to_tuple()), strict=True):
        torch.testing.assert_close(left, right, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load, initialisation of everything a checkpoint lacks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    model = build(name).eval()
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded.config) is type(model.config) and loaded.config.model_type == model.config.model_type
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    first, second = run(model, name), run(loaded.eval(), name)
    for key in first:
        if isinstance(first[key], torch.Tensor):
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_without_weights_initialises_every_parameter_and_buffer(name, tmp_path):
    """transformers' test_can_init_all_missing_weights: load from a checkpoint that holds one tensor; every other
    weight is initialised by `_init_weights` (no module created after `post_init`, none left as `torch.empty`). The
    deterministic ones (buffers, fixed position tables, LayerNorm / BatchNorm) equal a new model's."""
    model = build(name)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = sorted(weights)[0]
    save_file({kept: weights[kept]}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = type(model).from_pretrained(tmp_path)
    fresh = dict(model.named_buffers())
    for key, buffer in loaded.named_buffers():
        torch.testing.assert_close(buffer, fresh[key], rtol=0, atol=0, msg=key)
    for key, parameter in loaded.named_parameters():
        assert torch.isfinite(parameter).all(), key
    reference = dict(model.named_parameters())
    # ... and every bias a new model starts at zero (an output bias left as `torch.empty` would hold garbage)
    deterministic = [key for key, parameter in loaded.named_parameters()
                     if not parameter.requires_grad or key.endswith(("LayerNorm.weight", "LayerNorm.bias",
                                                                      "layernorm.weight", "layernorm.bias"))
                     or (key.endswith("bias") and not reference[key].any())]
    for key in deterministic:
        torch.testing.assert_close(dict(loaded.named_parameters())[key], reference[key], rtol=0, atol=0, msg=key)
    loss = run(loaded.train(), name).get("loss")
    assert loss is None or torch.isfinite(loss)


def test_mrm_from_a_refers_backbone_checkpoint_has_sincos_decoder_positions_and_a_finite_loss(tmp_path):
    """The reported failure: MRM initialised from a RefersModel checkpoint had `decoder_pos_embed` full of NaN."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEConfig, ViTMAEDecoder

    config = CLASSES["MRMForPreTraining"][1]()
    RefersModel(RefersConfig(**VIT, aggregation="none", use_view_fusion=False)).save_pretrained(tmp_path)
    model, info = MRMForPreTraining.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert any(key.startswith("image_decoder.") for key in info["missing_keys"])
    reference = ViTMAEDecoder(ViTMAEConfig(hidden_size=32, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                           decoder_num_attention_heads=2, decoder_intermediate_size=32, patch_size=8,
                                           image_size=32), num_patches=16)  # MAE's own 2-D sin-cos table
    torch.testing.assert_close(model.image_decoder.decoder_pos_embed, reference.decoder_pos_embed, rtol=0, atol=0)
    assert torch.isfinite(run(model.train(), "MRMForPreTraining").loss)


# ---------------------------------------------------------------------------------------------------------------------
# Attention implementation, gradients, gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_set_attn_implementation_reaches_every_attention(name):
    from transformers import PreTrainedConfig

    model = build(name)
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        configs = {id(m.config): (n, m.config) for n, m in model.named_modules()
                   if isinstance(getattr(m, "config", None), PreTrainedConfig)}
        if name == "MRMForPreTraining":
            assert any(n.startswith("image_decoder") for n, _ in configs.values())
        for module_name, config in configs.values():
            assert config._attn_implementation == implementation, (module_name, type(config).__name__)
    eager = run(build(name, attn_implementation="eager").eval(), name)
    sdpa = run(build(name, attn_implementation="sdpa").eval(), name)
    for key in eager:
        if isinstance(eager[key], torch.Tensor):
            torch.testing.assert_close(sdpa[key], eager[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_gets_a_gradient(name):
    """DDP without an unused-parameter search needs every trainable parameter in the graph (BERT's pooler in MRM was
    not: MRM's report encoder is now built without it)."""
    model = build(name).train()
    outputs = run(model, name)
    loss = outputs.get("loss")
    if loss is None:  # the backbone: every output it returns
        loss = outputs.last_hidden_state.sum() + outputs.study_embeds.sum()
    loss.backward()
    idle = [key for key, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]
    assert idle == []
    if name == "MRMForPreTraining":
        assert not any(key.startswith("text_encoder.pooler") for key in model.state_dict())


def test_radtex_config_with_gradient_checkpointing_trains_like_without():
    plain = build("RadTexForPreTraining").train()
    checkpointed = build("RadTexForPreTraining", gradient_checkpointing=True).train()
    assert checkpointed.is_activation_checkpointing and checkpointed.refers.conv_backbone.model.grad_checkpointing
    checkpointed.load_state_dict(plain.state_dict())
    losses = []
    for model in (plain, checkpointed):
        loss = run(model, "RadTexForPreTraining").loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    grads = {key: p.grad for key, p in plain.named_parameters() if p.grad is not None}
    for key, parameter in checkpointed.named_parameters():
        if key in grads:
            torch.testing.assert_close(parameter.grad, grads[key], rtol=1e-4, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# Public API: get_text_features only where a method embeds reports
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RefersForPreTraining", "JoImTeRNetForPreTraining"])
def test_get_text_features_where_reports_are_embedded(name):
    model = build(name).eval()
    inputs = inputs_for(name, model.config)
    features = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    assert features.pooler_output.shape == (2, model.config.contrastive_dim)
    torch.testing.assert_close(features.pooler_output, run(model, name).report_embeds)


@pytest.mark.parametrize("name, reason", [("MRMForPreTraining", "no text_projection"),
                                          ("RadTexForPreTraining", "no report encoder")])
def test_get_text_features_is_not_public_where_no_report_is_embedded(name, reason):
    model = build(name)
    assert not hasattr(model, "get_text_features") and not hasattr(type(model), "get_text_features")
    with pytest.raises(AttributeError, match=f"{name} has no `get_text_features`.*{reason}"):
        model.get_text_features  # noqa: B018


# ---------------------------------------------------------------------------------------------------------------------
# Configurations: composite round trip (transformers' ConfigTester.create_and_test_config_from_and_save_pretrained_composite)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", [RefersConfig, MRMConfig, JoImTeRNetConfig, RadTexConfig])
def test_each_sub_config_round_trips_by_itself(config_class, tmp_path):
    config = CLASSES[{RefersConfig: "RefersForPreTraining", MRMConfig: "MRMForPreTraining",
                      JoImTeRNetConfig: "JoImTeRNetForPreTraining", RadTexConfig: "RadTexForPreTraining"}[config_class]][1]()
    config.save_pretrained(tmp_path)
    whole = config_class.from_pretrained(tmp_path)
    assert type(whole) is config_class and whole.to_dict() == config.to_dict()
    assert set(whole.sub_configs) == {"text_config", "decoder_config"}
    for key, sub_class in (("decoder_config", RefersDecoderConfig), ("text_config", BertConfig)):
        alone = sub_class.from_pretrained(tmp_path)
        expected = config.to_dict()[key]
        got = alone.to_dict()
        for value in (expected, got):
            value.pop("transformers_version", None)
        assert got == expected, key
        assert isinstance(alone, type(getattr(whole, key)))
        alone.save_pretrained(tmp_path / key)
        assert sub_class.from_pretrained(tmp_path / key).to_dict() == alone.to_dict()
    # the two sub-configs differ here, so taking one for the other fails the test
    assert json.loads((tmp_path / "config.json").read_text())["decoder_config"]["hidden_size"] == 40
    assert RefersDecoderConfig.from_pretrained(tmp_path).hidden_size == 40
    assert BertConfig.from_pretrained(tmp_path).hidden_size == TEXT["hidden_size"]
