"""Where cellpose-web's files are: the shipped ones (built-in weights, example images) and the data
folder (``home_dir``).

In a source checkout the examples are the repository's top-level ``examples/`` folder; an
installed package (``pip install .``) carries them as ``cellpose_web/examples``.
"""
from __future__ import annotations

from pathlib import Path

from cellpose_web.config import home_dir  # noqa: F401 - one home: cellpose_web.config

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"


def examples_dir() -> Path:
    """Folder of the example images: the installed copy, else the checkout's ``examples/``.

    Returns the installed location when neither exists (callers check ``is_dir()``).
    """
    for folder in (PACKAGE_DIR / "examples", PACKAGE_DIR.parent / "examples"):
        if folder.is_dir():
            return folder
    return PACKAGE_DIR / "examples"
