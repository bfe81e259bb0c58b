"""Cellpose 4 dynamics: flows from masks, masks from flows, and label-image utilities.

Everything here reproduces Cellpose 4.2.1.1 (``cellpose.dynamics`` / ``cellpose.utils``) and is written
from the documented behaviour (see ``shared/reference/CELLPOSE_FACTS.md`` sections 3 and 4).

Conventions
-----------
- Label images: (Y, X) or (Z, Y, X) integer arrays, 0 = background, 1, 2, ... = objects.
- Flows: float32 (2, Y, X) = [dY, dX] or (3, Z, Y, X) = [dZ, dY, dX]. ``masks_to_flows`` gives unit
  vectors; the network predicts about 5x those ("network units").
- ``device``: None (CPU) or a ``torch.device`` / device string. Inputs and outputs are numpy arrays;
  the heavy loops run in torch on that device.

Speed notes (equal results, less work than Cellpose):
- Heat diffusion runs as dense sums of shifted images (3x3 in 2D, 7-point in 3D, same summation order
  as Cellpose, so the heat is bit-identical), with a per-pixel gather only where two labels touch.
- Euler integration drops duplicate trajectories: pixels whose float32 positions became identical
  follow the same path from then on, so only one of them is integrated.
- The flow check (``flow_error`` in 2D) runs each object only for the steps its own size needs
  (2 * (height + width + 2), where Cellpose uses the largest object's count for all), in phases on
  shrinking boxes: once the objects that still need steps fit in half the area, only that box goes on.
  A large blob then costs its own box, not the whole image for its steps. Objects whose error lands
  within 0.05 of the threshold are recomputed with Cellpose's count, so keep/remove decisions match.
- Seed growth runs for all seeds at once as a 5-step max-dilation of a "seed rank" image limited to
  histogram bins with more than 2 hits; the highest-ranked (largest) seed wins overlaps, as in Cellpose.
- On the CPU the loops (hundreds of small torch ops) run with one intra-op thread: on a shared machine
  torch's thread barriers made them 4-17x slower with 2 threads. Set the environment variable
  CELLPOSE_WEB_DYNAMICS_THREADS (e.g. 2) to allow more on a dedicated machine.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from cellpose_web import transforms
from cellpose_web.errors import CellposeWebError
from cellpose_web.overlap import iou_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "masks_to_flows",
    "labels_to_flows",
    "follow_flows",
    "get_masks",
    "compute_masks",
    "flow_error",
    "remove_bad_flow_masks",
    "fill_holes_and_remove_small_masks",
    "stitch3D",
    "remove_edge_masks",
    "diameters",
    "masks_to_outlines",
    "outlines_list",
    "dx_to_circ",
]


_RPAD = 20  # histogram padding used by Cellpose's get_masks
# Large images are scanned in bands (or chunks of points) of about this many pixels: per-label sums,
# flow errors, the histogram and seeds of get_masks, hole detection, renumbering. The temporaries then
# stay in the CPU's caches instead of being int64/float64 copies of the whole image (4096 x 4096:
# get_masks 1.6 s -> 0.5 s); every result is the same as from one pass.
BAND_PIXELS = 1 << 18
_MERGE_AT = (0.2, 0.3, 0.4, 0.55, 0.75)  # fractions of niter where identical trajectories are merged


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _device(device) -> torch.device:
    """None -> CPU; a string or torch.device -> that device."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise CellposeWebError(f"Unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:0'.") from e
    raise CellposeWebError(f"device must be None, a string or a torch.device, not {type(device).__name__}.")


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """Limit torch intra-op threads (of this thread) while dynamics loops run on the CPU."""
    if device.type != "cpu":
        yield
        return
    try:
        want = max(1, int(os.environ.get("CELLPOSE_WEB_DYNAMICS_THREADS", "1")))
    except ValueError:
        want = 1
    cur = torch.get_num_threads()
    if want >= cur:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(cur)


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists etc.
        raise CellposeWebError(f"{name} could not be read as an array ({e}).") from e
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise CellposeWebError(f"{name} must be a numeric array, got dtype {arr.dtype}.")
    return arr


def _as_labels(x, name: str = "masks", ndims: Sequence[int] = (2, 3)) -> np.ndarray:
    """Validate a label image: numeric, whole numbers >= 0, with an allowed number of dimensions."""
    arr = _to_numpy(x, name)
    if arr.ndim not in ndims:
        want = " or ".join({2: "2D (Y, X)", 3: "3D (Z, Y, X)"}[d] for d in ndims)
        raise CellposeWebError(
            f"{name} must be a {want} label image, but it has {arr.ndim} dimension(s) (shape {arr.shape})."
        )
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "c":
        raise CellposeWebError(f"{name} must hold whole numbers (labels), not complex values.")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise CellposeWebError(f"{name} contains NaN or infinite values; a label image holds whole numbers >= 0.")
        if (arr != np.floor(arr)).any():
            raise CellposeWebError(f"{name} must hold whole numbers (0 = background, 1, 2, ... = objects).")
        arr = arr.astype(np.int64)
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise CellposeWebError(f"{name} has negative values; labels must be 0 (background) or positive.")
    return arr


def _label_counts(lab: np.ndarray, nmax: int | None = None) -> np.ndarray:
    """Pixels per label value 0..max (int64), counted in chunks (no int64 copy of the image)."""
    flat = np.ascontiguousarray(lab).reshape(-1)
    nmax = (int(flat.max()) if flat.size else 0) if nmax is None else nmax
    counts = np.zeros(nmax + 1, dtype=np.int64)
    for c0 in range(0, flat.size, BAND_PIXELS):
        counts += np.bincount(flat[c0:c0 + BAND_PIXELS].astype(np.int64, copy=False), minlength=nmax + 1)
    return counts


def _label_dtype(nmax: int):
    return np.uint16 if nmax < 2**16 else np.uint32


