"""MRM's official switch (RL4M/MRM-pytorch) checked point by point against hand computations: the WordPiece
tokenisation ('[CLS] ' as text, no [SEP], 100 tokens), MRM's whole-word masking, the loss over all positions, the
official image pipeline and its normalization constants, the fixed 2-D sin-cos tables, the bicubic resize without
antialias, the latent entering BERT after its embeddings' LayerNorm, xavier initialisation, the official sizes and
recipe; and the default (the paper's reading) left as it was."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_refers.training.mrm_official import (
    MRM_OFFICIAL_PIXEL_MEAN,
    MRM_OFFICIAL_PIXEL_STD,
    OfficialMaskedReportCollator,
    continuation_flags,
    encode_reports_official,
    load_mrm_tokenizer,
    mask_whole_words_official,
    official_image_transform,
    report_labels,
)

SENTENCE = "Heart size is normal, no pneumothorax. Hyperinflation 12345!"


@pytest.fixture(scope="module")
def vocab_file(data_source, shared_data_dir):
    path = shared_data_dir / "mrm" / "mimic_wordpiece.json"
    if not (data_source == "shared" and path.is_file()):
        pytest.skip(f"MRM's tokenizer: needs mrm/mimic_wordpiece.json of the full shared data (looked for {path})")
    return path


class ScriptedDraws:
    """A stand-in for numpy's generator whose `random()` returns the given draws in order (and records the calls)."""

    def __init__(self, draws):
        self.draws, self.calls = list(draws), 0

    def random(self):
        self.calls += 1
        return self.draws.pop(0)


# ----------------------------------------------------------------------------------------------------------------------
# Reports: tokenisation, whole-word masking, labels
# ----------------------------------------------------------------------------------------------------------------------


def test_official_tokenisation_is_cls_as_text_no_sep_padded_to_100(vocab_file):
    vocab = json.loads(vocab_file.read_text())["model"]["vocab"]
    tokenizer = load_mrm_tokenizer(vocab_file)
    input_ids, attention_mask = encode_reports_official(tokenizer, [SENTENCE])
    # by hand: lower-cased, split at spaces and punctuation, digits runs kept; '12345' is not one token of the vocabulary
    pieces = ["[CLS]", "heart", "size", "is", "normal", ",", "no", "pneumothorax", ".", "hyperinflation"]
    expected = [vocab[piece] for piece in pieces]
    assert input_ids.shape == attention_mask.shape == (1, 100)
    assert input_ids[0, :10].tolist() == expected and expected[0] == 2  # [CLS] = 2 from the text itself
    n = int(attention_mask.sum())
    number = [tokenizer.convert_ids_to_tokens(i) for i in input_ids[0, 10:n - 1].tolist()]
    assert "".join(piece.removeprefix("##") for piece in number) == "12345" and number[0] == "12"
    assert all(piece.startswith("##") for piece in number[1:])
    assert tokenizer.convert_ids_to_tokens(int(input_ids[0, n - 1])) == "!"
    assert input_ids[0, n:].eq(0).all() and attention_mask[0, n:].eq(0).all()  # padding [PAD] = 0, no [SEP] anywhere
    assert tokenizer.sep_token_id is None and tokenizer.mask_token_id == 3
    # the library the official code calls, as it calls it (util/pretrain_datasets.py)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(vocab_file))
    raw.enable_truncation(max_length=100)
    raw.enable_padding(length=100)
    reference = raw.encode("[CLS] " + SENTENCE)
    assert input_ids[0].tolist() == reference.ids and attention_mask[0].tolist() == reference.attention_mask
    long_ids, long_mask = encode_reports_official(tokenizer, ["normal " * 300])
    assert long_ids.shape == (1, 100) and long_mask.all()  # truncated to exactly 100


def test_missing_vocabulary_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json.*mimic_wordpiece\.json.*nothing is downloaded"):
        load_mrm_tokenizer(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match=r"mimic_wordpiece\.json"):
        load_mrm_tokenizer(tmp_path)  # a folder without it


