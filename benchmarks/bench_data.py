"""Data path vs model: can the input pipeline keep up with training?

Data: images/s delivered by the Trainer's own train dataloader (`Trainer.get_train_dataloader()`, 2 workers by
default): `datasets.Image()` decodes the real JPEGs of the COVID-19 image collection (shorter side 256, as
shipped) and a collator runs `RefersImageProcessor` in training mode (resize 256, rotation, random crop 224,
flip, brightness/contrast, normalise). `--upscale N` first writes copies resized to a shorter side of N px
(e.g. 1024, the size of NIH ChestX-ray14 PNGs) to measure heavier decoding.

Model: images/s of `RefersForImageClassification` (ViT-B/16, 224) training steps (forward, backward, SGD with
momentum) on the same machine, batch `--batch_size`.

The report gives both rates and `data_to_model_ratio` (> 1: the data path is not the bottleneck). The two are
measured one after the other, not concurrently; during real training the workers share the cores with the
model, which the ratio does not capture.

    python benchmarks/bench_data.py --batch_size 16 --batches 24 --train_steps 3 [--upscale 1024] [--output r.json]

`--mode fullres`: images/s PER CORE on real full-resolution radiographs, each to the 224-px training tensor with the
training augmentations (`RefersImageProcessor`, `do_train_augment=True`: resize 256 x 256, rotation, random crop,
flip, brightness/contrast, normalise):
  (a) the 24 NIH ChestX-ray14 originals (1024 x 1024 PNG, ../shared/data/nih_chestxray14_fullres) decoded by
      `datasets.Image()` from the builder's rows, as training without preparation does;
  (b) JPEG copies of the same 24 radiographs resized (LANCZOS) to MIMIC-CXR-JPG's 2,500 x 3,000 and saved at quality
      95 in a temporary folder (the real full-resolution files are PNG, where `draft()` does nothing), decoded from
      their paths with and without `do_jpeg_draft`;
  (c) data sets prepared from (a) and from (b) at a short side of 256 (`datasets_scripts.prepared_images`, PNG),
      read back from their Arrow shards.
Per core: one process, one torch thread, in the main process: images per CPU-second of that process (the per-core
rate, robust to other jobs on the machine) and its wall-clock images/s; and (a) / (c) again through the Trainer's
own dataloader with `--workers` workers, whose wall-clock images/s divided by the workers is given too (the
workers share the machine's cores with anything else running: see `load_average`). Also the one-time preparation
rate (images/s, one process) of the JPEG copies with and without `draft()`, the ViT-B/16 training rate measured in the same run, each
path's ratio to it, and the cores each path needs to feed `--target_model_rate` (1,500 images/s: one H100).

    python benchmarks/bench_data.py --mode fullres --batch_size 16 --batches 6 --train_steps 2 [--output r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

import datasets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets_scripts import SAMPLE_DATA_DIR, load_covid19_collection, load_nih_chestxray14  # noqa: E402
from modeling_refers.training.augmentation import RadiographTrainTransform  # noqa: E402
from modeling_refers.file_utils import atomic_write_json  # noqa: E402
from datasets_scripts.prepared_images import prepare_images  # noqa: E402
from modeling_refers import RefersConfig, RefersForImageClassification, RefersImageProcessor  # noqa: E402


class TrainCollator:
    """Examples `{"image": PIL, "labels": int}` -> `pixel_values` `(B, 3, 224, 224)`, `labels` `(B,)`, with the
    processor's training augmentation. Runs inside the dataloader workers; each worker seeds its own generator
    from torch's per-worker seed."""

    def __init__(self, processor: RefersImageProcessor):
        self.processor = processor
        self._rng = None

    def __call__(self, examples):
        if self._rng is None:
            self._rng = np.random.default_rng(torch.initial_seed() % 2**32)
        batch = self.processor(
            images=[e["image"] for e in examples], do_train_augment=True, train_transform=RadiographTrainTransform(),
            generator=self._rng, return_tensors="pt"
        )
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch


