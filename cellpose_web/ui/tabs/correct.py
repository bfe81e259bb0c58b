"""Correct tab: a drawing surface (``#correct-canvas``) for outline, brush, eraser, click-to-add,
select, delete, merge and undo/redo of whole strokes, plane by plane for z-stacks; save; add to a
training set.

The browser draws strokes and overlays itself (cellpose_web.ui.correct_canvas) and sends one
operation per stroke; every edit is done by cellpose_web.edit.MaskEditor, and only the changed box
of labels goes back to the browser.
"""
from __future__ import annotations

import base64
import io as _bytes_io
import json
import zlib
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from cellpose_web.workflows import CellposeWebError, results
from cellpose_web.workflows import display as render
from cellpose_web.workflows.results import edit
from cellpose_web.service import runs
from cellpose_web.ui import common, correct_canvas, learn_panel, results_view, widgets as W

HELP = """**Draw** on the image: pick a tool above it.
- **Outline**: press, draw around the cell, release: a new cell (background pixels only, so cells never overlap).
- **Brush**: paint with the radius; a stroke touching the selected cell extends it, any other stroke starts
  a new cell. **Eraser**: clears cell pixels.
- **Click to add**: one click on a missed cell grows it from the network's flows (needs a segmentation from this app).
- **Select**: click a cell; **Shift+click** a second one to merge. **Ctrl+click** deletes a cell (any tool).
- **Zoom** with the wheel or the buttons; **pan** by dragging with the right mouse button (or any drag with *Select*).

Keys: **X** masks, **Z** outlines, **Ctrl+Z / Ctrl+Y** undo / redo, **Delete** selected cell, **Ctrl+S** save,
**↑/↓** or **PgUp/PgDn** z-planes, **+ / − / 0 / 1** zoom in / out / fit / 1:1."""

NO_MASKS = ("No masks loaded — segment an image in the Segment tab (or load existing masks there), then come "
            "back here to correct them.")


@dataclass
class CorrectState:
    """The Correct tab's server side for one browser tab."""
    editor: edit.MaskEditor | None = None
    version: int = -1
    z: int = 0
    serial: int = 0
    needs_full: bool = False  # the browser has not got these masks yet (e.g. restored after a page reload)

    @property
    def nbytes(self) -> int:
        """Memory of the masks and their undo history, roughly (for the run registry's bounds)."""
        return 0 if self.editor is None else 3 * int(self.editor.masks.nbytes)


# ------------------------------------------------------------------ state and payloads
def edits_belong_to(s: common.Session | None, st: CorrectState | None) -> bool:
    """Whether the Correct tab's editor holds edits of the session's masks (same result, same shape)."""
    return (s is not None and st is not None and st.editor is not None and s.image is not None
            and st.version == s.version and tuple(st.editor.masks.shape) == tuple(s.image.shape[:-1]))


def enter(s: common.Session | None, st: CorrectState | None) -> CorrectState:
    """The editor for the session's current masks (a new one when the session has new masks)."""
    st = st if isinstance(st, CorrectState) else CorrectState()
    if s is None or s.image is None:
        return CorrectState(serial=st.serial)
    if st.version != s.version or st.editor is None:
        shape = s.image.shape[:-1]
        m = s.masks if s.masks is not None else np.zeros(shape, np.uint16)
        st = CorrectState(edit.MaskEditor(np.asarray(m)), s.version, 0, st.serial, needs_full=True)
    return st


def _display(s: common.Session, st: CorrectState) -> np.ndarray:
    """The current plane as shown (Y, X, 3) uint8, contrast-stretched like the Segment tab's view."""
    return W.to_display_rgb(common.plane(s.image, st.z, s.is_stack))


def _labels_blob(labels: np.ndarray, y0: int, x0: int) -> dict[str, Any]:
    data = zlib.compress(np.ascontiguousarray(labels, dtype="<u4").tobytes(), 1)
    return {"y0": int(y0), "x0": int(x0), "h": int(labels.shape[0]), "w": int(labels.shape[1]),
            "data": base64.b64encode(data).decode("ascii")}


def _png_data_url(rgb: np.ndarray) -> str:
    from PIL import Image
    gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    buf = _bytes_io.BytesIO()
    Image.fromarray(rgb[..., 0] if gray else rgb).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _payload(st: CorrectState, kind: str, **extra: Any) -> dict[str, Any]:
    st.serial += 1
    return {"serial": st.serial, "kind": kind, **extra}


