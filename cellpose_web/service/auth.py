"""Accounts for the app: hashed passwords (PBKDF2-SHA256), the users file, and the login check
that combines ``--auth`` / ``CELLPOSE_WEB_AUTH`` with a users file (``CELLPOSE_WEB_AUTH_FILE``)."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Callable

from cellpose_web import config
from cellpose_web.errors import CellposeWebError

__all__ = ["hash_password", "verify_password", "load_users_file", "make_auth"]


def hash_password(password: str, salt: bytes | None = None, iterations: int = 200_000) -> str:
    """'pbkdf2_sha256$iterations$salt_hex$hash_hex' for a users file."""
    salt = salt or os.urandom(16)
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${dk.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        algo, it, salt_hex, hash_hex = stored.split("$")
        if algo != "pbkdf2_sha256":
            return False
        dk = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt_hex), int(it))
        return hmac.compare_digest(dk.hex(), hash_hex)
    except (ValueError, TypeError):
        return False


def load_users_file(path: str | Path) -> dict[str, str]:
    """users.json: {"alice": "pbkdf2_sha256$...", ...} (make entries with `python app.py --hash-password`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CellposeWebError(f"Cannot read the users file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise CellposeWebError(f"{path} must be a JSON object of user name -> hashed password.")
    return data


def make_auth(auth: str | None, auth_file: str | None) -> Callable[[str, str], bool] | None:
    """Combine --auth user:pass[,user2:pass2] (or CELLPOSE_WEB_AUTH) and a hashed users file."""
    plain: dict[str, str] = {}
    auth = auth or config.auth()
    auth_file = auth_file or config.auth_file()
    if auth:
        for pair in auth.split(","):
            if ":" not in pair:
                raise CellposeWebError("--auth must look like user:password (several separated by commas).")
            u, p = pair.split(":", 1)
            plain[u.strip()] = p
    hashed = load_users_file(auth_file) if auth_file else {}
    if not plain and not hashed:
        return None

    def check(user: str, password: str) -> bool:
        if user in hashed:
            return verify_password(password, hashed[user])
        if user in plain:
            return hmac.compare_digest(plain[user].encode(), password.encode())
        return False
    return check


# ------------------------------------------------------------------ entry point
