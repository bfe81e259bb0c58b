"""Cellpose-compatible name for :mod:`cellpose_web.models.train` (``from cellpose_web import train``)."""
from cellpose_web.models.train import *  # noqa: F401,F403
