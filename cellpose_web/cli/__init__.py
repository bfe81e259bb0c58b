"""Command line: ``python -m cellpose_web`` with Cellpose 4's flags, plus ``serve``, ``models`` and ``batch``.

Segment a folder (writes ``_seg.npy`` and, as asked, ``_cp_masks.png/.tif``, outlines, flows, ROIs)::

    python -m cellpose_web --dir images/ --pretrained_model lite --save_png --save_txt --save_rois

Fine-tune (saves to ``images/models/<name>`` as Cellpose does, and registers a lab model)::

    python -m cellpose_web --train --dir train/ --test_dir val/ --pretrained_model lite --n_epochs 50 \
        --model_name_out nuclei_lab

Models::

    python -m cellpose_web models list
    python -m cellpose_web models add weights.pth --name nuclei_lab
    python -m cellpose_web models fetch mylab/models nuclei_v2 --name nuclei_v2
    python -m cellpose_web models push nuclei_lab mylab/models

The web app: ``python -m cellpose_web serve [--port 7860 ...]``.

One module per command: :mod:`.segment`, :mod:`.train`, :mod:`.models`, :mod:`.serve`, :mod:`.batch`,
:mod:`.hitl`; :mod:`.parser` holds the flags, :mod:`.common` what they share, :mod:`.main` the dispatch.

Exit status: 0 on success, 2 for bad input (one ``error: ...`` line on stderr), 1 for an
unexpected failure (one line; ``--verbose`` prints the traceback), 130 when interrupted.
"""
from __future__ import annotations

from cellpose_web.cli.main import main  # noqa: F401
from cellpose_web.cli.parser import build_parser  # noqa: F401

__all__ = ["main", "build_parser"]
