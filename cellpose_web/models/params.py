"""Eval parameters: defaults, the checks every face gets (``check_eval_params``), the automatic
diameter zoom, normalisation settings."""
from __future__ import annotations

import math
from typing import Any
import numpy as np
import torch
from cellpose_web.engine.device import tensor_to_numpy
from cellpose_web.errors import CellposeWebError


DIAM_MEAN = 30.0


MAX_NITER = 10000


MAX_RESIZED_PIXELS = 150_000_000  # ~12,000 x 12,000 after rescaling; a 0.5 px diameter on a 256² image would be 236 M


normalize_default = {
    "lowhigh": None,
    "percentile": None,
    "normalize": True,
    "norm3D": True,
    "sharpen_radius": 0,
    "smooth_radius": 0,
    "tile_norm_blocksize": 0,
    "tile_norm_smooth3D": 1,
    "invert": False,
}


# --------------------------------------------------------------------------------------------
# progress reporting
# --------------------------------------------------------------------------------------------
#: lite's automatic diameter reruns at 30 / estimate when its first pass's estimate is off 30 px by more
AUTO_DIAMETER_TOLERANCE = 0.1


#: ... but zooms by at most this much (6.25x the pixels): objects estimated below 12 px, often texture or
#: debris read as tiny cells, would otherwise cost up to 10x a normal image (on nuclei of ~10 px the cap
#: changed nuclei_2d/val's AP@0.5 / AP@0.75 by -0.007 / -0.002)
MAX_AUTO_ZOOM = 2.5


def auto_diameter_zoom(diameter_estimate: float | None, image_shape: tuple[int, ...] | None = None) -> float | None:
    """The zoom of lite's second pass for a first-pass diameter estimate (px), None when there is none.

    ``diameter=None`` with lite: the first pass at the image's own scale estimates the median object
    diameter; when it differs from 30 px by more than ``AUTO_DIAMETER_TOLERANCE``, the image runs
    again zoomed by 30 / estimate, i.e. at (30 / estimate)² times the pixels, zooming in by at most
    ``MAX_AUTO_ZOOM`` and, given the (Y, X) ``image_shape``, to at most ``MAX_RESIZED_PIXELS``.
    """
    if diameter_estimate is None or not diameter_estimate > 0:
        return None
    zoom = DIAM_MEAN / float(diameter_estimate)
    if abs(1 / zoom - 1) <= AUTO_DIAMETER_TOLERANCE:
        return None
    zoom = min(zoom, MAX_AUTO_ZOOM)
    if image_shape is not None:
        zoom = min(zoom, math.sqrt(MAX_RESIZED_PIXELS / max(1, int(image_shape[0]) * int(image_shape[1]))))
    return zoom


