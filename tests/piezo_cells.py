"""PIEZO1-style TIRF files with known whole cells and known puncta (``synthetic.puncta_sample``:
spots anywhere on each cell's footprint, the cytoplasm fading towards the cell's edge so predicted
masks end a little inside it), and the numbers the README's recipe must give back on them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from cellpose_web.engine import metrics, synthetic

CHANNEL_NAMES = ["PIEZO1-HaloTag", "cytoplasm", "DAPI"]


def write(path: str | Path, seed: int, shape=(384, 384)) -> synthetic.PunctaSample:
    """An ImageJ hyperstack (C, Y, X) uint16 with the pixel size (0.1 µm) and channel names."""
    s = synthetic.puncta_sample(np.random.default_rng(seed), shape)
    tifffile.imwrite(path, s.image, imagej=True, resolution=(1 / s.pixel_size_um, 1 / s.pixel_size_um),
                     metadata={"axes": "CYX", "unit": "um", "Labels": CHANNEL_NAMES})
    return s


def scores(sample: synthetic.PunctaSample, masks: np.ndarray, table: pd.DataFrame) -> dict[str, float]:
    """How the per-cell counts of a result (masks + its per-cell table) compare with what was planted.

    Returns ap50 (cells found), exact (share of matched cells with exactly the planted count), mae
    and bias (count per matched cell), counted_in (spots counted in cells / spots planted in cells).
    """
    ap = float(metrics.average_precision(sample.labels, masks, threshold=[0.5])[0][0])
    iou, match = metrics.mask_ious(sample.labels, masks)
    ok = iou >= 0.5
    counts = dict(zip(table["label"].to_numpy(), table["puncta_count"].to_numpy()))
    got = np.array([counts.get(p, 0) for p in match[ok]], np.int64)
    want = sample.counts_per_cell()[1:][ok]
    return {"ap50": ap, "exact": float(np.mean(got == want)), "mae": float(np.mean(np.abs(got - want))),
            "bias": float(np.mean(got - want)),
            "counted_in": float(table["puncta_count"].sum() / max(1, sample.counts_per_cell()[1:].sum()))}


def assert_lab_numbers(sc: dict[str, float]) -> None:
    """Issue #21's bar for the README's recipe on such a file."""
    assert sc["ap50"] >= 0.85, sc
    assert sc["exact"] >= 0.85, sc
    assert sc["mae"] <= 0.25, sc
    assert sc["counted_in"] >= 0.95, sc
