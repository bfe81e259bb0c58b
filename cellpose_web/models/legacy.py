"""Cellpose 1-3 U-Net models (``cyto3``, ``cyto2``, ``cyto``, ``nuclei``, ``cp_cyto``, a lab's own)
evaluated with Cellpose 3.1's semantics, and its ``SizeModel``.

What differs from Cellpose 4 (``CellposeModel.eval`` calls :func:`eval_legacy` for these nets):

- ``channels=[cyto, nucleus]`` (1-based: 1 = red / first channel, 2 = green, 3 = blue; 0 = grey
  i.e. the mean of all channels for ``cyto``, none for ``nucleus``) choose and order the network's two
  inputs; without ``channels`` the first two channels are used (zero-padded).
- tiles are 224x224 and the image is only padded to a multiple of 16 (+16), not to a whole tile;
  ``diameter=None`` rescales by ``diam_mean / diam_labels`` (both stored in the weights);
- the style vector of each image is the normalised sum of its tiles' styles (real, not zeros);
- the number of Euler steps is ``200 / rescale`` (200 with ``resample=False``).

Everything after the network (dynamics, flow check, stitching, files) is the common path.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from cellpose_web.engine import dynamics, memory, transforms
from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.memory import AdaptiveBatch

logger = logging.getLogger(__name__)

__all__ = ["parse_channels", "select_channels", "make_tiles", "blend_tiles", "run_net", "run_3D", "eval_legacy", "SizeModel",
           "load_size_model", "LEGACY_BSIZE"]

LEGACY_BSIZE = 224


# --------------------------------------------------------------------------------------------
# channels
# --------------------------------------------------------------------------------------------
def parse_channels(channels: Any) -> tuple[int, int] | None:
    """``channels`` as (cyto, nucleus) ints >= 0, or None. Raises CellposeWebError when malformed."""
    if channels is None:
        return None
    try:
        vals = [int(c) for c in np.asarray(channels).reshape(-1)]
        ok = all(float(c) == int(c) for c in np.asarray(channels, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        vals, ok = [], False
    if len(vals) == 1:
        vals = vals + [0]
    if not ok or len(vals) != 2 or min(vals) < 0:
        raise CellposeWebError(
            f"channels must be two whole numbers [cytoplasm, nucleus] (1 = first/red channel, 2 = second/green, "
            f"3 = third/blue; 0 = grey for the first, none for the second); got {channels!r}")
    return vals[0], vals[1]


def select_channels(x: np.ndarray, channels: tuple[int, int] | None, nchan: int = 2) -> np.ndarray:
    """The network input of a channels-last image, as Cellpose 3's ``convert_image``/``reshape``.

    Parameters
    ----------
    x : (Y, X, C) or (Z, Y, X, C) image, channels last.
    channels : (cyto, nucleus) 1-based, 0 = grey / none; None = the first ``nchan`` channels.
    nchan : network input channels (2).

    Returns
    -------
    float32 (..., nchan): [cytoplasm (or grey), nucleus (or zeros)].
    """
    x = np.asarray(x, dtype=np.float32)
    C = x.shape[-1]
    if channels is None:
        if C > nchan:
            logger.warning("more than %d channels given and no 'channels': using the first %d (give channels="
                           "[cytoplasm, nucleus] to choose)", nchan, nchan)
            return x[..., :nchan]
        if C < nchan:
            x = np.concatenate([x, np.zeros((*x.shape[:-1], nchan - C), np.float32)], axis=-1)
        return x
    cyto, nuc = channels
    missing = [c for c in (cyto, nuc) if c > C]
    if missing:
        raise CellposeWebError(
            f"channels={list(channels)} names channel {missing[0]}, but the image has {C} channel(s) "
            f"(1..{C}); use 0 for grey (cytoplasm) or for no nucleus channel")
    if C == 1:
        out = x
    elif cyto == 0:
        out = x.mean(axis=-1, keepdims=True)
    else:
        ids = [cyto - 1] + ([nuc - 1] if nuc > 0 else [])
        out = x[..., ids]
    if out.shape[-1] < nchan:
        out = np.concatenate([out, np.zeros((*out.shape[:-1], nchan - out.shape[-1]), np.float32)], axis=-1)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# network on tiles (Cellpose 3's run_net / run_3D)
# --------------------------------------------------------------------------------------------
def make_tiles(img: np.ndarray, bsize: int, augment: bool, tile_overlap: float):
    """Cut a padded (C, Y, X) image into Cellpose 3's tiles.

    Returns (tiles (n, C, by, bx) float32 row-major, ystart, xstart, (Ly, Lx) of the tiled image).
    ``augment``: an image smaller than a tile is zero-padded to it (bottom/right), tiles overlap by
    half and are flipped by :func:`transforms.augment_flip`.
    """
    C, Ly, Lx = img.shape
    if augment and (Ly < bsize or Lx < bsize):
        img = np.pad(img, ((0, 0), (0, max(0, bsize - Ly)), (0, max(0, bsize - Lx))))
        Ly, Lx = img.shape[-2:]
    ystart = transforms.tile_starts(Ly, bsize, augment, tile_overlap)
    xstart = transforms.tile_starts(Lx, bsize, augment, tile_overlap)
    by, bx = min(bsize, Ly), min(bsize, Lx)
    tiles = np.zeros((len(ystart) * len(xstart), C, by, bx), np.float32)
    for j, y0 in enumerate(ystart):
        for i, x0 in enumerate(xstart):
            t = img[:, y0:y0 + by, x0:x0 + bx]
            if augment:
                fy, fx = transforms.augment_flip(j, i)
                t = t[:, ::-1] if fy else t
                t = t[:, :, ::-1] if fx else t
            tiles[j * len(xstart) + i] = t
    return tiles, ystart, xstart, (Ly, Lx)


def blend_tiles(y: np.ndarray, ystart, xstart, shape: tuple[int, int], augment: bool) -> np.ndarray:
    """(n, nout, by, bx) tile outputs -> (nout, Ly, Lx): flips undone (dY / dX negated), tiles
    weighted by the sigmoid taper and averaged, as Cellpose 3's ``average_tiles``."""
    n, nout, by, bx = y.shape
    out = np.zeros((nout, *shape), np.float32)
    weight = np.zeros(shape)
    taper = transforms.taper_mask(by, bx)
    for j, y0 in enumerate(ystart):
        for i, x0 in enumerate(xstart):
            t = y[j * len(xstart) + i].copy()
            if augment:
                fy, fx = transforms.augment_flip(j, i)
                if fy:
                    t = t[:, ::-1]
                    t[0] *= -1
                if fx:
                    t = t[:, :, ::-1]
                    t[1] *= -1
            out[:, y0:y0 + by, x0:x0 + bx] += t * taper
            weight[y0:y0 + by, x0:x0 + bx] += taper
    out /= weight
    return out


