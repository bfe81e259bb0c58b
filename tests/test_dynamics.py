"""cellpose_web.dynamics against the Cellpose 4.2.1.1 fixtures, plus properties and error handling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellpose_web.engine import dynamics as dy
from cellpose_web.engine.dynamics import flow_check, following, labels as dy_labels, postprocess
from cellpose_web.engine import metrics
from cellpose_web.errors import CellposeWebError


# ------------------------------------------------------------------------------------------ helpers
def _disk(shape, center, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r**2


def _same_up_to_relabel(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b are the same partition (a bijection between their labels)."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.fixture(scope="module")
def flows_ref(reference_dir):
    return np.load(reference_dir / "flows.npz")


@pytest.fixture(scope="module")
def masks_ref(reference_dir):
    return np.load(reference_dir / "masks_from_flows.npz")


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ flows
def test_masks_to_flows_2d_matches_reference(flows_ref):
    out = dy.masks_to_flows(flows_ref["labels"])
    assert out.dtype == np.float32 and out.shape == flows_ref["flows"].shape
    assert np.abs(out - flows_ref["flows"]).max() < 1e-4


def test_masks_to_flows_3d_matches_reference(flows_ref):
    out = dy.masks_to_flows(flows_ref["labels_3d"])
    assert out.dtype == np.float32 and out.shape == flows_ref["flows_3d"].shape
    assert np.abs(out - flows_ref["flows_3d"]).max() < 1e-4


def test_masks_to_flows_nonconsecutive_labels_and_types():
    lab = np.zeros((48, 64), np.int64)
    lab[_disk(lab.shape, (20, 18), 9)] = 1
    lab[_disk(lab.shape, (24, 34), 10)] = 2  # touches object 1
    lab[35:45, 45:60] = 3
    ref = dy.masks_to_flows(lab)
    sparse = np.where(lab > 0, lab * 7 + 1000, 0).astype(np.uint32)
    assert np.array_equal(dy.masks_to_flows(sparse), ref)
    assert np.array_equal(dy.masks_to_flows(torch.from_numpy(lab)), ref)
    assert np.array_equal(dy.masks_to_flows(lab.astype(np.float32)), ref)


def test_masks_to_flows_unit_vectors_and_background():
    lab = np.zeros((40, 50), np.uint16)
    lab[_disk(lab.shape, (20, 18), 9)] = 1
    lab[_disk(lab.shape, (22, 36), 7)] = 2
    f = dy.masks_to_flows(lab)
    norm = np.sqrt((f**2).sum(0))
    assert np.all(f[:, lab == 0] == 0)
    inside = (lab > 0) & (norm > 0)
    assert np.allclose(norm[inside], 1, atol=1e-5)
    # flows point towards the centre: left of the centre of object 1, dX > 0
    assert f[1, 20, 12] > 0.5 and f[1, 20, 24] < -0.5


def test_masks_to_flows_empty_and_niter():
    assert not dy.masks_to_flows(np.zeros((8, 9), np.uint8)).any()
    assert dy.masks_to_flows(np.zeros((3, 8, 9), np.uint8)).shape == (3, 3, 8, 9)
    lab = np.zeros((30, 30), np.uint8)
    lab[5:25, 5:25] = 1
    a = dy.masks_to_flows(lab, niter=5)
    b = dy.masks_to_flows(lab)
    assert not np.allclose(a, b)  # niter is honoured


def test_labels_to_flows_layout(flows_ref):
    lab = flows_ref["labels"]
    shuffled = lab.copy()
    shuffled[lab > 0] = (lab[lab > 0].astype(np.int64) * 3 + 5).astype(np.uint16)
    out = dy.labels_to_flows([shuffled[None]])
    assert len(out) == 1
    o = out[0]
    assert o.shape == (4, *lab.shape) and o.dtype == np.float32
    assert np.array_equal(o[1], (lab > 0).astype(np.float32))
    assert np.abs(o[2:] - flows_ref["flows"]).max() < 1e-4
    # labels renumbered 1..N in order of first appearance, same objects
    first = o[0].ravel()
    seen = first[first > 0]
    _, idx = np.unique(seen, return_index=True)
    assert np.array_equal(seen[np.sort(idx)], np.arange(1, int(seen.max()) + 1))
    assert _same_up_to_relabel(o[0].astype(np.int64), lab.astype(np.int64))
    vol = np.zeros((6, 20, 24), np.uint16)
    vol[1:5, 3:12, 4:14] = 4
    vol[1:5, 10:18, 14:22] = 9
    out3 = dy.labels_to_flows([vol])[0]
    assert out3.shape == (5, *vol.shape) and set(np.unique(out3[0])) == {0, 1, 2}


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("case", ["default", "permissive", "strict"])
def test_compute_masks_matches_reference(masks_ref, manifest, case):
    kw = manifest["cases"][f"masks_{case}"]
    out = dy.compute_masks(masks_ref["dP"], masks_ref["cellprob"], max_size_fraction=0.4, **kw)
    ref = masks_ref[case]
    assert out.dtype == np.uint16 and out.shape == ref.shape
    ap, tp, fp, fn = metrics.average_precision(ref, out, threshold=[0.5])
    assert ap[0] == 1.0
    iout, preds = metrics.mask_ious(ref, out)
    assert (preds > 0).all() and iout.min() >= 0.99
    assert _same_up_to_relabel(out, ref)


def test_compute_masks_recovers_labels_3d(flows_ref):
    lab3 = flows_ref["labels_3d"]
    dP3 = 5 * flows_ref["flows_3d"]
    cp3 = np.where(lab3 > 0, 4.0, -4.0).astype(np.float32)
    out3 = dy.compute_masks(dP3, cp3, do_3D=True, niter=100)
    assert out3.shape == lab3.shape and out3.dtype == np.uint16
    assert metrics.average_precision(lab3, out3, threshold=[0.5])[0][0] > 0.9


def test_compute_masks_single_object_and_empty():
    lab = _disk((64, 64), (30, 33), 12).astype(np.uint8)
    dP = 5 * dy.masks_to_flows(lab)
    cp = np.where(lab > 0, 3.0, -3.0).astype(np.float32)
    out = dy.compute_masks(dP, cp)
    assert out.max() == 1
    inter = ((out > 0) & (lab > 0)).sum()
    assert inter / ((out > 0) | (lab > 0)).sum() > 0.95
    # all background: zeros, no error
    z = dy.compute_masks(np.zeros((2, 20, 30), np.float32), -np.ones((20, 30), np.float32))
    assert z.dtype == np.uint16 and z.shape == (20, 30) and not z.any()
    z3 = dy.compute_masks(np.zeros((3, 4, 20, 30), np.float32), -np.ones((4, 20, 30), np.float32))
    assert z3.shape == (4, 20, 30) and not z3.any()
    # foreground but no flow: every pixel stays put, no seed reaches 11 hits -> no masks, no error
    none = dy.compute_masks(np.zeros((2, 20, 30), np.float32), np.ones((20, 30), np.float32))
    assert not none.any()


def test_compute_masks_max_size_fraction():
    lab = _disk((64, 64), (32, 32), 20).astype(np.uint8)
    dP = 5 * dy.masks_to_flows(lab)
    cp = np.where(lab > 0, 3.0, -3.0).astype(np.float32)
    assert dy.compute_masks(dP, cp, max_size_fraction=0.4).max() == 1
    assert dy.compute_masks(dP, cp, max_size_fraction=0.1).max() == 0


def test_compute_masks_bad_input():
    dP = np.zeros((2, 10, 12), np.float32)
    cp = np.zeros((10, 12), np.float32)
    with pytest.raises(CellposeWebError, match="shape"):
        dy.compute_masks(dP, np.zeros((10, 13), np.float32))
    with pytest.raises(CellposeWebError, match="shape"):
        dy.compute_masks(np.zeros((3, 10, 12), np.float32), cp)
    with pytest.raises(CellposeWebError, match="2D|3D"):
        dy.compute_masks(np.zeros((2, 12), np.float32), np.zeros(12, np.float32))
    bad = dP.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(CellposeWebError, match="NaN"):
        dy.compute_masks(bad, cp)
    with pytest.raises(ValueError):  # CellposeWebError is a ValueError
        dy.compute_masks(dP, np.full((10, 12), np.inf, np.float32))
    with pytest.raises(CellposeWebError):
        dy.masks_to_flows(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(CellposeWebError, match="negative"):
        dy.masks_to_flows(-np.ones((4, 5), np.int32))
    with pytest.raises(CellposeWebError, match="whole"):
        dy.masks_to_flows(np.full((4, 5), 0.5))


def test_flow_error_and_remove_bad_flow_masks():
    lab = np.zeros((60, 80), np.uint16)
    lab[_disk(lab.shape, (30, 20), 12)] = 1
    lab[_disk(lab.shape, (30, 55), 12)] = 2
    dP = 5 * dy.masks_to_flows(lab)
    err, mu = dy.flow_error(lab, dP)
    assert err.shape == (2,) and np.allclose(err, 0, atol=1e-10)
    assert mu.shape == dP.shape
    bad = dP.copy()
    bad[:, lab == 2] *= -1  # flows of mask 2 point outwards
    err2, _ = dy.flow_error(lab, bad)
    assert err2[0] < 1e-10 and err2[1] > 1
    kept = dy.remove_bad_flow_masks(lab, bad, threshold=0.4)
    assert kept.max() == 1 and np.array_equal(kept > 0, lab == 1)
    # Apple's MPS has no float64: the check runs on the CPU there (no MPS tensor is made: runs anywhere)
    assert np.array_equal(dy.remove_bad_flow_masks(lab, bad, threshold=0.4, device="mps"), kept)
    assert np.array_equal(dy.flow_error(lab, bad, device="mps")[0], err2)


def _exact_flow_errors(lab, dP):
    """Cellpose's flow error: every object diffused for the image-wide step count (masks_to_flows)."""
    mu = dy.masks_to_flows(lab).astype(np.float64)
    err = ((mu - dP / 5.0) ** 2).sum(0)
    n = int(lab.max())
    return np.bincount(lab.ravel(), weights=err.ravel(), minlength=n + 1)[1:] / np.bincount(lab.ravel())[1:]


