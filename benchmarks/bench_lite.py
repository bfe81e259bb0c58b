"""Accuracy and speed of the embedded `lite` model.

Prints AP@0.5/0.75/0.9 on ../shared/data/nuclei_2d/val with diameter=None (automatic), the
diameter it estimated per image, and the end-to-end `.eval` time of a 512x512 single-channel image
on this CPU (diameter given). Optionally also on other folders (--extra DIR with NAME.tif +
NAME_masks.tif pairs), e.g. data unlike the training set. No pass/fail: numbers only.

    python benchmarks/bench_lite.py [--model lite] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellpose_web import metrics  # noqa: E402
from cellpose_web.models import CellposeModel  # noqa: E402


def pairs(folder: Path):
    for f in sorted(folder.glob("*.tif")):
        if f.stem.endswith("_masks"):
            continue
        m = f.with_name(f.stem + "_masks.tif")
        if m.exists():
            yield f.name, tifffile.imread(f), tifffile.imread(m)


def evaluate(model, folder: Path, diameter=None):
    rows, trues, preds = [], [], []
    for name, img, lbl in pairs(folder):
        t = time.perf_counter()
        masks = model.eval(img, diameter=diameter)[0]
        dt = time.perf_counter() - t
        ap = metrics.average_precision(lbl, masks)[0]
        rows.append((name, lbl.max(), int(masks.max()), getattr(model, "diam_estimate", None), ap, dt))
        trues.append(lbl)
        preds.append(masks)
    ap_all, tp, fp, fn = metrics.average_precision(trues, preds)
    # pooled AP over all objects: sum tp / (tp + fp + fn)
    pooled = tp.sum(0) / (tp.sum(0) + fp.sum(0) + fn.sum(0))
    return rows, ap_all.mean(0), pooled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="lite")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nuclei_2d" / "val"))
    p.add_argument("--extra", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = CellposeModel(pretrained_model=args.model)
    print(f"model {args.model} on {model.device}, {args.threads} threads")
    for folder in [args.data] + args.extra:
        rows, mean_ap, pooled = evaluate(model, Path(folder))
        print(f"\n{folder}  (diameter=None)")
        print(f"{'image':32s} {'true':>5s} {'pred':>5s} {'diam':>6s} {'AP50':>6s} {'AP75':>6s} {'AP90':>6s} {'sec':>6s}")
        for name, nt, npred, d, ap, dt in rows:
            ds = f"{d:6.1f}" if d else "     -"
            print(f"{name:32s} {nt:5d} {npred:5d} {ds} {ap[0]:6.3f} {ap[1]:6.3f} {ap[2]:6.3f} {dt:6.2f}")
        print(f"mean over images: AP50 {mean_ap[0]:.3f}  AP75 {mean_ap[1]:.3f}  AP90 {mean_ap[2]:.3f}")
        print(f"pooled objects:   AP50 {pooled[0]:.3f}  AP75 {pooled[1]:.3f}  AP90 {pooled[2]:.3f}")

    # speed: 512x512 single channel, diameter given, end to end (network + masks + flow check)
    val = next(pairs(Path(args.data)))[1]
    img = np.zeros((512, 512), np.float32)
    crop = val[:512, :512]
    img[: crop.shape[0], : crop.shape[1]] = crop
    model.eval(img, diameter=30)  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        model.eval(img, diameter=30)
        times.append(time.perf_counter() - t)
    print(f"\n.eval 512x512, diameter=30: median {np.median(times):.3f} s, min {min(times):.3f} s "
          f"(target < 0.5 s on 2 CPU cores)")


if __name__ == "__main__":
    main()
