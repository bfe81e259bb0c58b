"""Mask editing for the Correct tab (and for scripts).

Two levels:

- Pure functions on one label image (Y, X) (0 = background, 1..N = cells) that return a new one and
  never modify their input: :func:`delete_label`, :func:`add_mask`, :func:`erase`,
  :func:`merge_labels`, :func:`relabel`; regions from drawings: :func:`polygon_region` (an outline),
  :func:`brush_region` (a stroke with a radius) and :func:`cell_from_flows` (one click on a missed
  cell, grown from the network's flows). After deletions and merges these functions keep labels
  consecutive (1..N), so a label image saved from here loads in Cellpose unchanged.
- :class:`MaskEditor`, an editable label image (Y, X) or stack (Z, Y, X) with undo/redo of whole
  strokes, as the Correct tab uses it. Each edit works inside the bounding box of what it touches
  (cost follows the stroke, not the image) and reports that box, so a viewer can redraw just that
  part. Labels are not renumbered while editing (a 3D cell keeps its label on every plane);
  :func:`relabel` gives 1..N when saving.

Masks never overlap: a new drawing only claims background pixels, as in the Cellpose GUI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage import draw
from skimage.segmentation import relabel_sequential

from cellpose_web.engine.dynamics.labels import label_dtype
from cellpose_web.errors import CellposeWebError

__all__ = [
    "label_at", "delete_label", "polygon_region", "brush_region", "add_mask", "erase",
    "merge_labels", "relabel", "cell_from_flows", "MaskEditor", "Change",
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
    return np.dtype(label_dtype(n))


def relabel(masks: np.ndarray) -> np.ndarray:
    """Renumber labels to 1..N (order kept); (Y, X) or (Z, Y, X); uint16 (uint32 above 65535 cells)."""
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3) or not np.issubdtype(masks.dtype, np.integer):
        raise CellposeWebError(f"Masks must be an integer label image (Y, X) or (Z, Y, X); got {masks.dtype} "
                               f"of shape {masks.shape}.")
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


# ------------------------------------------------------------------ regions from drawings
Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def _points(points: Sequence[Sequence[float]], what: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    if not np.isfinite(pts).all():
        raise CellposeWebError(f"The {what} has points that are not numbers; draw it again.")
    return pts


def _box(pts: np.ndarray, pad: float, shape: tuple[int, int]) -> Box:
    lo = np.floor(pts.min(0) - pad).astype(int)
    hi = np.ceil(pts.max(0) + pad).astype(int) + 1
    return (max(lo[0], 0), min(hi[0], shape[0]), max(lo[1], 0), min(hi[1], shape[1]))


def _resample(pts: np.ndarray, step: float, closed: bool = False) -> np.ndarray:
    """Points along the polyline through `pts` (N, 2), at most `step` px apart (vectorised)."""
    if closed:
        pts = np.vstack([pts, pts[:1]])
    if len(pts) < 2:
        return pts
    seg = np.diff(pts, axis=0)
    n = np.maximum(np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step).astype(int), 1)
    t = np.concatenate([np.arange(k) / k for k in n])  # Python loop over vertices only, not pixels
    start = np.repeat(np.arange(len(seg)), n)
    return np.vstack([pts[start] + seg[start] * t[:, None], pts[-1:]])


def _polygon_crop(pts: np.ndarray, shape: tuple[int, int]) -> tuple[Box, np.ndarray]:
    box = _box(pts, 1, shape)
    y0, y1, x0, x1 = box
    if y1 <= y0 or x1 <= x0:
        return box, np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), bool)
    local = pts - (y0, x0)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    rr, cc = draw.polygon(local[:, 0], local[:, 1], shape=crop.shape)
    crop[rr, cc] = True
    # the outline itself belongs to the cell too
    edge = np.round(_resample(local, 0.5, closed=True)).astype(int)
    keep = (edge[:, 0] >= 0) & (edge[:, 0] < crop.shape[0]) & (edge[:, 1] >= 0) & (edge[:, 1] < crop.shape[1])
    crop[edge[keep, 0], edge[keep, 1]] = True
    return box, crop


def polygon_region(points: Sequence[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Filled polygon as a bool mask (Y, X); points are (y, x) pixel coordinates, at least 3."""
    pts = _points(points, "outline")
    if len(pts) < 3:
        raise CellposeWebError("An outline needs at least 3 points: draw around the cell.")
    region = np.zeros(shape, dtype=bool)
    (y0, y1, x0, x1), crop = _polygon_crop(pts, shape)
    region[y0:y1, x0:x1] = crop
    return region


