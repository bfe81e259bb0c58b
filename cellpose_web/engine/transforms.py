"""Image transforms of the Cellpose 4 pipeline: channels, normalisation, resizing, padding, tiles.

Every function reproduces the reference behaviour (Cellpose 4.2) in numbers; see
``../shared/reference/CELLPOSE_FACTS.md`` section 2. Array conventions: (Y, X) single image,
(Y, X, C) channels last, (Z, Y, X, C) stacks; tiles are (C, Y, X) / (B, C, Y, X).

Resizing reproduces OpenCV ``INTER_LINEAR`` (half-pixel centres, no antialiasing, the sample
position computed in double precision and rounded to float32 as OpenCV does) and
``INTER_NEAREST`` (``floor(dst * in/out)``) with plain numpy/torch gathers, so it runs on a GPU
tensor as well as on a numpy array.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cellpose_web.engine.device import tensor_to_numpy
from cellpose_web.errors import CellposeWebError

logger = logging.getLogger(__name__)

__all__ = [
    "convert_image", "normalize99", "normalize99_tile", "percentile_stretch", "normalize_img", "smooth_sharpen_img",
    "resize_image", "resize_image_3d", "resize_weights", "get_pad_yx", "pad_image_ND", "tile_starts",
    "taper_mask", "augment_flip",
    "random_rotate_and_resize",
]


# --------------------------------------------------------------------------------------------
# channels
# --------------------------------------------------------------------------------------------
def _axis(ax: int | None, ndim: int, name: str, shape) -> int | None:
    if ax is None:
        return None
    try:
        ax = int(ax)
    except (TypeError, ValueError):
        raise CellposeWebError(f"{name} must be an integer axis index, got {ax!r}") from None
    if ax < -ndim or ax >= ndim:
        raise CellposeWebError(
            f"{name}={ax} does not exist: the image has shape {tuple(shape)} ({ndim} axes, "
            f"valid values {-ndim}..{ndim - 1}). Leave it empty to let cellpose-web guess.")
    return ax % ndim


def _keep3(x: np.ndarray, max_channels: int | None = 3) -> np.ndarray:
    if max_channels is None:
        return x
    if x.shape[-1] > 3:
        logger.warning("more than 3 channels provided (%d); Cellpose 4 segments on the first 3 channels only",
                       x.shape[-1])
        x = x[..., :3]
    return x


def convert_image(x, channel_axis: int | None = None, z_axis: int | None = None,
                  do_3D: bool = False, max_channels: int | None = 3) -> np.ndarray:
    """Reorder an image to channels last with at most 3 channels (Cellpose 4.2 rules).

    Parameters
    ----------
    x : array (Y, X), (Y, X, C) / (C, Y, X), a batch (N, Y, X, C) / (N, C, Y, X), or a stack.
    channel_axis : axis of the channels; guessed when None (2D: axis 0 if shape[0] < shape[-1]
        else the last axis; 4D batch: axis 1 if shape[1] < shape[-1] else the last axis).
    z_axis : axis of Z for stacks; required with ``do_3D`` (also used for stitching).
    do_3D : treat the input as a volume: returns (Z, Y, X, C).
    max_channels : 3 (Cellpose 4) or None to keep every channel (Cellpose 1-3 ``channels`` pick them).

    Returns
    -------
    (Y, X, C), (N, Y, X, C) or (Z, Y, X, C) array, C <= 3 (more channels: the first 3 are kept,
    with a warning; fewer channels are not padded, the network treats missing ones as zeros).
    """
    if torch.is_tensor(x):
        x = tensor_to_numpy(x)
    x = np.asarray(x)
    ndim = x.ndim
    if ndim < 2 or ndim > 4:
        raise CellposeWebError(
            f"the image has {ndim} dimension(s) (shape {x.shape}); expected a 2D image (Y, X), a 2D image "
            "with channels (Y, X, C), a batch (N, Y, X, C) or a 3D stack (Z, Y, X[, C]).")
    if z_axis is not None and not do_3D:
        raise CellposeWebError(
            "z_axis was given but neither 3D segmentation (do_3D) nor stitching (stitch_threshold > 0) is on; "
            "set z_axis=None for 2D images, or turn on do_3D / stitch_threshold for a stack.")
    if do_3D:
        if ndim < 3:
            raise CellposeWebError(f"3D segmentation needs a stack (Z, Y, X) but the image has shape {x.shape}.")
        if z_axis is None:
            raise CellposeWebError("z_axis must be given for a 3D stack (for example z_axis=0 for (Z, Y, X)).")
        if channel_axis is None and ndim == 4:
            raise CellposeWebError(
                f"the stack has 4 dimensions {x.shape}; give channel_axis as well as z_axis "
                "(for example z_axis=0, channel_axis=3 for (Z, Y, X, C)).")
        z = _axis(z_axis, ndim, "z_axis", x.shape)
        if ndim == 3:
            x = x[..., None]
            c = 3
        else:
            c = _axis(channel_axis, ndim, "channel_axis", x.shape)
        if z == c:
            raise CellposeWebError(f"z_axis and channel_axis cannot be the same axis ({z}).")
        yx = [i for i in range(x.ndim) if i not in (z, c)]
        x = x.transpose(z, yx[0], yx[1], c)
        return _keep3(x, max_channels)

    if channel_axis is not None:
        if ndim == 2:
            raise CellposeWebError(
                f"channel_axis={channel_axis} was given but the image is 2D {x.shape} without channels; "
                "leave channel_axis empty.")
        if ndim == 4 and channel_axis in (0, -4):
            raise CellposeWebError(
                "channel_axis cannot be 0 for a 4D input: axis 0 is the image/plane axis of a batch.")
        c = _axis(channel_axis, ndim, "channel_axis", x.shape)
        zb = 0 if ndim == 4 else None
    elif ndim == 2:
        x = x[..., None]
        c, zb = 2, None
    elif ndim == 3:
        c, zb = (0 if x.shape[0] < x.shape[-1] else 2), None
    else:
        c, zb = (1 if x.shape[1] < x.shape[-1] else 3), 0
    yx = [i for i in range(x.ndim) if i != c and i != zb]
    if zb is None:
        x = x.transpose(yx[0], yx[1], c)
    else:
        x = x.transpose(zb, yx[0], yx[1], c)
    return _keep3(x, max_channels)


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
def _strided(X: np.ndarray, downsample: bool) -> np.ndarray:
    """The pixels percentiles are computed from (strided subsample above 224**3 pixels)."""
    if downsample and X.size > 224 ** 3:
        nskip = [max(1, s // 224) for s in X.shape]
        if X.ndim == 3:
            nskip[0] = max(1, X.shape[0] // 50)
        return X[tuple(slice(0, s, k) for s, k in zip(X.shape, nskip))]
    return X


def normalize99(Y: np.ndarray, lower: float = 1, upper: float = 99, copy: bool = True,
                downsample: bool = False) -> np.ndarray:
    """Scale so the ``lower`` percentile is 0 and the ``upper`` percentile is 1 (no clipping).

    float32 output (float64 input stays float64). If the two percentiles differ by 1e-3 or less
    the result is all zeros. ``downsample``: above 224**3 pixels the percentiles come from a
    strided subsample (stride dim // 224 per axis; Z stride Lz // 50 for (Z, Y, X)).
    """
    X = np.array(Y, copy=True) if copy else Y
    if X.dtype != np.float32 and X.dtype != np.float64:
        X = X.astype(np.float32)
    S = _strided(X, downsample)
    x01 = np.percentile(S, lower)
    x99 = np.percentile(S, upper)
    if x99 - x01 > 1e-3:
        X -= x01
        X /= (x99 - x01)
    else:
        X[:] = 0
    return X


def percentile_stretch(image: np.ndarray, lower: float = 1.0, upper: float = 99.0, *, clip: bool = True,
                       max_samples: int | None = None) -> np.ndarray:
    """Scale an image of any shape so its `lower` percentile is 0 and its `upper` percentile 1.

    The one stretch for everything a person looks at or thresholds (display, the ``_seg.npy``
    cell-probability picture, puncta detection). The models' input normalisation is
    :func:`normalize99` / :func:`normalize99_tile`, Cellpose's own rule (no clipping, all pixels
    zero when flat), kept apart because its numbers must equal Cellpose's.

    Parameters
    ----------
    image : ndarray, any shape, any real dtype
    lower, upper : float
        Percentiles (0-100) mapped to 0 and 1.
    clip : bool
        Clip the result to [0, 1].
    max_samples : int, optional
        Compute the percentiles from every k-th finite value so that at most about this many are
        used (a display of a large image need not sort all of it); None uses every value.

    Returns
    -------
    ndarray, float32, the shape of `image`
        NaN and infinite pixels are left out of the percentiles and become 0. When the two
        percentiles are equal, the minimum and maximum are used instead; an image with one value
        becomes all zeros.
    """
    x = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    values = x.ravel() if all_finite else x[finite]
    if values.size == 0:
        return np.zeros(x.shape, np.float32)
    if max_samples:
        values = values[:: max(1, values.size // int(max_samples))]
    low, high = (float(v) for v in np.percentile(values, [lower, upper]))
    if high - low < 1e-6:
        low, high = float(values.min()), float(values.max())
        if high - low < 1e-6:
            return np.zeros(x.shape, np.float32)
    # float64 arithmetic then float32, so rounding (and a display's bytes) do not depend on the size
    out = ((x - np.float64(low)) / np.float64(high - low)).astype(np.float32)
    if not all_finite:
        out[~finite] = 0
    if clip:
        np.clip(out, 0, 1, out=out)
    return out


def _gaussian_kernel(sigma: float, Ly: int, Lx: int, device) -> torch.Tensor:
    # Cellpose's kernel grid: both axes span [-Ly/2, Ly/2 + 1] (Lx points along X)
    y = torch.linspace(-Ly / 2, Ly / 2 + 1, Ly, device=device)
    x = torch.linspace(-Ly / 2, Ly / 2 + 1, Lx, device=device)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    k = torch.exp(-(yy ** 2 + xx ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def smooth_sharpen_img(img: np.ndarray, smooth_radius: float = 6, sharpen_radius: float = 12,
                       device=None, is3D: bool = False) -> np.ndarray:
    """Gaussian low-pass (smooth_radius) and/or surround-subtraction high-pass (sharpen_radius).

    img : (Y, X), (Y, X, C) or (Z, Y, X, C) float. FFT filtering per plane and channel.
    """
    device = torch.device("cpu") if device is None else device
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(device)
    shape = t.shape
    is1c = t.ndim == 2 or (is3D and t.ndim == 3)
    if is1c:
        t = t.unsqueeze(-1)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    Lz, Ly, Lx, nchan = t.shape
    if smooth_radius > 0:
        kernel = _gaussian_kernel(smooth_radius, Ly, Lx, device)
        if sharpen_radius > 0:
            kernel = kernel - _gaussian_kernel(sharpen_radius, Ly, Lx, device)
    elif sharpen_radius > 0:
        kernel = -_gaussian_kernel(sharpen_radius, Ly, Lx, device)
        kernel[Ly // 2, Lx // 2] = 1
    else:
        return np.asarray(img, dtype=np.float32)
    fhp = torch.fft.fft2(kernel)
    planes = t.permute(0, 3, 1, 2)  # (Z, C, Y, X)
    filt = torch.real(torch.fft.ifft2(torch.fft.fft2(planes) * torch.conj(fhp)))
    filt = torch.fft.fftshift(filt, dim=(-2, -1))
    return filt.permute(0, 2, 3, 1).reshape(shape).cpu().numpy()


def normalize99_tile(img: np.ndarray, blocksize: int = 100, lower: float = 1., upper: float = 99.,
                     tile_overlap: float = 0.1, norm3D: bool = False, smooth3D: float = 1,
                     is3D: bool = False) -> np.ndarray:
    """Percentile normalisation computed in overlapping blocks (``tile_norm_blocksize``).

    img : (Y, X), (Y, X, C) or (Z, Y, X, C). Percentiles per block (10% overlap), blocks whose
    range is <= 1e-3 take their nearest valid neighbour's values, the block grids are gaussian
    smoothed (sigma 1 block, over the same axes as Cellpose), averaged over Z (norm3D or a single
    plane) and bilinearly upsampled to the image size.
    """
    from scipy.ndimage import gaussian_filter1d

    img = np.asarray(img, dtype=np.float32)
    is1c = img.ndim == 2 or (is3D and img.ndim == 3)
    is3D = img.ndim > 3 or (is3D and img.ndim == 3)
    x = img[..., None] if is1c else img
    x = x[None] if x.ndim == 3 else x
    Lz, Ly, Lx, nchan = x.shape
    tile_overlap = min(0.5, max(0.05, tile_overlap))
    by, bx = int(min(blocksize, Ly)), int(min(blocksize, Lx))
    ny = 1 if Ly <= blocksize else int(np.ceil((1. + 2 * tile_overlap) * Ly / blocksize))
    nx = 1 if Lx <= blocksize else int(np.ceil((1. + 2 * tile_overlap) * Lx / blocksize))
    ys = np.linspace(0, Ly - by, ny).astype(int)
    xs = np.linspace(0, Lx - bx, nx).astype(int)
    # (Lz, ny, nx, by, bx, nchan) block stack
    blocks = np.stack([np.stack([x[:, y0:y0 + by, x0:x0 + bx] for x0 in xs], axis=1) for y0 in ys], axis=1)
    p01 = np.percentile(blocks, lower, axis=(-3, -2)).astype(np.float32)  # (Lz, ny, nx, nchan)
    p99 = np.percentile(blocks, upper, axis=(-3, -2)).astype(np.float32)
    del blocks
    for z in range(Lz):
        for c in range(nchan):
            bad = p99[z, :, :, c] - p01[z, :, :, c] < 1e-3
            nbad = int(bad.sum())
            if 0 < nbad < bad.size:
                fv, fn = np.nonzero(bad), np.nonzero(~bad)
                nn_ = ((fv[0] - fn[0][:, None]) ** 2 + (fv[1] - fn[1][:, None]) ** 2).argmin(axis=0)
                p01[z, fv[0], fv[1], c] = p01[z, fn[0][nn_], fn[1][nn_], c]
                p99[z, fv[0], fv[1], c] = p99[z, fn[0][nn_], fn[1][nn_], c]
            elif nbad == bad.size:
                p01[z, :, :, c] = 0
                p99[z, :, :, c] = 1
    # Cellpose smooths axes 0 and 1 of the (Z, ny, nx, C) grid, then axis 1 again for norm3D
    for a in range(2):
        p01 = gaussian_filter1d(p01, 1, axis=a)
        p99 = gaussian_filter1d(p99, 1, axis=a)
    if norm3D:
        s3 = 1 if smooth3D == 0 else smooth3D
        p01 = gaussian_filter1d(p01, s3, axis=1)
        p99 = gaussian_filter1d(p99, s3, axis=1)
    if not norm3D and Lz > 1:
        lo = np.stack([resize_image(p01[z], Ly, Lx) for z in range(Lz)])
        hi = np.stack([resize_image(p99[z], Ly, Lx) for z in range(Lz)])
        if (hi - lo).min() < 1e-3:
            raise CellposeWebError("per-plane tiled normalisation failed: some planes are too sparse; "
                                   "use norm3D=True or tile_norm_blocksize=0")
    else:
        lo = resize_image(p01.mean(axis=0), Ly, Lx)[None]
        hi = resize_image(p99.mean(axis=0), Ly, Lx)[None]
    out = (x - lo) / (hi - lo)
    if is1c:
        out = out[..., 0]
    if not is3D:
        out = out[0]
    return out.astype(np.float32)


def normalize_img(img: np.ndarray, normalize: bool = True, norm3D: bool = True, invert: bool = False,
                  lowhigh=None, percentile=(1., 99.), sharpen_radius: float = 0, smooth_radius: float = 0,
                  tile_norm_blocksize: int = 0, tile_norm_smooth3D: float = 1, axis: int = -1) -> np.ndarray:
    """Normalise each channel of an image with >= 3 dims (channels on ``axis``), Cellpose 4.2 rules.

    img : (Y, X, C) or (Z, Y, X, C) (channels last by default). Per channel: the ``percentile``
    pair (default 1, 99) maps to 0 and 1 (:func:`normalize99`, strided subsample above 224**3
    pixels), or ``lowhigh`` ((2,) or (C, 2)) gives the values directly; channels that are constant
    are set to 0. ``norm3D=False`` normalises every Z plane on its own. ``tile_norm_blocksize>0``
    normalises in blocks; ``sharpen_radius`` / ``smooth_radius`` filter before the percentiles;
    ``invert`` maps x -> 1 - x on normalised channels. Returns float32, same shape.
    """
    img = np.asarray(img)
    if img.ndim < 3:
        raise CellposeWebError("normalize_img needs an image with a channel axis (at least 3 dimensions)")
    x = img if img.dtype == np.float32 else img.astype(np.float32)
    moved = axis != -1 and axis != x.ndim - 1
    if moved:
        x = np.moveaxis(x, axis, -1)
    nchan = x.shape[-1]
    if lowhigh is not None:
        lowhigh = np.asarray(lowhigh, dtype=np.float64)
        if lowhigh.shape == (2,):
            lowhigh = np.tile(lowhigh, (nchan, 1))
        elif lowhigh.shape != (nchan, 2):
            raise CellposeWebError(f"lowhigh must be two numbers [low, high] or one pair per channel "
                                   f"(shape ({nchan}, 2)); got shape {lowhigh.shape}")
        if np.any(lowhigh[:, 1] <= lowhigh[:, 0]):
            raise CellposeWebError("lowhigh: the high value must be larger than the low value")
    if percentile is None:
        percentile = (1.0, 99.0)
    else:
        try:
            percentile = (float(percentile[0]), float(percentile[1]))
        except (TypeError, ValueError, IndexError):
            raise CellposeWebError(f"percentile must be two numbers (low, high), got {percentile!r}") from None
        if not (0 <= percentile[0] < percentile[1] <= 100):
            raise CellposeWebError(f"percentile must satisfy 0 <= low < high <= 100, got {percentile}")

    cgood = np.zeros(nchan, bool)
    if lowhigh is not None:
        x = x.copy() if x is img else x
        for c in range(nchan):
            x[..., c] -= lowhigh[c, 0]
            x[..., c] /= (lowhigh[c, 1] - lowhigh[c, 0])
            cgood[c] = True
    else:
        if sharpen_radius > 0 or smooth_radius > 0:
            x = smooth_sharpen_img(x, sharpen_radius=sharpen_radius, smooth_radius=smooth_radius)
        if tile_norm_blocksize > 0:
            x = normalize99_tile(x, blocksize=tile_norm_blocksize, lower=percentile[0], upper=percentile[1],
                                 smooth3D=tile_norm_smooth3D, norm3D=norm3D)
            cgood[:] = True
        elif normalize:
            x = x.copy() if x is img else x
            if x.ndim == 3 or norm3D:
                for c in range(nchan):
                    if np.ptp(x[..., c]) > 0.:
                        x[..., c] = normalize99(x[..., c], lower=percentile[0], upper=percentile[1],
                                                copy=False, downsample=True)
                        cgood[c] = True
            else:
                for z in range(x.shape[0]):
                    for c in range(nchan):
                        if np.ptp(x[z, ..., c]) > 0.:
                            x[z, ..., c] = normalize99(x[z, ..., c], lower=percentile[0], upper=percentile[1],
                                                       copy=False, downsample=True)
                            cgood[c] = True
    if invert:
        if lowhigh is not None or tile_norm_blocksize > 0 or normalize:
            x = x.copy() if x is img else x
            for c in range(nchan):
                if cgood[c]:
                    x[..., c] = 1 - x[..., c]
        else:
            raise CellposeWebError("invert needs normalisation on (normalize=True)")
    if not cgood.all():
        x = x.copy() if x is img else x
        x[..., ~cgood] = 0
    if moved:
        x = np.moveaxis(x, -1, axis)
    return x


# --------------------------------------------------------------------------------------------
# resizing (OpenCV INTER_LINEAR / INTER_NEAREST semantics)
# --------------------------------------------------------------------------------------------
def resize_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps along one axis: (i0, i1, w0, w1), out = w0*a[i0] + w1*a[i1].

    Sample position (dst + 0.5) * n_in / n_out - 0.5 in double precision, clamped at the borders.
    """
    scale = 1.0 / (n_out / n_in)
    f = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(f).astype(np.int64)
    w = f - i0
    lo = i0 < 0
    w[lo], i0[lo] = 0, 0
    hi = i0 >= n_in - 1
    w[hi], i0[hi] = 0, n_in - 1
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (1.0 - w).astype(np.float32), w.astype(np.float32)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    scale = 1.0 / (n_out / n_in)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float64) * scale).astype(np.int64), n_in - 1)


