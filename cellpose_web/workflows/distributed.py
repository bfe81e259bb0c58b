"""Scale-out: segment a batch of image files on a Dask distributed cluster.

Each image is one task. A worker loads the model once (:func:`cellpose_web.workflows.pipeline.get_model`,
keyed by the model file, its sha256 and the device) and writes exactly the files the single-process
command line and the web service write, through :func:`cellpose_web.workflows.pipeline.process_file`, so the
masks are the same. :func:`map_on_dask` is the one Dask driver (the command line's ``batch`` and the
Batch tab's cluster mode both use it). A task
whose worker dies (killed, out of memory) is re-run elsewhere up to ``retries`` times; a bad image
is reported with its message and never retried.

The images, the output folder and the model file must be reachable at the same paths from every
worker (a shared file system, as on most clusters). Dask is optional::

    pip install 'dask[distributed]'
    python -m cellpose_web batch --dir IN --savedir OUT --dask-workers 4           # LocalCluster
    dask scheduler &  dask worker tcp://HOST:8786 --nthreads 1 &  # ... on each node
    python -m cellpose_web batch --dir IN --savedir OUT --dask-scheduler tcp://HOST:8786
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from cellpose_web.workflows import pipeline
from cellpose_web.errors import CellposeWebError

log = logging.getLogger(__name__)

__all__ = ["run_batch_dask", "map_on_dask", "require_dask", "segment_task", "scheduler_address"]

INSTALL_HINT = "pip install 'dask[distributed]'"

ProgressFn = Callable[[int, int, dict], None]


def require_dask():
    """Import ``dask.distributed`` or raise a CellposeWebError that says how to install it."""
    try:
        import dask  # noqa: F401
        import dask.distributed as dd
    except ImportError:
        raise CellposeWebError(f"Dask scale-out needs the optional package dask[distributed]: {INSTALL_HINT} "
                               "(or run without --dask-scheduler/--dask-workers to use this process)") from None
    return dd


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------
def _info_dict(info: Any) -> dict[str, Any]:
    if isinstance(info, dict):
        return dict(info)
    return info.to_dict() if hasattr(info, "to_dict") else dict(vars(info))


def _worker_name() -> str:
    try:
        from dask.distributed import get_worker

        w = get_worker()
        return str(w.name if w.name is not None else w.address)
    except Exception:  # noqa: BLE001 - called outside a worker (tests)
        return f"pid{os.getpid()}"


def _process(path: str, savedir: str | None, info: dict, settings: pipeline.ImageSettings,
             save: pipeline.SaveOptions, device: str | None, use_gpu: bool | None, name: str | None = None,
             command: str | None = None) -> dict[str, Any]:
    fname = Path(path).name
    try:
        loaded = pipeline.get_model(info, device=device, gpu=use_gpu)
        r = pipeline.process_file(path, loaded, settings, savedir, save, name=name, command=command)
    except (CellposeWebError, FileNotFoundError) as e:  # the image's fault: report, do not retry
        return {"name": fname, "path": path, "error": " ".join(str(e).split())}
    r.update(path=path, worker=_worker_name(), pid=os.getpid())
    return r


def segment_task(path: str, savedir: str | None, info: dict, settings: pipeline.ImageSettings,
                 save: pipeline.SaveOptions, device: str | None = None, use_gpu: bool | None = None,
                 name: str | None = None, command: str | None = None) -> dict[str, Any]:
    """One Dask task: :func:`cellpose_web.workflows.pipeline.process_file` on ``path`` with the worker's copy
    of the model (loaded once per worker process by :func:`cellpose_web.workflows.pipeline.get_model`).

    Returns process_file's dict (+ "path", "worker", "pid"), or {"name", "path", "error"} for an
    image that cannot be segmented. Unexpected exceptions propagate (Dask retries them).
    """
    # looked up at call time so a test can wrap it in the worker processes (fault injection)
    return globals()["_process"](path, savedir, info, settings, save, device, use_gpu, name, command)


# ----------------------------------------------------------------------------------------------
# client side
# ----------------------------------------------------------------------------------------------
def scheduler_address(address: str) -> str:
    """``tcp://HOST:PORT`` from ``tcp://HOST:PORT``, ``tls://...``, or ``HOST:PORT``; CellposeWebError otherwise."""
    a = str(address).strip()
    if re.fullmatch(r"[A-Za-z0-9_.\-]+:\d{1,5}", a) or re.fullmatch(r"\[[0-9A-Fa-f:]+\]:\d{1,5}", a):
        a = "tcp://" + a
    if not re.fullmatch(r"(tcp|tls|ucx|inproc|ws|wss)://\S+", a):
        raise CellposeWebError(f"--dask-scheduler {address!r} is not a scheduler address; expected tcp://HOST:8786 "
                               "(or 'local' for a cluster on this machine)")
    return a


def _connect(scheduler: str | None, n_workers: int, retries: int, timeout: float):
    """(client, cluster or None)."""
    dd = require_dask()
    import dask

    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # Dask logs at INFO by default
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if scheduler:
        scheduler = scheduler_address(scheduler)
        try:
            client = dd.Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise CellposeWebError(f"could not connect to the Dask scheduler at {scheduler} within {timeout:g} s "
                                   f"({type(e).__name__}); is it running (`dask scheduler`) and reachable from "
                                   "here?") from None
        except ValueError as e:
            raise CellposeWebError(f"--dask-scheduler {scheduler!r} is not a scheduler address "
                                   f"(expected tcp://HOST:8786 or 'local'): {e}") from None
        return client, None
    with dask.config.set({"distributed.scheduler.allowed-failures": int(retries)}):
        cluster = dd.LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR)
        client = dd.Client(cluster, set_as_default=False)
    return client, cluster


