"""Shared pytest fixtures: where the real data lives, a reproducible seed, and the no-skip rule for CI.

Data: `shared_data_dir` is the full development copy (`../shared/data` beside the checkout, or
`$REFERS_SHARED_DATA`) when it is there, and otherwise the embedded subset `sample_data/`, which has the
same layout. Tests that need files only the full copy has ask `need_shared_data(...)` for them: it
skips with the exact files to provide. `data_source` says which of the two a test got, for the counts
that differ (each documented in that folder's README.md).

CI: with `REFERS_NO_SKIP=1` any skip is reported as a failure (see `pytest_runtest_makereport`); `.ci/run`
sets it. (A run that collects no test already fails: pytest exits 5.)
"""

import os
from pathlib import Path

import pytest
from hub_server import local_hub  # noqa: F401  (the offline Hub fixture, tests/hub_server.py)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA_DIR = REPO_ROOT / "sample_data"
NO_SKIP = os.environ.get("REFERS_NO_SKIP", "") not in ("", "0")


def _shared_data_dir() -> Path:
    env = os.environ.get("REFERS_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def _have_shared_data() -> bool:
    return (_shared_data_dir() / "README.md").is_file()


# ------------------------------------------------------------------------------ our own deprecations fail
# A DeprecationWarning / FutureWarning attributed to our code (the frame that called the deprecated API, which is
# where libraries point their `stacklevel`) is an error: the package must use the current APIs of its pinned
# versions. Warnings that libraries raise about their own internals are left alone. Subprocesses (the example
# scripts, torchrun) are checked by `own_deprecation_warnings` on their stderr.
# Our modules: the packages, the example scripts when a test imports them, and the copies trust_remote_code loads.
OWN_MODULES = r"(modeling_refers|datasets_scripts|transformers_modules|run_\w+|quickstart|prepare_images|push_refers_to_hub)(\..*)?$"


def pytest_configure(config):
    for category in ("DeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}:{OWN_MODULES}")


# ------------------------------------------------------------------------------------------ no skips on CI
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With REFERS_NO_SKIP=1, a skipped test (skip marker, pytest.skip, importorskip, skipping fixture)
    is a failure: CI has ../shared/data and every optional package, so nothing has a reason to skip."""
    outcome = yield
    report = outcome.get_result()
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but REFERS_NO_SKIP=1 does not allow skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at collection (module-level pytest.importorskip)."""
    outcome = yield
    report = outcome.get_result()
    if NO_SKIP and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped at collection, but REFERS_NO_SKIP=1 does not allow skips: {reason}"


# ------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_source() -> str:
    """"shared" (the full ../shared/data) or "sample" (the embedded sample_data/): what `shared_data_dir` is."""
    return "shared" if _have_shared_data() else "sample"


@pytest.fixture(scope="session")
def shared_data_dir(data_source) -> Path:
    """Real chest X-ray data in the layout of ../shared/data: that folder (or `$REFERS_SHARED_DATA`) when
    present, else `sample_data/` (a subset with the same folders and formats; see its README.md)."""
    return _shared_data_dir() if data_source == "shared" else SAMPLE_DATA_DIR


@pytest.fixture
def need_shared_data(request):
    """`need_shared_data(*paths, why=...)` -> the full shared data folder, or a skip naming what to provide.

    For the few tests that need more than sample_data/ holds (`paths` relative to ../shared/data)."""

    def need(*paths: str, why: str) -> Path:
        root = _shared_data_dir()
        missing = [p for p in paths if not (root / p).exists()]
        if not _have_shared_data() or missing:
            pytest.skip(
                f"{request.node.name}: {why}; needs {', '.join(missing or paths)} of the full shared data "
                f"(not in sample_data/): "
                f"provide the shared data folder at {REPO_ROOT.parent / 'shared' / 'data'} or point "
                f"REFERS_SHARED_DATA at it (now looked in {root})"
            )
        return root

    return need


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def _radiograph_dir() -> Path:
    """Real NIH ChestX-ray14 PNGs: ../shared/data, else the sample embedded in the repository."""
    for candidate in (_shared_data_dir() / "nih_chestxray14_sample" / "images",
                      SAMPLE_DATA_DIR / "nih_chestxray14_sample" / "images"):
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
