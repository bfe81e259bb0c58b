"""Benchmark the Cellpose-SAM engine: network forward and ``.eval``, ours vs the reference Cellpose 4.

Usage::

    python benchmarks/bench_engine.py                 # tiny + full-size forward, eval of a 512x512 image
    python benchmarks/bench_engine.py --quick         # tiny network only (seconds)
    CELLPOSE_REF_PYTHON=/work/refvenv/bin/python python benchmarks/bench_engine.py

Every measurement runs in a fresh subprocess (so peak RSS belongs to that measurement alone),
with the same weights and inputs for both engines: the tiny checkpoint of the reference
fixtures (``../shared/reference/tiny_cpsam.pth``) and a full-size ViT-L Cellpose-SAM with random
weights (seed 0, written once to a temporary file). When ``CELLPOSE_REF_PYTHON`` (or
``/work/refvenv/bin/python``) has ``cellpose==4.2.1.1`` installed, the reference runs in it and the
script prints the ratio ours/reference and the largest absolute output difference.
On a CUDA machine it also reports tiles/s and images/s in bf16. No asserts: it only prints.

On a machine shared with other jobs, ``--threads 1`` gives steadier ratios: with 2 threads, every
parallel op waits for the thread that shares its core with the other job.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))
TINY = SHARED / "reference" / "tiny_cpsam.pth"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _blobs(shape, n, r, seed):
    import numpy as np
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.zeros(shape, np.float32)
    for _ in range(n):
        cy, cx = g.uniform(0, shape[0]), g.uniform(0, shape[1])
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32) * g.uniform(100, 1000)
    return img + g.normal(0, 5, shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the reference runner (executed by the reference python; it imports the published cellpose)
# ----------------------------------------------------------------------------------------------
REF_RUNNER = r'''
import sys, json, time, resource, functools
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
dev = torch.device(args["device"])
sd = torch.load(args["weights"], map_location="cpu", weights_only=True)
D = sd["encoder.pos_embed"].shape[-1]
import cellpose.vit as cvit
if D != 1024:   # a small network with the cpsam layout: build the SAM encoder with its shape
    from segment_anything.modeling import ImageEncoderViT
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    hd = sd["encoder.blocks.0.attn.rel_pos_h"].shape[1]
    rows = [sd[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    glob = [i for i, r in enumerate(rows) if r == max(rows)] if len(set(rows)) > 1 else list(range(depth))
    class _Sam:
        def __init__(self, enc): self.image_encoder = enc
    def reg(checkpoint=None):
        return _Sam(ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=D, depth=depth, num_heads=D // hd,
                                    mlp_ratio=sd["encoder.blocks.0.mlp.lin1.weight"].shape[0] / D, out_chans=256,
                                    qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                                    use_rel_pos=True, global_attn_indexes=glob, window_size=14))
    cvit.sam_model_registry = {"vit_l": reg}
from cellpose import models
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model = models.CellposeModel(pretrained_model=args["weights"], device=dev, use_bfloat16=args["bf16"])
out = {"torch": torch.__version__}
if args["task"] == "forward":
    x = torch.from_numpy(np.load(args["input"])).to(dev)
    net = model.net
    net.eval()
    with torch.no_grad():
        net(x[:1].to(net.dtype))
        if dev.type == "cuda": torch.cuda.synchronize()
        times = []
        for _ in range(args["repeat"]):
            t = time.perf_counter()
            y = net(x.to(net.dtype))[0]
            if dev.type == "cuda": torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    np.save(args["output"], y.float().cpu().numpy())
    out["seconds"] = min(times)
else:
    img = np.load(args["input"])
    kw = args["eval_kwargs"]
    t = time.perf_counter()
    masks, flows, styles = model.eval(img, **kw)
    out["seconds"] = time.perf_counter() - t
    np.savez(args["output"], dP=flows[1], cellprob=flows[2], masks=np.asarray(masks))
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["model_rss_mb"] = rss0
print("RESULT " + json.dumps(out))
'''


def _ours_worker(args: dict) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(args["threads"])
    from cellpose_web.models import CellposeModel
    dev = torch.device(args["device"])
    model = CellposeModel(pretrained_model=args["weights"], device=dev, use_bfloat16=args["bf16"])
    out = {"torch": torch.__version__}
    if args["task"] == "forward":
        x = torch.from_numpy(np.load(args["input"])).to(dev)
        net = model.net
        with torch.inference_mode():
            net(x[:1])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times = []
            for _ in range(args["repeat"]):
                t = time.perf_counter()
                y = net(x)[0]
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        np.save(args["output"], y.float().cpu().numpy())
        out["seconds"] = min(times)
    else:
        img = np.load(args["input"])
        t = time.perf_counter()
        masks, flows, styles = model.eval(img, **args["eval_kwargs"])
        out["seconds"] = time.perf_counter() - t
        out["timing"] = {k: round(v, 3) for k, v in model.last_timing.items()}
        np.savez(args["output"], dP=flows[1], cellprob=flows[2], masks=np.asarray(masks))
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def make_full_weights(path: str, seed: int = 0) -> None:
    """Random full-size (ViT-L) Cellpose-SAM weights with the cpsam layout, written to ``path``."""
    import torch
    from cellpose_web.engine.nets.vit_sam import CPSAMNet
    torch.manual_seed(seed)
    net = CPSAMNet()
    with torch.no_grad():
        net.encoder.pos_embed.normal_(0, 0.02)
        for blk in net.encoder.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.02)
            blk.attn.rel_pos_w.normal_(0, 0.02)
    torch.save(net.state_dict(), path)


def _run(cmd: list[str], env=None, timeout=3600) -> dict | None:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall"] = time.perf_counter() - t
            return r
    tail = (p.stderr or p.stdout)[-1500:]
    print(f"   (run failed, rc={p.returncode}): {tail}")
    return None


def _ref_python() -> str | None:
    cand = os.environ.get("CELLPOSE_REF_PYTHON") or "/work/refvenv/bin/python"
    if not Path(cand).exists():
        return None
    try:
        r = subprocess.run([cand, "-c", "import cellpose, segment_anything; print(cellpose.version)"],
                           capture_output=True, text=True, timeout=300)
    except Exception:
        return None
    return cand if r.returncode == 0 else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny network only")
    ap.add_argument("--batch", type=int, default=8, help="tiles per forward batch (default 8)")
    ap.add_argument("--full-batch", type=int, default=None, help="tiles per batch for the full-size network")
    ap.add_argument("--repeat", type=int, default=1, help="timed repeats of each forward (min is reported)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("CELLPOSE_WEB_THREADS", "2")))
    ap.add_argument("--no-full-eval", action="store_true", help="skip the full-size .eval of 512x512")
    ap.add_argument("--no-masks", action="store_true", help="eval with compute_masks=False")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    if args.worker:
        sys.path.insert(0, str(REPO))
        w = json.loads(args.worker)
        if w["task"] == "make_weights":
            make_full_weights(w["output"])
            print("RESULT " + json.dumps({"ok": True}))
            return
        print("RESULT " + json.dumps(_ours_worker(w)))
        return

    import numpy as np
    import platform
    ref = _ref_python()
    print(f"cellpose-web engine benchmark  (python {platform.python_version()}, {args.threads} threads, "
          f"device {args.device}, cpus {os.cpu_count()})")
    print(f"reference: {ref or 'not available (set CELLPOSE_REF_PYTHON to a python with cellpose==4.2.1.1)'}")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    tmp = Path(tempfile.mkdtemp(prefix="cpweb_bench_"))
    masks = not args.no_masks
    if masks:
        try:
            import importlib
            sys.path.insert(0, str(REPO))
            importlib.import_module("cellpose_web.engine.dynamics")
        except Exception:
            masks = False
            print("note: cellpose_web.dynamics not importable, eval runs with compute_masks=False")

    def ours(task: dict) -> dict | None:
        return _run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)], env=env)

    def theirs(task: dict) -> dict | None:
        if ref is None:
            return None
        return _run([ref, "-c", REF_RUNNER, json.dumps(task)], env={k: v for k, v in env.items()
                                                                        if k != "PYTHONPATH"})

    rows = []

    def compare(label: str, task: dict, out_ext: str) -> None:
        o_out, r_out = str(tmp / f"ours_{label}{out_ext}"), str(tmp / f"ref_{label}{out_ext}")
        o = ours({**task, "output": o_out})
        r = theirs({**task, "output": r_out})
        line = f"{label:34s}"
        if o:
            line += f" ours {o['seconds']:8.2f} s  peak RSS {o['peak_rss_mb']:7.0f} MB"
        if r:
            line += f" | ref {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB"
        if o and r:
            line += f" | time ratio ours/ref {o['seconds'] / r['seconds']:.3f}, RSS ratio " \
                    f"{o['peak_rss_mb'] / r['peak_rss_mb']:.3f}"
            try:
                if out_ext == ".npy":
                    a, b = np.load(o_out), np.load(r_out)
                    line += f" | max |diff| {np.abs(a - b).max():.2e}"
                else:
                    a, b = np.load(o_out), np.load(r_out)
                    line += f" | max |diff| dP {np.abs(a['dP'] - b['dP']).max():.2e} cellprob " \
                            f"{np.abs(a['cellprob'] - b['cellprob']).max():.2e}"
                    ma, mb = a["masks"], b["masks"]
                    if ma.size and mb.size:
                        line += f" | masks ours {int(ma.max())} ref {int(mb.max())} objects"
            except Exception as e:  # pragma: no cover
                line += f" | diff failed: {e}"
        if o and "timing" in o:
            line += f" | ours stages {o['timing']}"
        print(line, flush=True)
        rows.append((label, o, r))

    bf16 = args.device.startswith("cuda")
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 0.3, (args.batch, 3, 256, 256)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    img512 = _blobs((512, 512), 120, 6, 1)
    np.save(tmp / "img512.npy", img512)
    base = dict(threads=args.threads, device=args.device, bf16=bf16, repeat=args.repeat)
    ev = dict(diameter=30, compute_masks=masks)

    print("\n-- tiny Cellpose-SAM (width 64, depth 4), fixture weights --")
    compare(f"forward tiny B={args.batch}", {**base, "task": "forward", "weights": str(TINY),
                                             "input": str(tmp / "x.npy")}, ".npy")
    compare("eval tiny 512x512", {**base, "task": "eval", "weights": str(TINY), "input": str(tmp / "img512.npy"),
                                  "eval_kwargs": ev}, ".npz")
    if not args.quick:
        print("\n-- full-size Cellpose-SAM (ViT-L, 305 M parameters), random weights, fp32 on CPU --")
        wpath = str(tmp / "cpsam_random.pth")
        ours({"task": "make_weights", "output": wpath})
        fb = args.full_batch or args.batch
        np.save(tmp / "xf.npy", x[:fb])
        compare(f"forward full B={fb}", {**base, "task": "forward", "weights": wpath,
                                         "input": str(tmp / "xf.npy")}, ".npy")
        if not args.no_full_eval:
            compare("eval full 512x512", {**base, "task": "eval", "weights": wpath, "input": str(tmp / "img512.npy"),
                                          "eval_kwargs": ev}, ".npz")
        try:
            os.remove(wpath)
        except OSError:
            pass
    if args.device.startswith("cuda"):
        print("\n-- GPU throughput (bf16) --")
        for label, o, r in rows:
            if label.startswith("forward"):
                n = int(label.split("B=")[1])
                s = f"{label:34s} ours {n / o['seconds']:.1f} tiles/s" if o else label
                if r:
                    s += f" | ref {n / r['seconds']:.1f} tiles/s"
                print(s)
            elif label.startswith("eval") and o:
                s = f"{label:34s} ours {1 / o['seconds']:.2f} images/s"
                if r:
                    s += f" | ref {1 / r['seconds']:.2f} images/s"
                print(s)
    print(f"\n(temporary files in {tmp})")


if __name__ == "__main__":
    main()
