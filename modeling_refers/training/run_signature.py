"""The pieces of a run signature that pretraining and fine-tuning share.

A run signature (`run_signature.json`, see `trainer.resume_checkpoint`) lists what decides what a run
computes, so a later run in the same `--output_dir` resumes only the same run. Each script builds its own dict; the
fields they have in common are made here, once: the starting point by content (a rewritten checkpoint is another
starting point), the training ids by hash, local paths made absolute, the prepared-image folder with its short
side, and the `TrainingArguments` fields that change the result.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence

from datasets_scripts.prepared_images import read_prepared_metadata

from ..file_utils import file_sha256


# Files of a starting checkpoint folder whose bytes identify it: the config and the weights (whole or sharded).
CHECKPOINT_FILES = re.compile(r"config\.json|.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin")


def checkpoint_sha256(path: str | os.PathLike | None) -> dict[str, str] | None:
    """SHA-256 of what identifies a local starting point: `{file name: hex digest}` of a single file (a timm / .pth
    state dict), or of a folder's `CHECKPOINT_FILES`. None for no path ("", None, "none") and for a name that is not
    a local path (a Hub id: its revision, not its bytes, identifies it)."""
    if not path or os.fspath(path).lower() == "none" or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {os.path.basename(path): file_sha256(path)}
    names = sorted(name for name in os.listdir(path)
                   if CHECKPOINT_FILES.fullmatch(name) and os.path.isfile(os.path.join(path, name)))
    return {name: file_sha256(os.path.join(path, name)) for name in names}


def ids_sha256(ids: Iterable) -> str:
    """SHA-256 of the ids in order (one per line): which examples a run trains on, and in which order."""
    return hashlib.sha256("\n".join(str(i) for i in ids).encode()).hexdigest()


def absolute(path: str | os.PathLike | None) -> str | None:
    """A local path as an absolute one (the same folder named two ways is one run); None stays None."""
    return os.path.abspath(path) if path else None


def prepared_data_fields(prepared_data_dir: str | os.PathLike | None) -> dict:
    """`prepared_data_dir` (absolute) and the short side its images were stored at (`prepare_images.py`)."""
    if not prepared_data_dir:
        return {"prepared_data_dir": None, "prepared_short_side": None}
    return {"prepared_data_dir": absolute(prepared_data_dir),
            "prepared_short_side": read_prepared_metadata(prepared_data_dir)["short_side"]}


def training_fields(training_args, names: Sequence[str]) -> dict:
    """The `TrainingArguments` fields `names` that decide what the run computes, by name."""
    return {name: getattr(training_args, name) for name in names}


__all__ = ["CHECKPOINT_FILES", "absolute", "checkpoint_sha256", "ids_sha256", "prepared_data_fields",
           "training_fields"]