def test_whole_word_masking_joins_pieces_skips_cls_last_and_padding_by_hand():
    # ids: 2 [CLS]; word pieces 10..19; '##' pieces 20..29; 3 [MASK]; 0 [PAD]
    is_continuation = torch.zeros(40, dtype=torch.bool)
    is_continuation[20:30] = True
    row = torch.tensor([[2, 10, 20, 21, 11, 12, 22, 13, 0, 0]])
    # words: [10 20 21] [11] [12 22] [13]; draws for each word start, in order: mask, keep, mask, keep
    draws = ScriptedDraws([0.1, 0.9, 0.4999, 0.5])
    masked = mask_whole_words_official(row, is_continuation, mask_token_id=3, probability=0.5, generator=draws)
    assert masked.tolist() == [[2, 3, 3, 3, 11, 3, 3, 13, 0, 0]] and draws.calls == 4
    assert row.tolist() == [[2, 10, 20, 21, 11, 12, 22, 13, 0, 0]]  # the input is left as it was
    # no padding: the last position is never read (range(1, L - 1)), [CLS] never
    full = torch.tensor([[2, 10, 11, 12]])
    draws = ScriptedDraws([0.0, 0.0])
    assert mask_whole_words_official(full, is_continuation, 3, generator=draws).tolist() == [[2, 3, 3, 12]]
    assert draws.calls == 2
    # a kept word keeps its pieces even when a later draw would mask (pieces follow the word's first piece only)
    draws = ScriptedDraws([0.9, 0.0])
    assert mask_whole_words_official(torch.tensor([[2, 10, 20, 11, 5]]), is_continuation, 3,
                                     generator=draws).tolist() == [[2, 10, 20, 3, 5]]


def test_whole_word_masking_rate_on_the_real_vocabulary(vocab_file):
    tokenizer = load_mrm_tokenizer(vocab_file)
    flags = continuation_flags(tokenizer)
    assert flags[tokenizer.convert_tokens_to_ids("##3")] and not flags[tokenizer.convert_tokens_to_ids("heart")]
    input_ids, _ = encode_reports_official(tokenizer, [SENTENCE] * 400)
    masked = mask_whole_words_official(input_ids, flags, tokenizer.mask_token_id, generator=np.random.default_rng(0))
    starts = (~flags[input_ids[:, 1:]]) & input_ids[:, 1:].ne(0)  # word starts after [CLS]
    rate = masked[:, 1:][starts].eq(3).float().mean().item()
    assert abs(rate - 0.5) < 0.02  # 400 x 12 words, Bernoulli(0.5) each: std 0.007
    pieces = flags[input_ids] & input_ids.ne(0)
    previous = torch.roll(masked, 1, dims=1)
    assert torch.equal(masked[pieces].eq(3), previous[pieces].eq(3))  # a piece is masked iff the token before it is


def test_labels_all_positions_and_the_report_loss_by_hand():
    original = torch.tensor([[2, 10, 11, 12, 0, 0]])
    masked = torch.tensor([[2, 3, 11, 3, 0, 0]])
    assert report_labels(original, masked, 3, "all").tolist() == original.tolist()
    assert report_labels(original, masked, 3, "masked").tolist() == [[-100, 10, -100, 12, -100, -100]]
    with pytest.raises(ValueError, match="mrm_report_loss_positions"):
        report_labels(original, masked, 3, "some")
    logits = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    log_p = logits[0].log_softmax(-1)
    every = -sum(log_p[i, original[0, i]] for i in range(6)) / 6  # [CLS], visible words and padding all count
    only_masked = -(log_p[1, 10] + log_p[3, 12]) / 2
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(ce(logits[0], report_labels(original, masked, 3, "all")[0]), every)
    torch.testing.assert_close(ce(logits[0], report_labels(original, masked, 3, "masked")[0], ignore_index=-100),
                               only_masked)
    assert not torch.isclose(every, only_masked)


# ----------------------------------------------------------------------------------------------------------------------
# Images: augmentation and normalization
# ----------------------------------------------------------------------------------------------------------------------


def test_normalization_constants_on_a_constant_image():
    assert (MRM_OFFICIAL_PIXEL_MEAN, MRM_OFFICIAL_PIXEL_STD) == (0.4978, 0.2449)
    image = Image.new("RGB", (300, 200), (90, 90, 90))
    for train in (True, False):
        out = official_image_transform(train, size=64)(image)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full_like(out, (90 / 255 - 0.4978) / 0.2449), rtol=0, atol=1e-6)


