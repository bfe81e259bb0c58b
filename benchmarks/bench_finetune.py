"""Fine-tuning `lite` with the Fine-tune tab's defaults: held-out AP@0.5 before/after and the time.

What the tab does, without the browser: 8 corrected images go into a training set, the service's
fine-tune job (`workflows.finetune.run_finetune`, the tab's defaults from `finetune_defaults("lite")`)
holds out 20 % of them, trains on the rest and reports AP@0.5 on those; this script also scores
6 more held-out images of the same kind with the base and the new model.

Images: `synthetic.whole_cell_sample` — whole cells with a dim cytoplasm around a bright nucleus,
where `lite` (trained on nuclei) finds only the nuclei, so AP@0.5 starts near 0. The CPU is shared
with other jobs on some machines: the load average is printed before and after, and the process's
CPU seconds next to the wall time.

    python benchmarks/bench_finetune.py [--threads 2] [--n_train 8] [--n_test 6] [--seed 0]

Prints numbers, never pass/fail.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n_train", type=int, default=8, help="images in the training set (20 %% held out by the job)")
    ap.add_argument("--n_test", type=int, default=6, help="further held-out images scored by this script")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ["CELLPOSE_WEB_HOME"] = tempfile.mkdtemp(prefix="bench_finetune_")
    os.environ["CELLPOSE_WEB_CPU"] = "1"

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cellpose_web.engine import metrics, synthetic
    from cellpose_web.models import CellposeModel
    from cellpose_web.workflows import finetune as training

    rng = np.random.default_rng(args.seed)
    samples = [synthetic.whole_cell_sample(rng, (256, 256), diameter=float(rng.uniform(25, 45)))
               for _ in range(args.n_train + args.n_test)]
    train_s, test_s = samples[:args.n_train], samples[args.n_train:]
    for i, smp in enumerate(train_s):
        training.add_pair("bench", smp.image[0], smp.labels, f"img{i:02d}")

    def ap50(model) -> float:
        preds = [model.eval(smp.image[0], diameter=None)[0] for smp in test_s]
        ap_, _, _, _ = metrics.average_precision([smp.labels for smp in test_s], preds, threshold=[0.5])
        return float(np.mean(ap_[:, 0]))

    recipe = training.finetune_defaults("lite")
    print(f"defaults for lite: {recipe['n_epochs']} epochs, lr {recipe['learning_rate']:g}, weight decay "
          f"{recipe['weight_decay']:g}, batch {recipe['batch_size']}, {recipe['bsize']} px crops, "
          f"at least {recipe['min_steps_per_epoch']} steps per epoch")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"torch threads {args.threads}")
    base_ap = ap50(CellposeModel(pretrained_model="lite"))

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = training.run_finetune("bench", "lite", "bench_lite_ft")  # the tab's defaults
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    new_ap = ap50(CellposeModel(pretrained_model=res["path"]))
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    meta = res["metadata"]
    print(f"fine-tune job: {len(meta['train_images'])} training images, {len(meta['test_images'])} held out; "
          f"{wall:.1f} s wall ({res['train_seconds']:.1f} s training), {cpu:.1f} CPU s "
          f"(= {cpu / args.threads:.1f} s on {args.threads} idle cores)")
    print(f"job's held-out AP@0.5:          {res['ap_before']:.3f} -> {res['ap_after']:.3f} "
          f"({res['ap_after'] - res['ap_before']:+.3f})")
    print(f"{len(test_s)} further held-out images AP@0.5: {base_ap:.3f} -> {new_ap:.3f} ({new_ap - base_ap:+.3f})")
    print(f"new model kept as the default: {res['is_default']}")


if __name__ == "__main__":
    main()
