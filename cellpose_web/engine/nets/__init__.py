"""Networks and checkpoint loading: Cellpose-SAM (``vit_sam.CPSAMNet``), the ``lite`` U-Net and the
Cellpose 1-3 U-Net (``cpnet.CPnet``)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cellpose_web.errors import CellposeWebError

__all__ = ["load_checkpoint", "build_net", "build_net_from_state_dict", "checkpoint_arch"]


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint safely (``torch.load(weights_only=True)``, memory-mapped when possible).

    Raises FileNotFoundError (with the path) for a missing file and CellposeWebError for a file
    that is not a complete PyTorch checkpoint (truncated download, wrong file).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    if p.is_dir():
        raise CellposeWebError(f"{p} is a folder, not a model file; choose the weights file inside it")
    if p.stat().st_size == 0:
        raise CellposeWebError(f"{p} is empty (0 bytes): the file is not a complete PyTorch checkpoint; "
                               "re-download it (or copy it again)")
    errors = []
    for mmap in (True, False):
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # torch raises many types for corrupt files (KeyError, RuntimeError, ...)
            errors.append(e)
            continue
    e = errors[-1]
    full = " ".join(str(e).split())
    if re.search(r"unsupported (global|class)|GLOBAL \S+ whose module|is blocked", full, re.I):
        raise CellposeWebError(
            f"Model file '{p.name}' was refused: it contains Python objects other than weights, and loading it "
            "could run code. Save a plain state dict (torch.save(net.state_dict(), path)).") from None
    detail = "" if full.lower().startswith("weights only load failed") or not full else \
        f" ({type(e).__name__}: {full[:160]})"
    raise CellposeWebError(
        f"Model file '{p.name}' is not a loadable PyTorch checkpoint: it is truncated (an interrupted download) "
        f"or another kind of file{detail}; re-download it (or copy it again). Path: {p}") from None


def strip_module_prefix(sd: Mapping[str, Any]) -> dict:
    """A state dict without the ``module.`` key prefix that torch.nn.DataParallel adds (Cellpose 4 saves it)."""
    return {(k[7:] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}


def checkpoint_arch(obj: Any) -> str:
    """"lite", "cpsam", "cellpose3", "dino" or "unknown" for a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        if obj.get("arch") == "lite" or "lite_config" in obj:
            return "lite"
        keys = [k for k in obj.keys() if isinstance(k, str)]
        keys = [k[7:] if k.startswith("module.") else k for k in keys]
        if "encoder.cls_token" in keys:
            return "dino"
        if "W2" in keys or "encoder.pos_embed" in keys:
            return "cpsam"
        if any(k.startswith(("downsample.", "upsample.", "output.", "style.")) for k in keys):
            return "cellpose3"
    return "unknown"


def build_net(obj: Any) -> nn.Module:
    """Build the network for a loaded checkpoint (state dict or ``lite`` checkpoint dict).

    Cellpose-SAM state dicts (key ``W2``) give :class:`~cellpose_web.engine.nets.vit_sam.CPSAMNet` (shape
    read from the weights, ``module.`` prefix stripped); ``{"arch": "lite", ...}`` gives the lite
    U-Net; Cellpose 1-3 state dicts give :class:`~cellpose_web.engine.nets.cpnet.CPnet`. Other files raise
    CellposeWebError with what to do.
    """
    arch = checkpoint_arch(obj)
    if arch == "lite":
        from cellpose_web.engine.nets.unet import LiteUNet
        if "lite_config" in obj and "config" not in obj:
            obj = {**obj, "config": obj["lite_config"], "arch": "lite"}
        return LiteUNet.from_checkpoint(obj)
    if arch == "cpsam":
        from cellpose_web.engine.nets.vit_sam import CPSAMNet
        sd = strip_module_prefix(obj)
        try:
            return CPSAMNet.from_state_dict(sd)
        except (KeyError, ValueError) as e:
            raise CellposeWebError(f"this Cellpose-SAM checkpoint is incomplete or has unexpected shapes ({e}); "
                                   "re-download it or use cpsam_v2") from e
    if arch == "cellpose3":
        from cellpose_web.engine.nets.cpnet import CPnet
        return CPnet.from_state_dict(obj)
    if arch == "dino":
        raise CellposeWebError("this is a Cellpose 4.2 DINOv3 model (cpdino), which cellpose-web does not run; "
                               "use cpsam_v2 or cpsam")
    what = type(obj).__name__
    if isinstance(obj, Mapping):
        ks = [str(k) for k in list(obj.keys())[:3]]
        what = f"a dict with keys like {ks}"
    raise CellposeWebError(f"this file is not a Cellpose-SAM or cellpose-web model ({what}); "
                           "choose a cpsam / cpsam_v2 file or a model trained with cellpose-web")


def build_net_from_state_dict(state_dict: Any) -> nn.Module:
    """Alias of :func:`build_net` (the name used in the project's interface notes)."""
    return build_net(state_dict)
