"""Shared pytest fixtures: paths to the reference fixtures and data beside the repo."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))

# Two cores on CI: keep torch from oversubscribing while pytest runs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (still run in CI)")
    config.addinivalue_line("markers", "e2e: browser end-to-end tests (still run in CI)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference folder {SHARED} not found (set CELLPOSE_WEB_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference"


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CELLPOSE_WEB_HOME so nothing touches the user's real data."""
    home = tmp_path_factory.mktemp("cpweb_home")
    monkeypatch.setenv("CELLPOSE_WEB_HOME", str(home))
    yield home
