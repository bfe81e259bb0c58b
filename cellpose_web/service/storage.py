"""Files under the data folder: atomic writes, safe names, per-user roots.

No user-supplied name can reach outside the data folder: names are reduced to a safe
alphabet and every joined path is checked to stay below its root.
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from cellpose_web.io.atomic import write_json
from cellpose_web.errors import CellposeWebError
from cellpose_web.io import atomic_write
from cellpose_web.io.names import check_name
from cellpose_web.service.config import home_dir, per_user

_SAFE = re.compile(r"[^\w.-]+")  # \w: letters and digits of every script, and _
_SAFE_ASCII = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, what: str = "name", max_len: int = 100, ascii_only: bool = False) -> str:
    """A file/folder name made from a name a person gave an image: letters and digits of every
    script, '.', '_', '-' (``Zelle ä 1`` -> ``Zelle_ä_1``; anything else, spaces and separators
    included, becomes '_'), NFC-normalised, at most ``max_len`` characters and 200 UTF-8 bytes.
    ``ascii_only``: only A-Z, a-z, 0-9 are letters (account folders, named so since the first release)."""
    pattern = _SAFE_ASCII if ascii_only else _SAFE
    s = pattern.sub("_", unicodedata.normalize("NFC", str(name)).strip()).strip("._")
    s = s[:max_len].encode("utf-8")[:200].decode("utf-8", errors="ignore")
    if not s:
        raise CellposeWebError(f"The {what} {name!r} is empty after removing unusual characters; "
                               "use letters, digits, '-' or '_'.")
    return s


def named_dir(root: Path, name: str, what: str) -> Path:
    """``root/<name>`` for something a person named (a training set, a project): the name as given
    (surrounding spaces dropped), checked against :data:`cellpose_web.io.names.NAME_RULE` as lab model
    names are, never rewritten. Raises :class:`~cellpose_web.errors.BadInputError` saying what to
    change."""
    return safe_join(root, check_name(str(name if name is not None else "").strip(), what))


def safe_join(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that would end up outside root."""
    root = Path(root).resolve()
    p = root.joinpath(*parts).resolve()
    if p != root and root not in p.parents:
        raise CellposeWebError("That file name points outside the data folder and was refused.")
    return p


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write bytes atomically (temporary file in the same folder, fsync, rename)."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return write_json(path, obj, indent=2)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def user_root(user: str | None = None) -> Path:
    """Folder for one account's data: the data folder itself (shared lab), or users/<name>/ per user."""
    root = home_dir()
    if user and per_user():
        root = safe_join(root, "users", safe_name(user, "user name", ascii_only=True))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sub_dir(kind: str, user: str | None = None) -> Path:
    """jobs/, training_sets/ ... below the user's root, created."""
    d = safe_join(user_root(user), safe_name(kind))
    d.mkdir(parents=True, exist_ok=True)
    return d
