"""Synthetic fluorescence images with instance labels, for training and testing `lite`.

The real training set (nuclei, 20x widefield) lacks whole cells, so this generator adds the variety
a lab meets: spread endothelial-like cells with irregular touching borders, compact colonies,
elongated cells, two-channel cytoplasm + nucleus images, 10-100 px objects, dim and bright cells,
noise, blur, uneven background and inverted contrast.

Everything is vectorised: labels come from a distance transform to random seeds (a Voronoi
partition) cut by a per-cell, angle-dependent radius, so neighbouring cells touch along irregular
borders.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

STYLES = ("nuclei", "cyto", "cyto_nuclei", "membrane", "colony", "elongated", "brightfield")


@dataclass
class SyntheticSample:
    image: np.ndarray  # (C, Y, X) float32, C = 1 or 2 (cytoplasm, nucleus)
    labels: np.ndarray  # (Y, X) int32, 0 = background
    style: str
    diameter: float  # mean equivalent-circle diameter of the objects, px


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise, (Y, X) float32."""
    z = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (z - z.mean()) / (z.std() + 1e-6)


def _seeds(rng, shape, diameter, confluence):
    """Random seed points (N, 2) with a minimum spacing that grows with the diameter."""
    Ly, Lx = shape
    area = Ly * Lx
    n_target = int(confluence * area / (np.pi * (diameter / 2) ** 2) * 1.3) + 1
    pts = rng.uniform([0, 0], [Ly, Lx], size=(n_target * 3, 2))
    # thin by a minimum spacing (Poisson-disc-like) on a grid, vectorised through a KD-free trick:
    min_d = diameter * (0.55 if confluence > 0.6 else 0.75)
    keep = np.ones(len(pts), bool)
    order = rng.permutation(len(pts))
    pts = pts[order]
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1) if len(pts) <= 3000 else None
    if d2 is not None:
        close = d2 < min_d**2
        np.fill_diagonal(close, False)
        for i in range(len(pts)):  # greedy thinning over a few hundred seeds (not pixels)
            if keep[i]:
                keep[np.nonzero(close[i, i + 1:])[0] + i + 1] = False
    pts = pts[keep][:n_target]
    return pts


def synthetic_labels(rng: np.random.Generator, shape=(256, 256), diameter=30.0, confluence=0.5,
                     irregularity=0.25, elongation=1.0) -> np.ndarray:
    """Touching irregular cells: (Y, X) int32 labels with objects of about ``diameter`` px."""
    Ly, Lx = shape
    pts = _seeds(rng, shape, diameter, confluence)
    n = len(pts)
    if n == 0:
        return np.zeros(shape, np.int32)
    seed_img = np.zeros(shape, bool)
    iy = np.clip(pts[:, 0].astype(int), 0, Ly - 1)
    ix = np.clip(pts[:, 1].astype(int), 0, Lx - 1)
    seed_img[iy, ix] = True
    seed_id = np.zeros(shape, np.int32)
    seed_id[iy, ix] = np.arange(1, n + 1)
    _, (ny, nx) = ndi.distance_transform_edt(~seed_img, return_indices=True)
    owner = seed_id[ny, nx]  # Voronoi cell id per pixel
    yy, xx = np.mgrid[:Ly, :Lx].astype(np.float32)
    dy = yy - ny
    dx = xx - nx
    # per-cell shape: radius, orientation, axis ratio, angular harmonics
    radius = diameter / 2 * rng.uniform(0.75, 1.25, n + 1) * (1.0 if confluence < 0.8 else 1.35)
    theta0 = rng.uniform(0, np.pi, n + 1)
    ratio = np.exp(rng.uniform(0, np.log(max(elongation, 1.0)), n + 1))
    c, s = np.cos(theta0)[owner], np.sin(theta0)[owner]
    u = (dx * c + dy * s) / np.sqrt(ratio[owner])
    v = (-dx * s + dy * c) * np.sqrt(ratio[owner])
    r = np.hypot(u, v)
    ang = np.arctan2(v, u)
    K = 4
    amp = rng.uniform(0, irregularity, (n + 1, K)) / np.arange(1, K + 1)
    phase = rng.uniform(0, 2 * np.pi, (n + 1, K))
    k = np.arange(2, K + 2, dtype=np.float32)
    wobble = 1 + (amp[owner] * np.cos(ang[..., None] * k + phase[owner])).sum(-1)
    inside = r < radius[owner] * wobble
    labels = np.where(inside, owner, 0).astype(np.int32)
    # keep the largest connected piece of each cell (a wobbly radius can split one)
    lab_cc, _ = ndi.label(labels > 0)
    labels = _largest_piece_per_label(labels)
    return labels


