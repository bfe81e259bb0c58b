"""Whole-cell accuracy of the built-in `cp_cyto` (a Cellpose 1-3 U-Net) and agreement with Cellpose 3.1.1.2.

Images: two-channel whole-cell images (cytoplasm or membrane + nuclei) from cellpose_web/engine/synthetic.py
with seeds the models never saw, plus the two labelled images of ../shared/reference/cp3 (not
training images of either model). Prints AP@0.5 per image and the mean, for `cp_cyto` with the
true diameter, with its size model (diameter estimated), and for `lite` for comparison.

With ``CELLPOSE_REF_PYTHON`` pointing to a Python that has cellpose==3.1.1.2, the same weights are run
there on the same images and the agreement of the masks is printed (AP@0.5 of ours against theirs,
smallest matched IoU). Numbers only, no pass/fail.

``--speed``: eval time of `cp_cyto` on one two-channel whole-cell image (--size, default 450;
synthetic, seed 9000, cytoplasm + nuclei, channels [1, 2], its true diameter), ours and, with
``CELLPOSE_REF_PYTHON``, Cellpose 3.1.1.2's on the same image and weights, each after a warm-up in
its own process: the best of --repeats runs, wall and CPU seconds (all threads) for the network,
the masks step and the total, and whether the masks are identical. ``--threads N`` sets torch's
threads in both (1 gives numbers that a shared machine disturbs least).

``--table`` (issue #23's GPU table, ``gpu_check.sh``): whether ``cp_cyto`` starts and segments with default
settings on ``--device``, then the eval time of ``--n`` whole-cell RGB images (``--min-side``-``--max-side`` px,
R = nuclei, G = cytoplasm, channels [2, 1], diameter 30) with ``use_bfloat16=False``, ours and Cellpose
3.1.1.2's on the same device (each after a warm-up image), and how many of ours have AP@0.5 >= 0.99 against
Cellpose 3's masks; ``--json FILE`` appends it as one JSON line (stage ``legacy_eval``).

    python benchmarks/bench_cp_cyto.py [--n 8] [--size 256]
    CELLPOSE_REF_PYTHON=/path/to/cp3/python python benchmarks/bench_cp_cyto.py --table --device cuda --n 30
    CELLPOSE_REF_PYTHON=/path/to/cp3/python python benchmarks/bench_cp_cyto.py --speed [--threads 1]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cellpose_web.engine import metrics, synthetic  # noqa: E402
from cellpose_web import models, registry  # noqa: E402
from benchlib import stage_timer  # noqa: E402

REF_SCRIPT = r"""
import json, sys, numpy as np
from cellpose import models
d = np.load(sys.argv[1]); out = {}
m = models.CellposeModel(pretrained_model=sys.argv[2])
for k in d.files:
    if k.startswith("img_"):
        ch = [int(c) for c in d["ch_" + k[4:]]]
        out[k[4:]] = m.eval(d[k], channels=ch, channel_axis=-1, diameter=float(d["diam_" + k[4:]]))[0]
np.savez_compressed(sys.argv[3], **out)
"""


REF_SPEED_SCRIPT = r"""
import json, sys, time, numpy as np, torch
if int(sys.argv[5]) > 0:
    torch.set_num_threads(int(sys.argv[5]))
from cellpose import models
d = np.load(sys.argv[1])
m = models.CellposeModel(pretrained_model=sys.argv[2])
sys.path.insert(0, sys.argv[6])
from benchlib import stage_timer
t = {}
m._run_net, m._compute_masks = stage_timer(t, "network", m._run_net), stage_timer(t, "masks", m._compute_masks)
runs = []
for r in range(int(sys.argv[4]) + 1):
    w, c = time.perf_counter(), time.process_time()
    masks = m.eval(d["img"], channels=[int(v) for v in d["ch"]], channel_axis=-1, diameter=float(d["diam"]))[0]
    t["total"] = (time.perf_counter() - w, time.process_time() - c)
    if r:  # the first run is the warm-up
        runs.append(dict(t))
