"""The MRM converter on official-shaped checkpoints built here at tiny size from the published key names and shapes
(RL4M/MRM-pytorch model_mrm.py, bert/, NIH_ChestX-ray/models_vit.py): every key placed or named, values on the right
parameters, sizes inferred, both Auto classes load, clear refusals, and a fine-tuned checkpoint's logits equal timm's
VisionTransformer loaded with the same state dict."""

import argparse

import pytest
import timm
import torch
from transformers import AutoModelForImageClassification, AutoModelForPreTraining, BertConfig, BertForMaskedLM

import modeling_refers  # noqa: F401  (registers the Auto classes)
from modeling_refers import MRMForPreTraining, RefersForImageClassification
from modeling_refers.convert_mrm_original_checkpoint import convert_mrm_original_checkpoint, main

# tiny sizes; widths multiples of the assumed head widths (64 for the encoder and BERT, 128 for the decoder)
D, DEPTH, MLP, PATCH, IMAGE, C = 128, 2, 256, 8, 16, 3  # 4 patches
DD, DDEPTH, DMLP = 128, 1, 192
T, TDEPTH, TFFN, VOCAB, POSITIONS = 128, 2, 160, 40, 20


def _block(prefix: str, width: int, mlp: int) -> dict:
    return {
        f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
        f"{prefix}.attn.qkv.weight": (3 * width, width), f"{prefix}.attn.qkv.bias": (3 * width,),
        f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
        f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
        f"{prefix}.mlp.fc1.weight": (mlp, width), f"{prefix}.mlp.fc1.bias": (mlp,),
        f"{prefix}.mlp.fc2.weight": (width, mlp), f"{prefix}.mlp.fc2.bias": (width,),
    }


def _encoder_shapes() -> dict:
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + (IMAGE // PATCH) ** 2, D),
              "patch_embed.proj.weight": (D, C, PATCH, PATCH), "patch_embed.proj.bias": (D,)}
    for index in range(DEPTH):
        shapes.update(_block(f"blocks.{index}", D, MLP))
    return shapes


def official_pretraining_shapes() -> dict:
    """model_mrm.MRM's state dict at tiny size: key -> shape."""
    shapes = {**_encoder_shapes(), "norm.weight": (D,), "norm.bias": (D,),
              "decoder_embed.weight": (DD, D), "decoder_embed.bias": (DD,), "mask_token": (1, 1, DD),
              "decoder_pos_embed": (1, 1 + (IMAGE // PATCH) ** 2, DD),
              "decoder_norm.weight": (DD,), "decoder_norm.bias": (DD,),
              "decoder_pred.weight": ((2 * PATCH) ** 2 * C, DD), "decoder_pred.bias": ((2 * PATCH) ** 2 * C,),
              "bert_mlp.weight": (T, D), "bert_mlp.bias": (T,)}
    for index in range(DDEPTH):
        shapes.update(_block(f"decoder_blocks.{index}", DD, DMLP))
    bert = "bert_encoder.model.bert."
    shapes.update({
        bert + "embeddings.word_embeddings.weight": (VOCAB, T),
        bert + "embeddings.position_embeddings.weight": (POSITIONS, T),
        bert + "embeddings.token_type_embeddings.weight": (2, T),
        bert + "embeddings.LayerNorm.weight": (T,), bert + "embeddings.LayerNorm.bias": (T,),
        bert + "pooler.dense.weight": (T, T), bert + "pooler.dense.bias": (T,),
    })
    for index in range(TDEPTH):
        layer = f"{bert}encoder.layer.{index}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes.update({layer + name + ".weight": (T, T), layer + name + ".bias": (T,)})
        shapes.update({layer + "attention.output.LayerNorm.weight": (T,), layer + "attention.output.LayerNorm.bias": (T,),
                       layer + "intermediate.dense.weight": (TFFN, T), layer + "intermediate.dense.bias": (TFFN,),
                       layer + "output.dense.weight": (T, TFFN), layer + "output.dense.bias": (T,),
                       layer + "output.LayerNorm.weight": (T,), layer + "output.LayerNorm.bias": (T,)})
    mlm = "bert_encoder.model.cls.predictions."
    shapes.update({mlm + "bias": (VOCAB,), mlm + "transform.dense.weight": (T, T), mlm + "transform.dense.bias": (T,),
                   mlm + "transform.LayerNorm.weight": (T,), mlm + "transform.LayerNorm.bias": (T,),
                   mlm + "decoder.weight": (VOCAB, T), mlm + "decoder.bias": (VOCAB,)})
    return shapes


def _random(shapes: dict, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def official_pretraining(tmp_path_factory):
    """An official-shaped MRM.pth ({"model": ..., "args": Namespace, ...}, as main_pretrain.py saves) and its state dict; the
    BERT tensors tied as in the official model, position_ids saved as older transformers did."""
    state_dict = _random(official_pretraining_shapes())
    mlm = "bert_encoder.model.cls.predictions."
    state_dict[mlm + "decoder.weight"] = state_dict["bert_encoder.model.bert.embeddings.word_embeddings.weight"]
    state_dict[mlm + "decoder.bias"] = state_dict[mlm + "bias"]
    state_dict["bert_encoder.model.bert.embeddings.position_ids"] = torch.arange(POSITIONS)[None]
    path = tmp_path_factory.mktemp("official") / "MRM.pth"
    args = argparse.Namespace(model="mrm", norm_pix_loss=True, mask_ratio=0.75, output_dir="/path/to/output/")
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
    torch.save({"model": state_dict, "optimizer": optimizer, "epoch": 199, "scaler": {"scale": 65536.0},
                "args": args}, path)  # what util/misc.py save_model writes
    return path, state_dict


@pytest.fixture(scope="module")
def converted_pretraining(official_pretraining, tmp_path_factory):
    path, _ = official_pretraining
    output, report = convert_mrm_original_checkpoint(path, tmp_path_factory.mktemp("out") / "mrm-converted")
    return output, report


def test_the_hand_written_official_keys_are_timms_and_transformers(official_pretraining):
    """The test's official key names are those of timm's ViT blocks and transformers' BERT (what the official
    code builds on), so the checkpoint here is official-shaped and not an echo of the converter."""
    _, state_dict = official_pretraining
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=D,
                            depth=DEPTH, num_heads=2, mlp_ratio=MLP / D, num_classes=0)
    vit.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(("decoder", "mask_token", "bert"))},
                        strict=True)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=T, num_hidden_layers=TDEPTH,
                                      num_attention_heads=2, intermediate_size=TFFN, max_position_embeddings=POSITIONS))
    official_bert = {k[len("bert_encoder.model."):]: v for k, v in state_dict.items() if k.startswith("bert_encoder.")}
    result = bert.load_state_dict(official_bert, strict=False)
    # the official MyBertModel keeps a pooler; position_ids was a saved buffer in the transformers of the time
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == [
        "bert.embeddings.position_ids", "bert.pooler.dense.bias", "bert.pooler.dense.weight"]


