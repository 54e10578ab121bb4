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
"""Radiograph I/O: every way a radiograph reaches the package, decoded to uint8 `(H, W)` or `(H, W, 3)`.

The one decoding module: `RefersImageProcessor` and every dataset builder read images through it.

- `load_radiograph`: file paths (PNG, JPEG, 16-bit PNG, DICOM), `http(s)://` URLs, PIL images, arrays, tensors;
  JPEGs optionally decoded at a reduced DCT scale (`jpeg_draft_size`, PIL's `draft()`).
- `load_dicom`: the one DICOM reader (pydicom's modality LUT, VOI LUT / window, MONOCHROME1), with PIL's
  decompression-bomb rule checked from the header.
- `window_to_uint8`: high-bit-depth arrays to 8 bits (min-max or a DICOM window).
- `warn_if_constant`: the warning for an image with nothing to see.

Ships inside checkpoint folders beside `image_processing_refers.py`: it imports only the standard library, numpy,
PIL and (lazily) pydicom.
"""

import io
import os
import time
import warnings
from typing import Any

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile


_HIGH_BIT_DEPTH_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_DICOM_SUFFIXES = (".dcm", ".dicom")
# Images given as http(s) URLs: seconds allowed for the connection, each read and the whole download, and the
# largest download accepted (a 3,000 x 3,000 16-bit PNG is ~15 MB). Module attributes: change them here.
URL_TIMEOUT_SECONDS = 20.0
URL_MAX_BYTES = 64 * 2**20


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
        "the file, or raise modeling_refers.radiograph_io.URL_MAX_BYTES"
    )
    too_slow = (
        f"cannot fetch image URL '{url}': no complete answer within URL_TIMEOUT_SECONDS ({timeout:g} s); download "
        "it first and pass the file, or raise modeling_refers.radiograph_io.URL_TIMEOUT_SECONDS"
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


def jpeg_draft_size(size: Any) -> tuple[int, int] | None:
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

    def field(name: str) -> Any:  # a dict or transformers' SizeDict
        return size.get(name) if isinstance(size, dict) else getattr(size, name, None)

    if field("shortest_edge"):
        return int(field("shortest_edge")), int(field("shortest_edge"))
    if field("height") and field("width"):
        return int(field("width")), int(field("height"))
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
        if array.shape[0] in (1, 2, 3, 4):  # channels first (also when both ends could be channels)
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"a 3-dimensional image array must be (H, W, C) or (C, H, W) with C in 1, 2, 3, 4; got shape "
                f"{array.shape}"
            )
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
    is dropped (radiographs are opaque). Accepts a file path (`str` / `os.PathLike`: PNG, JPEG, ... incl. 16-bit
    PNG, or DICOM), an `http(s)://` URL
    (PNG, JPEG, ...; not DICOM; fetched within `URL_TIMEOUT_SECONDS`, at most `URL_MAX_BYTES`), a
    `PIL.Image.Image` (any mode), a numpy array or torch tensor (`(H, W)`, `(H, W, C)` or `(C, H, W)`; uint8 kept
    as is, any other dtype min-max windowed with `window_to_uint8`). Use `window_to_uint8` yourself first when a
    DICOM window must be applied to an array.

    `draft_size=(width, height)`: a JPEG file (or a `PIL` JPEG image not yet loaded, which is then decoded in place
    at the reduced size, as `Image.draft` does) is decoded with PIL's `draft()` at the smallest of the scales 1/1,
    1/2, 1/4, 1/8 whose result is still at least `width` x `height` (see `jpeg_draft_size`); other formats are not
    affected. The caller resizes the result to its target as usual.
    """
    return load_radiograph_and_size(image, keep_alpha, draft_size)[0]


def load_radiograph_and_size(
    image: Any, keep_alpha: bool = False, draft_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """`load_radiograph` and the `(height, width)` of a JPEG before `draft()` reduced it (None when not drafted).

    The processor resizes a drafted image to the size the full decode would get (`size={"shortest_edge": s}`)."""
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



def warn_if_constant(image: np.ndarray, where: str, source: Any) -> None:
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


__all__ = [
    "URL_MAX_BYTES",
    "URL_TIMEOUT_SECONDS",
    "jpeg_draft_size",
    "load_dicom",
    "load_radiograph",
    "load_radiograph_and_size",
    "warn_if_constant",
    "window_to_uint8",
]
