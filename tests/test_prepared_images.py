"""Prepared data sets (`datasets_scripts.prepared_images`, `examples/prepare_images.py`) and JPEG `draft()` decoding
in `RefersImageProcessor`, on real radiographs: the COVID-19 collection's JPEGs (256 px short side) and NIH
ChestX-ray14 originals (1024 x 1024 PNG, one RGBA), the latter also saved as MIMIC-CXR-JPG-sized JPEGs
(2,500 x 3,000, quality 95, as MIMIC-CXR-JPG was written).

Grey-level tolerances (0..255) are justified where they are used: an exact comparison wherever the two paths run the
same operations; otherwise limits set between what two good antialiased downscales differ by (measured: mean
0.6-0.9, 99th percentile 4-7 grey levels) and what a one-pixel misalignment gives (mean 2.8-4.1, 99th percentile
19-25), which is checked to fail them.
"""

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Image as ImageFeature, load_from_disk
from PIL import Image
from transformers.image_utils import SizeDict

from datasets_scripts import COVID_LABEL_NAMES, load_covid19_studies, load_nih_chestxray14, load_target_dataset
from datasets_scripts.common import single_label_features
from datasets_scripts import prepared_images
from datasets_scripts.prepared_images import (
    PREPARED_METADATA_FILE,
    NotAPreparedDatasetError,
    load_prepared_dataset,
    prepare_images,
    read_prepared_metadata,
)
from modeling_refers.image_processing_refers import RefersImageProcessor
from modeling_refers.radiograph_io import jpeg_draft_size

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MIMIC_SIZE = (2500, 3000)  # width, height of a typical MIMIC-CXR-JPG radiograph
FULLRES = "nih_chestxray14_fullres/images"
# Between two good antialiased downscales (mean 0.6-0.9, p99 4-7) and a one-pixel shift (mean >= 2.8, p99 >= 19).
MEAN_TOLERANCE, P99_TOLERANCE = 1.5, 10.0


def grey_levels(pixel_values) -> np.ndarray:
    """Processor output (normalized with mean = std = 0.5) -> grey levels 0..255."""
    return (np.asarray(pixel_values, dtype=np.float64) * 0.5 + 0.5) * 255.0


def within_tolerance(a, b) -> bool:
    diff = np.abs(grey_levels(a) - grey_levels(b))
    return diff.mean() < MEAN_TOLERANCE and np.percentile(diff, 99) < P99_TOLERANCE


def large_jpeg(source_png: Path, folder: Path) -> Path:
    """A real NIH radiograph resized (LANCZOS) to MIMIC-CXR-JPG's size and saved as JPEG quality 95."""
    path = folder / (source_png.stem + ".jpg")
    with Image.open(source_png) as image:
        image.convert("L").resize(MIMIC_SIZE, Image.Resampling.LANCZOS).save(path, format="JPEG", quality=95)
    return path


def source_paths(column) -> list:
    """File paths of an `Image()` column (or lists of them for `List(Image())`), read without decoding."""
    def path(value):
        return value["path"] if isinstance(value, dict) else [v["path"] for v in value]

    return [path(value) for value in column]


def undecoded(dataset: Dataset, column: str):
    feature = dataset.features[column]
    inner = ImageFeature(decode=False)
    return dataset.cast_column(column, inner if isinstance(feature, ImageFeature) else type(feature)(inner))[column]


@pytest.fixture
def nih_fullres(need_shared_data, tmp_path):
    """The 24 NIH originals through the real builder: their label rows (the sample's Data_Entry_2017.csv) beside
    the full-resolution images; rows whose image is not among the 24 are skipped."""
    root = need_shared_data(FULLRES, "nih_chestxray14_sample/Data_Entry_2017.csv",
                            why="the NIH ChestX-ray14 originals at 1024 x 1024")
    folder = tmp_path / "nih_fullres"
    folder.mkdir()
    os.symlink(root / FULLRES, folder / "images")
    os.symlink(root / "nih_chestxray14_sample" / "Data_Entry_2017.csv", folder / "Data_Entry_2017.csv")
    with pytest.warns(UserWarning):  # the empty validation / test splits and the classes without positives
        data = load_nih_chestxray14(folder, split_dir=root / "splits" / "nih_chestxray14", skip_invalid=True,
                                    verify_images=False)
    assert len(data["train"]) == 24
    return data


