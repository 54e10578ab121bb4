"""Hostile and odd image files (issue 15): DICOM decompression bombs, the one DICOM reader (VOI LUT Function, VOI LUT
Sequence, Presentation LUT Shape), missing DICOM decoders, PIL's DecompressionBombError, URLs (timeout, byte cap) and
constant images. References are pydicom's own functions; images are real radiographs."""

import http.server
import threading
import time
import tracemalloc
import warnings

import numpy as np
import PIL.Image
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from datasets_scripts import dicom_to_uint8  # noqa: E402
from modeling_refers import radiograph_io  # noqa: E402
from modeling_refers.image_processing_refers import RefersImageProcessor  # noqa: E402
from modeling_refers.radiograph_io import load_dicom, load_radiograph, window_to_uint8  # noqa: E402


RAW = {"do_resize": False, "do_center_crop": False, "return_tensors": "np"}


@pytest.fixture
def radiograph(shared_data_dir):
    """A real chest radiograph (NIH ChestX-ray14, 64 x 64 sample) as uint8 and its path."""
    path = shared_data_dir / "nih_chestxray14_sample" / "images" / "00000001_000.png"
    return np.asarray(PIL.Image.open(path).convert("L")), path


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=12, syntax=ExplicitVRLittleEndian, **tags):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def twelve_bit(radiograph):
    """The radiograph as 12-bit stored values (0..4080)."""
    return radiograph[0].astype(np.uint16) * 16


