"""Networks and checkpoint loading: Cellpose-SAM (``vit_sam.CPSAMNet``), the ``lite`` U-Net and the
Cellpose 1-3 U-Net (``cpnet.CPnet``)."""
from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cellpose_web.errors import BadInputError, CellposeWebError

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "build_net", "build_net_from_state_dict", "checkpoint_arch"]


# torch's legacy (non-zip) format starts with a pickled magic number
_LEGACY_TORCH_MAGIC = b"l\xfc\x9cF\xf9 j\xa8P\x19"


def _describe_foreign(head: bytes) -> str:
    """A few words on what a file that is not a PyTorch checkpoint seems to be (from its first bytes)."""
    if head.startswith(b"\x89HDF"):
        return " (it is an HDF5 file, e.g. a Keras/StarDist model, which cellpose-web cannot run)"
    if head.startswith(b"\x93NUMPY"):
        return " (it is a NumPy .npy file)"
    if head[8:9] == b"{" and len(head) > 8:
        return " (it looks like a .safetensors file, which cellpose-web does not read)"
    if head.lstrip()[:1] == b"<" and b"html" in head.lower():
        return " (it is a web page: the download saved an error or login page instead of the model)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return " (it is a text file)"
    return ""


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint safely (``torch.load(weights_only=True)``, memory-mapped when possible).

    Raises FileNotFoundError (with the path) for a missing file and BadInputError for a file that
    is not a complete PyTorch checkpoint (truncated download, wrong file). Those messages name the
    file by its base name only (the path may be a server's temporary upload path); the details of
    the failure are logged.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    name = p.name
    if p.is_dir():
        raise BadInputError(f"'{name}' is a folder, not a model file; choose the weights file inside it.")
    if p.stat().st_size == 0:
        raise BadInputError(f"Model file '{name}' is empty (0 bytes): the download or copy was cut short. "
                            "Re-download it (or copy it again).")
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
    logger.warning("could not load checkpoint %s: %s: %s", p, type(e).__name__, full[:2000])
    if re.search(r"unsupported (global|class)|GLOBAL \S+ whose module|is blocked", full, re.I):
        raise BadInputError(
            f"Model file '{name}' was refused: it contains Python objects other than weights, and loading it "
            "could run code. Save a plain state dict (torch.save(net.state_dict(), path)).") from None
    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
    except OSError:
        head = b""
    cut_short = (f"Model file '{name}' is damaged or incomplete: the download or copy was cut short (the file is "
                 "truncated or corrupted). Re-download it (or copy it again).")
    if head.startswith(b"PK\x03\x04"):  # torch's zip format
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise BadInputError(cut_short) from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise BadInputError(
                f"Model file '{name}' is not a PyTorch checkpoint (it is a zip archive of other files). If the "
                "model came as a zip, unpack it and choose the weights file (.pth or .pt) inside.") from None
        raise BadInputError(cut_short) from None
    if head.startswith(b"\x80") and _LEGACY_TORCH_MAGIC in head[:32]:  # torch's older (non-zip) format
        raise BadInputError(cut_short) from None
    raise BadInputError(
        f"Model file '{name}' is not a PyTorch checkpoint{_describe_foreign(head)}. Choose the weights file of a "
        "Cellpose or cellpose-web model (.pth or .pt); if it should be one, re-download it.") from None


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