def test_evaluation_transform_is_bicubic_resize_grayscale_normalize_by_hand(radiographs):
    array = ((radiographs(1, size=40)[0, 0].numpy() + 1) * 127.5).astype(np.uint8)
    rgb = Image.fromarray(np.stack([array, array // 2, array], axis=-1))
    out = official_image_transform(False, size=24)(rgb)
    gray = np.asarray(rgb.resize((24, 24), Image.BICUBIC).convert("L"), dtype=np.float32) / 255  # PIL's ITU-R 601 luma
    expected = torch.from_numpy((gray - 0.4978) / 0.2449).expand(3, -1, -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_training_transform_is_random_resized_crop_and_flip_only():
    from torchvision.transforms import InterpolationMode, v2

    transform = official_image_transform(True)
    kinds = [type(step) for step in transform.transforms]
    assert kinds == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.Grayscale, v2.ToImage, v2.ToDtype, v2.Normalize]
    crop, flip = transform.transforms[:2]
    assert tuple(crop.size) == (448, 448) and crop.scale == (0.2, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert flip.p == 0.5
    # a left-half-white image: flips and crops move the white half, never change the value range
    image = Image.fromarray(np.concatenate([np.full((64, 32), 255, np.uint8), np.zeros((64, 32), np.uint8)], axis=1))
    torch.manual_seed(0)
    outs = torch.stack([transform(image.convert("RGB"))[0] for _ in range(12)])
    left_brighter = (outs[:, :, :224].mean(dim=(1, 2)) > outs[:, :, 224:].mean(dim=(1, 2)))
    assert 0 < left_brighter.sum() < 12  # some flipped, some not
    low, high = (0 - 0.4978) / 0.2449, (1 - 0.4978) / 0.2449
    assert outs.min() >= low - 0.1 and outs.max() <= high + 0.1  # bicubic overshoot only


def test_collator_builds_official_batches(vocab_file, radiographs):
    from modeling_refers import MRMConfig

    tokenizer = load_mrm_tokenizer(vocab_file)
    config = MRMConfig.from_official(image_size=32, patch_size=8, mrm_reconstruction_size=64)

    class Processor:  # only the tokenizer is read on the official image path
        pass

    processor = Processor()
    processor.tokenizer = tokenizer
    array = ((radiographs(1, size=80)[0, 0].numpy() + 1) * 127.5).astype(np.uint8)
    rows = [dict(images=[array, array[::-1]], report=SENTENCE, study_id="s1"),
            dict(images=[array], report="No acute cardiopulmonary process.", study_id="s2")]
    batch = OfficialMaskedReportCollator(processor, train=True, config=config)(rows)
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and "view_mask" not in batch
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 100) and batch["study_ids"] == ["s1", "s2"]
    original, _ = encode_reports_official(tokenizer, [row["report"] for row in rows])
    assert torch.equal(batch["labels"], original)  # loss over all positions: the unmasked ids everywhere
    changed = batch["input_ids"] != original
    assert changed.any() and batch["input_ids"][changed].eq(3).all() and not changed[:, 0].any()
    evaluation = OfficialMaskedReportCollator(processor, train=False, config=config)
    first, second = evaluation(rows), evaluation(rows)
    assert torch.equal(first["input_ids"], second["input_ids"])  # evaluation is repeatable
    torch.testing.assert_close(first["pixel_values"][0], official_image_transform(False, 64)(
        Image.fromarray(array).convert("RGB")))  # the first view, resized


# ----------------------------------------------------------------------------------------------------------------------
# Model: sizes, position tables, resize, latent injection, initialisation; the default left as it was
# ----------------------------------------------------------------------------------------------------------------------

VOCAB = 64


def tiny(official: bool = True, **overrides):
    from modeling_refers import MRMConfig

    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, mrm_decoder_hidden_size=16, mrm_decoder_num_hidden_layers=1,
                  mrm_decoder_num_attention_heads=2, mrm_decoder_intermediate_size=64, max_report_length=12,
                  text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=12, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0))
    if official:
        values["mrm_reconstruction_size"] = 64
        return MRMConfig.from_official(**{**values, **overrides})
    values.update(hidden_dropout_prob=0.0)
    return MRMConfig(**{**values, **overrides})


def numpy_sincos(dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py formula, which model_mrm.py imports for both tables, re-derived in numpy: a grid from
    meshgrid(w, h) (w first), half the width per axis, [sin | cos] of pos * 1 / 10000 ** (2i / (dim / 2)), a zero
    row for the class token."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one_axis(width, positions):
        omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


def test_official_sizes_and_switches_are_config_values():
    from modeling_refers import MRMConfig

    official, paper = MRMConfig.from_official(), MRMConfig()
    assert (official.mrm_decoder_hidden_size, official.mrm_decoder_num_hidden_layers,
            official.mrm_decoder_num_attention_heads, official.mrm_decoder_intermediate_size) == (768, 4, 6, 3072)
    assert (paper.mrm_decoder_hidden_size, paper.mrm_decoder_num_hidden_layers, paper.mrm_decoder_num_attention_heads,
            paper.mrm_decoder_intermediate_size) == (512, 8, 16, 2048)
    text = official.text_config
    assert (text.model_type, text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.intermediate_size, text.max_position_embeddings, text.type_vocab_size, text.pad_token_id) == (
        "bert", 30000, 384, 6, 6, 1536, 100, 2, 0)
    assert (official.image_size, official.patch_size, official.hidden_size, official.num_hidden_layers,
            official.num_attention_heads, official.intermediate_size, official.layer_norm_eps) == (
        224, 16, 768, 12, 12, 3072, 1e-6)
    assert official.hidden_dropout_prob == official.attention_probs_dropout_prob == 0.0  # no encoder dropout
    assert paper.hidden_dropout_prob == 0.1
    assert official.mrm_reconstruction_size == official.input_image_size == 448 and paper.mrm_reconstruction_size is None
    assert (official.max_report_length, official.pad_token_id, official.bos_token_id, official.num_views) == (100, 0, 2, 1)
    switches = ("mrm_position_embeddings", "mrm_resize_mode", "mrm_resize_antialias", "mrm_report_condition",
                "mrm_report_masking", "mrm_report_loss_positions", "mrm_image_augmentation", "mrm_initialization")
    assert [getattr(official, name) for name in switches] == [
        "sincos", "bicubic", False, "embeddings_output", "official", "all", "official", "xavier"]
    assert [getattr(paper, name) for name in switches] == [
        "learned", "bilinear", True, "word_embeddings", "whole_word", "masked", "processor", "refers"]
    assert (official.mrm_mask_ratio, official.mrm_norm_pix_loss, official.mrm_report_mask_ratio) == (0.75, True, 0.5)
    # overrides on top, a partial text_config merged into the official one; the switch round-trips through a folder
    changed = MRMConfig.from_official(mrm_decoder_num_hidden_layers=2, text_config=dict(num_hidden_layers=2))
    assert changed.mrm_decoder_num_hidden_layers == 2 and changed.text_config.num_hidden_layers == 2
    assert changed.text_config.hidden_size == 384
    assert MRMConfig.from_dict(official.to_dict()).to_dict() == official.to_dict()


@pytest.mark.parametrize("field, value", [("mrm_position_embeddings", "rope"), ("mrm_resize_mode", "lanczos"),
                                          ("mrm_report_condition", "cross_attention"), ("mrm_report_masking", "span"),
                                          ("mrm_report_loss_positions", "some"), ("mrm_image_augmentation", "albu"),
                                          ("mrm_initialization", "kaiming")])
def test_bad_switch_values_are_named(field, value):
    from modeling_refers import MRMConfig

    with pytest.raises(ValueError, match=f"MRMConfig.{field} must be one of"):
        MRMConfig(**{field: value})


def test_sincos_table_against_numpy_and_by_hand():
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder

    from modeling_refers.modeling_mrm import mrm_2d_sincos_position_embedding

    for dim, grid in ((8, 3), (32, 4), (768, 14)):
        table = mrm_2d_sincos_position_embedding(dim, grid)
        assert table.shape == (1 + grid * grid, dim) and table.dtype == torch.float32
        # computed in float64 as MAE's numpy code: the same float32 table up to one float32 step near 1 (float32
        # frequencies would be off by several)
        torch.testing.assert_close(table, torch.from_numpy(numpy_sincos(dim, grid)).float(), rtol=0, atol=1.2e-7)
    # by hand, width 8 on a 3 x 3 grid: the patch in row 1, column 2 (index 1 + 1 * 3 + 2); frequencies 1 and 1/100;
    # the column (w) first, then the row (h)
    row = mrm_2d_sincos_position_embedding(8, 3)[1 + 1 * 3 + 2].double()
    expected = torch.tensor([np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02),
                             np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)], dtype=torch.float64)
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-7)
    # the decoder's official table (width 768, 14 x 14) is the table transformers' ViT-MAE decoder builds
    decoder = ViTMAEDecoder(ViTMAEConfig(hidden_size=32, decoder_hidden_size=768, decoder_num_hidden_layers=1,
                                         decoder_num_attention_heads=6, decoder_intermediate_size=32), num_patches=196)
    torch.testing.assert_close(decoder.decoder_pos_embed[0], mrm_2d_sincos_position_embedding(768, 14), rtol=0,
                               atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        mrm_2d_sincos_position_embedding(6, 3)


def test_official_encoder_positions_are_the_fixed_table_and_stay_fixed(tmp_path):
    from modeling_refers import MRMForPreTraining
    from modeling_refers.modeling_mrm import mrm_2d_sincos_position_embedding

    model = MRMForPreTraining(tiny())
    positions = model.refers.embeddings.position_embeddings
    torch.testing.assert_close(positions[0], mrm_2d_sincos_position_embedding(32, 4), rtol=0, atol=0)
    torch.testing.assert_close(model.image_decoder.decoder_pos_embed[0], mrm_2d_sincos_position_embedding(16, 4),
                               rtol=0, atol=1e-6)
    assert not positions.requires_grad and not model.image_decoder.decoder_pos_embed.requires_grad
    before = positions.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(4, VOCAB, (2, 12))
    model(pixel_values=torch.randn(2, 3, 64, 64), input_ids=ids, attention_mask=torch.ones_like(ids),
          labels=ids).loss.backward()
    optimizer.step()
    assert torch.equal(model.refers.embeddings.position_embeddings, before)
    model.save_pretrained(tmp_path)
    reloaded = MRMForPreTraining.from_pretrained(tmp_path)
    assert not reloaded.refers.embeddings.position_embeddings.requires_grad
    assert torch.equal(reloaded.refers.embeddings.position_embeddings, before)
    paper = MRMForPreTraining(tiny(official=False))
    assert paper.refers.embeddings.position_embeddings.requires_grad  # the default: learned
    assert not torch.allclose(paper.refers.embeddings.position_embeddings[0], before[0])


def test_encoder_input_is_bicubic_without_antialias(radiographs):
    from modeling_refers import MRMForPreTraining

    images = radiographs(2, size=64)
    official, paper = MRMForPreTraining(tiny()), MRMForPreTraining(tiny(official=False, mrm_reconstruction_size=64))
    interpolate = torch.nn.functional.interpolate
    expected = interpolate(images, size=(32, 32), mode="bicubic", antialias=False, align_corners=False)
    assert torch.equal(official.encoder_inputs(images), expected)
    assert not torch.allclose(expected, interpolate(images, size=(32, 32), mode="bicubic", antialias=True))
    assert torch.equal(paper.encoder_inputs(images),  # the default, as before: bilinear with antialias
                       interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False))
    same = MRMForPreTraining(tiny(mrm_resize_mode="bilinear", mrm_resize_antialias=True))
    assert torch.equal(same.encoder_inputs(images), paper.encoder_inputs(images))  # fields, not hard-coded