def _first_appearance_lut(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """Look-up table old label -> new label, numbering labels 1..N by first appearance in C order.

    This is the order ``fastremap.renumber`` gives. Returns (lut, N); 0 stays 0.
    """
    flat = np.ascontiguousarray(lab).reshape(-1)
    nmax = int(flat.max()) if flat.size else 0
    lut = np.zeros(nmax + 1, dtype=np.int64)
    if nmax == 0:
        return lut, 0
    big = flat.size
    first = torch.full((nmax + 1,), big, dtype=torch.int64)
    for c0 in range(0, big, BAND_PIXELS):  # the first position of each label: a minimum, in chunks
        c1 = min(big, c0 + BAND_PIXELS)
        ft = torch.from_numpy(flat[c0:c1].astype(np.int64, copy=False))
        first.scatter_reduce_(0, ft, torch.arange(c0, c1, dtype=torch.int64), reduce="amin", include_self=True)
    first = first.numpy()
    first[0] = big
    present = np.flatnonzero(first < big)
    order = present[np.argsort(first[present], kind="stable")]
    lut[order] = np.arange(1, len(order) + 1)
    return lut, len(order)


def _renumber_first(lab: np.ndarray, dtype=None) -> np.ndarray:
    """Relabel 1..N in order of first appearance (like ``fastremap.renumber``)."""
    if lab.size == 0:
        return lab.astype(dtype or lab.dtype)
    if int(lab.max()) > 4 * lab.size + 2**16:  # very sparse label values: compress first
        uniq, inv = np.unique(lab, return_inverse=True)
        lab = inv.reshape(lab.shape) + (0 if uniq[0] == 0 else 1)
    lut, n = _first_appearance_lut(lab)
    dtype = dtype or _label_dtype(n)
    return lut.astype(dtype)[lab]


def _renumber_sorted(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel 1..N keeping the order of the label values (0 stays 0). Returns (int64 labels, N)."""
    if lab.size == 0:
        return lab.astype(np.int64), 0
    nmax = int(lab.max())
    if nmax > 4 * lab.size + 2**16:
        uniq, inv = np.unique(lab, return_inverse=True)
        out = inv.reshape(lab.shape).astype(np.int64)
        if uniq[0] != 0:
            out += 1
        return out, int(out.max())
    present = np.bincount(lab.reshape(-1).astype(np.int64, copy=False), minlength=nmax + 1) > 0
    present[0] = False
    lut = np.zeros(nmax + 1, dtype=np.int64)
    n = int(present.sum())
    lut[present] = np.arange(1, n + 1)
    return lut[lab], n


def _max_filter(x: torch.Tensor, size: int, dims: Sequence[int]) -> torch.Tensor:
    """Max filter of odd ``size`` along ``dims`` (stride 1, window clipped at the borders)."""
    k = size // 2
    for ax in dims:
        n = x.shape[ax]
        out = x.clone()
        for d in range(1, k + 1):
            if d >= n:
                break
            a = out.narrow(ax, 0, n - d)
            torch.maximum(a, x.narrow(ax, d, n - d), out=a)
            b = out.narrow(ax, d, n - d)
            torch.maximum(b, x.narrow(ax, 0, n - d), out=b)
        x = out
    return x


# ----------------------------------------------------------------------------------------------
# masks -> flows (heat diffusion)
# ----------------------------------------------------------------------------------------------
def _scatter_min_max(idx: np.ndarray, vals: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    it = torch.from_numpy(idx)
    vt = torch.from_numpy(vals)
    mn = torch.zeros(n, dtype=vt.dtype).scatter_reduce_(0, it, vt, reduce="amin", include_self=False)
    mx = torch.zeros(n, dtype=vt.dtype).scatter_reduce_(0, it, vt, reduce="amax", include_self=False)
    return mn.numpy(), mx.numpy()


def _first_argmin_per_label(lbl: np.ndarray, dist: np.ndarray, n: int) -> np.ndarray:
    """Per label (0..n-1) the position (into ``lbl``) of the first element with the smallest ``dist``."""
    lt = torch.from_numpy(lbl)
    dt = torch.from_numpy(dist)
    dmin = torch.zeros(n, dtype=dt.dtype).scatter_reduce_(0, lt, dt, reduce="amin", include_self=False)
    cand = dt == dmin[lt]
    pos = torch.arange(len(lbl), dtype=torch.int64)
    big = len(lbl)
    first = torch.full((n,), big, dtype=torch.int64)
    first.scatter_reduce_(0, lt[cand], pos[cand], reduce="amin", include_self=True)
    return first.numpy()


def _centers_and_iters(lab: np.ndarray, nlab: int) -> tuple[np.ndarray, int]:
    """Diffusion sources (one pixel per object, (nlab, ndim) absolute coords) and Cellpose's n_iter.

    2D: the mean of the object's pixels (relative to its bounding box) rounded half-to-even; if that
    pixel is not in the object, the object pixel closest to it (first in raster order on ties).
    n_iter = 2 * max(bbox height + bbox width + 2).
    3D: the object voxel closest to the (unrounded) mean; n_iter = 6 * max(sum of (extent + 1)).
    """
    ndim = lab.ndim
    if ndim == 2:
        return _centers_and_iters_2d(lab, nlab, ndi.find_objects(lab, max_label=nlab))
    coords = np.nonzero(lab)
    lbl = lab[coords].astype(np.int64) - 1
    mins, maxs = [], []
    for c in coords:
        mn, mx = _scatter_min_max(lbl, c.astype(np.int64), nlab)
        mins.append(mn)
        maxs.append(mx)
    rel = [c - mn[lbl] for c, mn in zip(coords, mins)]
    cnt = np.bincount(lbl, minlength=nlab).astype(np.float64)
    centers = np.zeros((nlab, ndim), dtype=np.int64)
    if ndim == 2:
        means = [np.bincount(lbl, weights=r, minlength=nlab) / cnt for r in rel]
        rc = [np.round(m).astype(np.int64) for m in means]
        cy, cx = rc[0] + mins[0], rc[1] + mins[1]
        inside = lab[cy, cx].astype(np.int64) == np.arange(1, nlab + 1)
        centers[:, 0], centers[:, 1] = cy, cx
        if not inside.all():
            bad = ~inside
            sel = bad[lbl]
            lsel = lbl[sel]
            d = (rel[1][sel] - rc[1][lsel]) ** 2 + (rel[0][sel] - rc[0][lsel]) ** 2
            first = _first_argmin_per_label(lsel, d, nlab)
            idx = first[bad]
            centers[bad, 0] = coords[0][sel][idx]
            centers[bad, 1] = coords[1][sel][idx]
        ext = (maxs[0] - mins[0] + 1) + (maxs[1] - mins[1] + 1) + 2
        n_iter = 2 * int(ext.max())
    else:
        # Cellpose works with bbox-relative coordinates + 1 (padding); keep that for identical ties
        r1 = [r + 1 for r in rel]
        means = [np.bincount(lbl, weights=r, minlength=nlab) / cnt for r in r1]
        z, y, x = r1
        d = (z - means[0][lbl]) ** 2 + (x - means[2][lbl]) ** 2 + (y - means[1][lbl]) ** 2
        first = _first_argmin_per_label(lbl, d, nlab)
        for k in range(3):
            centers[:, k] = coords[k][first]
        ext = sum((maxs[k] - mins[k] + 1) + 1 for k in range(3))
        n_iter = 6 * int(ext.max())
    return centers, n_iter


def _row_bands(shape: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges of about BAND_PIXELS pixels covering a (Y, X) image."""
    rows = max(1, BAND_PIXELS // max(1, int(shape[1])))
    for r0 in range(0, int(shape[0]), rows):
        yield r0, min(int(shape[0]), r0 + rows)


def _halo_bands(shape: Sequence[int], halo: int, device: torch.device) -> Iterator[tuple[int, int, int, int]]:
    """Bands of an array of ``shape`` along its first axis for a local filter that reaches ``halo``
    elements: (r0, r1, a, b) = the rows [r0, r1) to keep, computed from the rows [a, b) around them
    (the whole array in one band off the CPU)."""
    n = int(shape[0])
    rows = n if device.type != "cpu" else max(1, 4 * halo, BAND_PIXELS // max(1, math.prod(shape[1:])))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        yield r0, r1, max(0, r0 - halo), min(n, r1 + halo)


def _centers_and_iters_2d(lab: np.ndarray, nlab: int, slices: list) -> tuple[np.ndarray, int]:
    """The 2D case of ``_centers_and_iters``, from per-label coordinate sums taken in row bands.

    ``slices``: ``ndi.find_objects(lab)`` (every label 1..nlab present). The sums are sums of integers,
    exact in float64 in any order, so the means (and the rounded centres) are those of one pass.
    """
    box = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], dtype=np.int64)
    sy = np.zeros(nlab + 1)
    sx = np.zeros(nlab + 1)
    cnt = np.zeros(nlab + 1, dtype=np.int64)
    for r0, r1 in _row_bands(lab.shape):
        yy, xx = np.nonzero(lab[r0:r1])
        v = lab[r0:r1][yy, xx]
        sy += np.bincount(v, weights=yy + r0, minlength=nlab + 1)
        sx += np.bincount(v, weights=xx, minlength=nlab + 1)
        cnt += np.bincount(v, minlength=nlab + 1)
    cnt = cnt[1:].astype(np.float64)
    # mean of the box-relative coordinates: (sum - count * box start) / count, as in one pass
    ry = np.round((sy[1:] - cnt * box[:, 0]) / cnt).astype(np.int64)
    rx = np.round((sx[1:] - cnt * box[:, 2]) / cnt).astype(np.int64)
    centers = np.stack([ry + box[:, 0], rx + box[:, 2]], 1)
    bad = np.flatnonzero(lab[centers[:, 0], centers[:, 1]] != np.arange(1, nlab + 1))
    for i in bad:  # the mean is outside the object: its pixel closest to it, first in raster order
        yy, xx = np.nonzero(lab[slices[i]] == i + 1)
        k = int(np.argmin((xx - rx[i]) ** 2 + (yy - ry[i]) ** 2))
        centers[i] = yy[k] + box[i, 0], xx[k] + box[i, 2]
    ext = (box[:, 1] - box[:, 0]) + (box[:, 3] - box[:, 2]) + 2
    return centers, 2 * int(ext.max())


def _heat_dtype(shape: Sequence[int], device: torch.device) -> torch.dtype:
    """float64 heat, float32 for very large images and on MPS (as Cellpose)."""
    return torch.float32 if (math.prod(s + 2 for s in shape) > 4e7 or device.type == "mps") else torch.float64


def _diffuse_flows(lab: np.ndarray, nlab: int, device: torch.device, niter: int | None) -> torch.Tensor:
    """Unit flows (ndim, *shape) float64 on ``device`` for a label image with labels 1..nlab."""
    ndim = lab.ndim
    centers, n_auto = _centers_and_iters(lab, nlab)
    n_iter = n_auto if niter is None else int(niter)
    T = _diffuse_heat(lab, nlab, centers, n_iter, device, _heat_dtype(lab.shape, device))
    fg = torch.from_numpy(lab > 0).to(device)
    # central differences on the raw heat, only at object pixels
    grads = []
    for k in range(ndim):
        hi = tuple(slice(2, None) if j == k else slice(1, -1) for j in range(ndim))
        lo = tuple(slice(None, -2) if j == k else slice(1, -1) for j in range(ndim))
        grads.append((T[hi] - T[lo]).to(torch.float64))
    mu = torch.stack(grads) * fg
    norm = (mu**2).sum(0).sqrt()
    mu /= 1e-60 + norm
    return mu


def _diffuse_heat(lab: np.ndarray, nlab: int, centers: np.ndarray, n_iter: int, device: torch.device,
                  dtype: torch.dtype, T0: torch.Tensor | None = None, separable: bool = False,
                  neighbours: np.ndarray | None = None) -> torch.Tensor:
    """Cellpose's heat diffusion: ``n_iter`` steps of (+1 at each centre, mean of the 3x3 / 7-point
    stencil over the pixel's own object). Returns the zero-padded heat (Y + 2, X + 2) / (Z + 2, ...).

    ``centers`` (nlab, ndim) are the sources in ``lab``'s coordinates; ``T0`` (padded, optional) is the
    starting heat (zeros by default); labels other than 1..nlab are not allowed. ``separable`` (2D) sums
    the 3x3 box as rows then columns (4 additions instead of 8; rounding differs from Cellpose's order).
    ``neighbours`` (same shape as ``lab``, optional): a label image that also holds the objects diffused
    elsewhere at the same time; pixels whose stencil reaches one of them are summed the way they are
    when those objects are diffused here too, so splitting a set of objects into windows gives the same
    heat, bit for bit.
    """
    ndim = lab.ndim
    shape = lab.shape
    pshape = tuple(s + 2 for s in shape)
    ldt = np.int32 if nlab < 2**31 - 1 else np.int64
    Lp = F.pad(torch.from_numpy(lab.astype(ldt, copy=False)).to(device), (1, 1) * ndim)
    if neighbours is not None:
        Lp = F.pad(torch.from_numpy(neighbours.astype(ldt, copy=False)).to(device), (1, 1) * ndim)
        own = F.pad(torch.from_numpy(lab > 0).to(device), (1, 1) * ndim)
    Lf = Lp.reshape(-1)
    strides = [math.prod(pshape[k + 1:]) for k in range(ndim)]
    inner = tuple(slice(1, -1) for _ in range(ndim))
    Lc = Lp[inner]
    fg = Lc > 0 if neighbours is None else own[inner]

    # Neighbour offsets of the stencil in Cellpose's order (self first). The update is a dense sum of
    # the shifted heat images (background holds 0, so it adds nothing); only at "conflict" pixels, whose
    # stencil reaches another (non-zero) label, the sum is recomputed from a gather without that label.
    if ndim == 2:
        offs = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    else:
        offs = [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    nst = len(offs)

    def shifted(t, off):
        return t[tuple(slice(1 + o, t.shape[k] - 1 + o) for k, o in enumerate(off))]

    conflict = torch.zeros_like(fg)
    for off in offs[1:]:
        nb = shifted(Lp, off)
        conflict |= (nb != Lc) & (nb > 0)
    conflict &= fg
    # background pixels next to the foreground get a non-zero box sum: reset them to 0
    near = torch.zeros_like(fg)
    for off in offs[1:]:
        near |= shifted(Lp, off) > 0 if neighbours is None else shifted(own, off)
    near &= ~fg

    def flat_padded(mask):
        idx = torch.nonzero(mask)
        return sum((idx[:, k] + 1) * strides[k] for k in range(ndim))

    def flat_inner(mask):
        idx = torch.nonzero(mask)
        istr = [math.prod(shape[k + 1:]) for k in range(ndim)]
        return sum(idx[:, k] * istr[k] for k in range(ndim))

    cpix = flat_padded(conflict)
    off_flat = torch.tensor([sum(o[k] * strides[k] for k in range(ndim)) for o in offs], device=device)
    nb_idx = (cpix[None, :] + off_flat[:, None]).contiguous()  # (nst, nc)
    nb_w = (Lf[nb_idx] == Lf[cpix][None, :]).to(dtype)
    fix_idx = torch.cat([flat_inner(conflict), flat_inner(near)])
    n_conf = cpix.numel()
    fix_vals = torch.zeros(fix_idx.numel(), dtype=dtype, device=device)

    cflat = torch.from_numpy(centers).to(device)
    cflat = sum((cflat[:, k] + 1) * strides[k] for k in range(ndim))
    ones_c = torch.ones(cflat.numel(), dtype=dtype, device=device)
    nb_flat = nb_idx.reshape(-1)

    T = torch.zeros(pshape, dtype=dtype, device=device) if T0 is None else T0.clone()
    T2 = torch.zeros_like(T)
    S = torch.empty(shape, dtype=dtype, device=device)
    Sf = S.view(-1)
    Rsep = torch.empty((pshape[0], shape[1]), dtype=dtype, device=device) if separable and ndim == 2 else None
    for _ in range(n_iter):
        Tf = T.view(-1)
        Tf.index_add_(0, cflat, ones_c)
        # neighbours summed one after the other in Cellpose's order, so the heat is bit-identical
        if separable and ndim == 2:
            torch.add(T[:, :-2], T[:, 1:-1], out=Rsep)
            Rsep.add_(T[:, 2:])
            torch.add(Rsep[:-2], Rsep[1:-1], out=S)
            S.add_(Rsep[2:])
        else:
            views = [shifted(T, off) for off in offs]
            torch.add(views[0], views[1], out=S)
            for v in views[2:]:
                S.add_(v)
        if n_conf:
            g = Tf.index_select(0, nb_flat).view(nst, n_conf)
            g.mul_(nb_w)
            acc = fix_vals[:n_conf]
            torch.add(g[0], g[1], out=acc)
            for k in range(2, nst):
                acc.add_(g[k])
        if fix_idx.numel():
            Sf.index_copy_(0, fix_idx, fix_vals)
        torch.div(S, nst, out=T2[inner])
        T, T2 = T2, T
    return T


def _flows_tensor(lab: np.ndarray, device: torch.device, niter: int | None) -> torch.Tensor:
    """Unit flows float64 (ndim, *shape) on device for any non-negative label image."""
    ndim = lab.ndim
    out = torch.zeros((ndim, *lab.shape), dtype=torch.float64, device=device)
    if lab.size == 0 or lab.max() == 0:
        return out
    # work on the bounding box of the foreground (with a 1-pixel margin: gradients read neighbours)
    sl = []
    for ax in range(ndim):
        other = tuple(a for a in range(ndim) if a != ax)
        anyax = lab.any(axis=other) if other else lab > 0
        idx = np.flatnonzero(anyax)
        sl.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, lab.shape[ax])))
    crop = lab[tuple(sl)]
    crop, nlab = _renumber_sorted(crop)
    mu = _diffuse_flows(crop, nlab, device, niter)
    out[(slice(None),) + tuple(sl)] = mu
    return out


