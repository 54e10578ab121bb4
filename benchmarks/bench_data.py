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

from datasets_scripts import SAMPLE_DATA_DIR, load_covid19_collection  # noqa: E402
from datasets_scripts.common import atomic_write_json  # noqa: E402
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
            images=[e["image"] for e in examples], do_train_augment=True, generator=self._rng, return_tensors="pt"
        )
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch


def default_data_dir() -> Path:
    env = os.environ.get("REFERS_SHARED_DATA")
    shared = Path(env) if env else REPO.parent / "shared" / "data"
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
    args = parser.parse_args()

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