np.save(sys.argv[3], masks)
print(json.dumps({"runs": runs, "threads": torch.get_num_threads()}))
"""


REF_TABLE_SCRIPT = r"""
import json, sys, time, numpy as np, torch
from cellpose import models
d = np.load(sys.argv[1])
dev = torch.device(sys.argv[4])
sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
m = models.CellposeModel(gpu=dev.type == "cuda", device=dev, pretrained_model=sys.argv[2])
imgs = [d[k] for k in sorted(d.files)]
m.eval(imgs[0], channels=[2, 1], channel_axis=-1, diameter=30.0)  # warm-up
sync(); t = time.perf_counter()
masks = [m.eval(im, channels=[2, 1], channel_axis=-1, diameter=30.0)[0] for im in imgs]
sync(); seconds = time.perf_counter() - t
np.savez_compressed(sys.argv[3], *masks)
print(json.dumps({"seconds": seconds}))
"""


def rgb_images(n: int, lo: int, hi: int, seed: int = 7000) -> list[np.ndarray]:
    """``n`` whole-cell RGB images (Y, X, 3) float32 of ``lo``-``hi`` px: R = nuclei, G = cytoplasm, B empty;
    cells of 26-34 px (synthetic ``cyto_nuclei`` pictures, seeds from ``seed``)."""
    out, rng = [], np.random.default_rng(seed)
    while len(out) < n:
        shape = tuple(int(v) for v in rng.integers(lo, hi + 1, 2))
        s = synthetic.synthetic_sample(rng, shape, "cyto_nuclei", diameter=float(rng.uniform(26, 34)))
        if s.image.shape[0] == 2:  # a few pictures come without a nuclear channel
            out.append(np.stack([s.image[1], s.image[0], np.zeros_like(s.image[0])], axis=-1))
    return out


def legacy_starts(device: str, img: np.ndarray) -> dict:
    """Whether ``cp_cyto`` loads and segments ``img`` with default settings on ``device`` (and its dtype)."""
    from benchlib import error_text
    try:
        m = models.CellposeModel(pretrained_model="cp_cyto", device=device)
        n = int(m.eval(img, channels=[2, 1], channel_axis=-1, diameter=30.0)[0].max())
    except Exception as e:  # noqa: BLE001 - the row says what failed
        return {"ok": False, "error": error_text(e)}
    return {"ok": True, "dtype": str(m.dtype).replace("torch.", ""), "masks": n}


def table(args) -> None:
    """``--table``: the legacy U-Net rows of issue #23's GPU table (see the module's docstring)."""
    import torch
    from benchlib import sync, write_json
    imgs = rgb_images(args.n, args.min_side, args.max_side)
    starts = legacy_starts(args.device, imgs[0])
    print(f"cp_cyto with default settings on {args.device}: " +
          (f"starts ({starts['dtype']}, {starts['masks']} masks)" if starts["ok"] else f"fails: {starts['error']}"))
    m = models.CellposeModel(pretrained_model="cp_cyto", device=args.device, use_bfloat16=False)
    kw = dict(channels=[2, 1], channel_axis=-1, diameter=30.0)
    m.eval(imgs[0], **kw)  # warm-up
    sync(args.device)
    t = time.perf_counter()
    ours = [m.eval(im, **kw)[0] for im in imgs]
    sync(args.device)
    seconds = time.perf_counter() - t
    print(f"ours: {len(imgs)} images ({args.min_side}-{args.max_side} px) in {seconds:.2f} s on {torch.device(args.device)}")
    record = dict(device=args.device, n=len(imgs), sides=[args.min_side, args.max_side], starts=starts,
                  ours_s=seconds, ref_s=None)
    ref_py = os.environ.get("CELLPOSE_REF_PYTHON")
    if not ref_py:
        print("(set CELLPOSE_REF_PYTHON to a Python with cellpose==3.1.1.2 to compare with Cellpose 3)")
        write_json(args.json, "legacy_eval", **record, ref_error="no reference python (CELLPOSE_REF_PYTHON)")
        return
    with tempfile.TemporaryDirectory() as td:
        inp, out = Path(td) / "in.npz", Path(td) / "masks.npz"
        np.savez(inp, **{f"img{i:03d}": im for i, im in enumerate(imgs)})
        res = subprocess.run([ref_py, "-c", REF_TABLE_SCRIPT, str(inp), registry.resolve_model("cp_cyto").path,
                              str(out), args.device], capture_output=True, text=True)
        if res.returncode != 0:
            print("Cellpose 3 failed:\n" + res.stderr[-2000:])
            write_json(args.json, "legacy_eval", **record,
                       ref_error="Cellpose 3 failed: " + " ".join(res.stderr.split()[-30:]))
            return
        ref_s = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
        z = np.load(out)
        theirs = [z[f"arr_{i}"] for i in range(len(imgs))]
    aps = [ap50(a, b) if a.max() else float(b.max() == 0) for a, b in zip(theirs, ours)]
    same = sum(bool(np.array_equal(a, b)) for a, b in zip(theirs, ours))
    agree = sum(ap >= 0.99 for ap in aps)
    print(f"Cellpose 3.1.1.2: {ref_s:.2f} s; ours / Cellpose 3 = {seconds / ref_s:.2f}; masks agree (AP@0.5 >= 0.99) "
          f"{agree} / {len(imgs)}, identical {same}, smallest AP@0.5 {min(aps):.3f}")
    write_json(args.json, "legacy_eval", **{**record, "ref_s": ref_s}, agree=agree, identical=same,
               min_ap50=min(aps))