def test_flow_error_per_object_steps_and_threshold_margin():
    # a large object next to small ones: small objects run their own (fewer) steps, which changes their
    # error a little; with the threshold given, objects near it are recomputed with Cellpose's count
    lab = np.zeros((120, 400), np.int32)
    lab[5:115, 250:395] = 1
    for k, y in enumerate([10, 30, 50, 70]):  # thin rods: far from converged after their own steps
        lab[y:y + 5 + k, 10:100] = k + 2
    lab[85:95, 150:250] = 6  # touches the large object
    rng = np.random.default_rng(0)
    dP = 5 * dy.masks_to_flows(lab) + rng.normal(0, 0.6, (2, *lab.shape))
    dP[:, lab == 3] = 0.5  # a wrong flow
    dP = dP.astype(np.float32)
    exact = _exact_flow_errors(lab, dP)  # from float32 flows: equal to about 1e-6
    fast, mu = dy.flow_error(lab, dP, threshold=100.0)  # no error near this threshold: the fast pass only
    assert mu.shape == dP.shape and np.all(mu[:, lab == 0] == 0)
    assert np.abs(dy.flow_error(lab, dP)[0] - exact).max() < 1e-5  # without threshold: Cellpose's
    assert np.abs(fast - exact).max() < 0.05
    assert np.abs(fast[1:] - exact[1:]).max() > 1e-4  # small objects did run fewer steps
    assert abs(fast[0] - exact[0]) < 1e-4  # the largest runs Cellpose's count (its border reads object 6)
    for v in range(2, 7):  # a threshold next to object v's error: v (and what it touches) exact
        err, _ = dy.flow_error(lab, dP, threshold=float(exact[v - 1]) + 0.01)
        assert abs(err[v - 1] - exact[v - 1]) < 1e-6
    # remove_bad_flow_masks decides exactly as with Cellpose's errors around each object's error
    for v in range(1, 7):
        for thr in (exact[v - 1] - 1e-5, exact[v - 1] + 1e-5):
            kept = dy.remove_bad_flow_masks(lab, dP, threshold=float(thr))
            assert kept.max() == int((exact <= thr).sum())


