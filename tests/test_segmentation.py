"""Segmentation: RefersBackbone (AutoBackbone contract, MRM's Feature2Pyramid), UperNet on it, MRM's losses and
Dice against hand computations, and run_segment end to end on real NIH radiographs with box-shaped masks.

The end-to-end run is a pipeline check: the masks are the NIH box table's boxes (atelectasis, infiltrate,
pneumonia), not pneumothorax outlines, and a few steps at 32 px learn nothing worth reporting.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

import modeling_refers
from modeling_refers import RefersBackbone, RefersConfig, RefersForImageClassification, RefersModel
from modeling_refers.loading import from_pretrained_checked
from modeling_refers.tasks.segmentation import (
    AUXILIARY_LOSS_WEIGHTS,
    DECODE_LOSS_WEIGHTS,
    build_segmentation_model,
    dice_loss,
    focal_loss,
    layer_decay_parameter_groups,
    main,
    mrm_segmentation_loss,
    per_image_dice,
    upernet_config,
)

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, hidden_dropout_prob=0.0, aggregation="none", use_view_fusion=False)
TINY_OVERRIDES = ",".join(f"{k}={v}" for k, v in TINY.items() if k not in ("aggregation", "use_view_fusion"))


def tiny_config(**kwargs) -> RefersConfig:
    return RefersConfig(**{**TINY, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Backbone contract
# ---------------------------------------------------------------------------------------------------------------------


def test_backbone_out_features_indices_channels_and_plain_feature_maps(radiographs):
    config = tiny_config(out_indices=[0, 1, 2])
    backbone = RefersBackbone(config).eval()
    assert backbone.out_features == ["stem", "stage1", "stage2"] and backbone.out_indices == [0, 1, 2]
    assert backbone.channels == [32, 32, 32] and backbone.stage_names == ["stem", "stage1", "stage2"]
    pixels = radiographs(2, size=32)
    out = backbone(pixels, output_hidden_states=True)
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, 32, 4, 4)] * 3
    # independent reference: the same weights as a RefersModel, its captured block outputs, patch (i, j) at token
    # 1 + 4 i + j
    model = RefersModel(config).eval()
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("layernorm.") for k in missing)
    reference = model(pixels, output_hidden_states=True).hidden_states
    assert len(reference) == len(out.hidden_states) == 3
    for stage, feature_map in enumerate(out.feature_maps):
        tokens = reference[stage][:, 1:]
        for i, j in ((0, 0), (1, 3), (3, 2)):
            torch.testing.assert_close(feature_map[:, :, i, j], tokens[:, 4 * i + j])
    # hidden states only on request, as transformers' backbones; return_dict=False gives the tuple
    assert backbone(pixels).hidden_states is None
    as_tuple = backbone(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    for a, b in zip(as_tuple[0], out.feature_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # stage selection after construction, as BackboneTesterMixin's test_create_from_modified_config
    backbone.config.out_indices = [2]
    assert backbone.out_features == ["stage2"] and len(backbone(pixels).feature_maps) == 1


def test_backbone_defaults_to_last_stage_and_refuses_bad_outputs():
    backbone = RefersBackbone(tiny_config())
    assert backbone.out_features == ["stage2"] and backbone.out_indices == [2]
    with pytest.raises(ValueError, match="out_indices must be valid"):
        tiny_config(out_indices=[1, 5])
    with pytest.raises(ValueError, match="one factor per out feature"):
        RefersBackbone(tiny_config(out_indices=[1, 2], feature_pyramid_rescales=[2, 1, 0.5]))
    with pytest.raises(ValueError, match="must be one of"):
        RefersBackbone(tiny_config(out_indices=[1, 2], feature_pyramid_rescales=[3, 1]))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        RefersBackbone(tiny_config()).eval()(torch.zeros(1, 3, 30, 32))


def test_feature_pyramid_rescales_as_mrm_neck(radiographs):
    config = tiny_config(out_indices=[0, 1, 2], feature_pyramid_rescales=[4, 2, 0.5])
    backbone = RefersBackbone(config).eval()
    plain = RefersBackbone(tiny_config(out_indices=[0, 1, 2])).eval()
    plain.load_state_dict(backbone.state_dict(), strict=False)
    pixels = radiographs(2, size=32)
    maps, single = backbone(pixels).feature_maps, plain(pixels).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 2, 2)]
    assert backbone.channels == [32, 32, 32]
    four, two = backbone.neck.levels[0], backbone.neck.levels[1]
    assert [type(m).__name__ for m in four] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    # x2: one stride-2 transposed convolution, by hand: out[2i + a, 2j + b] = W[:, :, a, b]^T x[i, j] + bias
    x = single[1]
    expected = torch.einsum("ncij,cdab->ndiajb", x, two.weight).reshape(2, 32, 8, 8) + two.bias[None, :, None, None]
    torch.testing.assert_close(maps[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps[2], F.max_pool2d(single[2], 2))  # x0.5
    torch.testing.assert_close(maps[0], four(single[0]))


def test_backbone_save_load_round_trip_and_auto_backbone(tmp_path, radiographs, local_hub):
    """save_pretrained / from_pretrained, and AutoBackbone from the Hub (transformers 5.25's
    `AutoBackbone.from_pretrained` asks the Hub whether the name exists, so a local folder fails there for every
    model, Dinov2 included: the offline test Hub serves the folder)."""
    from huggingface_hub import create_repo, upload_folder

    config = tiny_config(out_indices=[0, 1, 2], feature_pyramid_rescales=[4, 2, 0.5])
    backbone = RefersBackbone(config).eval()
    pixels = radiographs(1, size=32)
    expected = backbone(pixels).feature_maps
    backbone.save_pretrained(tmp_path / "bb")
    saved = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert saved["out_features"] == ["stem", "stage1", "stage2"] and saved["out_indices"] == [0, 1, 2]
    assert saved["feature_pyramid_rescales"] == [4, 2, 0.5]
    assert saved["auto_map"]["AutoBackbone"] == "modeling_refers.RefersBackbone"
    assert (tmp_path / "bb" / "modeling_refers.py").is_file()
    create_repo("org/refers-backbone")
    upload_folder(repo_id="org/refers-backbone", folder_path=tmp_path / "bb")
    for loaded in (RefersBackbone.from_pretrained(tmp_path / "bb"), AutoBackbone.from_pretrained("org/refers-backbone")):
        assert type(loaded) is RefersBackbone and loaded.out_features == backbone.out_features
        for a, b in zip(loaded.eval()(pixels).feature_maps, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # out_indices given at load time, as for Dinov2 (`AutoBackbone.from_pretrained(name, out_indices=...)`)
    other = AutoBackbone.from_pretrained("org/refers-backbone", out_indices=[1, 2], feature_pyramid_rescales=[1, 0.5])
    assert other.out_features == ["stage1", "stage2"] and [tuple(m.shape[2:]) for m in other(pixels).feature_maps] \
        == [(4, 4), (2, 2)]


def test_backbone_loads_with_trust_remote_code_without_the_package(tmp_path, radiographs, local_hub):
    from huggingface_hub import create_repo, upload_folder

    backbone = RefersBackbone(tiny_config(out_indices=[0, 1, 2], feature_pyramid_rescales=[4, 2, 0.5])).eval()
    pixels = radiographs(1, size=32)
    expected = backbone(pixels).feature_maps
    backbone.save_pretrained(tmp_path / "bb")
    create_repo("org/refers-backbone")
    upload_folder(repo_id="org/refers-backbone", folder_path=tmp_path / "bb")
    torch.save(pixels, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoBackbone
        model = AutoBackbone.from_pretrained("org/refers-backbone", trust_remote_code=True).eval()
        assert "modeling_refers" not in sys.modules, "the package was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        for a, b in zip(model(torch.load({str(tmp_path / "x.pt")!r})).feature_maps, torch.load({str(tmp_path / "expected.pt")!r})):
            assert torch.equal(a, b)
        print("remote-ok")
        """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "remote-ok" in run.stdout


