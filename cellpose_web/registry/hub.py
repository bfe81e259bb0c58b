"""Hugging Face Hub: cached files, downloads with progress, offline and proxy diagnostics."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from typing import Any, Callable
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API
from cellpose_web.registry.catalogue import ModelInfo, hub_settings, short_error
from cellpose_web.registry.facts import file_facts, forget_facts

logger = logging.getLogger(__name__)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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


def cached_hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: str) -> str | None:
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


def hub_unreachable(endpoint: str, timeout: float = 4.0) -> str | None:
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
    reason = hub_unreachable(s["endpoint"])
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
            f"unreachable: {short_error(e, 120)}). {tried} {_manual_help(repo_id, filename, name)}") from None
    except Exception as e:  # httpx errors etc.
        raise ModelNotAvailableError(
            f"Model '{name}' could not be downloaded ({short_error(e, 120)}). {tried} "
            f"{_manual_help(repo_id, filename, name)}") from None


def resolve_hub(repo_id: str, filename: str, revision: str | None, name: str, download: bool,
                 progress: Callable | None, token: str | bool | None) -> ModelInfo:
    s = hub_settings()
    path = cached_hub_file(repo_id, filename, revision, s["cache_dir"])
    downloaded = False
    if path is None:
        if not download:
            return ModelInfo(name=name, source="hub", path=None, repo_id=repo_id, filename=filename,
                             revision=revision, available=False,
                             description=f"{repo_id}/{filename} on the Hugging Face Hub (not downloaded)")
        path = _download_hub(repo_id, filename, revision, name, token, progress)
        downloaded = True
    try:
        facts = file_facts(path)
        etag = os.path.basename(os.path.realpath(path))
        if _SHA256_RE.match(etag) and facts["sha256"] != etag:
            raise CellposeWebError(
                f"the file's sha256 ({facts['sha256'][:12]}...) differs from the Hub's ({etag[:12]}...)")
    except CellposeWebError as e:
        _purge_cached(path)
        forget_facts(path)
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
