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

PIL/NumPy backend only (no torchvision at inference). The pipeline for every view is

    load [JPEG: decoded at 1/2, 1/4 or 1/8 scale when still >= the resize target] -> window to 8 bits
    -> resize (256 x 256, or the shortest edge) -> [train: rotate] -> crop (train: random, eval: centre)
    -> [flip, decided once per study] -> [train: brightness, contrast] -> 1 or 3 channels -> rescale -> normalize

Randomness only comes from the `generator` argument of a call (a `numpy.random.Generator`, a `random.Random`
or an int seed); nothing reads or changes a global random state.
"""

import io
import os
import random
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import get_resize_output_image_size, to_channel_dimension_format
from transformers.image_utils import (
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType


_HIGH_BIT_DEPTH_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_DICOM_SUFFIXES = (".dcm", ".dicom")
# Images given as http(s) URLs: seconds allowed for the connection, each read and the whole download, and the
# largest download accepted (a 3,000 x 3,000 16-bit PNG is ~15 MB). Module attributes: change them here.
URL_TIMEOUT_SECONDS = 20.0
URL_MAX_BYTES = 64 * 2**20
# ITU-R 601-2 luma, the same weights PIL uses for RGB -> L.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def window_to_uint8(
    array: np.ndarray,
    window_center: float | None = None,
    window_width: float | None = None,
    invert: bool = False,
) -> np.ndarray:
    """Map a high-bit-depth radiograph (uint16, int16, int32, float; any range) to uint8.

    Without a window the array is min-max stretched to 0..255 (a constant image gives zeros). With a window the
    DICOM linear VOI function is used (PS3.3 C.11.2.1.2.1): values at or below `c - 0.5 - (w - 1) / 2` give 0,
    values above `c - 0.5 + (w - 1) / 2` give 255, linear in between. `invert=True` gives `255 - y`, the
    MONOCHROME1 convention (high values are dark). NaNs map to 0.

    Args:
        array: numeric array of any shape (usually `(H, W)`).
        window_center: DICOM Window Center, in the units of `array` (after the modality rescale).
        window_width: DICOM Window Width (>= 1), same units.
        invert: invert the output (MONOCHROME1).

    Returns:
        `np.ndarray` of dtype uint8 and the shape of `array`.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"window_to_uint8 expects a numeric array, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError("window_to_uint8 got an empty array")
    if (window_center is None) != (window_width is None):
        raise ValueError(
            "window_to_uint8 needs both window_center and window_width, or neither (min-max); got "
            f"window_center={window_center}, window_width={window_width}"
        )
    # float32, in place on one copy (float64 took 236 MB for one 3,000 x 2,500 16-bit PNG; this takes 5 bytes a pixel)
    finite = None  # integers are always finite: no mask
    if not np.issubdtype(array.dtype, np.integer):
        finite = np.isfinite(array)
        if not finite.any():
            raise ValueError("window_to_uint8 got an array without any finite value")
        if finite.all():
            finite = None
    if window_center is None:
        low, high = (float(array.min()), float(array.max())) if finite is None else (
            float(array[finite].min()), float(array[finite].max()))
    else:
        center, width = float(window_center), float(window_width)
        if not width >= 1:
            raise ValueError(f"window_width must be >= 1 (DICOM), got {window_width}")
        if width == 1:
            out = np.where(array > center - 0.5, np.uint8(255), np.uint8(0))
            if finite is not None:
                out[~finite] = 0
            return 255 - out if invert else out
        # y = (x - (c - 0.5)) / (w - 1) + 0.5 is (x - low) / (high - low) with these bounds
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return _scale_to_uint8(array, low, high, invert, finite)


