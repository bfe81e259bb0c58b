"""``logger_setup``: Cellpose's run log (``run.log`` in the data folder) plus the console."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from cellpose_web.resources import home_dir


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
