"""MRM's data as its official code prepares it (RL4M/MRM-pytorch, MIT: `util/pretrain_datasets.py`, `main_pretrain.py`).

The model side of MRM's official switch is in `MRMConfig.from_official` / `modeling_mrm.py`; this module is the data
side, read by the collator when the configuration asks for it (`mrm_report_masking="official"`,
`mrm_image_augmentation="official"`, `mrm_report_loss_positions="all"`):

- reports: `'[CLS] ' + report` tokenized as text by the 30,000-token WordPiece tokenizer `mimic_wordpiece.json` (no
  [SEP], no other special token), truncated and padded to 100 tokens;
- masking: every word (a token not starting with `##`; `##` pieces join the token before them) of positions
  1 .. L - 2 up to the first padding is replaced by [MASK] (id 3) with probability 0.5, all its pieces together;
- labels: the unmasked ids at every position ([CLS], visible words and padding included), so the report loss is
  the cross-entropy over all of them (`mrm_report_loss_positions="all"`), or only at masked positions ("masked");
- images: one radiograph per report, RGB, RandomResizedCrop(448, scale 0.2-1.0, bicubic), horizontal flip,
  grayscale to 3 channels, to [0, 1], normalized with mean 0.4978, std 0.2449 (torchvision.transforms.v2); no
  left/right swap in the report on a flip (the official code has none).

Nothing here is imported by the modeling files (so `trust_remote_code` folders never need torchvision).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MRM_OFFICIAL_IMAGE_SIZE = 448
MRM_OFFICIAL_PIXEL_MEAN = 0.4978
MRM_OFFICIAL_PIXEL_STD = 0.2449
MRM_OFFICIAL_CROP_SCALE = (0.2, 1.0)
MRM_OFFICIAL_MAX_LENGTH = 100
MRM_OFFICIAL_REPORT_PREFIX = "[CLS] "
MRM_OFFICIAL_TOKENIZER_FILE = "mimic_wordpiece.json"
MRM_OFFICIAL_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "mask_token": "[MASK]"}


def load_mrm_tokenizer(path: str | os.PathLike, max_length: int = MRM_OFFICIAL_MAX_LENGTH):
    """MRM's report tokenizer (`mimic_wordpiece.json`: `tokenizers` WordPiece, 30,000 tokens, [PAD] 0, [UNK] 1,
    [CLS] 2, [MASK] 3, lower-cased, no post-processor) from a LOCAL file, as a `PreTrainedTokenizerFast` (so it saves
    with the processor). `path` is the JSON file or a folder holding it; nothing is downloaded."""
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    file = os.path.join(path, MRM_OFFICIAL_TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"MRM's report tokenizer {file!r} does not exist. Pass the local path of `{MRM_OFFICIAL_TOKENIZER_FILE}` "
            "(the official RL4M/MRM-pytorch file, MIT; a copy is in ../shared/data/mrm/) or of its folder; nothing is "
            "downloaded.")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=file, model_max_length=max_length,
                                        **MRM_OFFICIAL_SPECIAL_TOKENS)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{file!r} is not MRM's WordPiece tokenizer: it has no [MASK] or [PAD] token.")
    return tokenizer


def encode_reports_official(tokenizer, reports: Sequence[str], max_length: int = MRM_OFFICIAL_MAX_LENGTH):
    """`'[CLS] ' + report` tokenized as text (no special tokens added: no [SEP]), truncated and padded to exactly
    `max_length` (`util/pretrain_datasets.py`). Returns `(input_ids, attention_mask)`, each `(B, max_length)` long."""
    encoded = tokenizer([MRM_OFFICIAL_REPORT_PREFIX + report for report in reports], add_special_tokens=False,
                        padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def continuation_flags(tokenizer) -> torch.Tensor:
    """`(vocab,)` bool: True for the tokens that continue the word before them (WordPiece's `##` pieces)."""
    flags = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, index in tokenizer.get_vocab().items():
        flags[index] = token.startswith("##")
    return flags


def mask_whole_words_official(input_ids: torch.Tensor, is_continuation: torch.Tensor, mask_token_id: int,
                              pad_token_id: int = 0, probability: float = 0.5,
                              generator: np.random.Generator | None = None) -> torch.Tensor:
    """MRM's whole-word masking (`MultimodalBertDataset._random_mask`), per row of `input_ids` `(B, L)`: positions
    1 .. L - 2 are read left to right up to the first `pad_token_id`; a `##` piece is masked exactly when the token
    before it is now [MASK], any other token (a word's first piece) with `probability`. Returns a masked copy."""
    generator = np.random.default_rng() if generator is None else generator
    masked = input_ids.clone()
    for row in masked:
        for position in range(1, row.shape[0] - 1):
            token = int(row[position])
            if token == pad_token_id:
                break
            if is_continuation[token]:
                if int(row[position - 1]) == mask_token_id:
                    row[position] = mask_token_id
                continue
            if generator.random() < probability:
                row[position] = mask_token_id
    return masked


def official_image_transform(train: bool, size: int = MRM_OFFICIAL_IMAGE_SIZE):
    """MRM's image pipeline (`main_pretrain.py`), torchvision.transforms.v2 on a PIL RGB image: at train
    RandomResizedCrop(size, scale (0.2, 1.0), bicubic) and a horizontal flip, else a bicubic resize to size x size
    (the official code has no evaluation); then grayscale to 3 channels, [0, 1], normalized with 0.4978 / 0.2449."""
    from torchvision.transforms import InterpolationMode, v2

    spatial = ([v2.RandomResizedCrop(size, scale=MRM_OFFICIAL_CROP_SCALE, interpolation=InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip()] if train
               else [v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC)])
    return v2.Compose([*spatial, v2.Grayscale(num_output_channels=3), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=[MRM_OFFICIAL_PIXEL_MEAN] * 3, std=[MRM_OFFICIAL_PIXEL_STD] * 3)])


