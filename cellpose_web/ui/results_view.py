"""The view of one result that the Segment and Correct tabs (and Batch's form) share: the picture,
the summary, the histogram, the downloads, the stitch offer, the form -> parameters. Display only:
everything it shows comes from cellpose_web.workflows."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import gradio as gr

from cellpose_web.workflows import CellposeWebError, hints, pipeline, results
from cellpose_web.workflows.results import PunctaParams
from cellpose_web.workflows.segment import SegmentParams
from cellpose_web.ui import common, widgets as W


# ------------------------------------------------------------------ callbacks (plain functions)
def render(s: common.Session, overlays: list[str], background: str, z: int) -> np.ndarray | None:
    """The picture in the viewer for the current session and view settings."""
    if s is None or s.image is None:
        return None
    z = int(z or 0)
    img = common.plane(s.image, z, s.is_stack)
    if background == W.BG_FLOWS and s.flow_rgb is not None:
        base = np.asarray(common.plane(s.flow_rgb, z, s.is_stack), np.uint8)
    elif background == W.BG_CELLPROB and s.cellprob is not None:
        base = W.cellprob_rgb(common.plane(s.cellprob, z, s.is_stack))
    else:
        base = W.to_display_rgb(img)
    masks = common.plane(s.masks, z, s.is_stack)
    pts = None
    if W.OVERLAY_PUNCTA in (overlays or []) and s.puncta is not None and len(s.puncta) and not s.is_stack:
        pts = s.puncta[["y_px", "x_px"]].to_numpy()
    return W.upscale(W.compose(base, masks, W.OVERLAY_MASKS in (overlays or []),
                               W.OVERLAY_OUTLINES in (overlays or []), pts))


def write_files(s: common.Session) -> list[str]:
    """(Re)write every download for the session's current masks."""
    files = pipeline.write_outputs(s.out_dir() / f"{s.stem}.tif", s.masks, s.image, [s.flow_rgb, s.dP, s.cellprob],
                                   s.provenance, s.table, pipeline.SaveOptions.everything())
    return list_downloads(s, files)


def list_downloads(s: common.Session, files: dict[str, Any]) -> list[str]:
    """The session's download list from written files ({kind: path}), in the order the page shows them."""
    s.files = [str(files[k]) for k in ("masks_tif", "masks_png", "seg_npy", "outlines_txt", "rois_zip",
                                       "cells_csv", "provenance_json") if k in files]
    return s.files


def summary_md(s: common.Session) -> str:
    if s is None or s.masks is None:
        return "No result yet."
    t = s.table
    if t is None:  # masks not measured (e.g. a human-in-the-loop image): their count
        n = int(len(np.unique(s.masks))) - int((np.asarray(s.masks) == 0).any())
        return f"**{W.plural(n, 'cell')}** in {s.name} (not measured)."
    n = len(t)
    area_col = "area_px" if "area_px" in t else "volume_px"
    # plane-by-plane stack masks are one plane thick: their "volume" is an area in px
    unit = "px" if area_col == "area_px" or not is_volumetric(s) else "voxels"
    med_px = W.fmt_num(np.median(t[area_col]) if n else np.nan, unit, 0)
    um_col = "area_um2" if "area_um2" in t else "volume_um3"
    med_um = W.fmt_num(np.nanmedian(t[um_col]) if n and t[um_col].notna().any() else np.nan,
                       "µm²" if um_col == "area_um2" else "µm³", 1)
    p = s.provenance
    lines = [f"<span class='cpw-count'>**{count_text(s, n)}**</span> · median size {med_px}"
             + (" per plane" if unit == "px" and area_col == "volume_px" else "")
             + (f" ({med_um})" if med_um != "–" else "" if s.pixel_size_um else " (enter the pixel size for µm²)")]
    note = stack_note(s)
    if note:
        lines.append(f"<span class='cpw-small'>{note}</span>")
    tip = hint(s)
    if tip:
        lines.append(f"<span class='cpw-hint'>Try: {tip}</span>")
    if s.puncta is not None:
        summ = results.summarize(t, s.puncta)
        dens = summ.get("median_puncta_density_per_um2")
        ch = (p.get("puncta") or {}).get("channel")
        # without a pixel size the default distance ran as pixels (measure.max_distance_px)
        reach = (f"{(p.get('puncta') or {}).get('max_distance_um', 0):g} µm" if s.pixel_size_um
                 else f"{results.FALLBACK_MAX_DISTANCE_PX:g} px")
        lines.append(f"<span class='cpw-puncta'>**{summ['puncta_total']} puncta** on channel {ch}: "
                     f"{summ['puncta_in_cells']} inside cells ({summ['mean_puncta_per_cell']:.2f} per cell"
                     + (f", median {dens:.3g} per µm²" if dens is not None and np.isfinite(dens) else "")
                     + f"), {summ['puncta_outside_cells']} outside cells"
                     + (f"; {summ['puncta_near_cell_edge']} of those in cells lay just outside a mask and count "
                        f"for the nearest cell (within {reach})" if summ.get("puncta_near_cell_edge") else "")
                     + "</span>")
    for note in p.get("notices") or []:  # e.g. puncta skipped for a z-stack, channels beyond the first 3
        lines.append(f"<span class='cpw-small'>note: {note}</span>")
    if p.get("masks_from_file"):
        lines.append(f"<span class='cpw-small'>masks loaded from **{p['masks_from_file']}** · pixel size "
                     f"{W.fmt_num(s.pixel_size_um, 'µm/px', 4)}</span>")
        return "\n\n".join(lines)
    m = p.get("model") or {}
    # lite's estimate (Cellpose 1-3 models do not estimate: their notice says which size they used)
    legacy_model = (p.get("model") or {}).get("arch") == "cellpose3"
    est = "" if legacy_model else hints.diameter_note(p.get("est_diam"), s.masks.shape)
    lines.append(f"<span class='cpw-small'>model **{m.get('name')}** (sha256 {W.short_sha(m.get('sha256'))}) · "
                 f"{p.get('seconds', '–')} s · pixel size {W.fmt_num(s.pixel_size_um, 'µm/px', 4)}"
                 + (f" · {est}" if est else "") + "</span>")
    return "\n\n".join(lines)