def _manual_report_logits(model, images, input_ids, seed, after_layernorm):
    """The report branch computed by hand: the same patch masks, the projected mean of the visible patches added
    after BERT's embeddings (LayerNorm, dropout: eval) or to the word embeddings before them."""
    from modeling_refers.modeling_mrm import random_patch_masking

    inputs = model.encoder_inputs(images)
    ids_keep, _, _ = random_patch_masking(inputs.shape[0], model.config.num_patches, model.config.mrm_mask_ratio,
                                          torch.Generator().manual_seed(seed))
    encoded = model.encode_visible(inputs, ids_keep)
    latent = model.report_condition(encoded[:, 1:].mean(dim=1))[:, None]
    bert = model.text_encoder
    if after_layernorm:
        hidden = bert.encoder(bert.embeddings(input_ids=input_ids) + latent).last_hidden_state
    else:
        hidden = bert(inputs_embeds=bert.embeddings.word_embeddings(input_ids) + latent).last_hidden_state
    return model.report_head(hidden), encoded


def test_the_latent_enters_bert_after_the_embeddings_layernorm(radiographs):
    from modeling_refers import MRMForPreTraining

    images, ids = radiographs(2, size=64), torch.randint(4, VOCAB, (2, 12))
    model = MRMForPreTraining(tiny()).eval()
    out = model(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                generator=torch.Generator().manual_seed(3))
    expected, encoded = _manual_report_logits(model, images, ids, 3, after_layernorm=True)
    torch.testing.assert_close(out.report_logits, expected, rtol=1e-5, atol=1e-5)
    wrong, _ = _manual_report_logits(model, images, ids, 3, after_layernorm=False)
    assert not torch.allclose(out.report_logits, wrong, atol=1e-3)
    # the official order (bert_mlp on every token, then the mean over the visible ones) is the same affine map
    official_latent = model.report_condition(encoded)[:, 1:].mean(dim=1)
    torch.testing.assert_close(official_latent, model.report_condition(encoded[:, 1:].mean(dim=1)), rtol=1e-5,
                               atol=1e-6)
    # the loss over all positions: cross-entropy by hand over every one of the 2 x 12 labels
    log_p = out.report_logits.log_softmax(-1)
    hand = -torch.stack([log_p[b, t, ids[b, t]] for b in range(2) for t in range(12)]).mean()
    torch.testing.assert_close(out.loss_report, hand, rtol=1e-5, atol=1e-6)


