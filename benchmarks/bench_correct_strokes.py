"""Server time of one Correct-tab stroke on a big image (what happens between mouse release and reply).

Builds a 2048x2048 label image with about 4,000 touching cells, then times
``ui.correct_tab.apply_op`` (MaskEditor edit + the JSON payload with the changed box of labels) for
typical operations: a freehand outline of a cell (~40 px across), brush and eraser strokes 300 px
long (radius 5), a long diagonal brush stroke across the whole image, delete, merge, undo, redo,
click to add (synthetic flows), and the one-off full-plane payload sent when the tab opens.
Prints the median and max over repeats, in ms. No pass/fail.

    python benchmarks/bench_correct_strokes.py [--size 2048] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellpose_web.engine import dynamics  # noqa: E402
from cellpose_web.ui import common  # noqa: E402
from cellpose_web.ui.tabs import correct as correct_tab


def voronoi_cells(size: int, spacing: int = 32, seed: int = 0) -> np.ndarray:
    """(size, size) uint16 labels: jittered-grid Voronoi cells with a 2 px background gap."""
    from scipy import ndimage as ndi
    rng = np.random.default_rng(seed)
    g = np.arange(spacing // 2, size, spacing)
    cy, cx = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([cy.ravel(), cx.ravel()], 1) + rng.integers(-spacing // 4, spacing // 4 + 1, (cy.size, 2))
    seeds = np.zeros((size, size), np.int32)
    seeds[np.clip(pts[:, 0], 0, size - 1), np.clip(pts[:, 1], 0, size - 1)] = np.arange(1, len(pts) + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[iy, ix]
    edge = np.zeros_like(lab, bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    lab[ndi.binary_dilation(edge)] = 0
    return lab.astype(np.uint16)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.size
    masks = voronoi_cells(n)
    image = (np.where(masks > 0, 2000, 300) + np.random.default_rng(1).normal(0, 50, masks.shape)).astype(np.float32)
    s = common.Session(name="big.tif", image=image[..., None], masks=masks, version=1,
                       dP=5 * dynamics.masks_to_flows(masks), cellprob=np.where(masks > 0, 4.0, -4.0).astype(np.float32))
    t = time.perf_counter()
    st, pay = correct_tab.apply_op(s, None, {"op": "load"})
    t_open = time.perf_counter() - t
    print(f"{n}x{n}, {st.editor.n_cells} cells; opening the plane (image PNG + all labels): "
          f"{t_open * 1000:.0f} ms, {len(json.dumps(pay)) / 1e6:.1f} MB")
    rng = np.random.default_rng(2)
    times: dict[str, list[float]] = {}

    def timed(name, op):
        nonlocal st
        t0 = time.perf_counter()
        st, p = correct_tab.apply_op(s, st, op)
        json.dumps(p)
        correct_tab.status(st)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        if p["kind"] == "error":
            print(f"  ({name}: {p['message']})")
        return p

    for k in range(args.repeats):
        y, x = (int(v) for v in rng.integers(200, n - 300, 2))
        lab = int(masks[y, x]) or 1
        a = np.linspace(0, 2 * np.pi, 120)
        timed("delete a cell", {"op": "delete", "labels": [lab]})
        timed("outline (120 points, 40 px)", {"op": "outline", "z": 0,
                                              "points": np.c_[y + 20 * np.sin(a), x + 20 * np.cos(a)].tolist()})
        line = np.c_[np.full(300, y + 40.0), x + np.arange(300.0)].tolist()
        timed("brush 300 px, r=5", {"op": "brush", "z": 0, "points": line, "radius": 5, "label": 0})
        timed("eraser 300 px, r=5", {"op": "erase", "z": 0, "points": line, "radius": 5})
        diag = np.c_[np.linspace(5, n - 5, 2000), np.linspace(5, n - 5, 2000) + 11 * k].tolist()
        timed(f"eraser across the image ({n} px diagonal, r=3)", {"op": "erase", "z": 0, "points": diag, "radius": 3})
        b = int(masks[y + 100, x + 100]) or 2
        c = int(masks[y + 100, x + 132]) or 3
        timed("merge two cells", {"op": "merge", "z": 0, "labels": [b, c]})
        timed("undo", {"op": "undo"})
        timed("redo", {"op": "redo"})
        timed("undo", {"op": "undo"})
        dy, dx = (int(v) for v in rng.integers(200, n - 300, 2))
        d = int(st.editor.masks[dy, dx])
        if d:
            timed("delete a cell", {"op": "delete", "labels": [d]})
            ys, xs = np.nonzero(masks == d)
            timed("click to add (flows)", {"op": "add", "z": 0, "y": float(ys.mean()), "x": float(xs.mean())})
    print(f"server time per operation ({args.threads} threads, {args.repeats} repeats): median / max")
    for name, v in times.items():
        print(f"  {name:45s} {np.median(v) * 1000:7.1f} / {np.max(v) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
