"""Writing files so that nothing half-written is ever left behind: one file (`atomic_open`, `atomic_write_text`,
`atomic_write_json`), a set of files into a folder (`staged_files`), or a whole folder (`write_folder_atomically`).
The one place for this in the package: the converters, the tokenizer trainer, the data set builders and the runs
use it. (The files `save_pretrained` copies into checkpoint folders cannot import it: they import only each other.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write `obj` as JSON (and a final newline) to `path` through `atomic_open`."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def staged_files(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `output_dir` to write a set of files into (e.g. `save_pretrained(staging)`). On
    success each file is moved into `output_dir` (created if needed; other files there are kept) with `os.replace`,
    so none is ever seen half-written; on any error the temporary folder is removed and `output_dir` is untouched."""
    output_dir = Path(os.path.abspath(output_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield staging
        output_dir.mkdir(exist_ok=True)
        for name in sorted(os.listdir(staging)):
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_folder_atomically(save: Callable[[Path], None], output_dir: str | os.PathLike, overwrite: bool = False
                            ) -> None:
    """`save(tmp_dir)` into a temporary sibling of `output_dir`, then rename the whole folder into place; on any failure
    the temporary folder is removed and an existing `output_dir` is left as it was. A non-empty `output_dir` is
    replaced only with `overwrite` (FileExistsError naming it otherwise). The new folder and its weights get the
    modes mkdir() / open() would give (see `give_default_modes`)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {os.fspath(output_dir)!r} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {os.fspath(output_dir)!r} exists and is not empty; pass overwrite=True (--overwrite) to "
            "replace it."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        save(tmp_dir)
        # mkdtemp makes the folder 0700 and safetensors writes the weights 0600: give both the modes mkdir() / open()
        # would, so the folder is as readable as any other the umask allows.
        give_default_modes(tmp_dir, include_folder=True)
        if output_dir.is_dir() and any(output_dir.iterdir()):
            backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, backup)  # onto the empty folder mkdtemp made
            try:
                os.replace(tmp_dir, output_dir)
            except BaseException:
                os.replace(backup, output_dir)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp_dir, output_dir)  # replaces an empty output_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
