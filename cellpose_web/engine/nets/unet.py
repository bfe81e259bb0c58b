"""`lite`: a small residual U-Net that predicts Cellpose flows [dY, dX, cellprob].

It is fully convolutional, so `CellposeModel.eval` may run a whole image at once (padded to a
multiple of 16) instead of 256x256 tiles. Its checkpoint is a plain dict that loads with
``torch.load(weights_only=True)``::

    {"arch": "lite", "config": {...}, "state_dict": {...}, "meta": {...}}
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LITE_ARCH = "lite"


class ResBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU with a residual connection (1x1 projection when widths differ)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x), inplace=True)


class LiteUNet(nn.Module):
    """Residual U-Net: (B, nchan, H, W) -> ((B, 3, H, W) [dY, dX, cellprob logit], style (B, S)).

    H and W must be multiples of ``2 ** len(widths)`` (16 by default); ``CellposeModel.eval`` pads.
    The U-Net works at half resolution (stride-2 stem) and its output is upsampled 2x, which keeps
    a 512x512 image well under half a second on two CPU cores. Flows are smooth, but cell edges
    are not: with ``refine > 0`` a cheap full-resolution branch (one 3x3 conv on the image, mixed
    with the upsampled features) corrects the upsampled output, which sharpens boundaries (the
    IoU 0.75-0.9 matches). With refine=16 it adds about 0.03 s to a 512x512 eval on 2 CPU cores.

    Parameters
    ----------
    nchan : input channels (images are converted to 3 channels, zero-padded, as for Cellpose-SAM).
    widths : channels per level, from the half-resolution stem down.
    diam_mean : object diameter in px the network was trained for (images are rescaled to it).
    refine : channels of the full-resolution refinement branch (0 = none, as in early checkpoints).
    """

    fully_convolutional = True
    max_whole_pixels = 1024 * 1024
    default_bsize = 512
    estimate_diameter = True

    def __init__(self, nchan: int = 3, widths: tuple[int, ...] = (24, 48, 96, 128), diam_mean: float = 30.0,
                 refine: int = 0):
        super().__init__()
        self.config = {"nchan": int(nchan), "widths": [int(w) for w in widths], "diam_mean": float(diam_mean),
                       "refine": int(refine)}
        self.nchan = nchan
        w = list(widths)
        self.stem = nn.Sequential(nn.Conv2d(nchan, w[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList([ResBlock(w[0], w[0])] + [ResBlock(w[i - 1], w[i]) for i in range(1, len(w))])
        self.up = nn.ModuleList([ResBlock(w[i + 1] + w[i], w[i]) for i in range(len(w) - 2, -1, -1)])
        self.head = nn.Sequential(nn.Conv2d(w[0], w[0], 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(w[0], 3, 1))
        if refine:
            self.full = nn.Sequential(nn.Conv2d(nchan, refine, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(refine), nn.ReLU(inplace=True))
            self.refine = nn.Sequential(nn.Conv2d(refine + w[0] + 3, refine, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(refine, 3, 3, padding=1))
            # starts as the identity correction, so half-resolution weights can be fine-tuned into it
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
        self.register_buffer("diam_mean", torch.tensor([float(diam_mean)]))
        self.register_buffer("diam_labels", torch.tensor([float(diam_mean)]))
        self.style_dim = w[-1]

    @property
    def multiple(self) -> int:
        return 2 ** len(self.config["widths"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] < self.nchan:  # fewer channels than trained for: zero-pad, as Cellpose-SAM does
            x = F.pad(x, (0, 0, 0, 0, 0, self.nchan - x.shape[1]))
        elif x.shape[1] > self.nchan:
            x = x[:, : self.nchan]
        H, W = x.shape[-2:]
        h = self.stem(x)
        skips = []
        for i, blk in enumerate(self.down):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = blk(h)
            skips.append(h)
        style = F.normalize(h.mean(dim=(-2, -1)), dim=1)
        for j, blk in enumerate(self.up):
            skip = skips[-2 - j]
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = blk(torch.cat([h, skip], dim=1))
        y = F.interpolate(self.head(h), size=(H, W), mode="bilinear", align_corners=False)
        if self.config["refine"]:
            h_full = F.interpolate(h, size=(H, W), mode="bilinear", align_corners=False)
            y = y + self.refine(torch.cat([self.full(x), h_full, y], dim=1))
        return y, style

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_dict(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """A dict for ``torch.save`` that ``from_checkpoint`` (and weights_only loading) reads back."""
        sd = {k: v.detach().float().cpu().clone() for k, v in self.state_dict().items()}
        return {"arch": LITE_ARCH, "config": dict(self.config), "state_dict": sd, "meta": dict(meta or {})}

    @classmethod
    def from_checkpoint(cls, obj: dict[str, Any], refine: int | None = None) -> "LiteUNet":
        """The network saved in ``obj``; ``refine`` (when given) adds or resizes the refinement
        branch, which then starts fresh (zero correction) while every other layer is loaded."""
        cfg = obj.get("config") or {}
        saved_refine = int(cfg.get("refine", 0))
        refine = saved_refine if refine is None else int(refine)
        net = cls(nchan=cfg.get("nchan", 3), widths=tuple(cfg.get("widths", (24, 48, 96, 128))),
                  diam_mean=cfg.get("diam_mean", 30.0), refine=refine)
        sd = {k[7:] if k.startswith("module.") else k: v for k, v in obj["state_dict"].items()}
        if refine != saved_refine:
            sd = {k: v for k, v in sd.items() if not k.startswith(("full.", "refine."))}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        fresh = ("full.", "refine.") if refine != saved_refine else None
        bad = [k for k in missing if not k.endswith("num_batches_tracked") and not (fresh and k.startswith(fresh))]
        if bad or unexpected:
            from cellpose_web.errors import CellposeWebError
            raise CellposeWebError(
                f"this 'lite' checkpoint does not match the network (missing {bad[:3]}, unexpected "
                f"{list(unexpected)[:3]}); it may come from another version of cellpose-web")
        net.meta = dict(obj.get("meta") or {})
        return net
