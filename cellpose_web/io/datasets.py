"""Training data discovery as Cellpose: image and label files in a folder, train/test loading."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence
import numpy as np
from cellpose_web.errors import CellposeWebError
from cellpose_web.io.seg_npy import load_seg
from cellpose_web.io.names import FOLDER_IMAGE_EXTENSIONS, is_mask_or_output
from cellpose_web.io.read import imread


# --------------------------------------------------------------------------------------------
# folders of images / training data
# --------------------------------------------------------------------------------------------
def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(s))]


def get_image_files(folder: str | os.PathLike, mask_filter: str = "_masks", imf: str | None = None,
                    look_one_level_down: bool = False) -> list[str]:
    """Image files in a folder (natural sort), skipping masks/flows/outputs as Cellpose does.

    Parameters
    ----------
    folder : the folder.
    mask_filter : stems ending with this are label files and are skipped.
    imf : only images whose stem ends with this (Cellpose's ``--img_filter``).
    look_one_level_down : also look in the folder's sub-folders.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"Folder not found: {folder}")
    if not folder.is_dir():
        raise CellposeWebError(f"'{folder}' is not a folder.")
    folders = [folder]
    if look_one_level_down:
        folders += sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: _natural_key(p.name))
    mf = (mask_filter or "").split(".")[0]  # "_seg.npy" -> "_seg"
    files = []
    for d in folders:
        for p in d.iterdir():
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() not in FOLDER_IMAGE_EXTENSIONS:
                continue
            stem = p.stem
            if is_mask_or_output(stem, mf):
                continue
            if imf and not stem.endswith(imf):
                continue
            files.append(p)
    files.sort(key=lambda p: _natural_key(str(p)))
    if not files:
        raise CellposeWebError(
            f"No images found in '{folder}'" + (f" ending with '{imf}'" if imf else "")
            + ". Supported: " + ", ".join(FOLDER_IMAGE_EXTENSIONS) + "."
        )
    return [str(p) for p in files]


def get_label_files(image_names: Sequence[str], mask_filter: str = "_masks", imf: str | None = None,
                    ) -> tuple[list[str], list[str] | None]:
    """Label file for each image: ``<stem without imf><mask_filter>`` + .tif/.tiff/.png, or a ``_seg.npy``.

    Returns
    -------
    (label_names, flow_names) : flow_names lists ``<stem>_flows.tif`` files when every image has
    one, else None. A missing label file raises CellposeWebError naming it.
    """
    labels, flows = [], []
    missing = []
    for name in image_names:
        p = Path(name)
        stem = p.stem
        if imf and stem.endswith(imf):
            stem = stem[: -len(imf)]
        cands = []
        if mask_filter.endswith(".npy"):
            cands.append(p.parent / f"{stem}{mask_filter}")
        else:
            cands += [p.parent / f"{stem}{mask_filter}{e}" for e in (".tif", ".tiff", ".png", ".TIF", ".TIFF", ".PNG")]
            cands.append(p.parent / f"{stem}_seg.npy")
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            missing.append(f"{stem}{mask_filter}")
            continue
        labels.append(str(found))
        fl = p.parent / f"{stem}_flows.tif"
        flows.append(str(fl) if fl.exists() else None)
    if missing:
        raise CellposeWebError(
            f"{len(missing)} image(s) have no label file, e.g. '{missing[0]}.tif'. Each image NAME.tif needs "
            f"NAME{mask_filter}.tif (or .png) or NAME_seg.npy beside it."
        )
    return labels, (flows if all(f is not None for f in flows) else None)


def _read_labels(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        m = load_seg(path)["masks"]
    else:
        m = imread(path)
    m = np.asarray(m)
    if m.ndim == 3 and m.shape[-1] in (3, 4) and m.dtype == np.uint8:
        m = m[..., 0]
    if m.dtype.kind == "f":
        if not np.all(np.isfinite(m)) or np.any(m != np.round(m)) or m.min() < 0:
            raise CellposeWebError(f"label file '{Path(path).name}' must hold whole-number labels (0 = background)")
        m = m.astype(np.int64)
    if m.dtype.kind == "b":
        from scipy import ndimage as ndi

        m = ndi.label(m)[0]
    return m


def load_train_test_data(train_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None,
                         image_filter: str | None = None, mask_filter: str = "_masks",
                         look_one_level_down: bool = False) -> tuple:
    """Images and labels from Cellpose-style folders (``NAME.tif`` + ``NAME_masks.tif`` or ``NAME_seg.npy``).

    Returns
    -------
    (images, labels, image_names, test_images, test_labels, test_image_names) : lists of arrays
    (labels as integer (Y, X) masks) and file names; the test entries are None without test_dir.
    """
    def load(folder):
        names = get_image_files(folder, mask_filter, imf=image_filter, look_one_level_down=look_one_level_down)
        label_names, _ = get_label_files(names, mask_filter, imf=image_filter)
        images = [imread(n) for n in names]
        labels = [_read_labels(n) for n in label_names]
        for n, im, lb in zip(names, images, labels):
            if lb.shape != im.shape[: lb.ndim] and lb.shape != im.shape[-lb.ndim:]:
                raise CellposeWebError(
                    f"'{Path(n).name}' is {im.shape} but its labels are {lb.shape}; they must have the same size."
                )
        return images, labels, names

    images, labels, names = load(train_dir)
    test_images = test_labels = test_names = None
    if test_dir is not None:
        test_images, test_labels, test_names = load(test_dir)
    return images, labels, names, test_images, test_labels, test_names