def full_payload(s: common.Session, st: CorrectState, message: str = "") -> dict[str, Any]:
    """The whole current plane: image (PNG data URL) and labels."""
    if st.editor is None:
        return _payload(st, "error", message=NO_MASKS)
    plane = st.editor.plane(st.z)
    return _payload(st, "full", W=int(plane.shape[1]), H=int(plane.shape[0]), nz=st.editor.n_planes, z=st.z,
                    image=_png_data_url(_display(s, st)), labels=_labels_blob(plane, 0, 0), message=message,
                    colors=_colors(int(st.editor.masks.max(initial=0))), outline=list(render.OUTLINE_RGB))


def _colors(n_labels: int) -> str:
    """render.label_colors for labels 0..max(2n, 1024) (row 0 black), base64 RGB bytes: the canvas paints
    with the same colours as the Segment view and the saved files."""
    table = np.vstack([np.zeros((1, 3), np.uint8), render.label_colors(max(2 * n_labels, 1024))])
    return base64.b64encode(table.tobytes()).decode("ascii")


def _change_payload(s: common.Session, st: CorrectState, ch: edit.Change, select: bool,
                    message: str = "") -> dict[str, Any]:
    sel = [ch.label] if select and ch.label else None
    if not ch.z0 <= st.z < ch.z1:  # e.g. undo of an edit on another plane: show that plane
        st.z = ch.z0
        return {**full_payload(s, st, message), "select": sel}
    box = st.editor.plane(st.z)[ch.y0:ch.y1, ch.x0:ch.x1]
    return _payload(st, "patch", z=st.z, labels=_labels_blob(box, ch.y0, ch.x0), select=sel, message=message)


def _plane_flows(s: common.Session, z: int) -> tuple[np.ndarray, np.ndarray]:
    """(dP (2, Y, X), cellprob (Y, X)) of plane z from the session's segmentation."""
    if s.dP is None or s.cellprob is None:
        raise CellposeWebError("Click to add needs the network's flows: segment the image in the Segment tab "
                               "(masks loaded from a file have none). Draw the cell with Outline or Brush instead.")
    dP, cp = np.asarray(s.dP), np.asarray(s.cellprob)
    if not s.is_stack:
        return dP[-2:], cp
    return dP[-2:, z], cp[z]  # (2, Z, Y, X) plane by plane or (3, Z, Y, X) in 3D: the Y, X components


def _points(op: dict[str, Any]) -> list:
    pts = op.get("points")
    if not isinstance(pts, list) or len(pts) > 200_000:
        raise CellposeWebError("A stroke arrived without its points; draw it again.")
    return pts


def apply_op(s: common.Session | None, st: CorrectState | None, op: dict[str, Any]) -> tuple[CorrectState, dict]:
    """Do one operation from the drawing surface (see cellpose_web.ui.correct_canvas) and return the
    new state and the payload for the browser. A user error gives an "error" payload (nothing changed)."""
    st0 = st
    st = enter(s, st)
    if st.editor is None:
        return st, _payload(st, "error", message=NO_MASKS)
    kind = str(op.get("op", ""))
    if st is not st0 or kind in ("load", "noop"):  # new masks since the browser last saw them
        return st, full_payload(s, st)
    ed = st.editor
    try:
        if kind == "plane":
            st.z = int(np.clip(int(op.get("z", 0)), 0, ed.n_planes - 1))
            return st, full_payload(s, st)
        z = int(op.get("z", st.z))
        if z != st.z:
            raise CellposeWebError("That stroke was drawn on another plane; draw it again on this one.")
        if kind == "outline":
            return st, _change_payload(s, st, ed.outline(_points(op), z=z), True)
        if kind == "brush":
            return st, _change_payload(s, st, ed.brush(_points(op), op.get("radius", 5), z=z,
                                                    label=int(op.get("label") or 0)), True)
        if kind == "erase":
            return st, _change_payload(s, st, ed.erase(_points(op), op.get("radius", 5), z=z), False)
        if kind == "add":
            dP, cp = _plane_flows(s, z)
            return st, _change_payload(s, st, ed.add_from_flows(dP, cp, float(op["y"]), float(op["x"]), z=z), True)
        if kind == "delete":
            labels = [int(v) for v in op.get("labels") or []]
            return st, {**_change_payload(s, st, ed.delete(labels), False), "select": []}
        if kind == "merge":
            a, b = (int(v) for v in (op.get("labels") or [0, 0])[:2])
            return st, _change_payload(s, st, ed.merge(a, b, z=z), True)
        if kind == "undo":
            return st, {**_change_payload(s, st, ed.undo(), False, "undone"), "select": []}
        if kind == "redo":
            return st, {**_change_payload(s, st, ed.redo(), False, "redone"), "select": []}
        raise CellposeWebError(f"Unknown operation {kind!r}; reload the page.")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CellposeWebError):
            return st, _payload(st, "error", message=str(e))
        return st, _payload(st, "error", message=f"A malformed operation arrived ({type(e).__name__}); draw again.")


