"""Saving masks and pictures with Cellpose's file names: ``imsave`` and ``save_masks`` (``_cp_masks``,
``_cp_outlines.txt``, ``_outlines_cp_masks.png``, ``_flows_cp_masks.tif``, ``_dP``, ``_cellprob``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from cellpose_web.engine.dynamics.labels import label_dtype
from cellpose_web.engine import dynamics
from cellpose_web.io import render
from cellpose_web.errors import CellposeWebError
from cellpose_web.io.atomic import atomic_write
from cellpose_web.io.outlines_text import outlines_list, outlines_to_text

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def imsave(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Save an array as TIFF (zlib) or PNG (by the extension), atomically."""
    path = Path(path)
    arr = np.asarray(arr)
    ext = path.suffix.lower()
    if ext in (".tif", ".tiff"):
        import tifffile

        def w(fh):
            photometric = "rgb" if (arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8) else None
            tifffile.imwrite(fh, arr, compression="zlib", photometric=photometric)

        return atomic_write(path, w)
    if ext in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
        from PIL import Image

        fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF"}[ext]
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype.kind in "ui" and arr.dtype.itemsize > 1 and arr.ndim == 2:
            if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
                raise CellposeWebError(f"'{path.name}': values outside 0..65535 cannot be saved as PNG; use .tif")
            arr = arr.astype(np.uint16)
        img = Image.fromarray(np.ascontiguousarray(arr))
        return atomic_write(path, lambda fh: img.save(fh, format=fmt))
    if ext == ".npy":
        return atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))
    raise CellposeWebError(f"Cannot save '{path.name}': unknown extension '{ext}' (use .tif, .png or .npy).")


def _image_to_rgb(image: np.ndarray | None, shape2d: tuple[int, int]) -> np.ndarray:
    """(Y, X, 3) uint8 view of a (Y, X), (Y, X, C) or (C, Y, X) image for the saved overlays
    (:func:`cellpose_web.render.image_to_rgb`, the app's rendering); black when it cannot be shown."""
    try:
        img = np.asarray(image)
        if img.ndim == 3 and img.shape[-2:] == tuple(shape2d) and img.shape[0] <= 4 and img.shape[:2] != tuple(shape2d):
            img = np.moveaxis(img, 0, -1)
        rgb = render.image_to_rgb(img)
    except (TypeError, ValueError):  # an image we cannot show (None, 5-D, odd dtype): draw on black
        return np.zeros((*shape2d, 3), np.uint8)
    if rgb.shape[:2] != tuple(shape2d):
        rgb = resize_nearest(rgb, shape2d, (0, 1))
    return rgb


