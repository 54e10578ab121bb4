#!/usr/bin/env python
"""The paper's label-efficiency grid in one command: label ratios x seeds x initialisations, each cell one
`run_finetune.py` run; then a table of mean +- std test AUC per setting (Markdown and CSV), two-sample t-test p-values
of each initialisation against the best other one at the same ratio (scipy), and a PNG plot of AUC against label
ratio per initialisation.

    python examples/run_label_efficiency.py --output_dir runs/grid --dataset_name nih_chestxray14 --data_dir /data/nih \
        --ratios 0.01 0.1 1.0 --seeds 0 1 2 --inits refers=runs/pretrain imagenet=vit_base_patch16_224.pth random \
        -- --num_train_epochs 10

An initialisation is `NAME=FOLDER` (a REFERS checkpoint), `NAME=FILE` (a timm ViT state dict) or `random`. Arguments
after `--` go to every `run_finetune.py` run. Resumes: a cell whose `results.json` exists is not run again (it must
have the grid's architecture).

Fair comparisons: every initialisation has the same architecture. It is read from the REFERS checkpoints' config.json
(all must agree, or the grid is refused naming the fields that differ); `random` and timm cells are built with it
(`--config_overrides` after `--` may set other fields, and architecture fields only to the checkpoints' values). With
no REFERS checkpoint the architecture is `RefersConfig()` (ViT-B/16, 224 px) plus `--config_overrides`. A timm state
dict of another width, patch size or depth is refused before any cell runs. The tables and the plot state each
initialisation's architecture, the data and the number of labelled training images.
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
import torch
from scipy import stats



from modeling_refers import RefersConfig
from modeling_refers.training import finetuning as run_finetune
from modeling_refers.file_utils import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)
COLUMNS = ["init", "architecture", "data", "label_ratio", "train_images", "test_images", "runs", "mean_auc", "std_auc",
           "compared_with", "p_value"]
# RefersConfig fields that make two classifiers the same network trained the same way (all initialisations of a grid
# must share them).
ARCHITECTURE_FIELDS = (
    "backbone", "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "aggregation", "num_views", "view_fusion",
    "view_fusion_hidden_size", "use_view_fusion", "hidden_dropout_prob", "attention_probs_dropout_prob",
)


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


def architecture_of(config) -> dict:
    """The ARCHITECTURE_FIELDS of a RefersConfig (or a results.json `config` dict)."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    arch = {name: get(name) for name in ARCHITECTURE_FIELDS}
    arch["backbone"] = arch["backbone"] or "vit"  # results written before CNN backbones existed
    return arch


def architecture_text(arch: dict) -> str:
    """One line, e.g. "ViT 112px/16, width 192, 4 layers, 3 heads, MLP 768, recurrent_concat, 3 views"."""
    if arch.get("backbone", "vit") != "vit":
        return f"{arch['backbone']} CNN {arch['image_size']}px, width {arch['hidden_size']}, {arch['num_views']} views"
    return (f"ViT {arch['image_size']}px/{arch['patch_size']}, width {arch['hidden_size']}, "
            f"{arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, MLP {arch['intermediate_size']}, "
            f"{arch['aggregation']}, {arch['num_views']} views")


