"""File names, in one place: which extensions are images, and which name endings are masks or
outputs (never segmented as images). Every face (command line, Batch, uploads, training sets)
asks these, so a ``_dP.tif`` is treated the same everywhere."""
from __future__ import annotations

from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "FOLDER_IMAGE_EXTENSIONS", "UPLOAD_IMAGE_EXTENSIONS", "LABEL_EXTENSIONS",
           "OUTPUT_SUFFIXES", "file_stem", "is_mask_or_output"]

#: every extension ``io.imread`` reads (``.npy``: a ``_seg.npy`` gives its masks)
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".flex", ".dax", ".npy")
#: extensions Cellpose looks for in a folder (either case)
FOLDER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".flex", ".dax")
#: images the web app accepts as uploads (alone or in a zip)
UPLOAD_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: label images (masks) besides ``_seg.npy``
LABEL_EXTENSIONS = (".tif", ".tiff", ".png")
#: name endings (before the extension) of masks and of the files Cellpose and cellpose-web write
OUTPUT_SUFFIXES = ("_cp_masks", "_cp_output", "_flows", "_flows_0", "_flows_1", "_flows_2", "_cellprob",
                   "_masks", "_dP", "_outlines", "_seg")


def file_stem(path: str | Path) -> str:
    """The name without all its extensions (``a.ome.tif`` -> ``a``)."""
    p = Path(path)
    return p.name[: -len("".join(p.suffixes))] if p.suffixes else p.stem


def is_mask_or_output(stem: str, mask_filter: str | None = None) -> bool:
    """Whether a file with this stem is a mask or an output, not an image to segment (as Cellpose:
    ``_masks``, ``_cp_masks``, ``_seg``, flows, outlines pictures ...; ``mask_filter`` too)."""
    return (stem.endswith(OUTPUT_SUFFIXES) or bool(mask_filter and stem.endswith(mask_filter))
            or "_outlines_" in stem or stem.endswith("_cp_outlines"))
