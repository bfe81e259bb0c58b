"""Model registry: names -> model files (built-in, Hugging Face Hub, local files, lab models).

Names known out of the box:

- ``lite``: the small offline model shipped in the package (``cellpose_web/weights/lite.pt``);
- ``cp_cyto``: an offline Cellpose 1-3 U-Net for whole cells shipped in the package
  (``cellpose_web/weights/cp_cyto.pth`` + ``size_cp_cyto.npy``, see MODEL_CARD_cp_cyto.md there);
- ``cyto3``, ``cyto2``, ``cyto``, ``nuclei``: Cellpose 1-3 U-Nets with their size models, downloaded
  on first use from where Cellpose 3 publishes them (``https://www.cellpose.org/models``) into
  Cellpose's own model cache (``CELLPOSE_LOCAL_MODELS_PATH``, default ``~/.cellpose/models``), so
  files Cellpose 3 already downloaded are reused;
- ``cpsam``, ``cpsam_v2``: Cellpose-SAM from the Hub repo ``mouseland/cellpose-sam``;
- ``owner/repo:filename``: any file in a Hub model repository (public, or private with a token);
- a path to a checkpoint file;
- lab models: ``$CELLPOSE_WEB_HOME/models/<name>/weights`` with a ``model.json`` sidecar
  (``CELLPOSE_WEB_HOME`` defaults to ``~/.cellpose_web``).

Hub downloads go through ``huggingface_hub`` and its cache, honouring ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``; these are read from the
environment at call time (huggingface_hub itself reads them once, at import). A file already in
the cache is used without any network request. A download that is not a loadable Cellpose 4 /
lite checkpoint (or whose sha256 differs from the Hub's) is removed from the cache and refused.

All writes under ``CELLPOSE_WEB_HOME`` are atomic: a lab model folder is built under a temporary
name and renamed into place, so a crash never leaves a half-registered model.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from cellpose_web import config
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API

logger = logging.getLogger(__name__)

__all__ = [
    "ModelInfo",
    "HUB_REPO",
    "HUB_MODELS",
    "DEFAULT_MODEL",
    "home_dir",
    "models_dir",
    "list_models",
    "resolve_model",
    "whole_cell_model",
    "model_purpose",
    "inspect_checkpoint",
    "add_lab_model",
    "rename_lab_model",
    "delete_lab_model",
    "get_lab_model",
    "update_lab_metadata",
    "push_to_hub",
    "fetch_from_hub",
    "best_available_model",
    "hub_settings",
    "validate_name",
    "cleanup_incomplete",
    "file_sha256",
]

HUB_REPO = "mouseland/cellpose-sam"
HUB_MODELS = ("cpsam_v2", "cpsam")
DEFAULT_MODEL = "cpsam_v2"
BUILTIN_MODELS = ("lite", "cp_cyto")
BUILTIN_FILES = {"lite": ("lite.pt", None), "cp_cyto": ("cp_cyto.pth", "size_cp_cyto.npy")}
# Cellpose 3.1.1.2 (models.py: _MODEL_URL, model_path, size_model_path) publishes its U-Nets here
LEGACY_URL = "https://www.cellpose.org/models"
# name -> (weights file, size-model file, diam_mean (Cellpose 3 uses 17 for nuclei, 30 otherwise))
LEGACY_MODELS = {
    "cyto3": ("cyto3", "size_cyto3.npy", 30.0),
    "cyto2": ("cyto2torch_0", "size_cyto2torch_0.npy", 30.0),
    "cyto": ("cytotorch_0", "size_cytotorch_0.npy", 30.0),
    "nuclei": ("nucleitorch_0", "size_nucleitorch_0.npy", 17.0),
}
# what each named model is for (shown in model lists)
PURPOSE = {"lite": "nuclei", "cp_cyto": "whole cells", "cpsam": "anything", "cpsam_v2": "anything",
           "cyto3": "whole cells", "cyto2": "whole cells", "cyto": "whole cells", "nuclei": "nuclei"}
ARCH_PURPOSE = {"cpsam": "anything", "lite": "nuclei", "cellpose3": "whole cells"}
# names a lab model may not take (they mean something else)
RESERVED_NAMES = {"lite", "cp_cyto", "cpsam", "cpsam_v2", "cpdino", "cpdino-vitb", "none", "default", "models",
                  *LEGACY_MODELS}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_HUB_SPEC_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?:(?P<file>[^:]+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCK = threading.RLock()


@dataclass
class ModelInfo:
    """What the registry knows about one model.

    name : registry name ("lite", "cpsam_v2", a lab name, or a file's stem for local files).
    source : "builtin", "hub", "local" or "lab".
    arch : "cpsam", "lite" or "cellpose3" (None when not inspected, e.g. a Hub model not downloaded yet).
    path : local file, or None when not available on this machine.
    sha256, size_bytes, created : of the weights file (created = ISO date).
    description : free text.
    training : for trained models, the recipe, images used, losses, base model ...
    test_ap : AP@0.5 on held-out images when known.
    repo_id, filename, revision : where a Hub model comes from.
    available : the weights are on this machine (no download needed).
    base_model : the model it was fine-tuned from.
    size_model : Cellpose 1-3 U-Nets: the size-model file (``.npy``) for diameter estimates, or None.
    diam_mean : Cellpose 1-3 U-Nets known by name: the object diameter they were trained at (px).
    purpose : what the model is for: "nuclei", "whole cells" or "anything" ("" when unknown).
    """

    name: str
    source: str
    arch: str | None = None
    path: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    created: str | None = None
    description: str = ""
    training: dict = field(default_factory=dict)
    test_ap: float | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    available: bool = True
    base_model: str | None = None
    size_model: str | None = None
    diam_mean: float | None = None
    purpose: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# places
# --------------------------------------------------------------------------------------------
def models_dir() -> Path:
    """Folder of lab models: ``home_dir()/models``."""
    return home_dir() / "models"


def builtin_path(name: str) -> Path:
    return WEIGHTS_DIR / BUILTIN_FILES.get(name, (f"{name}.pt", None))[0]


def legacy_cache_dir() -> Path:
    """Cellpose's model cache: ``$CELLPOSE_LOCAL_MODELS_PATH``, default ``~/.cellpose/models``."""
    return Path(os.environ.get("CELLPOSE_LOCAL_MODELS_PATH") or "~/.cellpose/models").expanduser()


def legacy_url() -> str:
    """Where the Cellpose 1-3 models are downloaded from (``CELLPOSE_WEB_LEGACY_URL`` overrides)."""
    return config.legacy_url(LEGACY_URL)


def _truthy(v: str | None) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on", "y")


def hub_settings() -> dict:
    """Hub endpoint, cache folder and offline flag, read from the environment now.

    Returns
    -------
    dict(endpoint=str, cache_dir=str, offline=bool)
    """
    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_CACHE"):
        cache = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HUGGINGFACE_HUB_CACHE"):
        cache = os.environ["HUGGINGFACE_HUB_CACHE"]
    else:
        hf_home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        cache = os.path.join(hf_home, "hub")
    cache = os.path.expandvars(os.path.expanduser(cache))
    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    else:
        offline = bool(constants.HF_HUB_OFFLINE)
    return {"endpoint": endpoint, "cache_dir": cache, "offline": offline}


def validate_name(name: str) -> str:
    """Check a lab model name: letters, digits, ``. _ + -``, no path separators or ``..``.

    Returns the name; raises CellposeWebError otherwise.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name or name.endswith("."):
        raise CellposeWebError(
            f"Invalid model name {name!r}: use 1-100 letters, digits, '.', '_', '+' or '-' (no spaces, no '/', "
            "no '..'), starting with a letter or digit."
        )
    if name.lower() in RESERVED_NAMES:
        raise CellposeWebError(f"The name {name!r} is reserved for a built-in model; choose another name.")
    return name


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _info_cache_path() -> Path:
    return home_dir() / "cache" / "file_info.json"


def _read_info_cache() -> dict:
    try:
        return json.loads(_info_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, obj: Any) -> None:
    from cellpose_web.io import atomic_write

    text = json.dumps(obj, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def _file_facts(path: str | os.PathLike, need_sha: bool = True) -> dict:
    """sha256/arch/size of a weights file, cached by (real path, size, mtime) under CELLPOSE_WEB_HOME."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = real
    with _LOCK:
        cache = _read_info_cache()
        ent = cache.get(key)
        if ent and ent.get("size") == st.st_size and ent.get("mtime_ns") == st.st_mtime_ns and (
                ent.get("sha256") or not need_sha) and ent.get("arch"):
            return ent
    arch = inspect_checkpoint(real)["arch"]
    sha = file_sha256(real) if need_sha else None
    ent = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha, "arch": arch}
    with _LOCK:
        cache = _read_info_cache()
        cache[key] = ent
        if len(cache) > 500:  # keep it small
            cache = dict(list(cache.items())[-500:])
        try:
            _write_json_atomic(_info_cache_path(), cache)
        except OSError as e:  # read-only home: just do not cache
            logger.debug("could not write %s: %s", _info_cache_path(), e)
    return ent


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """Open a weights file without running code (``weights_only=True``) and say what it is.

    Returns
    -------
    dict(arch="cpsam"|"lite"|"cellpose3", n_tensors=int, config=dict)

    Raises CellposeWebError when the file is not a Cellpose-SAM, Cellpose 1-3 U-Net or lite
    checkpoint: truncated, not a torch file, or something else.
    """
    import torch

    from cellpose_web.engine import nets

    name = Path(path).name
    obj = nets.load_checkpoint(path)  # FileNotFoundError / CellposeWebError with what to do
    arch = nets.checkpoint_arch(obj)
    if arch == "lite":
        sd = obj.get("state_dict")
        if not isinstance(sd, dict) or not sd:
            raise CellposeWebError(f"Model file '{name}' says it is a 'lite' model but holds no weights.")
    elif not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CellposeWebError(
            f"Model file '{name}' is a PyTorch file but not a Cellpose model (expected a state dict of tensors).")
    else:
        sd = nets.strip_module_prefix(obj)
        if arch == "cpsam" and not all(k in sd for k in ("W2", "encoder.pos_embed", "out.weight")):
            arch = "unknown"
    try:
        net = nets.build_net(obj)  # meta-device build + shape check for cpsam; tensors stay memory-mapped
    except CellposeWebError as e:
        if arch in ("lite", "cpsam", "cellpose3"):
            raise CellposeWebError(f"Model file '{name}' is a damaged '{arch}' checkpoint: {e}") from None
        raise CellposeWebError(f"Model file '{name}': {e}") from None
    except Exception as e:
        raise CellposeWebError(f"Model file '{name}' is a damaged '{arch}' checkpoint ({_short(e)}).") from None
    info = {"arch": arch, "n_tensors": len(sd), "config": dict(getattr(net, "config", None) or {})}
    if arch == "lite":
        info["meta"] = dict(obj.get("meta") or {})
    return info


