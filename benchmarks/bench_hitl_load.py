"""Does a learning round slow other users down? One process, as the app runs: a human-in-the-loop
round of ``lite`` (the CPU defaults) trains in the background while another user's 256x256
segmentation (``lite``, the app's per-image pipeline) runs every few seconds. Printed: the round's
minutes, and the segmentation's seconds before, during and after the round. No pass/fail.

    python benchmarks/bench_hitl_load.py [--images 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellpose_web.workflows import pipeline  # noqa: E402
from cellpose_web.engine import synthetic
from cellpose_web.workflows import hitl  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "u2os_nuclei.tif"


def segment_seconds(loaded: pipeline.LoadedModel, img: np.ndarray) -> float:
    t0 = time.perf_counter()
    pipeline.segment(loaded, img, {"diameter": None})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_hitl_load_"))
    (root / "images").mkdir()
    samples = [synthetic.whole_cell_sample(np.random.default_rng(i), (256, 256)) for i in range(a.images)]
    for i, s in enumerate(samples):
        tifffile.imwrite(root / "images" / f"cells{i}.tif", s.image[0])
    other = tifffile.imread(EXAMPLE)
    loaded = pipeline.get_model("lite")
    segment_seconds(loaded, other)  # warm-up
    before = [segment_seconds(loaded, other) for _ in range(a.repeats)]
    s = hitl.start_session("load", root / "images", "lite", root=root / "projects")
    shown = s.next_image()
    res = s.save_correction(samples[shown.index].labels)
    t0 = time.perf_counter()
    during = []
    while res.handle is not None and res.handle.running:
        during.append(segment_seconds(loaded, other))
        time.sleep(1.0)
    round_s = time.perf_counter() - t0
    after = [segment_seconds(loaded, other) for _ in range(a.repeats)]
    print(f"round 1 of lite: {round_s / 60:.2f} min ({s.status()['rounds'][-1].get('epochs_done')} epochs)")
    for name, xs in (("before", before), ("during the round", during), ("after", after)):
        if xs:
            print(f"another user's 256x256 segmentation {name}: median {np.median(xs):.2f} s, "
                  f"max {np.max(xs):.2f} s ({len(xs)} runs)")


if __name__ == "__main__":
    main()
