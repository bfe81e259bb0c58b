"""ImageJ polygon ROIs: ``<stem>_rois.zip`` written and read."""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
import numpy as np
from cellpose_web.errors import CellposeWebError
from cellpose_web.io.atomic import atomic_write
from cellpose_web.io.outlines_text import outlines_list


# --------------------------------------------------------------------------------------------
# ImageJ ROIs
# --------------------------------------------------------------------------------------------
_ROI_POLYGON = 0


_ROI_VERSION = 228


def _roi_bytes(xy: np.ndarray, name: str = "", position: int = 0) -> bytes:
    """One ImageJ .roi (polygon) from (N, 2) integer [x, y] points."""
    xy = np.asarray(xy, dtype=np.int64)
    left, top = int(xy[:, 0].min()), int(xy[:, 1].min())
    right, bottom = int(xy[:, 0].max()) + 1, int(xy[:, 1].max()) + 1
    n = len(xy)
    if n > 65535:
        raise CellposeWebError("an outline has more than 65535 points; ImageJ ROIs cannot hold it")
    rel = xy - [left, top]
    if rel.max() > 32767 or max(abs(left), abs(top), right, bottom) > 32767:
        raise CellposeWebError("image too large for ImageJ ROI coordinates (> 32767 px)")
    name_u16 = name.encode("utf-16-be")
    header2_offset = 64 + 4 * n
    hdr = bytearray(64)
    hdr[0:4] = b"Iout"
    struct.pack_into(">h", hdr, 4, _ROI_VERSION)
    hdr[6] = _ROI_POLYGON
    struct.pack_into(">hhhhH", hdr, 8, top, left, bottom, right, n)
    struct.pack_into(">i", hdr, 56, position)
    struct.pack_into(">i", hdr, 60, header2_offset)
    coords = rel[:, 0].astype(">i2").tobytes() + rel[:, 1].astype(">i2").tobytes()
    h2 = bytearray(64)
    name_offset = header2_offset + 64 if name else 0
    struct.pack_into(">ii", h2, 16, name_offset, len(name))
    return bytes(hdr) + coords + bytes(h2) + name_u16


def _parse_roi(data: bytes) -> dict:
    """Parse an ImageJ polygon-type .roi (what :func:`save_rois` writes, and ImageJ's own)."""
    if len(data) < 64 or data[:4] != b"Iout":
        raise CellposeWebError("not an ImageJ ROI (missing 'Iout' header)")
    version = struct.unpack_from(">h", data, 4)[0]
    roitype = data[6]
    top, left, bottom, right, n = struct.unpack_from(">hhhhH", data, 8)
    options = struct.unpack_from(">h", data, 50)[0]
    position = struct.unpack_from(">i", data, 56)[0]
    h2 = struct.unpack_from(">i", data, 60)[0] if version >= 218 else 0
    if options & 128:  # sub-pixel resolution: float coordinates follow the int ones
        base = 64 + 4 * n
        xs = np.frombuffer(data, ">f4", n, base).astype(np.float64)
        ys = np.frombuffer(data, ">f4", n, base + 4 * n).astype(np.float64)
    else:
        xs = np.frombuffer(data, ">i2", n, 64).astype(np.int64) + left
        ys = np.frombuffer(data, ">i2", n, 64 + 2 * n).astype(np.int64) + top
    name = ""
    if h2 and h2 + 64 <= len(data):
        noff, nlen = struct.unpack_from(">ii", data, h2 + 16)
        if noff > 0 and nlen > 0 and noff + 2 * nlen <= len(data):
            name = data[noff: noff + 2 * nlen].decode("utf-16-be")
    return {"version": version, "type": roitype, "top": top, "left": left, "bottom": bottom, "right": right,
            "n": n, "xy": np.stack([xs, ys], axis=1), "name": name, "position": position}


def save_rois(masks: np.ndarray, file_name: str | os.PathLike, savedir: str | os.PathLike | None = None) -> Path:
    """Save ``<stem>_rois.zip``: one ImageJ polygon ROI per mask (open with Fiji's ROI Manager).

    Entries are named ``LLLL-YYYY-XXXX.roi`` (label id, then the outline's centre y and x), in
    ascending label order. 2D masks only.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise CellposeWebError("ImageJ ROIs can be saved for 2D masks only (use --stitch/3D tif masks instead)")
    file_name = Path(file_name)
    savedir = Path(savedir) if savedir is not None else file_name.parent
    labels = np.unique(masks)
    labels = labels[labels > 0]
    outl = outlines_list(masks)
    path = savedir / f"{file_name.stem}_rois.zip"
    width = max(4, len(str(int(labels.max())))) if labels.size else 4

    def w(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            used = set()
            for lab, xy in zip(labels, outl):
                if len(xy) == 0:
                    continue
                yc = int(round((xy[:, 1].min() + xy[:, 1].max()) / 2))
                xc = int(round((xy[:, 0].min() + xy[:, 0].max()) / 2))
                nm = f"{int(lab):0{width}d}-{yc:04d}-{xc:04d}"
                if nm in used:
                    continue
                used.add(nm)
                zf.writestr(nm + ".roi", _roi_bytes(xy, name=nm))

    return atomic_write(path, w)


def read_rois(path: str | os.PathLike) -> list[dict]:
    """Read an ImageJ ROI zip (or a single .roi) into dicts with 'name', 'type' and 'xy' (N, 2) [x, y]."""
    path = Path(path)
    out = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.lower().endswith(".roi"):
                    d = _parse_roi(zf.read(info))
                    d["entry"] = info.filename
                    out.append(d)
    else:
        d = _parse_roi(path.read_bytes())
        d["entry"] = path.name
        out.append(d)
    return out
