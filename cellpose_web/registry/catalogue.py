"""The models cellpose-web knows by name (built-in, Hub, Cellpose 1-3, purposes), their folders, and
``ModelInfo``; name checks."""
from __future__ import annotations

import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from cellpose_web import config
from cellpose_web.errors import BadInputError
from cellpose_web.io.names import NAME_RE, check_name  # noqa: F401 - NAME_RE is part of the registry API
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API


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




HUB_SPEC_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?:(?P<file>[^:]+)$")


LOCK = threading.RLock()


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
    """Check a lab model name: :data:`cellpose_web.io.names.NAME_RULE`, and not a built-in model's name.

    Returns the name; raises :class:`~cellpose_web.errors.BadInputError` otherwise.
    """
    check_name(name, "model name")
    if name.lower() in RESERVED_NAMES:
        raise BadInputError(f"The name {name!r} is reserved for a built-in model; choose another name.")
    return name


def short_error(e: BaseException, n: int = 160) -> str:
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) <= n else s[: n - 3] + "..."
