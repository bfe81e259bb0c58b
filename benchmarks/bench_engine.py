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

``--table`` measures the GPU table's rows of issue #23 instead (``gpu_check.sh`` runs it): the ViT-L forward
in bf16 at ``--forward-batches`` (tiles/s, peak GPU memory, largest output difference) and ``.eval`` with
``compute_masks=False``, batch 8, of ``--eval-sizes`` images and a ``--eval-3d Z SIDE`` stack (do_3D), ours
and the reference's, each engine in one process that warms up first; ``--weights`` names the Cellpose-SAM
checkpoint (``--make-weights PATH`` writes the random ViT-L one), ``--json FILE`` appends one JSON line per
row (stages ``vit_forward`` and ``cpsam_eval``).

On a machine shared with other jobs, ``--threads 1`` gives steadier ratios: with 2 threads, every
parallel op waits for the thread that shares its core with the other job.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))
TINY = SHARED / "reference" / "tiny_cpsam.pth"
if not TINY.exists():  # a copy of the repository alone: its fixture is the same file
    TINY = REPO / "tests" / "fixtures" / "reference" / "tiny_cpsam.pth"


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
# the --table measurements: one text, executed by both engines' workers, so both are timed alike
# ----------------------------------------------------------------------------------------------
TABLE_MEASURE = r'''
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)

def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)

def _peak_gb(dev):
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None

def measure_forwards(net, dev, batches, repeat, output):
    """Tiles/s of the network on random 256 px tiles (seed 0) per batch size, after a warm-up at that size."""
    rows, rng = [], np.random.default_rng(0)
    net.eval()
    dtype = next(net.parameters()).dtype
    with torch.inference_mode():
        for b in batches:
            x = torch.from_numpy(rng.normal(0.5, 0.3, (b, 3, 256, 256)).astype(np.float32)).to(dev).to(dtype)
            _reset_peak(dev)
            net(x)
            _sync(dev)
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                y = net(x)[0]
                _sync(dev)
                times.append(time.perf_counter() - t)
            attention = getattr(net, "attention_in_use", None)  # ours: the kernel "auto" picked for this batch
            rows.append({"batch": b, "seconds": min(times), "tiles_per_s": b / min(times), "peak_gb": _peak_gb(dev),
                         "params": sum(p.numel() for p in net.parameters()),
                         "attention": attention() if callable(attention) else None})
            if b == batches[0]:
                np.save(output, y[:8].float().cpu().numpy())
            del x, y
    return rows

def measure_evals(model, dev, inputs, warmup):
    """Seconds of .eval (batch 8, compute_masks=False) per input, after a warm-up eval of a small image."""
    model.eval(np.load(warmup), batch_size=8, diameter=30, compute_masks=False)
    rows = []
    for item in inputs:
        img = np.load(item["path"])
        _reset_peak(dev)
        t = time.perf_counter()
        model.eval(img, batch_size=8, diameter=30, compute_masks=False, **item["kw"])
        _sync(dev)
        rows.append({"label": item["label"], "seconds": time.perf_counter() - t, "peak_gb": _peak_gb(dev)})
        del img
    return rows

def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
'''


# ----------------------------------------------------------------------------------------------
# the reference runner (executed by the reference python; it imports the published cellpose)
# ----------------------------------------------------------------------------------------------
REF_SAM_PATCH = r'''
import functools
import torch


def patch_sam_registry(weights):
    """Cellpose 4 builds a ViT-L encoder only; for a smaller checkpoint in the cpsam layout (the tiny
    fixture) make its registry build the SAM encoder with the checkpoint's shape."""
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    D = sd["encoder.pos_embed"].shape[-1]
    if D == 1024:
        return
    import cellpose.vit as cvit
    from segment_anything.modeling import ImageEncoderViT
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    hd = sd["encoder.blocks.0.attn.rel_pos_h"].shape[1]
    rows = [sd[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    glob = [i for i, r in enumerate(rows) if r == max(rows)] if len(set(rows)) > 1 else list(range(depth))

    class _Sam:
        def __init__(self, enc):
            self.image_encoder = enc

    def reg(checkpoint=None):
        return _Sam(ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=D, depth=depth, num_heads=D // hd,
                                    mlp_ratio=sd["encoder.blocks.0.mlp.lin1.weight"].shape[0] / D, out_chans=256,
                                    qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                                    use_rel_pos=True, global_attn_indexes=glob, window_size=14))
    cvit.sam_model_registry = {"vit_l": reg}
'''

