"""Fine-tuning Cellpose-SAM: ``train_seg`` against Cellpose 4.2.1.1's on the same weights and crops.

    CELLPOSE_REF_PYTHON=/path/to/venv/bin/python python benchmarks/bench_train_sam.py [--nimg 4] [--epochs 1]
    python benchmarks/bench_train_sam.py --device cuda --epochs 4 --nimg 64 --batch 8 --json results.jsonl
    python benchmarks/bench_train_sam.py --device cuda ... --precisions auto float32

The Cellpose-SAM weights cannot be fetched offline, so both packages train a full-size (ViT-L, 305 M
parameters) Cellpose-SAM with the same random weights (seed 0, written once to a temporary file in
the cpsam layout, or ``--weights PATH``, e.g. ``bench_engine.py --make-weights``'s file or the tiny fixture
``tests/fixtures/reference/tiny_cpsam.pth`` for a quick check); the time of a training step does not depend on
the weights' values. Data: the first three images of ``../shared/data/nuclei_2d/train`` (or of the crops in
``tests/fixtures/data/nuclei_2d/train``) with their labels; ``--epochs`` epochs of ``--nimg`` random
``--bsize`` px crops in batches of ``--batch``, AdamW (lr 1e-5, weight decay 0.1, Cellpose 4's defaults),
float32 weights in both (Cellpose 4's CellposeModel would load bfloat16 weights by default;
``use_bfloat16=False`` makes the work the same). Flows of the labels are computed inside the call, as
both packages do.

Ours trains in the precision ``train_seg`` picks by default (``--precisions auto``: bfloat16 autocast for
Cellpose-SAM on CUDA, float32 on a CPU; Cellpose 4 trains in float32 with TF32 matrix products on CUDA);
``--precisions auto float32`` also times ours with ``mixed_precision=False`` (float32 with TF32 on CUDA,
Cellpose 4's arithmetic). Each run reports the last epoch's training loss beside its time, so a precision
that learns differently shows.

Each run is a fresh process on ``--device``, ours - reference - ours (``--repeats 1``: ours - reference); the
faster of ours counts. On a CPU: one torch thread, timed in process CPU seconds (steady on a busy machine),
peak memory the process's ru_maxrss. On CUDA: wall seconds (the device synchronised), peak memory torch's
peak of allocated GPU memory. ``--json FILE`` appends the result as one JSON line (stage ``cpsam_train``).
Prints numbers, no pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import REF_SAM_PATCH, make_full_weights  # noqa: E402  (the same random ViT-L weights)
from benchlib import data_path, write_json  # noqa: E402

DATA = data_path("data/nuclei_2d/train")

CHILD = r"""
import json, sys, time, tempfile, resource
import numpy as np, torch
k = json.loads(sys.argv[1])
dev = torch.device(k["device"])
if k["threads"]:
    torch.set_num_threads(k["threads"])
if k["ours"]:
    sys.path.insert(0, k["root"])
    from cellpose_web import io, models, train
    kw = {"seed": 0, "mixed_precision": {"auto": None, "float32": False, "bfloat16": True}[k["precision"]]}
else:
    exec(k["sam_patch"])
    patch_sam_registry(k["weights"])
    from cellpose import io, models, train
    kw = {}
names = sorted(p for p in __import__("pathlib").Path(k["data"]).glob("*.tif") if not p.name.endswith("_masks.tif"))[:3]
imgs = [io.imread(str(p)) for p in names]
labels = [io.imread(str(p.with_name(p.stem + "_masks.tif"))) for p in names]
model = models.CellposeModel(gpu=dev.type == "cuda", device=dev, pretrained_model=k["weights"], use_bfloat16=False)
cuda = dev.type == "cuda"
if cuda:
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
np.random.seed(0); torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    c0, w0 = time.process_time(), time.perf_counter()
    out = train.train_seg(model.net, train_data=imgs, train_labels=labels, batch_size=k["batch"], n_epochs=k["epochs"],
                    nimg_per_epoch=k["nimg"], bsize=k["bsize"], scale_range=0.5, learning_rate=1e-5, weight_decay=0.1,
                    min_train_masks=1, save_path=tmp, model_name="bench", **kw)
    if cuda:
        torch.cuda.synchronize(dev)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