def shared_data_dir() -> Path:
    env = os.environ.get("REFERS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def default_data_dir() -> Path:
    shared = shared_data_dir()
    return shared / "covid19_collection" if (shared / "covid19_collection").is_dir() else SAMPLE_DATA_DIR / "covid19_collection"


def upscaled_copy(dataset: datasets.Dataset, shorter_side: int, folder: Path) -> datasets.Dataset:
    """The same rows with images re-saved (LANCZOS, JPEG quality 90) at `shorter_side` px."""
    paths = [item["path"] for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    new_paths = []
    for path in paths:
        image = PIL.Image.open(path).convert("L")
        scale = shorter_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.Resampling.LANCZOS)
        target = folder / Path(path).name
        image.save(target, format="JPEG", quality=90)
        new_paths.append(str(target))
    return dataset.cast_column("image", datasets.Image(decode=False)).map(
        lambda _, i: {"image": {"path": new_paths[i], "bytes": None}}, with_indices=True
    ).cast_column("image", datasets.Image())


def data_throughput(trainer, batches: int) -> dict:
    loader = trainer.get_train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)  # includes worker start-up
    startup = time.perf_counter() - start
    assert first["pixel_values"].shape[1:] == (3, 224, 224), first["pixel_values"].shape
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        count += len(next(iterator)["labels"])
    elapsed = time.perf_counter() - start
    return {"images_per_s": count / elapsed, "images": count, "seconds": elapsed, "startup_s": startup}


def model_throughput(model, batch_size: int, steps: int, device: str) -> dict:
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=3e-3, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=generator).to(device)
    labels = torch.randint(0, model.config.num_labels, (batch_size,), generator=generator).to(device)

    def step():
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / elapsed, "steps": steps, "seconds": elapsed}


# ------------------------------------------------------------------------------------ --mode fullres
MIMIC_SIZE = (2500, 3000)  # width, height of a typical MIMIC-CXR-JPG radiograph


def nih_fullres_rows(shared: Path, folder: Path) -> datasets.Dataset:
    """The 24 NIH originals as the builder's rows (their label rows are in the sample's Data_Entry_2017.csv)."""
    images = shared / "nih_chestxray14_fullres" / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: the NIH ChestX-ray14 originals are needed (../shared/data or "
                                "REFERS_SHARED_DATA)")
    folder.mkdir(parents=True)
    os.symlink(images, folder / "images")
    os.symlink(shared / "nih_chestxray14_sample" / "Data_Entry_2017.csv", folder / "Data_Entry_2017.csv")
    import logging
    import warnings

    logging.getLogger("datasets_scripts").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty validation / test splits: only the 24 originals are here
        return load_nih_chestxray14(folder, split_dir=shared / "splits" / "nih_chestxray14", skip_invalid=True,
                                    verify_images=False)["train"]


def mimic_like_jpegs(paths: list[str], folder: Path) -> list[str]:
    """JPEG copies (quality 95, as MIMIC-CXR-JPG) of real radiographs resized (LANCZOS) to 2,500 x 3,000."""
    folder.mkdir(parents=True)
    out = []
    for path in paths:
        target = folder / (Path(path).stem + ".jpg")
        with PIL.Image.open(path) as image:
            image.convert("L").resize(MIMIC_SIZE, PIL.Image.Resampling.LANCZOS).save(target, format="JPEG", quality=95)
        out.append(str(target))
    return out