def _resize_axis(a, axis: int, n_out: int, nearest: bool):
    """Resize numpy array or torch tensor ``a`` along ``axis`` to ``n_out``."""
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    is_t = torch.is_tensor(a)
    if nearest:
        idx = _nearest_index(n_in, n_out)
        if is_t:
            return a.index_select(axis, torch.from_numpy(idx).to(a.device))
        return np.take(a, idx, axis=axis)
    i0, i1, w0, w1 = resize_weights(n_in, n_out)
    shape = [1] * a.ndim
    shape[axis] = n_out
    if is_t:
        dev = a.device
        w0_t = torch.from_numpy(w0).to(dev, a.dtype).view(shape)
        w1_t = torch.from_numpy(w1).to(dev, a.dtype).view(shape)
        return (a.index_select(axis, torch.from_numpy(i0).to(dev)) * w0_t
                + a.index_select(axis, torch.from_numpy(i1).to(dev)) * w1_t)
    out = np.take(a, i0, axis=axis) * w0.reshape(shape)
    out += np.take(a, i1, axis=axis) * w1.reshape(shape)
    return out


def resize_yx(a, Ly: int, Lx: int, y_axis: int, nearest: bool = False):
    """Resize the Y and X axes of an array or tensor to (Ly, Lx), as ``cv2.resize`` does.

    Parameters
    ----------
    a : numpy array or torch tensor; axis ``y_axis`` is Y and ``y_axis + 1`` is X, e.g. (Y, X, C)
        with y_axis=0 or (N, C, Y, X) with y_axis=2.
    nearest : nearest-neighbour (labels) instead of bilinear (images, returned as float).
    """
    if Ly <= 0 or Lx <= 0:
        raise CellposeWebError(
            f"resizing to {Ly} x {Lx} pixels is impossible: the diameter (or anisotropy) makes the image "
            "smaller than one pixel; use a smaller diameter.")
    is_t = torch.is_tensor(a)
    if not nearest and not is_t and a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if not nearest and is_t and not a.is_floating_point():
        a = a.float()
    # OpenCV interpolates along X first, then Y
    a = _resize_axis(a, y_axis + 1, Lx, nearest)
    a = _resize_axis(a, y_axis, Ly, nearest)
    return a