precision = None
if k["ours"]:
    precision = "bfloat16" if train.training_uses_bf16(model.net, dev, kw["mixed_precision"]) else "float32"
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "final_loss": float(out[1][-1]), "precision": precision, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None}))
"""


def run(py: str, k: dict) -> tuple[dict | None, str | None]:
    """(the child's result, None), or (None, the last line of its error output)."""
    res = subprocess.run([py, "-c", CHILD, json.dumps(k)], capture_output=True, text=True)
    if res.returncode != 0:
        print(("ours" if k["ours"] else "reference") + " failed:\n" + res.stderr[-2000:])
        last = [ln for ln in res.stderr.splitlines() if ln.strip()]
        return None, f"rc={res.returncode}: " + (last[-1].strip()[:300] if last else "no output")
    return json.loads(res.stdout.strip().splitlines()[-1]), None


def describe(r: dict, metric: str) -> str:
    """``12.3 s wall (4.5 CPU s), peak 31.0 GB GPU`` for one run."""
    other = "cpu_s" if metric == "wall_s" else "wall_s"
    mem = f"{r['peak_gpu_gb']:.1f} GB GPU" if r.get("peak_gpu_gb") is not None else f"{r['peak_mb']:.0f} MB"
    prec = f"{r['precision']}, " if r.get("precision") else ""
    return (f"{r[metric]:.1f} {'s wall' if metric == 'wall_s' else 'CPU s'} ({r[other]:.1f} "
            f"{'CPU s' if metric == 'wall_s' else 's wall'}), {prec}peak {mem}, last loss {r['final_loss']:.4f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--nimg", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bsize", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a CPU, torch's on CUDA)")
    ap.add_argument("--weights", default=None, help="Cellpose-SAM checkpoint (default: random ViT-L weights)")
    ap.add_argument("--repeats", type=int, default=2, choices=[1, 2], help="runs of ours (around the reference)")
    ap.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                    help="ours in these precisions (the first is the one compared with the reference)")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    metric = "wall_s" if cuda else "cpu_s"
    ref_py = os.environ.get("CELLPOSE_REF_PYTHON") or "/work/venvs/cp4/bin/python"
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            weights = str(Path(tmp) / "cpsam_random.pth")
            make_full_weights(weights)
        k = {"root": str(ROOT), "data": str(DATA), "weights": weights, "epochs": args.epochs, "nimg": args.nimg,
             "batch": args.batch, "bsize": args.bsize, "device": args.device, "threads": threads,
             "sam_patch": REF_SAM_PATCH, "precision": args.precisions[0]}
        print(f"Cellpose-SAM ({Path(weights).name}), 3 images of {DATA}, {args.epochs} epoch(s) x {args.nimg} crops "
              f"of {args.bsize} px, batch {args.batch}, float32 weights, {args.device}, threads {threads or 'default'}")
        ours = [run(sys.executable, {**k, "ours": True})]
        ref, ref_err = run(ref_py, {**k, "ours": False}) if Path(ref_py).exists() else \
            (None, f"no reference python ({ref_py}; set CELLPOSE_REF_PYTHON)")
        if args.repeats == 2:
            ours.append(run(sys.executable, {**k, "ours": True}))
        others = {p: run(sys.executable, {**k, "ours": True, "precision": p})[0] for p in args.precisions[1:]}
    good = [o for o, _ in ours if o]
    best = min(good, key=lambda o: o[metric]) if good else None
    if best:
        print(f"  ours:      {describe(best, metric)}; runs: " + ", ".join(f"{o[metric]:.1f}" for o in good))
    for p, o in others.items():
        print(f"  ours, {p}: " + (describe(o, metric) if o else "failed"))
    if ref:
        print(f"  Cellpose {ref_py}: {describe(ref, metric)}")
    if best and ref:
        print(f"  ours / reference: {best[metric] / ref[metric]:.2f}x")
    elif not ref:
        print(f"  (no reference: {ref_err})")
    write_json(args.json, "cpsam_train", device=args.device, weights=Path(weights).name, epochs=args.epochs,
               nimg=args.nimg, batch=args.batch, bsize=args.bsize, metric=metric, ours=best, ref=ref,
               ours_error=None if best else ours[0][1], ref_error=ref_err, ours_other=others)


if __name__ == "__main__":
    main()