def test_the_default_conditions_the_word_embeddings_exactly_as_before(radiographs):
    from modeling_refers import MRMForPreTraining

    images, ids = radiographs(2, size=32), torch.randint(4, VOCAB, (2, 12))
    model = MRMForPreTraining(tiny(official=False)).eval()
    out = model(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids),
                generator=torch.Generator().manual_seed(3))
    expected, _ = _manual_report_logits(model, images, ids, 3, after_layernorm=False)
    assert torch.equal(out.report_logits, expected)  # bit for bit


def test_xavier_initialisation_of_every_linear():
    from modeling_refers import MRMForPreTraining

    config = tiny(hidden_size=96, num_attention_heads=4, intermediate_size=384, mrm_decoder_hidden_size=64,
                  mrm_decoder_intermediate_size=256,
                  text_config=dict(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=12))
    model = MRMForPreTraining(config)

    def check(weight, fan_in, fan_out):
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert weight.abs().max() <= bound
        assert abs(weight.std().item() - bound / 3**0.5) < 0.06 * bound  # uniform(-a, a): std a / sqrt(3)

    layer, block = model.refers.layers[0], model.image_decoder.decoder_layers[0]
    for projection in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
        check(projection.weight, 96, 3 * 96)  # timm's fused qkv Linear(d, 3d): xavier over the fused shape
    for projection in (block.attention.q_proj, block.attention.v_proj):
        check(projection.weight, 64, 3 * 64)
    check(layer.attention.o_proj.weight, 96, 96)
    check(layer.mlp.fc1.weight, 96, 384)
    check(block.mlp.fc2.weight, 256, 64)
    check(model.image_decoder.decoder_embed.weight, 96, 64)
    check(model.image_decoder.decoder_pred.weight, 64, 16 * 16 * 3)
    check(model.refers.embeddings.patch_embeddings.projection.weight.flatten(1), 3 * 8 * 8, 96)  # as a Linear
    bert = model.text_encoder.encoder.layer[0]
    check(bert.attention.self.query.weight, 64, 64)  # BERT's own q, k, v are separate Linear layers
    check(bert.intermediate.dense.weight, 64, 256)
    check(model.report_condition.weight, 96, 64)
    check(model.report_head.predictions.transform.dense.weight, 64, 64)
    # the masked-LM decoder is tied to the word embeddings officially: both hold the one xavier matrix
    check(model.report_head.predictions.decoder.weight, 64, 500)
    assert torch.equal(model.report_head.predictions.decoder.weight, model.text_encoder.embeddings.word_embeddings.weight)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in linears)
    assert abs(model.refers.embeddings.cls_token.std().item() - 0.02) < 0.006  # N(0, 0.02), as the mask token
    assert abs(model.image_decoder.mask_token.std().item() - 0.02) < 0.008
    # the default keeps the truncated normal (std 0.02)
    paper = MRMForPreTraining(tiny(official=False, hidden_size=96, intermediate_size=384))
    assert abs(paper.refers.layers[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert not paper.refers.embeddings.cls_token.any()


# ----------------------------------------------------------------------------------------------------------------------
# The switch in run_pretrain: --recipe mrm_official
# ----------------------------------------------------------------------------------------------------------------------


def test_recipe_mrm_official_warms_up_a_fifth_and_does_not_clip():
    from types import SimpleNamespace

    from modeling_refers.training.pretraining import RECIPES

    args = SimpleNamespace(per_device_train_batch_size=32, gradient_accumulation_steps=2, world_size=4,
                           learning_rate=3e-3, weight_decay=1e-4, warmup_steps=0.0333, max_grad_norm=10.0)
    optimizer = RECIPES["mrm_official"](args)
    assert args.warmup_steps == pytest.approx(40 / 200) and args.max_grad_norm == 0.0  # run.sh; no clip_grad
    assert args.learning_rate == pytest.approx(1.5e-4) and args.weight_decay == 0.05  # 1.5e-4 x 256 / 256
    assert optimizer["optimizer_name"] == "adamw" and optimizer["adam_betas"] == (0.9, 0.95)


def test_run_pretrain_recipe_mrm_official(tmp_path, shared_data_dir, vocab_file):
    from modeling_refers import MRMForPreTraining
    from modeling_refers.training import pretraining

    common = ["--method", "mrm", "--recipe", "mrm_official", "--data_dir", str(shared_data_dir / "covid19_collection"),
              "--config_overrides", "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,"
              "intermediate_size=64,mrm_reconstruction_size=64,mrm_decoder_hidden_size=16,"
              "mrm_decoder_num_hidden_layers=1,mrm_decoder_num_attention_heads=2,mrm_decoder_intermediate_size=32",
              "--text_config_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64",
              "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_train_samples", "8",
              "--max_eval_samples", "4", "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1",
              "--logging_steps", "1", "--use_cpu", "--dataloader_pin_memory", "false", "--do_train"]
    with pytest.raises(ValueError, match="--recipe mrm_official needs --tokenizer_name_or_path: the local "
                                         "mimic_wordpiece.json"):
        pretraining.main(["--output_dir", str(tmp_path / "x"), *common])
    trainer = pretraining.main(["--output_dir", str(tmp_path / "run"), "--tokenizer_name_or_path", str(vocab_file),
                                    *common])
    model, args = trainer.model, trainer.args
    assert type(model) is MRMForPreTraining
    config = model.config
    assert (config.mrm_position_embeddings, config.mrm_report_condition, config.mrm_initialization,
            config.mrm_report_masking, config.mrm_image_augmentation) == (
        "sincos", "embeddings_output", "xavier", "official", "official")
    assert config.text_config.vocab_size == 30000 and config.text_config.max_position_embeddings == 100
    assert config.text_config.hidden_size == 32  # --text_config_overrides on the official BERT, built from scratch
    assert args.max_grad_norm == 0.0 and args.warmup_steps == pytest.approx(0.2)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["input_ids"].shape == (2, 100)
    assert batch["input_ids"][:, 0].eq(2).all() and batch["labels"].ne(-100).all()
    assert not model.refers.embeddings.position_embeddings.requires_grad
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        assert entry["loss_image"] + entry["loss_report"] == pytest.approx(entry["loss"], abs=2e-4)


def test_default_collator_takes_the_loss_positions_switch(shared_data_dir):
    from datasets_scripts import load_covid19_studies
    from modeling_refers import RefersImageProcessor, RefersProcessor, train_report_tokenizer
    from modeling_refers.training.trainer import MaskedReportCollator, processor_sizes

    rows = list(load_covid19_studies(shared_data_dir / "covid19_collection")["train"])[:6]
    tokenizer = train_report_tokenizer([r["report"] for r in rows], vocab_size=200)
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), tokenizer, num_views=2, max_length=48)
    masked_only = MaskedReportCollator(processor, train=False)(rows)
    every = MaskedReportCollator(processor, train=False, loss_positions="all")(rows)
    original = tokenizer([r["report"] for r in rows], padding="longest", truncation=True, max_length=48,
                         return_tensors="pt")["input_ids"]
    assert torch.equal(every["input_ids"], masked_only["input_ids"])  # the same masking
    assert torch.equal(every["labels"], original)  # every position, [CLS], [SEP] and padding included
    assert masked_only["labels"].eq(-100).any() and torch.equal(
        masked_only["labels"][masked_only["labels"] != -100], original[masked_only["labels"] != -100])


