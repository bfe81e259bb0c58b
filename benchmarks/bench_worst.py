"""The worst picture vs a normal one: phase-contrast bacteria through the nuclei model `lite`.

    python benchmarks/bench_worst.py [--repeats 3] [--seed 0]

Normal picture: ``../shared/data/nuclei_2d/val/2022-10-14-U2OS-1.tif`` (768 x 869, 16-bit nuclei).
Worst picture: a synthetic 727 x 1026 phase-contrast frame of dense rod-shaped bacteria (dark bodies
of 6-9 px width and 15-45 px length with a bright halo on a grey, unevenly lit background; see
``phase_bacteria``). The nuclei model was not trained on it and its objects are half its size, so
lite's automatic diameter zooms the frame and the masks are blobs and fragments.

Other hostile pictures of the same size: denser bacteria, large smooth blobs (huge 'cells'), an 8 px
checkerboard (texture read as tiny cells) and pure camera noise.

All run through ``CellposeModel('lite').eval`` with the app's defaults (automatic diameter, flow
threshold 0.4) and with a fixed diameter of 30 px (no zoom, the same pixel work). Each case is timed
``--repeats`` times alternately after one warm-up; the fastest run counts. Prints the stage timings,
the diameter lite estimated, the mask counts and the ratio worst / normal. Numbers, no pass/fail.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellpose_web import models  # noqa: E402

NORMAL = ROOT.parent / "shared" / "data" / "nuclei_2d" / "val" / "2022-10-14-U2OS-1.tif"


def phase_bacteria(rng: np.random.Generator, shape=(727, 1026), density: float = 0.35) -> np.ndarray:
    """A phase-contrast-like frame of rod-shaped bacteria, uint16 (Y, X).

    Rods (capsules) of width 6-9 px and length 15-45 px at random angles, packed until about
    ``density`` of the frame is covered (overlaps allowed, as in dense colonies); dark bodies with a
    bright halo (phase contrast), uneven illumination, blur and shot noise.
    """
    Ly, Lx = shape
    yy, xx = np.mgrid[0:Ly, 0:Lx].astype(np.float32)
    body = np.zeros(shape, np.float32)
    n = int(density * Ly * Lx / (7.5 * 30))
    cy, cx = rng.uniform(0, Ly, n), rng.uniform(0, Lx, n)
    ang = rng.uniform(0, np.pi, n)
    half_len, rad = rng.uniform(4, 18, n), rng.uniform(3, 4.5, n)
    for k in range(n):
        r = int(half_len[k] + rad[k] + 2)
        y0, y1 = max(0, int(cy[k]) - r), min(Ly, int(cy[k]) + r + 1)
        x0, x1 = max(0, int(cx[k]) - r), min(Lx, int(cx[k]) + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy[k], xx[y0:y1, x0:x1] - cx[k]
        along = np.clip(dy * np.sin(ang[k]) + dx * np.cos(ang[k]), -half_len[k], half_len[k])
        py, px = cy[k] + along * np.sin(ang[k]), cx[k] + along * np.cos(ang[k])
        d = np.hypot(yy[y0:y1, x0:x1] - py, xx[y0:y1, x0:x1] - px)
        body[y0:y1, x0:x1] = np.maximum(body[y0:y1, x0:x1], np.clip(rad[k] + 0.5 - d, 0, 1))
    halo = ndi.gaussian_filter(body, 3.0) - ndi.gaussian_filter(body, 1.0)
    light = 1.0 + 0.3 * ndi.gaussian_filter(rng.normal(0, 1, (Ly // 16 + 1, Lx // 16 + 1)), 2)
    light = ndi.zoom(light, (Ly / light.shape[0], Lx / light.shape[1]), order=1)[:Ly, :Lx]
    img = light * (0.55 - 0.35 * ndi.gaussian_filter(body, 0.8) + 0.9 * np.clip(halo, 0, None))
    img = rng.poisson(np.clip(img, 0, None) * 800).astype(np.float32) / 800
    return np.clip(img / img.max() * 40000 + 500, 0, 65535).astype(np.uint16)


def blobs(rng: np.random.Generator, shape=(727, 1026)) -> np.ndarray:
    """Smooth bright blobs of 50-300 px on a dark background, uint16 (Y, X): the nuclei model sees
    a few huge 'cells' (the kind of output that made the flow check diffuse for thousands of steps)."""
    x = ndi.gaussian_filter(rng.normal(0, 1, shape), 40)
    x = np.clip(x / x.std(), 0, None)
    x = rng.poisson(x * 300 + 20).astype(np.float32)
    return np.clip(x / x.max() * 40000, 0, 65535).astype(np.uint16)


def texture(rng: np.random.Generator, shape=(727, 1026)) -> np.ndarray:
    """An 8 px checkerboard with shot noise, uint16 (Y, X): texture the nuclei model reads as ~9 px cells,
    so an automatic diameter zooms in as far as it goes."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (((yy // 8 + xx // 8) % 2) * 3000 + rng.poisson(100, shape)).astype(np.uint16)


def noise(rng: np.random.Generator, shape=(727, 1026)) -> np.ndarray:
    """Pure camera noise, uint16 (Y, X)."""
    return rng.poisson(100, shape).astype(np.uint16)


def timed(model, img, diameter, clock=time.perf_counter):
    t0 = clock()
    masks = model.eval(img, diameter=diameter)[0]
    dt = clock() - t0
    params = model.last_eval_params
    return dt, int(masks.max()), dict(model.last_timing), params.get("diameter_estimate"), params.get("rescale")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="write the synthetic bacteria frame to this TIFF")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, process CPU time instead of wall time (steadier on a busy machine)")
    args = ap.parse_args()
    clock = time.perf_counter
    if args.cpu_time:
        import torch
        torch.set_num_threads(1)
        clock = time.process_time
    normal = tifffile.imread(NORMAL)
    worst = phase_bacteria(np.random.default_rng(args.seed))
    if args.save:
        tifffile.imwrite(args.save, worst)
    model = models.CellposeModel(pretrained_model="lite")
    model.eval(normal[:256, :256], diameter=30)  # warm-up
    rng = np.random.default_rng(args.seed + 1)
    cases = {"normal (nuclei 768x869)": normal, "phase bacteria 727x1026": worst,
             "dense phase bacteria": phase_bacteria(rng, density=0.7), "large smooth blobs": blobs(rng),
             "8 px checkerboard": texture(rng), "camera noise": noise(rng)}
    for diameter in (None, 30):
        best = {}
        for _ in range(args.repeats):
            for name, img in cases.items():
                res = timed(model, img, diameter, clock)
                if name not in best or res[0] < best[name][0]:
                    best[name] = res
        label = ("automatic diameter" if diameter is None else f"diameter {diameter}") + (
            ", CPU seconds on one thread" if args.cpu_time else ", wall seconds")
        print(f"\n{label} (fastest of {args.repeats}):")
        for name, (dt, n, timing, est, scale) in best.items():
            stages = ", ".join(f"{k} {v:.2f}" for k, v in timing.items() if k != "total")
            est_s = f", estimated diameter {est:.1f} px" if est else ""
            print(f"  {name:28s} {dt:6.2f} s  {n:5d} masks{est_s}  [{stages}]")
        names = list(best)
        ratios = {n: best[n][0] / best[names[0]][0] for n in names[1:]}
        print("  ratio to normal: " + ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()))


if __name__ == "__main__":
    main()
