"""Facts about a weights file: sha256, architecture, size; cached by (real path, size, mtime)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any
from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.resources import WEIGHTS_DIR, home_dir  # noqa: F401 - home_dir is part of the registry API
from cellpose_web.registry.catalogue import LOCK, short_error

logger = logging.getLogger(__name__)


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


def write_json_atomic(path: Path, obj: Any) -> None:
    from cellpose_web.io.atomic import write_json

    write_json(path, obj, indent=1, sort_keys=True, default=str)


def file_facts(path: str | os.PathLike, need_sha: bool = True) -> dict:
    """sha256/arch/size of a weights file, cached by (real path, size, mtime) under CELLPOSE_WEB_HOME."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = real
    with LOCK:
        cache = _read_info_cache()
        ent = cache.get(key)
        if ent and ent.get("size") == st.st_size and ent.get("mtime_ns") == st.st_mtime_ns and (
                ent.get("sha256") or not need_sha) and ent.get("arch"):
            return ent
    arch = inspect_checkpoint(real)["arch"]
    sha = file_sha256(real) if need_sha else None
    ent = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha, "arch": arch}
    with LOCK:
        cache = _read_info_cache()
        cache[key] = ent
        if len(cache) > 500:  # keep it small
            cache = dict(list(cache.items())[-500:])
        try:
            write_json_atomic(_info_cache_path(), cache)
        except OSError as e:  # read-only home: just do not cache
            logger.debug("could not write %s: %s", _info_cache_path(), e)
    return ent


def count_nonfinite_tensors(state_dict: Any) -> int:
    """How many floating-point tensors of a state dict hold NaN or infinite values (other values are skipped)."""
    import torch

    n = 0
    for t in (state_dict.values() if isinstance(state_dict, dict) else ()):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            if not bool(torch.isfinite(t).all()):
                n += 1
    return n


def inspect_checkpoint(path: str | os.PathLike, check_finite: bool = False) -> dict:
    """Open a weights file without running code (``weights_only=True``) and say what it is.

    Parameters
    ----------
    path : the weights file.
    check_finite : also refuse weights that hold NaN or infinite values (reads every tensor once;
        done when a model is added to the lab).

    Returns
    -------
    dict(arch="cpsam"|"lite"|"cellpose3", n_tensors=int, config=dict)

    Raises
    ------
    CellposeWebError
        (mostly its subclass BadInputError) when the file is not a Cellpose-SAM, Cellpose 1-3 U-Net
        or lite checkpoint (truncated, not a torch file, or something else), or with
        ``check_finite`` when its weights hold NaN or infinite values.
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
        logger.warning("could not build the network of %s (%s): %s", path, arch, short_error(e, 2000))
        raise BadInputError(f"Model file '{name}' is a damaged '{arch}' checkpoint: its weights do not fit the "
                            "network. Re-download it (or copy it again), or save it again from the program "
                            "that trained it.") from None
    if check_finite:
        nbad = count_nonfinite_tensors(sd)
        if nbad:
            raise BadInputError(
                f"Model file '{name}' was not added: the weights contain NaN/infinite values in {nbad} of {len(sd)} "
                "tensors, so the model is broken (a training run that diverged); do not use it. Train it again "
                "(with a lower learning rate) or use another model.")
    info = {"arch": arch, "n_tensors": len(sd), "config": dict(getattr(net, "config", None) or {})}
    if arch == "lite":
        info["meta"] = dict(obj.get("meta") or {})
    return info


def forget_facts(path: str) -> None:
    with LOCK:
        cache = _read_info_cache()
        changed = False
        for k in (path, os.path.realpath(path)):
            if k in cache:
                del cache[k]
                changed = True
        if changed:
            try:
                write_json_atomic(_info_cache_path(), cache)
            except OSError:
                pass
