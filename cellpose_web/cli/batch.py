"""``python -m cellpose_web batch``: many images, on threads or a Dask cluster."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence
from cellpose_web.errors import CellposeWebError
from cellpose_web.cli.common import ProgressLine, channels_notice, check_params, collect_images, command_name, device_arg, finish, image_settings, model_spec, print_result, resolve_model_for, save_options, setup_logging, tell
from cellpose_web.cli.parser import build_parser
from cellpose_web.cli.segment import run_segmentation


def run_batch(argv: Sequence[str]) -> int:
    """``batch``: the segmentation flags, in this process or spread over a Dask cluster (issue 6).

    ``--dask-scheduler tcp://HOST:8786`` uses a running cluster; ``--dask-scheduler local`` or
    ``--dask-workers N`` alone starts a LocalCluster of N worker processes on this machine.
    """
    p = build_parser(prog=f"{command_name()} batch")
    dk = p.add_argument_group("Dask scale-out (pip install 'dask[distributed]')")
    dk.add_argument("--dask-scheduler", dest="dask_scheduler", default=None,
                    help="address of a Dask scheduler, tcp://HOST:8786, or 'local' for a LocalCluster here; the "
                         "images, the output folder and the model file must be at the same paths on every worker")
    dk.add_argument("--dask-workers", "--workers", dest="dask_workers", type=int, default=None,
                    help="worker processes of a LocalCluster; implies --dask-scheduler local (None: 2 workers)")
    dk.add_argument("--dask-retries", dest="dask_retries", type=int, default=2,
                    help="times an image is retried when its worker dies or fails unexpectedly")
    dk.add_argument("--dask-timeout", dest="dask_timeout", type=float, default=20.0,
                    help="seconds to wait when connecting to the scheduler")
    args = p.parse_args(list(argv))
    setup_logging(args.verbose)
    if args.dask_scheduler is None and args.dask_workers is None:
        return run_segmentation(args)
    return run_segmentation_dask(args)


def run_segmentation_dask(args) -> int:
    """The ``batch`` loop on a Dask cluster: same files as :func:`run_segmentation`, one line per image."""
    from cellpose_web.workflows import distributed, pipeline

    if args.train:
        raise CellposeWebError("--train does not run on Dask; drop --dask-scheduler/--dask-workers")
    if args.dask_workers is not None and not (1 <= args.dask_workers <= 256):
        raise CellposeWebError(f"--dask-workers must be between 1 and 256, got {args.dask_workers}")
    if not (0 <= args.dask_retries <= 100):
        raise CellposeWebError(f"--dask-retries must be between 0 and 100, got {args.dask_retries}")
    check_params(args)
    distributed.require_dask()
    sched = args.dask_scheduler
    if sched not in (None, "", "local"):
        sched = distributed.scheduler_address(sched)
    files = collect_images(args)
    spec = model_spec(args)
    info = resolve_model_for(args, spec)
    channels_notice(args, info.arch)
    settings, save = image_settings(args), save_options(args)
    savedir = Path(args.savedir).expanduser().resolve() if args.savedir else None
    if savedir is not None:
        savedir.mkdir(parents=True, exist_ok=True)
    where = "a local Dask cluster" if sched in (None, "", "local") else f"the Dask cluster at {sched}"
    tell(f"segmenting {len(files)} image(s) with '{info.name}' ({info.arch}) on {where}")
    bar = ProgressLine(len(files))
    state = {"done": 0, "failed": 0}

    def progress(done: int, total: int, result: dict[str, Any]) -> None:
        state["done"] = done
        bar.clear()
        name = result.get("name", "?")
        if result.get("error"):
            state["failed"] += 1
            tell(f"error: {name}: {result['error']}")
        else:
            print_result(result, done, total, f" (worker {result.get('worker', '?')})")
        bar.show(done, name)

    t0 = time.perf_counter()
    distributed.run_batch_dask(
        [str(Path(f).resolve()) for f in files], savedir, info, settings, save,
        scheduler=None if sched in (None, "", "local") else sched, n_workers=args.dask_workers or 2,
        retries=args.dask_retries, progress=progress, device=device_arg(args), use_gpu=args.use_gpu,
        timeout=args.dask_timeout, command=pipeline.command_line())
    bar.clear()
    return finish(files, state["failed"], time.perf_counter() - t0)