def _short(e: BaseException, n: int = 160) -> str:
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------
def _hub_url(endpoint: str, repo_id: str, filename: str, revision: str | None) -> str:
    return f"{endpoint}/{repo_id}/resolve/{revision or 'main'}/{filename}"


def _manual_help(repo_id: str, filename: str, name: str) -> str:
    return (
        f"To place it by hand: on a computer with internet run `hf download {repo_id} {filename} --local-dir .` "
        f"(or `huggingface-cli download ...`), copy the file here and pass its path (--pretrained_model "
        f"/path/to/{filename}), or register it with `python -m cellpose_web models add /path/to/{filename} --name "
        f"my_{re.sub(r'[^A-Za-z0-9._-]', '_', filename)}`; or point HF_HOME at a copied Hugging Face cache. The built-in "
        "offline model 'lite' keeps working (--pretrained_model lite)."
    )


def _cached_hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        p = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or "main")
    except Exception:  # invalid names etc.
        return None
    return p if isinstance(p, str) and os.path.isfile(p) else None


def _purge_cached(path: str) -> None:
    """Remove a bad file from the HF cache: the snapshot pointer and the blob it points to."""
    real = os.path.realpath(path)
    for p in {path, real}:
        try:
            os.unlink(p)
        except OSError:
            pass


