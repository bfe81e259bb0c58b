"""Fine-tuning and training: Cellpose 4's `train_seg` recipe for any cellpose-web network.

Recipe (as Cellpose 4): AdamW, learning-rate warm-up over 10 epochs then constant, then halving
steps at the end; random rotation / scale / flip / translation into 256x256 crops; loss =
MSE(y[:, :2], 5 * unit flows) / 2 + BCE-with-logits(y[:, 2], foreground).

What differs from Cellpose 3/4's loop, for speed (the recipe, augmentation and loss are theirs):

- The flows of the training labels are computed once and cached between calls (``clear_flow_cache``);
  crops are cut from the normalised images with one ``grid_sample`` per crop (about 30 ms per batch
  of 8 224 px crops on one core, under 2 % of a step, so it stays in the loop rather than a thread).
- Convolutional networks (``lite``, Cellpose 1-3 U-Nets) train channels-last (NHWC), which oneDNN's
  CPU kernels run about 15 % faster than NCHW; the arithmetic is the same up to summation order, and
  the network is handed back in the usual layout. AdamW runs as torch's fused kernel (same update).
- The held-out loss is computed under ``torch.inference_mode``, always in float32.
- The epoch's training loss is summed on the device and read once per epoch: no host sync per step.
- ``mixed_precision``: the forward pass can run in bfloat16 autocast (weights, gradients, optimizer and
  loss stay float32); see :func:`training_uses_bf16` for when that is the default.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellpose_web import config
from cellpose_web.engine import dynamics, transforms
from cellpose_web.models import legacy
from cellpose_web import registry
from cellpose_web.io import atomic_write
from cellpose_web.errors import CellposeWebError, TrainingDivergedError

log = logging.getLogger("cellpose_web.train")  # the name run logs and tests know

EpochCallback = Callable[[int, float, "float | None", float], "bool | None"]


@dataclass(frozen=True)
class FinetuneRecipe:
    """Fine-tuning settings for one network family (what the Fine-tune tab and ``--train`` start from).

    learning_rate, weight_decay : AdamW settings.
    n_epochs : passes over the training images (at least ``min_steps_per_epoch`` crops each pass).
    batch_size : crops per optimiser step.
    bsize : crop side in px (Cellpose-SAM needs 256).
    min_steps_per_epoch : ``nimg_per_epoch`` is raised to this when the set is smaller, so that a
        handful of corrected images still gets enough optimiser steps per epoch (None = one pass).
    source : where the numbers come from.
    """
    learning_rate: float
    weight_decay: float
    n_epochs: int
    batch_size: int = 1
    bsize: int = 256
    min_steps_per_epoch: int | None = None
    source: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def nimg_per_epoch(self, n_images: int) -> int | None:
        """``train_seg``'s nimg_per_epoch for a set of ``n_images`` (None = every image once)."""
        if self.min_steps_per_epoch is None:
            return None
        return max(int(n_images), self.min_steps_per_epoch * self.batch_size)


#: Fine-tuning defaults per network family (``registry`` arch name). Cellpose-SAM's recipe is
#: Cellpose 4's (train_seg / CLI defaults); the Cellpose 1-3 U-Net's is Cellpose 3's train_seg
#: recipe with AdamW (lr 0.005, weight decay 1e-5, batch 8, 224 px crops) for the 100 epochs its
#: GUI uses for human-in-the-loop; ``lite`` was measured with ``benchmarks/bench_finetune.py``
#: (Cellpose-SAM's 1e-5 barely moves it: 10 epochs gave held-out AP 0.008 -> 0.027).
FINETUNE_DEFAULTS: dict[str, FinetuneRecipe] = {
    "lite": FinetuneRecipe(learning_rate=2e-3, weight_decay=1e-4, n_epochs=20, batch_size=1, bsize=128,
                           min_steps_per_epoch=8,
                           source="measured for cellpose-web's lite (benchmarks/bench_finetune.py)"),
    "cpsam": FinetuneRecipe(learning_rate=1e-5, weight_decay=0.1, n_epochs=100, batch_size=1, bsize=256,
                            source="Cellpose 4 (train_seg and CLI defaults)"),
    "cellpose3": FinetuneRecipe(learning_rate=5e-3, weight_decay=1e-5, n_epochs=100, batch_size=8, bsize=224,
                                source="Cellpose 3 (train_seg defaults with AdamW; 100 epochs as its GUI)"),
}


def finetune_defaults(arch: str | None) -> FinetuneRecipe:
    """The fine-tuning recipe for a network family: "lite", "cpsam" or "cellpose3" (Cellpose 1-3
    U-Nets). Unknown or None gives Cellpose-SAM's recipe, Cellpose 4's own default."""
    return FINETUNE_DEFAULTS.get(str(arch or "").lower(), FINETUNE_DEFAULTS["cpsam"])


