"""Load test: N concurrent gradio_client clients segment different images on a running app.

    python benchmarks/load_app.py                       # launches the app in-process (model: --model)
    python benchmarks/load_app.py --url http://127.0.0.1:7860/ --clients 20 --requests 3

Every client checks that the masks it gets back belong to its own image (the image's name and
shape are echoed in the provenance); prints failures and p50/p95 latency.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(n: int, out: Path) -> list[Path]:
    base = tifffile.imread(REPO / "examples" / "u2os_nuclei.tif")
    paths = []
    for i in range(n):
        img = np.rot90(base, i % 4)[: 160 + 4 * i, : 150 + 3 * i].copy()
        p = out / f"client{i:02d}.tif"
        tifffile.imwrite(p, img)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="app URL (default: launch one in this process)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--model", default=None, help="model name for the requests (default: the app's default)")
    args = ap.parse_args(argv)
    from gradio_client import Client, handle_file

    demo = None
    url = args.url
    if url is None:
        import socket

        from cellpose_web.ui.app import build_app
        demo = build_app(default_model=args.model)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        url = f"http://127.0.0.1:{port}/"
    tmp = Path(tempfile.mkdtemp(prefix="load_"))
    paths = make_images(args.clients, tmp)
    lat: list[float] = []
    fails: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        c = Client(url, verbose=False)
        for _ in range(args.requests):
            t0 = time.perf_counter()
            try:
                masks_path, _, n, prov = c.predict(handle_file(str(paths[i])), args.model, None, 0.4, 0.0, None,
                                                   api_name="/segment")
                m = tifffile.imread(masks_path)
                shape = tifffile.imread(paths[i]).shape
                ok = prov["image"] == paths[i].name and m.shape == shape and int(n) == len(np.unique(m)) - 1
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if not ok:
                        fails.append(f"client {i}: got masks of {prov.get('image')} {m.shape}")
            except Exception as e:  # noqa: BLE001
                with lock:
                    fails.append(f"client {i}: {type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as ex:
        list(ex.map(client, range(args.clients)))
    wall = time.perf_counter() - t0
    if demo is not None:
        demo.close()
    lat.sort()
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
    print(f"{args.clients} clients x {args.requests} requests: {len(lat)} answered, {len(fails)} failed, "
          f"wall {wall:.1f} s; latency p50 {statistics.median(lat):.2f} s, p95 {q[18]:.2f} s")
    for f in fails:
        print("FAIL", f)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
