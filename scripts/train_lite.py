"""Train the embedded `lite` model: real nuclei (train split only) + synthetic cells.

The shipped weights come from four stages, each starting from the previous one (``--init``); the
commands are in README.md's model card and in the checkpoint's metadata (``earlier_stages``).
Each run writes the recipe, data, time and validation AP (nuclei_2d/val, diameter=None; never
trained on) into the checkpoint's metadata, which the registry shows as the model card.
``--finalize CKPT`` only re-measures validation AP.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellpose_web.engine import dynamics  # noqa: E402
from cellpose_web.models import train
from cellpose_web.engine.nets.unet import LiteUNet  # noqa: E402
from cellpose_web.engine.synthetic import synthetic_sample  # noqa: E402


def load_folder(folder: Path):
    imgs, labels, names = [], [], []
    for f in sorted(folder.glob("*.tif")):
        if f.stem.endswith("_masks"):
            continue
        imgs.append(tifffile.imread(f))
        labels.append(tifffile.imread(f.with_name(f.stem + "_masks.tif")))
        names.append(f.name)
    return imgs, labels, names


def mixed_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scale factors after normalising each image to 30 px objects: mostly near 1, some far.

    60%: U(0.75, 1.25) (second pass of diameter=None lands here); 40%: log-uniform over
    [1/3, 3], so objects of 10-90 px are seen in the first, unscaled pass.
    """
    narrow = rng.uniform(0.75, 1.25, n)
    broad = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
    return np.where(rng.random(n) < 0.6, narrow, broad)


def validate(path: Path, val_dir: Path) -> dict:
    """AP at IoU 0.5/0.75/0.9 on the validation folder (diameter=None), pooled over objects."""
    from cellpose_web.engine import metrics
    from cellpose_web.models import CellposeModel

    model = CellposeModel(pretrained_model=str(path))
    imgs, labels, names = load_folder(val_dir)
    preds = [model.eval(im, diameter=None)[0] for im in imgs]
    ap, tp, fp, fn = metrics.average_precision(labels, preds)
    pooled = tp.sum(0) / (tp.sum(0) + fp.sum(0) + fn.sum(0))
    return {"test_set": f"{val_dir.parent.name}/{val_dir.name} ({len(imgs)} images, {int(tp[:, 0].sum() + fn[:, 0].sum())} objects)",
            "diameter": "None (estimated)",
            "ap_mean_over_images": {t: round(float(a), 4) for t, a in zip(("0.5", "0.75", "0.9"), ap.mean(0))},
            "ap_pooled": {t: round(float(a), 4) for t, a in zip(("0.5", "0.75", "0.9"), pooled)}}


def earlier_stages(init_meta: dict | None) -> list[dict]:
    """The recipes of the checkpoints this one was trained from (oldest first), for the model card."""
    if not init_meta:
        return []
    stage = {k: init_meta[k] for k in ("recipe", "train_seconds", "created", "validation") if k in init_meta}
    return list(init_meta.get("earlier_stages", [])) + [stage]