def _forward(net: torch.nn.Module, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = next(net.parameters())
    with torch.inference_mode():
        y, style = net(torch.from_numpy(tiles).to(p.device, p.dtype))[:2]
    return y.float().cpu().numpy(), style.float().cpu().numpy()


def run_net(net: torch.nn.Module, imgs: np.ndarray, batch_size: int = 8, augment: bool = False,
            tile_overlap: float = 0.1, bsize: int = LEGACY_BSIZE, rsz: float | None = None,
            progress: Callable[[float, str], Any] | None = None,
            batches: AdaptiveBatch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a Cellpose 1-3 U-Net on a stack of images with Cellpose 3's tiling.

    Parameters
    ----------
    imgs : (N, Ly, Lx, nchan) float32 normalised network inputs.
    rsz : resize factor (images go to (int(Ly*rsz), int(Lx*rsz)) first), or None.
    batches : the eval's :class:`~cellpose_web.engine.memory.AdaptiveBatch` (None: one of ``batch_size``);
        a batch that runs out of GPU memory is halved and run again (same output).

    On a CPU the activations come from the heap (:func:`cellpose_web.engine.memory.reuse_freed_memory`):
    the same outputs to the bit, a third less CPU time (a batch of 8 tiles of 224^2 makes 51 MB
    feature maps, each of which glibc would otherwise map fresh from the kernel and zero).

    Returns
    -------
    yf : (N, Lyr, Lxr, nout) float32 [dY, dX, cellprob] at the resized size.
    styles : (N, S) float32 L2-normalised style vectors (sum over each image's tiles).
    """
    N, Ly0, Lx0, nchan = imgs.shape
    Lyr, Lxr = (int(Ly0 * rsz), int(Lx0 * rsz)) if rsz is not None else (Ly0, Lx0)
    if Lyr < 1 or Lxr < 1:
        raise CellposeWebError(f"the diameter makes the image {Lyr} x {Lxr} pixels; use a smaller diameter")
    ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(Lyr, Lxr)
    yf = styles = None

    def tiles_of(b: int):
        img = imgs[b] if rsz is None else transforms.resize_image(imgs[b], rsz=rsz)
        img = np.pad(np.asarray(img).transpose(2, 0, 1), ((0, 0), (ypad1, ypad2), (xpad1, xpad2)))
        return make_tiles(img, bsize, augment, tile_overlap), img.shape[-2:]

    device = next(net.parameters()).device
    batches = batches or AdaptiveBatch(batch_size, device)
    forward = lambda tiles: _forward(net, tiles)  # noqa: E731
    ntiles = tiles_of(0)[0][0].shape[0]
    group = max(1, batch_size // ntiles)  # whole images per batch, as Cellpose 3 (small planes of a stack)
    for g0 in range(0, N, group):
        made = [tiles_of(b) for b in range(g0, min(N, g0 + group))]
        batch = np.concatenate([t[0][0] for t in made])
        outs, sts = [], []
        with memory.reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext():
            for j in range(0, batch.shape[0], batch_size):
                y, s = batches.run(forward, batch[j:j + batch_size])
                outs.append(y)
                sts.append(s)
        ya, sa = np.concatenate(outs), np.concatenate(sts)
        for i, ((_, ystart, xstart, tiled), (Lyp, Lxp)) in enumerate(made):
            full = blend_tiles(ya[i * ntiles:(i + 1) * ntiles], ystart, xstart, tiled, augment)[:, :Lyp, :Lxp]
            style = sa[i * ntiles:(i + 1) * ntiles].sum(axis=0)
            style /= (style ** 2).sum() ** 0.5
            if yf is None:
                yf = np.zeros((N, Lyr, Lxr, full.shape[0]), np.float32)
                styles = np.zeros((N, style.shape[0]), np.float32)
            yf[g0 + i] = full[:, ypad1:ypad1 + Lyr, xpad1:xpad1 + Lxr].transpose(1, 2, 0)
            styles[g0 + i] = style
        if progress is not None:
            progress(min(N, g0 + group) / N, "running the network")
    return yf, styles


def run_3D(net: torch.nn.Module, imgs: np.ndarray, batch_size: int = 8, augment: bool = False,
           tile_overlap: float = 0.1, bsize: int = LEGACY_BSIZE,
           progress: Callable[[float, str], Any] | None = None,
           batches: AdaptiveBatch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the net on the YX, ZY and ZX planes of a (Z, Y, X, nchan) stack and sum the views
    (``batches`` as in :func:`run_net`, shared by the three views).

    Returns (Z, Y, X, 4) float32 [dZ, dY, dX, cellprob] and the styles of the last view's planes
    (as Cellpose 3).
    """
    perms = [(0, 1, 2, 3), (1, 0, 2, 3), (2, 0, 1, 3)]
    inv = [(0, 1, 2), (1, 0, 2), (1, 2, 0)]
    chans = [(1, 2), (0, 2), (0, 1)]
    yf = np.zeros((*imgs.shape[:-1], 4), np.float32)
    style = None
    batches = batches or AdaptiveBatch(batch_size, next(net.parameters()).device)
    for p in range(3):
        sub = None if progress is None else (lambda f, m, p=p: progress((p + f) / 3, m))
        y, style = run_net(net, np.ascontiguousarray(imgs.transpose(perms[p])), batch_size=batch_size,
                           augment=augment, tile_overlap=tile_overlap, bsize=bsize, progress=sub, batches=batches)
        yf[..., -1] += y[..., -1].transpose(inv[p])
        for j in range(2):
            yf[..., chans[p][j]] += y[..., j].transpose(inv[p])
    return yf, style


# --------------------------------------------------------------------------------------------
# Cellpose 3's flow check (its CPU flows: per-object diffusion in float64)
# --------------------------------------------------------------------------------------------
#: objects stepped together per stack on a GPU (values; float64): large stacks keep the number of
#: kernel launches per step low, where on a CPU small stacks keep them in the caches
DEVICE_MAX_ELEMENTS = 1 << 22


def masks_to_flows(masks: np.ndarray, max_elements: int | None = None, device: Any = None,
                   use_torch: bool | None = None) -> np.ndarray:
    """Unit flows (2, Y, X) float64 of a 2D label image as Cellpose 3 computes them on a CPU.

    Each object diffuses heat from its centre pixel (the mask pixel nearest its mean) inside its
    bounding box plus a 1-pixel border, for 2 * (box height + box width + 4) steps of the 3x3 mean
    (sum of the 9 neighbours in Cellpose's order, times 1/9) on its own pixels; the flow is the
    central difference of the heat, normalised.

    Objects with similar step counts are stepped together in padded stacks of at most
    ``max_elements`` values (default: 2^15 on a CPU, small enough to stay in its caches - 2^18
    took 1.4x as long; ``DEVICE_MAX_ELEMENTS`` on a GPU), ordered by steps so that the objects still
    stepping are always a leading slice of the stack (no copies); each step writes the new heat into
    a second buffer. Every value is computed as Cellpose 3 computes it, in float64 with the same
    additions in the same order, so the flows are the same to the bit on a CPU (numpy) and on a GPU
    (``device``: the steps run there in torch; IEEE float64 additions and products round the same).
    ``use_torch`` (default: on a CUDA GPU; MPS has no float64) runs the steps in torch on ``device``,
    also on a CPU (tests).
    """
    from scipy.ndimage import find_objects

    masks = np.asarray(masks)
    device = torch.device("cpu") if device is None else torch.device(device)
    # float64 steps: on CUDA's device; MPS has no float64, so there (as on the CPU) numpy runs them
    on_device = device.type == "cuda" if use_torch is None else bool(use_torch)
    if max_elements is None:
        max_elements = DEVICE_MAX_ELEMENTS if on_device else 1 << 15
    mu = np.zeros((2, *masks.shape), np.float64)
    boxes = []
    for i, sl in enumerate(find_objects(masks)):
        if sl is not None:
            sr, sc = sl
            boxes.append((2 * ((sr.stop - sr.start + 2) + (sc.stop - sc.start + 2)), i + 1, sr, sc))
    boxes.sort(key=lambda b: b[0])
    k = 0
    while k < len(boxes):
        group = []
        hmax = wmax = 0
        while k < len(boxes):
            _, lab, sr, sc = boxes[k]
            H, W = max(hmax, sr.stop - sr.start + 2), max(wmax, sc.stop - sc.start + 2)
            if group and (len(group) + 1) * (H + 2) * (W + 2) > max_elements:
                break
            group.append(boxes[k])
            hmax, wmax = H, W
            k += 1
        group.reverse()  # most steps first: the objects still stepping are group[:n]
        n = len(group)
        # box + 1-pixel border, + one more zero ring (the neighbours of the border)
        ninth = np.zeros((n, hmax, wmax), np.float64)  # 1/9 on the object's own pixels, 0 elsewhere
        steps = np.zeros(n, np.int64)
        centre = np.zeros((n, 2), np.int64)
        for j, (nsteps, lab, sr, sc) in enumerate(group):
            m = masks[sr, sc] == lab
            ninth[j, 1:1 + m.shape[0], 1:1 + m.shape[1]] = m * (1 / 9.)
            y, x = np.nonzero(m)
            y, x = y + 1, x + 1  # coordinates in the box with its 1-pixel border
            i = ((x - x.mean()) ** 2 + (y - y.mean()) ** 2).argmin()
            centre[j] = (y[i] + 1, x[i] + 1)  # + the extra zero ring
            steps[j] = nsteps
        heat = (_diffuse_stack_torch if on_device else _diffuse_stack_numpy)(ninth, steps, centre, device)
        for j, (nsteps, lab, sr, sc) in enumerate(group):
            T = heat[j]
            m = ninth[j, 1:1 + sr.stop - sr.start, 1:1 + sc.stop - sc.start] > 0
            y, x = np.nonzero(m)
            Y, X = y + 2, x + 2
            mu[0, sr.start + y, sc.start + x] = T[Y + 1, X] - T[Y - 1, X]
            mu[1, sr.start + y, sc.start + x] = T[Y, X + 1] - T[Y, X - 1]
    mu /= (1e-60 + np.sqrt((mu ** 2).sum(axis=0)))
    return mu


def _neighbour_sum(T, out, add) -> None:
    """Cellpose 3's 3x3 sum of the padded heat stack ``T`` (n, h + 2, w + 2) into ``out`` (n, h, w):
    c + up + down + left + right + ul + ur + dl + dr, added left to right (numpy arrays with
    ``np.add`` or tensors with ``torch.add``: the same additions in the same order)."""
    add(T[:, 1:-1, 1:-1], T[:, :-2, 1:-1], out=out)
    for view in (T[:, 2:, 1:-1], T[:, 1:-1, :-2], T[:, 1:-1, 2:], T[:, :-2, :-2], T[:, :-2, 2:], T[:, 2:, :-2],
                 T[:, 2:, 2:]):
        out += view


def _diffuse_stack_numpy(ninth: np.ndarray, steps: np.ndarray, centre: np.ndarray, device: Any) -> np.ndarray:
    """Heat (n, h + 2, w + 2) of a stack of objects after each one's own number of steps (``steps``
    decreasing), in numpy: see :func:`masks_to_flows`."""
    n, hmax, wmax = ninth.shape
    bufs = [np.zeros((n, hmax + 2, wmax + 2), np.float64) for _ in range(2)]
    acc = np.empty((n, hmax, wmax), np.float64)
    jj = np.arange(n)
    for t in range(int(steps[0])):
        a = int(np.count_nonzero(steps > t))  # steps are in decreasing order
        T, out, s = bufs[t % 2][:a], bufs[(t + 1) % 2][:a], acc[:a]
        T[jj[:a], centre[:a, 0], centre[:a, 1]] += 1
        _neighbour_sum(T, s, np.add)
        # times 1/9 on the object's own pixels (the same product); the others stay 0 (sum * 0.0 is +0.0)
        np.multiply(s, ninth[:a], out=out[:, 1:-1, 1:-1])
    # each object's heat is in the buffer its last step wrote
    return np.stack([bufs[int(steps[j]) % 2][j] for j in range(n)])


def _diffuse_stack_torch(ninth: np.ndarray, steps: np.ndarray, centre: np.ndarray, device: Any) -> np.ndarray:
    """:func:`_diffuse_stack_numpy` with the steps in torch on ``device`` (the same float64 operations
    in the same order); one upload and one download per stack, no host sync inside the loop."""
    n, hmax, wmax = ninth.shape
    ninth_t = torch.from_numpy(ninth).to(device)
    bufs = [torch.zeros((n, hmax + 2, wmax + 2), dtype=torch.float64, device=device) for _ in range(2)]
    acc = torch.empty((n, hmax, wmax), dtype=torch.float64, device=device)
    flat_centre = torch.from_numpy(np.arange(n) * (hmax + 2) * (wmax + 2) + centre[:, 0] * (wmax + 2)
                                   + centre[:, 1]).to(device)
    one = torch.ones(n, dtype=torch.float64, device=device)
    active = [int(np.count_nonzero(steps > t)) for t in range(int(steps[0]))]
    for t, a in enumerate(active):
        T, out, s = bufs[t % 2][:a], bufs[(t + 1) % 2][:a], acc[:a]
        T.view(-1).index_add_(0, flat_centre[:a], one[:a])  # the leading slice is contiguous
        _neighbour_sum(T, s, torch.add)
        torch.mul(s, ninth_t[:a], out=out[:, 1:-1, 1:-1])
    last = torch.from_numpy(steps % 2).to(device).view(n, 1, 1)
    return torch.where(last == 0, bufs[0], bufs[1]).cpu().numpy()


def flow_error(masks: np.ndarray, dP: np.ndarray, device: Any = None) -> np.ndarray:
    """Cellpose 3's flow error per object: mean over its pixels of the squared difference between
    its own flows (:func:`masks_to_flows`, on ``device`` when that is a GPU) and the network's
    ``dP / 5``, summed over Y and X. (N,)."""
    from scipy.ndimage import mean

    masks = np.asarray(masks)
    mu = masks_to_flows(masks, device=device)
    n = int(masks.max())
    errors = np.zeros(n)
    for i in range(2):
        errors += mean((mu[i] - np.asarray(dP[i]) / 5.) ** 2, masks, index=np.arange(1, n + 1))
    return errors


# --------------------------------------------------------------------------------------------
# one image or stack
# --------------------------------------------------------------------------------------------
def _masks(shape, dP, cellprob, *, niter, cellprob_threshold, flow_threshold, min_size, max_size_fraction,
           stitch_threshold, do_3D, interp, device, progress) -> np.ndarray:
    """Cellpose 3's ``_compute_masks``: dynamics at the network's size, masks resized (nearest) to
    ``shape`` then holes filled and ``min_size`` applied; planes stitched when asked. In 2D the Euler
    steps interpolate in pixel coordinates (Cellpose 3 on a CPU) on every device, so results do not
    depend on the device; in 3D they use ``grid_sample`` as Cellpose 3 does."""
    nimg, Ly, Lx = shape[:3]
    if do_3D:
        m = dynamics.compute_masks(dP, cellprob, niter=niter, cellprob_threshold=cellprob_threshold,
                                   flow_threshold=flow_threshold, min_size=-1, max_size_fraction=max_size_fraction,
                                   do_3D=True, device=device)
        if tuple(m.shape) != tuple(shape[:3]):
            m = transforms.resize_image_3d(m, shape[:3], interpolation="nearest", no_channels=True)
        return dynamics.fill_holes_and_remove_small_masks(m, min_size=min_size)
    per_plane_min = min_size if (stitch_threshold == 0 or nimg == 1) else -1
    out = []
    for i in range(nimg):
        m = dynamics.compute_masks(dP[:, i], cellprob[i], niter=niter, cellprob_threshold=cellprob_threshold,
                                   flow_threshold=flow_threshold, min_size=-1, max_size_fraction=max_size_fraction,
                                   device=device, interp="pixel" if interp is True else interp,
                                   flow_error_fn=functools.partial(flow_error, device=device))
        if m.shape != (Ly, Lx):
            m = transforms.resize_image(m, Ly, Lx, interpolation="nearest")
        out.append(dynamics.fill_holes_and_remove_small_masks(np.asarray(m), min_size=per_plane_min))
        if progress is not None:
            progress((i + 1) / nimg, "computing masks")
    if nimg == 1:
        return out[0]
    dtype = np.uint32 if any(m.dtype == np.uint32 for m in out) else np.uint16
    masks = np.stack([m.astype(dtype, copy=False) for m in out])
    if stitch_threshold > 0 and masks.any():
        masks = dynamics.stitch3D(masks, stitch_threshold=stitch_threshold)
        masks = dynamics.fill_holes_and_remove_small_masks(masks, min_size=min_size)
    elif stitch_threshold == 0:
        logger.warning("a stack was given but stitch_threshold=0 and do_3D=False: masks are made per plane")
    return masks


def eval_legacy(net: torch.nn.Module, x: np.ndarray, *, channels: tuple[int, int] | None, diam_mean: Any,
                diam_labels: Any, normalize_params: dict, diameter: float | None, rescale: float | None,
                resample: bool, flow_threshold: float, cellprob_threshold: float, do_3D: bool,
                anisotropy: float | None, flow3D_smooth: list[float] | None, stitch_threshold: float,
                min_size: int, max_size_fraction: float, niter: int | None, augment: bool, tile_overlap: float,
                bsize: int, batch_size: int, compute_masks: bool, interp: bool = True, device=None,
                progress: Callable[[float, str], Any] | None = None,
                batches: AdaptiveBatch | None = None) -> dict[str, Any]:
    """Segment one channels-last image or stack with Cellpose 3.1's semantics.

    Parameters
    ----------
    x : (N, Y, X, C) float32 (N planes / one image), channels last, not yet normalised.
    channels : (cyto, nucleus) or None, see :func:`select_channels`.
    diam_mean, diam_labels : from the weights (np.float32, as Cellpose 3 keeps them).
    normalize_params : the checked normalisation options (``normalize`` False skips them).
    batches : the network's :class:`~cellpose_web.engine.memory.AdaptiveBatch` (None: one of ``batch_size``).
    The other parameters are those of ``CellposeModel.eval``, already checked.

    Returns
    -------
    dict with masks (squeezed uint16/uint32 or zeros(0)), dP ((2, N, Y, X) or (3, Z, Y, X)),
    cellprob ((N, Y, X)), styles ((N, S), or (planes of the last 3D view, S)), rescale, niter, shape,
    timing ({"network": s, "masks": s}: the network with its resizing, then the masks step).
    """
    prog = progress or (lambda f, m="": None)
    x = select_channels(x, channels, nchan=int(getattr(net, "nchan", 2)))
    nimg = x.shape[0]
    shape = x.shape
    if diameter is not None and diameter > 0:
        rescale = diam_mean / diameter
    elif rescale is None:
        rescale = diam_mean / diam_labels
    params = dict(normalize_params)
    if params.get("normalize", True):
        if nimg > 1 and (stitch_threshold or do_3D):
            params["norm3D"] = True if do_3D else params.get("norm3D", True)
        elif nimg > 1:
            params["norm3D"] = False
        x = transforms.normalize_img(x, **params)
    elif params.get("invert"):
        raise CellposeWebError("invert needs normalisation on (normalize=True)")
    prog(0.02, "normalised")

    net_prog = lambda f, m: prog(0.02 + f * (0.78 if compute_masks else 0.98), m)  # noqa: E731
    Ly, Lx = shape[1:3]
    tic = time.perf_counter()
    if do_3D:
        Lz = shape[0]
        xs = x
        if rescale != 1.0 or (anisotropy is not None and anisotropy != 1.0):
            aniso = 1.0 if anisotropy is None else anisotropy
            new_shape = (int(Lz * aniso * rescale), int(Ly * rescale), int(Lx * rescale))
            if min(new_shape) < 1:
                raise CellposeWebError(f"anisotropy/diameter shrink the stack to {new_shape}; check them")
            xs = transforms.resize_image_3d(x, new_shape)
        yf, styles = run_3D(net, xs, batch_size=batch_size, augment=augment, tile_overlap=tile_overlap,
                            bsize=bsize, progress=net_prog, batches=batches)
        if resample and (rescale != 1.0 or Lz != yf.shape[0]):
            yf = transforms.resize_image_3d(yf, shape[:3])
        cellprob = yf[..., -1]
        dP = yf[..., :-1].transpose((3, 0, 1, 2))
        if flow3D_smooth is not None:
            from scipy.ndimage import gaussian_filter
            dP = gaussian_filter(dP, [0, *flow3D_smooth]).astype(np.float32, copy=False)
    else:
        yf, styles = run_net(net, x, batch_size=batch_size, augment=augment, tile_overlap=tile_overlap,
                             bsize=bsize, rsz=rescale if rescale != 1.0 else None, progress=net_prog,
                             batches=batches)
        if resample and rescale != 1.0:
            yf = transforms.resize_image(yf, Ly, Lx)
        cellprob = yf[..., 2]
        dP = yf[..., :2].transpose((3, 0, 1, 2))
    dP, cellprob = np.ascontiguousarray(dP), np.ascontiguousarray(cellprob)
    timing = {"network": time.perf_counter() - tic}

    tic = time.perf_counter()
    if niter is None or niter == 0:
        niter = 200 if not resample else (1 / rescale * 200)  # Cellpose 3: truncated to whole steps
    niter = int(np.uint32(niter))
    if compute_masks:
        masks = _masks(shape, dP, cellprob, niter=niter, cellprob_threshold=cellprob_threshold,
                       flow_threshold=flow_threshold, min_size=min_size, max_size_fraction=max_size_fraction,
                       stitch_threshold=stitch_threshold, do_3D=do_3D, interp=interp, device=device,
                       progress=lambda f, m: prog(0.8 + 0.2 * f, m))
    else:
        masks = np.zeros(0)
    timing["masks"] = time.perf_counter() - tic
    prog(1.0, "done")
    return {"masks": masks, "dP": dP, "cellprob": cellprob, "styles": styles, "rescale": float(rescale),
            "niter": niter, "shape": tuple(shape), "normalize": params, "timing": timing}


# --------------------------------------------------------------------------------------------
# size model
# --------------------------------------------------------------------------------------------
from cellpose_web.registry.size_model import SIZE_KEYS, load_size_model  # noqa: E402,F401 - where size files are read


class SizeModel:
    """Cellpose 3's diameter estimate for a U-Net model: a linear regression from the style vector,
    then one segmentation at that size and the median diameter of its masks.

    Parameters
    ----------
    cp_model : a ``CellposeModel`` with a Cellpose 1-3 U-Net.
    pretrained_size : path to the size model (``.npy``); None = the one registered with the model.
    """

    def __init__(self, cp_model: Any, device: Any = None, pretrained_size: str | os.PathLike | None = None,
                 **kwargs: Any):
        if not getattr(getattr(cp_model, "net", None), "legacy", False):
            raise CellposeWebError("SizeModel needs a Cellpose 1-3 U-Net model (cyto3, cyto2, cyto, nuclei, cp_cyto "
                                   "or your own); other models estimate the diameter in eval(diameter=None)")
        self.cp = cp_model
        self.device = cp_model.device
        if pretrained_size is None:
            pretrained_size = getattr(cp_model, "size_model_path", None)
            if pretrained_size is None:
                raise CellposeWebError(f"model {getattr(cp_model, 'model_name', '')!r} has no size model; give "
                                       "pretrained_size=PATH (the *_size.npy saved with it)")
        self.pretrained_size = str(pretrained_size)
        self.params = load_size_model(pretrained_size, style_dim=int(getattr(cp_model.net, "style_dim", 256)))
        self.diam_mean = self.params["diam_mean"]

    def size_from_style(self, style: np.ndarray) -> float:
        """Diameter (px) predicted from one style vector (at least 5)."""
        p = self.params
        est = np.exp(p["A"] @ (np.asarray(style, np.float64) - p["smean"]).T + np.log(self.diam_mean) + p["ymean"])
        return float(np.maximum(5.0, est))

    def eval(self, x: Any, channels: Any = None, channel_axis: int | None = None, normalize: Any = True,
             invert: bool = False, augment: bool = False, batch_size: int | None = None, progress: Any = None):
        """Estimate object diameters.

        Parameters as ``CellposeModel.eval``; x is one 2D image or a list of them.

        Returns
        -------
        (diam, diam_style): the median mask diameter (px) after segmenting at the style estimate, and
        the style estimate alone; lists for a list input.
        """
        if isinstance(x, (list, tuple)):
            per = channels is not None and len(channels) == len(x) and all(
                isinstance(c, (list, tuple, np.ndarray)) and len(c) == 2 for c in channels)
            out = [self.eval(xi, channels=channels[i] if per else channels, channel_axis=channel_axis,
                             normalize=normalize, invert=invert, augment=augment, batch_size=batch_size)
                   for i, xi in enumerate(x)]
            return [d for d, _ in out], [s for _, s in out]
        if np.asarray(x).squeeze().ndim > 3:
            logger.warning("image is not 2D: cannot estimate the diameter")
            return self.diam_mean, self.diam_mean
        kw = dict(channels=channels, channel_axis=channel_axis, normalize=normalize, invert=invert,
                  augment=augment, batch_size=batch_size, resample=False)
        styles = self.cp.eval(x, compute_masks=False, **kw)[-1]
        diam_style = self.size_from_style(np.asarray(styles))
        if diam_style == 0 or np.isnan(diam_style):
            diam_style = self.diam_mean
        masks = self.cp.eval(x, compute_masks=True, rescale=self.diam_mean / diam_style if self.diam_mean > 0 else 1,
                             diameter=None, interp=False, **kw)[0]
        diam = dynamics.diameters(masks)[0]
        diam = self.diam_mean if (diam == 0 or np.isnan(diam)) else diam
        return float(diam), float(diam_style)
