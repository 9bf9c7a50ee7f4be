"""Shared fixtures: paths to the real files in ../shared/data and small cached synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Xenium / H&E files beside the project; tests skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test files not found at {SHARED_DATA} (a plain clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def produced(tmp_path_factory):
    """``(mdata, mdata read back from .h5mu)``: a tiny synthetic section through the real producers
    (``_pl_data.run_producers``), shared by the plotting and report tests."""
    from _pl_data import run_producers

    return run_producers(tmp_path_factory.mktemp("produced"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks: one torch thread is as fast, and far faster than two on a loaded 2-core machine.
    Modules of such tests use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    from cellsymphony.pp._patch_source import one_thread

    with one_thread():
        yield