def status(st: CorrectState) -> str:
    """The status line (``#correct-count``): 'N cells · k edits · ...'."""
    ed = st.editor if st is not None else None
    if ed is None:
        return NO_MASKS
    parts = [f"**{W.plural(ed.n_cells, 'cell')}**", W.plural(ed.n_edits, "edit")]
    if ed.n_planes > 1:
        parts.append(f"plane {st.z + 1}/{ed.n_planes}")
    if ed.can_undo or ed.can_redo:
        parts.append("undo" * ed.can_undo + " / " * (ed.can_undo and ed.can_redo) + "redo" * ed.can_redo + " available")
    return " · ".join(parts)


# ------------------------------------------------------------------ save / training set
def save(s: common.Session, st: CorrectState) -> common.Session:
    """Put the edited masks (2D or 3D, labels renumbered 1..N) into the session, re-measure and
    rewrite every download (masks, _seg.npy, outlines, ROIs, CSV)."""
    if s is None or s.image is None or st is None or st.editor is None:
        raise CellposeWebError("Nothing to save: segment or draw cells first.")
    new = common.Session(**{**vars(s)})
    new.masks, new.table, new.puncta, new.provenance = results.save_correction(
        st.editor.masks, new.image, new.pixel_size_um, new.provenance, st.editor.n_edits, new.name)
    results_view.write_files(new)
    new.version = s.version  # same masks as the editor: no reload
    return new


def segment_refresh(s: common.Session, overlays: list[str] | None, background: str | None, z: Any) -> tuple:
    """The Segment tab's result outputs for the session after a save here: (view, count, table,
    histogram, downloads, provenance, stitch offer), so that tab shows and serves the saved masks."""
    if s is None or s.masks is None:
        return tuple(gr.skip() for _ in range(7))
    try:
        z = int(z or 0)
    except (TypeError, ValueError):
        z = 0
    return (results_view.render(s, list(overlays or []), background or W.BG_IMAGE, z), results_view.summary_md(s),
            W.table_for_display(s.table), results_view.histogram_update(s), s.files, s.provenance,
            results_view.stitch_offer(s))


# Segment-tab components segment_refresh fills, by elem_id (see ui.app)
SEGMENT_REFRESH_INPUTS = ("seg-overlays", "seg-background", "seg-z")
SEGMENT_REFRESH_OUTPUTS = ("seg-view", "seg-count", "seg-table", "seg-hist", "seg-files", "seg-prov", "seg-stitch")


def add_to_training_set(s: common.Session, st: CorrectState, set_name: str, user: str | None = None) -> str:
    """Store the image (every channel) + corrected masks in a training set (a z-stack: every plane
    with cells), with the channels it was segmented with: fine-tuning trains on those."""
    if s is None or s.image is None or st is None or st.editor is None:
        raise CellposeWebError("Nothing to add: segment or draw cells first.")
    return results.add_correction_to_training_set(s.image, st.editor.masks, s.stem, s.is_stack, s.provenance,
                                                  st.editor.n_edits, set_name, user)


