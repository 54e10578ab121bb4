"""The package's one place for atomic writes (modeling_refers/file_utils.py), and that the files checkpoint folders
carry do not need it."""

import json
import os
import re
from pathlib import Path

import pytest

from modeling_refers.file_utils import atomic_write_json, staged_files, write_folder_atomically

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_refers"
# What save_pretrained copies into a folder (the auto_map modules and, recursively, their relative imports).
SHIPPED = re.compile(r"(configuration|modeling|image_processing|processing)_\w+")


def _listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "a" / "ids.json", {"ids": [1, 2], "ratio": 0.1})
    assert (tmp_path / "a" / "ids.json").read_text() == '{\n "ids": [\n  1,\n  2\n ],\n "ratio": 0.1\n}\n'
    assert json.loads((tmp_path / "a" / "ids.json").read_text()) == {"ids": [1, 2], "ratio": 0.1}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a" / "ids.json", {"bad": object()})
    assert json.loads((tmp_path / "a" / "ids.json").read_text())["ids"] == [1, 2]  # the old file is still whole
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ids.json"]


def test_staged_files_move_in_on_success_and_leave_the_folder_as_it_was_on_failure(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("other run file")
    (out / "vocab.txt").write_text("old")
    with staged_files(out) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "vocab.txt").write_text("new")
        (staging / "tokenizer.json").write_text("{}")
        assert (out / "vocab.txt").read_text() == "old"  # nothing is visible before the end
    assert _listing(out) == {"keep.txt": b"other run file", "tokenizer.json": b"{}", "vocab.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # the staging folder is gone

    with pytest.raises(RuntimeError, match="half way"):
        with staged_files(out) as staging:
            (staging / "vocab.txt").write_text("broken")
            raise RuntimeError("half way")
    assert _listing(out) == {"keep.txt": b"other run file", "tokenizer.json": b"{}", "vocab.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]

    with staged_files(tmp_path / "fresh" / "tok") as staging:  # a new folder (and its parent) is created
        (staging / "a").write_text("1")
    assert _listing(tmp_path / "fresh" / "tok") == {"a": b"1"}


def test_write_folder_atomically_replaces_whole_folders_only_when_asked(tmp_path):
    out = tmp_path / "converted"

    def save(text):
        def write(folder: Path):
            (folder / "config.json").write_text(text)
            (folder / "model.safetensors").write_bytes(b"w")
        return write

    write_folder_atomically(save("one"), out)
    assert _listing(out) == {"config.json": b"one", "model.safetensors": b"w"}
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    with pytest.raises(FileExistsError, match=r"converted' exists and is not empty; pass overwrite=True"):
        write_folder_atomically(save("two"), out)

    def fail(folder: Path):
        (folder / "config.json").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(fail, out, overwrite=True)
    assert _listing(out) == {"config.json": b"one", "model.safetensors": b"w"}
    write_folder_atomically(save("two"), out, overwrite=True)
    assert _listing(out) == {"config.json": b"two", "model.safetensors": b"w"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary or backup folder left

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        write_folder_atomically(save("x"), tmp_path / "file", overwrite=True)


def _shipped_closure() -> set[str]:
    """The package modules save_pretrained copies into a folder: every configuration_ / modeling_ /
    image_processing_ / processing_ file and, as transformers' custom_object_save does, what they import relatively."""
    todo = [p.stem for p in PACKAGE.glob("*.py") if SHIPPED.fullmatch(p.stem)]
    closure = set()
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        if not (PACKAGE / f"{name}.py").is_file():
            continue  # e.g. a module of a subpackage (`training.trainer`): not a sibling, refused below
        source = (PACKAGE / f"{name}.py").read_text()
        todo += re.findall(r"^\s*from\s+\.([\w.]+)\s+import", source, flags=re.MULTILINE)
    return closure


def test_the_writers_stay_out_of_checkpoint_folders():
    """transformers' custom_object_save copies an auto_map module with every file it imports relatively: file_utils
    (and the run plumbing built on it) imported from a shipped file would land in every saved folder."""
    closure = _shipped_closure()
    assert {"configuration_refers", "modeling_refers", "image_processing_refers", "processing_refers"} <= closure
    # the writers, the loading module, and anything in the subpackages (training/, tasks/, hub/, metrics/)
    assert not closure & {"file_utils", "loading"} and not any("." in name for name in closure), closure
