"""Interactive runs under control: cancel, stop when the browser goes away, progress with an ETA,
and the last finished result kept per browser so a page reload can reopen it.

The Segment tab registers each run under its browser session; a Cancel click, or the browser
closing/reloading (Gradio's unload event), sets the run's cancel flag, and the next progress
callback inside ``eval`` raises :class:`RunCancelled`, which unwinds the run and frees the model
for the next user within seconds. No Gradio here: a script can use the same registry.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from cellpose_web import config
from cellpose_web import errors
from cellpose_web.models import format_duration

#: finished results kept in memory (oldest dropped first): at most this many, and at most
#: CELLPOSE_WEB_KEEP_RESULTS_MB megabytes of arrays in all (default 2048)
MAX_KEPT_RESULTS = 64


def _max_kept_bytes() -> int:
    return config.keep_results_bytes()


# Raised inside a run whose cancel flag was set (Cancel button, or the browser went away); not a
# user error (cellpose_web.errors.RunCancelled is not a CellposeWebError): callers match it by type.
RunCancelled = errors.RunCancelled


@dataclass
class Run:
    """One interactive run: a cancel flag, when it started, and its last progress."""
    key: str
    session: str
    started: float = field(default_factory=time.monotonic)
    fraction: float = 0.0
    message: str = ""
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        """Raise RunCancelled when the run was cancelled."""
        if self.cancel_event.is_set():
            raise RunCancelled("Run cancelled; nothing was changed (the earlier result, if any, is kept).")

    def progress(self, fraction: float, message: str = "") -> str:
        """Record progress (0..1) and return a line with the ETA; raises RunCancelled when cancelled."""
        self.check()
        self.fraction = float(min(max(fraction, 0.0), 1.0))
        self.message = message
        return progress_line(self.fraction, time.monotonic() - self.started, message)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def eta_seconds(fraction: float, elapsed_s: float) -> float | None:
    """Seconds left, assuming the rest goes at the rate so far (None before 3 % or 1 s of work)."""
    if fraction < 0.03 or elapsed_s < 1.0 or fraction >= 1.0:
        return None
    return elapsed_s * (1.0 - fraction) / fraction


def progress_line(fraction: float, elapsed_s: float, message: str = "") -> str:
    """'image 3/20: tiles 4/9 · 12 s elapsed, about 22 s left' (progress bars show the percentage)."""
    eta = eta_seconds(fraction, elapsed_s)
    if " left" in message:  # eval already says how long is left for its part: do not say it twice
        eta = None
    parts = [message] if message else []
    parts.append(f"{format_duration(elapsed_s)} elapsed" + (f", about {format_duration(eta)} left" if eta else ""))
    return " · ".join(parts)


class RunRegistry:
    """Active runs by key (one browser tab = one key) and finished results by owner (user + browser)."""

    def __init__(self, max_kept: int = MAX_KEPT_RESULTS, max_bytes: int | None = None):
        self._lock = threading.Lock()
        self._active: dict[str, Run] = {}
        self._kept: OrderedDict[str, "_Kept"] = OrderedDict()
        self.max_kept = max_kept
        self.max_bytes = _max_kept_bytes() if max_bytes is None else int(max_bytes)

    # ---------------------------------------------------------------- active runs
    def start(self, key: str, session: str = "") -> Run:
        """Register a new run for `key`, cancelling one still going for the same key."""
        run = Run(key=key, session=session)
        with self._lock:
            old = self._active.get(key)
            if old is not None:
                old.cancel_event.set()
            self._active[key] = run
        return run

    def finish(self, run: Run) -> None:
        with self._lock:
            if self._active.get(run.key) is run:
                del self._active[run.key]

    def cancel(self, key: str) -> bool:
        """Cancel the run of `key`; True if one was running."""
        with self._lock:
            run = self._active.get(key)
        if run is None:
            return False
        run.cancel_event.set()
        return True

    def cancel_session(self, session: str) -> int:
        """Cancel every run started from a browser session (its tab closed or reloaded)."""
        with self._lock:
            runs = [r for r in self._active.values() if r.session == session]
        for r in runs:
            r.cancel_event.set()
        return len(runs)

    def active(self) -> list[Run]:
        with self._lock:
            return list(self._active.values())

    def run(self, key: str, session: str, work: Callable[[Run], Any]) -> Any:
        """``work(run)`` registered under `key`; RunCancelled if it was cancelled meanwhile."""
        run = self.start(key, session)
        try:
            out = work(run)
            run.check()
            return out
        finally:
            self.finish(run)

    # ---------------------------------------------------------------- finished results
    def keep(self, owner: str, result: Any, nbytes: int = 0) -> bool:
        """Keep `result` (about `nbytes` of memory) as `owner`'s latest, replacing the previous one (and
        what was attached to it) and dropping the oldest results beyond the count and memory bounds;
        False if it is too big to keep."""
        if not owner:
            return False
        with self._lock:
            self._kept.pop(owner, None)
            if nbytes > self.max_bytes:
                return False
            self._kept[owner] = _Kept(result, int(nbytes))
            self._trim()
            return True

    def attach(self, owner: str, name: str, value: Any, nbytes: int = 0) -> bool:
        """Attach `value` (e.g. the Correct tab's edits) to `owner`'s kept result under `name`, so that
        a page reload gets it back with the result; False when there is no kept result or it is too big."""
        with self._lock:
            entry = self._kept.get(owner) if owner else None
            if entry is None:
                return False
            entry.extras.pop(name, None)
            if entry.nbytes + int(nbytes) > self.max_bytes:
                return False
            entry.extras[name] = (value, int(nbytes))
            self._kept.move_to_end(owner)
            self._trim()
            return owner in self._kept

    def kept(self, owner: str) -> Any | None:
        with self._lock:
            entry = self._kept.get(owner) if owner else None
        return entry.result if entry is not None else None

    def attached(self, owner: str, name: str) -> Any | None:
        """What :meth:`attach` put on `owner`'s kept result under `name` (None if nothing)."""
        with self._lock:
            entry = self._kept.get(owner) if owner else None
            item = entry.extras.get(name) if entry is not None else None
        return item[0] if item is not None else None

    def _trim(self) -> None:
        while len(self._kept) > self.max_kept or sum(e.nbytes for e in self._kept.values()) > self.max_bytes:
            self._kept.popitem(last=False)

    def forget(self, owner: str) -> None:
        with self._lock:
            self._kept.pop(owner, None)


@dataclass
class _Kept:
    """A kept result, its size, and what was attached to it ({name: (value, nbytes)})."""
    result: Any
    result_nbytes: int
    extras: dict[str, tuple[Any, int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.result_nbytes + sum(n for _, n in self.extras.values())


_registry = RunRegistry()


def registry() -> RunRegistry:
    """The process-wide registry the app uses."""
    return _registry


def owner_key(user: str | None, browser_id: str | None) -> str:
    """Key for a browser's kept results: the account name (if any) plus the browser's random id."""
    if not browser_id:
        return ""
    return f"{user or ''}\n{browser_id}"