def _best(runs: list[dict]) -> dict:
    """The run with the smallest total wall time; (wall, cpu) seconds per phase."""
    return min(runs, key=lambda r: r["total"][0])


def speed(args) -> None:
    """Ours vs Cellpose 3.1.1.2: eval of cp_cyto on one whole-cell image, network and masks time."""
    import torch
    if args.threads:
        os.environ["CELLPOSE_WEB_THREADS"] = str(args.threads)
    shared = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))
    name, img, lab, ch, diam = next(images(1, args.size, shared))
    from cellpose_web.models import legacy
    cp = models.CellposeModel(pretrained_model="cp_cyto")
    t: dict = {}
    legacy.run_net, legacy._masks = stage_timer(t, "network", legacy.run_net), stage_timer(t, "masks", legacy._masks)
    runs = []
    for r in range(args.repeats + 1):
        w, c = time.perf_counter(), time.process_time()
        masks = cp.eval(img, channels=ch, channel_axis=-1, diameter=diam)[0]
        t["total"] = (time.perf_counter() - w, time.process_time() - c)
        if r:
            runs.append(dict(t))
    load = os.getloadavg()
    rows = {"ours": _best(runs)}
    print(f"cp_cyto eval, {name} {img.shape[0]}x{img.shape[1]}, {int(masks.max())} masks, diameter {diam:.1f}, "
          f"{torch.get_num_threads()} torch thread(s), best of {args.repeats}; load average {load[0]:.1f}")
    ref_py = os.environ.get("CELLPOSE_REF_PYTHON")
    same = None
    if ref_py:
        with tempfile.TemporaryDirectory() as td:
            inp, out = Path(td) / "in.npz", Path(td) / "masks.npy"
            np.savez(inp, img=img, ch=np.asarray(ch), diam=diam)
            res = subprocess.run([ref_py, "-c", REF_SPEED_SCRIPT, str(inp), registry.resolve_model("cp_cyto").path,
                                  str(out), str(args.repeats), str(args.threads or 0), str(Path(__file__).parent)],
                                 check=True, capture_output=True, text=True)
            rows["Cellpose 3.1.1.2"] = _best(json.loads(res.stdout.strip().splitlines()[-1])["runs"])
            same = bool(np.array_equal(np.load(out), masks))
    print(f"{'':<18} {'network wall/cpu s':>19} {'masks wall/cpu s':>17} {'total wall/cpu s':>17}")
    for who, r in rows.items():
        cells = [f"{r[k][0]:.2f} / {r[k][1]:.2f}" if k in r else "-" for k in ("network", "masks", "total")]
        print(f"{who:<18} {cells[0]:>19} {cells[1]:>17} {cells[2]:>17}")
    if len(rows) == 2:
        a, b = rows["ours"], rows["Cellpose 3.1.1.2"]
        print("ours / Cellpose 3 (cpu s): " + ", ".join(
            f"{k} {a[k][1] / b[k][1]:.2f}" for k in ("network", "masks", "total") if k in a and k in b)
            + f"; masks identical: {same}")
    else:
        print("(set CELLPOSE_REF_PYTHON to a Python with cellpose==3.1.1.2 to compare with Cellpose 3)")
    print(json.dumps({"load": load[0], "rows": rows, "identical": same}))


def images(n: int, size: int, shared: Path):
    """(name, image (Y, X, C), labels, channels, true diameter)."""
    styles = ["cyto_nuclei", "cyto_nuclei", "membrane", "cyto"]
    k = 0
    seed = 9000
    while k < n:
        rng = np.random.default_rng(seed)
        seed += 1
        style = styles[k % len(styles)]
        s = synthetic.synthetic_sample(rng, (size, size), style, diameter=float(rng.uniform(25, 55)))
        img = np.moveaxis(s.image, 0, -1)
        if style == "cyto_nuclei" and img.shape[-1] < 2:
            continue
        ch = [1, 2] if img.shape[-1] == 2 else [1, 0]
        yield f"synthetic_{style}_{seed - 1}", img, s.labels, ch, float(metrics_diameter(s.labels))
        k += 1
    ref = shared / "reference" / "cp3" / "cp3_eval.npz"
    if ref.is_file():
        z = np.load(ref)
        yield "cp3_rgb", z["rgb"], z["rgb_labels"], [2, 1], float(metrics_diameter(z["rgb_labels"]))
        yield "cp3_gray", z["gray"][..., None], z["gray_labels"], [0, 0], float(metrics_diameter(z["gray_labels"]))


