"""Learn while you correct (human-in-the-loop) — a panel of the Correct tab.

A person works through a folder (a zip or several files) image by image on the Correct tab's
drawing surface: each image arrives segmented by the project's latest model, the person corrects
it and presses **Save and learn** (Ctrl+Enter); the corrected image joins the project's training
set and a short fine-tune round starts in the background. Widgets and callbacks only: the loop
itself is :mod:`cellpose_web.workflows.hitl` (the same one ``python -m cellpose_web hitl`` runs).
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr
import numpy as np
import pandas as pd

from cellpose_web.workflows import CellposeWebError, inputs
from cellpose_web.workflows.lab_models import NAME_RULE
from cellpose_web.workflows import model_cache as models_cache
from cellpose_web.ui import common, widgets as W
from cellpose_web.workflows import hitl, results
from cellpose_web.service import runs

HELP = ("Work through a folder image by image: each image comes **segmented by the latest model**; "
        "correct it on the left and press **Save and learn** (Ctrl+Enter). The model fine-tunes on your "
        "corrections in the background and segments the next images once it does better on the "
        "images kept aside to check it (every 4th corrected image from the 2nd on).")
CURVE_COLUMNS = ["round", "corrected cells", "score", "AP"]
CURVE_DTYPES = {"round": "int64", "corrected cells": "int64", "score": "str", "AP": "float64"}
CURVE_COLORS = {"AP@0.5": "#4c6ef5", "AP@0.75": "#f59f00"}


def shown_session(shown: hitl.ShownImage, project: str, previous: common.Session | None) -> common.Session:
    """The tab's session for an image the project shows: image, proposed masks and flows (so the
    Correct tab's editor, click-to-add and downloads work on it)."""
    flows = shown.flows or [None, None, None]
    m = shown.model or {}
    masks, image = np.asarray(shown.masks), np.asarray(shown.image)
    table, _ = results.measure_result(masks, image, None)  # the Segment tab shows it (and a reload reopens it)
    return common.Session(
        name=shown.name, raw=shown.image, axes="YXC", pixel_size_um=None, image=image,
        is_stack=False, masks=masks, table=table, flow_rgb=flows[0], dP=flows[1],
        cellprob=flows[2] if flows[2] is None else np.asarray(flows[2], np.float32),
        provenance={"model": {"name": m.get("name"), "sha256": m.get("sha256")}, "eval_params": {},
                    "hitl": {"project": project, "index": int(shown.index), "round": m.get("round")}},
        workdir=previous.workdir if previous else "", version=(previous.version + 1) if previous else 1)


def status_md(status: dict[str, Any], shown_model: dict[str, Any] | None = None) -> str:
    """Where the project stands: image k of N, the model that segmented it, what it learnt from,
    the round in progress."""
    cur = status.get("current_model") or {}
    lines = [f"**{status['name']}** — {status['n_corrected']} of {status['n_images']} images corrected "
             f"({status['n_cells_corrected']} cells; {status['n_heldout']} kept aside to check the model)"]
    skipped = status.get("skipped") or []
    if skipped:
        lines.append(f"{len(skipped)} file(s) could not be read and are left out: "
                     + "; ".join(f"{x['name']} ({x['reason']})" for x in skipped[:5]))
    if shown_model:
        lines.append(f"This image was segmented by **round {shown_model.get('round')}** "
                     f"({shown_model.get('name')}), which learnt from **{shown_model.get('n_cells', 0)} corrected "
                     "cells**.")
    lines.append(f"Current model: round {cur.get('round')} ({cur.get('name')}); base "
                 f"{(status.get('base_model') or {}).get('name')}; {status.get('train_minutes', 0):.1f} min of "
                 "training so far.")
    run = status.get("round_running")
    if run and run.get("running") and run.get("phase") == "queued":
        lines.append(f"⏳ The next round is queued ({run.get('message') or 'another training is running'}).")
    elif run and run.get("running"):
        ep = f", epoch {run.get('epoch')}/{run.get('n_epochs')}" if run.get("n_epochs") else ""
        lines.append(f"⏳ Round {run.get('round')} is learning ({run.get('phase')}{ep}, "
                     f"{run.get('elapsed_s', 0):.0f} s)" + (" — more corrections are queued for the next round"
                                                              if status.get("pending") else "") + ".")
    elif run and run.get("error"):
        lines.append(f"⚠ The last round failed: {run['error']}")
    done = [r for r in status.get("rounds", []) if r.get("round") and r.get("status") == "done"]
    if done:
        r = done[-1]
        verdict = "kept" if r.get("applied") else "not kept"
        lines.append(f"Last round {r['round']}: {verdict} ({r.get('reason') or ''}).")
    return "\n\n".join(lines)


