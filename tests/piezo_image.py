"""A small PIEZO1-style test image with known answers: 3 channels (0 = puncta, 1 = membrane /
cytoplasm, 2 = DAPI), 7 cells with 4..16 puncta planted inside each, 5 puncta outside cells, and the
pixel size (0.1 µm) in the ImageJ metadata."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

PIXEL_UM = 0.1
CENTRES = [(50, 50), (50, 130), (50, 210), (140, 60), (140, 150), (205, 110), (210, 205)]
COUNTS = [4, 6, 8, 10, 12, 14, 16]
OUTSIDE = 5
RADIUS = 24  # px along Y; cells are ellipses 1.15x wider along X


@dataclass
class Planted:
    path: Path
    labels: np.ndarray       # (Y, X) the cells as drawn, label i + 1 holds COUNTS[i] puncta
    counts: list[int]
    outside: int


def make(path: str | Path, seed: int = 0, size: int = 256) -> Planted:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cyto = rng.normal(20, 3, (size, size))
    dapi = rng.normal(15, 3, (size, size))
    labels = np.zeros((size, size), np.uint16)
    for i, (cy, cx) in enumerate(CENTRES):
        inside = (yy - cy) ** 2 + ((xx - cx) / 1.15) ** 2 <= RADIUS ** 2
        labels[inside] = i + 1
        cyto[inside] += 120
        dapi[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10 ** 2] += 200
    spots: list[tuple[float, float]] = []

    def free(y: float, x: float) -> bool:  # puncta at least 7 px apart: each one is resolvable
        return all((y - a) ** 2 + (x - b) ** 2 >= 49 for a, b in spots)

    for (cy, cx), n in zip(CENTRES, COUNTS):
        placed = 0
        while placed < n:  # well inside the cell (75% of its radius), so the mask edge never decides
            a, r = rng.uniform(0, 2 * np.pi), 0.75 * RADIUS * np.sqrt(rng.uniform())
            y, x = cy + r * np.sin(a), cx + 1.15 * r * np.cos(a)
            if free(y, x):
                spots.append((y, x))
                placed += 1
    placed = 0
    while placed < OUTSIDE:
        y, x = rng.uniform(5, size - 5, 2)
        far = all((y - a) ** 2 + (x - b) ** 2 >= (RADIUS + 10) ** 2 for a, b in CENTRES)
        if far and free(y, x):
            spots.append((y, x))
            placed += 1
    piezo = rng.normal(30, 3, (size, size))
    for y, x in spots:
        piezo += 400 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.3 ** 2))
    img = np.stack([piezo, cyto, dapi]).clip(0, 65535).astype(np.uint16)
    path = Path(path)
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "CYX", "unit": "um"},
                     resolution=(1 / PIXEL_UM, 1 / PIXEL_UM))
    return Planted(path, labels, list(COUNTS), OUTSIDE)


def planted_per_row(planted: Planted, table) -> np.ndarray:
    """The number of puncta planted in the drawn cell under each table row's centroid."""
    y = np.round(table["centroid_y_px"].to_numpy(float)).astype(int)
    x = np.round(table["centroid_x_px"].to_numpy(float)).astype(int)
    lab = planted.labels[y, x]
    return np.array([planted.counts[k - 1] if k else -1 for k in lab])
