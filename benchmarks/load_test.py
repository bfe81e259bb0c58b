"""Load test: N concurrent gradio_client clients segment different images on a running app.

Each client segments its own crops of the validation images through the app's ``/segment`` API
and checks that the masks it gets back are exactly those of its own image (computed beforehand in
this process with the same service code). Prints every failure, p50/p95/max latency and the
throughput; exits non-zero if any request failed or returned someone else's masks.

    python benchmarks/load_test.py                       # starts an app on a free port, 20 clients
    python benchmarks/load_test.py --url http://127.0.0.1:7860/ --clients 20 --requests 2
    python benchmarks/load_test.py --clients 6 --size 96 --bad-clients 2   # + clients sending junk

Without --url the app is started in a subprocess (``python -m cellpose_web serve``) with a
temporary CELLPOSE_WEB_HOME. Model: ``lite`` when its weights are built, else the random tiny
Cellpose-SAM checkpoint of the reference folder with permissive thresholds (masks are random
but not empty, which is what matters for telling the clients' results apart).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))
VAL = SHARED / "data" / "nuclei_2d" / "val"
VAL_NAMES = ["2022-10-14-U2OS-1", "2022-05-26-RPE1-2198", "2023-05-31-misc-4"]


@dataclass
class Job:
    client: int
    path: Path
    ref: np.ndarray


@dataclass
class Outcome:
    client: int
    name: str
    seconds: float
    ok: bool
    error: str = ""
    n_cells: int = 0


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    bad: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.ok)

    def pct(self, q: float) -> float:
        lat = self.latencies
        if not lat:
            return float("nan")
        return float(np.percentile(lat, q))

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> str:
        lat = self.latencies
        n = len(self.outcomes)
        lines = [f"requests: {n}, failed: {len(self.failures)}, wrong-image results: "
                 f"{sum(1 for o in self.failures if o.error.startswith('masks differ'))}",
                 f"latency p50 {self.pct(50):.2f} s, p95 {self.pct(95):.2f} s, max {max(lat) if lat else float('nan'):.2f} s, "
                 f"mean {statistics.fmean(lat) if lat else float('nan'):.2f} s",
                 f"wall {self.wall_s:.1f} s, throughput {n / self.wall_s if self.wall_s else 0:.2f} images/s"]
        if self.bad:
            lines.append(f"junk requests: {len(self.bad)}, refused with a message: "
                         f"{sum(1 for o in self.bad if o.ok)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# inputs and reference masks
# ----------------------------------------------------------------------------------------------
def make_crops(out: Path, n: int, size: int, val_dir: Path = VAL) -> list[Path]:
    """n different size x size crops of the validation images (varied offsets), as TIFFs."""
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    imgs = [tifffile.imread(val_dir / f"{v}.tif") for v in VAL_NAMES]
    paths = []
    rng = np.random.default_rng(1)
    for k in range(n):
        img = imgs[k % len(imgs)]
        y = int(rng.integers(0, img.shape[0] - size))
        x = int(rng.integers(0, img.shape[1] - size))
        p = out / f"crop{k:03d}_{VAL_NAMES[k % len(imgs)][:10]}_{y}_{x}.tif"
        tifffile.imwrite(p, img[y:y + size, x:x + size])
        paths.append(p)
    return paths


def model_choice(reference_dir: Path = SHARED / "reference") -> tuple[str, float, float]:
    """(model, flow_threshold, cellprob_threshold) for the test."""
    from cellpose_web import registry

    if registry.builtin_path("lite").is_file():
        return "lite", 0.4, 0.0
    return str(reference_dir / "tiny_cpsam.pth"), 0.0, -6.0


def reference_masks(paths: list[Path], model: str, flow: float, cellprob: float) -> list[np.ndarray]:
    """Masks of each image computed here with the service code the app runs."""
    from cellpose_web.workflows import inputs
    from cellpose_web.workflows.segment import SegmentParams, segment

    out = []
    for p in paths:
        li = inputs.read_image(p)
        res = segment(li.data, SegmentParams(flow_threshold=flow, cellprob_threshold=cellprob), model,
                      image_name=p.name)
        out.append(np.asarray(res.masks))
    return out


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path, model: str, port: int | None = None, timeout: float = 240.0,
              env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m cellpose_web serve` on 127.0.0.1 in a subprocess; returns (process, url) once it answers."""
    port = port or free_port()
    env = dict(os.environ)
    env.update({"CELLPOSE_WEB_HOME": str(home), "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
                "GRADIO_ANALYTICS_ENABLED": "False"})
    env.update(env_extra or {})
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cellpose_web", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--model", model], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(home))
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}; see {home / 'server.log'}:\n"
                               + (home / "server.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(url + "config", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not answer within {timeout:.0f} s")


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ----------------------------------------------------------------------------------------------
# the clients
# ----------------------------------------------------------------------------------------------
def _client_loop(url: str, cid: int, jobs: list[Job], model: str, flow: float, cellprob: float,
                 barrier: threading.Barrier, out: list[Outcome]) -> None:
    import tifffile
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    barrier.wait()
    for job in jobs:
        t0 = time.perf_counter()
        try:
            masks_path, _csv, n, prov = client.predict(handle_file(str(job.path)), model, None, flow, cellprob, None,
                                                       api_name="/segment")
            dt = time.perf_counter() - t0
            m = tifffile.imread(masks_path)
            if prov.get("image") != job.path.name:
                out.append(Outcome(cid, job.path.name, dt, False, f"provenance names {prov.get('image')!r}"))
            elif m.shape != job.ref.shape or not np.array_equal(m, job.ref):
                out.append(Outcome(cid, job.path.name, dt, False, "masks differ from this image's own masks"))
            elif int(n) != int(len(np.unique(job.ref[job.ref > 0]))):
                out.append(Outcome(cid, job.path.name, dt, False, f"n_cells {n} != {job.ref.max()}"))
            else:
                out.append(Outcome(cid, job.path.name, dt, True, n_cells=int(n)))
        except Exception as e:  # noqa: BLE001 - counted as a failed request
            out.append(Outcome(cid, job.path.name, time.perf_counter() - t0, False,
                               f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))


