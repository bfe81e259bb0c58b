"""The Cellpose-compatible model face: ``CellposeModel`` (core), its parameter checks (params),
Cellpose 1-3 semantics (legacy) and training (train).

>>> from cellpose_web.models import CellposeModel
>>> model = CellposeModel(pretrained_model="cpsam_v2")          # or "lite", or a file path
>>> masks, flows, styles = model.eval(img, diameter=30)           # img (Y, X) or (Y, X, C)"""
from __future__ import annotations

from cellpose_web.models.params import normalize_default, DIAM_MEAN, MAX_NITER, MAX_RESIZED_PIXELS, AUTO_DIAMETER_TOLERANCE, MAX_AUTO_ZOOM, auto_diameter_zoom, format_duration, check_eval_params  # noqa: F401
from cellpose_web.engine.dynamics import dx_to_circ  # noqa: F401 - Cellpose has it in models' namespace too
from cellpose_web.models.legacy import SizeModel  # noqa: F401 - Cellpose 3's models.SizeModel
from cellpose_web.models.core import CellposeModel, run_net, run_3D, BLOCK_PIXELS, BLOCK_MARGIN  # noqa: F401

__all__ = ["CellposeModel", "SizeModel", "run_net", "run_3D", "normalize_default", "dx_to_circ"]
