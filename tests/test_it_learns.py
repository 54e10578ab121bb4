"""Learning is a feature: a tiny REFERS pretraining on paired-by-finding data (Kermany radiographs, Open-i reports of
the same finding) must learn to tell the findings apart, and the same run with the reports shuffled across studies
must not. Reports paired with the wrong studies, wrong InfoNCE positives or predictions out of order make the first
half fail; a pipeline that learns from something other than the pairing makes the second half fail.

The score is measured on held-out studies against held-out reports (validation patients and reports never seen in
training): the AUC of (mean similarity to pneumonia reports - mean similarity to normal reports) for the finding,
and same-finding precision@1 (the nearest held-out report has the study's finding).
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from datasets_scripts import load_kermany_paired_reports
from modeling_refers import RefersForPreTraining, RefersProcessor
from modeling_refers.tasks.retrieval import encode_reports, encode_studies

TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
        "num_views=1,view_fusion_hidden_size=32,decoder_hidden_size=32,decoder_num_attention_heads=2,"
        "decoder_intermediate_size=64,text_pooling=mean")
TRAIN_STUDIES, HELD_OUT_STUDIES, STEPS = 800, 200, 200


@pytest.fixture(scope="module")
def paired(data_source, shared_data_dir):
    root = shared_data_dir
    if data_source != "shared" or not (root / "kermany_pneumonia" / "train").is_dir():
        pytest.skip(f"needs kermany_pneumonia/ and iu_xray/ of the full shared data (not in sample_data/), looked in "
                    f"{root}; point REFERS_SHARED_DATA at it")
    data = load_kermany_paired_reports(root / "kermany_pneumonia", seed=0)
    return root / "kermany_pneumonia", data


def pretrain(tmp_path, data_dir, data, monkeypatch, name):
    from modeling_refers.training import pretraining

    monkeypatch.setattr(pretraining, "load_source_dataset", lambda *args, **kwargs: data)
    output_dir = tmp_path / name
    pretraining.main([
        "--dataset_name", "kermany_paired_reports", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--do_train", "--max_steps", str(STEPS), "--per_device_train_batch_size", "16", "--recipe", "adamw",
        "--learning_rate", "1e-3", "--text_learning_rate", "1e-3", "--weight_decay", "0.05", "--warmup_steps", "10",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--config_overrides", TINY, "--text_encoder_name_or_path", "none", "--report_tokenizer_vocab_size", "500",
        "--text_config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
        "--max_report_length", "64", "--max_train_samples", str(TRAIN_STUDIES), "--use_cpu", "--seed", "0",
        "--dataloader_pin_memory", "false", "--logging_steps", "20", "--disable_tqdm", "true", "--augment", "false",
    ])
    return output_dir


def held_out_scores(output_dir, held_out) -> tuple[float, float]:
    model = RefersForPreTraining.from_pretrained(output_dir).eval()
    processor = RefersProcessor.from_pretrained(output_dir)
    rows = held_out.select(range(HELD_OUT_STUDIES))
    studies = [[image] for (image,) in rows["images"]]
    is_pneumonia = np.array([f == "pneumonia" for f in rows["finding"]])
    reports = {}
    for report_id, report, finding in zip(held_out["report_id"], held_out["report"], held_out["finding"]):
        reports.setdefault(report_id, (report, finding))  # each held-out report once
    texts, report_findings = zip(*reports.values())
    report_is_pneumonia = np.array([f == "pneumonia" for f in report_findings])
    with torch.no_grad():
        similarity = (encode_studies(model, processor, studies) @ encode_reports(model, processor, texts).T).numpy()
    score = similarity[:, report_is_pneumonia].mean(1) - similarity[:, ~report_is_pneumonia].mean(1)
    auc = roc_auc_score(is_pneumonia, score)
    precision_at_1 = float((report_is_pneumonia[similarity.argmax(1)] == is_pneumonia).mean())
    return auc, precision_at_1


def test_pretraining_learns_the_finding_from_paired_reports_and_not_from_shuffled_ones(paired, tmp_path, monkeypatch):
    data_dir, data = paired
    held_out = data["validation"]
    majority = max(np.mean([f == "pneumonia" for f in held_out["finding"][:HELD_OUT_STUDIES]]),
                   np.mean([f == "normal" for f in held_out["finding"][:HELD_OUT_STUDIES]]))

    learned = pretrain(tmp_path, data_dir, data, monkeypatch, "paired")
    auc, precision = held_out_scores(learned, held_out)

    train = data["train"]
    shuffled_reports = list(np.random.default_rng(0).permutation(np.array(train["report"], dtype=object)))
    shuffled = data.copy()
    shuffled["train"] = train.remove_columns("report").add_column("report", shuffled_reports)
    control = pretrain(tmp_path, data_dir, shuffled, monkeypatch, "shuffled")
    control_auc, control_precision = held_out_scores(control, held_out)

    print(f"paired: AUC {auc:.3f}, same-finding P@1 {precision:.3f}; shuffled reports: AUC {control_auc:.3f}, "
          f"P@1 {control_precision:.3f}; majority {majority:.3f}")
    assert auc >= 0.80, f"paired pretraining reached only AUC {auc:.3f} on held-out studies"
    assert control_auc <= 0.70, f"shuffled reports still gave AUC {control_auc:.3f}: learning not from the pairing"
    assert auc - control_auc >= 0.2
