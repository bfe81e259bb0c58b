"""Cellpose 1-3 weights downloaded from cellpose.org (``CELLPOSE_WEB_LEGACY_URL`` overrides)."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import uuid
from pathlib import Path
from typing import Callable
from cellpose_web import config
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API
from cellpose_web.registry.catalogue import LEGACY_MODELS, LEGACY_URL, ModelInfo, PURPOSE, hub_settings, legacy_cache_dir, legacy_url, short_error
from cellpose_web.registry.facts import file_facts, forget_facts
from cellpose_web.registry.hub import hub_unreachable

logger = logging.getLogger(__name__)


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
            f"unreachable: {short_error(e, 120)}). {tried} {_legacy_help(name)}") from None
    finally:
        if part.exists():
            part.unlink()


def resolve_legacy(name: str, download: bool, progress: Callable | None) -> ModelInfo:
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
        reason = hub_unreachable(base)
        if reason:
            raise ModelNotAvailableError(f"Model '{name}' is not on this machine and could not be downloaded: {reason}. "
                                         f"{tried} {_legacy_help(name)}")
        for f in (wfile, sfile):
            if not (cache / f).is_file():
                _download_url(f"{base}/{f}", cache / f, name, tried, progress)
    try:
        facts = file_facts(weights)
        if facts["arch"] != "cellpose3":
            raise CellposeWebError(f"{weights.name} is a '{facts['arch']}' checkpoint, not a Cellpose 1-3 U-Net.")
        from cellpose_web.registry.size_model import load_size_model
        load_size_model(size)
    except CellposeWebError as e:
        for f in (weights, size):
            forget_facts(str(f))
            f.unlink(missing_ok=True)
        raise CellposeWebError(f"The file for model '{name}' in {cache} is corrupt and was removed: {e} Run again to "
                               "download it afresh.") from None
    st = weights.stat()
    return ModelInfo(name=name, source="cellpose", arch="cellpose3", path=str(weights), sha256=facts["sha256"],
                     size_bytes=st.st_size,
                     created=_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                     available=True, size_model=str(size), diam_mean=diam_mean, purpose=PURPOSE[name],
                     filename=wfile, description=f"{what} from {base}/{wfile}")