def _largest_piece_per_label(labels: np.ndarray) -> np.ndarray:
    """Drop all but the largest 4-connected fragment of every label (vectorised)."""
    # label fragments separately per object by labelling the boundary-split image
    edges = np.zeros(labels.shape, bool)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    frag, nf = ndi.label((labels > 0) & ~edges)
    if nf == 0:
        return labels
    size = np.bincount(frag.ravel(), minlength=nf + 1)
    size[0] = 0
    owner = np.zeros(nf + 1, np.int64)
    owner[frag.ravel()] = labels.ravel()
    best = np.zeros(labels.max() + 1, np.int64)
    order = np.argsort(size)  # ascending: the largest fragment of each owner is written last
    best[owner[order]] = order
    keep_frag = np.zeros(nf + 1, bool)
    keep_frag[best[best > 0]] = True
    keep = keep_frag[frag]
    # reattach the one-pixel edge rims that were cut away, to the label they border
    grown = ndi.grey_dilation(np.where(keep, labels, 0), size=3)
    out = np.where(keep | ((labels > 0) & (grown == labels)), labels, 0)
    # relabel 1..N
    ids, inv = np.unique(out, return_inverse=True)
    return inv.reshape(out.shape).astype(np.int32) if ids[0] == 0 else (inv.reshape(out.shape) + 1).astype(np.int32)


def _render_objects(rng, labels, texture_sigma, brightness_range=(0.15, 1.0)):
    """Per-object brightness with smooth internal texture; (Y, X) float32 in about [0, 1]."""
    n = labels.max()
    bright = np.exp(rng.uniform(np.log(brightness_range[0]), np.log(brightness_range[1]), n + 1))
    bright[0] = 0
    tex = 1 + 0.25 * _smooth_noise(rng, labels.shape, texture_sigma)
    return (bright[labels] * np.clip(tex, 0.3, 2)).astype(np.float32)


def _nuclei_inside(rng, labels, frac):
    """A nucleus (ellipse about ``frac`` of the cell size) inside each cell: (Y, X) bool."""
    idx = np.arange(1, labels.max() + 1)
    if len(idx) == 0:
        return np.zeros(labels.shape, bool)
    dist = ndi.distance_transform_edt(labels > 0)
    # nucleus centre: the point deepest inside each cell
    cy, cx = np.array(ndi.maximum_position(dist, labels, idx)).T
    area = np.bincount(labels.ravel())[1:]
    rn = np.sqrt(area / np.pi) * frac
    near_seed = np.zeros(labels.shape, bool)
    near_seed[cy, cx] = True
    seed_lab = np.zeros(labels.shape, np.int32)
    seed_lab[cy, cx] = idx
    d, (ny, nx) = ndi.distance_transform_edt(~near_seed, return_indices=True)
    own = seed_lab[ny, nx]
    return (d < rn[np.maximum(own - 1, 0)]) & (own == labels) & (labels > 0)