def test_backbone_from_a_refers_checkpoint_keeps_the_encoder(tmp_path, radiographs):
    """A REFERS classifier checkpoint (recurrent concatenation, prefix `refers.`): only the neck is new, and the last
    stage equals the classifier's own last block output."""
    classifier = RefersForImageClassification(tiny_config(aggregation="recurrent_concat", num_labels=3)).eval()
    classifier.save_pretrained(tmp_path / "clf")
    config = RefersConfig.from_pretrained(tmp_path / "clf", out_indices=[0, 1, 2], feature_pyramid_rescales=[4, 2, 1])
    backbone, report = from_pretrained_checked(RefersBackbone, tmp_path / "clf", config=config)
    assert report.new_keys and all(key.startswith("neck.") for key in report.new_keys)
    assert any(key.startswith("classifier.") for key in report.dropped_keys)
    pixels = radiographs(2, size=32)
    reference = classifier.refers(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    last = backbone.eval()(pixels).feature_maps[2]  # the x1 level: stage 2 unchanged
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), reference)


# ---------------------------------------------------------------------------------------------------------------------
# UperNet
# ---------------------------------------------------------------------------------------------------------------------


def test_transformers_upernet_runs_on_the_backbone(tmp_path, radiographs):
    backbone_config = tiny_config(out_indices=[0, 1, 2], feature_pyramid_rescales=[4, 2, 1])
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, hidden_size=16,
                                                         auxiliary_channels=8, num_labels=2))
    assert type(model.backbone) is RefersBackbone
    pixels, labels = radiographs(2, size=32), (torch.rand(2, 32, 32) > 0.8).long()
    out = model(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (2, 2, 32, 32) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.backbone.neck.levels[0][0].weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path / "upernet")
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    assert type(loaded.backbone) is RefersBackbone
    torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits, rtol=0, atol=0)


