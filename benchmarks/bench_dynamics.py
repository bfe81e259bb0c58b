"""Time cellpose_web.dynamics on a 1024 x 1024 image with about 400 touching cells.

    python benchmarks/bench_dynamics.py [--size 1024] [--cells 400] [--repeats 3] [--threads 2]

Builds a Voronoi label image (random seeds, about 5% of the cells dropped to background), flows
dP = 5 * masks_to_flows(labels) and cellprob logits (+4 inside, -4 outside), then times
``masks_to_flows`` and ``compute_masks`` (default settings, flow check on) and prints seconds.

If the environment variable CELLPOSE_REF_PYTHON names a Python interpreter that has the reference
``cellpose`` package (4.2.1.1) installed, the same input is run there in a subprocess
(``masks_to_flows_gpu`` and ``resize_and_compute_masks`` on the CPU) and the ratios ours / reference
are printed, with a check that both give the same masks. No pass/fail: this only reports numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellpose_web import dynamics  # noqa: E402

REF_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from cellpose import dynamics
d = np.load(sys.argv[1])
reps = int(sys.argv[2])
cpu = torch.device("cpu")
t_flows, t_masks = [], []
for _ in range(reps):
    t0 = time.perf_counter(); dynamics.masks_to_flows_gpu(d["labels"], device=cpu); t_flows.append(time.perf_counter() - t0)
for _ in range(reps):
    t0 = time.perf_counter()
    m = dynamics.resize_and_compute_masks(d["dP"], d["cellprob"], niter=200, cellprob_threshold=0.0,
                                          flow_threshold=0.4, min_size=15, max_size_fraction=0.4, device=cpu)
    t_masks.append(time.perf_counter() - t0)
np.save(sys.argv[4], m)
print(json.dumps({"masks_to_flows": t_flows, "compute_masks": t_masks}))
"""


def voronoi_labels(size: int = 1024, ncells: int = 400, seed: int = 0) -> np.ndarray:
    """Touching Voronoi cells (uint16 (size, size)), about 5% of them removed to give background."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, size, size=(ncells, 2)).astype(int)
    seeds = np.zeros((size, size), np.int32)
    seeds[pts[:, 0], pts[:, 1]] = np.arange(1, ncells + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[iy, ix]
    drop = rng.random(ncells + 1) < 0.05
    drop[0] = False
    lab[drop[lab]] = 0
    # consecutive labels (Cellpose's masks_to_flows_gpu needs 1..N)
    _, inv = np.unique(lab, return_inverse=True)
    return inv.reshape(lab.shape).astype(np.uint16)


def timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    labels = voronoi_labels(args.size, args.cells)
    flows = dynamics.masks_to_flows(labels)
    dP = (5 * flows).astype(np.float32)
    cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    print(f"image {labels.shape}, {labels.max()} cells, {torch.get_num_threads()} torch threads")

    ours = {
        "masks_to_flows": timeit(lambda: dynamics.masks_to_flows(labels), args.repeats),
        "compute_masks": timeit(lambda: dynamics.compute_masks(dP, cellprob), args.repeats),
    }
    masks = dynamics.compute_masks(dP, cellprob)
    for k, v in ours.items():
        print(f"ours  {k:15s} min {min(v):7.3f} s  median {np.median(v):7.3f} s  ({len(v)} runs)")
    print(f"ours  masks found: {masks.max()}")

    ref_py = os.environ.get("CELLPOSE_REF_PYTHON")
    if not ref_py:
        print("set CELLPOSE_REF_PYTHON=/path/to/python (with cellpose 4.2.1.1) to compare with the reference")
        return
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "input.npz"
        np.savez(inp, labels=labels, dP=dP, cellprob=cellprob)
        out_masks = Path(tmp) / "ref_masks.npy"
        res = subprocess.run(
            [ref_py, "-c", REF_SCRIPT, str(inp), str(args.ref_repeats), str(args.threads), str(out_masks)],
            capture_output=True, text=True,
        )
        if res.returncode != 0:
            print("reference run failed:\n" + res.stderr[-2000:])
            return
        ref = json.loads(res.stdout.strip().splitlines()[-1])
        ref_masks = np.load(out_masks)
    for k in ours:
        r = min(ref[k])
        print(f"ref   {k:15s} min {r:7.3f} s   ours/ref = {min(ours[k]) / r:.3f}")
    same = ref_masks.shape == masks.shape and np.array_equal(ref_masks, masks)
    print(f"masks identical to the reference: {same} (ours {masks.max()}, reference {ref_masks.max()} masks)")


if __name__ == "__main__":
    main()
