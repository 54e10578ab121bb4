"""The shared pieces of the run signatures (modeling_refers/training/run_signature.py), against hashlib on the same
bytes."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from datasets_scripts.prepared_images import PREPARED_FORMAT, PREPARED_METADATA_FILE
from modeling_refers.training.run_signature import (
    absolute,
    checkpoint_sha256,
    ids_sha256,
    prepared_data_fields,
    training_fields,
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_checkpoint_sha256_hashes_the_config_and_weights_of_a_folder_or_one_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    files = {"config.json": b"{}", "model.safetensors": b"w" * 3_000_000,  # more than one 1 MiB read block
             "model-00001-of-00002.safetensors": b"a", "model.safetensors.index.json": b"{\"weight_map\": {}}",
             "pytorch_model.bin": b"pt"}
    ignored = {"training_args.bin": b"args", "README.md": b"card", "trainer_state.json": b"{}", "vocab.txt": b"x"}
    for name, data in {**files, **ignored}.items():
        (folder / name).write_bytes(data)
    (folder / "sub.safetensors").mkdir()  # a folder is no weight file
    assert checkpoint_sha256(folder) == {name: _sha(data) for name, data in sorted(files.items())}
    assert checkpoint_sha256(str(folder / "model.safetensors")) == {"model.safetensors": _sha(b"w" * 3_000_000)}

    before = checkpoint_sha256(folder)
    (folder / "model.safetensors").write_bytes(b"v" * 3_000_000)  # a rewritten checkpoint is another starting point
    assert checkpoint_sha256(folder) != before
    (folder / "README.md").write_bytes(b"other card")  # what does not change the weights does not count
    assert checkpoint_sha256(folder)["model.safetensors"] == _sha(b"v" * 3_000_000)


@pytest.mark.parametrize("path", [None, "", "none", "None", "org/refers-vit-base"])
def test_checkpoint_sha256_is_none_without_local_bytes(path):
    assert checkpoint_sha256(path) is None


def test_ids_paths_prepared_data_and_training_fields(tmp_path, monkeypatch):
    assert ids_sha256(["a", "b", 3]) == _sha(b"a\nb\n3")
    assert ids_sha256(["b", "a", "3"]) != ids_sha256(["a", "b", "3"])  # the order is part of the run
    monkeypatch.chdir(tmp_path)
    assert absolute("data/x") == str(tmp_path / "data" / "x") and absolute(None) is None and absolute("") is None

    assert prepared_data_fields(None) == {"prepared_data_dir": None, "prepared_short_side": None}
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / PREPARED_METADATA_FILE).write_text(json.dumps({"format": PREPARED_FORMAT, "short_side": 96}))
    assert prepared_data_fields("prepared") == {"prepared_data_dir": str(prepared), "prepared_short_side": 96}
    with pytest.raises(FileNotFoundError, match="no prepared data set here"):
        prepared_data_fields("missing")

    args = SimpleNamespace(seed=3, learning_rate=0.1, world_size=2)
    assert training_fields(args, ("seed", "world_size")) == {"seed": 3, "world_size": 2}
    with pytest.raises(AttributeError, match="max_steps"):
        training_fields(args, ("max_steps",))