def masks_to_flows(labels, device=None, niter: int | None = None) -> np.ndarray:
    """Flows from a label image by heat diffusion from each object's centre (Cellpose 4).

    Parameters
    ----------
    labels : (Y, X) or (Z, Y, X) int array
        0 = background; labels need not be consecutive.
    device : None or torch.device
        Where to run the diffusion (CPU when None).
    niter : int, optional
        Diffusion steps; default 2 * max(bbox height + width + 2) in 2D, 6 * max(sum of extents + 3) in 3D.

    Returns
    -------
    float32 (2, Y, X) = [dY, dX] or (3, Z, Y, X) = [dZ, dY, dX] unit vectors, 0 outside objects.
    """
    lab = _as_labels(labels, "labels")
    if niter is not None and (not np.isscalar(niter) or int(niter) < 0):
        raise CellposeWebError(f"niter must be a whole number >= 0 or None, got {niter!r}.")
    device = _device(device)
    with _cpu_threads(device):
        mu = _flows_tensor(lab, device, niter)
    return mu.to(torch.float32).cpu().numpy()


def labels_to_flows(labels_list, device=None, niter: int | None = None) -> list[np.ndarray]:
    """Training targets: for each label image, float32 [labels, labels > 0.5, flows...].

    2D (Y, X) labels give (4, Y, X) = [labels, foreground, dY, dX]; 3D (Z, Y, X) give (5, Z, Y, X).
    Labels are renumbered 1..N by first appearance (as Cellpose does with fastremap.renumber).
    A (1, Y, X) array counts as 2D.
    """
    if isinstance(labels_list, np.ndarray) and labels_list.ndim == 2:
        labels_list = [labels_list]
    out = []
    for i, lbl in enumerate(labels_list):
        lab = _to_numpy(lbl, f"labels[{i}]")
        if lab.ndim == 3 and lab.shape[0] == 1:
            lab = lab[0]
        lab = _as_labels(lab, f"labels[{i}]")
        lab = _renumber_first(lab, dtype=np.int64)
        mu = masks_to_flows(lab, device=device, niter=niter)
        out.append(np.concatenate([lab[None].astype(np.float32), (lab > 0.5)[None].astype(np.float32), mu], 0))
    return out


# ----------------------------------------------------------------------------------------------
# flows -> masks
# ----------------------------------------------------------------------------------------------
def _dedupe(P: torch.Tensor, rep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge points with bit-identical coordinates (they follow identical trajectories)."""
    bits = P.reshape(-1, P.shape[-1]).view(torch.int32).to(torch.int64)
    if bits.shape[1] == 2:
        key = (bits[:, 0] << 32) | (bits[:, 1] & 0xFFFFFFFF)
        uniq, inv = torch.unique(key, return_inverse=True)
    else:
        key = torch.stack([(bits[:, 0] << 32) | (bits[:, 1] & 0xFFFFFFFF), bits[:, 2]], 1)
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    n = uniq.shape[0]
    flat = P.reshape(-1, P.shape[-1])
    newP = torch.empty((n, flat.shape[1]), dtype=P.dtype, device=P.device)
    newP[inv] = flat
    return newP.reshape(*P.shape[:-2], n, P.shape[-1]), inv[rep]


def follow_flows(dP, inds, niter: int = 200, device=None, interp: bool | str = True) -> torch.Tensor:
    """Euler integration of pixels along the flow field (Cellpose 4 ``steps_interp``).

    Parameters
    ----------
    dP : float array (2, Y, X) or (3, Z, Y, X)
        Flow field in pixels per step (Cellpose passes ``dP * foreground / 5``).
    inds : tuple of int arrays
        Start pixels, as returned by ``np.nonzero`` (one array per axis).
    niter : int
        Number of Euler steps.
    interp : True, "pixel" or False
        True: ``grid_sample`` in normalised coordinates (Cellpose 4, and Cellpose 3 in 3D or on a GPU).
        "pixel": bilinear interpolation in pixel coordinates, clipped to the image (Cellpose 3 in 2D on
        a CPU, ``map_coordinates``). False: the flow of the pixel the point is in (coordinates
        truncated), as Cellpose 3's ``steps2D`` (its size model uses that).

    Returns
    -------
    float32 torch tensor (ndim, npts) of final positions in pixels (y, x) / (z, y, x) on ``device``.

    Notes
    -----
    Coordinates are normalised with 2 * p / (L - 1) - 1 while ``grid_sample`` uses
    align_corners=False, exactly as Cellpose does; every step clamps to [-1, 1].
    """
    device = _device(device)
    if interp is False or interp == "pixel":
        return _steps_pixels(dP, inds, niter, device, bilinear=interp == "pixel")
    shape = dP.shape[1:]
    ndim = len(shape)
    npts = len(inds[0])
    dPt = torch.as_tensor(np.asarray(dP))
    pt = torch.zeros((*[1] * ndim, npts, ndim), dtype=torch.float32, device=device)
    im = torch.zeros((1, ndim, *shape), dtype=torch.float32, device=device)
    for n in range(ndim):
        pt[..., ndim - n - 1] = torch.as_tensor(np.asarray(inds[n])).to(device, dtype=torch.float32)
        im[0, ndim - n - 1] = dPt[n].to(device, dtype=torch.float32)
    sh = np.array(shape)[::-1].astype("float") - 1
    for k in range(ndim):
        im[:, k] *= 2.0 / sh[k]
        pt[..., k] /= sh[k]
    pt *= 2
    pt -= 1

    # On a CPU the points go through in chunks (in raster order, so each chunk reads a band of the
    # flow field) that stay in cache for all niter steps; every point's trajectory is computed alone,
    # so chunking changes no result. On a GPU one launch for all points is faster.
    chunk = npts if device.type != "cpu" else FOLLOW_CHUNK_POINTS
    parts = [_follow_chunk(im, pt[..., i:i + chunk, :], niter) for i in range(0, max(npts, 1), max(chunk, 1))]
    pt = torch.cat(parts, 0) if len(parts) != 1 else parts[0]
    pt += 1
    pt *= 0.5
    for k in range(ndim):
        pt[:, k] *= sh[k]
    return pt.flip(1).T.contiguous()


FOLLOW_CHUNK_POINTS = 1 << 18  # points integrated together on a CPU (positions + steps: ~6 MB)


def _follow_chunk(im: torch.Tensor, pt: torch.Tensor, niter: int) -> torch.Tensor:
    """Euler steps of the points ``pt`` (normalised, (1, [1,] M, ndim)) through the flow image ``im``;
    returns their final positions as (M, ndim).

    Trajectories merge (bit-identical positions) as pixels reach their attractor; from then on they
    are integrated once. Merging happens mostly in the first half of the steps; a merge pass costs
    about as much as 5-10 steps, so there are only a few, at fixed fractions of niter.
    """
    ndim = pt.shape[-1]
    npts = pt.shape[-2]
    pt = pt.clone()
    rep = torch.arange(npts, device=pt.device)
    checks = {round(f * niter) for f in _MERGE_AT} if npts > 1 else set()
    for t in range(niter):
        d = F.grid_sample(im, pt, align_corners=False)  # (1, ndim, *[1]*(ndim-1), M)
        pt += torch.movedim(d, 1, -1)
        pt.clamp_(-1.0, 1.0)
        if t + 1 in checks and 4 <= t + 1 < niter:
            pt, rep = _dedupe(pt, rep)
    return pt.reshape(-1, ndim)[rep]


def _steps_pixels(dP, inds, niter: int, device: torch.device, bilinear: bool) -> torch.Tensor:
    """Euler steps in pixel coordinates, p <- clip(p + flow(p), 0, L - 1), all points at once.

    ``bilinear``: flow(p) interpolated between the 4 (2D) / 8 (3D) pixels around p, weights
    computed in float32 in Cellpose 3's order (corners (y0, x0), (y0, x1), (y1, x0), (y1, x1); each
    term flow * weight_y * weight_x, summed left to right); otherwise the flow of pixel int(p).

    Each point's step depends on its position only, so points whose positions are bit-identical
    follow identical trajectories from then on: they are merged (as in :func:`_follow_chunk`) and
    integrated once. In a cell's flows most of its pixels meet within 20-40 steps (450 x 450 image,
    144,000 points: 67,000 distinct after 20 steps, 6,000 after 30, 700 after 60), so the work is a
    fraction of ``niter`` x points; every position is exactly that of stepping the point alone (all
    operations are elementwise). Merge passes run while they pay (:class:`_MergeSchedule`).
    """
    flow = torch.as_tensor(np.asarray(dP, dtype=np.float32)).to(device)
    ndim = flow.shape[0]
    shape = [int(v) for v in flow.shape[1:]]
    planes = flow.reshape(ndim, -1)  # one flat plane per flow component: each corner is one gather per plane
    strides = [math.prod(shape[k + 1:]) for k in range(ndim)]
    top = torch.tensor([[v - 1] for v in shape], dtype=torch.float32, device=device)
    P = torch.stack([torch.as_tensor(np.asarray(i)) for i in inds]).to(device, torch.float32)  # (ndim, npts)
    rep = torch.arange(P.shape[1], device=device)
    merge = _MergeSchedule() if P.shape[1] > 1 else None
    step = torch.empty_like(P)
    for t in range(int(niter)):
        I = P.long()  # P >= 0: truncation is the floor
        base = I[-1].clone()
        for k in range(ndim - 1):
            base.add_(I[k], alpha=strides[k])
        if not bilinear:
            for c in range(ndim):
                step[c] = planes[c][base]
        else:
            frac = P - I.float()
            wts = (1 - frac, frac)  # per axis: the weight of the lower, of the upper pixel
            # flat index of each corner; corner bit k (from the highest) set = axis k's upper pixel,
            # which is the same pixel on the last row / column / plane
            idx = [base]
            for corner in range(1, 2 ** ndim):
                low = (corner & -corner).bit_length() - 1  # its lowest set bit: axis ndim - 1 - low
                k = ndim - 1 - low
                idx.append(idx[corner & (corner - 1)].add(I[k] < shape[k] - 1, alpha=strides[k]))
            for c in range(ndim):
                acc = None
                for corner in range(2 ** ndim):
                    v = planes[c][idx[corner]]
                    for k in range(ndim):
                        v.mul_(wts[(corner >> (ndim - 1 - k)) & 1][k])
                    if acc is None:
                        acc = v
                    else:
                        acc += v
                step[c] = acc
        P += step[:, :P.shape[1]]
        P.clamp_(min=0.0)
        torch.minimum(P, top, out=P)
        if merge is not None and merge.due(t + 1, niter):
            n = P.shape[1]
            P, rep = _dedupe_columns(P, rep)
            merge.merged(n, P.shape[1])
            step = step[:, :P.shape[1]]
    return P[:, rep]


def _dedupe_columns(P: torch.Tensor, rep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_dedupe` for points as columns (ndim, n): the distinct columns, and ``rep`` mapped to them."""
    bits = P.view(torch.int32).to(torch.int64)
    key = (bits[0] << 32) | (bits[1] & 0xFFFFFFFF)
    if P.shape[0] == 2:
        uniq, inv = torch.unique(key, return_inverse=True)
    else:
        uniq, inv = torch.unique(torch.stack([key, bits[2]], 1), dim=0, return_inverse=True)
    newP = torch.empty((P.shape[0], uniq.shape[0]), dtype=P.dtype, device=P.device)
    newP[:, inv] = P
    return newP, inv[rep]


