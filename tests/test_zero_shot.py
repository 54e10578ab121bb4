"""Zero-shot classification: CheXzero's positive-vs-negative softmax against a direct computation, the model through
transformers' zero-shot-image-classification pipeline, prompts files, and `examples/run_zero_shot.py` end to end on
real NIH ChestX-ray14 and COVID-19-collection radiographs (tiny random checkpoint)."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from datasets_scripts import TARGET_DATASETS
from downstream_checkpoint import make_tiny_pretraining_checkpoint
from modeling_refers.tasks.common import load_pretraining_folder
from modeling_refers.tasks.zero_shot import (
    RefersForZeroShotImageClassification,
    as_studies,
    load_prompts,
    prompts_to_json,
    zero_shot_classify,
    zero_shot_scores,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_scores_match_direct_softmax_over_the_prompt_pair():
    g = torch.Generator().manual_seed(0)
    image, pos, neg = torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    got = zero_shot_scores(image * 3.0, pos, neg * 0.5, temperature=0.1)  # scale does not matter: cosine
    for i in range(3):
        for c in range(2):
            cos_p = float(image[i] @ pos[c] / (image[i].norm() * pos[c].norm()))
            cos_n = float(image[i] @ neg[c] / (image[i].norm() * neg[c].norm()))
            expected = math.exp(cos_p / 0.1) / (math.exp(cos_p / 0.1) + math.exp(cos_n / 0.1))
            assert float(got[i, c]) == pytest.approx(expected, rel=1e-5)


def test_prompts_files_and_errors(tmp_path):
    labels = ["COVID-19", "non-COVID-19"]
    own = TARGET_DATASETS["covid19"].zero_shot_prompts  # each data set's prompts sit on its registry entry
    assert load_prompts(None, labels, "covid19") == {k: own[k] for k in labels}
    path = tmp_path / "prompts.json"
    path.write_text(prompts_to_json({"COVID-19": ("covid", "not covid"), "non-COVID-19": ("other", "covid")}))
    assert load_prompts(path, labels) == {"COVID-19": ("covid", "not covid"), "non-COVID-19": ("other", "covid")}
    path.write_text(json.dumps({"COVID-19": ["covid", "not covid"]}))
    with pytest.raises(ValueError, match="prompts.json.*non-COVID-19"):
        load_prompts(path, labels)
    path.write_text(json.dumps({"COVID-19": {"positive": "covid"}, "non-COVID-19": ["a", "b"]}))
    with pytest.raises(ValueError, match="'COVID-19' needs a non-empty positive and negative"):
        load_prompts(path, labels)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_prompts(tmp_path / "nowhere.json", labels)
    for name, spec_labels in (("nih_chestxray14", 14), ("covid19_viral_bacterial", 2)):
        assert len(TARGET_DATASETS[name].zero_shot_prompts) == spec_labels


def test_prompts_dict_errors_name_prompts_and_files_are_read_as_utf8(tmp_path, monkeypatch):
    labels = ["COVID-19", "non-COVID-19"]
    # A dict (no file) is named "prompts" in the errors.
    with pytest.raises(ValueError, match="^prompts: no prompts for label 'non-COVID-19'"):
        load_prompts({"COVID-19": ("covid", "not covid")}, labels)
    with pytest.raises(ValueError, match="^prompts: label 'non-COVID-19' needs a non-empty positive and negative"):
        load_prompts({"COVID-19": ("covid", "not covid"), "non-COVID-19": ("other", " ")}, labels)
    # A UTF-8 file reads the same under a non-UTF-8 locale (as cp1252 on Windows): io.text_encoding is what
    # pathlib asks for the encoding when none is given.
    path = tmp_path / "prompts.json"
    prompts = {"COVID-19": ("Opacité en verre dépoli.", "Poumons normaux."), "non-COVID-19": ("Pneumonie…", "Rien.")}
    path.write_bytes(json.dumps({k: list(v) for k, v in prompts.items()}, ensure_ascii=False).encode("utf-8"))
    monkeypatch.setattr("io.text_encoding", lambda encoding, stacklevel=2: encoding or "cp1252")
    assert load_prompts(path, labels) == prompts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data_dir):
    return make_tiny_pretraining_checkpoint(tmp_path_factory.mktemp("ckpt"), shared_data_dir / "covid19_collection")


@pytest.fixture(scope="module")
def nih_images(shared_data_dir):
    return sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))[:3]


def test_classify_equals_embeddings_computed_by_hand(checkpoint, nih_images):
    model, processor, _ = load_pretraining_folder(checkpoint, need_text_encoder=True)
    prompts = {"Cardiomegaly": ("There is cardiomegaly.", "There is no cardiomegaly."),
               "Effusion": ("There is pleural effusion.", "There is no pleural effusion.")}
    out = zero_shot_classify(model, processor, [str(p) for p in nih_images], prompts, batch_size=2)
    assert out.scores.shape == (3, 2) and out.label_names == ["Cardiomegaly", "Effusion"]
    # By hand: each image repeated to a 3-view study (the processor's one-view padding), get_study_features; each
    # sentence alone through get_text_features.
    with torch.no_grad():
        for i, path in enumerate(nih_images):
            batch = processor(images=[[str(path)] * 3], do_train_augment=False)
            v = model.get_study_features(batch["pixel_values"], batch["view_mask"]).pooler_output[0]
            for c, (pos, neg) in enumerate(prompts.values()):
                t = [model.get_text_features(**processor.tokenizer([s], return_tensors="pt",
                                                                    return_token_type_ids=False)).pooler_output[0]
                     for s in (pos, neg)]
                cos = [float(torch.nn.functional.cosine_similarity(v, x, dim=0)) for x in t]
                tau = model.config.contrastive_temperature
                expected = 1 / (1 + math.exp((cos[1] - cos[0]) / tau))
                assert float(out.scores[i, c]) == pytest.approx(expected, abs=1e-5)
                assert float(out.positive_similarity[i, c]) == pytest.approx(cos[0], abs=1e-5)


def test_transformers_pipeline_drives_the_model(checkpoint, nih_images):
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(checkpoint))
    assert isinstance(pipe.model, RefersForZeroShotImageClassification)
    model, processor, _ = load_pretraining_folder(checkpoint, need_text_encoder=True)
    pair = ("There is cardiomegaly.", "There is no cardiomegaly.")
    direct = zero_shot_classify(model, processor, [str(p) for p in nih_images], {"Cardiomegaly": pair}).scores[:, 0]
    for path, expected in zip(nih_images, direct.tolist()):
        result = pipe(str(path), candidate_labels=list(pair), hypothesis_template="{}")
        by_label = {r["label"]: r["score"] for r in result}
        assert by_label[pair[0]] == pytest.approx(expected, abs=1e-5)
        assert by_label[pair[0]] + by_label[pair[1]] == pytest.approx(1.0)


def _run_zero_shot(argv):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_zero_shot
    finally:
        sys.path.remove(str(EXAMPLES))
    return run_zero_shot.main(argv)


def test_run_zero_shot_nih_end_to_end(checkpoint, shared_data_dir, tmp_path):
    out = tmp_path / "zs"
    results = _run_zero_shot(["--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--dataset_name",
                              "nih_chestxray14", "--data_dir", str(shared_data_dir / "nih_chestxray14_sample"),
                              "--max_samples", "40", "--num_examples", "3"])
    assert results["num_images"] == 40 and len(results["per_class_auc"]) == 14
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40
    for name, auc in results["per_class_auc"].items():  # the saved AUC is scikit-learn's on the saved scores
        truth = [name in r["labels"].split("|") for r in rows]
        if auc is None:
            assert len(set(truth)) == 1
        else:
            assert auc == pytest.approx(roc_auc_score(truth, [float(r[f"score_{name}"]) for r in rows]), abs=1e-5)
    assert json.loads((out / "prompts.json").read_text())["Cardiomegaly"]["negative"] == "There is no cardiomegaly."
    with Image.open(out / "roc_curve.png") as image:
        assert image.format == "PNG" and image.size == (640, 600)
    with Image.open(out / "auc_bars.png") as image:  # figsize (6.4, 0.32 x 14 classes + 1.4)
        assert image.format == "PNG" and image.size == (640, round(100 * (0.32 * 14 + 1.4)))
    with Image.open(out / "examples.png") as image:  # 3 radiographs: 3 columns x 1 row of (3.2, 3.9) inches
        assert image.format == "PNG" and image.size == (960, 390)


def test_run_zero_shot_covid_with_a_prompts_file(checkpoint, shared_data_dir, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(prompts_to_json({"non-COVID-19": ("Bacterial pneumonia.", "COVID-19 pneumonia."),
                                        "COVID-19": ("COVID-19 pneumonia.", "Bacterial pneumonia.")}))
    results = _run_zero_shot(["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "c"),
                              "--dataset_name", "covid19", "--data_dir", str(shared_data_dir / "covid19_collection"),
                              "--prompts_file", str(prompts), "--max_samples", "12", "--num_examples", "2"])
    assert results["prompts"]["COVID-19"]["positive"] == "COVID-19 pneumonia."
    # Two classes whose prompts are each other's swapped: p(non-COVID) = 1 - p(COVID), so the AUCs are equal.
    auc = results["per_class_auc"]
    if auc["COVID-19"] is not None:
        assert auc["COVID-19"] == pytest.approx(auc["non-COVID-19"], abs=1e-6)
    with pytest.raises(ValueError, match="no prompts for label 'COVID-19'"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"non-COVID-19": ["a", "b"]}))
        _run_zero_shot(["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "d"),
                        "--dataset_name", "covid19", "--prompts_file", str(bad)])


@pytest.fixture(scope="module")
def zero_shot_model(checkpoint):
    model = RefersForZeroShotImageClassification.from_pretrained(checkpoint).eval()
    assert model.config.use_view_fusion and model.config.num_views == 3 and not model.config.use_study_projection
    return model


def test_as_studies_pads_single_images_as_the_processor_does(checkpoint, nih_images, zero_shot_model):
    # A batch of 2 single images becomes what the processor makes of 2 one-view studies: each image repeated to
    # the 3 views, a view mask of int64 ones; studies (5-D) and their mask pass through unchanged.
    _, processor, _ = load_pretraining_folder(checkpoint, need_text_encoder=True)
    batch = processor(images=[[str(p)] for p in nih_images[:2]], do_train_augment=False)
    images = batch["pixel_values"][:, 0]
    assert not torch.equal(images[0], images[1])
    studies, mask = as_studies(images, None, zero_shot_model.config)
    assert studies.shape == batch["pixel_values"].shape and torch.equal(studies, batch["pixel_values"])
    assert mask.dtype == batch["view_mask"].dtype == torch.long and torch.equal(mask, batch["view_mask"])
    given_mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    passed, passed_mask = as_studies(batch["pixel_values"], given_mask, zero_shot_model.config)
    assert passed is batch["pixel_values"] and passed_mask is given_mask


def test_forward_needs_both_texts_and_images(zero_shot_model):
    ids, pixels = torch.tensor([[2, 5, 3]]), torch.zeros(1, 3, 32, 32)
    for inputs in ({"pixel_values": pixels}, {"input_ids": ids}):
        with pytest.raises(ValueError, match="needs `input_ids` .* and `pixel_values`"):
            zero_shot_model(**inputs)


def test_forward_outputs_equal_features_computed_by_hand_and_ignore_padded_views(zero_shot_model):
    model = zero_shot_model
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    # Study 0: one real view + 2 padded slots; study 1: two real views + 1 padded slot. Padding holds garbage.
    studies = torch.randn(2, 3, 3, 32, 32, generator=g) * 5
    studies[0, 0], studies[1, 0], studies[1, 1] = images
    view_mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    other_garbage = studies.clone()
    other_garbage[0, 1:] = torch.randn(2, 3, 32, 32, generator=g) * 5
    other_garbage[1, 2] = -studies[1, 2]
    input_ids = torch.randint(5, model.config.text_config.vocab_size, (4, 7), generator=g)
    attention_mask = torch.ones(4, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0
    attention_mask[3, 2:] = 0
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=studies, attention_mask=attention_mask, view_mask=view_mask)
        again = model(input_ids=input_ids, pixel_values=other_garbage, attention_mask=attention_mask,
                      view_mask=view_mask)
        # By hand: study 0 is the single image as a one-view study (the fusion's single-image path, no projection);
        # texts through get_text_features, divided by their L2 norm.
        single = model.refers(images[:1]).study_embeds[0]
        text = model.get_text_features(input_ids, attention_mask).pooler_output
    text = text / text.norm(dim=1, keepdim=True)
    assert torch.allclose(out.image_embeds[0], single / single.norm(), atol=1e-5)
    assert torch.allclose(out.image_embeds, again.image_embeds, atol=1e-5)  # padded slots change nothing
    assert torch.allclose(out.image_embeds.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.text_embeds, text, atol=1e-5)
    assert torch.allclose(out.text_embeds.norm(dim=1), torch.ones(4), atol=1e-5)
    tau = model.config.contrastive_temperature
    assert tau == 0.1  # RefersConfig's default, which the tiny checkpoint keeps
    expected = torch.stack([torch.stack([out.image_embeds[i] @ text[j] for j in range(4)]) for i in range(2)]) / 0.1
    assert out.logits_per_image.shape == (2, 4) and torch.allclose(out.logits_per_image, expected, atol=1e-4)
    assert out.logits_per_text is not None and torch.equal(out.logits_per_text, out.logits_per_image.T)
