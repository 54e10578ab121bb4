"""CNN view encoders (`backbone=<timm CNN>`): the paper's CNN ablation row and the CNN methods (RadTex, JoImTeRNet)
build on it. Tiny timm ResNet-18 at 64 px (2 x 2 cells), real radiographs."""

import pytest
import torch

from modeling_refers import RefersConfig, RefersForImageClassification, RefersForPreTraining, RefersModel
from modeling_refers.loading import from_pretrained_checked, load_timm_weights

VOCAB, BOS, EOS, PAD = 64, 2, 3, 0


def cnn_config(**overrides) -> RefersConfig:
    values = dict(
        backbone="resnet18", aggregation="none", hidden_size=512, image_size=64, view_fusion_hidden_size=16,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        decoder_hidden_size=32, decoder_num_attention_heads=4, decoder_intermediate_size=64, decoder_dropout_prob=0.0,
        max_report_length=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    values.update(overrides)
    return RefersConfig(**values)


@pytest.fixture
def studies(radiographs):
    pixel_values = radiographs(6, size=64).reshape(2, 3, 3, 64, 64)
    ids = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = BOS, EOS
    return dict(pixel_values=pixel_values, view_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), input_ids=ids,
                attention_mask=torch.ones_like(ids), labels=ids.clone())


def test_cnn_tokens_are_the_last_feature_map_and_its_mean(studies):
    torch.manual_seed(0)
    model = RefersModel(cnn_config()).eval()
    with torch.no_grad():
        out = model(studies["pixel_values"], view_mask=studies["view_mask"])
        # independent path: timm's own forward_features on each view, cells flattened by hand
        maps = model.conv_backbone.model.forward_features(studies["pixel_values"].flatten(0, 1))
    assert maps.shape == (6, 512, 2, 2)  # stride 32 at 64 px
    cells = maps.flatten(2).transpose(1, 2).reshape(2, 3, 4, 512) * studies["view_mask"][:, :, None, None]
    assert out.last_hidden_state.shape == (2, 3, 1 + 4, 512)
    torch.testing.assert_close(out.last_hidden_state[:, :, 1:], cells)
    torch.testing.assert_close(out.pooler_output, cells.mean(dim=2))
    assert out.study_embeds.shape == (2, 3 * 512) and out.view_weights[1, 2] == 0
    assert model.embeddings is None and model.layers is None  # no transformer weights sit idle


def test_batchnorm_in_training_sees_only_the_real_views(studies):
    """In training mode BatchNorm uses the batch's statistics: a padded view must not enter them. The study batch
    gives the real views exactly what the 5 real views give as a batch of single images."""
    torch.manual_seed(0)
    model = RefersModel(cnn_config()).train()
    real = studies["pixel_values"].flatten(0, 1)[studies["view_mask"].flatten().bool()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    study_tokens = model(studies["pixel_values"], view_mask=studies["view_mask"]).last_hidden_state
    model.load_state_dict(state)  # the same running statistics before the second pass
    alone = model.forward_features(real)
    torch.testing.assert_close(study_tokens.flatten(0, 1)[studies["view_mask"].flatten().bool()], alone)


def test_pretraining_with_a_cnn_trains_every_part_and_round_trips(studies, tmp_path):
    torch.manual_seed(0)
    model = RefersForPreTraining(cnn_config())
    out = model(**studies)
    assert torch.isfinite(out.loss) and out.loss_report is not None and out.loss_contrast is not None
    out.loss.backward()
    with_grad = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"refers.conv_backbone", "refers.view_fusion", "report_decoder.decoder", "text_encoder.encoder"} <= with_grad
    model.eval().save_pretrained(tmp_path / "cnn")
    again = RefersForPreTraining.from_pretrained(tmp_path / "cnn").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**studies).report_logits, model(**studies).report_logits)
    classifier, report = from_pretrained_checked(RefersForImageClassification, tmp_path / "cnn", num_labels=3)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    assert classifier.config.backbone == "resnet18"
    logits = classifier(studies["pixel_values"][:, 0]).logits  # single images through the CNN
    assert logits.shape == (2, 3)


def test_timm_cnn_weights_load_with_a_strict_report(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)  # with its ImageNet classifier (fc)
    save_file(reference.state_dict(), tmp_path / "resnet18.safetensors")
    model = RefersModel(cnn_config())
    report = load_timm_weights(model, tmp_path / "resnet18.safetensors")
    assert report.missing_keys == [] and report.unexpected_keys == ["fc.bias", "fc.weight"]
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.conv_backbone.model.state_dict()[key], value)
    broken = {k: v for k, v in reference.state_dict().items() if k != "layer1.0.conv1.weight"}
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        load_timm_weights(RefersModel(cnn_config()), broken)


@pytest.mark.parametrize("overrides, match", [
    (dict(backbone="resnet_does_not_exist"), "timm has no model 'resnet_does_not_exist'"),
    (dict(aggregation="recurrent_concat"), "aggregation='recurrent_concat' is a radiograph-transformer choice"),
])
def test_bad_cnn_configs_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        cnn_config(**overrides)


def test_cnn_width_must_match_hidden_size():
    with pytest.raises(ValueError, match="set hidden_size=512"):
        RefersModel(cnn_config(hidden_size=256))


def test_cnn_keeps_timms_initialisation_and_takes_one_channel(radiographs):
    """The CNN's weights are timm's own initialisation (kaiming, zero-initialised last BatchNorm of each block), not
    the ViT-style truncated normal the other REFERS modules get; `num_channels=1` builds a one-channel stem."""
    import timm

    torch.manual_seed(3)
    model = RefersModel(cnn_config())
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    ours = model.conv_backbone.model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert ours["layer1.0.bn2.weight"].abs().sum() == 0  # timm's zero_init_last: the ViT init would not do this
    grey = RefersModel(cnn_config(num_channels=1)).eval()
    assert grey.get_input_embeddings().in_channels == 1
    out = grey(radiographs(2, size=64)[:, :1])
    assert out.last_hidden_state.shape == (2, 5, 512)


def test_cnn_studies_export_and_compile_with_any_view_mask(studies):
    """The CNN path keeps the transformers contracts of the ViT path at inference: torch.export with another
    view_mask than traced, and torch.compile(fullgraph=True), give the eager outputs; masked views change nothing."""
    torch.manual_seed(0)
    model = RefersModel(cnn_config()).eval()
    pixels = studies["pixel_values"]
    program = torch.export.export(model, (pixels,), {"view_mask": torch.ones(2, 3, dtype=torch.long)})
    mask = torch.tensor([[1, 0, 1], [1, 0, 0]])
    exported = program.module()(pixels, view_mask=mask)
    torch.testing.assert_close(exported.study_embeds, model(pixels, view_mask=mask).study_embeds)
    changed = pixels.clone()
    changed[:, 1] = 5.0
    assert torch.equal(program.module()(changed, view_mask=mask).study_embeds, exported.study_embeds)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(pixels, view_mask=mask).study_embeds, exported.study_embeds)