def _bad_client_loop(url: str, cid: int, paths: list[Path], model: str, barrier: threading.Barrier,
                     out: list[Outcome]) -> None:
    """Sends junk files: each must come back as an error with a readable message (no traceback)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    barrier.wait()
    for p in paths:
        t0 = time.perf_counter()
        try:
            client.predict(handle_file(str(p)), model, None, 0.4, 0.0, None, api_name="/segment")
            out.append(Outcome(cid, p.name, time.perf_counter() - t0, False, "junk was accepted"))
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            ok = "Traceback" not in msg
            out.append(Outcome(cid, p.name, time.perf_counter() - t0, ok, msg[:200]))


def junk_files(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"junk_text.png": b"this is not a picture\n" * 20, "junk_empty.tif": b"",
             "junk_html.tif": b"<html><body>hello</body></html>"}
    paths = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    return paths


def warm_up(url: str, path: Path, model: str, flow: float, cellprob: float) -> float:
    """One untimed request so the app has its model loaded (as a running lab server would)."""
    from gradio_client import Client, handle_file

    t0 = time.perf_counter()
    Client(url, verbose=False).predict(handle_file(str(path)), model, None, flow, cellprob, None, api_name="/segment")
    return time.perf_counter() - t0


def run_load(url: str, paths: list[Path], refs: list[np.ndarray], model: str, flow: float, cellprob: float,
             n_clients: int, requests_per_client: int = 1, bad_clients: int = 0, junk: list[Path] | None = None
             ) -> Report:
    """Drive the app at `url`: client i segments images i, i+n, ... (each its own); all start together."""
    jobs: list[list[Job]] = [[] for _ in range(n_clients)]
    for c in range(n_clients):
        for r in range(requests_per_client):
            k = (c + r * n_clients) % len(paths)
            jobs[c].append(Job(c, paths[k], refs[k]))
    outcomes: list[Outcome] = []
    bad: list[Outcome] = []
    barrier = threading.Barrier(n_clients + bad_clients + 1)
    threads = [threading.Thread(target=_client_loop, args=(url, c, jobs[c], model, flow, cellprob, barrier, outcomes))
               for c in range(n_clients)]
    threads += [threading.Thread(target=_bad_client_loop, args=(url, 1000 + b, junk or [], model, barrier, bad))
                for b in range(bad_clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    rep = Report(outcomes, bad, time.perf_counter() - t0)
    return rep


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running app (default: start one here)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=1, help="requests per client")
    ap.add_argument("--size", type=int, default=128, help="crop side in px")
    ap.add_argument("--bad-clients", type=int, default=0, help="extra clients that send junk files")
    ap.add_argument("--model", default=None, help="model name or path (default: lite, else tiny_cpsam)")
    ap.add_argument("--flow", type=float, default=None)
    ap.add_argument("--cellprob", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads here (reference masks)")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cpweb_load_"))
    home = work / "home"
    home.mkdir()
    os.environ["CELLPOSE_WEB_HOME"] = str(home)
    os.environ.setdefault("CELLPOSE_WEB_CPU", "1")
    model, flow, cellprob = model_choice()
    model = args.model or model
    flow = flow if args.flow is None else args.flow
    cellprob = cellprob if args.cellprob is None else args.cellprob
    n_img = args.clients * args.requests
    paths = make_crops(work / "images", n_img, args.size)
    t = time.perf_counter()
    refs = reference_masks(paths, model, flow, cellprob)
    print(f"model {Path(model).name}: {n_img} reference segmentations of {args.size}x{args.size} in "
          f"{time.perf_counter() - t:.1f} s (median {int(np.median([r.max() for r in refs]))} masks per image)",
          flush=True)
    proc = None
    try:
        url = args.url
        if url is None:
            t = time.perf_counter()
            proc, url = start_app(home, model, env_extra={"CELLPOSE_WEB_THREADS": str(args.threads)})
            print(f"app up at {url} in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        warm = warm_up(url, paths[0], model, flow, cellprob)
        print(f"warm-up request (loads the model in the app): {warm:.1f} s", flush=True)
        rep = run_load(url, paths, refs, model, flow, cellprob, args.clients, args.requests, args.bad_clients,
                       junk_files(work / "junk") if args.bad_clients else None)
    finally:
        if proc is not None:
            stop_app(proc)
    for o in rep.failures:
        print(f"FAILED client {o.client} {o.name}: {o.error}")
    for o in rep.bad:
        print(f"junk {o.name}: {'refused' if o.ok else 'NOT REFUSED CLEANLY'}: {o.error[:150]}")
    print(f"{args.clients} concurrent clients x {args.requests} request(s), {args.size}x{args.size} images")
    print(rep.summary())
    if args.json:
        Path(args.json).write_text(json.dumps({"clients": args.clients, "requests": len(rep.outcomes),
                                               "failed": len(rep.failures), "p50_s": rep.pct(50),
                                               "p95_s": rep.pct(95), "wall_s": rep.wall_s}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not rep.failures and all(o.ok for o in rep.bad) else 1


if __name__ == "__main__":
    raise SystemExit(main())