def metrics_diameter(labels: np.ndarray) -> float:
    from cellpose_web.engine import dynamics
    return dynamics.diameters(labels)[0]


def ap50(truth, pred) -> float:
    return float(np.asarray(metrics.average_precision(truth, pred, threshold=[0.5])[0]).reshape(-1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="image side (256; 450 with --speed)")
    ap.add_argument("--speed", action="store_true", help="time eval against Cellpose 3 instead")
    ap.add_argument("--repeats", type=int, default=3, help="--speed: timed runs after the warm-up")
    ap.add_argument("--threads", type=int, default=0, help="--speed: torch threads (0 = the default)")
    ap.add_argument("--table", action="store_true", help="the GPU table's legacy U-Net rows instead (see above)")
    ap.add_argument("--device", default="cpu", help="--table: cpu or cuda[:N], ours and Cellpose 3's")
    ap.add_argument("--min-side", type=int, default=450, help="--table: smallest image side")
    ap.add_argument("--max-side", type=int, default=700, help="--table: largest image side")
    ap.add_argument("--json", default=None, help="--table: append the result as one JSON line to this file")
    args = ap.parse_args()
    if args.table:
        if args.threads:
            torch.set_num_threads(args.threads)
        table(args)
        return
    if args.speed:
        args.size = args.size or 450
        speed(args)
        return
    args.size = args.size or 256
    shared = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))
    cp = models.CellposeModel(pretrained_model="cp_cyto")
    size = models.SizeModel(cp)
    lite = models.CellposeModel(pretrained_model="lite")
    rows, ours = [], {}
    t0 = time.time()
    print(f"{'image':<28} {'cells':>5} {'diam':>5} {'AP cp_cyto':>10} {'est.diam':>8} {'AP est.':>7} {'AP lite':>7}")
    for name, img, lab, ch, diam in images(args.n, args.size, shared):
        m = cp.eval(img, channels=ch, channel_axis=-1, diameter=diam)[0]
        est = size.eval(img, channels=ch, channel_axis=-1)[0]
        m_est = cp.eval(img, channels=ch, channel_axis=-1, diameter=est)[0]
        m_lite = lite.eval(img, channel_axis=-1, diameter=None)[0]
        r = dict(name=name, n=int(lab.max()), diam=diam, ap=ap50(lab, m), est=est, ap_est=ap50(lab, m_est),
                 ap_lite=ap50(lab, m_lite), img=img, ch=ch)
        rows.append(r)
        ours[name] = m
        print(f"{name:<28} {r['n']:>5} {diam:>5.1f} {r['ap']:>10.3f} {est:>8.1f} {r['ap_est']:>7.3f} {r['ap_lite']:>7.3f}",
              flush=True)
    print(f"mean over {len(rows)} images: AP@0.5 cp_cyto {np.mean([r['ap'] for r in rows]):.3f} (true diameter), "
          f"{np.mean([r['ap_est'] for r in rows]):.3f} (size model); lite {np.mean([r['ap_lite'] for r in rows]):.3f}; "
          f"{time.time() - t0:.0f} s")
    ref_py = os.environ.get("CELLPOSE_REF_PYTHON")
    if not ref_py:
        print("(set CELLPOSE_REF_PYTHON to a Python with cellpose==3.1.1.2 to compare masks with Cellpose 3)")
        return
    with tempfile.TemporaryDirectory() as td:
        inp, out = Path(td) / "in.npz", Path(td) / "out.npz"
        np.savez(inp, **{f"img_{r['name']}": r["img"] for r in rows}, **{f"ch_{r['name']}": r["ch"] for r in rows},
                 **{f"diam_{r['name']}": r["diam"] for r in rows})
        subprocess.run([ref_py, "-c", REF_SCRIPT, str(inp), registry.resolve_model("cp_cyto").path, str(out)],
                       check=True, capture_output=True)
        theirs = np.load(out)
        print(f"{'image':<28} {'ours':>5} {'cp3':>5} {'AP ours vs cp3':>14} {'min IoU':>7} {'identical':>9}")
        for r in rows:
            a, b = theirs[r["name"]], ours[r["name"]]
            iou = metrics.mask_ious(a, b)[0] if a.max() else np.ones(1)
            print(f"{r['name']:<28} {int(b.max()):>5} {int(a.max()):>5} {ap50(a, b):>14.3f} {iou.min():>7.3f} "
                  f"{str(bool(np.array_equal(a, b))):>9}")
    print(json.dumps({"images": len(rows)}))


if __name__ == "__main__":
    main()