@pytest.fixture(scope="module")
def covid_studies(shared_data_dir):
    data = load_covid19_studies(shared_data_dir / "covid19_collection", verify_images=False)
    return DatasetDict({"train": data["train"].select(range(4)), "validation": data["validation"].select(range(2)),
                        "test": data["test"].select(range(2))})


# ----------------------------------------------------------------------------------------------- JPEG draft()
def test_jpeg_draft_decodes_at_a_smaller_scale_then_the_usual_resize(need_shared_data, tmp_path, monkeypatch):
    root = need_shared_data(f"{FULLRES}/00000001_000.png", why="a real full-resolution radiograph")
    png = root / FULLRES / "00000001_000.png"
    jpeg = large_jpeg(png, tmp_path)
    p = RefersImageProcessor()  # 256 x 256, crop 224

    assert jpeg_draft_size(p.size) == (256, 256)
    assert jpeg_draft_size({"height": 300, "width": 200}) == (200, 300)
    assert jpeg_draft_size({"shortest_edge": 400}) == (400, 400)
    assert jpeg_draft_size({"max_height": 300, "max_width": 300}) is None  # no lower bound: decoded at full size

    full = p.process_image(str(jpeg))
    assert full.shape == (1, 3000, 2500)
    drafted = p.process_image(str(jpeg), do_jpeg_draft=True, do_resize=True, size=p.size)
    assert drafted.shape == (1, 375, 313)  # 1/8: ceil(3000 / 8), ceil(2500 / 8), both still >= 256
    # 400 x 400: 2500 // 400 = 6, so 1/4 (1/8 would give 313 < 400)
    assert p.process_image(str(jpeg), do_jpeg_draft=True, do_resize=True,
                           size=SizeDict(height=400, width=400)).shape == (1, 750, 625)
    # shortest edge: the drafted image (625 x 750) is brought to the size the resize gives the full decode,
    # 400 x int(400 * 3000 / 2500), not int(400 * 750 / 625) = 479 (the draft rounds its sides up)
    assert p.process_image(str(jpeg), do_jpeg_draft=True, do_resize=True,
                           size=SizeDict(shortest_edge=400)).shape == (1, 480, 400)
    # no resize, no draft: the image must keep its size
    assert p.process_image(str(jpeg), do_jpeg_draft=True, do_resize=False, size=p.size).shape == full.shape
    # a PIL JPEG not yet loaded is drafted; a loaded one is used as it is
    assert p.process_image(Image.open(jpeg), do_jpeg_draft=True, do_resize=True, size=p.size).shape == drafted.shape
    loaded = Image.open(jpeg)
    loaded.load()
    assert p.process_image(loaded, do_jpeg_draft=True, do_resize=True, size=p.size).shape == full.shape

    # the drafted image still goes through the processor's resize (spy), to the same output shape
    seen = []
    resize = RefersImageProcessor.resize

    def spy(self, image, *args, **kwargs):
        seen.append(image.shape)
        return resize(self, image, *args, **kwargs)

    monkeypatch.setattr(RefersImageProcessor, "resize", spy)
    with_draft = p(str(jpeg), return_tensors="np")["pixel_values"]
    without = p(str(jpeg), do_jpeg_draft=False, return_tensors="np")["pixel_values"]
    assert seen == [(1, 375, 313), (1, 3000, 2500)]
    assert with_draft.shape == without.shape == (1, 3, 224, 224)

    # PNG: draft() does not apply, identical pixels either way
    np.testing.assert_array_equal(p(str(png), return_tensors="np")["pixel_values"],
                                  p(str(png), do_jpeg_draft=False, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("name", ["00000001_000", "00000004_000"])  # 00000004_000 is the RGBA original
def test_jpeg_draft_output_is_close_to_the_full_decode(need_shared_data, tmp_path, name):
    root = need_shared_data(f"{FULLRES}/{name}.png", why="a real full-resolution radiograph")
    jpeg = large_jpeg(root / FULLRES / f"{name}.png", tmp_path)
    for size in ({"height": 256, "width": 256}, {"shortest_edge": 256}):
        p = RefersImageProcessor(size=size)
        with_draft = p(str(jpeg), return_tensors="np")["pixel_values"]
        without = p(str(jpeg), do_jpeg_draft=False, return_tensors="np")["pixel_values"]
        assert with_draft.shape == without.shape == (1, 3, 224, 224)
        # 1/8 DCT-domain scaling + bilinear 313 -> 256 vs one bilinear 2500 -> 256: two antialiased downscales that
        # agree on smooth anatomy and differ at sharp edges (borders, markers): small mean, bounded tail
        assert within_tolerance(with_draft, without), size
        # the tolerance catches a one-pixel misalignment
        assert not within_tolerance(np.roll(without, 1, axis=-1), without)
    # against an independent high-quality reference (PIL LANCZOS from the full decode, centre 224 of 256 x 256)
    with Image.open(jpeg) as image:
        reference = np.asarray(image.convert("L").resize((256, 256), Image.Resampling.LANCZOS), np.float64)
    reference = reference[16:240, 16:240]
    drafted = grey_levels(RefersImageProcessor()(str(jpeg), return_tensors="np")["pixel_values"][0, 0])
    assert np.abs(drafted - reference).mean() < 2.0  # measured 0.9-1.3 (the full decode: 0.5-0.6)


# ------------------------------------------------------------------------------------------ prepared studies
def test_prepared_studies_keep_rows_and_bring_the_short_side_down(covid_studies, tmp_path):
    prepared = prepare_images(covid_studies, tmp_path / "covid-128", short_side=128)
    assert list(prepared) == list(covid_studies)
    assert prepared["train"].features == covid_studies["train"].features
    for split in covid_studies:
        source, out = covid_studies[split], prepared[split]
        for column in ("study_id", "patient_id", "view_positions", "report"):
            assert list(out[column]) == list(source[column]), (split, column)
        for paths, images in zip(source_paths(undecoded(source, "images")), out["images"]):
            assert len(images) == len(paths)
            for path, image in zip(paths, images):
                with Image.open(path) as original:
                    width, height = original.size
                short, long = min(width, height), max(width, height)
                expected_long = int(128 * long / short)  # transformers' shortest_edge rounding
                assert image.mode == "L" and image.format == "PNG"
                assert min(image.size) == 128 and max(image.size) == expected_long
                assert (image.width < image.height) == (width < height)  # orientation kept

    # the processor gives the same pixels from prepared images as from the original files: exactly, when it runs
    # the same operations (shortest edge 128, JPEG draft); for the paper's square resize of full decodes, within
    # the tolerance of two antialiased downscales
    studies = [list(views) for views in source_paths(undecoded(covid_studies["train"], "images"))]
    prepared_studies = [list(views) for views in prepared["train"]["images"]]
    small = {"crop_size": {"height": 112, "width": 112}}
    p = RefersImageProcessor(size={"shortest_edge": 128}, **small)
    np.testing.assert_array_equal(p(prepared_studies, return_tensors="np")["pixel_values"],
                                  p(studies, return_tensors="np")["pixel_values"])
    square = RefersImageProcessor(size={"height": 128, "width": 128}, **small)
    from_prepared = square(prepared_studies, return_tensors="np")
    from_originals = square(studies, do_jpeg_draft=False, return_tensors="np")
    assert from_prepared["view_mask"].tolist() == from_originals["view_mask"].tolist()
    assert within_tolerance(from_prepared["pixel_values"], from_originals["pixel_values"])


def test_images_at_or_below_the_short_side_are_kept_pixel_for_pixel(covid_studies, tmp_path):
    prepared = prepare_images(covid_studies["validation"], tmp_path / "covid-300", short_side=300)  # sources: 256
    assert list(prepared) == ["validation"]
    for paths, images in zip(source_paths(undecoded(covid_studies["validation"], "images")),
                             prepared["validation"]["images"]):
        for path, image in zip(paths, images):
            with Image.open(path) as original:  # PIL's own decode of the original JPEG: the reference
                np.testing.assert_array_equal(np.asarray(image), np.asarray(original.convert("L")))


# ------------------------------------------------------------------------------------ NIH originals, resumable
def test_prepared_nih_originals_match_pils_resize_and_keep_labels(nih_fullres, tmp_path, monkeypatch):
    out_dir = tmp_path / "nih-256"
    prepared = prepare_images(nih_fullres, out_dir, short_side=256, num_proc=2,
                              source={"dataset_name": "nih_chestxray14"})
    source, out = nih_fullres["train"], prepared["train"]
    for column in ("image_id", "patient_id", "labels"):
        assert list(out[column]) == list(source[column])
    assert [len(prepared[s]) for s in ("validation", "test")] == [0, 0]  # empty splits survive the round trip
    paths = source_paths(undecoded(source, "image"))
    for path, image in zip(paths, out["image"]):
        with Image.open(path) as original:  # 1024 x 1024 "L" (one "RGBA" with equal channels) -> PIL's bilinear
            reference = original.convert("L").resize((256, 256), Image.Resampling.BILINEAR)
        assert image.mode == "L" and image.size == (256, 256)
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
    # the training transform from prepared images = from the originals (square images: the same bilinear resize)
    p = RefersImageProcessor()
    np.testing.assert_array_equal(p(list(out["image"][:6]), return_tensors="np")["pixel_values"],
                                  p(paths[:6], return_tensors="np")["pixel_values"])
    metadata = read_prepared_metadata(out_dir)
    assert metadata["short_side"] == 256 and metadata["image_format"] == "PNG"
    assert metadata["source"] == {"dataset_name": "nih_chestxray14"}
    assert metadata["splits"]["train"] == {"num_rows": 24, "source_fingerprint": source._fingerprint}
    assert len(load_prepared_dataset(out_dir, min_short_side=256, dataset_name="nih_chestxray14")["train"]) == 24
    with pytest.raises(ValueError, match=rf"{out_dir}: prepared at a short side of 256 px.*resized to 293 px"):
        load_prepared_dataset(out_dir, min_short_side=293)  # processor_sizes(256): 293 x 293
    with pytest.raises(ValueError, match="prepared from the data set 'nih_chestxray14', not 'vinbigdata'"):
        load_prepared_dataset(out_dir, dataset_name="vinbigdata")

    # a second call is a no-op: nothing decoded, no file rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")}

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr(prepared_images._ImagePreparer, "prepare_one", no_decoding)
    again = prepare_images(nih_fullres, out_dir, short_side=256)
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == stamps
    assert list(again["train"]["image_id"]) == list(source["image_id"])


def _copied_covid_rows(shared_data_dir, folder: Path, n: int) -> Dataset:
    """n COVID-collection images copied to `folder`, as a builder's in-memory rows (path columns, ClassLabel)."""
    folder.mkdir()
    paths = []
    for path in sorted((shared_data_dir / "covid19_collection" / "images").glob("*.jpg"))[:n]:
        paths.append(str(shutil.copy(path, folder / path.name)))
    return Dataset.from_dict({"image_id": [Path(p).name for p in paths], "patient_id": [str(i) for i in range(n)],
                              "image": paths, "labels": [i % 2 for i in range(n)]},
                             features=single_label_features(COVID_LABEL_NAMES), split="train")


def test_an_interrupted_preparation_resumes_from_its_finished_chunks(shared_data_dir, tmp_path, monkeypatch):
    rows = _copied_covid_rows(shared_data_dir, tmp_path / "images", 6)
    broken = Path(rows.cast_column("image", ImageFeature(decode=False))[4]["image"]["path"])
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 3])  # a truncated copy of a real file: the run stops there
    out_dir = tmp_path / "prepared"
    with pytest.raises(OSError, match=broken.name):
        prepare_images(rows, out_dir, short_side=128, rows_per_chunk=2)
    work = tmp_path / "prepared.incomplete"
    assert not out_dir.exists()
    assert sorted(p.name for p in (work / "train").glob("chunk-*.arrow")) == ["chunk-00000.arrow", "chunk-00001.arrow"]
    with pytest.raises(FileNotFoundError, match="interrupted preparation"):
        load_prepared_dataset(out_dir)

    broken.write_bytes(good_bytes)
    decoded = []
    prepare_one = prepared_images._ImagePreparer.prepare_one

    def counting(self, value):
        decoded.append(value["path"])
        return prepare_one(self, value)

    monkeypatch.setattr(prepared_images._ImagePreparer, "prepare_one", counting)
    resumed = prepare_images(rows, out_dir, short_side=128, rows_per_chunk=2)
    assert [Path(p).name for p in decoded] == list(rows["image_id"][4:])  # only the unfinished chunk
    assert not work.exists()
    fresh = prepare_images(rows, tmp_path / "fresh", short_side=128, rows_per_chunk=6)
    for a, b in zip(undecoded(resumed["train"], "image"), undecoded(fresh["train"], "image")):
        assert a["bytes"] == b["bytes"] and a["path"] == b["path"]
    assert list(resumed["train"]["labels"]) == list(rows["labels"])

    # another short side: an existing prepared folder is refused, naming what differs, or replaced on request
    with pytest.raises(FileExistsError, match=r"short_side: 128 there, 100 asked"):
        prepare_images(rows, out_dir, short_side=100)
    decoded.clear()
    replaced = prepare_images(rows, out_dir, short_side=100, overwrite=True)
    assert len(decoded) == 6 and read_prepared_metadata(out_dir)["short_side"] == 100
    assert all(min(image.size) == 100 for image in replaced["train"]["image"])

    # a leftover interrupted folder made with other settings is not reused: the work starts over
    broken.write_bytes(good_bytes[: len(good_bytes) // 3])
    with pytest.raises(OSError):
        prepare_images(rows, tmp_path / "other", short_side=128, rows_per_chunk=2)
    broken.write_bytes(good_bytes)
    decoded.clear()
    prepare_images(rows, tmp_path / "other", short_side=64, rows_per_chunk=2)
    assert len(decoded) == 6


# ---------------------------------------------------------------------------------------------- one image
def _preparer(short_side: int, list_columns=()) -> "prepared_images._ImagePreparer":
    columns = ["images"] if list_columns else ["image"]
    return prepared_images._ImagePreparer(columns, list(list_columns), short_side, "PNG", 95, True)


def test_an_image_given_as_bytes_is_prepared_like_its_file(shared_data_dir):
    png = shared_data_dir / "nih_chestxray14_sample" / "images" / "00000001_000.png"  # 64 x 64 "L"
    jpeg = shared_data_dir / "covid19_collection" / "images" / "000001-12.jpg"  # 265 x 256 "L"
    preparer = _preparer(32)
    for path in (png, jpeg):
        from_bytes = preparer.prepare_one({"bytes": path.read_bytes(), "path": None})
        from_file = preparer.prepare_one({"bytes": None, "path": str(path)})
        assert from_bytes["path"] is None  # no file name to keep
        assert from_file["path"] == path.name  # the file's name, not its folder
        assert from_bytes["bytes"] == from_file["bytes"]  # the same PNG either way (JPEG drafted either way)
        with Image.open(path) as original:
            width, height = original.size
        with Image.open(io.BytesIO(from_bytes["bytes"])) as image:
            assert image.format == "PNG" and image.mode == "L"
            # short side 32, long side int(32 * long / short): 64 x 64 -> 32 x 32, 265 x 256 -> 33 x 32
            assert image.size == (int(32 * width / height), 32)
            if path == png:  # a square PNG: PIL's own bilinear resize of the file is the reference
                with Image.open(png) as original:
                    reference = original.convert("L").resize((32, 32), Image.Resampling.BILINEAR)
                np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))


