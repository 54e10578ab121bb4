"""A tiny REFERS pretraining checkpoint folder, laid out as run_pretrain.py writes it (model + RefersProcessor with a
report tokenizer trained on real COVID-19-collection notes), for the downstream tests (generation, retrieval,
zero-shot). Random weights: the tests check plumbing and metrics against direct computations, not quality."""

from __future__ import annotations

from pathlib import Path

from datasets_scripts import load_covid19_studies
from modeling_refers import RefersConfig, RefersForPreTraining, RefersImageProcessor, RefersProcessor
from modeling_refers import train_report_tokenizer
from modeling_refers.training.trainer import processor_sizes

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, view_fusion_hidden_size=16, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)


def make_tiny_pretraining_checkpoint(folder: Path, covid_dir: Path, vocab_size: int = 200) -> Path:
    """Save a tiny RefersForPreTraining (32 px, width 32, 2 layers; BERT report encoder of width 32; 1-layer
    decoder) and its processor in `folder`; returns `folder`."""
    import torch

    torch.manual_seed(0)
    reports = load_covid19_studies(covid_dir)["train"]["report"]
    tokenizer = train_report_tokenizer(reports, vocab_size=vocab_size)
    config = RefersConfig(
        **TINY_VISION,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=len(tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         pad_token_id=tokenizer.pad_token_id),
        decoder_hidden_size=32, decoder_num_attention_heads=4, decoder_intermediate_size=64, decoder_dropout_prob=0.0,
        decoder_vocab_size=len(tokenizer), max_report_length=32, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = RefersForPreTraining(config).eval()
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), tokenizer, num_views=3, max_length=32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
