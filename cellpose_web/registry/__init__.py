"""Model names -> weights files, with metadata.

One module per job: :mod:`.catalogue` (the names we know: built-in, Hub, Cellpose 1-3; folders; ``ModelInfo``),
:mod:`.facts` (sha256, architecture and size of a weights file, cached), :mod:`.hub` (Hugging Face Hub
downloads), :mod:`.cellpose_org` (Cellpose 1-3 weights from cellpose.org), :mod:`.lab` (lab models under
``$CELLPOSE_WEB_HOME/models/<name>``: add, rename, delete, push, fetch) and :mod:`.resolve`
(``resolve_model``: a name or path -> a ``ModelInfo`` with a local file; the best available model).

All writes under ``CELLPOSE_WEB_HOME`` are atomic. Hub settings (endpoint, cache, offline) are read
from the environment at call time."""
from __future__ import annotations

from cellpose_web.config import home_dir  # noqa: F401 - part of the registry API

from cellpose_web.registry.catalogue import ModelInfo, HUB_REPO, HUB_MODELS, DEFAULT_MODEL, models_dir, hub_settings, validate_name, builtin_path, LEGACY_MODELS, BUILTIN_MODELS, LEGACY_URL, legacy_url, legacy_cache_dir, RESERVED_NAMES, PURPOSE, ARCH_PURPOSE, BUILTIN_FILES  # noqa: F401
from cellpose_web.registry.facts import inspect_checkpoint, file_sha256  # noqa: F401
from cellpose_web.registry.lab import add_lab_model, rename_lab_model, delete_lab_model, get_lab_model, update_lab_metadata, push_to_hub, fetch_from_hub, cleanup_incomplete, remember_trained_model  # noqa: F401
from cellpose_web.registry.resolve import list_models, resolve_model, whole_cell_model, model_purpose, best_available_model  # noqa: F401

__all__ = ["ModelInfo", "HUB_REPO", "HUB_MODELS", "DEFAULT_MODEL", "home_dir", "models_dir", "list_models", "resolve_model", "whole_cell_model", "model_purpose", "inspect_checkpoint", "add_lab_model", "rename_lab_model", "delete_lab_model", "get_lab_model", "update_lab_metadata", "push_to_hub", "fetch_from_hub", "best_available_model", "hub_settings", "validate_name", "cleanup_incomplete", "file_sha256"]
