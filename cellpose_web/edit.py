"""Cellpose-compatible name for :mod:`cellpose_web.engine.edit` (``from cellpose_web import edit``)."""
from cellpose_web.engine.edit import *  # noqa: F401,F403
from cellpose_web.engine.edit import __all__  # noqa: F401
