"""Cellpose-compatible name for :mod:`cellpose_web.engine.dynamics` (``from cellpose_web import dynamics``)."""
from cellpose_web.engine.dynamics import *  # noqa: F401,F403
from cellpose_web.engine.dynamics import __all__  # noqa: F401