# ------------------------------------------------------------------------------------------ utilities
def test_fill_holes_and_remove_small_masks():
    lab = np.zeros((40, 40), np.uint16)
    lab[5:20, 5:20] = 3
    lab[9:13, 9:13] = 0  # a hole
    lab[25:35, 25:35] = 7
    lab[28:31, 28:31] = 9  # an object inside object 7 (absorbed, as in Cellpose)
    lab[1:3, 30:33] = 5  # 6 pixels: too small
    out = dy.fill_holes_and_remove_small_masks(lab, min_size=15)
    assert out.dtype == np.uint16
    assert out.max() == 2
    assert (out[5:20, 5:20] == out[5, 5]).all() and (out[25:35, 25:35] == out[25, 25]).all()
    assert out[1, 30] == 0
    keep = dy.fill_holes_and_remove_small_masks(lab, min_size=0)
    assert keep[1, 30] > 0 and keep[10, 10] > 0 and sorted(np.unique(keep)) == [0, 1, 2, 3]
    # 3D: a cavity is filled
    v = np.zeros((7, 9, 9), np.uint8)
    v[1:6, 1:8, 1:8] = 1
    v[3, 4, 4] = 0
    assert dy.fill_holes_and_remove_small_masks(v)[3, 4, 4] == 1
    with pytest.raises(CellposeWebError):
        dy.fill_holes_and_remove_small_masks(np.zeros(5, np.uint8))


