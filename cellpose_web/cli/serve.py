"""``python -m cellpose_web serve``: the web app."""
from __future__ import annotations

from typing import Sequence
from cellpose_web.errors import CellposeWebError


# ----------------------------------------------------------------------------------------------
# serve / batch
# ----------------------------------------------------------------------------------------------
def run_serve(argv: Sequence[str]) -> int:
    try:
        from cellpose_web.ui.app import main as serve_main
    except ImportError as e:
        raise CellposeWebError(f"the web app is not available in this installation ({e})") from None
    return int(serve_main(list(argv)) or 0)
