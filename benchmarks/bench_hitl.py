"""Human-in-the-loop: how fast the loop pays off (issue 20), against Cellpose 2.0's 100-200 cells.

A simulated person works through images with ``workflows.hitl`` exactly as the browser and the
command line do: each image arrives segmented by the project's current model, the person's
correction is the image's true labels, a round fine-tunes from the current model (the round
defaults of the base model's family on this machine), and the round's model is kept only when it
beats the previous one on the project's held-out corrected images. After 0, 1, 2, 4 and 8 corrected
images the current model is scored on further labelled images the loop never sees.

The reference: the base model fine-tuned once on all the training images with the same recipe
(learning rate, weight decay, crops, batch) and ``--ref_factor`` times the round's epochs, no time
limit. The script reports where the loop's curve reaches 90 % of the reference's AP@0.5, and how
many corrected cells that took (Cellpose 2.0: 100-200 corrected cells bring a pretrained model
close to one trained on its whole data set; Pachitariu & Stringer, Nature Methods 2022).

Cases:
  whole_cell  ``synthetic.whole_cell_sample`` (256 px, diameters 25-45 px): whole cells with a dim
              cytoplasm around a bright nucleus, where ``lite`` (trained on nuclei) finds the nuclei
              only. The person's images are the first ``--n_pool``; the reference trains on
              ``--n_ref`` images (the person's and more); ``--n_test`` further images score.
  nuclei      ``../shared/data/nuclei_2d``: the person's images are ``--n_pool`` images of ``train``
              (shuffled with --seed), the reference trains on all of ``train`` and ``val`` scores
              (the data's rules: train only on train).

    python benchmarks/bench_hitl.py --case whole_cell --model lite
    python benchmarks/bench_hitl.py --case nuclei --model cp_cyto --n_pool 8

The CPU may be shared with other jobs: the load average is printed before and after. Prints
numbers, never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKPOINTS = (0, 1, 2, 4, 8, 16, 32)
SHARED = Path(os.environ.get("CELLPOSE_WEB_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _load(msg: str) -> None:
    print(f"{msg}: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs",
          flush=True)


def whole_cell_data(args):
    import numpy as np
    from cellpose_web.engine import synthetic

    rng = np.random.default_rng(args.seed)
    n = max(args.n_ref, args.n_pool) + args.n_test
    smp = [synthetic.whole_cell_sample(rng, (256, 256), diameter=float(rng.uniform(25, 45))) for _ in range(n)]
    imgs = [s.image[0] for s in smp]
    labs = [s.labels for s in smp]
    n_train = max(args.n_ref, args.n_pool)
    return (imgs[:args.n_pool], labs[:args.n_pool], imgs[:n_train], labs[:n_train],
            imgs[n_train:], labs[n_train:], "synthetic whole cells (256 px)")


def nuclei_data(args):
    from cellpose_web import io

    root = SHARED / "data" / "nuclei_2d"
    if not root.is_dir():
        sys.exit(f"{root} not found (set CELLPOSE_WEB_SHARED)")
    names = [str(p) for p in io.get_image_files(root / "train", "_masks")]
    labels, _ = io.get_label_files(names, "_masks")
    order = list(range(len(names)))
    random.Random(args.seed).shuffle(order)
    imgs = [io.imread(names[i]) for i in order]
    labs = [io._read_labels(labels[i]) for i in order]
    vnames = [str(p) for p in io.get_image_files(root / "val", "_masks")]
    vlabels, _ = io.get_label_files(vnames, "_masks")
    timgs = [io.imread(n) for n in vnames]
    tlabs = [io._read_labels(f) for f in vlabels]
    return (imgs[:args.n_pool], labs[:args.n_pool], imgs, labs, timgs, tlabs,
            f"nuclei_2d (train {len(imgs)} images, val {len(timgs)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("whole_cell", "nuclei"), default="whole_cell")
    ap.add_argument("--model", default="lite", help="base model: lite, cp_cyto, ...")
    ap.add_argument("--n_pool", type=int, default=8, help="images the simulated person corrects")
    ap.add_argument("--n_ref", type=int, default=16, help="whole_cell: training images of the reference")
    ap.add_argument("--n_test", type=int, default=6, help="whole_cell: images that score")
    ap.add_argument("--ref_factor", type=float, default=5.0, help="reference epochs = this x the round's epochs")
    ap.add_argument("--holdout_every", type=int, default=4)
    ap.add_argument("--time_limit", type=float, default=None, help="seconds per round (default: the table's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per round (default: the table's)")
    ap.add_argument("--schedule", choices=("round", "cellpose"), default=None,
                    help="learning-rate schedule of a round (default: the table's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_reference", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    os.environ["CELLPOSE_WEB_HOME"] = tempfile.mkdtemp(prefix="bench_hitl_")
    os.environ["CELLPOSE_WEB_CPU"] = "1"

    import numpy as np
    import tifffile
    import torch

    torch.set_num_threads(args.threads)
    from cellpose_web.models import train as train_mod
    from cellpose_web.models import CellposeModel
    from cellpose_web.workflows import hitl

    pool_i, pool_l, ref_i, ref_l, test_i, test_l, what = (whole_cell_data if args.case == "whole_cell"
                                                            else nuclei_data)(args)
    work = Path(tempfile.mkdtemp(prefix="bench_hitl_imgs_"))
    for k, (im, lb) in enumerate(zip(pool_i, pool_l)):
        tifffile.imwrite(work / f"img{k:02d}.tif", im)
        tifffile.imwrite(work / f"img{k:02d}_masks.tif", lb.astype(np.uint16))
    test_yxc = [np.asarray(t)[..., None] if np.ndim(t) == 2 else np.asarray(t) for t in test_i]
    recipe = {}
    if args.time_limit:
        recipe["time_limit_s"] = args.time_limit
    if args.schedule:
        recipe["schedule"] = args.schedule
    if args.epochs:
        recipe.update(n_epochs=args.epochs, min_epochs=min(args.epochs, 12))
    s = hitl.start_session(f"bench_{args.case}_{args.model}", str(work), base_model=args.model,
                           root=work / "projects", recipe=recipe, holdout_every=args.holdout_every, seed=args.seed,
                           gpu=False)
    rec = s.recipe()
    print(f"case {args.case}: {what}; person's images {len(pool_i)}, test images {len(test_i)} "
          f"({sum(len(np.unique(t[t > 0])) for t in test_l)} cells); base model {args.model}", flush=True)
    print(f"round recipe: {json.dumps(rec.as_dict())}", flush=True)
    _load("before")
    t_all = time.perf_counter()

    def score(ref):
        return hitl.score_model(ref, test_yxc, test_l)

    rows = []
    sc = score(s.current_model())
    rows.append({"corrected": 0, "cells_corrected": 0, "cells_learnt": 0, "round": 0, "train_min": 0.0,
                 "wall_min": 0.0, **sc})
    print(f"0 corrected: test AP@0.5 {sc['ap50']:.3f} AP@0.75 {sc['ap75']:.3f}", flush=True)
    cells = 0
    steps = []
    for k in range(1, len(pool_i) + 1):
        shown = s.next_image(wait_for_round=None)
        if shown is None:
            break
        true = tifffile.imread(work / f"img{shown.index:02d}_masks.tif")
        from cellpose_web.engine.metrics import average_precision
        prop = float(average_precision(true, shown.masks, threshold=[0.5])[0][0])
        res = s.save_correction(true, index=shown.index)
        cells += res.n_cells
        rounds = []
        if res.handle is not None:
            res.handle.wait()
            rounds = list(res.handle.rounds)
        for r in rounds:
            print(f"  round {r['round']}: {'accepted' if r['accepted'] else 'rejected'} ({r['reason']}); "
                  f"{r['n_train_images']} images / {r['n_cells']} cells, {r['epochs_done']}/{r['epochs']} epochs in "
                  f"{r['train_seconds']:.0f} s (+{r.get('score_seconds', 0):.0f} s scoring)", flush=True)
        cm = s.current_model()
        st = s.status()
        steps.append({"corrected": k, "image": shown.name, "heldout": res.heldout, "n_cells": res.n_cells,
                      "segmented_by_round": shown.model["round"], "proposal_ap50": round(prop, 3)})
        print(f"{k} corrected: {shown.name} ({'held out' if res.heldout else 'trained on'}, {res.n_cells} cells) "
              f"was segmented by round {shown.model['round']}, AP@0.5 {prop:.3f} against the truth", flush=True)
        if k in CHECKPOINTS:
            sc = score(cm)
            rows.append({"corrected": k, "cells_corrected": cells, "cells_learnt": cm["n_cells"], "round": cm["round"],
                         "train_min": st["train_minutes"], "wall_min": round((time.perf_counter() - t_all) / 60, 2),
                         **sc})
            print(f"  -> current model round {cm['round']} (learnt from {cm['n_cells']} cells): test AP@0.5 "
                  f"{sc['ap50']:.3f} AP@0.75 {sc['ap75']:.3f}; training so far {st['train_minutes']:.1f} min",
                  flush=True)
    _load("after the loop")
    ref_row = None
    if not args.no_reference:
        n_ep = int(round(rec.n_epochs * args.ref_factor))
        model = CellposeModel(gpu=False, pretrained_model=args.model, use_bfloat16=False)
        ref_yxc = [np.asarray(t)[..., None] if np.ndim(t) == 2 else np.asarray(t) for t in ref_i]
        print(f"reference: {args.model} fine-tuned on all {len(ref_i)} training images "
              f"({sum(len(np.unique(t[t > 0])) for t in ref_l)} cells), {n_ep} epochs x {rec.crops_per_epoch} "
              "crops, same recipe, no time limit", flush=True)
        t0 = time.perf_counter()
        path, _, _ = train_mod.train_seg(model.net, ref_yxc, list(ref_l), channel_axis=2,
                                         learning_rate=rec.learning_rate, weight_decay=rec.weight_decay,
                                         n_epochs=n_ep, batch_size=rec.batch_size, bsize=rec.bsize,
                                         nimg_per_epoch=rec.crops_per_epoch, rescale=rec.rescale,
                                         save_path=str(work), model_name="reference", min_train_masks=1,
                                         seed=args.seed, lr_schedule=hitl.round_lr_schedule(rec.learning_rate, n_ep)
                                         if rec.schedule == "round" else None)
        ref_s = time.perf_counter() - t0
        rsc = score({"name": "reference", "path": str(path)})
        ref_row = {"train_min": round(ref_s / 60, 2), "epochs": n_ep, **rsc}
        print(f"reference: test AP@0.5 {rsc['ap50']:.3f} AP@0.75 {rsc['ap75']:.3f} ({ref_s / 60:.1f} min)",
              flush=True)

    print()
    print(f"## {args.case}, base model {args.model}: held-out test AP after k corrected images")
    print("| corrected images | corrected cells | cells learnt from | model round | AP@0.5 | AP@0.75 | "
          "training (min) | wall (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corrected']} | {r['cells_corrected']} | {r['cells_learnt']} | {r['round']} | {r['ap50']:.3f} | "
              f"{r['ap75']:.3f} | {r['train_min']:.1f} | {r['wall_min']:.1f} |")
    if ref_row:
        print(f"| reference (all {len(ref_i)} training images) | {sum(len(np.unique(t[t > 0])) for t in ref_l)} | - | "
              f"- | {ref_row['ap50']:.3f} | {ref_row['ap75']:.3f} | {ref_row['train_min']:.1f} | - |")
        goal = 0.9 * ref_row["ap50"]
        hit = next((r for r in rows if r["ap50"] >= goal), None)
        if hit:
            print(f"90 % of the reference's AP@0.5 ({goal:.3f}) reached after {hit['corrected']} corrected image(s), "
                  f"{hit['cells_corrected']} corrected cells ({hit['cells_learnt']} trained on) and "
                  f"{hit['train_min']:.1f} min of training; Cellpose 2.0 reports 100-200 corrected cells")
        else:
            print(f"90 % of the reference's AP@0.5 ({goal:.3f}) not reached within {rows[-1]['corrected']} corrected "
                  f"images ({rows[-1]['cells_corrected']} cells); Cellpose 2.0 reports 100-200 corrected cells")
    print(f"total {(time.perf_counter() - t_all) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"case": args.case, "model": args.model, "rows": rows, "steps": steps,
                                               "reference": ref_row, "recipe": rec.as_dict()}, indent=1))


if __name__ == "__main__":
    main()
