"""The tests stand alone: every fixture is in the repository, and no test reads a folder beside it."""
from __future__ import annotations

import hashlib
import re

from refdata import CP3_CHECKPOINT, CP3_SHA256, CP3_SIZE_MODEL, FIXTURES, REPO

# What a test reading the project's reference folder beside the clone (../shared) would contain.
_OUTSIDE = [r"CELLPOSE_WEB_SHARED", r"\.\./shared", r"""["']shared["']""", r"\bshared_dir\b",
            r"parents?\[\d\]\.parent\b"]


def test_no_test_reads_outside_the_repository():
    offenders = []
    for f in sorted((REPO / "tests").rglob("*.py")):
        if f.name == "test_fixtures.py" or "fixtures" in f.relative_to(REPO / "tests").parts:
            continue  # this file names the patterns; make_fixtures.py reads ../shared by design
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if any(re.search(p, line) for p in _OUTSIDE):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "tests must read tests/fixtures (conftest: reference_dir, cp3_dir, cp3_files, " \
                          "data_dir), not a folder outside the repository:\n" + "\n".join(offenders)


def test_fixtures_are_all_there_and_small():
    expected = ["reference/manifest.json", "reference/flows.npz", "reference/masks_from_flows.npz",
                "reference/metrics.npz", "reference/cpsam_state_dict.json", "reference/tiny_cpsam.pth",
                "reference/tiny_cpsam_io.npz", "reference/cp3/manifest.json", "reference/cp3/size_random.npy",
                "reference/cp3/cp3_io.npz", "reference/cp3/cp3_eval.npz", "README.md", "make_fixtures.py",
                "data/NOTICE.md"]
    missing = [p for p in expected if not (FIXTURES / p).is_file()]
    assert not missing, missing
    pairs = sorted(p.name for p in (FIXTURES / "data" / "nuclei_2d").rglob("*.tif"))
    assert len(pairs) == 20 and all(p.replace("_masks", "") in pairs for p in pairs), pairs
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 15.5e6, f"tests/fixtures is {total / 1e6:.1f} MB: keep it under ~15 MB"


def test_cp3_reference_was_made_with_the_builtin_cp_cyto_files():
    """tests/fixtures/reference/cp3 has no copy of the checkpoint: it is cellpose_web/weights' cp_cyto."""
    for p in (CP3_CHECKPOINT, CP3_SIZE_MODEL):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == CP3_SHA256[p.name], p