def report_labels(original_ids: torch.Tensor, masked_ids: torch.Tensor, mask_token_id: int,
                  loss_positions: str) -> torch.Tensor:
    """Masked-LM labels: with `loss_positions="all"` (the official code) the original ids everywhere ([CLS], visible
    words and padding: the loss averages over all of them); with `"masked"` the original ids where `masked_ids`
    holds [MASK] and -100 (ignored) elsewhere."""
    if loss_positions == "all":
        return original_ids.clone()
    if loss_positions == "masked":
        return original_ids.masked_fill(masked_ids != mask_token_id, -100)
    raise ValueError(f"mrm_report_loss_positions must be 'masked' or 'all', got {loss_positions!r}.")


@dataclass
class OfficialMaskedReportCollator:
    """Source-domain rows (`images`, `report`, `study_id`) -> MRM inputs as the official code makes them (see the
    module docstring), each part as `config` asks: `mrm_report_masking` ("official": the '[CLS] ' text prefix, 100
    tokens, MRM's whole-word rule), `mrm_report_loss_positions`, `mrm_image_augmentation` ("official": one view per
    study through `official_image_transform` at `config.input_image_size`; "processor": the processor's studies).

    Output: `pixel_values` `(B, C, S, S)` (official images) or the processor's `(B, V, C, S, S)` + `view_mask`;
    `input_ids`, `attention_mask`, `labels` `(B, L)`; `study_ids` (kept aside by the trainer). With the processor's
    studies, `train_transform` augments them in training (None: `RadiographTrainTransform()`, REFERS's) and a
    mirrored study's report has left / right swapped."""

    processor: object
    train: bool
    config: object
    train_transform: object | None = None
    _generators: dict = field(default_factory=dict, repr=False)
    _flags: torch.Tensor | None = field(default=None, repr=False)

    def _images(self, examples: list[dict], rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image

        from ..radiograph_io import load_radiograph

        transform = official_image_transform(self.train, self.config.input_image_size)
        images = []
        seed = int(rng.integers(2**31))
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's generator: seeded per batch
            torch.manual_seed(seed)
            for example in examples:
                views = example["images"]
                view = views[int(rng.integers(len(views)))] if self.train else views[0]
                array = load_radiograph(view)
                images.append(transform(Image.fromarray(array).convert("RGB")))
        return torch.stack(images)

    def __call__(self, examples: list[dict]) -> dict:
        from .trainer import worker_generator

        rng = worker_generator(self._generators) if self.train else np.random.default_rng(0)
        tokenizer = self.processor.tokenizer
        reports = [example["report"] for example in examples]
        if getattr(self.config, "mrm_image_augmentation", "processor") == "official":
            batch = {"pixel_values": self._images(examples, rng)}
        else:
            from .augmentation import RadiographTrainTransform

            from ..processing_refers import swap_left_right

            processed = self.processor(images=[example["images"] for example in examples], do_train_augment=self.train,
                                       train_transform=(self.train_transform or RadiographTrainTransform())
                                       if self.train else None,
                                       generator=rng if self.train else None, return_flipped=True, return_tensors="pt")
            batch = {"pixel_values": processed["pixel_values"], "view_mask": processed["view_mask"]}
            # the processor's studies are mirrored at random: their reports follow, as in the REFERS collators
            reports = [swap_left_right(r) if f else r for r, f in zip(reports, processed["flipped"].tolist())]
        input_ids, attention_mask = encode_reports_official(tokenizer, reports, self.config.max_report_length)
        if self._flags is None:
            self._flags = continuation_flags(tokenizer)
        masked = mask_whole_words_official(input_ids, self._flags, tokenizer.mask_token_id, tokenizer.pad_token_id,
                                           self.config.mrm_report_mask_ratio, rng)
        batch.update(input_ids=masked, attention_mask=attention_mask,
                     labels=report_labels(input_ids, masked, tokenizer.mask_token_id,
                                          self.config.mrm_report_loss_positions),
                     study_ids=[example.get("study_id") for example in examples])
        return batch


__all__ = [
    "MRM_OFFICIAL_CROP_SCALE", "MRM_OFFICIAL_IMAGE_SIZE", "MRM_OFFICIAL_MAX_LENGTH", "MRM_OFFICIAL_PIXEL_MEAN",
    "MRM_OFFICIAL_PIXEL_STD", "OfficialMaskedReportCollator", "continuation_flags", "encode_reports_official",
    "load_mrm_tokenizer", "mask_whole_words_official", "official_image_transform", "report_labels",
]