def _progress_class(progress: Callable[[int, int | None], Any]):
    """A tqdm look-alike that forwards (bytes_done, bytes_total) to ``progress``."""

    class _Bar:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            self.total = total
            self.n = initial or 0

        def update(self, n=1):
            self.n += n or 0
            try:
                progress(int(self.n), None if self.total is None else int(self.total))
            except Exception:  # a UI callback must never break a download
                logger.debug("progress callback failed", exc_info=True)

        def update_transfer(self, n):
            return None

        def set_description(self, *a, **k):
            return None

        def refresh(self, *a, **k):
            return None

        def close(self):
            return None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return _Bar


def _unreachable(endpoint: str, timeout: float = 4.0) -> str | None:
    """A quick TCP check of the Hub endpoint (skipped behind a proxy); why it failed, or None.

    huggingface_hub retries a dead endpoint with back-off for ~20 s; this answers in seconds.
    """
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    u = urlsplit(endpoint)
    host = u.hostname
    if not host:
        return f"HF_ENDPOINT '{endpoint}' is not a URL"
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"no network (cannot resolve {host})"
    except OSError as e:
        return f"no network or the Hub is unreachable ({host}:{port}: {e.strerror or type(e).__name__})"


def _download_hub(repo_id: str, filename: str, revision: str | None, name: str, token: str | bool | None,
                  progress: Callable | None, force: bool = False) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    s = hub_settings()
    url = _hub_url(s["endpoint"], repo_id, filename, revision)
    tried = f"Tried: {url} (cache: {s['cache_dir']})."
    if s["offline"]:
        raise ModelNotAvailableError(
            f"Model '{name}' is not on this machine and cannot be downloaded: offline mode is on (HF_HUB_OFFLINE=1). "
            f"{tried} {_manual_help(repo_id, filename, name)}"
        )
    reason = _unreachable(s["endpoint"])
    if reason:
        raise ModelNotAvailableError(
            f"Model '{name}' is not on this machine and could not be downloaded: {reason}. {tried} "
            f"{_manual_help(repo_id, filename, name)}")
    kwargs: dict = dict(cache_dir=s["cache_dir"], endpoint=s["endpoint"], revision=revision, token=token,
                        etag_timeout=float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10), force_download=force)
    if progress is not None:
        kwargs["tqdm_class"] = _progress_class(progress)
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except hf_errors.GatedRepoError:
        raise ModelNotAvailableError(
            f"Model '{name}': the Hub repository {repo_id} is gated; accept its terms on the website and use a token "
            f"(HF_TOKEN or --token). {tried}") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotAvailableError(
            f"Model '{name}': Hub repository '{repo_id}' was not found, or it is private and no valid token was "
            f"given (set HF_TOKEN or pass token=...). {tried}") from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotAvailableError(f"Model '{name}': revision '{revision}' not found in {repo_id}. {tried}") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise ModelNotAvailableError(f"Model '{name}': there is no file '{filename}' in Hub repository {repo_id}. "
                                     f"{tried}") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError) as e:
        raise ModelNotAvailableError(
            f"Model '{name}' is not on this machine and could not be downloaded (no network or the Hub is "
            f"unreachable: {_short(e, 120)}). {tried} {_manual_help(repo_id, filename, name)}") from None
    except Exception as e:  # httpx errors etc.
        raise ModelNotAvailableError(
            f"Model '{name}' could not be downloaded ({_short(e, 120)}). {tried} "
            f"{_manual_help(repo_id, filename, name)}") from None