def net_arch(net: nn.Module) -> str:
    """"lite", "cpsam" or "cellpose3" for a network object (by its class), "unknown" otherwise."""
    name = type(net).__name__
    return {"LiteUNet": "lite", "CPSAMNet": "cpsam", "CPnet": "cellpose3"}.get(name, "unknown")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX-BF16), so bf16 convolutions
    run about 2-3x faster than float32 ones; on other CPUs oneDNN emulates bf16 and it is slower."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a torch build without the probe's backend
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


#: Convolutional network families that train faster channels-last (oneDNN's NHWC kernels) and whose
#: bfloat16 training was measured (``benchmarks/bench_train_precision.py``).
_CONV_NETS = ("cellpose3", "lite")

#: ``CELLPOSE_WEB_TRAIN_BF16``: "0" makes ``train_seg(mixed_precision=None)`` train in float32 on every
#: machine, "1" in bfloat16 wherever autocast supports it; unset: automatic (see ``training_uses_bf16``).
TRAIN_BF16_ENV = config.TRAIN_BF16_ENV


def training_uses_bf16(net: nn.Module, device: torch.device | str,
                       mixed_precision: bool | None = None) -> bool:
    """Whether ``train_seg`` runs the forward pass in bfloat16 autocast for this network and device.

    ``mixed_precision`` True / False decides; None (the default) means: bfloat16 for Cellpose-SAM
    on a CUDA GPU with native bfloat16 (:func:`cuda_has_bf16`) and for the convolutional families
    (``lite`` and Cellpose 1-3 U-Nets) on a CPU with native bfloat16 (:func:`cpu_has_native_bf16`);
    float32 otherwise (TF32 matrix products on CUDA, see :func:`cuda_tf32`). The environment
    variable ``CELLPOSE_WEB_TRAIN_BF16`` ("0" / "1") overrides the automatic choice.

    Cellpose-SAM on CUDA: Cellpose 4 fine-tunes it in float32 with TF32 matrix products; bf16
    autocast runs the ViT's matrix products at twice TF32's tensor-core rate and halves the
    activations. Accuracy was checked on the CPU (the pretrained ViT-L cannot be fetched offline):
    ``bench_train_precision.py --model vit-tiny --epochs 80`` (the Cellpose-SAM architecture at width
    32, 2 blocks, AP@0.5 0.467 before, fine-tuned on nuclei_2d/train for 80 epochs x 32 crops at lr
    3e-3, scored on nuclei_2d/val), seeds 0 and 1: float32 AP@0.5 0.562 / 0.499, AP@0.75 0.086 /
    0.227, held-out loss 0.351 / 0.284; bfloat16 AP@0.5 0.590 / 0.579, AP@0.75 0.200 / 0.227,
    held-out loss 0.290 / 0.288.

    This differs from Cellpose 3, which trains in float32 on a CPU (on NVIDIA GPUs its convolutions
    already run in TF32, torch's default there). Why it is the default here: a step costs about 0.4x
    the float32 one on an AVX512-BF16 CPU, and held-out AP@0.5 after fine-tuning was the same.
    ``benchmarks/bench_train_precision.py`` (Cellpose 3's ``cyto`` U-Net fine-tuned on nuclei_2d/train,
    20 epochs x 32 crops, scored on nuclei_2d/val; before: AP@0.5 0.789, AP@0.75 0.662), seeds 0 and 1:
    float32 AP@0.5 0.895 / 0.900, AP@0.75 0.841 / 0.839, matched IoU 0.927 / 0.930; bfloat16
    AP@0.5 0.899 / 0.895, AP@0.75 0.829 / 0.833, IoU 0.930 / 0.911. AP@0.75 came out ~0.01 lower in
    both seeds: too few runs to call, so where boundaries must be exact, train with
    ``mixed_precision=False``. ``lite`` (``--model lite``, its own recipe, 20 epochs; it already knows
    nuclei, so this recipe lowers its AP from 0.887, and seeds differ by up to 0.05): AP@0.5
    0.841 / 0.798 in float32, 0.844 / 0.852 in bfloat16.
    """
    if mixed_precision is not None:
        return bool(mixed_precision)
    env = config.train_bf16()
    if env in ("0", "1"):
        return env == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return net_arch(net) == "cpsam" and cuda_has_bf16(device)
    return device.type == "cpu" and net_arch(net) in _CONV_NETS and cpu_has_native_bf16()


def cuda_has_bf16(device: torch.device | str) -> bool:
    """Whether the CUDA device computes in bfloat16 natively (compute capability 8.0 or newer)."""
    try:
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    except (RuntimeError, AssertionError):  # no driver / device index out of range
        return False


