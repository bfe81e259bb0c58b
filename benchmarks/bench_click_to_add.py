"""Click to add a cell: how often one click on a missed nucleus gives the right mask.

For each image of a folder (NAME.tif + NAME_masks.tif) the model segments it (diameter=None); a
ground-truth nucleus the model got wrong (no predicted mask with IoU >= 0.5) is *missed* when its
middle (the pixel farthest from its edge, where a person clicks) is background in the prediction, and
*covered* when a wrong predicted mask (merged with a neighbour, or a piece) covers it there (that
needs delete + redraw, not click to add). For
each miss one click at its middle goes through ``edit.MaskEditor.add_from_flows`` with the network's
flows and cell probability, and the added cell is compared with the ground truth. Printed: the
number of misses, the fraction added with IoU >= 0.7 (and >= 0.5), the median IoU and the time per
click.

Because a good model misses few nuclei, the same is also measured on *removed* cells: every nucleus
the model did find is deleted from the masks and re-added with one click (IoU against the ground
truth). No pass/fail: numbers only.

    python benchmarks/bench_click_to_add.py [--dir ../shared/data/nuclei_2d/val] [--model lite]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellpose_web.engine import edit  # noqa: E402
from cellpose_web.errors import CellposeWebError  # noqa: E402
from cellpose_web.models import CellposeModel  # noqa: E402


def middle(obj: np.ndarray) -> tuple[int, int]:
    """The pixel of bool `obj` (Y, X) farthest from its edge (where a person clicks)."""
    d = ndi.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(y), int(x)


def click_iou(masks, dP, cellprob, truth, kw) -> tuple[float, float]:
    """(IoU of the one-click cell with bool `truth`, seconds); IoU 0 when no cell was added."""
    ed = edit.MaskEditor(masks)
    y, x = middle(truth)
    t = time.perf_counter()
    try:
        ch = ed.add_from_flows(dP, cellprob, y, x, **kw)
    except CellposeWebError:
        return 0.0, time.perf_counter() - t
    dt = time.perf_counter() - t
    got = ed.masks == ch.label
    return float((got & truth).sum() / (got | truth).sum()), dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(REPO.parent / "shared/data/nuclei_2d/val"))
    ap.add_argument("--model", default="lite")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-removed", type=int, default=60, help="removed cells tried per image")
    ap.add_argument("--cellprob-threshold", type=float, default=None)
    ap.add_argument("--sink-radius", type=float, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {k: v for k, v in (("cellprob_threshold", args.cellprob_threshold), ("sink_radius", args.sink_radius))
          if v is not None}
    model = CellposeModel(pretrained_model=args.model)
    missed, removed, times = [], [], []
    rng = np.random.default_rng(0)
    for f in sorted(Path(args.dir).glob("*.tif")):
        mf = f.with_name(f.stem + "_masks.tif")
        if f.stem.endswith("_masks") or not mf.exists():
            continue
        img, gt = tifffile.imread(f), tifffile.imread(mf)
        masks, flows, _ = model.eval(img, diameter=None)
        dP, cellprob = flows[1], flows[2]
        n_miss = n_merged = 0
        labels = np.unique(gt[gt > 0])
        best_pred = {}
        for lab in labels:
            truth = gt == lab
            hit = masks[truth]
            hit = hit[hit > 0]
            if hit.size:
                p = int(np.bincount(hit).argmax())
                pm = masks == p
                i = (pm & truth).sum() / (pm | truth).sum()
            else:
                p, i = 0, 0.0
            if i < 0.5 and masks[middle(truth)] > 0:
                n_merged += 1
            elif i < 0.5:
                n_miss += 1
                v, dt = click_iou(masks, dP, cellprob, truth, kw)
                missed.append(v)
                times.append(dt)
            else:
                best_pred[int(lab)] = p
        found = list(best_pred.items())
        for lab, p in (rng.permutation(found)[:args.max_removed] if found else []):
            truth = gt == lab
            m2 = np.where(masks == p, 0, masks).astype(masks.dtype)
            v, dt = click_iou(m2, dP, cellprob, truth, kw)
            removed.append(v)
            times.append(dt)
        print(f"{f.name}: {len(labels)} nuclei; {args.model} missed {n_miss}, covered {n_merged} with a wrong mask")
    for name, v in (("missed", missed), ("removed and re-added", removed)):
        v = np.asarray(v)
        if len(v):
            print(f"{name}: {len(v)} nuclei, one click gives IoU >= 0.7 for {np.mean(v >= 0.7):.0%} "
                  f"({int((v >= 0.7).sum())}/{len(v)}), >= 0.5 for {np.mean(v >= 0.5):.0%}, median IoU {np.median(v):.2f}")
    print(f"time per click: median {np.median(times) * 1000:.0f} ms, max {np.max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