def resize_image(img0, Ly: int | None = None, Lx: int | None = None, rsz=None,
                 interpolation: str = "linear", no_channels: bool = False):
    """Resize (Y, X), (Y, X, C), (Z, Y, X, C) or, with ``no_channels``, (Z, Y, X) to (Ly, Lx).

    Same numbers as ``cv2.resize`` with INTER_LINEAR (default) or INTER_NEAREST
    (``interpolation="nearest"``). ``rsz`` (float or [ry, rx]) gives the size as int(L * r)
    when Ly is None. Works on numpy arrays and on torch tensors (any device).
    """
    if Ly is None and rsz is None:
        raise ValueError("resize_image needs (Ly, Lx) or a resize factor rsz")
    interpolation = {0: "nearest", 1: "linear"}.get(interpolation, interpolation) \
        if isinstance(interpolation, int) else str(interpolation).lower()
    nearest = interpolation in ("nearest", "inter_nearest")
    nd = img0.ndim
    if Ly is None:
        r = rsz if isinstance(rsz, (list, tuple, np.ndarray)) else [rsz, rsz]
        if no_channels or nd == 2:
            Ly, Lx = int(img0.shape[-2] * r[-2]), int(img0.shape[-1] * r[-1])
        else:
            Ly, Lx = int(img0.shape[-3] * r[-2]), int(img0.shape[-2] * r[-1])
    if nd == 2 or (nd == 3 and no_channels):
        y_axis = nd - 2
    else:
        y_axis = nd - 3
    return resize_yx(img0, int(Ly), int(Lx), y_axis, nearest)


