"""Masks from flows: Euler integration of the pixels along the flows, and seeds -> masks (``get_masks``).

Euler integration drops duplicate trajectories: pixels whose float32 positions became identical
follow the same path from then on, so only one of them is integrated. Seed growth runs for all seeds
at once as a 5-step max-dilation of a "seed rank" image limited to histogram bins with more than 2
hits; the highest-ranked (largest) seed wins overlaps, as in Cellpose."""
from __future__ import annotations

import logging
import math
from typing import Sequence
import numpy as np
import torch
import torch.nn.functional as F
from cellpose_web.engine.dynamics import labels
from cellpose_web.engine.dynamics.device_setup import as_device
from cellpose_web.engine.dynamics.labels import halo_bands, label_dtype, max_filter

logger = logging.getLogger(__name__)


RPAD = 20  # histogram padding used by Cellpose's get_masks


_MERGE_AT = (0.2, 0.3, 0.4, 0.55, 0.75)  # fractions of niter where identical trajectories are merged


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
    dP : float array or tensor (2, Y, X) or (3, Z, Y, X)
        Flow field in pixels per step (Cellpose passes ``dP * foreground / 5``).
    inds : tuple of int arrays or tensors
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
    device = as_device(device)
    if interp is False or interp == "pixel":
        return _steps_pixels(dP, inds, niter, device, bilinear=interp == "pixel")
    shape = dP.shape[1:]
    ndim = len(shape)
    npts = len(inds[0])
    dPt = _tensor(dP)
    pt = torch.zeros((*[1] * ndim, npts, ndim), dtype=torch.float32, device=device)
    im = torch.zeros((1, ndim, *shape), dtype=torch.float32, device=device)
    for n in range(ndim):
        pt[..., ndim - n - 1] = _tensor(inds[n]).to(device, dtype=torch.float32)
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


def _tensor(x) -> torch.Tensor:
    """``x`` as a tensor (a tensor stays where it is: the device path passes tensors on the device)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


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
    flow = dP.to(device, torch.float32) if isinstance(dP, torch.Tensor) else \
        torch.as_tensor(np.asarray(dP, dtype=np.float32)).to(device)
    ndim = flow.shape[0]
    shape = [int(v) for v in flow.shape[1:]]
    planes = flow.reshape(ndim, -1)  # one flat plane per flow component: each corner is one gather per plane
    strides = [math.prod(shape[k + 1:]) for k in range(ndim)]
    top = torch.tensor([[v - 1] for v in shape], dtype=torch.float32, device=device)
    P = torch.stack([_tensor(i).to(device) for i in inds]).to(torch.float32)  # (ndim, npts)
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


def histogram_geometry(shape0) -> tuple[tuple[int, ...], list[int], list[int]]:
    """(padded shape, its flat strides, the image's flat strides) of :func:`get_masks`' histogram of
    final positions, which has ``RPAD`` pixels of margin on every side of the image ``shape0``."""
    shape0 = tuple(int(s) for s in shape0)
    shape = tuple(s + 2 * RPAD for s in shape0)
    return (shape, [math.prod(shape[k + 1:]) for k in range(len(shape))],
            [math.prod(shape0[k + 1:]) for k in range(len(shape0))])


def histogram_index(p_final: torch.Tensor, shape0, strides: Sequence[int]) -> torch.Tensor:
    """Flat int64 index into the padded histogram (strides from :func:`histogram_geometry`) of final
    positions ``p_final`` (ndim, n), clamped to the image plus ``RPAD`` - 1 pixels on each side, as
    Cellpose clamps them."""
    pt = p_final.to(torch.int64) + RPAD
    pt.clamp_(min=0)
    for k in range(len(strides)):
        pt[k].clamp_(max=int(shape0[k]) + RPAD - 1)
    return sum(pt[k] * strides[k] for k in range(len(strides)))


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
    shape, strides, strides0 = histogram_geometry(shape0)
    npts = int(p_final.shape[1])
    # the points are handled in chunks on a CPU (no int64 copies of every point's coordinates)
    chunks = [(c0, min(npts, c0 + labels.BAND_PIXELS)) for c0 in range(0, npts, labels.BAND_PIXELS)] \
        if device.type == "cpu" else [(0, npts)]

    def hist_index(c0: int, c1: int) -> torch.Tensor:
        """Flat index into the padded histogram of the final positions of points c0..c1."""
        return histogram_index(p_final[:, c0:c1], shape0, strides)

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
    for r0, r1, a, b in halo_bands(shape, 2, device):
        hb = h[a:b]
        nz = torch.nonzero(((hb == max_filter(hb, 5, range(ndim))) & (hb > 10))[r0 - a:r1 - a])
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
    for r0, r1, a, b in halo_bands(Rw.shape, 5, device):
        Rb, kb = Rw[a:b], keepw[a:b]
        for _ in range(5):
            Rb = max_filter(Rb, 3, range(ndim))
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
    out_dtype = label_dtype(n_seeds)
    lut = np.zeros(n_seeds + 1, dtype=out_dtype)
    lut[order] = np.arange(1, len(order) + 1)
    out = np.zeros(shape0, dtype=out_dtype)
    flat_out = out.reshape(-1)
    M1 = M1.cpu().numpy()
    for c0, c1 in chunks:
        flat_out[start_index(c0, c1).cpu().numpy()] = lut[M1[c0:c1]]
    return out