def test_an_unreadable_image_is_named_in_the_error(shared_data_dir):
    good = (shared_data_dir / "covid19_collection" / "images" / "000001-12.jpg").read_bytes()
    preparer = _preparer(32)
    for data in (b"not an image at all", good[: len(good) // 3]):  # not an image; a truncated real JPEG
        with pytest.raises(OSError, match="^preparing image an image given as bytes: "):
            preparer.prepare_one({"bytes": data, "path": None})
        with pytest.raises(OSError, match="^preparing image some/folder/broken.jpg: "):
            preparer.prepare_one({"bytes": data, "path": "some/folder/broken.jpg"})
    with pytest.raises(ValueError, match="neither 'bytes' nor 'path'"):
        preparer.prepare_one({"bytes": None, "path": None})


def test_a_study_without_views_stays_none_beside_prepared_studies(shared_data_dir):
    paths = [str(p) for p in sorted((shared_data_dir / "covid19_collection" / "images").glob("*.jpg"))[:3]]
    studies = [[{"bytes": None, "path": paths[0]}, {"bytes": None, "path": paths[1]}], None,
               [{"bytes": None, "path": paths[2]}]]
    preparer = _preparer(32, list_columns=["images"])
    out = preparer(studies)
    assert list(out) == ["images"] and out["images"][1] is None
    assert [[v["path"] for v in views] for views in (out["images"][0], out["images"][2])] == \
        [[Path(paths[0]).name, Path(paths[1]).name], [Path(paths[2]).name]]
    for views, prepared in ((studies[0], out["images"][0]), (studies[2], out["images"][2])):
        for view, image in zip(views, prepared):  # each view as prepare_one prepares it alone
            assert image["bytes"] == preparer.prepare_one(view)["bytes"]
            with Image.open(io.BytesIO(image["bytes"])) as decoded:
                assert min(decoded.size) == 32


# --------------------------------------------------------------------------------------------------- errors
def test_bad_folders_and_arguments_are_named(covid_studies, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_prepared_dataset(tmp_path / "missing")
    plain = tmp_path / "plain"
    covid_studies.save_to_disk(str(plain))  # a datasets folder, but not a prepared one
    with pytest.raises(NotAPreparedDatasetError, match=rf"{plain}.*{PREPARED_METADATA_FILE}"):
        load_prepared_dataset(plain)
    with pytest.raises(FileExistsError, match=rf"{plain}: exists, is not empty"):
        prepare_images(covid_studies, plain)
    (plain / PREPARED_METADATA_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(NotAPreparedDatasetError, match="something else"):
        load_prepared_dataset(plain)
    (plain / PREPARED_METADATA_FILE).write_text("{not json")
    with pytest.raises(NotAPreparedDatasetError, match="unreadable"):
        load_prepared_dataset(plain)
    assert isinstance(load_from_disk(str(plain)), DatasetDict)  # nothing of the folder was touched

    with pytest.raises(ValueError, match=r"image_columns \['report'\].*\['images'\]"):
        prepare_images(covid_studies, tmp_path / "x", image_columns=["report"])
    with pytest.raises(ValueError, match="short_side"):
        prepare_images(covid_studies, tmp_path / "x", short_side=0)
    with pytest.raises(ValueError, match="image_format"):
        prepare_images(covid_studies, tmp_path / "x", image_format="WEBP")
    boxed = covid_studies["test"].add_column("boxes", [[] for _ in range(len(covid_studies["test"]))])
    with pytest.raises(ValueError, match="'boxes'"):
        prepare_images(boxed, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------ CLI
def test_prepare_images_cli_on_a_target_data_set(shared_data_dir, tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import prepare_images as cli
    finally:
        sys.path.remove(str(EXAMPLES))
    data_dir = shared_data_dir / "covid19_collection"
    out_dir = tmp_path / "covid19_viral_bacterial-64"
    argv = ["--dataset_name", "covid19_viral_bacterial", "--data_dir", str(data_dir), "--output_dir", str(out_dir),
            "--short_side", "64", "--num_proc", "2", "--no_verify_images"]
    prepared = cli.main(argv)
    source = load_target_dataset("covid19_viral_bacterial", data_dir, verify_images=False)
    assert {k: len(v) for k, v in prepared.items()} == {k: len(v) for k, v in source.items()}
    for split in source:
        assert list(prepared[split]["image_id"]) == list(source[split]["image_id"])
        assert list(prepared[split]["labels"]) == list(source[split]["labels"])
    assert prepared["train"].features == source["train"].features
    assert all(min(image.size) == 64 for image in prepared["test"]["image"])
    assert read_prepared_metadata(out_dir)["source"]["dataset_name"] == "covid19_viral_bacterial"
    assert list(cli.main(argv)["train"]["image_id"]) == list(source["train"]["image_id"])  # second run: no-op
    with pytest.raises(SystemExit):
        cli.main(["--dataset_name", "covid19", "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(out_dir)])


def test_fixed_length_studies_and_per_split_shards_are_kept(shared_data_dir, tmp_path):
    """A `List(Image(), length=2)` column keeps its fixed length, and `num_shards={split: n}` gives each split its
    own number of Arrow files (counted in the saved folder)."""
    from datasets import Features, List, Value

    jpegs = sorted((shared_data_dir / "covid19_collection" / "images").glob("*.jpg"))[:12]
    features = Features({"study_id": Value("string"), "images": List(ImageFeature(), length=2)})

    def split(start, count):
        return Dataset.from_dict({"study_id": [f"s{start + i}" for i in range(count)],
                                  "images": [[str(jpegs[2 * (start + i)]), str(jpegs[2 * (start + i) + 1])]
                                             for i in range(count)]}, features=features)

    prepared = prepare_images(DatasetDict({"train": split(0, 4), "validation": split(4, 2)}), tmp_path / "fixed",
                              short_side=64, num_shards={"train": 2, "validation": 1})
    for name in ("train", "validation"):
        assert prepared[name].features["images"].length == 2
        assert all(len(views) == 2 for views in prepared[name]["images"])
    counts = {name: len(list((tmp_path / "fixed" / name).glob("*.arrow"))) for name in ("train", "validation")}
    assert counts == {"train": 2, "validation": 1}
