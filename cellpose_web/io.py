"""Images in, Cellpose files out.

Reading: :func:`imread` / :func:`imread_with_meta` for TIFF (multi-page, ImageJ hyperstacks, OME),
PNG, JPEG, GIF, BMP and ``.npy`` (a ``_seg.npy`` gives its masks). The format is taken from the
file's first bytes, not its extension, and every failure is a :class:`CellposeWebError` that says
what was wrong.

Writing (all atomic: a temporary file in the same folder, then ``os.replace``), with Cellpose's
file names so the files open in Cellpose, Fiji, napari and CellProfiler:

- :func:`save_masks`: ``<stem>_cp_masks.png/.tif``, ``<stem>_cp_outlines.txt``,
  ``<stem>_outlines_cp_masks.png``, ``<stem>_flows_cp_masks.tif``, ``_dP``, ``_cellprob``;
- :func:`masks_flows_to_seg`: ``<stem>_seg.npy`` with the keys Cellpose's GUI reads;
- :func:`save_rois`: ``<stem>_rois.zip`` of ImageJ polygon ROIs.

:func:`load_seg` reads a ``_seg.npy`` (a pickle) with an unpickler that only builds numpy arrays,
lists, dicts and plain values, so a crafted file cannot run code.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cellpose_web.engine import dynamics
from cellpose_web import render
from cellpose_web.errors import CellposeWebError
from cellpose_web.resources import home_dir

logger = logging.getLogger(__name__)

__all__ = [
    "logger_setup",
    "ImageMeta",
    "IMAGE_EXTENSIONS",
    "imread",
    "imread_with_meta",
    "imsave",
    "save_masks",
    "masks_flows_to_seg",
    "load_seg",
    "save_rois",
    "read_rois",
    "outlines_list",
    "outlines_to_text",
    "read_outlines_text",
    "get_image_files",
    "get_label_files",
    "load_train_test_data",
    "atomic_write",
]

# Extensions Cellpose looks for in a folder (either case), plus the ones we also read.
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".flex", ".dax", ".npy")
_FOLDER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".flex", ".dax")


# --------------------------------------------------------------------------------------------
# logging, as Cellpose's io.logger_setup
# --------------------------------------------------------------------------------------------
def logger_setup(cp_path: str | os.PathLike | None = None, logfile_name: str = "run.log",
                 stdout_file_replacement: str | os.PathLike | None = None) -> tuple[logging.Logger, Path]:
    """Show cellpose-web's progress (training epochs, models loaded, files written) on the console
    and keep it in a log file, as Cellpose's ``io.logger_setup``.

    Parameters
    ----------
    cp_path : folder of the log file; a relative path is taken under the home folder (as Cellpose's
        ``".cellpose"``). Default: the data folder ``$CELLPOSE_WEB_HOME`` (``~/.cellpose_web``).
    logfile_name : the log file's name; it is emptied on each call.
    stdout_file_replacement : write the console messages to this file instead of stdout.

    Returns
    -------
    logger : the ``cellpose_web`` logger: INFO and above to the console, DEBUG and above to the file
        (it no longer passes messages on to the root logger).
    log_file : Path of the log file.
    """
    from cellpose_web import __version__

    folder = home_dir() if cp_path is None else Path(cp_path).expanduser()
    if not folder.is_absolute():
        folder = Path.home() / folder
    folder.mkdir(parents=True, exist_ok=True)
    log_file = folder / logfile_name
    file_handler = logging.FileHandler(log_file, mode="w")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [%(name)s %(funcName)s:%(lineno)d] %(message)s"))
    console = logging.FileHandler(stdout_file_replacement) if stdout_file_replacement is not None \
        else logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s [%(module)s %(levelname)s] %(message)s"))
    log = logging.getLogger("cellpose_web")
    for h in list(log.handlers):  # a second call replaces the first one's handlers
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.DEBUG)
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False
    log.info("WRITING LOG OUTPUT TO %s", log_file)
    log.info("cellpose-web %s, python %s, torch %s", __version__, sys.version.split()[0], _torch_version())
    return log, log_file


def _torch_version() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "not installed"
    return torch.__version__


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def atomic_save(path: str | os.PathLike, writer: Callable[[str], Any]) -> Path:
    """Write a file atomically through a writer that takes a path (tifffile, np.save, zipfile).

    ``writer(tmp)`` writes a temporary file in the same folder (same suffix, so writers that
    add an extension do not); it is then synced and renamed over ``path`` (``os.replace``), so
    readers see either the old file or the complete new one, never half a file. On error the
    temporary file is removed and the old file is untouched. Returns the final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file atomically: ``write(fh)`` gets an open temporary file (see :func:`atomic_save`)."""
    def writer(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write(fh)

    return atomic_save(path, writer)


# --------------------------------------------------------------------------------------------
# reading images
# --------------------------------------------------------------------------------------------
@dataclass
class ImageMeta:
    """What a file says about its image.

    axes: one letter per array axis of what :func:`imread` returned, e.g. "YX", "YXC", "ZCYX",
        "TZCYX" (C = channel/sample, Z = planes, T = time; a plain page stack is reported as Z).
    pixel_size_um: (y, x) pixel size in micrometres, or None when the file does not say.
    z_step_um: distance between planes in micrometres, or None.
    format: "tiff", "png", "jpeg", "gif", "bmp" or "npy".
    extra: anything else worth keeping (ImageJ/OME flags, channel names, frame interval ...).
    """

    axes: str
    pixel_size_um: tuple[float, float] | None = None
    z_step_um: float | None = None
    format: str = ""
    extra: dict = field(default_factory=dict)


_MAGIC = (
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"\x93NUMPY", "npy"),
)
_EXT_FORMAT = {
    ".tif": "tiff", ".tiff": "tiff", ".flex": "tiff", ".dax": "tiff", ".png": "png", ".jpg": "jpeg",
    ".jpeg": "jpeg", ".gif": "gif", ".bmp": "bmp", ".npy": "npy",
}


def _sniff(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def _describe_content(head: bytes) -> str:
    """A short guess of what a non-image file is, for error messages."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (or an Office document)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head.lstrip().startswith((b"<html", b"<!DOCTYPE", b"<?xml", b"<svg")):
        return "an HTML/XML text file"
    try:
        text = head.decode("utf-8")
        if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
            return "a text file"
    except UnicodeDecodeError:
        pass
    return "not an image format this app reads"