def test_the_converter_turns_the_official_switch_on():
    from test_convert_mrm_original_checkpoint import _random, official_pretraining_shapes

    from modeling_refers import MRMConfig, MRMForPreTraining
    from modeling_refers.convert_mrm_original_checkpoint import infer_mrm_config

    state_dict = _random(official_pretraining_shapes())
    config = infer_mrm_config(state_dict)
    official = MRMConfig.from_official()
    switches = ("mrm_position_embeddings", "mrm_resize_mode", "mrm_resize_antialias", "mrm_report_condition",
                "mrm_report_masking", "mrm_report_loss_positions", "mrm_image_augmentation", "mrm_initialization",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "max_report_length", "bos_token_id")
    assert [getattr(config, name) for name in switches] == [getattr(official, name) for name in switches]
    assert config.hidden_size == state_dict["cls_token"].shape[-1]  # the sizes still come from the tensors
    assert config.mrm_decoder_hidden_size == state_dict["decoder_embed.weight"].shape[0]
    assert config.mrm_reconstruction_size == 2 * config.image_size
    words = state_dict["bert_encoder.model.bert.embeddings.word_embeddings.weight"]
    assert (config.text_config.vocab_size, config.text_config.hidden_size) == tuple(words.shape)
    assert not MRMForPreTraining(config).refers.embeddings.position_embeddings.requires_grad


