"""Tests of the official-checkpoint converter on state dicts written in the official REFERS naming.

The official naming is produced here by a hand-written inverse mapping (ours -> theirs), independent of the
converter's tables, and the official forward pass (jeonsworld ViT + `CaptioningModel`'s cls-add and `fusion`
gates + fine-tuning `head`) is re-implemented functionally from the official keys as an independent reference.
"""

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

import modeling_refers  # noqa: F401  (registers the Auto classes)
from modeling_refers import RefersConfig, RefersForImageClassification, RefersModel
from modeling_refers.convert_refers_original_checkpoint import (
    convert_official_state_dict,
    convert_refers_original_checkpoint,
    infer_official_config,
    main,
)

HIDDEN, LAYERS, HEADS, IMAGE, PATCH, MLP, VIEWS = 32, 2, 4, 32, 8, 64, 3


def tiny_config(**overrides) -> RefersConfig:
    fields = dict(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=IMAGE, patch_size=PATCH, aggregation="cls_add", view_fusion="sigmoid_gate", num_views=VIEWS,
    )
    fields.update(overrides)
    return RefersConfig(**fields)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (LayerNorms, biases and the zero-initialised cls token included), so no mapping error
    hides behind an initial value."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model.eval()


# Ours -> official, written independently of the converter.
_OURS_TO_OFFICIAL = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.bias",
    "layernorm.weight": "encoder.encoder_norm.weight",
    "layernorm.bias": "encoder.encoder_norm.bias",
}
_OURS_TO_OFFICIAL_BLOCK = {
    "layernorm_before": "attention_norm",
    "attention.q_proj": "attn.query",
    "attention.k_proj": "attn.key",
    "attention.v_proj": "attn.value",
    "attention.o_proj": "attn.out",
    "layernorm_after": "ffn_norm",
    "mlp.fc1": "ffn.fc1",
    "mlp.fc2": "ffn.fc2",
}


def to_official(backbone_state: dict, vit_prefix: str, with_fusion: bool) -> dict:
    """A `RefersModel` state dict in the official names (ViT under `vit_prefix`, gates as `fusion.fc1..3`)."""
    official = {}
    for key, value in backbone_state.items():
        value = value.clone()
        if key in _OURS_TO_OFFICIAL:
            official[vit_prefix + _OURS_TO_OFFICIAL[key]] = value
        elif key.startswith("layers."):
            _, index, *module, leaf = key.split(".")
            official[f"{vit_prefix}encoder.layer.{index}.{_OURS_TO_OFFICIAL_BLOCK['.'.join(module)]}.{leaf}"] = value
        elif key.startswith("view_fusion.gate.") and with_fusion:
            leaf = key.rsplit(".", 1)[1]
            for view in range(value.shape[0]):
                official[f"fusion.fc{view + 1}.{leaf}"] = value[view : view + 1].clone()
        elif not key.startswith("view_fusion."):
            raise AssertionError(f"unexpected key {key}")
    return official


def pretraining_extras() -> dict:
    """Stand-ins for the official pretraining modules the converter must leave alone."""
    return {
        "contrastive_bert.text_encoder.embeddings.word_embeddings.weight": torch.randn(30, 8),
        "contrastive_bert.text_encoder.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8),
        "contrastive_bert.text_encoder.pooler.dense.weight": torch.randn(8, 8),
        "contrastive_bert.fc.weight": torch.randn(3 * HIDDEN, 8),
        "contrastive_bert.fc.bias": torch.randn(3 * HIDDEN),
        "textual.visual_projection.weight": torch.randn(16, HIDDEN),
        "textual.embedding.words.weight": torch.randn(30, 16),
        "textual.transformer.layers.0.linear1.weight": torch.randn(64, 16),
        "textual.output.weight": torch.randn(30, 16),
    }


