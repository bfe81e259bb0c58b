"""Whole-cell accuracy of the built-in `cp_cyto` (a Cellpose 1-3 U-Net) and agreement with Cellpose 3.1.1.2.

Images: two-channel whole-cell images (cytoplasm or membrane + nuclei) from cellpose_web/engine/synthetic.py
with seeds the models never saw, plus the two labelled images of ../shared/reference/cp3 (not
training images of either model). Prints AP@0.5 per image and the mean, for `cp_cyto` with the
true diameter, with its size model (diameter estimated), and for `lite` for comparison.

With ``CELLPOSE_REF_PYTHON`` pointing to a Python that has cellpose==3.1.1.2, the same weights are run
there on the same images and the agreement of the masks is printed (AP@0.5 of ours against theirs,
smallest matched IoU). Numbers only, no pass/fail.

    python benchmarks/bench_cp_cyto.py [--n 8] [--size 256]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellpose_web.engine import metrics, synthetic  # noqa: E402
from cellpose_web import models, registry

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
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
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