def pydicom_reference(path, invert=False):
    """Independent reference: pydicom's modality LUT + VOI LUT/window, then the VOI output range onto 0..255."""
    ds = pydicom.dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        table = np.asarray(item.LUTData, dtype=np.float64)
        low, high = table.min(), table.max()
    else:  # 12-bit unsigned without rescale: pydicom windows onto 0 .. 2**12 - 1
        low, high = 0.0, 2.0**ds.BitsStored - 1
    scaled = (values - low) / (high - low)
    return np.rint((1.0 - scaled if invert else scaled) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- one DICOM reader
def test_sigmoid_voi_lut_function_as_pydicom(radiograph, tmp_path):
    path = write_dicom(tmp_path / "sigmoid.dcm", twelve_bit(radiograph), WindowCenter=1800, WindowWidth=1600,
                       VOILUTFunction="SIGMOID")
    expected = pydicom_reference(path)
    np.testing.assert_array_equal(load_dicom(path), expected)
    # the dataset builder uses the same reader, and the processor gives the file what it gives those pixels
    np.testing.assert_array_equal(dicom_to_uint8(path), expected)
    processor = RefersImageProcessor()
    np.testing.assert_array_equal(processor(path, **RAW)["pixel_values"], processor(expected, **RAW)["pixel_values"])
    # the test means something: a LINEAR window of the same centre / width gives other pixels
    linear = window_to_uint8(twelve_bit(radiograph), 1800, 1600)
    assert np.abs(linear.astype(int) - expected.astype(int)).max() > 10


def test_voi_lut_sequence_as_pydicom(radiograph, tmp_path):
    lut = np.rint(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # a gamma 0.5 VOI LUT, 12-bit output
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    path = write_dicom(tmp_path / "voi_lut.dcm", twelve_bit(radiograph), VOILUTSequence=[item],
                       WindowCenter=2000, WindowWidth=400)  # the LUT wins over the window, as in pydicom
    expected = pydicom_reference(path)
    np.testing.assert_array_equal(load_dicom(path), expected)
    np.testing.assert_array_equal(dicom_to_uint8(path), expected)
    assert not np.array_equal(expected, window_to_uint8(twelve_bit(radiograph), 2000, 400))
    assert not np.array_equal(expected, window_to_uint8(twelve_bit(radiograph)))


def test_presentation_lut_shape_inverse(radiograph, tmp_path):
    stored = twelve_bit(radiograph)
    plain = write_dicom(tmp_path / "plain.dcm", stored, WindowCenter=1800, WindowWidth=1600)
    inverse = write_dicom(tmp_path / "inverse.dcm", stored, WindowCenter=1800, WindowWidth=1600,
                          PresentationLUTShape="INVERSE")
    np.testing.assert_array_equal(load_dicom(plain), pydicom_reference(plain))
    np.testing.assert_array_equal(load_dicom(inverse), pydicom_reference(inverse, invert=True))
    np.testing.assert_array_equal(dicom_to_uint8(inverse), pydicom_reference(inverse, invert=True))
    # a DX MONOCHROME1 file carries INVERSE too (PS3.3 C.8.11.6.1.2): inverted once, not twice
    mono1 = write_dicom(tmp_path / "mono1.dcm", stored, "MONOCHROME1", WindowCenter=1800, WindowWidth=1600,
                        PresentationLUTShape="INVERSE")
    np.testing.assert_array_equal(load_dicom(mono1), load_dicom(inverse))


def test_dicom_errors_name_the_file(radiograph, tmp_path):
    path = write_dicom(tmp_path / "width0.dcm", twelve_bit(radiograph), WindowCenter=1800, WindowWidth=0)
    with pytest.raises(ValueError, match=r"DICOM file '.*width0\.dcm': .*Window Width"):
        load_dicom(path)
    with pytest.raises(ValueError, match=r"study 0 \(id 's1'\), view 0: DICOM file '.*width0\.dcm'"):
        RefersImageProcessor()([[path]], study_ids=["s1"])


def test_missing_decoder_names_the_pip_package(monkeypatch):
    from pydicom.pixels import get_decoder

    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)
    if path is None:
        pytest.skip("pydicom test file MR_small_jpeg_ls_lossless.dcm not installed")
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if decoder.is_available:  # a JPEG-LS plugin is installed here: hide it, as on a machine without one
        monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(OSError, match=r"MR_small_jpeg_ls_lossless\.dcm'.*JPEG-LS Lossless.*install one: "
                                      r"`pip install pyjpegls` or `pip install pylibjpeg pylibjpeg-libjpeg` or "
                                      r"`pip install python-gdcm`"):
        load_dicom(path)


# ---------------------------------------------------------------------------------------------- decompression bombs
def _forbid_pixel_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixel_array was decoded before the header checks")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))


def test_dicom_pixel_count_checked_before_decoding(radiograph, tmp_path, monkeypatch):
    # a deflated file (a 68 KB one can declare 6,000 x 6,000): PIL's limit applies to Rows x Columns x frames
    path = write_dicom(tmp_path / "bomb.dcm", twelve_bit(radiograph), syntax=DeflatedExplicitVRLittleEndian)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    pixels = radiograph[0].size
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", pixels // 2 - 1)
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(PIL.Image.DecompressionBombError, match=r"DICOM file '.*bomb\.dcm' declares 64 x 64 pixels "
                                                               r"x 1 frame\(s\) = 4096 pixels"):
        load_dicom(path)
    with pytest.raises(PIL.Image.DecompressionBombError, match=r"image 0: DICOM file '.*bomb\.dcm'"):
        RefersImageProcessor()(path)
    monkeypatch.undo()
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", pixels - 1)  # above the limit, below twice it: a warning
    with pytest.warns(PIL.Image.DecompressionBombWarning, match=r"bomb\.dcm"):
        np.testing.assert_array_equal(load_dicom(path), window_to_uint8(twelve_bit(radiograph)))


def test_multi_frame_dicom_refused_before_decoding(radiograph, tmp_path, monkeypatch):
    frames = np.stack([twelve_bit(radiograph), twelve_bit(radiograph)[::-1]])
    path = write_dicom(tmp_path / "two_frames.dcm", frames)
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(ValueError, match=r"DICOM file '.*two_frames\.dcm' has 2 frames"):
        load_dicom(path)


def test_png_decompression_bomb_names_the_file_and_study(radiograph, monkeypatch):
    _, path = radiograph
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)
    with pytest.raises(PIL.Image.DecompressionBombError, match=r"cannot read image file '.*00000001_000\.png'"):
        load_radiograph(path)
    with pytest.raises(PIL.Image.DecompressionBombError,
                       match=r"study 1 \(id 's2'\), view 0: cannot read image file '.*00000001_000\.png'"):
        RefersImageProcessor()([[radiograph[0]], [path]], study_ids=["s1", "s2"])


