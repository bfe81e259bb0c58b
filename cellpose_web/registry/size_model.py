"""Cellpose size models (``*_size.npy``): read without running code, checked against the network."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_web.errors import CellposeWebError
from cellpose_web.io import load_seg


SIZE_KEYS = ("A", "smean", "diam_mean", "ymean")


def load_size_model(path: str | os.PathLike, style_dim: int | None = None) -> dict[str, Any]:
    """Read a Cellpose size model (``.npy`` dict with A, smean, diam_mean, ymean) without running code.

    Raises CellposeWebError when the file is not one, or when its style length differs from the
    network's (``style_dim``).
    """
    p = Path(path)
    if not p.is_file():
        raise CellposeWebError(f"size model file not found: {p}")
    try:
        obj = load_seg(p)  # the restricted unpickler: plain data only, no code runs
    except CellposeWebError as e:
        raise CellposeWebError(f"size model '{p.name}' could not be read: {e}") from None
    missing = [k for k in SIZE_KEYS if k not in obj]
    if missing:
        raise CellposeWebError(f"'{p.name}' is not a Cellpose size model (no {', '.join(missing)}); it should be the "
                               "*_size.npy / size_*.npy file saved with the model")
    A = np.asarray(obj["A"], np.float64).reshape(-1)
    smean = np.asarray(obj["smean"], np.float64).reshape(-1)
    if A.shape != smean.shape or (style_dim is not None and A.shape[0] != style_dim):
        raise CellposeWebError(
            f"size model '{p.name}' does not match this network (style length {A.shape[0]}, network {style_dim}); "
            "use the size file saved with this model")
    params = {"A": A, "smean": smean, "diam_mean": float(np.asarray(obj["diam_mean"]).reshape(-1)[0]),
              "ymean": float(np.asarray(obj["ymean"]).reshape(-1)[0])}
    if not all(np.isfinite(v).all() for v in params.values()) or params["diam_mean"] <= 0:
        raise CellposeWebError(f"size model '{p.name}' holds non-finite or invalid values; use the size file saved "
                               "with this model")
    return params
