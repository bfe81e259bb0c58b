"""Models tab: the registry as a table; fetch from the Hub, upload, download, rename, delete, push."""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from cellpose_web.workflows import CellposeWebError, lab_models
from cellpose_web.workflows import model_cache as models_cache
from cellpose_web.ui import common, widgets as W

COLUMNS = ["name", "for", "source", "available", "arch", "size (MB)", "sha256", "created", "base model", "test AP@0.5",
           "training", "description"]


def registry_table() -> pd.DataFrame:
    rows = []
    for m in lab_models.list_models():
        tr = m.training or {}
        recipe = ", ".join(f"{k}={tr[k]}" for k in ("n_epochs", "learning_rate", "weight_decay", "training_set")
                           if k in tr)
        rows.append({"name": m.name, "for": m.purpose or "", "source": m.source,
                     "available": "yes" if m.available else "no",
                     "arch": m.arch or "", "size (MB)": round(m.size_bytes / 2**20, 1) if m.size_bytes else None,
                     "sha256": W.short_sha(m.sha256) if m.sha256 else "", "created": m.created or "",
                     "base model": m.base_model or tr.get("base_model", "") or "",
                     "test AP@0.5": None if m.test_ap is None else round(float(m.test_ap), 3),
                     "training": recipe, "description": m.description or ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def lab_names() -> list[str]:
    return lab_models.lab_names()


def build(ctx: dict[str, Any]) -> None:
    gr.Markdown("Every model this server knows. **Lab models** are stored in the data folder with their "
                "training recipe and test AP; built-in and Hub models cannot be renamed or deleted here. "
                "Device: " + ("GPU (CUDA)" if models_cache.use_gpu() else "CPU") + ".")
    table = gr.Dataframe(registry_table(), interactive=False, elem_id="models-table", max_height=360,
                         label="Model registry")
    refresh = gr.Button("Refresh", size="sm", elem_id="models-refresh")
    msg = gr.Markdown("", elem_id="models-msg")
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Accordion("Upload a model file", open=True):
                up_file = gr.File(label="Checkpoint (Cellpose-SAM, a Cellpose 1-3 model such as a lab's cyto3 "
                                        "fine-tune, or lite)", type="filepath",
                                  elem_id="models-upload", height=120)
                up_name = gr.Textbox(label="Name for it", placeholder="e.g. nuclei_lab_v2")
                up_btn = gr.Button("Add to lab models", size="sm")
            with gr.Accordion("Fetch from the HuggingFace Hub", open=False):
                hub_repo = gr.Textbox(label="Repository id", placeholder="owner/repo")
                hub_file = gr.Textbox(label="File name in the repository", placeholder="e.g. cpsam")
                hub_name = gr.Textbox(label="Name here (optional)")
                hub_btn = gr.Button("Fetch", size="sm")
        with gr.Column():
            with gr.Accordion("Manage a lab model", open=True):
                sel = gr.Dropdown(lab_names(), label="Lab model", allow_custom_value=False, elem_id="models-sel")
                with gr.Row():
                    dl_btn = gr.Button("Download", size="sm")
                    del_btn = gr.Button("Delete", variant="stop", size="sm")
                dl_file = gr.File(label="Model file", interactive=False, height=90)
                with gr.Row():
                    new_name = gr.Textbox(label="Rename to")
                    ren_btn = gr.Button("Rename", size="sm")
            with gr.Accordion("Push to the Hub", open=False):
                push_repo = gr.Textbox(label="Repository id", placeholder="your-lab/cellpose-models")
                push_token = gr.Textbox(label="Hub token (write access; not stored)", type="password")
                push_btn = gr.Button("Push", size="sm")

    dds = list(ctx["model_dropdowns"])

    def refreshed(message: str = ""):
        names, default = common.model_choices()
        return (registry_table(), gr.update(choices=lab_names(), value=None), message,
                *[gr.update(choices=names) for _ in dds])

    outs = [table, sel, msg, *dds]
    refresh.click(lambda: refreshed(), None, outs, api_visibility="private")
    ctx["refreshers"].append((lambda: (registry_table(), gr.update(choices=lab_names())), [table, sel]))

    @W.user_errors(outputs=len(outs))
    def on_upload(path, name):
        if not path:
            raise CellposeWebError("Choose a model file to upload first.")
        if not name:
            raise CellposeWebError("Give the uploaded model a name.")
        info = lab_models.add_uploaded(path, name)
        kind = lab_models.ARCH_NAMES.get(info.arch, info.arch)
        return refreshed(f"Added **{info.name}** ({kind}, for {info.purpose or 'unknown use'}; sha256 "
                         f"{W.short_sha(info.sha256)}).")

    up_btn.click(on_upload, [up_file, up_name], outs, api_visibility="private")

    @W.user_errors(outputs=len(outs))
    def on_fetch(repo, fname, name, progress=gr.Progress()):
        if not repo or not fname:
            raise CellposeWebError("Enter the repository id (owner/repo) and the file name.")
        progress(0.1, desc=f"Downloading {repo}/{fname}")
        info = lab_models.fetch_from_hub(repo, fname, name)
        return refreshed(f"Fetched **{info.name}** from {repo}.")

    hub_btn.click(on_fetch, [hub_repo, hub_file, hub_name], outs, api_visibility="private")

    @W.user_errors(outputs=1)
    def on_download(name):
        if not name:
            raise CellposeWebError("Choose a lab model first.")
        return lab_models.copy_for_download(name)

    dl_btn.click(on_download, [sel], [dl_file], api_visibility="private")

    @W.user_errors(outputs=len(outs))
    def on_delete(name):
        if not name:
            raise CellposeWebError("Choose a lab model first.")
        lab_models.delete(name)
        return refreshed(f"Deleted **{name}**.")

    del_btn.click(on_delete, [sel], outs, api_visibility="private")

    @W.user_errors(outputs=len(outs))
    def on_rename(name, new):
        if not name or not new:
            raise CellposeWebError("Choose a lab model and type the new name.")
        info = lab_models.rename(name, new)
        return refreshed(f"Renamed **{name}** to **{info.name}**.")

    ren_btn.click(on_rename, [sel, new_name], outs, api_visibility="private")

    @W.user_errors(outputs=len(outs))
    def on_push(name, repo, token):
        if not name or not repo:
            raise CellposeWebError("Choose a lab model and enter the Hub repository id.")
        url = lab_models.push_to_hub(name, repo, token)
        return refreshed(f"Pushed **{name}** to {url or repo}.")

    push_btn.click(on_push, [sel, push_repo, push_token], outs, api_visibility="private")