def test_mrm_upernet_heads_and_loss(radiographs):
    model, init = build_segmentation_model(None, TINY_OVERRIDES, out_indices=[0, 1, 2], rescales=[2, 1, 0.5])
    assert init == "random"
    config = model.config
    assert config.hidden_size == 32 and list(config.pool_scales) == [1, 2, 3, 6] and config.auxiliary_channels == 256
    assert model.config.backbone_config.feature_pyramid_rescales == [2, 1, 0.5]
    # MRM's drop path 0.1, rising over the blocks (timm's rule): 0 for block 1, 0.1 for the last
    assert model.config.backbone_config.drop_path_rate == 0.1
    assert [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.backbone.layers] == pytest.approx([0.0, 0.1])
    model.eval()  # no stochastic depth in the hand computation below
    pixels, labels = radiographs(2, size=32), (torch.rand(2, 32, 32) > 0.8).long()
    out = model(pixel_values=pixels, labels=labels)
    features = model.backbone(pixels).feature_maps
    up = lambda logits: F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    logits, auxiliary = up(model.decode_head(features)), up(model.auxiliary_head(features))
    torch.testing.assert_close(out.logits, logits)
    expected = (2.0 * focal_loss(logits, labels) + 1.0 * dice_loss(logits, labels)
                + 0.8 * focal_loss(auxiliary, labels) + 0.4 * dice_loss(auxiliary, labels))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    idle = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []
    with pytest.raises(ValueError, match="third feature map"):
        build_segmentation_model(None, TINY_OVERRIDES, out_indices=[1, 2], rescales=[1, 0.5])


def test_layer_decay_groups():
    model, _ = build_segmentation_model(None, TINY_OVERRIDES, out_indices=[0, 1, 2], rescales=[2, 1, 0.5])
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["backbone.embeddings.patch_embeddings.projection.weight"])] == (0.125, 0.05)  # 0.5^3
    assert lr_of[id(named["backbone.embeddings.position_embeddings"])] == (0.125, 0.0)
    assert lr_of[id(named["backbone.layers.0.attention.q_proj.weight"])] == (0.25, 0.05)
    assert lr_of[id(named["backbone.layers.1.layernorm_before.weight"])] == (0.5, 0.0)
    assert lr_of[id(named["decode_head.classifier.weight"])] == (1.0, 0.05)
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Losses and metric against hand computations
# ---------------------------------------------------------------------------------------------------------------------


