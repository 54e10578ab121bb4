"""benchmarks/learning_benchmark.py end to end at smoke scale on Kermany (refers + random, one ratio, one seed): every
table cell is filled, the JSON holds every piece, and a rerun reuses every finished piece."""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import learning_benchmark  # noqa: E402


def test_learning_benchmark_smoke_and_resume(need_shared_data, tmp_path, caplog):
    data = need_shared_data("kermany_pneumonia/train", "kermany_pneumonia/test", "iu_xray/NLMCXR_reports.tgz",
                            why="the benchmark pretrains on Kermany paired with Open-i reports")
    argv = ["--smoke", "--methods", "refers", "--ratios", "0.01", "--seeds", "0", "--output_dir",
            str(tmp_path / "out"), "--data_dir", str(data / "kermany_pneumonia"), "--report", str(tmp_path / "lb")]
    from modeling_refers.training import finetuning

    loader = finetuning.load_target_dataset
    report = learning_benchmark.main(argv)
    assert finetuning.load_target_dataset is loader  # its build-once cache ends with the benchmark

    for key in ("finetune", "probe"):
        assert {(r["init"], r["label_ratio"]) for r in report[key]} == {("refers", 0.01), ("random", 0.01)}
        assert all(r["runs"] == 1 and 0.0 <= r["mean_auc"] <= 1.0 for r in report[key])
    assert 0.0 <= report["zero_shot"]["refers"]["mean_auc"] <= 1.0
    retrieval = report["retrieval"]["refers"]
    assert retrieval["studies"] > retrieval["reports"] > 10 and set(retrieval["recall"]) == {"R@1", "R@5", "R@10"}
    assert 0.0 <= retrieval["same_finding_precision_at_1"] <= 1.0
    saved = json.loads((tmp_path / "lb.json").read_text())
    assert saved["finetune"] == report["finetune"] and saved["settings"]["seeds"] == [0]
    table = (tmp_path / "lb.md").read_text()
    for heading in ("Fine-tuning", "Linear probe", "Zero-shot", "Held-out retrieval", "Wall time", "Settings"):
        assert heading in table
    assert table.count("| refers | VIT | 0.") == 2 and table.count("| random | VIT | 0.") == 2
    assert (tmp_path / "lb.png").stat().st_size > 1000

    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = learning_benchmark.main(argv)
    reused = " ".join(r.getMessage() for r in caplog.records if "done before" in r.getMessage())
    for piece in ("pretrain refers", "cell refers", "cell random", "probe vit refers", "probe vit random",
                  "zero-shot refers", "retrieval refers"):
        assert piece in reused, piece
    assert again["finetune"] == report["finetune"] and again["probe"] == report["probe"]
    assert again["total_wall_s"] == report["total_wall_s"]  # reused pieces keep the time they were made in
