"""The one rendering of results for people (label colours, outlines, overlays, image -> RGB), as the
saved pictures use it; the app shows these (:mod:`cellpose_web.io.render`)."""
from cellpose_web.io.render import OUTLINE_RGB, image_to_rgb, label_colors, overlay  # noqa: F401

__all__ = ["OUTLINE_RGB", "image_to_rgb", "label_colors", "overlay"]
