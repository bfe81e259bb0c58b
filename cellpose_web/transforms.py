"""Cellpose-compatible name for :mod:`cellpose_web.engine.transforms` (``from cellpose_web import transforms``)."""
from cellpose_web.engine.transforms import *  # noqa: F401,F403
from cellpose_web.engine.transforms import __all__  # noqa: F401
