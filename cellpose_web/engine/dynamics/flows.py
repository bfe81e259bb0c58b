"""Flows from masks (Cellpose 4's ``masks_to_flows``): heat diffusion from each object's centre.

Flows: float32 (2, Y, X) = [dY, dX] or (3, Z, Y, X) = [dZ, dY, dX], unit vectors. Heat diffusion runs as
dense sums of shifted images (3x3 in 2D, 7-point in 3D, same summation order as Cellpose, so the heat
is bit-identical), with a per-pixel gather only where two labels touch."""
from __future__ import annotations

import math
from typing import Sequence
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.dynamics.device_setup import as_device, cpu_threads, to_numpy, uses_device_path
from cellpose_web.engine.dynamics.labels import as_labels, renumber_first, renumber_sorted, renumber_sorted_torch, row_bands


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
        return centers_and_iters_2d(lab, nlab, ndi.find_objects(lab, max_label=nlab))
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


def centers_and_iters_2d(lab: np.ndarray, nlab: int, slices: list) -> tuple[np.ndarray, int]:
    """The 2D case of ``_centers_and_iters``, from per-label coordinate sums taken in row bands.

    ``slices``: ``ndi.find_objects(lab)`` (every label 1..nlab present). The sums are sums of integers,
    exact in float64 in any order, so the means (and the rounded centres) are those of one pass.
    """
    box = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], dtype=np.int64)
    sy = np.zeros(nlab + 1)
    sx = np.zeros(nlab + 1)
    cnt = np.zeros(nlab + 1, dtype=np.int64)
    for r0, r1 in row_bands(lab.shape):
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


def heat_dtype(shape: Sequence[int], device: torch.device) -> torch.dtype:
    """float64 heat, float32 for very large images and on MPS (as Cellpose)."""
    return torch.float32 if (math.prod(s + 2 for s in shape) > 4e7 or device.type == "mps") else torch.float64


def _diffuse_flows(lab: np.ndarray, nlab: int, device: torch.device, niter: int | None) -> torch.Tensor:
    """Unit flows (ndim, *shape) float64 on ``device`` for a label image with labels 1..nlab."""
    centers, n_auto = _centers_and_iters(lab, nlab)
    n_iter = n_auto if niter is None else int(niter)
    T = diffuse_heat(lab, nlab, centers, n_iter, device, heat_dtype(lab.shape, device))
    return unit_flows(T, torch.from_numpy(lab > 0).to(device))