def run_batch_dask(files: Sequence[str | os.PathLike], savedir: str | os.PathLike | None, model_name: Any,
                   settings: pipeline.ImageSettings | None = None, save: pipeline.SaveOptions | None = None,
                   scheduler: str | None = None, n_workers: int = 2, retries: int = 2,
                   progress: ProgressFn | None = None, device: str | None = None, use_gpu: bool | None = None,
                   timeout: float = 20.0, client: Any = None, command: str | None = None) -> list[dict[str, Any]]:
    """Segment ``files`` on a Dask cluster; returns one result dict per file, in the order given.

    files : image paths (visible to every worker at these paths).
    savedir : output folder (None: beside each image, as the command line).
    model_name : registry name or path, or a resolved ``registry.ModelInfo``.
    settings : :class:`cellpose_web.workflows.pipeline.ImageSettings` (default: eval's defaults, measured).
    save : which files to write (default: ``_seg.npy``, as ``python -m cellpose_web``).
    scheduler : ``tcp://HOST:8786`` of a running cluster; None starts a LocalCluster of
        ``n_workers`` processes with one thread each (closed again at the end).
    retries : re-runs of an image whose worker died or failed unexpectedly.
    progress : called as ``progress(done, total, result)`` after each image.
    client : an existing ``dask.distributed.Client`` to use instead (left open).

    A result is :func:`cellpose_web.workflows.pipeline.process_file`'s dict (+ "path", "worker") or
    {"name", "path", "error"}.
    """
    from cellpose_web import registry

    require_dask()
    files = [str(Path(f).resolve()) for f in files]
    if not files:
        raise CellposeWebError("no images to segment")
    if not isinstance(model_name, (str, os.PathLike)):
        info = model_name
    else:
        info = registry.resolve_model(str(model_name))
    info = _info_dict(info)
    settings = settings or pipeline.ImageSettings()
    save = save or pipeline.SaveOptions()
    sd = None
    if savedir is not None:
        sd = Path(savedir).expanduser().resolve()
        sd.mkdir(parents=True, exist_ok=True)
        sd = str(sd)
    calls = [((f, sd, info, settings, save, device, use_gpu, None, command), {}) for f in files]
    results = map_on_dask(segment_task, calls, [Path(f).name for f in files], scheduler=scheduler,
                          n_workers=n_workers, retries=retries, progress=progress, timeout=timeout, client=client)
    for r, f in zip(results, files):
        r.setdefault("path", f)
    return results


def map_on_dask(func: Callable[..., dict], calls: Sequence[tuple[tuple, dict]], names: Sequence[str],
                scheduler: str | None = None, n_workers: int = 2, retries: int = 2,
                progress: ProgressFn | None = None, timeout: float = 20.0, client: Any = None,
                cancelled: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Run ``func(*args, **kwargs)`` for each (args, kwargs) of ``calls`` as Dask tasks; results in order.

    The generic driver behind :func:`run_batch_dask`, for any per-image function that returns a
    dict and reports a bad input by returning {"error": ...} (not raising). ``func`` must be
    importable on the workers (a module-level function of this package). An exception, or a worker
    that dies, is retried ``retries`` times; after that the item's result is {"name", "error"}.
    progress(done, total, result) follows completion; cancelled() is checked between results and
    cancels what has not run yet (those items get {"name", "error": "cancelled"}).
    """
    dd = require_dask()
    if len(names) != len(calls):
        raise ValueError("one name per call")
    own = client is None
    cluster = None
    if own:
        client, cluster = _connect(scheduler, n_workers, retries, timeout)
    token = uuid.uuid4().hex[:8]
    results: list[dict[str, Any] | None] = [None] * len(calls)
    futures: dict[Any, int] = {}
    try:
        for i, (args, kwargs) in enumerate(calls):
            fut = client.submit(func, *args, key=f"cellpose-web-{token}-{i}", retries=int(retries), pure=False,
                                **kwargs)
            futures[fut] = i
        done = 0
        for fut in dd.as_completed(list(futures), loop=client.loop):
            i = futures[fut]
            try:
                r = fut.result()
            except Exception as e:  # noqa: BLE001 - the worker died too often or failed unexpectedly
                kind = type(e).__name__
                if kind == "KilledWorker":
                    msg = (f"the worker segmenting it died {retries + 1} time(s) (out of memory or killed); "
                           "try fewer workers per machine or a smaller image")
                elif kind in ("CancelledError", "FutureCancelledError"):
                    msg = "not processed: the batch was cancelled"
                else:
                    msg = f"unexpected {kind} on the worker after {retries} retries: {' '.join(str(e).split())[:200]}"
                r = {"name": names[i], "error": msg}
            if isinstance(r, dict):
                r.setdefault("name", names[i])
            results[i] = r
            done += 1
            if progress is not None:
                progress(done, len(calls), r)
            if cancelled is not None and cancelled():
                for f2 in futures:
                    if not f2.done():
                        f2.cancel()
    except BaseException:
        for fut in list(futures):
            fut.cancel()
        raise
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    return [r if r is not None else {"name": names[i], "error": "not processed"} for i, r in enumerate(results)]
