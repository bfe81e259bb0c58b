"""Segmentation metrics with Cellpose 4's definitions (``cellpose.metrics``).

- ``average_precision``: the "matching AP" TP / (TP + FP + FN) at IoU thresholds, with Hungarian
  matching (``scipy.optimize.linear_sum_assignment``) on cost -(IoU >= th) - IoU / (2 n_min).
- ``mask_ious``: IoU of each true mask with its matched predicted mask.
- ``aggregated_jaccard_index``: Cellpose's simplified AJI (matched intersections / foreground union).
- ``boundary_scores``: precision / recall / F of outlines within a disk of scale * diameter.

Label images are (Y, X) or (Z, Y, X) integer arrays, 0 = background.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.overlap import label_overlap

__all__ = ["average_precision", "mask_ious", "aggregated_jaccard_index", "boundary_scores"]


def _labels(x, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(x)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.floor(arr)).any():
            raise CellposeWebError(f"{name} must hold whole-number labels (0 = background), not fractions or NaN.")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise CellposeWebError(f"{name} must be an integer label image, got dtype {arr.dtype}.")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise CellposeWebError(f"{name} has negative labels; use 0 for background and 1, 2, ... for objects.")
    return arr


def _pair(masks_true, masks_pred) -> tuple[np.ndarray, np.ndarray]:
    t = _labels(masks_true, "masks_true")
    p = _labels(masks_pred, "masks_pred")
    if t.shape != p.shape:
        raise CellposeWebError(
            f"masks_true {t.shape} and masks_pred {p.shape} must have the same shape to be compared."
        )
    return t, p


def _iou_sub(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """IoU matrix without background: [t.max(), p.max()] float64."""
    ti, pi, cnt, at, ap_ = label_overlap(t, p)
    iou = np.zeros((len(at) - 1, len(ap_) - 1), dtype=np.float64)
    iou[ti - 1, pi - 1] = cnt / (at[ti] + ap_[pi] - cnt)
    return iou


def _true_positive(iou: np.ndarray, th: float) -> int:
    n_min = min(iou.shape[0], iou.shape[1])
    if n_min == 0:
        return 0
    costs = -(iou >= th).astype(float) - iou / (2 * n_min)
    true_ind, pred_ind = linear_sum_assignment(costs)
    return int((iou[true_ind, pred_ind] >= th).sum())


def _n_labels(m: np.ndarray) -> int:
    if m.size == 0:
        return 0
    f = m.reshape(-1)
    mx = int(f.max())
    if mx <= 4 * f.size + 2**20:
        return int(np.count_nonzero(np.bincount(f.astype(np.int64, copy=False))[1:]))
    return int(np.count_nonzero(np.unique(f)))


def average_precision(masks_true, masks_pred, threshold=(0.5, 0.75, 0.9)):
    """Matching AP = TP / (TP + FP + FN) at IoU thresholds (Cellpose 4 definition).

    Parameters
    ----------
    masks_true, masks_pred : int array (Y, X) / (Z, Y, X), or lists of them (same length)
    threshold : float or sequence of floats
        IoU thresholds.

    Returns
    -------
    ap, tp, fp, fn : float32 arrays [n_images, n_thresholds] (1D [n_thresholds] for a single pair).
        ap is NaN when an image has neither true nor predicted masks.
    """
    not_list = not isinstance(masks_true, (list, tuple))
    if not_list:
        masks_true, masks_pred = [masks_true], [masks_pred]
    elif not isinstance(masks_pred, (list, tuple)):
        raise CellposeWebError("masks_pred must be a list when masks_true is a list.")
    if np.isscalar(threshold):
        threshold = [threshold]
    threshold = [float(t) for t in threshold]
    if len(masks_true) != len(masks_pred):
        raise CellposeWebError(
            f"average_precision needs as many predicted as true label images ({len(masks_pred)} vs {len(masks_true)})."
        )
    n = len(masks_true)
    ap = np.zeros((n, len(threshold)), np.float32)
    tp = np.zeros((n, len(threshold)), np.float32)
    fp = np.zeros((n, len(threshold)), np.float32)
    fn = np.zeros((n, len(threshold)), np.float32)
    for i in range(n):
        t, p = _pair(masks_true[i], masks_pred[i])
        n_true, n_pred = _n_labels(t), _n_labels(p)
        if n_pred > 0:
            iou = _iou_sub(t, p)
            for k, th in enumerate(threshold):
                tp[i, k] = _true_positive(iou, th)
        fp[i] = n_pred - tp[i]
        fn[i] = n_true - tp[i]
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[i] = tp[i] / (tp[i] + fp[i] + fn[i])
    if not_list:
        return ap[0], tp[0], fp[0], fn[0]
    return ap, tp, fp, fn


def mask_ious(masks_true, masks_pred) -> tuple[np.ndarray, np.ndarray]:
    """Best-matched IoU for each true mask (Hungarian matching, cost at threshold 0.5).

    Returns
    -------
    iout : float64 (masks_true.max(),)
        IoU of true label k+1 with its matched predicted mask (0 if unmatched).
    preds : int (masks_true.max(),)
        Matched predicted label (1-based), 0 if none.
    """
    t, p = _pair(masks_true, masks_pred)
    iou = _iou_sub(t, p)
    nt = iou.shape[0]
    iout = np.zeros(nt)
    preds = np.zeros(nt, int)
    n_min = min(iou.shape)
    if n_min == 0:
        return iout, preds
    costs = -(iou >= 0.5).astype(float) - iou / (2 * n_min)
    true_ind, pred_ind = linear_sum_assignment(costs)
    iout[true_ind] = iou[true_ind, pred_ind]
    preds[true_ind] = pred_ind + 1
    return iout, preds


def aggregated_jaccard_index(masks_true, masks_pred) -> np.ndarray:
    """Cellpose's AJI per image: sum of matched intersections / |(true > 0) or (pred > 0)|.

    Accepts single label images or lists. Returns float64 (n_images,).
    """
    if not isinstance(masks_true, (list, tuple)):
        masks_true, masks_pred = [masks_true], [masks_pred]
    if len(masks_true) != len(masks_pred):
        raise CellposeWebError("aggregated_jaccard_index needs as many predicted as true label images.")
    aji = np.zeros(len(masks_true))
    for n in range(len(masks_true)):
        t, p = _pair(masks_true[n], masks_pred[n])
        _, preds = mask_ious(t, p)
        ti, pi, cnt, _, _ = label_overlap(t, p)
        matched = np.zeros(len(preds) + 1, dtype=np.int64)
        matched[1:] = preds
        inter = cnt[matched[ti] == pi].sum()
        union = np.logical_or(t > 0, p > 0).sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            aji[n] = inter / union
    return aji


def boundary_scores(masks_true, masks_pred, scales: Sequence[float]):
    """Boundary precision, recall and F-score (Cellpose 4 ``boundary_scores``).

    Outlines of each image are dilated by a disk of radius max(1, scale * median diameter of the true
    masks); precision = |pred outline within true band| / |pred band| etc. (on dilated outlines).

    Returns
    -------
    precision, recall, fscore : float64 [n_scales, n_images]
    """
    from scipy.ndimage import binary_dilation

    from cellpose_web.engine.dynamics import diameters, masks_to_outlines

    if not isinstance(masks_true, (list, tuple)):
        masks_true, masks_pred = [masks_true], [masks_pred]
    scales = [scales] if np.isscalar(scales) else list(scales)
    diams = [diameters(lbl)[0] for lbl in masks_true]
    precision = np.zeros((len(scales), len(masks_true)))
    recall = np.zeros((len(scales), len(masks_true)))
    fscore = np.zeros((len(scales), len(masks_true)))
    for j, scale in enumerate(scales):
        for n in range(len(masks_true)):
            t, p = _pair(masks_true[n], masks_pred[n])
            diam = max(1, scale * diams[n])
            r = int(np.ceil(diam))
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            filt = (yy**2 + xx**2) ** 0.5 <= diam
            otrue = binary_dilation(masks_to_outlines(t), filt)
            opred = binary_dilation(masks_to_outlines(p), filt)
            tp = np.logical_and(otrue, opred).sum()
            fp = np.logical_and(~otrue, opred).sum()
            fn = np.logical_and(otrue, ~opred).sum()
            with np.errstate(invalid="ignore", divide="ignore"):
                precision[j, n] = tp / (tp + fp)
                recall[j, n] = tp / (tp + fn)
        with np.errstate(invalid="ignore", divide="ignore"):
            fscore[j] = 2 * precision[j] * recall[j] / (precision[j] + recall[j])
    return precision, recall, fscore
