"""Reading images: TIFF (multi-page, ImageJ hyperstacks, OME), PNG, JPEG, GIF, BMP and ``.npy``.

The format is taken from the file's first bytes, not its extension, and every failure is a
:class:`CellposeWebError` that says what was wrong."""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from cellpose_web.errors import CellposeWebError
from cellpose_web.io.names import FOLDER_IMAGE_EXTENSIONS, IMAGE_EXTENSIONS  # noqa: F401 - one home: io.names
from cellpose_web.io.seg_npy import load_seg, read_npy_header, short_error

logger = logging.getLogger(__name__)






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
            f"Could not read '{name}' as {fmt.upper()}: the file is truncated or damaged ({short_error(e)}). "
            "Copy or export it again."
        ) from None
    if arr.size == 0:
        raise CellposeWebError(f"'{name}' contains an empty image (shape {arr.shape}).")
    meta.format = fmt
    return arr, meta


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
        shape, fortran, dtype = read_npy_header(fh, version)
    if dtype.hasobject:
        dat = load_seg(path)
        if "masks" not in dat:
            raise CellposeWebError(f"'{path.name}' is a pickled .npy file without 'masks'; only _seg.npy files are read.")
        arr = np.asarray(dat["masks"])
        return arr, ImageMeta(axes=_default_axes(arr) if arr.ndim != 3 else "ZYX", extra={"seg": True})
    _check_pixels(shape, max_pixels, path.name)
    arr = np.load(path, allow_pickle=False)
    return arr, ImageMeta(axes=_default_axes(arr))