def synthetic_sample(rng: np.random.Generator, shape=(256, 256), style: str | None = None,
                     diameter: float | None = None) -> SyntheticSample:
    """One random image + labels. ``style`` in STYLES (random if None), ``diameter`` in px."""
    style = style or rng.choice(STYLES, p=[0.22, 0.16, 0.16, 0.1, 0.14, 0.12, 0.1])
    if diameter is None:
        diameter = float(np.exp(rng.uniform(np.log(12), np.log(90))))
    Ly, Lx = shape
    confluence = {"nuclei": rng.uniform(0.15, 0.6), "colony": rng.uniform(0.85, 1.0),
                  "elongated": rng.uniform(0.4, 0.9)}.get(style, rng.uniform(0.5, 1.0))
    irregular = {"nuclei": rng.uniform(0.02, 0.15), "colony": rng.uniform(0.05, 0.2)}.get(style, rng.uniform(0.15, 0.4))
    elong = {"elongated": rng.uniform(2.5, 6), "nuclei": rng.uniform(1, 1.8)}.get(style, rng.uniform(1, 2.5))
    labels = synthetic_labels(rng, shape, diameter, confluence, irregular, elong)
    fg = labels > 0
    body = _render_objects(rng, labels, texture_sigma=max(1.0, diameter / 8))
    if style == "membrane":
        edge = fg & (ndi.grey_erosion(labels, size=3) != ndi.grey_dilation(labels, size=3))
        edge = ndi.binary_dilation(edge, iterations=max(1, int(diameter / 25)))
        cyto = 0.25 * body + 1.0 * edge * (body > 0)
    elif style == "brightfield":
        edge = fg & (ndi.grey_erosion(labels, size=3) != ndi.grey_dilation(labels, size=3))
        cyto = 0.6 * body - 0.8 * ndi.binary_dilation(edge) * (body > 0)
    else:
        cyto = body
        if rng.random() < 0.7:  # real touching cells usually show a dimmer seam between them
            seam = fg & (ndi.grey_erosion(labels, size=3) != ndi.grey_dilation(labels, size=3))
            cyto = cyto * (1 - rng.uniform(0.2, 0.7) * seam)
    channels = [cyto]
    if style in ("cyto_nuclei", "colony") and rng.random() < 0.8:
        nuc = _nuclei_inside(rng, labels, rng.uniform(0.35, 0.6)).astype(np.float32)
        nuc *= _render_objects(rng, labels, texture_sigma=max(1.0, diameter / 10), brightness_range=(0.3, 1.0))
        channels.append(nuc)
    img = np.stack(channels).astype(np.float32)
    # optics and camera: blur, uneven background, noise, occasional inversion
    sig = rng.uniform(0, 1.5) * max(1.0, diameter / 30)
    img = ndi.gaussian_filter(img, (0, sig, sig)) if sig > 0.3 else img
    bg = rng.uniform(0, 0.3) + rng.uniform(0, 0.25) * _smooth_noise(rng, shape, sigma=max(Ly, Lx) / 4)[None]
    img = img + np.clip(bg, 0, None)
    photons = np.exp(rng.uniform(np.log(20), np.log(2000)))
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / photons
    img += rng.normal(0, rng.uniform(0, 0.04), img.shape).astype(np.float32)
    if style == "brightfield" or rng.random() < 0.08:
        img = img.max() - img
    return SyntheticSample(img.astype(np.float32), labels, str(style), float(diameter))


def whole_cell_sample(rng: np.random.Generator, shape=(256, 256), diameter: float = 35.0,
                      cytoplasm: float = 0.12) -> SyntheticSample:
    """Touching whole cells whose cytoplasm is dim (``cytoplasm`` of the nucleus brightness) around a
    bright nucleus, one channel; labels are the whole cells. A model trained on nuclei finds the
    nuclei only, so this is the kind of image a lab fine-tunes for (benchmarks/bench_finetune.py).
    Not one of STYLES: lite was not trained on it."""
    labels = synthetic_labels(rng, shape, diameter, confluence=0.9, irregularity=0.3, elongation=1.5)
    body = _render_objects(rng, labels, texture_sigma=max(1.0, diameter / 8))
    nucleus = _nuclei_inside(rng, labels, 0.4)
    img = cytoplasm * body + nucleus * (body > 0)
    img = ndi.gaussian_filter(img.astype(np.float32), 1.0) + 0.1
    img = rng.poisson(img * 200).astype(np.float32) / 200
    return SyntheticSample(img[None].astype(np.float32), labels, "whole_cell", float(diameter))


@dataclass
class PunctaSample:
    """A PIEZO1-style TIRF image with known cells and known puncta.

    image : (3, Y, X) uint16; channel 0 = puncta (PIEZO1-HaloTag), 1 = cytoplasm / membrane, 2 = nuclei.
    labels : (Y, X) int32 whole cells, 0 = background.
    spots : (N, 3) float64 rows (y_px, x_px, label) of the planted puncta; label 0 = outside every cell.
    pixel_size_um : µm per pixel.
    """
    image: np.ndarray
    labels: np.ndarray
    spots: np.ndarray
    pixel_size_um: float

    def counts_per_cell(self) -> np.ndarray:
        """(n_cells + 1,) int64: planted puncta per label (index 0 = outside cells)."""
        lab = self.spots[:, 2].astype(np.int64)
        return np.bincount(lab, minlength=int(self.labels.max()) + 1)