class _MergeSchedule:
    """When :func:`_steps_pixels` merges identical positions: every ``FIRST`` steps from step ``FIRST``
    on; the gap doubles (up to ``MAX_GAP``) after a pass that removed under 10 % of the points and is
    back to ``FIRST`` after one that removed more. Only the speed depends on it, never a result."""

    FIRST, MAX_GAP = 4, 16

    def __init__(self):
        self.gap = self.FIRST
        self.next = self.FIRST

    def due(self, t: int, niter: int) -> bool:
        return t == self.next and t < niter

    def merged(self, before: int, after: int) -> None:
        self.gap = self.FIRST if after < 0.9 * before else min(self.MAX_GAP, 2 * self.gap)
        self.next += self.gap


def get_masks(p_final: torch.Tensor, inds, shape0, max_size_fraction: float = 0.4) -> np.ndarray:
    """Masks from final pixel positions (Cellpose 4 ``get_masks_torch``).

    Parameters
    ----------
    p_final : int tensor (ndim, npts)
        Final positions (truncated to int) of the pixels ``inds``.
    inds : tuple of int arrays
        Start pixels (``np.nonzero`` of the foreground).
    shape0 : tuple
        Image shape (Y, X) or (Z, Y, X).

    Returns
    -------
    uint16 (uint32 with >= 65536 seeds) label image, labels 1..N by first appearance.
    """
    shape0 = tuple(int(s) for s in shape0)
    ndim = len(shape0)
    device = p_final.device
    shape = tuple(s + 2 * _RPAD for s in shape0)
    strides = [math.prod(shape[k + 1:]) for k in range(ndim)]
    strides0 = [math.prod(shape0[k + 1:]) for k in range(ndim)]
    npts = int(p_final.shape[1])
    # the points are handled in chunks on a CPU (no int64 copies of every point's coordinates)
    chunks = [(c0, min(npts, c0 + BAND_PIXELS)) for c0 in range(0, npts, BAND_PIXELS)] \
        if device.type == "cpu" else [(0, npts)]

    def hist_index(c0: int, c1: int) -> torch.Tensor:
        """Flat index into the padded histogram of the final positions of points c0..c1."""
        pt = p_final[:, c0:c1].to(torch.int64) + _RPAD
        pt.clamp_(min=0)
        for i in range(ndim):
            pt[i].clamp_(max=shape0[i] + _RPAD - 1)
        return sum(pt[k] * strides[k] for k in range(ndim))

    def start_index(c0: int, c1: int) -> torch.Tensor:
        """Flat index into the image of the start pixels c0..c1."""
        return sum(torch.as_tensor(np.asarray(inds[k][c0:c1], dtype=np.int64)).to(device) * strides0[k]
                   for k in range(ndim))

    if device.type == "cpu":
        h = torch.zeros(math.prod(shape), dtype=torch.int32, device=device)
        for c0, c1 in chunks:  # integer counts: the same in any order
            idx = hist_index(c0, c1)
            h.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.int32, device=device))
    else:
        h = torch.bincount(hist_index(0, npts), minlength=math.prod(shape)).to(torch.int32)
    h = h.reshape(shape)
    # seeds: local maxima of the histogram (5 x 5 max filter) with more than 10 hits; in bands along
    # the first axis with the filter's reach as margin, so the result is that of the whole array
    parts = []
    for r0, r1, a, b in _halo_bands(shape, 2, device):
        hb = h[a:b]
        nz = torch.nonzero(((hb == _max_filter(hb, 5, range(ndim))) & (hb > 10))[r0 - a:r1 - a])
        nz[:, 0] += r0
        parts.append(nz)
    seeds = torch.cat(parts)
    del parts
    n_seeds = seeds.shape[0]
    if n_seeds == 0:
        logger.warning("no seeds found in get_masks - no masks found.")
        return np.zeros(shape0, dtype=np.uint16)
    npts_seed = h[tuple(seeds.T)]
    isort = npts_seed.argsort()  # same call as Cellpose, so ties are ordered the same way
    seeds = seeds[isort]
    # all seeds at once: rank image (higher rank = more hits = wins overlaps), 5 x (3x3 max, & h > 2)
    rank_dtype = torch.int32 if n_seeds < 2**31 - 1 else torch.int64
    R = torch.zeros(shape, dtype=rank_dtype, device=device)
    R[tuple(seeds.T)] = torch.arange(1, n_seeds + 1, dtype=rank_dtype, device=device)
    keep = h > 2
    del h
    lo = [int(seeds[:, k].min()) - 5 for k in range(ndim)]
    hi = [int(seeds[:, k].max()) + 6 for k in range(ndim)]
    win = tuple(slice(max(a, 0), min(b, s)) for a, b, s in zip(lo, hi, shape))
    Rw, keepw = R[win], keep[win]
    grown = torch.empty_like(Rw)
    for r0, r1, a, b in _halo_bands(Rw.shape, 5, device):
        Rb, kb = Rw[a:b], keepw[a:b]
        for _ in range(5):
            Rb = _max_filter(Rb, 3, range(ndim))
            Rb *= kb
        grown[r0:r1] = Rb[r0 - a:r1 - a]
    R[win] = grown
    del grown, keep, Rw, keepw
    R = R.reshape(-1)
    M1 = torch.cat([R.index_select(0, hist_index(c0, c1)) for c0, c1 in chunks])  # rank at each final position
    del R
    # remove masks bigger than max_size_fraction of the image
    counts = torch.bincount(M1.to(torch.int64) if M1.dtype != torch.int64 else M1, minlength=n_seeds + 1)
    big = math.prod(shape0) * max_size_fraction
    bigc = counts > big
    bigc[0] = False
    if bool(bigc.any()):
        M1[bigc[M1.long()]] = 0
    # labels 1..N by first appearance in the image (raster order of the start pixels)
    first = torch.full((n_seeds + 1,), math.prod(shape0), dtype=torch.int64, device=device)
    for c0, c1 in chunks:
        first.scatter_reduce_(0, M1[c0:c1].long(), start_index(c0, c1), reduce="amin", include_self=True)
    first = first.cpu().numpy()
    first[0] = math.prod(shape0)
    present = np.flatnonzero(first < math.prod(shape0))
    order = present[np.argsort(first[present], kind="stable")]
    out_dtype = np.uint16 if n_seeds < 2**16 else np.uint32
    lut = np.zeros(n_seeds + 1, dtype=out_dtype)
    lut[order] = np.arange(1, len(order) + 1)
    out = np.zeros(shape0, dtype=out_dtype)
    flat_out = out.reshape(-1)
    M1 = M1.cpu().numpy()
    for c0, c1 in chunks:
        flat_out[start_index(c0, c1).cpu().numpy()] = lut[M1[c0:c1]]
    return out


def _check_flows(dP, cellprob) -> tuple[np.ndarray, np.ndarray]:
    dP = _to_numpy(dP, "dP")
    cellprob = _to_numpy(cellprob, "cellprob")
    if cellprob.ndim not in (2, 3):
        raise CellposeWebError(
            f"cellprob must be a 2D (Y, X) or 3D (Z, Y, X) map, but it has shape {cellprob.shape}."
        )
    if dP.ndim != cellprob.ndim + 1 or dP.shape[0] != cellprob.ndim or dP.shape[1:] != cellprob.shape:
        raise CellposeWebError(
            f"dP must have shape ({cellprob.ndim}, {', '.join(map(str, cellprob.shape))}) to match cellprob "
            f"{cellprob.shape} ([dY, dX] in 2D, [dZ, dY, dX] in 3D), but it has shape {dP.shape}."
        )
    for name, a in (("dP", dP), ("cellprob", cellprob)):
        if a.dtype.kind not in "fiub":
            raise CellposeWebError(f"{name} must be a real-valued array, got dtype {a.dtype}.")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CellposeWebError(
                f"{name} contains NaN or infinite values; check the network output or the image "
                "(NaN pixels must be replaced before segmentation)."
            )
    if dP.dtype.kind != "f":
        dP = dP.astype(np.float32)
    if cellprob.dtype.kind != "f":
        cellprob = cellprob.astype(np.float32)
    return dP, cellprob


# The flow check's first pass diffuses many objects at once on a window; a window larger than this many
# pixels is split into tiles of whole objects, so that each tile's heat (a few float32 images of the
# tile's size) stays in the CPU's caches: the cost then follows the pixels instead of streaming the whole
# window through memory every step. First pass on a 4096 x 4096 lite output, one thread, CPU time: 6.8 s
# untiled (40x the 1024 x 1024 one), 3.6 s with 512 x 512 tiles, 3.8 s with 1024 x 1024, 4.6 s with
# 256 x 256 (per-tile overhead).
HEAT_TILE_PIXELS = 512 * 512


