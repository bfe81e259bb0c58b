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

from cellpose_web.engine import metrics  # noqa: E402
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


def synthetic_check(model, seed=12345, n_per=4):
    """Held-out synthetic images (a seed never used in training): AP@0.5 and diameter estimate per style/size."""
    from cellpose_web.engine.synthetic import STYLES, synthetic_sample

    rng = np.random.default_rng(seed)
    print(f"\nsynthetic held-out (seed {seed}), diameter=None: AP50 / AP75 and estimated vs true diameter")
    for d in (12, 25, 50, 90):
        aps, ests = [], []
        for style in STYLES:
            for _ in range(max(1, n_per // 2)):
                side = int(min(768, max(256, 8 * d)))
                smp = synthetic_sample(rng, (side, side), style=style, diameter=d)
                img = np.moveaxis(smp.image, 0, -1) if smp.image.shape[0] > 1 else smp.image[0]
                masks = model.eval(img, diameter=None, channel_axis=-1 if img.ndim == 3 else None)[0]
                aps.append(metrics.average_precision(smp.labels, masks)[0][:2])
                ests.append(getattr(model, "diam_estimate", None) or np.nan)
        aps = np.array(aps)
        print(f"  objects ~{d:3d} px: AP50 {np.nanmean(aps[:, 0]):.3f}  AP75 {np.nanmean(aps[:, 1]):.3f}  "
              f"estimated diameter median {np.nanmedian(ests):.1f} px")


def perturbed_check(model, folder: Path, seed=0):
    """The validation images changed the way other microscopes and labs change them, diameter=None.

    zoom 0.5x / 2x (nuclei of ~15 / ~60 px, labels zoomed by nearest neighbour), inverted contrast
    (as in phase or brightfield), strong shot noise, blur, dim 8-bit with a background gradient.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.transform import rescale as sk_rescale

    rng = np.random.default_rng(seed)

    def zoom(img, lbl, f):
        return (sk_rescale(img.astype(np.float32), f, order=1, preserve_range=True, anti_aliasing=f < 1),
                sk_rescale(lbl, f, order=0, preserve_range=True, anti_aliasing=False).astype(lbl.dtype))

    def dim_gradient(img):
        x = img.astype(np.float32)
        x = (x - x.min()) / max(1e-6, np.ptp(x))
        ramp = np.linspace(0, 1, x.shape[1])[None, :]
        return np.clip(12 + 25 * x + 20 * ramp + rng.normal(0, 2, x.shape), 0, 255).astype(np.uint8)

    def shot_noise(img):
        """Poisson noise as if the brightest nuclei (99th percentile) collected only ~20 photons."""
        photons_per_unit = 1 / max(1.0, float(np.percentile(img, 99)) / 20)
        return rng.poisson(np.maximum(img.astype(np.float32), 0) * photons_per_unit).astype(np.float32)

    changes = {
        "zoom 0.5x": lambda im, lb: zoom(im, lb, 0.5),
        "zoom 2x": lambda im, lb: zoom(im, lb, 2.0),
        "inverted": lambda im, lb: (im.max() - im.astype(np.float32), lb),
        "noise": lambda im, lb: (shot_noise(im), lb),
        "blur 2px": lambda im, lb: (gaussian_filter(im.astype(np.float32), 2), lb),
        "dim 8-bit + gradient": lambda im, lb: (dim_gradient(im), lb),
    }
    print("\nvalidation images, changed (diameter=None): mean AP50 / AP75 over images")
    data = [(img, lbl) for _, img, lbl in pairs(folder)]
    for name, change in changes.items():
        aps = []
        for img, lbl in data:
            im2, lb2 = change(img, lbl)
            aps.append(metrics.average_precision(lb2, model.eval(im2, diameter=None)[0])[0])
        aps = np.array(aps).mean(0)
        print(f"  {name:22s} AP50 {aps[0]:.3f}  AP75 {aps[1]:.3f}")


def cells3d_check(model, data_root: Path):
    """Planes of the Allen cells3d nuclei stack (another microscope; labels machine-made)."""
    f = data_root / "nuclei_3d" / "cells3d_nuclei.tif"
    if not f.exists():
        return
    stack, lab = tifffile.imread(f), tifffile.imread(f.with_name("cells3d_nuclei_masks.tif"))
    aps = []
    for z in (20, 30, 40):
        masks = model.eval(stack[z], diameter=None)[0]
        aps.append(metrics.average_precision(lab[z], masks)[0])
    aps = np.array(aps).mean(0)
    print(f"\ncells3d nuclei planes 20/30/40 (different microscope; machine-made labels): "
          f"AP50 {aps[0]:.3f}  AP75 {aps[1]:.3f}")


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

    perturbed_check(model, Path(args.data))
    synthetic_check(model)
    cells3d_check(model, Path(args.data).parents[1])

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
