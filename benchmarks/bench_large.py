"""Large images with `lite`: time and peak memory at 1024², 2048² and 4096².

    python benchmarks/bench_large.py [--sizes 1024 2048 4096] [--threads N]

The image is one synthetic 1024 x 1024 nuclei field (``cellpose_web.engine.synthetic``, about 400 nuclei of
34 px) mirrored into a larger mosaic, 16-bit, so every size holds the same kind of content. Each size
runs in a fresh process (``CellposeModel('lite').eval(img, diameter=30)``, flow check on) that reports
its wall time, the eval's stage timings and its peak resident memory (ru_maxrss, the whole process:
Python, torch, the model and the image). The 1024² run is repeated after the large ones, so that a
busy machine shows up as a spread, and the ratios use the faster 1024² run. It also prints the CPU time of
the eval (all threads; ``--threads 1`` runs torch on one thread), whose ratios stay meaningful on a
machine that other jobs are using. Prints numbers, no pass/fail.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
from cellpose_web import models
from cellpose_web.engine import synthetic
size = int(sys.argv[2])
if int(sys.argv[3]) > 0:
    torch.set_num_threads(int(sys.argv[3]))
rng = np.random.default_rng(2)
base = synthetic.synthetic_sample(rng, shape=(1024, 1024), style="nuclei", diameter=34.0).image[0]
reps = max(1, size // 1024)
rows = []
for i in range(reps):
    rows.append(np.concatenate([base[:: (-1 if i % 2 else 1), :: (-1 if j % 2 else 1)] for j in range(reps)], 1))
img = np.concatenate(rows, 0)[:size, :size]
img = (img / img.max() * 60000).astype(np.uint16)
del rows, base
m = models.CellposeModel(pretrained_model="lite")
progress = []
t0 = time.perf_counter()
c0 = time.process_time()
masks, flows, _ = m.eval(img, diameter=30, progress=lambda f, msg="": progress.append((time.perf_counter() - t0, f)))
dt = time.perf_counter() - t0
cpu = time.process_time() - c0
print(json.dumps({"size": size, "seconds": dt, "cpu": cpu, "masks": int(masks.max()), "timing": m.last_timing,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "progress_calls": len(progress)}))
"""


def run(size: int, threads: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(size), str(threads)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"size {size} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    order = list(args.sizes) + ([1024] if 1024 in args.sizes and len(args.sizes) > 1 else [])
    results = {}
    for size in order:
        r = run(size, args.threads)
        t = r["timing"]
        print(f"{size:5d}^2: {r['seconds']:7.1f} s (network {t['network']:.1f} s, masks {t['masks']:.1f} s), "
              f"CPU {r['cpu']:.1f} s, {r['masks']} masks, peak {r['peak_mb']:.0f} MB, "
              f"{r['progress_calls']} progress calls", flush=True)
        if size not in results or r["seconds"] < results[size]["seconds"]:
            results[size] = r
    if 1024 in results:
        base = results[1024]
        for size, r in sorted(results.items()):
            print(f"{size:5d}^2 / 1024^2: time x{r['seconds'] / base['seconds']:.1f} (CPU x{r['cpu'] / base['cpu']:.1f}) "
                  f"for x{(size / 1024) ** 2:.0f} pixels, peak {r['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
