"""What the app does when it starts: recover from a killed server (jobs left 'running' are marked
interrupted; half-written lab models are removed), and where the example images are."""
from __future__ import annotations

import logging

from cellpose_web import registry
from cellpose_web.resources import examples_dir  # noqa: F401 - the app's example images
from cellpose_web.service import jobs

log = logging.getLogger("cellpose_web.ui")

__all__ = ["recover_after_restart", "examples_dir"]


def recover_after_restart() -> None:
    """Mark jobs a killed server left 'running' as interrupted; drop half-written lab models."""
    try:
        fixed = jobs.manager(None).recover()
        if fixed:
            log.warning("jobs interrupted by the last shutdown: %s", ", ".join(map(str, fixed)))
    except Exception:  # noqa: BLE001 - never block start-up
        log.exception("job recovery failed")
    try:
        removed = registry.cleanup_incomplete()
        if removed:
            log.warning("removed incomplete lab model folders: %s", ", ".join(removed))
    except Exception:  # noqa: BLE001
        log.exception("registry cleanup failed")
