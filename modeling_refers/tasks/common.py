"""Pieces shared by the downstream tools (report generation, retrieval, zero-shot, explanations): loading a local
checkpoint folder with errors that name the argument, batching with a progress bar, saving figures atomically."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..file_utils import atomic_open


def check_model_folder(path: str | os.PathLike, argument: str = "--model_name_or_path") -> Path:
    """`path` as a Path when it is a local transformers folder (config.json inside); else FileNotFoundError naming
    `argument`, the path and what was expected. Nothing is downloaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{argument} {os.fspath(path)!r}: no such folder ({folder.absolute()}); expected a "
                                "local REFERS checkpoint folder (config.json + model.safetensors)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{argument} {os.fspath(path)!r} has no config.json; expected a REFERS checkpoint "
                                "folder written by save_pretrained (e.g. the --output_dir of run_pretrain.py)")
    return folder


def load_pretraining_folder(
    path: str | os.PathLike, *, need_text_encoder: bool = False, need_decoder: bool = False,
    argument: str = "--model_name_or_path",
):
    """`(RefersForPreTraining in eval mode, RefersProcessor, report tokenizer)` from a run_pretrain.py folder.

    The report tokenizer is the decoder's own vocabulary (`<folder>/report_tokenizer/`) when the run trained one,
    else the processor's tokenizer. Raises ValueError naming `argument` when the checkpoint lacks the report
    encoder (`need_text_encoder`) or the report decoder (`need_decoder`).
    """
    from transformers import AutoTokenizer

    from ..modeling_refers import RefersForPreTraining
    from ..processing_refers import RefersProcessor

    folder = check_model_folder(path, argument)
    model = RefersForPreTraining.from_pretrained(folder).eval()
    if need_text_encoder and model.text_encoder is None:
        raise ValueError(f"{argument} {os.fspath(path)!r}: this checkpoint has no report encoder "
                         "(use_study_report_consistency=False); retrieval and zero-shot need one")
    if need_decoder and model.report_decoder is None:
        raise ValueError(f"{argument} {os.fspath(path)!r}: this checkpoint has no report decoder "
                         "(use_report_generation=False); report generation needs one")
    if not (folder / "processor_config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{argument} {os.fspath(path)!r} has no processor (processor_config.json / tokenizer "
                                "files); save the RefersProcessor beside the model (run_pretrain.py does)")
    processor = RefersProcessor.from_pretrained(folder)
    report_dir = folder / "report_tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(report_dir) if (report_dir / "tokenizer_config.json").is_file() else (
        processor.tokenizer)
    return model, processor, tokenizer


def add_source_split_arguments(parser) -> None:
    """The arguments that pick held-out studies with reports (run_generate.py, run_retrieval.py): --dataset_name,
    --data_dir (default: the sample's COVID-19 studies), --image_dir (iu_xray), --split, --max_samples."""
    from datasets_scripts import SAMPLE_DATA_DIR, SOURCE_DATASETS

    parser.add_argument("--dataset_name", default="covid19_studies", choices=sorted(SOURCE_DATASETS))
    parser.add_argument("--data_dir", default=str(SAMPLE_DATA_DIR / "covid19_collection"))
    parser.add_argument("--image_dir", default=None, help="iu_xray only: the PNG image folder.")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--max_samples", type=int, default=None)


def load_source_split(args, min_studies: int, purpose: str):
    """The `datasets.Dataset` of studies that `add_source_split_arguments` picked (the first `--max_samples`); a
    ValueError naming the split when it has fewer than `min_studies` (what `purpose` needs)."""
    from datasets_scripts import load_source_dataset

    extra = {"image_dir": args.image_dir} if args.dataset_name == "iu_xray" else {}
    rows = load_source_dataset(args.dataset_name, args.data_dir, **extra)[args.split]
    if args.max_samples:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    if len(rows) < min_studies:
        raise ValueError(f"--split {args.split} of {args.dataset_name} at {args.data_dir} has {len(rows)} studies; "
                         f"{purpose} needs at least {min_studies}")
    return rows


def batches(items: Sequence[Any], batch_size: int, desc: str) -> Iterator[list[Any]]:
    """Consecutive slices of `items` of at most `batch_size`, with a tqdm progress bar named `desc`."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        yield list(items[start : start + batch_size])


def new_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib Figure on the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return path


def grayscale(image: Any) -> np.ndarray:
    """A radiograph (path, PIL image, array) as a `(H, W)` uint8 array for display."""
    from ..radiograph_io import load_radiograph

    array = load_radiograph(image)
    return array if array.ndim == 2 else array[..., :3].mean(axis=-1).astype(np.uint8)


def pixels_to_display(pixel_values: Any) -> np.ndarray:
    """A processed image `(C, H, W)` (normalized floats) as `(H, W)` in [0, 1], min-max stretched, for display."""
    array = pixel_values.detach().float().cpu().numpy() if hasattr(pixel_values, "detach") else np.asarray(pixel_values)
    gray = array.mean(axis=0) if array.ndim == 3 else array
    low, high = float(gray.min()), float(gray.max())
    return (gray - low) / (high - low) if high > low else np.zeros_like(gray)


__all__ = ["batches", "check_model_folder", "grayscale", "load_pretraining_folder", "new_figure",
           "pixels_to_display", "save_figure"]