def test_fill_holes_uint32_many_labels():
    n = 300
    lab = np.arange(1, n * n + 1, dtype=np.uint32).reshape(n, n)  # 90000 one-pixel masks
    out = dy.fill_holes_and_remove_small_masks(lab, min_size=0)
    assert out.dtype == np.uint32 and out.max() == n * n
    assert dy.fill_holes_and_remove_small_masks(lab, min_size=2).max() == 0


def test_masks_to_outlines_and_outlines_list():
    lab = np.zeros((20, 20), np.uint16)
    lab[2:10, 2:10] = 1
    lab[4:6, 4:6] = 0  # hole: its rim is not an outline
    lab[12:18, 3:9] = 2
    o = dy.masks_to_outlines(lab)
    assert o.dtype == bool and o.shape == lab.shape
    ring = np.zeros_like(o)
    ring[2:10, 2:10] = True
    ring[3:9, 3:9] = False
    assert np.array_equal(o[:11], ring[:11])
    assert o[12, 3:9].all() and o[17, 3:9].all() and not o[14, 5]
    o3 = dy.masks_to_outlines(np.stack([lab, lab]))
    assert o3.shape == (2, 20, 20) and np.array_equal(o3[1], o)

    ol = dy.outlines_list(lab)
    assert len(ol) == 2
    pts = ol[0]
    assert pts.shape == (28, 2)  # 8x8 square: 28 boundary pixels, each once
    assert tuple(pts[0]) == (2, 2)  # (x, y): top-most, left-most pixel first
    assert set(map(tuple, pts)) == {(x, y) for y, x in zip(*np.nonzero(ring))}
    steps = np.abs(np.diff(np.vstack([pts, pts[:1]]), axis=0)).max(1)
    assert (steps == 1).all()  # an ordered, closed 8-connected trace
    assert tuple(pts[1]) == (2, 3)  # runs down the left side first (counter-clockwise)
    assert dy.outlines_list(np.zeros((5, 5), np.uint8)) == []


def test_stitch3D():
    a = np.zeros((4, 30, 30), np.uint16)
    a[0, 5:15, 5:15] = 1
    a[1, 6:16, 6:16] = 2  # overlaps plane-0 mask 1 -> becomes 1
    a[1, 20:25, 20:25] = 1  # new object -> new label
    a[3, 6:16, 6:16] = 1  # after an empty plane: a new label, never reused
    out = dy.stitch3D(a, stitch_threshold=0.25)
    assert (out[1, 6:16, 6:16] == 1).all()
    assert out[1, 22, 22] == 2
    assert out[3, 10, 10] == 3
    # a high threshold splits everything
    out2 = dy.stitch3D(a, stitch_threshold=0.99)
    assert out2[1, 10, 10] != 1