def _heat_in_window(lab: np.ndarray, Tg: torch.Tensor, ids: np.ndarray, centers: np.ndarray, boxes: np.ndarray,
                    n_steps: int, start: bool, fast: bool = False) -> None:
    """Diffuse the objects ``ids`` (labels, 1-based) for ``n_steps`` on the bounding box that holds them.

    Other objects in that box count as background. ``Tg`` is the zero-padded (Y + 2, X + 2) heat of the
    whole image: the objects start from their heat there (or from zero when ``start`` is False) and
    their new heat is written back. ``boxes`` (N, 4) holds every object's [y0, y1, x0, x1) bounding box.
    ``fast``: float32 heat and a separable 3x3 sum (4 instead of 8
    additions on half the bytes), for the first pass of the flow check.

    A box larger than ``HEAT_TILE_PIXELS`` is split into tiles: the objects are grouped by the tile
    (a square grid of that area) that holds their box's centre, and each group runs on the union of its
    boxes. Heat never crosses from one object to another, and pixels next to an object of another group
    are summed as if that object were there, so every object's heat is bit-identical to running them
    all on one box.
    """
    b = boxes[ids - 1]
    y0, y1, x0, x1 = int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max())
    active = np.zeros(len(centers) + 1, dtype=bool)
    active[ids] = True
    side = max(16, int(math.sqrt(HEAT_TILE_PIXELS)))
    if (y1 - y0) * (x1 - x0) <= 2 * HEAT_TILE_PIXELS or len(ids) < 2:
        _heat_in_tile(lab, Tg, ids, active, centers, (y0, y1, x0, x1), n_steps, start, fast, False)
        return
    ty = ((b[:, 0] + b[:, 1]) // 2 - y0) // side
    tx = ((b[:, 2] + b[:, 3]) // 2 - x0) // side
    tile = ty * (int(tx.max()) + 1) + tx
    order = np.argsort(tile, kind="stable")
    cuts = np.flatnonzero(np.diff(tile[order])) + 1
    for grp in np.split(order, cuts):
        g = b[grp]
        # one more pixel on each side: an object at the window's edge may touch one of another tile
        win = (max(0, int(g[:, 0].min()) - 1), min(lab.shape[0], int(g[:, 1].max()) + 1),
               max(0, int(g[:, 2].min()) - 1), min(lab.shape[1], int(g[:, 3].max()) + 1))
        _heat_in_tile(lab, Tg, ids[grp], active, centers, win, n_steps, start, fast, True)


def _heat_in_tile(lab: np.ndarray, Tg: torch.Tensor, ids: np.ndarray, active: np.ndarray, centers: np.ndarray,
                  win: tuple[int, int, int, int], n_steps: int, start: bool, fast: bool,
                  split: bool) -> None:
    """Diffuse the objects ``ids`` on the window ``win`` = (y0, y1, x0, x1) (see ``_heat_in_window``).
    ``active`` (N + 1,) bool marks every object diffused in this phase; ``split``: the other active
    objects run in other tiles, and the pixels next to them are summed as in one window."""
    sl = (slice(win[0], win[1]), slice(win[2], win[3]))
    crop = lab[sl]
    if not split:
        sub = np.where(active[crop], crop, 0)
        neighbours = None
    else:
        mine = np.zeros(len(active), dtype=bool)
        mine[ids] = True
        sub = np.where(mine[crop], crop, 0)
        neighbours = np.where(active[crop], crop, 0)
    act = torch.from_numpy(sub > 0).to(Tg.device)
    pad_sl = (slice(sl[0].start, sl[0].stop + 2), slice(sl[1].start, sl[1].stop + 2))
    dtype = torch.float32 if fast else Tg.dtype
    T0 = torch.zeros((crop.shape[0] + 2, crop.shape[1] + 2), dtype=dtype, device=Tg.device)
    if start:
        T0[1:-1, 1:-1][act] = Tg[pad_sl][1:-1, 1:-1][act].to(dtype)
    c = centers[ids - 1] - np.array([sl[0].start, sl[1].start])
    T = _diffuse_heat(sub, int(crop.max()), c, n_steps, Tg.device, dtype, T0=T0, separable=fast,
                      neighbours=neighbours)
    Tg[pad_sl][1:-1, 1:-1][act] = T[1:-1, 1:-1][act].to(Tg.dtype)


def _object_heat_2d(lab: np.ndarray, nlab: int, centers: np.ndarray, n_own: np.ndarray, Tg: torch.Tensor,
                    box: np.ndarray, shrink: float = 0.5, fast: bool = True) -> np.ndarray:
    """Heat of all objects, run in phases so that the cost follows the objects, not the largest one.

    Object i needs ``n_own[i]`` steps (Cellpose's count for that object alone). All objects start
    together on the foreground's bounding box; a phase ends when the objects that still need more steps
    fit in a box of at most ``shrink`` times the area, and only those continue there; once their own
    boxes add up to less than that, each goes on alone on its own box (batched). Objects that finish
    within a phase run to the phase's end, so images of similar objects get exactly Cellpose's
    image-wide step count. ``fast``: float32 heat with a separable sum (see ``_heat_in_window``).
    ``box`` (N, 4): every object's [y0, y1, x0, x1) bounding box. Returns the steps each object ran.
    """
    order = np.argsort(n_own, kind="stable")
    nb = box[order]
    # bounding box of the objects order[i:], for every i
    suf = np.stack([np.minimum.accumulate(nb[::-1, 0])[::-1], np.maximum.accumulate(nb[::-1, 1])[::-1],
                    np.minimum.accumulate(nb[::-1, 2])[::-1], np.maximum.accumulate(nb[::-1, 3])[::-1]], 1)
    area = (suf[:, 1] - suf[:, 0]) * (suf[:, 3] - suf[:, 2])
    ran = np.zeros(nlab, dtype=np.int64)
    own_area = (nb[:, 1] - nb[:, 0]) * (nb[:, 3] - nb[:, 2])
    rest_area = np.cumsum(own_area[::-1])[::-1]  # total box area of the objects order[i:]
    done, i = 0, 0
    while i < nlab:
        if rest_area[i] <= shrink * area[i]:
            # the objects left are scattered: their own boxes hold less than their common box
            rest = order[i:]
            _heat_per_object(lab, Tg, rest + 1, centers, box, n_own[rest] - done, start=done > 0, fast=fast)
            ran[rest] = n_own[rest]
            break
        smaller = np.flatnonzero(np.minimum(area[i + 1:], rest_area[i + 1:]) <= shrink * area[i])
        j = i + 1 + int(smaller[0]) if len(smaller) else nlab
        t_end = int(n_own[order[j - 1]])
        if t_end > done:
            _heat_in_window(lab, Tg, order[i:] + 1, centers, box, t_end - done, start=done > 0, fast=fast)
            done = t_end
        ran[order[i:j]] = done
        i = j
    return ran


# Flow errors of the fast pass (own step counts, float32 heat, separable sums) differ from Cellpose's by
# at most 0.019 on the reference fixtures and 0.006 on lite's output for a 1024 x 1024 nuclei image.
# Objects whose error lies closer than this to the threshold are recomputed as Cellpose does (float64
# heat summed in Cellpose's order, Cellpose's image-wide step count).
_FLOW_ERROR_MARGIN = 0.05


def _flow_errors_2d(lab: np.ndarray, dP: np.ndarray, device: torch.device, threshold: float | None = None,
                    mu_out: np.ndarray | None = None) -> np.ndarray:
    """Per-object flow errors of a 2D label image with labels 1..N (all present).

    A fast pass (see ``_object_heat_2d``) gives every error; with ``threshold``, objects whose error is
    within ``_FLOW_ERROR_MARGIN`` of it are diffused again exactly as Cellpose does (with the objects
    touching them, whose heat their border gradients read), so the keep/remove decision is Cellpose's.
    The per-pixel errors are computed in row bands (``BAND_PIXELS``) and summed per object in one pass
    at the end, so they are the same, bit for bit, as from one whole-image pass.

    Returns errors float64 (N,); with ``mu_out`` (float32 (2, Y, X) zeros) the unit flows of the
    objects are written into it.
    """
    Ly, Lx = lab.shape
    nlab = int(lab.max())
    slices = ndi.find_objects(lab, max_label=nlab)
    centers, n_global = _centers_and_iters_2d(lab, nlab, slices)
    box = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], dtype=np.int64)
    del slices
    n_own = 2 * ((box[:, 1] - box[:, 0]) + (box[:, 3] - box[:, 2]) + 2)
    Tg = torch.zeros((Ly + 2, Lx + 2), dtype=_heat_dtype(lab.shape, device), device=device)
    _object_heat_2d(lab, nlab, centers, n_own, Tg, box)
    Tf = Tg.view(-1)
    bands = list(_row_bands(lab.shape)) if device.type == "cpu" else [(0, Ly)]
    band_fg = [np.flatnonzero(lab[r0:r1]) for r0, r1 in bands]  # int64, in raster order
    starts = np.cumsum([0] + [len(f) for f in band_fg])
    err_px = torch.empty(int(starts[-1]), dtype=torch.float64, device=device)

    def pixel_errors(only: np.ndarray | None = None) -> None:
        """Per-pixel errors into ``err_px`` (only for the pixels of labels marked in ``only``)."""
        for (r0, r1), f, off in zip(bands, band_fg, starts):
            blk = lab[r0:r1].reshape(-1)
            if only is not None:
                sel = np.flatnonzero(only[blk[f]])
                if not len(sel):
                    continue
                f = f[sel]
            ft = torch.from_numpy(f).to(device)
            pp = (ft // Lx + r0 + 1) * (Lx + 2) + (ft % Lx + 1)
            at = lambda d: Tf.index_select(0, pp + d)  # noqa: E731
            mu = torch.stack([at(Lx + 2) - at(-(Lx + 2)), at(1) - at(-1)]).to(torch.float64)
            mu /= 1e-60 + (mu**2).sum(0).sqrt()
            net = torch.from_numpy(np.stack([dP[0, r0:r1].reshape(-1)[f], dP[1, r0:r1].reshape(-1)[f]]))
            err = ((mu - net.to(device).to(torch.float64) / 5.0) ** 2).sum(0)
            if only is None:
                err_px[off:off + len(f)] = err
            else:
                err_px[torch.from_numpy(sel + off).to(device)] = err
            if mu_out is not None:
                m = mu.to(torch.float32).cpu().numpy()
                mu_out[0, r0:r1].reshape(-1)[f] = m[0]
                mu_out[1, r0:r1].reshape(-1)[f] = m[1]

    lt = torch.from_numpy(np.concatenate([lab[r0:r1].reshape(-1)[f] for (r0, r1), f in zip(bands, band_fg)]))
    lt = lt.to(device)
    cnts = torch.bincount(lt, minlength=nlab + 1)[1:].to(torch.float64)

    def errors() -> np.ndarray:
        return (torch.bincount(lt, weights=err_px, minlength=nlab + 1)[1:] / cnts).cpu().numpy()

    pixel_errors()
    err = errors()
    if threshold is not None:
        near = np.flatnonzero(np.abs(err - threshold) <= _FLOW_ERROR_MARGIN) + 1
        if len(near):
            touching = _touching_labels(lab)
            redo = np.unique(np.concatenate([touching(v) for v in near]))
            _heat_per_object(lab, Tg, redo, centers, box, np.full(len(redo), n_global))
            # pixels whose gradients read the new heat: those of redo and of the objects touching them
            only = np.zeros(nlab + 1, dtype=bool)
            only[np.concatenate([touching(v) for v in redo])] = True
            pixel_errors(only)
            err = errors()
    return err


# Objects diffused alone on their own boxes run in batches of at most this many pixels (float64: 2 MB
# per array), small enough to stay in the CPU's caches: 4 M-pixel batches made the exact recheck on a
# 4096 x 4096 lite output 2.4x slower (7.0 s vs 2.9 s), with bit-identical heat.
HEAT_BATCH_ELEMS = 1 << 18


def _heat_per_object(lab: np.ndarray, Tg: torch.Tensor, ids: np.ndarray, centers: np.ndarray,
                     boxes: np.ndarray, steps: np.ndarray, start: bool = False, fast: bool = False,
                     max_elems: int | None = None) -> None:
    """Heat of the objects ``ids`` (labels), each alone on its own bounding box, batched.

    Objects of similar box size run together as a (B, H, W) stack; object k runs ``steps[k]`` steps
    (the stack is sorted so that the objects still running are a prefix). Every step adds the source,
    sums the 3x3 neighbours and divides by 9, then zeroes the pixels outside each object. Not ``fast``:
    float64 summed in Cellpose's order, bit-identical to Cellpose's heat. ``fast``: float32 with a
    separable sum. ``start``: continue from the heat in ``Tg``. The result is written into ``Tg``.
    """
    max_elems = HEAT_BATCH_ELEMS if max_elems is None else max_elems
    steps = np.asarray(steps, dtype=np.int64)
    hw = np.stack([boxes[ids - 1, 1] - boxes[ids - 1, 0], boxes[ids - 1, 3] - boxes[ids - 1, 2]], 1)
    order = np.argsort(-(hw[:, 0] * hw[:, 1]), kind="stable")
    groups, cur, H, W = [], [], 0, 0
    for i in order:  # batches whose common box wastes at most 2.5x each object's box
        h, w = int(hw[i, 0]), int(hw[i, 1])
        nh, nw = max(H, h), max(W, w)
        if cur and (nh * nw > 2.5 * h * w or (len(cur) + 1) * (nh + 2) * (nw + 2) > max_elems):
            groups.append(cur)
            cur, nh, nw = [], h, w
        cur.append(i)
        H, W = nh, nw
    if cur:
        groups.append(cur)
    device = Tg.device
    dtype = torch.float32 if fast else torch.float64
    Lx2 = Tg.shape[1]
    offs = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))  # Cellpose's order
    for grp in groups:
        grp = np.array(grp)
        grp = grp[np.argsort(-steps[grp], kind="stable")]
        lbl, nst = ids[grp], steps[grp]
        b = boxes[lbl - 1]
        B = len(lbl)
        H, W = int((b[:, 1] - b[:, 0]).max()), int((b[:, 3] - b[:, 2]).max())
        msk = np.zeros((B, H + 2, W + 2), dtype=bool)
        for k, v in enumerate(lbl):
            msk[k, 1:1 + b[k, 1] - b[k, 0], 1:1 + b[k, 3] - b[k, 2]] = lab[b[k, 0]:b[k, 1], b[k, 2]:b[k, 3]] == v
        M = torch.from_numpy(msk).to(device)
        Mw = M[:, 1:-1, 1:-1].to(dtype)
        c = centers[lbl - 1]
        src = torch.from_numpy(np.arange(B) * (H + 2) * (W + 2) + (c[:, 0] - b[:, 0] + 1) * (W + 2)
                               + (c[:, 1] - b[:, 2] + 1)).to(device)
        ones = torch.ones(B, dtype=dtype, device=device)
        k_idx, yy, xx = torch.nonzero(M, as_tuple=True)
        bt = torch.from_numpy(b).to(device)[k_idx]
        gpos = (yy + bt[:, 0]) * Lx2 + (xx + bt[:, 2])
        T = torch.zeros((B, H + 2, W + 2), dtype=dtype, device=device)
        if start:
            T[k_idx, yy, xx] = Tg.view(-1)[gpos].to(dtype)
        S = torch.empty((B, H, W), dtype=dtype, device=device)
        R = torch.empty((B, H + 2, W), dtype=dtype, device=device) if fast else None
        k = B
        for t in range(int(nst[0]) if B else 0):
            while k > 0 and nst[k - 1] <= t:
                k -= 1
            Tk, Sk = T[:k], S[:k]
            Tk.view(-1).index_add_(0, src[:k], ones[:k])
            if fast:
                Rk = R[:k]
                torch.add(Tk[:, :, :-2], Tk[:, :, 1:-1], out=Rk)
                Rk.add_(Tk[:, :, 2:])
                torch.add(Rk[:, :-2], Rk[:, 1:-1], out=Sk)
                Sk.add_(Rk[:, 2:])
            else:
                views = [Tk[:, 1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx] for dy, dx in offs]
                torch.add(views[0], views[1], out=Sk)
                for v in views[2:]:
                    Sk.add_(v)
            Sk.div_(9.0)
            Sk.mul_(Mw[:k])
            Tk[:, 1:-1, 1:-1] = Sk
        Tg.view(-1)[gpos] = T[k_idx, yy, xx].to(Tg.dtype)


