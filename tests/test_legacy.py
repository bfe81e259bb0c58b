"""Cellpose 1-3 U-Net models: the network, Cellpose 3's eval semantics and SizeModel, checked against
fixtures made with Cellpose 3.1.1.2 (tests/fixtures/reference/cp3 with the built-in cp_cyto weights they
were made with; see tests/fixtures/README.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellpose_web.engine import dynamics, metrics
from cellpose_web import models
from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.nets import build_net, load_checkpoint
from cellpose_web.engine.nets.cpnet import CPnet

from refdata import at_reference_pixels


@pytest.fixture(scope="module")
def manifest(cp3_dir):
    return json.loads((cp3_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def ref(cp3_dir):
    return dict(np.load(cp3_dir / "cp3_eval.npz"))


@pytest.fixture(scope="module")
def cp3_model(cp3_files):
    return models.CellposeModel(pretrained_model=str(cp3_files[0]))


def assert_same_masks(ref_masks: np.ndarray, masks: np.ndarray, min_size_exact: int = 0, iou_big: float = 0.99) -> None:
    """Same objects: AP@0.5 = 1 after relabelling and every matched IoU >= ``iou_big`` (for objects of at
    least ``min_size_exact`` pixels; smaller ones >= 0.9)."""
    assert masks.shape == ref_masks.shape
    assert masks.max() == ref_masks.max() > 0
    ap = metrics.average_precision(ref_masks, masks, threshold=[0.5])[0]
    assert float(np.asarray(ap).reshape(-1)[0]) == 1.0
    iou = metrics.mask_ious(ref_masks, masks)[0]
    sizes = np.bincount(ref_masks.ravel())[1:]
    assert iou[sizes >= min_size_exact].min() >= iou_big, iou.min()
    assert iou.min() >= 0.9, iou.min()


def run_case(model, manifest, ref, case, **same):
    kw = dict(manifest["cases"][case])
    img = ref[kw.pop("image")]
    masks, flows, styles = model.eval(img, flow_threshold=manifest["flow_threshold"],
                                      cellprob_threshold=manifest["cellprob_threshold"], batch_size=16, **kw)
    # the reference keeps every <case>_stride-th pixel of Cellpose 3's dP / cellprob (1: all of them)
    np.testing.assert_allclose(at_reference_pixels(flows[1], ref, case), ref[case + "_dP"], atol=1e-3)
    np.testing.assert_allclose(at_reference_pixels(flows[2], ref, case), ref[case + "_cellprob"], atol=1e-3)
    np.testing.assert_allclose(styles, ref[case + "_styles"], atol=1e-4)
    assert_same_masks(ref[case + "_masks"], masks, **same)
    return masks


# ------------------------------------------------------------------------------------------ network
def test_cpnet_forward_matches_cellpose3(cp3_dir, cp3_files):
    io = np.load(cp3_dir / "cp3_io.npz")
    sd = load_checkpoint(cp3_files[0])
    net = build_net(sd).eval()
    assert isinstance(net, CPnet) and net.nbase == [2, 32, 64, 128, 256] and net.nout == 3
    assert float(net.diam_mean) == float(io["diam_mean"]) and float(net.diam_labels) == float(io["diam_labels"])
    with torch.no_grad():
        y, style = net(torch.from_numpy(io["x"]))
    np.testing.assert_allclose(y.numpy(), io["y"], atol=1e-4)
    np.testing.assert_allclose(style.numpy(), io["style"], atol=1e-4)
    # the same weights saved by a DataParallel wrapper ("module." prefix) give the same network
    net2 = build_net({"module." + k: v for k, v in sd.items()}).eval()
    with torch.no_grad():
        torch.testing.assert_close(net2(torch.from_numpy(io["x"][:1]))[0], y[:1])


def test_damaged_cellpose3_checkpoints_get_one_clear_message(cp3_files, tmp_path):
    sd = load_checkpoint(cp3_files[0])
    wrong = dict(sd)
    wrong["output.2.weight"] = torch.zeros(3, 7, 1, 1)
    with pytest.raises(CellposeWebError, match="unexpected shapes"):
        build_net(wrong)
    partial = {k: v for k, v in sd.items() if not k.startswith("upsample.up.res_up_0")}
    with pytest.raises(CellposeWebError, match="does not match the U-Net"):
        build_net(partial)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(cp3_files[0].read_bytes()[:100_000])
    with pytest.raises(CellposeWebError, match="truncated"):
        models.CellposeModel(pretrained_model=str(cut))


# ------------------------------------------------------------------------------------------ dynamics
@pytest.mark.parametrize("case", ["rgb_c21_d40"])  # the 2D case whose whole dP the fixture keeps
def test_cellpose3_dynamics_on_its_own_flows(ref, manifest, case):
    """Cellpose 3's 2D Euler steps (bilinear in pixel coordinates) give its masks from its flows."""
    assert int(ref[case + "_stride"]) == 1
    rescale = np.float32(30.0) / manifest["cases"][case]["diameter"]  # float32, as Cellpose 3 keeps diam_mean
    masks = dynamics.compute_masks(ref[case + "_dP"], ref[case + "_cellprob"], niter=int(np.uint32(1 / rescale * 200)),
                                   flow_threshold=manifest["flow_threshold"],
                                   cellprob_threshold=manifest["cellprob_threshold"], interp="pixel")
    assert np.array_equal(masks, ref[case + "_masks"])