def _resolve_hub(repo_id: str, filename: str, revision: str | None, name: str, download: bool,
                 progress: Callable | None, token: str | bool | None) -> ModelInfo:
    s = hub_settings()
    path = _cached_hub_file(repo_id, filename, revision, s["cache_dir"])
    downloaded = False
    if path is None:
        if not download:
            return ModelInfo(name=name, source="hub", path=None, repo_id=repo_id, filename=filename,
                             revision=revision, available=False,
                             description=f"{repo_id}/{filename} on the Hugging Face Hub (not downloaded)")
        path = _download_hub(repo_id, filename, revision, name, token, progress)
        downloaded = True
    try:
        facts = _file_facts(path)
        etag = os.path.basename(os.path.realpath(path))
        if _SHA256_RE.match(etag) and facts["sha256"] != etag:
            raise CellposeWebError(
                f"the file's sha256 ({facts['sha256'][:12]}...) differs from the Hub's ({etag[:12]}...)")
    except CellposeWebError as e:
        _purge_cached(path)
        _forget_facts(path)
        raise CellposeWebError(
            f"The {'downloaded' if downloaded else 'cached'} file for model '{name}' ({repo_id}/{filename}) is corrupt "
            f"and was removed from the cache: {e} Run again to download it afresh."
        ) from None
    st = os.stat(os.path.realpath(path))
    return ModelInfo(name=name, source="hub", arch=facts["arch"], path=str(path), sha256=facts["sha256"],
                     size_bytes=st.st_size,
                     created=_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                     repo_id=repo_id, filename=filename, revision=revision, available=True,
                     description=f"{repo_id}/{filename} from the Hugging Face Hub")


def _forget_facts(path: str) -> None:
    with _LOCK:
        cache = _read_info_cache()
        changed = False
        for k in (path, os.path.realpath(path)):
            if k in cache:
                del cache[k]
                changed = True
        if changed:
            try:
                _write_json_atomic(_info_cache_path(), cache)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Cellpose 1-3 models from cellpose.org
# --------------------------------------------------------------------------------------------
def _legacy_help(name: str) -> str:
    wfile, sfile, _ = LEGACY_MODELS[name]
    return (f"To place it by hand: on a computer with internet download {LEGACY_URL}/{wfile} and "
            f"{LEGACY_URL}/{sfile} (or run Cellpose 3 once with model_type='{name}'), copy both files into "
            f"{legacy_cache_dir()} (or set CELLPOSE_LOCAL_MODELS_PATH to their folder). The built-in offline "
            "models keep working: 'cp_cyto' (whole cells) and 'lite' (nuclei).")


def _download_url(url: str, dest: Path, name: str, tried: str, progress: Callable | None) -> None:
    """Stream ``url`` into ``dest`` atomically (a ``.part`` file renamed when complete)."""
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with urllib.request.urlopen(url, timeout=config.download_timeout()) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            done = 0
            with open(part, "wb") as fo:
                while True:
                    b = r.read(1 << 20)
                    if not b:
                        break
                    fo.write(b)
                    done += len(b)
                    if progress is not None:
                        try:
                            progress(done, total)
                        except Exception:  # a UI callback must never break a download
                            logger.debug("progress callback failed", exc_info=True)
        if total is not None and done != total:
            raise ModelNotAvailableError(f"Model '{name}': the download of {url} stopped after {done} of {total} bytes "
                                         f"(connection lost). Run again to download it afresh. {tried}")
        os.replace(part, dest)
    except urllib.error.HTTPError as e:
        raise ModelNotAvailableError(f"Model '{name}' could not be downloaded: {url} answered HTTP {e.code}. {tried} "
                                     f"{_legacy_help(name)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ModelNotAvailableError(
            f"Model '{name}' is not on this machine and could not be downloaded (no network or the server is "
            f"unreachable: {_short(e, 120)}). {tried} {_legacy_help(name)}") from None
    finally:
        if part.exists():
            part.unlink()


def _resolve_legacy(name: str, download: bool, progress: Callable | None) -> ModelInfo:
    wfile, sfile, diam_mean = LEGACY_MODELS[name]
    cache = legacy_cache_dir()
    weights, size = cache / wfile, cache / sfile
    base = legacy_url()
    what = f"Cellpose {'3' if name == 'cyto3' else '1-2'} U-Net '{name}' ({PURPOSE[name]})"
    if not (weights.is_file() and size.is_file()):
        if not download:
            return ModelInfo(name=name, source="cellpose", arch="cellpose3", path=None, available=False,
                             diam_mean=diam_mean, purpose=PURPOSE[name],
                             description=f"{what}, downloads ~26 MB from {base} on first use")
        tried = f"Tried: {base}/{wfile} and {base}/{sfile} (cache: {cache})."
        if hub_settings()["offline"]:
            raise ModelNotAvailableError(
                f"Model '{name}' is not on this machine and cannot be downloaded: offline mode is on (HF_HUB_OFFLINE=1). "
                f"{tried} {_legacy_help(name)}")
        reason = _unreachable(base)
        if reason:
            raise ModelNotAvailableError(f"Model '{name}' is not on this machine and could not be downloaded: {reason}. "
                                         f"{tried} {_legacy_help(name)}")
        for f in (wfile, sfile):
            if not (cache / f).is_file():
                _download_url(f"{base}/{f}", cache / f, name, tried, progress)
    try:
        facts = _file_facts(weights)
        if facts["arch"] != "cellpose3":
            raise CellposeWebError(f"{weights.name} is a '{facts['arch']}' checkpoint, not a Cellpose 1-3 U-Net.")
        from cellpose_web.legacy import load_size_model
        load_size_model(size)
    except CellposeWebError as e:
        for f in (weights, size):
            _forget_facts(str(f))
            f.unlink(missing_ok=True)
        raise CellposeWebError(f"The file for model '{name}' in {cache} is corrupt and was removed: {e} Run again to "
                               "download it afresh.") from None
    st = weights.stat()
    return ModelInfo(name=name, source="cellpose", arch="cellpose3", path=str(weights), sha256=facts["sha256"],
                     size_bytes=st.st_size,
                     created=_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                     available=True, size_model=str(size), diam_mean=diam_mean, purpose=PURPOSE[name],
                     filename=wfile, description=f"{what} from {base}/{wfile}")


