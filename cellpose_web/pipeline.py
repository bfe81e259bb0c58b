"""Cellpose-compatible name for :mod:`cellpose_web.workflows.pipeline` (``from cellpose_web import pipeline``)."""
from cellpose_web.workflows.pipeline import *  # noqa: F401,F403
from cellpose_web.workflows.pipeline import __all__  # noqa: F401
