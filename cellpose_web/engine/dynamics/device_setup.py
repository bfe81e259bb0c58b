"""Device setup for the dynamics loops: the torch device, and one intra-op thread on the CPU.

On the CPU the loops (hundreds of small torch ops) run with one intra-op thread: on a shared machine
torch's thread barriers made them 4-17x slower with 2 threads. Set the environment variable
CELLPOSE_WEB_DYNAMICS_THREADS (e.g. 2) to allow more on a dedicated machine."""
from __future__ import annotations

import contextlib
from typing import Iterator
import numpy as np
import torch
from cellpose_web import config
from cellpose_web.errors import CellposeWebError


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
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists etc.
        raise CellposeWebError(f"{name} could not be read as an array ({e}).") from e
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise CellposeWebError(f"{name} must be a numeric array, got dtype {arr.dtype}.")
    return arr
