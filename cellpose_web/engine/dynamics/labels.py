"""Label-image utilities shared by the dynamics: checks, counts, renumbering, the label dtype, max filters.

Label images: (Y, X) or (Z, Y, X) integer arrays, 0 = background, 1, 2, ... = objects. Large images are
scanned in bands of about ``BAND_PIXELS`` pixels."""
from __future__ import annotations

import math
from typing import Iterator, Sequence
import numpy as np
import torch
from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.dynamics.device_setup import to_numpy


# Large images are scanned in bands (or chunks of points) of about this many pixels: per-label sums,
# flow errors, the histogram and seeds of get_masks, hole detection, renumbering. The temporaries then
# stay in the CPU's caches instead of being int64/float64 copies of the whole image (4096 x 4096:
# get_masks 1.6 s -> 0.5 s); every result is the same as from one pass.
BAND_PIXELS = 1 << 18


def as_labels(x, name: str = "masks", ndims: Sequence[int] = (2, 3)) -> np.ndarray:
    """Validate a label image: numeric, whole numbers >= 0, with an allowed number of dimensions."""
    arr = to_numpy(x, name)
    if arr.ndim not in ndims:
        want = " or ".join({2: "2D (Y, X)", 3: "3D (Z, Y, X)"}[d] for d in ndims)
        raise CellposeWebError(
            f"{name} must be a {want} label image, but it has {arr.ndim} dimension(s) (shape {arr.shape})."
        )
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "c":
        raise CellposeWebError(f"{name} must hold whole numbers (labels), not complex values.")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise CellposeWebError(f"{name} contains NaN or infinite values; a label image holds whole numbers >= 0.")
        if (arr != np.floor(arr)).any():
            raise CellposeWebError(f"{name} must hold whole numbers (0 = background, 1, 2, ... = objects).")
        arr = arr.astype(np.int64)
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise CellposeWebError(f"{name} has negative values; labels must be 0 (background) or positive.")
    return arr


def label_counts(lab: np.ndarray, nmax: int | None = None) -> np.ndarray:
    """Pixels per label value 0..max (int64), counted in chunks (no int64 copy of the image)."""
    flat = np.ascontiguousarray(lab).reshape(-1)
    nmax = (int(flat.max()) if flat.size else 0) if nmax is None else nmax
    counts = np.zeros(nmax + 1, dtype=np.int64)
    for c0 in range(0, flat.size, BAND_PIXELS):
        counts += np.bincount(flat[c0:c0 + BAND_PIXELS].astype(np.int64, copy=False), minlength=nmax + 1)
    return counts


def label_dtype(nmax: int):
    """THE label dtype rule (one home): uint16 for labels up to 65535, uint32 beyond (Cellpose's)."""
    return np.uint16 if nmax < 2**16 else np.uint32


def as_label_dtype(masks: np.ndarray) -> np.ndarray:
    """``masks`` as :func:`label_dtype` of its largest label."""
    m = np.asarray(masks)
    return m.astype(label_dtype(int(m.max(initial=0))))