def histogram(s: common.Session) -> tuple[pd.DataFrame, str]:
    """(bar-plot frame with columns bin, count; axis title with the unit)."""
    if s is None or s.table is None or len(s.table) == 0:
        return pd.DataFrame({"bin": pd.Series(dtype="str"), "count": pd.Series(dtype="int64")}), "cell size"
    h = results.size_histogram(s.table, bins=15)
    q = h["quantity"].iloc[0] if len(h) else "area_px"
    unit = {"area_um2": "µm²", "area_px": "px", "volume_um3": "µm³", "volume_px": "voxels"}.get(q, "")
    what = "volume" if q.startswith("volume") else "area"
    h = h.assign(bin=[f"{b} {unit}" for b in h["bin"]])  # rows are in numeric order already
    return h[["bin", "count"]], f"cell {what} ({unit})"


def histogram_update(s: common.Session):
    df, title = histogram(s)
    # the bins are text: give the bar plot their numeric order explicitly (else it sorts them as text)
    return gr.update(value=df, x_title=title, y_title="number of cells", sort=list(df["bin"]) or None)


def is_volumetric(s: common.Session) -> bool:
    """Whether a stack result holds 3D objects (do_3D or stitched) rather than per-plane masks."""
    prm = (s.provenance or {}).get("params") or (s.provenance or {}).get("eval_params") or {}
    return bool(prm.get("do_3D")) or float(prm.get("stitch_threshold") or 0) > 0


def count_text(s: common.Session, n: int) -> str:
    """'12 cells', '20 3D cells' or '834 masks in 60 Z planes' (see hints.count_text); masks loaded
    from a file are counted as the file labels them ('N cells')."""
    ndim = 3 if (s.masks is not None and s.masks.ndim == 3) else 2
    if (s.provenance or {}).get("masks_from_file"):
        return W.plural(n, "cell")
    return hints.count_text(n, ndim, s.masks.shape[0] if ndim == 3 else 1, is_volumetric(s))


def stack_note(s: common.Session) -> str:
    """For a plane-by-plane stack: say so, and offer stitching when the planes show the same cells."""
    if s.masks is None or s.masks.ndim != 3 or is_volumetric(s) or (s.provenance or {}).get("masks_from_file"):
        return ""
    linked = hints.planes_linked(s.masks)
    if linked >= 0.5:
        return (f"Segmented plane by plane: {100 * linked:.0f} % of the masks continue into the next plane, so "
                "they are slices of 3D cells. Press **Stitch planes into 3D cells** (or set a stitch threshold "
                "or tick do_3D and run again) to count cells.")
    return "Segmented plane by plane: each plane's masks are counted on their own."


def stitch_offer(s: common.Session | None):
    """Show the 'Stitch planes into 3D cells' button only for plane-by-plane results whose planes link."""
    show = (s is not None and s.masks is not None and s.masks.ndim == 3 and not is_volumetric(s)
            and not (s.provenance or {}).get("masks_from_file") and hints.planes_linked(s.masks) >= 0.5)
    return gr.update(visible=bool(show))


def hint(s: common.Session) -> str:
    """One line of what to try when the result looks wrong (hints.suggest), "" otherwise."""
    p = s.provenance or {}
    if s.masks is None or p.get("masks_from_file"):
        return ""
    prm = p.get("params") or p.get("eval_params") or {}
    model = p.get("model_name") or (p.get("model") or {}).get("name")
    n_channels = int(s.image.shape[-1]) if s.image is not None else 1
    chosen = bool(prm.get("channels") or (p.get("channels") or {}).get("segment"))
    return hints.suggest(s.masks, diameter=prm.get("diameter"), n_channels=n_channels, channels_chosen=chosen,
                         model_name=model)


def make_params(diameter, flow, cellprob, niter, min_size, ch_axis, z_axis, channels, lo, hi, do3d, aniso,
                stitch) -> SegmentParams:
    return SegmentParams(diameter=diameter, flow_threshold=flow, cellprob_threshold=cellprob,
                         niter=niter or None, min_size=15 if min_size is None else min_size,
                         channel_axis=common.parse_axis(ch_axis), z_axis=common.parse_axis(z_axis),
                         channels=common.parse_channels(channels), norm_percentile=(lo, hi), do_3D=bool(do3d),
                         anisotropy=aniso or None, stitch_threshold=stitch or 0.0)


def make_puncta(on, ch, smin, smax, thr, max_distance=None) -> PunctaParams | None:
    if not on:
        return None
    if ch is None:
        raise CellposeWebError("Choose the puncta channel number (0 = first channel).")
    if max_distance is None or (isinstance(max_distance, str) and not max_distance.strip()):
        max_distance = results.DEFAULT_MAX_DISTANCE_UM
    return PunctaParams(channel=int(ch), sigma_min=float(smin), sigma_max=float(smax), threshold=float(thr),
                        max_distance_um=float(max_distance))