# ------------------------------------------------------------------ UI
def build(ctx: dict[str, Any]) -> dict[str, Any]:
    session: gr.State = ctx["session"]
    state = gr.State(CorrectState())
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=560):
            count = gr.Markdown(NO_MASKS, elem_id="correct-count")
            gr.HTML(correct_canvas.HTML, elem_id="cor-surface")
        with gr.Column(scale=1, min_width=300):
            gr.Markdown(HELP)
            save_btn = gr.Button("Save corrected masks (Ctrl+S)", variant="primary", elem_id="cor-save")
            files = gr.File(label="Corrected masks and tables", file_count="multiple", interactive=False, height=140,
                            elem_id="cor-files")
            with gr.Group():
                set_name = gr.Textbox("lab", label="Training set name", elem_id="cor-set")
                add_btn = gr.Button("Add to training set", elem_id="cor-add")
            set_msg = gr.Markdown("")
            learn = learn_panel.build(ctx, session, state, lambda s, st: edit.relabel(enter(s, st).editor.masks),
                                      lambda s, st: edits_belong_to(s, st) and bool(st.editor.n_edits))
    # the bridge to the browser script: operations in, payloads out (hidden, but in the page)
    op_box = gr.Textbox("", elem_id="cor-op", elem_classes=["cpw-hidden"], lines=1, max_lines=1, container=False)
    payload = gr.Textbox("", elem_id="cor-payload", elem_classes=["cpw-hidden"], lines=1, max_lines=1,
                         container=False)
    op_btn = gr.Button("apply", elem_id="cor-op-btn", elem_classes=["cpw-hidden"])

    def respond(st: CorrectState, pay: dict):
        if pay.get("kind") == "error" and pay.get("message") and st.editor is not None:
            gr.Warning(pay["message"], title="Please check", duration=8)
        return st, json.dumps(pay), status(st)

    @W.user_errors(outputs=3)
    def on_enter(s, st):
        st2 = enter(s, st)
        if st2.editor is None:
            return st2, json.dumps(_payload(st2, "error", message=NO_MASKS)), NO_MASKS
        if st2 is st and not st.needs_full:  # same masks: the browser still has them
            return st2, gr.skip(), status(st2)
        st2.needs_full = False
        return respond(st2, full_payload(s, st2))

    browser_id = ctx["segment"]["browser_id"]

    def keep_edits(s: common.Session, st: CorrectState, browser: str, request: gr.Request | None) -> None:
        """Attach the edits to this browser's kept result (when they are edits of it), so a page
        reload does not lose them."""
        if st is None or st.editor is None or not st.editor.n_edits:
            return
        owner = runs.owner_key(W.username(request), browser)
        if edits_belong_to(runs.registry().kept(owner), st):
            runs.registry().attach(owner, "correct", st, st.nbytes)

    @W.user_errors(outputs=3)
    def on_op(op_text, s, st, browser, request: gr.Request):
        try:
            op = json.loads(op_text or "{}")
        except json.JSONDecodeError:
            op = {}
        if not isinstance(op, dict):
            op = {}
        try:
            st, pay = apply_op(s, st, op)
        except Exception:  # noqa: BLE001 - the browser must get an answer, or it waits for one
            W.log.exception("Correct tab operation %r failed", op.get("op"))
            st = enter(s, st)
            pay = _payload(st, "error", message="That edit failed on the server; nothing was changed. Try again.")
        keep_edits(s, st, browser, request)
        return respond(st, pay)

    outs = [state, payload, count]
    for ev in learn["events"]:  # a project's next image: the drawing surface shows it
        ev.then(on_enter, [session, state], outs, api_visibility="private", show_progress="hidden")
    op_btn.click(on_op, [op_box, session, state, browser_id], outs, api_visibility="private", show_progress="hidden",
                 js="(op, s, st, b) => [window.cpwCorrect ? window.cpwCorrect.takeOp() : op, s, st, b]")
    payload.change(None, [payload], None, js="(p) => { if (window.cpwCorrect) { window.cpwCorrect.apply(p); } }")

    @W.user_errors(outputs=2)
    def on_save(s, st, browser, request: gr.Request):
        st = enter(s, st)
        new = save(s, st)
        owner = runs.owner_key(W.username(request), browser)
        if runs.registry().kept(owner) is not None:  # a reload reopens the saved masks and the edit history
            runs.registry().keep(owner, new, nbytes=new.nbytes)
            keep_edits(new, st, browser, request)
        gr.Info(f"Saved {len(new.table)} cells; downloads updated (Segment tab too).")
        return new, new.files

    saved = save_btn.click(on_save, [session, state, browser_id], [session, files], api_visibility="private")

    def on_restore(browser, request: gr.Request):
        """Page (re)load: the edits made on this browser's kept result, if any, come back with it."""
        owner = runs.owner_key(W.username(request), browser)
        kept = runs.registry().attached(owner, "correct")
        if not isinstance(kept, CorrectState) or not edits_belong_to(runs.registry().kept(owner), kept):
            return gr.skip()
        kept.needs_full = True
        return kept

    def unsaved_edits(s: common.Session | None, browser: str, request: gr.Request | None) -> bool:
        """Whether this browser's Correct tab holds edits of the result ``s`` that are not saved in it
        (other tabs ask before they replace the result's masks)."""
        kept = runs.registry().attached(runs.owner_key(W.username(request), browser), "correct")
        if not (isinstance(kept, CorrectState) and edits_belong_to(s, kept) and kept.editor.n_edits):
            return False
        return s.masks is None or not np.array_equal(edit.relabel(kept.editor.masks), edit.relabel(np.asarray(s.masks)))

    @W.user_errors(outputs=1)
    def on_add(s, st, name, request: gr.Request):
        return add_to_training_set(s, enter(s, st), name, W.username(request))

    added = add_btn.click(on_add, [session, state, set_name], [set_msg], api_visibility="private")
    return {"state": state, "on_enter": on_enter, "enter_outputs": outs, "added_to_training_set": added,
            "saved": saved, "restore": (on_restore, [browser_id], [state]), "unsaved_edits": unsaved_edits}
