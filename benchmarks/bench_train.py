"""Fine-tuning speed: train_seg against Cellpose 3.1.1.2's on the same legacy U-Net, and lite vs that U-Net.

    python benchmarks/bench_train.py [--epochs 4] [--nimg 24] [--batch 8] [--bsize 224] [--device cuda]

Three images of ``../shared/data/nuclei_2d/train`` (the first three by name; the crops of
``tests/fixtures/data/nuclei_2d/train`` without ``../shared``) and their labels; the network is Cellpose 3's
``cyto`` U-Net (``cellpose_web/weights/cp_cyto.pth``, the file ``../shared/reference/cp3`` holds too). Each run trains for
``--epochs`` epochs of ``--nimg`` random crops of ``--bsize`` px in batches of ``--batch`` (AdamW,
channels [0, 0], ``rescale=True`` as Cellpose 3's default), starting from the same weights, flows of the
labels computed inside the call as both packages do (our flow cache is cleared before every run).
Timed: the whole ``train_seg`` call (flows + epochs); the one-off import torch's AdamW triggers on
first use (``torch._dynamo``, seconds) is done before the clock starts in both.

- ours, legacy U-Net: ``cellpose_web.train.train_seg`` on ``CellposeModel(cp_cyto.pth).net`` with its
  default precision (bfloat16 autocast on a CPU with native bf16, else float32: ``train.training_uses_bf16``)
- reference, legacy U-Net: ``cellpose.train.train_seg`` in the Python named by CELLPOSE3_REF_PYTHON
  (default /work/venvs/cp3/bin/python, cellpose==3.1.1.2), in a subprocess; always float32
- ours, legacy U-Net in float32 (``mixed_precision=False``): the same arithmetic as the reference
- ours, lite with its default precision: the same data and settings on the built-in ``lite`` (crops per
  second of its epochs, from the per-epoch callback, against the legacy U-Net's in the same run)

Ours and the reference alternate (ours, reference, ours, float32, reference, float32) and the faster of
each pair is used, so a busy machine shows up as a spread rather than as a bias; ``--repeats 1`` runs
each once; ``--variants`` picks which of ours run (``float32`` alone for the GPU table). ``--device``: ours
and the reference on that device. ``--json FILE`` appends the best times as one JSON line (stage
``legacy_train``). The process's CPU seconds are printed too: with ``--threads 1`` they hardly depend on what
else the machine is running, so their ratio is the one to trust on a busy machine. Cellpose-SAM is
not compared: its weights cannot be fetched offline, and one CPU epoch of it
takes minutes. Prints numbers, no pass/fail.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cellpose_web import io, models  # noqa: E402
from cellpose_web.models import train  # noqa: E402
from benchlib import CP_CYTO, data_path, sync, write_json  # noqa: E402

DATA = data_path("data/nuclei_2d/train")

REF_SCRIPT = r"""
import json, sys, time, tempfile
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from cellpose import models, train
d = np.load(sys.argv[1], allow_pickle=False)
k = json.loads(sys.argv[2])
imgs = [d[f"img{i}"] for i in range(k["n"])]
labels = [d[f"lab{i}"] for i in range(k["n"])]
dev = torch.device(k["device"])
m = models.CellposeModel(gpu=dev.type == "cuda", device=dev, pretrained_model=k["weights"])
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # one-off lazy imports, outside the clock
torch.manual_seed(0); np.random.seed(0)
with tempfile.TemporaryDirectory() as tmp:
    t0, c0 = time.perf_counter(), time.process_time()
    train.train_seg(m.net, train_data=imgs, train_labels=labels, channels=[0, 0], batch_size=k["batch"],
                    n_epochs=k["epochs"], nimg_per_epoch=k["nimg"], bsize=k["bsize"], learning_rate=k["lr"],
                    weight_decay=k["wd"], min_train_masks=1, save_path=tmp, model_name="bench")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": dt, "cpu_seconds": cpu}))
