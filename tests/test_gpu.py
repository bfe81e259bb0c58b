"""Every model kind on the GPU (``pytest -m gpu``, item 7 of issue 23): Cellpose-SAM (a tiny network of the same
architecture), ``lite`` and the Cellpose 1-3 U-Net ``cp_cyto`` segment 2D images and 3D stacks on CUDA with their
default settings, train for two steps there, and the app's per-image pipeline (``pipeline.process_file``) runs
there; masks agree with the CPU's float32 masks (AP@0.5 >= 0.95, >= 0.9 where the device runs bfloat16, as in
tests/test_dtypes.py).

Without CUDA every test here is skipped with the reason. ``CELLPOSE_WEB_TEST_DEVICE`` chooses the device under
test (default ``cuda``); ``CELLPOSE_WEB_TEST_DEVICE=cpu python -m pytest -m gpu`` runs the same tests on the
CPU, where the device run and the CPU reference are both on the CPU (so the comparison is trivially equal),
which checks the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellpose_web.engine import metrics, synthetic
from cellpose_web.models import CellposeModel, train
from cellpose_web.workflows import pipeline

from test_dtypes import make_tiny_cpsam, model_case

DEVICE = torch.device(os.environ.get("CELLPOSE_WEB_TEST_DEVICE", "cuda"))
DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "u2os_nuclei.tif"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device (CELLPOSE_WEB_TEST_DEVICE=cpu runs these tests on the CPU)"),
]

KINDS = ["cpsam", "lite", "cp_cyto"]


@pytest.fixture(scope="module")
def tiny_cpsam(tmp_path_factory) -> str:
    return str(make_tiny_cpsam(tmp_path_factory.mktemp("gpu") / "tiny_cpsam.pth"))


def stack_of(img: np.ndarray, planes: int = 4, side: int = 64) -> np.ndarray:
    """A (Z, side, side[, C]) stack: the image's central crop in ``planes`` planes of slightly different brightness."""
    y0, x0 = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    crop = img[y0:y0 + side, x0:x0 + side].astype(np.float32)
    gain = np.linspace(0.9, 1.1, planes, dtype=np.float32).reshape((planes,) + (1,) * crop.ndim)
    return crop[None] * gain


def agreement(cpu: np.ndarray, dev: np.ndarray) -> float:
    """AP@0.5 of the device's masks against the CPU's (1.0 when both are empty)."""
    if cpu.max() == 0:
        return float(dev.max() == 0)
    return float(metrics.average_precision(cpu, dev, threshold=[0.5])[0].reshape(-1)[0])


def tolerance(model: CellposeModel) -> float:
    """The AP@0.5 the device's masks must reach against the CPU's float32 masks."""
    return 0.9 if model.dtype == torch.bfloat16 else 0.95


@pytest.fixture(scope="module")
def cpu_results() -> dict:
    """CPU float32 results per (kind, 2D/3D), filled on first use."""
    return {}


def cpu_masks(cache: dict, key: tuple, name: str, x: np.ndarray, kw: dict) -> np.ndarray:
    if key not in cache:
        cache[key] = CellposeModel(pretrained_model=name, device="cpu", use_bfloat16=False).eval(x, **kw)[0]
    return cache[key]


@pytest.mark.parametrize("kind", KINDS)
def test_model_kind_segments_2d_on_device(kind, tiny_cpsam, cpu_results):
    name, img, kw = model_case(kind, tiny_cpsam)
    model = CellposeModel(pretrained_model=name, device=DEVICE)  # default settings: the dtype the device gets
    assert model.device.type == DEVICE.type and next(model.net.parameters()).device.type == DEVICE.type
    masks, flows, _ = model.eval(img, **kw)
    ref = cpu_masks(cpu_results, (kind, "2d"), name, img, kw)
    assert ref.max() >= 20, f"{kind}: the CPU reference should segment the image ({ref.max()} masks)"
    assert masks.shape == ref.shape and flows[1].dtype == np.float32
    ap = agreement(ref, masks)
    assert ap >= tolerance(model), f"{kind} on {DEVICE} ({model.dtype}): AP@0.5 {ap:.3f} vs the CPU's masks"


@pytest.mark.parametrize("kind", KINDS)
def test_model_kind_segments_3d_on_device(kind, tiny_cpsam, cpu_results):
    name, img, kw = model_case(kind, tiny_cpsam)
    stack = stack_of(img)
    kw3 = {**kw, "do_3D": True, "z_axis": 0, "flow_threshold": 0.0}
    if "channel_axis" in kw3:
        kw3["channel_axis"] = -1
    model = CellposeModel(pretrained_model=name, device=DEVICE)
    masks, flows, _ = model.eval(stack, **kw3)
    ref = cpu_masks(cpu_results, (kind, "3d"), name, stack, kw3)
    assert ref.max() >= 3, f"{kind}: the CPU reference should segment the stack ({ref.max()} masks)"
    assert masks.shape == ref.shape == stack.shape[:3]
    assert flows[1].shape[0] == 3, "3D flows have dZ, dY, dX"
    ap = agreement(ref, masks)
    assert ap >= tolerance(model), f"{kind} 3D on {DEVICE} ({model.dtype}): AP@0.5 {ap:.3f} vs the CPU's masks"


