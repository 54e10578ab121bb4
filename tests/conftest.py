"""Shared pytest fixtures: where the real sample data lives, and a reproducible seed."""

import os
from pathlib import Path

import pytest

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
