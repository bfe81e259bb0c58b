"""Model registry: real huggingface_hub download code against a stand-in Hub on 127.0.0.1, lab models."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from cellpose_web import registry
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError

HUB_REPO = "mouseland/cellpose-sam"


class StandInHub:
    """A tiny Hub: HEAD/GET ``/{repo}/resolve/{revision}/{filename}`` with the headers huggingface_hub
    checks (X-Repo-Commit, ETag = sha256 as for LFS files, Content-Length), 404 with
    X-Error-Code for missing files and 401 for private repos without the right token. Counts requests."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}
        self.etag_override: dict[tuple[str, str], str] = {}
        self.private: dict[str, str] = {}  # repo -> token
        self.requests: list[tuple[str, str, str | None]] = []
        self.commit = "c0ffee" + "0" * 34
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _empty(self, code, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, head: bool):
                hub.requests.append((self.command, self.path, self.headers.get("authorization")))
                m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self.path)
                if not m:
                    return self._empty(404)
                repo, fname = m["repo"], m["file"]
                if repo in hub.private and self.headers.get("authorization") != f"Bearer {hub.private[repo]}":
                    return self._empty(401, [("X-Error-Code", "RepoNotFound"),
                                             ("X-Error-Message", "Repository not found")])
                key = (repo, fname)
                if key not in hub.files:
                    return self._empty(404, [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", hub.commit)])
                data = hub.files[key]
                etag = hub.etag_override.get(key, hashlib.sha256(data).hexdigest())
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._serve(True)

            def do_GET(self):
                self._serve(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def file_requests(self):
        return [r for r in self.requests if "/resolve/" in r[1]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """Point huggingface_hub at a temporary HF_HOME; clear offline/token settings (env and import-time constants)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    return tmp_path / "hf_home" / "hub"


@pytest.fixture
def hub(hf_env, monkeypatch, reference_dir):
    h = StandInHub()
    h.files[(HUB_REPO, "cpsam")] = (reference_dir / "tiny_cpsam.pth").read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.close()


@pytest.fixture
def tiny_cpsam(reference_dir) -> Path:
    return reference_dir / "tiny_cpsam.pth"


@pytest.fixture
def lite_file(tmp_path) -> Path:
    from cellpose_web.engine.nets.unet import LiteUNet

    net = LiteUNet(widths=(8, 16))
    p = tmp_path / "small_lite.pt"
    torch.save(net.checkpoint_dict({"note": "test"}), p)
    return p


def _cached(repo, fname, cache_dir):
    from huggingface_hub import try_to_load_from_cache

    r = try_to_load_from_cache(repo, fname, cache_dir=str(cache_dir))
    return r if isinstance(r, str) else None


# ---------------------------------------------------------------------------------------------
# Hub downloads
# ---------------------------------------------------------------------------------------------
def test_first_download_then_cache_hit_without_request(hub, hf_env, tiny_cpsam):
    seen = []
    info = registry.resolve_model("cpsam", progress=lambda done, total: seen.append((done, total)))
    assert info.source == "hub" and info.arch == "cpsam" and info.available
    assert Path(info.path).read_bytes() == tiny_cpsam.read_bytes()
    assert info.sha256 == hashlib.sha256(tiny_cpsam.read_bytes()).hexdigest()
    assert Path(info.path).is_relative_to(hf_env)  # in the huggingface_hub cache under HF_HOME
    assert [m for m, p, _ in hub.file_requests()] == ["HEAD", "GET"]
    assert seen and seen[-1] == (tiny_cpsam.stat().st_size, tiny_cpsam.stat().st_size)

    n = len(hub.requests)
    again = registry.resolve_model("cpsam")
    assert len(hub.requests) == n, "a cached model must not cause any request"
    assert again.path == info.path and again.sha256 == info.sha256
    assert registry.best_available_model() == "cpsam"


def test_offline_mode_with_empty_cache_gives_clear_message(hub, monkeypatch, hf_env):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as ei:
        registry.resolve_model("cpsam_v2")
    msg = str(ei.value)
    assert "cpsam_v2" in msg and "offline" in msg.lower()
    assert f"{hub.url}/{HUB_REPO}/resolve/main/cpsam_v2" in msg  # what was tried
    assert str(hf_env) in msg  # where it looked
    assert "models add" in msg and "download" in msg  # how to place it by hand
    assert isinstance(ei.value, FileNotFoundError)
    assert hub.file_requests() == []
    assert registry.best_available_model() == "lite"


def test_offline_mode_uses_the_cache(hub, monkeypatch):
    first = registry.resolve_model("cpsam")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert registry.resolve_model("cpsam").path == first.path
    assert len(hub.requests) == n


def test_dead_endpoint_gives_clear_message(hf_env, monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(ModelNotAvailableError) as ei:
        registry.resolve_model("cpsam")
    msg = str(ei.value)
    assert "'cpsam'" in msg and dead in msg and "lite" in msg and "models add" in msg
    assert "\n" not in msg


def test_corrupt_download_is_refused_and_not_cached(hub, hf_env, tiny_cpsam):
    hub.files[(HUB_REPO, "cpsam")] = b"<html>proxy login page</html>" * 50
    with pytest.raises(CellposeWebError) as ei:
        registry.resolve_model("cpsam")
    assert "corrupt" in str(ei.value) and "cpsam" in str(ei.value)
    assert _cached(HUB_REPO, "cpsam", hf_env) is None, "a corrupt download must not stay in the cache"
    assert registry.best_available_model() == "lite"
    # the Hub serves the right file again: a fresh download works
    hub.files[(HUB_REPO, "cpsam")] = tiny_cpsam.read_bytes()
    assert registry.resolve_model("cpsam").arch == "cpsam"


def test_truncated_checkpoint_refused(hub, hf_env, tiny_cpsam):
    data = tiny_cpsam.read_bytes()
    hub.files[(HUB_REPO, "cpsam")] = data[: len(data) // 2]
    with pytest.raises(CellposeWebError, match="corrupt"):
        registry.resolve_model("cpsam")
    assert _cached(HUB_REPO, "cpsam", hf_env) is None


def test_sha256_mismatch_with_hub_refused(hub, hf_env):
    hub.etag_override[(HUB_REPO, "cpsam")] = "0" * 64
    with pytest.raises(CellposeWebError, match="sha256"):
        registry.resolve_model("cpsam")
    assert _cached(HUB_REPO, "cpsam", hf_env) is None


def test_missing_hub_file_message(hub):
    with pytest.raises(ModelNotAvailableError, match="no file 'cpsam_v2'"):
        registry.resolve_model("cpsam_v2")


def test_owner_repo_filename_and_private_token(hub, tiny_cpsam, lite_file):
    hub.files[("mylab/models", "nuclei_v1")] = lite_file.read_bytes()
    hub.private["mylab/models"] = "secret-token"
    with pytest.raises(ModelNotAvailableError, match="private"):
        registry.resolve_model("mylab/models:nuclei_v1")
    info = registry.resolve_model("mylab/models:nuclei_v1", token="secret-token")
    assert info.arch == "lite" and info.repo_id == "mylab/models" and info.filename == "nuclei_v1"
    assert any(a == "Bearer secret-token" for _, _, a in hub.file_requests())


def test_env_token_used_at_call_time(hub, lite_file, monkeypatch):
    hub.files[("mylab/models", "m")] = lite_file.read_bytes()
    hub.private["mylab/models"] = "tok2"
    monkeypatch.setenv("HF_TOKEN", "tok2")
    assert registry.resolve_model("mylab/models:m").arch == "lite"


def test_download_false_does_not_touch_network(hub):
    info = registry.resolve_model("cpsam", download=False)
    assert not info.available and info.path is None
    assert hub.file_requests() == []


def test_fetch_from_hub_registers_lab_model_with_metadata(hub, lite_file):
    hub.files[("mylab/models", "nuc")] = lite_file.read_bytes()
    hub.files[("mylab/models", "nuc.json")] = json.dumps(
        {"description": "nuclei, fine-tuned", "test_ap": 0.81, "base_model": "lite"}).encode()
    info = registry.fetch_from_hub("mylab/models", "nuc", name="lab_nuc")
    assert info.source == "lab" and info.name == "lab_nuc" and info.arch == "lite"
    assert info.test_ap == 0.81 and info.description == "nuclei, fine-tuned" and info.base_model == "lite"
    assert registry.resolve_model("lab_nuc").sha256 == hashlib.sha256(lite_file.read_bytes()).hexdigest()


def test_push_to_hub_uploads_weights_and_metadata(monkeypatch, lite_file, hf_env):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            calls.append(("init", endpoint, token))

        def create_repo(self, repo_id, private=True, exist_ok=False, repo_type=None):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type=None, commit_message=None):
            data = path_or_fileobj if isinstance(path_or_fileobj, bytes) else Path(path_or_fileobj).read_bytes()
            calls.append(("upload", path_in_repo, repo_id, hashlib.sha256(data).hexdigest()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    registry.add_lab_model(lite_file, "nuc1", {"description": "x"})
    url = registry.push_to_hub("nuc1", "mylab/models", token="tok")
    assert url == "http://127.0.0.1:9/mylab/models"
    assert ("init", "http://127.0.0.1:9", "tok") in calls
    assert ("create_repo", "mylab/models", True, True) in calls
    sha = hashlib.sha256(lite_file.read_bytes()).hexdigest()
    assert ("upload", "nuc1", "mylab/models", sha) in calls
    assert any(c[0] == "upload" and c[1] == "nuc1.json" for c in calls)
    assert registry.get_lab_model("nuc1").repo_id == "mylab/models"


# ---------------------------------------------------------------------------------------------
# local files, built-in, lab models
# ---------------------------------------------------------------------------------------------
def test_local_path_resolves(tiny_cpsam):
    info = registry.resolve_model(str(tiny_cpsam))
    assert info.source == "local" and info.arch == "cpsam"
    assert info.sha256 == hashlib.sha256(tiny_cpsam.read_bytes()).hexdigest()
    assert info.size_bytes == tiny_cpsam.stat().st_size


def test_missing_builtin_lite_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(registry.catalogue, "builtin_path", lambda name: tmp_path / "nope" / f"{name}.pt")
    with pytest.raises(ModelNotAvailableError, match="built-in model 'lite'"):
        registry.resolve_model("lite")


def test_builtin_lite_when_present(monkeypatch, lite_file):
    monkeypatch.setattr(registry.catalogue, "builtin_path", lambda name: lite_file)
    info = registry.resolve_model("lite")
    assert info.source == "builtin" and info.arch == "lite" and info.name == "lite"


def test_unknown_names_and_missing_paths():
    with pytest.raises(ModelNotAvailableError, match="Unknown model 'nucleus_special'"):
        registry.resolve_model("nucleus_special")
    with pytest.raises(ModelNotAvailableError, match="not found"):
        registry.resolve_model("/no/such/file.pth")
    with pytest.raises(CellposeWebError):
        registry.resolve_model(False)


def test_lab_model_lifecycle(tiny_cpsam, lite_file):
    home = registry.home_dir()
    a = registry.add_lab_model(tiny_cpsam, "nuclei-2024", {"description": "from tiny", "base_model": "cpsam",
                                                            "training": {"n_epochs": 3}, "test_ap": 0.5})
    assert a.source == "lab" and a.arch == "cpsam" and a.test_ap == 0.5 and a.training == {"n_epochs": 3}
    assert a.sha256 == hashlib.sha256(tiny_cpsam.read_bytes()).hexdigest()
    folder = home / "models" / "nuclei-2024"
    assert (folder / "weights").read_bytes() == tiny_cpsam.read_bytes()
    rec = json.loads((folder / "model.json").read_text())
    assert rec["sha256"] == a.sha256 and rec["name"] == "nuclei-2024" and rec["arch"] == "cpsam"
    b = registry.add_lab_model(lite_file, "lite_ft")
    assert b.arch == "lite" and b.training.get("note") == "test"  # checkpoint meta kept
    names = [m.name for m in registry.list_models() if m.source == "lab"]
    assert names == ["lite_ft", "nuclei-2024"]
    assert registry.resolve_model("nuclei-2024").path == str((folder / "weights").resolve())

    with pytest.raises(CellposeWebError, match="already exists"):
        registry.add_lab_model(lite_file, "lite_ft")
    registry.add_lab_model(tiny_cpsam, "lite_ft", overwrite=True)
    assert registry.resolve_model("lite_ft").arch == "cpsam"

    r = registry.rename_lab_model("nuclei-2024", "nuclei-v2")
    assert r.name == "nuclei-v2" and not folder.exists()
    with pytest.raises(ModelNotAvailableError):
        registry.resolve_model("nuclei-2024")
    registry.delete_lab_model("nuclei-v2")
    assert [m.name for m in registry.list_models() if m.source == "lab"] == ["lite_ft"]
    with pytest.raises(ModelNotAvailableError):
        registry.delete_lab_model("nuclei-v2")
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")], "no temporary folders left"


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "with space", "lite", "cpsam_v2",
                                 "x" * 101, "name.", "-dash"])
def test_name_validation(bad, lite_file):
    with pytest.raises(CellposeWebError):
        registry.add_lab_model(lite_file, bad)


def test_bad_model_files_refused(tmp_path, tiny_cpsam):
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(tiny_cpsam.read_bytes()[:100_000])
    text = tmp_path / "notes.pth"
    text.write_text("not a model")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cp3 = tmp_path / "cp3.pth"
    torch.save({"downsample.res_down_0.conv.weight": torch.zeros(2, 2)}, cp3)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"W2": Evil()}, evil)
    for f, pat in [(trunc, "truncated"), (text, "not a PyTorch checkpoint"), (empty, "empty"),
                   (cp3, "Cellpose 1-3 model file is incomplete"), (evil, "refused")]:
        with pytest.raises(CellposeWebError, match=pat):
            registry.add_lab_model(f, "bad_one")
    assert not (tmp_path / "PWNED").exists()
    assert not (registry.models_dir() / "bad_one").exists()


def test_bad_upload_messages_name_the_file_only(tmp_path, tiny_cpsam, caplog):
    """An upload lands in a server temp folder: messages give the file's name, plain words, no exception text."""
    import logging
    import zipfile

    from cellpose_web.errors import BadInputError

    up = tmp_path / "gradio" / "90245e85deadbeef"
    up.mkdir(parents=True)
    data = tiny_cpsam.read_bytes()
    files = {
        "garbage.pth": (bytes(range(256)) * 20, "not a PyTorch checkpoint"),
        "empty.pth": (b"", "empty \\(0 bytes\\).*cut short"),
        "notes.pth": (b"these are my notes\n" * 20, "not a PyTorch checkpoint \\(it is a text file\\)"),
        "half.pth": (data[: len(data) // 2], "damaged or incomplete: the download or copy was cut short"),
    }
    for name, (content, pat) in files.items():
        (up / name).write_bytes(content)
    zp = up / "bundle.pth"
    with zipfile.ZipFile(zp, "w") as zf:
        zf.writestr("model/readme.txt", "hello")
    files["bundle.pth"] = (None, "zip archive")
    with caplog.at_level(logging.WARNING):
        for name, (_, pat) in files.items():
            with pytest.raises(BadInputError, match=pat) as ei:
                registry.add_lab_model(up / name, "uploaded")
            msg = str(ei.value)
            assert f"'{name}'" in msg, msg
            assert str(tmp_path) not in msg and "gradio" not in msg, msg
            for internal in ("Error", "Path:", "miniz", "pop from", "KeyError", "(RuntimeError"):
                assert internal not in msg, msg
            assert "again" in msg or "Choose" in msg or "choose" in msg, msg
    # the details stay in the server's log
    assert "PytorchStreamReader" in caplog.text or "zip" in caplog.text.lower()
    assert not (registry.models_dir() / "uploaded").exists()


@pytest.mark.parametrize("arch", ["lite", "cpsam"])
def test_weights_with_nan_or_inf_are_refused(tmp_path, lite_file, tiny_cpsam, arch):
    from cellpose_web.engine.nets import load_checkpoint
    from cellpose_web.errors import BadInputError

    obj = load_checkpoint(lite_file if arch == "lite" else tiny_cpsam)
    sd = obj["state_dict"] if arch == "lite" else obj
    sd = {k: v.clone() for k, v in sd.items()}
    floats = [k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1]
    sd[floats[0]].view(-1)[0] = float("nan")
    sd[floats[-1]].view(-1)[-1] = float("inf")
    bad = tmp_path / "nan_w.pth"
    torch.save({**obj, "state_dict": sd} if arch == "lite" else sd, bad)
    with pytest.raises(BadInputError, match=r"'nan_w.pth'.*NaN/infinite values in 2 of \d+ tensors.*do not use it"):
        registry.add_lab_model(bad, "nan_w")
    assert not (registry.models_dir() / "nan_w").exists()
    assert "nan_w" not in [m.name for m in registry.list_models()]


def test_damaged_lab_folder_is_skipped_and_cleanup(lite_file):
    registry.add_lab_model(lite_file, "good")
    d = registry.models_dir()
    (d / "broken").mkdir()
    (d / "broken" / "model.json").write_text("{not json")
    (d / "broken" / "weights").write_bytes(b"x")
    (d / ".tmp-half-1234").mkdir()
    names = [m.name for m in registry.list_models() if m.source == "lab"]
    assert names == ["good"]
    assert registry.cleanup_incomplete() == [".tmp-half-1234"]


def test_hub_settings_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://example.invalid/")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    s = registry.hub_settings()
    assert s == {"endpoint": "http://example.invalid", "cache_dir": str(tmp_path / "h" / "hub"), "offline": True}
