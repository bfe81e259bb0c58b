"""Every model kind in float32 and bfloat16 on the CPU: Cellpose-SAM, ``lite`` and Cellpose 1-3 U-Nets load
and segment with ``use_bfloat16`` None / True / False, and bfloat16 masks agree with float32's.

On CUDA, ``use_bfloat16=None`` means bfloat16 for Cellpose-SAM and ``lite``, so the bfloat16 paths are the
default ones on a GPU; running them here lets the CPU-only CI catch their bugs (a Cellpose 1-3 U-Net once
crashed in ``CellposeModel.__init__`` on every GPU: its stored diameters were read through numpy, which has
no bfloat16).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellpose_web.engine import device, metrics
from cellpose_web import models
from cellpose_web.resources import WEIGHTS_DIR
from cellpose_web.models import CellposeModel

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WEIGHTS = WEIGHTS_DIR


def make_tiny_cpsam(path: Path) -> Path:
    """A small Cellpose-SAM checkpoint (ViT width 32, 2 blocks) that segments bright nuclei.

    Random weights give masks that are noise, so the first and last layers are set by hand: the patch
    embedding takes each 8 x 8 patch's mean intensity (plus a constant), the transformer blocks are random
    with small residual updates, the neck's convolutions give the patch mean and its Y and X differences
    (in +- pairs beside a large constant, so its LayerNorms stay nearly linear), and the output layer turns
    them into cellprob = 20 * (mean - 0.3) and flows = 10 x the differences (uphill, to the nuclei's
    centres). Flows are constant on each patch, so evaluate it with ``flow_threshold=0``.
    """
    from cellpose_web.engine.nets.vit_sam import CPSAMNet

    torch.manual_seed(0)
    net = CPSAMNet(embed_dim=32, depth=2, num_heads=2, mlp_dim=64, out_chans=16, global_attn_indexes=(1,))
    enc = net.encoder
    with torch.no_grad():
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.02)
            blk.attn.rel_pos_w.normal_(0, 0.02)
            for lin in (blk.attn.proj, blk.mlp.lin2):
                lin.weight.mul_(0.01)
                lin.bias.zero_()
        enc.pos_embed.zero_()
        w, b = enc.patch_embed.proj.weight, enc.patch_embed.proj.bias
        w.zero_()
        b.zero_()
        w[0, 0] = 1 / 64  # token dim 0: the patch mean of the first channel
        b[1] = 1.0  # token dim 1: a constant
        n0 = enc.neck[0].weight
        n0.zero_()
        n0[0, 0], n0[1, 0], n0[2, 1], n0[3, 1] = 1.0, -1.0, 8.0, -8.0
        n2 = enc.neck[2].weight
        n2.zero_()
        n2[0, 0, 1, 1], n2[1, 0, 1, 1] = 1.0, -1.0  # patch mean
        n2[2, 0, 2, 1], n2[2, 0, 0, 1] = 0.5, -0.5  # d/dY
        n2[4, 0, 1, 2], n2[4, 0, 1, 0] = 0.5, -0.5  # d/dX
        n2[3], n2[5] = -n2[2], -n2[4]
        n2[6, 2, 1, 1], n2[7, 2, 1, 1] = 4.0, -4.0  # constant
        gain = 1 / 0.088  # undoes the two LayerNorms' scaling (about sqrt(8) / 8 / 4)
        ow, ob = net.out.weight, net.out.bias
        ow.zero_()
        ob.zero_()
        ow[0:64, 2] = 10 * gain  # dY on every pixel of the patch
        ow[64:128, 4] = 10 * gain  # dX
        ow[128:192, 0] = 20 * gain  # cellprob
        ob[128:192] = -6.0
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_cpsam(tmp_path_factory) -> str:
    return str(make_tiny_cpsam(tmp_path_factory.mktemp("dtypes") / "tiny_cpsam.pth"))


def model_case(kind: str, tiny_cpsam: str) -> tuple[str, np.ndarray, dict]:
    """(model, image, eval keywords) for a model kind: 256 x 256 images from the repository."""
    if kind == "cp_cyto":
        own = np.load(DATA / "cp3_wholecell_seed9000.npz")
        return "cp_cyto", own["image"], dict(channels=own["channels"].tolist(), channel_axis=-1,
                                             diameter=float(own["diameter"]))
    from cellpose_web import io
    img = io.imread(EXAMPLES / "u2os_nuclei.tif")
    if kind == "lite":
        return "lite", img, dict(diameter=30)
    return tiny_cpsam, img, dict(diameter=30, flow_threshold=0)


@pytest.fixture(scope="module")
def float32_results() -> dict:
    """Float32 (use_bfloat16=False) results per kind, filled on first use inside a test."""
    return {}


KINDS = ["cpsam", "lite", "cp_cyto"]


@pytest.mark.parametrize("use_bfloat16", [None, True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_in_every_dtype(kind, use_bfloat16, tiny_cpsam, float32_results):
    name, img, kw = model_case(kind, tiny_cpsam)
    if kind not in float32_results:
        ref_model = CellposeModel(pretrained_model=name, use_bfloat16=False)
        float32_results[kind] = ref_model.eval(img, **kw)
    ref_masks, ref_flows, ref_styles = float32_results[kind]
    n_ref = int(ref_masks.max())
    assert n_ref >= 20, f"{kind}: the float32 reference should segment the image ({n_ref} masks)"

    model = CellposeModel(pretrained_model=name, use_bfloat16=use_bfloat16)
    expected = torch.bfloat16 if use_bfloat16 else torch.float32  # None: float32 on the CPU
    assert model.dtype == expected
    assert {p.dtype for p in model.net.parameters()} == {expected}
    masks, flows, styles = model.eval(img, **kw)
    assert flows[1].dtype == flows[2].dtype == np.float32 and np.asarray(styles).dtype == np.float32
    assert model.last_eval_params["dtype"] == str(expected).replace("torch.", "")
    if expected == torch.float32:
        assert np.array_equal(masks, ref_masks)
        assert np.array_equal(flows[1], ref_flows[1]) and np.array_equal(flows[2], ref_flows[2])
        assert np.array_equal(styles, ref_styles)
        return
    ap = metrics.average_precision(ref_masks, masks, threshold=0.5)[0][0]
    assert ap >= 0.9, f"{kind}: bfloat16 masks AP@0.5 {ap:.3f} vs float32"
    assert abs(int(masks.max()) - n_ref) <= max(1, round(0.05 * n_ref))
    for got, ref in ((flows[1], ref_flows[1]), (flows[2], ref_flows[2])):
        assert np.abs(got - ref).mean() <= 0.03 * np.abs(ref).mean()
    if kind == "cp_cyto":  # the style vector (and so the size model's diameter) is unchanged within bf16 rounding
        cos = float(np.dot(styles, ref_styles) / np.linalg.norm(styles) / np.linalg.norm(ref_styles))
        assert cos > 0.999
        from cellpose_web.models.legacy import SizeModel
        size = SizeModel(model)
        assert size.size_from_style(styles) == pytest.approx(size.size_from_style(ref_styles), rel=0.02)


def test_default_dtype_per_device_and_model_family():
    """None: bfloat16 only on CUDA and never for Cellpose 1-3 U-Nets (Cellpose 3 runs them in float32);
    True / False are honoured, except True on MPS (float32)."""
    bf16, f32 = torch.bfloat16, torch.float32
    for dev in ("cpu", "cuda", "mps"):
        for legacy in (False, True):
            want_none = bf16 if dev == "cuda" and not legacy else f32
            assert device.default_dtype(dev, None, legacy=legacy) == want_none
            assert device.default_dtype(dev, True, legacy=legacy) == (f32 if dev == "mps" else bf16)
            assert device.default_dtype(dev, False, legacy=legacy) == f32


def test_default_settings_as_on_cuda(monkeypatch, tiny_cpsam):
    """CellposeModel with default settings, with the dtype chosen as for a CUDA device: the Cellpose 1-3
    U-Net runs in float32 (it used to crash here), Cellpose-SAM and lite in bfloat16."""
    real = device.default_dtype
    monkeypatch.setattr(models.core, "default_dtype",
                        lambda dev, use_bfloat16=None, **kw: real(torch.device("cuda"), use_bfloat16, **kw))
    for name, want in (("cp_cyto", torch.float32), ("lite", torch.bfloat16), (tiny_cpsam, torch.bfloat16)):
        model = CellposeModel(pretrained_model=name)
        assert model.dtype == want and next(model.net.parameters()).dtype == want, name
    assert CellposeModel(pretrained_model="cp_cyto", use_bfloat16=True).dtype == torch.bfloat16


@pytest.mark.parametrize("source", ["cp_cyto", "lab_file"])
def test_bfloat16_unet_keeps_float32_numbers(source, tmp_path):
    """A Cellpose 1-3 U-Net in bfloat16: every floating parameter and buffer of the net is bf16, and the
    diameters stored in the weights stay float32 numbers with their float32 values (27.3 in bf16 would be
    27.25)."""
    name, labels = "cp_cyto", 30.0
    if source == "lab_file":  # an uploaded / fine-tuned model: diam_labels is what its training set had
        sd = torch.load(WEIGHTS / "cp_cyto.pth", weights_only=True)
        sd["diam_labels"] = torch.tensor([27.3])
        name, labels = str(tmp_path / "lab_unet.pth"), 27.3
        torch.save(sd, name)
    model = CellposeModel(pretrained_model=name, use_bfloat16=True)
    assert model.legacy and model.dtype == torch.bfloat16
    tensors = [*model.net.parameters(), *model.net.buffers()]
    assert all(t.dtype == torch.bfloat16 for t in tensors if t.is_floating_point())
    assert model.net.diam_mean.dtype == model.net.diam_labels.dtype == torch.bfloat16
    for value in (model.diam_mean, model.diam_labels):
        assert isinstance(value, (float, np.floating)) and not torch.is_tensor(value)
    assert model.diam_mean == 30.0 and model.diam_labels == np.float32(labels)


def test_fine_tuning_a_bfloat16_unet_saves_float32(tmp_path):
    """train_seg on a bf16 Cellpose 1-3 U-Net: the saved file holds float32 weights and the training's
    diam_labels, the caller's net is bf16 again, and the file loads and segments in bfloat16."""
    from cellpose_web.engine import synthetic
    from cellpose_web.models import train

    s = synthetic.synthetic_sample(np.random.default_rng(0), (96, 96), "cyto_nuclei", diameter=25)
    img = np.moveaxis(s.image, 0, -1)
    model = CellposeModel(pretrained_model="cp_cyto", use_bfloat16=True)
    path, losses, _ = train.train_seg(model.net, [img], [s.labels], channels=[1, 2], n_epochs=1, learning_rate=1e-3,
                                      weight_decay=1e-5, bsize=64, min_train_masks=1, save_path=tmp_path,
                                      model_name="bf16_tuned", mixed_precision=False)
    assert np.isfinite(losses).all()
    assert next(model.net.parameters()).dtype == torch.bfloat16
    sd = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    tuned = CellposeModel(pretrained_model=str(path), use_bfloat16=True)
    assert tuned.diam_labels == np.float32(sd["diam_labels"].item())
    masks = tuned.eval(img, channels=[1, 2], channel_axis=-1, diameter=25)[0]
    assert masks.shape == img.shape[:2]