def format_duration(seconds: float) -> str:
    """'12 s', '3 min 05 s', '1 h 02 min' (progress messages of eval, the service and the UI)."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def check_finite(x: np.ndarray) -> None:
    if x.dtype.kind in "fc":
        bad = ~np.isfinite(x)
        nbad = int(bad.sum())
        if nbad:
            raise CellposeWebError(
                f"the image contains {nbad} NaN or infinite pixel value(s); replace them (for example with "
                "numpy.nan_to_num) or crop them away before segmenting.")
    elif x.dtype.kind not in "biu":
        raise CellposeWebError(f"the image has data type {x.dtype}; expected numbers (integers or floats).")


def as_array(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return tensor_to_numpy(x)
    if x is None:
        raise CellposeWebError("no image was given (x is None)")
    try:
        a = np.asarray(x)
    except Exception as e:
        raise CellposeWebError(f"the image could not be read as an array ({e})") from e
    if a.dtype == object:
        raise CellposeWebError("the image is not a regular array (ragged or mixed types); pass one numeric array "
                               "per image, or a list of images")
    return a


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, whole: bool = False, hint: str = "") -> float | int:
    """``value`` as a finite float (int if ``whole``) within [lo, hi] ((lo, hi] if ``lo_open``);
    otherwise a CellposeWebError that names the parameter and the allowed range."""
    kind = "whole number" if whole else "number"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CellposeWebError(f"{name} must be a {kind}, got {value!r}") from None
    above_lo = lo is None or (v > lo if lo_open else v >= lo)
    if math.isfinite(v) and above_lo and (hi is None or v <= hi) and not (whole and v != int(v)):
        return int(v) if whole else v
    if hi is None:
        allowed = f"{'>' if lo_open else '>='} {lo}"
    else:
        allowed = f"in ({lo}, {hi}]" if lo_open else f"between {lo} and {hi}"
    raise CellposeWebError(f"{name} must be a {kind} {allowed}{hint}, got {value!r}")


def check_eval_params(diameter: Any = None, flow_threshold: Any = 0.4, cellprob_threshold: Any = 0.0,
                      niter: Any = None, min_size: Any = 15, max_size_fraction: Any = 0.4,
                      anisotropy: Any = None, stitch_threshold: Any = 0.0, flow3D_smooth: Any = 0,
                      batch_size: Any = 8) -> dict[str, Any]:
    """Check and normalise the parameters of :meth:`CellposeModel.eval` (the one place that does).

    The CLI and the web service call this too, so a bad value gets the same message everywhere.
    Returns the values converted: diameter float or None (0/None = no rescaling / automatic),
    niter int or None (0/None = automatic), anisotropy float or None, flow3D_smooth a list of three
    sigmas (Z, Y, X) or None, batch_size int or None (automatic). Raises :class:`CellposeWebError`
    naming the parameter and the range.
    """
    if diameter is not None:
        diameter = _number("diameter", diameter, lo=0,
                           hint=" pixels (0 or None: no rescaling, or estimated for 'lite')") or None
    if niter is not None:
        niter = _number("niter", niter, lo=0, hi=MAX_NITER, whole=True, hint=" (0 or None: automatic)") or None
    if anisotropy is not None:
        anisotropy = _number("anisotropy", anisotropy, lo=0, lo_open=True)
    return {
        "diameter": diameter,
        "flow_threshold": _number("flow_threshold", flow_threshold, lo=0, hint=" (0 turns the check off)"),
        "cellprob_threshold": _number("cellprob_threshold", cellprob_threshold, lo=-1000, hi=1000,
                                      hint=" (typically -6..6)"),
        "niter": niter,
        "min_size": _number("min_size", min_size, lo=-1, whole=True, hint=" pixels (-1 keeps all sizes)"),
        "max_size_fraction": _number("max_size_fraction", max_size_fraction, lo=0, hi=1, lo_open=True),
        "anisotropy": anisotropy,
        "stitch_threshold": _number("stitch_threshold", stitch_threshold or 0.0, lo=0, hi=1),
        "flow3D_smooth": _flow3D_sigma(flow3D_smooth),
        "batch_size": None if batch_size is None else _number("batch_size", batch_size, lo=1, whole=True),
    }


def _flow3D_sigma(flow3D_smooth: Any) -> list[float] | None:
    if flow3D_smooth is None or flow3D_smooth is False:
        return None
    try:
        s = [float(flow3D_smooth)] * 3 if np.isscalar(flow3D_smooth) else [float(v) for v in flow3D_smooth]
    except (TypeError, ValueError):
        raise CellposeWebError(f"flow3D_smooth must be one number or three (Z, Y, X); got {flow3D_smooth!r}") from None
    if len(s) == 1:
        s = s * 3
    if len(s) != 3:
        raise CellposeWebError(f"flow3D_smooth must be one number or three (Z, Y, X); got {flow3D_smooth!r}")
    if any(v < 0 or math.isnan(v) for v in s):
        raise CellposeWebError(f"flow3D_smooth must be >= 0, got {flow3D_smooth!r}")
    return s if any(v > 0 for v in s) else None


def normalization_settings(normalize: Any, invert: bool) -> dict[str, Any]:
    """eval's ``normalize`` (bool or dict) and ``invert`` as one checked dict of normalisation options."""
    params = dict(normalize_default)
    if isinstance(normalize, dict):
        unknown = set(normalize) - set(params)
        if unknown:
            raise CellposeWebError(f"unknown normalize option(s) {sorted(unknown)}; allowed: {sorted(params)}")
        params.update(normalize)
        if invert:
            params["invert"] = True
    elif isinstance(normalize, (bool, np.bool_)):
        params["normalize"] = bool(normalize)
        params["invert"] = bool(invert)
    else:
        raise CellposeWebError("normalize must be True/False or a dict of normalisation options")
    return params
