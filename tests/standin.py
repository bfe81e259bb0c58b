"""The one stand-in for ``CellposeModel`` in the tests (fast, deterministic, no network weights).

``StandInModel.eval`` answers like ``CellposeModel.eval`` (masks, [flow RGB, dP, cellprob], styles;
a list of images gives lists) with a fixed rule, so a test can compute the expected masks itself
(``threshold_labels``); given ``answers`` ({image_key(image): labels}) it returns those labels instead, for
tests that check files and plumbing against known masks. ``install`` serves it from the web
service's model cache under the name ``thresh``.
"""
from __future__ import annotations

import threading

import numpy as np
from scipy import ndimage as ndi

NAME = "thresh"
SHA256 = "5e" * 32


def blobs(seed: int = 0, n: int = 5, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A (Y, X) uint16 test image: ``n`` bright 6x6 squares on a noisy background (``threshold_labels``
    finds them)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(10, 1, shape)
    for _ in range(n):
        y, x = rng.integers(8, shape[0] - 8, 2)
        img[y - 3:y + 3, x - 3:x + 3] += 100
    return img.astype(np.uint16)


def first_channel(img, channel_axis: int | None = None) -> np.ndarray:
    """The first channel of a (Y, X) or 3-axis image as float64 (Y, X); the channel axis is
    ``channel_axis``, else the shortest axis (as Cellpose guesses)."""
    x = np.asarray(img, np.float64)
    if x.ndim == 3:
        ax = int(np.argmin(x.shape)) if channel_axis is None else channel_axis % 3
        x = np.take(x, 0, axis=ax)
    return x


def threshold_labels(img, channel_axis: int | None = None) -> np.ndarray:
    """The rule: pixels brighter than mean + 1 std of the first channel, opened once (no single-pixel
    specks), connected components numbered 1..N (uint16 (Y, X))."""
    x = first_channel(img, channel_axis)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, np.uint16)
    v = x[finite]
    fg = finite & (x > v.mean() + v.std())
    fg = ndi.binary_opening(fg)
    return ndi.label(fg)[0].astype(np.uint16)


def image_key(img) -> tuple:
    """(sorted axis lengths without singletons, sum): the same for an image as read from its file and as
    the pipeline hands it to eval (channels last, (Y, X, 1) for a plain 2D image)."""
    a = np.asarray(img)
    return tuple(sorted(n for n in a.shape if n > 1)), float(np.nansum(a, dtype=np.float64))


class StandInModel:
    """Stands in for ``CellposeModel`` (see the module docstring)."""

    def __init__(self, answers: dict | None = None):
        self.answers = dict(answers or {})  # image_key(image) -> labels
        self.device = "cpu"
        self.dtype = "float32"
        self.diam_estimate: float | None = None  # 17.0 after an eval with diameter=None, as lite
        self.calls: list[dict] = []

    def eval(self, img, channel_axis=None, progress=None, **kw):
        if isinstance(img, list):  # as CellposeModel.eval: a list of images gives lists
            outs = [self.eval(im, channel_axis=channel_axis, **kw) for im in img]
            if progress:
                progress(1.0, "done")
            return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]
        self.calls.append({"channel_axis": channel_axis, **kw})
        self.diam_estimate = 17.0 if kw.get("diameter") is None else None
        known = self.answers.get(image_key(img))
        masks = known.copy() if known is not None else threshold_labels(img, channel_axis)
        x = np.nan_to_num(first_channel(img, channel_axis))
        cellprob = (x - x.mean()).astype(np.float32)
        if progress:
            progress(1.0, "done")
        rgb = np.zeros((*masks.shape, 3), np.uint8)
        return masks, [rgb, np.zeros((2, *masks.shape), np.float32), cellprob], np.zeros(256, np.float32)


def install(monkeypatch, answers: dict | None = None):
    """Serve a ``StandInModel`` as model ``thresh`` from ``workflows.model_cache`` (other names go to
    the real cache) and make it the default model; returns its ``CachedModel``."""
    from cellpose_web.workflows import model_cache as models_cache

    cm = models_cache.CachedModel(StandInModel(answers), NAME, SHA256, "", "test", threading.Lock())
    real_get, real_resolve = models_cache.get_model, models_cache.resolve
    info = {"name": NAME, "path": "", "sha256": SHA256, "arch": "test", "source": "test"}
    monkeypatch.setattr(models_cache, "get_model", lambda name: cm if name == NAME else real_get(name))
    monkeypatch.setattr(models_cache, "resolve", lambda name: dict(info) if name == NAME else real_resolve(name))
    monkeypatch.setenv("CELLPOSE_WEB_DEFAULT_MODEL", NAME)
    return cm