# --------------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------------
def _local_info(path: Path, source: str = "local", name: str | None = None) -> ModelInfo:
    facts = _file_facts(path)
    st = path.stat()
    return ModelInfo(name=name or path.name, source=source, arch=facts["arch"], path=str(path.resolve()),
                     sha256=facts["sha256"], size_bytes=st.st_size,
                     created=_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                     available=True, purpose=ARCH_PURPOSE.get(facts["arch"], ""))


def _lab_info(folder: Path, check: bool = False) -> ModelInfo:
    meta = json.loads((folder / "model.json").read_text())
    w = folder / "weights"
    if not w.is_file():
        raise FileNotFoundError(f"lab model '{folder.name}' has no weights file")
    sha = meta.get("sha256")
    if check:
        facts = _file_facts(w)
        if sha and facts["sha256"] != sha:
            raise CellposeWebError(f"lab model '{folder.name}': weights sha256 differs from model.json (file damaged)")
    size = folder / "size.npy"
    purpose = meta.get("purpose") or PURPOSE.get(str(meta.get("base_model"))) or ARCH_PURPOSE.get(meta.get("arch"), "")
    return ModelInfo(name=folder.name, source="lab", arch=meta.get("arch"), path=str(w.resolve()), sha256=sha,
                     size_bytes=meta.get("size_bytes", w.stat().st_size), created=meta.get("created"),
                     description=meta.get("description", ""), training=dict(meta.get("training") or {}),
                     test_ap=meta.get("test_ap"), base_model=meta.get("base_model"),
                     repo_id=meta.get("repo_id"), filename=meta.get("filename"), available=True,
                     size_model=str(size.resolve()) if size.is_file() else None, purpose=purpose)


def resolve_model(name_or_path: str | os.PathLike | None, download: bool = True,
                  progress: Callable[[int, int | None], Any] | None = None,
                  token: str | bool | None = None) -> ModelInfo:
    """Find the weights for a model name or path, downloading Hub models when needed.

    Parameters
    ----------
    name_or_path : a file path; "lite"; "cpsam" / "cpsam_v2"; "owner/repo:filename" (optionally
        "owner/repo@revision:filename"); or a lab model name. None / "None" / "" mean the default
        ("cpsam_v2"), as in Cellpose.
    download : fetch Hub files that are not cached yet (False: return an info with available=False).
    progress : called as ``progress(bytes_done, bytes_total)`` while downloading.
    token : Hub token for private repositories (default: HF_TOKEN / the saved login).

    Returns
    -------
    ModelInfo with ``path`` set (the file is on this machine) unless download=False.

    Raises
    ------
    ModelNotAvailableError (a FileNotFoundError) naming the model, what was tried and how to place
    the file by hand; CellposeWebError for a corrupt or foreign file.
    """
    if name_or_path is None or (isinstance(name_or_path, str) and name_or_path.strip() in ("", "None", "False", "0")):
        name_or_path = DEFAULT_MODEL
    if isinstance(name_or_path, bool):
        raise CellposeWebError("pretrained_model must be a model name or a file path (training from scratch is not "
                               "supported; start from 'cpsam_v2' or 'lite').")
    p = Path(name_or_path).expanduser()
    spec = str(name_or_path).strip()
    # 1. an existing file (or a lab-model folder)
    if p.is_file():
        return _local_info(p)
    if p.is_dir() and (p / "weights").is_file() and (p / "model.json").is_file():
        return _lab_info(p)
    # 2. built-in
    if spec in BUILTIN_MODELS:
        bp = builtin_path(spec)
        if not bp.is_file():
            raise ModelNotAvailableError(
                f"The built-in model '{spec}' is not installed: {bp} is missing. Reinstall cellpose-web, or train it "
                "with `python scripts/train_lite.py`, or use another model (a file path, 'cpsam_v2' with network)."
            )
        info = _local_info(bp, source="builtin", name=spec)
        info.purpose = PURPOSE[spec]
        if spec == "cp_cyto":
            info.description = ("offline Cellpose 1-3 U-Net for whole cells (scellseg 0.1.8's 'cellpose' model, BSD-3; "
                                "model card: cellpose_web/weights/MODEL_CARD_cp_cyto.md)")
            info.size_model = str(bp.parent / BUILTIN_FILES[spec][1])
            info.diam_mean = 30.0
            return info
        info.description = "small offline U-Net shipped with cellpose-web"
        meta = inspect_checkpoint(bp).get("meta") or {}
        info.training = meta
        info.test_ap = meta.get("test_ap")
        return info
    # 3. Cellpose 1-3 names (cellpose.org) and Hub names
    if spec in LEGACY_MODELS:
        return _resolve_legacy(spec, download, progress)
    if spec in HUB_MODELS:
        return _resolve_hub(HUB_REPO, spec, None, spec, download, progress, token)
    m = _HUB_SPEC_RE.match(spec)
    if m and not p.exists():
        return _resolve_hub(m["repo"], m["file"], m["rev"], spec, download, progress, token)
    # 4. lab models
    if _NAME_RE.match(spec) and ".." not in spec:
        folder = models_dir() / spec
        if (folder / "weights").is_file() and (folder / "model.json").is_file():
            try:
                return _lab_info(folder)
            except (ValueError, OSError) as e:
                raise CellposeWebError(f"Lab model '{spec}' is damaged ({_short(e)}); delete it and add it again.") from None
        trained = _trained_info(spec)
        if trained is not None:
            return trained
    looks_like_path = any(c in spec for c in "/\\") or spec.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        raise ModelNotAvailableError(f"Model file not found: {spec}. Check the path (or use a model name: "
                                     f"{', '.join(_known_names())}).")
    raise ModelNotAvailableError(
        f"Unknown model '{spec}'. Known models: {', '.join(_known_names())}; or give a file path or a Hub file as "
        "'owner/repo:filename'. Add a model file with `python -m cellpose_web models add FILE --name NAME`."
    )


