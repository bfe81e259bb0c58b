"""``_seg.npy``: written with the keys Cellpose's GUI reads (:func:`masks_flows_to_seg`) and read
(:func:`load_seg`) with an unpickler that only builds numpy arrays, lists, dicts and plain values,
so a crafted file cannot run code."""
from __future__ import annotations

import ast
import datetime as _dt
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from cellpose_web.engine.dynamics.labels import label_dtype
from cellpose_web.engine import dynamics
from cellpose_web.io import render
from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.io.atomic import atomic_write
from cellpose_web.engine.transforms import percentile_stretch
from cellpose_web.io.masks import resize_nearest, split_flows


def short_error(e: BaseException, n: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".strip()
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


# .npy header: versions 1.0 and 2.0 store the header text in latin1, 3.0 in utf-8; 1.0 gives its
# length in 2 bytes, 2.0 and 3.0 in 4 bytes (little-endian). See the NumPy format specification
# (numpy.lib.format). Parsed here with public tools only (ast.literal_eval, descr_to_dtype).
_NPY_HEADER_FORMATS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
_NPY_MAX_HEADER = 10000  # numpy's own limit for headers it reads without allow_pickle
_NPY_KEYS = {"descr", "fortran_order", "shape"}


def _npy_damaged(name: str, what: str) -> BadInputError:
    return BadInputError(f"{name}: the .npy header is damaged ({what}). Save or copy the file again.")


def read_npy_header(fh, version: tuple[int, int], name: str | None = None) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read the header of a ``.npy`` file (format version 1.0, 2.0 or 3.0) without running code.

    Parameters
    ----------
    fh : binary file positioned just after the magic string and version (as left by
        ``np.lib.format.read_magic``).
    version : the (major, minor) format version from ``read_magic``.
    name : how to name the file in messages (default: the base name of ``fh.name``, quoted).

    Returns
    -------
    (shape, fortran_order, dtype); ``fh`` is left at the start of the array data.

    Raises
    ------
    BadInputError
        for an unknown format version or a damaged header.
    """
    if name is None:
        fname = getattr(fh, "name", None)
        name = f"'{Path(fname).name}'" if isinstance(fname, (str, os.PathLike)) else "The file"
    fmt = _NPY_HEADER_FORMATS.get(tuple(version))
    if fmt is None:
        raise BadInputError(
            f"{name}: unknown .npy format version {version[0]}.{version[1]} (known: 1.0, 2.0 and 3.0). The file is "
            "damaged or was written by a newer program; save it again with numpy.save.")
    len_fmt, encoding = fmt
    n_len = struct.calcsize(len_fmt)
    raw_len = fh.read(n_len)
    if len(raw_len) != n_len:
        raise _npy_damaged(name, "the file ends inside the header")
    (header_len,) = struct.unpack(len_fmt, raw_len)
    if header_len > _NPY_MAX_HEADER:
        raise _npy_damaged(name, f"the header claims {header_len} bytes, more than the {_NPY_MAX_HEADER} allowed")
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise _npy_damaged(name, "the file ends inside the header")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise _npy_damaged(name, "the header is not text") from None
    try:
        d = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        # files written by Python 2 may have long integers such as (10L, 20L) in the shape
        try:
            d = ast.literal_eval(re.sub(r"(?<=\d)[lL]\b", "", text)) if version < (3, 0) else None
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            d = None
        if d is None:
            raise _npy_damaged(name, "the header text cannot be read") from None
    if not isinstance(d, dict) or set(d) != _NPY_KEYS:
        raise _npy_damaged(name, "the header does not describe an array")
    shape, fortran = d["shape"], d["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                               for x in shape):
        raise _npy_damaged(name, "the array shape is not a list of sizes")
    if not isinstance(fortran, bool):
        raise _npy_damaged(name, "the memory order is not True/False")
    try:
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except Exception:  # any descr numpy cannot turn into a dtype
        raise _npy_damaged(name, "the data type is not valid") from None
    return shape, fortran, dtype


# --------------------------------------------------------------------------------------------
# _seg.npy: safe loading
# --------------------------------------------------------------------------------------------
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "complex"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how pickles made by older Pythons store bytes
}


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something that is not plain data."""


class _SafeUnpickler(pickle.Unpickler):
    """Builds only numpy arrays/dtypes/scalars and plain Python values."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
            # numpy >= 1.25 may pickle dtype classes by name, e.g. numpy.dtypes.UInt16DType
            import numpy.dtypes as _dts

            cls = getattr(_dts, name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        raise _Refused(f"refused to load '{module}.{name}'")

    def persistent_load(self, pid):  # pragma: no cover - not used by np.save
        raise _Refused("persistent ids are not allowed")


def load_seg(path: str | os.PathLike) -> dict:
    """Read a Cellpose ``_seg.npy`` file without running any code from it.

    A ``_seg.npy`` is a pickled dict. Only numpy arrays, dtypes and scalars, lists, tuples, dicts,
    sets, numbers, strings, bytes and None are allowed; anything else (e.g. a pickle that would
    call ``os.system``) raises CellposeWebError and nothing from the file is executed.

    Returns
    -------
    dict with at least 'masks' (uint16/uint32 (Y, X) or (Z, Y, X)) when the file is a Cellpose file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Segmentation file not found: {path}")
    if path.stat().st_size == 0:
        raise CellposeWebError(f"'{path.name}' is empty (0 bytes).")
    try:
        with open(path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
            except ValueError:
                raise CellposeWebError(f"'{path.name}' is not a .npy file (it does not start with the NumPy header).")
            shape, fortran, dtype = read_npy_header(fh, version, f"'{path.name}'")
            if not dtype.hasobject:
                fh.seek(0)
                arr = np.load(fh, allow_pickle=False)
                return {"masks": arr}
            try:
                obj = _SafeUnpickler(fh).load()
            except _Refused as e:
                raise CellposeWebError(
                    f"'{path.name}' was refused: it contains objects that are not plain data ({e}). A Cellpose "
                    "_seg.npy only holds arrays, numbers and text; this file may have been crafted to run code."
                ) from None
    except CellposeWebError:
        raise
    except Exception as e:
        raise CellposeWebError(f"Could not read '{path.name}' as a _seg.npy file: the file is damaged ({short_error(e)}).") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise CellposeWebError(f"'{path.name}' does not hold a Cellpose segmentation (expected a dict, got {type(obj).__name__}).")
    if "masks" not in obj and "outlines" in obj:  # very old files: masks only as outlines
        obj["masks"] = np.asarray(obj["outlines"])
    if "masks" in obj:
        m = np.asarray(obj["masks"])
        if m.dtype.kind not in "uib":
            raise CellposeWebError(f"'{path.name}': 'masks' has dtype {m.dtype}, expected integer labels.")
        obj["masks"] = m
    return obj


_DEFAULT_NORMALIZE = {
    "lowhigh": None, "percentile": [1.0, 99.0], "normalize": True, "norm3D": True, "sharpen_radius": 0,
    "smooth_radius": 0, "tile_norm_blocksize": 0, "tile_norm_smooth3D": 1, "invert": False,
}


def _seg_flows(flows: Any, masks: np.ndarray) -> list:
    """Cellpose GUI layout of flows in a _seg.npy (see module docs)."""
    shape = masks.shape
    rgb, dP, cp = split_flows(flows, shape)
    is3d = masks.ndim == 3
    if dP is None:
        dP = np.zeros(((3 if is3d else 2),) + shape, np.float32)
    if cp is None:
        cp = np.zeros(shape, np.float32)
    dP = np.asarray(dP, np.float32)
    cp = np.asarray(cp, np.float32)
    sp_axes = tuple(range(1, 1 + masks.ndim))
    dP = resize_nearest(dP, shape, sp_axes)
    cp = resize_nearest(cp, shape, tuple(range(masks.ndim)))
    if rgb is None:
        rgb = dynamics.dx_to_circ(dP)
    rgb = np.asarray(rgb, np.uint8)
    if is3d:
        rgb = resize_nearest(rgb, shape, (0, 1, 2))
    else:
        rgb = resize_nearest(rgb, shape, (0, 1))
    cp8 = (percentile_stretch(cp, 1.0, 99.0) * 255).astype(np.uint8)
    if is3d:
        dz = np.clip(dP[0] / 10 * 127 + 127, 0, 255).astype(np.uint8)
        return [rgb, cp8, dz, [], np.concatenate([dP, cp[None]], axis=0)]
    return [rgb[None], cp8[None], np.zeros((1,) + shape + (3,), np.uint8), [],
            np.concatenate([dP, cp[None]], axis=0).astype(np.float32)]


def masks_flows_to_seg(
    images: np.ndarray | list,
    masks: np.ndarray | list,
    flows: Any,
    file_names: str | os.PathLike | list,
    diameter: float | None = None,
    channels: Sequence[int] | None = None,
    metadata: dict | None = None,
) -> list[Path]:
    """Write ``<stem>_seg.npy`` in the layout Cellpose's GUI reads (and writes).

    Parameters
    ----------
    images, masks, flows, file_names : as for :func:`save_masks` (single items or lists).
    diameter : the diameter used (px), stored as 'diameter' (NaN when unknown, as Cellpose).
    channels : stored as 'chan_choose' (default [0, 0]).
    metadata : provenance merged into the 'cellpose_web' dict: e.g. ``{"model": {"name", "sha256",
        "path"}, "eval_params": {...}, "device": "cpu", "est_diam": 17.0}``. 'model_path',
        'flow_threshold', 'cellprob_threshold' and 'normalize_params' keys are filled from it.

    Returns
    -------
    list of written paths.
    """
    if isinstance(masks, (list, tuple)):
        n = len(masks)
        images_l = images if isinstance(images, (list, tuple)) else [images] * n
        flows_l = flows if isinstance(flows, (list, tuple)) and len(flows) == n else [None] * n
        names = file_names if isinstance(file_names, (list, tuple)) else [file_names] * n
        diams = diameter if isinstance(diameter, (list, tuple)) else [diameter] * n
        out: list[Path] = []
        for img, m, f, fn, d in zip(images_l, masks, flows_l, names, diams):
            out += masks_flows_to_seg(img, m, f, fn, diameter=d, channels=channels, metadata=metadata)
        return out

    from cellpose_web import __version__

    masks = np.asarray(masks)
    n = int(masks.max()) if masks.size else 0
    mdtype = label_dtype(n + 1)  # Cellpose's _seg.npy: uint32 from 65535 labels on
    masks = masks.astype(mdtype)
    outl = masks * render.outlines(masks) if masks.ndim == 2 else np.stack(
        [m * render.outlines(m) for m in masks])
    meta = dict(metadata or {})
    params = dict(meta.get("eval_params") or {})
    model = meta.get("model") or {}
    file_name = Path(file_names)
    prov = {
        "package": "cellpose_web",
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
    }
    norm = dict(_DEFAULT_NORMALIZE)
    if isinstance(params.get("normalize"), dict):
        norm.update(params["normalize"])
    elif params.get("normalize") is False:
        norm["normalize"] = False
    dat = {
        "outlines": outl.astype(mdtype),
        "colors": render.label_colors(n),
        "masks": masks,
        "chan_choose": list(channels) if channels is not None else [0, 0],
        "filename": str(file_name.resolve()) if file_name.exists() else str(file_name),
        "flows": _seg_flows(flows, masks),
        "ismanual": np.zeros(n, bool),
        "manual_changes": [],
        "model_path": str(model.get("path") or model.get("file") or model.get("name") or 0),
        "flow_threshold": float(params.get("flow_threshold", 0.4)),
        "cellprob_threshold": float(params.get("cellprob_threshold", 0.0)),
        "normalize_params": norm,
        "restore": None,
        "ratio": 1.0,
        "diameter": float(diameter) if diameter is not None else np.nan,
        "est_diam": float(meta["est_diam"]) if meta.get("est_diam") is not None else None,
        "cellpose_web": _plain(prov),
    }
    if masks.ndim == 3:
        dat["current_channel"] = 0
        dat["zdraw"] = []
        del dat["manual_changes"]
        del dat["ismanual"]
    base = file_name.name[: -len(file_name.suffix)] if file_name.suffix else file_name.name
    path = file_name.parent / f"{base}_seg.npy"
    return [atomic_write(path, lambda fh: np.save(fh, dat, allow_pickle=True))]


def _plain(obj: Any) -> Any:
    """Turn provenance into plain data (dict/list/str/number/None) so it passes :func:`load_seg`."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj if obj.dtype.kind in "biufcU" else obj.tolist()
    if isinstance(obj, os.PathLike):
        return str(obj)
    return str(obj)
