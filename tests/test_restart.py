"""Nothing lost: kill -9 the app in the middle of a fine-tune, restart it, and check that the registry
is consistent (earlier lab model intact, no half-written model listed), the interrupted job says so,
and an earlier batch's results are intact and still served."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
import zipfile
from pathlib import Path

import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]


def _app_helpers():
    spec = importlib.util.spec_from_file_location("cpw_load_test", REPO / "benchmarks" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _statuses(home: Path) -> dict[str, dict]:
    out = {}
    for p in (home / "jobs").glob("*/status.json"):
        st = json.loads(p.read_text())
        out[st["id"]] = st
    return out


def _wait(cond, timeout: float, what: str, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the app exited while waiting for {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_kill_during_finetune_then_restart(tmp_path, data_dir, _isolated_home, monkeypatch):
    import torch
    from gradio_client import Client, handle_file

    from cellpose_web import registry
    from cellpose_web.engine.nets.unet import LiteUNet
    from cellpose_web.workflows import finetune as training
    from cellpose_web.models.train import save_network

    home = _isolated_home
    lt = _app_helpers()
    env = {"CELLPOSE_WEB_CPU": "1", "CELLPOSE_WEB_THREADS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    # --- an earlier lab model and a training set, already on disk
    torch.manual_seed(0)
    ck = save_network(LiteUNet(widths=(8, 16, 32, 64)), tmp_path / "earlier.pt")
    earlier = registry.add_lab_model(str(ck), "earlier_lab", {"description": "made before the crash"})
    train = sorted((data_dir / "nuclei_2d" / "train").glob("*_masks.tif"))[:3]
    for mp in train:
        img = tifffile.imread(str(mp).replace("_masks.tif", ".tif"))[:128, :128]
        lab = tifffile.imread(mp)[:128, :128]
        training.add_pair("crash_set", img, lab, mp.name.replace("_masks.tif", ""))
    batch_in = tmp_path / "batch.zip"
    with zipfile.ZipFile(batch_in, "w") as zf:
        for i, name in enumerate(("2022-10-14-U2OS-1", "2023-05-31-misc-4")):
            p = tmp_path / f"b{i}.tif"
            tifffile.imwrite(p, tifffile.imread(data_dir / "nuclei_2d" / "val" / f"{name}.tif")[:96, :96])
            zf.write(p, p.name)

    # --- first server: a finished batch, then a long fine-tune that we kill mid-training
    proc, url = lt.start_app(home, "earlier_lab", env_extra=env)
    try:
        client = Client(url, verbose=False)
        out = client.predict([handle_file(str(batch_in))], "earlier_lab", None, 0.4, 0.0, 0, 15, "", None, False, 1,
                             1.0, 3.0, 0.1, api_name="/batch")
        batch_id = next(i for i, s in _statuses(home).items() if s["kind"] == "batch")
        assert batch_id in str(out)
        st = _statuses(home)[batch_id]
        assert st["state"] == "done" and st["result"]["n_ok"] == 2, st
        batch_dir = home / "jobs" / batch_id / "results"
        before = _tree_hashes(batch_dir)
        assert any(k.endswith("_cp_masks.tif") for k in before) and "batch_results.zip" in before

        client.submit("crash_set", "earlier_lab", "crashed_model", 2000, 1e-3, 0.1, api_name="/finetune")

        def training_running():
            for s in _statuses(home).values():
                if s["kind"] == "train" and s["state"] == "running" and len(s.get("losses") or []) >= 2:
                    return s
            return None

        train_st = _wait(training_running, 240, "two training epochs", proc)
    finally:
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait(10)
    assert _statuses(home)[train_st["id"]]["state"] == "running"  # what the killed server left behind
    # as if it had also died while copying a model into the registry
    (registry.models_dir() / ".tmp-crashed_model-deadbeef").mkdir()
    (registry.models_dir() / ".tmp-crashed_model-deadbeef" / "weights").write_bytes(b"half a file")

    # --- restart
    proc, url = lt.start_app(home, "earlier_lab", env_extra=env)
    try:
        st = _statuses(home)[train_st["id"]]
        assert st["state"] == "interrupted", st
        assert "finished results are kept" in st["message"]
        names = [m.name for m in registry.list_models()]
        assert "earlier_lab" in names and "crashed_model" not in names
        assert not [p.name for p in registry.models_dir().iterdir() if p.name.startswith(".")], \
            "a half-written model folder was left in the registry"
        again = registry.get_lab_model("earlier_lab")
        assert again.sha256 == earlier.sha256 == registry.file_sha256(again.path)
        assert _statuses(home)[batch_id]["state"] == "done"
        assert _tree_hashes(batch_dir) == before
        # and the restarted app still serves: the earlier model segments, the old batch can be fetched
        client = Client(url, verbose=False)
        masks_path, _, n, prov = client.predict(handle_file(str(tmp_path / "b0.tif")), "earlier_lab", None, 0.4, 0.0,
                                                None, api_name="/segment")
        assert tifffile.imread(masks_path).shape == (96, 96) and prov["model"]["sha256"] == earlier.sha256
    finally:
        lt.stop_app(proc)