def test_official_masking_with_the_processors_studies(vocab_file, radiographs):
    from modeling_refers import RefersImageProcessor, RefersProcessor
    from modeling_refers.training.trainer import processor_sizes

    tokenizer = load_mrm_tokenizer(vocab_file)
    config = tiny(official=False, mrm_report_masking="official", mrm_report_loss_positions="all", max_report_length=16,
                  text_config=dict(vocab_size=30000, max_position_embeddings=16))
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), tokenizer, num_views=2, max_length=16)
    array = ((radiographs(1, size=48)[0, 0].numpy() + 1) * 127.5).astype(np.uint8)
    rows = [dict(images=[array, array], report="Left lower lobe opacity.", study_id="a"),
            dict(images=[array], report="Normal.", study_id="b")]
    batch = OfficialMaskedReportCollator(processor, train=False, config=config)(rows)
    studies = processor(images=[row["images"] for row in rows], do_train_augment=False, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32)  # the processor's studies, as they are
    assert torch.equal(batch["pixel_values"], studies["pixel_values"]) and torch.equal(batch["view_mask"],
                                                                                        studies["view_mask"])
    original, _ = encode_reports_official(tokenizer, [row["report"] for row in rows], 16)
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], original)
    assert tokenizer.convert_ids_to_tokens(original[0, :3].tolist()) == ["[CLS]", "left", "lower"]  # never swapped
    # in training a mirrored study's report follows its images (flip forced, nothing else random)
    from modeling_refers.training.augmentation import RadiographTrainTransform

    mirror = RadiographTrainTransform(rotation_degrees=0, random_crop=False, flip_probability=1.0,
                                      color_jitter_probability=0.0)
    config.mrm_report_mask_ratio = 0.0
    flipped = OfficialMaskedReportCollator(processor, train=True, config=config, train_transform=mirror)(rows[:1])
    assert torch.equal(flipped["pixel_values"][0, 0], studies["pixel_values"][0, 0].flip(-1))
    assert tokenizer.convert_ids_to_tokens(flipped["labels"][0, :3].tolist()) == ["[CLS]", "right", "lower"]
    with pytest.raises(ValueError, match="mrm_image_augmentation='official' goes with mrm_report_masking='official'"):
        tiny(official=False, mrm_image_augmentation="official")
