"""Segmentation as the web app uses it: the form's parameters checked against the server's
limits, then the per-image pipeline (:mod:`cellpose_web.workflows.pipeline`) on the shared model, under the
ZeroGPU wrapper. No Gradio here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cellpose_web import measure
from cellpose_web.engine import memory
from cellpose_web.workflows import inputs, pipeline
from cellpose_web.errors import CellposeWebError, OutOfMemoryError, RunCancelled
from cellpose_web.models import check_eval_params
from cellpose_web.service import gpu
from cellpose_web.workflows import model_cache as models_cache
from cellpose_web.service.config import Limits

log = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]


MIN_DIAMETER_PX = 3.0  # smallest diameter the form accepts (the models look at cells of 30 px: 10x enlargement)


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch's out-of-memory error (by type), for the app's messages."""
    return memory.is_out_of_memory(e)


def release_memory() -> None:
    """Give a failed run's (GPU) memory back."""
    memory.release()


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
    # file channels that show the cells, fed to the model in this order (None = all but the puncta
    # channel; Cellpose 1-3 models: [cytoplasm, nucleus]); measuring uses every channel
    channels: list[int] | None = None
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
                x = float(inputs.decimal_text(v))
            except (TypeError, ValueError):
                raise CellposeWebError(f"{name} must be a number; got {v!r}.") from None
            if not math.isfinite(x) or x < lo or x > hi:
                allowed = f"at most {hi:g}" if lo == -math.inf else f"between {lo:g} and {hi:g}"
                raise CellposeWebError(f"{name} must be {allowed}; got {v}.")
            return x

        # the form's own limits (a shared server caps the work one request may ask for) ...
        d = num("Diameter (px)", p.diameter, -math.inf, 5000, allow_none=True)
        if d is not None and d < 0:
            raise CellposeWebError("Diameter cannot be negative; leave it blank (or 0) for automatic.")
        if d and d < MIN_DIAMETER_PX:
            # the models see cells at 30 px: a 0.5 px diameter would enlarge the image 60x per side
            # (a 256 x 256 crop becomes 15,360 x 15,360) and run for minutes into an out-of-memory error
            raise CellposeWebError(f"Diameter {d:g} px is smaller than any cell the models can find (at least "
                                   f"{MIN_DIAMETER_PX:g} px): it is the cells' width in pixels of this image "
                                   "(typically 10-100). Leave it blank (or 0) for automatic.")
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
        kw = dict(diameter=self.diameter, flow_threshold=self.flow_threshold,
                  cellprob_threshold=self.cellprob_threshold, niter=self.niter, min_size=self.min_size,
                  do_3D=self.do_3D, anisotropy=self.anisotropy, stitch_threshold=self.stitch_threshold,
                  normalize={"percentile": tuple(self.norm_percentile)})
        return kw


@dataclass
class SegResult:
    """One image segmented and measured by the web service (:func:`segment`): an
    :class:`~cellpose_web.workflows.pipeline.ImageResult` with the files it wrote."""
    result: pipeline.ImageResult
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def seg(self) -> pipeline.Segmentation:
        return self.result.seg

    @property
    def table(self) -> pd.DataFrame:
        return self.result.table

    @property
    def puncta(self) -> pd.DataFrame | None:
        return self.result.puncta

    @property
    def provenance(self) -> dict[str, Any]:
        return self.result.provenance

    @property
    def masks(self) -> np.ndarray:          # (Y, X) or (Z, Y, X) labels
        return self.seg.masks

    @property
    def image(self) -> np.ndarray:          # every channel of the file, (Y, X, C) or (Z, Y, X, C)
        return self.seg.image

    @property
    def flow_rgb(self) -> np.ndarray | None:
        return self.seg.flow_rgb

    @property
    def dP(self) -> np.ndarray | None:
        return self.seg.dP

    @property
    def cellprob(self) -> np.ndarray | None:
        return self.seg.cellprob

    @property
    def n_cells(self) -> int:
        return self.seg.n_masks


def _duration(model_name, img, *a, **k) -> int:
    return gpu.gpu_duration(tuple(np.shape(img)))


@gpu.gpu_task(_duration)
def _analyse_on_device(model_name: str, img: np.ndarray, settings: pipeline.ImageSettings, image_name: str,
                       file_axes: str, progress: ProgressFn | None) -> pipeline.ImageResult:
    return pipeline.analyse(models_cache.get_model(model_name), img, settings, image_name, file_axes,
                            progress=progress)


def segment(image: np.ndarray, params: SegmentParams, model_name: str, image_name: str = "image",
            pixel_size_um: float | None = None, progress: ProgressFn | None = None,
            limits: Limits | None = None, file_axes: str = "",
            puncta: measure.PunctaParams | None = None, out_file: str | Path | None = None) -> SegResult:
    """Segment and measure one image (as read from the file) with `model_name` and checked `params`:
    :func:`cellpose_web.workflows.pipeline.analyse` (what ``process_file`` runs for the command line and
    batches) on the shared model, under the GPU wrapper, with out-of-memory errors as messages.

    ``params.channels`` are the file channels fed to the model; the table measures every channel
    and ``puncta.channel`` is a file channel too. out_file : write the app's files
    (``SaveOptions.everything()``) named after this path (``pipeline.save_result``).
    """
    limits = limits or Limits.from_env()
    params = params.validated(limits)
    settings = pipeline.ImageSettings(eval_kwargs=params.eval_kwargs(), channel_axis=params.channel_axis,
                                      z_axis=params.z_axis, segment_channels=params.channels,
                                      pixel_size_um=pixel_size_um, puncta=puncta)
    oom = False
    try:
        result = _analyse_on_device(model_name, image, settings, image_name, file_axes, progress)
    except (CellposeWebError, FileNotFoundError, RunCancelled):  # includes errors.OutOfMemoryError
        raise
    except MemoryError:
        oom = True
    except Exception as e:
        if not memory.is_out_of_memory(e):  # matched by type (torch.OutOfMemoryError), not by message
            log.exception("segmentation failed")
            raise CellposeWebError(f"Segmentation failed ({type(e).__name__}: {str(e)[:200]}). Check the "
                                   "channel/z axis settings; if it persists tell the admin.") from None
        log.warning("out of memory while segmenting: %s", " ".join(str(e).split())[:300])
        oom = True
    if oom:  # outside the except block: the failed run's tensors are freed, then the GPU's cache
        memory.release()
        raise OutOfMemoryError("Out of memory while segmenting: crop the image or use a larger diameter (less "
                               "zoom); on a shared GPU, try again when fewer jobs run.")
    files = pipeline.save_result(result, out_file, pipeline.SaveOptions.everything()) if out_file else {}
    return SegResult(result, files)
