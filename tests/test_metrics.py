"""cellpose_web.metrics against the Cellpose 4.2.1.1 fixture and simple cases."""
from __future__ import annotations

import numpy as np
import pytest

from cellpose_web.engine import metrics
from cellpose_web.errors import CellposeWebError


@pytest.fixture(scope="module")
def ref(reference_dir):
    return np.load(reference_dir / "metrics.npz")


def test_average_precision_matches_reference(ref):
    ap, tp, fp, fn = metrics.average_precision([ref["true"], ref["true"]], [ref["pred_default"], ref["pred_strict"]])
    for name, got in zip(["ap", "tp", "fp", "fn"], [ap, tp, fp, fn]):
        assert got.dtype == np.float32 and got.shape == ref[name].shape
        assert np.array_equal(got, ref[name]), name


def test_aggregated_jaccard_index_matches_reference(ref):
    aji = metrics.aggregated_jaccard_index([ref["true"]], [ref["pred_default"]])
    assert aji.shape == ref["aji"].shape
    assert np.allclose(aji, ref["aji"], rtol=0, atol=1e-12)
    assert np.allclose(metrics.aggregated_jaccard_index(ref["true"], ref["pred_default"]), ref["aji"])


def test_single_pair_and_relabelling(ref):
    t, p = ref["true"], ref["pred_default"]
    ap, tp, fp, fn = metrics.average_precision(t, p)
    assert ap.shape == (3,) and np.array_equal(ap, ref["ap"][0])
    # relabelling the prediction changes nothing
    perm = np.random.default_rng(0).permutation(int(p.max())) + 1
    p2 = np.where(p > 0, perm[np.maximum(p.astype(np.int64) - 1, 0)] * 3, 0)
    assert np.array_equal(metrics.average_precision(t, p2)[0], ap)


def test_perfect_empty_and_disjoint():
    t = np.zeros((20, 20), np.uint16)
    t[2:8, 2:8] = 1
    t[10:18, 10:18] = 2
    ap, tp, fp, fn = metrics.average_precision(t, t, threshold=0.5)
    assert ap.tolist() == [1.0] and tp.tolist() == [2.0]
    ap, tp, fp, fn = metrics.average_precision(t, np.zeros_like(t))
    assert (tp == 0).all() and (fn == 2).all() and (ap == 0).all()
    ap, *_ = metrics.average_precision(np.zeros_like(t), np.zeros_like(t))
    assert np.isnan(ap).all()
    shifted = np.roll(t, 2, axis=1)  # IoU 0.5 and 0.6
    ap, tp, fp, fn = metrics.average_precision(t, shifted, threshold=[0.1, 0.9])
    assert tp.tolist() == [2.0, 0.0] and fp.tolist() == [0.0, 2.0]


def test_mask_ious():
    t = np.zeros((20, 20), np.uint16)
    t[2:8, 2:8] = 1
    t[10:18, 10:18] = 2
    p = np.zeros_like(t)
    p[10:18, 10:14] = 5  # half of mask 2
    iout, preds = metrics.mask_ious(t, p)
    # Hungarian matching always pairs min(n_true, n_pred) masks, also with IoU 0 (as Cellpose)
    assert iout.shape == (2,) and preds[1] == 5
    assert np.isclose(iout[1], 0.5) and iout[0] == 0


def test_boundary_scores():
    t = np.zeros((40, 40), np.uint16)
    t[5:15, 5:15] = 1
    t[20:35, 20:35] = 2
    prec, rec, f = metrics.boundary_scores([t], [t], scales=[0.1, 0.5])
    assert prec.shape == (2, 1) and np.allclose(prec, 1) and np.allclose(rec, 1) and np.allclose(f, 1)
    p = np.zeros_like(t)
    p[5:15, 5:15] = 1
    prec, rec, f = metrics.boundary_scores([t], [p], scales=[0.1])
    assert prec[0, 0] == 1 and rec[0, 0] < 1


def test_bad_input():
    with pytest.raises(CellposeWebError, match="same shape"):
        metrics.average_precision(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(CellposeWebError):
        metrics.average_precision([np.zeros((4, 4), np.uint8)], [])
    with pytest.raises(CellposeWebError):
        metrics.average_precision(np.full((4, 4), 0.5), np.zeros((4, 4), np.uint8))