def test_steps_without_interpolation_follow_pixel_flows():
    dP = np.zeros((2, 9, 9), np.float32)
    dP[1] = 1.0  # one pixel to the right per step
    dP[1, :, 5:] = 0.0
    p = dynamics.follow_flows(dP, (np.array([4]), np.array([0])), niter=20, interp=False)
    assert p[:, 0].tolist() == [4.0, 5.0]


def _steps_one_by_one(dP, inds, niter, bilinear):
    """Cellpose 3's Euler steps written plainly: every point, every step, no merging (float32 weights,
    corners (y0, x0), (y0, x1), (y1, x0), (y1, x1), each term flow * w_y * w_x, summed left to right)."""
    flow = torch.as_tensor(dP)
    ndim, top = flow.shape[0], [s - 1 for s in dP.shape[1:]]
    p = torch.stack([torch.as_tensor(i) for i in inds]).float()
    for _ in range(niter):
        i0 = p.long()
        if not bilinear:
            step = flow[(slice(None), *i0)]
        else:
            frac = p - i0.float()
            up = [(i0[k] + 1).clamp(max=top[k]) for k in range(ndim)]
            step = None
            for corner in range(2 ** ndim):
                bits = [(corner >> (ndim - 1 - k)) & 1 for k in range(ndim)]
                v = flow[(slice(None), *[up[k] if b else i0[k] for k, b in enumerate(bits)])]
                for k, b in enumerate(bits):
                    v = v * (frac[k] if b else 1 - frac[k])
                step = v if step is None else step + v
        p = torch.minimum(torch.clamp_min(p + step, 0.0), torch.tensor(top, dtype=torch.float32)[:, None])
    return p


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("bilinear", [True, False])
def test_pixel_steps_merge_trajectories_without_changing_any_position(ndim, bilinear):
    """follow_flows(interp="pixel" / False) integrates bit-identical positions once: the final
    positions are those of stepping every point on its own, to the bit (converging flows, so many merge)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(ndim)
    shape = (40, 50) if ndim == 2 else (12, 20, 24)
    lab = (rng.random(shape) > 0.6).astype(np.int32)
    from cellpose_web.engine.dynamics import masks_to_flows
    from scipy.ndimage import label
    dP = masks_to_flows(label(gaussian_filter(lab.astype(float), 2) > 0.4)[0]).astype(np.float32) * 5
    dP += rng.normal(0, 0.3, dP.shape).astype(np.float32)
    inds = np.nonzero(np.ones(shape, bool))
    got = dynamics.follow_flows(dP / 5, inds, niter=60, interp="pixel" if bilinear else False)
    want = _steps_one_by_one(dP / 5, inds, 60, bilinear)
    assert torch.equal(got, want)
    assert len(torch.unique(got, dim=1)) < got.shape[1] // 4  # most trajectories met


def test_cellpose3_flows_of_masks_are_its_float64_heat_to_the_bit():
    """legacy.masks_to_flows (objects stepped together, two buffers) equals Cellpose 3's per-object
    diffusion written plainly, for touching, hollow, one-pixel and border objects."""
    from scipy.ndimage import find_objects

    from cellpose_web.models import legacy

    m = np.zeros((60, 70), np.int32)
    m[5:30, 5:10] = 3
    m[25:30, 5:40] = 3  # an L
    m[50, 50] = 7  # one pixel, labels with gaps
    m[0:12, 55:70] = 9  # on the border
    m[40:60, 0:20] = 2
    m[45:55, 5:15] = 0  # hollow
    m[30:40, 40:52] = 4  # touches 3
    want = np.zeros((2, *m.shape))
    for i, sl in enumerate(find_objects(m)):
        if sl is None:
            continue
        sr, sc = sl
        ly, lx = sr.stop - sr.start + 2, sc.stop - sc.start + 2
        y, x = np.nonzero(m[sr, sc] == i + 1)
        y, x = y + 1, x + 1
        c = ((x - x.mean()) ** 2 + (y - y.mean()) ** 2).argmin()
        T = np.zeros(ly * lx)
        for _ in range(2 * (ly + lx)):
            T[y[c] * lx + x[c]] += 1
            T[y * lx + x] = 1 / 9. * (T[y * lx + x] + T[(y - 1) * lx + x] + T[(y + 1) * lx + x] + T[y * lx + x - 1]
                                      + T[y * lx + x + 1] + T[(y - 1) * lx + x - 1] + T[(y - 1) * lx + x + 1]
                                      + T[(y + 1) * lx + x - 1] + T[(y + 1) * lx + x + 1])
        want[0, sr.start + y - 1, sc.start + x - 1] = T[(y + 1) * lx + x] - T[(y - 1) * lx + x]
        want[1, sr.start + y - 1, sc.start + x - 1] = T[y * lx + x + 1] - T[y * lx + x - 1]
    want /= 1e-60 + (want ** 2).sum(axis=0) ** 0.5
    assert np.array_equal(legacy.masks_to_flows(m), want)
    assert np.array_equal(legacy.masks_to_flows(m, max_elements=500), want)  # one object per stack
    # the steps in torch (a GPU's path, here on the CPU): the same float64 operations, the same bits
    assert np.array_equal(legacy.masks_to_flows(m, use_torch=True), want)
    assert np.array_equal(legacy.masks_to_flows(m, max_elements=500, use_torch=True), want)
    # MPS has no float64: there the steps stay in numpy (no MPS tensor is made, so this runs anywhere)
    assert np.array_equal(legacy.masks_to_flows(m, device="mps"), want)


def test_cellpose3_flow_check_takes_the_model_device(own, monkeypatch):
    """A Cellpose 1-3 model's flow check gets the model's device (on a GPU its diffusion runs there)."""
    from cellpose_web.models import legacy

    seen = []
    real = legacy.masks_to_flows
    monkeypatch.setattr(legacy, "masks_to_flows", lambda m, **kw: seen.append(kw.get("device")) or real(m, **kw))
    model = models.CellposeModel(pretrained_model="cp_cyto")
    masks = model.eval(own["image"], channels=own["channels"].tolist(), channel_axis=-1,
                       diameter=float(own["diameter"]))[0]
    assert seen == [model.device] and np.array_equal(masks, own["masks"])


# ------------------------------------------------------------------------------------------ eval
def test_eval_channels_choose_the_inputs(cp3_model, manifest, ref):
    """rgb image, channels [2, 1] (green cytoplasm, red nuclei): flows, styles, masks as Cellpose 3."""
    run_case(cp3_model, manifest, ref, "rgb_c21_d40")


def test_eval_bad_channels_are_one_clear_message(cp3_model, ref):
    with pytest.raises(CellposeWebError, match="names channel 4, but the image has 3"):
        cp3_model.eval(ref["rgb"], channels=[4, 1], channel_axis=-1, diameter=40)
    with pytest.raises(CellposeWebError, match="names channel 2, but the image has 1"):
        cp3_model.eval(ref["gray"], channels=[2, 0], diameter=40)
    with pytest.raises(CellposeWebError, match="channels must be two whole numbers"):
        cp3_model.eval(ref["gray"], channels=["green", 1])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gray_d30", "gray_dNone", "gray_d45_augment", "gray_d20_noresample",
                                  "rgb_c20_d40", "stack_stitch"])
def test_every_manifest_case_matches_cellpose3(cp3_model, manifest, ref, case):
    run_case(cp3_model, manifest, ref, case)


@pytest.mark.slow
def test_3d_case_matches_cellpose3(cp3_model, manifest, ref):
    """do_3D: flows within 1e-4 of Cellpose 3's, the same 45 objects. Our network output differs from
    Cellpose 3's MKL-DNN run by ~1e-5 (float32 rounding); 3D dynamics (no flow check, 3 summed views)
    turn that into a few voxels at object edges (measured: 3 of the 37 voxels of the smallest object,
    3 of 250 of another; the same dynamics on Cellpose 3's own flows give its masks exactly, see
    test_cellpose3_3d_dynamics_on_its_own_flows), so objects under 100 voxels are held to IoU >= 0.9,
    the others to >= 0.98, and the mean IoU to >= 0.995."""
    masks = run_case(cp3_model, manifest, ref, "stack_3d", min_size_exact=100, iou_big=0.98)
    assert metrics.mask_ious(ref["stack_3d_masks"], masks)[0].mean() >= 0.995


def test_cellpose3_3d_dynamics_on_its_own_flows(ref):
    assert int(ref["stack_3d_stride"]) == 1
    rescale = np.float32(30.0) / 25.0
    masks = dynamics.compute_masks(ref["stack_3d_dP"], ref["stack_3d_cellprob"], niter=int(np.uint32(1 / rescale * 200)),
                                   do_3D=True)
    assert np.array_equal(masks, ref["stack_3d_masks"])


# ------------------------------------------------------------------------------------------ size model
@pytest.mark.slow
def test_size_models_match_cellpose3(cp3_model, manifest, ref, cp3_dir, cp3_files):
    want = manifest["size_model"]
    diam, diam_style = models.SizeModel(cp3_model, pretrained_size=str(cp3_dir / "size_random.npy")).eval(
        ref["gray"], channels=want["channels"])
    assert abs(diam - want["diam"]) < 1e-3 and abs(diam_style - want["diam_style"]) < 1e-3
    size = models.SizeModel(cp3_model, pretrained_size=str(cp3_files[1]))
    for name, kw in (("gray", {}), ("rgb", {"channel_axis": -1})):
        want = manifest["size_model_real"][name]
        diam, diam_style = size.eval(ref[name], channels=want["channels"], **kw)
        assert abs(diam - want["diam"]) < 1e-3 and abs(diam_style - want["diam_style"]) < 1e-3


def test_size_file_that_does_not_fit(cp3_model, cp3_files, tmp_path):
    params = np.load(cp3_files[1], allow_pickle=True).item()
    short = tmp_path / "short_size.npy"
    np.save(short, {**params, "A": params["A"][:128], "smean": params["smean"][:128]})
    with pytest.raises(CellposeWebError, match="does not match this network"):
        models.SizeModel(cp3_model, pretrained_size=str(short))
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((4, 4)))
    with pytest.raises(CellposeWebError, match="not a Cellpose size model"):
        models.SizeModel(cp3_model, pretrained_size=str(other))
    # style vector -> diameter is Cellpose's regression exp(A.(s - smean) + log(diam_mean) + ymean)
    size = models.SizeModel(cp3_model, pretrained_size=str(cp3_files[1]))
    s = params["smean"]
    assert size.size_from_style(s) == pytest.approx(max(5.0, np.exp(np.log(params["diam_mean"]) + params["ymean"])))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_chan_chan2_with_builtin_cp_cyto_gives_the_api_masks(ref, tmp_path, capsys):
    """`python -m cellpose_web --dir DIR --pretrained_model cp_cyto --chan 2 --chan2 1` = the API = Cellpose 3."""
    import tifffile

    from cellpose_web import cli, io

    tifffile.imwrite(tmp_path / "cells.tif", ref["rgb"])
    rc = cli.main(["--dir", str(tmp_path), "--pretrained_model", "cp_cyto", "--chan", "2", "--chan2", "1",
                   "--diameter", "40"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "--chan/--chan2" not in err  # no 'ignored' notice: a Cellpose 1-3 model uses them
    seg = io.load_seg(tmp_path / "cells_seg.npy")
    api = models.CellposeModel(pretrained_model="cp_cyto").eval(ref["rgb"], channels=[2, 1], channel_axis=-1,
                                                                diameter=40)[0]
    assert np.array_equal(seg["masks"], api)
    assert_same_masks(ref["rgb_c21_d40_masks"], api)
    assert f"cells.tif: {int(api.max())} masks" in out
    rc = cli.main(["--dir", str(tmp_path), "--pretrained_model", "cp_cyto", "--chan", "5", "--diameter", "40"])
    err = capsys.readouterr().err
    assert rc == 2 and "names channel 5, but the image has 3" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ training
def test_train_seg_fine_tunes_a_cellpose3_unet(cp3_files, tmp_path):
    """train_seg on the legacy net: 2 inputs chosen by channels, loss goes down, the result is a Cellpose 3
    state dict that loads back as a U-Net with the training's diam_labels."""
    from cellpose_web.engine import synthetic
    from cellpose_web.models import train

    samples = [synthetic.synthetic_sample(np.random.default_rng(seed), (96, 96), "cyto_nuclei", diameter=25)
               for seed in range(2)]
    imgs = [np.moveaxis(s.image, 0, -1) for s in samples]  # (Y, X, 2): [cytoplasm, nucleus]
    labels = [s.labels for s in samples]
    model = models.CellposeModel(pretrained_model=str(cp3_files[0]))
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    path, losses, _ = train.train_seg(model.net, imgs, labels, channels=[1, 2], n_epochs=3, learning_rate=1e-3,
                                      weight_decay=1e-5, bsize=64, rescale=True, min_train_masks=1,
                                      save_path=tmp_path, model_name="cp3_tuned")
    assert np.isfinite(losses).all() and len(losses) == 3
    sd = torch.load(path, weights_only=True)
    assert "downsample.down.res_down_0.conv.conv_0.2.weight" in sd and sd["diam_mean"].item() == 30.0
    assert not torch.equal(sd["output.2.weight"], before["output.2.weight"])
    tuned = models.CellposeModel(pretrained_model=str(path))
    assert tuned.legacy and abs(float(tuned.diam_labels) - float(sd["diam_labels"])) < 1e-6
    masks = tuned.eval(imgs[0], channels=[1, 2], channel_axis=-1, diameter=25)[0]
    assert masks.shape == imgs[0].shape[:2]


