"""The flow check (``flow_error``, ``remove_bad_flow_masks``): masks whose own flows disagree with
the predicted ones are removed.

In 2D each object runs only for the steps its own size needs (2 * (height + width + 2), where Cellpose
uses the largest object's count for all), in phases on shrinking boxes. Objects whose error lands
within 0.05 of the threshold are recomputed with Cellpose's count, so keep/remove decisions match."""
from __future__ import annotations

import math
from typing import Callable
import numpy as np
import torch
from scipy import ndimage as ndi
from cellpose_web.errors import CellposeWebError, NonFiniteFlowsError
from cellpose_web.engine.dynamics.device_setup import as_device, cpu_threads, to_numpy
from cellpose_web.engine.dynamics.labels import as_labels, label_counts, renumber_first, row_bands
from cellpose_web.engine.dynamics.flows import centers_and_iters_2d, diffuse_heat, flows_tensor, heat_dtype


def check_flows(dP, cellprob) -> tuple[np.ndarray, np.ndarray]:
    """``dP`` and ``cellprob`` as real-valued numpy arrays of matching shapes.

    Raises
    ------
    CellposeWebError
        for wrong shapes or dtypes; :class:`NonFiniteFlowsError` (a BadInputError) for NaN or
        infinite values.
    """
    dP = to_numpy(dP, "dP")
    cellprob = to_numpy(cellprob, "cellprob")
    if cellprob.ndim not in (2, 3):
        raise CellposeWebError(
            f"cellprob must be a 2D (Y, X) or 3D (Z, Y, X) map, but it has shape {cellprob.shape}."
        )
    if dP.ndim != cellprob.ndim + 1 or dP.shape[0] != cellprob.ndim or dP.shape[1:] != cellprob.shape:
        raise CellposeWebError(
            f"dP must have shape ({cellprob.ndim}, {', '.join(map(str, cellprob.shape))}) to match cellprob "
            f"{cellprob.shape} ([dY, dX] in 2D, [dZ, dY, dX] in 3D), but it has shape {dP.shape}."
        )
    for name, a in (("dP", dP), ("cellprob", cellprob)):
        if a.dtype.kind not in "fiub":
            raise CellposeWebError(f"{name} must be a real-valued array, got dtype {a.dtype}.")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise NonFiniteFlowsError(
                f"{name} contains NaN or infinite values; check the network output or the image "
                "(NaN pixels must be replaced before segmentation)."
            )
    if dP.dtype.kind != "f":
        dP = dP.astype(np.float32)
    if cellprob.dtype.kind != "f":
        cellprob = cellprob.astype(np.float32)
    return dP, cellprob


# The flow check's first pass diffuses many objects at once on a window; a window larger than this many
# pixels is split into tiles of whole objects, so that each tile's heat (a few float32 images of the
# tile's size) stays in the CPU's caches: the cost then follows the pixels instead of streaming the whole
# window through memory every step. First pass on a 4096 x 4096 lite output, one thread, CPU time: 6.8 s
# untiled (40x the 1024 x 1024 one), 3.6 s with 512 x 512 tiles, 3.8 s with 1024 x 1024, 4.6 s with
# 256 x 256 (per-tile overhead).
HEAT_TILE_PIXELS = 512 * 512