def _scale_to_uint8(
    values: np.ndarray, low: float, high: float, invert: bool = False, finite: np.ndarray | None = None
) -> np.ndarray:
    """`rint(255 * (values - low) / (high - low))` clipped to 0..255 (`high - values` when inverted), as uint8.

    Computed in float32, in place on one copy of `values` (4 bytes a pixel besides the uint8 result); `low >= high`
    gives zeros; where `finite` is False the result is 0.
    """
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.array(values, dtype=np.float32, copy=True)
    if invert:
        np.subtract(np.float32(high), scaled, out=scaled)
    else:
        scaled -= np.float32(low)
    scaled *= np.float32(255.0 / (high - low))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    if finite is not None:
        scaled[~finite] = 0.0
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


# pip packages that give pydicom a decoder for each compressed transfer syntax (pydicom.pixels.decoders.*):
# the import names pydicom reports are not always what pip installs (gdcm is `python-gdcm`).
_PYLIBJPEG_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_PYLIBJPEG_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_GDCM = "pip install python-gdcm"
_DICOM_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": (_PYLIBJPEG_LIBJPEG, "pip install pillow", _GDCM),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": (_PYLIBJPEG_LIBJPEG, _GDCM),  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57": (_PYLIBJPEG_LIBJPEG, _GDCM),  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": (_PYLIBJPEG_LIBJPEG, _GDCM),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": ("pip install pyjpegls", _PYLIBJPEG_LIBJPEG, _GDCM),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": ("pip install pyjpegls", _PYLIBJPEG_LIBJPEG, _GDCM),  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": (_PYLIBJPEG_OPENJPEG, _GDCM),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": (_PYLIBJPEG_OPENJPEG, _GDCM),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": (_PYLIBJPEG_OPENJPEG,),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": (_PYLIBJPEG_OPENJPEG,),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": (_PYLIBJPEG_OPENJPEG,),  # HTJ2K
    "1.2.840.10008.1.2.5": ("pip install pylibjpeg pylibjpeg-rle",),  # RLE Lossless (pydicom decodes it itself)
}
# Rows converted at a time: pydicom's LUT / window functions return float64, so this bounds their copies.
_DICOM_ROWS_PER_CHUNK = 256