def _check_pixels(shape: Sequence[int], max_pixels: int | None, name: str) -> None:
    if max_pixels is None:
        return
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if n > max_pixels:
        raise CellposeWebError(
            f"'{name}' is too large: {n:,} values (shape {tuple(int(s) for s in shape)}) exceeds the limit of "
            f"{max_pixels:,}. Crop or downsample it (e.g. in Fiji) and try again."
        )


def imread(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file into an array.

    Parameters
    ----------
    path : a TIFF (also multi-page, ImageJ hyperstack, OME-TIFF), PNG, JPEG, GIF, BMP or .npy file.
        A ``*_seg.npy`` file returns its masks.
    max_pixels : refuse images with more values than this (checked before decoding).

    Returns
    -------
    The array as stored: (Y, X), (Y, X, C) for RGB, (Z, Y, X) / (Z, C, Y, X) ... for stacks
    (see :func:`imread_with_meta` for the axes).
    """
    return imread_with_meta(path, max_pixels=max_pixels)[0]


def imread_with_meta(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read an image and what the file says about it.

    Returns
    -------
    (array, ImageMeta) : the meta gives the axes string (e.g. "ZCYX"), the pixel size (y, x) in µm
    and the z step in µm when the file records them (ImageJ, OME or TIFF resolution tags).
    """
    path = Path(path)
    name = path.name
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.is_dir():
        raise CellposeWebError(f"'{path}' is a folder, not an image file. Use --dir for folders.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as e:
        raise CellposeWebError(f"Could not open '{name}': {e.strerror or e}.") from None
    if size == 0:
        raise CellposeWebError(f"'{name}' is empty (0 bytes). The upload or copy was probably interrupted; copy it again.")
    fmt = _sniff(head)
    ext = path.suffix.lower()
    expected = _EXT_FORMAT.get(ext)
    if fmt is None:
        what = _describe_content(head)
        if expected is not None:
            raise CellposeWebError(
                f"'{name}' is not a valid {expected.upper()} file: its content is {what}. "
                "Export the image again as TIFF or PNG."
            )
        raise CellposeWebError(
            f"'{name}' is not an image this app can read (its content is {what}). "
            "Supported: TIFF, PNG, JPEG, GIF, BMP and .npy."
        )
    if expected is not None and expected != fmt and not (expected == "tiff" and fmt == "tiff"):
        logger.warning("'%s' has extension %s but is really a %s file; reading it as %s", name, ext, fmt, fmt)
    try:
        if fmt == "tiff":
            arr, meta = _read_tiff(path, max_pixels)
        elif fmt == "npy":
            arr, meta = _read_npy(path, max_pixels)
        else:
            arr, meta = _read_pillow(path, fmt, max_pixels)
    except (CellposeWebError, FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # any decoder failure becomes one clear message
        raise CellposeWebError(
            f"Could not read '{name}' as {fmt.upper()}: the file is truncated or damaged ({_short(e)}). "
            "Copy or export it again."
        ) from None
    if arr.size == 0:
        raise CellposeWebError(f"'{name}' contains an empty image (shape {arr.shape}).")
    meta.format = fmt
    return arr, meta


def _short(e: BaseException, n: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".strip()
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


_UNIT_UM = {
    "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "\\u00b5m": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3,
    "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6, "inch": 25400.0, "in": 25400.0,
    "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4,
}


def _unit_to_um(unit: Any) -> float | None:
    if unit is None:
        return None
    u = str(unit).strip().lower()
    return _UNIT_UM.get(u)


def _rational(v: Any) -> float | None:
    try:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            num, den = float(v[0]), float(v[1])
            return num / den if den else None
        return float(v)
    except (TypeError, ValueError):
        return None


def _normalise_axes(axes: str) -> str:
    """tifffile axes -> our letters: S (samples) -> C, a lone I/Q page axis -> Z."""
    axes = axes.upper()
    if "S" in axes and "C" not in axes:
        axes = axes.replace("S", "C")
    if "Z" not in axes:
        for a in ("I", "Q"):
            if axes.count(a) == 1:
                axes = axes.replace(a, "Z")
                break
    return axes


class _LogCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _read_tiff(path: Path, max_pixels: int | None) -> tuple[np.ndarray, ImageMeta]:
    import tifffile

    extra: dict = {}
    file_size = path.stat().st_size
    catcher = _LogCatcher()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(catcher)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise CellposeWebError(f"'{path.name}' is a TIFF file without any image in it.")
            series = tif.series[0]
            _check_pixels(series.shape, max_pixels, path.name)
            for pg in series.pages:  # strips/tiles that point past the end of the file = truncated
                if pg is None:
                    continue
                offs = getattr(pg, "dataoffsets", ()) or ()
                cnts = getattr(pg, "databytecounts", ()) or ()
                if any(int(o) + int(c) > file_size for o, c in zip(offs, cnts)):
                    raise CellposeWebError(
                        f"'{path.name}' is truncated: the TIFF says it holds more data than the file contains "
                        f"({file_size:,} bytes). The copy or upload was probably interrupted; copy it again."
                    )
            arr = series.asarray()
            bad = [m for m in catcher.messages if any(w in m.lower() for w in ("corrupt", "truncat", "page offset"))]
            if bad:
                raise CellposeWebError(
                    f"'{path.name}' is truncated or damaged ({' '.join(bad[0].split())[:160]}). Copy or export it again."
                )
            axes = _normalise_axes(series.axes)
            if len(tif.series) > 1:
                extra["n_series"] = len(tif.series)
                logger.warning("'%s' holds %d image series; reading the first", path.name, len(tif.series))
            page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
            tags = page.tags
            pixel_size = None
            z_step = None
            ij = tif.imagej_metadata if tif.is_imagej else None
            if ij:
                extra["imagej"] = {k: ij[k] for k in ("channels", "slices", "frames", "unit", "spacing", "finterval")
                                   if k in ij}
                scale = _unit_to_um(ij.get("unit"))
                if scale is not None:
                    xr = _rational(tags["XResolution"].value) if "XResolution" in tags else None
                    yr = _rational(tags["YResolution"].value) if "YResolution" in tags else None
                    if xr and yr:
                        pixel_size = (scale / yr, scale / xr)
                    if ij.get("spacing") is not None:
                        z_step = float(ij["spacing"]) * scale
                names = _imagej_channel_names(ij)
                if names:
                    extra["channel_names"] = names
            if tif.is_ome and tif.ome_metadata:
                extra["ome"] = True
                names = [m.group(1) for m in _OME_CHANNEL_NAME.finditer(tif.ome_metadata)]
                if names and all(names):
                    extra["channel_names"] = names
                ps, zs = _ome_pixel_size(tif.ome_metadata)
                pixel_size = ps or pixel_size
                z_step = zs if zs is not None else z_step
            if pixel_size is None and "ResolutionUnit" in tags and "XResolution" in tags and "YResolution" in tags:
                unit = int(tags["ResolutionUnit"].value)
                # 3 = centimetre. Inch resolutions (72/96/300 dpi) come from drawing programs, not microscopes.
                if unit == 3:
                    xr, yr = _rational(tags["XResolution"].value), _rational(tags["YResolution"].value)
                    if xr and yr:
                        pixel_size = (1e4 / yr, 1e4 / xr)
    finally:
        tlog.removeHandler(catcher)
    if len(axes) != arr.ndim:  # tifffile squeezed something we did not expect
        axes = _default_axes(arr)
    return arr, ImageMeta(axes=axes, pixel_size_um=pixel_size, z_step_um=z_step, extra=extra)


_OME_CHANNEL_NAME = re.compile(r'<(?:\w+:)?Channel\b[^>]*?\bName\s*=\s*"([^"]*)"', re.S)


def _imagej_channel_names(ij: dict) -> list[str]:
    """The channel names of an ImageJ hyperstack: its slice labels of the first plane (C varies
    fastest in ImageJ's CZT order); [] when the file has none or they do not fit."""
    labels = ij.get("Labels")
    n = int(ij.get("channels") or 0)
    if not isinstance(labels, (list, tuple)) or n < 2 or len(labels) < n:
        return []
    names = [str(x).strip() for x in labels[:n]]
    return names if all(names) else []


_OME_PIXELS = re.compile(r"<(?:\w+:)?Pixels\b([^>]*)>", re.S)
_OME_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def _ome_pixel_size(xml: str) -> tuple[tuple[float, float] | None, float | None]:
    m = _OME_PIXELS.search(xml)
    if not m:
        return None, None
    attrs = dict(_OME_ATTR.findall(m.group(1)))

    def get(axis: str) -> float | None:
        v = attrs.get(f"PhysicalSize{axis}")
        if v is None:
            return None
        scale = _unit_to_um(attrs.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            return float(v) * scale if scale is not None else None
        except ValueError:
            return None

    x, y, z = get("X"), get("Y"), get("Z")
    ps = (y if y is not None else x, x if x is not None else y) if (x is not None or y is not None) else None
    return ps, z


def _default_axes(arr: np.ndarray) -> str:
    if arr.ndim == 2:
        return "YX"
    if arr.ndim == 3:
        return "YXC" if arr.shape[-1] in (3, 4) else "ZYX"
    return "ZCYX"[-arr.ndim:] if arr.ndim <= 4 else ("T" * (arr.ndim - 4) + "ZCYX")


def _read_pillow(path: Path, fmt: str, max_pixels: int | None) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise CellposeWebError(f"'{path.name}' is too large to decode safely ({e}).") from None
        with img:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            _check_pixels((n_frames, img.size[1], img.size[0], len(img.getbands())), max_pixels, path.name)
            frames = []
            for i in range(n_frames):
                img.seek(i)
                frames.append(_pil_to_array(img))
    if n_frames > 1:
        if any(f.ndim != frames[0].ndim for f in frames):  # e.g. GIF: first frame grey, later ones RGB
            frames = [np.repeat(f[..., None], 3, axis=-1) if f.ndim == 2 else f for f in frames]
        if any(f.shape != frames[0].shape for f in frames):
            frames = frames[:1]
        arr = np.stack(frames) if len(frames) > 1 else frames[0]
        if arr.ndim == 4 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            arr = np.ascontiguousarray(arr[..., 0])
    else:
        arr = frames[0]
    if arr.ndim == 2:
        axes = "YX"
    elif arr.ndim == 3 and n_frames == 1:
        axes = "YXC"
    elif arr.ndim == 3:
        axes = "ZYX"
    else:
        axes = "ZYXC"
    return arr, ImageMeta(axes=axes)


def _pil_to_array(img) -> np.ndarray:
    img.load()
    mode = img.mode
    if mode in ("1",):
        return np.asarray(img.convert("L"))
    if mode in ("L", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img)
        return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in ("=", "|") else a
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() < 65536 and getattr(img, "format", None) == "PNG":
            a = a.astype(np.uint16)
        return a
    if mode == "LA":
        return np.asarray(img.convert("L"))
    if mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
        return rgb
    if mode == "RGB":
        return np.asarray(img)
    # RGBA, CMYK, YCbCr, LAB, HSV, ...: alpha is dropped as Cellpose's reader does
    return np.asarray(img.convert("RGB"))


def _read_npy(path: Path, max_pixels: int | None) -> tuple[np.ndarray, ImageMeta]:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = _read_npy_header(fh, version)
    if dtype.hasobject:
        dat = load_seg(path)
        if "masks" not in dat:
            raise CellposeWebError(f"'{path.name}' is a pickled .npy file without 'masks'; only _seg.npy files are read.")
        arr = np.asarray(dat["masks"])
        return arr, ImageMeta(axes=_default_axes(arr) if arr.ndim != 3 else "ZYX", extra={"seg": True})
    _check_pixels(shape, max_pixels, path.name)
    arr = np.load(path, allow_pickle=False)
    return arr, ImageMeta(axes=_default_axes(arr))


def _read_npy_header(fh, version):
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return np.lib.format._read_array_header(fh, version)  # 3.0 (utf8 field names)


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
            shape, fortran, dtype = _read_npy_header(fh, version)
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
        raise CellposeWebError(f"Could not read '{path.name}' as a _seg.npy file: the file is damaged ({_short(e)}).") from None
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


# --------------------------------------------------------------------------------------------
# outlines
# --------------------------------------------------------------------------------------------
def outlines_list(masks: np.ndarray) -> list[np.ndarray]:
    """Outer outline of each mask as (N, 2) int [x, y] points, ascending label order.

    Same as :func:`cellpose_web.dynamics.outlines_list` (OpenCV's point order, largest piece,
    <= 4 points -> empty), checked for 2D here so file writers get a clear message.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise CellposeWebError(f"outlines need a 2D mask image, got shape {masks.shape}")
    return dynamics.outlines_list(masks)


def outlines_to_text(base: str | os.PathLike, outlines: Iterable[np.ndarray]) -> Path:
    """Write ``<base>_cp_outlines.txt``: one line per mask, ``x0,y0,x1,y1,...`` (ints, x = column)."""
    lines = []
    for o in outlines:
        o = np.asarray(o, dtype=np.int64).reshape(-1)
        lines.append(",".join(str(int(v)) for v in o))
    text = "\n".join(lines) + ("\n" if lines else "")
    path = Path(str(base) + "_cp_outlines.txt")
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def read_outlines_text(path: str | os.PathLike) -> list[np.ndarray]:
    """Read a ``_cp_outlines.txt`` back into a list of (N, 2) [x, y] int arrays."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            out.append(np.zeros((0, 2), np.int64))
            continue
        v = np.array([int(t) for t in line.split(",")], dtype=np.int64)
        out.append(v.reshape(-1, 2))
    return out


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


def _percentile_norm(img: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(img)
    if not finite.all():
        img = np.where(finite, img, 0).astype(np.float32)
    a, b = np.percentile(img, [lo, hi])
    if b - a < 1e-6:
        b = img.max()
        a = img.min()
        if b - a < 1e-6:
            return np.zeros_like(img)
    return (img - a) / (b - a)


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
        rgb = _resize_nearest(rgb, shape2d, (0, 1))
    return rgb


def _resize_nearest(a: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of the given axes of ``a`` to ``shape``."""
    out = a
    for ax, n in zip(axes, shape):
        if out.shape[ax] != n:
            idx = np.minimum((np.arange(n) * out.shape[ax] / n).astype(int), out.shape[ax] - 1)
            out = np.take(out, idx, axis=ax)
    return out


def _split_flows(flows: Any, mshape: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
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
    mask_out = masks.astype(np.uint16) if mmax < 2**16 else masks.astype(np.uint32)
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
        frgb, dP, cp = _split_flows(flows, masks.shape)
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
    frgb, dP, _ = _split_flows(flows, masks.shape)
    if frgb is None and dP is not None:
        frgb = dynamics.dx_to_circ(dP)
    if frgb is None:
        frgb = np.zeros_like(rgb)
    frgb = _resize_nearest(np.asarray(frgb, np.uint8), masks.shape, (0, 1))
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, overlay, gap, blend, gap, frgb], axis=1)


_DEFAULT_NORMALIZE = {
    "lowhigh": None, "percentile": [1.0, 99.0], "normalize": True, "norm3D": True, "sharpen_radius": 0,
    "smooth_radius": 0, "tile_norm_blocksize": 0, "tile_norm_smooth3D": 1, "invert": False,
}


def _seg_flows(flows: Any, masks: np.ndarray) -> list:
    """Cellpose GUI layout of flows in a _seg.npy (see module docs)."""
    shape = masks.shape
    rgb, dP, cp = _split_flows(flows, shape)
    is3d = masks.ndim == 3
    if dP is None:
        dP = np.zeros(((3 if is3d else 2),) + shape, np.float32)
    if cp is None:
        cp = np.zeros(shape, np.float32)
    dP = np.asarray(dP, np.float32)
    cp = np.asarray(cp, np.float32)
    sp_axes = tuple(range(1, 1 + masks.ndim))
    dP = _resize_nearest(dP, shape, sp_axes)
    cp = _resize_nearest(cp, shape, tuple(range(masks.ndim)))
    if rgb is None:
        rgb = dynamics.dx_to_circ(dP)
    rgb = np.asarray(rgb, np.uint8)
    if is3d:
        rgb = _resize_nearest(rgb, shape, (0, 1, 2))
    else:
        rgb = _resize_nearest(rgb, shape, (0, 1))
    cp8 = (np.clip(_percentile_norm(cp), 0, 1) * 255).astype(np.uint8)
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
    mdtype = np.uint16 if n < 2**16 - 1 else np.uint32
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


# --------------------------------------------------------------------------------------------
# folders of images / training data
# --------------------------------------------------------------------------------------------
def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(s))]


_EXCLUDED_SUFFIXES = ("_cp_masks", "_cp_output", "_flows", "_flows_0", "_flows_1", "_flows_2", "_cellprob",
                      "_masks", "_dP", "_outlines", "_seg")


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
            if p.suffix.lower() not in _FOLDER_IMAGE_EXTENSIONS:
                continue
            stem = p.stem
            if stem.endswith(_EXCLUDED_SUFFIXES) or (mf and stem.endswith(mf)):
                continue
            if "_outlines_" in stem or stem.endswith("_cp_outlines"):
                continue
            if imf and not stem.endswith(imf):
                continue
            files.append(p)
    files.sort(key=lambda p: _natural_key(str(p)))
    if not files:
        raise CellposeWebError(
            f"No images found in '{folder}'" + (f" ending with '{imf}'" if imf else "")
            + ". Supported: " + ", ".join(_FOLDER_IMAGE_EXTENSIONS) + "."
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
