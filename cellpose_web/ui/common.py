"""Per-session state shared by the tabs, and small helpers used by several tabs."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_web.workflows import inputs, model_cache as models_cache, pipeline


@dataclass
class Session:
    """What one browser tab works on. Lives in gr.State (server side, never shared between users)."""
    name: str = ""
    raw: np.ndarray | None = None            # the image as read from the file
    axes: str = ""
    pixel_size_um: float | None = None
    image: np.ndarray | None = None          # channels-last (Y, X, C) or (Z, Y, X, C)
    is_stack: bool = False
    masks: np.ndarray | None = None          # (Y, X) or (Z, Y, X)
    flow_rgb: np.ndarray | None = None
    cellprob: np.ndarray | None = None
    dP: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    table: Any = None
    puncta: Any = None
    files: list[str] = field(default_factory=list)
    workdir: str = ""
    version: int = 0                         # bumped on every new result (Correct tab reloads)
    channel_names: list[str] = field(default_factory=list)  # the file's own names, when it has them

    def out_dir(self) -> Path:
        if not self.workdir or not Path(self.workdir).is_dir():
            self.workdir = tempfile.mkdtemp(prefix="cpweb_session_")
        return Path(self.workdir)

    @property
    def nbytes(self) -> int:
        """Memory held in the session's arrays (image, masks, flows), for the run registry's bounds."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    @property
    def stem(self) -> str:
        from cellpose_web.service.storage import safe_name
        n = self.name or "image"
        for ext in sorted(inputs.IMAGE_EXTS, key=len, reverse=True):
            if n.lower().endswith(ext):
                n = n[: -len(ext)]
        try:
            return safe_name(n, "file name")
        except Exception:
            return "image"


def new_session() -> Session:
    return Session()


def model_choices() -> tuple[list[tuple[str, str]], str | None]:
    """(dropdown choices as (label, name) pairs, the name to pre-select)."""
    choices = models_cache.list_model_choices()
    names = [v for _, v in choices]
    d = models_cache.default_model_name()
    if d not in names:
        d = names[0] if names else None
    return choices, d


def plane(arr: np.ndarray | None, z: int, is_stack: bool) -> np.ndarray | None:
    if arr is None:
        return None
    if is_stack and arr.ndim >= 3:
        return arr[int(np.clip(z, 0, arr.shape[0] - 1))]
    return arr


def axis_choices(n: int) -> list[str]:
    return ["auto"] + [str(i) for i in range(n)]


def parse_axis(v: Any) -> int | None:
    if v in (None, "", "auto"):
        return None
    return int(v)


def parse_channels(text: str | None) -> list[int] | None:
    from cellpose_web.workflows import CellposeWebError
    if text is None or not str(text).strip():
        return None
    try:
        return [int(t) for t in str(text).replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CellposeWebError("Channels to use: write channel numbers separated by commas, e.g. 0,1 "
                               "(blank = all).") from None


def parse_pixel_size(v: Any) -> float | None:
    """The pixel-size box's value as µm per pixel; None when blank or 0 (unknown). The box is text, not
    a browser number box, which turns a decimal comma ("0,1") into "01" without a word: here "0,1" is 0.1."""
    from cellpose_web.workflows import CellposeWebError
    v = inputs.decimal_text(v)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise CellposeWebError(f"Pixel size must be a number in µm per pixel, e.g. 0.65 (got {str(v)[:20]!r}).") from None
    if not np.isfinite(f) or f < 0 or f > 1000:
        raise CellposeWebError("Pixel size must be between 0 and 1000 µm per pixel (blank = unknown).")
    return f or None


def axes_from_meta(axes: str, shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """Channel and z axis indices from an io axes string like 'ZCYX' (None when absent)."""
    return pipeline.axes_in_file(axes, shape)


def whole_cell_model_for_puncta(on: bool, model_name: str):
    """The "count puncta" box was ticked: puncta are counted per whole cell, so a nuclei model in the
    model list (Segment, Batch) gives way to the best whole-cell model, and the user is told."""
    import gradio as gr



    if not on or models_cache.model_purpose(model_name) != "nuclei":
        return gr.skip()
    name, _ = pipeline.model_for_puncta(None)
    if name not in models_cache.list_model_names():
        gr.Warning(pipeline.puncta_model_warning(model_name))
        return gr.skip()
    gr.Info(f"Puncta are counted per whole cell: model switched from {model_name} (nuclei) to {name} "
            "(whole cells). Pick another model to override.")
    return gr.update(value=name)
