"""The web service's view of the models: which ones it offers, the default, and the shared model
instances (:func:`cellpose_web.workflows.pipeline.get_model`, the one model cache; eval serialised per instance).
Set CELLPOSE_WEB_DEFAULT_MODEL to a name or path to override the registry's best model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cellpose_web import config
from cellpose_web.workflows import pipeline
from cellpose_web import registry
from cellpose_web.errors import ModelNotAvailableError

log = logging.getLogger(__name__)

CachedModel = pipeline.LoadedModel  # model, name, sha256, path, arch, lock


def use_gpu() -> bool:
    """CUDA when present, unless CELLPOSE_WEB_CPU=1."""
    return pipeline.default_gpu()


def list_model_choices() -> list[tuple[str, str]]:
    """(label, name) pairs for the model dropdowns: usable models first, then Hub models that would
    download on first use; the configured default is always included."""
    ready: list[tuple[str, str]] = []
    later: list[tuple[str, str]] = []
    try:
        for m in registry.list_models():
            purpose = f" · {m.purpose}" if getattr(m, "purpose", "") else ""
            if getattr(m, "available", True):
                tag = {"lab": "lab model", "builtin": "built-in", "hub": "Hub, cached",
                       "cellpose": "Cellpose, cached"}.get(m.source, m.source)
                ready.append((f"{m.name} ({tag}{purpose})", m.name))
            else:
                if m.source == "hub":
                    later.append((f"{m.name} (Hub{purpose}, downloads ~1.2 GB on first use)", m.name))
                elif m.source == "cellpose":
                    later.append((f"{m.name} (Cellpose 1-3{purpose}, downloads ~26 MB on first use)", m.name))
    except Exception as e:  # noqa: BLE001 - registry problems must not break the page
        log.warning("model registry unavailable: %s", e)
    out = ready + later
    d = default_model_name()
    if d and d not in [v for _, v in out]:
        out.insert(0, (Path(d).name if os.sep in d else d, d))
    return out


def is_legacy_model(name: str | None) -> bool:
    """True when ``name`` is a Cellpose 1-3 U-Net (its channels are [cytoplasm, nucleus]); no download."""
    if not name:
        return False
    try:
        return registry.resolve_model(name, download=False).arch == "cellpose3"
    except Exception:  # noqa: BLE001 - unknown or damaged: not a legacy model as far as the form goes
        return False


def model_purpose(name: str | None) -> str:
    """What a model is for: "nuclei", "whole cells", "anything" or "" (no download)."""
    return registry.model_purpose(name)


def list_model_names() -> list[str]:
    """Model names for the dropdowns (see list_model_choices)."""
    return [v for _, v in list_model_choices()]


def check_offered(name: str | None) -> str:
    """Refuse model names the server does not offer (web requests may not name arbitrary files)."""
    if not name:
        raise ModelNotAvailableError("No model chosen: pick a model in the list (the Models tab shows them all).")
    if name not in list_model_names():
        raise ModelNotAvailableError(f"{str(name)[:80]!r} is not a model on this server; pick one from the list "
                                     "(the Models tab shows them all, and can add more).")
    return name


def _preferred_path() -> Path:
    from cellpose_web.service.config import home_dir
    return Path(home_dir()) / "default_model.json"


def set_preferred_model(name: str | None, reason: str = "") -> None:
    """Make `name` the pre-selected model in every model list (None: back to the best available).

    The fine-tune job calls this when the new model beats its base on the held-out images.
    CELLPOSE_WEB_DEFAULT_MODEL, when set, still wins.
    """
    from cellpose_web.service.storage import atomic_write_json
    atomic_write_json(_preferred_path(), {"name": name, "reason": reason})


def preferred_model() -> dict[str, Any] | None:
    """{'name', 'reason'} of the model the lab's last successful fine-tune made the default, if any."""
    from cellpose_web.service.storage import read_json
    d = read_json(_preferred_path(), None)
    return d if isinstance(d, dict) and d.get("name") else None


def default_model_name() -> str | None:
    """The model to pre-select: CELLPOSE_WEB_DEFAULT_MODEL, else the last fine-tuned model that beat
    its base on held-out images (while it exists), else the registry's best available model."""
    env = config.default_model()
    if env:
        return env
    pref = preferred_model()
    if pref is not None:
        try:
            registry.resolve_model(pref["name"], download=False)
            return pref["name"]
        except Exception:  # deleted or renamed since: fall back to the best available
            pass
    try:
        best = registry.best_available_model()
        return getattr(best, "name", best)
    except Exception:
        return None


def resolve(name: str) -> dict[str, Any]:
    """name -> {'name', 'path', 'sha256', 'arch', 'source'}; ModelNotAvailableError if unknown."""
    if not name:
        raise ModelNotAvailableError("No model chosen: pick a model in the list (the Models tab shows them all).")
    try:
        info = registry.resolve_model(name)
        path = str(getattr(info, "path", "") or "")
        sha = getattr(info, "sha256", None) or (registry.file_sha256(path) if path and Path(path).is_file() else "")
        return {"name": getattr(info, "name", name), "path": path, "sha256": sha,
                "arch": getattr(info, "arch", ""), "source": getattr(info, "source", "")}
    except (ImportError, AttributeError):
        p = Path(name)
        if p.is_file():
            return {"name": p.stem, "path": str(p), "sha256": registry.file_sha256(p), "arch": "", "source": "file"}
        raise ModelNotAvailableError(f"Model {name!r} is not available on this server; choose another "
                                     "model or add it in the Models tab.")


def get_model(name: str) -> CachedModel:
    """The shared model instance for `name` (loaded once per process)."""
    if not name:
        raise ModelNotAvailableError("No model chosen: pick a model in the list (the Models tab shows them all).")
    return pipeline.get_model(name)


def forget(name: str | None = None) -> None:
    """Drop cached models (all, or those whose name/path matches), e.g. after delete/rename."""
    pipeline.forget_models(name)