def resize_image_3d(img, shape: Sequence[int], interpolation: str = "linear", no_channels: bool = False):
    """Resize a (Z, Y, X, C) (or (Z, Y, X) with no_channels) stack to shape (Lz, Ly, Lx): YX first, then Z."""
    Lzr, Lyr, Lxr = (int(s) for s in shape)
    Lz, Ly, Lx = img.shape[:3]
    out = img
    if (Lyr, Lxr) != (Ly, Lx):
        out = resize_image(out, Lyr, Lxr, interpolation=interpolation, no_channels=no_channels)
    if Lzr != Lz:
        if Lzr <= 0:
            raise CellposeWebError("the anisotropy / diameter makes the stack thinner than one plane")
        nearest = str(interpolation).lower() in ("nearest", "inter_nearest") or interpolation == 0
        out = _resize_axis(out, 0, Lzr, nearest)
    return out


# --------------------------------------------------------------------------------------------
# padding and tiles
# --------------------------------------------------------------------------------------------
def get_pad_yx(Ly: int, Lx: int, div: int = 16, extra: int = 1, min_size=None) -> tuple[int, int, int, int]:
    """Zero padding (ypad1, ypad2, xpad1, xpad2) before tiling.

    L >= min_size: pad to a multiple of ``div`` plus ``extra*div`` (half on each side);
    L < min_size: pad to max(min_size, L + extra*div).
    """
    def one(L: int, m) -> tuple[int, int]:
        if m is None or L >= m:
            Lpad = int(div * math.ceil(L / div) - L)
        else:
            Lpad = max(0, m - L - extra * div)
        return extra * div // 2 + Lpad // 2, extra * div // 2 + Lpad - Lpad // 2
    my = None if min_size is None else min_size[-2]
    mx = None if min_size is None else min_size[-1]
    ypad1, ypad2 = one(int(Ly), my)
    xpad1, xpad2 = one(int(Lx), mx)
    return ypad1, ypad2, xpad1, xpad2


