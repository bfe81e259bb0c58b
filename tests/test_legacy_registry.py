"""Cellpose 1-3 models by name (cyto3, cyto2, cyto, nuclei; downloaded from a local stand-in of
cellpose.org), the built-in cp_cyto, lab U-Net models with size files, and mixed-up model kinds."""
from __future__ import annotations

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from cellpose_web import models, registry
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError


class StandInSite:
    """GET /models/<file> like www.cellpose.org/models (Content-Length set; 404 otherwise); counts requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                site.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1]
                if not self.path.startswith("/models/") or name not in site.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = site.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    d = tmp_path / "cellpose_models"
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(d))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return d


@pytest.fixture
def site(cache, monkeypatch, cp3_files):
    s = StandInSite()
    s.files["cyto3"] = cp3_files[0].read_bytes()
    s.files["size_cyto3.npy"] = cp3_files[1].read_bytes()
    monkeypatch.setenv("CELLPOSE_WEB_LEGACY_URL", s.url)
    yield s
    s.close()


def test_first_use_downloads_with_progress_then_uses_the_cache(site, cache, cp3_files):
    seen = []
    info = registry.resolve_model("cyto3", progress=lambda done, total: seen.append((done, total)))
    assert info.available and info.arch == "cellpose3" and info.purpose == "whole cells"
    assert Path(info.path) == cache / "cyto3" and Path(info.size_model) == cache / "size_cyto3.npy"
    assert info.sha256 == registry.file_sha256(cp3_files[0])
    assert sorted(site.requests) == ["/models/cyto3", "/models/size_cyto3.npy"]
    assert seen[-1][0] == seen[-1][1] and (len(site.files["cyto3"]), len(site.files["cyto3"])) in seen
    assert not list(cache.glob("*.part"))
    again = registry.resolve_model("cyto3")
    assert again.path == info.path and len(site.requests) == 2  # cache hit: no request
    model = models.CellposeModel(pretrained_model="cyto3")
    assert model.legacy and model.size_model_path == info.size_model and model.diam_mean == 30.0
    assert model.model_info.sha256 == info.sha256


def test_prefilled_cache_works_offline_and_nuclei_is_17px(cache, cp3_files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache.mkdir(parents=True)
    sd = torch.load(cp3_files[0], weights_only=True)
    # a Cellpose 1 file: no diam_mean / diam_labels stored (Cellpose 3 then uses 17 px for nuclei)
    torch.save({k: v for k, v in sd.items() if not k.startswith("diam_")}, cache / "nucleitorch_0")
    shutil.copy(cp3_files[1], cache / "size_nucleitorch_0.npy")
    model = models.CellposeModel(model_type="nuclei")
    assert model.model_name == "nuclei" and model.diam_mean == 17.0 and model.diam_labels == 17.0
    listed = {m.name: m for m in registry.list_models()}
    assert listed["nuclei"].available and listed["nuclei"].purpose == "nuclei"
    assert not listed["cyto2"].available and "downloads" in listed["cyto2"].description


def test_offline_with_empty_cache_is_one_clear_message(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as ei:
        registry.resolve_model("cyto2")
    msg = str(ei.value)
    assert "offline mode is on" in msg and "cyto2torch_0" in msg and str(cache) in msg and "cp_cyto" in msg


def test_dead_server_and_missing_file_messages(cache, monkeypatch, site):
    with pytest.raises(ModelNotAvailableError, match="HTTP 404"):
        registry.resolve_model("cyto")  # the stand-in has no cytotorch_0
    monkeypatch.setenv("CELLPOSE_WEB_LEGACY_URL", "http://127.0.0.1:9/models")
    with pytest.raises(ModelNotAvailableError, match="could not be downloaded"):
        registry.resolve_model("cyto2")
    assert not cache.exists() or not any(cache.iterdir())


def test_corrupt_download_is_removed(site, cache):
    site.files["cyto3"] = b"<html>not a model</html>"
    with pytest.raises(CellposeWebError, match="corrupt and was removed"):
        registry.resolve_model("cyto3")
    assert not (cache / "cyto3").exists()


def test_builtin_cp_cyto_is_offline_with_licences_and_card(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = registry.resolve_model("cp_cyto")
    assert info.source == "builtin" and info.arch == "cellpose3" and info.purpose == "whole cells"
    folder = Path(info.path).parent
    for f in ("LICENSE_cellpose", "LICENSE_scellseg", "MODEL_CARD_cp_cyto.md", "size_cp_cyto.npy"):
        assert (folder / f).is_file(), f
    assert info.sha256 in (folder / "MODEL_CARD_cp_cyto.md").read_text()
    with pytest.raises(CellposeWebError, match="reserved"):
        registry.validate_name("cp_cyto")


def test_lab_unet_with_its_size_file(tmp_path, cp3_files):
    src = tmp_path / "lab_cyto3_finetuned"
    shutil.copy(cp3_files[0], src)
    shutil.copy(cp3_files[1], str(src) + "_size.npy")  # where Cellpose 3 saves it
    info = registry.add_lab_model(src, "keratinocytes_v1", {"description": "HaCaT, 20x"})
    assert info.arch == "cellpose3" and info.size_model and info.purpose == "whole cells"
    model = models.CellposeModel(pretrained_model="keratinocytes_v1")
    assert model.legacy and model.size_model_path == info.size_model
    assert models.SizeModel(model).diam_mean == 30.0
    other = tmp_path / "plain"
    shutil.copy(cp3_files[0], other)
    bad = tmp_path / "bad_size.npy"
    np.save(bad, {"A": np.zeros(64), "smean": np.zeros(64), "diam_mean": 30.0, "ymean": 0.0})
    with pytest.raises(CellposeWebError, match="does not match this network"):
        registry.add_lab_model(other, "keratinocytes_v2", size_model=bad)


def test_cpsam_file_with_legacy_arguments_is_recognised(reference_dir):
    tiny = reference_dir / "tiny_cpsam.pth"
    model = models.CellposeModel(pretrained_model=str(tiny))
    assert not model.legacy
    img = np.random.default_rng(0).random((64, 64, 2)).astype(np.float32)
    masks, flows, styles = model.eval(img, channels=[2, 1], diameter=30)  # channels: a warning, not an error
    assert masks.shape == (64, 64)
    with pytest.raises(CellposeWebError, match="SizeModel needs a Cellpose 1-3 U-Net"):
        models.SizeModel(model, pretrained_size="size.npy")