def unit_flows(T: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Unit flows float64 (ndim, *shape) from the zero-padded heat ``T`` (shape + 2 per axis): central
    differences, normalised, 0 where the bool ``fg`` (shape) is False."""
    ndim = fg.ndim
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


def diffuse_heat(lab: np.ndarray | torch.Tensor, nlab: int, centers: np.ndarray | torch.Tensor, n_iter: int, device: torch.device,
                  dtype: torch.dtype, T0: torch.Tensor | None = None, separable: bool = False,
                  neighbours: np.ndarray | None = None) -> torch.Tensor:
    """Cellpose's heat diffusion: ``n_iter`` steps of (+1 at each centre, mean of the 3x3 / 7-point
    stencil over the pixel's own object). Returns the zero-padded heat (Y + 2, X + 2) / (Z + 2, ...).

    ``lab`` and ``centers`` may be numpy arrays or tensors (the device path passes tensors already on
    ``device``). ``centers`` (nlab, ndim) are the sources in ``lab``'s coordinates; ``T0`` (padded, optional) is the
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
    ldt = torch.int32 if nlab < 2**31 - 1 else torch.int64
    Lp = F.pad(torch.as_tensor(lab).to(device, ldt), (1, 1) * ndim)
    if neighbours is not None:
        Lp = F.pad(torch.as_tensor(neighbours).to(device, ldt), (1, 1) * ndim)
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

    cflat = torch.as_tensor(centers).to(device)
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


def flows_tensor(lab: np.ndarray, device: torch.device, niter: int | None) -> torch.Tensor:
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
    crop, nlab = renumber_sorted(crop)
    mu = _diffuse_flows(crop, nlab, device, niter)
    out[(slice(None),) + tuple(sl)] = mu
    return out


# ----------------------------------------------------------------------------------------------
# the device path: the same flows from a label tensor, without leaving the device
# ----------------------------------------------------------------------------------------------
def _first_min_per_label(lbl: torch.Tensor, dist: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """Per label 0..n-1 the entry of ``pos`` (int64, ascending) whose ``dist`` is the smallest of its label,
    the first one on ties (int64 (n,)); no host sync (no boolean indexing)."""
    dmin = torch.zeros(n, dtype=dist.dtype, device=dist.device)
    dmin.scatter_reduce_(0, lbl, dist, reduce="amin", include_self=False)
    big = torch.iinfo(torch.int64).max
    key = torch.where(dist == dmin[lbl], pos, torch.full_like(pos, big))
    first = torch.full((n,), big, dtype=torch.int64, device=dist.device)
    return first.scatter_reduce_(0, lbl, key, reduce="amin", include_self=True)


def centers_and_iters_torch(lab: torch.Tensor, nlab: int) -> tuple[torch.Tensor, int]:
    """:func:`_centers_and_iters` (the same centres and step count) on a label tensor with labels 1..nlab,
    all present, on its own device.

    Returns int64 (nlab, ndim) absolute centre coordinates and n_iter. Two host syncs (the foreground
    pixels' count, n_iter) whatever the number of objects.
    """
    shape = lab.shape
    ndim = lab.ndim
    dev = lab.device
    flat = lab.reshape(-1)
    pos = torch.nonzero(flat).squeeze(1)  # raster order
    lbl = flat[pos].long() - 1
    coords, rest = [], pos
    for k in range(ndim - 1, -1, -1):
        coords.insert(0, rest % shape[k])
        rest = rest // shape[k]

    def per_label(vals: torch.Tensor, how: str) -> torch.Tensor:
        out = torch.zeros(nlab, dtype=vals.dtype, device=dev)
        return out.scatter_reduce_(0, lbl, vals, reduce=how, include_self=False)

    mins = [per_label(c, "amin") for c in coords]
    maxs = [per_label(c, "amax") for c in coords]
    cnt = torch.bincount(lbl, minlength=nlab).to(torch.float64)
    # sums of whole numbers: exact in float64 in any order, so the means are those of the host path
    sums = [torch.zeros(nlab, dtype=torch.float64, device=dev).index_add_(0, lbl, c.to(torch.float64))
            for c in coords]
    if ndim == 2:
        rel = [torch.round((sm - cnt * mn) / cnt).long() for sm, mn in zip(sums, mins)]
        cy, cx = rel[0] + mins[0], rel[1] + mins[1]
        inside = flat[cy * shape[1] + cx].long() == torch.arange(1, nlab + 1, device=dev)
        d = (coords[1] - cx[lbl]) ** 2 + (coords[0] - cy[lbl]) ** 2
        first = _first_min_per_label(lbl, d, pos, nlab)
        centers = torch.where(inside[:, None], torch.stack([cy, cx], 1), torch.stack([first // shape[1],
                                                                                        first % shape[1]], 1))
        ext = (maxs[0] - mins[0] + 1) + (maxs[1] - mins[1] + 1) + 2
        return centers, 2 * int(ext.max())
    # Cellpose's bbox-relative coordinates + 1, and its order of the squared terms (z, x, y)
    means = [(sm - cnt * (mn.to(torch.float64) - 1)) / cnt for sm, mn in zip(sums, mins)]
    r1 = [(c - mn[lbl] + 1).to(torch.float64) for c, mn in zip(coords, mins)]
    d = (r1[0] - means[0][lbl]) ** 2 + (r1[2] - means[2][lbl]) ** 2 + (r1[1] - means[1][lbl]) ** 2
    first = _first_min_per_label(lbl, d, pos, nlab)
    centers = torch.stack([first // (shape[1] * shape[2]), (first // shape[2]) % shape[1], first % shape[2]], 1)
    ext = sum((maxs[k] - mins[k] + 1) + 1 for k in range(3))
    return centers, 6 * int(ext.max())


def foreground_box(lab: torch.Tensor, margin: int) -> tuple[slice, ...] | None:
    """The bounding box of ``lab > 0`` widened by ``margin`` (clipped), or None when there is no
    foreground; one host sync."""
    fg = lab > 0
    ends = []
    for ax in range(lab.ndim):
        other = tuple(a for a in range(lab.ndim) if a != ax)
        anyax = fg.any(dim=other) if other else fg
        n = anyax.shape[0]
        ends += [anyax.any(), anyax.to(torch.uint8).argmax(), n - 1 - anyax.flip(0).to(torch.uint8).argmax()]
    e = torch.stack([v.to(torch.int64) for v in ends]).tolist()
    if not e[0]:
        return None
    return tuple(slice(max(e[3 * ax + 1] - margin, 0), min(e[3 * ax + 2] + margin + 1, lab.shape[ax]))
                 for ax in range(lab.ndim))


def flows_tensor_device(lab: torch.Tensor, niter: int | None) -> torch.Tensor:
    """:func:`flows_tensor` for a label tensor (any labels >= 0) on its own device: unit flows float64
    (ndim, *shape), a constant number of host syncs (no per-object work on the host)."""
    out = torch.zeros((lab.ndim, *lab.shape), dtype=torch.float64, device=lab.device)
    sl = foreground_box(lab, 1) if lab.numel() else None
    if sl is None:
        return out
    crop, nlab = renumber_sorted_torch(lab[sl])
    centers, n_auto = centers_and_iters_torch(crop, nlab)
    n_iter = n_auto if niter is None else int(niter)
    T = diffuse_heat(crop, nlab, centers, n_iter, lab.device, heat_dtype(crop.shape, lab.device))
    out[(slice(None),) + sl] = unit_flows(T, crop > 0)
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
    lab = as_labels(labels, "labels")
    if niter is not None and (not np.isscalar(niter) or int(niter) < 0):
        raise CellposeWebError(f"niter must be a whole number >= 0 or None, got {niter!r}.")
    device = as_device(device)
    with cpu_threads(device):
        if uses_device_path(device):
            mu = flows_tensor_device(torch.from_numpy(lab.astype(np.int64, copy=False)).to(device), niter)
        else:
            mu = flows_tensor(lab, device, niter)
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
        lab = to_numpy(lbl, f"labels[{i}]")
        if lab.ndim == 3 and lab.shape[0] == 1:
            lab = lab[0]
        lab = as_labels(lab, f"labels[{i}]")
        lab = renumber_first(lab, dtype=np.int64)
        mu = masks_to_flows(lab, device=device, niter=niter)
        out.append(np.concatenate([lab[None].astype(np.float32), (lab > 0.5)[None].astype(np.float32), mu], 0))
    return out
