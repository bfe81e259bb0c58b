"""Scale-out: segment a batch of image files on a Dask distributed cluster.

Each image is one task. A worker loads the model once (cached per worker process, keyed by the
model file, its sha256 and the device) and writes exactly the files the single-process command
line writes, through :func:`cellpose_web.cli.segment_file`, so the masks are the same. A task
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
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

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
_MODELS: dict[tuple, tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def _info_dict(info: Any) -> dict[str, Any]:
    if isinstance(info, dict):
        return dict(info)
    return info.to_dict() if hasattr(info, "to_dict") else dict(vars(info))


def worker_model(info: dict[str, Any], device: str | None = None, use_gpu: bool = False):
    """(CellposeModel, ModelInfo) for this worker process, loaded once per (file, sha256, device)."""
    from cellpose_web import registry
    from cellpose_web.models import CellposeModel

    key = (info.get("path"), info.get("sha256"), str(device), bool(use_gpu))
    with _MODELS_LOCK:
        hit = _MODELS.get(key)
        if hit is not None:
            return hit
        mi = registry.ModelInfo(**{k: v for k, v in info.items() if k in registry.ModelInfo.__dataclass_fields__})
        if not mi.path or not Path(mi.path).is_file():  # not at the same path here: resolve the name
            found = registry.resolve_model(mi.name)
            if mi.sha256 and found.sha256 and found.sha256 != mi.sha256:
                raise CellposeWebError(f"model '{mi.name}' on this worker differs from the one the batch was started "
                                       f"with (sha256 {found.sha256[:12]} vs {mi.sha256[:12]}); put the model file "
                                       "on a shared path")
            mi = found
        model = CellposeModel(gpu=use_gpu, pretrained_model=mi.path, device=device)
        model.model_info = mi
        _MODELS[key] = (model, mi)
        return _MODELS[key]


def _worker_name() -> str:
    try:
        from dask.distributed import get_worker

        w = get_worker()
        return str(w.name if w.name is not None else w.address)
    except Exception:  # noqa: BLE001 - called outside a worker (tests)
        return f"pid{os.getpid()}"


def _process(path: str, savedir: str | None, info: dict, params: dict, opts: dict, device: str | None,
             use_gpu: bool) -> dict[str, Any]:
    from cellpose_web import cli

    name = Path(path).name
    try:
        model, mi = worker_model(info, device, use_gpu)
        r = cli.segment_file(model, mi, path, params, opts, savedir)
    except (CellposeWebError, FileNotFoundError) as e:  # the image's fault: report, do not retry
        return {"name": name, "path": path, "error": " ".join(str(e).split())}
    r.update(path=path, worker=_worker_name(), pid=os.getpid())
    return r


def segment_task(path: str, savedir: str | None, info: dict, params: dict, opts: dict, device: str | None = None,
                 use_gpu: bool = False) -> dict[str, Any]:
    """One Dask task: segment ``path`` and write its files (see :func:`cellpose_web.cli.segment_file`).

    Returns the per-image result dict, or {"name", "path", "error"} for an image that cannot be
    segmented. Unexpected exceptions propagate (Dask retries them).
    """
    # looked up at call time so a test can wrap it in the worker processes (fault injection)
    return globals()["_process"](path, savedir, info, params, opts, device, use_gpu)


# ----------------------------------------------------------------------------------------------
# client side
# ----------------------------------------------------------------------------------------------
def default_file_options() -> dict[str, Any]:
    """The per-file options of a plain ``python -m cellpose_web --dir ...`` run (writes ``_seg.npy``)."""
    from cellpose_web import cli

    return cli.file_options(cli.build_parser().parse_args(["--dir", "."]))


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
                   eval_kwargs: dict[str, Any] | None = None, save_kwargs: dict[str, Any] | None = None,
                   scheduler: str | None = None, n_workers: int = 2, retries: int = 2,
                   progress: ProgressFn | None = None, device: str | None = None, use_gpu: bool = False,
                   timeout: float = 20.0, client: Any = None) -> list[dict[str, Any]]:
    """Segment ``files`` on a Dask cluster; returns one result dict per file, in the order given.

    files : image paths (visible to every worker at these paths).
    savedir : output folder (None: beside each image, as the command line).
    model_name : registry name or path, or a resolved ``registry.ModelInfo``.
    eval_kwargs : ``CellposeModel.eval`` keywords (default: those of ``python -m cellpose_web``).
    save_kwargs : which files to write and how to read the images (``cli.file_options``).
    scheduler : ``tcp://HOST:8786`` of a running cluster; None starts a LocalCluster of
        ``n_workers`` processes with one thread each (closed again at the end).
    retries : re-runs of an image whose worker died or failed unexpectedly.
    progress : called as ``progress(done, total, result)`` after each image.
    client : an existing ``dask.distributed.Client`` to use instead (left open).

    A result is {"name", "path", "n_masks", "seconds", "device", "worker", "notices"} or
    {"name", "path", "error"}.
    """
    from cellpose_web import cli, registry

    require_dask()
    files = [str(Path(f).resolve()) for f in files]
    if not files:
        raise CellposeWebError("no images to segment")
    if not isinstance(model_name, (str, os.PathLike)):
        info = model_name
    else:
        info = registry.resolve_model(str(model_name))
    info = _info_dict(info)
    if eval_kwargs is None:
        eval_kwargs = cli._eval_kwargs(cli.build_parser().parse_args(["--dir", "."]))
    opts = default_file_options()
    opts.update(save_kwargs or {})
    if opts.get("max_pixels") is None:
        opts["max_pixels"] = cli.default_max_pixels()
    sd = None
    if savedir is not None:
        sd = Path(savedir).expanduser().resolve()
        sd.mkdir(parents=True, exist_ok=True)
        sd = str(sd)
    calls = [((f, sd, info, eval_kwargs, opts, device, use_gpu), {}) for f in files]
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