REF_RUNNER = REF_SAM_PATCH + r'''
import sys, json, time, resource
import numpy as np
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
dev = torch.device(args["device"])
patch_sam_registry(args["weights"])
from cellpose import models
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model = models.CellposeModel(pretrained_model=args["weights"], device=dev, use_bfloat16=args["bf16"])
out = {"torch": torch.__version__}
if args["task"] in ("forwards", "evals"):
    exec(args["measure"])
    out["device_name"] = device_name(dev)
    if args["task"] == "forwards":
        out["rows"] = measure_forwards(model.net, dev, args["batches"], args["repeat"], args["output"])
    else:
        out["rows"] = measure_evals(model, dev, args["inputs"], args["warmup"])
elif args["task"] == "forward":
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
    if args["task"] in ("forwards", "evals"):
        ns: dict = {"np": np, "torch": torch, "time": time}
        exec(TABLE_MEASURE, ns)
        out["device_name"] = ns["device_name"](dev)
        if args["task"] == "forwards":
            out["rows"] = ns["measure_forwards"](model.net, dev, args["batches"], args["repeat"], args["output"])
        else:
            out["rows"] = ns["measure_evals"](model, dev, args["inputs"], args["warmup"])
    elif args["task"] == "forward":
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


def _run_or_error(cmd: list[str], env=None, timeout=3600) -> tuple[dict | None, str | None]:
    """(the worker's RESULT, None), or (None, the last line of what it printed) when it failed."""
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall"] = time.perf_counter() - t
            return r, None
    tail = (p.stderr or p.stdout)[-1500:]
    print(f"   (run failed, rc={p.returncode}): {tail}")
    last = [ln for ln in tail.splitlines() if ln.strip()]
    return None, f"rc={p.returncode}: " + (last[-1].strip()[:300] if last else "no output")


def _run(cmd: list[str], env=None, timeout=3600) -> dict | None:
    return _run_or_error(cmd, env, timeout)[0]


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


def _table_inputs(tmp: Path, sizes: list[int], stack: list[int]) -> list[dict]:
    """The eval inputs of ``--table``: square images of ``sizes`` (a 512 px picture of blobs, tiled) and a
    (Z, SIDE, SIDE) stack of it when ``stack`` is [Z, SIDE] with Z > 0; saved as .npy under ``tmp``."""
    import numpy as np
    tile = _blobs((512, 512), 120, 6, 1)
    items = []
    for n in sizes:
        path = tmp / f"eval_{n}.npy"
        np.save(path, np.tile(tile, (-(-n // 512), -(-n // 512)))[:n, :n])
        items.append({"label": f"{n}x{n}", "path": str(path), "kw": {}})
    if stack and stack[0] > 0:
        z, side = stack
        plane = np.tile(tile, (-(-side // 512), -(-side // 512)))[:side, :side]
        rng = np.random.default_rng(5)
        vol = plane[None] * rng.uniform(0.8, 1.2, (z, 1, 1)).astype(np.float32)
        path = tmp / "eval_3d.npy"
        np.save(path, vol.astype(np.float32))
        items.append({"label": f"{z}x{side}x{side} 3D", "path": str(path), "kw": {"z_axis": 0, "do_3D": True}})
    return items


def table(args: argparse.Namespace, ours: Any, theirs: Any, tmp: Path) -> None:
    """``--table``: the ViT-L forward and the Cellpose-SAM eval rows of issue #23's GPU table, ours and the
    reference's, printed and (``--json``) written as one JSON line per row."""
    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import write_json

    weights = args.weights or str(TINY)
    base = dict(threads=args.threads, device=args.device, bf16=args.device.startswith("cuda"), weights=weights,
                measure=TABLE_MEASURE, repeat=args.repeat)
    print(f"weights {weights}; device {args.device}; bf16 {base['bf16']}")
    if args.forward_batches:
        task = {**base, "task": "forwards", "batches": args.forward_batches}
        (o, o_err), (r, r_err) = ours({**task, "output": str(tmp / "fw_ours.npy")}), \
            theirs({**task, "output": str(tmp / "fw_ref.npy")})
        diff = float(np.abs(np.load(tmp / "fw_ours.npy") - np.load(tmp / "fw_ref.npy")).max()) if o and r else None
        for i, b in enumerate(args.forward_batches):
            row_o, row_r = (x["rows"][i] if x else None for x in (o, r))
            print(f"forward B={b:<4d} ours {_fmt_fw(row_o, o_err)} | ref {_fmt_fw(row_r, r_err)}"
                  + (f" | max |diff| (first batch) {diff:.3g}" if diff is not None else ""))
            write_json(args.json, "vit_forward", batch=b, weights=Path(weights).name, device=args.device,
                       device_name=(o or r or {}).get("device_name", args.device), ours=row_o, ref=row_r,
                       ours_error=o_err, ref_error=r_err, max_diff=diff)
    items = _table_inputs(tmp, args.eval_sizes, args.eval_3d)
    if items:
        np.save(tmp / "warmup.npy", _blobs((256, 256), 30, 6, 2))
        task = {**base, "task": "evals", "inputs": items, "warmup": str(tmp / "warmup.npy"), "output": ""}
        (o, o_err), (r, r_err) = ours(task), theirs(task)
        for i, item in enumerate(items):
            row_o, row_r = (x["rows"][i] if x else None for x in (o, r))
            ratio = f" | ours/ref {row_o['seconds'] / row_r['seconds']:.2f}" if row_o and row_r else ""
            print(f"eval {item['label']:<18s} ours {_fmt_ev(row_o, o_err)} | ref {_fmt_ev(row_r, r_err)}{ratio}")
            write_json(args.json, "cpsam_eval", label=item["label"], weights=Path(weights).name, device=args.device,
                       ours=row_o, ref=row_r, ours_error=o_err, ref_error=r_err)


def _fmt_fw(row: dict | None, err: str | None) -> str:
    if row is None:
        return f"failed ({err})" if err else "-"
    mem = f", {row['peak_gb']:.1f} GB" if row.get("peak_gb") is not None else ""
    return f"{row['seconds']:.4f} s, {row['tiles_per_s']:.1f} tiles/s{mem}"


def _fmt_ev(row: dict | None, err: str | None) -> str:
    if row is None:
        return f"failed ({err})" if err else "-"
    mem = f", {row['peak_gb']:.1f} GB" if row.get("peak_gb") is not None else ""
    return f"{row['seconds']:.2f} s{mem}"


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
    ap.add_argument("--table", action="store_true", help="the GPU table's forward and eval rows (see above)")
    ap.add_argument("--weights", default=None, help="--table: Cellpose-SAM checkpoint (default: the tiny fixture)")
    ap.add_argument("--make-weights", default=None, metavar="PATH", help="write random ViT-L weights and exit")
    ap.add_argument("--forward-batches", type=int, nargs="*", default=[8, 64], help="--table: forward batch sizes")
    ap.add_argument("--eval-sizes", type=int, nargs="*", default=[1024, 2048, 4096], help="--table: eval image sides")
    ap.add_argument("--eval-3d", type=int, nargs=2, default=[32, 512], metavar=("Z", "SIDE"),
                    help="--table: the do_3D stack (Z 0: none)")
    ap.add_argument("--json", default=None, help="--table: append one JSON line per row to this file")
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
    if args.make_weights:
        sys.path.insert(0, str(REPO))
        make_full_weights(args.make_weights)
        print(f"random ViT-L Cellpose-SAM weights written to {args.make_weights}")
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

    if args.table:
        def run_ours(task: dict) -> tuple[dict | None, str | None]:
            return _run_or_error([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)],
                                 env=env)

        def run_theirs(task: dict) -> tuple[dict | None, str | None]:
            if ref is None:
                return None, "no reference python (CELLPOSE_REF_PYTHON with cellpose 4.2.1.1)"
            return _run_or_error([ref, "-c", REF_RUNNER, json.dumps(task)],
                                 env={k: v for k, v in env.items() if k != "PYTHONPATH"})
        table(args, run_ours, run_theirs, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        return

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
