"""Images in, Cellpose files out; one module per job.

- :mod:`.read`: :func:`imread` / :func:`imread_with_meta` for TIFF (multi-page, ImageJ hyperstacks, OME),
  PNG, JPEG, GIF, BMP and ``.npy`` (a ``_seg.npy`` gives its masks). The format is taken from the
  file's first bytes, not its extension, and every failure is a :class:`CellposeWebError` that says
  what was wrong.
- :mod:`.masks`: :func:`save_masks`: ``<stem>_cp_masks.png/.tif``, ``<stem>_cp_outlines.txt``,
  ``<stem>_outlines_cp_masks.png``, ``<stem>_flows_cp_masks.tif``, ``_dP``, ``_cellprob``;
- :mod:`.seg_npy`: :func:`masks_flows_to_seg` writes ``<stem>_seg.npy`` with the keys Cellpose's GUI reads;
  :func:`load_seg` reads one with an unpickler that only builds numpy arrays, lists, dicts and plain
  values, so a crafted file cannot run code;
- :mod:`.rois`: :func:`save_rois`: ``<stem>_rois.zip`` of ImageJ polygon ROIs;
- :mod:`.outlines_text`: ``_cp_outlines.txt``; :mod:`.datasets`: image/label discovery for training;
- :mod:`.atomic`: every write is atomic (a temporary file in the same folder, then ``os.replace``);
- :mod:`.log`: ``logger_setup``; :mod:`.render`: label colours, outlines and overlays.

File names are Cellpose's, so the files open in Cellpose, Fiji, napari and CellProfiler."""
from __future__ import annotations

from cellpose_web.io.atomic import atomic_write, atomic_save  # noqa: F401
from cellpose_web.io.log import logger_setup  # noqa: F401
from cellpose_web.io.outlines_text import outlines_list, outlines_to_text, read_outlines_text  # noqa: F401
from cellpose_web.io.rois import save_rois, read_rois  # noqa: F401
from cellpose_web.io.masks import imsave, save_masks  # noqa: F401
from cellpose_web.io.seg_npy import masks_flows_to_seg, load_seg  # noqa: F401
from cellpose_web.io.read import ImageMeta, IMAGE_EXTENSIONS, imread, imread_with_meta  # noqa: F401
from cellpose_web.io.datasets import get_image_files, get_label_files, load_train_test_data  # noqa: F401

__all__ = ["logger_setup", "ImageMeta", "IMAGE_EXTENSIONS", "imread", "imread_with_meta", "imsave", "save_masks", "masks_flows_to_seg", "load_seg", "save_rois", "read_rois", "outlines_list", "outlines_to_text", "read_outlines_text", "get_image_files", "get_label_files", "load_train_test_data", "atomic_write"]
