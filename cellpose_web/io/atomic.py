"""Atomic writes: a temporary file in the same folder, then ``os.replace``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def atomic_save(path: str | os.PathLike, writer: Callable[[str], Any]) -> Path:
    """Write a file atomically through a writer that takes a path (tifffile, np.save, zipfile).

    ``writer(tmp)`` writes a temporary file in the same folder (same suffix, so writers that
    add an extension do not); it is then synced and renamed over ``path`` (``os.replace``), so
    readers see either the old file or the complete new one, never half a file. On error the
    temporary file is removed and the old file is untouched. Returns the final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file atomically: ``write(fh)`` gets an open temporary file (see :func:`atomic_save`)."""
    def writer(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write(fh)

    return atomic_save(path, writer)


# --------------------------------------------------------------------------------------------
# JSON: the one writer (status files, model metadata, provenance)
# --------------------------------------------------------------------------------------------
def json_default(o):
    """numpy numbers and arrays, paths and anything else as JSON (``str`` as the last resort)."""
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def json_text(obj: Any, indent: int = 2, sort_keys: bool = False, default: Callable = json_default) -> str:
    """``obj`` as JSON text, numpy values and paths included (:func:`json_default`; ``default=str``
    writes every other value as its text, as the provenance and model files always have)."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = False,
               default: Callable = json_default) -> Path:
    """Write ``obj`` as JSON atomically (the one way JSON files are written)."""
    data = json_text(obj, indent, sort_keys, default).encode()
    return atomic_write(path, lambda fh: fh.write(data))
