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
"""Image processor for REFERS: chest radiographs (single images or multi-view studies) -> `pixel_values`.

PIL/NumPy backend only (no torchvision at inference). The deterministic pipeline for every view is

    load (`radiograph_io.load_radiograph`: JPEG draft, 16-bit windowing, DICOM) -> resize (256 x 256, or the
    shortest edge) -> centre crop -> [flip, when forced] -> 1 or 3 channels -> rescale -> normalize

In training (`do_train_augment=True`) a `train_transform` given by the caller replaces the centre crop and the flip
for each study (`training.augmentation.RadiographTrainTransform`: torchvision.transforms.v2 rotation, random crop,
flip, brightness / contrast), and says whether it mirrored the study. Randomness only comes from the `generator`
argument of a call (a `numpy.random.Generator`, a `random.Random` or an int seed); nothing reads or changes a
global random state.
"""

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import get_resize_output_image_size, to_channel_dimension_format
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType

from .radiograph_io import jpeg_draft_size, load_radiograph, load_radiograph_and_size, warn_if_constant


def make_generator(generator: Any = None) -> np.random.Generator:
    """Turn `generator` (None, int seed, `numpy.random.Generator` or `random.Random`) into a numpy Generator.

    A numpy Generator is returned as is (its state advances); a `random.Random` seeds a new Generator from 128 of
    its bits; `None` gives a Generator seeded from OS entropy (not reproducible).
    """
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, random.Random):
        return np.random.default_rng(generator.getrandbits(128))
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(
        "generator must be None, an int seed, a numpy.random.Generator or a random.Random; "
        f"got {type(generator).__name__}"
    )


def _is_image_like(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike, Image.Image, np.ndarray)) or (
        hasattr(item, "detach") and hasattr(item, "shape")
    )


def make_batched_studies(images: Any) -> tuple[list[list[Any]], bool]:
    """Normalize an image input into a list of studies (each a list of views).

    Returns `(studies, is_study_layout)`: a single image gives `[[image]]` and a flat list of images gives one
    single-view "study" per image (`is_study_layout=False`); a list of lists gives the studies as they are
    (`is_study_layout=True`). Empty studies are kept (callers raise with the study index).
    """
    if _is_image_like(images):
        return [[images]], False
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            "images must be an image, a list of images or a list of studies (lists of images); "
            f"got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is an empty list: expected at least one image or study")
    nested = [isinstance(item, (list, tuple)) for item in images]
    if all(nested):
        return [list(study) for study in images], True
    if any(nested):
        raise ValueError(
            "images mixes studies (lists) and single images; pass either a list of images or a list of studies"
        )
    return [[image] for image in images], False


def describe_study(index: int, study_ids: Sequence[Any] | None) -> str:
    """`'study 3'` or `"study 3 (id 's51')"`, for error messages."""
    if study_ids is not None and index < len(study_ids) and study_ids[index] is not None:
        return f"study {index} (id {study_ids[index]!r})"
    return f"study {index}"


class RefersImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_train_augment (`bool`, *optional*, defaults to `False`):
        Training mode: each study's resized views go through the call's `train_transform` (random crop, flip,
        rotation, brightness / contrast: `training.augmentation.RadiographTrainTransform`) instead of the centre
        crop. When `False` the output is deterministic (centre crop, no flip unless forced).
    do_jpeg_draft (`bool`, *optional*, defaults to `True`):
        With `do_resize`, decode JPEG files (and PIL JPEG images not yet loaded) with PIL's `draft()`: at the
        smallest of the scales 1/2, 1/4, 1/8 that keeps the image at least the resize target (`size`), so a
        2,500 x 3,000 MIMIC-CXR-JPG radiograph decodes as 313 x 375 for a 256 target (decode + training
        transform: ~3x less CPU time, benchmarks/README.md), then the usual resize (with `shortest_edge`, to the
        size the full decode would get). The pixels differ slightly from a full decode (DCT-domain instead of
        bilinear downscaling by that factor: ~1 grey level on average); `False` always decodes at full size. PNG
        and other formats, and images already decoded (`datasets.Image()` rows): no effect.
    """

    do_train_augment: bool | None
    do_jpeg_draft: bool | None


def _per_channel(values: float | Sequence[float], channels: int, name: str) -> float | tuple[float, ...]:
    """`image_mean` / `image_std` for an image of `channels` channels.

    A scalar, or one value per channel, is used as given; the 3 RGB values serve a grey image (the first) and,
    when all equal (the default 0.5), any channel count; otherwise the mismatch is an error that names `name`.
    """
    if np.isscalar(values):
        return float(values)
    values = tuple(float(value) for value in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return values[:1]
    if len(set(values)) == 1:
        return values[0]
    raise ValueError(
        f"{name} has {len(values)} values {list(values)} but the image has {channels} channels "
        "(do_convert_rgb=False keeps the input's channels); give one value per channel or a single value"
    )


class RefersImageProcessor(PilBackend):
    r"""
    Image processor for REFERS radiograph transformers (PIL/NumPy backend, no torchvision needed).

    With `do_convert_rgb=True` (default) every radiograph becomes 3 channels (grey repeated, alpha dropped); with
    `False` the channels are kept as given (grey 1, RGB 3, RGBA 4, as transformers' processors do). 16-bit and
    float inputs are windowed to 8 bits first (`radiograph_io.window_to_uint8`). Defaults follow the paper: resize
    to 256 x 256, crop 224 (centre offsets rounded as torchvision's `center_crop`), normalize with mean = std = 0.5;
    the paper's train-time augmentation (random crop, flip, rotation, brightness / contrast) is a `train_transform`
    the training collators pass (`training.augmentation.RadiographTrainTransform`). `size={"shortest_edge": 256}`
    keeps the aspect ratio instead (what the official fine-tuning code's `transforms.Resize(224)` does, at 224).

    JPEG files are decoded with PIL's `draft()` at the smallest of the scales 1/2, 1/4, 1/8 that still leaves the
    image at least as large as the resize target, then resized as usual (`do_jpeg_draft=True`, the default; it
    only applies with `do_resize`); `do_jpeg_draft=False` decodes every JPEG at full size.

    Input layouts and outputs (`return_tensors="pt"`):
        - one image or a list of B images -> `pixel_values` `(B, C, H, W)`;
        - a list of B studies (each a list of views) -> `pixel_values` `(B, V, C, H, W)` and `view_mask` `(B, V)`
          (int64, 1 = real view), V = the largest study (or `num_views`), missing views are zeros;
        - with `return_flipped=True` also `flipped` `(B,)` bool: which studies/images were mirrored, so that a
          report can be changed accordingly (left <-> right).
    """

    valid_kwargs = RefersImageProcessorKwargs
    model_input_names = ["pixel_values", "view_mask"]

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 256, "width": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_train_augment = False
    do_jpeg_draft = True

    # ------------------------------------------------------------------ validation
    def _validate_preprocess_kwargs(self, **kwargs):
        super()._validate_preprocess_kwargs(**kwargs)
        if kwargs.get("do_center_crop") and (
            kwargs.get("crop_size") is None or not (kwargs["crop_size"].height and kwargs["crop_size"].width)
        ):
            raise ValueError(
                f"crop_size must have 'height' and 'width' when do_center_crop=True, got {kwargs.get('crop_size')}"
            )

    # ------------------------------------------------------------------ loading
    def to_dict(self) -> dict[str, Any]:
        # `auto_map` in the per-backend form transformers 5 reads ({"pil": "module.Class"}): with the plain string,
        # AutoVideoProcessor (which pipelines also try) infers a "RefersVideoProcessor" from it and asks whether to
        # run custom code; the dict form is read by AutoImageProcessor alike and gives AutoVideoProcessor nothing.
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": {"pil": auto_map["AutoImageProcessor"]}}
        return output

    def fetch_images(self, image_url_or_urls):
        """Load file paths (and URLs) with `load_radiograph` (alpha kept), keeping the nesting; others pass through."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_radiograph(image_url_or_urls, keep_alpha=True)
        return image_url_or_urls

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool = True,
        do_jpeg_draft: bool = False,
        do_resize: bool = False,
        size: SizeDict | None = None,
        resample: PILImageResampling | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One raw image -> uint8 channels-first `(C, H, W)`, before the resize.

        `do_convert_rgb=True`: C is 1 (grey, repeated to 3 at the end) or 3 (colour), alpha dropped; colour images
        whose three channels are identical are treated as grey (exact, and 3x less work). `False`: the channels
        as given (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA). With `do_jpeg_draft` and `do_resize`, a JPEG is decoded
        at the smallest draft scale that keeps it at least `size` (`jpeg_draft_size`), still to be resized to
        `size`. With `size={"shortest_edge": s}` a drafted image is resized here already, to the size the resize
        gives the full-size image (the draft's rounded-up sides would change the long side by a pixel), so the
        resize that follows keeps it as it is.
        """
        if size is not None and not isinstance(size, SizeDict):
            size = SizeDict(**size)
        draft_size = jpeg_draft_size(size) if do_jpeg_draft and do_resize else None
        array, original = load_radiograph_and_size(image, keep_alpha=not do_convert_rgb, draft_size=draft_size)
        if original is not None and size.shortest_edge and not size.longest_edge:
            target = get_resize_output_image_size(
                np.broadcast_to(np.uint8(0), (1, *original)), size=size.shortest_edge, default_to_square=False,
                input_data_format=ChannelDimension.FIRST)
            channels_first = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
            if tuple(channels_first.shape[1:]) != tuple(target):
                resized = self.resize(channels_first, SizeDict(height=int(target[0]), width=int(target[1])),
                                      resample=resample if resample is not None else self.resample)
                array = resized[0] if array.ndim == 2 else np.moveaxis(resized, 0, -1)
        if array.ndim == 2:
            return array[None]
        if (
            do_convert_rgb
            and np.array_equal(array[..., 0], array[..., 1])
            and np.array_equal(array[..., 0], array[..., 2])
        ):
            return array[None, :, :, 0]
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Centre crop of a `(C, H, W)` image with torchvision's `center_crop` arithmetic.

        The offsets are `round((H - h) / 2)` and `round((W - w) / 2)` (Python's round, as torchvision), not the
        floor transformers' `center_crop` uses; an image smaller than the crop is zero-padded first with
        torchvision's split (the extra pixel of an odd padding goes right / bottom).
        """
        if size.height is None or size.width is None:
            raise ValueError(f"crop_size must have 'height' and 'width', got {size}")
        crop_height, crop_width = int(size.height), int(size.width)
        _, height, width = image.shape
        if crop_height > height or crop_width > width:
            pad_h, pad_w = max(crop_height - height, 0), max(crop_width - width, 0)
            image = np.pad(image, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)))
            _, height, width = image.shape
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return image[:, top : top + crop_height, left : left + crop_width]

    def _finish_view(
        self,
        image: np.ndarray,
        do_convert_rgb: bool,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        **kwargs,
    ) -> np.ndarray:
        """Cropped float32 `(C, H, W)` in 0..255 -> 3 channels (when converting grey) -> rescale -> normalize."""
        if do_convert_rgb and image.shape[0] == 1:
            image = np.repeat(image, 3, axis=0)
        if do_rescale:
            image = self.rescale(image, rescale_factor)
        if do_normalize:
            channels = image.shape[0]
            mean = _per_channel(image_mean, channels, "image_mean")
            std = _per_channel(image_std, channels, "image_std")
            image = self.normalize(image, mean, std)
        return np.ascontiguousarray(image, dtype=np.float32)

    def _transform_study(
        self,
        views: list[np.ndarray],
        flip: bool | None,
        train_transform: Callable | None,
        rng: np.random.Generator | None,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling,
        do_center_crop: bool,
        crop_size: SizeDict,
        **kwargs,
    ) -> tuple[list[np.ndarray], bool]:
        """The uint8 `(C, H, W)` views of one study -> float32 views and whether they were mirrored.

        Evaluation: resize, centre crop, mirror when `flip`. Training (`train_transform` given): resize, then
        `train_transform(views, crop_size, generator, flip)` crops, mirrors and jitters (`None` crop size without
        `do_center_crop`)."""
        if do_resize:
            views = [self.resize(view, size=size, resample=resample) for view in views]
        if train_transform is not None:
            crop = (int(crop_size.height), int(crop_size.width)) if do_center_crop else None
            augmented, flipped = train_transform(views, crop, rng, flip)
            views = [np.asarray(view, dtype=np.float32) for view in augmented]
        else:
            flipped = bool(flip)
            if do_center_crop:
                views = [self.center_crop(view, crop_size) for view in views]
            views = [(view[:, :, ::-1] if flipped else view).astype(np.float32) for view in views]
        return [self._finish_view(view, **kwargs) for view in views], flipped

    # ------------------------------------------------------------------ main entry points
    def preprocess(
        self,
        images: Any,
        generator: Any = None,
        flip: bool | Sequence[bool] | None = None,
        study_ids: Sequence[Any] | None = None,
        num_views: int | None = None,
        return_flipped: bool = False,
        train_transform: Callable | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Preprocess one image, a list of images or a list of studies (lists of views).

        Args:
            images: image(s) as file paths, PIL images, numpy arrays or torch tensors; see the class docstring.
            generator: randomness for training mode: int seed, `numpy.random.Generator` or `random.Random`.
            flip: force the horizontal flip: one bool for all, or one per study/image. `None`: the
                `train_transform`'s random draw in training mode, no flip otherwise.
            study_ids: optional ids, one per study/image, used in error messages.
            num_views: studies only: pad the view axis to this many views (error if a study has more).
            return_flipped: also return `flipped` `(B,)` bool.
            train_transform: training mode only (and needed there): a callable
                `(views, crop_size, generator, flip) -> (views, flipped)` taking one study's resized uint8
                `(C, H, W)` views, the `(height, width)` crop (None without `do_center_crop`), a numpy Generator and
                the forced flip (None: its own draw); returning float `(C, h, w)` views in 0..255 and whether it
                mirrored them (`training.augmentation.RadiographTrainTransform`).
            **kwargs: overrides of any attribute (`do_train_augment`, `size`, `crop_size`, ...) and
                `return_tensors`.

        Returns:
            `BatchFeature` with `pixel_values` (float32), `view_mask` (studies) and `flipped` (if asked).
        """
        return super().preprocess(
            images,
            image_like_kwargs={
                "generator": generator,
                "flip": flip,
                "study_ids": study_ids,
                "num_views": num_views,
                "return_flipped": return_flipped,
                "train_transform": train_transform,
            },
            **kwargs,
        )

    @staticmethod
    def _check_studies(
        studies: list[list[Any]], study_ids: Sequence[Any] | None, num_views: int | None, flip: Any
    ) -> list[bool | None]:
        """Refuse empty or too-large studies and a `flip` list of the wrong length; the forced flip of each study."""
        batch_size = len(studies)
        if study_ids is not None and len(study_ids) != batch_size:
            raise ValueError(f"study_ids has {len(study_ids)} entries but images has {batch_size} studies/images")
        for index, study in enumerate(studies):
            if len(study) == 0:
                raise ValueError(
                    f"{describe_study(index, study_ids)} has no images; every study needs at least one view"
                )
            if num_views is not None and len(study) > num_views:
                raise ValueError(
                    f"{describe_study(index, study_ids)} has {len(study)} views but num_views={num_views}; "
                    "select the views first (RefersProcessor does)"
                )
        if flip is None or isinstance(flip, (bool, np.bool_)):
            return [None if flip is None else bool(flip)] * batch_size
        forced = [bool(value) for value in flip]
        if len(forced) != batch_size:
            raise ValueError(f"flip has {len(forced)} entries but images has {batch_size} studies/images")
        return forced

    def _load_view(self, view: Any, where: str, **kwargs) -> np.ndarray:
        """`process_image` with every error prefixed by `where` (the study / view or image index)."""
        try:
            return self.process_image(
                view,
                do_convert_rgb=kwargs["do_convert_rgb"],
                do_jpeg_draft=kwargs.get("do_jpeg_draft"),
                do_resize=kwargs.get("do_resize"),
                size=kwargs.get("size"),
                resample=kwargs.get("resample"),
            )
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{where}: {err}") from err
        except OSError as err:
            raise OSError(f"{where}: {err}") from err
        except (ValueError, TypeError, Image.DecompressionBombError) as err:
            raise type(err)(f"{where}: {err}") from err

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        generator: Any = None,
        flip: bool | Sequence[bool] | None = None,
        study_ids: Sequence[Any] | None = None,
        num_views: int | None = None,
        return_flipped: bool = False,
        train_transform: Callable | None = None,
        do_train_augment: bool = False,
        return_tensors: str | TensorType | None = None,
        data_format: str | ChannelDimension | None = ChannelDimension.FIRST,
        **kwargs,
    ) -> BatchFeature:
        studies, is_study_layout = make_batched_studies(images)
        batch_size = len(studies)
        forced = self._check_studies(studies, study_ids, num_views, flip)
        if do_train_augment and not callable(train_transform):
            raise ValueError(
                "do_train_augment=True needs train_transform, a callable (views, crop_size, generator, flip) -> "
                "(views, flipped), e.g. modeling_refers.training.augmentation.RadiographTrainTransform(); got "
                f"{train_transform!r}"
            )
        train_transform = train_transform if do_train_augment else None
        rng = make_generator(generator) if do_train_augment or generator is not None else None
        flipped, processed = [], []
        for index, study in enumerate(studies):
            arrays = []
            for view_index, view in enumerate(study):
                where = describe_study(index, study_ids) if is_study_layout else f"image {index}"
                if is_study_layout:
                    where += f", view {view_index}"
                array = self._load_view(view, where, **kwargs)
                warn_if_constant(array, where, view)
                arrays.append(array)
            views, flip_study = self._transform_study(arrays, forced[index], train_transform, rng, **kwargs)
            flipped.append(flip_study)
            processed.append(views)

        data = {}
        if is_study_layout:
            shapes = {view.shape for views in processed for view in views}
            if len(shapes) != 1:
                raise ValueError(
                    f"the views of a study batch must all have one shape after processing, got {sorted(shapes)}; "
                    "keep do_center_crop=True"
                )
            (shape,) = shapes
            max_views = max(len(views) for views in processed)
            total_views = max(max_views, num_views or 0)
            pixel_values = np.zeros((batch_size, total_views, *shape), dtype=np.float32)
            view_mask = np.zeros((batch_size, total_views), dtype=np.int64)
            for index, views in enumerate(processed):
                pixel_values[index, : len(views)] = np.stack(views)
                view_mask[index, : len(views)] = 1
            if data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST:
                pixel_values = np.moveaxis(pixel_values, 2, -1)
            data["pixel_values"] = pixel_values
            data["view_mask"] = view_mask
        else:
            images_out = [views[0] for views in processed]
            if data_format is not None:
                images_out = [
                    to_channel_dimension_format(image, data_format, ChannelDimension.FIRST) for image in images_out
                ]
            if len({image.shape for image in images_out}) == 1:
                images_out = np.stack(images_out)
            data["pixel_values"] = images_out
        if return_flipped:
            data["flipped"] = np.array(flipped, dtype=bool)
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = [
    "RefersImageProcessor",
    "RefersImageProcessorKwargs",
    "describe_study",
    "make_batched_studies",
    "make_generator",
]
