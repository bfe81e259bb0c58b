"""compute_masks: the whole path from network output to masks (follow flows -> seeds -> flow check ->
fill holes / remove small masks), as Cellpose 4's ``dynamics.compute_masks``."""
from __future__ import annotations

import logging
from typing import Callable
import numpy as np
from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.dynamics.device_setup import as_device, cpu_threads, uses_device_path
from cellpose_web.engine.dynamics.device_path import masks_on_device
from cellpose_web.engine.dynamics.following import follow_flows, get_masks
from cellpose_web.engine.dynamics.flow_check import check_flows, remove_bad_flow_masks
from cellpose_web.engine.dynamics.postprocess import fill_holes_and_remove_small_masks
from cellpose_web.engine.memory import is_out_of_memory

logger = logging.getLogger(__name__)


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
    dP, cellprob = check_flows(dP, cellprob)
    if niter is None or niter == 0:
        niter = 200
    try:
        niter = int(niter)
    except (TypeError, ValueError) as e:
        raise CellposeWebError(f"niter must be a whole number, got {niter!r}.") from e
    if niter < 0:
        raise CellposeWebError(f"niter must be >= 0, got {niter}.")
    device = as_device(device)
    shape0 = cellprob.shape
    fg = cellprob > cellprob_threshold
    if min(shape0) < 2:
        logger.warning("image of shape %s is too small for flow dynamics: no masks.", shape0)
        return np.zeros(shape0, np.uint16)
    if not fg.any():
        logger.info("No cell pixels found.")
        return np.zeros(shape0, np.uint16)
    is3d = cellprob.ndim == 3 or do_3D
    check = not is3d and flow_threshold is not None and flow_threshold > 0
    mask = None
    if uses_device_path(device):  # everything up to the flow check on the device (device_path)
        on_device = check and flow_error_fn is None
        try:
            with cpu_threads(device):
                mask, done = masks_on_device(dP, cellprob, niter, cellprob_threshold,
                                             flow_threshold if on_device else None, max_size_fraction, device,
                                             interp, min_size=(min_size or 0) if (on_device or not check) else 0)
            check = check and not on_device
        except RuntimeError as e:
            if is_out_of_memory(e):
                raise
            # a kernel this device or torch build lacks: the host path gives the same masks, only slower
            logger.warning("device post-processing failed on %s (%s); using the host path", device,
                           " ".join(str(e).split())[:200])
            mask = None
    if mask is None:
        done = False
        inds = np.nonzero(fg)
        with cpu_threads(device):
            step = np.multiply(dP, fg, dtype=np.float32)  # one temporary (large images: bounded memory)
            step /= 5.0
            p_final = follow_flows(step, inds, niter=niter, device=device, interp=interp).int()
            del step
            mask = get_masks(p_final, inds, shape0, max_size_fraction=max_size_fraction)
        del p_final, inds
    if check and mask.max() > 0:
        mask = remove_bad_flow_masks(mask, dP, threshold=flow_threshold, device=device, flow_error_fn=flow_error_fn)
    if mask.max() < 2**16 and mask.dtype != np.uint16:
        mask = mask.astype(np.uint16)
    if not done:
        mask = fill_holes_and_remove_small_masks(mask, min_size=min_size)
    if mask.dtype == np.uint32 and mask.max() < 2**16:
        mask = mask.astype(np.uint16)
    elif mask.dtype == np.uint32:
        logger.warning("more than 65535 masks in image, masks returned as np.uint32")
    return mask
