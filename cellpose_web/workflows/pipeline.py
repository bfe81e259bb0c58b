"""The per-image pipeline: read -> segment -> measure -> write Cellpose's files + provenance.

The command line (``python -m cellpose_web``), the web service (``service.segment``, the Batch
tab) and the Dask workers (``distributed``) all go through these functions, so for the same image,
model and parameters they write the same files::

    from cellpose_web import pipeline
    loaded = pipeline.get_model("lite")
    result = pipeline.process_file("img.tif", loaded, pipeline.ImageSettings(eval_kwargs={"diameter": 30}),
                                   savedir="out", save=pipeline.SaveOptions(png=True, cells_csv=True))

Channels are kept apart by purpose and always numbered as in the file: ``segment_channels`` are
the file channels fed to the model (all, i.e. the first three, when None; for Cellpose 3 U-Nets
the first listed is the cytoplasm and the second the nucleus), and the measurements cover every
channel of the file, with puncta counted on ``PunctaParams.channel`` of the file.
"""
from __future__ import annotations

import datetime as _dt
import io as _pyio
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cellpose_web.io.atomic import write_json
from cellpose_web.engine.dynamics.labels import label_dtype
from cellpose_web import config
from cellpose_web.engine import dynamics
from cellpose_web.workflows import hints
from cellpose_web import io, measure
from cellpose_web.errors import CellposeWebError, ModelNotAvailableError
from cellpose_web.measure import PunctaParams

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "get_model", "forget_models", "read_image", "prepare_image", "axes_in_file", "find_axes",
           "to_channels_last", "Segmentation", "segment", "measure_segmentation", "provenance", "SaveOptions",
           "ImageSettings", "write_outputs", "process_file", "csv_bytes", "PunctaParams", "puncta_model_warning",
           "model_for_puncta",
           "describe_channels", "channels_for_segmentation",
           "puncta_channel_from_names"]

ProgressFn = Callable[[float, str], None]
_STACK_ONLY = ("do_3D", "anisotropy", "stitch_threshold", "flow3D_smooth")