@contextlib.contextmanager
def cuda_tf32(device: torch.device | str):
    """Let float32 matrix products and convolutions on CUDA use TF32 tensor cores while training.

    Cellpose 4 turns TF32 matmuls on for the whole process when it is imported; its fine-tuning
    numbers are TF32 numbers. Here the switch holds only for the ``with`` block and the previous
    settings come back afterwards (also on an error). A no-op on other devices.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _adamw(net: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over ``net``'s parameters, as one fused kernel where torch has it (same update rule)."""
    params = [p for p in net.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


WARM_UP_EPOCHS = 10
"""Epochs over which :func:`learning_rate_schedule` rises linearly from 0 (as Cellpose's)."""


def learning_rate_schedule(learning_rate: float, n_epochs: int) -> np.ndarray:
    """Per-epoch learning rates: linear warm-up (epoch 0 has LR 0), constant, then halving blocks."""
    warm = np.linspace(0, learning_rate, WARM_UP_EPOCHS)
    LR = np.concatenate([warm, learning_rate * np.ones(max(0, n_epochs - WARM_UP_EPOCHS))])
    if n_epochs > 300:
        LR = LR[:-100]
        for _ in range(10):
            LR = np.append(LR, LR[-1] / 2 * np.ones(10))
    elif n_epochs > 99:
        LR = LR[:-50]
        for _ in range(10):
            LR = np.append(LR, LR[-1] / 2 * np.ones(5))
    return LR[:n_epochs]


def _to_chw(img: np.ndarray, channel_axis: int | None, nchan: int = 3,
            channels: tuple[int, int] | None = None, legacy_net: bool = False) -> np.ndarray:
    """An image as float32 (nchan, Y, X): channel axis moved first, <= nchan channels, zero-padded.

    ``legacy_net``: a Cellpose 1-3 U-Net's two inputs, chosen by ``channels`` ([cytoplasm, nucleus],
    1-based, 0 = grey / none) as Cellpose 3 does (:func:`legacy.select_channels`).
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[None]
    elif img.ndim == 3:
        ax = int(np.argmin(img.shape)) if channel_axis is None else channel_axis % 3
        img = np.moveaxis(img, ax, 0)
    else:
        raise CellposeWebError(
            f"training images must be 2D (Y, X) or 2D with channels; got shape {img.shape}. "
            "Split z-stacks into planes first.")
    if legacy_net:
        return np.ascontiguousarray(legacy.select_channels(np.moveaxis(img, 0, -1), channels, nchan).transpose(2, 0, 1))
    img = img[:nchan].astype(np.float32)
    if img.shape[0] < nchan:
        img = np.concatenate([img, np.zeros((nchan - img.shape[0],) + img.shape[1:], np.float32)])
    return img


def _normalize_chw(img: np.ndarray) -> np.ndarray:
    """Per-channel 1st/99th percentile normalisation (constant channels become 0)."""
    return np.stack([transforms.normalize99(c) for c in img]).astype(np.float32)


# Flows of training labels, kept between train_seg calls (the Fine-tune tab and scripts often train
# again on the same set): key = sha1 of the label bytes and shape; bounded by total bytes.
_FLOW_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_FLOW_CACHE_MAX_BYTES = 512 * 2**20


def clear_flow_cache() -> None:
    """Forget the label flows kept between ``train_seg`` calls (the next call computes them again)."""
    _FLOW_CACHE.clear()


def _label_flows(lbl: np.ndarray, device: torch.device | None) -> np.ndarray:
    """``dynamics.labels_to_flows`` of one int64 label image, (4, Y, X) float32, cached."""
    key = (hashlib.sha1(np.ascontiguousarray(lbl).view(np.uint8)).hexdigest(), lbl.shape)
    hit = _FLOW_CACHE.get(key)
    if hit is not None:
        _FLOW_CACHE.move_to_end(key)
        return hit
    if device is not None and torch.device(device).type == "mps":
        device = torch.device("cpu")  # the flows' heat diffusion is float64, which MPS lacks
    fl = dynamics.labels_to_flows([lbl], device=device)[0]
    _FLOW_CACHE[key] = fl
    while sum(v.nbytes for v in _FLOW_CACHE.values()) > _FLOW_CACHE_MAX_BYTES and len(_FLOW_CACHE) > 1:
        _FLOW_CACHE.popitem(last=False)
    return fl


def prepare_training_data(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                          channel_axis: int | None = None, normalize: bool = True,
                          min_train_masks: int = 5, device: torch.device | None = None,
                          names: Sequence[str] | None = None, nchan: int = 3,
                          channels: tuple[int, int] | None = None, legacy_net: bool = False):
    """Images -> normalised (nchan, Y, X); labels -> (3, Y, X) [foreground, dY, dX]; per-image diameter.

    ``legacy_net``: inputs of a Cellpose 1-3 U-Net (2 channels picked by ``channels``, Cellpose 3).

    Returns (imgs, flows, diams, kept_indices). Images with fewer than ``min_train_masks`` objects
    are dropped (with a log message), as in Cellpose.
    """
    if len(images) != len(labels):
        raise CellposeWebError(f"{len(images)} training images but {len(labels)} label images; "
                               "every image needs exactly one mask file")
    imgs, flows, diams, kept = [], [], [], []
    for i, (img, lbl) in enumerate(zip(images, labels)):
        name = names[i] if names is not None else f"image {i}"
        x = _to_chw(img, channel_axis, nchan, channels, legacy_net)
        lbl = np.asarray(lbl)
        precomputed = None
        if lbl.ndim == 3 and lbl.shape[0] == 4 and lbl.shape[1:] == x.shape[1:]:
            precomputed = lbl.astype(np.float32)  # [labels, foreground, dY, dX] from labels_to_flows
            lbl = lbl[0]
        if lbl.shape != x.shape[1:]:
            raise CellposeWebError(f"{name}: mask shape {lbl.shape} does not match image shape {x.shape[1:]}")
        lbl = lbl.astype(np.int64)
        n_masks = len(np.unique(lbl[lbl > 0]))
        if n_masks < min_train_masks:
            log.warning("%s has %d masks (< min_train_masks=%d): not used for training", name, n_masks, min_train_masks)
            continue
        if normalize:
            x = _normalize_chw(x)
        fl = precomputed if precomputed is not None else _label_flows(lbl, device)
        imgs.append(x)
        flows.append(np.ascontiguousarray(fl[1:]).astype(np.float32))
        diams.append(max(5.0, float(dynamics.diameters(lbl)[0])))
        kept.append(i)
    return imgs, flows, np.array(diams, np.float32), kept


def intensity_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast, uneven illumination, blur, noise, channel drop and inversion
    (``train_seg(..., augment_intensity=True)``, used for ``lite``).

    Parameters
    ----------
    x : (B, C, Y, X) float tensor of normalised images, on any device.
    gen : a CPU ``torch.Generator``; every draw comes from it, so a seed gives the same result on
        every device, and the draws reach the device as queued copies (no host sync on CUDA).

    Returns
    -------
    (B, C, Y, X) float tensor on ``x``'s device.
    """
    B, C = x.shape[:2]
    dev = x.device

    def u(*shape, lo=0.0, hi=1.0):
        """Uniform draws from the host generator (the same numbers on every device), kept on the host."""
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, device="cpu")

    # every draw on the host first, in one fixed order (a seed gives the same augmentation on every
    # device); the small ones reach the device in one queued copy, the noise in another
    small = {
        "gain": u(B, C, 1, 1, lo=0.6, hi=1.5), "offset": u(B, C, 1, 1, lo=-0.15, hi=0.15),
        "log_gamma": u(B, 1, 1, 1, lo=-0.5, hi=0.5),
        "angle": u(B, lo=0.0, hi=2 * math.pi)[:, None, None],
        "cy": u(B, lo=-1, hi=1)[:, None, None], "cx": u(B, lo=-1, hi=1)[:, None, None],
        "width": u(B, lo=0.3, hi=1.0)[:, None, None],
    }
    small["shade_amp"] = u(B, lo=0.0, hi=0.35) * (u(B) < 0.25)  # uneven illumination for a quarter
    sigma = u(B, lo=0.0, hi=2.0) * (u(B) < 0.35)  # blur for a third; decided on the host: no read-back
    blur = bool((sigma > 0.3).any())
    small["sigma"] = sigma
    noise = torch.randn(x.shape, generator=gen, device="cpu")
    small["noise_amp"] = u(B, 1, 1, 1, lo=0, hi=0.12) * (u(B, 1, 1, 1) < 0.5)
    small["invert"] = (u(B, 1, 1, 1) < 0.12).float()
    if C > 1:
        small["drop"] = (u(B, 1, 1, 1) < 0.2).float()
    packed = transforms.host_to_device(torch.cat([t.reshape(-1) for t in small.values()]), dev)
    d = dict(zip(small, (part.reshape(t.shape) for part, t in
                         zip(packed.split([t.numel() for t in small.values()]), small.values()))))

    # contrast / brightness jitter per image and channel
    x = x * d["gain"] + d["offset"]
    # gamma on the positive part
    x = torch.sign(x) * x.abs().clamp_min(1e-6) ** torch.exp(d["log_gamma"])
    # uneven illumination for a quarter of the batch: a tilted plane plus one broad bump, added to
    # the non-empty channels (amplitude up to 0.35 of the normalised range)
    H, W = x.shape[-2:]
    yy = torch.linspace(-1, 1, H, device=dev)[None, :, None]
    xx = torch.linspace(-1, 1, W, device=dev)[None, None, :]
    ang, cy, cx, width = d["angle"], d["cy"], d["cx"], d["width"]
    shade = 0.5 * (torch.cos(ang) * xx + torch.sin(ang) * yy) + \
        torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    filled = (x.abs().amax(dim=(-2, -1), keepdim=True) > 0).float()
    x = x + (d["shade_amp"][:, None, None] * shade)[:, None] * filled
    # gaussian blur for a random third of the batch
    if blur:
        sig = d["sigma"]
        r = 5
        t = torch.arange(-r, r + 1, device=dev, dtype=x.dtype)
        k = torch.exp(-t[None] ** 2 / (2 * sig[:, None].clamp_min(1e-3) ** 2))
        k = k / k.sum(1, keepdim=True)  # (B, 2r+1)
        xb = x.reshape(1, B * C, *x.shape[-2:])
        kk = k.repeat_interleave(C, 0)
        xb = F.conv2d(F.pad(xb, (r, r, 0, 0), mode="reflect"), kk[:, None, None, :], groups=B * C)
        xb = F.conv2d(F.pad(xb, (0, 0, r, r), mode="reflect"), kk[:, None, :, None], groups=B * C)
        x = torch.where((sig > 0.3)[:, None, None, None], xb.reshape(x.shape), x)
    # additive noise (drawn on the host so a seed gives the same noise on every device)
    x = x + transforms.host_to_device(noise, dev) * d["noise_amp"]
    # inversion (dark cells on a bright background), only on non-empty channels
    inv = d["invert"]
    nonzero = (x.abs().amax(dim=(-2, -1), keepdim=True) > 0).float()
    x = x * (1 - inv) + (1 - x) * inv * nonzero
    # drop the second channel sometimes so two-channel images also work as one channel
    if C > 1:
        x = torch.cat([x[:, :1], x[:, 1:] * (1 - d["drop"])], dim=1)
    return x


