"""Hub model cards for REFERS checkpoints, built from `results.json` dicts by code.

The YAML metadata is built with huggingface_hub's `ModelCardData` / `EvalResult` (model-index with one `roc_auc`
metric for the mean AUC and one per class); `ModelCard.from_template` renders it with the Markdown body from
`model_card_template.md` (a Jinja template: the layout and fixed text), which shows the same numbers as a table.
Data set names, licences and attributions come from the datasets_scripts registry entries.

`results.json` schema (written by `examples/run_finetune.py`):
`{"dataset": str, "label_names": [str], "per_class_auc": {name: float | null}, "mean_auc": float | null,
"label_ratio": float, "seed": int, "init": str, "config": {...}, "label_ids_path": str | null}`, and optionally
`"init_from"` (the starting checkpoint's name), `"data"` (what was used: `test_set` text, `folder`, `used_images`,
`test_image_size`, ...) and `"training"` (`global_step`, `epochs`, batch size, learning rate, `max_grad_norm`, ...).

The card never shows a local absolute path: a path value is shown by its last component.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..file_utils import atomic_open


DEFAULT_TAGS = ("refers", "chest-x-ray", "medical-imaging", "vision-transformer")

# The card's layout (a Jinja template rendered by huggingface_hub's `ModelCard.from_template`); the code fills it.
TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")

REFERS_CITATION = """\
@article{zhou2022refers,
  title   = {Generalized radiograph representation learning via cross-supervision between images and free-text radiology reports},
  author  = {Zhou, Hong-Yu and Chen, Xiaoyu and Zhang, Yinghao and Luo, Ruibang and Wang, Liansheng and Yu, Yizhou},
  journal = {Nature Machine Intelligence},
  volume  = {4},
  number  = {1},
  pages   = {32--40},
  year    = {2022},
  doi     = {10.1038/s42256-021-00425-9}
}"""

RESULTS_KEYS = {
    "dataset": str,
    "label_names": list,
    "per_class_auc": dict,
    "mean_auc": (float, int, type(None)),
    "label_ratio": (float, int),
    "seed": int,
    "init": str,
    "config": dict,
    "label_ids_path": (str, type(None)),
}


OPTIONAL_KEYS = {"init_from": (str, type(None)), "data": (dict, type(None)), "training": (dict, type(None))}


def _is_local_path(value) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")
                                       or bool(re.match(r"^[A-Za-z]:[\\/]", value)))


def _public(value):
    """A value fit for a public card: a local absolute path becomes its last component."""
    if _is_local_path(value):
        return os.path.basename(os.path.normpath(os.path.expanduser(value))) or value
    return value


def _check_results(results: Mapping[str, Any], where: str) -> dict:
    """Validate one results dict against the `results.json` schema; return a plain dict copy."""
    if not isinstance(results, Mapping):
        raise ValueError(f"{where} must be a dict in the results.json schema, got {type(results).__name__}")
    missing = [k for k in RESULTS_KEYS if k not in results]
    if missing:
        raise ValueError(f"{where} is missing the results.json field(s) {missing}")
    for key, kind in RESULTS_KEYS.items():
        value = results[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}['{key}'] has type {type(value).__name__}, expected {kind}")
    names = results["label_names"]
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}['label_names'] must be a non-empty list of class names")
    per_class = results["per_class_auc"]
    if list(per_class) != list(names):
        raise ValueError(
            f"{where}['per_class_auc'] must have one entry per label name, in order: expected {list(names)}, "
            f"got {list(per_class)}"
        )
    for name, auc in per_class.items():
        if auc is not None and (isinstance(auc, bool) or not isinstance(auc, (int, float)) or not 0.0 <= auc <= 1.0):
            raise ValueError(f"{where}['per_class_auc']['{name}'] must be an AUC in [0, 1] or null, got {auc!r}")
    defined = [float(v) for v in per_class.values() if v is not None]
    mean = results["mean_auc"]
    if mean is None:
        if defined:
            raise ValueError(f"{where}['mean_auc'] is null but {len(defined)} classes have an AUC")
    else:
        if not defined:
            raise ValueError(f"{where}['mean_auc'] is {mean} but every per-class AUC is null")
        expected = sum(defined) / len(defined)
        if not math.isclose(mean, expected, abs_tol=5e-4):
            raise ValueError(
                f"{where}['mean_auc'] = {mean} is not the mean of its defined per-class AUCs ({expected:.6f})"
            )
    if not 0.0 < results["label_ratio"] <= 1.0:
        raise ValueError(f"{where}['label_ratio'] must be in (0, 1], got {results['label_ratio']}")
    for key, kind in OPTIONAL_KEYS.items():
        if key in results and not isinstance(results[key], kind):
            raise ValueError(f"{where}['{key}'] has type {type(results[key]).__name__}, expected {kind}")
    return dict(results)


def _normalize_results(results) -> list[dict]:
    if results is None:
        return []
    if isinstance(results, Mapping):
        results = [results]
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise ValueError(
            f"`results` must be a results.json dict, a list of them, or None; got {type(results).__name__}"
        )
    checked = [_check_results(r, f"results[{i}]") for i, r in enumerate(results)]
    datasets_seen = [r["dataset"] for r in checked]
    if len(set(datasets_seen)) != len(datasets_seen):
        raise ValueError(
            f"`results` repeats a dataset ({datasets_seen}): a model card describes one model, evaluated once per "
            "test set; put tables over seeds or label ratios in `extra_body`"
        )
    return checked


def dataset_display_name(dataset: str) -> str:
    """Human-readable name of a `datasets_scripts` registry name: its entry's `display_name`; "name:task" gives
    "display name (task)", a name the registry does not know is returned as it is."""
    # Imported here: datasets_scripts imports modeling_refers.file_utils, so a module-level import would be circular.
    from datasets_scripts import SOURCE_DATASETS, TARGET_DATASETS
    from datasets_scripts import dataset_display_name as registry_name

    base, _, task = dataset.partition(":")
    if base not in TARGET_DATASETS and base not in SOURCE_DATASETS:
        return dataset
    return f"{registry_name(base)} ({task})" if task else registry_name(base)


def _eval_results(results: list[dict], pipeline_tag: str) -> list[EvalResult]:
    evals = []
    for r in results:
        # The run's problem_type when recorded (a 3-class single-label task, e.g. kermany_bacterial_viral, is not
        # multi-label); older results without it: more than two labels means multi-label.
        problem_type = (r.get("config") or {}).get("problem_type")
        multi_label = problem_type == "multi_label_classification" if problem_type else len(r["label_names"]) > 2
        common = dict(
            task_type=pipeline_tag,
            task_name="Multi-label image classification" if multi_label else "Image classification",
            dataset_type=r["dataset"],
            dataset_name=_test_set_name(r),
            dataset_split="test",
            metric_type="roc_auc",
        )
        if r["mean_auc"] is not None:
            evals.append(EvalResult(**common, metric_name="Mean AUC", metric_value=float(r["mean_auc"])))
        for name, auc in r["per_class_auc"].items():
            if auc is not None:
                evals.append(EvalResult(**common, metric_name=f"AUC ({name})", metric_value=float(auc)))
    return evals


def _test_set_name(r: dict) -> str:
    """The evaluation set as what it is (e.g. "<display name>, folder `nih_chestxray14_sample` (a 1,000-image
    subset ...), 64x64 px: test split of 181 images"), or the data set's name when the results do not say."""
    data = r.get("data") or {}
    return str(data.get("test_set") or dataset_display_name(r["dataset"])).replace("`", "")


