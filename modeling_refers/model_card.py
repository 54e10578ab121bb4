"""Hub model cards for REFERS checkpoints, built from `results.json` dicts by code.

The YAML metadata is built with huggingface_hub's `ModelCardData` / `EvalResult` (model-index with one `roc_auc`
metric for the mean AUC and one per class); the Markdown body renders the same numbers as a table.

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

from .file_utils import atomic_open


DEFAULT_TAGS = ("refers", "chest-x-ray", "medical-imaging", "vision-transformer")

DATASET_DISPLAY_NAMES = {
    "nih_chestxray14": "NIH ChestX-ray14",
    "vinbigdata": "VinBigData Chest X-ray",
    "shenzhen_tb": "Shenzhen Tuberculosis",
    "covid19_collection": "COVID-19 Image Data Collection",
    "covid19": "COVID-19 Image Data Collection (COVID-19 vs other)",
    "covid19_viral_bacterial": "COVID-19 Image Data Collection (viral vs bacterial)",
    "kermany_pneumonia": "Kermany pediatric chest X-rays (normal vs pneumonia)",
    "kermany_bacterial_viral": "Kermany pediatric chest X-rays (normal / bacterial / viral pneumonia)",
    # pretraining (source) data: studies with their free-text reports
    "mimic_cxr": "MIMIC-CXR",
    "iu_xray": "IU X-ray (Open-i)",
    "covid19_studies": "COVID-19 Image Data Collection studies (clinical notes as reports)",
    "study_folder": "a folder of studies with reports",
    "kermany_paired_reports": ("Kermany pediatric radiographs paired by finding with Open-i reports of other patients "
                               "(a controlled check, not paired clinical data)"),
}

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

_PRETRAINING_DATA = (
    "REFERS pretraining, as in the paper and the defaults of `examples/run_pretrain.py`, uses MIMIC-CXR-JPG "
    "studies with their free-text reports (findings and impression sections only; studies whose text has fewer "
    "than 3 tokens are dropped, about 217k studies remain; 4,600 studies held out for validation). Each study "
    "contributes up to 3 views. The radiograph transformer is supervised by report generation (a transformer "
    "decoder reconstructs the report from the fused views) and by study-report contrastive learning against a "
    "BERT report encoder."
)


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
    """Human-readable name of a `datasets_scripts` builder name (e.g. "nih_chestxray14" -> "NIH ChestX-ray14")."""
    base, _, task = dataset.partition(":")
    name = DATASET_DISPLAY_NAMES.get(base, dataset)
    return f"{name} ({task})" if task and base in DATASET_DISPLAY_NAMES else name


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
    """The evaluation set as what it is (e.g. "NIH ChestX-ray14, folder `nih_chestxray14_sample` (a 1,000-image
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


def _results_section(results: list[dict]) -> str:
    lines = ["## Results", ""]
    lines.append(
        "Area under the ROC curve on the test split (one-vs-rest per class, scikit-learn `roc_auc_score`), as a "
        "fraction. The mean is over the classes with a defined AUC; a class whose test labels are all one value "
        "has no AUC and is marked *undefined*."
    )
    for r in results:
        lines += ["", f"### {dataset_display_name(r['dataset'])}", ""]
        data = r.get("data") or {}
        if data.get("test_set"):
            lines.append(f"- evaluated on: {data['test_set']}")
        used = data.get("used_images") or {}
        train_images = used.get("train", r.get("num_train_images"))
        lines += [
            f"- label ratio: {_pct(r['label_ratio'])} of the training labels"
            + (f" ({train_images} labelled training images)" if train_images is not None else ""),
            f"- initialisation: {_init_text(r)}",
            f"- seed: {r['seed']}",
        ]
        if used.get("validation") is not None:
            lines.append(f"- validation images (checkpoint selection): {used['validation']}")
        trained = _training_text(r.get("training") or {})
        if trained:
            lines.append(f"- trained for {trained}")
        if r["label_ids_path"]:
            lines.append(f"- training label ids: `{_public(r['label_ids_path'])}`")
        lines += ["", "| Class | AUC |", "|---|---|"]
        lines += [f"| {name} | {_fmt_auc(auc)} |" for name, auc in r["per_class_auc"].items()]
        lines.append(f"| **Mean** | **{_fmt_auc(r['mean_auc'])}** |")
        for title, table in (("Training settings", r.get("training") or {}), ("Configuration", r["config"])):
            scalars = {k: _public(v) for k, v in sorted(table.items())
                       if (isinstance(v, (str, int, float, bool)) or v is None) and not k.startswith("_")}
            if scalars:
                lines += ["", f"<details><summary>{title}</summary>", ""]
                lines += ["| Setting | Value |", "|---|---|"]
                lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in scalars.items()]
                lines += ["", "</details>"]
    return "\n".join(lines)