def _check_radius(radius: float, shape: tuple[int, int]) -> float:
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise CellposeWebError(f"Brush radius must be a number of pixels; got {radius!r}.") from None
    if not np.isfinite(radius) or radius < 0.5 or radius > max(shape):
        raise CellposeWebError(f"Brush radius must be between 0.5 px and the image size; got {radius}.")
    return radius


def _brush_crop(pts: np.ndarray, radius: float, shape: tuple[int, int]) -> tuple[Box, np.ndarray]:
    """Disks of `radius` stamped along the path, inside the path's bounding box (+ radius)."""
    box = _box(pts, radius, shape)
    y0, y1, x0, x1 = box
    crop = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), bool)
    if crop.size == 0:
        return box, crop
    # centres at most radius/4 apart: the union of disks then differs from the exact swept disk by
    # less than radius/128 px, while the work stays ~ path length x radius
    centres = np.unique(np.round(_resample(pts, max(0.5, radius / 4)) - (y0, x0)).astype(np.int64), axis=0)
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy**2 + dx**2 <= radius**2
    yy = (centres[:, :1] + dy[inside][None]).ravel()
    xx = (centres[:, 1:] + dx[inside][None]).ravel()
    keep = (yy >= 0) & (yy < crop.shape[0]) & (xx >= 0) & (xx < crop.shape[1])
    crop[yy[keep], xx[keep]] = True
    return box, crop


