"""Result files, as Cellpose writes them, each recording how it was made.

`<stem>_cp_masks.tif`, `<stem>_cp_masks.png` (2D), `<stem>_seg.npy`, `<stem>_cp_outlines.txt`,
`<stem>_rois.zip` (ImageJ), `<stem>_cells.csv` (per-cell table), `<stem>_provenance.json`.
Files go through cellpose_web.io when it provides the writer; all writes are atomic.
"""
from __future__ import annotations

import io as _pyio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellpose_web.io import atomic_save
from cellpose_web.service.storage import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def outlines_bool(masks: np.ndarray) -> np.ndarray:
    """Boolean outlines (pixels of a cell touching another label or background), (Y, X)."""
    try:
        from cellpose_web.dynamics import masks_to_outlines
        return np.asarray(masks_to_outlines(masks), dtype=bool)
    except (ImportError, AttributeError):
        from skimage.segmentation import find_boundaries
        return find_boundaries(masks, mode="inner") & (masks > 0)


def outlines_text(masks: np.ndarray) -> str:
    """Cellpose `_cp_outlines.txt` text: one line per cell `x0,y0,x1,y1,...` in label order."""
    from cellpose_web import io as cpio
    lines = [",".join(str(int(v)) for v in np.asarray(o, np.int64).ravel()) for o in cpio.outlines_list(masks)]
    return "\n".join(lines) + ("\n" if lines else "")


def io_metadata(prov: dict[str, Any]) -> dict[str, Any]:
    """Provenance in the form cellpose_web.io.masks_flows_to_seg records it."""
    params = dict(prov.get("params", {}))
    params["normalize"] = {"percentile": list(params.pop("norm_percentile", (1, 99)))}
    return {"model": {"name": prov.get("model_name"), "sha256": prov.get("model_sha256")},
            "eval_params": params, "provenance": prov}


def csv_bytes(df: pd.DataFrame, prov: dict[str, Any] | None) -> bytes:
    """CSV with the provenance as leading '# key: value' lines (pandas: read_csv(comment='#'))."""
    buf = _pyio.StringIO()
    if prov:
        buf.write(f"# model: {prov.get('model_name')} sha256={prov.get('model_sha256')}\n")
        buf.write(f"# parameters: {json.dumps(prov.get('params', {}))}\n")
        buf.write(f"# image: {prov.get('image')} pixel_size_um={prov.get('pixel_size_um')} "
                  f"cellpose_web={prov.get('cellpose_web_version')} date={prov.get('date')}\n")
    df.to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue().encode()


def write_result_files(out_dir: Path, stem: str, masks: np.ndarray, prov: dict[str, Any],
                       table: pd.DataFrame | None = None, flow_rgb=None, cellprob=None, dP=None,
                       rois: bool = True) -> dict[str, Path]:
    """Write every result file for one image; returns {kind: path}."""
    import tifffile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = np.asarray(masks)
    dt = np.uint16 if masks.max(initial=0) < 65535 else np.uint32
    m = masks.astype(dt)
    files: dict[str, Path] = {}
    desc = json.dumps({"cellpose_web": prov})
    files["masks_tif"] = atomic_save(out_dir / f"{stem}_cp_masks.tif", lambda p: tifffile.imwrite(
        p, m, compression="zlib", description=desc, metadata=None))
    if m.ndim == 2 and dt == np.uint16:
        from PIL import Image, PngImagePlugin
        info = PngImagePlugin.PngInfo()
        info.add_text("cellpose_web", json.dumps(prov))
        buf = _pyio.BytesIO()
        Image.fromarray(m).save(buf, format="PNG", pnginfo=info)
        files["masks_png"] = atomic_write_bytes(out_dir / f"{stem}_cp_masks.png", buf.getvalue())
    from cellpose_web import io as cpio
    flows = [f for f in (flow_rgb, dP, cellprob) if f is not None] or None
    diam = prov.get("params", {}).get("diameter")
    files["seg_npy"] = cpio.masks_flows_to_seg(None, m, flows, str(out_dir / stem), diameter=diam,
                                               metadata=io_metadata(prov))[0]
    if m.ndim == 2:
        files["outlines_txt"] = atomic_write_bytes(out_dir / f"{stem}_cp_outlines.txt", outlines_text(m).encode())
        if rois and m.max() > 0:
            try:
                files["rois_zip"] = cpio.save_rois(m, out_dir / stem)
            except Exception:  # noqa: BLE001 - the other files are still useful
                log.exception("ROI export failed")
    if table is not None:
        files["cells_csv"] = atomic_write_bytes(out_dir / f"{stem}_cells.csv", csv_bytes(table, prov))
    files["provenance_json"] = atomic_write_json(out_dir / f"{stem}_provenance.json", prov)
    return files
