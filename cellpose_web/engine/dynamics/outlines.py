"""Outlines of masks: the outline image (``masks_to_outlines``) and per-mask outline polygons
(``outlines_list``), as Cellpose's cv2.findContours(RETR_EXTERNAL)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from cellpose_web.engine.dynamics.labels import as_labels
from cellpose_web.engine.dynamics.postprocess import fill_object_holes, labels_with_holes_2d


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
    cand = labels_with_holes_2d(lab, nmax)
    if len(cand):
        slices = ndi.find_objects(lab)
        for v in cand:
            slc = slices[v - 1]
            filled = fill_object_holes(lab[slc], v)
            fp = np.pad(filled, 1)
            cc = fp[1:-1, 1:-1]
            edge = (~fp[:-2, 1:-1]) | (~fp[2:, 1:-1]) | (~fp[1:-1, :-2]) | (~fp[1:-1, 2:])
            obj = lab[slc] == v
            region = out[slc]
            region[obj] = (edge & cc)[obj]
    return out


def masks_to_outlines(masks) -> np.ndarray:
    """Bool outlines of masks: each mask's outer-boundary pixels (Cellpose 4 ``masks_to_outlines``).

    A pixel of mask A is an outline pixel when one of its 4 neighbours lies outside A (or outside the
    image) and is not inside one of A's holes. 3D input is handled plane by plane.

    Returns
    -------
    bool (Y, X) or (Z, Y, X)
    """
    lab = as_labels(masks, "masks")
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

    lab = as_labels(masks, "masks", ndims=(2,))
    out = []
    if lab.size == 0 or lab.max() == 0:
        return out
    slices = ndi.find_objects(lab)
    for i, slc in enumerate(slices):
        if slc is None:
            continue
        v = i + 1
        filled = fill_object_holes(lab[slc], v)
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
