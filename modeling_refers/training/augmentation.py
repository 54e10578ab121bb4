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
"""REFERS' train-time image augmentation (paper, pretraining recipe; the same for fine-tuning), in
torchvision.transforms.v2: after the processor's resize to 256, rotation by an angle drawn from [-10, 10] degrees
(bilinear, black fill), a random 224 crop, a horizontal flip (p 0.5, one decision per study, so that the report's
left / right swap follows it), and with p 0.8 brightness and contrast factors drawn from [0.6, 1.4].

`RadiographTrainTransform` is the `train_transform` the training collators hand to `RefersImageProcessor` /
`RefersProcessor` (`do_train_augment=True`); it returns whether it mirrored the study. MRM's own pipeline is
`mrm_official.official_image_transform`. Nothing here ships in checkpoint folders (they never need torchvision).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RadiographTrainTransform:
    """One study's resized uint8 `(C, H, W)` views -> augmented float32 `(C, h, w)` views in 0..255, and the flip.

    Every view of a study is mirrored or not together (the report describes the study); rotation, crop and jitter
    are drawn per view. The draws come from the numpy `generator` of the call (a torch seed drawn from it, the
    global torch state forked and left as it was), so a seed reproduces a batch and no global state changes.

    Args:
        rotation_degrees: the angle is uniform in `[-rotation_degrees, rotation_degrees]` (paper: 10); 0: none.
        random_crop: crop at a uniform random position (zero-padded when smaller); `False`: the centre.
        flip_probability: probability that a study is mirrored left-right (paper: 0.5).
        brightness, contrast: factor ranges `(low, high)` (torchvision `ColorJitter`; paper ranges 0.6-1.4).
        color_jitter_probability: probability that brightness and contrast are jittered (one view).
    """

    rotation_degrees: float = 10.0
    random_crop: bool = True
    flip_probability: float = 0.5
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    color_jitter_probability: float = 0.8

    def __post_init__(self):
        for name in ("flip_probability", "color_jitter_probability"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= float(self.rotation_degrees) <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        for name in ("brightness", "contrast"):
            value = getattr(self, name)
            if len(value) != 2 or not 0.0 <= float(value[0]) <= float(value[1]):
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {value}")

    def transforms(self, crop_size: tuple[int, int] | None):
        """The per-view torchvision.transforms.v2 parts: `(geometry, jitter)`, the flip applied between; the jitter
        (on 0..1 floats) is applied with `color_jitter_probability`."""
        from torchvision.transforms import InterpolationMode, v2

        geometry = [v2.RandomRotation(float(self.rotation_degrees), interpolation=InterpolationMode.BILINEAR, fill=0)]
        if crop_size is not None:
            geometry.append(v2.RandomCrop(crop_size, pad_if_needed=True) if self.random_crop
                            else v2.CenterCrop(crop_size))
        jitter = v2.ColorJitter(brightness=tuple(self.brightness), contrast=tuple(self.contrast))
        return v2.Compose(geometry), jitter

    def __call__(
        self,
        views: Sequence[np.ndarray],
        crop_size: tuple[int, int] | None,
        generator: np.random.Generator,
        flip: bool | None = None,
    ) -> tuple[list[np.ndarray], bool]:
        """Augment one study. `flip`: forced (True / False) or None (drawn with `flip_probability`).

        Returns the float32 views (0..255) and whether they were mirrored."""
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional

        geometry, jitter = self.transforms(crop_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(generator.integers(2**63)))
            flipped = bool(torch.rand(()) < self.flip_probability) if flip is None else bool(flip)
            out = []
            for view in views:
                image = geometry(tv_tensors.Image(torch.from_numpy(np.array(view, dtype=np.uint8))))  # a copy: writable
                if flipped:
                    image = functional.horizontal_flip(image)
                image = image.as_subclass(torch.Tensor).to(torch.float32)
                if torch.rand(()) < self.color_jitter_probability:  # v2.RandomApply, keeping the other views exact
                    colour = image.shape[0] - 1 if image.shape[0] in (2, 4) else image.shape[0]  # alpha kept as is
                    image[:colour] = jitter(image[:colour] / 255.0) * 255.0
                out.append(image.numpy())
        return out, flipped


__all__ = ["RadiographTrainTransform"]
