"""cellpose-web: Cellpose 4 (Cellpose-SAM) in torch/numpy, with a browser app for a lab."""

__version__ = "0.1.0"

from cellpose_web.errors import CellposeWebError  # noqa: F401
