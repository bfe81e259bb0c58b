"""Per-cell measurements and puncta detection (the PIEZO1 workflow), as pandas tables.

Functions take label images and images (scikit-image style), never result objects::

    table, spots = measure.measure_cells(masks, image, pixel_size_um=0.1, channel_axis=0,
                                         puncta=measure.PunctaParams(channel=0))

Channels are numbered as in the image given (the file's numbering when the whole image is given):
the table has ``mean_intensity_ch{i}`` and ``integrated_intensity_ch{i}`` for every channel ``i``,
whichever channels the masks were segmented on.

Pixels internally; µm only in the table columns, from the pixel size (µm per pixel).
Columns always carry their unit in the name: ``area_px``, ``area_um2``, ``centroid_x_um``, ...
Without a pixel size the µm columns are NaN (never silently filled with pixel values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from skimage import measure as skm
from skimage.feature import blob_log

from cellpose_web.engine.transforms import percentile_stretch
from cellpose_web.errors import BadInputError, CellposeWebError

__all__ = [
    "measure_cells", "PunctaParams", "cell_table", "size_histogram", "detect_puncta", "puncta_per_cell",
    "add_puncta", "summarize", "normalize_for_puncta", "assign_to_nearest_cell", "max_distance_px",
    "DEFAULT_MAX_DISTANCE_UM", "FALLBACK_MAX_DISTANCE_PX",
]

#: A spot outside every mask but within this distance (µm) of a cell is counted for the nearest cell.
#: Chosen with ``benchmarks/bench_puncta.py`` on PIEZO1-style files (0.1 µm/px) with *predicted* masks:
#: predicted masks end a little inside the cell's footprint, where a membrane protein's spots sit.
DEFAULT_MAX_DISTANCE_UM = 0.4
#: The same rule in px for images without a pixel size (4 px = 0.4 µm at TIRF's 0.1 µm/px).
FALLBACK_MAX_DISTANCE_PX = 4.0


@dataclass
class PunctaParams:
    """Puncta detection settings.

    channel : the puncta channel, numbered as in the image given to :func:`measure_cells` (the
        file's numbering), whichever channels were used for segmentation.
    sigma_min, sigma_max : spot scale range in px (Laplacian of Gaussian; radius ≈ sigma·√2).
    threshold : LoG response threshold on the percentile-normalised channel (lower = more spots).
    max_distance_um : a spot outside every mask but at most this far (µm) from a cell is counted
        for the nearest cell (masks end a little inside the cell's footprint; a membrane protein sits
        right there); 0 counts only spots under a mask. Images without a pixel size use
        :data:`FALLBACK_MAX_DISTANCE_PX` px instead of the default.
    """
    channel: int = 0
    sigma_min: float = 1.0
    sigma_max: float = 3.0
    threshold: float = 0.1
    max_distance_um: float = DEFAULT_MAX_DISTANCE_UM


def _pixel_size(pixel_size_um: float | None) -> float | None:
    if pixel_size_um is None:
        return None
    p = float(pixel_size_um)
    if not np.isfinite(p) or p <= 0:
        return None
    return p


def _channels_last(image: np.ndarray | None, mask_shape: tuple[int, ...],
                   channel_axis: int | None) -> np.ndarray | None:
    """Return the image as mask_shape + (C,) float32, or None."""
    if image is None:
        return None
    img = np.asarray(image)
    if img.shape == tuple(mask_shape):
        return img[..., None].astype(np.float32)
    if channel_axis is None:
        # the one axis that is not in the mask shape
        if img.ndim == len(mask_shape) + 1:
            for ax in range(img.ndim):
                if tuple(np.delete(img.shape, ax)) == tuple(mask_shape):
                    channel_axis = ax
                    break
    if channel_axis is None or img.ndim != len(mask_shape) + 1:
        raise CellposeWebError(
            f"Image of shape {img.shape} does not match masks of shape {tuple(mask_shape)}; "
            "pass the image the masks were made from.")
    img = np.moveaxis(img, channel_axis, -1)
    if img.shape[:-1] != tuple(mask_shape):
        raise CellposeWebError(f"Image of shape {img.shape} does not match masks of shape {tuple(mask_shape)}.")
    return img.astype(np.float32)


def cell_table(masks: np.ndarray, image: np.ndarray | None = None, pixel_size_um: float | None = None,
               channel_axis: int | None = None) -> pd.DataFrame:
    """One row per cell.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int labels, 0 = background.
    image : optional (Y, X), (Y, X, C), (Z, Y, X, C) or with `channel_axis` (any dtype); intensities
        are measured on every channel, numbered as along that axis.
    pixel_size_um : µm per pixel (XY); None leaves the µm columns NaN.
    channel_axis : the image's channel axis (None: the one axis not in the masks' shape).

    Returns
    -------
    DataFrame with label, area_px (volume_px for 3D), area_um2, centroid_{y,x}_px and _um,
    equivalent_diameter_px/_um, eccentricity, solidity (2D), and per channel i
    mean_intensity_ch{i} and integrated_intensity_ch{i} (sum over the cell's pixels).
    """
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3) or not np.issubdtype(masks.dtype, np.integer):
        raise CellposeWebError("Masks must be a 2D or 3D integer label image.")
    px = _pixel_size(pixel_size_um)
    img = _channels_last(image, masks.shape, channel_axis)
    is3d = masks.ndim == 3
    props = ["label", "area", "centroid", "equivalent_diameter_area"]
    if not is3d:
        props += ["eccentricity", "solidity"]
    if img is not None:
        props.append("intensity_mean")
    if masks.max(initial=0) == 0:
        cols = ["label", "volume_px" if is3d else "area_px", "area_um2", "centroid_y_px", "centroid_x_px",
                "centroid_y_um", "centroid_x_um", "equivalent_diameter_px", "equivalent_diameter_um"]
        if not is3d:
            cols += ["eccentricity", "solidity"]
        if img is not None:
            cols += [f"{k}_intensity_ch{c}" for c in range(img.shape[-1]) for k in ("mean", "integrated")]
        return pd.DataFrame(columns=cols)
    t = skm.regionprops_table(masks.astype(np.int64, copy=False), intensity_image=img, properties=props)
    out: dict[str, Any] = {"label": t["label"].astype(np.int64)}
    area = t["area"].astype(np.float64)
    if is3d:
        out["volume_px"] = area.astype(np.int64)
        out["volume_um3"] = area * px**3 if px else np.full(len(area), np.nan)
        out["centroid_z_px"] = t["centroid-0"]
        out["centroid_y_px"] = t["centroid-1"]
        out["centroid_x_px"] = t["centroid-2"]
    else:
        out["area_px"] = area.astype(np.int64)
        out["area_um2"] = area * px**2 if px else np.full(len(area), np.nan)
        out["centroid_y_px"] = t["centroid-0"]
        out["centroid_x_px"] = t["centroid-1"]
    out["centroid_y_um"] = out["centroid_y_px"] * px if px else np.full(len(area), np.nan)
    out["centroid_x_um"] = out["centroid_x_px"] * px if px else np.full(len(area), np.nan)
    out["equivalent_diameter_px"] = t["equivalent_diameter_area"]
    out["equivalent_diameter_um"] = t["equivalent_diameter_area"] * px if px else np.full(len(area), np.nan)
    if not is3d:
        out["eccentricity"] = t["eccentricity"]
        out["solidity"] = t["solidity"]
    if img is not None:
        nch = img.shape[-1]
        for c in range(nch):
            key = f"intensity_mean-{c}" if f"intensity_mean-{c}" in t else "intensity_mean"
            out[f"mean_intensity_ch{c}"] = t[key]
            out[f"integrated_intensity_ch{c}"] = t[key] * area
    return pd.DataFrame(out)


def size_histogram(table: pd.DataFrame, column: str | None = None, bins: int = 20) -> pd.DataFrame:
    """Histogram of cell sizes for a bar plot: columns bin (label text), bin_start, bin_end, count.

    Uses area_um2 when it has values, else area_px (or the volume columns for 3D).
    """
    if column is None:
        for c in ("area_um2", "volume_um3", "area_px", "volume_px"):
            if c in table and table[c].notna().any():
                column = c
                break
    if column is None or len(table) == 0:
        return pd.DataFrame({"bin": pd.Series(dtype=str), "bin_start": pd.Series(dtype=float),
                             "bin_end": pd.Series(dtype=float), "count": pd.Series(dtype=np.int64)})
    vals = table[column].to_numpy(dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    counts, edges = np.histogram(vals, bins=int(max(1, bins)))
    digits = 0 if edges[-1] - edges[0] > 50 else 2
    labels = [f"{a:.{digits}f}–{b:.{digits}f}" for a, b in zip(edges[:-1], edges[1:])]
    return pd.DataFrame({"bin": labels, "bin_start": edges[:-1], "bin_end": edges[1:],
                         "count": counts.astype(np.int64), "quantity": column})


def normalize_for_puncta(image: np.ndarray, lower: float = 1.0, upper: float = 99.8) -> np.ndarray:
    """Scale a 2D (Y, X) image to [0, 1] by its percentiles (float32, :func:`percentile_stretch`) so
    thresholds mean the same on any camera."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise CellposeWebError(f"Puncta detection needs one 2D channel (Y, X); got shape {img.shape}.")
    return percentile_stretch(img, lower, upper)


def max_distance_px(params: PunctaParams, pixel_size_um: float | None) -> float:
    """The nearest-cell distance of `params` in px for an image of `pixel_size_um` µm per pixel.

    Without a pixel size the default distance becomes :data:`FALLBACK_MAX_DISTANCE_PX`; another
    distance in µm cannot be converted, so it raises :class:`~cellpose_web.errors.BadInputError`
    saying what to enter (counting only the spots under a mask instead would change the per-cell
    counts without a word).
    """
    d = float(params.max_distance_um or 0.0)
    if not np.isfinite(d) or d < 0:
        raise CellposeWebError("The puncta nearest-cell distance must be 0 or more µm, e.g. 0.4.")
    if d == 0:
        return 0.0
    px = _pixel_size(pixel_size_um)
    if px is None:
        if d == DEFAULT_MAX_DISTANCE_UM:
            return FALLBACK_MAX_DISTANCE_PX
        raise BadInputError(
            f"A nearest-cell distance of {d:g} µm needs the image's pixel size (µm per pixel) to become pixels, "
            "and this image has none: enter the pixel size, or use the default distance "
            f"{DEFAULT_MAX_DISTANCE_UM:g} µm ({FALLBACK_MAX_DISTANCE_PX:g} px without a pixel size), or 0 to count "
            "only the spots on a mask.")
    return d / px


def assign_to_nearest_cell(masks: np.ndarray, y: np.ndarray, x: np.ndarray, max_distance_px: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The cell each point lies in, or the nearest cell within `max_distance_px`.

    Parameters
    ----------
    masks : (Y, X) int labels, 0 = background.
    y, x : (N,) point coordinates in px (rounded to the nearest pixel).
    max_distance_px : how far (px, centre to the nearest cell pixel's centre) a point outside
        every mask may be from a cell and still count for it; 0 = only points on a mask.

    Returns
    -------
    labels : (N,) int64, the cell of each point (0 = none within reach).
    distance_px : (N,) float64, 0 for points on a mask, the distance to the cell a point was given
        to, NaN for points left outside.
    """
    masks = np.asarray(masks)
    yi = np.clip(np.round(np.asarray(y, np.float64)).astype(np.int64), 0, masks.shape[0] - 1)
    xi = np.clip(np.round(np.asarray(x, np.float64)).astype(np.int64), 0, masks.shape[1] - 1)
    labels = masks[yi, xi].astype(np.int64)
    distance = np.where(labels > 0, 0.0, np.nan)
    out = np.flatnonzero(labels == 0)
    r = float(max_distance_px)
    if not len(out) or r <= 0:
        return labels, distance
    # offsets of a disk, nearest first: each outside point looks at its own disk only, so the cost
    # follows the number of spots, not the image size
    R = int(np.floor(r))
    dy, dx = np.mgrid[-R:R + 1, -R:R + 1]
    d = np.hypot(dy, dx).ravel()
    keep = (d > 0) & (d <= r)
    order = np.argsort(d[keep], kind="stable")
    dy, dx, d = dy.ravel()[keep][order], dx.ravel()[keep][order], d[keep][order]
    if not len(d):  # under one pixel: no neighbour is that close
        return labels, distance
    yy = yi[out, None] + dy[None]
    xx = xi[out, None] + dx[None]
    inside = (yy >= 0) & (yy < masks.shape[0]) & (xx >= 0) & (xx < masks.shape[1])
    found = np.where(inside, masks[np.clip(yy, 0, masks.shape[0] - 1), np.clip(xx, 0, masks.shape[1] - 1)], 0)
    hit = found > 0
    first = np.argmax(hit, axis=1)
    got = hit[np.arange(len(out)), first]
    labels[out[got]] = found[got, first[got]]
    distance[out[got]] = d[first[got]]
    return labels, distance


def detect_puncta(image: np.ndarray, sigma_min: float = 1.0, sigma_max: float = 3.0, threshold: float = 0.1,
                  num_sigma: int = 5, masks: np.ndarray | None = None, overlap: float = 0.5,
                  max_distance_px: float = 0.0) -> pd.DataFrame:
    """Find spots with a Laplacian-of-Gaussian (skimage.feature.blob_log).

    Parameters
    ----------
    image : (Y, X) the puncta channel (any dtype; it is percentile-normalised to [0, 1] first).
    sigma_min, sigma_max : spot scale range in px (radius ≈ sigma·√2).
    threshold : LoG response threshold on the normalised image (lower finds more, fainter spots).
    masks : optional (Y, X) labels; each spot gets the label under it (0 = outside cells).
    max_distance_px : a spot outside every mask within this distance (px) of a cell gets that
        cell's label (:func:`assign_to_nearest_cell`); 0 = only the label under the spot.

    Returns
    -------
    DataFrame, one row per spot: y_px, x_px, sigma_px, radius_px, intensity_peak (the channel's
    value at the centre), intensity_sum (sum of the channel's values within radius_px of the centre,
    in the image's own units), label (the cell the spot counts for, 0 = outside cells),
    distance_to_cell_px (0 under a mask, the distance to the nearest cell it was given to, NaN
    outside cells).
    """
    if not (np.isfinite(sigma_min) and np.isfinite(sigma_max)) or sigma_min <= 0 or sigma_max < sigma_min:
        raise CellposeWebError("Puncta sigma: need 0 < min sigma ≤ max sigma (in px), e.g. 1 and 3.")
    if sigma_max > 50:
        raise CellposeWebError("Puncta max sigma above 50 px is not a punctum; use 1–5 px.")
    if not np.isfinite(threshold) or threshold <= 0:
        raise CellposeWebError("Puncta threshold must be a positive number, e.g. 0.05–0.3.")
    img = normalize_for_puncta(image)
    blobs = blob_log(img, min_sigma=float(sigma_min), max_sigma=float(sigma_max),
                     num_sigma=int(max(1, num_sigma)), threshold=float(threshold), overlap=float(overlap))
    blobs = np.asarray(blobs, dtype=np.float64).reshape(-1, 3)
    y = blobs[:, 0]
    x = blobs[:, 1]
    s = blobs[:, 2]
    r = s * np.sqrt(2.0)
    raw = np.asarray(image, dtype=np.float64)
    raw = np.where(np.isfinite(raw), raw, 0.0)
    yi = np.clip(np.round(y).astype(np.int64), 0, img.shape[0] - 1)
    xi = np.clip(np.round(x).astype(np.int64), 0, img.shape[1] - 1)
    df = pd.DataFrame({"y_px": y, "x_px": x, "sigma_px": s, "radius_px": r,
                       "intensity_peak": raw[yi, xi], "intensity_sum": _disk_sums(raw, yi, xi, r)})
    if masks is not None:
        m = np.asarray(masks)
        if m.shape != img.shape:
            raise CellposeWebError(f"Puncta channel {img.shape} and masks {m.shape} differ in size.")
        df["label"], df["distance_to_cell_px"] = assign_to_nearest_cell(m, y, x, max_distance_px)
    else:
        df["label"] = np.zeros(len(df), dtype=np.int64)
        df["distance_to_cell_px"] = np.full(len(df), np.nan)
    return df


def _disk_sums(image: np.ndarray, yi: np.ndarray, xi: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Sum of `image` (Y, X) within `radius` px of each centre (yi, xi); vectorised over the spots,
    looping over the offsets of the largest disk only."""
    out = np.zeros(len(yi), np.float64)
    if not len(yi):
        return out
    rmax = int(np.ceil(radius.max()))
    for dy in range(-rmax, rmax + 1):
        for dx in range(-rmax, rmax + 1):
            inside = dy * dy + dx * dx <= radius ** 2
            yy, xx = yi + dy, xi + dx
            ok = inside & (yy >= 0) & (yy < image.shape[0]) & (xx >= 0) & (xx < image.shape[1])
            out[ok] += image[yy[ok], xx[ok]]
    return out


def puncta_per_cell(masks: np.ndarray, puncta: pd.DataFrame, pixel_size_um: float | None = None) -> pd.DataFrame:
    """Per cell: puncta_count, puncta_per_100px2, puncta_density_per_um2 (NaN without pixel size),
    puncta_mean_intensity and puncta_total_intensity (of the spots' intensity_sum; NaN / 0 without spots).

    masks : (Y, X) labels; puncta : :func:`detect_puncta`'s table (its ``label`` column says the cell).
    """
    masks = np.asarray(masks)
    n = int(masks.max(initial=0))
    labels = np.arange(1, n + 1)
    area = np.bincount(masks.ravel().astype(np.int64), minlength=n + 1)[1:n + 1].astype(np.float64)
    lab = puncta["label"].to_numpy(np.int64) if len(puncta) else np.zeros(0, np.int64)
    inside = lab > 0
    counts = np.bincount(lab[inside], minlength=n + 1)[1:n + 1]
    if len(puncta) and "intensity_sum" in puncta:
        w = puncta["intensity_sum"].to_numpy(np.float64)[inside]
        total = np.bincount(lab[inside], weights=w, minlength=n + 1)[1:n + 1]
    else:
        total = np.zeros(n)
    present = area > 0
    px = _pixel_size(pixel_size_um)
    with np.errstate(divide="ignore", invalid="ignore"):
        dens_px = np.where(area > 0, counts / area * 100.0, np.nan)
        dens_um = np.where(area > 0, counts / (area * px**2), np.nan) if px else np.full(n, np.nan)
        mean_int = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
    return pd.DataFrame({"label": labels[present], "puncta_count": counts[present].astype(np.int64),
                         "puncta_per_100px2": dens_px[present], "puncta_density_per_um2": dens_um[present],
                         "puncta_mean_intensity": mean_int[present], "puncta_total_intensity": total[present]})


def add_puncta(table: pd.DataFrame, per_cell: pd.DataFrame) -> pd.DataFrame:
    """Join per-cell puncta columns onto a cell table by label (cells without puncta get 0)."""
    out = table.drop(columns=[c for c in per_cell.columns if c != "label" and c in table], errors="ignore")
    out = out.merge(per_cell, on="label", how="left")
    if "puncta_count" in out:
        out["puncta_count"] = out["puncta_count"].fillna(0).astype(np.int64)
    # the numbers people look for first: count and density right after the cell's area
    first = [c for c in ("label", "area_px", "area_um2", "puncta_count", "puncta_density_per_um2") if c in out]
    return out[first + [c for c in out.columns if c not in first]]


def summarize(table: pd.DataFrame, puncta: pd.DataFrame | None = None) -> dict[str, Any]:
    """One summary row per image: n_cells, median area (px, µm²), puncta totals when given
    (puncta_total, puncta_in_cells, puncta_outside_cells, puncta_near_cell_edge: of those in cells,
    the ones just outside a mask given to the nearest cell, mean_puncta_per_cell, median density)."""
    n = int(len(table))
    area_px = "area_px" if "area_px" in table else "volume_px"
    area_um = "area_um2" if "area_um2" in table else "volume_um3"
    s: dict[str, Any] = {
        "n_cells": n,
        f"median_{area_px}": float(np.median(table[area_px])) if n else np.nan,
        f"median_{area_um}": float(np.nanmedian(table[area_um])) if n and table[area_um].notna().any() else np.nan,
    }
    if puncta is not None:
        inside = int((puncta["label"] > 0).sum()) if len(puncta) else 0
        s["puncta_total"] = int(len(puncta))
        s["puncta_in_cells"] = inside
        s["puncta_outside_cells"] = int(len(puncta)) - inside
        if "distance_to_cell_px" in puncta:
            s["puncta_near_cell_edge"] = int((puncta["distance_to_cell_px"] > 0).sum())
        s["mean_puncta_per_cell"] = inside / n if n else np.nan
        if "puncta_density_per_um2" in table and table["puncta_density_per_um2"].notna().any():
            s["median_puncta_density_per_um2"] = float(np.nanmedian(table["puncta_density_per_um2"]))
    return s


def measure_cells(masks: np.ndarray, image: np.ndarray | None = None, pixel_size_um: float | None = None,
                  channel_axis: int | None = None, puncta: PunctaParams | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The per-cell table of an image, and its puncta when asked.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int labels, 0 = background.
    image : the image the masks belong to with all its channels: (Y, X), (Y, X, C), (C, Y, X),
        (Z, Y, X, C) ... (`channel_axis` says where the channels are when it is ambiguous).
        Channel i of this image is ``..._ch{i}`` in the table and ``puncta.channel == i``.
    pixel_size_um : µm per pixel (XY); None leaves the µm columns NaN.
    puncta : detect spots on channel ``puncta.channel`` (2D masks only) and count them per cell.

    Returns
    -------
    (table, spots): :func:`cell_table` (+ :func:`puncta_per_cell` columns with puncta), and the
    spots (:func:`detect_puncta`; ``label`` 0 = outside cells) or None.
    """
    masks = np.asarray(masks)
    img = _channels_last(image, masks.shape, channel_axis) if image is not None else None
    table = cell_table(masks, img, pixel_size_um)
    if puncta is None:
        return table, None
    if masks.ndim != 2:
        raise CellposeWebError("Puncta are counted on 2D images; segment a 2D image (or one plane of the stack).")
    if img is None:
        raise CellposeWebError("Puncta need the image: pass the image the masks were made from.")
    ch = int(puncta.channel)
    if not 0 <= ch < img.shape[-1]:
        raise CellposeWebError(f"Puncta channel {ch} does not exist; the image has {img.shape[-1]} channel(s) "
                               f"(0..{img.shape[-1] - 1}, numbered as in the file).")
    spots = detect_puncta(img[..., ch], puncta.sigma_min, puncta.sigma_max, puncta.threshold, masks=masks,
                          max_distance_px=max_distance_px(puncta, pixel_size_um))
    return add_puncta(table, puncta_per_cell(masks, spots, pixel_size_um)), spots