def first_appearance_lut(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """Look-up table old label -> new label, numbering labels 1..N by first appearance in C order.

    This is the order ``fastremap.renumber`` gives. Returns (lut, N); 0 stays 0.
    """
    flat = np.ascontiguousarray(lab).reshape(-1)
    nmax = int(flat.max()) if flat.size else 0
    lut = np.zeros(nmax + 1, dtype=np.int64)
    if nmax == 0:
        return lut, 0
    big = flat.size
    first = torch.full((nmax + 1,), big, dtype=torch.int64)
    for c0 in range(0, big, BAND_PIXELS):  # the first position of each label: a minimum, in chunks
        c1 = min(big, c0 + BAND_PIXELS)
        ft = torch.from_numpy(flat[c0:c1].astype(np.int64, copy=False))
        first.scatter_reduce_(0, ft, torch.arange(c0, c1, dtype=torch.int64), reduce="amin", include_self=True)
    first = first.numpy()
    first[0] = big
    present = np.flatnonzero(first < big)
    order = present[np.argsort(first[present], kind="stable")]
    lut[order] = np.arange(1, len(order) + 1)
    return lut, len(order)


def renumber_first(lab: np.ndarray, dtype=None) -> np.ndarray:
    """Relabel 1..N in order of first appearance (like ``fastremap.renumber``)."""
    if lab.size == 0:
        return lab.astype(dtype or lab.dtype)
    if int(lab.max()) > 4 * lab.size + 2**16:  # very sparse label values: compress first
        uniq, inv = np.unique(lab, return_inverse=True)
        lab = inv.reshape(lab.shape) + (0 if uniq[0] == 0 else 1)
    lut, n = first_appearance_lut(lab)
    dtype = dtype or label_dtype(n)
    return lut.astype(dtype)[lab]


def renumber_sorted(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel 1..N keeping the order of the label values (0 stays 0). Returns (int64 labels, N)."""
    if lab.size == 0:
        return lab.astype(np.int64), 0
    nmax = int(lab.max())
    if nmax > 4 * lab.size + 2**16:
        uniq, inv = np.unique(lab, return_inverse=True)
        out = inv.reshape(lab.shape).astype(np.int64)
        if uniq[0] != 0:
            out += 1
        return out, int(out.max())
    present = np.bincount(lab.reshape(-1).astype(np.int64, copy=False), minlength=nmax + 1) > 0
    present[0] = False
    lut = np.zeros(nmax + 1, dtype=np.int64)
    n = int(present.sum())
    lut[present] = np.arange(1, n + 1)
    return lut[lab], n


def max_filter(x: torch.Tensor, size: int, dims: Sequence[int]) -> torch.Tensor:
    """Max filter of odd ``size`` along ``dims`` (stride 1, window clipped at the borders)."""
    k = size // 2
    for ax in dims:
        n = x.shape[ax]
        out = x.clone()
        for d in range(1, k + 1):
            if d >= n:
                break
            a = out.narrow(ax, 0, n - d)
            torch.maximum(a, x.narrow(ax, d, n - d), out=a)
            b = out.narrow(ax, d, n - d)
            torch.maximum(b, x.narrow(ax, 0, n - d), out=b)
        x = out
    return x


def row_bands(shape: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges of about BAND_PIXELS pixels covering a (Y, X) image."""
    rows = max(1, BAND_PIXELS // max(1, int(shape[1])))
    for r0 in range(0, int(shape[0]), rows):
        yield r0, min(int(shape[0]), r0 + rows)


def halo_bands(shape: Sequence[int], halo: int, device: torch.device) -> Iterator[tuple[int, int, int, int]]:
    """Bands of an array of ``shape`` along its first axis for a local filter that reaches ``halo``
    elements: (r0, r1, a, b) = the rows [r0, r1) to keep, computed from the rows [a, b) around them
    (the whole array in one band off the CPU)."""
    n = int(shape[0])
    rows = n if device.type != "cpu" else max(1, 4 * halo, BAND_PIXELS // max(1, math.prod(shape[1:])))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        yield r0, r1, max(0, r0 - halo), min(n, r1 + halo)


# ----------------------------------------------------------------------------------------------
# the same on torch tensors, on any device (no host syncs but the ones named)
# ----------------------------------------------------------------------------------------------
def renumber_sorted_torch(lab: torch.Tensor) -> tuple[torch.Tensor, int]:
    """:func:`renumber_sorted` on a tensor: int64 labels 1..N in the order of the values, and N.

    Two host syncs (the largest label, N); very sparse label values go through ``torch.unique``.
    """
    flat = lab.reshape(-1).long()
    if flat.numel() == 0:
        return flat.reshape(lab.shape), 0
    nmax = int(flat.max())
    if nmax > 4 * flat.numel() + 2**16:
        uniq, inv = torch.unique(flat, return_inverse=True)
        out = inv + (uniq[0] != 0).long()
        return out.reshape(lab.shape), int(out.max())
    present = torch.bincount(flat, minlength=nmax + 1) > 0
    present[0] = False
    lut = torch.cumsum(present, 0) * present
    return lut[flat].reshape(lab.shape), int(lut[-1])


def first_appearance_lut_torch(lab: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`first_appearance_lut` on a tensor with labels 0..``nmax``, without host syncs.

    Returns
    -------
    lut : int64 (nmax + 1,)
        Old label -> new label 1..N (first appearance in C order); 0 and absent labels -> 0.
    n : int64 0-d tensor
        N, the number of labels present.
    """
    flat = lab.reshape(-1).long()
    big = flat.numel()
    pos = torch.arange(big, dtype=torch.int64, device=lab.device)
    first = torch.full((nmax + 1,), big, dtype=torch.int64, device=lab.device)
    first.scatter_reduce_(0, flat, pos, reduce="amin", include_self=True)
    first[0] = big
    return lut_from_first(first, big)


def lut_from_first(first: torch.Tensor, big: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Look-up table label -> rank of ``first[label]`` (1-based) among the entries below ``big``
    (int64 (n,)), 0 for the others; and the number of those entries (0-d int64)."""
    order = torch.argsort(first, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, first.numel() + 1, dtype=torch.int64, device=first.device)
    present = first < big
    return rank * present, present.sum()
