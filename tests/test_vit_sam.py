"""The Cellpose-SAM network: layout of the official checkpoint, fixture forward, attention maths."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.nets import build_net, load_checkpoint
from cellpose_web.engine.nets.vit_sam import Attention, CPSAMNet, get_rel_pos


@pytest.fixture(scope="module")
def tiny_sd(reference_dir):
    return load_checkpoint(reference_dir / "tiny_cpsam.pth")


def test_full_size_layout_matches_cpsam_checkpoint(reference_dir):
    ref = json.loads((reference_dir / "cpsam_state_dict.json").read_text())
    with torch.device("meta"):
        net = CPSAMNet()
    sd = net.state_dict()
    assert list(sd.keys()) == list(ref.keys())
    for k, v in sd.items():
        assert list(v.shape) == ref[k]["shape"], k
        assert str(v.dtype).replace("torch.", "") == ref[k]["dtype"], k
    n = sum(v.numel() for v in sd.values())
    assert n == sum(int(np.prod(v["shape"])) for v in ref.values())
    assert not net.W2.requires_grad and not net.diam_labels.requires_grad and not net.diam_mean.requires_grad


def test_tiny_checkpoint_config_is_read_from_weights(tiny_sd, reference_dir):
    manifest = json.loads((reference_dir / "manifest.json").read_text())["tiny_cpsam"]
    net = CPSAMNet.from_state_dict(tiny_sd)
    cfg = net.config
    assert cfg["embed_dim"] == manifest["embed_dim"]
    assert cfg["depth"] == manifest["depth"]
    assert cfg["num_heads"] == manifest["num_heads"]
    assert list(net.global_attn_indexes) == manifest["global_attn_indexes"]
    assert cfg["bsize"] == manifest["bsize"] and cfg["ps"] == manifest["ps"] and cfg["nout"] == manifest["nout"]


@pytest.mark.parametrize("impl", ["auto", "mask", "fold", "explicit"])
def test_tiny_forward_matches_reference(tiny_sd, reference_dir, impl):
    io = np.load(reference_dir / "tiny_cpsam_io.npz")
    net = CPSAMNet.from_state_dict(tiny_sd)
    net.set_attention(impl)
    with torch.inference_mode():
        y, style = net(torch.from_numpy(io["x"]))
    assert y.shape == io["y"].shape and style.shape == (io["x"].shape[0], 256)
    assert not style.any()
    assert np.abs(y.numpy() - io["y"]).max() < 1e-4


def _sam_get_rel_pos(size, rel_pos):
    """SAM's formula written out: (L, C) table -> resized (2*size-1, C) -> [q - k + size - 1]."""
    n = 2 * size - 1
    r = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=n, mode="linear")
    r = r.reshape(-1, n).permute(1, 0)
    q = torch.arange(size)[:, None]
    k = torch.arange(size)[None, :]
    return r[(q - k + size - 1).long()]


def test_get_rel_pos_interpolation():
    torch.manual_seed(0)
    for rows in (27, 127, 63):
        t = torch.randn(rows, 16)
        torch.testing.assert_close(get_rel_pos(32, t), _sam_get_rel_pos(32, t))


