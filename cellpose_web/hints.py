"""Short name for :mod:`cellpose_web.workflows.hints` (``cellpose_web.hints.suggest``)."""
from cellpose_web.workflows.hints import suggest  # noqa: F401
