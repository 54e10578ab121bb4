"""The label-efficiency grid compares initialisations of one architecture, and its tables and plot say which."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_refers import RefersConfig, RefersForPreTraining

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from modeling_refers.training import finetuning as run_finetune  # noqa: E402
import run_label_efficiency  # noqa: E402

FAST = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--max_eval_samples", "32", "--max_predict_samples", "32", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--use_cpu", "--dataloader_pin_memory", "false"]
# A checkpoint whose architecture differs from RefersConfig() in every field the grid must copy.
ARCH = dict(image_size=48, patch_size=12, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=40, view_fusion_hidden_size=8, aggregation="cls_add", num_views=2,
            hidden_dropout_prob=0.05, layer_norm_eps=1e-5)


def _checkpoint(path: Path, **changes) -> str:
    config = RefersConfig.from_dict(dict(
        ARCH, decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_intermediate_size=32,
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50), bos_token_id=2, eos_token_id=3, **changes))
    RefersForPreTraining(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def nih_dir(shared_data_dir):
    return str(shared_data_dir / "nih_chestxray14_sample")


def test_random_and_timm_cells_get_the_checkpoints_architecture(tmp_path, nih_dir):
    from timm.models.vision_transformer import VisionTransformer

    refers = _checkpoint(tmp_path / "refers-ckpt")
    vit = VisionTransformer(img_size=48, patch_size=12, embed_dim=24, depth=2, num_heads=3, mlp_ratio=40 / 24,
                            num_classes=0)
    assert vit.blocks[0].mlp.fc1.out_features == 40
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "grid"
    rows = run_label_efficiency.main([
        "--output_dir", str(out), "--data_dir", nih_dir, "--ratios", "0.5", "--seeds", "0",
        "--inits", f"refers={refers}", f"imagenet={tmp_path / 'vit.pth'}", "random", "--", *FAST])

    expected = {k: getattr(RefersConfig.from_pretrained(refers), k) for k in run_label_efficiency.ARCHITECTURE_FIELDS}
    assert {k: ARCH[k] for k in ARCH} == {k: expected[k] for k in ARCH}  # the checkpoint is what the test says
    for init in ("refers", "imagenet", "random"):
        config = json.loads((out / init / "ratio-0.5" / "seed-0" / "results.json").read_text())["config"]
        assert {k: config[k] for k in expected} == expected, init
        model_config = json.loads((out / init / "ratio-0.5" / "seed-0" / "config.json").read_text())
        assert {k: model_config[k] for k in expected} == expected, init

    # Every table row and the plot say the architecture, the data and the labelled image counts.
    arch_text = "ViT 48px/12, width 24, 2 layers, 3 heads, MLP 40, cls_add, 2 views"
    cell = json.loads((out / "random" / "ratio-0.5" / "seed-0" / "results.json").read_text())
    n_train, n_test = cell["num_train_images"], cell["data"]["used_images"]["test"]
    assert n_test == 32
    assert {r["init"]: (r["architecture"], r["train_images"], r["test_images"]) for r in rows} == {
        init: (arch_text, str(n_train), "32") for init in ("refers", "imagenet", "random")}
    assert all(r["data"].startswith(f"NIH ChestX-ray14, folder {Path(nih_dir).name}") for r in rows)
    markdown = (out / "label_efficiency.md").read_text()
    for init in ("refers", "imagenet", "random"):
        assert f"| {init} | {arch_text} | 0.5 | {n_train} | 32 | 1 |" in markdown
    assert f"Data: {rows[0]['data']}." in markdown
    with open(out / "label_efficiency.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(t["init"], t["architecture"], t["train_images"], t["data"]) for t in table] == [
        (r["init"], arch_text, str(n_train), r["data"]) for r in rows]
    with Image.open(out / "label_efficiency.png") as image:
        assert image.format == "PNG"


def test_checkpoints_of_different_architectures_are_refused_naming_the_fields(tmp_path, nih_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(run_finetune, "main", lambda argv: calls.append(argv))
    small = _checkpoint(tmp_path / "small")
    wide = _checkpoint(tmp_path / "wide", hidden_size=48, num_attention_heads=4)
    out = tmp_path / "grid"
    with pytest.raises(ValueError, match=r"different architectures \(hidden_size: a=24, b=48; "
                                         r"num_attention_heads: a=3, b=4\)"):
        run_label_efficiency.main(["--output_dir", str(out), "--data_dir", nih_dir, "--ratios", "1.0", "--seeds",
                                   "0", "--inits", f"a={small}", f"b={wide}", "random"])
    # --config_overrides that contradict the checkpoint's architecture are refused too ...
    with pytest.raises(ValueError, match=r"image_size: --config_overrides 224, checkpoint 48"):
        run_label_efficiency.main(["--output_dir", str(out), "--inits", f"a={small}", "random", "--",
                                   "--config_overrides", "image_size=224,hidden_size=24"])
    # ... and timm weights of another width.
    from timm.models.vision_transformer import VisionTransformer

    torch.save(VisionTransformer(img_size=48, patch_size=12, embed_dim=36, depth=2, num_heads=3,
                                 num_classes=0).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"timm weights do not fit .*hidden_size: weights 36, grid 24"):
        run_label_efficiency.main(["--output_dir", str(out), "--inits", f"a={small}", f"t={tmp_path / 'vit.pth'}"])
    assert calls == [] and not out.exists()  # refused before any cell ran or any file was written


def test_a_reused_cell_of_another_architecture_is_refused(tmp_path):
    out = tmp_path / "grid"
    cell = out / "random" / "ratio-1" / "seed-0"
    cell.mkdir(parents=True)
    old = {"init": "random", "label_ratio": 1.0, "mean_auc": 0.5, "num_train_images": 3,
           "config": {k: getattr(RefersConfig(), k) for k in run_label_efficiency.ARCHITECTURE_FIELDS}}
    (cell / "results.json").write_text(json.dumps(old))
    tiny = "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64"
    with pytest.raises(ValueError, match=r"another architecture than the grid's \(image_size: cell 224, grid 32"):
        run_label_efficiency.main(["--output_dir", str(out), "--ratios", "1.0", "--seeds", "0", "--inits", "random",
                                   "--", "--config_overrides", tiny])


def test_a_cnn_checkpoint_gets_cnn_cells_and_is_not_mixed_with_a_vit(tmp_path, nih_dir, monkeypatch):
    """RadTex / CNN-ablation checkpoints: the random cell is built with the CNN; a ViT checkpoint beside it is
    refused naming `backbone`."""
    calls = []
    monkeypatch.setattr(run_finetune, "main", lambda argv: calls.append(argv) or {})
    cnn = _checkpoint(tmp_path / "cnn", backbone="resnet18", aggregation="none", hidden_size=512)
    vit = _checkpoint(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"backbone: a='resnet18', b='vit'"):
        run_label_efficiency.main(["--output_dir", str(tmp_path / "grid"), "--data_dir", nih_dir, "--ratios", "1.0",
                                   "--seeds", "0", "--inits", f"a={cnn}", f"b={vit}"])
    assert calls == []
    arch = run_label_efficiency.checkpoint_architecture(cnn)
    assert arch["backbone"] == "resnet18"
    assert run_label_efficiency.architecture_text(arch) == "resnet18 CNN 48px, width 512, 2 views"
    overrides = run_label_efficiency.cell_overrides(arch, None)
    assert "backbone=resnet18" in overrides.split(",") and "aggregation=none" in overrides.split(",")


def test_cell_weights_follow_the_umask(tmp_path, nih_dir):
    """Each cell's checkpoints and final weights get the mode open() gives (0666 less the umask), not safetensors
    0.8's 0600 (safetensors issue #782)."""
    import os
    import stat

    out = tmp_path / "grid"
    previous = os.umask(0o002)
    try:
        run_label_efficiency.main(["--output_dir", str(out), "--data_dir", nih_dir, "--ratios", "0.5", "--seeds", "0",
                                   "--inits", "random", "--", "--config_overrides",
                                   "image_size=32,patch_size=8,hidden_size=16,num_hidden_layers=1,"
                                   "num_attention_heads=2,intermediate_size=32,view_fusion_hidden_size=8", *FAST])
    finally:
        os.umask(previous)
    cell = out / "random" / "ratio-0.5" / "seed-0"
    weights = {path.relative_to(cell).as_posix(): stat.S_IMODE(path.stat().st_mode)
               for path in cell.rglob("*.safetensors")}
    assert {"model.safetensors", "checkpoint-1/model.safetensors"} <= set(weights)
    assert weights == {path: 0o664 for path in weights}