# ----------------------------------------------------------------------------------------------
# the one model cache (web service, Dask workers, scripts)
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A loaded ``CellposeModel`` with what provenance records about it; `lock` serialises eval."""
    model: Any
    name: str
    sha256: str
    path: str
    arch: str = ""
    lock: Any = field(default_factory=threading.Lock)
    source: str = ""

    def describe(self) -> dict[str, Any]:
        # "file", not "path": web clients (gradio_client) take any {"path": ...} dict for a download
        return {"name": self.name, "sha256": self.sha256, "file": self.path, "arch": self.arch,
                "source": self.source}


_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()
#: the smallest image side any face accepts (the upload check and prepare_image share it)
MIN_IMAGE_SIDE = 3
#: ... and its longer side at least this (a 5 x 5 image has nothing to segment)
MIN_IMAGE_LONG_SIDE = 8


def default_gpu() -> bool:
    """Use CUDA when present, unless CELLPOSE_WEB_CPU=1."""
    if config.force_cpu():
        return False
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install means CPU
        return False


def get_model(spec: Any, device: str | None = None, gpu: bool | None = None) -> LoadedModel:
    """The model for `spec` in this process, loaded once per (file, sha256, device).

    spec : a registry name or path, a ``registry.ModelInfo`` or its ``to_dict()`` (what a Dask
        task carries; a worker that does not see the same file resolves the name and checks the sha256).
    device, gpu : as ``CellposeModel`` (gpu None: CUDA when present unless CELLPOSE_WEB_CPU=1).
    """
    from cellpose_web import registry
    from cellpose_web.models import CellposeModel

    if isinstance(spec, (str, os.PathLike)):
        if not str(spec):
            raise ModelNotAvailableError("No model chosen: pick a model in the list (the Models tab shows them all).")
        info = registry.resolve_model(str(spec))
    elif isinstance(spec, dict):
        fields = registry.ModelInfo.__dataclass_fields__
        info = registry.ModelInfo(**{k: v for k, v in spec.items() if k in fields})
        if not info.path or not Path(info.path).is_file():  # not at the same path here: resolve the name
            found = registry.resolve_model(info.name)
            if info.sha256 and found.sha256 and found.sha256 != info.sha256:
                raise CellposeWebError(f"model '{info.name}' here differs from the one the batch was started with "
                                       f"(sha256 {found.sha256[:12]} vs {info.sha256[:12]}); put the model file on "
                                       "a shared path")
            info = found
    else:
        info = spec
    gpu = default_gpu() if gpu is None else bool(gpu)
    path = str(getattr(info, "path", "") or "")
    sha = getattr(info, "sha256", None) or (registry.file_sha256(path) if path and Path(path).is_file() else "")
    key = (path or info.name, sha, str(device), gpu)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    try:
        model = CellposeModel(gpu=gpu, pretrained_model=path or info.name, device=device)
    except (CellposeWebError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file: say so, not a traceback
        log.exception("loading model %s failed", info.name)
        raise ModelNotAvailableError(f"Model {info.name!r} could not be loaded ({type(e).__name__}); the file may be "
                                     "damaged. Choose another model or re-add it.") from None
    model.model_info = info
    loaded = LoadedModel(model, info.name, sha, path, getattr(info, "arch", "") or "", threading.Lock(),
                         getattr(info, "source", "") or "")
    with _CACHE_LOCK:
        return _CACHE.setdefault(key, loaded)


def forget_models(name: str | None = None) -> None:
    """Drop cached models (all, or those whose name or path matches), e.g. after delete/rename."""
    with _CACHE_LOCK:
        for k in list(_CACHE):
            if name is None or name in (k[0], _CACHE[k].name, _CACHE[k].path):
                del _CACHE[k]


# ----------------------------------------------------------------------------------------------
# read
# ----------------------------------------------------------------------------------------------
def prepare_image(img: np.ndarray, axes: str = "") -> tuple[np.ndarray, str]:
    """Refuse arrays that are not images; drop singleton axes (keeping `axes` in step); set
    non-finite values to 0. Returns (array, axes) with axes "" when unknown."""
    a = np.asarray(img)
    if a.dtype.kind not in "biuf":
        what = "complex numbers (save the magnitude as a normal image)" if a.dtype.kind == "c" else \
            f"data of type {a.dtype} (expected numbers)"
        raise CellposeWebError(f"the image holds {what}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    axes = axes if axes and len(axes) == a.ndim else ""
    if a.ndim > 2 and 1 in a.shape:
        keep = [i for i, n in enumerate(a.shape) if n > 1]
        if len(keep) >= 2:
            axes = "".join(axes[i] for i in keep) if axes else ""
            a = a.reshape([a.shape[i] for i in keep])
    if axes and "Y" in axes and "X" in axes:
        yx = (a.shape[axes.index("Y")], a.shape[axes.index("X")])
    elif a.ndim == 3 and a.shape[-1] <= 4:
        yx = a.shape[:2]
    else:
        yx = a.shape[-2:]
    if a.ndim < 2 or min(yx) < MIN_IMAGE_SIDE:
        raise CellposeWebError(f"the image has shape {tuple(np.shape(img))}: an image needs at least "
                               f"{MIN_IMAGE_SIDE} pixels along Y and X")
    if max(yx) < MIN_IMAGE_LONG_SIDE:
        raise CellposeWebError(f"the image is only {tuple(np.shape(img))} pixels; use a larger image")
    if a.ndim > 4:
        raise CellposeWebError(f"the image has {a.ndim} dimensions {a.shape}; segment 2D images or 3D stacks (with "
                               "channels) and split time series or positions into separate files first")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.all():
            raise CellposeWebError("the image contains no finite pixel values (all NaN or infinite)")
        if bad.any():
            a = np.where(bad, 0, a)
    return a, (axes if len(axes) == a.ndim else "")


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, str, float | None]:
    """(image as stored, its axes letters or "", pixel size in µm or None) from an image file."""
    img, meta = io.imread_with_meta(path, max_pixels=max_pixels)
    img, axes = prepare_image(img, meta.axes if meta is not None else "")
    return img, axes, pixel_size_of(meta)


def pixel_size_of(meta: Any) -> float | None:
    """The XY pixel size (µm) an ``io.ImageMeta`` (or its dict) reports, else None."""
    px = meta.get("pixel_size_um") if isinstance(meta, dict) else getattr(meta, "pixel_size_um", None)
    if isinstance(px, (tuple, list)):
        px = px[-1] if len(px) else None  # (y, x): x is the usual reported size
    try:
        px = float(px) if px is not None else None
    except (TypeError, ValueError):
        return None
    return px if px is not None and np.isfinite(px) and px > 0 else None


# ----------------------------------------------------------------------------------------------
# axes: the one guesser
# ----------------------------------------------------------------------------------------------
def axes_in_file(file_axes: str, shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """(channel_axis, z_axis) as the file's axis letters say ('C' or 'S', 'Z'; None when absent or
    when the letters do not match the shape): the one reader of axis strings (``find_axes`` and the
    app's form both use it)."""
    if not file_axes or len(file_axes) != len(shape):
        return None, None
    c = file_axes.find("C") if "C" in file_axes else file_axes.find("S")
    z = file_axes.find("Z")
    return (c if c >= 0 else None), (z if z >= 0 else None)


def find_axes(shape: tuple[int, ...], channel_axis: int | None = None, z_axis: int | None = None,
              file_axes: str = "", want_3d: bool = False) -> tuple[int | None, int | None]:
    """(channel_axis, z_axis) of an image: the ones given, else what the file says ("C"/"S", "Z"),
    else a guess. Guess: 2D has neither; 3D with a small last (≤ 4, smaller than the first) or first
    (≤ 4) axis has channels there, otherwise it is a z-stack (always a z-stack when `want_3d`);
    4D has channels on its smallest axis and Z on the first other axis.
    """
    nd = len(shape)
    for name, v in (("Channel", channel_axis), ("Z", z_axis)):
        if v is not None and not -nd <= v < nd:
            raise CellposeWebError(f"{name} axis {v} does not exist in an image of shape {tuple(shape)}.")
    ch = None if channel_axis is None else channel_axis % nd
    z = None if z_axis is None else z_axis % nd
    file_c, file_z = axes_in_file(file_axes, shape)
    if ch is None and file_c is not None and file_c != z and shape[file_c] > 1:
        ch = file_c
    if z is None and file_z is not None and file_z != ch:
        z = file_z
    if nd == 3 and ch is None and z is None:
        if want_3d:
            z = 0
        elif shape[-1] <= 4 and shape[-1] < shape[0]:
            ch = 2
        elif shape[0] <= 4:
            ch = 0
        else:
            z = 0
    elif nd == 4:
        if ch is None:
            ch = int(np.argmin(shape)) if z is None else min((a for a in range(4) if a != z), key=lambda a: shape[a])
        if z is None:
            z = next(a for a in range(4) if a != ch)
    if ch is not None and ch == z:
        raise CellposeWebError("Z axis and channel axis must be different.")
    if nd == 3 and ch is not None and z is not None:
        raise CellposeWebError(f"An image of shape {tuple(shape)} cannot have both a channel and a Z axis; "
                               "leave one of them automatic.")
    return ch, z


def to_channels_last(img: np.ndarray, channel_axis: int | None = None, z_axis: int | None = None,
                     file_axes: str = "", want_3d: bool = False) -> tuple[np.ndarray, bool]:
    """The image as (Y, X, C) or (Z, Y, X, C) with every channel, in the file's order; and whether
    it is a z-stack. Axes as :func:`find_axes`."""
    img = np.asarray(img)
    if img.ndim not in (2, 3, 4):
        raise CellposeWebError(f"Images must be 2D, 2D with channels, or a z-stack; got shape {img.shape}.")
    ch, z = find_axes(img.shape, channel_axis, z_axis, file_axes, want_3d)
    if img.ndim == 2:
        return np.ascontiguousarray(img[..., None]), False
    if img.ndim == 3:
        if ch is not None:
            return np.ascontiguousarray(np.moveaxis(img, ch, -1)), False
        return np.ascontiguousarray(np.moveaxis(img, z, 0)[..., None]), True
    return np.ascontiguousarray(np.moveaxis(img, (z, ch), (0, 3))), True


def check_channels(channels: list[int] | None, n_channels: int, what: str = "Segmentation channel") -> list[int] | None:
    """The channel numbers (file numbering) as ints, or a CellposeWebError naming the one that is missing."""
    if channels is None or len(channels) == 0:
        return None
    out = [int(c) for c in channels]
    bad = [c for c in out if not 0 <= c < n_channels]
    if bad:
        raise CellposeWebError(f"{what} {bad[0]} does not exist: the image has {n_channels} channel(s) "
                               f"(0..{n_channels - 1}, numbered as in the file).")
    return out


# ----------------------------------------------------------------------------------------------
# segment
# ----------------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """One segmented image.

    masks : (Y, X) or (Z, Y, X) labels (0 = background).
    flows : [RGB flow picture uint8, dP float32, cellprob float32] as ``CellposeModel.eval``.
    image : the whole image, every channel in the file's order, (Y, X, C) or (Z, Y, X, C).
    segment_channels : the file channels the model saw (None = all / the first three).
    est_diam : the diameter (px) lite estimated (``diameter=None``), else None.
    diameter_px : the diameter (px) the model segmented at: the one given, lite's estimate, or a
        Cellpose 1-3 model's training size when none was given (those models do not estimate it).
    """
    masks: np.ndarray
    flows: list
    image: np.ndarray
    is_stack: bool
    segment_channels: list[int] | None
    eval_params: dict[str, Any]
    model: dict[str, Any]
    seconds: float
    device: str = ""
    dtype: str = ""
    est_diam: float | None = None
    notices: list[str] = field(default_factory=list)
    diameter_px: float | None = None

    @property
    def n_masks(self) -> int:
        return int(np.count_nonzero(np.unique(self.masks)))

    @property
    def flow_rgb(self) -> np.ndarray | None:
        return np.asarray(self.flows[0]) if len(self.flows) > 0 and self.flows[0] is not None else None

    @property
    def dP(self) -> np.ndarray | None:
        return np.asarray(self.flows[1]) if len(self.flows) > 1 and self.flows[1] is not None else None

    @property
    def cellprob(self) -> np.ndarray | None:
        return np.asarray(self.flows[2], np.float32) if len(self.flows) > 2 and self.flows[2] is not None else None


def distinct_plane_labels(planes: list[np.ndarray]) -> np.ndarray:
    """(Z, Y, X) labels from planes segmented on their own: each plane's cells get labels of their
    own (plane z continues after plane z-1), so counts and tables list cells per plane instead of
    joining unrelated cells that share a number into one "volume"."""
    counts = np.array([int(m.max(initial=0)) for m in planes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.stack(planes).astype(label_dtype(int(counts.sum())))
    out += np.where(out > 0, offsets[:, None, None], 0).astype(out.dtype)
    return out


def segment(loaded: LoadedModel, image: np.ndarray, eval_kwargs: dict[str, Any], channel_axis: int | None = None,
            z_axis: int | None = None, file_axes: str = "", segment_channels: list[int] | None = None,
            exclude_on_edges: bool = False, progress: ProgressFn | None = None,
            measure_only_channels: list[int] | None = None) -> Segmentation:
    """Segment one image (as read from its file) with a loaded model.

    image : 2D, 2D + channels, or a z-stack (+ channels), axes as :func:`find_axes`.
    eval_kwargs : ``CellposeModel.eval`` keywords (diameter, thresholds, normalize, do_3D, ...).
    segment_channels : file channel numbers fed to the model, in that order (None: all).
    measure_only_channels : file channels kept out of segmentation when ``segment_channels`` is None
        (e.g. the puncta channel: PIEZO1 spots would otherwise be segmented as tiny "cells").
    A stack without do_3D or stitch_threshold is segmented plane by plane, each plane's cells
    getting labels of their own.
    """
    kw = dict(eval_kwargs)
    want_3d = bool(kw.get("do_3D")) or float(kw.get("stitch_threshold") or 0) > 0
    img, stack = to_channels_last(image, channel_axis, z_axis, file_axes, want_3d)
    if want_3d and not stack:
        raise CellposeWebError("3D / stitching needs a z-stack; this image is 2D. Untick 'do_3D' and set the stitch "
                               "threshold to 0.")
    notices = []
    chans = channels_for_segmentation(img.shape[-1], segment_channels,
                                      measure_only_channels if kw.get("channels") is None else None)
    if chans and not check_channels(segment_channels, img.shape[-1]):
        notices.append(f"segmenting on channel(s) {', '.join(map(str, chans))}; channel(s) "
                       f"{', '.join(map(str, sorted(set(measure_only_channels or []))))} only measured (puncta)")
    if chans and measure_only_channels and set(chans) & set(measure_only_channels):
        both = sorted(set(chans) & set(measure_only_channels))
        notices.append(f"channel(s) {', '.join(map(str, both))} are both segmented and the puncta channel: the "
                       "spots may be segmented as small cells; list only the channels that show the cells")
    if chans and kw.get("channels") is not None:
        # Cellpose 3's [cytoplasm, nucleus] count from 1 in the image given to eval: with a selection
        # first they would no longer be the file's numbers
        raise CellposeWebError("Choose the channels one way: either the segmentation channels (file numbering) or "
                               "Cellpose 3's cytoplasm/nucleus channels, not both.")
    x = img[..., chans] if chans else img
    if x.shape[-1] > 3 and not chans:
        notices.append(f"the image has {x.shape[-1]} channels and the model sees the first 3; choose the "
                       "segmentation channels to use others")
    model = loaded.model
    t0 = time.perf_counter()
    with loaded.lock:
        if stack and want_3d:
            masks, flows, _ = model.eval(x, channel_axis=3, z_axis=0, progress=progress, **kw)
            flows = list(flows)
        else:
            for k in _STACK_ONLY:
                kw.pop(k, None)
            if not stack:
                masks, flows, _ = model.eval(x, channel_axis=2, progress=progress, **kw)
                flows = list(flows)
            else:
                ms, fl, _ = model.eval(list(x), channel_axis=2, progress=progress, **kw)
                rgbs, dps, cps = ([f[i] for f in fl] for i in range(3))
                masks, flows = distinct_plane_labels(ms), [np.stack(rgbs), np.stack(dps, 1), np.stack(cps)]
        notices += list(getattr(model, "last_notices", None) or [])  # e.g. batch size lowered (GPU memory)
    masks = np.asarray(masks)
    if exclude_on_edges:
        masks = dynamics.remove_edge_masks(masks)
    if masks.dtype.kind not in "ui":
        masks = masks.astype(np.uint32)
    seconds = time.perf_counter() - t0
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in eval_kwargs.items()}
    params.update(channel_axis=channel_axis, z_axis=z_axis, exclude_on_edges=bool(exclude_on_edges))
    est = getattr(model, "diam_estimate", None)
    used = _diameter_used(model, kw.get("diameter"), est)
    if getattr(model, "legacy", False) and not kw.get("diameter") and used:
        notices.append(f"diameter {used:.0f} px, the size {loaded.name} was trained on (Cellpose 1-3 models do not "
                       "estimate it): enter the diameter when your cells are much larger or smaller")
    return Segmentation(masks, flows, img, stack, chans, params, loaded.describe(), seconds,
                        device=str(getattr(model, "device", "")),
                        dtype=str(getattr(model, "dtype", "")).replace("torch.", ""),
                        est_diam=est, notices=notices, diameter_px=used)


def _diameter_used(model: Any, diameter: float | None, estimate: float | None) -> float | None:
    """The diameter (px) a model segmented at: the one given, lite's estimate, or (Cellpose 1-3
    models, diameter None) ``diam_mean / rescale`` of the last eval, i.e. their training size."""
    if diameter:
        return float(diameter)
    if estimate:
        return float(estimate)
    rescale = (getattr(model, "last_eval_params", None) or {}).get("rescale")
    mean = getattr(model, "diam_mean", None)
    try:
        return float(mean) / float(rescale) if rescale and mean else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


# ----------------------------------------------------------------------------------------------
# measure
# ----------------------------------------------------------------------------------------------
def measure_segmentation(seg: Segmentation, pixel_size_um: float | None = None,
                         puncta: PunctaParams | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per-cell table over every file channel (and puncta on the named file channel; 2D only)."""
    if puncta is not None and seg.masks.ndim != 2:
        seg.notices.append("puncta are counted on 2D images; skipped for this z-stack")
        puncta = None
    if puncta is not None:
        warning = puncta_model_warning(seg.model.get("name"))
        if warning:
            seg.notices.append(warning)
    return measure.measure_cells(seg.masks, seg.image, pixel_size_um, channel_axis=-1, puncta=puncta)


