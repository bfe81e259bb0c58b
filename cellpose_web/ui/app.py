"""The Gradio Blocks app (tabs Segment, Correct, Batch, Fine-tune, Models) and its launcher.

``python app.py`` / ``python -m cellpose_web serve`` call :func:`main`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from cellpose_web.service import config
from cellpose_web.service.auth import hash_password, load_users_file, make_auth, verify_password  # noqa: F401
from cellpose_web.workflows import CellposeWebError, startup
from cellpose_web.workflows.startup import examples_dir
from cellpose_web.service.config import Limits, home_dir

log = logging.getLogger("cellpose_web.ui")

TITLE = "Cellpose-web"
HEADER = """<div class="cpw-header">
<h1>Cellpose-web</h1>
<p>Cell and nucleus segmentation with Cellpose 4 (Cellpose-SAM) and lab models: segment, correct, batch,
fine-tune. Results record the model (name + sha256) and every parameter. Based on
<a href="https://www.nature.com/articles/s41592-020-01018-x" target="_blank">Cellpose</a> and
<a href="https://www.biorxiv.org/content/10.1101/2025.04.28.651001" target="_blank">Cellpose-SAM</a>.</p>
</div>"""


def build_app(default_model: str | None = None, limits: Limits | None = None):
    """Build the Blocks app (not launched). `default_model` pre-selects a model (name or path)."""
    import gradio as gr

    from cellpose_web.ui.tabs import batch as batch_tab, correct as correct_tab, finetune as finetune_tab, models as models_tab, segment as segment_tab
    from cellpose_web.ui import common

    if default_model:
        config.set_default_model(default_model)
    limits = limits or Limits.from_env()
    _recover_after_restart()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        from cellpose_web.service import gpu
        from cellpose_web.workflows import model_cache as models_cache
        where = ("ZeroGPU" if gpu.on_zero_gpu() else "GPU (CUDA)" if models_cache.use_gpu()
                 else "CPU — fine for small images; a GPU is much faster for large ones")
        gr.HTML(HEADER.replace("</div>", f"<p class='cpw-small'>Running on: {where}.</p></div>"))
        session = gr.State(common.new_session())
        # outside the tabs: a tab's components mount (and a BrowserState reads the browser's storage)
        # only when the tab is first shown, after the page's load events have run
        hitl_project = gr.BrowserState("", storage_key="cellpose_web_hitl_project")
        ctx: dict[str, Any] = {"session": session, "limits": limits, "model_dropdowns": [],
                               "refreshers": [], "hitl_project": hitl_project}
        with gr.Tabs(elem_id="main-tabs") as tabs:
            ctx["tabs"] = tabs
            with gr.Tab("Segment", id="segment", elem_id="tab-segment"):
                seg = segment_tab.build(ctx)
            ctx["segment"] = seg
            with gr.Tab("Correct", id="correct", elem_id="tab-correct") as correct_tab_el:
                cor = correct_tab.build(ctx)
            ctx["correct"] = cor
            with gr.Tab("Batch", id="batch", elem_id="tab-batch"):
                batch_tab.build(ctx)
            with gr.Tab("Fine-tune", id="finetune", elem_id="tab-finetune"):
                finetune_tab.build(ctx)
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                models_tab.build(ctx)
        correct_tab_el.select(cor["on_enter"], [session, cor["state"]], cor["enter_outputs"],
                              api_visibility="private")
        # a save in the Correct tab: the Segment tab shows, counts and serves the saved masks at once
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        cor["saved"].success(correct_tab.segment_refresh,
                             [session] + [by_id[k] for k in correct_tab.SEGMENT_REFRESH_INPUTS],
                             [by_id[k] for k in correct_tab.SEGMENT_REFRESH_OUTPUTS], api_visibility="private",
                             show_progress="hidden")

        def refresh_models():
            names, default = common.model_choices()
            return [gr.update(choices=names, value=default)
                    for _ in ctx["model_dropdowns"]]

        demo.load(refresh_models, None, ctx["model_dropdowns"], api_visibility="private")
        restore_fn, restore_in, restore_out = seg["restore"]
        demo.load(restore_fn, restore_in, restore_out, api_visibility="private")
        demo.load(*cor["restore"], api_visibility="private")
        demo.unload(seg["unload"])
        for fn, outs in ctx["refreshers"]:
            demo.load(fn, None, outs, api_visibility="private")
            # a pair added in the Correct tab shows in the Fine-tune tab's training sets at once
            cor["added_to_training_set"].success(fn, None, outs, api_visibility="private")
    demo.queue(default_concurrency_limit=4, max_size=200)
    demo._cpw_ctx = ctx  # for tests
    return demo


_recover_after_restart = startup.recover_after_restart


def launch_kwargs() -> dict[str, Any]:
    """theme / css / head (keyboard shortcuts) / allowed paths for Blocks.launch (Gradio 6 style)."""
    from cellpose_web.ui import widgets
    ex = examples_dir()
    allowed = [str(ex)] if ex.is_dir() else []
    return {"theme": widgets.theme(), "css": widgets.CSS, "head": widgets.HEAD, "allowed_paths": allowed,
            "footer_links": ["api"]}


# ------------------------------------------------------------------ accounts (service.auth)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cellpose-web serve", description="Start the Cellpose-web app.")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to listen on (env GRADIO_SERVER_NAME; 0.0.0.0 for a lab server)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                    help="port (env GRADIO_SERVER_PORT)")
    ap.add_argument("--share", action="store_true", help="create a temporary public share link")
    ap.add_argument("--auth", default=None, help="user:password[,user2:pw2] (or env CELLPOSE_WEB_AUTH)")
    ap.add_argument("--auth-file", default=None,
                    help="JSON users file with hashed passwords (or env CELLPOSE_WEB_AUTH_FILE)")
    ap.add_argument("--hash-password", metavar="PASSWORD", default=None,
                    help="print a hashed password for the users file and exit")
    ap.add_argument("--model", default=None, help="model pre-selected in the lists (name or path)")
    ap.add_argument("--max-file-size", default=None, help="largest upload, e.g. 500mb (default from limits)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hash_password is not None:
        print(hash_password(args.hash_password))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        auth = make_auth(args.auth, args.auth_file)
    except CellposeWebError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = Limits.from_env()
    demo = build_app(default_model=args.model, limits=limits)
    log.info("data folder: %s", home_dir())
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                auth_message="Cellpose-web: log in with your lab account." if auth else None,
                max_file_size=args.max_file_size or limits.max_upload_bytes, show_error=False,
                **launch_kwargs())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
