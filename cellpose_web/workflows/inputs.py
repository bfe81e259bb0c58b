"""Untrusted input: uploaded images and zips, checked against the limits before use.

Every failure is a CellposeWebError whose message says what was wrong and what to do.
"""
from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np

from cellpose_web.io.names import LABEL_EXTENSIONS, UPLOAD_IMAGE_EXTENSIONS, file_stem, is_mask_or_output
from cellpose_web import io as cpio
from cellpose_web.workflows import pipeline
from cellpose_web.errors import CellposeWebError
from cellpose_web.service.config import Limits

IMAGE_EXTS = UPLOAD_IMAGE_EXTENSIONS  # one home: cellpose_web.io.names
LABEL_EXTS = LABEL_EXTENSIONS
MASK_SUFFIXES = ("_masks", "_cp_masks", "_seg")


@dataclass
class LoadedImage:
    """An image as read from disk: data (as stored), its file name and metadata."""
    data: np.ndarray
    name: str
    pixel_size_um: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _fmt_mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def check_file_size(path: str | Path, limits: Limits) -> int:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        raise FileNotFoundError(f"The uploaded file {p.name} could not be found; upload it again.")
    if size == 0:
        raise CellposeWebError(f"{p.name} is empty (0 bytes); upload the file again.")
    if size > limits.max_upload_bytes:
        raise CellposeWebError(f"{p.name} is {_fmt_mb(size)}, above the upload limit of "
                               f"{_fmt_mb(limits.max_upload_bytes)}; crop it or ask the admin to raise "
                               "CELLPOSE_WEB_MAX_UPLOAD_MB.")
    return size


def read_image(path: str | Path, limits: Limits | None = None) -> LoadedImage:
    """Read and validate one image file (TIFF/PNG/JPEG; 2D, channels, or a z-stack)."""
    limits = limits or Limits.from_env()
    p = Path(path)
    check_file_size(p, limits)
    if p.suffix.lower() not in IMAGE_EXTS:
        raise CellposeWebError(f"{p.name}: unsupported file type {p.suffix or '(none)'}; "
                               "use TIFF, PNG or JPEG.")
    try:
        arr, meta = cpio.imread_with_meta(str(p), max_pixels=limits.max_pixels)
        meta = dict(meta) if isinstance(meta, dict) else dict(getattr(meta, "__dict__", {}))
    except CellposeWebError:
        raise
    except FileNotFoundError:
        raise
    except MemoryError:
        raise CellposeWebError(f"{p.name} is too large to load in memory; crop it first.")
    except Exception as e:  # corrupt / truncated / not really an image
        raise CellposeWebError(f"{p.name} could not be read as an image ({type(e).__name__}); "
                               "check it opens in Fiji, and save it as TIFF or PNG.") from None
    arr = np.asarray(arr)
    axes = str(meta.get("axes") or "")
    if len(axes) == arr.ndim:  # validate_array drops singleton axes: keep the letters in step
        axes = "".join(a for a, n in zip(axes, arr.shape) if n > 1)
    arr = validate_array(arr, p.name, limits)  # the upload limits, with the user's file name
    try:
        arr, meta["axes"] = pipeline.prepare_image(arr, axes)
    except CellposeWebError as e:
        raise CellposeWebError(f"{p.name}: {e}") from None
    return LoadedImage(arr, p.name, pipeline.pixel_size_of(meta), meta)


