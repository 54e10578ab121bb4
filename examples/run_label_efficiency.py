#!/usr/bin/env python
"""The paper's label-efficiency grid in one command: label ratios x seeds x initialisations, each cell one
`run_finetune.py` run; then a table of mean +- std test AUC per setting (Markdown and CSV), two-sample t-test p-values
of each initialisation against the best other one at the same ratio (scipy), and a PNG plot of AUC against label
ratio per initialisation.

    python examples/run_label_efficiency.py --output_dir runs/grid --dataset_name nih_chestxray14 --data_dir /data/nih \
        --ratios 0.01 0.1 1.0 --seeds 0 1 2 --inits refers=runs/pretrain imagenet=vit_base_patch16_224.pth random \
        -- --num_train_epochs 10

An initialisation is `NAME=FOLDER` (a REFERS checkpoint), `NAME=FILE` (a timm ViT state dict) or `random`. Arguments
after `--` go to every `run_finetune.py` run. Resumes: a cell whose `results.json` exists is not run again.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_finetune  # noqa: E402

from modeling_refers.file_utils import atomic_open, atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)
COLUMNS = ["init", "label_ratio", "runs", "mean_auc", "std_auc", "compared_with", "p_value"]


def parse_init(text: str) -> tuple[str, list[str]]:
    """`name=path` or `random` -> (name, run_finetune arguments)."""
    if text == "random":
        return "random", []
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--inits entry {text!r}: expected NAME=FOLDER (REFERS checkpoint), NAME=FILE (timm ViT "
                         "state dict) or 'random'")
    if os.path.isdir(path):
        return name, ["--model_name_or_path", path]
    if os.path.isfile(path):
        return name, ["--timm_weights", path]
    raise FileNotFoundError(f"--inits entry {text!r}: {path!r} is neither a checkpoint folder nor a weight file")


def cell_dir(output_dir: str, init: str, ratio: float, seed: int) -> str:
    return os.path.join(output_dir, init, f"ratio-{ratio:g}", f"seed-{seed}")


def run_grid(output_dir, dataset_name, data_dir, ratios, seeds, inits, finetune_args) -> list[dict]:
    """Run (or reuse) every cell; return one results dict per cell with `init` set to the grid's name."""
    results = []
    for init_text in inits:
        name, init_args = parse_init(init_text)
        for ratio in ratios:
            for seed in seeds:
                directory = cell_dir(output_dir, name, ratio, seed)
                path = os.path.join(directory, "results.json")
                if os.path.isfile(path):
                    logger.info(f"cell {name} / ratio {ratio:g} / seed {seed}: done before, reusing {path}")
                else:
                    logger.info(f"cell {name} / ratio {ratio:g} / seed {seed}: fine-tuning")
                    argv = ["--output_dir", directory, "--dataset_name", dataset_name, "--label_ratio", str(ratio),
                            "--seed", str(seed), "--do_train", *init_args, *finetune_args]
                    if data_dir:
                        argv += ["--data_dir", data_dir]
                    run_finetune.main(argv)
                with open(path) as handle:
                    cell = json.load(handle)
                results.append({**cell, "init": name})
    return results


def summarise(results: list[dict]) -> list[dict]:
    """Mean +- std of the test mean AUC per (init, ratio), and the t-test against the best other initialisation."""
    groups: dict[tuple[str, float], list[float]] = {}
    for cell in results:
        if cell["mean_auc"] is not None:
            groups.setdefault((cell["init"], cell["label_ratio"]), []).append(cell["mean_auc"])
    rows = []
    for (init, ratio), values in groups.items():
        others = {k[0]: v for k, v in groups.items() if k[1] == ratio and k[0] != init}
        best_other = max(others, key=lambda k: np.mean(others[k])) if others else None
        p_value = float("nan")
        if best_other is not None and len(values) > 1 and len(others[best_other]) > 1:
            p_value = float(stats.ttest_ind(values, others[best_other]).pvalue)
        rows.append({
            "init": init, "label_ratio": ratio, "runs": len(values), "mean_auc": float(np.mean(values)),
            "std_auc": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"),
            "compared_with": best_other or "", "p_value": p_value,
        })
    return sorted(rows, key=lambda r: (r["label_ratio"], r["init"]))


def to_markdown(rows: list[dict], dataset_name: str) -> str:
    lines = [f"# Label efficiency on {dataset_name}: test mean AUC", "",
             "| initialisation | label ratio | runs | mean AUC +- std | vs best other | p-value (t-test) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        std = "" if math.isnan(r["std_auc"]) else f" +- {r['std_auc']:.4f}"
        p_value = "n/a" if math.isnan(r["p_value"]) else f"{r['p_value']:.3g}"
        lines.append(f"| {r['init']} | {r['label_ratio']:g} | {r['runs']} | {r['mean_auc']:.4f}{std} | "
                     f"{r['compared_with'] or '-'} | {p_value} |")
    lines += ["", "p-value: two-sample t-test (scipy.stats.ttest_ind) of this initialisation's runs against the "
              "runs of the best other initialisation at the same ratio; n/a with fewer than 2 runs on a side."]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot(rows: list[dict], dataset_name: str, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for init in sorted({r["init"] for r in rows}):
        mine = sorted((r for r in rows if r["init"] == init), key=lambda r: r["label_ratio"])
        errors = [0 if math.isnan(r["std_auc"]) else r["std_auc"] for r in mine]
        axes.errorbar([100 * r["label_ratio"] for r in mine], [r["mean_auc"] for r in mine], yerr=errors,
                      marker="o", capsize=3, label=init)
    axes.set_xscale("log")
    axes.set_xlabel("labelled training images (%)")
    axes.set_ylabel("test mean AUC")
    axes.set_title(f"Label efficiency: {dataset_name}")
    axes.legend()
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    finetune_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset_name", default="nih_chestxray14")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inits", nargs="+", default=["random"])
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for ratio in args.ratios:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"--ratios: every ratio must be in (0, 1], got {ratio}")
    os.makedirs(args.output_dir, exist_ok=True)

    results = run_grid(args.output_dir, args.dataset_name, args.data_dir, args.ratios, args.seeds, args.inits,
                       finetune_args)
    rows = summarise(results)
    atomic_write_text(os.path.join(args.output_dir, "label_efficiency.md"), to_markdown(rows, args.dataset_name))
    atomic_write_text(os.path.join(args.output_dir, "label_efficiency.csv"), to_csv(rows))
    plot(rows, args.dataset_name, os.path.join(args.output_dir, "label_efficiency.png"))
    print(to_markdown(rows, args.dataset_name))
    return rows


if __name__ == "__main__":
    main()
