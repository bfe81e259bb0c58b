"""Pixel overlap of two label images: the one counting step under the metrics (IoU, AP) and
3D stitching (``dynamics.stitch3D``).

Label images are integer arrays of the same shape, (Y, X) or (Z, Y, X), 0 = background.
"""
from __future__ import annotations

import numpy as np

__all__ = ["label_overlap", "iou_matrix"]


def label_overlap(labels_a: np.ndarray, labels_b: np.ndarray):
    """Sparse pixel counts of (label in a, label in b) pairs, both > 0, plus the label areas.

    Parameters
    ----------
    labels_a, labels_b : integer arrays of one shape (any number of dimensions), 0 = background.

    Returns
    -------
    ia, ib : int64 (K,) label pairs that share at least one pixel.
    counts : int64 (K,) pixels shared by each pair.
    area_a : int64 (a.max() + 1,) pixels of each label of a (index = label; [0] = background).
    area_b : int64 (b.max() + 1,) the same for b.
    """
    af = labels_a.reshape(-1).astype(np.int64, copy=False)
    bf = labels_b.reshape(-1).astype(np.int64, copy=False)
    na = int(af.max()) + 1 if af.size else 1
    nb = int(bf.max()) + 1 if bf.size else 1
    area_a = np.bincount(af, minlength=na)
    area_b = np.bincount(bf, minlength=nb)
    both = (af > 0) & (bf > 0)
    key = af[both] * nb + bf[both]
    if key.size and na * nb <= 4 * af.size + 2**20:  # dense counting when the pair table is small
        c = np.bincount(key, minlength=0)
        k = np.flatnonzero(c)
        cnt = c[k]
    else:
        k, cnt = np.unique(key, return_counts=True)
    return k // nb, k % nb, cnt, area_a, area_b


def iou_matrix(labels_a: np.ndarray, labels_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of labels 1..a.max() (rows) against the labels present in b (columns, ascending).

    Returns
    -------
    iou : float64 (a.max(), ncols); row i is label i + 1 of a (0 where it overlaps nothing).
    cols : int64 (ncols,) the label of b in each column.
    """
    ia, ib, cnt, area_a, area_b = label_overlap(labels_a, labels_b)
    cols = np.flatnonzero(area_b[1:] > 0) + 1
    col_of = np.zeros(len(area_b), dtype=np.int64)
    col_of[cols] = np.arange(len(cols))
    iou = np.zeros((len(area_a) - 1, len(cols)), dtype=np.float64)
    iou[ia - 1, col_of[ib]] = cnt / (area_a[ia] + area_b[ib] - cnt)
    return iou, cols
