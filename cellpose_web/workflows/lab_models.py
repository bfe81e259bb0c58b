"""Managing the lab's models (the Models tab, and scripts): list, add, fetch, download, rename,
delete, push; a model renamed or deleted is dropped from the model cache here, in one place."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cellpose_web import registry
from cellpose_web.io.names import NAME_RULE
from cellpose_web.registry import ModelInfo
from cellpose_web.workflows import model_cache

__all__ = ["list_models", "lab_names", "add_uploaded", "fetch_from_hub", "copy_for_download", "delete", "rename",
           "push_to_hub", "ModelInfo", "NAME_RULE"]

ARCH_NAMES = {"cellpose3": "Cellpose 1-3 U-Net", "cpsam": "Cellpose-SAM", "lite": "lite"}


def list_models() -> list[ModelInfo]:
    return registry.list_models()


def lab_names() -> list[str]:
    return [m.name for m in registry.list_models() if m.source == "lab"]


def add_uploaded(path: str, name: str) -> ModelInfo:
    """A weights file uploaded by a person, added as a lab model."""
    return registry.add_lab_model(path, name.strip(), {"description": f"uploaded file {Path(path).name}"})


def fetch_from_hub(repo: str, file_name: str, name: str | None = None) -> ModelInfo:
    return registry.fetch_from_hub(repo.strip(), file_name.strip(), (name or "").strip() or None)


def copy_for_download(name: str) -> str:
    """A copy of a lab model's weights in a temporary folder, named ``<name>.pt`` / ``.pth``."""
    info = registry.get_lab_model(name)
    d = Path(tempfile.mkdtemp(prefix="cpweb_model_"))
    ext = ".pt" if (info.arch or "") == "lite" else ".pth"
    return str(shutil.copy2(info.path, d / f"{name}{ext}"))


def delete(name: str) -> None:
    registry.delete_lab_model(name)
    model_cache.forget(name)


def rename(name: str, new: str) -> ModelInfo:
    info = registry.rename_lab_model(name, new.strip())
    model_cache.forget(name)
    return info


def push_to_hub(name: str, repo: str, token: str | None = None) -> str | None:
    return registry.push_to_hub(name, repo.strip(), token=token or None)
