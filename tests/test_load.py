"""A small load test: 6 concurrent gradio_client clients (plus one sending junk) on a launched app;
zero failed requests and each client gets exactly the masks of its own image.
The full version (20 clients, latency percentiles) is benchmarks/load_test.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_test_module():
    spec = importlib.util.spec_from_file_location("cpw_load_test", REPO / "benchmarks" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_six_concurrent_clients(tmp_path, data_dir, reference_dir, _isolated_home, monkeypatch):
    import gradio_client  # noqa: F401  (installed with gradio)
    lt = _load_test_module()
    monkeypatch.setenv("CELLPOSE_WEB_CPU", "1")
    model, flow, cellprob = lt.model_choice(reference_dir)
    paths = lt.make_crops(tmp_path / "images", 6, 96, data_dir / "nuclei_2d" / "val")
    refs = lt.reference_masks(paths, model, flow, cellprob)
    assert sum(r.max() > 0 for r in refs) >= 3, "need non-empty masks to tell the clients' results apart"
    proc, url = lt.start_app(_isolated_home, model, env_extra={"CELLPOSE_WEB_THREADS": "1"})
    try:
        lt.warm_up(url, paths[0], model, flow, cellprob)
        rep = lt.run_load(url, paths, refs, model, flow, cellprob, n_clients=6, requests_per_client=1, bad_clients=1,
                          junk=lt.junk_files(tmp_path / "junk"))
    finally:
        lt.stop_app(proc)
    assert not rep.failures, [(o.name, o.error) for o in rep.failures]
    assert len(rep.outcomes) == 6 and len(rep.bad) == 3
    assert all(o.ok for o in rep.bad), [(o.name, o.error) for o in rep.bad]
    assert any("empty" in o.error for o in rep.bad)
    print(rep.summary())
