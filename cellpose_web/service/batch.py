"""Batch segmentation: a zip (or many files) in -> per-image Cellpose files, a summary CSV,
an all-cells CSV and a result zip out. A bad file is listed with its reason; the rest go on.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cellpose_web import measure
from cellpose_web.errors import CellposeWebError
from cellpose_web.service import inputs, outputs
from cellpose_web.service.config import Limits
from cellpose_web.service.segment import SegmentParams, segment
from cellpose_web.service.storage import atomic_save, atomic_write_bytes, atomic_write_json, safe_name

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


def run_batch(files: list[str | Path], params: SegmentParams, model_name: str, out_dir: Path,
              pixel_size_um: float | None = None, puncta: PunctaParams | None = None,
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None, limits: Limits | None = None) -> dict[str, Any]:
    """Segment every image; write results under out_dir; return summary paths and the error list.

    pixel_size_um is used for images whose file has no pixel size.
    """
    limits = limits or Limits.from_env()
    params = params.validated(limits)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="batch_", dir=out_dir.parent))
    rows: list[dict[str, Any]] = []
    cells: list[pd.DataFrame] = []
    errors: list[tuple[str, str]] = []
    try:
        imgs, errors = collect_inputs(files, work, limits)
        if not imgs and not errors:
            raise CellposeWebError("No images found: upload a zip of TIFF/PNG/JPEG images or select image files.")
        n = len(imgs)
        used_stems: set[str] = set()
        for k, p in enumerate(imgs):
            if cancelled and cancelled():
                errors.append((p.name, "not processed: the batch was cancelled"))
                continue
            if progress:
                progress(k / max(n, 1), f"image {k + 1}/{n}: {p.name}")
            stem = safe_name(p.stem, "file name")
            while stem in used_stems:
                stem += "_1"
            used_stems.add(stem)
            try:
                li = inputs.read_image(p, limits)
                px = li.pixel_size_um or pixel_size_um
                res = segment(li.data, params, model_name, image_name=p.name, pixel_size_um=px, limits=limits)
                table, pts = measure_result(res, px, puncta)
                prov = dict(res.provenance)
                if puncta is not None:
                    prov["puncta"] = asdict(puncta)
                outputs.write_result_files(out_dir / stem, stem, res.masks, prov, table,
                                           res.flow_rgb, res.cellprob, res.dP)
                s = measure.summarize(table, pts)
                rows.append({"image": p.name, "status": "ok", **s, "pixel_size_um": px,
                             "model": prov["model_name"], "model_sha256": prov["model_sha256"]})
                t = table.copy()
                t.insert(0, "image", p.name)
                cells.append(t)
            except (CellposeWebError, FileNotFoundError) as e:
                errors.append((p.name, str(e)))
            except Exception as e:  # noqa: BLE001 - one bad file never stops the batch
                log.exception("batch image %s failed", p.name)
                errors.append((p.name, f"unexpected error ({type(e).__name__})"))
        for name, reason in errors:
            rows.append({"image": name, "status": "error", "reason": reason})
        summary = pd.DataFrame(rows)
        if "reason" not in summary:
            summary["reason"] = ""
        first = ["image", "status", "reason"]
        summary = summary[first + [c for c in summary.columns if c not in first]]
        all_cells = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=["image", "label"])
        prov = {"model_name": model_name, "params": asdict(params),
                "model_sha256": rows[0].get("model_sha256") if rows and rows[0].get("status") == "ok" else None,
                "image": f"{len(imgs)} images", "puncta": asdict(puncta) if puncta else None}
        from cellpose_web import __version__
        prov["cellpose_web_version"] = __version__
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