# --------------------------------------------------------------------------------------------
# models trained from Python (train.train_seg), found by the name they were trained under
# --------------------------------------------------------------------------------------------
def _trained_index_path() -> Path:
    return home_dir() / "trained_models.json"


def _read_trained_index() -> dict[str, str]:
    try:
        data = json.loads(_trained_index_path().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def remember_trained_model(name: str, path: str | os.PathLike) -> bool:
    """Let ``resolve_model(name)`` (and so ``CellposeModel(pretrained_model=name)``) find a checkpoint
    that ``train.train_seg`` wrote; the file stays where it is (``$CELLPOSE_WEB_HOME/trained_models.json``
    maps the name to its path; a later training under the same name replaces the entry).

    Returns False (with a warning) when the name cannot be used as a model name: a built-in or Hub
    name, or one with characters a name may not have; the model then loads by its path.
    """
    try:
        validate_name(name)
    except CellposeWebError as e:
        logger.warning("the trained model loads by its path %s, not by name: %s", path, e)
        return False
    with _LOCK:
        index = _read_trained_index()
        index[name] = str(Path(path).expanduser().resolve())
        _trained_index_path().parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(_trained_index_path(), index)
    return True


def _trained_info(spec: str) -> ModelInfo | None:
    path = _read_trained_index().get(spec)
    if path is None:
        return None
    if not Path(path).is_file():
        raise ModelNotAvailableError(f"Model '{spec}' was trained into {path}, which no longer exists; train it "
                                     "again or pass the path of a copy.")
    info = _local_info(Path(path), name=spec)
    info.description = "trained with train_seg"
    return info


def _known_names() -> list[str]:
    return list(BUILTIN_MODELS) + list(HUB_MODELS) + list(LEGACY_MODELS) + [m.name for m in _list_lab()]


def best_available_model() -> str:
    """The best model usable without network: cpsam_v2 or cpsam when already cached, else 'lite'."""
    s = hub_settings()
    for name in HUB_MODELS:
        if _cached_hub_file(HUB_REPO, name, None, s["cache_dir"]):
            return name
    return "lite"


def whole_cell_model() -> str:
    """The best whole-cell model usable without network: cpsam_v2 or cpsam when already cached,
    else the built-in Cellpose 1-3 U-Net 'cp_cyto'. Puncta are counted per whole cell with it."""
    best = best_available_model()
    return best if PURPOSE.get(best) == "anything" else "cp_cyto"


def model_purpose(name: str | None) -> str:
    """What a model is for: "nuclei", "whole cells", "anything", or "" when unknown (no download)."""
    if not name:
        return ""
    if str(name) in PURPOSE:
        return PURPOSE[str(name)]
    try:
        return resolve_model(str(name), download=False).purpose or ""
    except Exception:  # noqa: BLE001 - unknown, damaged or not downloaded: no purpose to report
        return ""


# --------------------------------------------------------------------------------------------
# listing and lab models
# --------------------------------------------------------------------------------------------
def _list_lab() -> list[ModelInfo]:
    d = models_dir()
    out = []
    if not d.is_dir():
        return out
    for f in sorted(d.iterdir(), key=lambda q: q.name.lower()):
        if f.name.startswith(".") or not f.is_dir():
            continue
        try:
            out.append(_lab_info(f))
        except (OSError, ValueError) as e:
            logger.warning("skipping damaged lab model folder %s: %s", f, e)
    return out


def list_models(include_hub: bool = True) -> list[ModelInfo]:
    """All models this machine knows: built-in, the Hub models (available = already cached), lab models.

    Never touches the network.
    """
    out: list[ModelInfo] = []
    for name in BUILTIN_MODELS:
        bp = builtin_path(name)
        if bp.is_file():
            try:
                info = resolve_model(name)
            except CellposeWebError as e:
                info = ModelInfo(name=name, source="builtin", path=str(bp), available=False, description=str(e),
                                 purpose=PURPOSE[name])
        else:
            info = ModelInfo(name=name, source="builtin", path=None, available=False,
                             description="small offline U-Net (not installed)")
        out.append(info)
    if include_hub:
        s = hub_settings()
        for name in HUB_MODELS:
            cached = _cached_hub_file(HUB_REPO, name, None, s["cache_dir"])
            if cached:
                st = os.stat(os.path.realpath(cached))
                out.append(ModelInfo(name=name, source="hub", arch="cpsam", path=cached, size_bytes=st.st_size,
                                     repo_id=HUB_REPO, filename=name, available=True,
                                     description=f"Cellpose-SAM ({HUB_REPO}/{name}), cached"))
            else:
                out.append(ModelInfo(name=name, source="hub", arch="cpsam", path=None, repo_id=HUB_REPO,
                                     filename=name, available=False,
                                     description=f"Cellpose-SAM ({HUB_REPO}/{name}), downloads ~1.2 GB on first use"))
            out[-1].purpose = PURPOSE[name]
        for name in LEGACY_MODELS:
            try:
                out.append(_resolve_legacy(name, download=False, progress=None))
            except CellposeWebError as e:  # a corrupt cached file (removed): list it as not downloaded
                logger.warning("%s", e)
                out.append(_resolve_legacy(name, download=False, progress=None))
    out += _list_lab()
    return out


def get_lab_model(name: str) -> ModelInfo:
    """The ModelInfo of a lab model (ModelNotAvailableError when there is none of that name)."""
    validate_name(name)
    folder = models_dir() / name
    if not (folder / "model.json").is_file():
        raise ModelNotAvailableError(f"There is no lab model named '{name}'. See `python -m cellpose_web models list`.")
    return _lab_info(folder)


def cleanup_incomplete() -> list[str]:
    """Remove leftovers of interrupted adds/deletes (``.tmp-*``/``.trash-*`` folders). Returns what was removed."""
    d = models_dir()
    removed = []
    if d.is_dir():
        for f in d.iterdir():
            if f.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(f, ignore_errors=True)
                removed.append(f.name)
    return removed


def add_lab_model(src_path: str | os.PathLike, name: str, metadata: dict | None = None,
                  overwrite: bool = False, size_model: str | os.PathLike | None = None) -> ModelInfo:
    """Copy a checkpoint into the lab models folder under ``name`` with a ``model.json`` sidecar.

    Parameters
    ----------
    src_path : a Cellpose 4 (Cellpose-SAM) state dict, a Cellpose 1-3 U-Net state dict or a lite checkpoint.
    name : the lab name (see :func:`validate_name`).
    metadata : stored in model.json: e.g. description, base_model, training (recipe, images,
        losses), test_ap, repo_id/filename for Hub copies.
    overwrite : replace an existing lab model of that name.
    size_model : Cellpose 1-3 U-Nets: its size model (``.npy``), stored as ``size.npy``; by default
        ``FILE_size.npy`` beside the weights is taken when present (where Cellpose 3 saves it).

    The file is validated (loads with ``weights_only=True`` and fits its network), hashed
    (sha256), and the model folder appears atomically.
    """
    validate_name(name)
    src = Path(src_path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"Model file not found: {src}")
    info = inspect_checkpoint(src)
    if size_model is None and info["arch"] == "cellpose3" and Path(str(src) + "_size.npy").is_file():
        size_model = Path(str(src) + "_size.npy")
    if size_model is not None:
        if info["arch"] != "cellpose3":
            raise CellposeWebError("a size model only goes with a Cellpose 1-3 U-Net model; this file is a "
                                   f"'{info['arch']}' model, which estimates diameters itself")
        from cellpose_web.legacy import load_size_model
        load_size_model(size_model, style_dim=int((info.get("config") or {}).get("nbase", [0, 256])[-1]))
    meta_in = dict(metadata or {})
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not overwrite:
        raise CellposeWebError(f"A lab model named '{name}' already exists; choose another name or delete it first.")
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as fi, open(tmp / "weights", "wb") as fo:
            while True:
                b = fi.read(1 << 22)
                if not b:
                    break
                h.update(b)
                fo.write(b)
                size += len(b)
            fo.flush()
            os.fsync(fo.fileno())
        sha = h.hexdigest()
        if size_model is not None:
            shutil.copyfile(size_model, tmp / "size.npy")
        # training facts: the checkpoint's own meta, then meta_in["training"], then any other keys given
        training = dict(info.get("meta") or {})
        training.update(dict(meta_in.pop("training", {}) or {}))
        top = {k: meta_in.pop(k) for k in ("repo_id", "filename", "revision") if k in meta_in}
        description = str(meta_in.pop("description", "") or "")
        base_model = meta_in.pop("base_model", None)
        test_ap = meta_in.pop("test_ap", None)
        training.update(meta_in)
        record = {
            "format": 1,
            "name": name,
            "arch": info["arch"],
            "sha256": sha,
            "size_bytes": size,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "description": description,
            "base_model": base_model,
            "test_ap": test_ap,
            "training": training,
            "source_file": src.name,
            **top,
        }
        _write_json_atomic(tmp / "model.json", record)
        with _LOCK:
            if final.exists():
                if not overwrite:
                    raise CellposeWebError(f"A lab model named '{name}' already exists.")
                trash = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _file_facts(final / "weights")  # prime the hash cache
    logger.info("added lab model %s (%s, sha256 %s)", name, info["arch"], sha[:12])
    return _lab_info(final)


def update_lab_metadata(name: str, **fields) -> ModelInfo:
    """Change fields of a lab model's model.json (description, test_ap, training ...), atomically."""
    validate_name(name)
    folder = models_dir() / name
    mj = folder / "model.json"
    if not mj.is_file():
        raise ModelNotAvailableError(f"There is no lab model named '{name}'.")
    with _LOCK:
        rec = json.loads(mj.read_text())
        for k in ("sha256", "arch", "size_bytes", "name", "format"):
            fields.pop(k, None)
        rec.update(fields)
        _write_json_atomic(mj, rec)
    return _lab_info(folder)


def rename_lab_model(old: str, new: str) -> ModelInfo:
    """Rename a lab model (its folder and the name in model.json)."""
    validate_name(old)
    validate_name(new)
    root = models_dir()
    src, dst = root / old, root / new
    with _LOCK:
        if not (src / "model.json").is_file():
            raise ModelNotAvailableError(f"There is no lab model named '{old}'.")
        if dst.exists():
            raise CellposeWebError(f"A lab model named '{new}' already exists; choose another name.")
        os.rename(src, dst)
        rec = json.loads((dst / "model.json").read_text())
        rec["name"] = new
        rec.setdefault("renamed_from", []).append(old)
        _write_json_atomic(dst / "model.json", rec)
    return _lab_info(dst)


def delete_lab_model(name: str) -> None:
    """Delete a lab model (the folder disappears atomically, then its files are removed)."""
    validate_name(name)
    root = models_dir()
    folder = root / name
    with _LOCK:
        if not folder.is_dir():
            raise ModelNotAvailableError(f"There is no lab model named '{name}'.")
        trash = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def push_to_hub(name: str, repo_id: str, token: str | bool | None = None, private: bool = True,
                path_in_repo: str | None = None) -> str:
    """Upload a lab model (weights + ``<name>.json`` metadata) to a Hub model repository.

    The repository is created (private by default) when it does not exist. Returns its URL.
    """
    from huggingface_hub import HfApi

    info = get_lab_model(name)
    s = hub_settings()
    if s["offline"]:
        raise CellposeWebError("Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1).")
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo_id or ""):
        raise CellposeWebError(f"Invalid Hub repository id {repo_id!r}: use 'owner/name'.")
    target = path_in_repo or name
    api = HfApi(endpoint=s["endpoint"], token=token)
    meta = (Path(info.path).parent / "model.json").read_bytes()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_file(path_or_fileobj=info.path, path_in_repo=target, repo_id=repo_id, repo_type="model",
                        commit_message=f"cellpose-web: add model {name}")
        api.upload_file(path_or_fileobj=meta, path_in_repo=f"{target}.json", repo_id=repo_id, repo_type="model",
                        commit_message=f"cellpose-web: metadata for {name}")
    except Exception as e:
        raise CellposeWebError(f"Could not push '{name}' to {repo_id} on {s['endpoint']}: {_short(e, 200)} "
                               "(check the token has write access: HF_TOKEN or --token).") from None
    update_lab_metadata(name, repo_id=repo_id, filename=target)
    return f"{s['endpoint']}/{repo_id}"