def training_case(kind: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image, labels, train_seg keywords) for two steps of a model kind."""
    rng = np.random.default_rng(1)
    if kind == "cp_cyto":
        s = synthetic.synthetic_sample(rng, (128, 128), "cyto_nuclei", diameter=25)
        while s.image.shape[0] < 2:  # a few pictures come without a nuclear channel
            s = synthetic.synthetic_sample(rng, (128, 128), "cyto_nuclei", diameter=25)
        return np.moveaxis(s.image, 0, -1), s.labels, dict(channels=[1, 2], bsize=64)
    s = synthetic.synthetic_sample(rng, (256, 256), "nuclei", diameter=25)
    return s.image[0], s.labels, dict(bsize=256 if kind == "cpsam" else 64)


@pytest.mark.parametrize("kind", KINDS)
def test_two_training_steps_on_device(kind, tiny_cpsam, tmp_path):
    name = {"cpsam": tiny_cpsam}.get(kind, kind)
    img, labels, kw = training_case(kind)
    model = CellposeModel(pretrained_model=name, device=DEVICE)
    before = [p.detach().float().cpu().clone() for p in model.net.parameters()]
    tf32_while_training, tf32_before = [], torch.backends.cuda.matmul.allow_tf32
    path, losses, _ = train.train_seg(model.net, [img], [labels], batch_size=2, n_epochs=2, nimg_per_epoch=2,
                                      learning_rate=1e-3, weight_decay=1e-5, min_train_masks=1, save_path=tmp_path,
                                      model_name=f"gpu_{kind}", **kw, callback=lambda *a: tf32_while_training.append(
                                          torch.backends.cuda.matmul.allow_tf32))
    assert len(losses) == 2 and np.isfinite(losses).all()
    # TF32 matrix products while training on CUDA (as Cellpose 4), the caller's setting afterwards
    assert tf32_while_training == [DEVICE.type == "cuda" or tf32_before] * 2
    assert torch.backends.cuda.matmul.allow_tf32 == tf32_before
    after = list(model.net.parameters())
    assert all(p.device.type == DEVICE.type for p in after)
    assert any(not torch.equal(b, a.detach().float().cpu()) for b, a in zip(before, after)), "no weight changed"
    tuned = CellposeModel(pretrained_model=str(path), device=DEVICE)
    seg_kw = {"channels": [1, 2], "channel_axis": -1} if kind == "cp_cyto" else {}
    assert tuned.eval(img, diameter=25, **seg_kw)[0].shape == labels.shape


def test_app_pipeline_on_device(tmp_path):
    """The per-image function under the command line, the service's batches and Dask (read, segment, measure,
    write) with lite on the device; the masks it writes agree with the CPU's."""
    settings = pipeline.ImageSettings(eval_kwargs={"diameter": 30})
    save = pipeline.SaveOptions(npy=False, tif=True)
    written = {}
    for where in (DEVICE, torch.device("cpu")):
        loaded = pipeline.get_model("lite", device=str(where), gpu=where.type != "cpu")
        if where == DEVICE:
            assert loaded.model.device.type == DEVICE.type
        out = tmp_path / where.type
        res = pipeline.process_file(EXAMPLE, loaded, settings, savedir=out, save=save)
        assert res["n_masks"] >= 20 and res["summary"], res
        written[where.type] = res
    dev_res, cpu_res = written[DEVICE.type], written["cpu"]
    assert DEVICE.type in str(dev_res["device"])
    masks = {k: tifffile.imread(next(p for p in r["files"].values() if p.endswith("_cp_masks.tif")))
             for k, r in (("dev", dev_res), ("cpu", cpu_res))}
    model = pipeline.get_model("lite", device=str(DEVICE), gpu=DEVICE.type != "cpu").model
    ap = agreement(masks["cpu"], masks["dev"])
    assert ap >= tolerance(model), f"the pipeline on {DEVICE}: AP@0.5 {ap:.3f} vs the CPU's masks"


@pytest.mark.parametrize("kind", ["cpsam", "lite"])
def test_training_step_queues_without_host_syncs(kind, tiny_cpsam):
    """A training step as train_seg runs it (crops cut on the device; Cellpose-SAM: layer drop and bf16 autocast
    where training_uses_bf16 says so; lite: its intensity augmentation; the loss, fused AdamW) never makes the
    host wait for the device: on CUDA, torch's sync debug mode turns any synchronising call into an error. The
    first step (which also times the attention kernels once) is a warm-up outside the check."""
    from cellpose_web.engine import transforms

    model = CellposeModel(pretrained_model={"cpsam": tiny_cpsam}.get(kind, kind), device=DEVICE)
    net = model.net.float()
    img, labels, _ = training_case("nuclei")
    imgs, flows, _, _ = train.prepare_training_data([img], [labels], None, True, 1, DEVICE,
                                                    nchan=int(getattr(net, "nchan", 3)))
    gen = torch.Generator().manual_seed(0)
    bf16 = train.training_uses_bf16(net, DEVICE)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
    net.train()
    total = torch.zeros((), device=DEVICE)

    def step(seed):
        xb, yb = transforms.random_rotate_and_resize(imgs * 2, flows * 2, scale_range=0.5, xy=(256, 256),
                                                     rng=seed, device=DEVICE)
        if kind == "lite":
            xb = train.intensity_augment(xb, gen)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            y = net(xb)[0]
        loss = train.flow_loss(y.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return total + loss.detach()

    total = step(0)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in (1, 2):
            total = step(seed)
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


def test_cellpose3_flow_check_flows_on_device_equal_the_cpu_bits():
    """Cellpose 3's flow-check diffusion steps on the device in torch: the flows equal the CPU's (numpy)
    to the bit, so a Cellpose 1-3 model's masks do not depend on the device."""
    from cellpose_web.models import legacy

    s = synthetic.synthetic_sample(np.random.default_rng(3), (160, 160), "cyto_nuclei", diameter=25)
    labels = s.labels
    assert labels.max() >= 10
    on_device = legacy.masks_to_flows(labels, device=DEVICE, use_torch=True)
    assert np.array_equal(on_device, legacy.masks_to_flows(labels))