def curve_frame(status: dict[str, Any]) -> pd.DataFrame | None:
    """Held-out AP@0.5 and AP@0.75 per round, long form for a line plot; None before any round is
    scored (the plot then stays empty: an empty frame fixed its axes so that no line was drawn later)."""
    rows = []
    for p in status.get("ap_curve") or []:
        for key, label in (("ap50", "AP@0.5"), ("ap75", "AP@0.75")):
            if p.get(key) is not None:
                rows.append({"round": int(p["round"]), "corrected cells": int(p.get("n_cells") or 0),
                             "score": label, "AP": float(p[key])})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).astype(CURVE_DTYPES) if rows else None


def round_choices(status: dict[str, Any]) -> list[tuple[str, int]]:
    """(label, round) for every round with a model, for going back to it."""
    out = []
    for r in status.get("rounds", []):
        if r.get("round") == 0 or r.get("status") == "done":
            ap = (r.get("scores") or {}).get("ap50")
            out.append((f"round {r['round']}" + (f" (held-out AP@0.5 {ap:.3f})" if ap is not None else ""),
                        int(r["round"])))
    return out


def shown_model(prev: common.Session | None, status: dict[str, Any]) -> dict[str, Any] | None:
    """The model that segmented the project image on screen ({round, name, n_cells}), from its
    provenance and the project's rounds; None when the screen shows no image of this project."""
    prov = (prev.provenance or {}) if prev is not None else {}
    info = prov.get("hitl") or {}
    if info.get("project") != status.get("name") or info.get("round") is None:
        return None
    k = int(info["round"])
    rnd = next((r for r in status.get("rounds", []) if r.get("round") == k), {})
    return {"round": k, "name": (prov.get("model") or {}).get("name"), "n_cells": rnd.get("n_cells") or 0}


def _open(name: str, user: str | None) -> hitl.HitlSession:
    if not name:
        raise CellposeWebError("No project: give it a name and press Start (or Resume).")
    return hitl.open_session(name, user=user)