def channels_for_segmentation(n_channels: int, segment_channels: list[int] | None,
                              measure_only: list[int] | None = None) -> list[int] | None:
    """The file channels a model will see: ``segment_channels`` when given (checked), else all
    channels but the ``measure_only`` ones (e.g. the puncta channel); None = all of them."""
    chans = check_channels(segment_channels, n_channels)
    if chans:
        return chans
    drop = {int(c) for c in measure_only or []}
    keep = [c for c in range(n_channels) if c not in drop]
    return keep if n_channels > 1 and keep and len(keep) < n_channels else None


_PUNCTA_NAMES = ("piezo", "halo", "punct", "spot")


def puncta_channel_from_names(names: list[str] | None) -> int | None:
    """The one channel whose file name says it holds spots (PIEZO1, HaloTag, puncta, spots), else None."""
    hits = [i for i, n in enumerate(names or []) if any(k in str(n).lower() for k in _PUNCTA_NAMES)]
    return hits[0] if len(hits) == 1 else None


def describe_channels(n_channels: int, segment_channels: list[int] | None = None, puncta_channel: int | None = None,
                      legacy: bool = False, names: list[str] | None = None) -> str:
    """One line saying what each file channel is used for, in file numbering (0 = first).

    Parameters
    ----------
    n_channels : channels in the file.
    segment_channels : the segmentation channels asked for (None = all but the puncta channel).
    puncta_channel : the file channel puncta are counted on (None = no puncta).
    legacy : a Cellpose 1-3 U-Net: its two inputs are [cytoplasm, nucleus], first two listed.
    names : the file's own channel names, when it has them.
    """
    def ch(c: int) -> str:
        nm = names[c] if names and c < len(names) and names[c] else ""
        return f"channel {c}" + (f" ({nm})" if nm else "")

    if n_channels < 1:
        return ""
    chans = channels_for_segmentation(n_channels, segment_channels,
                                      [int(puncta_channel)] if puncta_channel is not None else None)
    seen = chans if chans is not None else list(range(n_channels))
    if legacy:
        parts = [f"cytoplasm = {ch(seen[0])}", f"nucleus = {ch(seen[1])}" if len(seen) > 1 else "no nucleus channel"]
        if len(seen) > 2:
            parts.append(f"{', '.join(ch(c) for c in seen[2:])} not used (a Cellpose 1-3 model takes two)")
        text = "Cellpose 1-3 model: " + ", ".join(parts)
    else:
        shown = seen[:3]
        text = "the model sees " + ", ".join(ch(c) for c in shown)
        if len(seen) > 3:
            text += f" (the first 3 of the {len(seen)} listed)"
    if puncta_channel is not None:
        pc = int(puncta_channel)
        if not 0 <= pc < n_channels:
            return text + f"; puncta channel {pc} does not exist (0..{n_channels - 1})"
        text += f"; puncta counted on {ch(pc)}"
        if pc in seen[: 2 if legacy else 3]:
            text += " — which is also segmented: leave the segmentation channels blank or list the others"
    return text + "; every channel is measured"


