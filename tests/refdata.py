"""Where the tests' fixture files are, and how a reduced reference output is compared.

Everything the tests read is inside the repository: tests/fixtures/ (see its README.md: what each
file is, where it came from, how tests/fixtures/make_fixtures.py made it smaller) and the built-in
weights in cellpose_web/weights. A missing file fails the test that needs it; nothing is skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
WEIGHTS = REPO / "cellpose_web" / "weights"
# The Cellpose 3.1.1.2 reference was made with these two files (same sha256 as the reference's copies).
CP3_CHECKPOINT = WEIGHTS / "cp_cyto.pth"
CP3_SIZE_MODEL = WEIGHTS / "size_cp_cyto.npy"
CP3_SHA256 = {"cp_cyto.pth": "1edf1d015481ecd586cc7abb64b15d8dcfc93260b39507b450a47d320246ce54",
              "size_cp_cyto.npy": "87bcf523c13d72e61a99358babe531f67b3f0eca466eb4b6616d1430caeeebee"}


def fixture_path(path: Path | str) -> Path:
    """``path`` (relative to tests/fixtures, or absolute); a missing one fails the test loudly."""
    p = Path(path)
    p = p if p.is_absolute() else FIXTURES / p
    if not p.exists():
        pytest.fail(f"test fixture {p} is missing: tests/fixtures and cellpose_web/weights are part of the "
                    f"repository (tests/fixtures/make_fixtures.py rebuilds the fixtures)", pytrace=False)
    return p


def at_reference_pixels(full: np.ndarray, ref, case: str) -> np.ndarray:
    """``full`` (an engine's whole dP (C, [Z,] Y, X) or cellprob ([Z,] Y, X) of ``case``) at the pixels the
    reduced reference keeps: every ``<case>_stride``-th pixel along Y and X. The whole shape is checked
    first against ``<case>_shape`` (the shape of the published package's dP)."""
    shape = tuple(int(n) for n in ref[f"{case}_shape"])
    assert full.shape in (shape, shape[1:]), (full.shape, shape)
    s = int(ref[f"{case}_stride"])
    return full[..., ::s, ::s]
