"""CellposeModel: loading, eval equal to the reference fixtures, validation, lite network paths."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cellpose_web import models as M
from cellpose_web.errors import CellposeWebError
from cellpose_web.models import CellposeModel

from refdata import at_reference_pixels


@pytest.fixture(scope="module")
def tiny_path(reference_dir):
    return str(reference_dir / "tiny_cpsam.pth")


@pytest.fixture(scope="module")
def model(tiny_path):
    return CellposeModel(pretrained_model=tiny_path, use_bfloat16=False)


@pytest.fixture(scope="module")
def io(reference_dir):
    """Cellpose 4.2.1.1's forward (one sample) and eval outputs of the tiny checkpoint; the eval dP / cellprob
    keep every <case>_stride-th pixel (tests/fixtures/README.md)."""
    d = dict(np.load(reference_dir / "tiny_cpsam_io.npz"))
    d["image_twochan"] = np.stack([d["image_gray"], d.pop("image_twochan_ch1")], axis=-1)  # [gray, 2nd channel]
    return d


def test_model_attributes_and_forward(model, io):
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.pretrained_model.endswith("tiny_cpsam.pth")
    with torch.inference_mode():
        y, style = model.net(torch.from_numpy(io["x"]))
    assert y.shape == (1, 3, 256, 256) and style.shape == (1, 256)
    assert np.abs(y.numpy() - io["y"]).max() < 1e-4


@pytest.mark.parametrize("case,img,kwargs", [
    ("gray_d30", "image_gray", dict(diameter=30)),
    ("gray_d45", "image_gray", dict(diameter=45)),
    ("twochan", "image_twochan", dict(channel_axis=-1)),
    ("stack_stitch", "image_stack", dict(stitch_threshold=0.3, z_axis=0, diameter=30)),
])
def test_eval_matches_reference(model, io, case, img, kwargs):
    masks, flows, styles = model.eval(io[img], compute_masks=False, **kwargs)
    dP, cellprob = io[f"{case}_dP"], io[f"{case}_cellprob"]
    assert flows[1].shape == tuple(io[f"{case}_shape"]) and flows[2].shape == flows[1].shape[1:]
    assert np.abs(at_reference_pixels(flows[1], io, case) - dP).max() < 1e-3
    assert np.abs(at_reference_pixels(flows[2], io, case) - cellprob).max() < 1e-3
    assert flows[0].dtype == np.uint8 and flows[0].shape == (*flows[2].shape, 3)
    assert flows[1].dtype == np.float32 and flows[2].dtype == np.float32
    assert styles.shape[-1] == 256 and not styles.any()
    assert masks.size == 0


def test_eval_masks_match_reference(model, io):
    masks, flows, _ = model.eval(io["image_gray"], diameter=45)
    ref = io["gray_d45_masks"]
    assert np.abs(at_reference_pixels(flows[1], io, "gray_d45") - io["gray_d45_dP"]).max() < 1e-3
    assert masks.shape == ref.shape and masks.dtype == np.uint16
    assert len(np.unique(masks)) == len(np.unique(ref))
    from cellpose_web.engine.metrics import average_precision
    ap = average_precision(ref, masks, threshold=[0.5])[0]
    assert float(np.ravel(ap)[0]) == 1.0


@pytest.mark.slow
def test_eval_3d_matches_reference(model, io):
    masks, flows, styles = model.eval(io["image_stack"], do_3D=True, z_axis=0, diameter=30, flow3D_smooth=1,
                                      compute_masks=True)
    assert np.abs(at_reference_pixels(flows[1], io, "stack_do3d") - io["stack_do3d_dP"]).max() < 1e-3
    assert np.abs(at_reference_pixels(flows[2], io, "stack_do3d") - io["stack_do3d_cellprob"]).max() < 1e-3
    if masks.size:
        assert masks.shape == io["stack_do3d_masks"].shape


def test_list_input_gives_lists(model, io):
    img = io["image_gray"][:200, :260]
    masks, flows, styles = model.eval([img, img[::-1]], diameter=[30, 45], compute_masks=False)
    assert isinstance(masks, list) and len(flows) == 2 and len(styles) == 2
    assert len(model.timing) == 2
    one = model.eval(img[::-1], diameter=45, compute_masks=False)[1]
    np.testing.assert_allclose(flows[1][1], one[1], atol=1e-5)


@pytest.mark.parametrize("x,kwargs,match", [
    (np.zeros((2, 3, 4, 5, 6, 2), np.float32), {}, "dimension"),
    (np.zeros(10, np.float32), {}, "dimension"),
    (np.zeros((50, 60, 2), np.float32), dict(channel_axis=3), "channel_axis"),
    (np.full((50, 60), np.nan, np.float32), {}, "NaN"),
    (np.array([[0, np.inf], [1, 2]], np.float32), {}, "NaN or infinite"),
    (np.zeros((4, 50, 60), np.float32), dict(z_axis=0), "z_axis"),
    (np.zeros((50, 60), np.float32), dict(diameter=-5), "diameter"),
    (np.zeros((50, 60), np.float32), dict(diameter=float("nan")), "diameter"),
    (np.zeros((50, 60), np.float32), dict(niter=-3), "niter"),
    (np.zeros((0, 60), np.float32), {}, "empty"),
    (np.zeros((50, 60), np.float32), dict(bsize=128), "bsize"),
    (np.zeros((50, 60), np.float32), dict(diameter=1e-4), "diameter"),
    # a 0.5 px diameter zooms 256² to 15,360²: refused at once instead of filling 6+ GB of memory
    (np.zeros((256, 256), np.float32), dict(diameter=0.5), "too large"),
])
def test_bad_input_raises_clear_error(model, x, kwargs, match):
    with pytest.raises(CellposeWebError, match=match):
        model.eval(x, **kwargs)


def test_constant_and_background_images_give_empty_masks(model):
    masks, flows, _ = model.eval(np.full((120, 140), 7, np.uint16))
    assert masks.shape == (120, 140) and masks.max() == 0
    masks, flows, _ = model.eval(np.zeros((90, 100, 3), np.float32))
    assert masks.shape == (90, 100) and masks.max() == 0
    noise = np.random.default_rng(0).normal(100, 1, (90, 110)).astype(np.float32)
    masks, flows, _ = model.eval(noise, flow_threshold=0.4)
    assert masks.shape == (90, 110)


def test_missing_and_truncated_checkpoints(tmp_path, tiny_path):
    with pytest.raises(FileNotFoundError):
        CellposeModel(pretrained_model=str(tmp_path / "nope.pth"))
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(open(tiny_path, "rb").read()[:5000])
    with pytest.raises(CellposeWebError):
        CellposeModel(pretrained_model=str(bad))
    cp3 = tmp_path / "cp3_model"
    torch.save({"downsample.down.res_down_0.conv.conv_0.0.weight": torch.zeros(3)}, cp3)
    with pytest.raises(CellposeWebError):
        CellposeModel(pretrained_model=str(cp3))


def test_load_checkpoint_errors(tmp_path):
    from cellpose_web.engine.nets import load_checkpoint
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    p = tmp_path / "junk"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CellposeWebError, match="re-download"):
        load_checkpoint(p)


def test_nonfinite_model_output_blames_the_model_not_the_image(tmp_path):
    """Broken (NaN) weights on a finite image: the message names the model; a NaN image still names the image."""
    from cellpose_web.engine import dynamics
    from cellpose_web.engine.nets.unet import LiteUNet
    from cellpose_web.errors import BadInputError

    torch.manual_seed(0)
    ck = LiteUNet(widths=(8, 16)).checkpoint_dict()
    sd = {k: v.clone() for k, v in ck["state_dict"].items()}
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 4)
    sd[k].fill_(float("nan"))
    p = tmp_path / "nan_w.pth"
    torch.save({**ck, "state_dict": sd}, p)
    m = CellposeModel(pretrained_model=str(p))
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    with pytest.raises(BadInputError, match="Model 'nan_w.pth' gave NaN or infinite outputs") as ei:
        m.eval(img, diameter=30)
    msg = str(ei.value)
    assert "weights are broken" in msg and "NaN pixels must be replaced" not in msg and "dP" not in msg
    for imgs in ([img, img], ):  # a list of images goes through the same check
        with pytest.raises(BadInputError, match="weights are broken"):
            m.eval(imgs, diameter=30)
    bad_img = img.copy()
    bad_img[3, 3] = np.nan
    with pytest.raises(CellposeWebError, match="NaN or infinite pixel"):
        m.eval(bad_img, diameter=30)
    # flows given directly (no image known): the message still points at both
    dP = np.zeros((2, 32, 32), np.float32)
    dP[0, 1, 1] = np.nan
    with pytest.raises(CellposeWebError, match="check the network output or the image"):
        dynamics.compute_masks(dP, np.ones((32, 32), np.float32))


def test_channels_deprecated_and_progress(model, io, caplog):
    seen = []
    with caplog.at_level(logging.WARNING):
        model.eval(io["image_gray"][:150, :150], channels=[0, 0], compute_masks=False,
                   progress=lambda f, msg: seen.append(f))
    assert "channel" in caplog.text.lower() and "first 3" in caplog.text
    assert seen and seen[-1] == pytest.approx(1.0) and all(b >= a - 1e-9 for a, b in zip(seen, seen[1:]))

    class Bar:  # tqdm-like
        def __init__(self):
            self.n, self.total = 0, None

        def update(self, k):
            self.n += k

    bar = Bar()
    model.eval(io["image_gray"][:150, :150], compute_masks=False, progress=bar)
    assert bar.n == pytest.approx(bar.total)

    # a list of images (how the app runs a z-stack plane by plane): one rising bar, messages say which image
    events = []
    img = io["image_gray"][:96, :96]
    model.eval([img, img, img], compute_masks=False, progress=lambda f, msg: events.append((f, msg)))
    fracs = [f for f, _ in events]
    assert fracs[-1] == pytest.approx(1.0) and all(b >= a - 1e-9 for a, b in zip(fracs, fracs[1:]))
    msgs = [m for _, m in events if m]
    assert msgs and all(m.startswith(("image 1/3: ", "image 2/3: ", "image 3/3: ")) for m in msgs)
    assert any(m.startswith("image 3/3: ") for m in msgs)


def test_bfloat16_on_cpu_when_asked(tiny_path, io):
    m = CellposeModel(pretrained_model=tiny_path, use_bfloat16=True)
    assert m.dtype == torch.bfloat16
    _, flows, _ = m.eval(io["image_gray"][:200, :200], compute_masks=False)
    assert flows[1].dtype == np.float32 and np.isfinite(flows[1]).all()


# ------------------------------------------------------------------ lite (fully convolutional) paths
@pytest.fixture()
def lite_model(tmp_path):
    from cellpose_web.engine.nets.unet import LiteUNet
    torch.manual_seed(0)
    net = LiteUNet()
    p = tmp_path / "lite_test.pth"
    torch.save(net.checkpoint_dict(), p)
    return CellposeModel(pretrained_model=str(p))


def _record_shapes(net):
    shapes = []
    orig = net.forward

    def fwd(x):
        shapes.append(tuple(x.shape))
        return orig(x)
    net.forward = fwd
    return shapes


def test_lite_runs_whole_image_or_tiles(lite_model):
    assert lite_model.arch == "lite"
    shapes = _record_shapes(lite_model.net)
    img = np.random.default_rng(1).random((200, 260)).astype(np.float32)
    _, flows, _ = lite_model.eval(img, diameter=30, compute_masks=False)
    assert len(shapes) == 1 and shapes[0][-2] % 16 == 0 and shapes[0][-1] % 16 == 0
    assert shapes[0][-2] >= 200 and shapes[0][-1] >= 260
    assert flows[1].shape == (2, 200, 260)
    shapes.clear()
    lite_model.net.max_whole_pixels = 20_000
    try:
        # too large for one pass: blocks with context, each a multiple of 16, on the whole image's grid
        _, flows2, _ = lite_model.eval(img, diameter=30, compute_masks=False)
        assert len(shapes) > 4 and all(s[-2] % 16 == 0 and s[-1] % 16 == 0 for s in shapes)
        assert max(s[-2] * s[-1] for s in shapes) < 200 * 260 / 2
        assert flows2[1].shape == (2, 200, 260)
        diff = np.abs(flows2[1] - flows[1])
        assert np.median(diff) < 1e-3 and diff.mean() < 0.05 * np.abs(flows[1]).mean()
        # test-time augmentation keeps Cellpose's flipped tiles of bsize
        shapes.clear()
        _, flows3, _ = lite_model.eval(img, diameter=30, compute_masks=False, bsize=128, augment=True)
        assert len(shapes) > 1 and all(s[-2:] == (128, 128) for s in shapes)
        assert flows3[1].shape == (2, 200, 260)
    finally:
        lite_model.net.max_whole_pixels = 1024 * 1024


@pytest.mark.parametrize("whole", [True, False])
def test_run_net_channels_first_is_the_same_output(lite_model, whole):
    """eval's 2D path takes the network output channels-first (dP and cellprob are then views of it,
    no whole-image copies): the same numbers as the channels-last output, whole image or blocks,
    with and without resizing."""
    imgs = np.random.default_rng(4).random((2, 130, 150, 3)).astype(np.float32)
    net = lite_model.net
    if not whole:
        net.max_whole_pixels = 20_000
    try:
        for rsz in (None, 1.3):
            last = M.run_net(net, imgs, rsz=rsz)
            first = M.run_net(net, imgs, rsz=rsz, channels_first=True)
            assert first.shape == (2, 3, *last.shape[1:3]) and first.flags.c_contiguous
            assert np.array_equal(first, last.transpose(0, 3, 1, 2))
    finally:
        net.max_whole_pixels = 1024 * 1024


def test_blocks_reuse_freed_memory_and_restore_malloc(lite_model, monkeypatch):
    """While blocks run, large allocations come from the heap (glibc): same output as without, and
    the malloc settings are restored once the last of several concurrent runs ends."""
    import contextlib
    imgs = np.random.default_rng(6).random((1, 130, 150, 3)).astype(np.float32)
    lite_model.net.max_whole_pixels = 20_000
    try:
        reused = M.run_net(lite_model.net, imgs)
        from cellpose_web.engine import memory
        with M.core._reuse_freed_memory():
            with M.core._reuse_freed_memory():
                assert memory._heap_users == (2 if memory._glibc() is not None else 0)
            assert memory._heap_users == (1 if memory._glibc() is not None else 0)
        assert memory._heap_users == 0
        monkeypatch.setattr(M.core, "_reuse_freed_memory", contextlib.nullcontext)
        assert np.array_equal(M.run_net(lite_model.net, imgs), reused)
    finally:
        lite_model.net.max_whole_pixels = 1024 * 1024


def test_lite_estimates_diameter_and_reruns(lite_model, monkeypatch):
    calls = []

    def compute_masks(dP, cellprob, **kw):
        calls.append(cellprob.shape)
        m = np.zeros(cellprob.shape, np.uint16)
        yy, xx = np.mgrid[:m.shape[0], :m.shape[1]]
        m[(yy - m.shape[0] // 2) ** 2 + (xx - m.shape[1] // 2) ** 2 < 30 ** 2] = 1
        return m

    monkeypatch.setattr(M.core.dynamics, "compute_masks", compute_masks)
    monkeypatch.setattr(M.core.dynamics, "fill_holes_and_remove_small_masks", lambda m, min_size=15: m)
    monkeypatch.setattr(M.core.dynamics, "diameters", lambda m: (60.0, np.array([60.0])))
    img = np.random.default_rng(2).random((200, 240)).astype(np.float32)
    masks, flows, _ = lite_model.eval(img)
    assert lite_model.diam_estimate == pytest.approx(60.0)
    assert lite_model.last_eval_params["diameter_estimate"] == pytest.approx(60.0)
    assert lite_model.last_eval_params["rescale"] == pytest.approx(0.5)
    assert len(calls) == 2 and masks.shape == (200, 240) and flows[1].shape == (2, 200, 240)


@pytest.mark.parametrize("estimate, reruns", [(31.0, False), (27.5, False), (26.9, True), (33.4, True), (60.0, True),
                                               (6.0, True)])
def test_lite_reruns_only_outside_the_tolerance(lite_model, monkeypatch, estimate, reruns):
    calls = []

    def compute_masks(dP, cellprob, **kw):
        calls.append(cellprob.shape)
        return np.ones(cellprob.shape, np.uint16)

    monkeypatch.setattr(M.core.dynamics, "compute_masks", compute_masks)
    monkeypatch.setattr(M.core.dynamics, "fill_holes_and_remove_small_masks", lambda m, min_size=15: m)
    monkeypatch.setattr(M.core.dynamics, "diameters", lambda m: (estimate, np.array([estimate])))
    lite_model.eval(np.random.default_rng(2).random((96, 128)).astype(np.float32))
    zoom = M.auto_diameter_zoom(estimate)
    assert (zoom is not None) == reruns and len(calls) == 1 + reruns
    if reruns:  # zoomed by 30 / estimate, in by at most MAX_AUTO_ZOOM (objects of 6 px: 2.5x, not 5x)
        assert lite_model.last_eval_params["rescale"] == pytest.approx(min(30.0 / estimate, M.MAX_AUTO_ZOOM))
    lite_model.eval(np.random.default_rng(2).random((96, 128)).astype(np.float32), diameter=30)
    assert lite_model.diam_estimate is None  # a given diameter leaves no estimate from an earlier call


def test_diameter_note_says_how_the_estimate_went():
    from cellpose_web.workflows import hints
    assert hints.diameter_note(None) == "" and hints.diameter_note(0.0) == ""
    assert hints.diameter_note(29.0) == "diameter estimated at 29 px"
    note = hints.diameter_note(15.0)
    assert note.startswith("diameter estimated at 15 px; a second pass ran zoomed 2.00x (4.0x the pixels)")
    assert "enter the diameter" in note and "the most" not in note
    assert hints.diameter_note(6.0).startswith("diameter estimated at 6 px; a second pass ran zoomed 2.50x (6.2x the "
                                               "pixels, the most an automatic diameter zooms)")
    # a large image zooms at most to MAX_RESIZED_PIXELS
    from cellpose_web import models
    zoom = models.auto_diameter_zoom(12.0, (8000, 8000))
    assert zoom == pytest.approx((models.MAX_RESIZED_PIXELS / 64e6) ** 0.5) and zoom < 2.5


def test_progress_messages_say_time_left(monkeypatch):
    from cellpose_web import models as models_mod
    clock = [100.0]
    monkeypatch.setattr(models_mod.core.time, "perf_counter", lambda: clock[0])
    seen = []
    prog = models_mod.core._Progress(lambda f, msg: seen.append(msg))
    net = prog.sub(0.0, 0.5)
    clock[0] += 1.0
    net(0.5, "running the network")  # 1 s spent: too early to say
    clock[0] += 9.0
    net(0.5, "running the network")  # 25% done in 10 s: 30 s left
    clock[0] += 80.0
    prog(0.5, "computing masks")  # 50% in 90 s: 1 min 30 s left
    prog(1.0, "done")
    assert seen == ["running the network", "running the network (about 30 s left)",
                    "computing masks (about 1 min 30 s left)", "done"]


def test_progress_callback_can_cancel(model, io):
    class Stop(Exception):
        pass

    def cb(f, msg):
        if f > 0.1:
            raise Stop()
    with pytest.raises(Stop):
        model.eval(io["image_gray"], compute_masks=False, progress=cb)


class _RampNet(torch.nn.Module):
    """Adds a ramp that is not flip-symmetric to its 3-channel input, so a tile flipped on the way in
    and not back (or back without negating dY / dX) gives different numbers."""

    def forward(self, x):
        ny, nx = x.shape[-2:]
        ramp = (torch.arange(ny, dtype=x.dtype)[:, None] * 0.01 + torch.arange(nx, dtype=x.dtype)[None, :] * 0.1)
        return x + ramp, None


def test_run_net_augment_matches_a_hand_computation():
    """Test-time augmentation (Cellpose's): 50%-overlapping tiles, tile (row j, column k) flipped in Y
    when k is odd and in X when j is odd, outputs flipped back with dY (dX) negated, blended with the
    taper."""
    from cellpose_web.engine import transforms as T

    b, Ly0, Lx0 = 64, 90, 120
    img = np.random.default_rng(3).random((1, Ly0, Lx0, 3)).astype(np.float32)
    got = M.run_net(_RampNet(), img, batch_size=3, augment=True, bsize=b)[0]

    py1, py2, px1, px2 = T.get_pad_yx(Ly0, Lx0, min_size=(b, b))
    x = np.pad(img[0].transpose(2, 0, 1), ((0, 0), (py1, py2), (px1, px2)))
    Ly, Lx = x.shape[1:]
    starts = [np.linspace(0, L - b, max(2, int(np.ceil(2 * L / b)))).astype(int) for L in (Ly, Lx)]
    ramp = np.arange(b)[:, None] * 0.01 + np.arange(b)[None, :] * 0.1
    taper = T.taper_mask(b, b)
    acc, weight = np.zeros((3, Ly, Lx)), np.zeros((Ly, Lx))
    n_flipped = 0
    for j, y0 in enumerate(starts[0]):
        for k, x0 in enumerate(starts[1]):
            flip_y, flip_x = k % 2 == 1, j % 2 == 1
            r = ramp[::-1] if flip_y else ramp
            r = r[:, ::-1] if flip_x else r
            out = x[:, y0:y0 + b, x0:x0 + b] + r  # the net saw the flipped tile; its ramp comes back flipped
            if flip_y:
                out[0] *= -1
            if flip_x:
                out[1] *= -1
            n_flipped += flip_y or flip_x
            acc[:, y0:y0 + b, x0:x0 + b] += out * taper
            weight[y0:y0 + b, x0:x0 + b] += taper
    expected = (acc / weight)[:, py1:py1 + Ly0, px1:px1 + Lx0].transpose(1, 2, 0)
    assert len(starts[0]) >= 3 and len(starts[1]) >= 3 and n_flipped >= 5
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    plain = M.run_net(_RampNet(), img, batch_size=3, augment=False, bsize=b)[0]
    assert np.abs(plain - expected).max() > 0.1  # augmentation changes the numbers here
