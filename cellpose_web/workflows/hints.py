""""What to try" when a segmentation result looks wrong, and how to describe a z-stack result.

:func:`suggest` looks at the masks only (no ground truth) and returns one line suggesting a
diameter, the segmentation channels or another model when the result has no or very few cells,
cells much larger or smaller than the diameter used, or mostly cells cut by the image border.
The app shows the line under the cell count and the command line prints it after the summary.
"""
from __future__ import annotations

import numpy as np

from cellpose_web.models import DIAM_MEAN, auto_diameter_zoom
from cellpose_web.engine.overlap import label_overlap

#: a result is "very few cells" when the image could hold this many times more cells of the expected size
_FEW_CELLS = 3
_ROOM_FACTOR = 20


def cell_diameters(masks: np.ndarray) -> np.ndarray:
    """Equivalent-circle diameter (px) of every object of a (Y, X) label image, shape (N,)."""
    areas = np.bincount(np.asarray(masks).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / np.pi)


def border_fraction(masks: np.ndarray) -> float:
    """Fraction of the objects of a (Y, X) label image that touch the image border (0 when empty)."""
    m = np.asarray(masks)
    ids = np.unique(m[m > 0])
    if ids.size == 0:
        return 0.0
    edge = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
    return float(np.isin(ids, edge).mean())


def planes_linked(masks: np.ndarray, iou: float = 0.3) -> float:
    """For a plane-by-plane (Z, Y, X) result: the fraction of masks that continue into the next plane
    (IoU >= `iou` with a mask there). Near 1 means the planes show the same cells and stitching
    (``stitch_threshold``) or ``do_3D`` would give one 3D object per cell."""
    m = np.asarray(masks)
    if m.ndim != 3 or m.shape[0] < 2:
        return 0.0
    linked = total = 0
    for z in range(m.shape[0] - 1):
        ia, ib, shared, area_a, area_b = label_overlap(m[z], m[z + 1])
        total += int(np.count_nonzero(area_a[1:]))
        if ia.size:
            pair_iou = shared / (area_a[ia] + area_b[ib] - shared)
            linked += len(np.unique(ia[pair_iou >= iou]))
    return linked / total if total else 0.0


def diameter_note(diameter_estimate: float | None, image_shape: tuple[int, ...] | None = None) -> str:
    """How an automatic diameter went, "" when none was estimated.

    e.g. "diameter estimated at 20 px; a second pass ran zoomed 1.48x (2.2x the pixels): enter the
    diameter to skip the estimate" (lite, ``diameter=None``; see ``models.auto_diameter_zoom``;
    ``image_shape`` (Y, X, ...) of the image segmented).
    """
    if diameter_estimate is None or not diameter_estimate > 0:
        return ""
    note = f"diameter estimated at {diameter_estimate:.0f} px"
    zoom = auto_diameter_zoom(diameter_estimate, image_shape)
    if zoom is None:
        return note
    capped = zoom < DIAM_MEAN / diameter_estimate - 1e-6
    return (f"{note}; a second pass ran zoomed {zoom:.2f}x ({zoom * zoom:.1f}x the pixels"
            + (", the most an automatic diameter zooms" if capped else "")
            + "): enter the diameter to skip the estimate")


def count_text(n_objects: int, masks_ndim: int, n_planes: int = 1, volumetric: bool = False) -> str:
    """How a result's count reads: '12 cells' (2D), '20 3D cells' (do_3D / stitched), or
    '834 masks in 60 Z planes' (a stack segmented plane by plane: masks, not cells)."""
    if masks_ndim == 3 and not volumetric:
        return f"{n_objects} mask{'' if n_objects == 1 else 's'} in {n_planes} Z plane{'' if n_planes == 1 else 's'}"
    noun = "3D cell" if masks_ndim == 3 else "cell"
    return f"{n_objects} {noun}{'' if n_objects == 1 else 's'}"


def suggest(masks: np.ndarray, diameter: float | None = None, n_channels: int = 1,
            channels_chosen: bool = False, model_name: str | None = None) -> str:
    """One line of advice when a result looks wrong, "" when nothing stands out.

    Parameters
    ----------
    masks : (Y, X) labels, or (Z, Y, X) (judged on the plane with the most objects).
    diameter : the diameter (px) given to eval; None when automatic.
    n_channels : channels in the image the user opened.
    channels_chosen : whether the user picked the segmentation channels.
    model_name : the model used (to suggest another one).

    Returns
    -------
    str
        e.g. "Only 2 cells for an image that could hold hundreds: try Diameter blank (automatic) or
        the cells' size in px, check the segmentation channels, or try cpsam_v2."
    """
    m = np.asarray(masks)
    if m.ndim == 3:
        per_plane = [len(np.unique(p[p > 0])) for p in m]
        m = m[int(np.argmax(per_plane))] if per_plane else m[0]
    if m.ndim != 2:
        return ""
    d = cell_diameters(m)
    n = len(d)
    other = "cpsam_v2 (Cellpose-SAM)" if str(model_name or "").lower() not in ("cpsam", "cpsam_v2") else \
        "a model fine-tuned on your images (Fine-tune tab)"
    channel_tip = (" check the segmentation channels (the cell/membrane stain, then the nuclear stain),"
                   if n_channels > 1 and not channels_chosen else "")
    expected = float(diameter) if diameter else 30.0
    room = m.size / (np.pi * (expected / 2) ** 2)
    if n == 0:
        return ("No cells found: try Diameter blank (automatic) or the cells' size in px, a lower cell "
                f"probability threshold,{channel_tip} or {other}.")
    med = float(np.median(d))
    if n <= _FEW_CELLS and room >= _ROOM_FACTOR * n and med < 3 * expected:
        return (f"Only {n} cell{'s' if n > 1 else ''} for an image that could hold many more: try Diameter blank "
                f"(automatic) or the cells' size in px, a lower cell probability threshold,{channel_tip} "
                f"or {other}.")
    if diameter and med > 2.0 * diameter:
        return (f"Cells are about {med:.0f} px across but the diameter was {diameter:g} px: set Diameter to "
                f"about {med:.0f} (or leave it blank for automatic).")
    if diameter and med < 0.5 * diameter:
        return (f"Cells are about {med:.0f} px across but the diameter was {diameter:g} px: set Diameter to "
                f"about {med:.0f} (or leave it blank for automatic){' or' + channel_tip.rstrip(',') if channel_tip else ''}.")
    if not diameter and med < 8:
        return (f"Objects are only about {med:.0f} px across: if the cells are larger, give their size as "
                f"Diameter,{channel_tip} or try {other}.")
    if n >= 3 and border_fraction(m) > 0.5 and med > min(m.shape) / 4:  # small crops cut many cells: fine
        return (f"Most cells ({100 * border_fraction(m):.0f} %) touch the image border: cells may be larger "
                f"than the model expects (give their size as Diameter), or{channel_tip or ' '} try {other}.")
    return ""