def _heat_in_window(lab: np.ndarray, Tg: torch.Tensor, ids: np.ndarray, centers: np.ndarray, boxes: np.ndarray,
                    n_steps: int, start: bool, fast: bool = False) -> None:
    """Diffuse the objects ``ids`` (labels, 1-based) for ``n_steps`` on the bounding box that holds them.

    Other objects in that box count as background. ``Tg`` is the zero-padded (Y + 2, X + 2) heat of the
    whole image: the objects start from their heat there (or from zero when ``start`` is False) and
    their new heat is written back. ``boxes`` (N, 4) holds every object's [y0, y1, x0, x1) bounding box.
    ``fast``: float32 heat and a separable 3x3 sum (4 instead of 8
    additions on half the bytes), for the first pass of the flow check.

    A box larger than ``HEAT_TILE_PIXELS`` is split into tiles: the objects are grouped by the tile
    (a square grid of that area) that holds their box's centre, and each group runs on the union of its
    boxes. Heat never crosses from one object to another, and pixels next to an object of another group
    are summed as if that object were there, so every object's heat is bit-identical to running them
    all on one box.
    """
    b = boxes[ids - 1]
    y0, y1, x0, x1 = int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max())
    active = np.zeros(len(centers) + 1, dtype=bool)
    active[ids] = True
    side = max(16, int(math.sqrt(HEAT_TILE_PIXELS)))
    if (y1 - y0) * (x1 - x0) <= 2 * HEAT_TILE_PIXELS or len(ids) < 2:
        _heat_in_tile(lab, Tg, ids, active, centers, (y0, y1, x0, x1), n_steps, start, fast, False)
        return
    ty = ((b[:, 0] + b[:, 1]) // 2 - y0) // side
    tx = ((b[:, 2] + b[:, 3]) // 2 - x0) // side
    tile = ty * (int(tx.max()) + 1) + tx
    order = np.argsort(tile, kind="stable")
    cuts = np.flatnonzero(np.diff(tile[order])) + 1
    for grp in np.split(order, cuts):
        g = b[grp]
        # one more pixel on each side: an object at the window's edge may touch one of another tile
        win = (max(0, int(g[:, 0].min()) - 1), min(lab.shape[0], int(g[:, 1].max()) + 1),
               max(0, int(g[:, 2].min()) - 1), min(lab.shape[1], int(g[:, 3].max()) + 1))
        _heat_in_tile(lab, Tg, ids[grp], active, centers, win, n_steps, start, fast, True)


def _heat_in_tile(lab: np.ndarray, Tg: torch.Tensor, ids: np.ndarray, active: np.ndarray, centers: np.ndarray,
                  win: tuple[int, int, int, int], n_steps: int, start: bool, fast: bool,
                  split: bool) -> None:
    """Diffuse the objects ``ids`` on the window ``win`` = (y0, y1, x0, x1) (see ``_heat_in_window``).
    ``active`` (N + 1,) bool marks every object diffused in this phase; ``split``: the other active
    objects run in other tiles, and the pixels next to them are summed as in one window."""
    sl = (slice(win[0], win[1]), slice(win[2], win[3]))
    crop = lab[sl]
    if not split:
        sub = np.where(active[crop], crop, 0)
        neighbours = None
    else:
        mine = np.zeros(len(active), dtype=bool)
        mine[ids] = True
        sub = np.where(mine[crop], crop, 0)
        neighbours = np.where(active[crop], crop, 0)
    act = torch.from_numpy(sub > 0).to(Tg.device)
    pad_sl = (slice(sl[0].start, sl[0].stop + 2), slice(sl[1].start, sl[1].stop + 2))
    dtype = torch.float32 if fast else Tg.dtype
    T0 = torch.zeros((crop.shape[0] + 2, crop.shape[1] + 2), dtype=dtype, device=Tg.device)
    if start:
        T0[1:-1, 1:-1][act] = Tg[pad_sl][1:-1, 1:-1][act].to(dtype)
    c = centers[ids - 1] - np.array([sl[0].start, sl[1].start])
    T = diffuse_heat(sub, int(crop.max()), c, n_steps, Tg.device, dtype, T0=T0, separable=fast,
                      neighbours=neighbours)
    Tg[pad_sl][1:-1, 1:-1][act] = T[1:-1, 1:-1][act].to(Tg.dtype)


def _object_heat_2d(lab: np.ndarray, nlab: int, centers: np.ndarray, n_own: np.ndarray, Tg: torch.Tensor,
                    box: np.ndarray, shrink: float = 0.5, fast: bool = True) -> np.ndarray:
    """Heat of all objects, run in phases so that the cost follows the objects, not the largest one.

    Object i needs ``n_own[i]`` steps (Cellpose's count for that object alone). All objects start
    together on the foreground's bounding box; a phase ends when the objects that still need more steps
    fit in a box of at most ``shrink`` times the area, and only those continue there; once their own
    boxes add up to less than that, each goes on alone on its own box (batched). Objects that finish
    within a phase run to the phase's end, so images of similar objects get exactly Cellpose's
    image-wide step count. ``fast``: float32 heat with a separable sum (see ``_heat_in_window``).
    ``box`` (N, 4): every object's [y0, y1, x0, x1) bounding box. Returns the steps each object ran.
    """
    order = np.argsort(n_own, kind="stable")
    nb = box[order]
    # bounding box of the objects order[i:], for every i
    suf = np.stack([np.minimum.accumulate(nb[::-1, 0])[::-1], np.maximum.accumulate(nb[::-1, 1])[::-1],
                    np.minimum.accumulate(nb[::-1, 2])[::-1], np.maximum.accumulate(nb[::-1, 3])[::-1]], 1)
    area = (suf[:, 1] - suf[:, 0]) * (suf[:, 3] - suf[:, 2])
    ran = np.zeros(nlab, dtype=np.int64)
    own_area = (nb[:, 1] - nb[:, 0]) * (nb[:, 3] - nb[:, 2])
    rest_area = np.cumsum(own_area[::-1])[::-1]  # total box area of the objects order[i:]
    done, i = 0, 0
    while i < nlab:
        if rest_area[i] <= shrink * area[i]:
            # the objects left are scattered: their own boxes hold less than their common box
            rest = order[i:]
            _heat_per_object(lab, Tg, rest + 1, centers, box, n_own[rest] - done, start=done > 0, fast=fast)
            ran[rest] = n_own[rest]
            break
        smaller = np.flatnonzero(np.minimum(area[i + 1:], rest_area[i + 1:]) <= shrink * area[i])
        j = i + 1 + int(smaller[0]) if len(smaller) else nlab
        t_end = int(n_own[order[j - 1]])
        if t_end > done:
            _heat_in_window(lab, Tg, order[i:] + 1, centers, box, t_end - done, start=done > 0, fast=fast)
            done = t_end
        ran[order[i:j]] = done
        i = j
    return ran


# Flow errors of the fast pass (own step counts, float32 heat, separable sums) differ from Cellpose's by
# at most 0.019 on the reference fixtures and 0.006 on lite's output for a 1024 x 1024 nuclei image.
# Objects whose error lies closer than this to the threshold are recomputed as Cellpose does (float64
# heat summed in Cellpose's order, Cellpose's image-wide step count).
_FLOW_ERROR_MARGIN = 0.05


def _flow_errors_2d(lab: np.ndarray, dP: np.ndarray, device: torch.device, threshold: float | None = None,
                    mu_out: np.ndarray | None = None) -> np.ndarray:
    """Per-object flow errors of a 2D label image with labels 1..N (all present).

    A fast pass (see ``_object_heat_2d``) gives every error; with ``threshold``, objects whose error is
    within ``_FLOW_ERROR_MARGIN`` of it are diffused again exactly as Cellpose does (with the objects
    touching them, whose heat their border gradients read), so the keep/remove decision is Cellpose's.
    The per-pixel errors are computed in row bands (``labels.BAND_PIXELS``) and summed per object in one pass
    at the end, so they are the same, bit for bit, as from one whole-image pass.

    Returns errors float64 (N,); with ``mu_out`` (float32 (2, Y, X) zeros) the unit flows of the
    objects are written into it.
    """
    Ly, Lx = lab.shape
    nlab = int(lab.max())
    slices = ndi.find_objects(lab, max_label=nlab)
    centers, n_global = centers_and_iters_2d(lab, nlab, slices)
    box = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], dtype=np.int64)
    del slices
    n_own = 2 * ((box[:, 1] - box[:, 0]) + (box[:, 3] - box[:, 2]) + 2)
    Tg = torch.zeros((Ly + 2, Lx + 2), dtype=heat_dtype(lab.shape, device), device=device)
    _object_heat_2d(lab, nlab, centers, n_own, Tg, box)
    Tf = Tg.view(-1)
    bands = list(row_bands(lab.shape)) if device.type == "cpu" else [(0, Ly)]
    band_fg = [np.flatnonzero(lab[r0:r1]) for r0, r1 in bands]  # int64, in raster order
    starts = np.cumsum([0] + [len(f) for f in band_fg])
    err_px = torch.empty(int(starts[-1]), dtype=torch.float64, device=device)

    def pixel_errors(only: np.ndarray | None = None) -> None:
        """Per-pixel errors into ``err_px`` (only for the pixels of labels marked in ``only``)."""
        for (r0, r1), f, off in zip(bands, band_fg, starts):
            blk = lab[r0:r1].reshape(-1)
            if only is not None:
                sel = np.flatnonzero(only[blk[f]])
                if not len(sel):
                    continue
                f = f[sel]
            ft = torch.from_numpy(f).to(device)
            pp = (ft // Lx + r0 + 1) * (Lx + 2) + (ft % Lx + 1)
            at = lambda d: Tf.index_select(0, pp + d)  # noqa: E731
            mu = torch.stack([at(Lx + 2) - at(-(Lx + 2)), at(1) - at(-1)]).to(torch.float64)
            mu /= 1e-60 + (mu**2).sum(0).sqrt()
            net = torch.from_numpy(np.stack([dP[0, r0:r1].reshape(-1)[f], dP[1, r0:r1].reshape(-1)[f]]))
            err = ((mu - net.to(device).to(torch.float64) / 5.0) ** 2).sum(0)
            if only is None:
                err_px[off:off + len(f)] = err
            else:
                err_px[torch.from_numpy(sel + off).to(device)] = err
            if mu_out is not None:
                m = mu.to(torch.float32).cpu().numpy()
                mu_out[0, r0:r1].reshape(-1)[f] = m[0]
                mu_out[1, r0:r1].reshape(-1)[f] = m[1]

    lt = torch.from_numpy(np.concatenate([lab[r0:r1].reshape(-1)[f] for (r0, r1), f in zip(bands, band_fg)]))
    lt = lt.to(device)
    cnts = torch.bincount(lt, minlength=nlab + 1)[1:].to(torch.float64)

    def errors() -> np.ndarray:
        return (torch.bincount(lt, weights=err_px, minlength=nlab + 1)[1:] / cnts).cpu().numpy()

    pixel_errors()
    err = errors()
    if threshold is not None:
        near = np.flatnonzero(np.abs(err - threshold) <= _FLOW_ERROR_MARGIN) + 1
        if len(near):
            touching = _touching_labels(lab)
            redo = np.unique(np.concatenate([touching(v) for v in near]))
            _heat_per_object(lab, Tg, redo, centers, box, np.full(len(redo), n_global))
            # pixels whose gradients read the new heat: those of redo and of the objects touching them
            only = np.zeros(nlab + 1, dtype=bool)
            only[np.concatenate([touching(v) for v in redo])] = True
            pixel_errors(only)
            err = errors()
    return err


# Objects diffused alone on their own boxes run in batches of at most this many pixels (float64: 2 MB
# per array), small enough to stay in the CPU's caches: 4 M-pixel batches made the exact recheck on a
# 4096 x 4096 lite output 2.4x slower (7.0 s vs 2.9 s), with bit-identical heat.
HEAT_BATCH_ELEMS = 1 << 18


def _heat_per_object(lab: np.ndarray, Tg: torch.Tensor, ids: np.ndarray, centers: np.ndarray,
                     boxes: np.ndarray, steps: np.ndarray, start: bool = False, fast: bool = False,
                     max_elems: int | None = None) -> None:
    """Heat of the objects ``ids`` (labels), each alone on its own bounding box, batched.

    Objects of similar box size run together as a (B, H, W) stack; object k runs ``steps[k]`` steps
    (the stack is sorted so that the objects still running are a prefix). Every step adds the source,
    sums the 3x3 neighbours and divides by 9, then zeroes the pixels outside each object. Not ``fast``:
    float64 summed in Cellpose's order, bit-identical to Cellpose's heat. ``fast``: float32 with a
    separable sum. ``start``: continue from the heat in ``Tg``. The result is written into ``Tg``.
    """
    max_elems = HEAT_BATCH_ELEMS if max_elems is None else max_elems
    steps = np.asarray(steps, dtype=np.int64)
    hw = np.stack([boxes[ids - 1, 1] - boxes[ids - 1, 0], boxes[ids - 1, 3] - boxes[ids - 1, 2]], 1)
    order = np.argsort(-(hw[:, 0] * hw[:, 1]), kind="stable")
    groups, cur, H, W = [], [], 0, 0
    for i in order:  # batches whose common box wastes at most 2.5x each object's box
        h, w = int(hw[i, 0]), int(hw[i, 1])
        nh, nw = max(H, h), max(W, w)
        if cur and (nh * nw > 2.5 * h * w or (len(cur) + 1) * (nh + 2) * (nw + 2) > max_elems):
            groups.append(cur)
            cur, nh, nw = [], h, w
        cur.append(i)
        H, W = nh, nw
    if cur:
        groups.append(cur)
    device = Tg.device
    dtype = torch.float32 if fast else torch.float64
    Lx2 = Tg.shape[1]
    offs = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))  # Cellpose's order
    for grp in groups:
        grp = np.array(grp)
        grp = grp[np.argsort(-steps[grp], kind="stable")]
        lbl, nst = ids[grp], steps[grp]
        b = boxes[lbl - 1]
        B = len(lbl)
        H, W = int((b[:, 1] - b[:, 0]).max()), int((b[:, 3] - b[:, 2]).max())
        msk = np.zeros((B, H + 2, W + 2), dtype=bool)
        for k, v in enumerate(lbl):
            msk[k, 1:1 + b[k, 1] - b[k, 0], 1:1 + b[k, 3] - b[k, 2]] = lab[b[k, 0]:b[k, 1], b[k, 2]:b[k, 3]] == v
        M = torch.from_numpy(msk).to(device)
        Mw = M[:, 1:-1, 1:-1].to(dtype)
        c = centers[lbl - 1]
        src = torch.from_numpy(np.arange(B) * (H + 2) * (W + 2) + (c[:, 0] - b[:, 0] + 1) * (W + 2)
                               + (c[:, 1] - b[:, 2] + 1)).to(device)
        ones = torch.ones(B, dtype=dtype, device=device)
        k_idx, yy, xx = torch.nonzero(M, as_tuple=True)
        bt = torch.from_numpy(b).to(device)[k_idx]
        gpos = (yy + bt[:, 0]) * Lx2 + (xx + bt[:, 2])
        T = torch.zeros((B, H + 2, W + 2), dtype=dtype, device=device)
        if start:
            T[k_idx, yy, xx] = Tg.view(-1)[gpos].to(dtype)
        S = torch.empty((B, H, W), dtype=dtype, device=device)
        R = torch.empty((B, H + 2, W), dtype=dtype, device=device) if fast else None
        k = B
        for t in range(int(nst[0]) if B else 0):
            while k > 0 and nst[k - 1] <= t:
                k -= 1
            Tk, Sk = T[:k], S[:k]
            Tk.view(-1).index_add_(0, src[:k], ones[:k])
            if fast:
                Rk = R[:k]
                torch.add(Tk[:, :, :-2], Tk[:, :, 1:-1], out=Rk)
                Rk.add_(Tk[:, :, 2:])
                torch.add(Rk[:, :-2], Rk[:, 1:-1], out=Sk)
                Sk.add_(Rk[:, 2:])
            else:
                views = [Tk[:, 1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx] for dy, dx in offs]
                torch.add(views[0], views[1], out=Sk)
                for v in views[2:]:
                    Sk.add_(v)
            Sk.div_(9.0)
            Sk.mul_(Mw[:k])
            Tk[:, 1:-1, 1:-1] = Sk
        Tg.view(-1)[gpos] = T[k_idx, yy, xx].to(Tg.dtype)


