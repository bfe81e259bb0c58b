"""``resolve_model``: a name or path -> a ``ModelInfo`` with a local weights file; the model list and
the best available model."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API
from cellpose_web.registry import catalogue
from cellpose_web.registry.catalogue import BUILTIN_FILES, BUILTIN_MODELS, DEFAULT_MODEL, HUB_MODELS, HUB_REPO, HUB_SPEC_RE, LEGACY_MODELS, ModelInfo, NAME_RE, PURPOSE, hub_settings, models_dir, short_error
from cellpose_web.registry.facts import inspect_checkpoint
from cellpose_web.registry.hub import cached_hub_file, resolve_hub
from cellpose_web.registry.cellpose_org import resolve_legacy
from cellpose_web.registry.lab import lab_info, list_lab, local_info, trained_info

logger = logging.getLogger(__name__)


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
        return local_info(p)
    if p.is_dir() and (p / "weights").is_file() and (p / "model.json").is_file():
        return lab_info(p)
    # 2. built-in
    if spec in BUILTIN_MODELS:
        bp = catalogue.builtin_path(spec)
        if not bp.is_file():
            raise ModelNotAvailableError(
                f"The built-in model '{spec}' is not installed: {bp} is missing. Reinstall cellpose-web, or train it "
                "with `python scripts/train_lite.py`, or use another model (a file path, 'cpsam_v2' with network)."
            )
        info = local_info(bp, source="builtin", name=spec)
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
        return resolve_legacy(spec, download, progress)
    if spec in HUB_MODELS:
        return resolve_hub(HUB_REPO, spec, None, spec, download, progress, token)
    m = HUB_SPEC_RE.match(spec)
    if m and not p.exists():
        return resolve_hub(m["repo"], m["file"], m["rev"], spec, download, progress, token)
    # 4. lab models
    if NAME_RE.match(spec) and ".." not in spec:
        folder = models_dir() / spec
        if (folder / "weights").is_file() and (folder / "model.json").is_file():
            try:
                return lab_info(folder)
            except (ValueError, OSError) as e:
                raise CellposeWebError(f"Lab model '{spec}' is damaged ({short_error(e)}); delete it and add it again.") from None
        trained = trained_info(spec)
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


def _known_names() -> list[str]:
    return list(BUILTIN_MODELS) + list(HUB_MODELS) + list(LEGACY_MODELS) + [m.name for m in list_lab()]


def best_available_model() -> str:
    """The best model usable without network: cpsam_v2 or cpsam when already cached, else 'lite'."""
    s = hub_settings()
    for name in HUB_MODELS:
        if cached_hub_file(HUB_REPO, name, None, s["cache_dir"]):
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


def list_models(include_hub: bool = True) -> list[ModelInfo]:
    """All models this machine knows: built-in, the Hub models (available = already cached), lab models.

    Never touches the network.
    """
    out: list[ModelInfo] = []
    for name in BUILTIN_MODELS:
        bp = catalogue.builtin_path(name)
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
            cached = cached_hub_file(HUB_REPO, name, None, s["cache_dir"])
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
                out.append(resolve_legacy(name, download=False, progress=None))
            except CellposeWebError as e:  # a corrupt cached file (removed): list it as not downloaded
                logger.warning("%s", e)
                out.append(resolve_legacy(name, download=False, progress=None))
    out += list_lab()
    return out
