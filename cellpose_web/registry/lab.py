"""Lab models: ``$CELLPOSE_WEB_HOME/models/<name>/weights`` with a ``model.json`` sidecar; add, rename,
delete, metadata, push to and fetch from the Hub; models trained with ``train_seg``."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API
from cellpose_web.registry.catalogue import ARCH_PURPOSE, LOCK, ModelInfo, PURPOSE, hub_settings, models_dir, short_error, validate_name
from cellpose_web.registry.facts import file_facts, inspect_checkpoint, write_json_atomic
from cellpose_web.registry.hub import resolve_hub

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------------
def local_info(path: Path, source: str = "local", name: str | None = None) -> ModelInfo:
    facts = file_facts(path)
    st = path.stat()
    return ModelInfo(name=name or path.name, source=source, arch=facts["arch"], path=str(path.resolve()),
                     sha256=facts["sha256"], size_bytes=st.st_size,
                     created=_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                     available=True, purpose=ARCH_PURPOSE.get(facts["arch"], ""))


def lab_info(folder: Path, check: bool = False) -> ModelInfo:
    meta = json.loads((folder / "model.json").read_text())
    w = folder / "weights"
    if not w.is_file():
        raise FileNotFoundError(f"lab model '{folder.name}' has no weights file")
    sha = meta.get("sha256")
    if check:
        facts = file_facts(w)
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
    with LOCK:
        index = _read_trained_index()
        index[name] = str(Path(path).expanduser().resolve())
        _trained_index_path().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_trained_index_path(), index)
    return True


def trained_info(spec: str) -> ModelInfo | None:
    path = _read_trained_index().get(spec)
    if path is None:
        return None
    if not Path(path).is_file():
        raise ModelNotAvailableError(f"Model '{spec}' was trained into {path}, which no longer exists; train it "
                                     "again or pass the path of a copy.")
    info = local_info(Path(path), name=spec)
    info.description = "trained with train_seg"
    return info


# --------------------------------------------------------------------------------------------
# listing and lab models
# --------------------------------------------------------------------------------------------
def list_lab() -> list[ModelInfo]:
    d = models_dir()
    out = []
    if not d.is_dir():
        return out
    for f in sorted(d.iterdir(), key=lambda q: q.name.lower()):
        if f.name.startswith(".") or not f.is_dir():
            continue
        try:
            out.append(lab_info(f))
        except (OSError, ValueError) as e:
            logger.warning("skipping damaged lab model folder %s: %s", f, e)
    return out


def get_lab_model(name: str) -> ModelInfo:
    """The ModelInfo of a lab model (ModelNotAvailableError when there is none of that name)."""
    validate_name(name)
    folder = models_dir() / name
    if not (folder / "model.json").is_file():
        raise ModelNotAvailableError(f"There is no lab model named '{name}'. See `python -m cellpose_web models list`.")
    return lab_info(folder)


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

    The file is validated (loads with ``weights_only=True``, fits its network, and its weights are
    finite numbers: a model whose training diverged is refused with BadInputError), hashed
    (sha256), and the model folder appears atomically.
    """
    validate_name(name)
    src = Path(src_path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"Model file not found: {src}")
    info = inspect_checkpoint(src, check_finite=True)
    if size_model is None and info["arch"] == "cellpose3" and Path(str(src) + "_size.npy").is_file():
        size_model = Path(str(src) + "_size.npy")
    if size_model is not None:
        if info["arch"] != "cellpose3":
            raise CellposeWebError("a size model only goes with a Cellpose 1-3 U-Net model; this file is a "
                                   f"'{info['arch']}' model, which estimates diameters itself")
        from cellpose_web.registry.size_model import load_size_model
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
        write_json_atomic(tmp / "model.json", record)
        with LOCK:
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
    file_facts(final / "weights")  # prime the hash cache
    logger.info("added lab model %s (%s, sha256 %s)", name, info["arch"], sha[:12])
    return lab_info(final)


def update_lab_metadata(name: str, **fields) -> ModelInfo:
    """Change fields of a lab model's model.json (description, test_ap, training ...), atomically."""
    validate_name(name)
    folder = models_dir() / name
    mj = folder / "model.json"
    if not mj.is_file():
        raise ModelNotAvailableError(f"There is no lab model named '{name}'.")
    with LOCK:
        rec = json.loads(mj.read_text())
        for k in ("sha256", "arch", "size_bytes", "name", "format"):
            fields.pop(k, None)
        rec.update(fields)
        write_json_atomic(mj, rec)
    return lab_info(folder)


def rename_lab_model(old: str, new: str) -> ModelInfo:
    """Rename a lab model (its folder and the name in model.json)."""
    validate_name(old)
    validate_name(new)
    root = models_dir()
    src, dst = root / old, root / new
    with LOCK:
        if not (src / "model.json").is_file():
            raise ModelNotAvailableError(f"There is no lab model named '{old}'.")
        if dst.exists():
            raise CellposeWebError(f"A lab model named '{new}' already exists; choose another name.")
        os.rename(src, dst)
        rec = json.loads((dst / "model.json").read_text())
        rec["name"] = new
        rec.setdefault("renamed_from", []).append(old)
        write_json_atomic(dst / "model.json", rec)
    return lab_info(dst)


def delete_lab_model(name: str) -> None:
    """Delete a lab model (the folder disappears atomically, then its files are removed)."""
    validate_name(name)
    root = models_dir()
    folder = root / name
    with LOCK:
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
        raise CellposeWebError(f"Could not push '{name}' to {repo_id} on {s['endpoint']}: {short_error(e, 200)} "
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
    info = resolve_hub(repo_id, filename, revision, spec, True, progress, token)
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