def flow_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cellpose loss: MSE(y[:, :2], 5 * flows) / 2 + BCE(y[:, 2], foreground). target (B, 3, H, W)."""
    veci = 5.0 * target[:, 1:3]
    loss = F.mse_loss(y[:, :2], veci) / 2
    loss2 = F.binary_cross_entropy_with_logits(y[:, 2], (target[:, 0] > 0.5).float())
    return loss + loss2


def save_network(net: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save a network atomically in the format its loader expects (lite dict or Cellpose 4 state dict)."""
    path = Path(path)
    if hasattr(net, "checkpoint_dict"):
        obj = net.checkpoint_dict(meta)
        if isinstance(obj.get("state_dict"), dict):  # a net trained channels-last saves plain layouts
            obj["state_dict"] = {k: v.contiguous() for k, v in obj["state_dict"].items()}
    else:
        obj = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in net.state_dict().items()}
    atomic_write(path, lambda fh: torch.save(obj, fh))
    return path


# Keywords of Cellpose 4's train_seg that do nothing here, and Cellpose 3's that Cellpose 4 dropped:
# accepted with a notice so Cellpose scripts run unchanged; any other unknown keyword is a TypeError.
_CELLPOSE3_KEYWORDS = ("channels", "momentum", "rgb")


def _ignored_keyword_notices(SGD, compute_flows, class_weights, test_probs, cellpose3: dict,
                             legacy_net: bool = False) -> None:
    if SGD:
        log.warning("train_seg: SGD is deprecated in Cellpose 4; AdamW is used")
    if compute_flows:
        log.info("train_seg: compute_flows is not needed: the flows of the labels are always computed")
    if class_weights is not None:
        log.warning("train_seg: class_weights is for Cellpose's multi-class networks; cellpose-web trains flows "
                    "and cell probability only, so it is ignored")
    if test_probs is not None:
        log.warning("train_seg: test_probs is ignored (every test image is used)")
    for key, value in cellpose3.items():
        if key == "channels":
            if value is not None and not legacy_net:
                log.warning("train_seg: channels is not used by Cellpose 4 (channel-agnostic: the first 3 channels "
                            "are used); use channel_axis to say where the channels are")
        else:
            log.warning("train_seg: %s is a Cellpose 3 argument not used by Cellpose 4; ignored", key)


