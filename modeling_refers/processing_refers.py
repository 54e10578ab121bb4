# Copyright 2025 The refers authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Processor for REFERS pretraining: a batch of studies (views + report) -> model inputs.

`RefersProcessor` picks exactly `num_views` views per study, runs `RefersImageProcessor`, swaps left/right in the
report of every study whose images were mirrored, and tokenises the reports (with a tokenizer such as
`training.report_tokenizer.train_report_tokenizer` trains, which lives outside this file: it ships in checkpoint
folders).
"""

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from transformers import AutoTokenizer
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from .image_processing_refers import RefersImageProcessor, describe_study, make_batched_studies, make_generator


REPORT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_VIEWS_CHOICES = ("repeat", "mask")

# Whole words only: "left", "right" and their "-ward(s)" forms. Hyphens and punctuation are word boundaries, so
# "left-sided" -> "right-sided"; words that merely contain the letters ("leftover", "rightly", "copyright") stay.
_LEFT_RIGHT = re.compile(r"\b(left|right)(wards?)?\b", re.IGNORECASE)


def _match_case(template: str, word: str) -> str:
    if template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:].lower()
    return word.lower()


def swap_left_right(text: str) -> str:
    """Swap the words left <-> right (and leftward(s) <-> rightward(s)) in `text`, keeping each word's case.

    Used when a study's images are mirrored. Whole words only: "Left" -> "Right", "LEFT" -> "RIGHT",
    "left-sided" -> "right-sided"; "leftover", "rightly", "bright" are left alone. Abbreviations such as "L"/"R"
    or "lt"/"rt" are not changed.
    """

    def replace(match: re.Match) -> str:
        side, suffix = match.group(1), match.group(2) or ""
        other = "right" if side.lower() == "left" else "left"
        return _match_case(side, other) + suffix

    return _LEFT_RIGHT.sub(replace, text)


def select_views(
    num_available: int,
    num_views: int,
    rng: np.random.Generator | None = None,
    pad_views: str = "repeat",
    random_selection: bool = True,
) -> list[int]:
    """Indices of the views to use for one study, as in the paper.

    - more views than `num_views`: `num_views` distinct views drawn at random (without replacement), kept in
      their original order; without `random_selection` the first `num_views`.
    - fewer views, `pad_views="repeat"`: all views, then ONE randomly chosen view repeated until `num_views`
      (REFERS' procedure: the repeats are real images, so `view_mask` stays all ones); without
      `random_selection` the views are cycled in order (0, 1, 0, 1, ...).
    - fewer views, `pad_views="mask"`: all views only (the caller pads with empty views, `view_mask` 0).
    """
    if num_available < 1:
        raise ValueError("a study needs at least one view")
    if pad_views not in PAD_VIEWS_CHOICES:
        raise ValueError(f"pad_views must be one of {PAD_VIEWS_CHOICES}, got {pad_views!r}")
    if random_selection and rng is None:
        raise ValueError("random view selection needs a numpy Generator `rng`")
    if num_available >= num_views:
        if not random_selection or num_available == num_views:
            return list(range(num_views))
        return sorted(int(i) for i in rng.choice(num_available, size=num_views, replace=False))
    indices = list(range(num_available))
    if pad_views == "mask":
        return indices
    if random_selection:
        return indices + [int(rng.integers(num_available))] * (num_views - num_available)
    return indices + [i % num_available for i in range(num_available, num_views)]


def add_decoder_labels(input_ids: Sequence[Sequence[int]], attention_mask: Sequence[Sequence[int]]) -> list[list[int]]:
    """`labels` for the report decoder: `input_ids` with padding positions (attention 0) set to -100."""
    return [
        [int(token) if int(keep) else -100 for token, keep in zip(ids, mask)]
        for ids, mask in zip(input_ids, attention_mask)
    ]


class RefersProcessor(ProcessorMixin):
    r"""
    Turns a batch of studies (a list of views and a free-text report each) into REFERS pretraining inputs.

    Args:
        image_processor (`RefersImageProcessor`): the radiograph processor.
        tokenizer (`PreTrainedTokenizerBase`): a BERT-style tokenizer (`train_report_tokenizer` or any BERT
            tokenizer folder) whose `[CLS]` / `[SEP]` serve as report start / end tokens.
        num_views (`int`, defaults to 3): views per study V; every study gets exactly V views.
        max_length (`int`, defaults to 100): reports are truncated to this many tokens (start/end included).
        pad_views (`str`, defaults to `"repeat"`): a study with fewer than V views repeats one randomly chosen
            view (`"repeat"`, the paper's procedure; `view_mask` stays all ones since the repeats are real
            images) or gets zero images with `view_mask` 0 (`"mask"`).
        swap_left_right_on_flip (`bool`, defaults to `True`): swap left/right in the report of a mirrored study.

    Output of `__call__` (`BatchFeature`): `pixel_values` `(B, V, C, H, W)` float32, `view_mask` `(B, V)` int64,
    `input_ids` / `attention_mask` / `labels` `(B, T)` int64 (`labels` = `input_ids` with padding -> -100),
    and `flipped` `(B,)` bool when `return_flipped=True`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_views: int = 3,
        max_length: int = 100,
        pad_views: str = "repeat",
        swap_left_right_on_flip: bool = True,
        **kwargs,
    ):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive int, got {num_views!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (start and end tokens), got {max_length!r}")
        if pad_views not in PAD_VIEWS_CHOICES:
            raise ValueError(f"pad_views must be one of {PAD_VIEWS_CHOICES}, got {pad_views!r}")
        self.num_views = num_views
        self.max_length = max_length
        self.pad_views = pad_views
        self.swap_left_right_on_flip = bool(swap_left_right_on_flip)
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the image processor with `RefersImageProcessor` itself (works before/without Auto registration)."""
        image_processor = RefersImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    @staticmethod
    def _check_reports(text: Any, study_ids: Sequence[Any] | None) -> list[str]:
        reports = [text] if isinstance(text, str) else text
        if not isinstance(reports, (list, tuple)):
            raise TypeError(f"text must be a report string or a list of report strings, got {type(text).__name__}")
        for index, report in enumerate(reports):
            if not isinstance(report, str):
                raise TypeError(
                    f"{describe_study(index, study_ids)}: the report must be a str, got {type(report).__name__}"
                )
            if not report.strip():
                raise ValueError(
                    f"{describe_study(index, study_ids)}: the report is empty; every study needs report text"
                )
        return list(reports)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        study_ids: Sequence[Any] | None = None,
        return_tensors: str | TensorType | None = "pt",
        generator: Any = None,
        do_train_augment: bool | None = None,
        flip: bool | Sequence[bool] | None = None,
        padding: bool | str = "longest",
        max_length: int | None = None,
        return_flipped: bool = False,
        train_transform: Any = None,
        **images_kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: a list of studies (each a list of views: paths, PIL images, arrays, tensors); a flat list
                or a single image is read as single-view studies.
            text: one report per study (findings + impression, as given).
            study_ids: optional ids, one per study, named in error messages.
            return_tensors: `"pt"` (default), `"np"` or `None`.
            generator: randomness (int seed, `numpy.random.Generator`, `random.Random`) for view selection and
                training augmentation; one seed reproduces the whole batch.
            do_train_augment: training mode (random views, and `train_transform`'s crops, flips, rotation, jitter);
                default: the image processor's `do_train_augment`. Outside training the view choice is deterministic.
            flip: force the horizontal flip per study (bool or one bool per study).
            padding: tokenizer padding (`"longest"` default, or `"max_length"`).
            max_length: override of `self.max_length` for this call.
            return_flipped: also return `flipped` `(B,)`.
            train_transform: the training augmentation of each study (see `RefersImageProcessor.preprocess`;
                `training.augmentation.RadiographTrainTransform`), needed with `do_train_augment`. The report of each
                study it mirrors has left / right swapped, once, here.
            **images_kwargs: overrides passed to the image processor (`size`, `crop_size`, ...).
        """
        if images is None and text is None:
            raise ValueError("RefersProcessor needs images, text or both")
        if study_ids is not None:
            study_ids = list(study_ids)
        reports = self._check_reports(text, study_ids) if text is not None else None
        train = self.image_processor.do_train_augment if do_train_augment is None else bool(do_train_augment)
        rng = make_generator(generator) if (train or generator is not None) else None

        data: dict[str, Any] = {}
        flipped = None
        if images is not None:
            data, flipped = self._process_images(images, reports, study_ids, rng, train, flip, train_transform,
                                                 images_kwargs)
        elif reports is not None:
            flipped = self._forced_flips(flip, len(reports))

        if reports is not None:
            if self.swap_left_right_on_flip:
                reports = [swap_left_right(report) if flip_i else report for report, flip_i in zip(reports, flipped)]
            encoded = self.tokenizer(
                reports,
                padding=padding,
                truncation=True,
                max_length=max_length or self.max_length,
                return_attention_mask=True,
                return_token_type_ids=False,
            )
            data["input_ids"] = encoded["input_ids"]
            data["attention_mask"] = encoded["attention_mask"]
            data["labels"] = add_decoder_labels(encoded["input_ids"], encoded["attention_mask"])
        if return_flipped:
            data["flipped"] = np.array(flipped, dtype=bool)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _process_images(self, images, reports, study_ids, rng, train, flip, train_transform, images_kwargs):
        """`num_views` views picked per study (at random in training) through the image processor: its
        `pixel_values` / `view_mask` and the flip of each study (the one decision the report swap follows)."""
        studies, _ = make_batched_studies(images)
        batch_size = len(studies)
        if reports is not None and len(reports) != batch_size:
            raise ValueError(
                f"got {batch_size} studies of images but {len(reports)} reports; pass one report per study"
            )
        if study_ids is not None and len(study_ids) != batch_size:
            raise ValueError(f"study_ids has {len(study_ids)} entries but there are {batch_size} studies")
        selected = []
        for index, study in enumerate(studies):
            if len(study) == 0:
                raise ValueError(
                    f"{describe_study(index, study_ids)} has no images; every study needs at least one view"
                )
            keep = select_views(len(study), self.num_views, rng, self.pad_views, random_selection=train)
            selected.append([study[i] for i in keep])
        image_inputs = self.image_processor(
            selected,
            generator=rng,
            flip=flip,
            study_ids=study_ids,
            num_views=self.num_views,
            return_flipped=True,
            do_train_augment=train,
            train_transform=train_transform,
            return_tensors=None,
            **images_kwargs,
        )
        data = {"pixel_values": image_inputs["pixel_values"], "view_mask": image_inputs["view_mask"]}
        return data, [bool(value) for value in image_inputs["flipped"]]

    @staticmethod
    def _forced_flips(flip, batch_size: int) -> list[bool]:
        """Reports without images: the flips asked for (none by default), one per report."""
        if flip is None or isinstance(flip, (bool, np.bool_)):
            return [bool(flip)] * batch_size
        flipped = [bool(value) for value in flip]
        if len(flipped) != batch_size:
            raise ValueError(f"flip has {len(flipped)} entries but there are {batch_size} reports")
        return flipped

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "view_mask", "input_ids", "attention_mask", "labels"]


__all__ = [
    "REPORT_SPECIAL_TOKENS",
    "RefersProcessor",
    "add_decoder_labels",
    "select_views",
    "swap_left_right",
]
