"""Batch tab: a zip (or many files) -> per-image results, summary CSV, all-cells CSV, result zip.
Runs as a background job: it survives a closed browser, and the server keeps its status."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from cellpose_web.workflows import CellposeWebError, inputs
from cellpose_web.workflows.results import DEFAULT_MAX_DISTANCE_UM
from cellpose_web.workflows import batch
from cellpose_web.service import jobs, runs
from cellpose_web.ui import common, results_view, widgets as W

INTRO = ("Upload a **zip** of images (or select several image files). Every image is segmented with the "
         "same model and parameters. You get a zip with each image's masks, outlines and `_seg.npy`, a "
         "**summary CSV** (one row per image) and an **all-cells CSV**. Files that cannot be read are "
         "listed with the reason; the others are still processed.")


def _download_copy(path: str | None) -> str | None:
    """Copy a result from the data folder to a temp file for download (the data folder is not served)."""
    if not path or not Path(path).is_file():
        return None
    d = Path(tempfile.mkdtemp(prefix="cpweb_dl_"))
    return str(shutil.copy2(path, d / Path(path).name))


#: the columns of the "Earlier batches" table (also its headers when it has no rows)
JOB_COLUMNS = ["job", "state", "progress", "images ok", "problems", "message"]


def jobs_table(user: str | None) -> pd.DataFrame:
    """The user's last 20 batches, newest first (columns :data:`JOB_COLUMNS`; one row saying
    "no batches yet" when there are none)."""
    rows = []
    for st in jobs.manager(user).list("batch")[:20]:
        r = st.get("result") or {}
        rows.append({"job": st["id"], "state": st["state"], "progress": f"{100 * st.get('progress', 0):.0f} %",
                     "images ok": r.get("n_ok", ""), "problems": len(r.get("errors", [])) if r else "",
                     "message": st.get("message", "")})
    # a row that says so when there are none (an empty table looks like one that failed to load)
    rows = rows or [{"job": "", "state": "no batches yet", "progress": "", "images ok": "", "problems": "",
                     "message": ""}]
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def build(ctx: dict[str, Any]) -> None:
    names, default = common.model_choices()
    job_id = gr.State("")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            gr.Markdown(INTRO)
            files = gr.File(label="Zip or image files", file_count="multiple",
                            file_types=[".zip", *inputs.IMAGE_EXTS], elem_id="batch-files")
            model = gr.Dropdown(names, value=default, label="Model", elem_id="batch-model")
            channels = gr.Textbox("", label=W.SEG_CHANNELS_LABEL, placeholder=W.SEG_CHANNELS_PLACEHOLDER,
                                  info=W.SEG_CHANNELS_INFO, max_lines=1, elem_id="batch-channels")
            with gr.Row():
                diameter = gr.Textbox("", label="Diameter (px)", info="blank = automatic", placeholder="automatic",
                                      max_lines=1, elem_id="batch-diameter")
                pixel = gr.Textbox(None, label="Pixel size (µm/px)", info="used when a file has none",
                                   placeholder="e.g. 0.1", elem_id="batch-pixel")
            with gr.Row():
                flow = gr.Slider(0, 3, 0.4, step=0.05, label="Flow threshold")
                cellprob = gr.Slider(-6, 6, 0.0, step=0.25, label="Cell probability threshold")
            with gr.Accordion("More parameters", open=False):
                with gr.Row():
                    niter = gr.Number(0, label="niter (0 = automatic)", minimum=0, precision=0)
                    min_size = gr.Number(15, label="Minimum cell size (px)", precision=0)
            with gr.Accordion("Puncta (e.g. PIEZO1)", open=False):
                p_on, p_ch, p_smin, p_smax, p_thr, p_dist = W.puncta_controls("batch")
            with gr.Row():
                run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="batch-cancel")
        with gr.Column(scale=2, min_width=480):
            status = gr.Markdown("No batch running.", elem_id="batch-status")
            result = gr.File(label="Results (zip, summary CSV, all-cells CSV)", file_count="multiple",
                             interactive=False, elem_id="batch-result")
            summary = gr.Dataframe(pd.DataFrame(columns=["image", "n_cells", "median_area_um2", "median_area_px",
                                                         "status", "hint", "reason"]), label="Summary: one row per image (cell count, median area px / µm², "
                                         "puncta)", interactive=False, max_height=320, elem_id="batch-summary")
            with gr.Accordion("Earlier batches (kept on the server)", open=False) as history_box:
                history = gr.Dataframe(jobs_table(None), headers=JOB_COLUMNS, column_count=len(JOB_COLUMNS),
                                       interactive=False, elem_id="batch-history")
                with gr.Row():
                    old_id = gr.Textbox(label="Job id", placeholder="copy a job id from the table")
                    old_btn = gr.Button("Get results of this job", size="sm")
                    refresh = gr.Button("Refresh list", size="sm")

    @W.user_errors(outputs=5)
    def on_run(files, model, diameter_px, flow_threshold, cellprob_threshold, niter, min_size_px, channels,
               pixel_size_um, puncta, puncta_channel, puncta_sigma_min_px, puncta_sigma_max_px, puncta_threshold,
               puncta_max_distance_um=DEFAULT_MAX_DISTANCE_UM, request: gr.Request = None, progress=gr.Progress()):
        params = results_view.make_params(diameter_px, flow_threshold, cellprob_threshold, niter, min_size_px, "auto",
                                         "auto", channels, 1.0, 99.0, False, None, 0)
        pp = results_view.make_puncta(puncta, puncta_channel, puncta_sigma_min_px, puncta_sigma_max_px,
                                     puncta_threshold, puncta_max_distance_um)
        user = W.username(request)
        try:
            job = batch.start_batch_job(list(files or []), model, params, common.parse_pixel_size(pixel_size_um),
                                        pp, user)
        except CellposeWebError as e:  # refused before a job was made: the status line says why too
            yield "", f"Batch not started: {e}", gr.skip(), gr.skip(), jobs_table(user)
            raise
        jm = jobs.manager(user)
        yield job.id, f"Batch **{job.id}** queued…", gr.skip(), gr.skip(), jobs_table(user)
        started = None
        while True:
            st = jm.get(job.id) or {}
            if started is None and st.get("state") == "running":
                started = time.monotonic()
            frac = float(st.get("progress", 0.0))
            progress(frac, desc=runs.progress_line(frac, time.monotonic() - started, st.get("message", ""))
                     if started is not None else st.get("message", ""))
            if st.get("state") not in jobs.ACTIVE:
                break
            time.sleep(0.5)
        yield (job.id,) + _result_outputs(st) + (jobs_table(user),)
        if st.get("state") == "failed":  # the status line says it; a toast too, as for any refusal
            raise CellposeWebError(st.get("message") or "The batch failed.")

    run.click(on_run, [files, model, diameter, flow, cellprob, niter, min_size, channels, pixel, p_on, p_ch,
                       p_smin, p_smax, p_thr, p_dist], [job_id, status, result, summary, history],
              api_name="batch", concurrency_limit=ctx["limits"].concurrency["batch"], concurrency_id="batch")

    p_on.input(common.whole_cell_model_for_puncta, [p_on, model], [model], api_visibility="private",
               show_progress="hidden")

    def on_cancel(jid, request: gr.Request):
        if jid and jobs.manager(W.username(request)).cancel(jid):
            return f"Cancelling batch **{jid}**… images already finished are kept."
        return "No batch running."

    cancel.click(on_cancel, [job_id], [status], api_visibility="private", queue=False)

    @W.user_errors(outputs=3)
    def on_old(jid, request: gr.Request):
        st = jobs.manager(W.username(request)).get((jid or "").strip())
        if not st or st.get("kind") != "batch":
            raise CellposeWebError("No batch job with that id; copy an id from the table.")
        return _result_outputs(st)

    old_btn.click(on_old, [old_id], [status, result, summary], api_visibility="private")
    def on_refresh(request: gr.Request):
        return jobs_table(W.username(request))

    refresh.click(on_refresh, None, [history], api_visibility="private")
    # the browser's table, sent new rows while folded away, shows 0, 1, 2 ... for its column names:
    # it is sent again when unfolded (the list is fresh then too)
    history_box.expand(on_refresh, None, [history], api_visibility="private", show_progress="hidden")
    ctx["refreshers"].append((on_refresh, [history]))
    ctx["model_dropdowns"].append(model)


def _result_outputs(st: dict) -> tuple:
    r = st.get("result") or {}
    state = st.get("state")
    if state == "done" or (state == "cancelled" and r):
        summ = pd.read_csv(r["summary_csv"], comment="#") if r.get("summary_csv") else None
        dl = [x for x in (_download_copy(r.get("zip")), _download_copy(r.get("summary_csv")),
                          _download_copy(r.get("cells_csv"))) if x]
        errs = r.get("errors", [])
        n_failed, n_left_out = r.get("n_failed"), r.get("n_left_out")
        what = ([f"{n_failed} image(s) not segmented"] if n_failed else []) + \
               ([f"{n_left_out} file(s) left out (not images to segment)"] if n_left_out else [])
        if errs and not what:  # a result written before these counts were kept
            what = [f"{len(errs)} problem(s)"]
        msg = (f"Batch **{st['id']}** {state}: **{r.get('n_ok', 0)} of {r.get('n_images', 0)} image(s)** "
               f"segmented" + (f"; **{', '.join(what)}**:" if errs else "."))
        # each problem on its own line: the reason is the sentence a user needs, not a clipped cell
        msg += "".join(f"\n- **{name}**: {reason}" for name, reason in errs[:20])
        if len(errs) > 20:
            msg += f"\n- … and {len(errs) - 20} more (summary.csv lists them all)"
        if summ is not None:
            summ = W.table_for_display(summ)
        return msg, dl, summ
    if state == "failed":
        return f"Batch **{st.get('id')}** failed: {st.get('message') or 'no reason was recorded.'}", None, None
    return f"Batch **{st.get('id')}**: {state} — {st.get('message', '')}", None, None