def official_layouts(model: RefersModel, head: torch.nn.Linear | None = None) -> dict:
    """The same weights in the three layouts the official code writes."""
    state = model.state_dict()
    finetune = to_official(state, "transformer.", with_fusion=False)
    if head is not None:
        finetune.update({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()})
    pretrain_model = {**to_official(state, "visual.vit.transformer.", with_fusion=True), **pretraining_extras()}
    pretrain = {
        "model": pretrain_model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 3e-3, "momentum": 0.9, "params": [0, 1]}]},
        "iteration": 300000,
    }
    dataparallel = {"state_dict": {f"module.{key}": value for key, value in pretrain_model.items()}}
    return {"finetune": finetune, "pretrain": pretrain, "dataparallel": dataparallel}


def official_reference(sd: dict, images: torch.Tensor, prefix: str, heads: int = HEADS) -> torch.Tensor:
    """jeonsworld's ViT forward (Fine-tune/*/models/modeling.py), written from the official keys:
    `(n, C, H, W)` -> encoder output after `encoder_norm`, `(n, 1 + P, d)`."""
    g = lambda name: sd[prefix + name]  # noqa: E731
    d = g("embeddings.cls_token").shape[-1]
    x = F.conv2d(images, g("embeddings.patch_embeddings.weight"), g("embeddings.patch_embeddings.bias"),
                 stride=g("embeddings.patch_embeddings.weight").shape[-1])
    x = x.flatten(2).transpose(-1, -2)
    x = torch.cat([g("embeddings.cls_token").expand(x.shape[0], -1, -1), x], dim=1)
    x = x + g("embeddings.position_embeddings")
    n, s = x.shape[:2]
    layer_keys = [key[len(prefix + "encoder.layer."):] for key in sd if key.startswith(prefix + "encoder.layer.")]
    num_layers = len({key.split(".")[0] for key in layer_keys})
    for index in range(num_layers):
        block = f"encoder.layer.{index}."
        w = lambda name: (g(f"{block}{name}.weight"), g(f"{block}{name}.bias"))  # noqa: E731,B023
        h = x
        y = F.layer_norm(x, (d,), *w("attention_norm"), eps=1e-6)
        split = lambda t: t.view(n, s, heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(F.linear(y, *w(f"attn.{name}"))) for name in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        x = F.linear((probs @ v).permute(0, 2, 1, 3).reshape(n, s, d), *w("attn.out")) + h
        h = x
        y = F.layer_norm(x, (d,), *w("ffn_norm"), eps=1e-6)
        x = F.linear(F.gelu(F.linear(y, *w("ffn.fc1"))), *w("ffn.fc2")) + h
    return F.layer_norm(x, (d,), g("encoder.encoder_norm.weight"), g("encoder.encoder_norm.bias"), eps=1e-6)


def official_study_reference(sd: dict, views: list[torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`CaptioningModel.forward` + `fusion.forward` (Pre-train/refers): cls-add per view, one sigmoid gate per view
    from the concatenated views at each position, gated tokens concatenated along the sequence; global features
    concatenated. Returns `(visual_features_all (B, V*P, d), global_feature_all (B, V*d))`."""
    encoded = [official_reference(sd, images, prefix) for images in views]
    tokens = [out[:, 1:] + out[:, :1] for out in encoded]
    concatenated = torch.cat(tokens, dim=2)  # torch.cat((x1, x2, x3), 1) on (B*P, d) rows
    gated = []
    for view, token in enumerate(tokens):
        gate = torch.sigmoid(F.linear(concatenated, sd[f"fusion.fc{view + 1}.weight"], sd[f"fusion.fc{view + 1}.bias"]))
        gated.append(token * gate)
    return torch.cat(gated, dim=1), torch.cat([out[:, 0] for out in encoded], dim=1)


def save_checkpoint(tmp_path, obj, name="checkpoint.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.fixture
def original():
    return randomise(RefersModel(tiny_config()))


@pytest.mark.parametrize("layout", ["finetune", "pretrain", "dataparallel"])
def test_backbone_round_trip_gives_equal_outputs(tmp_path, radiographs, original, layout):
    checkpoint = save_checkpoint(tmp_path, official_layouts(original)[layout])
    output = convert_refers_original_checkpoint(checkpoint, tmp_path / "converted", num_attention_heads=HEADS)

    assert (output / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(output).eval()
    assert type(loaded) is RefersModel
    assert loaded.config.aggregation == "cls_add" and loaded.config.view_fusion == "sigmoid_gate"
    assert (loaded.config.hidden_size, loaded.config.num_hidden_layers, loaded.config.num_attention_heads,
            loaded.config.intermediate_size, loaded.config.image_size, loaded.config.patch_size) == (
        HIDDEN, LAYERS, HEADS, MLP, IMAGE, PATCH)

    images = radiographs(6, size=IMAGE)
    with torch.no_grad():
        ours, expected = loaded(images), original(images)
        assert torch.equal(ours.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(ours.pooler_output, expected.pooler_output)
        study = images.view(2, VIEWS, 3, IMAGE, IMAGE)
        ours_study, expected_study = loaded(study), original(study)
    assert torch.equal(ours_study.study_embeds, expected_study.study_embeds)
    if layout == "finetune":  # no fusion in a fine-tuning checkpoint: the gate keeps its initialisation
        assert not torch.equal(ours_study.study_hidden_states, expected_study.study_hidden_states)
    else:
        assert torch.equal(ours_study.study_hidden_states, expected_study.study_hidden_states)
        assert torch.equal(ours_study.view_weights, expected_study.view_weights)


def test_converted_model_matches_official_forward(tmp_path, radiographs, original):
    """Against the official forward written from the official keys: catches a mapping that is wrong in both
    directions (e.g. query/key swapped, gates in the wrong order), which a round trip alone would not."""
    official = official_layouts(original)["pretrain"]["model"]
    config = infer_official_config(official, num_attention_heads=HEADS)
    converted, report = convert_official_state_dict(official, config)
    model = RefersModel(report.config).eval()
    model.load_state_dict({key.removeprefix("refers."): value for key, value in converted.items()})

    images = radiographs(6, size=IMAGE)
    views = [images[view::VIEWS] for view in range(VIEWS)]  # study b, view v = images[b * V + v]
    with torch.no_grad():
        reference = official_reference(official, images, "visual.vit.transformer.")
        output = model(images)
        memory, global_features = official_study_reference(official, views, "visual.vit.transformer.")
        study = model(images.view(2, VIEWS, 3, IMAGE, IMAGE))
    cls_added = torch.cat([reference[:, :1], reference[:, 1:] + reference[:, :1]], dim=1)
    torch.testing.assert_close(output.last_hidden_state, cls_added, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(study.study_hidden_states, memory, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(study.study_embeds, global_features, rtol=1e-4, atol=1e-5)


def test_classification_keeps_head(tmp_path, radiographs):
    classifier = randomise(RefersForImageClassification(tiny_config(num_labels=5)))
    layouts = official_layouts(classifier.refers, head=classifier.classifier)
    checkpoint = save_checkpoint(tmp_path, layouts["finetune"])
    names = ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass"]
    output = convert_refers_original_checkpoint(
        checkpoint, tmp_path / "cls", task="classification", num_attention_heads=HEADS, label_names=names,
        problem_type="multi_label_classification",
    )
    loaded = AutoModelForImageClassification.from_pretrained(output).eval()
    assert loaded.config.num_labels == 5 and loaded.config.id2label[1] == "cardiomegaly"
    assert loaded.config.problem_type == "multi_label_classification"
    assert torch.equal(loaded.classifier.weight, classifier.classifier.weight)

    images = radiographs(4, size=IMAGE)
    with torch.no_grad():
        logits = loaded(images).logits
        assert torch.equal(logits, classifier(images).logits)
        # official fine-tuning model: logits = head(x[:, 0])
        encoded = official_reference(layouts["finetune"], images, "transformer.")
        expected = F.linear(encoded[:, 0], layouts["finetune"]["head.weight"], layouts["finetune"]["head.bias"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_classification_head_errors_and_new_head(tmp_path, original):
    with_head = official_layouts(original, head=torch.nn.Linear(HIDDEN, 5))["finetune"]
    checkpoint = save_checkpoint(tmp_path, with_head)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(5, 32\) but num_labels=3"):
        convert_refers_original_checkpoint(checkpoint, tmp_path / "a", task="classification", num_labels=3,
                                           num_attention_heads=HEADS)
    no_head = save_checkpoint(tmp_path, official_layouts(original)["pretrain"], "pretrain.pth")
    with pytest.raises(ValueError, match="has no classifier \\('head.weight'\\); pass num_labels"):
        convert_refers_original_checkpoint(no_head, tmp_path / "b", task="classification", num_attention_heads=HEADS)
    output = convert_refers_original_checkpoint(no_head, tmp_path / "c", task="classification", num_labels=3,
                                                num_attention_heads=HEADS)
    loaded = AutoModelForImageClassification.from_pretrained(output)
    assert loaded.classifier.out_features == 3
    assert torch.equal(loaded.refers.layers[1].mlp.fc2.weight, original.layers[1].mlp.fc2.weight)
    two_layer_head = official_layouts(original, head=torch.nn.Linear(2 * HIDDEN, 2))["finetune"]
    covid = save_checkpoint(tmp_path, two_layer_head, "covid.pth")
    with pytest.raises(ValueError, match=r"reads 64 features.*Use task='backbone'"):
        convert_refers_original_checkpoint(covid, tmp_path / "e", task="classification", num_attention_heads=HEADS)
    backbone = convert_refers_original_checkpoint(covid, tmp_path / "e", num_attention_heads=HEADS)
    assert (backbone / "config.json").is_file()  # the backbone task drops that head (reported as unmapped)
    with pytest.raises(ValueError, match="only apply to task='classification'"):
        convert_refers_original_checkpoint(checkpoint, tmp_path / "d", num_labels=5, num_attention_heads=HEADS)


def test_report_lists_unmapped_pretraining_modules(original):
    layouts = official_layouts(original, head=torch.nn.Linear(HIDDEN, 2))
    converted, report = convert_official_state_dict(layouts["dataparallel"], tiny_config())
    assert report.backbone_prefix == "visual.vit.transformer."
    assert report.unmapped_by_module() == {"contrastive_bert": 5, "textual": 4}
    assert set(report.unmapped_official_keys) == set(pretraining_extras())
    assert report.mapped["fusion.fc2.weight"] == "refers.view_fusion.gate.weight"
    key_bias = "visual.vit.transformer.encoder.layer.1.attn.key.bias"
    assert report.mapped[key_bias] == "refers.layers.1.attention.k_proj.bias"
    assert report.missing_keys == []
    assert len(converted) == len(original.state_dict())
    text = str(report)
    assert "contrastive_bert (5 tensors: pretraining text encoder" in text and "not mapped" in text

    _, finetune_report = convert_official_state_dict(layouts["finetune"], tiny_config())
    assert finetune_report.missing_keys == ["refers.view_fusion.gate.bias", "refers.view_fusion.gate.weight"]
    assert finetune_report.unmapped_official_keys == []
    assert finetune_report.mapped["head.weight"] == "classifier.weight"
    assert any("no official view fusion" in note for note in finetune_report.notes)


def test_config_inference_and_heads(original):
    official = official_layouts(original)["pretrain"]
    config = infer_official_config(official, num_attention_heads=HEADS)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.patch_size,
            config.image_size, config.num_channels, config.num_views, config.layer_norm_eps, config.hidden_act) == (
        HIDDEN, LAYERS, MLP, PATCH, IMAGE, 3, VIEWS, 1e-6, "gelu")
    with pytest.raises(ValueError, match="num_attention_heads=12 does not divide the checkpoint's hidden size 32"):
        infer_official_config(official)
    assert infer_official_config(official, num_attention_heads=HEADS, aggregation="none").aggregation == "none"


def test_resnet_state_dict_is_refused(tmp_path):
    resnet = {
        "conv1.weight": torch.randn(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "bn1.running_mean": torch.zeros(8),
        "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3),
        "fc.weight": torch.randn(14, 8),
        "fc.bias": torch.zeros(14),
    }
    checkpoint = save_checkpoint(tmp_path, {"state_dict": resnet})
    with pytest.raises(ValueError) as error:
        convert_refers_original_checkpoint(checkpoint, tmp_path / "out", num_attention_heads=HEADS)
    message = str(error.value)
    assert "not an official REFERS checkpoint" in message
    assert "'transformer.embeddings.patch_embeddings.weight'" in message
    assert "'visual.vit.transformer.embeddings.patch_embeddings.weight'" in message
    assert "conv1.weight" in message
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_key_and_wrong_shape_are_refused(original):
    official = official_layouts(original)["finetune"]
    hybrid = {**official, "transformer.embeddings.hybrid_model.root.conv.weight": torch.randn(4, 3, 7, 7)}
    with pytest.raises(ValueError, match="hybrid_model.root.conv.weight"):
        convert_official_state_dict(hybrid, tiny_config())
    with pytest.raises(ValueError, match=r"'transformer.encoder.layer.0.ffn.fc1.weight' has shape \(64, 32\)"):
        convert_official_state_dict(official, tiny_config(intermediate_size=128))
    with pytest.raises(ValueError, match="3 view gates"):
        convert_official_state_dict(official_layouts(original)["pretrain"], tiny_config(num_views=2))


def test_position_embeddings_resampled_for_another_image_size(tmp_path, radiographs, original):
    checkpoint = save_checkpoint(tmp_path, official_layouts(original)["pretrain"])
    output = convert_refers_original_checkpoint(checkpoint, tmp_path / "48", num_attention_heads=HEADS,
                                                config_overrides={"image_size": 48})
    loaded = AutoModel.from_pretrained(output)
    position = loaded.embeddings.position_embeddings
    assert position.shape == (1, 37, HIDDEN)
    assert torch.equal(position[:, 0], original.embeddings.position_embeddings[:, 0])
    with torch.no_grad():
        assert loaded(radiographs(2, size=48)).last_hidden_state.shape == (2, 37, HIDDEN)


class NotAWeight:
    """An arbitrary object: weights_only unpickling must refuse it."""

    def __init__(self):
        self.payload = "anything"


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, original):
    official = official_layouts(original)["pretrain"]
    for extra in (NotAWeight(), argparse.Namespace(lr=3e-3)):
        checkpoint = save_checkpoint(tmp_path, {**official, "args": extra})
        with pytest.raises(ValueError, match="Refused to load .*weights_only=True") as error:
            convert_refers_original_checkpoint(checkpoint, tmp_path / "out", num_attention_heads=HEADS)
        assert type(extra).__name__ in str(error.value)
    assert not (tmp_path / "out").exists()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read .*garbage.pth.*not a PyTorch checkpoint"):
        convert_refers_original_checkpoint(garbage, tmp_path / "out", num_attention_heads=HEADS)


def test_existing_output_dir_is_never_half_written(tmp_path, original, monkeypatch):
    checkpoint = save_checkpoint(tmp_path, official_layouts(original)["finetune"])
    output = tmp_path / "models" / "refers"
    output.mkdir(parents=True)
    (output / "keep.txt").write_text("previous model")

    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        convert_refers_original_checkpoint(checkpoint, output, num_attention_heads=HEADS)

    bad = save_checkpoint(tmp_path, {"fc.weight": torch.zeros(2, 2)}, "bad.pth")
    with pytest.raises(ValueError, match="not an official REFERS checkpoint"):
        convert_refers_original_checkpoint(bad, output, num_attention_heads=HEADS, overwrite=True)

    def failing_save(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(RefersModel, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_refers_original_checkpoint(checkpoint, output, num_attention_heads=HEADS, overwrite=True)
    assert sorted(path.name for path in output.iterdir()) == ["keep.txt"]
    assert sorted(path.name for path in output.parent.iterdir()) == ["refers"]  # no temporary folder left

    monkeypatch.undo()
    convert_refers_original_checkpoint(checkpoint, output, num_attention_heads=HEADS, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(path.name for path in output.parent.iterdir()) == ["refers"]


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_converted_folder_and_weights_follow_the_umask(tmp_path, original, umask):
    """mkdtemp makes the folder 0700 and safetensors 0.8 writes the weights 0600 (safetensors issue #782): the
    converted folder gets the modes mkdir() / open() give (0777 / 0666 less the umask), as every other file in it."""
    import os
    import stat

    checkpoint = save_checkpoint(tmp_path, official_layouts(original)["finetune"])
    previous = os.umask(umask)
    try:
        output = convert_refers_original_checkpoint(checkpoint, tmp_path / "converted", num_attention_heads=HEADS,
                                                    save_image_processor=True)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(output.stat().st_mode) == 0o777 & ~umask
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in output.iterdir()}
    assert "model.safetensors" in modes and "preprocessor_config.json" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}


def test_safetensors_input_and_cli(tmp_path, original, capsys):
    official = official_layouts(original)["pretrain"]["model"]
    checkpoint = tmp_path / "refers.safetensors"
    save_file({key: value.contiguous() for key, value in official.items()}, checkpoint)
    output = main([
        "--checkpoint_path", str(checkpoint), "--output_dir", str(tmp_path / "cli"), "--num_attention_heads", "4",
        "--aggregation", "none", "--save_image_processor",
    ])
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((output / "config.json").read_text())
    assert saved["aggregation"] == "none" and saved["num_attention_heads"] == HEADS and saved["model_type"] == "refers"
    assert AutoConfig.from_pretrained(output).view_fusion == "sigmoid_gate"
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": IMAGE, "width": IMAGE} and processor["image_mean"][0] == 0.485
    loaded = AutoModel.from_pretrained(output)
    assert torch.equal(loaded.view_fusion.gate.weight, original.view_fusion.gate.weight)


def test_module_entry_point(tmp_path, original, repo_root):
    checkpoint = save_checkpoint(tmp_path, official_layouts(original, head=torch.nn.Linear(HIDDEN, 2))["finetune"])
    result = subprocess.run(
        [sys.executable, "-m", "modeling_refers.convert_refers_original_checkpoint", "--checkpoint_path",
         str(checkpoint), "--output_dir", str(tmp_path / "m"), "--task", "classification",
         "--num_attention_heads", "4"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["RefersForImageClassification"]


def test_given_config_folder_and_overrides(tmp_path, radiographs, original):
    checkpoint = save_checkpoint(tmp_path, official_layouts(original)["pretrain"])
    config_dir = tmp_path / "config"
    tiny_config(aggregation="recurrent_concat").save_pretrained(config_dir)
    output = main(["--checkpoint_path", str(checkpoint), "--output_dir", str(tmp_path / "rc"), "--config",
                   str(config_dir)])
    loaded = AutoModel.from_pretrained(output)
    assert loaded.config.aggregation == "recurrent_concat"  # the given config wins over the official default
    # recurrent_concat is REFERS-only: absent from the checkpoint, it keeps its [I | 0] initialisation
    assert torch.equal(loaded.recurrent_concat.weight, torch.cat([torch.eye(HIDDEN), torch.zeros(HIDDEN, HIDDEN)], 1))
    assert torch.equal(loaded.layers[0].attention.q_proj.weight, original.layers[0].attention.q_proj.weight)

    output = main(["--checkpoint_path", str(checkpoint), "--output_dir", str(tmp_path / "ca"), "--config",
                   str(config_dir), "--aggregation", "cls_add"])
    images = radiographs(2, size=IMAGE)
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(output).eval()(images).last_hidden_state,
                           original(images).last_hidden_state)
    with pytest.raises(ValueError, match="RefersConfig has no field 'not_a_field'"):
        convert_refers_original_checkpoint(checkpoint, tmp_path / "x", config=tiny_config(),
                                           config_overrides={"not_a_field": 1})
    with pytest.raises(ValueError, match="aggregation must be one of"):
        convert_refers_original_checkpoint(checkpoint, tmp_path / "x", config=tiny_config(),
                                           config_overrides={"aggregation": "max"})
