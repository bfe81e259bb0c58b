"""Time cellpose_web.dynamics on a 1024 x 1024 image with about 400 touching cells.

    python benchmarks/bench_dynamics.py [--kind lite|voronoi] [--size 1024] [--cells 400] [--repeats 3]
                                        [--device cpu|cuda] [--device-path]

``--kind lite`` (default): a synthetic 1024 x 1024 nuclei image with about 400 nuclei
(``cellpose_web.engine.synthetic``, seed 2, 34 px) goes through the built-in ``lite`` network once; its flows
and cell probability are real network outputs (noisy as a network's are), and its true labels are the
input of ``masks_to_flows``. ``--kind voronoi``: touching Voronoi cells (about 5% dropped to background)
with noise-free flows dP = 5 * masks_to_flows(labels) and cellprob +4 inside / -4 outside.
Times ``masks_to_flows`` and ``compute_masks`` (default settings, flow check on) and prints seconds.

If the environment variable CELLPOSE_REF_PYTHON names a Python interpreter that has the reference
``cellpose`` package (4.2.1.1) installed, the same input is run there in a subprocess
(``masks_to_flows_gpu`` and ``resize_and_compute_masks`` on the same ``--device``: cpu, or cuda on a GPU
machine, where timers are synchronised and one warm-up run is dropped) and the ratios ours / reference
are printed, with a check that both give the same masks (and AP@0.5 / the smallest matched IoU when they
differ). Ours runs before and after the reference and the faster run counts, so that a busy machine
shows up as a spread. No pass/fail: this only reports numbers. ``--json FILE`` appends the result
(stage ``dynamics``: the fastest seconds of each step, ours and the reference's, whether the masks agree)
as one JSON line for ``gpu_table.py``.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cellpose_web.engine import dynamics, metrics  # noqa: E402
from benchlib import write_json  # noqa: E402

REF_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from cellpose import dynamics
d = np.load(sys.argv[1])
reps = int(sys.argv[2])
dev = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
t_flows, t_masks = [], []
for _ in range(reps + (dev.type == "cuda")):  # on a GPU the first run is a warm-up
    sync(); t0 = time.perf_counter(); dynamics.masks_to_flows_gpu(d["labels"], device=dev); sync()
    t_flows.append(time.perf_counter() - t0)
for _ in range(reps + (dev.type == "cuda")):
    sync(); t0 = time.perf_counter()
    m = dynamics.resize_and_compute_masks(d["dP"], d["cellprob"], niter=200, cellprob_threshold=0.0,
                                          flow_threshold=0.4, min_size=15, max_size_fraction=0.4, device=dev)
    sync(); t_masks.append(time.perf_counter() - t0)
if dev.type == "cuda":
    t_flows, t_masks = t_flows[1:], t_masks[1:]
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


def lite_outputs(size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, dP, cellprob) of a synthetic nuclei image and lite's network outputs for it."""
    from cellpose_web import models
    from cellpose_web.engine import synthetic

    sample = synthetic.synthetic_sample(np.random.default_rng(2), shape=(size, size), style="nuclei", diameter=34.0)
    _, flows, _ = models.CellposeModel(pretrained_model="lite").eval(sample.image[0], diameter=30,
                                                                      compute_masks=False)
    return sample.labels.astype(np.uint16), flows[1].astype(np.float32), flows[2].astype(np.float32)