# ------------------------------------------------------------------------------------------ own fixture
# tests/data/cp3_wholecell_seed9000.npz: a 256x256 two-channel whole-cell image (synthetic.py, seed 9000,
# cytoplasm + nuclei) run through the published Cellpose 3.1.1.2 with cp_cyto.pth, channels [1, 2] and
# the true diameter (25.8 px): its masks, dP and cellprob. On it Cellpose 4's flow check removes one
# object that Cellpose 3's keeps, so it checks that legacy models use Cellpose 3's flows for the check.
@pytest.fixture(scope="module")
def own():
    from pathlib import Path
    return dict(np.load(Path(__file__).parent / "data" / "cp3_wholecell_seed9000.npz"))


def test_cellpose3_flow_check_on_its_own_flows(own):
    from cellpose_web.models import legacy

    niter = int(np.uint32(1 / (np.float32(30.0) / float(own["diameter"])) * 200))
    masks = dynamics.compute_masks(own["dP"], own["cellprob"], niter=niter, interp="pixel",
                                   flow_error_fn=legacy.flow_error)
    assert np.array_equal(masks, own["masks"])


@pytest.mark.slow
def test_whole_cell_image_not_in_the_fixtures_matches_cellpose3(own):
    model = models.CellposeModel(pretrained_model="cp_cyto")
    masks, flows, _ = model.eval(own["image"], channels=own["channels"].tolist(), channel_axis=-1,
                                 diameter=float(own["diameter"]))
    np.testing.assert_allclose(flows[1], own["dP"], atol=1e-3)
    assert np.array_equal(masks, own["masks"])