def resize_nearest(a: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of the given axes of ``a`` to ``shape``."""
    out = a
    for ax, n in zip(axes, shape):
        if out.shape[ax] != n:
            idx = np.minimum((np.arange(n) * out.shape[ax] / n).astype(int), out.shape[ax] - 1)
            out = np.take(out, idx, axis=ax)
    return out


def split_flows(flows: Any, mshape: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(rgb, dP, cellprob) from Cellpose-4 style flows [RGB, dP, cellprob, ...] (any may be missing)."""
    if flows is None:
        return None, None, None
    rgb = dP = cp = None
    seq = list(flows) if isinstance(flows, (list, tuple)) else [flows]
    for f in seq:
        if f is None or (isinstance(f, (list, tuple)) and len(f) == 0):
            continue
        f = np.asarray(f)
        if f.dtype == np.uint8 and f.shape[-1] == 3 and rgb is None:
            rgb = f
        elif f.ndim == len(mshape) + 1 and f.shape[0] in (2, 3) and f.dtype != np.uint8 and dP is None:
            dP = f
        elif f.ndim == len(mshape) and f.dtype != np.uint8 and cp is None:
            cp = f
    return rgb, dP, cp


def save_masks(
    images: np.ndarray | list,
    masks: np.ndarray | list,
    flows: Any,
    file_names: str | os.PathLike | list,
    png: bool = True,
    tif: bool = False,
    channels: Sequence[int] = (0, 0),
    suffix: str = "_cp_masks",
    save_flows: bool = False,
    save_outlines: bool = False,
    dir_above: bool = False,
    in_folders: bool = False,
    savedir: str | os.PathLike | None = None,
    save_txt: bool = False,
    save_mpl: bool = False,
) -> list[Path]:
    """Save masks (and optional outlines/flows) with Cellpose's file names.

    Parameters
    ----------
    images : the image(s) that were segmented, (Y, X), (Y, X, C) or (Z, ...), or a list.
    masks : uint16/uint32 labels (Y, X) or (Z, Y, X), or a list.
    flows : per image, Cellpose 4's ``[rgb (Y, X, 3) uint8, dP (2, Y, X), cellprob (Y, X)]`` (or None).
    file_names : the image path(s); outputs are named ``<stem><suffix>.png`` etc.
    png, tif : mask formats. 3D masks and > 65535 masks are always saved as TIFF.
    save_txt : ``<stem>_cp_outlines.txt`` (one ``x0,y0,x1,y1,...`` line per mask).
    save_outlines : ``<stem>_outlines<suffix>.png`` (red outlines on the normalised image).
    save_flows : ``<stem>_flows<suffix>.tif`` (RGB), ``<stem>_dP<suffix>.tif``, ``<stem>_cellprob<suffix>.tif``.
    save_mpl : ``<stem>_cp_output<suffix>.png`` (image | outlines | masks | flows panel).
    dir_above, in_folders, savedir : where to save, as in Cellpose.

    Returns
    -------
    list of the paths written.
    """
    if isinstance(masks, (list, tuple)):
        n = len(masks)
        images_l = images if isinstance(images, (list, tuple)) else [images] * n
        flows_l = flows if isinstance(flows, (list, tuple)) and len(flows) == n else [None] * n
        names = file_names if isinstance(file_names, (list, tuple)) else [file_names] * n
        written: list[Path] = []
        for img, m, f, fn in zip(images_l, masks, flows_l, names):
            written += save_masks(img, m, f, fn, png=png, tif=tif, channels=channels, suffix=suffix,
                                  save_flows=save_flows, save_outlines=save_outlines, dir_above=dir_above,
                                  in_folders=in_folders, savedir=savedir, save_txt=save_txt, save_mpl=save_mpl)
        return written

    masks = np.asarray(masks)
    if masks.dtype.kind not in "ui" and masks.dtype != np.bool_:
        raise CellposeWebError(f"masks must be integer labels, got dtype {masks.dtype}")
    file_name = Path(file_names)
    if masks.ndim > 2 and not tif:
        tif = True  # 3D masks cannot be PNG; Cellpose refuses, we just switch to TIFF
        png = False
    written: list[Path] = []
    if masks.size == 0 or masks.max() == 0:
        logger.warning("no masks found in %s, will not save PNG, outlines or flows", file_name.name)
        if not tif:
            return written
        png = save_outlines = save_flows = save_txt = save_mpl = False
    if savedir is None:
        savedir = file_name.resolve().parent.parent if dir_above else file_name.resolve().parent
    savedir = Path(savedir)
    base = file_name.stem if file_name.suffix.lower() != ".npy" else file_name.name[: -len(".npy")]
    if in_folders:
        maskdir, outlinedir, txtdir, flowdir = (savedir / "masks", savedir / "outlines",
                                                savedir / "txt_outlines", savedir / "flows")
    else:
        maskdir = outlinedir = txtdir = flowdir = savedir
    mmax = int(masks.max()) if masks.size else 0
    if masks.ndim > 2:
        png, tif = False, True
    exts = []
    if png:
        if mmax < 2**16:
            exts.append(".png")
        else:
            logger.warning("more than 65535 masks in %s: saving TIF instead of PNG", file_name.name)
            tif = True
    if tif:
        exts.append(".tif")
    mask_out = masks.astype(label_dtype(mmax))
    for ext in exts:
        written.append(imsave(maskdir / f"{base}{suffix}{ext}", mask_out))

    if masks.ndim == 2 and save_txt:
        written.append(outlines_to_text(txtdir / base, outlines_list(mask_out)))
    if masks.ndim == 2 and (save_outlines or save_mpl):
        rgb = _image_to_rgb(images, masks.shape)
        overlay = render.overlay(rgb, mask_out, show_masks=False, show_outlines=True)
        if save_outlines:
            written.append(imsave(outlinedir / f"{base}_outlines{suffix}.png", overlay))
        if save_mpl:
            written.append(imsave(savedir / f"{base}_cp_output{suffix}.png",
                                  _summary_panel(rgb, overlay, mask_out, flows)))
    if save_flows:
        frgb, dP, cp = split_flows(flows, masks.shape)
        if frgb is None and dP is not None:
            frgb = dynamics.dx_to_circ(dP)
        if frgb is not None:
            written.append(imsave(flowdir / f"{base}_flows{suffix}.tif", np.asarray(frgb, np.uint8)))
        if dP is not None:
            written.append(imsave(flowdir / f"{base}_dP{suffix}.tif", np.asarray(dP, np.float32)))
        if cp is not None:
            written.append(imsave(flowdir / f"{base}_cellprob{suffix}.tif", np.asarray(cp, np.float32)))
    return written


def _summary_panel(rgb: np.ndarray, overlay: np.ndarray, masks: np.ndarray, flows: Any) -> np.ndarray:
    """image | outlines | coloured masks | flow picture, side by side (uint8 RGB)."""
    blend = render.overlay(rgb, masks, show_masks=True, show_outlines=False, alpha=0.5)
    frgb, dP, _ = split_flows(flows, masks.shape)
    if frgb is None and dP is not None:
        frgb = dynamics.dx_to_circ(dP)
    if frgb is None:
        frgb = np.zeros_like(rgb)
    frgb = resize_nearest(np.asarray(frgb, np.uint8), masks.shape, (0, 1))
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, overlay, gap, blend, gap, frgb], axis=1)
