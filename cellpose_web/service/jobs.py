"""Background jobs (batch, training) with progress, cancel and a status that survives restarts.

Each job lives in ``<data>/jobs/<id>/``: ``status.json`` (written atomically on every update),
``log`` and ``results/``. A job found as "running" or "queued" when the server starts was
interrupted by a restart: it is marked "interrupted" and whatever it finished stays in results/.

Jobs of one kind run at most ``slots`` at a time in the process (``JobManager.start(..., slots=)``:
the app passes ``CELLPOSE_WEB_CONCURRENCY_TRAIN`` / ``_BATCH``); the others stay "queued" with a
message saying what they wait for, and can be cancelled while they wait. The browser's own limit
covers only the requests it is waiting on: a job whose page was closed keeps running, and without
slots the next one would run beside it on the same GPU. Work that is not a job (a human-in-the-loop
round) holds the same slots with :func:`hold_slot`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from cellpose_web.errors import CellposeWebError
from cellpose_web.service.storage import atomic_write_json, read_json, safe_join, sub_dir

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "interrupted")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Job:
    """Handle passed to a job function: report progress, check for cancel, write results."""

    def __init__(self, job_dir: Path, status: dict[str, Any]):
        self.dir = job_dir
        self.status = status
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.status["id"]

    @property
    def results_dir(self) -> Path:
        d = self.dir / "results"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.status.update(fields)
            self.status["updated"] = _now()
            atomic_write_json(self.dir / "status.json", self.status)

    def progress(self, fraction: float, message: str = "") -> None:
        self.update(progress=float(max(0.0, min(1.0, fraction))), message=message)

    def log(self, line: str) -> None:
        with open(self.dir / "log", "a") as f:
            f.write(f"{_now()} {line}\n")


_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _slot(kind: str, n: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore of ``n`` slots for jobs of ``kind`` (every user's manager shares it)."""
    with _slots_lock:
        return _slots.setdefault((kind, n), threading.BoundedSemaphore(n))


def waiting_message(kind: str, slots: int) -> str:
    """What a job waiting for a slot of ``kind`` tells its user."""
    what = {"train": "training"}.get(kind, kind)
    return (f"waiting: the server runs {slots} {what} job{'s' if slots != 1 else ''} at a time and it is busy; "
            "this one starts when a running one ends")


@contextlib.contextmanager
def hold_slot(kind: str, slots: int | None, cancelled: Callable[[], bool] = lambda: False,
              on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold one of the process-wide ``slots`` of ``kind`` while the block runs (work that is not a
    :class:`Job`, such as a human-in-the-loop round, takes the same slots as the jobs of its kind).

    Parameters
    ----------
    kind : str
        "train", "batch", ...: jobs and blocks of one kind share the slots.
    slots : int or None
        How many may run at once in this process; None: no limit (the block runs at once).
    cancelled : callable
        Polled every 0.25 s while waiting; True gives up the wait.
    on_wait : callable, optional
        Called once with :func:`waiting_message` when the block has to wait.

    Yields
    ------
    bool
        True once the slot is held, False when ``cancelled`` ended the wait (the block should stop).
    """
    if slots is None:
        yield True
        return
    n = max(1, int(slots))
    sem = _slot(kind, n)
    held = sem.acquire(blocking=False)
    if not held:
        if on_wait is not None:
            on_wait(waiting_message(kind, n))
        while not held and not cancelled():
            held = sem.acquire(timeout=0.25)
    try:
        yield held
    finally:
        if held:
            sem.release()


class JobManager:
    """Starts jobs in threads and keeps their status on disk (one manager per data folder/user)."""

    def __init__(self, user: str | None = None):
        self.user = user
        self.root = sub_dir("jobs", user)
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.recover()

    def recover(self) -> list[str]:
        """Mark jobs left active by a previous server process as interrupted."""
        fixed = []
        for st_path in self.root.glob("*/status.json"):
            st = read_json(st_path, None)
            if not isinstance(st, dict):
                continue
            if st.get("state") in ACTIVE and st.get("id") not in self._running:
                st["state"] = "interrupted"
                st["message"] = ("The server stopped while this job ran; finished results are kept. "
                                 "Start it again to redo the rest.")
                st["updated"] = _now()
                atomic_write_json(st_path, st)
                fixed.append(st.get("id"))
        return fixed

    def create(self, kind: str, params: dict[str, Any], owner: str | None = None) -> Job:
        jid = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        d = safe_join(self.root, jid)
        d.mkdir(parents=True)
        status = {"id": jid, "kind": kind, "state": "queued", "progress": 0.0, "message": "waiting",
                  "created": _now(), "updated": _now(), "owner": owner, "params": params, "result": None}
        job = Job(d, status)
        job.update()
        return job

    def start(self, job: Job, fn: Callable[[Job], dict[str, Any] | None], slots: int | None = None) -> threading.Thread:
        """Run fn(job) in a thread; its return value becomes status['result'].

        slots : at most this many jobs of ``job``'s kind run at once in this process (None: no limit);
            until one is free the job stays "queued" (cancel ends it there).
        """
        with self._lock:
            self._running[job.id] = job
        kind = str(job.status.get("kind"))

        def runner():
            try:
                with hold_slot(kind, slots, cancelled=lambda: job.cancelled,
                               on_wait=lambda message: job.update(message=message)) as held:
                    if not held:
                        job.update(state="cancelled", message="Cancelled before it started.")
                        return
                    job.update(state="running", message="started")
                    result = fn(job)
                if job.cancelled:  # the job may say what a cancel left (result["message"])
                    said = result.get("message") if isinstance(result, dict) else None
                    job.update(state="cancelled", result=result,
                               message=said or "Cancelled; results finished before the cancel are kept.")
                else:
                    job.update(state="done", progress=1.0, message="finished", result=result)
            except CellposeWebError as e:
                job.update(state="failed", message=str(e))
            except Exception as e:  # noqa: BLE001 - logged server side, short message to the user
                job.log(traceback.format_exc())
                log.exception("job %s failed", job.id)
                job.update(state="failed", message=f"Unexpected error ({type(e).__name__}); the admin can read "
                                                   f"jobs/{job.id}/log.")
            finally:
                with self._lock:
                    self._running.pop(job.id, None)

        t = threading.Thread(target=runner, name=f"job-{job.id}", daemon=True)
        t.start()
        job.thread = t
        return t

    def get(self, jid: str) -> dict[str, Any] | None:
        with self._lock:
            if jid in self._running:
                return dict(self._running[jid].status)
        try:
            return read_json(safe_join(self.root, jid, "status.json"), None)
        except CellposeWebError:
            return None

    def running_job(self, jid: str) -> Job | None:
        with self._lock:
            return self._running.get(jid)

    def cancel(self, jid: str) -> bool:
        job = self.running_job(jid)
        if job is None:
            return False
        job.update(message="cancelling…")  # first: the job's own last word, written after the flag, must win
        job.cancel_event.set()
        return True

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for st_path in self.root.glob("*/status.json"):
            st = read_json(st_path, None)
            if isinstance(st, dict) and (kind is None or st.get("kind") == kind):
                out.append(st)
        return sorted(out, key=lambda s: s.get("created", ""), reverse=True)


_managers: dict[str | None, JobManager] = {}
_mlock = threading.Lock()


def manager(user: str | None = None) -> JobManager:
    """The process-wide JobManager for a user (or the shared lab), created on first use."""
    from cellpose_web.service.config import home_dir, per_user
    key = (str(home_dir()), user if per_user() else None)
    with _mlock:
        if key not in _managers:
            _managers[key] = JobManager(key[1])
        return _managers[key]