def puncta_sample(rng: np.random.Generator, shape=(384, 384), diameter: float = 60.0,
                  puncta_per_cell: tuple[int, int] = (2, 14), outside: int = 6, spacing_px: float = 6.0,
                  pixel_size_um: float = 0.1) -> PunctaSample:
    """Whole cells with puncta planted anywhere on each cell's footprint, as PIEZO1 in TIRF.

    TIRF images the basal membrane, so a membrane protein's spots lie anywhere on the cell's
    footprint, the outermost pixels included; that rim is where a predicted mask a little tighter
    than the cell loses them. Cells touch along irregular borders (:func:`synthetic_labels`), the
    cytoplasm channel is dim with a darker seam between neighbours and the nucleus channel holds one
    nucleus per cell; spots are Gaussians (sigma 1.3 px) of random brightness at least
    ``spacing_px`` apart, plus ``outside`` spots on the background.

    Parameters
    ----------
    rng : the random generator (the same seed gives the same sample).
    shape : (Y, X) in px.
    diameter : typical cell diameter in px.
    puncta_per_cell : inclusive range of planted spots per cell.
    outside : spots planted on the background, at least 4 px from every cell.
    spacing_px : least distance between two spots (each one stays resolvable).
    pixel_size_um : µm per pixel, returned for the caller to write into the file.

    Returns
    -------
    PunctaSample
    """
    labels = synthetic_labels(rng, shape, diameter, confluence=0.75, irregularity=0.25, elongation=1.6)
    fg = labels > 0
    body = _render_objects(rng, labels, texture_sigma=max(1.0, diameter / 8), brightness_range=(0.4, 1.0))
    seam = fg & (ndi.grey_erosion(labels, size=3) != ndi.grey_dilation(labels, size=3))
    # the cell thins out towards its edge (lamellipodia): the cytoplasm fades over the outer ~8 px,
    # so predicted masks come out a little tighter than the footprint, as on real TIRF images
    depth = ndi.distance_transform_edt(fg & ~seam)
    cyto = body * (1 - 0.5 * seam) * np.clip(0.25 + 0.75 * depth / 8.0, 0.25, 1.0)
    nuc = _nuclei_inside(rng, labels, 0.4) * _render_objects(rng, labels, max(1.0, diameter / 10), (0.5, 1.0))
    n_cells = int(labels.max())
    # candidate positions: every cell pixel, visited in a random order; a spot is kept when it is far
    # enough from the spots already kept and its cell still wants more
    want = np.zeros(n_cells + 1, np.int64)
    want[1:] = rng.integers(puncta_per_cell[0], puncta_per_cell[1] + 1, n_cells)
    dist_bg = ndi.distance_transform_edt(~fg)
    outside_ok = (dist_bg >= 4) & (dist_bg < np.inf)
    outside_ok[:6], outside_ok[-6:], outside_ok[:, :6], outside_ok[:, -6:] = False, False, False, False
    cand = np.flatnonzero(fg | outside_ok)
    cand = cand[rng.permutation(len(cand))]
    cy, cx = np.unravel_index(cand, shape)
    jitter = rng.uniform(-0.5, 0.5, (2, len(cand)))
    cand_lab = labels.ravel()[cand]
    want[0] = outside
    taken = np.zeros(n_cells + 1, np.int64)
    kept: list[tuple[float, float, int]] = []
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    cell = spacing_px
    for y, x, lab, jy, jx in zip(cy, cx, cand_lab, *jitter):  # one pass over candidates; stops when all are placed
        if taken[lab] >= want[lab]:
            continue
        y, x = y + jy, x + jx
        gy, gx = int(y // cell), int(x // cell)
        near = (p for dy in (-1, 0, 1) for dx in (-1, 0, 1) for p in grid.get((gy + dy, gx + dx), ()))
        if any((y - a) ** 2 + (x - b) ** 2 < spacing_px ** 2 for a, b in near):
            continue
        grid.setdefault((gy, gx), []).append((y, x))
        kept.append((y, x, int(lab)))
        taken[lab] += 1
        if (taken >= want).all():
            break
    spots = np.array(kept, np.float64).reshape(-1, 3)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    piezo = np.zeros(shape, np.float32)
    amp = rng.uniform(0.6, 1.4, len(spots))
    for (y, x, _), a in zip(spots, amp):  # each spot touches only a 13x13 window
        y0, y1 = max(0, int(y) - 6), min(shape[0], int(y) + 7)
        x0, x1 = max(0, int(x) - 6), min(shape[1], int(x) + 7)
        piezo[y0:y1, x0:x1] += a * np.exp(-((yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2)
                                          / (2 * 1.3 ** 2))
    piezo += 0.05 * fg  # a faint diffuse membrane signal under the cells
    img = np.stack([piezo, cyto, nuc]).astype(np.float32)
    img = ndi.gaussian_filter(img, (0, 0.7, 0.7)) + 0.08
    img = rng.poisson(img * 300).astype(np.float32) / 300
    img = np.clip(img * 2000 + 100, 0, 65535).astype(np.uint16)
    return PunctaSample(img, labels, spots, float(pixel_size_um))
