"""Retrieval metrics on hand-made similarity matrices; study/report embeddings against the pretraining forward;
`examples/run_retrieval.py` end to end on real COVID-19-collection studies (tiny random checkpoint)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream_checkpoint import make_tiny_pretraining_checkpoint
from modeling_refers.tasks.common import load_pretraining_folder
from modeling_refers.metrics import retrieval_metrics
from modeling_refers.tasks.retrieval import retrieve, same_text_relevance, study_embeddings, top_k

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Study i goes with report i. Row ranks of the diagonal, counted by hand: row 0: 0.9 is highest -> 1; row 1: 0.8 and
# 0.7 beat 0.5 -> 3; row 2: 0.6 and 0.5 beat 0.4 -> 3; row 3: 0.0 is lowest -> 4. Column ranks: col 0: 0.9 -> 1;
# col 1: 0.6 beats 0.5 -> 2; col 2: 0.7 beats 0.4 -> 2; col 3: 0.2, 0.1, 0.5 beat 0.0 -> 4.
HAND = [[0.9, 0.1, 0.3, 0.2],
        [0.8, 0.5, 0.7, 0.1],
        [0.2, 0.6, 0.4, 0.5],
        [0.3, 0.2, 0.1, 0.0]]


def test_recall_at_k_and_median_rank_by_hand():
    m = retrieval_metrics(HAND, ks=(1, 2, 3, 5))
    assert m["ranks"] == {"image_to_report": [1, 3, 3, 4], "report_to_image": [1, 2, 2, 4]}
    i2r, r2i = m["image_to_report"], m["report_to_image"]
    assert (i2r["R@1"], i2r["R@2"], i2r["R@3"], i2r["R@5"]) == (25.0, 25.0, 75.0, 100.0)
    assert (i2r["median_rank"], i2r["mean_rank"], i2r["num_queries"]) == (3.0, 2.75, 4)
    assert (r2i["R@1"], r2i["R@2"], r2i["R@3"]) == (25.0, 75.0, 75.0)
    assert (r2i["median_rank"], r2i["mean_rank"]) == (2.0, 2.25)


def test_ties_count_against_the_query_and_shared_reports_count_once():
    # Study 0's own report ties with report 1: rank 2, not 1.
    assert retrieval_metrics([[0.5, 0.5], [0.1, 0.9]])["ranks"]["image_to_report"] == [2, 1]
    # Reports 0 and 1 have the same text: for study 0 the better-placed of the two counts (rank 1), and the other
    # relevant one does not push it down; report 1 has studies 0 and 1 as correct matches.
    sim = [[0.2, 0.9, 0.1], [0.3, 0.1, 0.8], [0.7, 0.6, 0.5]]
    rel = same_text_relevance(["a b", "A  b", "c"], ["a b", "a b", "c"])
    assert rel.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    m = retrieval_metrics(sim, rel)
    # rows: study 0 best relevant 0.9 -> 1; study 1 best relevant 0.3, beaten by 0.8 -> 2; study 2: 0.5 is last -> 3
    assert m["ranks"]["image_to_report"] == [1, 2, 3]
    # columns: report 0 = [0.2, 0.3, 0.7], best relevant 0.3 beaten by 0.7 -> 2; report 1 = [0.9, 0.1, 0.6] -> 1;
    # report 2 = [0.1, 0.8, 0.5], 0.5 beaten by 0.8 -> 2
    assert m["ranks"]["report_to_image"] == [2, 1, 2]
    # Two relevant candidates tied at the top: rank 1 (a correct report does not count against another).
    tied = retrieval_metrics([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0, 0, 1]], rel)
    assert tied["ranks"]["image_to_report"] == [1, 1, 1]


def test_top_k_order():
    assert top_k(np.array(HAND), 2).tolist() == [[0, 2], [0, 2], [1, 3], [0, 1]]


def test_top_k_ties_keep_the_lower_index_first():
    # 40 candidates, 39 of them tied (enough that numpy's default, unstable sort reorders them): the best one first,
    # then the tied ones in index order. Row 1 ties everything: plain index order.
    row = np.full(40, 0.5)
    row[30] = 0.9
    assert top_k(np.stack([row, np.full(40, 0.2)]), 12).tolist() == [[30] + list(range(11)), list(range(12))]
    # Unsigned similarities are ranked by value too (negating uint8 would wrap 0 around to the top).
    assert top_k(np.array([[0, 5, 3]], dtype=np.uint8), 3).tolist() == [[1, 2, 0]]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="relevance.*study \\(row\\) 1"):
        retrieval_metrics(np.zeros((2, 2)), [[True, False], [False, False]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics([[np.nan, 0.0], [0.0, 1.0]])
    # Every study has a match, but report (column) 1 is nobody's.
    with pytest.raises(ValueError, match=r"`relevance`: report \(column\) 1 has no relevant match \(1 in all\)"):
        retrieval_metrics(np.zeros((2, 2)), [[True, False], [True, False]])
    for ks in ([0], [1, 0, 5], ()):
        with pytest.raises(ValueError, match="`ks` must be positive integers"):
            retrieval_metrics(np.eye(2), ks=ks)


def test_relevance_given_as_0_1_integers_is_a_mask():
    # The matrices of test_ties_count_against_the_query_and_shared_reports_count_once with relevance as 0/1 ints:
    # the same hand-counted ranks (ints used as indices instead of a mask would pick the wrong candidates).
    sim = [[0.2, 0.9, 0.1], [0.3, 0.1, 0.8], [0.7, 0.6, 0.5]]
    m = retrieval_metrics(sim, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert m["ranks"] == {"image_to_report": [1, 2, 3], "report_to_image": [2, 1, 2]}


# --------------------------------------------------------------------------------------------- model end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data_dir):
    return make_tiny_pretraining_checkpoint(tmp_path_factory.mktemp("ckpt"), shared_data_dir / "covid19_collection")


@pytest.fixture(scope="module")
def test_studies(shared_data_dir):
    from datasets_scripts import load_covid19_studies

    return load_covid19_studies(shared_data_dir / "covid19_collection")["test"].select(range(6))


def test_similarity_is_the_pretraining_logits_times_temperature(checkpoint, test_studies):
    model, processor, _ = load_pretraining_folder(checkpoint, need_text_encoder=True)
    out = retrieve(model, processor, test_studies["images"], test_studies["report"], batch_size=4)
    assert out.similarity.shape == (6, 6) and out.study_embeds.shape[0] == 6
    # The forward pass of pretraining computes the InfoNCE logits cos(study, report) / tau on the same inputs.
    batch = processor(images=list(test_studies["images"]), text=list(test_studies["report"]), do_train_augment=False)
    with torch.no_grad():
        logits = model(**batch, return_loss=False).logits_per_study
    torch.testing.assert_close(out.similarity, logits * model.config.contrastive_temperature, atol=1e-5, rtol=1e-4)
    np.testing.assert_equal(out.metrics["ranks"]["image_to_report"],
                            retrieval_metrics(logits.numpy(), out.relevance.numpy())["ranks"]["image_to_report"])


def test_study_embeddings_ignore_padded_views(checkpoint):
    model, _, _ = load_pretraining_folder(checkpoint, need_text_encoder=True)
    assert model.config.use_view_fusion and model.config.num_views == 3 and not model.config.use_study_projection
    g = torch.Generator().manual_seed(2)
    image = torch.randn(3, 32, 32, generator=g)
    # Study 0: one real view and two padded slots holding garbage; study 1: the same view, other garbage in the pad.
    studies = torch.randn(2, 3, 3, 32, 32, generator=g) * 5
    studies[:, 0] = image
    view_mask = torch.tensor([[1, 0, 0], [1, 0, 0]])
    with torch.no_grad():
        got = study_embeddings(model, studies, view_mask)
        # By hand: the image alone through the radiograph transformer's single-image path (no study projection),
        # divided by its L2 norm.
        single = model.refers(image[None]).study_embeds[0]
        unmasked = study_embeddings(model, studies)  # all three slots read as views
    assert torch.allclose(got, torch.stack([single, single]) / single.norm(), atol=1e-5)
    assert not torch.allclose(unmasked[0], got[0], atol=1e-3)  # the garbage would matter if it were read


def test_retrieve_uses_the_given_relevance_and_ks(checkpoint, test_studies):
    model, processor, _ = load_pretraining_folder(checkpoint, need_text_encoder=True)
    # 6 studies against 3 reports (those of studies 0, 2, 4): studies 2c and 2c+1 both go with report c. Relevance
    # given as 0/1 integers.
    reports = [test_studies["report"][i] for i in (0, 2, 4)]
    relevance = [[1 if i // 2 == c else 0 for c in range(3)] for i in range(6)]
    out = retrieve(model, processor, test_studies["images"], reports, relevance=relevance, batch_size=4, ks=(1, 2))
    assert out.relevance.dtype == torch.bool and out.relevance.tolist() == [[bool(x) for x in r] for r in relevance]
    # Report embeddings by hand: get_text_features of the tokenized reports, divided by their L2 norm.
    batch = processor(text=reports, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    torch.testing.assert_close(out.report_embeds, text / text.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.similarity, out.study_embeds @ out.report_embeds.T)
    sim = out.similarity.numpy()
    # Ranks by hand (ties count against the query). Study i: its report i // 2 against the other two reports.
    i2r = [1 + sum(sim[i, j] >= sim[i, i // 2] for j in range(3) if j != i // 2) for i in range(6)]
    # Report c: the better of studies 2c, 2c+1 against the four other studies.
    r2i = [1 + sum(sim[r, c] >= max(sim[2 * c, c], sim[2 * c + 1, c]) for r in range(6) if r // 2 != c)
           for c in range(3)]
    assert out.metrics["ranks"] == {"image_to_report": i2r, "report_to_image": r2i}
    for name, ranks in (("image_to_report", i2r), ("report_to_image", r2i)):
        m = out.metrics[name]
        assert set(m) == {"R@1", "R@2", "median_rank", "mean_rank", "num_queries"}
        assert m["R@1"] == pytest.approx(100.0 * np.mean(np.array(ranks) <= 1))
        assert m["R@2"] == pytest.approx(100.0 * np.mean(np.array(ranks) <= 2))
        assert m["num_queries"] == len(ranks)


def test_run_retrieval_end_to_end(checkpoint, shared_data_dir, tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_retrieval
    finally:
        sys.path.remove(str(EXAMPLES))
    out = tmp_path / "ret"
    results = run_retrieval.main(["--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--data_dir",
                                  str(shared_data_dir / "covid19_collection"), "--max_samples", "8", "--top_k", "3",
                                  "--num_examples", "2"])
    assert results["num_studies"] == 8 and set(results["image_to_report"]) >= {"R@1", "R@5", "R@10", "median_rank"}
    assert results["image_to_report"]["R@10"] == 100.0  # 8 candidates: every study's report is within the top 10
    lines = [json.loads(line) for line in (out / "top_reports.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(len(x["top_reports"]) == 3 for x in lines)
    for line in lines:  # listed in decreasing similarity; R@1 agrees with the listed first reports
        sims = [t["similarity"] for t in line["top_reports"]]
        assert sims == sorted(sims, reverse=True)
    r1 = 100.0 * np.mean([x["rank_of_own_report"] == 1 for x in lines])
    assert results["image_to_report"]["R@1"] == pytest.approx(r1)
    assert "| image -> report |" in (out / "retrieval_table.md").read_text()
    with Image.open(out / "similarity.png") as image:
        assert image.format == "PNG" and image.size == (640, 560)
    with Image.open(out / "retrieval_examples.png") as image:  # figsize (11, 2.4 per query) at 100 dpi
        assert image.format == "PNG" and image.size == (1100, 480)


def test_run_retrieval_needs_a_report_encoder(tmp_path, checkpoint):
    from modeling_refers import RefersForPreTraining

    sys.path.insert(0, str(EXAMPLES))
    try:
        import run_retrieval
    finally:
        sys.path.remove(str(EXAMPLES))
    model = RefersForPreTraining.from_pretrained(checkpoint)
    config = model.config
    config.use_study_report_consistency = False
    RefersForPreTraining(config).save_pretrained(tmp_path / "no_text")
    with pytest.raises(ValueError, match="--model_name_or_path.*no report encoder"):
        run_retrieval.main(["--model_name_or_path", str(tmp_path / "no_text"), "--output_dir", str(tmp_path / "o")])
