"""Pictures of images and masks: the one rendering of colours, outlines and overlays used by the
saved files (``_outlines_cp_masks.png``, ``_cp_output.png``, ``_seg.npy`` colours) and by the app's
viewers, so what the browser shows is what the files hold.

All functions take and return numpy arrays; RGB pictures are (Y, X, 3) uint8.
"""
from __future__ import annotations

import numpy as np

from cellpose_web.engine import dynamics
from cellpose_web.engine.transforms import percentile_stretch

__all__ = ["label_colors", "outlines", "image_to_rgb", "overlay", "OUTLINE_RGB"]

OUTLINE_RGB = (255, 0, 0)  # outline colour, as Cellpose's saved outline pictures
DISPLAY_SAMPLES = 500_000  # a display's percentiles come from at most ~this many pixels per channel


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """Bright, reproducible colours for labels 1..n as (n, 3) uint8 (Cellpose's ``_seg.npy`` 'colors').

    Index with ``label - 1``; prepend a black row to index with the label itself. A label keeps its
    colour whatever n is (the Correct tab's canvas gets this table, so new cells never recolour others).
    """
    n = int(n)
    if n <= 0:
        return np.zeros((0, 3), np.uint8)
    rng = np.random.default_rng(seed)
    u = rng.random((n, 2))  # row by row: label k's colour does not depend on n
    hue, sat = u[:, 0], 0.6 + 0.4 * u[:, 1]
    h6 = hue * 6
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    v = np.ones(n)
    p, q, t = v * (1 - sat), v * (1 - f * sat), v * (1 - (1 - f) * sat)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return (table[i, np.arange(n)] * 255).astype(np.uint8)


def outlines(masks: np.ndarray) -> np.ndarray:
    """Bool (Y, X) or (Z, Y, X): each mask's outer-boundary pixels (Cellpose's ``masks_to_outlines``)."""
    return np.asarray(dynamics.masks_to_outlines(masks), dtype=bool)


def image_to_rgb(image: np.ndarray, lo: float = 1.0, hi: float = 99.5) -> np.ndarray:
    """A (Y, X) or channels-last (Y, X, C) image of any dtype as (Y, X, 3) uint8 for display.

    Each channel is stretched between its `lo` and `hi` percentiles. One channel is grey; two
    channels are green (first) and magenta (second); three or more show the first three as RGB.
    """
    x = np.asarray(image)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"cannot display an image of dtype {x.dtype}")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"cannot display an image of shape {x.shape}; expected (Y, X) or (Y, X, C)")
    chans = [percentile_stretch(x[..., c], lo, hi, max_samples=DISPLAY_SAMPLES) for c in range(min(x.shape[-1], 3))]
    if len(chans) == 1:
        rgb = np.stack(chans * 3, -1)
    elif len(chans) == 2:
        rgb = np.stack([chans[1], chans[0], chans[1]], -1)
    else:
        rgb = np.stack(chans, -1)
    return (rgb * 255).astype(np.uint8)


def overlay(rgb: np.ndarray, masks: np.ndarray | None, show_masks: bool = True, show_outlines: bool = True,
            alpha: float = 0.45) -> np.ndarray:
    """Masks over a (Y, X, 3) uint8 picture: filled with their label colours (blended by `alpha`)
    and/or outlined in :data:`OUTLINE_RGB`. Returns a new (Y, X, 3) uint8 array."""
    out = np.asarray(rgb, np.uint8).copy()
    if masks is None or not masks.size or masks.shape != out.shape[:2]:
        return out
    masks = np.asarray(masks)
    n = int(masks.max(initial=0))
    if n == 0:
        return out
    if show_masks:
        cols = np.vstack([np.zeros((1, 3), np.uint8), label_colors(n)]).astype(np.float32)
        fg = masks > 0
        out[fg] = ((1 - alpha) * out[fg] + alpha * cols[masks[fg]]).astype(np.uint8)
    if show_outlines:
        out[outlines(masks)] = OUTLINE_RGB
    return out
