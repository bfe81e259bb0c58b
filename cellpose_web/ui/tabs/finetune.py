"""Fine-tune tab: training set (from corrections or uploaded pairs), base model, recipe, live loss
curve, AP before/after on held-out images, cancel; the new model lands in the registry."""
from __future__ import annotations

import time
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from cellpose_web.workflows import CellposeWebError, inputs
from cellpose_web.service import jobs
from cellpose_web.workflows import finetune as training
from cellpose_web.ui import common, widgets as W

INTRO = ("Fine-tuning starts from a **base model** (as Cellpose advises) and trains on your corrected "
         "images. About 20 % of the images are held out to measure **AP (IoU 0.5) before and after**. "
         "Epochs, learning rate and weight decay are filled in for the base model you pick (each network "
         "family has its own); change them if you like. The new model appears in every model list when it "
         "finishes, and becomes the pre-selected model when it beats its base on the held-out images. "
         "Each image is trained and scored on the **channels it was segmented with** (file numbering, "
         "0 = first; shown when you pick a set); type channels to use others for every image.")


def recipe_for(base: str | None) -> tuple[int, float, float, str]:
    """(epochs, learning rate, weight decay, a line saying where they come from) for a base model."""
    r = training.finetune_defaults(base or "")
    family = {"lite": "the built-in lite U-Net", "cpsam": "Cellpose-SAM",
              "cellpose3": "a Cellpose 1-3 U-Net"}.get(r["arch"], "Cellpose-SAM (family not known)")
    note = (f"Defaults for **{base or '–'}** ({family}): {r['n_epochs']} epochs, learning rate "
            f"{r['learning_rate']:g}, weight decay {r['weight_decay']:g}, batch {r['batch_size']}, "
            f"{r['bsize']} px crops — {r['source']}.")
    return int(r["n_epochs"]), float(r["learning_rate"]), float(r["weight_decay"]), note


CHANNELS_LABEL = "Channels to train on (file numbering, 0 = first; blank = as each image was segmented)"
SET_COLUMNS = ["name", "n_images", "n_cells", "channels", "updated"]


def channels_text(channels: list[int] | None) -> str:
    """[1, 2] -> "1,2"; None -> "" (the channels box's text)."""
    return "" if channels is None else ",".join(str(int(c)) for c in channels)


def set_channels_note(row: dict[str, Any] | None) -> str:
    """What the sets table and the channels box say about a set's channels."""
    if row is None:
        return ""
    ch = row.get("channels")
    txt = "all" if ch is None else channels_text(ch)
    return f"{txt} (latest; pairs differ)" if row.get("channels_differ") else txt


def sets_table(user: str | None) -> pd.DataFrame:
    rows = [{**r, "channels": set_channels_note(r)} for r in training.list_sets(user)]
    return pd.DataFrame(rows, columns=SET_COLUMNS) if rows else pd.DataFrame(columns=SET_COLUMNS)


def channels_for_set(set_name: str | None, user: str | None) -> tuple[str, str]:
    """(the channels box's text, its info line) for the training set picked: the set's channels when
    all its pairs were segmented on the same ones, else blank (each image on its own)."""
    row = {r["name"]: r for r in training.list_sets(user)}.get(str(set_name or ""))
    if row is None:
        return "", "blank = each image on the channels it was segmented with"
    if row.get("channels_differ"):
        return "", (f"the images of {row['name']} were segmented on different channels (latest: "
                    f"{set_channels_note({**row, 'channels_differ': False})}); blank trains each on its own")
    if row.get("channels") is None:
        return "", f"{row['name']}: every stored channel (no segmentation channels recorded, or all were used)"
    return channels_text(row["channels"]), f"{row['name']} was segmented on channel(s) {channels_text(row['channels'])}"


def trained_on(result: dict[str, Any]) -> str:
    """'on channels 1,2 (as segmented)' for a finished fine-tune's result."""
    meta = result.get("metadata") or {}
    ch, how = meta.get("channels"), meta.get("channels_source", "as segmented")
    if isinstance(ch, dict):
        return "each image on the channels it was segmented with"
    return f"on {'every channel' if ch is None else 'channel(s) ' + channels_text(ch)} ({how})"