def brush_region(points: Sequence[Sequence[float]], radius: float, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask (Y, X) of a brush stroke: disks of `radius` px along the path through (y, x) points."""
    pts = _points(points, "brush stroke")
    if len(pts) == 0:
        raise CellposeWebError("Nothing was painted: click or drag on the image with the brush.")
    radius = _check_radius(radius, shape)
    region = np.zeros(shape, dtype=bool)
    (y0, y1, x0, x1), crop = _brush_crop(pts, radius, shape)
    region[y0:y1, x0:x1] = crop
    return region


def _free_part(region: np.ndarray, masks: np.ndarray, keep_largest: bool) -> np.ndarray:
    """Pixels of `region` that are background in `masks` (largest connected piece if asked)."""
    free = region & (masks == 0)
    if keep_largest:
        lab, n = ndi.label(free)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            free = lab == (int(np.argmax(sizes)) + 1)
    return free


_NO_FREE = ("The drawn shape covers no free background (masks never overlap, so pixels of other cells are "
            "not taken). Draw over empty background, or delete/erase the other cell first.")


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
    free = _free_part(region, masks, keep_largest=label is None or label <= 0)
    if int(free.sum()) < max(1, int(min_pixels)):
        raise CellposeWebError(_NO_FREE)
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


def _join_gap(cell: np.ndarray) -> np.ndarray:
    """`cell` (bool) closed with a 3x3 square twice: fills the thin gap between two merged cells."""
    return ndi.binary_closing(cell, structure=np.ones((3, 3), bool), iterations=2)


def merge_labels(masks: np.ndarray, a: int, b: int) -> np.ndarray:
    """Merge cells `a` and `b` into one; background pixels in the thin gap between them join too."""
    masks = _check_masks(masks)
    a, b = _check_merge(masks, a, b)
    out = masks.copy()
    out[out == b] = a
    out[_join_gap(out == a) & (out == 0)] = a
    return relabel(out)


def _check_merge(masks: np.ndarray, a: int, b: int) -> tuple[int, int]:
    a, b = int(a), int(b)
    if a <= 0 or b <= 0 or a == b:
        raise CellposeWebError("Select two different cells to merge (click one, then shift-click the other).")
    if not np.isin([a, b], masks).all():
        raise CellposeWebError("One of the cells to merge no longer exists; select two cells again.")
    return a, b


# ------------------------------------------------------------------ click to add a cell
def cell_from_flows(dP: np.ndarray, cellprob: np.ndarray, y: float, x: float, masks: np.ndarray | None = None,
                    cellprob_threshold: float = -2.0, niter: int = 200, sink_radius: float = 6.0,
                    click_margin: float = 1.0,
                    window: int = 160, max_window: int = 1024) -> np.ndarray:
    """One cell grown around a clicked pixel from the network's flows and cell probability.

    Pixels around (y, x) with ``cellprob > cellprob_threshold`` follow the flows (``dP / 5``, as
    Cellpose's dynamics) for `niter` steps; the clicked pixel does too. The cell is every such pixel
    that ends within `sink_radius` px of where the clicked pixel ends (the same sink), connected to
    the click, with holes filled. With `masks` given only background pixels are taken.

    Parameters
    ----------
    dP : float array (2, Y, X)
        Flows in network units ([dY, dX], about 5x unit vectors), as ``flows[1]`` from ``eval``.
    cellprob : float array (Y, X)
        Cell probability logits, as ``flows[2]``.
    y, x : float
        The clicked pixel.
    masks : int array (Y, X), optional
        Existing cells; their pixels are never taken.
    cellprob_threshold : float
        Pixels at or below this logit (or below the clicked pixel's logit minus `click_margin`,
        when that is lower) are not followed: below the usual 0 because a missed cell is often a
        dim one. Defaults chosen on nuclei_2d/train (benchmarks/bench_click_to_add.py).
    sink_radius : float
        How close (px) a pixel's end point must come to the clicked pixel's to belong to the cell.
    window : int
        Side in px of the square searched first; doubled (up to `max_window`) while the cell
        reaches the window's edge.

    Returns
    -------
    bool array (Y, X); empty when nothing converges with the click.
    """
    from cellpose_web.engine import dynamics

    dP = np.asarray(dP)
    cellprob = np.asarray(cellprob)
    if cellprob.ndim != 2 or dP.shape != (2, *cellprob.shape):
        raise CellposeWebError(f"Click to add needs flows (2, Y, X) and cell probability (Y, X) of one plane; got "
                               f"{dP.shape} and {cellprob.shape}. Segment the image first.")
    H, W = cellprob.shape
    yi, xi = int(round(float(y))), int(round(float(x)))
    if not (0 <= yi < H and 0 <= xi < W):
        raise CellposeWebError(f"The click ({yi}, {xi}) is outside the image ({H} x {W}).")
    if masks is not None and masks[yi, xi] != 0:
        raise CellposeWebError("There is a cell here already; click on a missed cell (background).")
    win = int(window)
    while True:
        half = win // 2
        y0, y1, x0, x1 = max(yi - half, 0), min(yi + half + 1, H), max(xi - half, 0), min(xi + half + 1, W)
        cp = cellprob[y0:y1, x0:x1]
        fg = cp > min(cellprob_threshold, float(cellprob[yi, xi]) - click_margin)
        if masks is not None:
            fg &= masks[y0:y1, x0:x1] == 0
        fg[yi - y0, xi - x0] = True
        inds = np.nonzero(fg)
        flow = np.asarray(dP[:, y0:y1, x0:x1], np.float32) * fg / 5.0
        end = dynamics.follow_flows(flow, inds, niter=int(niter)).numpy()
        k = int(np.flatnonzero((inds[0] == yi - y0) & (inds[1] == xi - x0))[0])
        near = np.hypot(end[0] - end[0, k], end[1] - end[1, k]) <= sink_radius
        cell = np.zeros(fg.shape, bool)
        cell[inds[0][near], inds[1][near]] = True
        lab, _ = ndi.label(cell)
        cell = ndi.binary_fill_holes(lab == lab[yi - y0, xi - x0])
        if masks is not None:
            cell &= masks[y0:y1, x0:x1] == 0
        rows, cols = cell.any(1), cell.any(0)
        touches = ((rows[0] and y0 > 0) or (rows[-1] and y1 < H) or (cols[0] and x0 > 0) or (cols[-1] and x1 < W))
        if not touches or win >= max_window:
            break
        win *= 2
    region = np.zeros((H, W), bool)
    region[y0:y1, x0:x1] = cell
    return region


# ------------------------------------------------------------------ editing with undo
@dataclass(frozen=True)
class Change:
    """What one edit (or undo/redo) changed: planes ``z0:z1`` and the box ``y0:y1, x0:x1``.

    `label` is the cell drawn or kept (brush, outline, merge, click to add), else 0.
    """
    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int
    label: int = 0

    @property
    def empty(self) -> bool:
        return self.z1 <= self.z0 or self.y1 <= self.y0 or self.x1 <= self.x0


@dataclass
class _Step:
    where: tuple[slice, slice, slice]
    before: np.ndarray
    after: np.ndarray
    label: int


class MaskEditor:
    """Editable masks (Y, X) or (Z, Y, X) with undo/redo of whole strokes.

    Every method edits one plane `z` (0 for a 2D image), except :meth:`delete` and :meth:`merge`,
    which act on whole (3D) cells. New cells get a label above every label in use; labels are not
    renumbered while editing, so a 3D cell keeps one label across planes. `masks` is the current
    label array (uint16, or uint32 beyond 65535 labels); :func:`relabel` it for saving.
    Each edit returns a :class:`Change`; an edit that would change nothing raises CellposeWebError
    and is not recorded.

    Examples
    --------
    >>> ed = MaskEditor(np.zeros((64, 64), np.uint16))
    >>> ch = ed.outline([(10, 10), (10, 30), (30, 30), (30, 10)])
    >>> ed.n_cells, ed.n_edits
    (1, 1)
    >>> _ = ed.undo(); ed.n_cells, ed.n_edits
    (0, 0)
    """

    def __init__(self, masks: np.ndarray, max_steps: int = 100):
        m = np.asarray(masks)
        if m.ndim not in (2, 3) or not np.issubdtype(m.dtype, np.integer) or (m.size and m.min() < 0):
            raise CellposeWebError(f"Masks must be a label image (Y, X) or (Z, Y, X) of whole numbers >= 0; got "
                                   f"{m.dtype} of shape {m.shape}.")
        self.is_stack = m.ndim == 3
        self._m = (m if self.is_stack else m[None]).astype(_out_dtype(int(m.max(initial=0)) + 1), copy=True)
        self._area = np.bincount(self._m.ravel())  # pixels per label, kept up to date per edit
        self._next = len(self._area)
        self.max_steps = int(max_steps)
        self._undo: list[_Step] = []
        self._redo: list[_Step] = []
        self.n_edits = 0  # edits in effect: +1 per edit or redo, -1 per undo

    # -------------------------------------------------------------- views
    @property
    def masks(self) -> np.ndarray:
        """Current labels, (Y, X) or (Z, Y, X) (the editor's own array: copy before changing it)."""
        return self._m if self.is_stack else self._m[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.masks.shape

    @property
    def n_planes(self) -> int:
        return self._m.shape[0]

    @property
    def n_cells(self) -> int:
        return int(np.count_nonzero(self._area[1:]))

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def plane(self, z: int = 0) -> np.ndarray:
        """Labels of plane `z` (Y, X) (a view)."""
        return self._m[self._z(z)]

    def label_at(self, y: int, x: int, z: int = 0) -> int:
        return label_at(self.plane(z), y, x)

    # -------------------------------------------------------------- edits
    def outline(self, points: Sequence[Sequence[float]], z: int = 0, min_pixels: int = 5) -> Change:
        """Closed outline through (y, x) points -> a new cell of the background pixels inside it."""
        pts = _points(points, "outline")
        if len(pts) < 3:
            raise CellposeWebError("An outline needs at least 3 points: press, draw around the cell, release.")
        z = self._z(z)
        (y0, y1, x0, x1), region = _polygon_crop(pts, self._m.shape[1:])
        old = self._m[z, y0:y1, x0:x1]
        free = _free_part(region, old, keep_largest=True)
        if int(free.sum()) < max(1, int(min_pixels)):
            raise CellposeWebError(_NO_FREE)
        return self._apply(z, (y0, y1, x0, x1), free, self._new_label())

    def brush(self, points: Sequence[Sequence[float]], radius: float, z: int = 0, label: int | None = None) -> Change:
        """Brush stroke: extends cell `label` (the selected cell) over background where the stroke
        touches it, or starts a new cell (label None or 0, or a stroke that does not touch cell
        `label`: as in Cellpose, a stroke of its own is a cell of its own, never a detached piece).

        Touching: a painted background pixel next to (8-neighbours) a pixel of the cell on this plane,
        or on the cell's pixels on the plane above or below (a 3D cell continued). Only the painted
        pieces connected to the cell are added; a new cell keeps the largest piece."""
        pts = _points(points, "brush stroke")
        if len(pts) == 0:
            raise CellposeWebError("Nothing was painted: drag on the image with the brush.")
        z = self._z(z)
        radius = _check_radius(radius, self._m.shape[1:])
        box, region = _brush_crop(pts, radius, self._m.shape[1:])
        old = self._m[z, box[0]:box[1], box[2]:box[3]]
        extend = label is not None and int(label) > 0
        if extend and not (0 < int(label) < len(self._area) and self._area[int(label)] > 0):
            raise CellposeWebError(f"Cell {label} no longer exists; select a cell again or paint without one.")
        if extend:
            free = self._touching(_free_part(region, old, keep_largest=False), z, box, int(label))
            extend = bool(free.any())  # a stroke away from the selected cell starts a new one
        if not extend:
            free = _free_part(region, old, keep_largest=True)
        if not free.any():
            raise CellposeWebError(_NO_FREE)
        return self._apply(z, box, free, int(label) if extend else self._new_label())

    def _touching(self, free: np.ndarray, z: int, box: Box, label: int) -> np.ndarray:
        """The connected pieces (8-connectivity) of `free` (bool, the crop `box` of plane z) that touch
        cell `label`: 8-adjacent to it on plane z, or over it on plane z - 1 or z + 1."""
        y0, y1, x0, x1 = box
        Y, X = self._m.shape[1:]
        py0, py1, px0, px1 = max(y0 - 1, 0), min(y1 + 1, Y), max(x0 - 1, 0), min(x1 + 1, X)
        cell = self._m[z, py0:py1, px0:px1] == label
        near = ndi.binary_dilation(cell, structure=np.ones((3, 3), bool))[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
        for zz in (z - 1, z + 1):
            if 0 <= zz < self._m.shape[0]:
                near = near | (self._m[zz, y0:y1, x0:x1] == label)
        pieces, n = ndi.label(free, structure=np.ones((3, 3), bool))
        keep = np.unique(pieces[near & free])
        keep = keep[keep > 0]
        return np.isin(pieces, keep) if n and keep.size else np.zeros_like(free)

    def erase(self, points: Sequence[Sequence[float]], radius: float, z: int = 0) -> Change:
        """Eraser stroke: sets cell pixels along the path (disks of `radius`) to background."""
        pts = _points(points, "eraser stroke")
        if len(pts) == 0:
            raise CellposeWebError("Nothing was erased: drag over cells with the eraser.")
        z = self._z(z)
        box, region = _brush_crop(pts, _check_radius(radius, self._m.shape[1:]), self._m.shape[1:])
        old = self._m[z, box[0]:box[1], box[2]:box[3]]
        region &= old > 0
        if not region.any():
            raise CellposeWebError("The eraser touched no cell; drag over a cell to erase part of it.")
        return self._apply(z, box, region, 0)

    def add_region(self, region: np.ndarray, z: int = 0, min_pixels: int = 1) -> Change:
        """Add bool `region` (Y, X) of plane `z` as a new cell (background pixels only, largest piece)."""
        z = self._z(z)
        region = np.asarray(region, bool)
        if region.shape != self._m.shape[1:]:
            raise CellposeWebError(f"Region of shape {region.shape} does not match the plane {self._m.shape[1:]}.")
        ys, xs = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
        if len(ys) == 0:
            raise CellposeWebError("Nothing to add: the region is empty.")
        box = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
        crop = region[box[0]:box[1], box[2]:box[3]]
        free = _free_part(crop, self._m[z, box[0]:box[1], box[2]:box[3]], keep_largest=True)
        if int(free.sum()) < max(1, int(min_pixels)):
            raise CellposeWebError(_NO_FREE)
        return self._apply(z, box, free, self._new_label())

    def add_from_flows(self, dP: np.ndarray, cellprob: np.ndarray, y: float, x: float, z: int = 0,
                       min_pixels: int = 5, **kwargs) -> Change:
        """Click to add: :func:`cell_from_flows` at (y, x) on plane `z` (flows of that plane)."""
        z = self._z(z)
        region = cell_from_flows(dP, cellprob, y, x, masks=self._m[z], **kwargs)
        if int(region.sum()) < max(1, int(min_pixels)):
            raise CellposeWebError("No cell found under the click in the network's output; draw it with the "
                                   "outline or brush tool instead.")
        return self.add_region(region, z, min_pixels=min_pixels)

    def delete(self, labels: int | Sequence[int]) -> Change:
        """Remove cells (on every plane)."""
        labs = [int(v) for v in np.atleast_1d(labels) if 0 < int(v) < len(self._area) and self._area[int(v)] > 0]
        if not labs:
            raise CellposeWebError("No cell selected: click on a cell first, then delete it.")
        where = self._bbox(np.isin(self._m, labs))
        old = self._m[where]
        return self._record(where, np.where(np.isin(old, labs), 0, old).astype(old.dtype), 0)

    def merge(self, a: int, b: int, z: int = 0) -> Change:
        """Cells `a` and `b` become one (label `a`, on every plane); the thin gap between them in
        plane `z` joins too."""
        a, b = _check_merge(self._m, a, b)
        z = self._z(z)
        where = self._bbox((self._m == a) | (self._m == b), pad=3)
        new = self._m[where].copy()
        new[new == b] = a
        zi = z - where[0].start
        if 0 <= zi < new.shape[0]:
            pl = new[zi]
            pl[_join_gap(pl == a) & (pl == 0)] = a
        return self._record(where, new, a)

    def undo(self) -> Change:
        if not self._undo:
            raise CellposeWebError("Nothing to undo.")
        step = self._undo.pop()
        self._put(step.where, step.before)
        self._redo.append(step)
        self.n_edits -= 1
        return self._change(step.where, step.label)

    def redo(self) -> Change:
        if not self._redo:
            raise CellposeWebError("Nothing to redo.")
        step = self._redo.pop()
        self._put(step.where, step.after)
        self._undo.append(step)
        self.n_edits += 1
        return self._change(step.where, step.label)

    # -------------------------------------------------------------- internals
    def _z(self, z: int) -> int:
        z = int(z)
        if not 0 <= z < self._m.shape[0]:
            raise CellposeWebError(f"Plane {z} does not exist; this stack has planes 0..{self._m.shape[0] - 1}.")
        return z

    def _new_label(self) -> int:
        return self._next

    def _bbox(self, sel: np.ndarray, pad: int = 0) -> tuple[slice, slice, slice]:
        """Bounding box (Z, Y, X slices) of bool `sel` (Z, Y, X), padded by `pad` px in Y and X."""
        out = []
        for i in range(3):
            v = np.nonzero(sel.any(axis=tuple(j for j in range(3) if j != i)))[0]
            if len(v) == 0:
                raise CellposeWebError("Nothing to change.")
            p = pad if i else 0
            out.append(slice(max(int(v[0]) - p, 0), min(int(v[-1]) + 1 + p, sel.shape[i])))
        return tuple(out)

    def _apply(self, z: int, box: Box, pixels: np.ndarray, value: int) -> Change:
        y0, y1, x0, x1 = box
        where = (slice(z, z + 1), slice(y0, y1), slice(x0, x1))
        new = self._m[where].copy()
        new[0][pixels] = value
        return self._record(where, new, value)

    def _record(self, where: tuple[slice, slice, slice], new: np.ndarray, label: int) -> Change:
        before = self._m[where].copy()
        if np.array_equal(before, new):
            raise CellposeWebError("This edit changes nothing.")
        self._put(where, new)
        self._undo.append(_Step(where, before, new.copy(), int(label)))
        del self._undo[:-self.max_steps]
        self._redo.clear()
        self.n_edits += 1
        return self._change(where, label)

    def _put(self, where: tuple[slice, slice, slice], new: np.ndarray) -> None:
        old = self._m[where]
        top = int(new.max(initial=0))
        if top >= len(self._area):
            self._area = np.concatenate([self._area, np.zeros(top + 1 - len(self._area), self._area.dtype)])
        if top >= np.iinfo(self._m.dtype).max:
            self._m = self._m.astype(np.uint32)
            old = self._m[where]
        n = len(self._area)
        self._area -= np.bincount(old.ravel(), minlength=n)[:n]
        self._area += np.bincount(new.ravel(), minlength=n)[:n]
        self._m[where] = new
        self._next = max(self._next, top + 1)

    def _change(self, where: tuple[slice, slice, slice], label: int) -> Change:
        return Change(where[0].start, where[0].stop, where[1].start, where[1].stop, where[2].start,
                      where[2].stop, int(label))
