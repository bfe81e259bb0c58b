"""Memory of the network passes: where large CPU allocations come from, what happens when GPU
memory runs short, and how many tiles go through the network at once.

- :func:`reuse_freed_memory`: on a CPU, large activations come from the heap (reused pass after
  pass) instead of fresh pages from the kernel.
- :class:`AdaptiveBatch`: the batch size of one eval's network passes. On an out-of-memory error
  from torch the memory is released (``torch.cuda.empty_cache()`` on CUDA), the batch halved and
  the failed batch run again, down to one tile at a time; then
  :class:`~cellpose_web.errors.OutOfMemoryError` says what to do. What happened is kept as a notice
  for the app and the command line ("GPU memory ran short: batch size lowered from 8 to 2").
- :func:`default_batch_size`: 8 on a CPU (as Cellpose); on a GPU chosen from its free memory (the
  rule is in the function's documentation).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import threading
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from cellpose_web.errors import OutOfMemoryError

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveBatch", "default_batch_size", "halve_on_out_of_memory", "is_out_of_memory", "release",
           "reuse_freed_memory", "CPU_BATCH_SIZE", "MAX_BATCH_SIZE", "FREE_MEMORY_FRACTION", "ACTIVATION_BYTES_PER_PIXEL"]


# --------------------------------------------------------------------------------------------
# CPU: large allocations from the heap
# --------------------------------------------------------------------------------------------
# glibc gives every allocation above 32 MB fresh pages from the kernel (mmap), and the network's
# activations are such allocations: at 4096^2 the kernel zeroed 3.9 M pages, a third of lite's
# network CPU time, and two threads faulting at once made it worse (2 torch threads: 14.8 s with
# 11.2 s of system time; 1024^2: 0.87 s). While the network runs, allocations therefore come from the
# heap (mallopt M_MMAP_MAX = 0, no trimming), where each pass reuses what the previous one freed;
# afterwards the defaults that glibc's own adaptive threshold reaches are set (mmap above 32 MB, trim
# above 64 MB) and the unused heap is returned to the system (malloc_trim). Measured on lite: 4096^2
# network 7.7 s (1024^2: 0.62 s) with 2 threads, 12.7 s vs 19.5 s on one; peak memory +70 MB on one
# thread, +340 MB on two (1.64 GB for the network step). A Cellpose 1-3 U-Net (cp_cyto) on 9 tiles of
# 224^2 in float32 (58 MB per full-size feature map) took 3.5 s of CPU instead of 5.3 s on one thread.
# Outputs are unchanged (only where memory comes from). A no-op off glibc.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_heap_lock = threading.Lock()
_heap_users = 0


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Serve large allocations from the heap (reused pass after pass) inside the ``with``."""
    global _heap_users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _heap_users == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _heap_users += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                libc.mallopt(_M_MMAP_MAX, 65536)
                libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)


