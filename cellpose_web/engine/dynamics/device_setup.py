"""Device setup for the dynamics loops: the torch device, and one intra-op thread on the CPU.

On the CPU the loops (hundreds of small torch ops) run with one intra-op thread: on a shared machine
torch's thread barriers made them 4-17x slower with 2 threads. Set the environment variable
CELLPOSE_WEB_DYNAMICS_THREADS (e.g. 2) to allow more on a dedicated machine.

Two implementations of the post-processing exist: the host one (numpy + small torch ops tuned for CPU
caches) and the device one (``device_path``: everything stays in torch tensors on the device, a constant
number of host syncs per image). CUDA uses the device one; ``DEVICE_PATH_ON_CPU`` (or the environment
variable CELLPOSE_WEB_DYNAMICS_DEVICE_PATH=1, or the context manager :func:`device_path_on_cpu`) runs it
on CPU tensors too, which is how the tests check it against the host one without a GPU."""
from __future__ import annotations

import contextlib
from typing import Iterator
import numpy as np
import torch
from cellpose_web import config
from cellpose_web.engine.device import tensor_to_numpy
from cellpose_web.errors import CellposeWebError


# Run the device implementation on the CPU as well (tests, benchmarks); read once from the environment.
DEVICE_PATH_ON_CPU: bool = config.env_flag("DYNAMICS_DEVICE_PATH")


def uses_device_path(device: torch.device) -> bool:
    """True when the post-processing for ``device`` takes the device implementation (CUDA, or any
    device while ``DEVICE_PATH_ON_CPU`` is set; MPS keeps the host one: it has no float64)."""
    return device.type == "cuda" or (DEVICE_PATH_ON_CPU and device.type != "mps")


@contextlib.contextmanager
def device_path_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Set ``DEVICE_PATH_ON_CPU`` to ``enabled`` inside the block (not thread-safe: a process-wide switch)."""
    global DEVICE_PATH_ON_CPU
    old = DEVICE_PATH_ON_CPU
    DEVICE_PATH_ON_CPU = enabled
    try:
        yield
    finally:
        DEVICE_PATH_ON_CPU = old


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def as_device(device) -> torch.device:
    """None -> CPU; a string or torch.device -> that device."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise CellposeWebError(f"Unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:0'.") from e
    raise CellposeWebError(f"device must be None, a string or a torch.device, not {type(device).__name__}.")


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[None]:
    """Limit torch intra-op threads (of this thread) while dynamics loops run on the CPU."""
    if device.type != "cpu":
        yield
        return
    want = config.dynamics_threads()
    cur = torch.get_num_threads()
    if want >= cur:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(cur)


def to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = tensor_to_numpy(x)
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists etc.
        raise CellposeWebError(f"{name} could not be read as an array ({e}).") from e
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise CellposeWebError(f"{name} must be a numeric array, got dtype {arr.dtype}.")
    return arr
