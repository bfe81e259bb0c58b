"""ZeroGPU support: when the `spaces` package is importable, GPU work is wrapped in
`spaces.GPU(duration=...)` with a duration that grows with image size (tiers as the official
Cellpose Space: longest side ≤ 1000 px -> 10 s, < 5000 -> 60 s, < 20000 -> 240 s), plus
time for each extra plane of a stack. Elsewhere the functions run unchanged.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from cellpose_web.errors import CellposeWebError

try:  # pragma: no cover - only on HuggingFace ZeroGPU Spaces
    import spaces  # type: ignore
except Exception:  # noqa: BLE001
    spaces = None


def gpu_duration(shape: tuple[int, ...], n_images: int = 1, extra_s: float = 0.0) -> int:
    """Seconds of GPU time to ask for an image of `shape` (largest two axes are Y, X)."""
    dims = sorted(int(s) for s in shape)
    side = dims[-1] if dims else 0
    if side > 20000:
        raise CellposeWebError("Image size must be less than 20,000 px per side; crop or downsample it.")
    base = 10 if side <= 1000 else 60 if side < 5000 else 240
    planes = 1
    if len(dims) >= 3:
        planes = max(1, int(np.prod(dims[:-2])) // 3)  # channels are cheap; planes are not
    return int(min(600, base * max(1, n_images) + 2 * (planes - 1) * max(1, n_images) + extra_s))


def on_zero_gpu() -> bool:
    return spaces is not None


def gpu_task(duration_fn: Callable[..., int]) -> Callable[[Callable], Callable]:
    """Decorator: on ZeroGPU, `spaces.GPU(duration=duration_fn)`; elsewhere the function itself."""
    def deco(fn: Callable) -> Callable:
        if spaces is None:
            return fn
        wrapped = spaces.GPU(duration=duration_fn)(fn)  # dynamic duration: called with fn's arguments
        return functools.wraps(fn)(wrapped)
    return deco