def _explicit_attention(attn: Attention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The textbook formula (SAM's Attention.forward): softmax(q*s @ k^T + rel_h + rel_w) @ v."""
    B, N, D = x.shape
    nh = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, nh, -1).permute(2, 0, 3, 1, 4).reshape(3, B * nh, N, -1)
    q, k, v = qkv.unbind(0)
    s = (q * attn.scale) @ k.transpose(-2, -1)
    Rh = _sam_get_rel_pos(H, attn.rel_pos_h)
    Rw = _sam_get_rel_pos(W, attn.rel_pos_w)
    rq = q.reshape(B * nh, H, W, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", rq, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", rq, Rw)
    s = (s.view(B * nh, H, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(B * nh, N, N)
    o = (s.softmax(-1) @ v).view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, N, D)
    return attn.proj(o)


@pytest.mark.parametrize("impl", ["mask", "fold", "explicit"])
def test_sdpa_relpos_attention_equals_explicit_formula(impl):
    torch.manual_seed(1)
    H = W = 12
    attn = Attention(dim=48, num_heads=3, rel_rows=27)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    attn.impl = impl
    x = torch.randn(2, H * W, 48)
    ref = _explicit_attention(attn, x, H, W)
    with torch.inference_mode():
        out = attn(x, H, W)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # training path (autograd through SDPA): same values and same gradients
    xg = x.clone().requires_grad_(True)
    out_g = attn(xg, H, W)
    out_g.square().sum().backward()
    g1 = (xg.grad.clone(), attn.rel_pos_h.grad.clone())
    xg.grad = None
    attn.zero_grad()
    xr = x.clone().requires_grad_(True)
    _explicit_attention(attn, xr, H, W).square().sum().backward()
    torch.testing.assert_close(out_g.detach(), ref.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g1[0], xr.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(g1[1], attn.rel_pos_h.grad, atol=1e-4, rtol=1e-3)


def test_fewer_channels_equal_zero_padding(tiny_sd):
    net = CPSAMNet.from_state_dict(tiny_sd)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 256, 256)
    with torch.inference_mode():
        y2 = net(x)[0]
        y3 = net(F.pad(x, (0, 0, 0, 0, 0, 1)))[0]
    torch.testing.assert_close(y2, y3, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        net(torch.zeros(1, 3, 128, 128))


def test_module_prefix_and_incomplete_cellpose3(tiny_sd):
    prefixed = {"module." + k: v for k, v in tiny_sd.items()}
    net = build_net(prefixed)
    assert isinstance(net, CPSAMNet)
    cp3 = {"downsample.down.res_down_0.conv.conv_0.0.weight": torch.zeros(2),
           "output.2.weight": torch.zeros(2)}
    with pytest.raises(CellposeWebError, match="Cellpose 1-3 model file is incomplete"):
        build_net(cp3)
    with pytest.raises(CellposeWebError):
        build_net({"foo": torch.zeros(1)})


def test_training_mode_layer_drop_and_gradients(tiny_sd):
    net = CPSAMNet.from_state_dict(tiny_sd)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ye = net(x)[0]
    net.train()
    net.rdrop = 0.0
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], ye, atol=1e-5, rtol=1e-5)
    net.rdrop = 0.4
    torch.manual_seed(0)
    y = net(x)[0]
    y.square().mean().backward()
    assert net.out.weight.grad is not None and net.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert net.encoder.patch_embed.proj.weight.grad is None  # as Cellpose 4.2: patch embed not fine-tuned
    assert net.W2.grad is None


@pytest.mark.parametrize("batch", [5, 11])  # 11: image indices come from two 8-image lookup chunks
def test_layer_drop_computes_only_kept_blocks_and_matches_cellpose_formula(tiny_sd, batch):
    """Cellpose 4 mixes ``x * m + blk(x) * (1 - m)``; running the block only on kept images must give
    the same outputs and gradients, and the dropped images must not reach the block at all."""
    net = CPSAMNet.from_state_dict(tiny_sd)
    net.train()
    net.rdrop = 0.9  # most blocks dropped for some images, so subsets of every size occur
    x = torch.randn(batch, 3, 256, 256)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0])) for blk in net.encoder.blocks]
    torch.manual_seed(3)
    y = net(x)[0]
    for h in hooks:
        h.remove()
    y.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    # the reference: Cellpose 4's formula with the same draw
    net.zero_grad()
    torch.manual_seed(3)
    nlay = len(net.encoder.blocks)
    skip = (torch.rand((batch, nlay)) < torch.linspace(0, net.rdrop, nlay)).float()
    enc = net.encoder
    h = torch.nn.functional.conv2d(x, enc.patch_embed.proj.weight.detach(), enc.patch_embed.proj.bias.detach(),
                                   stride=net.ps)
    H, W = h.shape[-2:]
    h = h.flatten(2).transpose(1, 2) + enc.pos_embed.reshape(1, H * W, -1)
    for i, blk in enumerate(enc.blocks):
        m = skip[:, i].view(batch, 1, 1)
        h = h * m + blk(h, H, W) * (1 - m)
    h = enc.neck(h.transpose(1, 2).reshape(batch, -1, H, W))
    y_ref = torch.nn.functional.pixel_shuffle(net.out(h), net.ps)
    y_ref.square().mean().backward()

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for k, g in grads.items():
        torch.testing.assert_close(g, dict(net.named_parameters())[k].grad, atol=1e-5, rtol=1e-4)
    kept = (1 - skip).sum(0).long().tolist()
    assert seen == [n for n in kept if n > 0]  # each block saw only the images that keep it
    assert sum(seen) < batch * nlay


