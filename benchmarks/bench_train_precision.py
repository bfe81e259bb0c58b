"""Accuracy of fine-tuning in bfloat16 vs float32: held-out AP after the same training budget.

    python benchmarks/bench_train_precision.py [--epochs 20] [--nimg 32] [--seeds 0 1] [--model cp_cyto]

Fine-tunes Cellpose 3's ``cyto`` U-Net (``../shared/reference/cp3/cp_cyto.pth``, a whole-cell model,
so fine-tuning on nuclei has something to learn) on all of ``../shared/data/nuclei_2d/train`` with its
Cellpose 3 recipe (``train.finetune_defaults("cellpose3")``: AdamW, batch 8, 224 px crops,
``rescale=True``), ``--epochs`` epochs of ``--nimg`` crops, once per precision and seed
(``--model lite``: the built-in ``lite`` with its own recipe, ``finetune_defaults("lite")``):

- float32: ``train_seg(..., mixed_precision=False)``
- bfloat16: ``train_seg(..., mixed_precision=True)`` (autocast; weights and optimizer stay float32)

and reports, on ``../shared/data/nuclei_2d/val`` only (never trained on), AP@0.5 and AP@0.75 pooled
over the images (true positives / (TP + FP + FN) summed over the 3 images), the mean matched IoU,
the last epoch's training loss and the held-out flow loss of the final network. Running two seeds
per precision shows how far apart two float32 runs already are, which is the scale a bf16 difference
should be judged on. Also prints the network before fine-tuning. Prints numbers, no pass/fail.

``--model vit-tiny``: the Cellpose-SAM architecture (``CPSAMNet``: SAM ViT blocks with global attention and
the decomposed relative-position bias, neck, readout) at a size a CPU trains in minutes: the tiny network of
``tests/test_dtypes.make_tiny_cpsam`` (width 32, 2 blocks of 2 heads), whose hand-set first and last layers
already find bright nuclei (AP@0.5 0.47 on nuclei_2d/val), fine-tuned with Cellpose 4's train_seg recipe
(``rescale=False``, 256 px crops, batch 8, ``--lr`` default 3e-3; use ``--epochs 80``) and scored with
``flow_threshold=0``. The
pretrained ViT-L cannot be fetched offline; this asks whether bf16 autocast changes what these layers learn
(LayerNorm, softmax and the loss run in float32 under autocast either way).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellpose_web import io, models  # noqa: E402
from cellpose_web.models import train
from cellpose_web.engine import metrics

SHARED = ROOT.parent / "shared"
CP_CYTO = SHARED / "reference" / "cp3" / "cp_cyto.pth"
DATA = SHARED / "data" / "nuclei_2d"


def load_folder(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    names = sorted(p for p in folder.glob("*.tif") if not p.name.endswith("_masks.tif"))
    imgs = [io.imread(p) for p in names]
    labels = [io.imread(p.with_name(p.stem + "_masks.tif")) for p in names]
    return imgs, labels, [p.stem for p in names]


def score(model: models.CellposeModel, imgs, labels, **kw) -> dict:
    """Pooled AP@0.5 / AP@0.75 and mean matched IoU of ``model`` on (imgs, labels)."""
    tp = np.zeros(2)
    fp = np.zeros(2)
    fn = np.zeros(2)
    ious = []
    for img, lbl in zip(imgs, labels):
        masks = model.eval(img, **kw)[0]
        _, t, p, n = metrics.average_precision(lbl, masks, threshold=(0.5, 0.75))
        tp, fp, fn = tp + t, fp + p, fn + n
        iou = metrics.mask_ious(lbl, masks)[0]
        ious.extend(iou[iou >= 0.5].tolist())
    ap = tp / np.maximum(tp + fp + fn, 1)
    return {"ap50": float(ap[0]), "ap75": float(ap[1]), "iou": float(np.mean(ious)) if ious else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cp_cyto", choices=["cp_cyto", "lite", "vit-tiny"])
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's; 3e-3 for vit-tiny)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--nimg", type=int, default=None, help="crops per epoch (default: 32 for cp_cyto, "
                    "the recipe's for lite)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp_weights = tempfile.TemporaryDirectory()
    if args.model == "vit-tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_dtypes import make_tiny_cpsam
        weights = str(make_tiny_cpsam(Path(tmp_weights.name) / "tiny_cpsam.pth"))
        recipe = train.finetune_defaults("cpsam")
    else:
        weights = str(CP_CYTO) if args.model == "cp_cyto" else "lite"
        recipe = train.finetune_defaults("cellpose3" if args.model == "cp_cyto" else "lite")
    lr = args.lr or (3e-3 if args.model == "vit-tiny" else recipe.learning_rate)
    batch_size = 8 if args.model == "vit-tiny" else recipe.batch_size
    tr_imgs, tr_labels, _ = load_folder(DATA / "train")
    chan = {"channels": [0, 0]} if args.model == "cp_cyto" else {}  # the legacy U-Net's grey input
    # vit-tiny: its hand-set flows are constant on each 8 px patch, so it is scored without the flow check
    eval_kw = {**chan, "flow_threshold": 0} if args.model == "vit-tiny" else chan
    nimg = args.nimg or (32 if args.model in ("cp_cyto", "vit-tiny") else recipe.nimg_per_epoch(len(tr_imgs)))
    va_imgs, va_labels, va_names = load_folder(DATA / "val")
    print(f"{args.model}; train: {len(tr_imgs)} images; val: {va_names}; {args.epochs} epochs x {nimg} crops of "
          f"{recipe.bsize} px, batch {batch_size}, lr {lr}, wd {recipe.weight_decay}, "
          f"{torch.get_num_threads()} threads, native bf16: {train.cpu_has_native_bf16()}", flush=True)
    base = score(models.CellposeModel(pretrained_model=weights), va_imgs, va_labels, **eval_kw)
    print(f"before fine-tuning        : AP@0.5 {base['ap50']:.3f}  AP@0.75 {base['ap75']:.3f}  "
          f"IoU {base['iou']:.3f}", flush=True)
    rows = []
    for seed in args.seeds:
        for bf16 in (False, True):
            model = models.CellposeModel(pretrained_model=weights)
            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                path, losses, test_losses = train.train_seg(
                    model.net, tr_imgs, tr_labels, test_data=va_imgs, test_labels=va_labels, **chan,
                    batch_size=batch_size, learning_rate=lr,
                    weight_decay=recipe.weight_decay, n_epochs=args.epochs, nimg_per_epoch=nimg,
                    bsize=recipe.bsize, rescale=args.model == "cp_cyto", min_train_masks=1, save_path=tmp,
                    model_name="prec",
                    seed=seed, mixed_precision=bf16)
                dt = time.perf_counter() - t0
                tuned = models.CellposeModel(pretrained_model=str(path))
                s = score(tuned, va_imgs, va_labels, **eval_kw)
            rows.append((seed, bf16, s))
            print(f"seed {seed} {'bfloat16' if bf16 else 'float32 '}: AP@0.5 {s['ap50']:.3f}  AP@0.75 {s['ap75']:.3f}  "
                  f"IoU {s['iou']:.3f}  train loss {losses[-1]:.4f}  held-out loss {test_losses[-1]:.4f}  "
                  f"({dt:.0f} s)", flush=True)
    for prec in (False, True):
        sel = [r[2] for r in rows if r[1] == prec]
        print(f"mean {'bfloat16' if prec else 'float32 '}: AP@0.5 {np.mean([s['ap50'] for s in sel]):.3f}  "
              f"AP@0.75 {np.mean([s['ap75'] for s in sel]):.3f}  IoU {np.mean([s['iou'] for s in sel]):.3f}")


if __name__ == "__main__":
    main()