def _body(
    model_name: str, repo_id: str, results: list[dict], pipeline_tag: str, base_model, training_data, extra_body: str
) -> str:
    fine_tuned = bool(results)
    out = [f"# {model_name}", ""]
    if fine_tuned:
        datasets_text = ", ".join(_test_set_name(r) for r in results)
        inits = ", ".join(dict.fromkeys(_init_text(r) for r in results))
        backbones = {(r.get("config") or {}).get("backbone") or "vit" for r in results}
        encoder = ("A radiograph transformer (ViT, REFERS architecture)" if backbones == {"vit"}
                   else f"A {' / '.join(sorted(backbones))} CNN (timm, REFERS view encoder)")
        out.append(
            f"{encoder} fine-tuned for chest X-ray classification on {datasets_text}, initialised from {inits}."
        )
    else:
        out.append(
            "A REFERS radiograph transformer (ViT): the image encoder pretrained with report supervision, to be "
            "fine-tuned on chest X-ray tasks with few labels."
        )
    out += [
        "",
        "REFERS (Zhou et al., *Nature Machine Intelligence* 4, 32-40, 2022) learns radiograph representations from "
        "free-text radiology reports instead of labels: a vision transformer encodes each view of a study, the views "
        "are fused, and the fused study representation is trained to generate the study's report and to match the "
        "report's text embedding (contrastive study-report consistency). The pretrained transformer is then "
        "fine-tuned with 1%, 10% or 100% of the labels of a target data set.",
    ]
    if base_model:
        bases = [base_model] if isinstance(base_model, str) else list(base_model)
        out += ["", "Fine-tuned from " + ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) + "."]

    out += ["", "## How to use", "", "```python"]
    out.append("import modeling_refers  # registers the REFERS classes with the Auto API")
    out.append("from PIL import Image")
    if fine_tuned:
        out += [
            "from transformers import AutoImageProcessor, AutoModelForImageClassification",
            "",
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}")',
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
            'image = Image.open("chest_xray.png")',
            'inputs = processor(images=image, return_tensors="pt")',
            "scores = model(**inputs).logits.sigmoid()  # multi-label; use .softmax(-1) for single-label tasks",
        ]
    else:
        out += [
            "from transformers import AutoImageProcessor, AutoModel",
            "",
            f'model = AutoModel.from_pretrained("{repo_id}")',
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
            'image = Image.open("chest_xray.png")',
            'features = model(**processor(images=image, return_tensors="pt")).last_hidden_state',
        ]
    out += ["```", "", "Without the `refers` package installed, pass `trust_remote_code=True`."]

    out += ["", "## Intended use", ""]
    out.append(
        "Research on label-efficient chest X-ray representation learning: feature extraction, fine-tuning and "
        "benchmarking against other initialisations. **Not for diagnosis.** This model is not a medical device, "
        "has not been validated clinically, and must not be used to make or support clinical decisions about "
        "patients."
    )

    out += ["", "## Training data", ""]
    if training_data:
        out.append(training_data)
    elif fine_tuned:
        for r in results:
            data = r.get("data") or {}
            used = data.get("used_images") or {}
            where = dataset_display_name(r["dataset"])
            if data.get("folder"):
                where += f", folder `{_public(data['folder'])}`"
            count = f" ({used['train']} images)" if used.get("train") is not None else ""
            trained = _training_text(r.get("training") or {})
            out.append(
                f"- {where} (`{r['dataset']}`): {_pct(r['label_ratio'])} of the training split's labels{count} "
                f"(seed {r['seed']}), initialised from {_init_text(r)}"
                + (f", trained for {trained}" if trained else "")
                + "; the checkpoint with the best validation mean AUC is kept and evaluated once on the test split."
            )
    else:
        out.append(_PRETRAINING_DATA)

    if results:
        out += ["", _results_section(results)]

    out += ["", "## Limitations", ""]
    out += [
        "- The encoder has only seen its pretraining data (see Training data), usually one hospital system or "
        "collection; performance can drop on other scanners, populations, age groups and acquisition protocols.",
        "- Target labels of public chest X-ray sets (e.g. NIH ChestX-ray14) are mined from reports by NLP and are "
        "noisy; AUCs measured against them inherit that noise.",
        "- AUC on small test splits has wide confidence intervals, and a class with no positive (or no negative) "
        "test image has no AUC at all; compare settings over several seeds.",
        "- AUC measures ranking only: it says nothing about calibration or about a decision threshold.",
        "- Input images are single-channel radiographs resized to the model's input size; other modalities or "
        "views (e.g. lateral views for a frontal-only fine-tune) are out of scope.",
    ]
    if extra_body:
        out += ["", extra_body.strip()]
    out += ["", "## Citation", "", "```bibtex", REFERS_CITATION, "```", ""]
    return "\n".join(out)


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
    body = _body(model_name, repo_id or model_name, checked, pipeline_tag, base_model, training_data, extra_body)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


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
