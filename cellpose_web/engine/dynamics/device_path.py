"""The post-processing kept on the device: flows -> masks with every step in torch tensors.

What CUDA runs (and the CPU too while ``device_setup.DEVICE_PATH_ON_CPU`` is set): Euler integration,
the histogram and its seeds, seed growth, removal of too large masks, the first-appearance numbering,
the flow-error check and the removal of small masks all stay on the device; no step loops over objects
in Python, and the host waits for the device a fixed number of times per image, whatever the number of
objects (``torch.nonzero`` / ``torch.unique`` for data-dependent sizes, a few counts; see
``tests/test_dynamics_gpu_path.py``, which counts them). The label image comes back to the host once,
for the hole filling (``postprocess.fill_holes_and_remove_small_masks``, scipy) and the numpy result.

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
from cellpose_web.engine.dynamics.following import RPAD, follow_flows
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
    shape = tuple(s + 2 * RPAD for s in shape0)
    strides = [math.prod(shape[k + 1:]) for k in range(ndim)]
    strides0 = [math.prod(shape0[k + 1:]) for k in range(ndim)]
    pt = p_final.to(torch.int64) + RPAD
    pt.clamp_(min=0)
    hidx = sum(pt[k].clamp_(max=shape0[k] + RPAD - 1) * strides[k] for k in range(ndim))
    del pt
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


def masks_on_device(dP: np.ndarray, cellprob: np.ndarray, niter: int, cellprob_threshold: float,
                    flow_threshold: float | None, max_size_fraction: float, device: torch.device,
                    interp: bool | str = True) -> np.ndarray:
    """Follow flows, seeds, too-large masks removed and (with ``flow_threshold``) the flow check, on
    ``device``; the label image comes back once.

    Parameters
    ----------
    dP : float (ndim, *shape) network flows; cellprob : float (*shape), with some pixel above
    ``cellprob_threshold`` (the caller checks).
    flow_threshold : None or 0 skips the flow check (the caller passes None in 3D).

    Returns
    -------
    numpy label image ``cellprob.shape``, dtype :func:`labels.label_dtype` of the seed count (as the host
    path), labels 1..N by first appearance, before holes are filled and small masks removed.
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
    return lab.cpu().numpy().astype(label_dtype(n_seeds))
