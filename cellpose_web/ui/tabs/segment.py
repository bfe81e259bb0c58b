"""Segment tab: upload, parameters, run, overlays, table, histogram, puncta, downloads."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from cellpose_web.workflows import pipeline
from cellpose_web.workflows import CellposeWebError, results
from cellpose_web.workflows.results import PunctaParams
from cellpose_web.workflows.startup import examples_dir
from cellpose_web.workflows import inputs, model_cache as models_cache
from cellpose_web.service import runs
from cellpose_web.service.config import Limits
from cellpose_web.workflows.segment import SegmentParams, segment
from cellpose_web.ui import common, widgets as W
from cellpose_web.ui.results_view import (histogram_update, is_volumetric, make_params, make_puncta, render,
                                          stitch_offer, summary_md, list_downloads, write_files)

EXAMPLES_DIR = examples_dir()

INTRO = ("Upload a TIFF, PNG or JPEG (2D, multi-channel or a z-stack), choose a model and press "
         "**Run segmentation**. Leave the diameter blank to let the model decide. "
         "Shortcuts: **M** masks, **O** outlines.")


def example_files() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(str(p) for p in EXAMPLES_DIR.iterdir()
                  if p.suffix.lower() in inputs.IMAGE_EXTS and not inputs.is_mask_file(p))


def image_info(s: common.Session) -> str:
    if s.raw is None:
        return ""
    px = f"{s.pixel_size_um:.4g} µm/px (from the file)" if s.pixel_size_um else "not in the file — enter it below"
    kind = f"z-stack of {s.image.shape[0]} planes, " if s.is_stack else ""
    return (f"**{s.name}** — shape {tuple(s.raw.shape)}"
            f"{' (' + s.axes + ')' if s.axes else ''}, {s.raw.dtype}; {kind}{s.image.shape[-1]} channel(s)"
            + (" (" + ", ".join(f"{i} = {n}" for i, n in enumerate(s.channel_names)) + ")" if s.channel_names else "")
            + f"; pixel size: {px}")


def load_image(path: str | None, s: common.Session | None, limits: Limits | None = None):
    """Read an uploaded file into the session (keeping the old session if it fails)."""
    if not path:
        raise CellposeWebError("No image: upload a TIFF/PNG/JPEG file or click an example.")
    li = inputs.read_image(path, limits)
    axes = str(li.meta.get("axes", "") or "")
    ca, za = common.axes_from_meta(axes, li.data.shape)
    img, stack = pipeline.to_channels_last(li.data, file_axes=axes)
    names = [str(n) for n in (li.meta.get("extra") or {}).get("channel_names") or []]
    new = common.Session(name=li.name, raw=li.data, axes=axes,
                         pixel_size_um=li.pixel_size_um, image=img, is_stack=stack,
                         channel_names=names if len(names) == img.shape[-1] else [],
                         files=list(s.files) if s else [], workdir=s.workdir if s else "",
                         version=(s.version + 1) if s else 1)
    return new, ca, za


def run_segmentation(s: common.Session, model: str, params: SegmentParams, pixel_size_um: float | None,
                     puncta: PunctaParams | None, progress=None) -> common.Session:
    if s is None or s.raw is None:
        raise CellposeWebError("No image: upload an image (or click an example) before running.")
    px = common.parse_pixel_size(pixel_size_um) or s.pixel_size_um
    models_cache.check_offered(model)

    def prog(f, msg=""):
        if progress is not None:
            progress(0.05 + 0.85 * float(f), desc=f"Segmenting: {msg}" if msg else "Segmenting")

    if progress is not None:
        progress(0.02, desc=f"Loading model {model}")
    res = segment(s.raw, params, model, image_name=s.name, pixel_size_um=px, progress=prog, file_axes=s.axes,
                  puncta=puncta, out_file=s.out_dir() / f"{s.stem}.tif")
    out = common.Session(**{**vars(s)})
    out.image, out.is_stack = res.image, res.masks.ndim == 3
    out.masks, out.flow_rgb, out.cellprob, out.dP = res.masks, res.flow_rgb, res.cellprob, res.dP
    out.provenance, out.table, out.puncta, out.pixel_size_um = res.provenance, res.table, res.puncta, px
    out.version = s.version + 1
    list_downloads(out, res.files)
    return out


def run_under_control(s: common.Session, model: str, params: SegmentParams, pixel_size_um: float | None,
                      puncta: PunctaParams | None, run_key: str, browser_session: str = "", owner: str = "",
                      progress=None) -> common.Session:
    """run_segmentation as one cancellable run of the service's run registry: Cancel (or the browser
    going away) stops it at the next progress step with runs.RunCancelled; progress lines carry an
    ETA; the finished result is kept for `owner` (user + browser) so a page reload can reopen it."""
    reg = runs.registry()

    def work(run: runs.Run) -> common.Session:
        def prog(fraction, desc=""):
            line = run.progress(fraction, desc)
            if progress is not None:
                progress(fraction, desc=line)
        return run_segmentation(s, model, params, pixel_size_um, puncta, prog)

    new = reg.run(run_key, browser_session, work)
    reg.keep(owner, new, nbytes=new.nbytes)
    return new


def load_masks(path: str | None, s: common.Session | None) -> common.Session:
    """Attach existing masks (a Cellpose _seg.npy or a label image) to the loaded image."""
    if s is None or s.image is None:
        raise CellposeWebError("Upload the image first, then its masks file.")
    if not path:
        raise CellposeWebError("Choose a _seg.npy, _cp_masks.tif/.png or _masks.tif file.")
    p = Path(path)
    out = common.Session(**{**vars(s)})
    out.masks, warning = results.read_masks_file(p, s.image.shape[:-1], Limits.from_env(), image_name=s.name)
    if warning:
        gr.Warning(warning)
    out.flow_rgb = out.cellprob = out.dP = None
    out.table, out.puncta = results.measure_result(out.masks, out.image, out.pixel_size_um)
    out.provenance = results.masks_file_provenance(p.name, s.name, s.raw.shape, s.pixel_size_um)
    out.version = s.version + 1
    write_files(out)
    return out


def stitch_session(s: common.Session, threshold: float = 0.3) -> common.Session:
    """Link a plane-by-plane result into 3D cells (:func:`pipeline.stitch_planes`) and rewrite its files."""
    if s is None or s.masks is None or s.masks.ndim != 3:
        raise CellposeWebError("Stitching needs a z-stack result segmented plane by plane; run one first.")
    if is_volumetric(s):
        raise CellposeWebError("This result already has 3D cells.")
    out = common.Session(**{**vars(s)})
    out.masks, out.table, out.provenance = pipeline.stitch_planes(s.masks, s.image, s.provenance, s.pixel_size_um,
                                                                  threshold)
    out.puncta, out.version = None, s.version + 1
    write_files(out)
    return out


# ------------------------------------------------------------------ layout
def build(ctx: dict[str, Any]) -> dict[str, Any]:
    session: gr.State = ctx["session"]
    names, default = common.model_choices()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            gr.Markdown(INTRO)
            file_in = gr.File(label="Image (TIFF / PNG / JPEG)", file_types=list(inputs.IMAGE_EXTS),
                              type="filepath", elem_id="seg-file", height=110)
            info = gr.Markdown("", elem_id="seg-info")
            ex = example_files()
            if ex:
                gr.Examples(examples=[[p] for p in ex], inputs=[file_in], label="Examples (nuclei, MIT licence)",
                            example_labels=[Path(p).name for p in ex])
            model = gr.Dropdown(names, value=default, label="Model", allow_custom_value=False,
                                info="From the model registry; the best available is pre-selected. Each says what "
                                     "it is for: nuclei, whole cells or anything.",
                                elem_id="seg-model")
            with gr.Group():
                channels = gr.Textbox("", label=W.SEG_CHANNELS_LABEL, placeholder=W.SEG_CHANNELS_PLACEHOLDER,
                                      info=W.SEG_CHANNELS_INFO, max_lines=1, elem_id="seg-channels")
                channel_map = gr.Markdown("", elem_id="seg-channel-map")
            with gr.Row():
                diameter = gr.Textbox("", label="Diameter (px)", info="blank = automatic", placeholder="automatic",
                                      max_lines=1, elem_id="seg-diameter")
                pixel = gr.Textbox(None, label="Pixel size (µm/px)", info="filled from the file; blank = unknown",
                                   placeholder="e.g. 0.1", elem_id="seg-pixel")
            with gr.Row():
                flow = gr.Slider(0, 3, 0.4, step=0.05, label="Flow threshold", info="higher = more cells kept")
                cellprob = gr.Slider(-6, 6, 0.0, step=0.25, label="Cell probability threshold",
                                     info="lower = larger / more cells")
            with gr.Accordion("More parameters", open=False):
                with gr.Row():
                    niter = gr.Number(0, label="niter (0 = automatic)", minimum=0, precision=0)
                    min_size = gr.Number(15, label="Minimum cell size (px)", precision=0)
                with gr.Row():
                    ch_axis = gr.Dropdown(common.axis_choices(4), value="auto", label="Channel axis")
                    z_axis = gr.Dropdown(common.axis_choices(4), value="auto", label="Z axis")
                with gr.Row():
                    norm_lo = gr.Number(1.0, label="Normalise: low percentile", minimum=0, maximum=100)
                    norm_hi = gr.Number(99.0, label="Normalise: high percentile", minimum=0, maximum=100)
            with gr.Accordion("3D (z-stacks)", open=False):
                do3d = gr.Checkbox(False, label="do_3D (segment the volume in 3D)")
                with gr.Row():
                    aniso = gr.Number(None, label="Anisotropy (z step / xy pixel)", minimum=0,
                                      elem_id="seg-aniso")
                    stitch = gr.Slider(0, 1, 0, step=0.05, label="Stitch threshold (2D planes → 3D, IoU)")
            with gr.Accordion("Puncta (e.g. PIEZO1)", open=False):
                p_on, p_ch, p_smin, p_smax, p_thr, p_dist = W.puncta_controls("seg")
                p_btn = gr.Button("Re-detect puncta only", size="sm")
            with gr.Accordion("Load existing masks instead (to inspect or correct them)", open=False):
                masks_in = gr.File(label="_seg.npy, _cp_masks.tif/.png or _masks.tif of this image",
                                   file_types=[".npy", *inputs.LABEL_EXTS], type="filepath", height=100,
                                   elem_id="seg-masks-file")
            with gr.Row():
                run = gr.Button("Run segmentation", variant="primary", elem_id="seg-run", scale=3)
                cancel = gr.Button("Cancel", variant="stop", elem_id="seg-cancel", scale=1)
            browser_id = gr.BrowserState("", storage_key="cellpose_web_browser")
        with gr.Column(scale=2, min_width=480):
            with gr.Row():
                overlays = gr.CheckboxGroup([W.OVERLAY_MASKS, W.OVERLAY_OUTLINES, W.OVERLAY_PUNCTA],
                                            value=[W.OVERLAY_MASKS, W.OVERLAY_OUTLINES, W.OVERLAY_PUNCTA],
                                            label="Overlays", elem_id="seg-overlays")
                background = gr.Radio([W.BG_IMAGE, W.BG_FLOWS, W.BG_CELLPROB], value=W.BG_IMAGE, label="Show",
                                      elem_id="seg-background")
            view = gr.Image(label="Image and masks", type="numpy", interactive=False, elem_id="seg-view",
                            format="png", height=560, buttons=["download", "fullscreen"],
                            placeholder="Upload an image or click an example to start.")
            zslider = gr.Slider(0, 1, 0, step=1, label="z-plane", visible=False, elem_id="seg-z")
            count = gr.Markdown("No result yet — upload an image (or click an example), then press "
                                "**Run segmentation**.", elem_id="seg-count")
            stitch_btn = gr.Button("Stitch planes into 3D cells", visible=False, size="sm", elem_id="seg-stitch")
            with gr.Tabs():
                with gr.Tab("Cells table"):
                    table = gr.Dataframe(pd.DataFrame(columns=["label", "area_px", "area_um2", "centroid_y_px",
                                                                "centroid_x_px", "eccentricity", "solidity",
                                                                "mean_intensity_ch0"]),
                                         label="Per-cell measurements (areas in px and µm², centroids in px/µm)",
                                         interactive=False, max_height=360, elem_id="seg-table")
                with gr.Tab("Size histogram"):
                    # slanted bin labels: 15 ranges like "1,024–1,102 px" side by side overlap
                    hist = gr.BarPlot(None, x="bin", y="count", x_label_angle=-40,
                                      label="Cell size histogram", height=340, elem_id="seg-hist",
                                      sort=None)
                with gr.Tab("Downloads"):
                    files = gr.File(label="Masks (_cp_masks.tif/.png), _seg.npy, outlines, ImageJ ROIs, CSV",
                                    file_count="multiple", interactive=False, elem_id="seg-files")
                with gr.Tab("How it was made"):
                    prov = gr.JSON(label="Model, sha256 and every parameter", elem_id="seg-prov")

    # ---------------- events
    def named_puncta_channel(s, current):
        """A file that names its channels (ImageJ labels, OME names) and has a puncta-like one:
        that channel becomes the puncta channel (None: keep the current one)."""
        found = pipeline.puncta_channel_from_names(s.channel_names if s is not None else None)
        return None if found is None or found == current else found

    @W.user_errors(outputs=14)
    def on_upload(path, s, model_name, chs, pon, pch):
        if not path:
            return (gr.skip(),) * 14
        try:
            new, ca, za = load_image(path, s)
        except CellposeWebError as e:
            # the uploader now shows the bad file: say so where the image is described, so nobody takes the
            # result on screen (and what Run segments) for that file's
            gr.Warning(str(e))
            kept = f" The image below is still **{s.name}**; Run segments it." if s is not None and s.raw is not None \
                else ""
            return (gr.skip(), gr.skip(), f"**{Path(path).name}** could not be read.{kept}") + (gr.skip(),) * 11
        zs = gr.update(visible=new.is_stack, maximum=max(1, new.image.shape[0] - 1) if new.is_stack else 1,
                       value=0)
        nax = new.raw.ndim
        named_puncta = named_puncta_channel(new, pch)
        return (new, render(new, [], W.BG_IMAGE, 0), image_info(new), zs,
                gr.update(choices=common.axis_choices(nax), value="auto" if ca is None else str(ca)),
                gr.update(choices=common.axis_choices(nax), value="auto" if za is None else str(za)),
                gr.update(value=new.pixel_size_um),
                # the previous image's result goes: its count, cells and files must not pass for this one's
                f"No result yet for **{new.name}**: press Run.", W.table_for_display(pd.DataFrame()),
                histogram_update(new), None, None,
                # written with the image, not in a later step: a later step would carry the channels box as it
                # was before the person typed in it and overwrite the line their typing wrote
                gr.skip() if named_puncta is None else gr.update(value=named_puncta),
                on_channels(new, model_name, chs, pon, pch if named_puncta is None else named_puncta))


    def on_channels(s, model_name, chs, pon, pch):
        """The line under the segmentation channels: what each file channel is used for."""
        try:
            n = int(s.image.shape[-1]) if s is not None and s.image is not None else 0
            if n == 0:
                return ("Channels are numbered as in the file (0 = first); upload an image to see which one does "
                        "what." + (" Cellpose 1-3 models: the first listed is the cytoplasm, the second the "
                                   "nucleus." if models_cache.is_legacy_model(model_name) else ""))
            return "→ " + pipeline.describe_channels(
                n, common.parse_channels(chs), int(pch) if pon and pch is not None else None,
                legacy=models_cache.is_legacy_model(model_name), names=s.channel_names)
        except CellposeWebError as e:
            return f"⚠ {e}"

    file_in.change(on_upload, [file_in, session, model, channels, p_on, p_ch],
                   [session, view, info, zslider, ch_axis, z_axis, pixel, count, table, hist, files, prov, p_ch,
                    channel_map],
                   api_visibility="private", concurrency_limit=4, concurrency_id="load")

    map_inputs = [session, model, channels, p_on, p_ch]
    for comp in (model, channels, p_on, p_ch):
        comp.change(on_channels, map_inputs, [channel_map], api_visibility="private", show_progress="hidden",
                    queue=False)
    # .input: only the user's own tick (a reopened result setting the box must not switch its model)
    p_on.input(common.whole_cell_model_for_puncta, [p_on, model], [model], api_visibility="private",
               show_progress="hidden")
    seg_inputs = [session, model, diameter, flow, cellprob, niter, min_size, ch_axis, z_axis, channels, norm_lo,
                  norm_hi, do3d, aniso, stitch, pixel, p_on, p_ch, p_smin, p_smax, p_thr, overlays, background,
                  p_dist]
    seg_outputs = [session, view, count, table, hist, files, prov, zslider]

    def result_outputs(new: common.Session, ov, bg) -> tuple:
        zs = gr.update(visible=new.is_stack, maximum=max(1, new.masks.shape[0] - 1) if new.is_stack else 1)
        return (new, render(new, ov, bg, 0), summary_md(new), W.table_for_display(new.table), histogram_update(new),
                new.files, new.provenance, zs)

    @W.user_errors(outputs=8)
    def on_run(s, model_name, d, fl, cp, ni, ms, ca, za, chs, lo, hi, d3, an, st, px, pon, pch, psmin, psmax,
               pthr, ov, bg, pdist=None, browser="", request: gr.Request = None, progress=gr.Progress()):
        params = make_params(d, fl, cp, ni, ms, ca, za, chs, lo, hi, d3, an, st)
        puncta = make_puncta(pon, pch, psmin, psmax, pthr, pdist)
        tab = getattr(request, "session_hash", None) or ""
        new = run_under_control(s, model_name, params, px, puncta, run_key=tab or str(id(s)), browser_session=tab,
                                owner=runs.owner_key(W.username(request), browser), progress=progress)
        return result_outputs(new, ov, bg)

    run.click(on_run, seg_inputs + [browser_id], seg_outputs, api_name="segment_ui", api_visibility="private",
              concurrency_limit=ctx["limits"].concurrency["segment"], concurrency_id="segment"
              ).then(stitch_offer, [session], [stitch_btn], api_visibility="private", show_progress="hidden")

    def on_cancel(request: gr.Request):
        if runs.registry().cancel(getattr(request, "session_hash", None) or ""):
            gr.Info("Cancelling the run…")
        else:
            gr.Info("Nothing is running.")

    cancel.click(on_cancel, None, None, api_visibility="private", queue=False)

    @W.user_errors(outputs=8)
    def on_stitch(s, ov, bg):
        return result_outputs(stitch_session(s), ov, bg)

    stitch_btn.click(on_stitch, [session, overlays, background], seg_outputs, api_visibility="private"
                     ).then(stitch_offer, [session], [stitch_btn], api_visibility="private", show_progress="hidden")

    def on_restore(browser, request: gr.Request):
        """Page (re)load: give the browser an id, and reopen its last finished result if the server has it."""
        browser = browser or uuid.uuid4().hex
        kept = runs.registry().kept(runs.owner_key(W.username(request), browser))
        if kept is None:
            return (browser,) + tuple(gr.skip() for _ in range(len(seg_outputs) + 8))
        try:
            out = (browser,) + result_outputs(kept, [W.OVERLAY_MASKS, W.OVERLAY_OUTLINES, W.OVERLAY_PUNCTA],
                                              W.BG_IMAGE) + (image_info(kept), stitch_offer(kept)) + form_of(kept)
        except Exception:  # noqa: BLE001 - a page load must not fail on a kept result: start afresh
            W.log.exception("could not reopen the kept result %s", kept.name)
            return (browser,) + tuple(gr.skip() for _ in range(len(seg_outputs) + 8))
        gr.Info(f"Reopened your last result ({kept.name}).")
        return out

    def form_of(kept: common.Session) -> tuple:
        """The form as it was for a reopened result: model, pixel size, channels, diameter, puncta."""
        p = kept.provenance or {}
        prm = p.get("eval_params") or {}
        chans = (p.get("channels") or {}).get("segment")
        pp = p.get("puncta") or {}
        name = (p.get("model") or {}).get("name")
        return (gr.update(value=name) if name in models_cache.list_model_names() else gr.skip(),
                gr.update(value=kept.pixel_size_um),
                gr.update(value=",".join(map(str, chans)) if chans else ""),
                gr.update(value="" if not prm.get("diameter") else f"{prm['diameter']:g}"),
                gr.update(value=bool(pp)), gr.update(value=pp.get("channel", 0)))

    def on_unload(request: gr.Request):
        """The browser tab closed or reloaded: stop its runs (another user's run must not wait on them)."""
        runs.registry().cancel_session(getattr(request, "session_hash", None) or "")

    @W.user_errors(outputs=7)
    def on_puncta(s, pon, pch, psmin, psmax, pthr, ov, bg, z, pdist=None):
        if s is None or s.masks is None:
            raise CellposeWebError("Run the segmentation first; puncta are counted per cell.")
        if s.is_stack:
            raise CellposeWebError("Puncta detection works on 2D images; pick a 2D image or one plane.")
        puncta = make_puncta(True, pch, psmin, psmax, pthr, pdist)
        new = common.Session(**{**vars(s)})
        new.table, new.puncta, new.provenance = results.redetect_puncta(new.masks, new.image, new.pixel_size_um,
                                                                        new.provenance, puncta)
        write_files(new)
        ov = list(ov or []) + ([W.OVERLAY_PUNCTA] if W.OVERLAY_PUNCTA not in (ov or []) else [])
        return new, render(new, ov, bg, z), summary_md(new), W.table_for_display(new.table), new.files, \
            new.provenance, ov

    @W.user_errors(outputs=8)
    def on_masks(path, s, ov, bg, browser="", request: gr.Request = None):
        if not path:
            return tuple(gr.skip() for _ in range(8))
        unsaved = (ctx.get("correct") or {}).get("unsaved_edits")
        if unsaved is not None and unsaved(s, browser, request):  # the person's work is not thrown away unasked
            raise CellposeWebError(
                f"The Correct tab has unsaved edits of {s.name}: save them first (Save corrected masks, Ctrl+S), "
                "then load the masks file again; it would replace them.")
        new = load_masks(path, s)
        # kept like a segmentation: a page reload reopens the loaded masks (and edits made on them)
        runs.registry().keep(runs.owner_key(W.username(request), browser), new, nbytes=new.nbytes)
        zs = gr.update(visible=new.is_stack, maximum=max(1, new.masks.shape[0] - 1) if new.is_stack else 1)
        gr.Info(f"Loaded {len(new.table)} cells from {Path(path).name}; open the Correct tab to edit them.")
        return (new, render(new, ov, bg, 0), summary_md(new), W.table_for_display(new.table), histogram_update(new),
                new.files, new.provenance, zs)

    masks_in.upload(on_masks, [masks_in, session, overlays, background, browser_id], seg_outputs, api_visibility="private"
                    ).then(stitch_offer, [session], [stitch_btn], api_visibility="private", show_progress="hidden")

    p_btn.click(on_puncta, [session, p_on, p_ch, p_smin, p_smax, p_thr, overlays, background, zslider, p_dist],
                [session, view, count, table, files, prov, overlays], api_visibility="private")

    def on_view(s, ov, bg, z):
        return render(s, ov, bg, z)

    for comp in (overlays, background, zslider):
        comp.change(on_view, [session, overlays, background, zslider], [view], api_visibility="private",
                    show_progress="hidden", trigger_mode="always_last")

    # ---------------- scripted API (gradio_client): /segment
    with gr.Row(visible=False):
        api_file = gr.File(label="image", type="filepath")
        api_model = gr.Textbox("", label="model")
        api_diam = gr.Number(None, label="diameter_px")
        api_flow = gr.Number(0.4, label="flow_threshold")
        api_cp = gr.Number(0.0, label="cellprob_threshold")
        api_px = gr.Number(None, label="pixel_size_um")
        api_chs = gr.Textbox("", label="segment_channels")
        api_pch = gr.Number(None, label="puncta_channel", precision=0)
        api_masks = gr.File(label="masks_tif")
        api_csv = gr.File(label="cells_csv")
        api_n = gr.Number(label="n_cells")
        api_prov = gr.JSON(label="provenance")
        api_btn = gr.Button("api")

    @W.user_errors
    def api_segment(image, model, diameter_px, flow_threshold, cellprob_threshold, pixel_size_um,
                    segment_channels="", puncta_channel=None):
        """Segment one image file; returns (masks .tif, per-cell CSV, number of cells, provenance).

        segment_channels: file channels that show the cells, e.g. "1,2" (blank = all but the puncta
        channel; Cellpose 1-3 models: the first is the cytoplasm, the second the nucleus); puncta_channel:
        count puncta on this file channel (None = no puncta); model "" with puncta: the best whole-cell
        model. Channels are numbered as in the file (0 = first).
        """
        s, _, _ = load_image(image, None)
        if not model and puncta_channel is not None:  # puncta per whole cell: a whole-cell model
            model = pipeline.model_for_puncta(None)[0]
        model = model or common.model_choices()[1]
        params = SegmentParams(diameter=diameter_px, cellprob_threshold=cellprob_threshold or 0.0,
                               flow_threshold=0.4 if flow_threshold is None else flow_threshold,
                               channels=common.parse_channels(segment_channels))
        puncta = None if puncta_channel is None else PunctaParams(channel=int(puncta_channel))
        new = run_segmentation(s, model, params, pixel_size_um, puncta)
        by = {Path(f).name: f for f in new.files}
        return (by.get(f"{new.stem}_cp_masks.tif"), by.get(f"{new.stem}_cells.csv"), len(new.table),
                new.provenance)

    api_btn.click(api_segment, [api_file, api_model, api_diam, api_flow, api_cp, api_px, api_chs, api_pch],
                  [api_masks, api_csv, api_n, api_prov], api_name="segment",
                  concurrency_limit=ctx["limits"].concurrency["segment"], concurrency_id="segment")

    ctx["model_dropdowns"].append(model)
    return {"model": model, "view": view, "count": count, "files": files, "file_in": file_in,
            "restore": (on_restore, [browser_id], [browser_id, *seg_outputs, info, stitch_btn, model, pixel,
                                                    channels, diameter, p_on, p_ch]),
            "unload": on_unload, "browser_id": browser_id}
