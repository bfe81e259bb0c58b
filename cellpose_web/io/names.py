"""File names, in one place: which extensions are images, and which name endings are masks or
outputs (never segmented as images). Every face (command line, Batch, uploads, training sets)
asks these, so a ``_dP.tif`` is treated the same everywhere."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath

from cellpose_web.errors import BadInputError

__all__ = ["IMAGE_EXTENSIONS", "FOLDER_IMAGE_EXTENSIONS", "UPLOAD_IMAGE_EXTENSIONS", "LABEL_EXTENSIONS",
           "OUTPUT_SUFFIXES", "OUTPUT_NAME_MAX_BYTES", "NAME_RULE", "NAME_RE", "check_name", "file_stem",
           "is_mask_or_output", "output_name", "output_folders"]

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


#: the rule for the names a person gives what the app keeps: lab models, training sets,
#: human-in-the-loop projects (they become folder names, command-line arguments and Hub file names)
NAME_RULE = ("1-100 letters, digits, '.', '_', '+' or '-' (no spaces, no '/', no '..'), starting with a "
             "letter or digit")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def check_name(name: str, what: str = "name") -> str:
    """Check a name a person gave a lab model, training set or project against :data:`NAME_RULE`.

    The name is used as given (never rewritten: two spellings must not end up as one folder).

    Parameters
    ----------
    name : str
        The name, already stripped of surrounding spaces by the caller.
    what : str
        What is being named, for the message ("model name", "training set name", "project name").

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    BadInputError
        Saying what to change, with a name that would do (``"my set ü"`` -> ``'my_set_u'``).
    """
    if isinstance(name, str) and NAME_RE.match(name) and ".." not in name and not name.endswith("."):
        return name
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"The {what} is empty: use {NAME_RULE}.")
    ascii_only = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    suggestion = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._+-]+", "_", ascii_only)).strip("._+-")[:100]
    hint = f", e.g. {suggestion!r}" if suggestion else ""
    raise BadInputError(f"Invalid {what} {name!r}: use {NAME_RULE}{hint}.")


def file_stem(path: str | Path) -> str:
    """The name without all its extensions (``a.ome.tif`` -> ``a``)."""
    p = Path(path)
    return p.name[: -len("".join(p.suffixes))] if p.suffixes else p.stem


def is_mask_or_output(stem: str, mask_filter: str | None = None) -> bool:
    """Whether a file with this stem is a mask or an output, not an image to segment (as Cellpose:
    ``_masks``, ``_cp_masks``, ``_seg``, flows, outlines pictures ...; ``mask_filter`` too)."""
    return (stem.endswith(OUTPUT_SUFFIXES) or bool(mask_filter and stem.endswith(mask_filter))
            or "_outlines_" in stem or stem.endswith("_cp_outlines"))


#: the longest output file/folder name, in UTF-8 bytes (file systems allow 255; the files written
#: inside a folder add their own endings such as ``_cp_masks.tif``)
OUTPUT_NAME_MAX_BYTES = 150
#: characters no output name keeps: path separators and those Windows forbids
_FORBIDDEN = re.compile(r'[<>:"/\\|?*]')
#: names Windows reserves for devices (with any extension)
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def output_name(name: str, fallback: str = "image", max_bytes: int = OUTPUT_NAME_MAX_BYTES) -> str:
    """A file or folder name for results made from a user's file name, readable in any language.

    Letters and digits of every script stay (``细胞 图像 2`` -> ``细胞_图像_2``, ``Zelle Färbung 1``
    -> ``Zelle_Färbung_1``); only spaces, control characters, path separators and the characters
    Windows forbids (``<>:"/\\|?*``) become ``_``. Dots and spaces at the ends go, the name is
    NFC-normalised (as macOS's decomposed names are shown) and cut to ``max_bytes`` UTF-8 bytes.

    Parameters
    ----------
    name : str
        The name as the user gave it (no folders: ``/`` is replaced too).
    fallback : str
        The name used when nothing is left (e.g. ``...``).
    max_bytes : int
        The longest result in UTF-8 bytes; a character is never cut in half.

    Returns
    -------
    str
        A name that is safe on Linux, macOS and Windows and never ``.``, ``..`` or hidden.
    """
    s = unicodedata.normalize("NFC", str(name)).strip().strip(". ")
    s = "".join("_" if unicodedata.category(c)[0] in "CZ" else c for c in _FORBIDDEN.sub("_", s))
    s = s.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").strip(". ")
    if not s:
        return fallback
    if s.split(".")[0].upper() in _WINDOWS_RESERVED:
        s = "_" + s
    return s


def output_folders(paths: list[str], reserved: tuple[str, ...] = ()) -> list[str]:
    """The results folder of each input file, mirroring the folders it was in (POSIX, relative).

    ``exp1/day1/a.tif`` -> ``exp1/day1/a``: every part made safe by :func:`output_name`; a folder
    whose name (compared ignoring case, as on Windows and macOS) is already taken in the same place,
    by another image or by a sub-folder, gets ``_1``, ``_2``, ...

    Parameters
    ----------
    paths : list of str
        Each file's path as uploaded (POSIX, relative, e.g. its path inside a zip; ``..`` and
        absolute paths are refused before this, and any left are made harmless).
    reserved : tuple of str
        Names taken at the top (files written beside the folders, e.g. ``summary.csv``): a folder
        of that name gets ``_1``.

    Returns
    -------
    list of str
        One folder per path, all different, in the same order.
    """
    top = {r.casefold() for r in reserved}
    parents = [tuple(output_name(p, "folder") for p in PurePosixPath(x).parts[:-1]) for x in paths]
    parents = [(q[0] + "_1", *q[1:]) if q and q[0].casefold() in top else q for q in parents]
    taken = {(q[:k], q[k].casefold()) for q in parents for k in range(len(q))}  # sub-folders
    taken |= {((), r) for r in top}
    out = []
    for x, parent in zip(paths, parents):
        stem = output_name(Path(PurePosixPath(x).name).stem)
        name, k = stem, 0
        while (parent, name.casefold()) in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add((parent, name.casefold()))
        out.append("/".join((*parent, name)))
    return out
