"""Every ``CELLPOSE_WEB_*`` environment variable, read in one place.

Values are read when asked (not at import), so a test or a launcher can set a variable and see it
take effect. The README's "Configuration" table lists the same variables.

=================================  =================================================================
``CELLPOSE_WEB_HOME``              data folder: lab models, training sets, jobs (``~/.cellpose_web``)
``CELLPOSE_WEB_DEFAULT_MODEL``     model pre-selected in the app (name or path)
``CELLPOSE_WEB_CPU``               ``1``: never use CUDA
``CELLPOSE_WEB_THREADS``           torch intra-op threads (default: the CPUs this process may use)
``CELLPOSE_WEB_DYNAMICS_THREADS``  threads for the flow-following loops on the CPU (default 1)
``CELLPOSE_WEB_PACKED_LINEAR``     ``0``: do not fuse Cellpose-SAM's linear layers
``CELLPOSE_WEB_TRAIN_BF16``        ``0`` / ``1``: force float32 / bfloat16 training (default automatic)
``CELLPOSE_WEB_LEGACY_URL``        where Cellpose 1-3 weights are downloaded from
``CELLPOSE_WEB_DOWNLOAD_TIMEOUT``  seconds before a weights download gives up (default 30)
``CELLPOSE_WEB_MAX_UPLOAD_MB``     largest single upload (default 1024 MB)
``CELLPOSE_WEB_MAX_PIXELS``        largest image, all planes and channels counted (default 250 million)
``CELLPOSE_WEB_MAX_ZIP_ENTRIES``   most files in one zip (default 500)
``CELLPOSE_WEB_MAX_ZIP_MB``        most uncompressed bytes in one zip (default 4096 MB)
``CELLPOSE_WEB_MAX_NITER``         largest niter accepted (default 5000)
``CELLPOSE_WEB_MAX_EPOCHS``        most fine-tune epochs (default 2000)
``CELLPOSE_WEB_CONCURRENCY_*``     parallel jobs per kind: ``_SEGMENT`` / ``_BATCH`` / ``_TRAIN`` (2 / 1 / 1)
``CELLPOSE_WEB_PER_USER``          ``1``: each account has its own training sets and jobs
``CELLPOSE_WEB_KEEP_RESULTS_MB``   memory kept for finished results in the app (default 2048 MB)
``CELLPOSE_WEB_AUTH``              ``user:password[,user2:pw2]`` for the app's login
``CELLPOSE_WEB_AUTH_FILE``         JSON users file with hashed passwords
``CELLPOSE_WEB_DASK_SCHEDULER``    ``tcp://HOST:8786`` or ``local``: run Batch jobs on Dask
``CELLPOSE_WEB_DASK_WORKERS``      workers of a ``local`` Dask cluster (default 2)
=================================  =================================================================
"""
from __future__ import annotations

import os
from pathlib import Path

PREFIX = "CELLPOSE_WEB_"


def env(name: str, default: str | None = None) -> str | None:
    """The raw value of ``CELLPOSE_WEB_<name>`` (``name`` without the prefix), or ``default``."""
    return os.environ.get(PREFIX + name, default)


def env_num(name: str, default: float) -> float:
    """``CELLPOSE_WEB_<name>`` as a number; ``default`` when unset or not a number."""
    try:
        return float(os.environ.get(PREFIX + name, default))
    except ValueError:
        return float(default)


def env_flag(name: str, default: bool = False) -> bool:
    """``CELLPOSE_WEB_<name>`` as a yes/no: ``1``, ``true`` or ``yes`` (any case) mean yes."""
    v = os.environ.get(PREFIX + name)
    if v is None:
        return default
    return v.strip().lower() in ("1", "true", "yes")


def home_dir() -> Path:
    """``$CELLPOSE_WEB_HOME`` (default ``~/.cellpose_web``): lab models, training sets, jobs, run.log.
    Not created here (see ``service.config.home_dir`` for the created, resolved folder)."""
    return Path(env("HOME") or "~/.cellpose_web").expanduser()


def default_model() -> str | None:
    """``CELLPOSE_WEB_DEFAULT_MODEL`` or None."""
    return env("DEFAULT_MODEL") or None


def set_default_model(name: str) -> None:
    """Set ``CELLPOSE_WEB_DEFAULT_MODEL`` for this process (``serve --model``)."""
    os.environ[PREFIX + "DEFAULT_MODEL"] = str(name)


def force_cpu() -> bool:
    """``CELLPOSE_WEB_CPU=1``: never use CUDA."""
    return env("CPU", "0") == "1"


def threads() -> int | None:
    """``CELLPOSE_WEB_THREADS`` as a positive int, None when unset or not a number."""
    v = env("THREADS")
    if not v:
        return None
    try:
        return max(1, int(v))
    except ValueError:
        return None


def dynamics_threads() -> int:
    """``CELLPOSE_WEB_DYNAMICS_THREADS`` (default 1)."""
    try:
        return max(1, int(env("DYNAMICS_THREADS", "1")))
    except ValueError:
        return 1


def packed_linear() -> bool:
    """``CELLPOSE_WEB_PACKED_LINEAR`` (default on; ``0`` turns it off)."""
    return env("PACKED_LINEAR", "1") != "0"


#: the variable ``train_seg(mixed_precision=None)`` reads
TRAIN_BF16_ENV = PREFIX + "TRAIN_BF16"


def train_bf16() -> str:
    """``CELLPOSE_WEB_TRAIN_BF16`` stripped ("" when unset)."""
    return os.environ.get(TRAIN_BF16_ENV, "").strip()


def legacy_url(default: str) -> str:
    """``CELLPOSE_WEB_LEGACY_URL`` or ``default``, without a trailing slash."""
    return (env("LEGACY_URL") or default).rstrip("/")


def download_timeout() -> float:
    """``CELLPOSE_WEB_DOWNLOAD_TIMEOUT`` in seconds (default 30)."""
    return float(env("DOWNLOAD_TIMEOUT") or 30)


def per_user() -> bool:
    """``CELLPOSE_WEB_PER_USER``: each account has its own training sets and jobs."""
    return env("PER_USER", "0").strip().lower() in ("1", "true", "yes")


def keep_results_bytes() -> int:
    """``CELLPOSE_WEB_KEEP_RESULTS_MB`` in bytes (default 2048 MB)."""
    try:
        return int(float(env("KEEP_RESULTS_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20


def auth() -> str | None:
    """``CELLPOSE_WEB_AUTH``."""
    return env("AUTH")


def auth_file() -> str | None:
    """``CELLPOSE_WEB_AUTH_FILE``."""
    return env("AUTH_FILE")


def dask_scheduler() -> str:
    """``CELLPOSE_WEB_DASK_SCHEDULER`` stripped ("" when unset)."""
    return (env("DASK_SCHEDULER", "") or "").strip()


def dask_workers() -> int:
    """``CELLPOSE_WEB_DASK_WORKERS`` (default 2)."""
    return int(env("DASK_WORKERS", "2"))
