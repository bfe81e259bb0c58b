"""Outline polygons and the ``_cp_outlines.txt`` format (ImageJ / Cellpose)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable
import numpy as np
from cellpose_web.engine import dynamics
from cellpose_web.errors import CellposeWebError
from cellpose_web.io.atomic import atomic_write


# --------------------------------------------------------------------------------------------
# outlines
# --------------------------------------------------------------------------------------------
def outlines_list(masks: np.ndarray) -> list[np.ndarray]:
    """Outer outline of each mask as (N, 2) int [x, y] points, ascending label order.

    Same as :func:`cellpose_web.dynamics.outlines_list` (OpenCV's point order, largest piece,
    <= 4 points -> empty), checked for 2D here so file writers get a clear message.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise CellposeWebError(f"outlines need a 2D mask image, got shape {masks.shape}")
    return dynamics.outlines_list(masks)


def outlines_to_text(base: str | os.PathLike, outlines: Iterable[np.ndarray]) -> Path:
    """Write ``<base>_cp_outlines.txt``: one line per mask, ``x0,y0,x1,y1,...`` (ints, x = column)."""
    lines = []
    for o in outlines:
        o = np.asarray(o, dtype=np.int64).reshape(-1)
        lines.append(",".join(str(int(v)) for v in o))
    text = "\n".join(lines) + ("\n" if lines else "")
    path = Path(str(base) + "_cp_outlines.txt")
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def read_outlines_text(path: str | os.PathLike) -> list[np.ndarray]:
    """Read a ``_cp_outlines.txt`` back into a list of (N, 2) [x, y] int arrays."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            out.append(np.zeros((0, 2), np.int64))
            continue
        v = np.array([int(t) for t in line.split(",")], dtype=np.int64)
        out.append(v.reshape(-1, 2))
    return out