def per_core_rate(get_image, count: int, processor, batch_size: int, batches: int) -> dict:
    """Images per CPU-second of one process (one torch thread) and its wall-clock images/s: `get_image(i)` (decode)
    + the processor's training transform, in batches of `batch_size` cycling through `count` images, after one
    warm-up batch. Images per CPU-second is the per-core rate: it does not drop when other jobs share the cores
    (the wall-clock rate does; on a quiet machine the two agree)."""
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run(batch_index):
            images = [get_image((batch_index * batch_size + k) % count) for k in range(batch_size)]
            out = processor(images=images, do_train_augment=True, train_transform=RadiographTrainTransform(), generator=rng,
                            return_tensors="pt")
            assert out["pixel_values"].shape == (batch_size, 3, 224, 224), out["pixel_values"].shape

        run(0)
        start_cpu, start = time.process_time(), time.perf_counter()
        for index in range(1, batches + 1):
            run(index)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        torch.set_num_threads(threads)
    images = batches * batch_size
    return {"images_per_cpu_s": round(images / cpu, 2), "images_per_s_wall": round(images / elapsed, 2),
            "images": images, "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3)}


def loader_rate(dataset: datasets.Dataset, processor, args, tmp: str) -> dict:
    """The Trainer's own train dataloader (`--workers` workers) over `dataset` (rows `image`, `labels`)."""
    from transformers import Trainer, TrainingArguments

    needed = args.batch_size * (args.batches + 2)
    dataset = datasets.concatenate_datasets([dataset] * -(-needed // len(dataset)))
    trainer = Trainer(
        model=torch.nn.Linear(1, 1),
        args=TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                               dataloader_num_workers=args.workers, remove_unused_columns=False, report_to=[],
                               use_cpu=True, seed=0),
        train_dataset=dataset,
        data_collator=TrainCollator(processor),
    )
    result = data_throughput(trainer, args.batches)
    workers = max(args.workers, 1)
    return {"images_per_s": round(result["images_per_s"], 2), "workers": args.workers,
            "images_per_s_per_worker": round(result["images_per_s"] / workers, 2),
            "images": result["images"], "seconds": round(result["seconds"], 3),
            "startup_s": round(result["startup_s"], 2)}


def fullres_main(args) -> dict:
    datasets.disable_progress_bars()
    processor = RefersImageProcessor()  # the paper's: 256 x 256, crop 224
    load_before = os.getloadavg()
    result = {"paths": {}, "loader": {}, "preparation": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nih = nih_fullres_rows(shared_data_dir(), tmp / "nih_fullres")
        nih_paths = [v["path"] for v in nih.cast_column("image", datasets.Image(decode=False))["image"]]
        jpeg_paths = mimic_like_jpegs(nih_paths, tmp / "mimic_like")
        jpegs = nih.cast_column("image", datasets.Image(decode=False)).map(
            lambda _, i: {"image": {"path": jpeg_paths[i], "bytes": None}}, with_indices=True
        ).cast_column("image", datasets.Image())
        n = len(nih)

        # one-time preparation, one process: the JPEG copies with and without draft(), the NIH PNGs
        prepared = {}
        for name, rows, draft in (("nih_png", nih, True), ("mimic_like_jpeg", jpegs, True),
                                  ("mimic_like_jpeg_no_draft", jpegs, False)):
            start = time.perf_counter()
            prepared[name] = prepare_images(rows, tmp / f"prepared-{name}", short_side=256, jpeg_draft=draft)["train"]
            elapsed = time.perf_counter() - start
            result["preparation"][name] = {"images_per_s": round(n / elapsed, 2), "images": n,
                                           "seconds": round(elapsed, 3), "jpeg_draft": draft}
        nbytes = [len(v["bytes"]) for v in prepared["mimic_like_jpeg"].cast_column(
            "image", datasets.Image(decode=False))["image"]]
        result["preparation"]["prepared_png_kib_per_image"] = round(sum(nbytes) / len(nbytes) / 1024, 1)
        result["preparation"]["prepared_sizes"] = sorted({im.size for im in prepared["mimic_like_jpeg"]["image"]})

        bs, nb = args.batch_size, args.batches
        paths = result["paths"]
        paths["a_nih_png_1024_datasets_decode"] = per_core_rate(lambda i: nih[i]["image"], n, processor, bs, nb)
        paths["b_mimic_like_jpeg_full_decode"] = per_core_rate(
            lambda i: jpeg_paths[i], n, RefersImageProcessor(do_jpeg_draft=False), bs, nb)
        paths["b_mimic_like_jpeg_draft"] = per_core_rate(lambda i: jpeg_paths[i], n, processor, bs, nb)
        paths["c_prepared_from_nih_png"] = per_core_rate(
            lambda i: prepared["nih_png"][i]["image"], n, processor, bs, nb)
        paths["c_prepared_from_mimic_like_jpeg"] = per_core_rate(
            lambda i: prepared["mimic_like_jpeg"][i]["image"], n, processor, bs, nb)
        result["draft_speedup"] = round(paths["b_mimic_like_jpeg_draft"]["images_per_cpu_s"]
                                        / paths["b_mimic_like_jpeg_full_decode"]["images_per_cpu_s"], 2)
        preparation = result["preparation"]
        result["draft_speedup_preparation"] = round(preparation["mimic_like_jpeg"]["images_per_s"]
                                                    / preparation["mimic_like_jpeg_no_draft"]["images_per_s"], 2)

        if args.workers:
            result["loader"]["a_nih_png_1024"] = loader_rate(nih, processor, args, str(tmp / "trainer"))
            result["loader"]["c_prepared_from_mimic_like_jpeg"] = loader_rate(
                prepared["mimic_like_jpeg"], processor, args, str(tmp / "trainer"))

    model = RefersForImageClassification(RefersConfig(num_labels=2, problem_type="single_label_classification"))
    compute = model_throughput(model, args.batch_size, args.train_steps, args.device)
    model_rate = compute["images_per_s"]
    for entry in result["paths"].values():
        rate = entry["images_per_cpu_s"]
        entry["ratio_to_model_per_core"] = round(rate / model_rate, 1)
        entry["cores_for_target_model_rate"] = round(args.target_model_rate / rate, 1)
        entry["meets_100_per_core"] = rate >= 100
    result["model_train_images_per_s"] = round(model_rate, 3)
    result["model"] = compute
    result["settings"] = {
        "mode": "fullres", "batch_size": args.batch_size, "batches": args.batches, "workers": args.workers,
        "device": args.device, "torch_threads_model": torch.get_num_threads(), "torch_threads_data": 1,
        "cpu_count": os.cpu_count(), "target_model_rate": args.target_model_rate,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "jpeg_copies": f"24 NIH originals resized (LANCZOS) to {MIMIC_SIZE[0]} x {MIMIC_SIZE[1]}, JPEG quality 95, "
                       "in a temporary folder",
        "torch": torch.__version__, "pillow": PIL.__version__, "datasets": datasets.__version__,
        "python": platform.python_version(),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", type=Path, default=default_data_dir())
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=24, help="timed batches (after the first)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train_steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--upscale", type=int, default=None, help="re-save images with this shorter side first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--mode", choices=("dataloader", "fullres"), default="dataloader",
                        help="dataloader: the Trainer dataloader on the COVID-19 collection (above); fullres: images/s "
                             "per core on full-resolution originals, with draft(), and from prepared shards")
    parser.add_argument("--target_model_rate", type=float, default=1500.0,
                        help="--mode fullres: a model's training images/s to feed (default: one H100, ViT-B/16)")
    args = parser.parse_args()
    if args.mode == "fullres":
        result = fullres_main(args)
        print(json.dumps(result, indent=1))
        if args.output is not None:
            atomic_write_json(args.output, result)
        return

    from transformers import Trainer, TrainingArguments

    datasets.disable_progress_bars()
    train = load_covid19_collection(args.data_dir, task="covid")["train"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.upscale:
            train = upscaled_copy(train, args.upscale, Path(tmp))
        needed = args.batch_size * (args.batches + 2)
        train = datasets.concatenate_datasets([train] * -(-needed // len(train)))
        model = RefersForImageClassification(
            RefersConfig(num_labels=2, problem_type="single_label_classification")
        )
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=args.batch_size, dataloader_num_workers=args.workers,
                remove_unused_columns=False, report_to=[], use_cpu=args.device == "cpu", seed=0,
            ),
            train_dataset=train,
            data_collator=TrainCollator(RefersImageProcessor()),
        )
        data = data_throughput(trainer, args.batches)
        del trainer
        compute = model_throughput(model, args.batch_size, args.train_steps, args.device)
        sizes = [min(im.size) for im in train.select(range(8))["image"]]
    result = {
        "data_images_per_s": round(data["images_per_s"], 2),
        "model_train_images_per_s": round(compute["images_per_s"], 3),
        "data_to_model_ratio": round(data["images_per_s"] / compute["images_per_s"], 1),
        "data": data,
        "model": compute,
        "settings": {
            "batch_size": args.batch_size, "dataloader_num_workers": args.workers, "device": args.device,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "upscale": args.upscale,
            "image_shorter_sides_seen": sorted(set(sizes)), "data_dir": str(args.data_dir),
            "torch": torch.__version__, "python": platform.python_version(),
        },
    }
    print(json.dumps(result, indent=1))
    if args.output is not None:
        atomic_write_json(args.output, result)


if __name__ == "__main__":
    main()