def _init_text(r: dict) -> str:
    name = _public(r.get("init_from"))
    init = _public(r["init"])
    return f"`{init}` checkpoint `{name}`" if name else f"`{init}`"


def _training_text(training: dict) -> str | None:
    if not training or training.get("global_step") is None:
        return None
    batch = training.get("per_device_train_batch_size")
    world = training.get("world_size") or 1
    accumulation = training.get("gradient_accumulation_steps") or 1
    text = f"{training['global_step']} optimiser steps"
    if training.get("epochs") is not None:
        text += f" ({training['epochs']:g} epochs)"
    if batch:
        text += f" at batch {batch * world * accumulation}"
    if training.get("best_step") is not None:
        text += f"; the kept checkpoint is the one of step {training['best_step']}"
    return text


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g}%"


def _fmt_auc(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def _result_section(r: dict) -> dict:
    """One test set's entry of the template's Results section: its facts, the AUC table and the settings tables."""
    data = r.get("data") or {}
    used = data.get("used_images") or {}
    train_images = used.get("train", r.get("num_train_images"))
    facts = [f"- evaluated on: {data['test_set']}"] if data.get("test_set") else []
    facts += [
        f"- label ratio: {_pct(r['label_ratio'])} of the training labels"
        + (f" ({train_images} labelled training images)" if train_images is not None else ""),
        f"- initialisation: {_init_text(r)}",
        f"- seed: {r['seed']}",
    ]
    if used.get("validation") is not None:
        facts.append(f"- validation images (checkpoint selection): {used['validation']}")
    trained = _training_text(r.get("training") or {})
    if trained:
        facts.append(f"- trained for {trained}")
    if r["label_ids_path"]:
        facts.append(f"- training label ids: `{_public(r['label_ids_path'])}`")
    settings = []
    for heading, table in (("Training settings", r.get("training") or {}), ("Configuration", r["config"])):
        rows = [(k, json.dumps(_public(v))) for k, v in sorted(table.items())
                if (isinstance(v, (str, int, float, bool)) or v is None) and not k.startswith("_")]
        if rows:
            settings.append((heading, rows))
    return {"title": dataset_display_name(r["dataset"]), "facts": facts, "mean": _fmt_auc(r["mean_auc"]),
            "aucs": [(name, _fmt_auc(auc)) for name, auc in r["per_class_auc"].items()], "settings": settings}


def _summary(results: list[dict]) -> str:
    """The card's opening sentence: what the model is."""
    if not results:
        return ("A REFERS radiograph transformer (ViT): the image encoder pretrained with report supervision, to be "
                "fine-tuned on chest X-ray tasks with few labels.")
    datasets_text = ", ".join(_test_set_name(r) for r in results)
    inits = ", ".join(dict.fromkeys(_init_text(r) for r in results))
    backbones = {(r.get("config") or {}).get("backbone") or "vit" for r in results}
    encoder = ("A radiograph transformer (ViT, REFERS architecture)" if backbones == {"vit"}
               else f"A {' / '.join(sorted(backbones))} CNN (timm, REFERS view encoder)")
    return f"{encoder} fine-tuned for chest X-ray classification on {datasets_text}, initialised from {inits}."


def _training_data(results: list[dict]) -> str:
    """The generated "Training data" text: one line per fine-tuning data set, or the REFERS pretraining data."""
    if not results:
        return ""  # the template's text on the REFERS pretraining data
    lines = []
    for r in results:
        data = r.get("data") or {}
        used = data.get("used_images") or {}
        where = dataset_display_name(r["dataset"])
        if data.get("folder"):
            where += f", folder `{_public(data['folder'])}`"
        count = f" ({used['train']} images)" if used.get("train") is not None else ""
        trained = _training_text(r.get("training") or {})
        lines.append(
            f"- {where} (`{r['dataset']}`): {_pct(r['label_ratio'])} of the training split's labels{count} "
            f"(seed {r['seed']}), initialised from {_init_text(r)}"
            + (f", trained for {trained}" if trained else "")
            + "; the checkpoint with the best validation mean AUC is kept and evaluated once on the test split."
        )
    return "\n".join(lines)


def _data_licences(results: list[dict]) -> list[str]:
    """Licence and attribution of each fine-tuning data set whose registry entry records them (datasets_scripts'
    `TargetDatasetSpec.license` / `.citation`)."""
    from datasets_scripts import TARGET_DATASETS

    texts = []
    for name in dict.fromkeys(r["dataset"].partition(":")[0] for r in results):
        spec = TARGET_DATASETS.get(name)
        if spec is None or not (spec.license or spec.citation):
            continue
        text = dataset_display_name(name)
        if spec.license:
            text += f", licence `{spec.license}`"
        if spec.citation:
            text += f". Attribution: {spec.citation}"
        texts.append(text)
    return texts


def make_model_card(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    *,
    model_name: str,
    base_model: str | Sequence[str] | None = None,
    datasets: Sequence[str] = (),
    license: str = "apache-2.0",
    pipeline_tag: str | None = None,
    tags: Sequence[str] = DEFAULT_TAGS,
    extra_body: str = "",
    repo_id: str | None = None,
    training_data: str | None = None,
) -> ModelCard:
    """Build a Hub model card (YAML metadata + Markdown body) for a REFERS checkpoint.

    Args:
        results: one `results.json` dict (fine-tuned model), a list of them (one per test set), or None
            (pretrained model: no model-index).
        model_name: card title and model-index name.
        base_model: Hub id(s) of the model this one was fine-tuned from (a local folder is left out: name it through
            the results' `init_from`).
        datasets: Hub dataset ids used for training (YAML `datasets`).
        license, tags: YAML metadata; the REFERS tags are always included.
        pipeline_tag: defaults to "image-classification" with results and "feature-extraction" without.
        extra_body: Markdown appended before the citation.
        repo_id: Hub id shown in the usage snippet (defaults to `model_name`).
        training_data: Markdown replacing the generated "Training data" paragraph.

    Returns:
        `huggingface_hub.ModelCard`; `card.data.to_dict()` holds the metadata, `str(card)` the README text.

    Raises:
        ValueError: a results dict that does not follow the `results.json` schema (names the field).
    """
    checked = _normalize_results(results)
    if base_model is not None:  # a local folder is not a Hub id: keep it out of the metadata and links
        bases = [b for b in ([base_model] if isinstance(base_model, str) else base_model)
                 if not _is_local_path(b) and not os.path.isdir(b)]
        base_model = (bases[0] if isinstance(base_model, str) else bases) if bases else None
    if not model_name or not isinstance(model_name, str):
        raise ValueError("`model_name` must be a non-empty string")
    if pipeline_tag is None:
        pipeline_tag = "image-classification" if checked else "feature-extraction"
    all_tags = list(dict.fromkeys([*DEFAULT_TAGS, *tags]))
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=all_tags,
        datasets=list(datasets) or None,
        base_model=(base_model if isinstance(base_model, str) or base_model is None else list(base_model)),
        metrics=["roc_auc"] if checked else None,
        model_name=model_name if checked else None,  # only the model-index uses it
        eval_results=_eval_results(checked, pipeline_tag) or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        summary=_summary(checked),
        base_models=[base_model] if isinstance(base_model, str) else list(base_model or ()),
        fine_tuned=bool(checked),
        repo_id=repo_id or model_name,
        training_data=training_data or _training_data(checked),
        results=[_result_section(r) for r in checked],
        data_licences=_data_licences(checked),
        extra_body=extra_body.strip(),
        citation=REFERS_CITATION,
    )


def load_results(path: str | os.PathLike) -> dict:
    """Read a `results.json` file (errors name the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return _check_results(data, str(path))


def save_model_card(card: ModelCard, path: str | os.PathLike) -> Path:
    """Write `card` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_open(path, "w", newline="") as f:
        f.write(str(card))
    return path


__all__ = [
    "DEFAULT_TAGS",
    "REFERS_CITATION",
    "dataset_display_name",
    "load_results",
    "make_model_card",
    "save_model_card",
]