def checkpoint_architecture(folder: str) -> dict:
    try:
        return architecture_of(RefersConfig.from_pretrained(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"--inits: {folder!r} is a folder but not a REFERS checkpoint with a readable config.json "
                         f"({err})") from err


def timm_architecture(path: str) -> dict:
    """What a timm ViT state dict fixes: width, patch size, channels, depth and MLP size (the position embedding is
    resampled to any image size; the number of heads is not in the weights)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    arch = {"backbone": "vit"}
    if "patch_embed.proj.weight" in state:
        hidden, channels, patch, _ = state["patch_embed.proj.weight"].shape
        arch.update(hidden_size=int(hidden), num_channels=int(channels), patch_size=int(patch))
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    if blocks:
        arch["num_hidden_layers"] = max(blocks) + 1
    if "blocks.0.mlp.fc1.weight" in state:
        arch["intermediate_size"] = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    return arch


def _differences(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in a if k in b and a[k] != b[k]}


def _format_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) \
        else str(value)


def split_config_overrides(finetune_args: list[str]) -> tuple[list[str], str | None]:
    """`finetune_args` without `--config_overrides`, and its value."""
    rest, overrides, i = [], None, 0
    while i < len(finetune_args):
        arg = finetune_args[i]
        if arg == "--config_overrides" and i + 1 < len(finetune_args):
            overrides, i = finetune_args[i + 1], i + 2
            continue
        if arg.startswith("--config_overrides="):
            overrides = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parse_overrides(text: str | None) -> dict:
    if not text:
        return {}
    config = RefersConfig()
    config.update_from_string(text)  # raises naming an unknown field
    keys = [item.split("=", 1)[0].strip() for item in text.split(",") if item.strip()]
    return {key: getattr(config, key) for key in keys}


def resolve_architecture(parsed_inits: list[tuple[str, list[str]]], user_overrides: str | None) -> dict:
    """The one architecture every initialisation of the grid gets; ValueError naming the fields that differ."""
    overrides = _parse_overrides(user_overrides)
    checkpoints = [(name, args[1]) for name, args in parsed_inits if args and args[0] == "--model_name_or_path"]
    if checkpoints:
        (first_name, first_path), arch = checkpoints[0], checkpoint_architecture(checkpoints[0][1])
        for name, path in checkpoints[1:]:
            diff = _differences(arch, checkpoint_architecture(path))
            if diff:
                fields = "; ".join(f"{k}: {first_name}={a!r}, {name}={b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"--inits: the checkpoints {first_name} ({first_path}) and {name} ({path}) have "
                                 f"different architectures ({fields}); a label-efficiency grid compares "
                                 "initialisations of one architecture, so run them in separate grids")
        diff = _differences({k: v for k, v in overrides.items() if k in arch}, arch)
        if diff:
            fields = "; ".join(f"{k}: --config_overrides {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--config_overrides sets architecture fields other than those of the checkpoint "
                             f"{first_name} ({first_path}): {fields}; drop them (the grid takes the checkpoints' "
                             "architecture)")
    else:
        config = RefersConfig()
        if user_overrides:
            config.update_from_string(user_overrides)
        config.check_architecture()
        arch = architecture_of(config)
    for name, args in parsed_inits:
        if args and args[0] == "--timm_weights":
            diff = _differences(timm_architecture(args[1]), arch)
            if diff:
                fields = "; ".join(f"{k}: weights {a!r}, grid {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"--inits {name}={args[1]}: the timm weights do not fit the grid's architecture "
                                 f"({fields})")
    return arch


def cell_overrides(arch: dict, user_overrides: str | None) -> str:
    """`--config_overrides` for a random / timm cell: the grid's architecture, plus the user's other fields."""
    values = {**_parse_overrides(user_overrides), **arch}
    return ",".join(f"{k}={_format_value(v)}" for k, v in values.items() if v is not None)


def cell_dir(output_dir: str, init: str, ratio: float, seed: int) -> str:
    return os.path.join(output_dir, init, f"ratio-{ratio:g}", f"seed-{seed}")


def run_grid(output_dir, dataset_name, data_dir, ratios, seeds, inits, finetune_args, parsed_inits=None,
             architecture=None) -> list[dict]:
    """Run (or reuse) every cell; return one results dict per cell with `init` set to the grid's name. Every cell
    gets `architecture` (default: resolved from `inits` and the `--config_overrides` in `finetune_args`)."""
    parsed_inits = parsed_inits or [parse_init(text) for text in inits]
    rest, user_overrides = split_config_overrides(list(finetune_args))
    if architecture is None:
        architecture = resolve_architecture(parsed_inits, user_overrides)
    overrides = cell_overrides(architecture, user_overrides)
    results = []
    for name, init_args in parsed_inits:
        for ratio in ratios:
            for seed in seeds:
                directory = cell_dir(output_dir, name, ratio, seed)
                path = os.path.join(directory, "results.json")
                if os.path.isfile(path):
                    logger.info(f"cell {name} / ratio {ratio:g} / seed {seed}: done before, reusing {path}")
                else:
                    logger.info(f"cell {name} / ratio {ratio:g} / seed {seed}: fine-tuning")
                    argv = ["--output_dir", directory, "--dataset_name", dataset_name, "--label_ratio", str(ratio),
                            "--seed", str(seed), "--do_train", *init_args, *rest]
                    if not init_args or init_args[0] == "--timm_weights":
                        argv += ["--config_overrides", overrides]
                    if data_dir:
                        argv += ["--data_dir", data_dir]
                    run_finetune.main(argv)
                with open(path) as handle:
                    cell = json.load(handle)
                diff = _differences(architecture, architecture_of(cell.get("config", {})))
                if diff:
                    fields = "; ".join(f"{k}: cell {b!r}, grid {a!r}" for k, (a, b) in diff.items())
                    raise ValueError(f"{path}: this cell was fine-tuned with another architecture than the grid's "
                                     f"({fields}); delete {directory} to run it again")
                results.append({**cell, "init": name})
    return results


def _data_text(cells: list[dict]) -> str:
    texts = sorted({(c.get("data") or {}).get("test_set") or c["dataset"] for c in cells})
    return " / ".join(t.replace("`", "") for t in texts)


def _counts(values) -> str:
    return "/".join(str(v) for v in sorted(set(values)))


def summarise(results: list[dict]) -> list[dict]:
    """Mean +- std of the test mean AUC per (init, ratio), and the t-test against the best other initialisation;
    each row names the initialisation's architecture, the data and the labelled training images of its runs."""
    groups: dict[tuple[str, float], list[float]] = {}
    cells: dict[tuple[str, float], list[dict]] = {}
    for cell in results:
        if cell["mean_auc"] is not None:
            groups.setdefault((cell["init"], cell["label_ratio"]), []).append(cell["mean_auc"])
            cells.setdefault((cell["init"], cell["label_ratio"]), []).append(cell)
    rows = []
    for (init, ratio), values in groups.items():
        others = {k[0]: v for k, v in groups.items() if k[1] == ratio and k[0] != init}
        best_other = max(others, key=lambda k: np.mean(others[k])) if others else None
        p_value = float("nan")
        if best_other is not None and len(values) > 1 and len(others[best_other]) > 1:
            p_value = float(stats.ttest_ind(values, others[best_other]).pvalue)
        mine = cells[(init, ratio)]
        rows.append({
            "init": init,
            "architecture": " / ".join(sorted({architecture_text(architecture_of(c["config"])) for c in mine})),
            "data": _data_text(mine),
            "label_ratio": ratio,
            "train_images": _counts(c["num_train_images"] for c in mine),
            "test_images": _counts(((c.get("data") or {}).get("used_images") or {}).get("test", "?") for c in mine),
            "runs": len(values), "mean_auc": float(np.mean(values)),
            "std_auc": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"),
            "compared_with": best_other or "", "p_value": p_value,
        })
    return sorted(rows, key=lambda r: (r["label_ratio"], r["init"]))


def to_markdown(rows: list[dict], dataset_name: str) -> str:
    data = " / ".join(sorted({r["data"] for r in rows}))
    lines = [f"# Label efficiency on {dataset_name}: test mean AUC", "", f"Data: {data}.", "",
             "| initialisation | architecture | label ratio | labelled training images | test images | runs | "
             "mean AUC +- std | vs best other | p-value (t-test) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        std = "" if math.isnan(r["std_auc"]) else f" +- {r['std_auc']:.4f}"
        p_value = "n/a" if math.isnan(r["p_value"]) else f"{r['p_value']:.3g}"
        lines.append(f"| {r['init']} | {r['architecture']} | {r['label_ratio']:g} | {r['train_images']} | "
                     f"{r['test_images']} | {r['runs']} | {r['mean_auc']:.4f}{std} | {r['compared_with'] or '-'} | "
                     f"{p_value} |")
    lines += ["", "p-value: two-sample t-test (scipy.stats.ttest_ind) of this initialisation's runs against the "
              "runs of the best other initialisation at the same ratio; n/a with fewer than 2 runs on a side. "
              "Labelled training images: per run (one number when every seed drew the same count)."]
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

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for init in sorted({r["init"] for r in rows}):
        mine = sorted((r for r in rows if r["init"] == init), key=lambda r: r["label_ratio"])
        errors = [0 if math.isnan(r["std_auc"]) else r["std_auc"] for r in mine]
        x = [100 * r["label_ratio"] for r in mine]
        axes.errorbar(x, [r["mean_auc"] for r in mine], yerr=errors, marker="o", capsize=3,
                      label=f"{init}: {mine[0]['architecture']}")
        for xi, r in zip(x, mine):
            axes.annotate(f"n={r['train_images']}", (xi, r["mean_auc"]), textcoords="offset points", xytext=(4, 4),
                          fontsize=6)
    axes.set_xscale("log")
    axes.set_xlabel("labelled training images (% of the training split; n = images)")
    axes.set_ylabel("test mean AUC")
    data = " / ".join(sorted({r["data"] for r in rows}))
    axes.set_title(f"Label efficiency: {dataset_name}\n{data}", fontsize=7)
    axes.legend(fontsize=6)
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
    # Before anything is written: every initialisation exists and they all share one architecture.
    parsed_inits = [parse_init(text) for text in args.inits]
    names = [name for name, _ in parsed_inits]
    if len(set(names)) != len(names):
        raise ValueError(f"--inits: each initialisation needs its own NAME, got {names}")
    architecture = resolve_architecture(parsed_inits, split_config_overrides(finetune_args)[1])
    logger.info(f"grid architecture (every initialisation): {architecture_text(architecture)}")
    os.makedirs(args.output_dir, exist_ok=True)

    results = run_grid(args.output_dir, args.dataset_name, args.data_dir, args.ratios, args.seeds, args.inits,
                       finetune_args, parsed_inits=parsed_inits, architecture=architecture)
    rows = summarise(results)
    atomic_write_text(os.path.join(args.output_dir, "label_efficiency.md"), to_markdown(rows, args.dataset_name))
    atomic_write_text(os.path.join(args.output_dir, "label_efficiency.csv"), to_csv(rows))
    plot(rows, args.dataset_name, os.path.join(args.output_dir, "label_efficiency.png"))
    print(to_markdown(rows, args.dataset_name))
    return rows


if __name__ == "__main__":
    main()