def build(ctx: dict[str, Any], session: gr.State, editor_state: gr.State,
          edited_masks: Callable[[common.Session, Any], np.ndarray],
          edits_made: Callable[[common.Session, Any], bool]) -> dict[str, Any]:
    """The panel (inside the Correct tab's side column).

    editor_state : the Correct tab's editor state; ``edited_masks(session, editor_state)`` gives the
    masks as corrected on the drawing surface, (Y, X) int labels; ``edits_made(session, editor_state)``
    whether the person has edited the image on screen.
    Returns {"events": the events that put a new image into the session (the Correct tab reloads
    its drawing surface after them), ...}.
    """
    choices, default = common.model_choices()
    project = ctx["hitl_project"]
    with gr.Accordion("Learn while you correct (human-in-the-loop)", open=False, elem_id="hitl-panel"):
        gr.Markdown(HELP)
        name = gr.Textbox("my_project", label="Project name", max_lines=1, elem_id="hitl-name")
        files = gr.File(label="Images: a zip or several files", file_count="multiple",
                        file_types=[".zip", *inputs.IMAGE_EXTS], type="filepath",
                        height=100, elem_id="hitl-files")
        base = gr.Dropdown(choices, value=default, label="Start from model", elem_id="hitl-base")
        channels = gr.Textbox("", label=W.SEG_CHANNELS_LABEL, placeholder="blank = all (the first three)",
                              info=W.SEG_CHANNELS_INFO, max_lines=1, elem_id="hitl-channels")
        holdout = gr.Number(4, label="Check new models on held-out images: the 2nd corrected image and every "
                                  "Nth after it (0 = use each new model at once)", precision=0, minimum=0,
                            elem_id="hitl-holdout")
        with gr.Row():
            start = gr.Button("Start", size="sm", elem_id="hitl-start")
            resume = gr.Button("Resume", size="sm", elem_id="hitl-resume")
        save = gr.Button("Save and learn (Ctrl+Enter)", variant="primary", elem_id="hitl-save")
        status = gr.Markdown("", elem_id="hitl-status")
        curve = gr.LinePlot(None, x="round", y="AP", color="score", color_map=CURVE_COLORS,
                            y_lim=[0, 1], x_title="round", y_title="held-out AP",
                            label="Held-out AP per round (blue: AP@0.5, orange: AP@0.75)", height=300,
                            elem_id="hitl-curve")
        with gr.Row():
            back_to = gr.Dropdown([], label="Go back to the model of", elem_id="hitl-rounds", scale=2)
            back = gr.Button("Use it", size="sm", elem_id="hitl-rollback", scale=1)
        with gr.Row():
            publish_name = gr.Textbox("", label="Publish the current model as lab model", max_lines=1,
                                      placeholder="e.g. piezo1_keratinocytes_v1", info=NAME_RULE,
                                      elem_id="hitl-publish-name", scale=2)
            publish = gr.Button("Publish", size="sm", elem_id="hitl-publish", scale=1)
        timer = gr.Timer(2.0, active=False)

    outputs = [project, name, session, status, curve, back_to, timer]
    browser_id = ctx["segment"]["browser_id"]

    def panel(st: dict[str, Any], model: dict[str, Any] | None,
              extra: str = "", tick: bool = False) -> tuple:
        """status, curve, round picker and timer for the project's state ``st``."""
        running = bool(st.get("round_running") and st["round_running"].get("running"))
        return (status_md(st, model) + extra, curve_frame(st),
                gr.update(choices=round_choices(st), value=int(st["current_model"]["round"])),
                gr.Timer(active=running or tick))

    def keep(new: common.Session, browser: str, request: gr.Request | None) -> common.Session:
        """Keep the project's image on screen for this browser like a segmentation: a page reload
        reopens it, with the corrections drawn on it, and Save and learn goes on from there."""
        runs.registry().keep(runs.owner_key(W.username(request), browser), new, nbytes=new.nbytes)
        return new

    def show(s: hitl.HitlSession, prev: common.Session | None, next_index: int | None = None,
             browser: str = "", request: gr.Request | None = None) -> tuple:
        shown = s.next_image(index=next_index)
        st = s.status()
        if shown is None:
            gr.Info("Every image of this project is corrected. Publish the current model as a lab model "
                    "(below), or go back to an earlier round.")
            return (s.name, s.name, gr.skip(), *panel(st, None, "\n\n**All images corrected.**"))
        new = keep(shown_session(shown, s.name, prev), browser, request)
        return (s.name, s.name, new, *panel(st, shown.model))

    @W.user_errors(outputs=len(outputs))
    def on_start(nm, fs, model, chans, every, prev, browser="", request: gr.Request = None):
        if not fs:
            raise CellposeWebError("Upload the images first: a zip, or several image files.")
        models_cache.check_offered(model)
        images = fs[0] if len(fs) == 1 and str(fs[0]).lower().endswith(".zip") else [str(f) for f in fs]
        s = hitl.start_session(nm, images, base_model=model, channels=common.parse_channels(chans),
                               holdout_every=int(4 if every is None else every), user=W.username(request))
        return show(s, prev, browser=browser, request=request)

    @W.user_errors(outputs=len(outputs))
    def on_resume(nm, remembered, prev, browser="", request: gr.Request = None):
        user = W.username(request)
        # the name box starts as 'my_project' after a reload: the project this browser worked on wins
        # unless the box names another project that exists
        named = (nm or "").strip()
        pick = named if named and (not remembered or hitl.session_exists(named, user=user)) else remembered
        s = _open(pick, user)
        info = ((prev.provenance or {}).get("hitl") or {}) if prev is not None else {}
        if info.get("project") == s.name:  # the reopened image (and its corrections) stays on screen
            st = s.status()
            # a round that ended meanwhile: the timer's next tick segments the image again if untouched
            return (s.name, s.name, prev, *panel(st, shown_model(prev, st),
                                                 tick=info.get("round") != st["current_model"]["round"]))
        return show(s, prev, browser=browser, request=request)

    @W.user_errors(outputs=len(outputs))
    def on_save(remembered, prev, editor, browser="", request: gr.Request = None):
        info = (prev.provenance or {}).get("hitl") if prev is not None else None
        if not info:
            raise CellposeWebError("No project image is open: Start or Resume a project first.")
        s = _open(info["project"], W.username(request))
        res = s.save_correction(edited_masks(prev, editor), index=int(info["index"]))
        what = ("kept aside to check the model" if res.heldout else
                "queued for the next round" if res.queued else "learning has started")
        gr.Info(f"Saved {res.name} ({res.n_cells} cells): {what}.")
        return show(s, prev, browser=browser, request=request)

    @W.user_errors(outputs=len(outputs))
    def on_tick(remembered, prev, editor, browser="", request: gr.Request = None):
        """While a round learns: its progress; when it has ended with a new model and the image on
        screen is still untouched, that image is segmented again by the new model."""
        if not remembered:
            return (gr.skip(),) * 6 + (gr.Timer(active=False),)
        s = _open(remembered, W.username(request))
        st = s.status()
        running = bool(st.get("round_running") and st["round_running"].get("running"))
        info = ((prev.provenance or {}).get("hitl") or {}) if prev is not None else {}
        newer = info.get("project") == s.name and info.get("round") != st["current_model"]["round"]
        if not running and newer and not edits_made(prev, editor):
            gr.Info(f"Round {st['current_model']['round']} is ready: this image is segmented again with it.")
            shown = s.next_image(index=int(info["index"]), reuse=False)
            if shown is not None:
                return (s.name, gr.skip(), keep(shown_session(shown, s.name, prev), browser, request),
                        *panel(st, shown.model))
        return (gr.skip(), gr.skip(), gr.skip(), *panel(st, shown_model(prev, st)))

    @W.user_errors(outputs=len(outputs))
    def on_back(remembered, k, prev, editor, browser="", request: gr.Request = None):
        if k is None:
            raise CellposeWebError("Choose a round to go back to.")
        s = _open(remembered, W.username(request))
        s.rollback(int(k))
        info = ((prev.provenance or {}).get("hitl") or {}) if prev is not None else {}
        if info.get("project") == s.name and edits_made(prev, editor):
            # the person's corrections on screen are never thrown away: the image stays as edited
            gr.Info(f"Round {int(k)}'s model segments the next images; the image on screen keeps your "
                    "corrections (Save and learn when it is done).")
            st = s.status()
            return (s.name, s.name, gr.skip(), *panel(st, shown_model(prev, st)))
        gr.Info(f"Round {int(k)}'s model segments the next images.")
        return show(s, prev, info.get("index"), browser=browser, request=request)

    dds = [*ctx["model_dropdowns"], base]

    @W.user_errors(outputs=1 + len(dds))
    def on_publish(remembered, lab_name, prev, request: gr.Request = None):
        s = _open(remembered, W.username(request))
        entry = s.publish((lab_name or "").strip())
        st = s.status()
        gr.Info(f"Published round {st['current_model']['round']} of {s.name} as lab model '{entry.name}': it is "
                "in every model list and the Models tab.")
        names, _ = common.model_choices()
        return (status_md(st, shown_model(prev, st)) + f"\n\nPublished round {st['current_model']['round']} as "
                f"lab model **{entry.name}**.", *[gr.update(choices=names) for _ in dds])

    ev_start = start.click(on_start, [name, files, base, channels, holdout, session, browser_id], outputs,
                           api_visibility="private")
    ev_resume = resume.click(on_resume, [name, project, session, browser_id], outputs, api_visibility="private")
    ev_save = save.click(on_save, [project, session, editor_state, browser_id], outputs, api_visibility="private",
                         concurrency_id="hitl", concurrency_limit=4)
    ev_back = back.click(on_back, [project, back_to, session, editor_state, browser_id], outputs,
                         api_visibility="private")
    ev_tick = timer.tick(on_tick, [project, session, editor_state, browser_id], outputs, api_visibility="private",
                         show_progress="hidden")
    publish.click(on_publish, [project, publish_name, session], [status, *dds], api_visibility="private")
    ctx["model_dropdowns"].append(base)
    # the name box is set by the buttons only (Start, Resume, Save, Use it), never by an event the page
    # fires itself: Gradio resets a Textbox whose pending event ends after a file was dropped beside it,
    # and what the person had typed there was lost (seen under load in CI)
    return {"project": project, "name": name, "events": [ev_start, ev_resume, ev_save, ev_back, ev_tick]}