def pad_image_ND(img0: np.ndarray, div: int = 16, extra: int = 1, min_size=None):
    """Pad (..., Y, X) with zeros per :func:`get_pad_yx`; returns (padded, ysub, xsub)."""
    Ly, Lx = img0.shape[-2:]
    ypad1, ypad2, xpad1, xpad2 = get_pad_yx(Ly, Lx, div=div, extra=extra, min_size=min_size)
    pads = [(0, 0)] * (img0.ndim - 2) + [(ypad1, ypad2), (xpad1, xpad2)]
    return np.pad(img0, pads, mode="constant"), np.arange(ypad1, ypad1 + Ly), np.arange(xpad1, xpad1 + Lx)


def tile_starts(L: int, bsize: int = 256, augment: bool = False, tile_overlap: float = 0.1) -> np.ndarray:
    """Tile start positions along one axis of length L (already padded to >= bsize)."""
    if augment:
        n = max(2, int(np.ceil(2. * L / bsize)))
    else:
        tile_overlap = min(0.5, max(0.05, tile_overlap))
        n = 1 if L <= bsize else int(np.ceil((1. + 2 * tile_overlap) * L / bsize))
    return np.linspace(0, L - min(bsize, L), n).astype(int)


def augment_flip(j: int, i: int) -> tuple[bool, bool]:
    """(flip Y, flip X) of tile (row j, column i) in test-time augmentation."""
    return (j % 2 == 0 and i % 2 == 1) or (j % 2 == 1 and i % 2 == 1), \
           (j % 2 == 1 and i % 2 == 0) or (j % 2 == 1 and i % 2 == 1)


