"""Shared pytest fixtures: where the real sample data lives, and a reproducible seed."""

import os
from pathlib import Path

import pytest
from hub_server import local_hub  # noqa: F401  (the offline Hub fixture, tests/hub_server.py)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("REFERS_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real chest X-ray samples (`../shared/data` beside the checkout, or `$REFERS_SHARED_DATA`)."""
    path = _shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"real sample data not found at {path}; set REFERS_SHARED_DATA to ../shared/data")
    return path


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def _radiograph_dir() -> Path:
    """Real NIH ChestX-ray14 PNGs: ../shared/data, else the sample embedded in the repository."""
    for candidate in (_shared_data_dir() / "nih_chestxray14_sample" / "images",
                      REPO_ROOT / "sample_data" / "nih_chestxray14_sample" / "images"):
        if candidate.is_dir():
            return candidate
    pytest.skip("no real radiographs found (../shared/data or sample_data/)")


@pytest.fixture(scope="session")
def radiographs():
    """`radiographs(n, size=32)` -> `(n, 3, size, size)` float tensor of real chest X-rays scaled to [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(_radiograph_dir().glob("*.png"))

    def load(n: int, size: int = 32, offset: int = 0) -> "torch.Tensor":
        arrays = []
        for path in files[offset : offset + n]:
            with Image.open(path) as image:
                gray = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32)
            arrays.append(np.repeat(gray[None] / 127.5 - 1.0, 3, axis=0))
        return torch.from_numpy(np.stack(arrays))

    return load
