"""Shared pytest fixtures: the reference fixtures and data, all inside the repository (tests/fixtures)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from refdata import CP3_CHECKPOINT, CP3_SIZE_MODEL, fixture_path

REPO = Path(__file__).resolve().parents[1]

# Two cores on CI: keep torch from oversubscribing while pytest runs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (still run in CI)")
    config.addinivalue_line("markers", "e2e: browser end-to-end tests (still run in CI)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; CELLPOSE_WEB_TEST_DEVICE=cpu "
                                       "runs them on the CPU)")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Cellpose 4.2.1.1 reference (tests/fixtures/reference; see tests/fixtures/README.md)."""
    return fixture_path("reference")


@pytest.fixture(scope="session")
def cp3_dir() -> Path:
    """Cellpose 3.1.1.2 reference (tests/fixtures/reference/cp3); its checkpoint is ``cp3_files``."""
    return fixture_path("reference/cp3")


@pytest.fixture(scope="session")
def cp3_files() -> tuple[Path, Path]:
    """(checkpoint, size model) the Cellpose 3.1.1.2 reference was made with: the built-in cp_cyto files."""
    return fixture_path(CP3_CHECKPOINT), fixture_path(CP3_SIZE_MODEL)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real nuclei with labels (tests/fixtures/data/nuclei_2d/{train,val}, crops; MIT, see its NOTICE.md)."""
    return fixture_path("data")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CELLPOSE_WEB_HOME so nothing touches the user's real data."""
    home = tmp_path_factory.mktemp("cpweb_home")
    monkeypatch.setenv("CELLPOSE_WEB_HOME", str(home))
    yield home
