"""The Cellpose 1-3 U-Net ("CPnet"): residual down/up blocks with a style vector.

It is the network of Cellpose's ``cyto``, ``cyto2``, ``cyto3`` and ``nuclei`` models and of every
model a lab trained with Cellpose 1-3. The layer names follow the state-dict layout Cellpose 3
saves (``downsample.down.res_down_0.conv.conv_0.0.weight``, ..., ``output.2.bias``, ``diam_mean``,
``diam_labels``), so those files load unchanged.

Shapes: input (B, nchan, H, W) with H and W multiples of 8 (``CellposeModel`` pads them to
multiples of 16); output ((B, nout, H, W) [dY, dX, cellprob logit], style (B, nbase[-1])), the style
being the L2-normalised mean of the deepest features.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cellpose_web.errors import CellposeWebError

__all__ = ["CPnet", "is_cpnet_state_dict"]

BN_EPS, BN_MOMENTUM = 1e-5, 0.05  # Cellpose's BatchNorm settings


def _bn_relu_conv(cin: int, cout: int, size: int) -> nn.Sequential:
    """BatchNorm -> ReLU -> Conv (state-dict indices 0 and 2)."""
    return nn.Sequential(nn.BatchNorm2d(cin, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, size, padding=size // 2))


def _bn_conv(cin: int, cout: int, size: int) -> nn.Sequential:
    """BatchNorm -> Conv (the 1x1 projections; indices 0 and 1)."""
    return nn.Sequential(nn.BatchNorm2d(cin, eps=BN_EPS, momentum=BN_MOMENTUM),
                         nn.Conv2d(cin, cout, size, padding=size // 2))


class _ResDown(nn.Module):
    def __init__(self, cin: int, cout: int, size: int):
        super().__init__()
        self.conv = nn.Sequential()
        for t in range(4):
            self.conv.add_module(f"conv_{t}", _bn_relu_conv(cin if t == 0 else cout, cout, size))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class _StyleConv(nn.Module):
    """Adds a linear map of the style vector to every pixel, then BatchNorm -> ReLU -> Conv."""

    def __init__(self, cin: int, cout: int, style_channels: int, size: int):
        super().__init__()
        self.conv = _bn_relu_conv(cin, cout, size)
        self.full = nn.Linear(style_channels, cout)

    def forward(self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class _ResUp(nn.Module):
    def __init__(self, cin: int, cout: int, style_channels: int, size: int):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _bn_relu_conv(cin, cout, size))
        for t in range(1, 4):
            self.conv.add_module(f"conv_{t}", _StyleConv(cout, cout, style_channels, size))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip=skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class _Down(nn.Module):
    def __init__(self, nbase: list[int], size: int):
        super().__init__()
        self.down = nn.Sequential()
        for n in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{n}", _ResDown(nbase[n], nbase[n + 1], size))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for n, block in enumerate(self.down):
            feats.append(block(F.max_pool2d(feats[-1], 2, stride=2) if n else x))
        return feats


class _Up(nn.Module):
    def __init__(self, nbaseup: list[int], size: int):
        super().__init__()
        self.up = nn.Sequential()
        for n in range(1, len(nbaseup)):
            self.up.add_module(f"res_up_{n - 1}", _ResUp(nbaseup[n], nbaseup[n - 1], nbaseup[-1], size))

    def forward(self, style: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.up[-1](feats[-1], feats[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.up[n](x, feats[n], style)
        return x


class CPnet(nn.Module):
    """Cellpose 1-3 residual U-Net.

    Parameters
    ----------
    nbase : channels per level including the input, e.g. [2, 32, 64, 128, 256].
    nout : output channels (3: dY, dX, cellprob).
    size : convolution kernel size (3).
    diam_mean : object diameter (px) training rescaled to; stored in the weights like Cellpose.

    Attributes used by ``CellposeModel``: ``nchan``, ``nout``, ``diam_mean``, ``diam_labels``
    (parameters of shape (1,), not trained), ``style_dim``, ``default_bsize`` (224),
    ``legacy = True`` (evaluate with Cellpose 3's semantics).
    """

    legacy = True
    fully_convolutional = False
    default_bsize = 224
    multiple = 16
    estimate_diameter = False

    def __init__(self, nbase: list[int] | tuple[int, ...] = (2, 32, 64, 128, 256), nout: int = 3, size: int = 3,
                 diam_mean: float = 30.0):
        super().__init__()
        nbase = [int(n) for n in nbase]
        self.nbase, self.nout, self.nchan, self.sz = nbase, int(nout), nbase[0], int(size)
        self.config = {"nbase": list(nbase), "nout": self.nout, "size": self.sz}
        self.downsample = _Down(nbase, self.sz)
        nbaseup = nbase[1:] + [nbase[-1]]
        self.upsample = _Up(nbaseup, self.sz)
        self.output = _bn_relu_conv(nbaseup[0], self.nout, 1)
        self.diam_mean = nn.Parameter(torch.ones(1) * float(diam_mean), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.ones(1) * float(diam_mean), requires_grad=False)
        self.style_dim = nbase[-1]
        self.style_on = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.downsample(x)
        pooled = feats[-1].mean(dim=(-2, -1))
        style = pooled / torch.sum(pooled ** 2, dim=1, keepdim=True) ** 0.5
        y = self.output(self.upsample(style if self.style_on else style * 0, feats))
        return y, style

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> "CPnet":
        """The network of a Cellpose 1-3 state dict (widths, channels and outputs read from the
        weights; a ``module.`` prefix is stripped). Raises CellposeWebError when it does not fit."""
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items() if isinstance(k, str)}
        try:
            nbase = []
            n = 0
            while f"downsample.down.res_down_{n}.proj.1.weight" in sd:
                w = sd[f"downsample.down.res_down_{n}.proj.1.weight"]
                if n == 0:
                    nbase.append(int(w.shape[1]))
                nbase.append(int(w.shape[0]))
                n += 1
            size = int(sd["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[-1])
            nout = int(sd["output.2.weight"].shape[0])
        except (KeyError, AttributeError, IndexError) as e:
            raise CellposeWebError(
                f"this Cellpose 1-3 model file is incomplete (no {e}); it may be truncated or not a Cellpose "
                "U-Net; re-download it or save it again with Cellpose") from None
        if len(nbase) < 3:
            raise CellposeWebError("this Cellpose 1-3 model file has too few U-Net levels; it is not a Cellpose U-Net")
        diam_mean = float(sd["diam_mean"].reshape(-1)[0]) if "diam_mean" in sd else 30.0
        net = cls(nbase, nout, size, diam_mean=diam_mean)
        net.stored_diameters = ("diam_mean" in sd, "diam_labels" in sd)  # Cellpose 1 files have neither
        if "diam_labels" not in sd:
            sd["diam_labels"] = net.diam_labels.detach().clone()
        if "diam_mean" not in sd:
            sd["diam_mean"] = net.diam_mean.detach().clone()
        try:
            missing, unexpected = net.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise CellposeWebError(
                "this Cellpose 1-3 model has layers of unexpected shapes "
                f"({' '.join(str(e).split())[:200]}); it is damaged or not a Cellpose U-Net") from None
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CellposeWebError(
                f"this Cellpose 1-3 model does not match the U-Net (missing {missing[:3]}, unexpected "
                f"{list(unexpected)[:3]}); it may be truncated, or a variant (transformer backbone) that "
                "cellpose-web does not run")
        return net


def is_cpnet_state_dict(keys: list[str]) -> bool:
    """True when the keys (``module.`` stripped) look like a Cellpose 1-3 U-Net state dict."""
    return any(k.startswith(("downsample.down.res_down_", "upsample.up.res_up_", "output.")) for k in keys)
