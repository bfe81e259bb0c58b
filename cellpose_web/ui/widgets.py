"""Shared pieces of the UI: overlay rendering, error handling, formatting, theme, CSS and the
keyboard-shortcut script. Display only; measurements come from cellpose_web.measure.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import numpy as np

from cellpose_web.workflows import CellposeWebError, OutOfMemoryError, RunCancelled
from cellpose_web.workflows import display as render, segment as segment_workflow
from cellpose_web.ui import correct_canvas

log = logging.getLogger("cellpose_web.ui")

MAX_DISPLAY_SIDE = 2048

OVERLAY_MASKS = "Masks (filled)"
OVERLAY_OUTLINES = "Outlines"
OVERLAY_PUNCTA = "Puncta"
BG_IMAGE = "Image"
BG_FLOWS = "Flow field (RGB)"
BG_CELLPROB = "Cell probability"

# one wording for the channel and puncta controls of every tab (Segment, Batch); channels are
# always numbered as in the file, 0 = first (Fiji's C=1)
SEG_CHANNELS_LABEL = "Segmentation channels (the cells)"
SEG_CHANNELS_PLACEHOLDER = "e.g. 1,2 — blank = all but the puncta channel"
SEG_CHANNELS_INFO = ("file channels that show the cells, 0 = first as in the file; Cellpose 1-3 models "
                     "(cp_cyto, cyto3): first = cytoplasm, second = nucleus. Every channel is measured.")
PUNCTA_ON_LABEL = "Count puncta per cell"
PUNCTA_ON_INFO = "spots (Laplacian of Gaussian) on one channel; a whole-cell model is chosen for it"
PUNCTA_CHANNEL_LABEL = "Puncta channel (0 = first, as in the file)"
PUNCTA_CHANNEL_INFO = "kept out of segmentation unless you list it there"
PUNCTA_THRESHOLD_LABEL = "Threshold (normalised, lower = more spots)"
PUNCTA_SIGMA_MIN_LABEL = "Min sigma (px)"
PUNCTA_SIGMA_MAX_LABEL = "Max sigma (px)"
PUNCTA_DISTANCE_LABEL = "Nearest cell within (µm)"
PUNCTA_DISTANCE_INFO = ("a spot just outside every mask counts for the nearest cell this close "
                        "(masks end a little inside the cell's edge); 0 = only spots on a mask")


# ------------------------------------------------------------------ errors
def _message(e: BaseException, fn: Callable) -> tuple[str, str]:
    """(title, message) for an exception; unexpected ones are logged with their traceback."""
    if isinstance(e, RunCancelled):
        return "Cancelled", str(e)
    if isinstance(e, OutOfMemoryError):
        return "Out of memory", str(e)
    if isinstance(e, CellposeWebError):
        return "Please check", str(e)
    if isinstance(e, FileNotFoundError):
        return "File not found", f"{e} Upload the file again or pick another one."
    if isinstance(e, MemoryError):
        return "Out of memory", "The server ran out of memory; try a smaller image."
    if segment_workflow.is_out_of_memory(e):  # torch's, by type: the GPU's memory
        segment_workflow.release_memory()
        return "Out of memory", "The GPU ran out of memory; try a smaller image, or again when fewer jobs run."
    log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
    return "Unexpected error", (f"Something went wrong ({type(e).__name__}). Your earlier results are kept; "
                                "try again, and tell the admin if it repeats.")


def user_errors(fn: Callable | None = None, *, outputs: int | None = None) -> Callable:
    """Guard a UI callback so no traceback reaches the browser.

    With ``outputs=None`` an error is raised as gr.Error (the API caller sees it as a failure).
    With ``outputs=n`` the message is shown as a gr.Warning toast and every output is left as it
    was (gr.skip()), so earlier results stay on screen. Works for functions and generators.
    """
    if fn is None:
        return lambda f: user_errors(f, outputs=outputs)
    import gradio as gr

    def handle(e: BaseException):
        if isinstance(e, gr.Error) and outputs is None:
            return e
        title, msg = (e.title or "Error", e.message) if isinstance(e, gr.Error) else _message(e, fn)
        if outputs is None:
            return gr.Error(msg, title=title)
        gr.Warning(msg, title=title, duration=15)
        return None

    def skips():
        return gr.skip() if outputs == 1 else tuple(gr.skip() for _ in range(outputs))

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                err = handle(e)
                if err is not None:
                    raise err from None
                yield skips()
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            err = handle(e)
            if err is not None:
                raise err from None
            return skips()
    return wrapper


def username(request: Any) -> str | None:
    return getattr(request, "username", None) if request is not None else None


# ------------------------------------------------------------------ formatting
def fmt_num(x: Any, unit: str = "", digits: int = 1) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    if not np.isfinite(v):
        return "–"
    s = f"{v:,.{digits}f}" if abs(v) < 1e5 else f"{v:,.0f}"
    return f"{s} {unit}".strip()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short_sha(sha: str | None) -> str:
    return (sha or "unknown")[:12]


def table_for_display(df, max_rows: int = 5000):
    """Round floats for the on-screen table (the CSV keeps full precision)."""
    out = df.head(max_rows).copy()
    for c in out.columns:
        if out[c].dtype.kind == "f":
            out[c] = out[c].round(3 if c in ("eccentricity", "solidity") else 2)
    return out


# ------------------------------------------------------------------ rendering
def to_display_rgb(img: np.ndarray) -> np.ndarray:
    """(Y, X) or (Y, X, C) any dtype -> (Y, X, 3) uint8 (:func:`cellpose_web.render.image_to_rgb`,
    the same picture the saved outline files use)."""
    return render.image_to_rgb(img)


def cellprob_rgb(cellprob: np.ndarray) -> np.ndarray:
    """Cell probability logits -> (Y, X, 3) uint8 (sigmoid, dark = background, bright = cell)."""
    p = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(cellprob, np.float32), -30, 30)))
    v = (p * 255).astype(np.uint8)
    return np.stack([v, (v * 0.85).astype(np.uint8), (255 - v) // 3], -1)


def compose(base_rgb: np.ndarray, masks: np.ndarray | None, show_masks: bool = True, show_outlines: bool = True,
            puncta_yx: np.ndarray | None = None, selected: list[int] | None = None, alpha: float = 0.45,
            pending: list[tuple[float, float]] | None = None) -> np.ndarray:
    """Overlay masks (filled, random colours), outlines, puncta dots, selected cells and an
    unfinished outline on an RGB image; all (Y, X)."""
    out = base_rgb
    if masks is not None and masks.size and masks.shape == out.shape[:2]:
        out = render.overlay(out, masks, show_masks, show_outlines=False, alpha=alpha)
        if selected:
            sel = np.isin(masks, [s for s in selected if s > 0])
            out[sel] = (0.4 * out[sel] + 0.6 * 255).astype(np.uint8)
        out = render.overlay(out, masks, show_masks=False, show_outlines=show_outlines)
    out = out.astype(np.float32)
    if puncta_yx is not None and len(puncta_yx):
        yy = np.clip(np.round(puncta_yx[:, 0]).astype(int), 0, out.shape[0] - 1)
        xx = np.clip(np.round(puncta_yx[:, 1]).astype(int), 0, out.shape[1] - 1)
        for dy, dx in ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0)):
            out[np.clip(yy + dy, 0, out.shape[0] - 1), np.clip(xx + dx, 0, out.shape[1] - 1)] = (255, 255, 0)
    if pending:
        from skimage import draw
        pts = np.asarray(pending, float)
        for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
            rr, cc = draw.line(int(y0), int(x0), int(y1), int(x1))
            out[np.clip(rr, 0, out.shape[0] - 1), np.clip(cc, 0, out.shape[1] - 1)] = (0, 255, 255)
        for y, x in pts.astype(int):
            out[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = (0, 255, 255)
    return np.clip(out, 0, 255).astype(np.uint8)


def display_scale(shape: tuple[int, ...], target: int = 640) -> int:
    """Integer zoom for small images so the viewer shows them large (clicks divide by it)."""
    side = max(int(shape[0]), int(shape[1]))
    return max(1, min(8, target // max(side, 1)))


def upscale(rgb: np.ndarray | None) -> np.ndarray | None:
    """Nearest-neighbour zoom by display_scale (pixels stay crisp squares)."""
    if rgb is None:
        return None
    k = display_scale(rgb.shape)
    if k == 1:
        return rgb
    return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)


# ------------------------------------------------------------------ look
CSS = """
.cpw-header h1 {margin-bottom: 0.2em;}
.cpw-count {font-size: 1.15em;}
.cpw-small {font-size: 0.85em; color: var(--body-text-color-subdued);}
#seg-view img {image-rendering: pixelated;}
footer {display: none !important;}
""" + correct_canvas.CSS

HEAD = """
<script>
(function () {
  if (window.__cpwKeys) { return; }
  window.__cpwKeys = true;
  // Keyboard shortcuts as in the Cellpose GUI: M masks, O outlines (the Correct tab's drawing
  // surface has its own keys, in correct_canvas.SCRIPT). Ignored while typing in a field.
  function toggle(text) {
    document.querySelectorAll('label').forEach(function (l) {
      if (l.offsetParent !== null && l.textContent.trim() === text) {
        var i = l.querySelector('input[type=checkbox]'); if (i) { i.click(); }
      }
    });
  }
  // A number box drops a decimal comma without a word ("2,5" became 25): type a point instead.
  document.addEventListener('keydown', function (e) {
    var el = e.target;
    if (e.key === ',' && el && el.tagName === 'INPUT' && el.type === 'number') {
      e.preventDefault();
      document.execCommand('insertText', false, '.');
    }
  }, true);
  document.addEventListener('keydown', function (e) {
    var t = e.target && e.target.tagName;
    if (t === 'INPUT' || t === 'TEXTAREA' || t === 'SELECT' || (e.target && e.target.isContentEditable)) return;
    var k = e.key.toLowerCase();
    if (!e.ctrlKey && !e.metaKey && k === 'm') { toggle('Masks (filled)'); e.preventDefault(); }
    else if (!e.ctrlKey && !e.metaKey && k === 'o') { toggle('Outlines'); e.preventDefault(); }
  });
})();
</script>
""" + correct_canvas.SCRIPT


def theme():
    import gradio as gr
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate")


def puncta_controls(prefix: str) -> tuple:
    """The puncta controls of the Segment and Batch tabs, one wording and one set of defaults
    (built inside the caller's "Puncta (e.g. PIEZO1)" accordion).

    prefix : elem_id prefix ("seg", "batch"). Returns the components (on, channel, sigma_min,
    sigma_max, threshold, max_distance_um).
    """
    import gradio as gr

    from cellpose_web.workflows.results import DEFAULT_MAX_DISTANCE_UM

    on = gr.Checkbox(False, label=PUNCTA_ON_LABEL, info=PUNCTA_ON_INFO, elem_id=f"{prefix}-puncta-on")
    with gr.Row():
        channel = gr.Number(0, label=PUNCTA_CHANNEL_LABEL, precision=0, minimum=0, info=PUNCTA_CHANNEL_INFO,
                            elem_id=f"{prefix}-puncta-ch")
        threshold = gr.Number(0.1, label=PUNCTA_THRESHOLD_LABEL, minimum=0)
    with gr.Row():
        sigma_min = gr.Number(1.0, label=PUNCTA_SIGMA_MIN_LABEL, minimum=0.1)
        sigma_max = gr.Number(3.0, label=PUNCTA_SIGMA_MAX_LABEL, minimum=0.1)
        distance = gr.Number(DEFAULT_MAX_DISTANCE_UM, label=PUNCTA_DISTANCE_LABEL, minimum=0,
                             info=PUNCTA_DISTANCE_INFO, elem_id=f"{prefix}-puncta-dist")
    return on, channel, sigma_min, sigma_max, threshold, distance
