"""Where cellpose-web's files are: the shipped ones (built-in weights, example images) and the data
folder (``home_dir``).

In a source checkout the examples are the repository's top-level ``examples/`` folder; an
installed package (``pip install .``) carries them as ``cellpose_web/examples``.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"


def home_dir() -> Path:
    """``$CELLPOSE_WEB_HOME`` (default ``~/.cellpose_web``): lab models, training sets, jobs, run.log."""
    return Path(os.environ.get("CELLPOSE_WEB_HOME") or "~/.cellpose_web").expanduser()


def examples_dir() -> Path:
    """Folder of the example images: the installed copy, else the checkout's ``examples/``.

    Returns the installed location when neither exists (callers check ``is_dir()``).
    """
    for folder in (PACKAGE_DIR / "examples", PACKAGE_DIR.parent / "examples"):
        if folder.is_dir():
            return folder
    return PACKAGE_DIR / "examples"