def test_every_key_is_placed_or_named_and_sizes_are_inferred(official_pretraining, converted_pretraining):
    _, state_dict = official_pretraining
    _, report = converted_pretraining
    assert set(report.mapped) | set(report.no_place) == set(state_dict)
    assert not set(report.mapped) & set(report.no_place) and report.unknown_keys == []
    pooler = sorted(k for k in state_dict if ".pooler." in k)
    # BERT's pooler is unused by MRM: placed when the text encoder has one, else named with that reason
    pooler_placed = all(report.mapped.get(k, "").startswith("text_encoder.pooler.") for k in pooler)
    assert pooler_placed or all("never reads it" in report.no_place.get(k, "") for k in pooler)
    assert sorted(report.no_place) == sorted(["bert_encoder.model.bert.embeddings.position_ids"]
                                             + ([] if pooler_placed else pooler))
    assert report.mapped["blocks.1.attn.qkv.weight"] == ("refers.layers.1.attention.q_proj.weight, "
                                                         "refers.layers.1.attention.k_proj.weight, "
                                                         "refers.layers.1.attention.v_proj.weight")
    assert report.mapped["bert_mlp.weight"] == "report_condition.weight"
    assert report.sizes == dict(
        image_size=IMAGE, patch_size=PATCH, num_channels=C, hidden_size=D, num_hidden_layers=DEPTH,
        num_attention_heads=D // 64, intermediate_size=MLP, mrm_decoder_hidden_size=DD,
        mrm_decoder_num_hidden_layers=DDEPTH, mrm_decoder_num_attention_heads=DD // 128,
        mrm_decoder_intermediate_size=DMLP, mrm_reconstruction_size=2 * IMAGE, text_vocab_size=VOCAB,
        text_hidden_size=T, text_num_hidden_layers=TDEPTH, text_num_attention_heads=T // 64,
        text_intermediate_size=TFFN, text_max_position_embeddings=POSITIONS)
    text = str(report)
    assert pooler_placed or ("no place (2): bert_encoder.model.bert.pooler.dense.bias, "
                             "bert_encoder.model.bert.pooler.dense.weight: BERT's pooler") in text
    assert "no place (1): bert_encoder.model.bert.embeddings.position_ids: a buffer" in text
    assert "AFTER BERT's embedding LayerNorm" in text and "fixed 2-D sin-cos" in text