def finalize(path: Path, val_dir: Path) -> dict:
    """Write validation AP into the checkpoint's metadata (shown by the registry as the model card)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    result = validate(path, val_dir)
    obj["meta"]["validation"] = result
    obj["meta"]["test_ap"] = result["ap_mean_over_images"]["0.5"]
    net = LiteUNet.from_checkpoint(obj)
    train.save_network(net, path, obj["meta"])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nuclei_2d"))
    p.add_argument("--out", default=str(REPO / "cellpose_web" / "weights" / "lite.pt"))
    p.add_argument("--n_synthetic", type=int, default=300)
    p.add_argument("--synthetic_fraction", type=float, default=0.5)
    p.add_argument("--n_epochs", type=int, default=400)
    p.add_argument("--nimg_per_epoch", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--widths", default="24,48,96,192")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save_every", type=int, default=20)
    p.add_argument("--finalize", default=None, metavar="CKPT",
                   help="only evaluate CKPT on <data>/val and write the AP into its metadata")
    p.add_argument("--refine", type=int, default=16,
                   help="channels of the full-resolution refinement branch (0 = none)")
    p.add_argument("--init", default=None,
                   help="start from this lite checkpoint (later stage); layers it lacks (e.g. the "
                        "refinement branch of a checkpoint trained without one) start fresh")
    p.add_argument("--narrow_scales", action="store_true", help="scales U(0.75, 1.25) only (Cellpose's range)")
    p.add_argument("--cache", default=str(REPO / "runs"), help="folder for the synthetic data cache ('' = none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.finalize:
        logging.info("validation: %s", json.dumps(finalize(Path(args.finalize), Path(args.data) / "val")))
        return

    real_imgs, real_labels, names = load_folder(Path(args.data) / "train")
    cache = Path(args.cache) / f"synthetic_seed{args.seed}_n{args.n_synthetic}.npz" if args.cache else None
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            syn_imgs = [z[f"img{i}"] for i in range(args.n_synthetic)]
            syn_labels = [z[f"flow{i}"] for i in range(args.n_synthetic)]
            styles = [str(s) for s in z["styles"]]
        logging.info("synthetic data from cache %s", cache)
    else:
        rng = np.random.default_rng(args.seed)
        syn_imgs, syn_labels, styles = [], [], []
        for i in range(args.n_synthetic):
            side = int(rng.choice([256, 320, 384]))
            s = synthetic_sample(rng, (side, side))
            syn_imgs.append(s.image)
            syn_labels.append(dynamics.labels_to_flows([s.labels])[0])  # (4, Y, X), computed once
            styles.append(s.style)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, styles=np.array(styles), **{f"img{i}": a for i, a in enumerate(syn_imgs)},
                     **{f"flow{i}": a for i, a in enumerate(syn_labels)})
    real_flows = dynamics.labels_to_flows(real_labels)
    logging.info("data: %d real, %d synthetic (%.0fs)", len(real_imgs), len(syn_imgs), time.time() - t0)

    # real images are (Y, X); synthetic ones (C, Y, X) -> pass both as (C, Y, X)
    data = [im[None] if im.ndim == 2 else im for im in real_imgs] + syn_imgs
    labels = list(real_flows) + syn_labels
    n_real = len(real_imgs)
    w_real = (1 - args.synthetic_fraction) / n_real
    w_syn = args.synthetic_fraction / max(1, len(syn_imgs))
    probs = [w_real] * n_real + [w_syn] * len(syn_imgs)

    if args.init:
        net = LiteUNet.from_checkpoint(torch.load(args.init, map_location="cpu", weights_only=True),
                                       refine=args.refine)
        logging.info("initialised from %s", args.init)
    else:
        net = LiteUNet(widths=tuple(int(w) for w in args.widths.split(",")), refine=args.refine)
    out = Path(args.out)
    log_epochs = []

    def cb(epoch, loss, test_loss, elapsed):
        log_epochs.append((epoch, round(loss, 4), round(elapsed, 1)))
        logging.info("epoch %d loss %.4f elapsed %.0fs", epoch, loss, elapsed)
        if epoch % args.save_every == 0 and epoch > 0:
            train.save_network(net, out.with_suffix(".partial.pt"), {"epoch": epoch})
        return True

    path, losses, _ = train.train_seg(
        net, data, labels, channel_axis=0, train_probs=probs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, n_epochs=args.n_epochs,
        nimg_per_epoch=args.nimg_per_epoch, rescale=True,
        scale_sampler=None if args.narrow_scales else mixed_scales, scale_range=0.5,
        min_train_masks=1, save_path=str(out.parent / "_runs"), model_name="lite", seed=args.seed,
        callback=cb, augment_intensity=True, save_every=10**9)
    meta = {
        "name": "lite",
        "description": "embedded residual U-Net (cellpose-web), flows + cell probability",
        "params": int(sum(p.numel() for p in net.parameters())),
        "config": net.config,
        "recipe": {k: getattr(args, k) for k in ("init", "refine", "narrow_scales", "n_epochs", "nimg_per_epoch", "batch_size", "learning_rate",
                                                  "weight_decay", "seed", "n_synthetic", "synthetic_fraction")}
        | {"optimizer": "AdamW", "augment_intensity": True,
           "scale": "rescale to 30 px x " + ("U(0.75, 1.25)" if args.narrow_scales else "mixed_scales"),
           "command": "python scripts/train_lite.py " + " ".join(argv or sys.argv[1:])},
        "data": {"real": f"nuclei_2d/train ({n_real} images)", "synthetic": len(syn_imgs),
                 "synthetic_styles": sorted(set(styles))},
        "train_seconds": round(time.time() - t0, 1),
        "earlier_stages": earlier_stages(getattr(net, "meta", None)),
        "final_train_loss": float(losses[-1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    train.save_network(net, out, meta)
    logging.info("saved %s: %s", out, json.dumps(meta)[:400])
    logging.info("validation: %s", json.dumps(finalize(out, Path(args.data) / "val")))


if __name__ == "__main__":
    main()
