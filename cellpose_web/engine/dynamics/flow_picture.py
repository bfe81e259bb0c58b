"""The flow picture: flows as colours (Cellpose's ``dx_to_circ``)."""
from __future__ import annotations

import numpy as np
import torch
from cellpose_web.engine import transforms
from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.dynamics.device_setup import to_numpy
from cellpose_web.engine.dynamics.labels import halo_bands


def dx_to_circ(dP) -> np.ndarray:
    """RGB uint8 (..., 3) picture of flows: hue = direction, brightness = normalised magnitude.

    For (2, Y, X) [dY, dX] and, as Cellpose 4 does, for (3, Z, Y, X): magnitude over all components and
    angle atan2(dP[1], dP[0]).
    """
    dP = to_numpy(dP, "dP")
    if dP.ndim < 3 or dP.shape[0] not in (2, 3):
        raise CellposeWebError(f"dP must have shape (2, Y, X) or (3, Z, Y, X), got {dP.shape}.")
    if dP.dtype.kind != "f":
        dP = dP.astype(np.float32)
    # elementwise in bands along the first spatial axis (large images: no whole-image temporaries),
    # except the magnitude, whose percentiles are taken over the whole image
    bands = [(r0, r1) for r0, r1, _, _ in halo_bands(dP.shape[1:], 0, torch.device("cpu"))]
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
