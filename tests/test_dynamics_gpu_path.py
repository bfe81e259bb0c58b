"""The dynamics' device path (what CUDA runs, engine/dynamics/device_path.py) run on the CPU: the same
masks as the host path, flows within float tolerance (bit-identical in practice), and a number of host
syncs that does not grow with the number of objects."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cellpose_web.engine import dynamics as dy
from cellpose_web.engine import synthetic
from cellpose_web.engine.dynamics import device_setup
from cellpose_web.engine.dynamics.labels import first_appearance_lut, first_appearance_lut_torch, renumber_sorted, \
    renumber_sorted_torch


def _both(fn, *args, **kw):
    """``fn`` on the host path, then on the device path (on the CPU)."""
    with device_setup.device_path_on_cpu(False):
        a = fn(*args, **kw)
    with device_setup.device_path_on_cpu(True):
        b = fn(*args, **kw)
    return a, b


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b)


def _disk(shape, center, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r**2


def _noisy_flows(labels: np.ndarray, seed: int, noise: float = 2.2) -> tuple[np.ndarray, np.ndarray]:
    """(dP, cellprob) from true labels, with noise on the flows so that the flow check removes some."""
    rng = np.random.default_rng(seed)
    dP = 5 * dy.masks_to_flows(labels)
    dP = (dP + rng.normal(0, noise, dP.shape)).astype(np.float32)
    cp = np.where(labels > 0, 4.0, -4.0).astype(np.float32) + rng.normal(0, 0.5, labels.shape).astype(np.float32)
    return dP, cp


def test_switch_defaults_off_and_is_restored():
    assert not device_setup.uses_device_path(torch.device("cpu"))
    assert device_setup.uses_device_path(torch.device("cuda"))
    with device_setup.device_path_on_cpu():
        assert device_setup.uses_device_path(torch.device("cpu"))
    assert not device_setup.uses_device_path(torch.device("cpu"))


# ------------------------------------------------------------------------------------------ flows
@pytest.mark.parametrize("key", ["labels", "labels_3d"])
def test_masks_to_flows_fixtures(reference_dir, key):
    ref = np.load(reference_dir / "flows.npz")
    a, b = _both(dy.masks_to_flows, ref[key])
    assert b.dtype == np.float32 and np.abs(a - b).max() < 1e-6
    flows_key = "flows" if key == "labels" else "flows_3d"
    assert np.abs(b - ref[flows_key]).max() < 1e-4


def test_masks_to_flows_synthetic_sparse_labels_and_niter():
    lab = synthetic.synthetic_labels(np.random.default_rng(3), shape=(160, 200), diameter=24.0)
    lab = np.where(lab > 0, lab * 5 + 7, 0)  # not consecutive
    lab[_disk(lab.shape, (80, 100), 9)] = 3  # a disk over other objects: a ring-shaped neighbour
    a, b = _both(dy.masks_to_flows, lab)
    assert np.abs(a - b).max() < 1e-6
    a, b = _both(dy.masks_to_flows, lab, niter=7)
    assert np.abs(a - b).max() < 1e-6
    huge = np.where(lab > 0, lab.astype(np.int64) + 10**9, 0)  # very sparse values: torch.unique
    _, c = _both(dy.masks_to_flows, huge)
    assert np.abs(c - b).max() >= 0 and np.abs(dy.masks_to_flows(lab) - c).max() < 1e-6


def test_masks_to_flows_empty_one_and_concave_objects():
    a, b = _both(dy.masks_to_flows, np.zeros((12, 9), np.uint8))
    assert not b.any() and b.shape == (2, 12, 9)
    a, b = _both(dy.masks_to_flows, np.zeros((3, 12, 9), np.uint8))
    assert not b.any()
    one = np.zeros((40, 50), np.uint16)
    one[5:30, 10:14] = 1
    one[26:30, 10:45] = 1  # an L: its mean pixel is outside, the closest object pixel is the source
    a, b = _both(dy.masks_to_flows, one)
    assert np.abs(a - b).max() < 1e-6 and np.abs(b).max() > 0
    vol = np.zeros((8, 30, 30), np.uint16)
    vol[1:7, 4:26, 4:8] = 2
    vol[1:7, 22:26, 4:26] = 2  # concave in 3D
    vol[2:6, 5:15, 12:20] = 5
    a, b = _both(dy.masks_to_flows, vol)
    assert np.abs(a - b).max() < 1e-6


def test_masks_to_flows_more_than_65535_labels():
    lab = np.arange(1, 300 * 300 + 1, dtype=np.int64).reshape(300, 300)  # one label per pixel pair below
    lab = np.repeat(lab[:, :150], 2, axis=1)  # 45,000 two-pixel objects ...
    lab = np.concatenate([lab, lab[:120] + lab.max()], 0)  # ... and 18,000 more: labels up to ~126,000
    lab[::7] = 0
    a, b = _both(dy.masks_to_flows, lab, niter=3)
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("case", ["default", "permissive", "strict"])
def test_compute_masks_fixtures(reference_dir, case):
    ref = np.load(reference_dir / "masks_from_flows.npz")
    kw = json.loads((reference_dir / "manifest.json").read_text())["cases"][f"masks_{case}"]
    a, b = _both(dy.compute_masks, ref["dP"], ref["cellprob"], max_size_fraction=0.4, **kw)
    _same(a, b)
    assert b.max() > 10


@pytest.mark.parametrize("seed", [0, 1])
def test_compute_masks_synthetic_touching_cells_with_noisy_flows(seed):
    lab = synthetic.synthetic_labels(np.random.default_rng(seed), shape=(192, 224), diameter=26.0, confluence=0.9)
    dP, cp = _noisy_flows(lab, seed)
    a, b = _both(dy.compute_masks, dP, cp)
    _same(a, b)
    assert b.max() > 20
    # the flow check removes masks here (so both paths agree on what it removes, not only on no-ops)
    with device_setup.device_path_on_cpu():
        assert dy.compute_masks(dP, cp, flow_threshold=0).max() > b.max()
    for kw in ({"flow_threshold": 0.8, "min_size": 0}, {"cellprob_threshold": 1.0, "min_size": 40},
               {"max_size_fraction": 0.001}, {"niter": 50}, {"interp": "pixel"}):
        _same(*_both(dy.compute_masks, dP, cp, **kw))


def test_compute_masks_no_cells_one_cell_no_seeds():
    for dP, cp in ((np.zeros((2, 20, 30), np.float32), -np.ones((20, 30), np.float32)),
                   (np.zeros((2, 20, 30), np.float32), np.ones((20, 30), np.float32))):  # no seed: no flow
        a, b = _both(dy.compute_masks, dP, cp)
        _same(a, b)
        assert not b.any()
    lab = _disk((64, 64), (30, 33), 12).astype(np.uint8)
    dP = 5 * dy.masks_to_flows(lab)
    cp = np.where(lab > 0, 3.0, -3.0).astype(np.float32)
    a, b = _both(dy.compute_masks, dP, cp)
    _same(a, b)
    assert b.max() == 1
    a, b = _both(dy.compute_masks, dP, cp, max_size_fraction=0.1)  # the only mask is too large
    _same(a, b)
    assert b.max() == 0


def test_compute_masks_3d(reference_dir):
    ref = np.load(reference_dir / "flows.npz")
    lab3 = ref["labels_3d"]
    cp3 = np.where(lab3 > 0, 4.0, -4.0).astype(np.float32)
    a, b = _both(dy.compute_masks, 5 * ref["flows_3d"], cp3, do_3D=True, niter=100)
    _same(a, b)
    assert b.max() > 1


def test_compute_masks_with_a_flow_error_function():
    lab = synthetic.synthetic_labels(np.random.default_rng(5), shape=(128, 128), diameter=24.0)
    dP, cp = _noisy_flows(lab, 5)

    def fn(labels, dP):
        return dy.flow_error(labels, dP)[0]

    _same(*_both(dy.compute_masks, dP, cp, flow_error_fn=fn))


def test_label_helpers_match_numpy():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 40, size=(30, 40)) * rng.integers(0, 2, size=(30, 40))
    ren, n = renumber_sorted(lab)
    ren_t, n_t = renumber_sorted_torch(torch.from_numpy(lab))
    assert n == n_t and np.array_equal(ren, ren_t.numpy())
    lut, n = first_appearance_lut(lab)
    lut_t, n_t = first_appearance_lut_torch(torch.from_numpy(lab), int(lab.max()))
    assert n == int(n_t) and np.array_equal(lut, lut_t.numpy())


# ------------------------------------------------------------------------------------------ host syncs
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
_SYNC_FUNCTIONS = ("nonzero", "unique", "argwhere", "masked_select")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts the calls that make a CUDA run wait for the device (tensor -> host values, data-dependent
    sizes) while they are made from cellpose_web's dynamics."""
    counts: Counter = Counter()

    def wrap(name, orig):
        def counted(*args, **kw):
            counts[name] += 1
            return orig(*args, **kw)
        return counted

    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    for name in _SYNC_FUNCTIONS:
        monkeypatch.setattr(torch, name, wrap(name, getattr(torch, name)))
        monkeypatch.setattr(torch.Tensor, name, wrap("." + name, getattr(torch.Tensor, name)))
    return counts