def _touching_labels(lab: np.ndarray):
    """A function v -> labels (int array, v first) sharing a 4-connected edge with label v (2D, 1..N)."""
    pairs = []
    for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1], lab[1:])):
        sel = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([a[sel], b[sel]], 1))
    pairs = np.concatenate(pairs).astype(np.int64)
    pairs = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)  # sorted by the first column
    start = np.searchsorted(pairs[:, 0], np.arange(int(lab.max()) + 2))

    def touching(v: int) -> np.ndarray:
        return np.concatenate([[v], pairs[start[v]:start[v + 1], 1]])

    return touching


def flow_error(masks, dP, device=None, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared difference between the flows of ``masks`` and the network flows ``dP / 5``.

    Without ``threshold`` this is Cellpose 4's flow error: every object diffused for the image-wide step
    count of the largest one, over the whole image.

    With ``threshold`` (2D; what :func:`compute_masks` uses for its flow check) the errors are meant to be
    compared with it, and the cost follows the objects: a fast pass runs each object only for the steps
    its own size needs, 2 * (height + width + 2), in float32 with a separable 3x3 sum, in phases on
    shrinking boxes (see ``_object_heat_2d``). Its errors differ from Cellpose's by less than 0.02 (at
    most 0.019 on the reference fixtures, 0.0007 on lite's output for a 1024 x 1024 nuclei image); every
    object whose error lies within 0.05 of the threshold is then recomputed exactly as Cellpose does, so
    which objects pass matches Cellpose 4.2.1.1. Objects far from the threshold keep the fast value.
    On the reference fixtures the masks of ``compute_masks`` are identical to Cellpose 4.2.1.1's; on
    realistic network outputs (benchmarks/bench_dynamics.py) AP@0.5 = 1.0 and matched IoU >= 0.99
    against Cellpose 4.2.1.1 (identical masks in every case measured).

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int label image.
    dP : float (2, Y, X) or (3, Z, Y, X) network flows (about 5x unit vectors).
    device : None or torch.device.
    threshold : float, optional
        The threshold the errors will be compared with (see above; ignored in 3D).

    Returns
    -------
    errors : float64 (masks.max(),)
        Per label 1..max; NaN for labels that are not present.
    mu : float32 (ndim, ...)
        Unit flows recomputed from ``masks`` (0 outside objects).
    """
    lab = _as_labels(masks, "masks")
    dP = _flows_matching(dP, lab)
    device = _device(device)
    nmax = int(lab.max()) if lab.size else 0
    if lab.ndim == 2 and threshold is not None:
        mu = np.zeros((2, *lab.shape), np.float32)
        return _flow_errors_thresholded(lab, dP, device, threshold, mu), mu
    with _cpu_threads(device):
        mu = _flows_tensor(lab, device, None)
    if nmax == 0:
        return np.zeros(0), mu.to(torch.float32).cpu().numpy()
    net = torch.from_numpy(np.ascontiguousarray(dP)).to(device) / 5.0
    err = ((mu - net.to(torch.float64)) ** 2).sum(0).reshape(-1)
    lt = torch.from_numpy(lab.reshape(-1).astype(np.int64)).to(device)
    sums = torch.bincount(lt, weights=err, minlength=nmax + 1)[1:]
    cnts = torch.bincount(lt, minlength=nmax + 1)[1:].to(torch.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = (sums / cnts).cpu().numpy()
    return errors, mu.to(torch.float32).cpu().numpy()


def _flows_matching(dP, lab: np.ndarray) -> np.ndarray:
    """``dP`` as a numpy array, checked to be (ndim, *lab.shape)."""
    dP = _to_numpy(dP, "dP")
    if dP.shape[1:] != lab.shape or dP.shape[0] != lab.ndim:
        raise CellposeWebError(f"dP has shape {dP.shape}, which does not match masks of shape {lab.shape}.")
    return dP


def _flow_errors_thresholded(lab: np.ndarray, dP: np.ndarray, device: torch.device, threshold: float,
                             mu_out: np.ndarray | None = None) -> np.ndarray:
    """``flow_error(lab, dP, threshold=...)``'s errors for a 2D label image (any labels >= 0); the unit
    flows go into ``mu_out`` when given."""
    nmax = int(lab.max()) if lab.size else 0
    if nmax == 0:
        return np.zeros(0)
    present = _label_counts(lab, nmax)[1:] > 0
    nlab = int(present.sum())
    lut = np.zeros(nmax + 1, dtype=np.int32 if nlab < 2**31 - 1 else np.int64)
    lut[1:][present] = np.arange(1, nlab + 1)
    ren = lut[lab]  # labels 1..nlab in the order of their values
    with _cpu_threads(device):
        err = _flow_errors_2d(ren, dP, device, threshold=threshold, mu_out=mu_out)
    errors = np.full(nmax, np.nan)
    errors[present] = err
    return errors


def remove_bad_flow_masks(masks, dP, threshold: float = 0.4, device=None,
                          flow_error_fn: Callable | None = None) -> np.ndarray:
    """Remove masks whose flow error (see :func:`flow_error`) is above ``threshold``; renumber.

    ``flow_error_fn(labels, dP) -> errors (N,)`` replaces :func:`flow_error` (Cellpose 3 models use
    Cellpose 3's own flows, ``legacy.flow_error``)."""
    lab = _as_labels(masks, "masks")
    if flow_error_fn is not None:
        errors = np.asarray(flow_error_fn(lab, dP))
    elif lab.ndim == 2:  # flow_error's errors without its unit flows (not needed here)
        errors = _flow_errors_thresholded(lab, _flows_matching(dP, lab), _device(device), threshold)
    else:
        errors, _ = flow_error(lab, dP, device=device, threshold=threshold)
    bad = np.zeros(len(errors) + 1, dtype=bool)
    bad[1:] = errors > threshold
    out = lab.copy()
    out[bad[out]] = 0
    return _renumber_first(out, dtype=lab.dtype if lab.dtype.kind == "u" else None)


def compute_masks(
    dP,
    cellprob,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    do_3D: bool = False,
    device=None,
    interp: bool | str = True,
    flow_error_fn: Callable | None = None,
) -> np.ndarray:
    """Masks from network flows and cell probability (Cellpose 4 ``resize_and_compute_masks``).

    Steps: Euler integration of ``dP / 5`` on pixels with ``cellprob > cellprob_threshold`` for ``niter``
    steps; histogram seeds and growth; masks bigger than ``max_size_fraction`` of the image removed;
    flow-error check (2D only, when ``flow_threshold > 0``); then holes filled and masks smaller than
    ``min_size`` pixels removed (``min_size <= 0`` keeps all).

    Parameters
    ----------
    dP : float (2, Y, X) or (3, Z, Y, X)
        Flows in network units (about 5x unit vectors).
    cellprob : float (Y, X) or (Z, Y, X)
        Cell probability logits.
    niter : int
        Euler steps (None or 0 -> 200).
    do_3D : bool
        3D dynamics; the flow-error check is skipped in 3D (also for any (3, Z, Y, X) input), as Cellpose.
    device : None or torch.device
        Where the integration and the flow check run (CPU when None).
    interp : True, "pixel" or False
        How the flows are read during integration, see :func:`follow_flows` (True: Cellpose 4).
    flow_error_fn : None, or ``f(labels, dP) -> errors (N,)`` for the flow check (see
        :func:`remove_bad_flow_masks`).

    Returns
    -------
    uint16 label image (uint32 with more than 65535 masks), labels 1..N by first appearance.
    An all-background cellprob gives zeros (no error).
    """
    dP, cellprob = _check_flows(dP, cellprob)
    if niter is None or niter == 0:
        niter = 200
    try:
        niter = int(niter)
    except (TypeError, ValueError) as e:
        raise CellposeWebError(f"niter must be a whole number, got {niter!r}.") from e
    if niter < 0:
        raise CellposeWebError(f"niter must be >= 0, got {niter}.")
    device = _device(device)
    shape0 = cellprob.shape
    fg = cellprob > cellprob_threshold
    if min(shape0) < 2:
        logger.warning("image of shape %s is too small for flow dynamics: no masks.", shape0)
        return np.zeros(shape0, np.uint16)
    if not fg.any():
        logger.info("No cell pixels found.")
        return np.zeros(shape0, np.uint16)
    inds = np.nonzero(fg)
    with _cpu_threads(device):
        step = np.multiply(dP, fg, dtype=np.float32)  # one temporary (large images: bounded memory)
        step /= 5.0
        p_final = follow_flows(step, inds, niter=niter, device=device, interp=interp).int()
        del step
        mask = get_masks(p_final, inds, shape0, max_size_fraction=max_size_fraction)
    del p_final, inds
    is3d = cellprob.ndim == 3 or do_3D
    if not is3d and mask.max() > 0 and flow_threshold is not None and flow_threshold > 0:
        mask = remove_bad_flow_masks(mask, dP, threshold=flow_threshold, device=device, flow_error_fn=flow_error_fn)
    if mask.max() < 2**16 and mask.dtype != np.uint16:
        mask = mask.astype(np.uint16)
    mask = fill_holes_and_remove_small_masks(mask, min_size=min_size)
    if mask.dtype == np.uint32 and mask.max() < 2**16:
        mask = mask.astype(np.uint16)
    elif mask.dtype == np.uint32:
        logger.warning("more than 65535 masks in image, masks returned as np.uint32")
    return mask


# ----------------------------------------------------------------------------------------------
# label-image utilities
# ----------------------------------------------------------------------------------------------
def _fill_object_holes(crop: np.ndarray, value: int) -> np.ndarray:
    """Holes (4-/6-connected background not reaching the crop border) of ``crop == value``, filled."""
    msk = crop == value
    st = ndi.generate_binary_structure(msk.ndim, 1)
    bg = np.pad(~msk, 1, constant_values=True)
    cc, n = ndi.label(bg, st)
    if n <= 1:
        return msk
    outside = cc.flat[0]
    return (cc != outside)[tuple(slice(1, -1) for _ in range(msk.ndim))]


def _remove_small(masks: np.ndarray, min_size: int) -> np.ndarray:
    if masks.size and int(masks.max()) > 4 * masks.size + 2**16:  # sparse label values
        masks, _ = _renumber_sorted(masks)
    counts = _label_counts(masks)
    small = counts < min_size
    small[0] = False
    if small.any():
        masks = masks.copy()
        masks[small[masks]] = 0
    return masks


def fill_holes_and_remove_small_masks(masks, min_size: int = 15) -> np.ndarray:
    """Fill holes in each mask and remove masks smaller than ``min_size`` pixels (Cellpose 4).

    Masks below ``min_size`` are removed and labels renumbered 1..N (first appearance); each mask's holes
    are filled in label order (a hole is background, or another mask, fully enclosed by this mask, so an
    enclosed mask is absorbed, as in Cellpose); then small masks are removed again. ``min_size <= 0``
    skips the size filter (labels are then made consecutive in sorted order).

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int array

    Returns
    -------
    label array of the same shape (same unsigned dtype; uint16/uint32 otherwise).

    Notes
    -----
    In 3D, Cellpose's ``fill_voids`` occasionally also fills background voxels that touch the mask's
    bounding box (a quirk of its scanline fill); here only true cavities are filled.
    """
    lab = _as_labels(masks, "masks")
    dtype = lab.dtype if lab.dtype.kind == "u" and lab.dtype.itemsize >= 2 else None
    if lab.size == 0:
        return lab.astype(dtype or np.uint16)
    min_size = int(min_size) if min_size is not None else 0
    if min_size > 0:
        lab = _remove_small(lab, min_size)
        lab = _renumber_first(lab, dtype=np.int32 if lab.size < 2**31 - 1 else np.int64)
    else:
        lab, _ = _renumber_sorted(lab)
    lab = np.ascontiguousarray(lab)
    nmax = int(lab.max())
    slices = ndi.find_objects(lab)
    # in 2D only masks that have a hole need work (the others are left as they are by the fill)
    todo = _labels_with_holes_2d(lab, nmax) if (lab.ndim == 2 and nmax > 0) else np.arange(1, nmax + 1)
    for v in todo:
        slc = slices[v - 1]
        if slc is None:
            continue
        crop = lab[slc]
        filled = _fill_object_holes(crop, int(v))
        crop[filled] = v
    lut = None
    if min_size > 0:  # holes filled: drop what is still too small, renumber by first appearance
        lab = _remove_small(lab, min_size)
        lut, nmax = _first_appearance_lut(lab)
    else:
        nmax = int(lab.max()) if lab.size else 0
    if dtype is None or nmax >= np.iinfo(dtype).max:
        dtype = _label_dtype(nmax)
    return lab.astype(dtype) if lut is None else lut.astype(dtype)[lab]


def stitch3D(masks, stitch_threshold: float = 0.25) -> np.ndarray:
    """Link per-plane 2D masks of a (Z, Y, X) stack into 3D objects by IoU (Cellpose 4 ``stitch3D``).

    For each pair of consecutive planes, IoU below ``stitch_threshold`` counts as 0, each mask of the
    previous plane keeps only its best match, and a mask of the next plane takes the label of its best
    remaining match; masks without a match get new labels.

    Notes
    -----
    Cellpose restarts its label counter when an empty plane is met before any plane was stitched, which
    can give unrelated objects the same label; here the counter never goes back (otherwise identical).
    """
    lab = _as_labels(masks, "masks", ndims=(3,))
    out = lab.copy()
    if out.dtype.kind != "u" or out.dtype.itemsize < 2:
        out = out.astype(_label_dtype(int(out.max()) if out.size else 0))
    if out.shape[0] == 0:
        return out
    mmax = int(out[0].max())
    running = mmax
    empty = False
    for i in range(out.shape[0] - 1):
        nxt = out[i + 1]
        if out.dtype == np.uint16 and mmax > max(0, 2**16 - 5 - int(nxt.max())):
            out = out.astype(np.uint32)
            nxt = out[i + 1]
        nmax_next = int(nxt.max())
        prev = out[i]
        if nmax_next == 0 or int(prev.max()) == 0:
            if not empty and running == 0:
                mmax = nmax_next
            else:
                istitch = np.zeros(nmax_next + 1, dtype=np.int64)
                istitch[1:] = np.arange(running + 1, running + nmax_next + 1)
                out[i + 1] = istitch[nxt]
                mmax = running + nmax_next
            running = max(running, mmax)
            continue
        iou, cols = iou_matrix(nxt, prev)  # rows: labels 1..nmax_next; cols: labels present in prev
        iou[iou < stitch_threshold] = 0.0
        iou[iou < iou.max(axis=0)] = 0.0
        best = iou.argmax(axis=1)
        istitch = cols[best].astype(np.int64)
        ino = np.nonzero(iou.max(axis=1) == 0.0)[0]
        mmax = max(mmax, running)
        istitch[ino] = np.arange(mmax + 1, mmax + len(ino) + 1)
        mmax += len(ino)
        running = max(running, mmax)
        out[i + 1] = np.concatenate([[0], istitch])[nxt]
        empty = True
    return out


def remove_edge_masks(masks, change_index: bool = True) -> np.ndarray:
    """Remove masks that touch the image border; optionally renumber 1..N (sorted order).

    Returns the same dtype as the input (Cellpose returns int32 when renumbering; values are equal).
    """
    lab = _as_labels(masks, "masks")
    out = lab.copy()
    if out.size == 0:
        return out
    border = np.zeros(out.shape, dtype=bool)
    for ax in range(out.ndim):
        idx = [slice(None)] * out.ndim
        idx[ax] = 0
        border[tuple(idx)] = True
        idx[ax] = -1
        border[tuple(idx)] = True
    nmax = int(out.max())
    edge = np.zeros(nmax + 1, dtype=bool)
    edge[out[border]] = True
    edge[0] = False
    if edge.any():
        out[edge[out]] = 0
    if change_index:
        ren, _ = _renumber_sorted(out)
        out = ren.astype(out.dtype)
    return out


def diameters(masks) -> tuple[float, np.ndarray]:
    """Median equivalent-circle diameter of the masks, and per-mask sqrt(area) (Cellpose 4 ``diameters``).

    Returns
    -------
    md : float
        median(sqrt(area)) / (sqrt(pi) / 2), in pixels; 0 when there are no masks.
    per_mask : float64 (N,)
        sqrt(area) of each present label in ascending label order (as Cellpose returns; multiply by
        2 / sqrt(pi) for each mask's equivalent diameter).
    """
    lab = _as_labels(masks, "masks")
    counts = np.bincount(lab.reshape(-1).astype(np.int64, copy=False))[1:] if lab.size else np.zeros(0)
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0, np.zeros(0)
    root = counts**0.5
    md = float(np.median(root))
    md /= (np.pi**0.5) / 2
    return md, root


def _outlines_2d(lab: np.ndarray) -> np.ndarray:
    """Outer-boundary pixels of every mask: a pixel of mask A with a 4-neighbour outside A's filled
    region (or the image edge). Equals Cellpose's cv2.findContours(RETR_EXTERNAL) outlines."""
    p = np.pad(lab, 1)
    c = p[1:-1, 1:-1]
    diff = (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)
    out = diff & (c > 0)
    # masks with holes: pixels that only touch their own holes are not on the outer contour
    nmax = int(lab.max()) if lab.size else 0
    if nmax == 0:
        return out
    cand = _labels_with_holes_2d(lab, nmax)
    if len(cand):
        slices = ndi.find_objects(lab)
        for v in cand:
            slc = slices[v - 1]
            filled = _fill_object_holes(lab[slc], v)
            fp = np.pad(filled, 1)
            cc = fp[1:-1, 1:-1]
            edge = (~fp[:-2, 1:-1]) | (~fp[2:, 1:-1]) | (~fp[1:-1, :-2]) | (~fp[1:-1, 2:])
            obj = lab[slc] == v
            region = out[slc]
            region[obj] = (edge & cc)[obj]
    return out


def _labels_with_holes_2d(lab: np.ndarray, nmax: int) -> np.ndarray:
    """Labels whose mask has at least one hole (4-connected background enclosed by the mask).

    Uses the Euler number (8-connected foreground) from 2x2 pixel quads, evaluated only on quads that
    mix labels, and the number of 8-connected pieces: holes = pieces - Euler number.
    """
    Ly = lab.shape[0]
    euler4 = np.zeros(nmax + 1, dtype=np.int64)  # 4 x Euler number per label
    for r0, r1 in _row_bands(lab.shape):  # integer sums: the same in any order
        # the quads whose top row is r0 - 1 .. r1 - 1 in lab (the zero-padded image's rows r0 .. r1)
        p = np.pad(lab[max(r0 - 1, 0):r1], ((int(r0 == 0), int(r1 == Ly)), (1, 1)))
        a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
        idx = np.nonzero((a != b) | (a != c) | (a != d))
        quads = tuple(q[idx].astype(np.int64) for q in (a, b, c, d))
        qa, qb, qc, qd = quads
        for j, v in enumerate(quads):
            valid = v > 0
            for q in quads[:j]:
                valid &= q != v
            ea, eb, ec, ed = (qa == v), (qb == v), (qc == v), (qd == v)
            n = ea.astype(np.int8) + eb + ec + ed
            diag = (ea & ed & ~eb & ~ec) | (eb & ec & ~ea & ~ed)
            contrib = (n == 1).astype(np.int64) - (n == 3) - 2 * diag
            sel = valid & (contrib != 0)
            euler4 += np.bincount(v[sel], weights=contrib[sel], minlength=nmax + 1).astype(np.int64)
    holes = _pieces_per_label_2d(lab, nmax) * 4 - euler4
    holes[0] = 0
    return np.flatnonzero(holes > 0)


def _pieces_per_label_2d(lab: np.ndarray, nmax: int) -> np.ndarray:
    """Number of 8-connected pieces of each label 0..nmax (int64; 0 for background) of a 2D label image.

    The pieces are found in row bands (``BAND_PIXELS``) and joined across the bands' edges (a graph of
    the bands' pieces, linked where two 8-adjacent pixels across an edge hold the same label), so the
    counts are those of the whole image without whole-image component images.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.measure import label as sk_label

    Lx = lab.shape[1]
    piece_label, links, offset, above = [], [], 0, None
    for r0, r1 in _row_bands(lab.shape):
        blk = lab[r0:r1]
        comp = sk_label(blk, connectivity=2, background=0).astype(np.int64, copy=False)
        n = int(comp.max())
        owner = np.zeros(n + 1, dtype=np.int64)
        owner[comp.reshape(-1)] = blk.reshape(-1)
        piece_label.append(owner[1:])
        comp -= 1  # background -1, this band's pieces offset, offset + 1, ...
        comp[comp >= 0] += offset
        if above is not None:  # link pieces 8-adjacent across the edge between the two bands
            ids_up, lab_up = above
            for dx in (-1, 0, 1):
                a = slice(max(0, -dx), Lx - max(0, dx))
                b = slice(max(0, dx), Lx - max(0, -dx))
                same = (lab_up[a] == blk[0, b]) & (lab_up[a] > 0)
                links.append(np.stack([ids_up[a][same], comp[0, b][same]]))
        above = (comp[-1].copy(), blk[-1].copy())
        offset += n
    if offset == 0:
        return np.zeros(nmax + 1, dtype=np.int64)
    edges = np.concatenate(links, 1) if links else np.zeros((2, 0), dtype=np.int64)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(offset, offset))
    n_joined, joined = connected_components(graph, directed=False)
    joined_label = np.zeros(n_joined, dtype=np.int64)
    joined_label[joined] = np.concatenate(piece_label)
    return np.bincount(joined_label, minlength=nmax + 1)


def masks_to_outlines(masks) -> np.ndarray:
    """Bool outlines of masks: each mask's outer-boundary pixels (Cellpose 4 ``masks_to_outlines``).

    A pixel of mask A is an outline pixel when one of its 4 neighbours lies outside A (or outside the
    image) and is not inside one of A's holes. 3D input is handled plane by plane.

    Returns
    -------
    bool (Y, X) or (Z, Y, X)
    """
    lab = _as_labels(masks, "masks")
    if lab.ndim == 3:
        return np.stack([_outlines_2d(pl) for pl in lab]) if lab.shape[0] else np.zeros(lab.shape, bool)
    return _outlines_2d(lab)


def outlines_list(masks) -> list[np.ndarray]:
    """Ordered outer contour of each mask, for ``_cp_outlines.txt`` and ImageJ ROIs.

    Returns one int array (N, 2) of (x, y) pixel coordinates per label present, in ascending label
    order: the pixels of the longest outer contour (8-connected trace, holes ignored), starting at the
    top-most, left-most pixel. Contours with 4 points or fewer give an empty (0, 2) array, as in Cellpose.
    """
    from skimage.measure import find_contours

    lab = _as_labels(masks, "masks", ndims=(2,))
    out = []
    if lab.size == 0 or lab.max() == 0:
        return out
    slices = ndi.find_objects(lab)
    for i, slc in enumerate(slices):
        if slc is None:
            continue
        v = i + 1
        filled = _fill_object_holes(lab[slc], v)
        fp = np.pad(filled, 1).astype(np.float32)
        contours = find_contours(fp, 0.5, fully_connected="high")
        if not contours:
            out.append(np.zeros((0, 2), dtype=np.int64))
            continue
        cnt = max(contours, key=len)
        pix = _contour_pixels(cnt, fp)
        if len(pix) <= 4:
            out.append(np.zeros((0, 2), dtype=np.int64))
            continue
        pix[:, 0] += slc[1].start - 1
        pix[:, 1] += slc[0].start - 1
        out.append(pix)
    return out


def _contour_pixels(cnt: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Marching-squares contour (row, col at half-pixel edges) -> ordered inside pixels as (x, y)."""
    r, c = cnt[:-1, 0], cnt[:-1, 1]  # closed contour: last point repeats the first
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    r1 = np.where(r == r0, r0, r0 + 1)
    c1 = np.where(c == c0, c0, c0 + 1)
    inside0 = fp[r0, c0] > 0.5
    pr = np.where(inside0, r0, r1)
    pc = np.where(inside0, c0, c1)
    keep = np.ones(len(pr), dtype=bool)
    keep[1:] = (pr[1:] != pr[:-1]) | (pc[1:] != pc[:-1])
    pr, pc = pr[keep], pc[keep]
    if len(pr) > 1 and pr[0] == pr[-1] and pc[0] == pc[-1]:
        pr, pc = pr[:-1], pc[:-1]
    if len(pr) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # start at the top-most, left-most pixel and run counter-clockwise (as displayed), like OpenCV
    start = np.lexsort((pc, pr))[0]
    pr, pc = np.roll(pr, -start), np.roll(pc, -start)
    pr = np.concatenate([pr[:1], pr[1:][::-1]])
    pc = np.concatenate([pc[:1], pc[1:][::-1]])
    return np.stack([pc, pr], axis=1).astype(np.int64)


def dx_to_circ(dP) -> np.ndarray:
    """RGB uint8 (..., 3) picture of flows: hue = direction, brightness = normalised magnitude.

    For (2, Y, X) [dY, dX] and, as Cellpose 4 does, for (3, Z, Y, X): magnitude over all components and
    angle atan2(dP[1], dP[0]).
    """
    dP = _to_numpy(dP, "dP")
    if dP.ndim < 3 or dP.shape[0] not in (2, 3):
        raise CellposeWebError(f"dP must have shape (2, Y, X) or (3, Z, Y, X), got {dP.shape}.")
    if dP.dtype.kind != "f":
        dP = dP.astype(np.float32)
    # elementwise in bands along the first spatial axis (large images: no whole-image temporaries),
    # except the magnitude, whose percentiles are taken over the whole image
    bands = [(r0, r1) for r0, r1, _, _ in _halo_bands(dP.shape[1:], 0, torch.device("cpu"))]
    mag = np.empty(dP.shape[1:], dtype=dP.dtype)
    for r0, r1 in bands:
        mag[r0:r1] = np.sqrt(np.sum(dP[:, r0:r1] ** 2, axis=0))
    mag = transforms.normalize99(mag, downsample=True, copy=False)
    rgb = np.zeros((*dP.shape[1:], 3), "uint8")
    for r0, r1 in bands:
        m = 255 * np.clip(mag[r0:r1], 0, 1.0)
        angles = np.arctan2(dP[1, r0:r1], dP[0, r0:r1]) + np.pi
        m /= 2
        rgb[r0:r1, ..., 0] = np.clip(m * (np.cos(angles) + 1), 0, 255).astype("uint8")
        rgb[r0:r1, ..., 1] = np.clip(m * (np.cos(angles + 2 * np.pi / 3) + 1), 0, 255).astype("uint8")
        rgb[r0:r1, ..., 2] = np.clip(m * (np.cos(angles + 4 * np.pi / 3) + 1), 0, 255).astype("uint8")
    return rgb
