"""Instance labels read from a file, checked once for every place that takes masks from a person:
the Correct tab's *Load existing masks*, training pairs uploaded to the Fine-tune tab, and the
human-in-the-loop's saved corrections.

Instance labels are whole numbers, 0 = background and 1..N = one number per cell (Cellpose's
``_masks.tif`` / ``_cp_masks.png`` / ``_seg.npy``). What else people upload, and what happens:

- whole-number floats (ImageJ's 32-bit label images): taken as labels;
- a grey picture stored as RGB(A) (all colour channels equal): its first channel;
- a colour picture (channels differ, e.g. a colour-coded label image or an overlay): refused;
- fractions, negative numbers, NaN: refused (a probability map or an image, not labels);
- a binary mask (True/False, or only 0 and 1) whose foreground falls apart into separate regions:
  refused: it marks where cells are, not which pixels belong to which cell, and training on it
  would teach the network that all those cells are one.
"""
from __future__ import annotations

import numpy as np

from cellpose_web.engine.dynamics.labels import label_dtype
from cellpose_web.errors import BadInputError

__all__ = ["instance_labels"]


def instance_labels(masks: np.ndarray, name: str) -> np.ndarray:
    """Check and convert masks read from a file to instance labels.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) array as read from the file; (Y, X, 3|4) for an RGB(A) picture.
    name : the file's name, for the messages.

    Returns
    -------
    (Y, X) or (Z, Y, X) uint16 labels (uint32 past 65535 labels), 0 = background.

    Raises
    ------
    BadInputError
        for anything that is not one whole number per cell (see the module's documentation).
    """
    m = np.asarray(masks)
    if m.ndim == 3 and m.shape[-1] in (3, 4):
        colour = m[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise BadInputError(
                f"{name} is a colour picture (Y, X, {m.shape[-1]}), not a label image: masks need one channel with "
                "a whole number per cell (0 = background), e.g. Cellpose's _cp_masks.png / _masks.tif or a _seg.npy.")
        m = colour[..., 0]
    if m.dtype.kind == "b":
        m = m.astype(np.uint8)
    if m.dtype.kind == "f":
        if not np.all(np.isfinite(m)) or np.any(m != np.round(m)):
            raise BadInputError(f"{name} holds fractions (or NaN), not labels: masks need a whole number per cell "
                                "(0 = background), not a probability map or an image.")
    elif m.dtype.kind not in "iu":
        raise BadInputError(f"{name} holds {m.dtype} values, not labels: masks need a whole number per cell.")
    if m.size and m.min() < 0:
        raise BadInputError(f"{name} has negative values: labels are 0 (background) and 1, 2, 3... (one per cell).")
    top = int(m.max(initial=0))
    n_regions = _regions(m) if top == 1 else 1
    if n_regions > 1:
        raise BadInputError(
            f"{name} is a binary mask: {n_regions} separate regions all carry the label 1, so every cell would "
            "count as one. Save the masks with a number per cell (Cellpose's _masks.tif / _seg.npy, or label the "
            "regions, e.g. skimage.measure.label) and upload them again.")
    return m.astype(label_dtype(top))


def _regions(binary: np.ndarray) -> int:
    """Number of 8-connected (2D; 26-connected 3D) foreground regions."""
    from scipy import ndimage as ndi

    fg = binary > 0
    return int(ndi.label(fg, structure=np.ones((3,) * fg.ndim, bool))[1])
