"""Batch segmentation: a zip (or many files) in -> per-image Cellpose files, a summary CSV,
an all-cells CSV and a result zip out. A bad file is listed with its reason; the rest go on.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import pandas as pd

from cellpose_web import config
from cellpose_web.workflows import pipeline
from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.io import atomic_save
from cellpose_web.io.names import output_folders
from cellpose_web.measure import PunctaParams
from cellpose_web.workflows import inputs, model_cache as models_cache
from cellpose_web.service.config import Limits
from cellpose_web.service import jobs
from cellpose_web.workflows.segment import SegmentParams
from cellpose_web.service.storage import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


#: files written beside the images' folders in a batch's results
RESULT_FILES = ("summary.csv", "all_cells.csv", "batch.json")


def _zip_prefix(f: Path, files: list) -> str:
    """What goes before a zip's inner paths: nothing for a lone zip, its name when several files came."""
    return f"{f.stem}/" if len(files) > 1 else ""


def _check_count(n_images: int, skipped: list[tuple[str, str]], limits: Limits) -> None:
    if n_images == 0:
        raise BadInputError(inputs.no_images_message(skipped))
    if n_images > limits.max_zip_entries:
        raise BadInputError(f"{n_images} images is above the limit of {limits.max_zip_entries} per batch; "
                            "split the batch.")


def check_upload(files: list[str | Path], limits: Limits | None = None) -> int:
    """Refuse an upload with nothing to segment before any job is made, reading only the zips' lists
    of files (nothing is unpacked).

    Parameters
    ----------
    files : list of path
        The uploaded zips and image files.
    limits : Limits, optional
        The upload limits (default: from the environment).

    Returns
    -------
    int
        How many images the batch will segment.

    Raises
    ------
    BadInputError
        No image to segment (an empty zip, only masks, only other files, zips that were refused),
        saying why each file was left out; or more images than a batch may hold.
    """
    limits = limits or Limits.from_env()
    names: list[str] = []
    bad: list[tuple[str, str]] = []
    for f in map(Path, files):
        if f.suffix.lower() == ".zip":
            try:
                names += [_zip_prefix(f, files) + n for n in inputs.zip_file_names(f, limits)]
            except CellposeWebError as e:
                bad.append((f.name, str(e)))
        else:
            names.append(f.name)
    skipped = [(n, r) for n in sorted(names, key=str.lower) if (r := inputs.skip_reason(n))]
    _check_count(len(names) - len(skipped), bad + skipped, limits)
    return len(names) - len(skipped)


