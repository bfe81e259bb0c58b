"""Cellpose-SAM ("cpsam") network, written from scratch in torch.

A SAM ViT image encoder (8x8 patches on a 256x256 tile -> a 32x32 token grid, global attention in
every block with SAM's decomposed relative-position bias), the SAM neck, a 1x1 readout to
``nout * ps * ps`` channels and an 8x pixel shuffle back to (B, 3, 256, 256) = [dY, dX, cellprob].

The parameter names, shapes and order are those of a Cellpose 4 checkpoint
(``encoder.blocks.{i}.attn.qkv.weight`` ...), so an official ``cpsam`` / ``cpsam_v2`` file loads
unchanged with :meth:`CPSAMNet.from_state_dict`.

Attention uses :func:`torch.nn.functional.scaled_dot_product_attention`. The relative-position
bias ``q . Rh[qy, ky] + q . Rw[qx, kx]`` (SAM's decomposed form, tables linearly resized to 63 rows)
is given to it as an additive mask (``"mask"``; on a CPU the mask is built and used in cache-sized
chunks). ``"fold"`` computes the same thing by appending the two 32-wide bias vectors to q and
one-hot position codes to k, so no (B, heads, N, N) mask is written and a mask-free fused kernel
(flash attention on CUDA) can run, at twice the attention's multiply-adds. ``"explicit"`` is the
textbook softmax formula, kept for tests. ``"auto"`` (the default) is "mask" on a CPU; on a GPU the
network times one block with "mask" and with "fold" the first time it meets a batch size (by
power of two), dtype and grad mode, and keeps the faster (:meth:`CPSAMNet.attention_in_use` says which).
In CPU inference the linear layers use oneDNN prepacked weights with GELU and the residual adds
fused (``CELLPOSE_WEB_PACKED_LINEAR=0`` turns this off); results equal the plain layers to ~1e-6.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cellpose_web import config

__all__ = ["CPSAMNet", "LayerNorm2d", "get_rel_pos", "rel_pos_bias_terms"]

log = logging.getLogger(__name__)

ATTN_IMPLS = ("auto", "fold", "mask", "explicit")

# oneDNN prepacked linear layers for CPU inference (about 15% faster GEMMs, fused GELU and residual
# add). They keep a packed copy of each weight; set CELLPOSE_WEB_PACKED_LINEAR=0 to turn them off.
_PACKED = {"ok": config.packed_linear()}
_TLS = threading.local()


def _packed_available() -> bool:
    if not _PACKED["ok"]:
        return False
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover
        return False


def _packed_weight(lin: nn.Linear, m_hint: int) -> torch.Tensor:
    w = lin.weight
    key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
    cache = lin.__dict__.get("_packed_cache")
    if cache is None or cache[0] != key:
        cache = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), m_hint))
        lin.__dict__["_packed_cache"] = cache
    return cache[1]


def _plinear(lin: nn.Linear, x: torch.Tensor, act: str = "none") -> torch.Tensor:
    """lin(x) (optionally followed by exact GELU) with a prepacked oneDNN weight; x is (M, in)."""
    pw = _packed_weight(lin, x.shape[0])
    if act == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, pw, lin.bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, pw, lin.bias, "none", [], "")


def _plinear_add(lin: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + lin(x) with a prepacked weight and the add fused; x (M, in), residual (M, out)."""
    pw = _packed_weight(lin, x.shape[0])
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, pw, lin.bias, "add")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor (SAM's neck norm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in channels-last layout with the fused kernel, then back to (B, C, H, W)
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping ps x ps patch projection (a strided Conv2d)."""

    def __init__(self, in_chans: int, embed_dim: int, ps: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=ps, stride=ps)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def get_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table for a ``size``-long axis, shape (size, size, head_dim).

    The learned table (rows, head_dim) is linearly resized (align_corners=False) to 2*size-1 rows
    when needed, as SAM does, and entry [i, j] is row (i - j) + size - 1.
    """
    n = 2 * size - 1
    if rel_pos.shape[0] != n:
        table = F.interpolate(rel_pos.t()[None].float(), size=n, mode="linear")[0].t().to(rel_pos.dtype)
    else:
        table = rel_pos
    idx = torch.arange(size, device=rel_pos.device)
    rel = idx[:, None] - idx[None, :] + (size - 1)
    return table[rel]


def rel_pos_bias_terms(q: torch.Tensor, Rh: torch.Tensor, Rw: torch.Tensor, H: int, W: int):
    """Decomposed bias terms for queries q (B, heads, H*W, hd) (unscaled).

    Returns rel_h (B, heads, H*W, H) with rel_h[.., (y, x), ky] = q . Rh[y, ky] and
    rel_w (B, heads, H*W, W) with rel_w[.., (y, x), kx] = q . Rw[x, kx].
    """
    B, nh, N, hd = q.shape
    rq = q.reshape(B * nh, H, W, hd)
    # (H, BnhW, hd) @ (H, hd, H) batched over y
    rel_h = torch.matmul(rq.permute(1, 0, 2, 3).reshape(H, B * nh * W, hd), Rh.transpose(1, 2))
    rel_h = rel_h.reshape(H, B * nh, W, H).permute(1, 0, 2, 3)
    rel_w = torch.matmul(rq.permute(2, 0, 1, 3).reshape(W, B * nh * H, hd), Rw.transpose(1, 2))
    rel_w = rel_w.reshape(W, B * nh, H, W).permute(1, 2, 0, 3)
    return rel_h.reshape(B, nh, N, H), rel_w.reshape(B, nh, N, W)


class Attention(nn.Module):
    """Multi-head self attention with SAM's decomposed relative-position bias (global)."""

    def __init__(self, dim: int, num_heads: int, rel_rows: int, head_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_rows, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_rows, self.head_dim))
        self.impl = "auto"
        #: what "auto" runs; :meth:`CPSAMNet.forward` sets it from a measurement on accelerators
        self.auto_impl = "mask"
        self._cache: dict = {}

    def _tables(self, H: int, W: int):
        """Interpolated (H,H,hd) / (W,W,hd) tables; cached in inference (no grad)."""
        if torch.is_grad_enabled():
            return get_rel_pos(H, self.rel_pos_h), get_rel_pos(W, self.rel_pos_w)
        key = (H, W, self.rel_pos_h.device, self.rel_pos_h.dtype, self.rel_pos_h._version,
               self.rel_pos_w._version, self.rel_pos_h.data_ptr(), self.rel_pos_w.data_ptr())
        hit = self._cache.get("tables")
        if hit is None or hit[0] != key:
            hit = (key, get_rel_pos(H, self.rel_pos_h).detach(), get_rel_pos(W, self.rel_pos_w).detach())
            self._cache["tables"] = hit
        return hit[1], hit[2]

    def _onehot(self, H: int, W: int, device, dtype):
        key = (H, W, device, dtype)
        hit = self._cache.get("onehot")
        if hit is None or hit[0] != key:
            iy = torch.arange(H, device=device).repeat_interleave(W)
            ix = torch.arange(W, device=device).repeat(H)
            E = torch.cat([F.one_hot(iy, H), F.one_hot(ix, W)], dim=1).to(dtype)  # (N, H+W)
            hit = (key, E)
            self._cache["onehot"] = hit
        return hit[1]

    def _sdpa_mask(self, q, k, v, rel_h, rel_w, H: int, W: int) -> torch.Tensor:
        """SDPA with the rel-pos bias as an additive (B, heads, N, N) mask.

        On a CPU without autograd the mask is built and consumed in chunks of about 8 MB
        (a couple of heads of one image), so it stays in cache instead of round-tripping 64 MB per
        image and head group through memory.
        """
        B, nh, N, hd = q.shape
        if q.device.type != "cpu" or (torch.is_grad_enabled() and q.requires_grad):
            bias = (rel_h.view(B, nh, N, H, 1) + rel_w.view(B, nh, N, 1, W)).view(B, nh, N, N)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            return o.transpose(1, 2).reshape(B, N, nh * hd)
        g = max(1, min(nh, (2 * 1024 * 1024) // (N * N)))
        out = torch.empty((B, N, nh, hd), dtype=q.dtype, device=q.device)
        ov = out.transpose(1, 2)
        # one reused bias buffer per thread: a fresh 8 MB allocation per chunk costs more in page
        # faults than the attention itself
        key = (g, N, H, W, q.dtype)
        buf = getattr(_TLS, "bias", None)
        if buf is None or buf[0] != key:
            with torch.inference_mode(False):  # a normal tensor may be written in and out of inference mode
                buf = (key, torch.empty((1, g, N, H, W), dtype=q.dtype))
            _TLS.bias = buf
        bias = buf[1]
        for b in range(B):
            for h0 in range(0, nh, g):
                h1 = min(nh, h0 + g)
                gg = h1 - h0
                bb = bias[:, :gg]
                torch.add(rel_h[b, h0:h1].view(1, gg, N, H, 1), rel_w[b, h0:h1].view(1, gg, N, 1, W), out=bb)
                ov[b:b + 1, h0:h1] = F.scaled_dot_product_attention(
                    q[b:b + 1, h0:h1], k[b:b + 1, h0:h1], v[b:b + 1, h0:h1],
                    attn_mask=bb.view(1, gg, N, N), scale=self.scale)
        return out.view(B, N, nh * hd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: (B, N=H*W, dim) tokens -> (B, N, dim)."""
        return self.proj(self.attend(self.qkv(x), H, W))

    def attend(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Attention from packed projections qkv (B, N, 3*dim) -> (B, N, dim) (before ``proj``)."""
        B, N, D3 = qkv.shape
        D = D3 // 3
        nh, hd = self.num_heads, self.head_dim
        qkv = qkv.view(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, N, hd)
        Rh, Rw = self._tables(H, W)
        Rh, Rw = Rh.to(q.dtype), Rw.to(q.dtype)
        impl = self.impl
        if impl == "auto":
            impl = self.auto_impl
        rel_h, rel_w = rel_pos_bias_terms(q, Rh, Rw, H, W)
        if impl == "mask":
            return self._sdpa_mask(q, k, v, rel_h, rel_w, H, W)
        if impl == "fold":
            # q.k*scale + rel_h[ky] + rel_w[kx] == [q, rel_h/scale, rel_w/scale] . [k, onehot(ky), onehot(kx)] * scale
            E = self._onehot(H, W, qkv.device, q.dtype).expand(B, nh, N, H + W)
            qf = torch.cat([q, rel_h / self.scale, rel_w / self.scale], dim=-1)
            kf = torch.cat([k, E], dim=-1)
            vf = F.pad(v, (0, H + W))
            o = F.scaled_dot_product_attention(qf, kf, vf, scale=self.scale)[..., :hd]
        elif impl == "explicit":
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = (attn.view(B, nh, N, H, W) + rel_h.view(B, nh, N, H, 1) + rel_w.view(B, nh, N, 1, W))
            o = attn.view(B, nh, N, N).softmax(dim=-1) @ v
        else:
            raise ValueError(f"unknown attention implementation {impl!r}; use one of {ATTN_IMPLS}")
        return o.transpose(1, 2).reshape(B, N, D)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _faster_attention(block: "Block", x: torch.Tensor, H: int, W: int, repeats: int = 2) -> str:
    """"mask" or "fold", whichever runs ``block`` on tokens ``x`` (B, N, dim) faster (best of
    ``repeats`` after one warm-up each). An implementation that fails is not chosen; the block's
    setting is left as it was."""
    attn = block.attn
    before = attn.auto_impl
    timings = {}
    try:
        for impl in ("mask", "fold"):
            attn.auto_impl = impl
            try:
                best = float("inf")
                for i in range(repeats + 1):
                    _synchronize(x.device)
                    t0 = time.perf_counter()
                    block(x, H, W)
                    _synchronize(x.device)
                    if i:
                        best = min(best, time.perf_counter() - t0)
                timings[impl] = best
            except RuntimeError as e:  # e.g. no fused kernel for this shape on this GPU
                log.info("attention %r unavailable here (%s)", impl, e)
    finally:
        attn.auto_impl = before
    choice = min(timings, key=timings.get) if timings else "mask"
    log.info(
        "attention for batch %d, %s on %s: %s (%s)", x.shape[0], x.dtype, x.device, choice,
        ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timings.items()))
    return choice


_SUBSET_BITS = 8
_SUBSET_TABLES: dict = {}


def _kept_indices(run, device: torch.device) -> torch.Tensor:
    """Indices of the True entries of ``run`` ((B,) bool numpy) as an int64 tensor on ``device``.

    Built from a per-device table of every subset of 8 positions (row m holds the set bits of m),
    sliced and offset on the device, so a CUDA run never copies a host array per block.
    """
    table = _SUBSET_TABLES.get(device)
    if table is None:
        # built on the device itself: a copy from the host would be a host sync inside a training step
        m = torch.arange(2 ** _SUBSET_BITS, device=device)
        bits = (m[:, None] >> torch.arange(_SUBSET_BITS, device=device)) & 1  # (256, 8)
        # stable sort puts the set positions first, in increasing order
        table = torch.sort(1 - bits, dim=1, stable=True).indices
        _SUBSET_TABLES[device] = table
    parts = []
    for start in range(0, len(run), _SUBSET_BITS):
        chunk = run[start:start + _SUBSET_BITS]
        count = int(chunk.sum())
        if count:
            code = int(sum(1 << j for j, r in enumerate(chunk) if r))
            row = table[code, :count]
            parts.append(row + start if start else row)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, rel_rows: int, head_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_rows, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)

    #: use oneDNN prepacked linears in CPU inference (see ``_PACKED``)
    packed_linear = True

    def _use_packed(self, x: torch.Tensor) -> bool:
        if not (self.packed_linear and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.attn.qkv.weight.requires_grad):
            return False
        return _packed_available()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self._use_packed(x):
            try:
                return self._forward_packed(x, H, W)
            except RuntimeError as e:  # pragma: no cover - torch build without these kernels
                _PACKED["ok"] = False
                log.info("prepacked linear layers unavailable (%s); using plain ones", e)
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x))

    def _forward_packed(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, D = x.shape
        x2 = x.reshape(B * N, D)
        h = self.norm1(x2)
        qkv = _plinear(self.attn.qkv, h)
        o = self.attn.attend(qkv.view(B, N, -1), H, W)
        x2 = _plinear_add(self.attn.proj, o.reshape(B * N, D), x2)
        h = _plinear(self.mlp.lin1, self.norm2(x2), act="gelu")
        x2 = _plinear_add(self.mlp.lin2, h, x2)
        return x2.view(B, N, D)


class Encoder(nn.Module):
    """SAM ViT image encoder as used by Cellpose-SAM (key names of ``ImageEncoderViT``)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_dim: int, rel_rows: list[int],
                 grid: int, ps: int, out_chans: int, in_chans: int = 3, head_dim: int | None = None):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, ps)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_dim, rel_rows[i], head_dim) for i in range(depth)])
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )


class CPSAMNet(nn.Module):
    """Cellpose-SAM network: (B, C<=3, 256, 256) -> (y (B, nout, 256, 256), style zeros (B, 256)).

    y channels are [dY, dX, cellprob logit]; flows are in network units (about 5 x unit vectors).
    Input channels are normalised intensities (1st percentile -> 0, 99th -> 1); fewer than 3 input
    channels use the first slices of the patch weight (the same as zero-padding to 3 channels).

    Parameters
    ----------
    embed_dim, depth, num_heads, mlp_dim : ViT width, number of blocks, heads, MLP hidden size
        (ViT-L defaults: 1024, 24, 16, 4096).
    global_attn_indexes : blocks that were global in SAM (their rel_pos tables have 2*64-1 = 127
        rows; the others keep 2*14-1 = 27). Every block runs global attention at run time.
    ps, bsize, nout, out_chans : patch size (8), tile size (256), output channels (3), neck width (256).
    rdrop : layer-drop rate used in training mode (linearly 0 .. rdrop over the blocks).
    """

    style_dim = 256
    fully_convolutional = False

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_dim: int | None = None,
                 global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23), ps: int = 8, bsize: int = 256,
                 nout: int = 3, out_chans: int = 256, rdrop: float = 0.4, rel_rows: list[int] | None = None,
                 head_dim: int | None = None, window_size: int = 14, sam_img_size: int = 1024,
                 sam_patch: int = 16):
        super().__init__()
        mlp_dim = mlp_dim or 4 * embed_dim
        head_dim = head_dim or embed_dim // num_heads
        if rel_rows is None:
            glob = 2 * (sam_img_size // sam_patch) - 1
            win = 2 * window_size - 1
            rel_rows = [glob if i in set(global_attn_indexes) else win for i in range(depth)]
        self.config = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                           ps=ps, bsize=bsize, nout=nout, out_chans=out_chans, rel_rows=list(rel_rows),
                           head_dim=head_dim)
        self.ps, self.bsize, self.nout, self.rdrop = ps, bsize, nout, rdrop
        self.global_attn_indexes = tuple(i for i, r in enumerate(rel_rows) if r == max(rel_rows)) \
            if len(set(rel_rows)) > 1 else tuple(global_attn_indexes)
        self.grid = bsize // ps
        # own parameters first: same order as a Cellpose 4.2 checkpoint
        self.diam_labels = nn.Parameter(torch.full((1,), 30.0), requires_grad=False)
        self.diam_mean = nn.Parameter(torch.full((1,), 30.0), requires_grad=False)
        nw = nout * ps * ps
        self.W2 = nn.Parameter(torch.eye(nw).reshape(nw, nout, ps, ps), requires_grad=False)
        self.encoder = Encoder(embed_dim, depth, num_heads, mlp_dim, list(rel_rows), self.grid, ps,
                               out_chans, head_dim=head_dim)
        self.out = nn.Conv2d(out_chans, nw, kernel_size=1)
        #: 4.2 behaviour: the patch projection is read through ``.detach()`` so it is not fine-tuned.
        self.train_patch_embed = False
        self._w2_is_shuffle = True

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.out.weight.dtype

    #: device types on which "auto" attention is chosen by timing "mask" against "fold"
    timed_attention_devices: tuple[str, ...] = ("cuda", "mps")

    def set_attention(self, impl: str) -> None:
        """Choose the attention kernel: "auto" (mask on a CPU, the faster of mask and fold measured on
        a GPU), "fold", "mask" or "explicit"; all give the same outputs up to rounding."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; use one of {ATTN_IMPLS}")
        for blk in self.encoder.blocks:
            blk.attn.impl = impl

    def train(self, mode: bool = True) -> "CPSAMNet":
        """Switch training mode (``nn.Module.train``) and drop what inference derived from the weights.

        The prepacked linear weights and the resized relative-position tables are cached by tensor
        version, but torch's fused optimizers (``AdamW(fused=True)``, which ``train_seg`` uses) update
        parameters in place without bumping it; every training loop switches modes around its
        updates (``net.train()`` ... ``net.eval()``), so the caches are rebuilt from the new weights.
        """
        self.clear_weight_caches()
        return super().train(mode)

    def clear_weight_caches(self) -> None:
        """Forget the prepacked linear weights and relative-position tables (rebuilt on next use)."""
        for module in self.modules():
            module.__dict__.pop("_packed_cache", None)
            if isinstance(module, Attention):
                module._cache.pop("tables", None)

    def attention_in_use(self) -> str:
        """The attention kernel the last forward pass ran ("mask", "fold" or "explicit")."""
        attn = self.encoder.blocks[0].attn if len(self.encoder.blocks) else None
        if attn is None:
            return "none"
        return attn.auto_impl if attn.impl == "auto" else attn.impl

    def _choose_auto_attention(self, x: torch.Tensor, H: int, W: int) -> None:
        """Set what "auto" attention runs for tokens ``x`` (B, N, dim): measured once per case on a GPU."""
        blocks = self.encoder.blocks
        if not len(blocks) or x.device.type not in self.timed_attention_devices:
            choice = "mask"
        else:
            # batch sizes measured by the power of two above them: the last, smaller batch of an image
            # does not start a new measurement
            key = (str(x.device), x.dtype, 1 << (x.shape[0] - 1).bit_length(), torch.is_grad_enabled(),
                   torch.is_autocast_enabled(x.device.type) if x.device.type != "cpu" else False)
            choices = self.__dict__.setdefault("_attention_choices", {})
            choice = choices.get(key)
            if choice is None:
                choice = _faster_attention(blocks[0], x.detach(), H, W)
                choices[key] = choice
        for blk in blocks:
            blk.attn.auto_impl = choice

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, Hin, Win = x.shape
        if C > 3 or C < 1:
            raise ValueError(f"CPSAMNet takes 1 to 3 input channels, got {C}")
        enc = self.encoder
        w = enc.patch_embed.proj.weight
        b = enc.patch_embed.proj.bias
        if not self.train_patch_embed:
            w, b = w.detach(), b.detach()
        x = x.to(w.dtype)
        x = F.conv2d(x, w[:, :C], b, stride=self.ps)  # (B, D, h, w)
        H, W = x.shape[-2:]
        if (H, W) != tuple(enc.pos_embed.shape[1:3]):
            raise ValueError(f"CPSAMNet needs {self.bsize}x{self.bsize} tiles, got {Hin}x{Win}")
        x = x.flatten(2).transpose(1, 2) + enc.pos_embed.reshape(1, H * W, -1)  # (B, N, D)
        blocks = enc.blocks
        if any(blk.attn.impl == "auto" for blk in blocks):
            self._choose_auto_attention(x, H, W)
        if self.training and self.rdrop > 0:
            x = self._blocks_with_layer_drop(x, H, W)
        else:
            for blk in blocks:
                x = blk(x, H, W)
        x = x.transpose(1, 2).reshape(B, -1, H, W)
        x = enc.neck(x)
        x = self.out(x)
        if self._w2_is_shuffle:
            y = F.pixel_shuffle(x, self.ps)
        else:
            y = F.conv_transpose2d(x, self.W2.to(x.dtype), stride=self.ps)
        style = torch.zeros((B, self.style_dim), device=y.device, dtype=y.dtype)
        return y, style

    def _blocks_with_layer_drop(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The blocks in training mode with Cellpose 4's layer drop, computing only what is kept.

        Cellpose 4 draws, per image and block, whether the block is skipped (probability rising
        linearly from 0 to ``rdrop`` over the blocks) and computes ``x * m + blk(x) * (1 - m)``: every
        block runs on every image and the dropped results are multiplied by zero. Here a block runs
        only on the images that keep it (``index_select`` / ``index_copy``), which gives the same
        outputs and gradients for ~``rdrop / 2`` less block work (20 % at Cellpose's 0.4). The draw is
        made on the CPU (torch's default generator, so ``torch.manual_seed`` repeats it) and the
        image indices are looked up in a small table already on the device: no host sync per block.
        """
        B = x.shape[0]
        nlay = len(self.encoder.blocks)
        skip = (torch.rand((B, nlay)) < torch.linspace(0, self.rdrop, nlay)).numpy()  # (B, nlay) bool
        for i, blk in enumerate(self.encoder.blocks):
            run = ~skip[:, i]
            n_run = int(run.sum())
            if n_run == B:
                x = blk(x, H, W)
            elif n_run > 0:
                idx = _kept_indices(run, x.device)
                x = x.index_copy(0, idx, blk(x.index_select(0, idx), H, W).to(x.dtype))
        return x

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        res = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._check_w2()
        self.clear_weight_caches()
        return res

    def _check_w2(self) -> None:
        W2 = self.W2
        if W2.is_meta:
            self._w2_is_shuffle = True
            return
        nw = W2.shape[0]
        eye = torch.eye(nw, device=W2.device, dtype=W2.dtype).reshape(W2.shape)
        self._w2_is_shuffle = bool(torch.equal(W2.detach(), eye))

    @staticmethod
    def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
        """Read width, depth, heads, MLP size, patch size, tile size and rel_pos rows from a state dict."""
        pe = sd["encoder.pos_embed"]
        embed_dim = int(pe.shape[-1])
        grid = int(pe.shape[1])
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
        head_dim = int(sd["encoder.blocks.0.attn.rel_pos_h"].shape[1])
        if head_dim <= 0 or embed_dim % head_dim:
            raise ValueError(f"cannot infer the head count: width {embed_dim}, rel_pos head dim {head_dim}")
        num_heads = embed_dim // head_dim
        mlp_dim = int(sd["encoder.blocks.0.mlp.lin1.weight"].shape[0])
        ps = int(sd["encoder.patch_embed.proj.weight"].shape[-1])
        out_chans = int(sd["encoder.neck.0.weight"].shape[0])
        nout = int(sd["out.weight"].shape[0]) // (ps * ps)
        rel_rows = [int(sd[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
        return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, ps=ps,
                    bsize=grid * ps, nout=nout, out_chans=out_chans, rel_rows=rel_rows, head_dim=head_dim)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "CPSAMNet":
        """Build a network whose shape matches ``sd`` and load the weights (``module.`` prefix stripped).

        The parameters take ``sd``'s tensors without a copy (where dtype and device already match), so
        training the network changes them: pass a copy of a state dict that must stay as it is.
        """
        if any(k.startswith("module.") for k in sd):
            sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
        cfg = cls.config_from_state_dict(sd)
        with torch.device("meta"):
            net = cls(**cfg)
        sd = dict(sd)
        for k in ("diam_labels", "diam_mean"):  # older files may lack them
            if k not in sd:
                sd[k] = torch.full((1,), 30.0)
        if "W2" not in sd:
            nw = cfg["nout"] * cfg["ps"] ** 2
            sd["W2"] = torch.eye(nw).reshape(nw, cfg["nout"], cfg["ps"], cfg["ps"])
        own = net.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} Cellpose-SAM weights, e.g. {missing[:3]}")
        wrong = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if wrong:
            raise ValueError(f"checkpoint weights have unexpected shapes, e.g. {wrong[:3]}")
        clean = {k: sd[k] for k in own}
        if dtype is not None:
            clean = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clean.items()}
        if device is not None:
            clean = {k: v.to(device) for k, v in clean.items()}
        net.load_state_dict(clean, strict=True, assign=True)
        for n in ("diam_labels", "diam_mean", "W2"):
            getattr(net, n).requires_grad_(False)
        net.ignored_keys = unexpected
        net.eval()
        return net
