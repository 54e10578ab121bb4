"""Training a WordPiece report tokenizer for pretraining (`train_report_tokenizer`).

It lives apart from `processing_refers.py`, which `save_pretrained` copies into checkpoint folders and which may
import only its siblings there: saving a trained tokenizer goes through `file_utils.staged_files`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from transformers import BertTokenizer, PreTrainedTokenizerBase

from ..file_utils import staged_files
from ..processing_refers import REPORT_SPECIAL_TOKENS


def train_report_tokenizer(
    reports: Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    lowercase: bool = True,
    model_max_length: int = 512,
) -> PreTrainedTokenizerBase:
    """Train a WordPiece report tokenizer with the `tokenizers` library.

    BERT normalizer (lowercasing and accent stripping when `lowercase`) and pre-tokenizer, specials
    `[PAD]`=0 `[UNK]`=1 `[CLS]`=2 `[SEP]`=3 `[MASK]`=4, and a post-processor that writes `[CLS] ... [SEP]`
    (the report start and end tokens). Blank reports are skipped.

    Args:
        reports: report strings (e.g. findings + impression).
        vocab_size: target vocabulary size, specials included (the trainer keeps every character of the
            alphabet, so a tiny target can be exceeded).
        output_dir: if given, the tokenizer is saved there in transformers' format (files written to a
            temporary folder first, then moved in), reloadable with `AutoTokenizer.from_pretrained(output_dir)`.
        min_frequency: minimum count for a merge to enter the vocabulary.
        lowercase: lowercase (uncased tokenizer).
        model_max_length: the tokenizer's `model_max_length`.

    Returns:
        A `transformers.BertTokenizer` (the tokenizers-backed "fast" BERT tokenizer of transformers 5).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    texts = _training_texts(reports, vocab_size, min_frequency)
    backend = Tokenizer(WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=REPORT_SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # The trainer picks the same tokens in every process but numbers tokens of equal count in hash order, which
    # differs from process to process: renumber them (specials, then single characters, then the rest, each sorted)
    # so the same reports always give the same ids (several processes, reruns). WordPiece only uses the set.
    trained = backend.get_vocab()
    rest = sorted((t for t in trained if t not in REPORT_SPECIAL_TOKENS),
                  key=lambda token: (len(token.removeprefix("##")) > 1, token))
    backend.model = WordPiece(vocab={token: i for i, token in enumerate([*REPORT_SPECIAL_TOKENS, *rest])},
                              unk_token="[UNK]", continuing_subword_prefix="##")
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    backend.decoder = decoders.WordPiece(prefix="##")

    tokenizer = BertTokenizer(
        tokenizer_object=backend,
        do_lower_case=lowercase,
        model_max_length=model_max_length,
    )
    if output_dir is not None:
        with staged_files(output_dir) as staging:  # written beside output_dir, then each file moved in
            tokenizer.save_pretrained(staging)
            _write_vocab_txt(tokenizer, staging)
    return tokenizer


def _training_texts(reports: Iterable[str], vocab_size: int, min_frequency: int) -> list[str]:
    """The non-blank reports, after checking the arguments (errors name the argument or the report's index)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(REPORT_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int > {len(REPORT_SPECIAL_TOKENS)}, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")
    if isinstance(reports, str):
        raise TypeError("reports must be an iterable of report strings, not one string")

    texts = []
    for index, report in enumerate(reports):
        if not isinstance(report, str):
            raise TypeError(f"report {index} must be a str, got {type(report).__name__}")
        if report.strip():
            texts.append(report)
    if not texts:
        raise ValueError("train_report_tokenizer got no non-empty report")
    return texts


def _write_vocab_txt(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """`vocab.txt` (one token per line, in id order), as in any BERT tokenizer folder."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids are not contiguous; cannot write vocab.txt")
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("".join(token + "\n" for token in tokens))


__all__ = ["train_report_tokenizer"]