# --------------------------------------------------------------------------------------------
# out of memory
# --------------------------------------------------------------------------------------------
def _oom_types() -> tuple[type, ...]:
    types = {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)}
    return tuple(t for t in types if isinstance(t, type))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory error (``torch.OutOfMemoryError``, alias
    ``torch.cuda.OutOfMemoryError``), matched by type. Apple's MPS backend raises a plain
    RuntimeError ("MPS backend out of memory"), the only case recognised by its message. A failed
    CPU allocation is not handled (it is a plain RuntimeError; halving the batch rarely helps there)."""
    if isinstance(exc, _oom_types()):
        return True
    return type(exc) is RuntimeError and str(exc).startswith("MPS backend out of memory")


def release(device: Any = None) -> None:
    """Give memory back after an out-of-memory error: collect garbage (the failed pass's tensors),
    then return the cached GPU blocks to the driver (CUDA: ``torch.cuda.empty_cache()``, MPS likewise).
    ``device`` None: whatever GPU this process has used."""
    gc.collect()
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if kind in (None, "mps"):
        mps = getattr(torch, "mps", None)
        with contextlib.suppress(Exception):
            if kind == "mps" or (mps is not None and torch.backends.mps.is_available()):
                mps.empty_cache()


def _memory_name(device: torch.device) -> str:
    return "GPU memory" if device.type in ("cuda", "mps", "xpu") else "memory"


T = TypeVar("T")


def halve_on_out_of_memory(attempt: Callable[[int], T], size: int, device: Any, *, at_one: str,
                           on_halved: Callable[[int], None] | None = None) -> tuple[T, int]:
    """Call ``attempt(size)``; on an out-of-memory error release the memory, halve ``size`` and call
    again: the one retry rule of evals (:class:`AdaptiveBatch`) and fine-tuning
    (``workflows.finetune.fine_tune``).

    Parameters
    ----------
    attempt : does the work with a batch of the given size (an int >= 1) and returns its result.
    size : the batch size to try first.
    device : where the work runs (the memory released between tries).
    at_one : the message of the :class:`~cellpose_web.errors.OutOfMemoryError` raised when a batch
        of 1 runs out of memory too (what the user can do).
    on_halved : called with the new size before each retry (e.g. to restore starting weights).

    Returns
    -------
    (attempt's result, the size that worked)

    Other errors pass through unchanged. The failed try's memory is released outside the ``except``
    block, once its frames (and tensors) have gone with the traceback.
    """
    size = max(1, int(size))
    while True:
        failed = None
        try:
            return attempt(size), size
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raised
            if not is_out_of_memory(e):
                raise
            failed = " ".join(str(e).split())[:300]
        release(device)
        if size == 1:
            logger.warning("out of memory with batch size 1: %s", failed)
            raise OutOfMemoryError(at_one) from None
        logger.warning("out of memory with batch size %d; going on with %d (%s)", size, size // 2, failed)
        size //= 2
        if on_halved is not None:
            on_halved(size)


class AdaptiveBatch:
    """The batch size of one eval's network passes, halved when memory runs short.

    Parameters
    ----------
    size : the batch size asked for (tiles, or whole images / planes, per network call).
    device : where the network runs.

    ``run(fn, x)`` calls ``fn`` on ``x`` (an array or tensor, items along the first axis) in pieces of
    at most ``size`` items and joins the outputs along the first axis (an item's output depends on
    that item only, so the result is that of one call). On an out-of-memory error (see
    :func:`is_out_of_memory`) the failed piece is run again with half the batch
    (:func:`halve_on_out_of_memory`); a piece of one item that does not fit raises
    :class:`~cellpose_web.errors.OutOfMemoryError`. ``size`` stays lowered for the rest of the eval.

    Attributes: ``requested``, ``size`` (now), ``notice`` (None, or what happened in words).
    """

    def __init__(self, size: int, device: Any = "cpu"):
        self.requested = self.size = max(1, int(size))
        self.device = torch.device(device)

    @property
    def notice(self) -> str | None:
        if self.size == self.requested:
            return None
        return (f"{_memory_name(self.device)} ran short: batch size lowered from {self.requested} to "
                f"{self.size} (same result, slower)")

    def _lower(self, size: int) -> None:
        self.size = size

    def run(self, fn: Callable[[Any], Any], x: Any) -> Any:
        n = len(x)
        at_one = (f"{_memory_name(self.device)} ran out even with batch size 1 (the run asked for "
                  f"{self.requested}): crop the image or segment it at a smaller scale (a larger diameter), "
                  "close other programs using the GPU, or run on a machine with more memory.")
        outs = []
        i = 0
        while i < n:
            out, k = halve_on_out_of_memory(
                lambda k: fn(x if (i == 0 and k == n) else x[i:i + k]),  # noqa: B023 - called right here
                min(self.size, n - i), self.device, at_one=at_one, on_halved=self._lower)
            outs.append(out)
            i += k
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], tuple):
            return tuple(_join([o[j] for o in outs]) for j in range(len(outs[0])))
        return _join(outs)


def _join(parts: list) -> Any:
    return torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# default batch size
# --------------------------------------------------------------------------------------------
CPU_BATCH_SIZE = 8  # Cellpose's default: on a CPU larger batches are no faster
MAX_BATCH_SIZE = 64  # a GPU is busy from about 32 tiles of 256^2; more only holds memory
FREE_MEMORY_FRACTION = 0.5  # of the free GPU memory, for the activations of one batch
#: peak memory of the live tensors of one forward pass, per input pixel, in float32 (bfloat16: half),
#: measured on the CPU with every tensor the pass creates tracked until freed: Cellpose 1-3 U-Net
#: (cyto3 / cp_cyto widths, 224^2 tile) 60.5 MiB per tile = 1,265 B/px; lite 26.6 MiB per 256^2 =
#: 425 B/px; Cellpose-SAM from its CUDA memory in bfloat16 (1.0 GB at batch 8, 3.7 GB at 64, weights
#: included: 48 MB per 256^2 tile = 730 B/px, 1,460 in float32). A model of unknown kind counts as
#: the largest.
ACTIVATION_BYTES_PER_PIXEL = {"cellpose3": 1265, "lite": 425, "cpsam": 1460}


def default_batch_size(device: Any, arch: str | None = None, bsize: int = 256,
                       dtype: torch.dtype = torch.float32, free_bytes: int | None = None) -> int:
    """The batch size of ``CellposeModel.eval(batch_size=None)``.

    CPU (and MPS, whose free memory torch does not report): ``CPU_BATCH_SIZE`` (8, as Cellpose).
    CUDA: the largest power of two, between 1 and ``MAX_BATCH_SIZE`` (64), whose activations fit in
    ``FREE_MEMORY_FRACTION`` (half) of the free GPU memory (``torch.cuda.mem_get_info``), a tile
    needing ``ACTIVATION_BYTES_PER_PIXEL[arch]`` x bsize² bytes (x 1/2 in bfloat16). The other half
    is left for cuDNN's workspaces, the blended outputs, the masks step and other processes; when it
    is not enough after all, :class:`AdaptiveBatch` halves the batch. E.g. Cellpose-SAM in bfloat16
    on a GPU with 10 GB free: 5 GB / 48 MB -> 64; with 1 GB free: 500 MB / 48 MB -> 8.

    ``free_bytes`` replaces the measured free memory (tests).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return CPU_BATCH_SIZE
    if free_bytes is None:
        try:
            free_bytes = int(torch.cuda.mem_get_info(dev)[0])
        except Exception as e:  # noqa: BLE001 - a driver that cannot say: Cellpose's default
            logger.info("free GPU memory unknown (%s); batch size %d", e, CPU_BATCH_SIZE)
            return CPU_BATCH_SIZE
    per_px = ACTIVATION_BYTES_PER_PIXEL.get(arch or "", max(ACTIVATION_BYTES_PER_PIXEL.values()))
    itemsize = torch.empty((), dtype=dtype).element_size()
    tile = per_px * itemsize / 4 * int(bsize) ** 2
    fit = int(FREE_MEMORY_FRACTION * free_bytes // max(1.0, tile))
    if fit < 1:
        return 1
    return int(min(MAX_BATCH_SIZE, 1 << (fit.bit_length() - 1)))
