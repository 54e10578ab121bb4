"""Model cards built from results.json: YAML parses, carries the measured AUCs, validates with huggingface_hub."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from modeling_refers.hub.model_card import (
    DEFAULT_TAGS,
    REFERS_CITATION,
    load_results,
    make_model_card,
    save_model_card,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


def _results(**overrides) -> dict:
    results = {
        "dataset": "nih_chestxray14",
        "label_names": ["Atelectasis", "Cardiomegaly", "Hernia", "Nodule"],
        "per_class_auc": {"Atelectasis": 0.8123456789012345, "Cardiomegaly": 0.9, "Hernia": None, "Nodule": 0.6543},
        "mean_auc": (0.8123456789012345 + 0.9 + 0.6543) / 3,
        "label_ratio": 0.01,
        "seed": 2,
        "init": "checkpoints/refers-pretrained",
        "config": {"learning_rate": 0.003, "per_device_train_batch_size": 128, "lr_scheduler_type": "cosine",
                   "augment": {"rotation": 10}},
        "label_ids_path": "outputs/nih/label_ids.txt",
    }  # fmt: skip
    results.update(overrides)
    return results


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_finetuned_card_yaml_carries_the_measured_aucs():
    results = _results()
    card = make_model_card(
        results, model_name="refers-vit-base-nih", base_model="org/refers-vit-base", datasets=["org/nih-cxr14"],
        repo_id="org/refers-vit-base-nih", tags=("extra-tag",),
    )  # fmt: skip
    metadata = _front_matter(str(card))
    assert metadata == card.data.to_dict()
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["base_model"] == "org/refers-vit-base"
    assert metadata["datasets"] == ["org/nih-cxr14"]
    assert metadata["metrics"] == ["roc_auc"]
    assert set(DEFAULT_TAGS) | {"extra-tag"} == set(metadata["tags"])

    (entry,) = metadata["model-index"]
    assert entry["name"] == "refers-vit-base-nih"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "NIH ChestX-ray14", "type": "nih_chestxray14", "split": "test"}
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert all(m["type"] == "roc_auc" for m in result["metrics"])
    expected = {"Mean AUC": results["mean_auc"]}
    expected.update({f"AUC ({k})": v for k, v in results["per_class_auc"].items() if v is not None})
    assert values == expected  # exact: floats survive the YAML round trip
    assert "AUC (Hernia)" not in values  # undefined class: no metric


def test_card_passes_huggingface_hub_metadata_parsing(tmp_path):
    card = make_model_card(_results(), model_name="refers-vit-base-nih", base_model="org/refers-vit-base")
    path = save_model_card(card, tmp_path / "README.md")
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # atomic write left no temp file
    loaded = ModelCard.load(path)  # raises on a model-index huggingface_hub cannot parse
    assert loaded.data.to_dict() == card.data.to_dict()
    model_name, eval_results = model_index_to_eval_results(loaded.data.to_dict()["model-index"])
    assert model_name == "refers-vit-base-nih"
    by_name = {r.metric_name: r.metric_value for r in eval_results}
    assert by_name["Mean AUC"] == _results()["mean_auc"]
    assert by_name["AUC (Atelectasis)"] == 0.8123456789012345
    assert {r.dataset_type for r in eval_results} == {"nih_chestxray14"}


def test_card_body_renders_the_results_table_intended_use_and_citation():
    text = make_model_card(_results(), model_name="refers-vit-base-nih").text
    assert "| Atelectasis | 0.8123 |" in text
    assert "| Hernia | undefined |" in text
    assert f"| **Mean** | **{_results()['mean_auc']:.4f}** |" in text
    assert "label ratio: 1% of the training labels" in text
    assert "seed: 2" in text and "`checkpoints/refers-pretrained`" in text
    assert "| learning_rate | `0.003` |" in text
    assert "Not for diagnosis" in text
    assert "## Limitations" in text
    assert REFERS_CITATION in text
    assert "Nature Machine Intelligence" in REFERS_CITATION and "32--40" in REFERS_CITATION


def test_pretrained_card_has_no_metrics_and_feature_extraction_tag():
    card = make_model_card(None, model_name="refers-vit-base-pretrained")
    metadata = _front_matter(str(card))
    assert metadata["pipeline_tag"] == "feature-extraction"
    assert "model-index" not in metadata and "metrics" not in metadata and "model_name" not in metadata
    assert metadata["library_name"] == "transformers" and metadata["license"] == "apache-2.0"
    assert "MIMIC-CXR" in card.text and "## Results" not in card.text
    explicit = make_model_card(None, model_name="x", pipeline_tag="image-feature-extraction")
    assert explicit.data.pipeline_tag == "image-feature-extraction"


def test_several_test_sets_give_one_model_index_entry_each():
    shenzhen = _results(
        dataset="shenzhen_tb", label_names=["normal", "tuberculosis"], per_class_auc={"normal": 0.9, "tuberculosis": 0.9},
        mean_auc=0.9,
    )  # fmt: skip
    card = make_model_card([_results(), shenzhen], model_name="m")
    results = card.data.to_dict()["model-index"][0]["results"]
    assert [r["dataset"]["type"] for r in results] == ["nih_chestxray14", "shenzhen_tb"]
    assert results[1]["task"]["name"] == "Image classification"
    with pytest.raises(ValueError, match="repeats a dataset"):
        make_model_card([_results(), _results(seed=3)], model_name="m")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("mean_auc"), r"missing the results.json field\(s\) \['mean_auc'\]"),
        (lambda r: r.update(seed="2"), r"\['seed'\] has type str"),
        (lambda r: r.update(per_class_auc={"Atelectasis": 0.8}), "one entry per label name"),
        (lambda r: r["per_class_auc"].update(Nodule=1.5), r"\['Nodule'\] must be an AUC in \[0, 1\]"),
        (lambda r: r.update(mean_auc=0.99), "is not the mean of its defined per-class AUCs"),
        (lambda r: r.update(label_ratio=0.0), r"label_ratio'\] must be in \(0, 1\]"),
        (lambda r: r.update(label_names=[]), "non-empty list"),
    ],
)
def test_bad_results_are_refused_naming_the_field(mutate, match):
    results = copy.deepcopy(_results())
    mutate(results)
    with pytest.raises(ValueError, match=match):
        make_model_card(results, model_name="m")


def test_cli_writes_the_same_card_from_results_json(tmp_path):
    script = REPO_ROOT / "model_cards" / "generate_model_card.py"
    spec = importlib.util.spec_from_file_location("generate_model_card", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main

    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(_results()))
    out = main([
        "--results", str(results_path), "--output", str(tmp_path / "card" / "README.md"), "--model-name", "m",
        "--base-model", "org/base", "--tag", "nih",
    ])  # fmt: skip
    expected = make_model_card(_results(), model_name="m", base_model="org/base", tags=(*DEFAULT_TAGS, "nih"))
    assert out.read_text() == str(expected)
    assert load_results(results_path) == _results()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_results(tmp_path / "broken.json")


def test_committed_pretrained_example_is_generated_by_code(tmp_path):
    committed = REPO_ROOT / "model_cards" / "refers-vit-base-pretrained.md"
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "model_cards" / "generate_model_card.py"), "--output",
         str(tmp_path / "card.md"), "--model-name", "refers-vit-base-pretrained"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "card.md").read_text() == committed.read_text(), "rerun the command in model_cards/README.md"


def test_card_pushes_to_the_hub_and_loads_back(local_hub):
    from huggingface_hub import create_repo

    card = make_model_card(_results(), model_name="refers-vit-base-nih")
    create_repo("org/refers-card")  # ModelCard.push_to_hub commits to an existing repo, as on the Hub
    card.push_to_hub("org/refers-card")
    assert ("POST", "/api/validate-yaml") in local_hub.requests
    assert local_hub.file_bytes("org/refers-card", "README.md").decode() == str(card)
    assert ModelCard.load("org/refers-card").data.to_dict() == card.data.to_dict()


def test_card_names_data_steps_and_start_and_shows_no_local_path(tmp_path):
    results = _results(
        init="refers", init_from="refers-vit-small", label_ids_path="/home/alice/runs/nih/label_ids.json",
        config={"_name_or_path": "/home/alice/runs/pretrain", "image_size": 112, "note": "/srv/data/x"},
        data={"test_set": "NIH ChestX-ray14, folder `nih_chestxray14_sample`, 64x64 px: test split of 181 images",
              "folder": "nih_chestxray14_sample", "used_images": {"train": 73, "validation": 94, "test": 181}},
        training={"global_step": 30, "epochs": 10.0, "per_device_train_batch_size": 32, "world_size": 1,
                  "gradient_accumulation_steps": 1, "max_grad_norm": 10.0, "best_step": 24},
    )
    local_folder = tmp_path / "pretrain"
    local_folder.mkdir()
    card = make_model_card(results, model_name="m", base_model=str(local_folder))
    text = str(card)
    assert "- evaluated on: NIH ChestX-ray14, folder `nih_chestxray14_sample`, 64x64 px: test split of 181 images" in text
    assert "(73 labelled training images)" in text
    assert "trained for 30 optimiser steps (10 epochs) at batch 32; the kept checkpoint is the one of step 24" in text
    assert "initialisation: `refers` checkpoint `refers-vit-small`" in text
    assert "| max_grad_norm | `10.0` |" in text and "| image_size | `112` |" in text
    assert "training label ids: `label_ids.json`" in text and "| note | `\"x\"` |" in text
    for local in ("/home/alice", "/srv/data", str(tmp_path), "_name_or_path"):
        assert local not in text, local
    metadata = _front_matter(text)
    assert "base_model" not in metadata  # a local folder is no Hub id
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == (
        "NIH ChestX-ray14, folder nih_chestxray14_sample, 64x64 px: test split of 181 images")
    # A Hub id stays.
    assert make_model_card(results, model_name="m", base_model="org/refers").data.base_model == "org/refers"


def test_a_cnn_classifier_card_does_not_call_it_a_vision_transformer():
    results = _results()
    results["config"] = {**results.get("config", {}), "backbone": "resnet50"}
    text = str(make_model_card(results, model_name="radtex-nih"))
    assert "A resnet50 CNN (timm, REFERS view encoder) fine-tuned" in text
    assert "A radiograph transformer (ViT" not in text
    assert "A radiograph transformer (ViT, REFERS architecture) fine-tuned" in str(
        make_model_card(_results(), model_name="refers-nih"))


@pytest.mark.parametrize("name", ["chexpert", "rsna_pneumonia", "siim_acr_pneumothorax", "kermany_pneumonia", "nih_chestxray14"])
def test_every_registry_data_set_gets_its_name_licence_and_attribution_from_the_registry(name):
    """One place per data set fact: the card's name, licence and attribution are the registry entry's, so a data set
    added to datasets_scripts gets a card without touching model_card.py."""
    from datasets_scripts import TARGET_DATASETS

    spec = TARGET_DATASETS[name]
    labels = list(spec.label_names)[:2]
    results = _results(dataset=name, label_names=labels, per_class_auc=dict(zip(labels, [0.5, 0.75])), mean_auc=0.625)
    card = make_model_card(results, model_name=f"refers-{name}")
    text = card.text
    assert spec.display_name and f"### {spec.display_name}\n" in text
    assert f"- {spec.display_name} (`{name}`): 1% of the training split's labels" in text
    assert card.data.to_dict()["model-index"][0]["results"][0]["dataset"]["name"] == spec.display_name
    if spec.license or spec.citation:
        section = text.split("## Fine-tuning data licence\n\n", 1)[1].split("\n\n## Citation", 1)[0]
        assert section == f"{spec.display_name}, licence `{spec.license}`. Attribution: {spec.citation}"
    else:
        assert "## Fine-tuning data licence" not in text
    # the template keeps the sections in order
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## How to use", "## Intended use", "## Training data", "## Results", "## Limitations",
                        *(["## Fine-tuning data licence"] if spec.license or spec.citation else []), "## Citation"]


def test_model_card_keeps_no_table_of_data_set_facts():
    """The display names, licences and citations live on the registry entries only (no second table to drift)."""
    import modeling_refers.hub.model_card as model_card
    from datasets_scripts import SOURCE_DATASETS, TARGET_DATASETS

    source = Path(model_card.__file__).read_text()
    for spec in [*TARGET_DATASETS.values(), *SOURCE_DATASETS.values()]:
        assert spec.display_name, spec.name
        assert spec.display_name not in source, spec.display_name
        assert model_card.dataset_display_name(spec.name) == spec.display_name
    assert model_card.dataset_display_name("nih_chestxray14:Atelectasis") == "NIH ChestX-ray14 (Atelectasis)"
    assert model_card.dataset_display_name("my_own_set") == "my_own_set"