# ---------------------------------------------------------------------------------------------- memory
def _peak_bytes(function, *args):
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_windowing_runs_in_float32(radiograph):
    # a 3,000 x 2,500 16-bit radiograph (the real one, enlarged): float64 windowing needed 236 MB for it
    big = np.kron(radiograph[0].astype(np.uint16) * 257, np.ones((47, 40), dtype=np.uint16))[:3000, :2500]
    peak = _peak_bytes(window_to_uint8, big)
    assert peak < 6 * big.size, f"window_to_uint8 peaked at {peak / big.size:.1f} bytes per pixel"
    small = radiograph[0].astype(np.float64)  # the float64 min-max stretch, on the 64 x 64 original
    stretched = np.rint((small - small.min()) / (small.max() - small.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(window_to_uint8(big), np.kron(stretched, np.ones((47, 40), np.uint8))[:3000, :2500])


def test_dicom_conversion_memory_is_bounded(radiograph, tmp_path):
    stored = np.kron(twelve_bit(radiograph), np.ones((32, 32), dtype=np.uint16))  # 2,048 x 2,048
    path = write_dicom(tmp_path / "big.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=800,
                       WindowWidth=1600)
    peak = _peak_bytes(load_dicom, path)
    # the file's bytes (2) + the decoded array (2) + the result (1) + a few float64 row chunks
    assert peak < 10 * stored.size, f"load_dicom peaked at {peak / stored.size:.1f} bytes per pixel"


# ---------------------------------------------------------------------------------------------- URLs
class _Server:
    """A local HTTP server: `/image.png` (a real radiograph), `/slow` (answers after 5 s), `/drip` (one byte every
    0.2 s for 4 s), `/large` (the PNG with Content-Length), `/large-unsized` (the PNG, no Content-Length)."""

    def __init__(self, payload):

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    if self.path == "/slow":
                        time.sleep(5)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    if self.path in ("/image.png", "/large", "/slow"):
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.path == "/drip":
                        for byte in payload[:20]:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.2)
                        return
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(radiograph):
    served = _Server(radiograph[1].read_bytes())
    yield served
    served.close()


def test_url_is_fetched_like_the_file(server, radiograph):
    np.testing.assert_array_equal(load_radiograph(f"{server.url}/image.png"), radiograph[0])


def test_url_timeout(server, monkeypatch):
    monkeypatch.setattr(radiograph_io, "URL_TIMEOUT_SECONDS", 1.0)
    for route in ("slow", "drip"):  # no answer in time; an answer that trickles past the total time
        start = time.monotonic()
        with pytest.raises(OSError, match=rf"image 0: cannot fetch image URL '{server.url}/{route}': no complete "
                                          r"answer within URL_TIMEOUT_SECONDS \(1 s\)"):
            RefersImageProcessor()(f"{server.url}/{route}")
        assert time.monotonic() - start < 3.0


def test_url_byte_cap(server, radiograph, monkeypatch):
    size = radiograph[1].stat().st_size
    monkeypatch.setattr(radiograph_io, "URL_MAX_BYTES", size - 1)
    for route in ("large", "large-unsized"):  # refused from the Content-Length, or while reading
        with pytest.raises(OSError, match=rf"cannot fetch image URL '{server.url}/{route}': larger than "
                                          rf"URL_MAX_BYTES \({size - 1} bytes\)"):
            load_radiograph(f"{server.url}/{route}")
    monkeypatch.setattr(radiograph_io, "URL_MAX_BYTES", size)
    np.testing.assert_array_equal(load_radiograph(f"{server.url}/large-unsized"), radiograph[0])


# ---------------------------------------------------------------------------------------------- constant images
def test_constant_images_warn_naming_them(radiograph, tmp_path):
    pixels, path = radiograph
    one_pixel = tmp_path / "one_pixel.png"
    PIL.Image.fromarray(pixels[30:31, 30:31]).save(one_pixel)
    processor = RefersImageProcessor()
    with pytest.warns(UserWarning, match=rf"image 1 \('.*one_pixel\.png'\) is 1 x 1 pixel \(value {pixels[30, 30]} "
                                         r"after loading as 8 bits\): it becomes a constant tensor"):
        processor([path, one_pixel])
    flat = np.full_like(pixels, pixels[10, 10])
    with pytest.warns(UserWarning, match=r"study 0 \(id 'blank'\), view 1 has all its 64 x 64 pixels equal"):
        processor([[pixels, flat]], study_ids=["blank"])
    # a DICOM whose window cuts every pixel is constant too (all 255)
    cut = write_dicom(tmp_path / "cut.dcm", twelve_bit(radiograph), WindowCenter=-3000, WindowWidth=10)
    with pytest.warns(UserWarning, match=r"image 0 \('.*cut\.dcm'\) has all its 64 x 64 pixels equal \(value 255"):
        processor(cut)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor([path, pixels])  # a real radiograph: no warning
