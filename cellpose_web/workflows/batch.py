"""Batch segmentation: a zip (or many files) in -> per-image Cellpose files, a summary CSV,
an all-cells CSV and a result zip out. A bad file is listed with its reason; the rest go on.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cellpose_web import config
from cellpose_web.workflows import pipeline
from cellpose_web.errors import CellposeWebError
from cellpose_web.io import atomic_save
from cellpose_web.measure import PunctaParams
from cellpose_web.workflows import inputs, model_cache as models_cache
from cellpose_web.service.config import Limits
from cellpose_web.service import jobs
from cellpose_web.workflows.segment import SegmentParams
from cellpose_web.service.storage import atomic_write_bytes, atomic_write_json, safe_name

log = logging.getLogger(__name__)


def collect_inputs(files: list[str | Path], work: Path, limits: Limits) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand zips (checked) and list image files; returns (images, [(name, reason)])."""
    paths: list[Path] = []
    bad: list[tuple[str, str]] = []
    for i, f in enumerate(files):
        f = Path(f)
        if f.suffix.lower() == ".zip":
            try:
                paths += inputs.extract_zip(f, work / f"zip{i}", limits)
            except CellposeWebError as e:
                bad.append((f.name, str(e)))
        else:
            paths.append(f)
    imgs, skipped = inputs.image_files(paths)
    if len(imgs) > limits.max_zip_entries:
        raise CellposeWebError(f"{len(imgs)} images is above the limit of {limits.max_zip_entries} per batch; "
                               "split the batch.")
    return imgs, bad + skipped


def _settings(params: SegmentParams, pixel_size_um: float | None, puncta: PunctaParams | None,
              limits: Limits) -> pipeline.ImageSettings:
    return pipeline.ImageSettings(eval_kwargs=params.eval_kwargs(), channel_axis=params.channel_axis,
                                  z_axis=params.z_axis, segment_channels=params.channels,
                                  pixel_size_um=pixel_size_um, puncta=puncta, measure=True,
                                  max_pixels=limits.max_pixels)


#: summary.csv columns a reader wants first (when present), and the long ones that go last
SUMMARY_FIRST = ("image", "n_cells", "median_area_um2", "median_area_px", "median_volume_um3", "median_volume_px",
                 "puncta_in_cells", "mean_puncta_per_cell", "median_puncta_density_per_um2",
                 "puncta_outside_cells", "puncta_near_cell_edge", "puncta_total", "status", "reason")
SUMMARY_LAST = ("hint", "pixel_size_um", "model", "model_sha256", "cells_csv")


def summary_column_order(columns) -> list[str]:
    """The summary's columns with the useful ones first (image, n_cells, sizes, puncta, status) and
    the long ones (what to try, error reason, model hash, file paths) last."""
    cols = list(columns)
    first = [c for c in SUMMARY_FIRST if c in cols]
    last = [c for c in SUMMARY_LAST if c in cols]
    return first + [c for c in cols if c not in first and c not in last] + last


def _row(image: str, r: dict[str, Any]) -> dict[str, Any]:
    """A summary row from :func:`cellpose_web.workflows.pipeline.process_file`'s result (or its error)."""
    if r.get("error"):
        return {"image": image, "status": "error", "reason": r["error"]}
    m = r.get("model") or {}
    return {"image": image, "status": "ok", **r.get("summary", {}), "pixel_size_um": r.get("pixel_size_um"),
            "model": m.get("name"), "model_sha256": m.get("sha256"), "cells_csv": r["files"]["cells_csv"],
            "hint": r.get("hint", "")}


