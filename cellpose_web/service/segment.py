"""Segmentation as the UI, the batch runner and scripts use it: checked parameters in,
masks + flows + a provenance record out. No Gradio here.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from cellpose_web.errors import CellposeWebError
from cellpose_web.models import check_eval_params
from cellpose_web.service import gpu, models_cache
from cellpose_web.service.config import Limits

log = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]


@dataclass
class SegmentParams:
    """All eval parameters a result records. diameter None/0 = automatic."""
    diameter: float | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    niter: int | None = None
    min_size: int = 15
    channel_axis: int | None = None
    z_axis: int | None = None
    channels: list[int] | None = None       # which channels to keep (indices along channel_axis)
    do_3D: bool = False
    anisotropy: float | None = None
    stitch_threshold: float = 0.0
    norm_percentile: tuple[float, float] = (1.0, 99.0)

    def validated(self, limits: Limits | None = None) -> "SegmentParams":
        limits = limits or Limits.from_env()
        p = SegmentParams(**asdict(self))

        def num(name, v, lo, hi, allow_none=False):
            if v is None or (isinstance(v, str) and not v.strip()):
                if allow_none:
                    return None
                raise CellposeWebError(f"{name} is empty; enter a number.")
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise CellposeWebError(f"{name} must be a number; got {v!r}.") from None
            if not math.isfinite(x) or x < lo or x > hi:
                raise CellposeWebError(f"{name} must be between {lo} and {hi}; got {v}.")
            return x

        # the form's own limits (a shared server caps the work one request may ask for) ...
        d = num("Diameter (px)", p.diameter, -math.inf, 5000, allow_none=True)
        if d is not None and d < 0:
            raise CellposeWebError("Diameter cannot be negative; leave it blank (or 0) for automatic.")
        p.diameter = d or None
        p.niter = num("niter", p.niter, 0, limits.max_niter, allow_none=True)
        p.anisotropy = num("Anisotropy", p.anisotropy, 0.01, 100, allow_none=True)
        # ... then the engine's rules, the same check scripts and the CLI get
        checked = check_eval_params(
            diameter=p.diameter, flow_threshold=num("Flow threshold", p.flow_threshold, 0, 10),
            cellprob_threshold=num("Cell probability threshold", p.cellprob_threshold, -20, 20),
            niter=p.niter, min_size=num("Minimum size (px)", p.min_size, -1, 10**7), anisotropy=p.anisotropy,
            stitch_threshold=num("Stitch threshold", p.stitch_threshold, 0, 1))
        for name in ("diameter", "flow_threshold", "cellprob_threshold", "niter", "min_size", "anisotropy",
                     "stitch_threshold"):
            setattr(p, name, checked[name])
        lo, hi = (float(v) for v in p.norm_percentile)
        if not (0 <= lo < hi <= 100):
            raise CellposeWebError(f"Normalisation percentiles must satisfy 0 ≤ low < high ≤ 100; got {lo}, {hi}.")
        p.norm_percentile = (lo, hi)
        for name in ("channel_axis", "z_axis"):
            v = getattr(p, name)
            if v is not None and v != "":
                try:
                    setattr(p, name, int(v))
                except (TypeError, ValueError):
                    raise CellposeWebError(f"{name} must be an axis number (0, 1, 2 ...) or blank.") from None
            else:
                setattr(p, name, None)
        if p.channels is not None:
            p.channels = [int(c) for c in p.channels]
        return p

    def eval_kwargs(self) -> dict[str, Any]:
        return dict(diameter=self.diameter, flow_threshold=self.flow_threshold,
                    cellprob_threshold=self.cellprob_threshold, niter=self.niter, min_size=self.min_size,
                    do_3D=self.do_3D, anisotropy=self.anisotropy, stitch_threshold=self.stitch_threshold,
                    normalize={"percentile": tuple(self.norm_percentile)})


@dataclass
class SegResult:
    masks: np.ndarray                 # (Y, X) or (Z, Y, X) labels
    flow_rgb: np.ndarray | None       # (Y, X, 3) or (Z, Y, X, 3) uint8
    cellprob: np.ndarray | None       # (Y, X) or (Z, Y, X) float32 logits
    dP: np.ndarray | None
    image: np.ndarray                 # channels-last image used, (Y, X, C) or (Z, Y, X, C)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(len(np.unique(self.masks[self.masks > 0])))


def to_channels_last(img: np.ndarray, channel_axis: int | None, z_axis: int | None,
                     channels: list[int] | None = None) -> tuple[np.ndarray, bool]:
    """Arrange an image as (Y, X, C) or (Z, Y, X, C); returns (array, is_stack).

    Without channel_axis: 2D -> one channel; 3D with a small first/last axis (≤ 4) -> channels,
    otherwise a z-stack; 4D -> the smallest axis is channels and the first other axis is Z.
    """
    img = np.asarray(img)
    nd = img.ndim
    if channel_axis is not None and not -nd <= channel_axis < nd:
        raise CellposeWebError(f"Channel axis {channel_axis} does not exist in an image of shape {img.shape}.")
    if z_axis is not None and not -nd <= z_axis < nd:
        raise CellposeWebError(f"Z axis {z_axis} does not exist in an image of shape {img.shape}.")
    if channel_axis is not None:
        channel_axis %= nd
    if z_axis is not None:
        z_axis %= nd
    if nd == 2:
        out, stack = img[..., None], False
    elif nd == 3:
        if channel_axis is None and z_axis is None:
            if img.shape[-1] <= 4 and img.shape[-1] < img.shape[0]:
                channel_axis = 2
            elif img.shape[0] <= 4:
                channel_axis = 0
            else:
                z_axis = 0
        if channel_axis is not None:
            out, stack = np.moveaxis(img, channel_axis, -1), False
        else:
            out, stack = np.moveaxis(img, z_axis, 0)[..., None], True
    elif nd == 4:
        if channel_axis is None:
            channel_axis = int(np.argmin(img.shape)) if z_axis is None else \
                min((a for a in range(4) if a != z_axis), key=lambda a: img.shape[a])
        if z_axis is None:
            z_axis = next(a for a in range(4) if a != channel_axis)
        if z_axis == channel_axis:
            raise CellposeWebError("Z axis and channel axis must be different.")
        out = np.moveaxis(img, (z_axis, channel_axis), (0, 3))
        stack = True
    else:
        raise CellposeWebError(f"Images must be 2D, 2D with channels, or a z-stack; got shape {img.shape}.")
    if channels:
        nch = out.shape[-1]
        bad = [c for c in channels if not 0 <= c < nch]
        if bad:
            raise CellposeWebError(f"Channel {bad[0]} does not exist: the image has {nch} channel(s) "
                                   f"(0..{nch - 1}).")
        out = out[..., list(channels)]
    if out.shape[-1] > 3:
        log.info("image has %d channels; Cellpose uses the first 3", out.shape[-1])
    return np.ascontiguousarray(out), stack


def provenance(model: models_cache.CachedModel | dict, params: SegmentParams, image_name: str,
               pixel_size_um: float | None, image_shape: tuple[int, ...], elapsed_s: float | None = None
               ) -> dict[str, Any]:
    from cellpose_web import __version__
    m = model if isinstance(model, dict) else {"name": model.name, "sha256": model.sha256, "path": model.path}
    return {
        "model_name": m.get("name"), "model_sha256": m.get("sha256"),
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()},
        "image": image_name, "image_shape": list(image_shape), "pixel_size_um": pixel_size_um,
        "cellpose_web_version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": None if elapsed_s is None else round(float(elapsed_s), 3),
    }


def _duration(model_name, img, params, *a, **k) -> int:
    return gpu.gpu_duration(tuple(np.shape(img)))


@gpu.gpu_task(_duration)
def _eval_locked(model_name: str, img: np.ndarray, params: SegmentParams, stack: bool,
                 progress: ProgressFn | None) -> tuple[np.ndarray, list, models_cache.CachedModel]:
    cm = models_cache.get_model(model_name)
    kw = params.eval_kwargs()
    with cm.lock:
        if stack and (params.do_3D or params.stitch_threshold > 0):
            masks, flows, _ = cm.model.eval(img, channel_axis=3, z_axis=0, progress=progress, **kw)
            return masks, list(flows), cm
        kw.pop("do_3D"), kw.pop("anisotropy"), kw.pop("stitch_threshold")
        if not stack:
            masks, flows, _ = cm.model.eval(img, channel_axis=2, progress=progress, **kw)
            return masks, list(flows), cm
        # a stack without 3D options: each plane on its own (eval takes a list of images)
        ms, flows, _ = cm.model.eval(list(img), channel_axis=2, progress=progress, **kw)
        rgbs, dps, cps = ([f[i] for f in flows] for i in range(3))
        return _distinct_plane_labels(ms), [np.stack(rgbs), np.stack(dps, 1), np.stack(cps)], cm


def _distinct_plane_labels(planes: list[np.ndarray]) -> np.ndarray:
    """(Z, Y, X) labels from planes segmented on their own: each plane's cells get labels of their
    own (plane z continues after plane z-1), so the count and the table list cells per plane
    instead of joining unrelated cells that happen to share a number into one "volume"."""
    counts = np.array([int(m.max()) for m in planes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.stack(planes).astype(np.uint32 if counts.sum() > np.iinfo(np.uint16).max else np.uint16)
    out += np.where(out > 0, offsets[:, None, None], 0).astype(out.dtype)
    return out


def segment(image: np.ndarray, params: SegmentParams, model_name: str, image_name: str = "image",
            pixel_size_um: float | None = None, progress: ProgressFn | None = None,
            limits: Limits | None = None) -> SegResult:
    """Segment one image (as read from the file) with `model_name` and checked `params`."""
    limits = limits or Limits.from_env()
    params = params.validated(limits)
    img, stack = to_channels_last(image, params.channel_axis, params.z_axis, params.channels)
    if (params.do_3D or params.stitch_threshold > 0) and not stack:
        raise CellposeWebError("3D / stitching needs a z-stack; this image is 2D. Untick 'do_3D' and set "
                               "stitch threshold to 0.")
    t0 = time.perf_counter()
    try:
        masks, flows, cm = _eval_locked(model_name, img, params, stack, progress)
    except (CellposeWebError, FileNotFoundError):
        raise
    except MemoryError:
        raise CellposeWebError("Out of memory while segmenting; crop the image or use a smaller diameter.")
    except Exception as e:
        log.exception("segmentation failed")
        if "out of memory" in str(e).lower():
            raise CellposeWebError("The GPU ran out of memory; try a smaller image or ask the admin.") from None
        raise CellposeWebError(f"Segmentation failed ({type(e).__name__}: {str(e)[:200]}). Check the "
                               "channel/z axis settings; if it persists tell the admin.") from None
    masks = np.asarray(masks)
    if masks.dtype.kind not in "ui":
        masks = masks.astype(np.uint32)
    flow_rgb = np.asarray(flows[0]) if len(flows) > 0 else None
    dP = np.asarray(flows[1]) if len(flows) > 1 else None
    cellprob = np.asarray(flows[2], dtype=np.float32) if len(flows) > 2 else None
    prov = provenance(cm, params, image_name, pixel_size_um, tuple(np.shape(image)), time.perf_counter() - t0)
    return SegResult(masks, flow_rgb, cellprob, dP, img, prov)
