"""Service configuration: data folder and limits, from environment variables with sensible defaults.

Environment variables (all optional):
  CELLPOSE_WEB_HOME                 data folder (default ~/.cellpose_web)
  CELLPOSE_WEB_MAX_UPLOAD_MB        largest single upload (default 1024 MB)
  CELLPOSE_WEB_MAX_PIXELS           largest image, all planes and channels counted (default 250 million)
  CELLPOSE_WEB_MAX_ZIP_ENTRIES      most files in one zip (default 500)
  CELLPOSE_WEB_MAX_ZIP_MB           most uncompressed bytes in one zip (default 4096 MB)
  CELLPOSE_WEB_MAX_NITER            largest niter accepted (default 5000)
  CELLPOSE_WEB_MAX_EPOCHS           most fine-tune epochs (default 2000)
  CELLPOSE_WEB_CONCURRENCY_SEGMENT / _BATCH / _TRAIN   parallel jobs per kind (default 2 / 1 / 1)
  CELLPOSE_WEB_PER_USER             "1": each account has its own training sets and jobs (default shared lab)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cellpose_web import config
from cellpose_web.config import auth, auth_file, dask_workers, set_default_model  # noqa: F401 - for the app


def home_dir() -> Path:
    """The data folder (CELLPOSE_WEB_HOME, default ~/.cellpose_web), created if missing."""
    p = config.home_dir()
    p.mkdir(parents=True, exist_ok=True)
    return p.resolve()


@dataclass(frozen=True)
class Limits:
    """Upload and parameter limits; every check in the service reads these."""
    max_upload_bytes: int = 1024 * 2**20
    max_pixels: int = 250_000_000
    max_zip_entries: int = 500
    max_zip_uncompressed_bytes: int = 4096 * 2**20
    max_niter: int = 5000
    max_epochs: int = 2000
    max_channels: int = 64
    concurrency: dict = field(default_factory=lambda: {"segment": 2, "batch": 1, "train": 1})

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(
            max_upload_bytes=int(config.env_num("MAX_UPLOAD_MB", 1024) * 2**20),
            max_pixels=int(config.env_num("MAX_PIXELS", 250_000_000)),
            max_zip_entries=int(config.env_num("MAX_ZIP_ENTRIES", 500)),
            max_zip_uncompressed_bytes=int(config.env_num("MAX_ZIP_MB", 4096) * 2**20),
            max_niter=int(config.env_num("MAX_NITER", 5000)),
            max_epochs=int(config.env_num("MAX_EPOCHS", 2000)),
            concurrency={k: max(1, int(config.env_num(f"CONCURRENCY_{k.upper()}", d)))
                         for k, d in (("segment", 2), ("batch", 1), ("train", 1))},
        )


def per_user() -> bool:
    return config.per_user()