def test_auto_attention_is_mask_on_cpu_without_timing(tiny_sd):
    net = CPSAMNet.from_state_dict(tiny_sd)
    calls = []
    net.encoder.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.inference_mode():
        net(torch.rand(2, 3, 256, 256))
    assert net.attention_in_use() == "mask" and len(calls) == 1


def test_auto_attention_timed_once_per_case_on_accelerators(tiny_sd, reference_dir, monkeypatch):
    """On a GPU "auto" times mask against fold once per (device, dtype, batch, grad) and keeps the
    faster; here the CPU stands in for the GPU. The outputs are the reference's either way."""
    io = np.load(reference_dir / "tiny_cpsam_io.npz")
    net = CPSAMNet.from_state_dict(tiny_sd)
    monkeypatch.setattr(net, "timed_attention_devices", ("cpu",))
    calls = []
    net.encoder.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    x = torch.from_numpy(io["x"])
    with torch.inference_mode():
        y = net(x)[0]
        assert len(calls) == 1 + 2 * 3  # the pass itself + (warm-up + 2 timed) per candidate
        assert net.attention_in_use() in ("mask", "fold")
        y2 = net(x)[0]
        assert len(calls) == 8  # the same case again: no new timing
        x4 = torch.cat([x] * 4)
        net(x4[:3])
        assert len(calls) == 8 + 7  # another batch size is measured anew
        net(x4)
        assert len(calls) == 16  # ... once per power of two (3 and 4 share one measurement)
    assert np.abs(y.numpy() - io["y"]).max() < 1e-4 and torch.equal(y, y2)


def test_auto_attention_skips_a_kernel_that_fails(tiny_sd, monkeypatch):
    import cellpose_web.engine.nets.vit_sam as vit_sam

    real_sdpa = F.scaled_dot_product_attention

    def no_maskless_kernel(q, k, v, attn_mask=None, **kw):
        if attn_mask is None:
            raise RuntimeError("no kernel for this head size")
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(vit_sam.F, "scaled_dot_product_attention", no_maskless_kernel)
    net = CPSAMNet.from_state_dict(tiny_sd)
    monkeypatch.setattr(net, "timed_attention_devices", ("cpu",))
    with torch.inference_mode():
        net(torch.rand(2, 3, 256, 256))
    assert net.attention_in_use() == "mask"


def test_inference_after_fused_optimizer_steps_uses_the_new_weights(tiny_sd):
    """torch's fused AdamW (train_seg's) updates weights in place without bumping their version, so the
    caches inference derives from them (prepacked linears, rel-pos tables) must not outlive a training
    phase: the same network after a step predicts what a fresh copy of its new weights predicts."""
    net = CPSAMNet.from_state_dict({k: v.clone() for k, v in tiny_sd.items()})  # the step must not change the fixture
    net.eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.inference_mode():
        before = net(x)[0]  # fills the caches
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    net.train()
    net.rdrop = 0.0
    net(x)[0].square().mean().backward()
    opt.step()
    net.eval()
    with torch.inference_mode():
        after = net(x)[0]
        fresh = CPSAMNet.from_state_dict(net.state_dict()).eval()(x)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=1e-5)


def test_fold_and_mask_attention_agree_in_bfloat16(tiny_sd, reference_dir):
    """The two kernels "auto" chooses between on a GPU give the same network outputs in bfloat16 (the GPU's
    inference dtype) within bf16 rounding, and both stay close to the float32 reference."""
    io = np.load(reference_dir / "tiny_cpsam_io.npz")
    net = CPSAMNet.from_state_dict(tiny_sd, dtype=torch.bfloat16)
    x = torch.from_numpy(io["x"]).to(torch.bfloat16)
    outs = {}
    with torch.inference_mode():
        for impl in ("mask", "fold"):
            net.set_attention(impl)
            outs[impl] = net(x)[0].float()
    scale = float(np.abs(io["y"]).max())
    assert (outs["mask"] - outs["fold"]).abs().max().item() < 0.02 * scale
    for y in outs.values():
        assert np.abs(y.numpy() - io["y"]).max() < 0.05 * scale