def _check_dicom_pixel_count(dataset: Any, path: str) -> int:
    """PIL's decompression-bomb rule for a DICOM, from its header alone: Rows x Columns x NumberOfFrames above
    `PIL.Image.MAX_IMAGE_PIXELS` warns (`DecompressionBombWarning`), above twice that raises
    `DecompressionBombError` (a 68 KB deflated file can declare 6,000 x 6,000). Returns the number of frames."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"DICOM file '{path}' has no valid Rows / Columns / NumberOfFrames: {err}") from err
    pixels = rows * columns * frames
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > 2 * limit:
        raise Image.DecompressionBombError(
            f"DICOM file '{path}' declares {rows} x {columns} pixels x {frames} frame(s) = {pixels} pixels, more "
            f"than twice PIL.Image.MAX_IMAGE_PIXELS ({limit}): could be a decompression bomb; raise "
            "PIL.Image.MAX_IMAGE_PIXELS (or set it to None) if you trust the file"
        )
    if limit is not None and pixels > limit:
        warnings.warn(
            f"DICOM file '{path}' declares {rows} x {columns} pixels x {frames} frame(s) = {pixels} pixels, more "
            f"than PIL.Image.MAX_IMAGE_PIXELS ({limit}): could be a decompression bomb",
            Image.DecompressionBombWarning,
        )
    return frames


def _check_dicom_decoder(dataset: Any, path: str) -> None:
    """A compressed transfer syntax without an installed pydicom decoder: an error naming the pip package."""
    from pydicom.pixels import get_decoder

    meta = getattr(dataset, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or not uid.is_encapsulated:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise OSError(
            f"cannot read DICOM file '{path}': pydicom has no decoder for its transfer syntax {uid.name} ({uid})"
        ) from err
    if decoder.is_available:
        return
    commands = _DICOM_DECODER_PACKAGES.get(str(uid))
    hint = " or ".join(f"`{c}`" for c in commands) if commands else "; ".join(decoder.missing_dependencies)
    raise OSError(
        f"cannot read DICOM file '{path}': its pixel data is compressed as {uid.name} ({uid}) and no installed "
        f"package decodes it; install one: {hint}"
    )


def _dicom_voi_range(dataset: Any, use_voi_lut: bool) -> tuple[float, float, bool] | None:
    """The output range of the VOI transform `apply_voi_lut(..., dataset)` applies (VOI LUT Sequence, else Window
    Center / Width with its VOI LUT Function) and whether it is a LUT, or None when the file has neither (or
    `use_voi_lut` is False).

    Found with pydicom's own functions: a VOI LUT is read through `apply_voi` over all its entries (its lowest to
    highest value); a window maps -inf and +inf to the two ends of its range (LINEAR, LINEAR_EXACT and SIGMOID).
    """
    from pydicom.pixels import apply_voi, apply_windowing

    if not use_voi_lut:
        return None
    sequence = dataset.get("VOILUTSequence")
    if sequence and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData")):
        entries, first, _ = (int(value) for value in sequence[0].LUTDescriptor)
        table = apply_voi(np.arange(first, first + (entries or 2**16), dtype=np.int64), dataset)
        return float(table.min()), float(table.max()), True
    if dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            ends = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        return float(ends[0]), float(ends[1]), False
    return None


def load_dicom(path: str | os.PathLike, use_voi_lut: bool = True) -> np.ndarray:
    """Read a single-frame DICOM file into uint8 `(H, W)` (monochrome) or `(H, W, 3)` (colour).

    The one DICOM reader of the project (the processor and the dataset builders use it), built on pydicom's own
    functions: stored values -> `apply_modality_lut` (Modality LUT or Rescale Slope / Intercept) -> `apply_voi_lut`
    (the first VOI LUT of the VOI LUT Sequence, else the first Window Center / Width with its VOI LUT Function:
    LINEAR, LINEAR_EXACT or SIGMOID), whose output range (the LUT's lowest to highest value; the window's output
    range) maps to 0..255; without a VOI transform (or with `use_voi_lut=False`) the image's own minimum to maximum
    maps to 0..255. Inverted (high values dark) when Photometric Interpretation is MONOCHROME1 or Presentation LUT
    Shape is INVERSE (a MONOCHROME1 file whose shape is INVERSE, as DX files must be, is inverted once). Colour
    images are returned as pydicom decodes them (RGB), min-max stretched when not 8-bit.

    Before the pixel data is decoded: Rows x Columns x NumberOfFrames is checked against
    `PIL.Image.MAX_IMAGE_PIXELS` as PIL does (`DecompressionBombError` above twice the limit), multi-frame files
    are refused, and a compressed transfer syntax without an installed decoder names the pip package to install.
    The conversion runs in float32, a few hundred rows at a time. Every error names the file.
    """
    path = os.fspath(path)
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as err:  # pragma: no cover - pydicom is a declared dependency
        raise ImportError(f"reading DICOM file '{path}' needs pydicom: pip install pydicom") from err
    try:
        dataset = pydicom.dcmread(path)
    except Exception as err:
        raise OSError(f"cannot read DICOM file '{path}': {err}") from err
    frames = _check_dicom_pixel_count(dataset, path)
    if frames > 1:
        raise ValueError(f"DICOM file '{path}' has {frames} frames; only single-frame images are supported")
    _check_dicom_decoder(dataset, path)
    try:
        pixels = dataset.pixel_array
    except Exception as err:
        raise OSError(f"cannot read DICOM file '{path}': {err}") from err
    if pixels.ndim == 3:
        return pixels if pixels.dtype == np.uint8 else window_to_uint8(pixels)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    shape = str(dataset.get("PresentationLUTShape", "IDENTITY") or "IDENTITY").strip().upper()
    invert = photometric == "MONOCHROME1" or shape == "INVERSE"
    chunks = [slice(start, start + _DICOM_ROWS_PER_CHUNK) for start in range(0, pixels.shape[0], _DICOM_ROWS_PER_CHUNK)]
    try:
        voi_range = _dicom_voi_range(dataset, use_voi_lut)
        is_lut = voi_range is not None and voi_range[2]

        def transformed(rows: slice) -> np.ndarray:
            values = apply_modality_lut(pixels[rows], dataset)
            if voi_range is None:
                return values
            if is_lut and values.dtype.kind == "f":  # a LUT is indexed by integers (rescaled values are float64)
                values = np.rint(values).astype(np.int64)
            return apply_voi_lut(values, dataset)

        if voi_range is None:
            bounds = [(float(part.min()), float(part.max())) for part in map(transformed, chunks)]
            low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
        else:
            low, high = voi_range[:2]
        out = np.empty(pixels.shape, dtype=np.uint8)
        for rows in chunks:
            out[rows] = _scale_to_uint8(transformed(rows), low, high, invert)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError) as err:
        raise ValueError(f"DICOM file '{path}': {err}") from err
    return out


def _fetch_url(url: str) -> bytes:
    """The bytes at an `http(s)://` URL (Python's `urllib`), with `URL_TIMEOUT_SECONDS` for the connection, for each
    read and for the whole download, and at most `URL_MAX_BYTES` bytes; OSError naming the URL otherwise."""
    import http.client
    import urllib.error
    import urllib.request

    timeout, limit = float(URL_TIMEOUT_SECONDS), int(URL_MAX_BYTES)
    too_large = (
        f"cannot fetch image URL '{url}': larger than URL_MAX_BYTES ({limit} bytes); download it first and pass "
        "the file, or raise modeling_refers.image_processing_refers.URL_MAX_BYTES"
    )
    too_slow = (
        f"cannot fetch image URL '{url}': no complete answer within URL_TIMEOUT_SECONDS ({timeout:g} s); download "
        "it first and pass the file, or raise modeling_refers.image_processing_refers.URL_TIMEOUT_SECONDS"
    )
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise OSError(too_large)
            while chunk := response.read1(min(1 << 20, limit + 1 - size)):  # what has arrived, not 1 MB
                size += len(chunk)
                if size > limit:
                    raise OSError(too_large)
                if time.monotonic() > deadline:
                    raise OSError(too_slow)
                chunks.append(chunk)
    except TimeoutError as err:
        raise OSError(too_slow) from err
    except urllib.error.URLError as err:
        if isinstance(getattr(err, "reason", None), TimeoutError):
            raise OSError(too_slow) from err
        raise OSError(f"cannot fetch image URL '{url}': {err}") from err
    except http.client.HTTPException as err:
        raise OSError(f"cannot fetch image URL '{url}': {type(err).__name__}: {err}") from err
    return b"".join(chunks)


def _is_dicom_file(path: str) -> bool:
    if path.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            header = handle.read(132)
    except OSError:
        return False
    return len(header) == 132 and header[128:] == b"DICM"


def jpeg_draft_size(size: SizeDict | dict | None) -> tuple[int, int] | None:
    """The `(width, height)` to ask PIL's `JpegImageFile.draft` for, given the processor's resize `size`.

    `draft()` decodes a JPEG at the smallest of the scales 1/1, 1/2, 1/4, 1/8 whose result is still at least the
    requested width and height (DCT-domain downscaling: a 2,500 x 3,000 radiograph decodes as 313 x 375 for a 256
    target), so asking for the resize target keeps the decoded image at least as large as what the resize makes of
    it: `{"height": h, "width": w}` gives `(w, h)`, `{"shortest_edge": s}` gives `(s, s)` (the short side stays
    >= s; the long side shrinks by the same factor). Any other size (`max_height` / `max_width`, none) gives
    `None`: decode at full size.
    """
    if size is None:
        return None
    if not isinstance(size, SizeDict):
        size = SizeDict(**size)
    if size.shortest_edge:
        return int(size.shortest_edge), int(size.shortest_edge)
    if size.height and size.width:
        return int(size.width), int(size.height)
    return None


def _draft_jpeg(image: Image.Image, draft_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """`image.draft(image.mode, draft_size)` for a JPEG not yet decoded (a loaded image, or another format, is left
    as it is); the mode is kept, only the scale changes. Returns the `(height, width)` before, when it shrank."""
    if draft_size is not None and isinstance(image, JpegImageFile) and image.tile:
        width, height = image.size
        image.draft(image.mode, (max(1, int(draft_size[0])), max(1, int(draft_size[1]))))
        if image.size != (width, height):
            return height, width
    return None


def _pil_to_uint8(image: Image.Image, keep_alpha: bool = False) -> np.ndarray:
    if image.mode in _HIGH_BIT_DEPTH_PIL_MODES:
        return window_to_uint8(np.array(image))
    if keep_alpha and image.mode in ("LA", "La"):
        return np.array(image.convert("LA"))
    if keep_alpha and (image.mode in ("RGBA", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info)):
        return np.array(image.convert("RGBA"))
    if image.mode in ("1", "L", "LA", "La"):
        return np.array(image.convert("L"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)


def _array_to_uint8(array: Any, keep_alpha: bool = False) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.size == 0:
        raise ValueError(f"image array is empty (shape {array.shape})")
    if array.ndim == 3:
        if infer_channel_dimension_format(array, num_channels=(1, 2, 3, 4)) == ChannelDimension.FIRST:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
        elif array.shape[-1] in (2, 4) and not keep_alpha:
            array = array[..., :-1] if array.shape[-1] == 4 else array[..., 0]  # drop alpha: radiographs are opaque
    elif array.ndim != 2:
        raise ValueError(
            f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 2, 3, 4; got shape {array.shape}"
        )
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = window_to_uint8(array)
    return array


def load_radiograph(
    image: Any, keep_alpha: bool = False, draft_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Load one radiograph as uint8: `(H, W)` for grayscale, `(H, W, 3)` for colour.

    With `keep_alpha=True` an alpha channel is kept (`(H, W, 2)` grey + alpha, `(H, W, 4)` RGBA); by default it
    is dropped (radiographs are opaque). Accepts a file path (`str` / `os.PathLike`: PNG, JPEG, ... incl. 16-bit PNG, or DICOM), an `http(s)://` URL
    (PNG, JPEG, ...; not DICOM; fetched within `URL_TIMEOUT_SECONDS`, at most `URL_MAX_BYTES`), a
    `PIL.Image.Image` (any mode), a numpy array or torch tensor (`(H, W)`, `(H, W, C)` or `(C, H, W)`; uint8 kept
    as is, any other dtype min-max windowed with `window_to_uint8`). Use `window_to_uint8` yourself first when a
    DICOM window must be applied to an array.

    `draft_size=(width, height)`: a JPEG file (or a `PIL` JPEG image not yet loaded, which is then decoded in place
    at the reduced size, as `Image.draft` does) is decoded with PIL's `draft()` at the smallest of the scales 1/1,
    1/2, 1/4, 1/8 whose result is still at least `width` x `height` (see `jpeg_draft_size`); other formats are not
    affected. The caller resizes the result to its target as usual.
    """
    return _load_radiograph(image, keep_alpha, draft_size)[0]


def _load_radiograph(
    image: Any, keep_alpha: bool = False, draft_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """`load_radiograph` and the `(height, width)` of a JPEG before `draft()` reduced it (None when not drafted)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            data = _fetch_url(path)
            try:
                with Image.open(io.BytesIO(data)) as opened:
                    opened.load()
                    return _pil_to_uint8(opened, keep_alpha), None
            except Image.DecompressionBombError as err:
                raise Image.DecompressionBombError(f"cannot read image URL '{path}': {err}") from err
            except (OSError, SyntaxError, ValueError) as err:
                raise OSError(f"cannot read image URL '{path}': {err}") from err
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: '{path}'")
        if _is_dicom_file(path):
            return load_dicom(path), None
        try:
            with Image.open(path) as opened:
                original = _draft_jpeg(opened, draft_size)
                opened.load()
                return _pil_to_uint8(opened, keep_alpha), original
        except Image.DecompressionBombError as err:  # not an OSError: named here like any other bad file
            raise Image.DecompressionBombError(f"cannot read image file '{path}': {err}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise OSError(f"cannot read image file '{path}': {err}") from err
    if isinstance(image, Image.Image):
        original = _draft_jpeg(image, draft_size)
        return _pil_to_uint8(image, keep_alpha), original
    if isinstance(image, np.ndarray) or (hasattr(image, "detach") and hasattr(image, "shape")):
        return _array_to_uint8(image, keep_alpha), None
    raise TypeError(
        f"an image must be a file path, a PIL.Image.Image, a numpy array or a torch tensor; got {type(image).__name__}"
    )


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
    """Normalise an image input into a list of studies (each a list of views).

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


def _warn_if_constant(image: np.ndarray, where: str, source: Any) -> None:
    """Warn when a loaded uint8 `(C, H, W)` image has one value per channel (a 1 x 1 image, a blank file, a DICOM
    window that cuts every pixel): it becomes a constant tensor. Names `where` and the file when there is one."""
    flat = image.reshape(image.shape[0], -1)
    if not np.array_equal(flat.min(axis=1), flat.max(axis=1)):
        return
    height, width = image.shape[1:]
    name = f" ('{os.fspath(source)}')" if isinstance(source, (str, os.PathLike)) else ""
    what = "is 1 x 1 pixel" if height * width == 1 else f"has all its {height} x {width} pixels equal"
    values = flat[:, 0].tolist()
    warnings.warn(
        f"{where}{name} {what} (value {values[0] if len(values) == 1 else values} after loading as 8 bits): it "
        "becomes a constant tensor, with nothing for the model to see",
        UserWarning,
        stacklevel=4,
    )


def describe_study(index: int, study_ids: Sequence[Any] | None) -> str:
    """`'study 3'` or `"study 3 (id 's51')"`, for error messages."""
    if study_ids is not None and index < len(study_ids) and study_ids[index] is not None:
        return f"study {index} (id {study_ids[index]!r})"
    return f"study {index}"


class RefersImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_train_augment (`bool`, *optional*, defaults to `False`):
        Training mode: random crop (if `do_random_crop`), random horizontal flip, random rotation and random
        brightness/contrast. When `False` the output is deterministic (centre crop, no flip unless forced).
    do_random_crop (`bool`, *optional*, defaults to `True`):
        In training mode, crop `crop_size` at a random position instead of the centre.
    flip_probability (`float`, *optional*, defaults to 0.5):
        Training mode: probability that a study (all its views together) is mirrored left-right.
    rotation_degrees (`float`, *optional*, defaults to 10.0):
        Training mode: each view is rotated by an angle drawn uniformly from `[-rotation_degrees, rotation_degrees]`
        (counter-clockwise, bilinear, black fill), before cropping. 0 disables rotation.
    brightness_range (`tuple[float, float]`, *optional*, defaults to `(0.6, 1.4)`):
        Training mode: brightness factor range (`x * b`, clipped to 0..255, as torchvision `adjust_brightness`).
    contrast_range (`tuple[float, float]`, *optional*, defaults to `(0.6, 1.4)`):
        Training mode: contrast factor range (`(x - mean) * c + mean`, clipped, as torchvision `adjust_contrast`).
    color_jitter_probability (`float`, *optional*, defaults to 0.8):
        Training mode: probability that brightness and contrast jitter is applied to a view.
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
    do_random_crop: bool | None
    flip_probability: int | float | None
    rotation_degrees: int | float | None
    brightness_range: list[int | float] | tuple[int | float, ...] | None
    contrast_range: list[int | float] | tuple[int | float, ...] | None
    color_jitter_probability: int | float | None
    do_jpeg_draft: bool | None


# The name the processor used before transformers' `<Model>ImageProcessorKwargs` convention; kept for old imports.
RefersImagesKwargs = RefersImageProcessorKwargs


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
    float inputs are windowed to 8 bits first (see `window_to_uint8`). Defaults follow the paper: resize to
    256 x 256, crop 224 (random in training, centre otherwise, centre offsets rounded as torchvision's
    `center_crop`), horizontal flip (p=0.5), rotation in [-10, 10] degrees, brightness/contrast jitter,
    normalise with mean = std = 0.5. `size={"shortest_edge": 256}` keeps the aspect ratio instead (what the
    official fine-tuning code's `transforms.Resize(224)` does, at 224).

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
    do_random_crop = True
    flip_probability = 0.5
    rotation_degrees = 10.0
    brightness_range = [0.6, 1.4]
    contrast_range = [0.6, 1.4]
    color_jitter_probability = 0.8
    do_jpeg_draft = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._validate_augmentation(
            flip_probability=self.flip_probability,
            rotation_degrees=self.rotation_degrees,
            brightness_range=self.brightness_range,
            contrast_range=self.contrast_range,
            color_jitter_probability=self.color_jitter_probability,
        )

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_augmentation(
        flip_probability=None,
        rotation_degrees=None,
        brightness_range=None,
        contrast_range=None,
        color_jitter_probability=None,
        **kwargs,
    ) -> None:
        for name, value in (
            ("flip_probability", flip_probability),
            ("color_jitter_probability", color_jitter_probability),
        ):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if rotation_degrees is not None and not 0.0 <= float(rotation_degrees) <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {rotation_degrees}")
        for name, value in (("brightness_range", brightness_range), ("contrast_range", contrast_range)):
            if value is None:
                continue
            if len(value) != 2 or not 0.0 <= float(value[0]) <= float(value[1]):
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {value}")

    def _validate_preprocess_kwargs(self, **kwargs):
        super()._validate_preprocess_kwargs(**kwargs)
        self._validate_augmentation(**kwargs)
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
        array, original = _load_radiograph(image, keep_alpha=not do_convert_rgb, draft_size=draft_size)
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

    # ------------------------------------------------------------------ augmentation helpers
    @staticmethod
    def _rotate(image: np.ndarray, angle: float, resample: PILImageResampling) -> np.ndarray:
        """Rotate a uint8 `(C, H, W)` image by `angle` degrees counter-clockwise about its centre (black fill)."""
        resample = Image.Resampling(int(resample))
        if resample not in (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
            resample = Image.Resampling.BILINEAR  # PIL rotates with these three filters only
        channels = [
            np.array(Image.fromarray(channel).rotate(angle, resample=resample, expand=False, fillcolor=0))
            for channel in image
        ]
        return np.stack(channels)

    @staticmethod
    def _random_crop(image: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """Crop `(height, width)` at a uniformly random position (zero-padding, centred, first if too small)."""
        _, image_height, image_width = image.shape
        pad_h, pad_w = max(height - image_height, 0), max(width - image_width, 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
            _, image_height, image_width = image.shape
        top = int(rng.integers(0, image_height - height + 1))
        left = int(rng.integers(0, image_width - width + 1))
        return image[:, top : top + height, left : left + width]

    @staticmethod
    def _jitter(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
        """Brightness then contrast on a float `(C, H, W)` image in 0..255 (torchvision semantics, no rounding).

        An alpha channel (the last of 2 or 4) is left as it is.
        """
        if image.shape[0] in (2, 4):
            colour = RefersImageProcessor._jitter(image[:-1], brightness, contrast)
            return np.concatenate([colour, image[-1:]])
        image = np.clip(image * brightness, 0.0, 255.0)
        gray = image[0] if image.shape[0] == 1 else np.tensordot(_LUMA_WEIGHTS, image, axes=1)
        mean = float(gray.mean())
        return np.clip((image - mean) * contrast + mean, 0.0, 255.0)

    def _transform_view(
        self,
        image: np.ndarray,
        flip: bool,
        train: bool,
        rng: np.random.Generator,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_random_crop: bool,
        rotation_degrees: float,
        brightness_range: Sequence[float],
        contrast_range: Sequence[float],
        color_jitter_probability: float,
        do_convert_rgb: bool,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        **kwargs,
    ) -> np.ndarray:
        """uint8 `(C, H, W)` -> float32 `(C', H', W')`. Random draws, in order: angle, crop offsets, jitter."""
        if do_resize:
            image = self.resize(image, size=size, resample=resample)
        if train and rotation_degrees:
            image = self._rotate(image, float(rng.uniform(-rotation_degrees, rotation_degrees)), resample)
        if do_center_crop:
            if train and do_random_crop:
                image = self._random_crop(image, crop_size.height, crop_size.width, rng)
            else:
                image = self.center_crop(image, crop_size)
        if flip:
            image = image[:, :, ::-1]
        image = image.astype(np.float32)
        if train and rng.random() < color_jitter_probability:
            brightness = float(rng.uniform(*brightness_range))
            contrast = float(rng.uniform(*contrast_range))
            image = self._jitter(image, brightness, contrast)
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

    # ------------------------------------------------------------------ main entry points
    def preprocess(
        self,
        images: Any,
        generator: Any = None,
        flip: bool | Sequence[bool] | None = None,
        study_ids: Sequence[Any] | None = None,
        num_views: int | None = None,
        return_flipped: bool = False,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Preprocess one image, a list of images or a list of studies (lists of views).

        Args:
            images: image(s) as file paths, PIL images, numpy arrays or torch tensors; see the class docstring.
            generator: randomness for training mode: int seed, `numpy.random.Generator` or `random.Random`.
            flip: force the horizontal flip: one bool for all, or one per study/image. `None`: random with
                `flip_probability` in training mode, no flip otherwise.
            study_ids: optional ids, one per study/image, used in error messages.
            num_views: studies only: pad the view axis to this many views (error if a study has more).
            return_flipped: also return `flipped` `(B,)` bool.
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
            },
            **kwargs,
        )

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        generator: Any = None,
        flip: bool | Sequence[bool] | None = None,
        study_ids: Sequence[Any] | None = None,
        num_views: int | None = None,
        return_flipped: bool = False,
        do_train_augment: bool = False,
        flip_probability: float = 0.5,
        return_tensors: str | TensorType | None = None,
        data_format: str | ChannelDimension | None = ChannelDimension.FIRST,
        **kwargs,
    ) -> BatchFeature:
        studies, is_study_layout = make_batched_studies(images)
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
            forced = None if flip is None else [bool(flip)] * batch_size
        else:
            forced = [bool(value) for value in flip]
            if len(forced) != batch_size:
                raise ValueError(f"flip has {len(forced)} entries but images has {batch_size} studies/images")

        train = bool(do_train_augment)
        rng = make_generator(generator) if train or generator is not None else None
        flipped, processed = [], []
        for index, study in enumerate(studies):
            if forced is not None:
                flip_study = forced[index]
            else:
                flip_study = bool(train and rng.random() < flip_probability)
            flipped.append(flip_study)
            views = []
            for view_index, view in enumerate(study):
                where = describe_study(index, study_ids) if is_study_layout else f"image {index}"
                if is_study_layout:
                    where += f", view {view_index}"
                try:
                    array = self.process_image(
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
                _warn_if_constant(array, where, view)
                views.append(self._transform_view(array, flip_study, train, rng, **kwargs))
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
    "RefersImagesKwargs",
    "describe_study",
    "jpeg_draft_size",
    "load_dicom",
    "load_radiograph",
    "make_batched_studies",
    "make_generator",
    "window_to_uint8",
]