def validate_array(arr: np.ndarray, name: str = "image", limits: Limits | None = None) -> np.ndarray:
    """Reject arrays Cellpose cannot use; return a real-valued array with non-finite values set to 0."""
    limits = limits or Limits.from_env()
    if arr.dtype == object or arr.dtype.kind in "USVO":
        raise CellposeWebError(f"{name} does not contain numeric pixel data.")
    if arr.dtype.kind == "c":
        raise CellposeWebError(f"{name} has complex-valued pixels; save the magnitude as a normal image.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    squeezed_shape = tuple(s for s in arr.shape if s > 1)
    if arr.size == 0 or len(squeezed_shape) < 2:
        raise CellposeWebError(f"{name} has shape {arr.shape}; an image needs at least {pipeline.MIN_IMAGE_SIDE} "
                               "pixels along Y and X.")
    if len(squeezed_shape) > 4:
        raise CellposeWebError(f"{name} has {len(squeezed_shape)} dimensions {arr.shape}; this app takes 2D images, "
                               "channels and z-stacks (up to 4D). Split time series into separate files.")
    arr = arr.reshape(squeezed_shape)
    if max(squeezed_shape) < pipeline.MIN_IMAGE_LONG_SIDE:
        raise CellposeWebError(f"{name} is only {arr.shape} pixels; use a larger image.")
    if arr.size > limits.max_pixels:
        raise CellposeWebError(f"{name} has {arr.size:,} values, above the limit of {limits.max_pixels:,}; "
                               "crop or downsample it (or ask the admin to raise CELLPOSE_WEB_MAX_PIXELS).")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.all():
            raise CellposeWebError(f"{name} contains no finite pixel values (all NaN or infinite).")
        if bad.any():
            arr = np.where(bad, 0, arr)
    return arr


def validate_zip(path: str | Path, limits: Limits | None = None) -> list[zipfile.ZipInfo]:
    """Check a zip before extracting: entry count, total uncompressed size, no absolute or '..' paths."""
    limits = limits or Limits.from_env()
    p = Path(path)
    check_file_size(p, limits)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError):
        raise CellposeWebError(f"{p.name} is not a valid zip file; create it with your file manager's "
                               "'Compress' command.") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > limits.max_zip_entries:
            raise CellposeWebError(f"{p.name} holds {len(infos)} files, above the limit of "
                                   f"{limits.max_zip_entries}; split it into smaller zips.")
        total = 0
        for i in infos:
            name = i.filename.replace("\\", "/")
            pp = PurePosixPath(name)
            if name.startswith("/") or pp.is_absolute() or ".." in pp.parts or (len(name) > 1 and name[1] == ":"):
                raise CellposeWebError(f"{p.name} contains an unsafe path {i.filename!r} (absolute or '..'); "
                                       "the zip was refused. Re-create it from a plain folder.")
            mode = (i.external_attr >> 16) & 0o170000
            if mode == stat.S_IFLNK:
                raise CellposeWebError(f"{p.name} contains a symbolic link {i.filename!r}; the zip was refused.")
            total += i.file_size
            if total > limits.max_zip_uncompressed_bytes:
                raise CellposeWebError(f"{p.name} unpacks to more than {_fmt_mb(limits.max_zip_uncompressed_bytes)}; "
                                       "split it into smaller zips.")
        return infos


def _kept(parts: tuple[str, ...]) -> bool:
    """Whether a zip entry (its path's parts) is a user's file: not hidden, not macOS's __MACOSX."""
    return not any(part.startswith(".") or part == "__MACOSX" for part in parts)


def zip_file_names(path: str | Path, limits: Limits | None = None) -> list[str]:
    """The paths of the files :func:`extract_zip` would extract (POSIX, relative to the zip's root),
    read from the zip's directory without unpacking; the zip is checked as by :func:`validate_zip`."""
    names = [PurePosixPath(i.filename.replace("\\", "/")) for i in validate_zip(path, limits)]
    return [n.as_posix() for n in names if _kept(n.parts)]