def test_remove_edge_masks_and_diameters():
    lab = np.zeros((30, 30), np.uint16)
    lab[0:5, 10:15] = 4
    lab[10:20, 10:20] = 6
    lab[25:30, 0:3] = 9
    out = dy.remove_edge_masks(lab)
    assert np.array_equal(out, (lab == 6).astype(np.uint16))
    out2 = dy.remove_edge_masks(lab, change_index=False)
    assert np.array_equal(out2, np.where(lab == 6, 6, 0))
    md, per = dy.diameters(lab)
    areas = np.array([25, 100, 15])
    assert np.allclose(per, np.sqrt(areas))
    assert np.isclose(md, np.median(np.sqrt(areas)) / (np.sqrt(np.pi) / 2))
    assert dy.diameters(np.zeros((4, 4), np.uint8))[0] == 0


def test_dx_to_circ():
    lab = _disk((40, 40), (20, 20), 15).astype(np.uint8)
    dP = 5 * dy.masks_to_flows(lab)
    rgb = dy.dx_to_circ(dP)
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 40, 3)
    assert not rgb[0, 0].any()  # no flow -> black
    # opposite directions give different colours
    assert not np.array_equal(rgb[20, 8], rgb[20, 32])
    rgb3 = dy.dx_to_circ(np.stack([dP[0][None], dP[0][None], dP[1][None]]))
    assert rgb3.shape == (1, 40, 40, 3)
    with pytest.raises(CellposeWebError):
        dy.dx_to_circ(np.zeros((4, 5, 5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(flows_ref, masks_ref):
    dev = torch.device("cuda")
    f = dy.masks_to_flows(flows_ref["labels"], device=dev)
    assert np.abs(f - flows_ref["flows"]).max() < 1e-4
    out = dy.compute_masks(masks_ref["dP"], masks_ref["cellprob"], device=dev)
    assert metrics.average_precision(masks_ref["default"], out, threshold=[0.5])[0][0] == 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_follow_flows_in_chunks_equals_one_batch(flows_ref, monkeypatch, ndim):
    """On a CPU the points are integrated in cache-sized chunks: every final position is bit-identical
    to integrating all points at once (and the chunk edges fall inside objects here)."""
    flows = np.asarray(flows_ref["flows" if ndim == 2 else "flows_3d"], np.float32)
    fg = np.abs(flows).sum(0) > 0
    inds = np.nonzero(fg)
    npts = len(inds[0])
    assert npts > 1000
    monkeypatch.setattr(following, "FOLLOW_CHUNK_POINTS", npts + 1)
    whole = dy.follow_flows(flows * 2.0, inds, niter=60)
    monkeypatch.setattr(following, "FOLLOW_CHUNK_POINTS", 997)  # uneven chunks, last one short
    chunked = dy.follow_flows(flows * 2.0, inds, niter=60)
    assert chunked.shape == (ndim, npts)
    assert torch.equal(whole, chunked)
    assert dy.follow_flows(flows, tuple(i[:0] for i in inds), niter=5).shape == (ndim, 0)


def test_flow_check_tiles_and_batches_give_the_same_heat(monkeypatch):
    """The flow check's first pass splits a large window into tiles of whole objects, and the exact
    recheck runs objects in cache-sized batches: errors and flows are bit-identical to one window /
    one batch, also for objects that touch an object of another tile."""
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 200, (90, 2))  # Voronoi cells: every object touches others
    yy, xx = np.mgrid[:200, :220]
    lab = 1 + ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2).argmin(-1)
    lab = lab.astype(np.int32)
    dP = (5 * dy.masks_to_flows(lab) + rng.normal(0, 0.8, (2, *lab.shape))).astype(np.float32)
    monkeypatch.setattr(flow_check, "HEAT_TILE_PIXELS", 10**9)
    monkeypatch.setattr(flow_check, "HEAT_BATCH_ELEMS", 10**9)
    err_one, mu_one = dy.flow_error(lab, dP, threshold=100.0)  # the first pass only
    thr = float(np.median(err_one))  # half the objects near it: the exact recheck runs too
    err_thr_one, _ = dy.flow_error(lab, dP, threshold=thr)
    tiles = []
    orig_tile = flow_check._heat_in_tile
    monkeypatch.setattr(flow_check, "_heat_in_tile", lambda *a, **k: (tiles.append(a[5]), orig_tile(*a, **k)))
    monkeypatch.setattr(flow_check, "HEAT_TILE_PIXELS", 40 * 40)
    monkeypatch.setattr(flow_check, "HEAT_BATCH_ELEMS", 3000)
    err_tiled, mu_tiled = dy.flow_error(lab, dP, threshold=100.0)
    assert len(tiles) > 20  # many tiles (the phases' windows split)
    touching = flow_check._touching_labels(lab)
    assert any(len(touching(v)) > 1 for v in range(1, int(lab.max()) + 1))
    assert np.array_equal(err_tiled, err_one) and np.array_equal(mu_tiled, mu_one)
    err_thr_tiled, _ = dy.flow_error(lab, dP, threshold=thr)
    assert np.array_equal(err_thr_tiled, err_thr_one)
    assert np.abs(err_thr_one - err_one).max() > 1e-6  # the recheck did change errors


def test_masks_step_in_bands_equals_one_pass(masks_ref, flows_ref, monkeypatch):
    """Large images are scanned in bands of BAND_PIXELS (histogram, seeds and their growth in
    get_masks, per-label sums, hole detection, renumbering, the flow picture): tiny bands give the
    same masks, flow errors, filled labels and pictures, bit for bit, as one band (2D and 3D)."""
    rng = np.random.default_rng(5)
    lab = np.zeros((70, 60), np.int32)  # holes, a ring, a two-piece label, objects on the borders
    yy, xx = np.mgrid[:70, :60]
    lab[((yy - 35) ** 2 + (xx - 25) ** 2 < 300) & ((yy - 35) ** 2 + (xx - 25) ** 2 > 30)] = 1
    lab[0:6, :] = 2
    lab[3, 20] = 0
    lab[60:70, 45:60] = 3
    lab[65, 50] = 0
    lab[10:15, 48:55] = 4
    lab[25:30, 48:55] = 4
    lab[40:50, 45:55] = 5
    lab[43:46, 48:51] = 6
    for i in range(7):  # a staircase joined only diagonally: one 8-connected piece without holes
        lab[55 + i, 2 + 3 * i:5 + 3 * i] = 7
        lab[62 + i, 40 - 3 * i:43 - 3 * i] = 8
    dP = (5 * dy.masks_to_flows(lab) + rng.normal(0, 0.5, (2, *lab.shape))).astype(np.float32)
    # final positions in broad noisy clusters: seeds and their growth cross many band edges
    centres = rng.uniform(5, [115, 95], (12, 2))
    pts = np.concatenate([c + rng.normal(0, 2.5, (800, 2)) for c in centres]).clip(0, [119, 99])
    p_final = torch.from_numpy(pts.T.astype(np.int32))
    inds = np.unravel_index(np.sort(rng.choice(120 * 100, len(pts), replace=False)), (120, 100))

    def run():
        return [dy.get_masks(p_final, inds, (120, 100)), postprocess.labels_with_holes_2d(lab, int(lab.max())),
                dy.compute_masks(masks_ref["dP"], masks_ref["cellprob"], min_size=15),
                dy.compute_masks(flows_ref["flows_3d"] * 5, (flows_ref["labels_3d"] > 0) * 8.0 - 4, do_3D=True),
                *dy.flow_error(lab, dP, threshold=0.2),
                dy.fill_holes_and_remove_small_masks(lab, min_size=15),
                dy.fill_holes_and_remove_small_masks(lab, min_size=0),
                dy.dx_to_circ(dP), dy.dx_to_circ(flows_ref["flows_3d"])]

    one = run()
    assert one[0].max() > 12 and list(one[1]) == [1, 2, 3, 5]
    filled = one[6]  # holes filled (the ring's too), 6 absorbed by 5, the two-piece label kept
    assert filled.dtype == np.uint16 and filled.max() == 7 and filled[35, 25] == filled[35, 10] > 0
    monkeypatch.setattr(dy_labels, "BAND_PIXELS", 97)  # a row or two per band
    for a, b in zip(one, run()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