def collect_inputs(files: list[str | Path], work: Path,
                   limits: Limits) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Expand zips (checked) and list the image files.

    Returns
    -------
    images : list of (Path, str)
        Each image's file on disk and its path as uploaded (POSIX): its path inside the zip
        (``exp1/day1/a.tif``; after the zip's name when several files were uploaded), or the
        file's name for an image uploaded alone. Sorted by that path, ignoring case.
    skipped : list of (str, str)
        (path as uploaded, reason) for each file or zip left out.

    Raises
    ------
    BadInputError
        No image to segment (the message says why each file was left out), or too many.
    """
    paths: list[Path] = []
    names: list[str] = []
    bad: list[tuple[str, str]] = []
    for i, f in enumerate(map(Path, files)):
        if f.suffix.lower() == ".zip":
            dest = (work / f"zip{i}").resolve()
            try:
                got = inputs.extract_zip(f, dest, limits)
            except CellposeWebError as e:
                bad.append((f.name, str(e)))
                continue
            paths += got
            names += [_zip_prefix(f, files) + q.relative_to(dest).as_posix() for q in got]
        else:
            paths.append(f)
            names.append(f.name)
    imgs, skipped = inputs.image_files(paths, names)
    path_of = dict(zip(paths, names))
    _check_count(len(imgs), bad + skipped, limits)
    return [(p, path_of[p]) for p in imgs], bad + skipped


def _settings(params: SegmentParams, pixel_size_um: float | None, puncta: PunctaParams | None,
              limits: Limits) -> pipeline.ImageSettings:
    return pipeline.ImageSettings(eval_kwargs=params.eval_kwargs(), channel_axis=params.channel_axis,
                                  z_axis=params.z_axis, segment_channels=params.channels,
                                  pixel_size_um=pixel_size_um, puncta=puncta, measure=True,
                                  max_pixels=limits.max_pixels)


#: summary.csv columns a reader wants first (when present), and the long ones that go last
SUMMARY_FIRST = ("image", "path", "n_cells", "median_area_um2", "median_area_px", "median_volume_um3",
                 "median_volume_px",
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


def _row(image: str, r: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """A summary row from :func:`cellpose_web.workflows.pipeline.process_file`'s result (or its error);
    ``path``: the image's path as uploaded (default its name)."""
    path = path or image
    if r.get("error"):
        return {"image": image, "path": path, "status": "error", "reason": r["error"]}
    m = r.get("model") or {}
    return {"image": image, "path": path, "status": "ok", **r.get("summary", {}),
            "pixel_size_um": r.get("pixel_size_um"),
            "model": m.get("name"), "model_sha256": m.get("sha256"), "cells_csv": r["files"]["cells_csv"],
            "hint": r.get("hint", "")}


def process_image(path: str | Path, stem: str, params: SegmentParams, model_name: str, out_dir: str | Path,
                  pixel_size_um: float | None = None, puncta: PunctaParams | None = None,
                  limits: Limits | None = None, image_path: str | None = None) -> dict[str, Any]:
    """Segment, measure and write the files of one image in this process (the pipeline's
    :func:`~cellpose_web.workflows.pipeline.process_file` with the shared model), into ``out_dir/stem/``.

    ``stem``: the image's results folder under ``out_dir`` (POSIX; may hold folders, e.g.
    ``exp1/day1/a``); its last part names the files. ``image_path``: the image's path as uploaded
    (the ``path`` column; default its file name).

    Returns {"image", "path", "status": "ok", summary columns..., "cells_csv"} or {"image", "path",
    "status": "error", "reason"}.
    """
    p = Path(path)
    where = image_path or p.name
    limits = limits or Limits.from_env()
    try:
        inputs.check_file_size(p, limits)
        r = pipeline.process_file(p, models_cache.get_model(model_name), _settings(params, pixel_size_um, puncta, limits),
                                  Path(out_dir) / stem, pipeline.SaveOptions.everything(),
                                  name=PurePosixPath(stem).name + p.suffix)
        return _row(p.name, r, where)
    except (CellposeWebError, FileNotFoundError) as e:
        return {"image": p.name, "path": where, "status": "error", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one bad file never stops the batch
        log.exception("batch image %s failed", where)
        return {"image": p.name, "path": where, "status": "error",
                "reason": f"unexpected error ({type(e).__name__})"}


def dask_scheduler_from_env() -> str | None:
    """CELLPOSE_WEB_DASK_SCHEDULER: 'tcp://HOST:8786', or 'local' for a LocalCluster on this machine."""
    v = config.dask_scheduler()
    return v or None


def _on_cluster(imgs: list[Path], where: list[str], stems: list[str], params: SegmentParams, model_name: str,
                out_dir: Path,
                pixel_size_um, puncta, limits: Limits, scheduler: str, n_workers: int, retries: int,
                progress, cancelled) -> list[dict[str, Any]]:
    """Every image through :func:`cellpose_web.workflows.distributed.map_on_dask` (the one Dask driver)."""
    from cellpose_web.workflows import distributed

    info = models_cache.resolve(model_name)
    settings = _settings(params, pixel_size_um, puncta, limits)
    save = pipeline.SaveOptions.everything()
    calls = [((str(p), str(out_dir / stem), info, settings, save, None, None,
               PurePosixPath(stem).name + p.suffix), {}) for p, stem in zip(imgs, stems)]
    n = len(imgs)

    def prog(done: int, total: int, r: dict) -> None:
        if progress:
            progress(done / max(n, 1), f"{done}/{n} images done on the cluster")

    try:
        results = distributed.map_on_dask(distributed.segment_task, calls, where,
                                          scheduler=None if scheduler == "local" else scheduler, n_workers=n_workers,
                                          retries=retries, progress=prog, cancelled=cancelled)
    except (OSError, TimeoutError) as e:
        raise CellposeWebError(f"Could not reach the Dask scheduler at {scheduler} ({type(e).__name__}); ask the "
                               "admin to start it or unset CELLPOSE_WEB_DASK_SCHEDULER.") from None
    return [_row(p.name, r, w) for p, w, r in zip(imgs, where, results)]


def run_batch(files: list[str | Path], params: SegmentParams, model_name: str, out_dir: Path,
              pixel_size_um: float | None = None, puncta: PunctaParams | None = None,
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None, limits: Limits | None = None,
              scheduler: str | None = None, n_workers: int = 2, retries: int = 2) -> dict[str, Any]:
    """Segment every image; write results under out_dir; return summary paths and the error list.

    Returns {zip, summary_csv, cells_csv, errors: [path, reason] of every problem, n_images: images
    found, n_ok: images segmented, n_failed: images not segmented (n_images - n_ok), n_left_out:
    files that were not images to segment (masks, unreadable, unsupported)}.

    Each image's results go to a folder named after it; images from a zip keep the zip's folders
    (``exp1/day1/a.tif`` -> ``exp1/day1/a/``), and the ``path`` column of summary.csv and
    all_cells.csv says where each came from. An upload with no image to segment raises
    BadInputError (why each file was left out).

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
        found, errors = collect_inputs(files, work, limits)
        n_left_out = len(errors)  # files that are not images to segment (masks, unreadable, ...)
        imgs = [p for p, _ in found]
        where = [w for _, w in found]
        n = len(imgs)
        stems = output_folders(where, reserved=RESULT_FILES)
        results: list[dict[str, Any] | None] = [None] * n
        if scheduler:
            results = _on_cluster(imgs, where, stems, params, model_name, out_dir, pixel_size_um, puncta, limits,
                                  scheduler, n_workers, retries, progress, cancelled)
        else:
            for k, (p, stem) in enumerate(zip(imgs, stems)):
                if cancelled and cancelled():
                    break
                if progress:
                    progress(k / max(n, 1), f"image {k + 1}/{n}: {where[k]}")
                results[k] = process_image(p, stem, params, model_name, out_dir, pixel_size_um, puncta, limits,
                                           image_path=where[k])
        cells: list[pd.DataFrame] = []
        for k, r in enumerate(results):
            if r is None or r.get("reason") == "not processed: the batch was cancelled":
                errors.append((where[k], "not processed: the batch was cancelled"))
            elif r["status"] == "ok":
                t = pd.read_csv(r.pop("cells_csv"), comment="#")
                t.insert(0, "image", r["image"])
                t.insert(1, "path", r["path"])
                cells.append(t)
                rows.append(r)
            else:
                errors.append((r["path"], r["reason"]))
        for name, reason in errors:
            rows.append({"image": PurePosixPath(name).name, "path": name, "status": "error", "reason": reason})
        summary = pd.DataFrame(rows)
        if "reason" not in summary:
            summary["reason"] = ""
        summary = summary[summary_column_order(summary.columns)]
        all_cells = (pd.concat(cells, ignore_index=True) if cells
                     else pd.DataFrame(columns=["image", "path", "label"]))
        ok_rows = [r for r in rows if r.get("status") == "ok"]
        prov = pipeline.provenance_record(
            {"name": model_name, "sha256": ok_rows[0].get("model_sha256") if ok_rows else None},
            params.eval_kwargs(), f"{n} images",
            image_paths="the path column: each image's path as uploaded (inside its zip); batch.json: its folder",
            channels={"segment": params.channels, "measured": "all", "numbering": "as in the file"},
            # each file's own pixel size where it has one (the rows' pixel_size_um column says which)
            pixel_size_um="per image, see the pixel_size_um column",
            pixel_size_um_for_files_without_one=pixel_size_um,
            puncta=asdict(puncta) if puncta else None, dask_scheduler=scheduler)
        summary_csv = atomic_write_bytes(out_dir / "summary.csv", pipeline.csv_bytes(summary, prov))
        cells_csv = atomic_write_bytes(out_dir / "all_cells.csv", pipeline.csv_bytes(all_cells, prov))
        folders = [{"path": w, "folder": d} for w, d in zip(where, stems)]
        atomic_write_json(out_dir / "batch.json", {"provenance": prov, "errors": errors, "n_ok": len(cells),
                                                   "n_error": len(errors), "images": folders})
        zip_path = out_dir.parent / f"{out_dir.name}.zip"

        def _zip(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(out_dir.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(out_dir).as_posix())
        atomic_save(zip_path, _zip)
        if progress:
            progress(1.0, f"done: {len(cells)} of {n} image(s) segmented, {len(errors)} problem(s)")
        return {"zip": str(zip_path), "summary_csv": str(summary_csv), "cells_csv": str(cells_csv),
                "errors": [list(e) for e in errors], "n_ok": len(cells), "n_images": n,
                "n_failed": n - len(cells), "n_left_out": n_left_out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_batch_job(files: list[str], model: str, params: SegmentParams, pixel_size_um: float | None,
                    puncta: PunctaParams | None, user: str | None) -> jobs.Job:
    """Check a Batch request and start it as a background job of ``user`` (the Batch tab's Start):
    the files are copied into the job's folder first, so the uploads may go away; the job runs
    :func:`run_batch` on threads, or on Dask when ``CELLPOSE_WEB_DASK_SCHEDULER`` is set. An upload
    with nothing to segment (an empty zip, only masks, ...) is refused by :func:`check_upload`
    (BadInputError) and no job is made."""
    if not files:
        raise BadInputError("No files: upload a zip of images (or several image files) first.")
    params = params.validated()
    models_cache.check_offered(model)
    check_upload(files)  # nothing to segment: refused here, with the reasons, and no job is made
    jm = jobs.manager(user)
    job = jm.create("batch", {"model": model, "params": vars(params), "pixel_size_um": pixel_size_um,
                              "puncta": vars(puncta) if puncta else None,
                              "inputs": [Path(f).name for f in files]}, owner=user)
    staged = job.dir / "inputs"
    staged.mkdir()
    # a folder per file: two uploads of the same name (from different folders) both stay
    local = []
    for k, f in enumerate(files):
        (staged / str(k)).mkdir()
        local.append(str(shutil.copy2(f, staged / str(k) / Path(f).name)))

    def work(j: jobs.Job):
        return run_batch(local, params, model, j.results_dir / "batch_results", pixel_size_um=pixel_size_um,
                         puncta=puncta, progress=j.progress, cancelled=lambda: j.cancelled,
                         scheduler=dask_scheduler_from_env(), n_workers=config.dask_workers())

    jm.start(job, work, slots=Limits.from_env().concurrency["batch"])
    return job