"""


def load_data(n: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    names = sorted(p for p in DATA.glob("*.tif") if not p.name.endswith("_masks.tif"))[:n]
    imgs = [io.imread(p) for p in names]
    labels = [io.imread(p.with_name(p.stem + "_masks.tif")) for p in names]
    return imgs, labels


def run_ours(pretrained: str, imgs, labels, k: dict, mixed_precision: bool | None = None) -> dict:
    model = models.CellposeModel(pretrained_model=pretrained, device=k["device"])
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # one-off lazy imports, outside the clock
    train.clear_flow_cache()
    ticks = []
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        train.train_seg(model.net, imgs, labels, channels=[0, 0], batch_size=k["batch"], n_epochs=k["epochs"],
                        nimg_per_epoch=k["nimg"], bsize=k["bsize"], learning_rate=k["lr"], weight_decay=k["wd"],
                        rescale=True, min_train_masks=1, save_path=tmp, model_name="bench", seed=0,
                        mixed_precision=mixed_precision,
                        callback=lambda epoch, loss, test_loss, elapsed: ticks.append(time.perf_counter()))
        sync(k["device"])
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # crops per second of the epochs after the first (the first also holds the flows and warm-up)
    rate = (k["nimg"] * (len(ticks) - 1) / (ticks[-1] - ticks[0])) if len(ticks) > 1 else float("nan")
    return {"seconds": dt, "cpu_seconds": cpu, "crops_per_s": rate,
            "bf16": train.training_uses_bf16(model.net, model.device, mixed_precision)}


def run_ref(py: str, inp: Path, k: dict, threads: int) -> dict:
    """Cellpose 3's run: {"seconds", "cpu_seconds"}, or {"error": its last line of error output}."""
    res = subprocess.run([py, "-c", REF_SCRIPT, str(inp), json.dumps({**k, "weights": str(CP_CYTO)}), str(threads)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print("reference run failed:\n" + res.stderr[-2000:])
        last = [ln for ln in res.stderr.splitlines() if ln.strip()]
        return {"error": f"Cellpose 3 failed (rc={res.returncode}): " + (last[-1].strip()[:300] if last else "")}
    return json.loads(res.stdout.strip().splitlines()[-1])


VARIANTS = ("default", "float32", "lite")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--nimg", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bsize", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of ours and of the reference (the fastest counts)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="which of ours run: the legacy U-Net by default and in float32, lite")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: ours and the reference on it")
    ap.add_argument("--json", default=None, help="append the best times as one JSON line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    k = {"n": 3, "epochs": args.epochs, "nimg": args.nimg, "batch": args.batch, "bsize": args.bsize,
         "lr": 1e-4, "wd": 1e-5, "device": args.device}
    imgs, labels = load_data(3)
    print(f"3 images {[im.shape for im in imgs]}, {args.epochs} epochs x {args.nimg} crops of {args.bsize} px, "
          f"batch {args.batch}, {torch.get_num_threads()} torch threads, native bf16: {train.cpu_has_native_bf16()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    ref_py = os.environ.get("CELLPOSE3_REF_PYTHON") or "/work/venvs/cp3/bin/python"
    have_ref = Path(ref_py).exists()

    def show(name: str, r: dict) -> None:
        prec = "bfloat16" if r.get("bf16") else "float32"
        print(f"{name:34s}: {r['seconds']:7.1f} s, CPU {r['cpu_seconds']:7.1f} s  ({r['crops_per_s']:.2f} crops/s, "
              f"{prec})", flush=True)

    ours, fp32, refs = [], [], []
    ref_error = None if have_ref else f"no reference python ({ref_py}; set CELLPOSE3_REF_PYTHON)"
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "data.npz"
        np.savez(inp, **{f"img{i}": im for i, im in enumerate(imgs)}, **{f"lab{i}": lb for i, lb in enumerate(labels)})
        for _ in range(args.repeats):
            if "default" in args.variants:
                ours.append(run_ours(str(CP_CYTO), imgs, labels, k))
                show("ours      legacy U-Net (default)", ours[-1])
            ref = run_ref(ref_py, inp, k, args.threads) if have_ref else None
            if ref and "error" not in ref:
                refs.append(ref)
                print(f"{'reference legacy U-Net':34s}: {ref['seconds']:7.1f} s, CPU {ref['cpu_seconds']:7.1f} s  "
                      "(cellpose 3.1.1.2, float32)", flush=True)
            elif ref:
                ref_error = ref["error"]
            if "float32" in args.variants:
                fp32.append(run_ours(str(CP_CYTO), imgs, labels, k, mixed_precision=False))
                show("ours      legacy U-Net, float32", fp32[-1])
        lite = run_ours("lite", imgs, labels, k) if "lite" in args.variants else None
        if lite:
            show("ours      lite (default)", lite)
    best, best32 = (min(r, key=lambda x: x["seconds"]) if r else None for r in (ours, fp32))
    ref_best = min(refs, key=lambda x: x["seconds"]) if refs else None
    for name, mine in (("by default", best), ("in float32", best32)):
        if mine and ref_best:
            print(f"legacy U-Net fine-tuning {name} ({'bfloat16' if mine['bf16'] else 'float32'}), ours / Cellpose "
                  f"3.1.1.2: {mine['seconds'] / ref_best['seconds']:.2f}x time, "
                  f"{mine['cpu_seconds'] / ref_best['cpu_seconds']:.2f}x CPU time")
    if not refs:
        print(f"no Cellpose 3 comparison: {ref_error}")
    if lite and ours:
        print(f"lite / legacy U-Net crops per second (same run, default precision): "
              f"{lite['crops_per_s'] / max(r['crops_per_s'] for r in ours):.1f}x")
    write_json(args.json, "legacy_train", device=args.device, epochs=args.epochs, nimg=args.nimg, batch=args.batch,
               bsize=args.bsize, ours_default=best, ours_float32=best32, ref=ref_best, ref_error=ref_error)


if __name__ == "__main__":
    main()