def test_values_land_on_the_right_parameters_and_both_auto_classes_load(official_pretraining,
                                                                         converted_pretraining):
    _, sd = official_pretraining
    folder, _ = converted_pretraining
    model = AutoModelForPreTraining.from_pretrained(folder)
    assert isinstance(model, MRMForPreTraining)
    ours = model.state_dict()
    qkv = sd["blocks.1.attn.qkv.weight"]
    expected = {
        "refers.embeddings.cls_token": sd["cls_token"], "refers.embeddings.position_embeddings": sd["pos_embed"],
        "refers.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "refers.layers.1.attention.q_proj.weight": qkv[:D], "refers.layers.1.attention.k_proj.weight": qkv[D:2 * D],
        "refers.layers.1.attention.v_proj.weight": qkv[2 * D:],
        "refers.layers.1.attention.v_proj.bias": sd["blocks.1.attn.qkv.bias"][2 * D:],
        "refers.layers.0.attention.o_proj.weight": sd["blocks.0.attn.proj.weight"],
        "refers.layers.0.layernorm_before.weight": sd["blocks.0.norm1.weight"],
        "refers.layers.0.layernorm_after.bias": sd["blocks.0.norm2.bias"],
        "refers.layers.1.mlp.fc1.weight": sd["blocks.1.mlp.fc1.weight"], "refers.layernorm.weight": sd["norm.weight"],
        "image_decoder.decoder_embed.weight": sd["decoder_embed.weight"], "image_decoder.mask_token": sd["mask_token"],
        "image_decoder.decoder_pos_embed": sd["decoder_pos_embed"],
        "image_decoder.decoder_layers.0.attention.k_proj.weight": sd["decoder_blocks.0.attn.qkv.weight"][DD:2 * DD],
        "image_decoder.decoder_layers.0.mlp.fc2.bias": sd["decoder_blocks.0.mlp.fc2.bias"],
        "image_decoder.decoder_norm.bias": sd["decoder_norm.bias"],
        "image_decoder.decoder_pred.weight": sd["decoder_pred.weight"],
        "text_encoder.embeddings.word_embeddings.weight": sd["bert_encoder.model.bert.embeddings.word_embeddings.weight"],
        "text_encoder.embeddings.position_embeddings.weight":
            sd["bert_encoder.model.bert.embeddings.position_embeddings.weight"],
        "text_encoder.encoder.layer.1.attention.self.value.weight":
            sd["bert_encoder.model.bert.encoder.layer.1.attention.self.value.weight"],
        "text_encoder.encoder.layer.0.output.LayerNorm.bias":
            sd["bert_encoder.model.bert.encoder.layer.0.output.LayerNorm.bias"],
        "report_head.predictions.transform.dense.weight":
            sd["bert_encoder.model.cls.predictions.transform.dense.weight"],
        "report_head.predictions.decoder.weight": sd["bert_encoder.model.cls.predictions.decoder.weight"],
        "report_head.predictions.bias": sd["bert_encoder.model.cls.predictions.bias"],
        "report_condition.weight": sd["bert_mlp.weight"], "report_condition.bias": sd["bert_mlp.bias"],
    }
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    # the encoder computes what timm's ViT (the official blocks) computes on the same weights
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=D,
                            depth=DEPTH, num_heads=D // 64, mlp_ratio=MLP / D, num_classes=0).eval()
    vit.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token", "bert"))})
    pixels = torch.randn(2, C, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model.refers(pixels).last_hidden_state, vit.forward_features(pixels),
                                   atol=1e-5, rtol=1e-5)
    classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=3)
    assert isinstance(classifier, RefersForImageClassification)
    assert torch.equal(classifier.refers.layers[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_head_counts_follow_the_flags_and_an_unknown_width_asks_for_one(official_pretraining, tmp_path):
    path, _ = official_pretraining
    _, report = convert_mrm_original_checkpoint(path, tmp_path / "a", num_attention_heads=4,
                                                text_num_attention_heads=8, decoder_num_attention_heads=2)
    assert (report.sizes["num_attention_heads"], report.sizes["text_num_attention_heads"],
            report.sizes["mrm_decoder_num_attention_heads"]) == (4, 8, 2)
    with pytest.raises(ValueError, match=r"--num_attention_heads 3 does not divide the radiograph transformer's width"):
        convert_mrm_original_checkpoint(path, tmp_path / "b", num_attention_heads=3)
    state_dict = _random({k: v for k, v in official_pretraining_shapes().items()})
    state_dict["decoder_embed.weight"] = torch.zeros(96, D)  # a 96-wide decoder: not a multiple of 128-wide heads
    torch.save({"model": state_dict}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"image decoder is 96 wide.*--decoder_num_attention_heads"):
        convert_mrm_original_checkpoint(tmp_path / "odd.pth", tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_unknown_and_misshapen_keys_are_refused_with_their_names(official_pretraining, tmp_path):
    _, state_dict = official_pretraining
    extra = {**state_dict, "image_proj.weight": torch.zeros(4, 4), "blocks.0.attn.q_norm.weight": torch.zeros(64)}
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"2 key\(s\) that the official MRM code does not have: "
                                         r"blocks\.0\.attn\.q_norm\.weight, image_proj\.weight\. Pass allow_unknown_keys"):
        convert_mrm_original_checkpoint(tmp_path / "extra.pth", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _, report = convert_mrm_original_checkpoint(tmp_path / "extra.pth", tmp_path / "y", allow_unknown_keys=True)
    assert report.unknown_keys == ["blocks.0.attn.q_norm.weight", "image_proj.weight"]
    assert "unknown, not converted (2)" in str(report)

    bad = {**state_dict, "bert_mlp.weight": torch.zeros(T + 1, D)}
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"shapes differ: bert_mlp\.weight \(129, 128\) -> report_condition\.weight "
                                         r"\(128, 128\)"):
        convert_mrm_original_checkpoint(tmp_path / "bad.pth", tmp_path / "z")
    missing = {k: v for k, v in state_dict.items() if k != "decoder_norm.weight"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"without a value: image_decoder\.decoder_norm\.weight"):
        convert_mrm_original_checkpoint(tmp_path / "missing.pth", tmp_path / "w")
    import pathlib

    torch.save({"model": state_dict, "output_dir": pathlib.PurePosixPath("/x")}, tmp_path / "object.pth")
    with pytest.raises(ValueError, match="Refused to load .*PurePosixPath"):  # only argparse.Namespace is let in
        convert_mrm_original_checkpoint(tmp_path / "object.pth", tmp_path / "u")
    torch.save({"model": {"transformer.embeddings.cls_token": torch.zeros(1, 1, 8)}}, tmp_path / "refers.pth")
    with pytest.raises(ValueError, match="not an official MRM checkpoint"):
        convert_mrm_original_checkpoint(tmp_path / "refers.pth", tmp_path / "v")


def test_a_fine_tuned_models_vit_checkpoint_converts_and_its_logits_equal_timms(tmp_path, capsys):
    """models_vit.VisionTransformer(global_pool=True) is timm's ViT with fc_norm and without norm: its state dict
    has timm's keys; timm's VisionTransformer(global_pool="avg", fc_norm=True) computes the same."""
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=D,
                            depth=DEPTH, num_heads=D // 64, mlp_ratio=MLP / D, num_classes=14, global_pool="avg",
                            fc_norm=True).eval()
    state_dict = _random({key: tuple(value.shape) for key, value in vit.state_dict().items()}, seed=3)
    assert {"fc_norm.weight", "head.weight"} <= set(state_dict) and "norm.weight" not in state_dict
    vit.load_state_dict(state_dict)
    torch.save(state_dict, tmp_path / "NIH_bestauc_checkpoint.bin")  # train.py saves the bare state dict
    output = main(["--checkpoint_path", str(tmp_path / "NIH_bestauc_checkpoint.bin"),
                   "--output_dir", str(tmp_path / "nih")])
    assert "official MRM fine-tuned checkpoint" in capsys.readouterr().out
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    assert type(model) is RefersForImageClassification
    assert (model.config.classifier_pooling, model.config.num_labels, model.config.problem_type) == (
        "mean", 14, "multi_label_classification")
    assert model.config.drop_path_rate == 0.1
    pixels = torch.randn(3, C, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, vit(pixels), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.classifier.weight, state_dict["head.weight"])
    assert torch.equal(model.refers.fc_norm.bias, state_dict["fc_norm.bias"])


def test_the_converted_pretraining_folder_starts_mrm_fine_tuning_as_the_official_train_py(official_pretraining,
                                                                                          converted_pretraining):
    """Official NIH train.py: models_vit(global_pool=True, drop_path_rate=0.1) loads MRM.pth with strict=False;
    missing exactly head and fc_norm (new), the pretrained final norm unused. The same through the Auto class and
    the classifier flags: the same features as timm's avg-pool ViT loaded that way."""
    _, sd = official_pretraining
    folder, _ = converted_pretraining
    model = AutoModelForImageClassification.from_pretrained(
        folder, num_labels=14, classifier_pooling="mean", drop_path_rate=0.1, classifier_initializer_range=2e-5).eval()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=D,
                            depth=DEPTH, num_heads=D // 64, mlp_ratio=MLP / D, num_classes=14, global_pool="avg",
                            fc_norm=True, drop_path_rate=0.1).eval()
    result = vit.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"norm.weight", "norm.bias"} <= set(result.unexpected_keys)
    pixels = torch.randn(2, C, IMAGE, IMAGE)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(model.refers(pixels).pooler_output, expected, atol=1e-5, rtol=1e-5)
    assert [round(getattr(layer.drop_path, "drop_prob", 0.0), 6) for layer in model.refers.layers] == [0.0, 0.1]
    assert 1.5e-5 < model.classifier.weight.std().item() < 2.5e-5
