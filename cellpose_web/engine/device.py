"""Device, dtype and CPU-thread choices for the network."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from cellpose_web import config

logger = logging.getLogger(__name__)

__all__ = ["choose_device", "default_dtype", "available_cpus", "set_cpu_threads", "tensor_to_numpy"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:  # pragma: no cover - platform quirks
        return False


def choose_device(gpu: bool = False, device: torch.device | str | int | None = None) -> torch.device:
    """Pick the torch device.

    An explicit ``device`` ("cpu", "cuda", "cuda:1", "mps", a torch.device or a CUDA index) wins.
    ``gpu=True``: CUDA if available, else Apple MPS, else the CPU with a logged warning.
    ``gpu=False``: the CPU.
    """
    if device is not None:
        if isinstance(device, int):
            device = f"cuda:{device}"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            logger.warning("device %s requested but CUDA is not available; using the CPU", dev)
            return torch.device("cpu")
        if dev.type == "mps" and not _mps_available():
            logger.warning("device mps requested but MPS is not available; using the CPU")
            return torch.device("cpu")
        return dev
    if gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        logger.warning("gpu=True but no CUDA or MPS GPU is available: running on the CPU (slower)")
    return torch.device("cpu")


def default_dtype(device: torch.device | str, use_bfloat16: bool | None = None,
                  legacy: bool = False) -> torch.dtype:
    """Network dtype: bfloat16 on CUDA when ``use_bfloat16`` is None, float32 elsewhere.

    Cellpose 4 uses bf16 on every device by default; on a CPU without fast bf16 that is slow,
    and MPS (older torch) lacks bf16, so cellpose-web only defaults to bf16 on CUDA. Cellpose 1-3
    U-Nets (``legacy``) default to float32 on every device: Cellpose 3 runs them in float32 (it has
    no bfloat16 mode) and their masks are meant to match Cellpose 3's. An explicit True/False is
    honoured (True on MPS falls back to float32 with a warning).

    Parameters
    ----------
    device : the device the network runs on.
    use_bfloat16 : True / False, or None for the default above.
    legacy : the network is a Cellpose 1-3 U-Net.

    Returns
    -------
    torch.bfloat16 or torch.float32.
    """
    dev = torch.device(device)
    if use_bfloat16 is None:
        return torch.bfloat16 if dev.type == "cuda" and not legacy else torch.float32
    if use_bfloat16 and dev.type == "mps":
        logger.warning("bfloat16 is not supported on MPS by all torch versions; using float32")
        return torch.float32
    return torch.bfloat16 if use_bfloat16 else torch.float32


def available_cpus() -> int:
    """CPUs this process may use: affinity mask, limited by a cgroup CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for path in ("/sys/fs/cgroup/cpu.max",):
        try:
            quota, period = open(path).read().split()[:2]
            if quota != "max":
                n = min(n, max(1, int(int(quota) // int(period))))
        except (OSError, ValueError):
            pass
    try:
        q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        p = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        if q > 0 and p > 0:
            n = min(n, max(1, q // p))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads sensibly and return the number used.

    ``n`` given: use it. Otherwise ``CELLPOSE_WEB_THREADS`` if set, else the CPUs this process may
    use (:func:`available_cpus`); the current setting is only lowered (never raised) so a caller's
    ``torch.set_num_threads`` is respected, and ``OMP_NUM_THREADS`` set by the user wins.
    """
    if n is None:
        n = config.threads()
        if n is None:
            if os.environ.get("OMP_NUM_THREADS"):
                return torch.get_num_threads()
            n = min(torch.get_num_threads(), available_cpus())
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor on any device as a numpy array (numpy has no bfloat16: such tensors become float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()