def test_focal_loss_by_hand():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 1.5]]]])  # (1, 2 classes, 1, 2 pixels)
    labels = torch.tensor([[[0, 1]]])

    def term(z, t, alpha=0.5, gamma=2.0):  # mmseg / Lin et al.: -alpha_t (1 - p_t)^gamma log p_t
        p = 1 / (1 + math.exp(-z))
        p_t, a_t = (p, alpha) if t else (1 - p, 1 - alpha)
        return -a_t * (1 - p_t) ** gamma * math.log(p_t)

    # class 0 channel: pixel 0 positive, pixel 1 negative; class 1 channel: the reverse
    expected = (term(2.0, 1) + term(-1.0, 0) + term(0.5, 0) + term(1.5, 1)) / 4
    assert focal_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_by_hand():
    logits = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[1, 0], [0, 1]]])
    p1 = [1 / (1 + math.exp(-(b - a))) for a, b in ((0.0, 1.0), (1.0, 0.0), (2.0, 0.0), (-1.0, 1.0))]
    t1 = [1, 0, 0, 1]
    numerator = 2 * sum(p * t for p, t in zip(p1, t1)) + 1
    denominator = sum(p * p for p in p1) + sum(t1) + 1
    expected = (1 - numerator / denominator) / 2  # class weight [0, 1], divided by the 2 classes (mmseg)
    assert dice_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)  # float32
    # batch mean of per-image losses
    two = dice_loss(torch.cat([logits, torch.zeros_like(logits)]), torch.cat([labels, labels]))
    zero_image = (1 - (2 * 0.5 * 2 + 1) / (4 * 0.25 + 2 + 1)) / 2
    assert two.item() == pytest.approx((expected + zero_image) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="255"):
        dice_loss(logits, labels * 255)


def test_mrm_loss_weights():
    assert DECODE_LOSS_WEIGHTS == (2.0, 1.0) and AUXILIARY_LOSS_WEIGHTS == (0.8, 0.4)
    logits, auxiliary = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    labels = (torch.rand(2, 8, 8) > 0.5).long()
    terms = mrm_segmentation_loss(logits, labels, auxiliary)
    expected = 2.0 * terms["focal"] + terms["dice"] + 0.8 * terms["auxiliary_focal"] + 0.4 * terms["auxiliary_dice"]
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["auxiliary_focal"], focal_loss(auxiliary, labels))


