"""Mask editing operations for the Correct tab (and for scripts).

Every function is pure: it takes a label image (Y, X) (0 = background, 1..N = cells) and returns
a new one; the input is never modified. Masks never overlap: a new drawing only claims
background pixels, as in the Cellpose GUI. After deletions and merges labels are kept
consecutive (1..N), so a label image saved from here loads in Cellpose unchanged.

`EditHistory` is a small undo/redo stack of label images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage import draw
from skimage.segmentation import relabel_sequential

from cellpose_web.errors import CellposeWebError

__all__ = [
    "label_at", "delete_label", "polygon_region", "brush_region", "add_mask", "erase",
    "merge_labels", "relabel", "EditHistory",
]


def _check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise CellposeWebError(
            f"Mask editing works on one 2D plane (Y, X); got an array of shape {masks.shape}. "
            "Pick a z-plane first.")
    if not np.issubdtype(masks.dtype, np.integer):
        raise CellposeWebError("Masks must be an integer label image (0 = background).")
    return masks


def _out_dtype(n: int) -> np.dtype:
    return np.dtype(np.uint16) if n < 2**16 else np.dtype(np.uint32)


def relabel(masks: np.ndarray) -> np.ndarray:
    """Renumber labels to 1..N (order kept); returns uint16 (uint32 above 65535 cells)."""
    masks = _check_masks(masks)
    out, _, _ = relabel_sequential(masks.astype(np.int64, copy=False))
    return out.astype(_out_dtype(int(out.max(initial=0))))


def label_at(masks: np.ndarray, y: int, x: int) -> int:
    """Label under pixel (y, x) (0 for background or outside the image)."""
    masks = _check_masks(masks)
    y, x = int(y), int(x)
    if 0 <= y < masks.shape[0] and 0 <= x < masks.shape[1]:
        return int(masks[y, x])
    return 0


def delete_label(masks: np.ndarray, label: int | Sequence[int]) -> np.ndarray:
    """Remove one or more cells and renumber the rest to 1..N."""
    masks = _check_masks(masks)
    labels = np.atleast_1d(np.asarray(label, dtype=np.int64))
    labels = labels[labels > 0]
    if labels.size == 0 or not np.isin(labels, masks).any():
        raise CellposeWebError("No cell selected: click on a cell first, then delete it.")
    out = masks.copy()
    out[np.isin(out, labels)] = 0
    return relabel(out)


def polygon_region(points: Sequence[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Filled polygon as a bool mask (Y, X); points are (y, x) pixel coordinates, at least 3."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3:
        raise CellposeWebError("An outline needs at least 3 points: click around the cell, then finish.")
    region = np.zeros(shape, dtype=bool)
    rr, cc = draw.polygon(pts[:, 0], pts[:, 1], shape=shape)
    region[rr, cc] = True
    # the outline itself belongs to the cell too
    closed = np.vstack([pts, pts[:1]])
    for (y0, x0), (y1, x1) in zip(closed[:-1], closed[1:]):
        rr, cc = draw.line(int(round(y0)), int(round(x0)), int(round(y1)), int(round(x1)))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        region[rr[keep], cc[keep]] = True
    return region


def brush_region(points: Sequence[Sequence[float]], radius: float, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask (Y, X) of a brush stroke: disks of `radius` px along the path through (y, x) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        raise CellposeWebError("Nothing was painted: click or drag on the image with the brush.")
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0.5 or radius > max(shape):
        raise CellposeWebError(f"Brush radius must be between 0.5 px and the image size; got {radius}.")
    path = np.zeros(shape, dtype=bool)
    if len(pts) == 1:
        pts = np.vstack([pts, pts])
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
        rr, cc = draw.line(int(round(y0)), int(round(x0)), int(round(y1)), int(round(x1)))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        path[rr[keep], cc[keep]] = True
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy**2 + xx**2) <= radius**2
    return ndi.binary_dilation(path, structure=disk)


def add_mask(masks: np.ndarray, region: np.ndarray, min_pixels: int = 1,
             label: int | None = None) -> tuple[np.ndarray, int]:
    """Add `region` (bool (Y, X)) as a new cell, cropped to background pixels.

    With `label` given (an existing cell), the region extends that cell instead (brush on a
    selected cell). Only the largest connected piece of the new pixels is kept for a new cell.
    Returns (new masks, label of the drawn cell).
    """
    masks = _check_masks(masks)
    region = np.asarray(region, dtype=bool)
    if region.shape != masks.shape:
        raise CellposeWebError(f"Drawing of shape {region.shape} does not match the masks {masks.shape}.")
    free = region & (masks == 0)
    if label is None or label <= 0:
        lab, n = ndi.label(free)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            free = lab == (int(np.argmax(sizes)) + 1)
    if int(free.sum()) < max(1, int(min_pixels)):
        raise CellposeWebError(
            "The drawn shape covers no free background (masks never overlap, so pixels of other "
            "cells are not taken). Draw over empty background, or delete/erase the other cell first.")
    n_old = int(masks.max(initial=0))
    new_label = int(label) if (label is not None and label > 0) else n_old + 1
    out = masks.astype(_out_dtype(max(new_label, n_old)), copy=True)
    out[free] = new_label
    return out, new_label


def erase(masks: np.ndarray, region: np.ndarray, label: int | None = None) -> np.ndarray:
    """Set `region` pixels to background (only those of `label` if given); empty cells vanish."""
    masks = _check_masks(masks)
    region = np.asarray(region, dtype=bool)
    if region.shape != masks.shape:
        raise CellposeWebError(f"Eraser of shape {region.shape} does not match the masks {masks.shape}.")
    out = masks.copy()
    if label is not None and label > 0:
        region = region & (out == label)
    out[region] = 0
    return relabel(out)


def merge_labels(masks: np.ndarray, a: int, b: int) -> np.ndarray:
    """Merge cells `a` and `b` into one; background pixels in the thin gap between them join too."""
    masks = _check_masks(masks)
    a, b = int(a), int(b)
    if a <= 0 or b <= 0 or a == b:
        raise CellposeWebError("Select two different cells to merge (click one, then shift-select the other).")
    present = np.isin([a, b], masks)
    if not present.all():
        raise CellposeWebError("One of the cells to merge no longer exists; select two cells again.")
    out = masks.copy()
    out[out == b] = a
    cell = out == a
    closed = ndi.binary_closing(cell, structure=np.ones((3, 3), bool), iterations=2)
    out[closed & (out == 0)] = a
    return relabel(out)


class EditHistory:
    """Undo/redo stack of label images (keeps at most `max_steps` earlier states)."""

    def __init__(self, masks: np.ndarray | None = None, max_steps: int = 30):
        self.max_steps = int(max_steps)
        self._undo: list[np.ndarray] = []
        self._redo: list[np.ndarray] = []
        self.current = None if masks is None else np.array(masks, copy=True)

    def reset(self, masks: np.ndarray | None) -> None:
        self._undo.clear()
        self._redo.clear()
        self.current = None if masks is None else np.array(masks, copy=True)

    def push(self, masks: np.ndarray) -> np.ndarray:
        """Record a new state (the old one goes on the undo stack; redo is cleared)."""
        if self.current is not None:
            self._undo.append(self.current)
            del self._undo[:-self.max_steps]
        self._redo.clear()
        self.current = np.array(masks, copy=True)
        return self.current

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> np.ndarray:
        if not self._undo:
            raise CellposeWebError("Nothing to undo.")
        self._redo.append(self.current)
        self.current = self._undo.pop()
        return self.current

    def redo(self) -> np.ndarray:
        if not self._redo:
            raise CellposeWebError("Nothing to redo.")
        self._undo.append(self.current)
        self.current = self._redo.pop()
        return self.current
