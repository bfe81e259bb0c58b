"""Batch segmentation: a zip (or many files) in -> per-image Cellpose files, a summary CSV,
an all-cells CSV and a result zip out. A bad file is listed with its reason; the rest go on.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cellpose_web import measure
from cellpose_web.errors import CellposeWebError
from cellpose_web.service import inputs, models_cache, outputs
from cellpose_web.service.config import Limits
from cellpose_web.service.segment import SegmentParams, segment
from cellpose_web.io import atomic_save
from cellpose_web.service.storage import atomic_write_bytes, atomic_write_json, safe_name

log = logging.getLogger(__name__)


@dataclass
class PunctaParams:
    """Puncta detection settings: which channel (index after channel selection), LoG sigma range (px), threshold."""
    channel: int = 1
    sigma_min: float = 1.0
    sigma_max: float = 3.0
    threshold: float = 0.1


def measure_result(res, pixel_size_um: float | None, puncta: PunctaParams | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per-cell table (and puncta points) for a SegResult."""
    img = res.image
    if res.masks.ndim == 2 and img.ndim == 3:
        table = measure.cell_table(res.masks, img, pixel_size_um)
    elif res.masks.ndim == 3 and img.ndim == 4:
        table = measure.cell_table(res.masks, img, pixel_size_um)
    else:
        table = measure.cell_table(res.masks, None, pixel_size_um)
    pts = None
    if puncta is not None and res.masks.ndim == 2:
        ch = int(puncta.channel)
        if not 0 <= ch < img.shape[-1]:
            raise CellposeWebError(f"Puncta channel {ch} does not exist; the image has {img.shape[-1]} "
                                   f"channel(s) (0..{img.shape[-1] - 1}).")
        pts = measure.detect_puncta(img[..., ch], puncta.sigma_min, puncta.sigma_max, puncta.threshold,
                                    masks=res.masks)
        table = measure.add_puncta(table, measure.puncta_per_cell(res.masks, pts, pixel_size_um))
    return table, pts


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


def process_image(path: str | Path, stem: str, params: SegmentParams, model_name: str, out_dir: str | Path,
                  pixel_size_um: float | None = None, puncta: PunctaParams | None = None,
                  limits: Limits | None = None) -> dict[str, Any]:
    """Segment, measure and write the files of one image (runs here or on a Dask worker).

    Returns {"image", "status": "ok", summary columns..., "cells_csv"} or {"image", "status": "error", "reason"}.
    """
    p = Path(path)
    try:
        li = inputs.read_image(p, limits)
        px = li.pixel_size_um or pixel_size_um
        res = segment(li.data, params, model_name, image_name=p.name, pixel_size_um=px, limits=limits)
        table, pts = measure_result(res, px, puncta)
        prov = dict(res.provenance)
        if puncta is not None:
            prov["puncta"] = asdict(puncta)
        files = outputs.write_result_files(Path(out_dir) / stem, stem, res.masks, prov, table,
                                           res.flow_rgb, res.cellprob, res.dP)
        s = measure.summarize(table, pts)
        return {"image": p.name, "status": "ok", **s, "pixel_size_um": px, "model": prov["model_name"],
                "model_sha256": prov["model_sha256"], "cells_csv": str(files["cells_csv"])}
    except (CellposeWebError, FileNotFoundError) as e:
        return {"image": p.name, "status": "error", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one bad file never stops the batch
        log.exception("batch image %s failed", p.name)
        return {"image": p.name, "status": "error", "reason": f"unexpected error ({type(e).__name__})"}


def dask_scheduler_from_env() -> str | None:
    """CELLPOSE_WEB_DASK_SCHEDULER: 'tcp://HOST:8786', or 'local' for a LocalCluster on this machine."""
    v = os.environ.get("CELLPOSE_WEB_DASK_SCHEDULER", "").strip()
    return v or None


def _dask_client(scheduler: str, n_workers: int, retries: int):
    from cellpose_web import distributed
    dd = distributed.require_dask()
    import dask
    if scheduler == "local":
        with dask.config.set({"distributed.scheduler.allowed-failures": int(retries)}):
            cluster = dd.LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=logging.ERROR)
            return dd.Client(cluster, set_as_default=False), cluster
    addr = distributed.scheduler_address(scheduler)
    try:
        return dd.Client(addr, timeout=20, set_as_default=False), None
    except (OSError, TimeoutError) as e:
        raise CellposeWebError(f"Could not reach the Dask scheduler at {addr} ({type(e).__name__}); ask the admin "
                               "to start it or unset CELLPOSE_WEB_DASK_SCHEDULER.") from None


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
            client, cluster = _dask_client(scheduler, n_workers, retries)
            try:
                from dask.distributed import as_completed
                futs = {client.submit(process_image, str(p), stem, params, model_name, str(out_dir),
                                      pixel_size_um, puncta, limits, retries=int(retries), pure=False): k
                        for k, (p, stem) in enumerate(zip(imgs, stems))}
                done = 0
                for fut in as_completed(list(futs), loop=client.loop):
                    k = futs[fut]
                    try:
                        results[k] = fut.result()
                    except Exception as e:  # noqa: BLE001 - e.g. KilledWorker after the retries
                        results[k] = {"image": imgs[k].name, "status": "error",
                                      "reason": f"the cluster worker failed ({type(e).__name__}) after {retries} "
                                                "retries; try again or use fewer workers per machine"}
                    done += 1
                    if progress:
                        progress(done / max(n, 1), f"{done}/{n} images done on the cluster")
                    if cancelled and cancelled():
                        client.cancel([f for f in futs if not f.done()])
                        break
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
        else:
            for k, (p, stem) in enumerate(zip(imgs, stems)):
                if cancelled and cancelled():
                    break
                if progress:
                    progress(k / max(n, 1), f"image {k + 1}/{n}: {p.name}")
                results[k] = process_image(p, stem, params, model_name, out_dir, pixel_size_um, puncta, limits)
        cells: list[pd.DataFrame] = []
        for k, r in enumerate(results):
            if r is None:
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
        first = ["image", "status", "reason"]
        summary = summary[first + [c for c in summary.columns if c not in first]]
        all_cells = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=["image", "label"])
        ok_rows = [r for r in rows if r.get("status") == "ok"]
        from cellpose_web import __version__
        prov = {"model_name": model_name, "params": asdict(params),
                "model_sha256": ok_rows[0].get("model_sha256") if ok_rows else None,
                "image": f"{n} images", "puncta": asdict(puncta) if puncta else None,
                "cellpose_web_version": __version__, "dask_scheduler": scheduler}
        summary_csv = atomic_write_bytes(out_dir / "summary.csv", outputs.csv_bytes(summary, prov))
        cells_csv = atomic_write_bytes(out_dir / "all_cells.csv", outputs.csv_bytes(all_cells, prov))
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