def _cells(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` separate disks (radius 5) on a 256 x 256 image: labels, noisy flows, cellprob."""
    lab = np.zeros((256, 256), np.int32)
    g = int(np.ceil(np.sqrt(n)))
    for i in range(n):
        cy, cx = 9 + (i // g) * (238 // g), 9 + (i % g) * (238 // g)
        lab[_disk(lab.shape, (cy, cx), 5)] = i + 1
    return (lab, *_noisy_flows(lab, n, noise=0.3))


def test_host_syncs_do_not_grow_with_the_number_of_cells(sync_counter):
    found = {}
    per_run = {}
    for n in (10, 200):
        _, dP, cp = _cells(n)
        with device_setup.device_path_on_cpu():
            sync_counter.clear()
            found[n] = int(dy.compute_masks(dP, cp).max())
            per_run[n] = dict(sync_counter)
    assert found[10] >= 8 and found[200] >= 150, found
    assert per_run[10] == per_run[200], per_run
    total = sum(per_run[200].values())
    assert total <= 60, per_run[200]
    for n in (10, 200):  # masks_to_flows too
        lab = _cells(n)[0]
        with device_setup.device_path_on_cpu():
            sync_counter.clear()
            dy.masks_to_flows(lab)
            per_run[n] = dict(sync_counter)
    assert per_run[10] == per_run[200] and sum(per_run[200].values()) <= 20, per_run


# ------------------------------------------------------------------------------------------ holes, small masks
def test_holes_and_pieces_on_the_device_match_the_host():
    from skimage.measure import label as sk_label
    from cellpose_web.engine.dynamics import device_path, postprocess

    rng = np.random.default_rng(0)
    for _ in range(12):
        lab = synthetic.synthetic_labels(rng, shape=(96, 96), diameter=float(rng.uniform(8, 30)))
        for _ in range(5):  # holes (single pixels, other labels inside) and extra pieces
            y, x = rng.integers(2, 94, 2)
            lab[y, x] = 0
            y, x = rng.integers(2, 94, 2)
            lab[y:y + 2, x:x + 2] = rng.integers(0, lab.max() + 1)
        n = int(lab.max())
        t = torch.from_numpy(lab.astype(np.int64))
        pieces = device_path.pieces_per_label_torch(t, n).numpy()
        assert [int(pieces[v]) for v in range(1, n + 1)] == [int(sk_label(lab == v, connectivity=2).max())
                                                             for v in range(1, n + 1)]
        holes = pieces * 4 - device_path.euler4_per_label_torch(t, n).numpy()
        holes[0] = 0
        assert set(np.flatnonzero(holes > 0)) == set(postprocess.labels_with_holes_2d(lab, n))
        out = device_path.remove_small_device(t, n, 15)
        if out is None:
            small = np.bincount(lab.ravel(), minlength=n + 1) < 15
            small[0] = False
            assert len(postprocess.labels_with_holes_2d(np.where(small[lab], 0, lab), n))
        else:
            assert np.array_equal(out.numpy(), postprocess.fill_holes_and_remove_small_masks(lab, 15))


def test_compute_masks_with_a_hole():
    lab = np.zeros((96, 96), np.int32)
    ring = _disk(lab.shape, (48, 48), 22) & ~_disk(lab.shape, (48, 48), 8)
    lab[ring] = 1
    lab[_disk(lab.shape, (48, 48), 6)] = 2
    lab[_disk(lab.shape, (12, 12), 8)] = 3
    dP = 5 * dy.masks_to_flows(lab)
    cp = np.where(lab > 0, 4.0, -4.0).astype(np.float32)
    for kw in ({}, {"flow_threshold": 0}, {"min_size": 0}):
        _same(*_both(dy.compute_masks, dP, cp, **kw))


def test_a_device_path_failure_falls_back_to_the_host_path(monkeypatch, caplog):
    """A kernel missing on some device/torch build must not stop segmentation: same masks, a warning."""
    from cellpose_web.engine.dynamics import masks as masks_mod
    labels = np.zeros((128, 128), np.uint16)
    for k, c in enumerate([(30, 30), (30, 90), (90, 30), (90, 90)]):
        labels[_disk(labels.shape, c, 20)] = k + 1
    dP, cp = _noisy_flows(labels, 0, noise=0.3)
    with device_setup.device_path_on_cpu(False):
        host = dy.compute_masks(dP, cp)

    def broken(*a, **k):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(masks_mod, "masks_on_device", broken)
    with device_setup.device_path_on_cpu(True), caplog.at_level("WARNING"):
        fell_back = dy.compute_masks(dP, cp)
    _same(host, fell_back)
    assert host.max() > 0 and "using the host path" in caplog.text

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(masks_mod, "masks_on_device", oom)
    with device_setup.device_path_on_cpu(True), pytest.raises(torch.OutOfMemoryError):
        dy.compute_masks(dP, cp)  # out of memory is the caller's to handle (smaller batch, a message)
