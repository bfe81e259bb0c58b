"""Cellpose-compatible name for :mod:`cellpose_web.engine.metrics` (``from cellpose_web import metrics``)."""
from cellpose_web.engine.metrics import *  # noqa: F401,F403
from cellpose_web.engine.metrics import __all__  # noqa: F401