def _touching_labels(lab: np.ndarray):
    """A function v -> labels (int array, v first) sharing a 4-connected edge with label v (2D, 1..N)."""
    pairs = []
    for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1], lab[1:])):
        sel = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([a[sel], b[sel]], 1))
    pairs = np.concatenate(pairs).astype(np.int64)
    pairs = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)  # sorted by the first column
    start = np.searchsorted(pairs[:, 0], np.arange(int(lab.max()) + 2))

    def touching(v: int) -> np.ndarray:
        return np.concatenate([[v], pairs[start[v]:start[v + 1], 1]])

    return touching


def _check_device(device) -> torch.device:
    """Where the flow check runs: ``device``, except Apple's MPS (no float64, which the check's heat
    diffusion and sums need): the CPU there."""
    device = as_device(device)
    return torch.device("cpu") if device.type == "mps" else device


def flow_error(masks, dP, device=None, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared difference between the flows of ``masks`` and the network flows ``dP / 5``.

    Without ``threshold`` this is Cellpose 4's flow error: every object diffused for the image-wide step
    count of the largest one, over the whole image.

    With ``threshold`` (2D; what :func:`compute_masks` uses for its flow check) the errors are meant to be
    compared with it, and the cost follows the objects: a fast pass runs each object only for the steps
    its own size needs, 2 * (height + width + 2), in float32 with a separable 3x3 sum, in phases on
    shrinking boxes (see ``_object_heat_2d``). Its errors differ from Cellpose's by less than 0.02 (at
    most 0.019 on the reference fixtures, 0.0007 on lite's output for a 1024 x 1024 nuclei image); every
    object whose error lies within 0.05 of the threshold is then recomputed exactly as Cellpose does, so
    which objects pass matches Cellpose 4.2.1.1. Objects far from the threshold keep the fast value.
    On the reference fixtures the masks of ``compute_masks`` are identical to Cellpose 4.2.1.1's; on
    realistic network outputs (benchmarks/bench_dynamics.py) AP@0.5 = 1.0 and matched IoU >= 0.99
    against Cellpose 4.2.1.1 (identical masks in every case measured).

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int label image.
    dP : float (2, Y, X) or (3, Z, Y, X) network flows (about 5x unit vectors).
    device : None or torch.device.
    threshold : float, optional
        The threshold the errors will be compared with (see above; ignored in 3D).

    Returns
    -------
    errors : float64 (masks.max(),)
        Per label 1..max; NaN for labels that are not present.
    mu : float32 (ndim, ...)
        Unit flows recomputed from ``masks`` (0 outside objects).
    """
    lab = as_labels(masks, "masks")
    dP = _flows_matching(dP, lab)
    device = _check_device(device)
    nmax = int(lab.max()) if lab.size else 0
    if lab.ndim == 2 and threshold is not None:
        mu = np.zeros((2, *lab.shape), np.float32)
        return _flow_errors_thresholded(lab, dP, device, threshold, mu), mu
    with cpu_threads(device):
        mu = flows_tensor(lab, device, None)
    if nmax == 0:
        return np.zeros(0), mu.to(torch.float32).cpu().numpy()
    net = torch.from_numpy(np.ascontiguousarray(dP)).to(device) / 5.0
    err = ((mu - net.to(torch.float64)) ** 2).sum(0).reshape(-1)
    lt = torch.from_numpy(lab.reshape(-1).astype(np.int64)).to(device)
    sums = torch.bincount(lt, weights=err, minlength=nmax + 1)[1:]
    cnts = torch.bincount(lt, minlength=nmax + 1)[1:].to(torch.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = (sums / cnts).cpu().numpy()
    return errors, mu.to(torch.float32).cpu().numpy()


def _flows_matching(dP, lab: np.ndarray) -> np.ndarray:
    """``dP`` as a numpy array, checked to be (ndim, *lab.shape)."""
    dP = to_numpy(dP, "dP")
    if dP.shape[1:] != lab.shape or dP.shape[0] != lab.ndim:
        raise CellposeWebError(f"dP has shape {dP.shape}, which does not match masks of shape {lab.shape}.")
    return dP


def _flow_errors_thresholded(lab: np.ndarray, dP: np.ndarray, device: torch.device, threshold: float,
                             mu_out: np.ndarray | None = None) -> np.ndarray:
    """``flow_error(lab, dP, threshold=...)``'s errors for a 2D label image (any labels >= 0); the unit
    flows go into ``mu_out`` when given."""
    nmax = int(lab.max()) if lab.size else 0
    if nmax == 0:
        return np.zeros(0)
    present = label_counts(lab, nmax)[1:] > 0
    nlab = int(present.sum())
    lut = np.zeros(nmax + 1, dtype=np.int32 if nlab < 2**31 - 1 else np.int64)
    lut[1:][present] = np.arange(1, nlab + 1)
    ren = lut[lab]  # labels 1..nlab in the order of their values
    with cpu_threads(device):
        err = _flow_errors_2d(ren, dP, device, threshold=threshold, mu_out=mu_out)
    errors = np.full(nmax, np.nan)
    errors[present] = err
    return errors


def remove_bad_flow_masks(masks, dP, threshold: float = 0.4, device=None,
                          flow_error_fn: Callable | None = None) -> np.ndarray:
    """Remove masks whose flow error (see :func:`flow_error`) is above ``threshold``; renumber.

    ``flow_error_fn(labels, dP) -> errors (N,)`` replaces :func:`flow_error` (Cellpose 3 models use
    Cellpose 3's own flows, ``legacy.flow_error``)."""
    lab = as_labels(masks, "masks")
    if flow_error_fn is not None:
        errors = np.asarray(flow_error_fn(lab, dP))
    elif lab.ndim == 2:  # flow_error's errors without its unit flows (not needed here)
        errors = _flow_errors_thresholded(lab, _flows_matching(dP, lab), _check_device(device), threshold)
    else:
        errors, _ = flow_error(lab, dP, device=device, threshold=threshold)
    bad = np.zeros(len(errors) + 1, dtype=bool)
    bad[1:] = errors > threshold
    out = lab.copy()
    out[bad[out]] = 0
    return renumber_first(out, dtype=lab.dtype if lab.dtype.kind == "u" else None)