def taper_mask(ly: int = 256, lx: int = 256, sig: float = 7.5) -> np.ndarray:
    """Sigmoid taper (ly, lx) used to blend tiles: 1 / (1 + exp((|x - c| - (b/2 - 20)) / sig))."""
    bsize = max(224, max(ly, lx))
    xm = np.arange(bsize)
    xm = np.abs(xm - xm.mean())
    m = 1 / (1 + np.exp((xm - (bsize / 2 - 20)) / sig))
    mask = m * m[:, None]
    return mask[bsize // 2 - ly // 2: bsize // 2 + ly // 2 + ly % 2,
                bsize // 2 - lx // 2: bsize // 2 + lx // 2 + lx % 2]


# --------------------------------------------------------------------------------------------
# training augmentation
# --------------------------------------------------------------------------------------------
def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the device's queued work.

    A plain copy from ordinary (pageable) memory to a CUDA device synchronises the stream; from
    pinned memory with ``non_blocking`` it is queued like a kernel (torch's pinned-memory cache keeps
    the buffer until the copy has run). Elsewhere this is ``t.to(device)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_device_float32(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An array or tensor as float32 on ``device``; host data goes by :func:`host_to_device` (a training
    step uploads its images without a host sync)."""
    t = a if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if t.device.type == "cpu" and device.type != "cpu":
        t = host_to_device(t, device)
    return t.to(device=device, dtype=torch.float32)


def _sampling_grids(coef: torch.Tensor, oy: int, ox: int) -> torch.Tensor:
    """(B, oy, ox, 2) float32 ``grid_sample`` grids from (B, 8) float64 affine rows
    [a00, a01, bx, a10, a11, by, Lx / 2, Ly / 2], computed in float64 on ``coef``'s device."""
    xo = torch.arange(ox, dtype=torch.float64, device=coef.device) - ox / 2 + 0.5
    yo = torch.arange(oy, dtype=torch.float64, device=coef.device) - oy / 2 + 0.5
    gy, gx = torch.meshgrid(yo, xo, indexing="ij")
    a00, a01, bx, a10, a11, by, hx, hy = (coef[:, i, None, None] for i in range(8))
    xin = a00 * gx + a01 * gy + bx
    yin = a10 * gx + a11 * gy + by
    return torch.stack([xin / hx, yin / hy], dim=-1).to(torch.float32)


def random_rotate_and_resize(imgs, flows=None, scale_range: float | None = 0.5, xy=(256, 256),
                             rescale=None, rng=None, device=None, do_flip: bool = True,
                             rotate: bool = True):
    """Random rotation, zoom, translation and flip of training images and flow targets (on device).

    Parameters
    ----------
    imgs : list of (C, Y, X) float arrays or tensors (normalised images; C the same for all).
    flows : list of (K, Y, X) targets whose last two channels are the unit flows [dY, dX]
        (e.g. (3, Y, X) [foreground, dY, dX]); all K channels are resampled bilinearly and the flow
        vectors are rotated with the image (dX negated on a horizontal flip). None: images only.
    scale_range : zoom = (1 - s/2) + s * U(0, 1) (0.5 -> [0.75, 1.25]); None: 2 ** U(-2, 2).
    xy : output size (Ly, Lx), default 256x256.
    rescale : optional per-image zoom multipliers (len(imgs)); final zoom = zoom * rescale[n].
        To bring objects to diameter 30 pass 30 / diameter (Cellpose passes diameter / 30 and
        divides; here it multiplies).
    rng : numpy Generator (or seed) for the random draws.
    device : torch device of the outputs (the grid sampling runs there).

    Returns
    -------
    imgs_out : float32 tensor (B, C, xy[0], xy[1]); flows_out : (B, K, xy[0], xy[1]) or None;
    the per-image zoom is stored in ``random_rotate_and_resize.last_scale`` (numpy (B,)).

    Each image: angle U[-180, 180) degrees, translation U within +-max(0, L*zoom - xy)/2 per axis,
    horizontal flip with p=0.5, output pixel p samples input c_in + R(-angle)(p - c_out)/zoom with
    bilinear interpolation and zeros outside (align_corners=False centres).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    device = torch.device("cpu") if device is None else torch.device(device)
    oy, ox = (int(xy), int(xy)) if np.isscalar(xy) else (int(xy[0]), int(xy[1]))
    n = len(imgs)
    scales = np.ones(n, np.float32)
    # the random draws, on the host in Cellpose's order; each image's affine map (in float64) becomes
    # one row of `coef`, and all sampling grids are made from it on the device after one upload
    coef = np.zeros((n, 8), np.float64)  # a00, a01, bx, a10, a11, by, Lx / 2, Ly / 2
    flips, rotations = np.zeros(n, bool), np.zeros((n, 2))
    for k in range(n):
        Ly, Lx = imgs[k].shape[-2:]
        if scale_range is None:
            s = 2 ** (4 * rng.random() - 2)
        else:
            s = (1 - scale_range / 2) + scale_range * rng.random()
        if rescale is not None:
            s = s * float(np.asarray(rescale, dtype=np.float64).reshape(-1)[k])
        scales[k] = s
        angle = (360 * rng.random() - 180) if rotate else 0.0
        dyx = np.maximum(0, np.array([Ly * s - oy, Lx * s - ox], np.float64))
        ty, tx = (rng.random(2) - 0.5) * dyx
        flips[k] = bool(rng.random() > 0.5) if do_flip else False
        th = math.radians(angle)
        c, sn = math.cos(th), math.sin(th)
        rotations[k] = c, sn
        # output offset (x, y) from the output centre -> input offset from the input centre:
        # in = R(-th) (out - t) / s  with R(-th) = [[c, sn], [-sn, c]] acting on (x, y)
        a00, a01, a10, a11 = c / s, sn / s, -sn / s, c / s
        coef[k] = a00, a01, -(a00 * tx + a01 * ty), a10, a11, -(a10 * tx + a11 * ty), Lx / 2, Ly / 2
    if device.type == "mps":  # no float64 there: the grids are made on the host and sent as float32
        grids = _sampling_grids(torch.from_numpy(coef), oy, ox).to(device)
    else:
        grids = _sampling_grids(host_to_device(torch.from_numpy(coef), device), oy, ox)
    out_i, out_f = [], []
    for k in range(n):
        im = imgs[k]
        im = _to_device_float32(im, device)
        if im.ndim == 2:
            im = im[None]
        grid = grids[k:k + 1]
        if flips[k]:
            im = im.flip(-1)
        out_i.append(F.grid_sample(im[None], grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)[0])
        if flows is not None:
            fl = flows[k]
            fl = _to_device_float32(fl, device)
            if fl.ndim == 2:
                fl = fl[None]
            if flips[k]:
                fl = fl.flip(-1).clone()
                fl[-1] = -fl[-1]
            fo = F.grid_sample(fl[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
            if fo.shape[0] >= 2:
                c, sn = (float(v) for v in rotations[k])
                v_y, v_x = fo[-2].clone(), fo[-1].clone()
                # rotate the vectors with the image: out vector = R(th) in vector (x, y)
                fo[-1] = c * v_x - sn * v_y
                fo[-2] = sn * v_x + c * v_y
            out_f.append(fo)
    random_rotate_and_resize.last_scale = scales
    imgs_out = torch.stack(out_i) if out_i else torch.zeros((0, 1, oy, ox), device=device)
    flows_out = torch.stack(out_f) if flows is not None and out_f else None
    return imgs_out, flows_out