def _check_keywords(cellpose3: dict) -> None:
    """TypeError naming an unknown keyword (as Python and Cellpose do), with the nearest known name."""
    import difflib
    import inspect

    for key in cellpose3:
        if key not in _CELLPOSE3_KEYWORDS:
            known = [*inspect.signature(train_seg).parameters, *_CELLPOSE3_KEYWORDS]
            near = difflib.get_close_matches(key, known, n=1)
            raise TypeError(f"train_seg() got an unexpected keyword argument {key!r}"
                            + (f"; did you mean {near[0]!r}?" if near else ""))


def _read_files(files: Sequence[str | os.PathLike] | None, what: str) -> list[np.ndarray] | None:
    if files is None:
        return None
    from cellpose_web import io

    log.info(">>> loading %d %s", len(files), what)
    return [io.imread(f) for f in files]


def train_seg(net: nn.Module, train_data: Sequence[np.ndarray] | None = None,
              train_labels: Sequence[np.ndarray] | None = None,
              train_files: Sequence[str | os.PathLike] | None = None,
              train_labels_files: Sequence[str | os.PathLike] | None = None,
              train_probs: Sequence[float] | None = None,
              test_data: Sequence[np.ndarray] | None = None, test_labels: Sequence[np.ndarray] | None = None,
              test_files: Sequence[str | os.PathLike] | None = None,
              test_labels_files: Sequence[str | os.PathLike] | None = None,
              test_probs: Sequence[float] | None = None, channel_axis: int | None = None,
              load_files: bool = True, batch_size: int = 1, learning_rate: float = 1e-5, SGD: bool = False,
              n_epochs: int = 100, weight_decay: float = 0.1, normalize: bool = True, compute_flows: bool = False,
              save_path: str | os.PathLike | None = None, save_every: int = 100, save_each: bool = False,
              nimg_per_epoch: int | None = None, nimg_test_per_epoch: int | None = None, rescale: bool = False,
              scale_range: float | None = 0.5, bsize: int = 256, min_train_masks: int = 5,
              model_name: str | None = None, class_weights: Any = None, *, seed: int = 0,
              callback: EpochCallback | None = None, augment_intensity: bool = False,
              scale_sampler: Callable[[np.random.Generator, int], np.ndarray] | None = None,
              mixed_precision: bool | None = None, lr_schedule: Sequence[float] | None = None,
              **cellpose3: Any) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train or fine-tune ``net`` (``model.net``) on images and instance labels, Cellpose-style.

    The arguments are Cellpose 4's ``train_seg`` (same names and order); progress is logged per
    epoch on the ``cellpose_web.train`` logger (``io.logger_setup()`` shows it). Arguments that
    do nothing here (``SGD``, ``compute_flows``, ``class_weights``, ``test_probs``; Cellpose 3's
    ``channels``, ``momentum``, ``rgb``) are accepted with a notice; any other unknown keyword
    raises TypeError naming it.

    Parameters
    ----------
    net : the network of a ``CellposeModel`` (Cellpose-SAM, lite or a Cellpose 1-3 U-Net); trained in fp32
        in place. A Cellpose 1-3 U-Net gets its two inputs as Cellpose 3 makes them: ``channels=[cytoplasm,
        nucleus]`` (1-based, 0 = grey / none; default: the first two channels); its Cellpose 3 recipe is
        ``bsize=224, rescale=True`` (objects scaled to its diam_mean), saved in Cellpose 3's layout.
    train_data, train_labels : lists of images ((Y, X), (Y, X, C) or (C, Y, X)) and (Y, X) labels
        (or (4, Y, X) precomputed ``dynamics.labels_to_flows`` outputs, as Cellpose accepts).
    train_files, train_labels_files : image and label files instead of arrays (read once).
    train_probs : how often each training image is drawn (normalised to sum to 1).
    test_data, test_labels (or test_files, test_labels_files) : optional held-out images for the test loss.
    learning_rate, weight_decay, n_epochs, batch_size : AdamW recipe (Cellpose defaults).
    save_path, model_name : the model is saved to ``save_path/models/model_name`` (save_path defaults
        to the current folder; model_name to ``cellpose_<time>``), and ``model_name`` becomes a name
        ``CellposeModel(pretrained_model=model_name)`` loads (see ``registry.remember_trained_model``).
    rescale : scale each image so its median object diameter becomes the net's diameter (30 px).
    scale_range : random scale spread (0.5 -> [0.75, 1.25]); None -> 2 ** U(-2, 2).
    seed : makes a run repeatable (same seed, same data -> same losses on CPU).
    callback : called after each epoch as ``callback(epoch, train_loss, test_loss or None,
        elapsed_s)``; return False to stop early (the model so far is saved).
    augment_intensity : add intensity, blur, noise and inversion augmentation (used for `lite`).
    mixed_precision : True runs the forward pass in bfloat16 (``torch.autocast``; weights, gradients,
        the loss and the optimizer stay float32): about 2.5x faster per step on CPUs with native bf16
        (AVX512-BF16/AMX), slower on CPUs without it. False: float32 throughout, as Cellpose 3 on a
        CPU. None: :func:`training_uses_bf16` decides (per network family and machine).
    lr_schedule : per-epoch learning rates (at least ``n_epochs``) instead of :func:`learning_rate_schedule`
        (e.g. the short rounds of ``workflows.hitl``).

    Returns
    -------
    (model_path, train_losses (n_epochs,), test_losses (n_epochs,))

    Raises
    ------
    TrainingDivergedError
        when an epoch's training loss is NaN or infinite (nothing is saved; ``net``'s weights are
        ruined: reload them before using it again).
    """
    _check_keywords(cellpose3)
    legacy_net = bool(getattr(net, "legacy", False))
    _ignored_keyword_notices(SGD, compute_flows, class_weights, test_probs, cellpose3, legacy_net)
    nchan = int(getattr(net, "nchan", 3))
    channels = legacy.parse_channels(cellpose3.get("channels")) if legacy_net else None
    if train_data is None and train_files is not None:
        if train_labels_files is None:
            raise CellposeWebError("train_files needs train_labels_files (one label file per image)")
        train_data, train_labels = _read_files(train_files, "training images"), \
            _read_files(train_labels_files, "training label files")
    if test_data is None and test_files is not None and test_labels_files is not None:
        test_data, test_labels = _read_files(test_files, "test images"), _read_files(test_labels_files, "test label files")
    if train_data is None or train_labels is None or len(train_data) == 0:
        raise CellposeWebError("no training images given: pass train_data and train_labels (lists of arrays)")
    if n_epochs < 1:
        raise CellposeWebError(f"n_epochs must be at least 1, got {n_epochs}")
    if not (0 < learning_rate < 1):
        raise CellposeWebError(f"learning_rate must be between 0 and 1, got {learning_rate}")
    device = next(net.parameters()).device
    orig_dtype = next(net.parameters()).dtype
    net.float()

    imgs, flows, diams, kept = prepare_training_data(train_data, train_labels, channel_axis, normalize,
                                                     min_train_masks, device, nchan=nchan, channels=channels,
                                                     legacy_net=legacy_net)
    if not imgs:
        raise CellposeWebError(
            f"none of the {len(train_data)} training images has at least min_train_masks={min_train_masks} "
            "masks; add more labelled cells or lower min_train_masks")
    probs = None
    if train_probs is not None:
        probs = np.asarray(train_probs, np.float64)[kept]
        probs = probs / probs.sum()
    t_imgs, t_flows, t_diams = [], [], np.zeros(0)
    if test_data is not None and test_labels is not None and len(test_data) > 0:
        t_imgs, t_flows, t_diams, _ = prepare_training_data(test_data, test_labels, channel_axis, normalize, 0, device,
                                                            nchan=nchan, channels=channels, legacy_net=legacy_net)
    diam_mean = float(getattr(net, "diam_mean", torch.tensor([30.0])).reshape(-1)[0])
    if hasattr(net, "diam_labels"):
        with torch.no_grad():
            net.diam_labels.data = torch.tensor([float(np.mean(diams))], device=device, dtype=net.diam_labels.dtype)

    nimg = len(imgs)
    nimg_per_epoch = nimg if nimg_per_epoch is None else int(nimg_per_epoch)
    nimg_test = len(t_imgs) if nimg_test_per_epoch is None else min(len(t_imgs), int(nimg_test_per_epoch))
    LR = learning_rate_schedule(learning_rate, n_epochs) if lr_schedule is None else np.asarray(lr_schedule, float)
    if len(LR) < n_epochs:
        raise CellposeWebError(f"lr_schedule has {len(LR)} learning rates for {n_epochs} epochs")
    use_bf16 = training_uses_bf16(net, device, mixed_precision)
    memory_format = torch.channels_last if net_arch(net) in _CONV_NETS else torch.contiguous_format
    net.to(memory_format=memory_format)
    optimizer = _adamw(net, learning_rate, weight_decay)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    save_dir = Path(save_path if save_path is not None else os.getcwd()) / "models"
    model_name = model_name or f"cellpose_{int(time.time())}"
    model_path = save_dir / model_name
    meta = {"recipe": {"learning_rate": learning_rate, "weight_decay": weight_decay, "n_epochs": n_epochs,
                       "batch_size": batch_size, "seed": seed, "rescale": rescale, "scale_range": scale_range,
                       "augment_intensity": augment_intensity, "bfloat16": use_bf16},
            "n_train_images": nimg, "diam_labels": float(np.mean(diams))}

    def scales_for(rng, idx, d):
        if scale_sampler is not None:
            s = scale_sampler(rng, len(idx))
        elif scale_range is None:
            s = 2.0 ** rng.uniform(-2, 2, len(idx))
        else:
            s = (1 - scale_range / 2) + scale_range * rng.random(len(idx))
        if rescale:
            s = s * diam_mean / d[idx]
        return s

    def batch_tensors(rng, idx, src_imgs, src_flows, src_d):
        s = scales_for(rng, idx, src_d)
        xb, yb = transforms.random_rotate_and_resize(
            [src_imgs[i] for i in idx], [src_flows[i] for i in idx], scale_range=0.0,
            xy=(bsize, bsize), rescale=s, rng=rng, device=device)
        return xb.contiguous(memory_format=memory_format), yb

    def forward_loss(xb, yb, bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = net(xb)[0]
        return flow_loss(y.float(), yb)

    train_losses = np.zeros(n_epochs)
    test_losses = np.zeros(n_epochs)
    log.info(">>> n_epochs=%d, n_train=%d, n_test=%d, bsize=%d, batch_size=%d, nimg_per_epoch=%d, device=%s",
             n_epochs, nimg, len(t_imgs), bsize, batch_size, nimg_per_epoch, device)
    log.info(">>> AdamW, learning_rate=%g, weight_decay=%g, %s; saving model to %s", learning_rate, weight_decay,
             "bfloat16 autocast" if use_bf16 else "float32", model_path)
    loss_dtype = torch.float32 if device.type == "mps" else torch.float64
    t0 = time.time()
    stopped = False
    with cuda_tf32(device):
        try:
            for iepoch in range(n_epochs):
                rng = np.random.default_rng(seed + iepoch)
                if nimg_per_epoch != nimg or probs is not None:
                    order = rng.choice(nimg, nimg_per_epoch, replace=nimg_per_epoch > nimg or probs is not None, p=probs)
                else:
                    order = rng.permutation(nimg)
                for g in optimizer.param_groups:
                    g["lr"] = LR[iepoch]
                net.train()
                # the epoch's loss is summed on the device: no host sync per step (float64 where the device has it)
                total, count = torch.zeros((), dtype=loss_dtype, device=device), 0
                for k in range(0, len(order), batch_size):
                    idx = order[k:k + batch_size]
                    xb, yb = batch_tensors(rng, idx, imgs, flows, diams)
                    if augment_intensity:
                        xb = intensity_augment(xb, gen)
                    loss = forward_loss(xb, yb, use_bf16)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach().to(loss_dtype) * len(idx)
                    count += len(idx)
                train_losses[iepoch] = float(total) / max(count, 1)  # the epoch's one host sync
                if not np.isfinite(train_losses[iepoch]):
                    raise TrainingDivergedError(
                        f"Training diverged in epoch {iepoch + 1}: the loss became {train_losses[iepoch]} and the "
                        f"network's weights are no longer usable; no model was saved. Lower the learning rate "
                        f"(this run: {LR[iepoch]:.2g}; e.g. {learning_rate / 10:.2g}) and check that the masks "
                        "belong to their images.")

                test_loss = None
                if t_imgs and (iepoch == 5 or iepoch % 10 == 0 or iepoch == n_epochs - 1):
                    net.eval()
                    trng = np.random.default_rng(42)
                    torder = trng.permutation(len(t_imgs))[:nimg_test]
                    tot, cnt = 0.0, 0
                    with torch.inference_mode():
                        for k in range(0, len(torder), batch_size):
                            idx = torder[k:k + batch_size]
                            xb, yb = batch_tensors(trng, idx, t_imgs, t_flows, t_diams)
                            # float32: a held-out loss comparable between precisions (a few crops)
                            tot += float(forward_loss(xb, yb, False).item()) * len(idx)
                            cnt += len(idx)
                    test_loss = tot / max(cnt, 1)
                    test_losses[iepoch] = test_loss
                elapsed = time.time() - t0
                log.info("epoch %d, train_loss=%.4f, test_loss=%s, LR=%.2e, time %.1fs", iepoch, train_losses[iepoch],
                         "-" if test_loss is None else f"{test_loss:.4f}", LR[iepoch], elapsed)
                if save_each and iepoch > 0 and iepoch % save_every == 0:
                    save_network(net, save_dir / f"{model_name}_epoch_{iepoch:04d}", meta)
                elif iepoch > 0 and iepoch % save_every == 0:
                    save_network(net, model_path, meta)
                if callback is not None and callback(iepoch, float(train_losses[iepoch]), test_loss, elapsed) is False:
                    log.info("training stopped by the callback after epoch %d", iepoch)
                    train_losses, test_losses = train_losses[: iepoch + 1], test_losses[: iepoch + 1]
                    stopped = True
                    break
        except BaseException:  # the caller's dtype back (e.g. a bf16 model after an out-of-memory error)
            if orig_dtype != torch.float32:
                net.to(orig_dtype)
            raise
        finally:  # back to the layout the caller had (also when a step or the callback raised)
            net.to(memory_format=torch.contiguous_format)
    meta["epochs_done"] = int(len(train_losses))
    meta["stopped_early"] = stopped
    meta["train_seconds"] = round(time.time() - t0, 1)
    meta["final_train_loss"] = float(train_losses[-1])
    net.eval()
    save_network(net, model_path, meta)
    log.info("saved the trained network to %s (%d epochs, %.1f s)", model_path, meta["epochs_done"],
             meta["train_seconds"])
    if registry.remember_trained_model(model_name, model_path):
        log.info("load it with CellposeModel(pretrained_model=%r) or by its path", model_name)
    if orig_dtype != torch.float32:
        net.to(orig_dtype)
    return model_path, train_losses, test_losses
