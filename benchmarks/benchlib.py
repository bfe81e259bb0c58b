"""What the benchmarks behind ``gpu_check.sh`` share: in-repository inputs, GPU timing and peak memory,
and the one JSON line per measurement that ``gpu_table.py`` turns into issue #23's table.

Inputs come from the repository (``tests/fixtures``, ``cellpose_web/weights``) unless the larger copies in
``../shared`` exist, so the GPU check runs on a machine that only has a copy of the repository.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = Path(os.environ.get("CELLPOSE_WEB_SHARED", REPO.parent / "shared"))
#: the Cellpose 1-3 U-Net (Cellpose 3's ``cyto`` layout) shipped with the package
CP_CYTO = REPO / "cellpose_web" / "weights" / "cp_cyto.pth"
#: a tiny Cellpose-SAM (width 64, depth 4) in the cpsam layout, made with Cellpose 4.2.1.1
TINY_CPSAM = FIXTURES / "reference" / "tiny_cpsam.pth"


def data_path(relative: str) -> Path:
    """``../shared/<relative>`` when it exists, else ``tests/fixtures/<relative>`` (crops of the same files).

    Parameters
    ----------
    relative : a path below ``shared/`` and ``tests/fixtures/``, e.g. ``"data/nuclei_2d/train"``.

    Returns
    -------
    The path to read.
    """
    shared = SHARED / relative
    return shared if shared.exists() else FIXTURES / relative


def sync(device: Any) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so wall clocks measure the work."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: Any) -> None:
    """Start a new peak of allocated GPU memory (a no-op off CUDA)."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: Any) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, in GB; None off CUDA."""
    import torch
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def device_name(device: Any) -> str:
    """The GPU's name (``NVIDIA H200``) on CUDA, else the device type (``cpu``)."""
    import torch
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def timed(fn: Any, device: Any) -> tuple[Any, float]:
    """(``fn()``, its wall seconds with the device's work synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def write_json(path: str | os.PathLike | None, stage: str, **fields: Any) -> None:
    """Append one result line ``{"stage": stage, **fields}`` to ``path`` (nothing when ``path`` is None).

    Parameters
    ----------
    path : the JSON-lines file of a benchmark's ``--json`` option.
    stage : which measurement this is (``gpu_table.py`` knows each by this name).
    fields : plain JSON values: numbers, strings, lists, dicts, None.
    """
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": stage, **fields}) + "\n")


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``TypeError: message`` on one line, at most ``limit`` characters (for a table cell)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


def stage_timer(times: dict[str, tuple[float, float]], name: str, fn: Any) -> Any:
    """``fn`` wrapped so that each call stores (wall s, CPU s) in ``times[name]``.

    Standard library only, so the reference packages' interpreters can import this file too (the
    benchmarks time the same stages of ours and of Cellpose with the same code).
    """
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return out
    return wrapped
