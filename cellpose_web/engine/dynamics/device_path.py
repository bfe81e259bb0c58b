"""The post-processing kept on the device: flows -> masks with every step in torch tensors.

What CUDA runs (and the CPU too while ``device_setup.DEVICE_PATH_ON_CPU`` is set): Euler integration,
the histogram and its seeds, seed growth, removal of too large masks, the first-appearance numbering,
the flow-error check and the removal of small masks all stay on the device; no step loops over objects
in Python, and the host waits for the device a fixed number of times per image, whatever the number of
objects (``torch.nonzero`` / ``torch.unique`` for data-dependent sizes, a few counts; see
``tests/test_dynamics_gpu_path.py``, which counts them). In 2D, masks with holes are found on the device
too (Euler numbers and 8-connected pieces); only when some mask has one does the hole filling run on the
host (``postprocess.fill_holes_and_remove_small_masks``, scipy). The label image comes back once.

The masks are those of the host path (``following.get_masks``, ``flow_check.remove_bad_flow_masks``),
label for label: the same histogram, seeds in the same order, the same growth (on the whole image here
instead of the seeds' window, which changes no pixel), and the flow check's errors from Cellpose's own
recipe (every object diffused for the image-wide step count in float64), which the host path reproduces
for every object near the threshold.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence
import numpy as np
import torch
import torch.nn.functional as F
from cellpose_web.engine.dynamics.following import follow_flows, histogram_geometry, histogram_index
from cellpose_web.engine.dynamics.flows import flows_tensor_device
from cellpose_web.engine.dynamics.labels import first_appearance_lut_torch, label_dtype, lut_from_first, max_filter

logger = logging.getLogger(__name__)


def get_masks_device(p_final: torch.Tensor, inds: torch.Tensor, shape0: Sequence[int],
                     max_size_fraction: float = 0.4) -> tuple[torch.Tensor, int]:
    """:func:`following.get_masks` on the device.

    Parameters
    ----------
    p_final : int tensor (ndim, npts)
        Final positions (truncated) of the start pixels.
    inds : int64 tensor (ndim, npts)
        Start pixels (``torch.nonzero(fg).T``: raster order), on the same device.
    shape0 : the image shape (Y, X) or (Z, Y, X).

    Returns
    -------
    labels : int32 tensor ``shape0`` on the device, labels 1..N by first appearance (0 = background).
    n_seeds : int, the number of seeds (an upper bound of N; it sets the label dtype, as on the host).
    One host sync (the seeds' count).
    """
    shape0 = tuple(int(s) for s in shape0)
    ndim = len(shape0)
    dev = p_final.device
    shape, strides, strides0 = histogram_geometry(shape0)
    hidx = histogram_index(p_final, shape0, strides)
    h = torch.bincount(hidx, minlength=math.prod(shape)).to(torch.int32).reshape(shape)
    seeds = torch.nonzero((h == max_filter(h, 5, range(ndim))) & (h > 10))
    n_seeds = int(seeds.shape[0])
    if n_seeds == 0:
        logger.warning("no seeds found in get_masks - no masks found.")
        return torch.zeros(shape0, dtype=torch.int32, device=dev), 0
    isort = h[tuple(seeds.T)].argsort()  # the host path's call, so ties are ordered the same way
    seeds = seeds[isort]
    rank_dtype = torch.int32 if n_seeds < 2**31 - 1 else torch.int64
    R = torch.zeros(shape, dtype=rank_dtype, device=dev)
    R[tuple(seeds.T)] = torch.arange(1, n_seeds + 1, dtype=rank_dtype, device=dev)
    keep = h > 2
    del h
    for _ in range(5):
        R = max_filter(R, 3, range(ndim))
        R *= keep
    M1 = R.reshape(-1)[hidx].to(torch.int64)  # the seed rank at each final position
    del R, keep, hidx
    counts = torch.bincount(M1, minlength=n_seeds + 1)
    bigc = counts > math.prod(shape0) * max_size_fraction
    bigc[0] = False
    M1 = torch.where(bigc[M1], 0, M1)
    start = sum(inds[k].to(torch.int64) * strides0[k] for k in range(ndim))
    npix = math.prod(shape0)
    first = torch.full((n_seeds + 1,), npix, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, M1, start, reduce="amin", include_self=True)
    first[0] = npix
    lut, _ = lut_from_first(first, npix)
    out = torch.zeros(npix, dtype=torch.int32, device=dev)
    out[start] = lut[M1].to(torch.int32)
    return out.reshape(shape0), n_seeds


def flow_errors_device(lab: torch.Tensor, nlab: int, dP: torch.Tensor) -> torch.Tensor:
    """Per-object flow errors (Cellpose's recipe: every object diffused for the image-wide step count,
    float64) of a label tensor with labels 1..nlab, all present.

    ``dP`` float (ndim, *shape) network flows on the device. Returns float64 (nlab,): the mean over each
    object's pixels of the squared difference between its unit flows and ``dP / 5``.
    """
    mu = flows_tensor_device(lab, None)
    err = ((mu - dP.to(torch.float64) / 5.0) ** 2).sum(0)
    lt = lab.reshape(-1).long()
    sums = torch.bincount(lt, weights=err.reshape(-1), minlength=nlab + 1)[1:]
    return sums / torch.bincount(lt, minlength=nlab + 1)[1:].to(torch.float64)


def remove_bad_flow_masks_device(lab: torch.Tensor, nlab: int, dP: torch.Tensor,
                                 threshold: float) -> torch.Tensor:
    """:func:`flow_check.remove_bad_flow_masks` on the device for labels 1..nlab (all present): masks
    whose flow error is above ``threshold`` removed, the rest renumbered by first appearance (int32)."""
    bad = torch.zeros(nlab + 1, dtype=torch.bool, device=lab.device)
    bad[1:] = flow_errors_device(lab, nlab, dP) > threshold
    kept = torch.where(bad[lab.long()], 0, lab.long())
    lut, _ = first_appearance_lut_torch(kept, nlab)
    return lut.to(torch.int32)[kept]


def pieces_per_label_torch(lab: torch.Tensor, nmax: int, check_every: int = 4) -> torch.Tensor:
    """Number of 8-connected pieces of each label 0..nmax (int64 (nmax + 1,); 0 for background) of a 2D
    label tensor, by label propagation with pointer jumping on the device.

    Every foreground pixel holds the smallest (foreground) index reached so far in its piece: each round
    takes the minimum over its 8 neighbours of the same label (one gather), then jumps twice to the value
    held at that index. The host checks for convergence every ``check_every`` rounds, so the syncs grow
    with the log of the pieces' size (compact cells: 2-3 checks), never with their number.
    """
    Y, X = lab.shape
    dev = lab.device
    flat = lab.reshape(-1)
    pos = torch.nonzero(flat).squeeze(1)
    n = pos.numel()
    lbl = flat[pos].long()
    if n == 0:
        return torch.zeros(nmax + 1, dtype=torch.int64, device=dev)
    idt = torch.int32 if n < 2**31 - 1 else torch.int64
    own = torch.arange(n, dtype=idt, device=dev)
    inv = torch.full((Y * X,), -1, dtype=idt, device=dev)
    inv[pos] = own
    py, px = pos // X, pos % X
    nbs = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if not (dy or dx):
                continue
            inside = (py + dy >= 0) & (py + dy < Y) & (px + dx >= 0) & (px + dx < X)
            q = torch.where(inside, pos + dy * X + dx, pos)
            same = inside & (flat[q].long() == lbl)
            nbs.append(torch.where(same, inv[q], own))
    nb = torch.stack(nbs).long()
    ids = own
    while True:
        before = ids
        for _ in range(check_every):
            m = torch.minimum(ids, ids[nb].amin(0))
            ids = m[m[m.long()].long()]  # values are indices into the same piece: jump twice
        if not bool((ids != before).any()):
            break
    return torch.zeros(nmax + 1, dtype=torch.int64, device=dev).index_add_(0, lbl, (ids == own).long())


def euler4_per_label_torch(lab: torch.Tensor, nmax: int) -> torch.Tensor:
    """4 x the Euler number (8-connected foreground) of each label 0..nmax of a 2D label tensor, from
    the 2 x 2 quads of the zero-padded image (int64 (nmax + 1,)); the device form of the count in
    :func:`postprocess.labels_with_holes_2d`."""
    p = F.pad(lab.long(), (1, 1, 1, 1)).contiguous()
    quads = (p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:])
    qa, qb, qc, qd = quads
    euler4 = torch.zeros(nmax + 1, dtype=torch.int64, device=lab.device)
    for j, v in enumerate(quads):
        valid = v > 0
        for q in quads[:j]:
            valid &= q != v  # each label once per quad
        ea, eb, ec, ed = (qa == v), (qb == v), (qc == v), (qd == v)
        n = ea.to(torch.int64) + eb + ec + ed
        diag = (ea & ed & ~eb & ~ec) | (eb & ec & ~ea & ~ed)
        contrib = (n == 1).to(torch.int64) - (n == 3).to(torch.int64) - 2 * diag.to(torch.int64)
        euler4.index_add_(0, v.reshape(-1), (contrib * valid).reshape(-1))
    return euler4


def remove_small_device(lab: torch.Tensor, nmax: int, min_size: int) -> torch.Tensor | None:
    """:func:`postprocess.fill_holes_and_remove_small_masks` (``min_size`` > 0) on the device for a 2D
    label tensor with labels <= nmax, when no mask left has a hole: int64 labels 1..N by first
    appearance. None when some mask has a hole (the host fills them); one host sync for that test."""
    lab = lab.long()
    counts = torch.bincount(lab.reshape(-1), minlength=nmax + 1)
    small = counts < min_size
    small[0] = False
    lab = torch.where(small[lab], 0, lab)
    holes = pieces_per_label_torch(lab, nmax) * 4 - euler4_per_label_torch(lab, nmax)
    holes[0] = 0
    if bool((holes > 0).any()):
        return None
    lut, _ = first_appearance_lut_torch(lab, nmax)
    return lut[lab]


def masks_on_device(dP: np.ndarray, cellprob: np.ndarray, niter: int, cellprob_threshold: float,
                    flow_threshold: float | None, max_size_fraction: float, device: torch.device,
                    interp: bool | str = True, min_size: int = 0) -> tuple[np.ndarray, bool]:
    """Follow flows, seeds, too-large masks removed and (with ``flow_threshold``) the flow check, on
    ``device``; the label image comes back once.

    Parameters
    ----------
    dP : float (ndim, *shape) network flows; cellprob : float (*shape), with some pixel above
    ``cellprob_threshold`` (the caller checks).
    flow_threshold : None or 0 skips the flow check (the caller passes None in 3D).

    min_size : > 0 (2D): masks smaller than this are removed on the device too, when no mask has a hole.

    Returns
    -------
    masks : numpy label image ``cellprob.shape``, labels 1..N by first appearance; dtype
        :func:`labels.label_dtype` of the seed count (as the host path), or of N when ``done``.
    done : True when small masks were removed here (no mask had a hole); False: holes are still to be
        filled and small masks removed (``postprocess.fill_holes_and_remove_small_masks``).
    """
    shape0 = cellprob.shape
    dPt = torch.from_numpy(np.ascontiguousarray(dP)).to(device)
    fg = torch.from_numpy(np.ascontiguousarray(cellprob)).to(device) > cellprob_threshold
    inds = torch.nonzero(fg).T.contiguous()  # (ndim, npts), raster order as np.nonzero
    step = dPt.to(torch.float32) * fg
    step /= 5.0
    p_final = follow_flows(step, tuple(inds), niter=niter, device=device, interp=interp).int()
    del step
    lab, n_seeds = get_masks_device(p_final, inds, shape0, max_size_fraction=max_size_fraction)
    del p_final, inds
    if n_seeds and flow_threshold:
        nlab = int(lab.max())
        if nlab:
            lab = remove_bad_flow_masks_device(lab, nlab, dPt, flow_threshold)
    if n_seeds and min_size and min_size > 0 and lab.ndim == 2:
        done = remove_small_device(lab, n_seeds, int(min_size))
        if done is not None:
            out = done.cpu().numpy()
            return out.astype(label_dtype(int(out.max()))), True
    return lab.cpu().numpy().astype(label_dtype(n_seeds)), False