def timeit(fn, repeats: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Wall seconds of `repeats` calls (GPU work synchronised; on a GPU one warm-up call first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def agreement(ref_masks: np.ndarray, masks: np.ndarray) -> dict:
    """Whether ``masks`` equal ``ref_masks``; when not, AP@0.5 against them and the smallest matched IoU."""
    same = ref_masks.shape == masks.shape and bool(np.array_equal(ref_masks, masks))
    out = {"identical": same, "n_ours": int(masks.max()), "n_ref": int(ref_masks.max()), "ap50": 1.0 if same else None}
    if not same and ref_masks.max() > 0 and ref_masks.shape == masks.shape:
        out["ap50"] = float(metrics.average_precision(ref_masks, masks, threshold=[0.5])[0][0])
        iou, preds = metrics.mask_ious(ref_masks, masks)
        out["min_iou"] = float(iou[preds > 0].min()) if (preds > 0).any() else 0.0
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["lite", "voronoi"], default="lite")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: ours and the reference on this device")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--device-path", action="store_true",
                    help="ours through the device implementation (what CUDA runs) even on the CPU")
    args = ap.parse_args(argv)
    if args.device_path:
        from cellpose_web.engine.dynamics import device_setup
        device_setup.DEVICE_PATH_ON_CPU = True
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.kind == "lite":
        labels, dP, cellprob = lite_outputs(args.size)
    else:
        labels = voronoi_labels(args.size, args.cells)
        dP = (5 * dynamics.masks_to_flows(labels)).astype(np.float32)
        cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    from cellpose_web.engine.dynamics.device_setup import uses_device_path
    print(f"{args.kind}: image {labels.shape}, {labels.max()} cells, {torch.get_num_threads()} torch threads, "
          f"device {device}, {'device' if uses_device_path(device) else 'host'} path")

    def run_ours() -> dict:
        return {"masks_to_flows": timeit(lambda: dynamics.masks_to_flows(labels, device=device), args.repeats, device),
                "compute_masks": timeit(lambda: dynamics.compute_masks(dP, cellprob, device=device), args.repeats,
                                        device)}

    ours = run_ours()
    masks = dynamics.compute_masks(dP, cellprob, device=device)
    print(f"ours  masks found: {masks.max()}")

    record = dict(kind=args.kind, size=args.size, cells=int(labels.max()), device=args.device, n_masks=int(masks.max()))
    ref_py = os.environ.get("CELLPOSE_REF_PYTHON")
    if not ref_py:
        for k, v in ours.items():
            print(f"ours  {k:15s} min {min(v):7.3f} s  median {np.median(v):7.3f} s  ({len(v)} runs)")
        print("set CELLPOSE_REF_PYTHON=/path/to/python (with cellpose 4.2.1.1) to compare with the reference")
        write_json(args.json, "dynamics", **record, ours={k: min(v) for k, v in ours.items()}, ref=None,
                   ref_error="no reference python (CELLPOSE_REF_PYTHON)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "input.npz"
        np.savez(inp, labels=labels, dP=dP, cellprob=cellprob)
        out_masks = Path(tmp) / "ref_masks.npy"
        res = subprocess.run(
            [ref_py, "-c", REF_SCRIPT, str(inp), str(args.ref_repeats), str(args.threads), str(out_masks), args.device],
            capture_output=True, text=True,
        )
        if res.returncode != 0:
            print("reference run failed:\n" + res.stderr[-2000:])
            write_json(args.json, "dynamics", **record, ours={k: min(v) for k, v in ours.items()}, ref=None,
                       ref_error="reference run failed: " + " ".join(res.stderr.split()[-30:]))
            return
        ref = json.loads(res.stdout.strip().splitlines()[-1])
        ref_masks = np.load(out_masks)
    again = run_ours()  # after the reference: the faster of the two runs counts
    for k in ours:
        ours[k] = ours[k] + again[k]
        print(f"ours  {k:15s} min {min(ours[k]):7.3f} s  median {np.median(ours[k]):7.3f} s  ({len(ours[k])} runs)")
    for k in ours:
        r = min(ref[k])
        print(f"ref   {k:15s} min {r:7.3f} s   ours/ref = {min(ours[k]) / r:.3f}")
    agree = agreement(ref_masks, masks)
    print(f"masks identical to the reference: {agree['identical']} (ours {masks.max()}, reference {ref_masks.max()} "
          "masks)")
    if not agree["identical"] and "min_iou" in agree:
        print(f"AP@0.5 vs reference {agree['ap50']:.4f}, smallest matched IoU {agree['min_iou']:.4f}")
    write_json(args.json, "dynamics", **record, ours={k: min(v) for k, v in ours.items()},
               ref={k: min(v) for k, v in ref.items()}, **agree)

if __name__ == "__main__":
    main()
