"""Every pretraining method side by side on real data: pretrain each with one small configuration on the
COVID-19-collection studies (clinical notes as reports), then fine-tune each and a random initialisation on the COVID
task and the NIH sample at several label ratios and seeds; mean +- std test AUC, two-sample t-test p-values against
the random initialisation of the same backbone, a Markdown table and a PNG plot.

Fair comparisons: the ViT methods (refers, mrm, joimternet) share one small radiograph transformer (aggregation
"none", which all three support) and are compared with a random ViT of that architecture; RadTex (a CNN) with a
random CNN of its own architecture. Each fine-tuning grid is `examples/run_label_efficiency.py` (finished cells are not
run again; the pretraining folders are reused too).

    python benchmarks/compare_methods.py --output_dir runs/compare --seeds 0 1 2 3 4
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from scipy import stats

from modeling_refers.file_utils import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
VIT = ("image_size=64,patch_size=16,hidden_size=96,num_hidden_layers=3,num_attention_heads=3,intermediate_size=384,"
       "aggregation=none,view_fusion_hidden_size=96,hidden_dropout_prob=0.0")
CNN = "backbone=resnet18,aggregation=none,hidden_size=512,image_size=64"
DECODER = "decoder_hidden_size=128,decoder_num_attention_heads=2,decoder_intermediate_size=512"
MRM_DECODER = ("mrm_decoder_hidden_size=64,mrm_decoder_num_hidden_layers=2,mrm_decoder_num_attention_heads=2,"
               "mrm_decoder_intermediate_size=256")
TEXT = "hidden_size=128,num_hidden_layers=2,num_attention_heads=2,intermediate_size=512"
METHODS = {  # method -> (family, config overrides)
    "refers": ("vit", f"{VIT},{DECODER}"),
    "mrm": ("vit", f"{VIT},{MRM_DECODER},use_view_fusion=true"),  # the others' architecture (fusion idle in MRM)
    "joimternet": ("vit", f"{VIT},projection_dim=128"),
    "radtex": ("cnn", f"{CNN},{DECODER}"),
}
TASKS = {"covid19": "covid19_collection", "nih_chestxray14": "nih_chestxray14_sample"}


def run(command: list[str]) -> None:
    print("+", " ".join(command[1:3]), "...", flush=True)
    subprocess.run(command, check=True, cwd=REPO, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))


def pretrain(method: str, out: Path, data_root: Path, steps: int, batch: int) -> Path:
    folder = out / "pretrain" / method
    if (folder / "model.safetensors").is_file():
        return folder
    _, overrides = METHODS[method]
    args = [sys.executable, str(EXAMPLES / "run_pretrain.py"), "--method", method, "--output_dir", str(folder),
            "--data_dir", str(data_root / "covid19_collection"), "--config_overrides", overrides,
            "--text_encoder_name_or_path", "none", "--report_tokenizer_vocab_size", "2000", "--text_config_overrides",
            TEXT, "--do_train", "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--eval_steps", str(max(steps // 3, 1)), "--save_steps", str(max(steps // 3, 1)), "--warmup_steps", "0.1",
            "--use_cpu", "--report_to", "none"]
    if method != "mrm":  # demo-length learning rates (MRM keeps its recipe: AdamW, 1.5e-4 x batch / 256)
        args += ["--learning_rate", "0.05", "--text_learning_rate", "0.05"]
    run(args)
    return folder


def grid(task: str, family: str, inits: list[str], out: Path, data_root: Path, ratios, seeds, epochs) -> Path:
    folder = out / task / family
    run([sys.executable, str(EXAMPLES / "run_label_efficiency.py"), "--output_dir", str(folder), "--dataset_name",
         task, "--data_dir", str(data_root / TASKS[task]), "--ratios", *map(str, ratios), "--seeds", *map(str, seeds),
         "--inits", *inits, "--", "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "32",
         "--learning_rate", "0.01", "--use_cpu", "--dataloader_pin_memory", "false"])
    return folder


def cell_aucs(folder: Path, init: str, ratio: float) -> list[float]:
    cells = sorted((folder / init / f"ratio-{ratio:g}").glob("seed-*/results.json"))
    values = [json.loads(p.read_text())["mean_auc"] for p in cells]
    return [v for v in values if v is not None and not math.isnan(v)]


def summarise(out: Path, ratios, data_sizes: dict) -> list[dict]:
    rows = []
    for task in TASKS:
        for family in ("vit", "cnn"):
            folder = out / task / family
            names = [m for m, (f, _) in METHODS.items() if f == family]
            for ratio in ratios:
                random = cell_aucs(folder, "random", ratio)
                for init in [*names, "random"]:
                    aucs = cell_aucs(folder, init, ratio)
                    p = (stats.ttest_ind(aucs, random, equal_var=False).pvalue
                         if init != "random" and len(aucs) > 1 and len(random) > 1 else None)
                    first = next(iter(sorted((folder / init / f"ratio-{ratio:g}").glob("seed-*/results.json"))), None)
                    n_train = json.loads(first.read_text())["num_train_images"] if first else None
                    rows.append({"task": task, "family": family, "init": init, "label_ratio": ratio,
                                 "train_images": n_train, "test_images": data_sizes.get(task), "runs": len(aucs),
                                 "mean_auc": sum(aucs) / len(aucs) if aucs else float("nan"),
                                 "std_auc": stats.tstd(aucs) if len(aucs) > 1 else float("nan"),
                                 "p_vs_random": p})
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| task | backbone | init | labels | train images | test images | runs | test mean AUC | "
             "p vs random |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "-" if r["p_vs_random"] is None else f"{r['p_vs_random']:.3f}"
        lines.append(f"| {r['task']} | {r['family']} | {r['init']} | {100 * r['label_ratio']:g}% | {r['train_images']} "
                     f"| {r['test_images']} | {r['runs']} | {r['mean_auc']:.3f} +- {r['std_auc']:.3f} | {p} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4))
    FigureCanvasAgg(figure)
    for index, task in enumerate(TASKS):
        axes = figure.add_subplot(1, len(TASKS), index + 1)
        mine = [r for r in rows if r["task"] == task]
        labels = sorted({(r["family"], r["init"]) for r in mine}, key=lambda k: (k[0], k[1] == "random", k[1]))
        ratios = sorted({r["label_ratio"] for r in mine})
        width = 0.8 / len(labels)
        for k, (family, init) in enumerate(labels):
            values = [next(r for r in mine if r["family"] == family and r["init"] == init and r["label_ratio"] == q)
                      for q in ratios]
            axes.bar([i + k * width for i in range(len(ratios))], [v["mean_auc"] for v in values], width,
                     yerr=[0 if math.isnan(v["std_auc"]) else v["std_auc"] for v in values], capsize=2,
                     label=f"{init} ({family})")
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(ratios))], [f"{100 * q:g}% labels" for q in ratios])
        axes.axhline(0.5, color="grey", linewidth=0.5)
        axes.set_ylim(0.3, 1.0)
        axes.set_title(task, fontsize=8)
        axes.set_ylabel("test mean AUC")
        axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, format="png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"),
                        help="Folder with covid19_collection/ and nih_chestxray14_sample/ (default ../shared/data; "
                             "sample_data/ works too)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pretrain_steps", type=int, default=150)
    parser.add_argument("--pretrain_batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--report", default=str(REPO / "benchmarks" / "compare_methods"),
                        help="Writes <report>.md and <report>.png")
    args = parser.parse_args()
    out, data_root = Path(args.output_dir), Path(args.data_root)
    folders = {m: pretrain(m, out, data_root, args.pretrain_steps, args.pretrain_batch) for m in METHODS}
    for task in TASKS:
        for family in ("vit", "cnn"):
            inits = [f"{m}={folders[m]}" for m, (f, _) in METHODS.items() if f == family] + ["random"]
            grid(task, family, inits, out, data_root, args.ratios, args.seeds, args.epochs)
    from datasets_scripts import load_target_dataset

    sizes = {task: len(load_target_dataset(task, data_root / TASKS[task])["test"]) for task in TASKS}
    from datasets_scripts import load_covid19_studies

    studies = load_covid19_studies(data_root / "covid19_collection")["train"]
    views = sum(len(v) for v in studies["images"])
    rows = summarise(out, args.ratios, sizes)
    header = (f"Pretraining: {args.pretrain_steps} steps at batch {args.pretrain_batch} on {len(studies)} COVID-19-"
              f"collection training studies ({views} radiographs, clinical notes as reports), data "
              f"`{os.path.relpath(data_root.resolve(), REPO)}`; "
              f"fine-tuning: {args.epochs} epochs, seeds {args.seeds}, the checkpoint with the best validation AUC "
              "tested. p: Welch's t-test against the random initialisation of the same backbone.")
    atomic_write_text(f"{args.report}.md", markdown(rows, header))
    plot(rows, Path(f"{args.report}.png"))
    atomic_write_text(out / "compare_methods.json", json.dumps(rows, indent=2))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