def process_image(path: str | Path, stem: str, params: SegmentParams, model_name: str, out_dir: str | Path,
                  pixel_size_um: float | None = None, puncta: PunctaParams | None = None,
                  limits: Limits | None = None) -> dict[str, Any]:
    """Segment, measure and write the files of one image in this process (the pipeline's
    :func:`~cellpose_web.workflows.pipeline.process_file` with the shared model), into ``out_dir/stem/``.

    Returns {"image", "status": "ok", summary columns..., "cells_csv"} or {"image", "status": "error", "reason"}.
    """
    p = Path(path)
    limits = limits or Limits.from_env()
    try:
        inputs.check_file_size(p, limits)
        r = pipeline.process_file(p, models_cache.get_model(model_name), _settings(params, pixel_size_um, puncta, limits),
                                  Path(out_dir) / stem, pipeline.SaveOptions.everything(), name=stem + p.suffix)
        return _row(p.name, r)
    except (CellposeWebError, FileNotFoundError) as e:
        return {"image": p.name, "status": "error", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one bad file never stops the batch
        log.exception("batch image %s failed", p.name)
        return {"image": p.name, "status": "error", "reason": f"unexpected error ({type(e).__name__})"}


def dask_scheduler_from_env() -> str | None:
    """CELLPOSE_WEB_DASK_SCHEDULER: 'tcp://HOST:8786', or 'local' for a LocalCluster on this machine."""
    v = config.dask_scheduler()
    return v or None


def _on_cluster(imgs: list[Path], stems: list[str], params: SegmentParams, model_name: str, out_dir: Path,
                pixel_size_um, puncta, limits: Limits, scheduler: str, n_workers: int, retries: int,
                progress, cancelled) -> list[dict[str, Any]]:
    """Every image through :func:`cellpose_web.workflows.distributed.map_on_dask` (the one Dask driver)."""
    from cellpose_web.workflows import distributed

    info = models_cache.resolve(model_name)
    settings = _settings(params, pixel_size_um, puncta, limits)
    save = pipeline.SaveOptions.everything()
    calls = [((str(p), str(out_dir / stem), info, settings, save, None, None, stem + p.suffix), {})
             for p, stem in zip(imgs, stems)]
    n = len(imgs)

    def prog(done: int, total: int, r: dict) -> None:
        if progress:
            progress(done / max(n, 1), f"{done}/{n} images done on the cluster")

    try:
        results = distributed.map_on_dask(distributed.segment_task, calls, [p.name for p in imgs],
                                          scheduler=None if scheduler == "local" else scheduler, n_workers=n_workers,
                                          retries=retries, progress=prog, cancelled=cancelled)
    except (OSError, TimeoutError) as e:
        raise CellposeWebError(f"Could not reach the Dask scheduler at {scheduler} ({type(e).__name__}); ask the "
                               "admin to start it or unset CELLPOSE_WEB_DASK_SCHEDULER.") from None
    return [_row(p.name, r) for p, r in zip(imgs, results)]


def run_batch(files: list[str | Path], params: SegmentParams, model_name: str, out_dir: Path,
              pixel_size_um: float | None = None, puncta: PunctaParams | None = None,
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None, limits: Limits | None = None,
              scheduler: str | None = None, n_workers: int = 2, retries: int = 2) -> dict[str, Any]:
    """Segment every image; write results under out_dir; return summary paths and the error list.

    pixel_size_um is used for images whose file has no pixel size. ``scheduler`` ('tcp://HOST:8786'
    or 'local') spreads the images over a Dask cluster (same results as in this process); a worker
    that dies is retried ``retries`` times.
    """
    limits = limits or Limits.from_env()
    params = params.validated(limits)
    # the model first: one that cannot be had (e.g. Cellpose-SAM offline) stops the batch with its
    # message before any image is read, instead of failing every image (never another model's masks)
    models_cache.resolve(model_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="batch_", dir=out_dir.parent))
    rows: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    try:
        imgs, errors = collect_inputs(files, work, limits)
        if not imgs and not errors:
            raise CellposeWebError("No images found: upload a zip of TIFF/PNG/JPEG images or select image files.")
        n = len(imgs)
        stems: list[str] = []
        for p in imgs:
            stem = safe_name(p.stem, "file name")
            while stem in stems:
                stem += "_1"
            stems.append(stem)
        results: list[dict[str, Any] | None] = [None] * n
        if scheduler:
            results = _on_cluster(imgs, stems, params, model_name, out_dir, pixel_size_um, puncta, limits, scheduler,
                                  n_workers, retries, progress, cancelled)
        else:
            for k, (p, stem) in enumerate(zip(imgs, stems)):
                if cancelled and cancelled():
                    break
                if progress:
                    progress(k / max(n, 1), f"image {k + 1}/{n}: {p.name}")
                results[k] = process_image(p, stem, params, model_name, out_dir, pixel_size_um, puncta, limits)
        cells: list[pd.DataFrame] = []
        for k, r in enumerate(results):
            if r is None or r.get("reason") == "not processed: the batch was cancelled":
                errors.append((imgs[k].name, "not processed: the batch was cancelled"))
            elif r["status"] == "ok":
                t = pd.read_csv(r.pop("cells_csv"), comment="#")
                t.insert(0, "image", r["image"])
                cells.append(t)
                rows.append(r)
            else:
                errors.append((r["image"], r["reason"]))
        for name, reason in errors:
            rows.append({"image": name, "status": "error", "reason": reason})
        summary = pd.DataFrame(rows)
        if "reason" not in summary:
            summary["reason"] = ""
        summary = summary[summary_column_order(summary.columns)]
        all_cells = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=["image", "label"])
        ok_rows = [r for r in rows if r.get("status") == "ok"]
        prov = pipeline.provenance_record(
            {"name": model_name, "sha256": ok_rows[0].get("model_sha256") if ok_rows else None},
            params.eval_kwargs(), f"{n} images",
            channels={"segment": params.channels, "measured": "all", "numbering": "as in the file"},
            # each file's own pixel size where it has one (the rows' pixel_size_um column says which)
            pixel_size_um="per image, see the pixel_size_um column",
            pixel_size_um_for_files_without_one=pixel_size_um,
            puncta=asdict(puncta) if puncta else None, dask_scheduler=scheduler)
        summary_csv = atomic_write_bytes(out_dir / "summary.csv", pipeline.csv_bytes(summary, prov))
        cells_csv = atomic_write_bytes(out_dir / "all_cells.csv", pipeline.csv_bytes(all_cells, prov))
        atomic_write_json(out_dir / "batch.json", {"provenance": prov, "errors": errors,
                                                   "n_ok": len(cells), "n_error": len(errors)})
        zip_path = out_dir.parent / f"{out_dir.name}.zip"

        def _zip(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(out_dir.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(out_dir).as_posix())
        atomic_save(zip_path, _zip)
        if progress:
            progress(1.0, f"done: {len(cells)} image(s) segmented, {len(errors)} problem(s)")
        return {"zip": str(zip_path), "summary_csv": str(summary_csv), "cells_csv": str(cells_csv),
                "errors": [list(e) for e in errors], "n_ok": len(cells), "n_images": n}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_batch_job(files: list[str], model: str, params: SegmentParams, pixel_size_um: float | None,
                    puncta: PunctaParams | None, user: str | None) -> jobs.Job:
    """Check a Batch request and start it as a background job of ``user`` (the Batch tab's Start):
    the files are copied into the job's folder first, so the uploads may go away; the job runs
    :func:`run_batch` on threads, or on Dask when ``CELLPOSE_WEB_DASK_SCHEDULER`` is set."""
    if not files:
        raise CellposeWebError("No files: upload a zip of images (or several image files) first.")
    params = params.validated()
    models_cache.check_offered(model)
    jm = jobs.manager(user)
    job = jm.create("batch", {"model": model, "params": vars(params), "pixel_size_um": pixel_size_um,
                              "puncta": vars(puncta) if puncta else None,
                              "inputs": [Path(f).name for f in files]}, owner=user)
    staged = job.dir / "inputs"
    staged.mkdir()
    local = [str(shutil.copy2(f, staged / Path(f).name)) for f in files]

    def work(j: jobs.Job):
        return run_batch(local, params, model, j.results_dir / "batch_results", pixel_size_um=pixel_size_um,
                         puncta=puncta, progress=j.progress, cancelled=lambda: j.cancelled,
                         scheduler=dask_scheduler_from_env(), n_workers=config.dask_workers())

    jm.start(job, work, slots=Limits.from_env().concurrency["batch"])
    return job