def fetch_from_hub(repo_id: str, filename: str, name: str | None = None, token: str | bool | None = None,
                   revision: str | None = None, progress: Callable | None = None,
                   overwrite: bool = False) -> ModelInfo:
    """Download ``repo_id/filename`` from the Hub and register it as a lab model (default name: filename).

    A ``<filename>.json`` beside it on the Hub (as written by :func:`push_to_hub`) is used for the metadata.
    """
    name = validate_name(name or Path(filename).name)
    spec = f"{repo_id}{'@' + revision if revision else ''}:{filename}"
    info = _resolve_hub(repo_id, filename, revision, spec, True, progress, token)
    meta: dict = {}
    try:
        from huggingface_hub import hf_hub_download

        s = hub_settings()
        mp = hf_hub_download(repo_id, f"{filename}.json", revision=revision, cache_dir=s["cache_dir"],
                             endpoint=s["endpoint"], token=token)
        meta = json.loads(Path(mp).read_text())
        if not isinstance(meta, dict):
            meta = {}
    except Exception:
        meta = {}
    for k in ("name", "sha256", "arch", "size_bytes", "created", "format", "source_file"):
        meta.pop(k, None)
    meta.update({"repo_id": repo_id, "filename": filename, "revision": revision})
    return add_lab_model(info.path, name, metadata=meta, overwrite=overwrite)