def puncta_model_warning(model_name: str | None) -> str:
    """A warning when puncta are counted per cell with a model that finds nuclei, "" otherwise."""
    from cellpose_web import registry

    if registry.model_purpose(model_name) != "nuclei":
        return ""
    return (f"{model_name} finds nuclei, not whole cells: these puncta are counted per nucleus. For puncta per "
            f"cell choose a whole-cell model ({registry.whole_cell_model()})")


def model_for_puncta(model_name: str | None) -> tuple[str, str]:
    """The model to count puncta per whole cell with: (name, note).

    ``model_name`` None or "" (nothing chosen) gives the best whole-cell model available
    (:func:`cellpose_web.registry.whole_cell_model`) and a note saying so; a chosen model is kept.
    """
    from cellpose_web import registry

    if model_name:
        return str(model_name), ""
    name = registry.whole_cell_model()
    return name, f"model: {name} (whole cells, for puncta per cell; choose another with the model setting)"


def stitch_planes(masks: np.ndarray, image: np.ndarray | None, provenance: dict[str, Any] | None = None,
                  pixel_size_um: float | None = None, threshold: float = 0.3
                  ) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """Link a stack segmented plane by plane into 3D cells, without running the model again.

    Masks of neighbouring planes whose IoU is at least ``threshold`` get one label
    (:func:`cellpose_web.dynamics.stitch3D`, Cellpose's ``stitch_threshold``); the table is measured
    again over the 3D cells.

    Parameters
    ----------
    masks : (Z, Y, X) int labels of a plane-by-plane result.
    image : the stack with every file channel, (Z, Y, X, C) (None: a table without intensities).
    provenance : the result's provenance; the copy returned records the threshold and
        ``stitched_after_segmentation``.
    pixel_size_um : µm per pixel (XY) for the µm columns.
    threshold : IoU (0-1) above which masks of neighbouring planes are the same cell.

    Returns
    -------
    (masks (Z, Y, X) labels of the 3D cells, per-cell table, provenance)
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise CellposeWebError("Stitching needs a z-stack result segmented plane by plane; run one first.")
    if not 0.0 < float(threshold) <= 1.0:
        raise CellposeWebError(f"The stitch threshold is an IoU between 0 and 1, not {threshold}.")
    stitched = dynamics.stitch3D(masks, float(threshold))
    table, _ = measure.measure_cells(stitched, image, pixel_size_um, channel_axis=-1 if image is not None else None)
    prov = dict(provenance or {})
    key = "params" if "params" in prov else "eval_params"
    prov[key] = {**(prov.get(key) or {}), "stitch_threshold": float(threshold)}
    prov["stitched_after_segmentation"] = True
    return stitched, table, prov


# ----------------------------------------------------------------------------------------------
# provenance + files
# ----------------------------------------------------------------------------------------------
def provenance_record(model: dict[str, Any] | None, eval_params: dict[str, Any] | None, image: str,
                      **fields: Any) -> dict[str, Any]:
    """The one provenance format every result records (``_seg.npy``'s 'cellpose_web',
    ``_provenance.json``, CSV headers, a batch's summary): model (name, sha256, ...; None for masks
    from a file), eval_params, image, the given fields, then the package version and the date (UTC).
    :func:`provenance` (a segmentation), ``workflows.results.masks_file_provenance`` and the batch
    summary all build theirs here."""
    from cellpose_web import __version__

    return {"model": dict(model) if model else {"name": None, "sha256": None},
            "eval_params": dict(eval_params or {}), "image": str(image), **fields,
            "cellpose_web_version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def provenance(seg: Segmentation, image_name: str, image_shape: tuple[int, ...], pixel_size_um: float | None,
               puncta: PunctaParams | None = None, command: str | None = None) -> dict[str, Any]:
    """How a segmentation was made (:func:`provenance_record`): model (name, sha256, file, arch,
    source), eval_params, channels (segment / measured, file numbering), device, image, pixel size,
    diameter, version, date."""
    prov = provenance_record(
        seg.model, seg.eval_params, image_name,
        channels={"segment": seg.segment_channels, "measured": list(range(int(seg.image.shape[-1]))),
                  "numbering": "as in the file"},
        device=seg.device, dtype=seg.dtype, image_shape=list(image_shape),
        pixel_size_um=pixel_size_um, seconds=round(float(seg.seconds), 3),
        est_diam=seg.est_diam if seg.est_diam is not None else (
            seg.diameter_px if not seg.eval_params.get("diameter") else None),
        diameter_px=seg.diameter_px)
    if puncta is not None:
        prov["puncta"] = asdict(puncta)
    if command:
        prov["command"] = command
    return prov


def csv_bytes(df: pd.DataFrame, prov: dict[str, Any] | None) -> bytes:
    """CSV with the provenance as leading '# key: value' lines (pandas: ``read_csv(f, comment="#")``)."""
    buf = _pyio.StringIO()
    if prov:
        m = prov.get("model") or {}
        buf.write(f"# model: {m.get('name')} sha256={m.get('sha256')}\n")
        buf.write(f"# parameters: {json.dumps(prov.get('eval_params', {}), default=str)}\n")
        if prov.get("channels"):
            buf.write(f"# channels: {json.dumps(prov['channels'])}\n")
        if prov.get("puncta"):
            buf.write(f"# puncta: {json.dumps(prov['puncta'])}\n")
        buf.write(f"# image: {prov.get('image')} pixel_size_um={prov.get('pixel_size_um')} "
                  f"cellpose_web={prov.get('cellpose_web_version')} date={prov.get('date')}\n")
    df.to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue().encode()


@dataclass
class SaveOptions:
    """Which files to write (plain values: they travel to Dask workers).

    npy: ``_seg.npy``; png/tif: ``<suffix>.png/.tif`` masks; txt: ``_cp_outlines.txt``; rois:
    ``_rois.zip``; outlines: ``_outlines<suffix>.png``; flows: ``_flows/_dP/_cellprob<suffix>.tif``;
    mpl: ``_cp_output<suffix>.png``; cells_csv: ``_cells.csv``; provenance_json: ``_provenance.json``.
    """
    npy: bool = True
    png: bool = False
    tif: bool = False
    txt: bool = False
    rois: bool = False
    outlines: bool = False
    flows: bool = False
    mpl: bool = False
    cells_csv: bool = False
    provenance_json: bool = False
    in_folders: bool = False
    dir_above: bool = False
    suffix: str = "_cp_masks"

    @classmethod
    def everything(cls) -> "SaveOptions":
        """The files the web app offers: masks (tif, png), _seg.npy, outlines, ROIs, cells CSV, provenance."""
        return cls(npy=True, png=True, tif=True, txt=True, rois=True, cells_csv=True, provenance_json=True)


def write_outputs(file_name: str | os.PathLike, masks: np.ndarray, image: np.ndarray | None, flows: list | None,
                  prov: dict[str, Any], table: pd.DataFrame | None = None, save: SaveOptions | None = None,
                  savedir: str | os.PathLike | None = None, notices: list[str] | None = None) -> dict[str, Path]:
    """Write the files of one result with Cellpose's names (``<stem><suffix>.png`` ...) beside
    `file_name` (the image's path; it need not exist) or in `savedir`. Returns {kind: path}.

    masks : (Y, X) or (Z, Y, X) labels; image : channels-last image (for the outline pictures);
    flows : [RGB, dP, cellprob] (entries may be None); prov : :func:`provenance`.
    """
    save = save or SaveOptions()
    f = Path(file_name)
    savedir = Path(savedir) if savedir is not None else None
    target = (savedir / f.name) if savedir is not None else f
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = f.name[: -len(f.suffix)] if f.suffix else f.name
    masks = np.asarray(masks)
    flows = [x for x in (flows or []) if x is not None] or None
    written: dict[str, Path] = {}
    if save.npy:
        written["seg_npy"] = io.masks_flows_to_seg(image, masks, flows, str(target),
                                                   diameter=(prov.get("eval_params") or {}).get("diameter"),
                                                   metadata=dict(prov))[0]
    if save.png or save.tif or save.flows or save.txt or save.outlines or save.mpl:
        paths = io.save_masks(image, masks, flows, str(f), png=save.png, tif=save.tif, suffix=save.suffix,
                              save_flows=save.flows, save_outlines=save.outlines, dir_above=save.dir_above,
                              in_folders=save.in_folders, savedir=savedir, save_txt=save.txt, save_mpl=save.mpl)
        kinds = {f"{save.suffix}.png": "masks_png", f"{save.suffix}.tif": "masks_tif", "_cp_outlines.txt": "outlines_txt",
                 f"_outlines{save.suffix}.png": "outlines_png", f"_cp_output{save.suffix}.png": "summary_png",
                 f"_flows{save.suffix}.tif": "flows_tif", f"_dP{save.suffix}.tif": "dP_tif",
                 f"_cellprob{save.suffix}.tif": "cellprob_tif"}
        for p in paths:
            for end, kind in kinds.items():
                if Path(p).name == stem + end:
                    written[kind] = Path(p)
    if save.rois:
        if masks.ndim == 2 and int(masks.max(initial=0)) > 0:
            rdir = savedir if savedir is not None else (f.resolve().parent.parent if save.dir_above else None)
            written["rois_zip"] = io.save_rois(masks, f, savedir=rdir)
        elif masks.ndim != 2 and notices is not None:
            notices.append("ImageJ ROIs are written for 2D masks only")
    base = target.parent / stem
    if save.cells_csv and table is not None:
        data = csv_bytes(table, prov)
        written["cells_csv"] = io.atomic_write(Path(f"{base}_cells.csv"), lambda fh: fh.write(data))
    if save.provenance_json:
        written["provenance_json"] = write_json(Path(f"{base}_provenance.json"), prov, indent=1, default=str)
    return written


# ----------------------------------------------------------------------------------------------
# one file, end to end
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageSettings:
    """How to segment and measure each image of a run (plain values: they travel to Dask workers).

    eval_kwargs : ``CellposeModel.eval`` keywords.
    channel_axis, z_axis : axes of the file (None: from the file's metadata, else guessed).
    segment_channels : file channels fed to the model (None: all).
    pixel_size_um : used when the file does not say (µm per pixel).
    puncta : count puncta on this file channel (None: no puncta).
    measure : make the per-cell table (and the summary numbers).
    """
    eval_kwargs: dict[str, Any] = field(default_factory=dict)
    channel_axis: int | None = None
    z_axis: int | None = None
    segment_channels: list[int] | None = None
    exclude_on_edges: bool = False
    pixel_size_um: float | None = None
    puncta: PunctaParams | None = None
    measure: bool = True
    max_pixels: int | None = None


@dataclass
class ImageResult:
    """One image segmented and measured (:func:`analyse`), before any file is written.

    seg : the segmentation (masks (Y, X) or (Z, Y, X), flows, the whole image channels-last).
    table : the per-cell table (None when ``ImageSettings.measure`` is False).
    puncta : one row per punctum (None without puncta).
    provenance : :func:`provenance` (with ``notices`` when there were any).
    pixel_size_um : the pixel size used (the file's, else the settings').
    """
    seg: Segmentation
    table: pd.DataFrame | None
    puncta: pd.DataFrame | None
    provenance: dict[str, Any]
    pixel_size_um: float | None


def analyse(loaded: LoadedModel, image: np.ndarray, settings: ImageSettings, image_name: str,
            file_axes: str = "", pixel_size_um: float | None = None, command: str | None = None,
            progress: ProgressFn | None = None) -> ImageResult:
    """Segment, measure and record the provenance of one image as read from its file: the one
    composition under :func:`process_file` (command line, batches, Dask) and the app's Segment tab
    (``workflows.segment.segment``).

    image : as read (:func:`read_image`), axes per `settings` / `file_axes`.
    pixel_size_um : the file's pixel size (µm per pixel); None uses ``settings.pixel_size_um``.
    """
    px = pixel_size_um or settings.pixel_size_um
    seg = segment(loaded, image, settings.eval_kwargs, settings.channel_axis, settings.z_axis, file_axes,
                  settings.segment_channels, settings.exclude_on_edges, progress=progress,
                  measure_only_channels=[settings.puncta.channel] if settings.puncta is not None else None)
    table = spots = None
    if settings.measure:
        table, spots = measure_segmentation(seg, px, settings.puncta)
    prov = provenance(seg, image_name, tuple(np.shape(image)), px, settings.puncta if spots is not None else None,
                      command)
    if seg.notices:
        prov["notices"] = list(seg.notices)
    return ImageResult(seg, table, spots, prov, px)


def save_result(result: ImageResult, file_name: str | os.PathLike, save: SaveOptions | None = None,
                savedir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write an :func:`analyse` result's files (:func:`write_outputs`) as `file_name` would have them."""
    seg = result.seg
    return write_outputs(file_name, seg.masks, seg.image, seg.flows, result.provenance, result.table, save,
                         savedir, seg.notices)


def process_file(path: str | os.PathLike, loaded: LoadedModel, settings: ImageSettings,
                 savedir: str | os.PathLike | None = None, save: SaveOptions | None = None,
                 name: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Read, segment, measure and write the files of one image file (:func:`read_image`,
    :func:`analyse`, :func:`save_result`); the one per-image function under the command line, the
    web service's batches and the Dask workers.

    name : the output file name to use instead of the path's (e.g. a unique stem in a batch).
    Returns {"name", "n_masks", "seconds", "device", "notices", "files": {kind: path}, "summary":
    measure.summarize(...) or {}, "pixel_size_um", "model", "diameter_note": hints.diameter_note(...),
    "hint": hints.suggest(...) ("" when the result looks plausible)}. Raises CellposeWebError for a
    bad image.
    """
    f = Path(path)
    img, axes, px_file = read_image(f, settings.max_pixels)
    result = analyse(loaded, img, settings, f.name, axes, px_file, command)
    seg = result.seg
    files = save_result(result, f.with_name(name) if name else f, save, savedir)
    summary = measure.summarize(result.table, result.puncta) if result.table is not None else {}
    return {"name": f.name, "n_masks": seg.n_masks, "seconds": seg.seconds, "device": seg.device,
            "notices": [f"notice: {f.name}: {n}" for n in seg.notices], "files": {k: str(v) for k, v in files.items()},
            "summary": summary, "pixel_size_um": result.pixel_size_um,
            "model": seg.model, "diameter_note": hints.diameter_note(seg.est_diam, seg.masks.shape),
            "hint": hints.suggest(seg.masks, diameter=settings.eval_kwargs.get("diameter"),
                                  n_channels=int(seg.image.shape[-1]), channels_chosen=bool(settings.segment_channels),
                                  model_name=seg.model.get("name"))}


def command_line() -> str:
    """The command that started this process, for provenance."""
    return "python -m cellpose_web " + " ".join(sys.argv[1:]) if sys.argv else ""
