"""Fine-tuning Cellpose-SAM: ``train_seg`` against Cellpose 4.2.1.1's on the same weights and crops.

    CELLPOSE_REF_PYTHON=/path/to/venv/bin/python python benchmarks/bench_train_sam.py [--nimg 4] [--epochs 1]

The Cellpose-SAM weights cannot be fetched offline, so both packages train a full-size (ViT-L, 305 M
parameters) Cellpose-SAM with the same random weights (seed 0, written once to a temporary file in
the cpsam layout); the time of a training step does not depend on the weights' values. Data: the
first three images of ``../shared/data/nuclei_2d/train`` with their labels; ``--epochs`` epochs of
``--nimg`` random 256 px crops, batch size 1, AdamW (lr 1e-5, weight decay 0.1, Cellpose 4's
defaults), float32 weights in both (Cellpose 4's CellposeModel would load bfloat16 weights by default;
``use_bfloat16=False`` makes the work the same). Flows of the labels are computed inside the call, as
both packages do.

Each run is a fresh process with one torch thread, timed in process CPU seconds (steady on a busy
machine), ours - reference - ours; the faster of ours counts. Peak memory is the process's ru_maxrss. Prints numbers, no pass/fail.
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

from bench_engine import make_full_weights  # noqa: E402  (the same random ViT-L weights as bench_engine)
DATA = ROOT.parent / "shared" / "data" / "nuclei_2d" / "train"

CHILD = r"""
import json, sys, time, tempfile
import numpy as np, torch
torch.set_num_threads(1)
k = json.loads(sys.argv[1])
if k["ours"]:
    sys.path.insert(0, k["root"])
    from cellpose_web import io, models, train
    kw = {"seed": 0}
else:
    from cellpose import io, models, train
    kw = {}
names = sorted(p for p in __import__("pathlib").Path(k["data"]).glob("*.tif") if not p.name.endswith("_masks.tif"))[:3]
imgs = [io.imread(str(p)) for p in names]
labels = [io.imread(str(p.with_name(p.stem + "_masks.tif"))) for p in names]
model = models.CellposeModel(pretrained_model=k["weights"], use_bfloat16=False)
np.random.seed(0); torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    c0, w0 = time.process_time(), time.perf_counter()
    train.train_seg(model.net, train_data=imgs, train_labels=labels, batch_size=1, n_epochs=k["epochs"],
                    nimg_per_epoch=k["nimg"], bsize=256, scale_range=0.5, learning_rate=1e-5, weight_decay=0.1,
                    min_train_masks=1, save_path=tmp, model_name="bench", **kw)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
import resource
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(py: str, k: dict) -> dict | None:
    res = subprocess.run([py, "-c", CHILD, json.dumps(k)], capture_output=True, text=True)
    if res.returncode != 0:
        print(("ours" if k["ours"] else "reference") + " failed:\n" + res.stderr[-2000:])
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--nimg", type=int, default=4)
    args = ap.parse_args()
    ref_py = os.environ.get("CELLPOSE_REF_PYTHON", "/work/venvs/cp4/bin/python")
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "cpsam_random.pth")
        make_full_weights(weights)
        k = {"root": str(ROOT), "data": str(DATA), "weights": weights, "epochs": args.epochs, "nimg": args.nimg}
        print(f"Cellpose-SAM (ViT-L, random weights), 3 images, {args.epochs} epoch(s) x {args.nimg} crops of 256 px, "
              "batch 1, float32, one thread")
        ours = [run(sys.executable, {**k, "ours": True})]
        ref = run(ref_py, {**k, "ours": False}) if Path(ref_py).exists() else None
        ours.append(run(sys.executable, {**k, "ours": True}))
    good = [o for o in ours if o]
    if not good:
        return
    best = min(good, key=lambda o: o["cpu_s"])
    print(f"  ours:      {best['cpu_s']:.1f} CPU s ({best['wall_s']:.1f} s wall, peak {best['peak_mb']:.0f} MB; runs: "
          + ", ".join(f"{o['cpu_s']:.1f}" for o in good) + ")")
    if ref:
        print(f"  Cellpose {ref_py}: {ref['cpu_s']:.1f} CPU s ({ref['wall_s']:.1f} s wall, peak {ref['peak_mb']:.0f} MB)")
        print(f"  ours / reference: {best['cpu_s'] / ref['cpu_s']:.2f}x")
    else:
        print("  (no reference: set CELLPOSE_REF_PYTHON to a Python with cellpose==4.2.1.1)")


if __name__ == "__main__":
    main()
