"""Report-generation metrics against hand computations and the libraries' documented values; `generate_reports` and
`examples/run_generate.py` end to end on real COVID-19-collection studies (tiny random checkpoint)."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from downstream_checkpoint import make_tiny_pretraining_checkpoint
from modeling_refers.tasks.common import load_pretraining_folder
from modeling_refers.metrics import meteor_available, report_generation_metrics, tokenize_report
from modeling_refers.tasks.generation import generate_reports

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_tokenize_report_drops_punctuation_and_case():
    assert tokenize_report("No effusion. Heart size: NORMAL, 2 views; pt's film.") == [
        "no", "effusion", "heart", "size", "normal", "2", "views", "pt's", "film"]


def test_bleu_matches_hand_computation():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (both 6 tokens, brevity penalty 1):
    # clipped 1-gram matches 5/6 (the x2, cat, on, mat); 2-grams 3/5 (the cat, on the, the mat); 3-grams 1/4
    # (on the mat); 4-grams 0/3. BLEU-n = geometric mean of the first n precisions.
    r = report_generation_metrics(["The cat sat on the mat."], ["the cat is on the mat"], meteor=False)
    assert r["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert r["BLEU-3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert r["BLEU-4"] < 1e-3  # no 4-gram matches: pycocoevalcap's 1e-15 smoothing leaves ~8e-5
    assert r["num_reports"] == 1 and r["per_report"]["BLEU-4"] == [pytest.approx(r["BLEU-4"])]


def test_rouge_l_matches_hand_lcs():
    # rouge-score's README pair. LCS("the quick brown fox jumps over the lazy dog", "the quick brown dog jumps on the
    # log") = "the quick brown jumps the" = 5; P = 5/8, R = 5/9.
    r = report_generation_metrics(["The quick brown dog jumps on the log."],
                                  ["The quick brown fox jumps over the lazy dog"], meteor=False)
    p, rec = 5 / 8, 5 / 9
    assert r["ROUGE-L_F1"] == pytest.approx(2 * p * rec / (p + rec), abs=1e-9)  # rouge-score, F1
    beta = 1.2  # pycocoevalcap's ROUGE-L F-measure
    assert r["ROUGE-L"] == pytest.approx((1 + beta**2) * p * rec / (rec + beta**2 * p), abs=1e-9)


def test_sacrebleu_documented_example():
    # sacrebleu's README: BLEU = 48.53 for these three sentences against two reference streams.
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    per_hyp_refs = [[a, b] for a, b in zip(*refs)]
    r = report_generation_metrics(hyps, per_hyp_refs, meteor=False)
    assert r["sacreBLEU"] == pytest.approx(48.53, abs=0.005)


def test_cider_is_ten_for_perfect_reports_with_disjoint_words():
    # Two images whose references share no n-gram: every n-gram has document frequency 1, idf log(2) > 0, the
    # hypothesis vector equals the reference vector (cosine 1 for n = 1..4), no length penalty: 10 x mean(1) = 10.
    refs = ["small left pleural effusion present", "heart size is mildly enlarged today"]
    r = report_generation_metrics(list(refs), list(refs), meteor=False)
    assert r["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert r["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and r["ROUGE-L"] == pytest.approx(1.0)
    worse = report_generation_metrics([refs[0], "no acute disease"], list(refs), meteor=False)
    assert worse["per_report"]["CIDEr"][0] == pytest.approx(10.0) and worse["per_report"]["CIDEr"][1] == 0.0


def test_meteor_runs_with_java_or_says_why_not(monkeypatch):
    available, why = meteor_available()
    if available:
        ref = "no acute cardiopulmonary process"
        r = report_generation_metrics([ref, "large right pneumothorax"], [ref, ref])  # one Java start
        same, other = r["per_report"]["METEOR"]
        assert 0.5 < same <= 1.0 and other < same and min(same, other) <= r["METEOR"] <= max(same, other)
    else:
        assert "Java" in why or "pycocoevalcap" in why
        assert report_generation_metrics(["a b"], ["a b"])["METEOR"] is None
    # Without Java, METEOR is None with the reason; asking for it explicitly is an error naming Java.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    r = report_generation_metrics(["a b c"], ["a b c"])
    assert r["METEOR"] is None and any("Java" in note for note in r["notes"])
    with pytest.raises(RuntimeError, match="Java"):
        report_generation_metrics(["a b c"], ["a b c"], meteor=True)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="references.*2.*predictions.*1"):
        report_generation_metrics(["a"], ["a", "b"], meteor=False)
    with pytest.raises(TypeError, match="^`predictions` must be a list of generated report strings, not one string"):
        report_generation_metrics("a report", ["a"], meteor=False)
    with pytest.raises(ValueError, match="^`predictions` is empty"):
        report_generation_metrics([], [], meteor=False)
    # An empty reference group, or one holding a non-string, is refused naming its index.
    for group in ([], ["fine", 3]):
        with pytest.raises(ValueError, match=r"^`references\[1\]` must be a report string or a non-empty list"):
            report_generation_metrics(["a", "b"], ["a", group], meteor=False)


def test_missing_pycocoevalcap_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # makes `import pycocoevalcap` raise ImportError
    message = r"^report_generation_metrics needs `pycocoevalcap`: pip install pycocoevalcap"
    with pytest.raises(ImportError, match=message):
        report_generation_metrics(["a b"], ["a b"], meteor=False)


def test_meteor_available_looks_for_java(monkeypatch):
    # pycocoevalcap is installed (the scorers above run), so with `java` on PATH METEOR can run; only `java` counts.
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java" if name == "java" else None)
    assert meteor_available() == (True, "")
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "java" else "/usr/bin/" + name)
    available, why = meteor_available()
    assert not available and "`java` is not on PATH" in why


# ------------------------------------------------------------------------------------------ generation end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data_dir):
    return make_tiny_pretraining_checkpoint(tmp_path_factory.mktemp("ckpt"), shared_data_dir / "covid19_collection")


def test_generate_reports_greedy_and_beam_match_model_generate(checkpoint, shared_data_dir):
    from datasets_scripts import load_covid19_studies

    model, processor, tokenizer = load_pretraining_folder(checkpoint, need_decoder=True)
    studies = load_covid19_studies(shared_data_dir / "covid19_collection")["test"].select(range(3))["images"]
    greedy = generate_reports(model, processor, studies, tokenizer, batch_size=2, max_new_tokens=6)
    beam = generate_reports(model, processor, studies, tokenizer, batch_size=3, num_beams=2, max_new_tokens=6)
    assert len(greedy) == len(beam) == 3 and all(isinstance(t, str) for t in greedy + beam)
    inputs = processor(images=list(studies), do_train_augment=False, return_tensors="pt")
    for kwargs, texts in (({}, greedy), ({"num_beams": 2}, beam)):
        ids = model.generate(inputs["pixel_values"], inputs["view_mask"], max_new_tokens=6, **kwargs)
        assert texts == [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    # Greedy is the argmax of the decoder at every step (checked on the first study by hand-rolled decoding).
    memory = model.get_study_features(inputs["pixel_values"][:1], inputs["view_mask"][:1]).last_hidden_state
    mask = torch.ones(memory.shape[:2], dtype=torch.long)
    tokens = [model.config.bos_token_id]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.tensor([tokens])
            logits = model.report_decoder(ids, torch.ones_like(ids), memory, mask).logits
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] == model.config.eos_token_id:
                break
    assert greedy[0] == tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_run_generate_end_to_end(checkpoint, shared_data_dir, tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_generate
    finally:
        sys.path.remove(str(EXAMPLES))
    out = tmp_path / "gen"
    results = run_generate.main(["--model_name_or_path", str(checkpoint), "--output_dir", str(out),
                                 "--data_dir", str(shared_data_dir / "covid19_collection"), "--max_samples", "4",
                                 "--num_beams", "1", "2", "--max_new_tokens", "5", "--num_examples", "2",
                                 "--no_meteor"])
    assert set(results["scores"]) == {"greedy", "beam2"} and results["num_studies"] == 4
    saved = json.loads((out / "results.json").read_text())
    lines = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]) == {"study_id", "reference", "greedy", "beam2"}
    # The saved scores are the metrics of the saved reports.
    again = report_generation_metrics([x["greedy"] for x in lines], [x["reference"] for x in lines], meteor=False)
    assert saved["scores"]["greedy"]["BLEU-1"] == pytest.approx(again["BLEU-1"])
    assert saved["scores"]["greedy"]["CIDEr"] == pytest.approx(again["CIDEr"])
    from datasets_scripts import load_covid19_studies

    views = min(3, max(len(s) for s in load_covid19_studies(shared_data_dir / "covid19_collection")["test"]
                       .select(range(2))["images"]))
    with Image.open(out / "report_examples.png") as image:  # figsize (2.2 * views + 7.5, 2.6 * studies) at 100 dpi
        assert image.format == "PNG" and image.size == (round(100 * (2.2 * views + 7.5)), 2 * 260)
    with Image.open(out / "metrics.png") as image:
        assert image.format == "PNG" and image.size == (750, 380)


def test_run_generate_refuses_a_folder_without_a_checkpoint(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_generate
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.raises(FileNotFoundError, match="--model_name_or_path.*config.json"):
        run_generate.main(["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "o")])


def test_sacrebleu_lower_cases_and_pads_ragged_reference_groups_with_the_first():
    """sacreBLEU is lower-cased (an upper-case copy of its reference scores 100), and predictions with fewer references
    than the widest group repeat their first reference in the missing streams: equal to sacrebleu called by hand."""
    import sacrebleu

    shouted = report_generation_metrics(["THE HEART IS NORMAL IN SIZE"], ["the heart is normal in size"], meteor=False)
    assert shouted["sacreBLEU"] == pytest.approx(100.0)
    assert sacrebleu.corpus_bleu(["THE HEART IS NORMAL IN SIZE"], [["the heart is normal in size"]]).score < 100
    predictions = ["no acute cardiopulmonary process", "small left pleural effusion", "heart size is normal"]
    references = [["no acute cardiopulmonary disease", "no acute process"], ["small left effusion"],
                  ["the heart size is normal", "normal heart size", "heart is normal"]]
    streams = [["no acute cardiopulmonary disease", "small left effusion", "the heart size is normal"],
               ["no acute process", "small left effusion", "normal heart size"],
               ["no acute cardiopulmonary disease", "small left effusion", "heart is normal"]]
    expected = sacrebleu.corpus_bleu(predictions, streams, lowercase=True).score
    assert report_generation_metrics(predictions, references, meteor=False)["sacreBLEU"] == pytest.approx(expected)


def test_meteor_false_skips_it_even_with_java_and_per_report_scores_are_named(monkeypatch):
    """`meteor=False` never starts METEOR, even where Java is found, and says so in the notes; `per_report` holds
    BLEU-4, ROUGE-L and CIDEr per report, whose means are pycocoevalcap's corpus ROUGE-L and CIDEr."""
    import pycocoevalcap.meteor.meteor as meteor_module

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java" if name == "java" else None)

    def no_java(*args, **kwargs):
        raise AssertionError("METEOR was started")

    monkeypatch.setattr(meteor_module, "Meteor", no_java)
    r = report_generation_metrics(["no acute disease", "large right pneumothorax"],
                                  ["no acute disease", "small right pneumothorax"], meteor=False)
    assert r["METEOR"] is None and "METEOR not computed (meteor=False)" in r["notes"]
    assert set(r["per_report"]) == {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert sum(r["per_report"]["ROUGE-L"]) / 2 == pytest.approx(r["ROUGE-L"])
    assert sum(r["per_report"]["CIDEr"]) / 2 == pytest.approx(r["CIDEr"])