def test_per_image_dice_is_mrm_med_dice():
    true = np.zeros((4, 2, 3), dtype=int)
    predicted = np.zeros((4, 2, 3), dtype=int)
    true[0, 0, :2] = 1; predicted[0, 0, 1:] = 1  # noqa: E702  overlap 1, sizes 2 + 2 -> 0.5
    predicted[1, 1, 1] = 1  # empty truth, non-empty prediction -> 0
    # image 2: both empty -> 1
    true[3, 1, :] = 1  # missed entirely -> 0
    np.testing.assert_allclose(per_image_dice(predicted, true), [0.5, 0.0, 1.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------------
# run_segment end to end (pipeline check on real radiographs, box masks)
# ---------------------------------------------------------------------------------------------------------------------


def box_mask_dataset(shared_data_dir, path):
    """A DatasetDict of real NIH radiographs (64 x 64) with masks drawn from the official NIH box table (1 inside a
    box, scaled 64 / 1024) and a few images without a box (empty masks); saved with save_to_disk."""
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, Value

    folder = shared_data_dir / "nih_chestxray14_sample"
    images = sorted(p.name for p in (folder / "images").glob("*.png"))
    with open(folder / "BBox_List_2017.csv", newline="") as handle:
        boxes = [row for row in csv.reader(handle)][1:]
    boxed = {}
    for name, _, x, y, w, h in boxes:
        if name in images:
            boxed.setdefault(name, []).append([float(v) * 64 / 1024 for v in (x, y, w, h)])
    if len(boxed) < 4:
        pytest.skip(f"needs >= 4 NIH images with a box in {folder} (found {len(boxed)})")
    empty = [name for name in images if name not in boxed][:4]

    def row(name):
        with Image.open(folder / "images" / name) as image:
            image = image.convert("L")
        mask = np.zeros((image.height, image.width), dtype=np.uint8)
        for x, y, w, h in boxed.get(name, []):
            mask[int(y):int(math.ceil(y + h)), int(x):int(math.ceil(x + w))] = 1
        return {"image_id": name, "patient_id": name[:8], "image": image, "mask": Image.fromarray(mask, mode="L")}

    names = sorted(boxed)
    splits = {"test": names[:2] + empty[:1], "validation": names[2:3] + empty[1:2], "train": names[3:] + empty[2:]}
    features = Features({"image_id": Value("string"), "patient_id": Value("string"), "image": ImageFeature(),
                         "mask": ImageFeature()})
    data = DatasetDict({split: Dataset.from_list([row(n) for n in rows], features=features)
                        for split, rows in splits.items()})
    data.save_to_disk(str(path))
    return data


def test_run_segment_end_to_end(tmp_path, shared_data_dir):
    data = box_mask_dataset(shared_data_dir, tmp_path / "data")
    assert sum(np.asarray(m).sum() > 0 for m in data["train"]["mask"]) >= 1
    # a REFERS checkpoint to start from
    RefersForImageClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path / "ckpt")
    argv = ["--dataset_path", str(tmp_path / "data"), "--model_name_or_path", str(tmp_path / "ckpt"),
            "--out_indices", "0", "1", "2", "--feature_pyramid_rescales", "2", "1", "0.5", "--image_size", "32",
            "--output_dir", str(tmp_path / "run"), "--do_train", "--max_steps", "2", "--eval_steps", "2",
            "--save_steps", "2", "--warmup_steps", "0", "--learning_rate", "1e-3", "--layer_decay", "0.65",
            "--per_device_train_batch_size", "2", "--use_cpu", "--dataloader_num_workers", "0", "--num_overlays", "2",
            "--seed", "0"]
    results = main(argv)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["init"] == "checkpoint" and saved["training"]["global_step"] == 2
    assert 0.0 <= saved["test_dice"] <= 1.0 and 0.0 <= saved["validation_dice"] <= 1.0
    assert saved["num_images"] == {"train": len(data["train"]), "validation": 2, "test": 3}
    assert saved["num_test_images_scored"] == 3  # no image dropped by a short last batch
    assert saved["backbone"]["out_features"] == ["stem", "stage1", "stage2"]
    assert len(saved["overlays"]) == 2
    overlay = Image.open(tmp_path / "run" / saved["overlays"][0]["file"])
    assert overlay.mode == "RGB" and overlay.size == (256, 256)
    # the test Dice is the mean per-image Dice of the saved model's argmax predictions (hand computation)
    model = modeling_refers.tasks.segmentation.RefersUperNetForSemanticSegmentation.from_pretrained(
        tmp_path / "run").eval()
    collate = modeling_refers.tasks.segmentation.SegmentationCollator(32)
    batch = collate([data["test"][i] for i in range(3)])
    with torch.no_grad():
        predicted = model(pixel_values=batch["pixel_values"]).logits.argmax(1).numpy()
    true = batch["labels"].numpy()
    by_hand = []
    for p, t in zip(predicted, true):
        by_hand.append(float(p.sum() == 0) if t.sum() == 0 else 2 * (p & t).sum() / (p.sum() + t.sum()))
    assert saved["test_dice"] == pytest.approx(float(np.mean(by_hand)))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    # resumable: the same command again resumes checkpoint-2 (nothing left to train) and reports the same step
    again = main(argv)
    assert again["training"]["global_step"] == 2 and again["test_dice"] == saved["test_dice"]
    # another run in the same folder is refused
    with pytest.raises(ValueError):
        main([*argv[:-2], "--seed", "1"])


def test_run_segment_refuses_bad_data(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({s: Dataset.from_dict({"image_id": ["a"]}) for s in ("train", "validation", "test")}).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="lacks the column"):
        main(["--dataset_path", str(tmp_path / "bad"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_backbone_from_an_mrm_pretraining_folder(tmp_path, radiographs):
    """An MRM folder (model_type mrm, image decoder and BERT beside the encoder): only the neck is new and the
    feature maps are its encoder's blocks."""
    from modeling_refers import MRMForPreTraining

    config = MRMForPreTraining.default_config(
        **{k: v for k, v in TINY.items() if k not in ("aggregation", "use_view_fusion")}, mrm_decoder_hidden_size=16,
        mrm_decoder_num_hidden_layers=1, mrm_decoder_num_attention_heads=2, mrm_decoder_intermediate_size=32,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64))
    mrm = MRMForPreTraining(config).eval()
    mrm.save_pretrained(tmp_path / "mrm")
    model, init = build_segmentation_model(str(tmp_path / "mrm"), None, out_indices=[0, 1, 2], rescales=[4, 2, 1])
    assert init == "checkpoint"
    pixels = radiographs(2, size=32)
    reference = mrm.refers(pixels, output_hidden_states=True).hidden_states
    maps = model.backbone.eval()(pixels).feature_maps
    torch.testing.assert_close(maps[2].flatten(2).transpose(1, 2), reference[2][:, 1:])


from test_datasets_siim import siim  # noqa: E402,F401  (the SIIM stage-1 fixture: real radiographs as DICOM + RLE)


@pytest.mark.filterwarnings("ignore:siim_acr_pneumothorax. split")
def test_run_segment_on_the_siim_builder(tmp_path, siim):
    """--dataset_name siim_acr_pneumothorax reads the Kaggle layout through the builder (pipeline check: 6 images)."""
    results = main(["--dataset_name", "siim_acr_pneumothorax", "--data_dir", str(siim["root"]),
                    "--config_overrides", TINY_OVERRIDES, "--out_indices", "0", "1", "2",
                    "--feature_pyramid_rescales", "2", "1", "0.5", "--image_size", "32", "--output_dir",
                    str(tmp_path / "run"), "--do_train", "--max_steps", "2", "--eval_strategy", "no",
                    "--save_strategy", "no", "--load_best_model_at_end", "false", "--warmup_steps", "0",
                    "--use_cpu", "--num_overlays", "1"])
    assert results["init"] == "random" and results["training"]["global_step"] == 2
    assert results["num_images"] == {"train": 3, "validation": 2, "test": 2}
    assert 0.0 <= results["test_dice"] <= 1.0
    assert (tmp_path / "run" / results["overlays"][0]["file"]).is_file()


def test_trainer_evaluates_without_flips_and_keeps_every_image(tmp_path):
    from datasets import Dataset
    from modeling_refers.tasks.segmentation import SegmentationCollator, SegmentationTrainer
    from modeling_refers.tasks.segmentation import SegmentationTrainingArguments

    model, _ = build_segmentation_model(None, TINY_OVERRIDES, out_indices=[0, 1, 2], rescales=[2, 1, 0.5])
    rows = Dataset.from_dict({"k": list(range(5))})
    args = SegmentationTrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=2,
                                         per_device_train_batch_size=2)
    assert args.dataloader_drop_last  # training batches: the pyramid pooling's BatchNorm needs 2 images
    trainer = SegmentationTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                                  data_collator=SegmentationCollator(32, train=True),
                                  eval_data_collator=SegmentationCollator(32, train=False))
    train_loader = trainer.get_train_dataloader()  # per_device_train_batch_size 2 (set below): 5 rows -> 2 batches
    eval_loader = trainer.get_eval_dataloader(rows)
    test_loader = trainer.get_test_dataloader(rows)
    assert len(train_loader) == 2 and len(eval_loader) == 3 and len(test_loader) == 3
    assert test_loader.collate_fn.train is False
    assert trainer.data_collator.train is True and trainer.args.dataloader_drop_last  # restored after evaluation
    assert eval_loader.collate_fn.train is False and train_loader.collate_fn.train is True


def test_overlay_draws_both_contours(tmp_path, shared_data_dir):
    from modeling_refers.tasks.segmentation import save_overlay

    image = Image.open(sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))[0])
    true, predicted = np.zeros((32, 32), int), np.zeros((32, 32), int)
    true[5:15, 10:20] = 1  # 80 x 80 pixels at 256: a 2-pixel inner boundary has 80^2 - 76^2 = 624
    save_overlay(image, predicted, true, tmp_path / "o.png")
    drawn = np.asarray(Image.open(tmp_path / "o.png"))
    assert drawn.shape == (256, 256, 3)
    assert (drawn == [0, 255, 0]).all(-1).sum() == 624 and (drawn == [255, 0, 0]).all(-1).sum() == 0
    assert (drawn[40:42, 80:160] == [0, 255, 0]).all() and (drawn[42:118, 82:158] != [0, 255, 0]).any(-1).all()
    predicted[20:30, 1:5] = 1  # 80 x 32 at 256: 80 * 32 - 76 * 28 = 432 red pixels, apart from the green box
    save_overlay(image, predicted, true, tmp_path / "o.png")
    assert (np.asarray(Image.open(tmp_path / "o.png")) == [255, 0, 0]).all(-1).sum() == 432
