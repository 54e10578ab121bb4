"""No deprecation warning from our own calls on the pinned versions, and the suite's filter that enforces it
(tests/conftest.py: a DeprecationWarning / FutureWarning attributed to our modules is an error)."""

import warnings

import pytest
import torch

import modeling_refers.modeling_refers as modeling
from modeling_refers import RefersConfig, RefersForPreTraining


def _own_warnings(record) -> list[str]:
    return [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in record
            if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and ("modeling_refers" in w.filename or "datasets_scripts" in w.filename)]


def test_the_suite_turns_our_deprecation_warnings_into_errors_and_leaves_libraries_alone():
    """The conftest filter acts on the module a warning is attributed to: ours raise, a library's does not."""
    for module in ("modeling_refers.modeling_refers", "datasets_scripts.common", "run_pretrain"):
        for category in (DeprecationWarning, FutureWarning):
            with pytest.raises(category, match="old API"):
                exec("import warnings; warnings.warn('old API', category)", {"__name__": module, "category": category})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # inside catch_warnings: only to see that the library's warning is no error
        exec("import warnings; warnings.warn('old API', FutureWarning)", {"__name__": "some_library.module"})
    assert [str(w.message) for w in record] == ["old API"]


def tiny_pretraining_model() -> RefersForPreTraining:
    config = RefersConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        view_fusion_hidden_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4, decoder_intermediate_size=64, decoder_vocab_size=20, decoder_dropout_prob=0.0,
        max_report_length=16, use_study_report_consistency=False,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    torch.manual_seed(0)
    return RefersForPreTraining(config).eval()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_report_generation_warns_nothing_and_uses_the_cache_name_of_this_transformers(num_beams):
    """`generate` passes its encoder-decoder cache under the name this transformers reads without a warning
    (`cache` from 5.24, `past_key_values` before); greedy output equals decoding step by step without a cache."""
    model = tiny_pretraining_model()
    pixel_values = torch.randn(2, model.config.num_views, 3, 32, 32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ids = model.generate(pixel_values, max_new_tokens=5, num_beams=num_beams, do_sample=False)
    assert _own_warnings(record) == []
    assert modeling._GENERATE_CACHE_KWARG == "cache"  # transformers 5.25 is pinned in the development venv
    if num_beams == 1:  # the cache changes nothing: the argmax decoded without one
        memory = model.get_study_features(pixel_values).last_hidden_state
        mask = torch.ones(memory.shape[:2], dtype=torch.long)
        tokens = torch.full((2, 1), model.config.bos_token_id)
        with torch.no_grad():
            for _ in range(5):
                logits = model.report_decoder(tokens, torch.ones_like(tokens), memory, mask).logits
                tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        finished = torch.zeros(2, dtype=torch.bool)
        for step in range(1, tokens.shape[1]):  # after eos, generate pads
            tokens[finished, step] = model.config.pad_token_id
            finished |= tokens[:, step] == model.config.eos_token_id
        assert torch.equal(ids, tokens[:, : ids.shape[1]])


def test_the_old_cache_name_is_what_would_warn():
    """The check above can fail: passing the cache under `past_key_values` is what transformers deprecates."""
    model = tiny_pretraining_model()
    cache = modeling.EncoderDecoderCache(modeling.DynamicCache(), modeling.DynamicCache())
    with pytest.raises(FutureWarning, match="past_key_values"):
        model.generate(torch.randn(1, model.config.num_views, 3, 32, 32), max_new_tokens=2, past_key_values=cache)
