"""Atomic writes: a temporary file in the same folder, then ``os.replace``."""
from __future__ import annotations

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
