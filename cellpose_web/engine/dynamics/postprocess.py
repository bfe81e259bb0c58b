"""Mask post-processing: fill holes and remove small masks, stitch planes (``stitch3D``), remove edge
masks, diameters."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from cellpose_web.engine.overlap import iou_matrix
from cellpose_web.engine.dynamics.labels import as_labels, first_appearance_lut, label_counts, label_dtype, renumber_first, renumber_sorted, row_bands


# ----------------------------------------------------------------------------------------------
# label-image utilities
# ----------------------------------------------------------------------------------------------
def fill_object_holes(crop: np.ndarray, value: int) -> np.ndarray:
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
        masks, _ = renumber_sorted(masks)
    counts = label_counts(masks)
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
    lab = as_labels(masks, "masks")
    dtype = lab.dtype if lab.dtype.kind == "u" and lab.dtype.itemsize >= 2 else None
    if lab.size == 0:
        return lab.astype(dtype or np.uint16)
    min_size = int(min_size) if min_size is not None else 0
    if min_size > 0:
        lab = _remove_small(lab, min_size)
        lab = renumber_first(lab, dtype=np.int32 if lab.size < 2**31 - 1 else np.int64)
    else:
        lab, _ = renumber_sorted(lab)
    lab = np.ascontiguousarray(lab)
    nmax = int(lab.max())
    slices = ndi.find_objects(lab)
    # in 2D only masks that have a hole need work (the others are left as they are by the fill)
    todo = labels_with_holes_2d(lab, nmax) if (lab.ndim == 2 and nmax > 0) else np.arange(1, nmax + 1)
    for v in todo:
        slc = slices[v - 1]
        if slc is None:
            continue
        crop = lab[slc]
        filled = fill_object_holes(crop, int(v))
        crop[filled] = v
    lut = None
    if min_size > 0:  # holes filled: drop what is still too small, renumber by first appearance
        lab = _remove_small(lab, min_size)
        lut, nmax = first_appearance_lut(lab)
    else:
        nmax = int(lab.max()) if lab.size else 0
    if dtype is None or nmax >= np.iinfo(dtype).max:
        dtype = label_dtype(nmax)
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
    lab = as_labels(masks, "masks", ndims=(3,))
    out = lab.copy()
    if out.dtype.kind != "u" or out.dtype.itemsize < 2:
        out = out.astype(label_dtype(int(out.max()) if out.size else 0))
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
    lab = as_labels(masks, "masks")
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
        ren, _ = renumber_sorted(out)
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
    lab = as_labels(masks, "masks")
    counts = np.bincount(lab.reshape(-1).astype(np.int64, copy=False))[1:] if lab.size else np.zeros(0)
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0, np.zeros(0)
    root = counts**0.5
    md = float(np.median(root))
    md /= (np.pi**0.5) / 2
    return md, root


def labels_with_holes_2d(lab: np.ndarray, nmax: int) -> np.ndarray:
    """Labels whose mask has at least one hole (4-connected background enclosed by the mask).

    Uses the Euler number (8-connected foreground) from 2x2 pixel quads, evaluated only on quads that
    mix labels, and the number of 8-connected pieces: holes = pieces - Euler number.
    """
    Ly = lab.shape[0]
    euler4 = np.zeros(nmax + 1, dtype=np.int64)  # 4 x Euler number per label
    for r0, r1 in row_bands(lab.shape):  # integer sums: the same in any order
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

    The pieces are found in row bands (``labels.BAND_PIXELS``) and joined across the bands' edges (a graph of
    the bands' pieces, linked where two 8-adjacent pixels across an edge hold the same label), so the
    counts are those of the whole image without whole-image component images.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.measure import label as sk_label

    Lx = lab.shape[1]
    piece_label, links, offset, above = [], [], 0, None
    for r0, r1 in row_bands(lab.shape):
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
