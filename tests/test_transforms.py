"""transforms: channels, normalisation, OpenCV-equal resizing, padding, tiles, training augmentation."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cellpose_web.engine import transforms as T
from cellpose_web.errors import CellposeWebError

DATA = Path(__file__).resolve().parent / "data"


# ------------------------------------------------------------------ convert_image
def test_convert_image_guesses_channel_axis():
    rng = np.random.default_rng(0)
    a = rng.random((2, 30, 40)).astype(np.float32)
    out = T.convert_image(a)
    assert out.shape == (30, 40, 2)
    np.testing.assert_array_equal(out[..., 1], a[1])
    b = rng.random((30, 40, 2))
    assert T.convert_image(b).shape == (30, 40, 2)
    assert T.convert_image(rng.random((30, 40))).shape == (30, 40, 1)
    # 4D batch: channel axis 1 if shape[1] < shape[-1] else last
    assert T.convert_image(rng.random((4, 2, 30, 40))).shape == (4, 30, 40, 2)
    assert T.convert_image(rng.random((4, 30, 40, 3))).shape == (4, 30, 40, 3)


def test_convert_image_keeps_first_three_channels(caplog):
    a = np.arange(5 * 20 * 30, dtype=np.float32).reshape(20, 30, 5)
    with caplog.at_level(logging.WARNING):
        out = T.convert_image(a, channel_axis=-1)
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, a[..., :3])
    assert "first 3" in caplog.text


def test_convert_image_explicit_axes_and_3d():
    rng = np.random.default_rng(1)
    a = rng.random((3, 10, 20, 25))  # (C, Z, Y, X)
    out = T.convert_image(a, channel_axis=0, z_axis=1, do_3D=True)
    assert out.shape == (10, 20, 25, 3)
    np.testing.assert_array_equal(out[4, ..., 2], a[2, 4])
    g = rng.random((7, 20, 25))
    assert T.convert_image(g, z_axis=0, do_3D=True).shape == (7, 20, 25, 1)


@pytest.mark.parametrize("kwargs,shape", [
    (dict(channel_axis=3), (20, 30, 2)),           # axis does not exist
    (dict(channel_axis=-4), (20, 30, 2)),
    (dict(z_axis=0), (5, 20, 30)),                 # z_axis without do_3D
    (dict(do_3D=True), (5, 20, 30)),               # do_3D without z_axis
    (dict(do_3D=True, z_axis=0), (5, 20, 30, 2)),  # 4D 3D without channel_axis
    (dict(channel_axis=0), (4, 2, 20, 30)),        # axis 0 of a 4D input is the batch
    (dict(channel_axis=1), (20, 30)),              # 2D image has no channel axis
    (dict(), (2, 3, 4, 5, 6)),                     # 5 dims
    (dict(), (10,)),
])
def test_convert_image_errors(kwargs, shape):
    with pytest.raises(CellposeWebError):
        T.convert_image(np.zeros(shape, np.float32), **kwargs)


# ------------------------------------------------------------------ normalisation
def test_normalize99_percentiles():
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 100.0, (64, 80)).astype(np.float32)
    out = T.normalize99(x)
    p1, p99 = np.percentile(x, 1), np.percentile(x, 99)
    np.testing.assert_allclose(out, (x - p1) / (p99 - p1), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32
    assert np.isclose(np.percentile(out, 1), 0, atol=1e-5) and np.isclose(np.percentile(out, 99), 1, atol=1e-5)
    assert not np.any(T.normalize99(np.full((10, 10), 7.0, np.float32)))  # constant -> zeros


def test_normalize99_strided_subsample_above_224_cubed():
    rng = np.random.default_rng(3)
    x = rng.random((60, 450, 450), dtype=np.float32)  # 12.15 M > 224**3 voxels
    x[::2] += 3  # make planes differ so the z stride matters
    out = T.normalize99(x, downsample=True)
    sub = x[::1, ::2, ::2]  # z stride 60 // 50 = 1, y/x stride 450 // 224 = 2
    p1, p99 = np.percentile(sub, 1), np.percentile(sub, 99)
    np.testing.assert_allclose(out[0, :3, :3], (x[0, :3, :3] - p1) / (p99 - p1), rtol=1e-5)


def test_normalize_img_options():
    rng = np.random.default_rng(4)
    x = rng.gamma(2.0, 50.0, (40, 50, 2)).astype(np.float32)
    x[..., 1] = 5.0  # constant channel -> zeros
    out = T.normalize_img(x)
    assert np.all(out[..., 1] == 0)
    np.testing.assert_allclose(out[..., 0], T.normalize99(x[..., 0]), rtol=1e-6)
    inv = T.normalize_img(x, invert=True)
    np.testing.assert_allclose(inv[..., 0], 1 - out[..., 0], rtol=1e-5, atol=1e-6)
    assert np.all(inv[..., 1] == 0)
    lh = T.normalize_img(x[..., :1], lowhigh=[10, 110])
    np.testing.assert_allclose(lh[..., 0], (x[..., 0] - 10) / 100, rtol=1e-5)
    # per-plane normalisation of a stack
    st = np.stack([x[..., :1], 10 * x[..., :1]])
    per = T.normalize_img(st, norm3D=False)
    np.testing.assert_allclose(per[0], per[1], rtol=1e-4, atol=1e-5)
    whole = T.normalize_img(st, norm3D=True)
    assert whole[1].mean() > whole[0].mean()
    assert np.isfinite(T.normalize_img(x, tile_norm_blocksize=16)).all()
    assert np.isfinite(T.normalize_img(x, sharpen_radius=4, smooth_radius=1)).all()
    with pytest.raises(CellposeWebError):
        T.normalize_img(x, percentile=(99, 1))
    with pytest.raises(CellposeWebError):
        T.normalize_img(x, lowhigh=[[0, 1], [0, 1], [0, 1]])


# ------------------------------------------------------------------ resizing == OpenCV
def test_resize_matches_opencv_linear_and_nearest():
    ref = np.load(DATA / "cv2_resize_ref.npz")
    for i in range(5):
        img, lin = ref[f"img{i}"], ref[f"linear{i}"]
        out = T.resize_image(img, lin.shape[0], lin.shape[1])
        assert out.shape == lin.shape
        np.testing.assert_allclose(out, lin, atol=1e-4 * np.abs(lin).max())
        out_t = T.resize_image(torch.from_numpy(img), lin.shape[0], lin.shape[1])
        np.testing.assert_allclose(out_t.numpy(), lin, atol=1e-4 * np.abs(lin).max())
        lab, near = ref[f"lab{i}"], ref[f"nearest{i}"]
        outn = T.resize_image(lab, near.shape[0], near.shape[1], interpolation="nearest")
        np.testing.assert_array_equal(outn, near)
        assert outn.dtype == lab.dtype


def test_resize_stack_and_3d():
    rng = np.random.default_rng(5)
    st = rng.random((4, 20, 30, 2)).astype(np.float32)
    out = T.resize_image(st, rsz=0.5)
    assert out.shape == (4, 10, 15, 2)
    np.testing.assert_allclose(out[2], T.resize_image(st[2], 10, 15), rtol=1e-6)
    v = T.resize_image_3d(st, (8, 10, 15))
    assert v.shape == (8, 10, 15, 2)
    with pytest.raises(CellposeWebError):
        T.resize_image(st[0], 0, 10)


# ------------------------------------------------------------------ padding and tiles
def test_get_pad_yx_rules():
    # L >= 256: up to a multiple of 16 plus 16; L < 256: padded to max(256, L + 16)
    ypad1, ypad2, xpad1, xpad2 = T.get_pad_yx(300, 100, min_size=(256, 256))
    assert (ypad1 + ypad2 + 300) % 16 == 0 and ypad1 + ypad2 + 300 == 16 * int(np.ceil(300 / 16)) + 16
    assert abs(ypad1 - ypad2) <= 1
    assert xpad1 + xpad2 + 100 == 256 and abs(xpad1 - xpad2) <= 1
    assert sum(T.get_pad_yx(250, 250, min_size=(256, 256))[:2]) + 250 == 266


def test_taper_mask():
    b = 256
    mask = T.taper_mask(b, b)
    xm = np.abs(np.arange(b) - 127.5)
    m = 1 / (1 + np.exp((xm - 108) / 7.5))
    np.testing.assert_allclose(mask, np.outer(m, m), rtol=1e-12)


# ------------------------------------------------------------------ training augmentation
def _ramp(Ly, Lx, angle_deg):
    """Image = projection on a direction, flows = that direction (unit [dY, dX])."""
    yy, xx = np.mgrid[:Ly, :Lx].astype(np.float32)
    th = np.deg2rad(angle_deg)
    d = np.array([np.sin(th), np.cos(th)], np.float32)  # (dy, dx)
    img = (yy * d[0] + xx * d[1])[None]
    flows = np.stack([np.ones((Ly, Lx), np.float32), np.full((Ly, Lx), d[0]), np.full((Ly, Lx), d[1])])
    return img, flows


def test_random_rotate_and_resize_rotates_flows_with_image():
    imgs, flows = [], []
    for a in (0, 30, 100):
        i, f = _ramp(400, 420, a)
        imgs.append(i)
        flows.append(f)
    xo, yo = T.random_rotate_and_resize(imgs, flows, scale_range=0.5, xy=(256, 256), rng=3)
    assert xo.shape == (3, 1, 256, 256) and yo.shape == (3, 3, 256, 256)
    assert xo.dtype == torch.float32
    scales = T.random_rotate_and_resize.last_scale
    assert np.all((scales >= 0.75) & (scales <= 1.25))
    for n in range(3):
        im = xo[n, 0].numpy()[20:-20, 20:-20]
        gy, gx = np.gradient(im)
        g = np.array([np.median(gy), np.median(gx)])
        g /= np.linalg.norm(g)
        v = yo[n, 1:, 20:-20, 20:-20].numpy().reshape(2, -1).mean(1)
        assert np.isclose(np.linalg.norm(v), 1, atol=1e-3)
        assert np.dot(g, v) > 0.999, (n, g, v)
        assert np.allclose(yo[n, 0, 20:-20, 20:-20].numpy(), 1, atol=1e-5)


def test_random_rotate_and_resize_is_seeded_and_rescale_multiplies():
    i, f = _ramp(300, 300, 10)
    a = T.random_rotate_and_resize([i, i], [f, f], rng=np.random.default_rng(5))
    b = T.random_rotate_and_resize([i, i], [f, f], rng=np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    T.random_rotate_and_resize([i], [f], scale_range=0.0, rescale=np.array([2.0]), rng=1)
    assert T.random_rotate_and_resize.last_scale[0] == pytest.approx(2.0)
    xo, none = T.random_rotate_and_resize([i[0]], None, xy=(64, 96), rng=0)
    assert xo.shape == (1, 1, 64, 96) and none is None


# ----------------------------------------------------------------------------------------------
# percentile_stretch: the one stretch for display, the _seg.npy picture and puncta detection
# ----------------------------------------------------------------------------------------------
def test_percentile_stretch_maps_percentiles_to_0_and_1_and_clips():
    from cellpose_web.engine.transforms import percentile_stretch
    x = np.arange(1000, dtype=np.uint16).reshape(20, 50)
    lo, hi = np.percentile(x, [1, 99])
    out = percentile_stretch(x, 1, 99)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out[x <= lo], 0)
    np.testing.assert_allclose(out[x >= hi], 1)
    mid = (x > lo) & (x < hi)
    np.testing.assert_allclose(out[mid], (x[mid] - lo) / (hi - lo), rtol=1e-6)
    unclipped = percentile_stretch(x, 1, 99, clip=False)
    assert unclipped.min() < 0 and unclipped.max() > 1


def test_percentile_stretch_leaves_nan_out_and_falls_back_to_min_max():
    from cellpose_web.engine.transforms import percentile_stretch
    x = np.zeros((10, 30), np.float32)
    x[0, :3] = [5, 10, np.nan]
    out = percentile_stretch(x, 1, 99)  # 99 % zeros: both percentiles are 0 -> min/max
    assert out[0, 1] == 1 and out[0, 0] == np.float32(0.5) and out[0, 2] == 0 and np.isfinite(out).all()
    assert not percentile_stretch(np.full((4, 4), 7.0)).any()
    assert not percentile_stretch(np.full((4, 4), np.nan)).any()


def test_percentile_stretch_sampling_is_used_only_for_large_images():
    from cellpose_web.engine.transforms import percentile_stretch
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 100.0, size=(400, 400)).astype(np.float32)
    np.testing.assert_array_equal(percentile_stretch(x, 1, 99.5, max_samples=10 ** 6), percentile_stretch(x, 1, 99.5))
    sampled = percentile_stretch(x, 1, 99.5, max_samples=10_000)
    assert not np.array_equal(sampled, percentile_stretch(x, 1, 99.5))
    np.testing.assert_allclose(sampled, percentile_stretch(x, 1, 99.5), atol=0.05)


def test_display_seg_npy_and_puncta_share_the_stretch():
    """The three users of a percentile stretch give what percentile_stretch gives."""
    from cellpose_web.engine.transforms import percentile_stretch
    from cellpose_web.io import render
    from cellpose_web.measure import normalize_for_puncta
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 100.0, size=(64, 48)).astype(np.float32)
    grey = render.image_to_rgb(x)
    np.testing.assert_array_equal(grey[..., 0], (percentile_stretch(x, 1, 99.5) * 255).astype(np.uint8))
    np.testing.assert_array_equal(normalize_for_puncta(x), percentile_stretch(x, 1, 99.8))


def test_training_crops_upload_host_arrays_without_a_host_sync(monkeypatch):
    """On a GPU every host array of a training step (the affine rows, each image and its flows) goes
    through host_to_device (pinned, queued): a plain copy from pageable memory synchronises CUDA.
    The 'meta' device stands in for the GPU here (same code path, no numbers)."""
    from cellpose_web.engine import transforms as tr

    uploads = []
    real = tr.host_to_device
    monkeypatch.setattr(tr, "host_to_device", lambda t, d: (uploads.append(tuple(t.shape)), real(t, d))[1])
    rng = np.random.default_rng(0)
    imgs = [rng.random((2, 40, 50)).astype(np.float32) for _ in range(3)]
    flows = [rng.random((3, 40, 50)).astype(np.float32) for _ in range(3)]
    x, y = tr.random_rotate_and_resize(imgs, flows, xy=(32, 32), rng=0, device="meta")
    assert x.shape == (3, 2, 32, 32) and y.shape == (3, 3, 32, 32) and x.device.type == "meta"
    assert uploads == [(3, 8)] + [(2, 40, 50), (3, 40, 50)] * 3


def test_bfloat16_tensors_are_accepted_as_images_and_flows():
    """numpy has no bfloat16: a bf16 tensor (e.g. a network output kept on the GPU) becomes float32."""
    from cellpose_web.engine import transforms as tr
    from cellpose_web.engine.dynamics.device_setup import to_numpy
    from cellpose_web.models.params import as_array

    t = torch.rand(16, 16, dtype=torch.bfloat16)
    for a in (tr.convert_image(t, None), to_numpy(t, "dP"), as_array(t)):
        assert a.dtype == np.float32 and np.array_equal(np.asarray(a).reshape(16, 16), t.float().numpy())
