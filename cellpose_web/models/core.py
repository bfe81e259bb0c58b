"""``CellposeModel``: load a network and segment images exactly as Cellpose 4 does.

Pipeline of :meth:`CellposeModel.eval` (Cellpose 4.2 numbers, see CELLPOSE_FACTS.md section 2):
channels -> normalisation -> resize by 30 / diameter -> zero padding -> 256x256 tiles (10%
overlap) through the network in batches -> sigmoid-taper blending -> resize back -> dynamics
(Euler integration of the flows, seeds, flow-error check) -> hole filling and ``min_size``.
3D runs the network on the YX, ZX and ZY planes and sums the results; ``stitch_threshold``
links per-plane masks instead.

Example
-------
>>> from cellpose_web.models import CellposeModel
>>> model = CellposeModel(pretrained_model="cpsam_v2")          # or "lite", or a file path
>>> masks, flows, styles = model.eval(img, diameter=30)           # img (Y, X) or (Y, X, C)
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable
import numpy as np
import torch
from cellpose_web.engine import dynamics, memory, transforms
from cellpose_web.models import legacy
from cellpose_web import registry
from cellpose_web.engine.dynamics import dx_to_circ  # re-exported: Cellpose has it in models' namespace too
from cellpose_web.engine.device import choose_device, default_dtype, set_cpu_threads
from cellpose_web.errors import BadInputError, CellposeWebError, OutOfMemoryError
from cellpose_web.errors import NonFiniteFlowsError
from cellpose_web.engine.memory import AdaptiveBatch
from cellpose_web.engine.memory import reuse_freed_memory as _reuse_freed_memory  # looked up here at call time (tests)
from cellpose_web.engine.nets import build_net, load_checkpoint
from cellpose_web.models.params import DIAM_MEAN, MAX_NITER, MAX_RESIZED_PIXELS, as_array, auto_diameter_zoom, check_eval_params, check_finite, format_duration, normalization_settings

logger = logging.getLogger(__name__)


class _Progress:
    """Adapt ``progress`` (callable(fraction, message), tqdm-like, or Qt-like setValue) to one call.

    An exception raised by the callback stops the eval (use it to cancel).
    """

    def __init__(self, progress: Any, lo: float = 0.0, hi: float = 1.0, prefix: str = "",
                 started: float | None = None):
        self.p, self.lo, self.hi, self.prefix = progress, lo, hi, prefix
        self._last = 0.0
        self.started = time.perf_counter() if started is None else started

    def sub(self, a: float, b: float, prefix: str = "") -> "_Progress":
        """The part [a, b] of this range; messages get ``prefix`` (e.g. "image 2/5: ") in front."""
        span = self.hi - self.lo
        return _Progress(self.p, self.lo + span * a, self.lo + span * b, self.prefix + prefix, self.started) \
            if self.p is not None else self

    def eta(self, f: float) -> float | None:
        """Seconds left, extrapolated from the time so far (None until 3% done and 2 s spent)."""
        spent = time.perf_counter() - self.started
        if f < 0.03 or spent < 2.0 or f >= 1.0:
            return None
        return spent * (1.0 - f) / f

    def __call__(self, frac: float, msg: str = "") -> None:
        p = self.p
        if p is None:
            return
        f = float(min(1.0, max(0.0, self.lo + (self.hi - self.lo) * frac)))
        msg = self.prefix + msg if msg else msg
        left = self.eta(f)
        if msg and left is not None:  # long runs (large images, many planes) say how long is left
            msg += f" (about {format_duration(left)} left)"
        # exceptions raised by the callback propagate: that is how a caller cancels a running eval
        if hasattr(p, "update") and hasattr(p, "n") and not callable(getattr(p, "setValue", None)):
            total = getattr(p, "total", None) or 100
            if getattr(p, "total", None) is None:
                p.total = total
            target = f * total
            if target > p.n:
                p.update(target - p.n)
            if msg and hasattr(p, "set_description"):
                p.set_description(msg, refresh=False)
        elif callable(getattr(p, "setValue", None)):
            p.setValue(int(round(100 * f)))
        elif callable(p):
            p(f, msg)


# --------------------------------------------------------------------------------------------
# network on tiles
# --------------------------------------------------------------------------------------------
def _net_device_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in net.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _stored_number(net: torch.nn.Module, name: str) -> np.float32 | None:
    """First element of a number kept in the network's weights (``diam_mean``, ``diam_labels``) as
    np.float32, or None when the network has none; read through float32, since numpy has no bfloat16."""
    t = getattr(net, name, None)
    if not torch.is_tensor(t):
        return None
    return np.float32(t.detach().reshape(-1)[0].float().item())


def _forward(net: torch.nn.Module, X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = net(X.to(dtype))
    y = y[0] if isinstance(y, (tuple, list)) else y
    return y.float()


def run_net(net: torch.nn.Module, imgs: np.ndarray, batch_size: int = 8, augment: bool = False,
            tile_overlap: float = 0.1, bsize: int = 256, rsz: float | None = None,
            progress: Callable | None = None, whole_image: bool | None = None,
            channels_first: bool = False, batches: AdaptiveBatch | None = None) -> np.ndarray:
    """Run the network on a stack of 2D images with Cellpose's tiling.

    Parameters
    ----------
    imgs : (N, Ly, Lx, C) float32 normalised images (C <= 3).
    rsz : resize factor; each image is resized to (int(Ly*rsz), int(Lx*rsz)) first.
    whole_image : run each padded image in one piece (fully convolutional nets); None = decide
        from ``net.fully_convolutional`` / ``net.max_whole_pixels``.

    channels_first : return (N, nout, Lyr, Lxr) instead, without a transposed copy (large images).
    batches : the eval's :class:`~cellpose_web.engine.memory.AdaptiveBatch` (None: one of ``batch_size``):
        every network call goes through it, so a batch that runs out of GPU memory is halved and
        run again (same output).

    Returns
    -------
    yf : (N, Lyr, Lxr, nout) float32 network output at the resized size, [dY, dX, cellprob].
    """
    prog = progress if isinstance(progress, _Progress) else _Progress(progress)
    device, dtype = _net_device_dtype(net)
    batches = batches or AdaptiveBatch(batch_size, device)
    forward = lambda X: _forward(net, X, dtype)  # noqa: E731
    N, Ly0, Lx0, C = imgs.shape
    if rsz is not None and rsz != 1.0:
        Lyr, Lxr = int(Ly0 * rsz), int(Lx0 * rsz)
    else:
        rsz, Lyr, Lxr = None, Ly0, Lx0
    if Lyr < 1 or Lxr < 1:
        raise CellposeWebError(f"the diameter makes the image {Lyr} x {Lxr} pixels; use a smaller diameter")
    blocks = False
    if whole_image is None:
        mult = int(getattr(net, "multiple", 16))
        p = transforms.get_pad_yx(Lyr, Lxr, div=mult, extra=1)
        fully_conv = bool(getattr(net, "fully_convolutional", False)) and not augment
        whole_image = fully_conv and (Lyr + p[0] + p[1]) * (Lxr + p[2] + p[3]) <= int(getattr(net, "max_whole_pixels", 0))
        blocks = fully_conv and not whole_image
    if blocks:
        return _run_blocks(net, imgs, rsz, Lyr, Lxr, prog, channels_first, batches)
    if whole_image:
        mult = int(getattr(net, "multiple", 16))
        ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(Lyr, Lxr, div=mult, extra=1)
    else:
        ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(Lyr, Lxr, min_size=(bsize, bsize))
    Ly, Lx = Lyr + ypad1 + ypad2, Lxr + xpad1 + xpad2

    yf = None
    if whole_image:
        group = max(1, min(batch_size, int(getattr(net, "max_whole_pixels", Ly * Lx)) // (Ly * Lx)))
        ystart = xstart = None
    else:
        ystart = transforms.tile_starts(Ly, bsize, augment, tile_overlap)
        xstart = transforms.tile_starts(Lx, bsize, augment, tile_overlap)
        by, bx = min(bsize, Ly), min(bsize, Lx)
        ntiles = len(ystart) * len(xstart)
        group = max(1, batch_size // ntiles)
        taper = torch.from_numpy(transforms.taper_mask(by, bx).astype(np.float32)).to(device)
        wsum = torch.zeros((Ly, Lx), device=device)
        for y0 in ystart:
            for x0 in xstart:
                wsum[y0:y0 + by, x0:x0 + bx] += taper
    ngroups = (N + group - 1) // group
    with torch.inference_mode():
        for gi, g0 in enumerate(range(0, N, group)):
            g1 = min(N, g0 + group)
            t = torch.from_numpy(np.ascontiguousarray(imgs[g0:g1], dtype=np.float32)).to(device)
            t = t.permute(0, 3, 1, 2)  # (G, C, Y, X)
            if rsz is not None:
                t = transforms.resize_yx(t, Lyr, Lxr, 2, nearest=False)
            t = torch.nn.functional.pad(t, (xpad1, xpad2, ypad1, ypad2))
            G = t.shape[0]
            if whole_image:
                out = batches.run(forward, t)
            else:
                out = None
                specs = [(i, j, k) for i in range(G) for j in range(len(ystart)) for k in range(len(xstart))]
                for b0 in range(0, len(specs), batch_size):
                    chunk = specs[b0:b0 + batch_size]
                    tiles = []
                    for i, j, k in chunk:
                        tile = t[i, :, ystart[j]:ystart[j] + by, xstart[k]:xstart[k] + bx]
                        if augment:
                            fy, fx = transforms.augment_flip(j, k)
                            dims = [d for d, f in ((-2, fy), (-1, fx)) if f]
                            if dims:
                                tile = tile.flip(dims)
                        tiles.append(tile)
                    y = batches.run(forward, torch.stack(tiles))
                    if out is None:
                        out = torch.zeros((G, y.shape[1], Ly, Lx), device=device)
                    for n, (i, j, k) in enumerate(chunk):
                        yt = y[n]
                        if augment:
                            fy, fx = transforms.augment_flip(j, k)
                            if fy:
                                yt = yt.flip(-2)
                                yt[0] = -yt[0]
                            if fx:
                                yt = yt.flip(-1)
                                yt[1] = -yt[1]
                        out[i, :, ystart[j]:ystart[j] + by, xstart[k]:xstart[k] + bx] += yt * taper
                    prog((gi + (b0 + len(chunk)) / len(specs)) / ngroups, "running the network")
                out /= wsum
            out = out[:, :, ypad1:ypad1 + Lyr, xpad1:xpad1 + Lxr]
            if yf is None:
                yf = np.zeros((N, out.shape[1], Lyr, Lxr) if channels_first else (N, Lyr, Lxr, out.shape[1]),
                              np.float32)
            yf[g0:g1] = (out if channels_first else out.permute(0, 2, 3, 1)).cpu().numpy()
            if whole_image:
                prog((gi + 1) / ngroups, "running the network")
    return yf


# Large images through a fully convolutional net: blocks of at most BLOCK_PIXELS (plus a context margin
# of BLOCK_MARGIN px on every inner side, cut off again), each written straight into the output. The
# network's activations then stay bounded (a 1024 x 1024 block of lite needs about 1.3 GB, mostly im2col
# buffers of its full-resolution convolutions) and no padded copy of the whole image is made.
BLOCK_PIXELS = 768 * 768


BLOCK_MARGIN = 32


def _run_blocks(net: torch.nn.Module, imgs: np.ndarray, rsz: float | None, Lyr: int, Lxr: int,
                prog: "_Progress", channels_first: bool = False, batches: AdaptiveBatch | None = None) -> np.ndarray:
    """Run a fully convolutional net on (N, Ly, Lx, C) images in overlapping blocks; see ``run_net``.
    One block per network call: a block that does not fit in memory raises OutOfMemoryError."""
    device, dtype = _net_device_dtype(net)
    batches = batches or AdaptiveBatch(1, device)
    N = imgs.shape[0]
    mult = int(getattr(net, "multiple", 16))
    core = max(mult, int(math.sqrt(min(BLOCK_PIXELS, int(getattr(net, "max_whole_pixels", BLOCK_PIXELS))))))
    core = max(mult, core - 2 * BLOCK_MARGIN)
    ys = np.linspace(0, Lyr, math.ceil(Lyr / core) + 1).round().astype(int)
    xs = np.linspace(0, Lxr, math.ceil(Lxr / core) + 1).round().astype(int)
    nblocks = (len(ys) - 1) * (len(xs) - 1)
    wpad = transforms.get_pad_yx(Lyr, Lxr, div=mult, extra=1)
    yf = None
    with torch.inference_mode(), _reuse_freed_memory():
        for i in range(N):
            t = torch.from_numpy(np.ascontiguousarray(imgs[i], dtype=np.float32)).to(device).permute(2, 0, 1)
            if rsz is not None:
                t = transforms.resize_yx(t[None], Lyr, Lxr, 2, nearest=False)[0]
            n = 0
            for a in range(len(ys) - 1):
                for b in range(len(xs) - 1):
                    cy0, cy1, cx0, cx1 = ys[a], ys[a + 1], xs[b], xs[b + 1]
                    y0, y1 = max(0, cy0 - BLOCK_MARGIN), min(Lyr, cy1 + BLOCK_MARGIN)
                    x0, x1 = max(0, cx0 - BLOCK_MARGIN), min(Lxr, cx1 + BLOCK_MARGIN)
                    # zero padding that keeps the block on the whole image's pooling grid (a shifted
                    # grid changes a U-Net's output), with the whole image's padding at its borders
                    py1 = wpad[0] if y0 == 0 else (y0 + wpad[0]) % mult
                    px1 = wpad[2] if x0 == 0 else (x0 + wpad[2]) % mult
                    py2 = wpad[1] if y1 == Lyr else -(y1 - y0 + py1) % mult
                    px2 = wpad[3] if x1 == Lxr else -(x1 - x0 + px1) % mult
                    blk = torch.nn.functional.pad(t[None, :, y0:y1, x0:x1], (px1, px2, py1, py2))
                    out = batches.run(lambda X: _forward(net, X, dtype), blk)[0]
                    if yf is None:
                        nout = out.shape[0]
                        yf = np.zeros((N, nout, Lyr, Lxr) if channels_first else (N, Lyr, Lxr, nout), np.float32)
                    sub = out[:, py1 + cy0 - y0:py1 + cy1 - y0, px1 + cx0 - x0:px1 + cx1 - x0]
                    if channels_first:
                        yf[i, :, cy0:cy1, cx0:cx1] = sub.cpu().numpy()
                    else:
                        yf[i, cy0:cy1, cx0:cx1] = sub.permute(1, 2, 0).cpu().numpy()
                    del out, blk, sub
                    n += 1
                    prog((i + n / nblocks) / N, "running the network")
            del t
    return yf


def run_3D(net: torch.nn.Module, imgs: np.ndarray, batch_size: int = 8, augment: bool = False,
           tile_overlap: float = 0.1, bsize: int = 256, progress: Callable | None = None,
           batches: AdaptiveBatch | None = None) -> np.ndarray:
    """Run the network on the YX, ZX and ZY planes of a (Z, Y, X, C) stack and sum the views
    (``batches`` as in :func:`run_net`, shared by the three views).

    Returns (Z, Y, X, 4) float32 = [dZ, dY, dX, cellprob]: each flow component is the sum of the two
    views that contain its axis, cellprob the sum of all three (as Cellpose does).
    """
    prog = progress if isinstance(progress, _Progress) else _Progress(progress)
    batches = batches or AdaptiveBatch(batch_size, _net_device_dtype(net)[0])
    Lz, Ly, Lx = imgs.shape[:3]
    yf = np.zeros((Lz, Ly, Lx, 4), np.float32)
    perms = [(0, 1, 2, 3), (1, 0, 2, 3), (2, 0, 1, 3)]
    inv = [(0, 1, 2), (1, 0, 2), (1, 2, 0)]
    chans = [(1, 2), (0, 2), (0, 1)]
    for p in range(3):
        xsl = np.ascontiguousarray(imgs.transpose(perms[p]))
        y = run_net(net, xsl, batch_size=batch_size, augment=augment, tile_overlap=tile_overlap,
                    bsize=bsize, progress=prog.sub(p / 3, (p + 1) / 3), batches=batches)
        yf[..., -1] += y[..., -1].transpose(inv[p])
        for j in range(2):
            yf[..., chans[p][j]] += y[..., j].transpose(inv[p])
        del y
    return yf


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class CellposeModel:
    """A segmentation model: Cellpose-SAM weights ("cpsam_v2", "cpsam", a file) or cellpose-web ``lite``.

    Parameters
    ----------
    gpu : use a GPU (CUDA, else Apple MPS) when available.
    pretrained_model : model name known to :mod:`cellpose_web.registry` ("cpsam_v2", "cpsam",
        "lite", a lab model, a name given to ``train.train_seg``) or a path to a checkpoint file.
        None (the default): the best model on this machine without downloading,
        ``registry.best_available_model()`` (Cellpose-SAM once downloaded, else ``lite``); Cellpose's
        default is "cpsam_v2", which downloads 1.2 GB on first use: ask for it by name.
    model_type, diam_mean, nchan : accepted for compatibility; ignored with a warning (as Cellpose 4).
    device : explicit torch device (wins over ``gpu``).
    use_bfloat16 : run the network in bfloat16; None = bf16 on CUDA only, float32 elsewhere
        (Cellpose 4 defaults to bf16 everywhere, which is slow on most CPUs); Cellpose 1-3 U-Nets
        default to float32 on every device, as Cellpose 3 runs them.

    Attributes
    ----------
    net, device, dtype, pretrained_model (path), model_name, model_info, diam_mean (30),
    diam_labels, timing (per image of the last list eval), last_timing, last_eval_params (with
    ``batch_size``, ``batch_size_used`` and ``notices``), last_notices (what the last eval adapted,
    e.g. "GPU memory ran short: batch size lowered from 8 to 2 ..."), diam_estimate (lite diameter
    estimate of the last eval, or None).
    """

    def __init__(self, gpu: bool = False, pretrained_model: Any = None, model_type: Any = None,
                 diam_mean: Any = None, device: Any = None, nchan: Any = None,
                 use_bfloat16: bool | None = None):
        if model_type is not None and pretrained_model in (None, False, "cpsam_v2") and str(model_type) in \
                registry.LEGACY_MODELS:
            pretrained_model = str(model_type)  # Cellpose 3's CellposeModel(model_type="cyto3")
        elif model_type is not None:
            logger.warning("model_type is not used in Cellpose 4 / cellpose-web; ignoring it")
        if diam_mean is not None:
            logger.warning("diam_mean is not used in Cellpose 4 / cellpose-web (objects are rescaled to 30 px); "
                           "ignoring it")
        if nchan is not None:
            logger.warning("nchan is deprecated in Cellpose 4 (channel-agnostic, first 3 channels); ignoring it")
        if pretrained_model is False:
            raise CellposeWebError("pretrained_model must be a model name or a file path; training from scratch is "
                                   "not supported (start from 'cpsam_v2' or 'lite')")
        self.device = choose_device(gpu, device)
        self.gpu = self.device.type in ("cuda", "mps")
        if self.device.type == "cpu":
            set_cpu_threads()
        self.model_info = None
        if pretrained_model is None:
            pretrained_model = registry.best_available_model()
            logger.info("pretrained_model not given: using %r (the best model on this machine; pass "
                        "pretrained_model='cpsam_v2' to download Cellpose-SAM)", pretrained_model)
        path, name = self._resolve(pretrained_model)
        obj = load_checkpoint(path)
        net = build_net(obj)
        del obj
        self.pretrained_model = str(path)
        self.model_name = name
        self.legacy = bool(getattr(net, "legacy", False))
        self.arch = "cellpose3" if self.legacy else ("lite" if getattr(net, "fully_convolutional", False) else "cpsam")
        self.backbone = {"cpsam": "sam_vitl", "lite": "lite", "cellpose3": "unet_cp3"}[self.arch]
        # numbers stored in the weights are read before the network may go to bfloat16 (which would
        # round them, and which numpy cannot hold)
        self.diam_mean = DIAM_MEAN
        dl = _stored_number(net, "diam_labels")
        self.diam_labels = DIAM_MEAN if dl is None else float(dl)
        self.nchan = int(getattr(net, "nchan", 3))
        self.size_model_path = None
        if self.legacy:
            # Cellpose 3 keeps these as float32 numbers read from the weights; rescale factors follow them
            self.diam_mean = _stored_number(net, "diam_mean")
            self.diam_labels = dl
            named = getattr(self.model_info, "diam_mean", None)
            if named:  # a model known by name: Cellpose 3 takes diam_mean from its table (17 for nuclei)
                self.diam_mean = float(named)
                if not getattr(net, "stored_diameters", (True, True))[1]:
                    self.diam_labels = float(named)
            size = getattr(self.model_info, "size_model", None)
            beside = Path(str(path) + "_size.npy")  # where Cellpose 3 saves a trained model's size model
            self.size_model_path = size or (str(beside) if beside.is_file() else None)
        self.dtype = default_dtype(self.device, use_bfloat16, legacy=self.legacy)
        self.net = net.to(device=self.device, dtype=self.dtype)
        self.net.eval()
        self.timing: list[float] = []
        self.last_timing: dict[str, float] = {}
        self.last_eval_params: dict[str, Any] = {}
        self.last_notices: list[str] = []  # what the last eval adapted, for the app and the CLI
        self.diam_estimate: float | None = None

    def _resolve(self, pretrained_model: Any) -> tuple[Path, str]:
        """Name or path -> (weights file, model name), through the registry (Hub, lab, built-in)."""
        info = registry.resolve_model(pretrained_model)
        self.model_info = info
        if info.path is None:
            raise FileNotFoundError(f"model {pretrained_model!r} has no local weights file")
        return Path(info.path), str(info.name or Path(info.path).name)

    def __repr__(self) -> str:
        return f"CellposeModel({self.model_name!r}, arch={self.arch}, device={self.device}, dtype={self.dtype})"

    # ------------------------------------------------------------------ eval
    def eval(self, x: Any, batch_size: int | None = None, resample: bool = True, channels: Any = None,
             channel_axis: int | None = None, z_axis: int | None = None, normalize: bool | dict = True,
             invert: bool = False, rescale: float | None = None, diameter: Any = None,
             flow_threshold: float = 0.4, cellprob_threshold: float = 0.0, do_3D: bool = False,
             anisotropy: float | None = None, flow3D_smooth: Any = 0, stitch_threshold: float = 0.0,
             min_size: int = 15, max_size_fraction: float = 0.4, niter: int | None = None,
             augment: bool = False, tile_overlap: float = 0.1, bsize: int | None = None,
             compute_masks: bool = True, progress: Any = None, interp: bool = True):
        """Segment an image, a stack, or a list of images.

        Parameters (as Cellpose 4's ``CellposeModel.eval``)
        ----------
        x : (Y, X), (Y, X, C) / (C, Y, X), (N, Y, X, C) batch, (Z, Y, X[, C]) stack with z_axis, or a list.
        batch_size : tiles per network call; None: 8 on a CPU, on a GPU chosen from its free memory
            (:func:`cellpose_web.engine.memory.default_batch_size`). When the GPU runs out of memory the
            batch is halved and the run goes on (same result), down to 1, then
            :class:`~cellpose_web.errors.OutOfMemoryError`; ``last_notices`` says what happened.
        resample : compute dynamics at the original size (True) or at the rescaled size.
        channels : Cellpose 1-3 U-Net models: [cytoplasm, nucleus] (1-based, 0 = grey / none) choose
            and order the two network inputs (a list of pairs gives one per image of a list). Other
            models: deprecated (Cellpose 4 is channel-agnostic and uses the first 3 channels); warns.
        channel_axis, z_axis : axes of channels / Z; channel axis guessed when None.
        normalize : True/False, or a dict with keys lowhigh, percentile, normalize, norm3D,
            sharpen_radius, smooth_radius, tile_norm_blocksize, tile_norm_smooth3D, invert.
        invert : invert intensities after normalisation (dark cells on bright background).
        rescale : zoom factor used when no diameter is given (Cellpose 4 ignores it).
        diameter : typical object diameter in px; the image is zoomed by 30 / diameter. A list gives
            one diameter per image of a list input.
        flow_threshold : maximum flow error of a kept mask (2D; 0 disables the check).
        cellprob_threshold : pixels with cellprob logit above it are followed.
        do_3D, anisotropy, flow3D_smooth : 3D segmentation; Z sampling ratio; gaussian sigma (one
            number or Z, Y, X) on the 3D flows.
        stitch_threshold : > 0 segments planes in 2D and links masks with IoU above it.
        min_size, max_size_fraction : drop masks smaller than min_size px / larger than this image fraction.
        niter : Euler steps; None/0 = 200 * diameter / 30 (200 with resample=False).
        augment, tile_overlap, bsize : test-time flips; tile overlap fraction; tile size (None = 256).
        compute_masks : False returns masks = np.zeros(0) (network only).
        progress : callable(fraction, message), a tqdm-like bar, or a Qt-like bar with setValue.
            Once 3% is done and 2 s have passed, messages end with the time left, extrapolated from
            the time so far: "running the network (about 1 min 20 s left)". Large images report
            every block of the network pass.
        interp : interpolate flows during the Euler steps (False: Cellpose 3's size model pass).

        Returns
        -------
        masks : uint16 (uint32 above 65535 objects) labels, squeezed; 0 = background.
        flows : [RGB flow picture uint8 (..., 3), dP (2, Y, X) or (3, Z, Y, X) float32 (network units,
            about 5 x unit vectors), cellprob float32 logits].
        styles : zeros(256) (kept for compatibility); Cellpose 1-3 U-Nets give their real style vectors.
        A list input gives lists.
        """
        self.diam_estimate = None  # set again below when this call estimates the diameter
        self.last_notices = []
        bsize = self._check_bsize(bsize)
        batch_size = self.default_batch_size(bsize) if batch_size is None else \
            check_eval_params(batch_size=batch_size)["batch_size"]
        batches = AdaptiveBatch(batch_size, self.device)
        failed = None
        try:
            out = self._eval_any(
                x, batches=batches, resample=resample, channels=channels, channel_axis=channel_axis, z_axis=z_axis,
                normalize=normalize, invert=invert, rescale=rescale, diameter=diameter, flow_threshold=flow_threshold,
                cellprob_threshold=cellprob_threshold, do_3D=do_3D, anisotropy=anisotropy, flow3D_smooth=flow3D_smooth,
                stitch_threshold=stitch_threshold, min_size=min_size, max_size_fraction=max_size_fraction, niter=niter,
                augment=augment, tile_overlap=tile_overlap, bsize=bsize, compute_masks=compute_masks, progress=progress,
                interp=interp)
        except Exception as e:  # noqa: BLE001 - out of memory outside the network's batches: one typed error
            if not memory.is_out_of_memory(e):
                raise
            failed = " ".join(str(e).split())[:300]
        else:
            self.last_eval_params.update(batch_size=batches.requested, batch_size_used=batches.size,
                                         notices=list(self.last_notices) + ([batches.notice] if batches.notice else []))
            return out
        finally:
            if batches.notice:
                self.last_notices.append(batches.notice)
                logger.warning(batches.notice)
        memory.release(self.device)  # the failed run's frames are gone: give its memory back
        logger.warning("out of memory: %s", failed)
        where = "GPU memory" if self.device.type != "cpu" else "memory"
        raise OutOfMemoryError(f"{where} ran out while segmenting: crop the image or segment it at a smaller scale "
                               "(a larger diameter), or run on a machine with more memory.")

    def default_batch_size(self, bsize: int | None = None) -> int:
        """``eval``'s batch size when none is given: 8 on a CPU, from free GPU memory on CUDA
        (:func:`cellpose_web.engine.memory.default_batch_size`)."""
        return memory.default_batch_size(self.device, self.arch, self._check_bsize(bsize), self.dtype)

    def _eval_any(self, x: Any, *, batches: AdaptiveBatch, resample, channels, channel_axis, z_axis, normalize,
                  invert, rescale, diameter, flow_threshold, cellprob_threshold, do_3D, anisotropy, flow3D_smooth,
                  stitch_threshold, min_size, max_size_fraction, niter, augment, tile_overlap, bsize, compute_masks,
                  progress, interp):
        """``eval`` of one image, a stack or a list, with the network's batches in ``batches``."""
        batch_size = batches.requested
        if channels is not None and not self.legacy:
            logger.warning("channels is deprecated in Cellpose 4 and ignored: Cellpose 4 is channel-agnostic and "
                           "segments on the first 3 channels of the image (use channel_axis to say where they are)")
        if isinstance(x, (list, tuple)) or (not isinstance(x, (list, tuple)) and as_array(x).squeeze().ndim == 5):
            xs = list(x) if isinstance(x, (list, tuple)) else list(as_array(x))
            nimg = len(xs)
            if isinstance(diameter, (list, tuple, np.ndarray)):
                diams = list(diameter)
                if len(diams) != nimg:
                    raise CellposeWebError(f"{len(diams)} diameters were given for {nimg} images")
            else:
                diams = [diameter] * nimg
            prog = _Progress(progress)
            self.timing = []
            masks, flows, styles = [], [], []
            per_image_channels = channels is not None and len(channels) == nimg and all(
                isinstance(c, (list, tuple, np.ndarray)) and len(c) == 2 for c in channels)
            for i in range(nimg):
                tic = time.perf_counter()
                m, f, s = self._eval(xs[i], channels=channels[i] if per_image_channels else channels,
                                     interp=interp, batch_size=batch_size, batches=batches, resample=resample,
                                     channel_axis=channel_axis,
                                     z_axis=z_axis, normalize=normalize, invert=invert, rescale=rescale,
                                     diameter=diams[i], flow_threshold=flow_threshold,
                                     cellprob_threshold=cellprob_threshold, do_3D=do_3D, anisotropy=anisotropy,
                                     flow3D_smooth=flow3D_smooth, stitch_threshold=stitch_threshold,
                                     min_size=min_size, max_size_fraction=max_size_fraction, niter=niter,
                                     augment=augment, tile_overlap=tile_overlap, bsize=bsize,
                                     compute_masks=compute_masks,
                                     progress=prog.sub(i / nimg, (i + 1) / nimg, f"image {i + 1}/{nimg}: "))
                self.timing.append(time.perf_counter() - tic)
                masks.append(m)
                flows.append(f)
                styles.append(s)
            return masks, flows, styles
        tic = time.perf_counter()
        out = self._eval(x, channels=channels, interp=interp, batch_size=batch_size, batches=batches,
                         resample=resample,
                         channel_axis=channel_axis, z_axis=z_axis,
                         normalize=normalize, invert=invert, rescale=rescale, diameter=diameter,
                         flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold, do_3D=do_3D,
                         anisotropy=anisotropy, flow3D_smooth=flow3D_smooth, stitch_threshold=stitch_threshold,
                         min_size=min_size, max_size_fraction=max_size_fraction, niter=niter, augment=augment,
                         tile_overlap=tile_overlap, bsize=bsize, compute_masks=compute_masks,
                         progress=_Progress(progress))
        self.timing = [time.perf_counter() - tic]
        return out

    # ------------------------------------------------------------------ one image / stack
    def _eval(self, x, **kw):
        """:meth:`_eval_image`; flows that are not finite for a finite image are the model's fault."""
        try:
            return self._eval_image(x, **kw)
        except NonFiniteFlowsError:
            # _eval_image refuses images with NaN/infinite pixels before the network runs, so the
            # network's output is what is not finite
            raise BadInputError(self._nonfinite_output_message()) from None

    def _nonfinite_output_message(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        msg = (f"Model '{self.model_name}' gave NaN or infinite outputs for this image, although the image's "
               "pixels are all finite numbers: the model's weights are broken (for example a training run that "
               "diverged)")
        if self.dtype != torch.float32:
            msg += (f", or the model does not suit the reduced precision it runs at here ({dt}); try it in full "
                    "precision (float32)")
        return msg + ". Use another model, or train this one again."

    def _eval_image(self, x, *, batch_size, resample, channel_axis, z_axis, normalize, invert, rescale, diameter,
                    flow_threshold, cellprob_threshold, do_3D, anisotropy, flow3D_smooth, stitch_threshold, min_size,
                    max_size_fraction, niter, augment, tile_overlap, bsize, compute_masks, progress, channels=None,
                    interp=True, batches: AdaptiveBatch | None = None):
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        x = as_array(x)
        if x.size == 0:
            raise CellposeWebError(f"the image is empty (shape {x.shape}); check that the file was read correctly")
        check_finite(x)
        checked = check_eval_params(diameter=diameter, flow_threshold=flow_threshold,
                                    cellprob_threshold=cellprob_threshold, niter=niter, min_size=min_size,
                                    max_size_fraction=max_size_fraction, anisotropy=anisotropy,
                                    stitch_threshold=stitch_threshold, flow3D_smooth=flow3D_smooth,
                                    batch_size=batch_size)
        (diameter, flow_threshold, cellprob_threshold, niter, min_size, max_size_fraction, anisotropy,
         stitch_threshold, sigma3d, batch_size) = (checked[k] for k in (
            "diameter", "flow_threshold", "cellprob_threshold", "niter", "min_size", "max_size_fraction",
            "anisotropy", "stitch_threshold", "flow3D_smooth", "batch_size"))
        bsize = self._check_bsize(bsize)
        batches = batches or AdaptiveBatch(batch_size, self.device)
        stack = do_3D or stitch_threshold > 0

        x = transforms.convert_image(x, channel_axis=channel_axis, z_axis=z_axis, do_3D=stack,
                                     max_channels=None if self.legacy else 3)
        if x.ndim < 4:
            x = x[np.newaxis]
        nimg = x.shape[0]
        if min(x.shape[1:3]) < 1:
            raise CellposeWebError(f"the image has no pixels along Y or X (shape {x.shape[1:3]})")
        if do_3D and nimg < 2:
            raise CellposeWebError("3D segmentation needs a stack with at least 2 planes along z_axis")
        if self.legacy:
            return self._eval_legacy(
                x, t0=t0, channels=channels, normalize=normalize, invert=invert, rescale=rescale, diameter=diameter,
                resample=resample, flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
                do_3D=do_3D, anisotropy=anisotropy, flow3D_smooth=sigma3d, stitch_threshold=stitch_threshold,
                min_size=min_size, max_size_fraction=max_size_fraction, niter=niter, augment=augment,
                tile_overlap=tile_overlap, bsize=bsize, batch_size=batch_size, batches=batches,
                compute_masks=compute_masks,
                interp=interp, progress=progress)

        # which images are constant (no information -> no masks)
        if do_3D:
            constant = np.array([float(np.ptp(x)) == 0.0] * nimg)
        else:
            constant = np.array([float(np.ptp(x[i])) == 0.0 for i in range(nimg)])

        if rescale is not None and diameter is None:
            try:
                image_scaling = float(rescale)
            except (TypeError, ValueError):
                raise CellposeWebError(f"rescale must be a number, got {rescale!r}") from None
            if not (image_scaling > 0) or math.isinf(image_scaling):
                raise CellposeWebError(f"rescale must be a positive number, got {rescale!r}")
        else:
            image_scaling = DIAM_MEAN / diameter if diameter is not None else 1.0
        Ly, Lx = x.shape[1:3]
        zoom_px = Ly * image_scaling * Lx * image_scaling * (nimg if not do_3D else 1)
        if zoom_px > MAX_RESIZED_PIXELS:
            raise CellposeWebError(
                f"diameter {diameter} px would zoom the image to about {int(Ly * image_scaling)} x "
                f"{int(Lx * image_scaling)} pixels, which is too large; give the diameter of your objects in "
                "pixels (typically 10-100)")
        if int(Ly * image_scaling) < 1 or int(Lx * image_scaling) < 1:
            raise CellposeWebError(
                f"diameter {diameter} px shrinks the {Ly} x {Lx} image below one pixel; give the object diameter "
                "in pixels of this image")

        # ---------------- normalisation
        params = normalization_settings(normalize, invert)
        tic = time.perf_counter()
        do_norm = bool(params["normalize"])  # as Cellpose: normalize=False skips lowhigh / tile norm / invert too
        if nimg > 1 and (stack):
            if do_3D:
                params["norm3D"] = True
        elif nimg > 1:
            params["norm3D"] = False
        if do_norm:
            x = transforms.normalize_img(x, **params)
        else:
            x = x.astype(np.float32, copy=False)
        timing["normalize"] = time.perf_counter() - tic
        progress(0.02, "normalised")

        # ---------------- network
        tic = time.perf_counter()
        net_prog = progress.sub(0.02, 0.8 if compute_masks else 1.0)
        shape = x.shape
        if do_3D:
            Lz = shape[0]
            xs = x
            if image_scaling != 1.0 or (anisotropy is not None and anisotropy != 1.0):
                aniso = 1.0 if anisotropy is None else anisotropy
                new_shape = (int(Lz * aniso * image_scaling), int(Ly * image_scaling), int(Lx * image_scaling))
                if min(new_shape) < 1:
                    raise CellposeWebError(f"anisotropy/diameter shrink the stack to {new_shape}; check them")
                xs = transforms.resize_image_3d(x, new_shape)
            yf = run_3D(self.net, xs, batch_size=batch_size, augment=augment, tile_overlap=tile_overlap,
                        bsize=bsize, progress=net_prog, batches=batches)
            del xs
            if resample and (image_scaling != 1.0 or Lz != yf.shape[0]):
                yf = transforms.resize_image_3d(yf, shape[:-1])
            cellprob = yf[..., -1]
            dP = yf[..., :-1].transpose((3, 0, 1, 2))
        else:
            # (N, 3, Y, X): for one image, dP and cellprob are views of it (no whole-image copies)
            yf = run_net(self.net, x, batch_size=batch_size, augment=augment, tile_overlap=tile_overlap,
                         bsize=bsize, rsz=image_scaling if image_scaling != 1.0 else None, progress=net_prog,
                         channels_first=True, batches=batches)
            if resample and image_scaling != 1.0:
                yf = transforms.resize_yx(yf, Ly, Lx, 2)
            cellprob = yf[:, -1]
            dP = yf[:, -3:-1].transpose((1, 0, 2, 3))
        del yf
        dP = np.ascontiguousarray(dP)
        cellprob = np.ascontiguousarray(cellprob)
        timing["network"] = time.perf_counter() - tic

        if do_3D and sigma3d is not None:
            from scipy.ndimage import gaussian_filter
            dP = gaussian_filter(dP, [0, *sigma3d]).astype(np.float32, copy=False)

        # ---------------- masks
        tic = time.perf_counter()
        may_rerun = (diameter is None and rescale is None and compute_masks and not stack and nimg == 1
                     and getattr(self.net, "estimate_diameter", False))
        if not may_rerun:
            x = None  # the normalised image is only needed for lite's second pass: free it (large images)
        if niter is None or niter == 0:
            niter_scale = image_scaling if resample else 1.0
            niter = int(200 / niter_scale)
        if niter > MAX_NITER:
            logger.warning("niter=%d is very large; capping it at %d", niter, MAX_NITER)
            niter = MAX_NITER
        if compute_masks:
            masks = self._compute_masks(shape, dP, cellprob, constant, flow_threshold=flow_threshold,
                                        cellprob_threshold=cellprob_threshold, min_size=min_size,
                                        max_size_fraction=max_size_fraction, niter=niter,
                                        stitch_threshold=stitch_threshold, do_3D=do_3D,
                                        progress=progress.sub(0.8, 1.0))
        else:
            masks = np.zeros(0)
        timing["masks"] = time.perf_counter() - tic
        progress(1.0, "done")

        masks, dP, cellprob = masks.squeeze(), dP.squeeze(), cellprob.squeeze()
        styles = np.zeros((nimg, 256), np.float32).squeeze() if not do_3D else np.zeros(256, np.float32)
        flows = [dx_to_circ(dP) if dP.ndim >= 3 else dx_to_circ(dP[:, None])[0], dP, cellprob]
        timing["total"] = time.perf_counter() - t0
        self.last_timing = timing
        self.last_eval_params = dict(diameter=diameter, rescale=image_scaling, niter=niter, batch_size=batch_size,
                                     resample=resample, normalize=params, flow_threshold=flow_threshold,
                                     cellprob_threshold=cellprob_threshold, do_3D=do_3D, anisotropy=anisotropy,
                                     flow3D_smooth=flow3D_smooth, stitch_threshold=stitch_threshold,
                                     min_size=min_size, max_size_fraction=max_size_fraction, augment=augment,
                                     tile_overlap=tile_overlap, bsize=bsize, shape=tuple(shape),
                                     model=self.model_name, device=str(self.device), dtype=str(self.dtype).replace(
                                         "torch.", ""), diameter_estimate=None)
        # lite: estimate the diameter from a first pass and rerun at the estimated size
        if may_rerun and masks.max() > 0:
            est = float(dynamics.diameters(masks)[0])
            self.diam_estimate = est
            zoom = auto_diameter_zoom(est, x.shape[1:3])
            if zoom is not None:
                kw = dict(batch_size=batch_size, batches=batches, resample=resample, channel_axis=None, z_axis=None,
                          normalize=False, invert=False, rescale=None, diameter=DIAM_MEAN / zoom,
                          flow_threshold=flow_threshold,
                          cellprob_threshold=cellprob_threshold, do_3D=False, anisotropy=None, flow3D_smooth=0,
                          stitch_threshold=0.0, min_size=min_size, max_size_fraction=max_size_fraction,
                          niter=None, augment=augment, tile_overlap=tile_overlap, bsize=bsize,
                          compute_masks=True, progress=_Progress(None))
                # x is already converted and normalised: pass it channels-last
                masks, flows, styles = self._eval(x[0], **{**kw, "channel_axis": 2})
                self.diam_estimate = est
            self.last_eval_params["diameter_estimate"] = est
            self.last_timing["total"] = time.perf_counter() - t0
        elif diameter is None and rescale is None and getattr(self.net, "estimate_diameter", False):
            self.diam_estimate = None
        return masks, flows, styles

    def _eval_legacy(self, x: np.ndarray, *, t0: float, channels: Any, normalize: Any, invert: bool, rescale: Any,
                     diameter: float | None, **kw: Any):
        """A Cellpose 1-3 U-Net on a converted (N, Y, X, C) image: Cellpose 3's semantics (see
        :mod:`cellpose_web.legacy`)."""
        params = normalization_settings(normalize, invert)
        if rescale is not None and diameter is None:
            try:
                rescale = float(rescale)
            except (TypeError, ValueError):
                raise CellposeWebError(f"rescale must be a number, got {rescale!r}") from None
            if not (rescale > 0) or math.isinf(rescale):
                raise CellposeWebError(f"rescale must be a positive number, got {rescale!r}")
        scale = float(self.diam_mean / diameter) if diameter else float(rescale or self.diam_mean / self.diam_labels)
        Ly, Lx = x.shape[1:3]
        if Ly * scale * Lx * scale * (1 if kw["do_3D"] else x.shape[0]) > MAX_RESIZED_PIXELS:
            raise CellposeWebError(
                f"diameter {diameter} px would zoom the image to about {int(Ly * scale)} x {int(Lx * scale)} pixels, "
                "which is too large; give the diameter of your objects in pixels (typically 10-100)")
        device = torch.device("cpu") if self.device.type == "mps" and kw["do_3D"] else self.device
        out = legacy.eval_legacy(self.net, x, channels=legacy.parse_channels(channels), diam_mean=self.diam_mean,
                                 diam_labels=self.diam_labels, normalize_params=params, diameter=diameter,
                                 rescale=rescale, device=device, **kw)
        masks, dP, cellprob = out["masks"].squeeze(), out["dP"].squeeze(), out["cellprob"].squeeze()
        styles = out["styles"].squeeze()
        flows = [dx_to_circ(dP) if dP.ndim >= 3 else dx_to_circ(dP[:, None])[0], dP, cellprob]
        self.last_timing = {**out["timing"], "total": time.perf_counter() - t0}
        self.last_eval_params = dict(
            diameter=diameter, rescale=out["rescale"], niter=out["niter"], channels=channels,
            normalize=out["normalize"], shape=out["shape"], model=self.model_name, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""), diameter_estimate=None,
            **{k: v for k, v in kw.items() if k not in ("progress", "interp", "compute_masks", "niter", "batches")})
        return masks, flows, styles

    def _check_bsize(self, bsize: Any) -> int:
        default = int(getattr(self.net, "bsize", 0) or getattr(self.net, "default_bsize", 256))
        if bsize is None:
            return default
        try:
            b = int(bsize)
        except (TypeError, ValueError):
            raise CellposeWebError(f"bsize must be a whole number of pixels, got {bsize!r}") from None
        if self.legacy:
            if b < 32 or b % 16:
                raise CellposeWebError(f"bsize must be a multiple of 16 and at least 32, got {b} (Cellpose 3 uses 224)")
            return b
        if not getattr(self.net, "fully_convolutional", False):
            if b != default:
                raise CellposeWebError(f"bsize must be {default} for Cellpose-SAM (its tiles are fixed), got {b}")
            return b
        mult = int(getattr(self.net, "multiple", 16))
        if b < 2 * mult or b % mult:
            raise CellposeWebError(f"bsize must be a multiple of {mult} and at least {2 * mult}, got {b}")
        return b

    def _compute_masks(self, shape, dP, cellprob, constant, flow_threshold=0.4, cellprob_threshold=0.0,
                       min_size=15, max_size_fraction=0.4, niter=200, do_3D=False, stitch_threshold=0.0,
                       progress=None):
        progress = progress or _Progress(None)
        device = self.device
        if device.type == "mps" and do_3D:
            device = torch.device("cpu")
        nimg, Ly, Lx = shape[:3]
        if do_3D:
            if constant.all():
                return np.zeros(shape[:3], np.uint16)
            same_size = tuple(cellprob.shape) == tuple(shape[:3])
            m = dynamics.compute_masks(dP, cellprob, niter=niter, cellprob_threshold=cellprob_threshold,
                                  flow_threshold=flow_threshold, min_size=min_size if same_size else -1,
                                  max_size_fraction=max_size_fraction, do_3D=True, device=device)
            if not same_size:
                m = transforms.resize_image_3d(m, shape[:3], interpolation="nearest", no_channels=True)
                m = dynamics.fill_holes_and_remove_small_masks(m, min_size=min_size)
            return m
        per_plane_min = min_size if (stitch_threshold == 0 or nimg == 1) else -1
        out = []
        for i in range(nimg):
            if constant[i]:
                m = np.zeros((Ly, Lx), np.uint16)
            else:
                same_size = tuple(cellprob[i].shape) == (Ly, Lx)
                # dynamics.compute_masks fills holes and applies min_size itself; with resample=False the
                # masks are resized first (nearest) and filled / filtered at the original size (Cellpose 4.2)
                m = dynamics.compute_masks(dP[:, i], cellprob[i], niter=niter, cellprob_threshold=cellprob_threshold,
                                      flow_threshold=flow_threshold, min_size=per_plane_min if same_size else -1,
                                      max_size_fraction=max_size_fraction, do_3D=False, device=device)
                if not same_size:
                    m = transforms.resize_image(m, Ly, Lx, interpolation="nearest")
                    m = dynamics.fill_holes_and_remove_small_masks(m, min_size=per_plane_min)
            out.append(np.asarray(m))
            progress((i + 1) / nimg, "computing masks")
        if nimg == 1:
            return out[0]
        dtype = np.uint32 if any(m.dtype == np.uint32 for m in out) else np.uint16
        masks = np.stack([m.astype(dtype, copy=False) for m in out])
        if stitch_threshold > 0:
            if not masks.any():
                return masks
            masks = dynamics.stitch3D(masks, stitch_threshold=stitch_threshold)
            masks = dynamics.fill_holes_and_remove_small_masks(masks, min_size=min_size)
        else:
            logger.warning("a stack was given but stitch_threshold=0 and do_3D=False: masks are made per plane")
        return masks
