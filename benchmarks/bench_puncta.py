"""Puncta per whole cell with *predicted* masks: how many planted PIEZO1 spots each cell gets back.

Each sample is ``synthetic.puncta_sample`` (whole cells touching along irregular borders, the
cytoplasm fading over the cell's outer ~8 px as on TIRF images, spots anywhere on the footprint,
0.1 µm/px; channel 0 = puncta, 1 = cytoplasm, 2 = nuclei). The model segments channels 1, 2 (the
README's recipe); the spots are detected on channel 0 and counted per cell for each nearest-cell
distance (``PunctaParams.max_distance_um``). Printed per distance, over all samples: the share of
the spots planted in cells that are counted in cells, of matched cells (IoU >= 0.5 with a true
cell) the share with exactly the planted count, the mean absolute error and the bias of the count
per cell, and how many spots planted on the background were given to a cell. The same numbers on
the true outlines show what the detector itself loses. No pass/fail: numbers only.

    python benchmarks/bench_puncta.py [--model cp_cyto] [--seeds 6] [--cellprob 0] [--distances 0 0.1 0.2 0.3 0.4 0.5 0.6 0.8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellpose_web import measure, models  # noqa: E402
from cellpose_web.engine import metrics, synthetic


def count_scores(sample: synthetic.PunctaSample, masks: np.ndarray, distance_um: float) -> dict[str, float]:
    """Per-cell count errors of one image for one nearest-cell distance."""
    params = measure.PunctaParams(channel=0, max_distance_um=distance_um)
    table, spots = measure.measure_cells(masks, sample.image, sample.pixel_size_um, channel_axis=0, puncta=params)
    planted = sample.counts_per_cell()
    iou, match = metrics.mask_ious(sample.labels, masks)
    ok = iou >= 0.5
    counts = dict(zip(table["label"].to_numpy(), table["puncta_count"].to_numpy()))
    got = np.array([counts.get(p, 0) for p in match[ok]], np.int64)
    want = planted[1:][ok]
    true_lab = sample.labels[np.clip(np.round(spots["y_px"]).astype(int), 0, masks.shape[0] - 1),
                             np.clip(np.round(spots["x_px"]).astype(int), 0, masks.shape[1] - 1)]
    return {"planted_in": float(planted[1:].sum()), "counted_in": float((spots["label"] > 0).sum()),
            "exact": float((got == want).sum()), "abs_err": float(np.abs(got - want).sum()),
            "err": float((got - want).sum()), "matched": float(ok.sum()),
            "bg_given": float(((spots["label"] > 0) & (true_lab == 0)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cp_cyto")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--cellprob", type=float, default=0.0, help="cellprob_threshold (higher = tighter masks)")
    ap.add_argument("--distances", type=float, nargs="+", default=[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
    a = ap.parse_args()
    model = models.CellposeModel(pretrained_model=a.model)
    samples, predicted, aps, ious = [], [], [], []
    t0 = time.perf_counter()
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        s = synthetic.puncta_sample(np.random.default_rng(seed))
        masks, _, _ = model.eval(s.image[[1, 2]], channel_axis=0, diameter=None,
                                  cellprob_threshold=a.cellprob)
        samples.append(s)
        predicted.append(np.asarray(masks))
        aps.append(metrics.average_precision(s.labels, masks, threshold=[0.5])[0][0])
        iou, _ = metrics.mask_ious(s.labels, masks)
        ious.append(iou[iou >= 0.5])
    print(f"{a.model}: {a.seeds} images, {sum(int(s.labels.max()) for s in samples)} cells, "
          f"{sum(len(s.spots) for s in samples)} spots; AP@0.5 {np.mean(aps):.3f}, mean matched IoU "
          f"{np.concatenate(ious).mean():.3f}; segmentation {time.perf_counter() - t0:.0f} s")
    print(f"{'masks':>9} {'dist µm':>7} {'in cells':>9} {'exact':>6} {'MAE':>5} {'bias':>6} {'bg->cell':>8}")
    for label, sets in (("predicted", predicted), ("true", [s.labels for s in samples])):
        for d in a.distances:
            tot: dict[str, float] = {}
            for s, m in zip(samples, sets):
                for k, v in count_scores(s, m, d).items():
                    tot[k] = tot.get(k, 0.0) + v
            print(f"{label:>9} {d:7.2f} {tot['counted_in'] / tot['planted_in']:9.3f} "
                  f"{tot['exact'] / tot['matched']:6.3f} {tot['abs_err'] / tot['matched']:5.2f} "
                  f"{tot['err'] / tot['matched']:+6.2f} {int(tot['bg_given']):8d}")


if __name__ == "__main__":
    main()
