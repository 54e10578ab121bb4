"""Writing files so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is renamed over `path`, on any error it is
    removed and `path` is left as it was. `mode` is "w" (text, UTF-8 unless `encoding` is given) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file owner-only (0600); give it the mode `open()` would (0666 less the umask).
    os.chmod(tmp, 0o666 & ~_current_umask())
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_modes(folder: str | os.PathLike, include_folder: bool = False) -> None:
    """Give every weights file (`*.safetensors`) directly in `folder` the mode `open()` would (0666 less the umask)
    and, with `include_folder`, the folder the mode `mkdir()` would (0777 less the umask).

    safetensors 0.8 writes through a temporary file created 0600 and renames it, so `model.safetensors` is readable
    by its owner only while every other file follows the umask (safetensors issue #782, fix pending in PR #789;
    transformers' `save_pretrained` inherits it). Call this after anything that writes weights (the Trainer's saves,
    `save_pretrained`) and on folders made with `mkdtemp` (0700)."""
    folder = Path(folder)
    umask = _current_umask()
    for path in folder.glob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)
    if include_folder:
        os.chmod(folder, 0o777 & ~umask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through `atomic_open`."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB blocks): what identifies a checkpoint or weight file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