def loss_frame(losses: list) -> pd.DataFrame:
    rows = []
    for e, tr, te in losses:
        rows.append({"epoch": e, "loss": tr, "curve": "train"})
        if te is not None and np.isfinite(te):
            rows.append({"epoch": e, "loss": te, "curve": "held-out"})
    df = pd.DataFrame(rows, columns=["epoch", "loss", "curve"])
    return df.astype({"epoch": "int64", "loss": "float64", "curve": "str"})


def build(ctx: dict[str, Any]) -> None:
    names, default = common.model_choices()
    job_id = gr.State("")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            gr.Markdown(INTRO)
            sets = gr.Dataframe(sets_table(None), label="Training sets on the server", interactive=False,
                                elem_id="ft-sets", max_height=200)
            with gr.Row():
                set_name = gr.Dropdown([s["name"] for s in training.list_sets(None)], label="Training set",
                                       allow_custom_value=True, elem_id="ft-set")
                refresh = gr.Button("Refresh", size="sm")
            chans_box = gr.Textbox("", label=CHANNELS_LABEL, placeholder="e.g. 1,2 (blank = as segmented)",
                                   info="blank = each image on the channels it was segmented with",
                                   max_lines=1, elem_id="ft-channels")
            with gr.Accordion("Upload image + mask pairs", open=False):
                gr.Markdown("A zip (or files) with `NAME.tif` + `NAME_masks.tif` (or `NAME_seg.npy`) pairs.")
                pairs = gr.File(label="Pairs", file_count="multiple", elem_id="ft-pairs",
                                file_types=[".zip", *inputs.LABEL_EXTS, ".npy"])
                up_btn = gr.Button("Add pairs to the training set", size="sm")
                up_msg = gr.Markdown("")
            base = gr.Dropdown(names, value=default, label="Base model", elem_id="ft-base")
            new_name = gr.Textbox("", label="New model name", placeholder="e.g. nuclei_lab_v1", elem_id="ft-name")
            ep0, lr0, wd0, note0 = recipe_for(default)
            with gr.Row():
                epochs = gr.Number(ep0, label="Epochs", precision=0, elem_id="ft-epochs")
                lr = gr.Number(lr0, label="Learning rate", elem_id="ft-lr")
                wd = gr.Number(wd0, label="Weight decay", elem_id="ft-wd")
            recipe_note = gr.Markdown(note0, elem_id="ft-recipe")
            with gr.Row():
                start = gr.Button("Start fine-tuning", variant="primary", elem_id="ft-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="ft-cancel")
        with gr.Column(scale=2, min_width=480):
            status = gr.Markdown("No training running.", elem_id="ft-status")
            curve = gr.LinePlot(None, x="epoch", y="loss", color="curve",
                                label="Loss per epoch, drawn live while training (blue: train, orange: held-out)",
                                color_map={"train": "#4c6ef5", "held-out": "#f59f00"},
                                height=320, elem_id="ft-curve", x_title="epoch", y_title="loss")
            result = gr.JSON(label="Result: AP before/after, recipe, where the model is", elem_id="ft-result",
                             visible=False)

    def on_refresh(request: gr.Request):
        user = W.username(request)
        return sets_table(user), gr.update(choices=[s["name"] for s in training.list_sets(user)])

    def on_base(b):
        return recipe_for(b)

    def on_set(name, request: gr.Request):
        text, note = channels_for_set(name, W.username(request))
        return gr.update(value=text, info=note)

    set_name.change(on_set, [set_name], [chans_box], api_visibility="private")

    base.change(on_base, [base], [epochs, lr, wd, recipe_note], api_visibility="private")

    refresh.click(on_refresh, None, [sets, set_name], api_visibility="private")
    ctx["refreshers"].append((on_refresh, [sets, set_name]))

    @W.user_errors(outputs=3)
    def on_upload(fs, name, request: gr.Request):
        if not fs:
            raise CellposeWebError("Choose a zip or files with image + mask pairs first.")
        if not name:
            raise CellposeWebError("Type a training set name first (a new name creates a set).")
        user = W.username(request)
        n, problems = training.import_pairs(fs, name, user)
        msg = f"Added {n} pair(s) to **{name}**." + ("".join(f"\n- {a}: {b}" for a, b in problems[:20]))
        return (msg,) + on_refresh(request)

    up_btn.click(on_upload, [pairs, set_name], [up_msg, sets, set_name], api_visibility="private")

    dds = list(ctx["model_dropdowns"])

    @W.user_errors(outputs=4 + len(dds))
    def on_start(training_set, base_model, new_model_name, epochs_, learning_rate, weight_decay, channels="",
                 request: gr.Request = None):
        user = W.username(request)
        job = training.start_finetune_job(training_set, base_model, new_model_name, epochs_, learning_rate,
                                          weight_decay, user, ctx["limits"], channels=channels)
        jm = jobs.manager(user)
        keep = [gr.skip() for _ in dds]
        yield (job.id, f"Training job **{job.id}** started…", gr.skip(), None, *keep)
        last = None
        while True:
            st = jm.get(job.id) or {}
            sig = (st.get("updated"), len(st.get("losses", [])))
            if sig != last:
                last = sig
                msg = f"**{st.get('state')}** — {st.get('message', '')} ({100 * st.get('progress', 0):.0f} %)"
                losses = st.get("losses", [])
                yield (job.id, msg, loss_frame(losses) if losses else gr.skip(), gr.skip(), *keep)
            if st.get("state") not in jobs.ACTIVE:
                break
            time.sleep(0.5)
        r = st.get("result") or {}
        if st.get("state") == "failed":
            raise CellposeWebError(st.get("message") or "Training failed.")
        if st.get("state") != "done" or not r.get("name"):
            yield (job.id, f"Training **{st.get('state')}**: {st.get('message', '')}",
                   loss_frame(st.get("losses", [])), gr.update(value=r or None, visible=bool(r)), *keep)
            return
        names_now, default_now = common.model_choices()
        ap_b, ap_a = r.get("ap_before"), r.get("ap_after")
        if ap_b is None or ap_a is None:
            scored = (f"Done: model **{r['name']}** saved to the registry, {trained_on(r)}. The set had no image to "
                      "hold out (a set of 2 or more keeps about 20 % aside to score the model), so it was not compared "
                      "with its base and the pre-selected model is unchanged.")
        else:
            scored = (f"Done: model **{r['name']}** saved to the registry. AP (IoU 0.5) on held-out images: "
                      f"{W.fmt_num(ap_b, '', 3)} before → **{W.fmt_num(ap_a, '', 3)}** after, {trained_on(r)}. "
                      + ("It is now the pre-selected model." if r.get("is_default") else
                         "It did not beat its base on the held-out images, so the pre-selected model is unchanged."))
        msg = scored + "".join(f" Note: {n}." for n in r.get("notices") or [])
        pick = {"value": default_now} if r.get("is_default") else {}
        ups = [gr.update(choices=names_now, **pick) for _ in dds]
        yield (job.id, msg, loss_frame(st.get("losses", [])),
               gr.update(value={k: v for k, v in r.items() if k not in ("train_losses", "test_losses")},
                         visible=True), *ups)

    start.click(on_start, [set_name, base, new_name, epochs, lr, wd, chans_box], [job_id, status, curve, result, *dds],
                api_name="finetune", concurrency_limit=ctx["limits"].concurrency["train"], concurrency_id="train")

    def on_cancel(jid, request: gr.Request):
        if jid and jobs.manager(W.username(request)).cancel(jid):
            return f"Cancelling training **{jid}** after the current epoch…"
        return "No training running."

    cancel.click(on_cancel, [job_id], [status], api_visibility="private", queue=False)
    ctx["model_dropdowns"].append(base)