def extract_zip(path: str | Path, dest: str | Path, limits: Limits | None = None) -> list[Path]:
    """Extract a validated zip into `dest`, keeping its folders (which cannot escape `dest`).

    Stops if the real decompressed size exceeds the limit (a zip bomb may lie in its headers).
    Returns the extracted file paths (hidden files and __MACOSX skipped); a file's path inside the
    zip is ``p.relative_to(dest).as_posix()``.
    """
    limits = limits or Limits.from_env()
    infos = validate_zip(path, limits)
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    budget = limits.max_zip_uncompressed_bytes
    with zipfile.ZipFile(path) as zf:
        for i in infos:
            parts = PurePosixPath(i.filename.replace("\\", "/")).parts
            if not _kept(parts):
                continue
            target = dest.joinpath(*parts).resolve()
            if dest not in target.parents:
                raise CellposeWebError(f"Unsafe path {i.filename!r} in the zip; refused.")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(i) as src, open(target, "wb") as dst:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        budget -= len(chunk)
                        if budget < 0:
                            raise CellposeWebError(
                                "The zip unpacks to more than the allowed size "
                                f"({_fmt_mb(limits.max_zip_uncompressed_bytes)}); it was refused.")
                        dst.write(chunk)
            except CellposeWebError:
                target.unlink(missing_ok=True)
                raise
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
                target.unlink(missing_ok=True)
                raise CellposeWebError(f"{i.filename} in the zip is damaged ({type(e).__name__}); "
                                       "re-create the zip.") from None
            out.append(target)
    return out


def decimal_text(value: Any) -> Any:
    """A number typed as text with a decimal comma, as many European keyboards and Excel write it
    ("30,5", "0,65"), with a point instead; anything else unchanged. One comma and no point is read as
    a decimal comma: the values typed here (diameters, pixel sizes, thresholds) have no thousands."""
    if isinstance(value, str):
        value = value.strip()
        if value.count(",") == 1 and "." not in value:
            value = value.replace(",", ".")
    return value


def is_mask_file(path: Path) -> bool:
    """A mask or an output file (Cellpose's rule, the same as the command line's), not an image."""
    return is_mask_or_output(file_stem(path))


#: why a mask or output file is not segmented (also the start of the message when only those came)
MASK_FILE_REASON = ("a mask or output file (its name ends in _masks, _cp_masks, _seg, _flows, ...), not an image: "
                    "upload the images, not the masks")


def skip_reason(name: str | PurePath) -> str | None:
    """Why a file is not segmented as an image, for a person to read; None when it is an image.

    Parameters
    ----------
    name : str or path
        The file's name or path (only its name counts).
    """
    p = PurePosixPath(str(name).replace("\\", "/"))
    if p.suffix.lower() not in IMAGE_EXTS:
        return (f"not an image type this app reads ({p.suffix or 'no extension'}); "
                "use TIFF, PNG or JPEG images")
    if is_mask_file(Path(p.name)):
        return MASK_FILE_REASON
    return None


def image_files(paths: list[Path], names: list[str] | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Split paths into images to process and (name, reason) for files that are skipped.

    Parameters
    ----------
    paths : list of Path
        The files.
    names : list of str, optional
        How to name each file to the user (e.g. its path inside a zip); default its file name.
        Both lists come back sorted by this name, ignoring case.
    """
    names = [p.name for p in paths] if names is None else list(names)
    good, skipped = [], []
    for p, n in sorted(zip(paths, names), key=lambda t: (t[1].lower(), t[1])):
        reason = skip_reason(p)
        if reason:
            skipped.append((n, reason))
        else:
            good.append(p)
    return good, skipped


def no_images_message(skipped: list[tuple[str, str]], max_listed: int = 10) -> str:
    """The message for an upload with nothing to segment: why each file was skipped.

    Parameters
    ----------
    skipped : list of (name, reason)
        Every file (or zip) that was left out and why; empty for an upload with no files (an empty zip).
    max_listed : int
        Files listed by name; the rest are counted.
    """
    if not skipped:
        return ("No images to segment: the upload holds no files (an empty zip?). Upload a zip of TIFF/PNG/JPEG "
                "images or select image files.")
    if all(r == MASK_FILE_REASON for _, r in skipped):
        names = ", ".join(n for n, _ in skipped[:max_listed]) + (" …" if len(skipped) > max_listed else "")
        return (f"No images to segment: only mask or output files ({names}): upload the images, not the masks "
                "(…_masks.tif, …_seg.npy).")
    lines = "".join(f"\n- {n}: {r}" for n, r in skipped[:max_listed])
    more = f"\n- … and {len(skipped) - max_listed} more" if len(skipped) > max_listed else ""
    return f"No images to segment: every file was left out (upload TIFF, PNG or JPEG images):{lines}{more}"
