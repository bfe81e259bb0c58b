"""Correct tab: select / delete / draw (outline or brush) / erase / merge masks, undo/redo, save,
add to a training set. All editing is done by cellpose_web.edit (pure numpy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np

from cellpose_web import edit, measure
from cellpose_web.errors import CellposeWebError
from cellpose_web.service import training
from cellpose_web.ui import common, segment_tab, widgets as W

MODE_SELECT = "Select"
MODE_OUTLINE = "Draw outline"
MODE_BRUSH = "Brush"
MODE_ERASE = "Erase"

HELP = ("Click a cell to **select** it (tick *Select two* to pick a second cell for merging). **Draw outline**: "
        "click points around a cell, then *Finish outline*. **Brush** paints a disk (extends the selected "
        "cell, or starts a new one); **Erase** clears a disk. New drawing only takes background pixels, so "
        "masks never overlap. Shortcuts: **Delete** selected, **Ctrl+Z** undo, **Ctrl+Y** redo, "
        "**M** masks, **O** outlines.")


@dataclass
class CorrectState:
    history: edit.EditHistory = field(default_factory=edit.EditHistory)
    selected: list[int] = field(default_factory=list)
    pending: list[tuple[float, float]] = field(default_factory=list)
    version: int = -1
    n_edits: int = 0


def _render(s: common.Session, st: CorrectState, overlays: list[str]) -> np.ndarray | None:
    if s is None or s.image is None or s.is_stack:
        return None
    base = W.to_display_rgb(s.image)
    return W.upscale(W.compose(base, st.history.current, W.OVERLAY_MASKS in (overlays or []),
                               W.OVERLAY_OUTLINES in (overlays or []), selected=st.selected, pending=st.pending))


def _status(st: CorrectState) -> str:
    m = st.history.current
    if m is None:
        return ("No masks loaded — segment an image in the Segment tab (or load existing masks there), "
                "then come back here to correct them.")
    n = int(len(np.unique(m[m > 0]))) if m is not None else 0
    sel = ", ".join(str(x) for x in st.selected) if st.selected else "none"
    pend = f" · outline: {len(st.pending)} point(s)" if st.pending else ""
    return (f"**{W.plural(n, 'cell')}** · selected: {sel}{pend} · edits: {st.n_edits}"
            f"{' · undo available' if st.history.can_undo else ''}")


def enter(s: common.Session, st: CorrectState) -> CorrectState:
    """Load the session's current masks into the editor when they changed."""
    st = st if isinstance(st, CorrectState) else CorrectState()
    if s is None or s.image is None:
        return st
    if st.version != s.version:
        st = CorrectState(version=s.version)
        if s.is_stack:
            st.history.reset(None)
        else:
            m = s.masks if s.masks is not None else np.zeros(s.image.shape[:2], np.uint16)
            st.history.reset(np.asarray(m))
    return st


def _copy(st: CorrectState) -> CorrectState:
    return CorrectState(st.history, list(st.selected), list(st.pending), st.version, st.n_edits)


def _edit(st: CorrectState, new_masks: np.ndarray) -> CorrectState:
    st = _copy(st)
    st.history.push(new_masks)
    st.n_edits += 1
    st.selected = []
    return st


def click(s: common.Session, st: CorrectState, mode: str, radius: float, y: int, x: int,
          multi: bool = False) -> CorrectState:
    if s is None or s.image is None:
        raise CellposeWebError("No image: segment an image in the Segment tab first (or upload one there).")
    if s.is_stack:
        raise CellposeWebError("Correcting works on 2D images; this is a z-stack.")
    m = st.history.current
    if mode == MODE_SELECT:
        lab = edit.label_at(m, y, x)
        st = _copy(st)
        if lab == 0:
            st.selected = []
        elif lab in st.selected:
            st.selected.remove(lab)
        elif multi:
            st.selected = (st.selected + [lab])[-2:]
        else:
            st.selected = [lab]
        return st
    if mode == MODE_OUTLINE:
        st = _copy(st)
        st.pending.append((float(y), float(x)))
        return st
    region = edit.brush_region([(y, x)], float(radius), m.shape)
    if mode == MODE_BRUSH:
        target = st.selected[-1] if st.selected else None
        new, lab = edit.add_mask(m, region, label=target)
        st2 = _edit(st, new)
        st2.selected = [lab]
        return st2
    if mode == MODE_ERASE:
        if not (m[region] > 0).any():
            return st
        return _edit(st, edit.erase(m, region))
    raise CellposeWebError(f"Unknown tool {mode!r}.")


def finish_outline(st: CorrectState, min_pixels: int = 5) -> CorrectState:
    if len(st.pending) < 3:
        raise CellposeWebError("An outline needs at least 3 points: choose 'Draw outline' and click around the cell.")
    m = st.history.current
    region = edit.polygon_region(st.pending, m.shape)
    new, lab = edit.add_mask(m, region, min_pixels=min_pixels)
    st2 = _edit(st, new)
    st2.pending = []
    return st2


def delete_selected(st: CorrectState) -> CorrectState:
    if not st.selected:
        raise CellposeWebError("No cell selected: choose 'Select' and click a cell first.")
    return _edit(st, edit.delete_label(st.history.current, st.selected))


def merge_selected(st: CorrectState) -> CorrectState:
    if len(st.selected) != 2:
        raise CellposeWebError("Select exactly two cells to merge (click one, then the other).")
    return _edit(st, edit.merge_labels(st.history.current, *st.selected))


def undo(st: CorrectState) -> CorrectState:
    st = _copy(st)
    st.history.undo()
    st.selected = []
    return st


def redo(st: CorrectState) -> CorrectState:
    st = _copy(st)
    st.history.redo()
    st.selected = []
    return st


def cancel_outline(st: CorrectState) -> CorrectState:
    st = _copy(st)
    st.pending = []
    return st


def save(s: common.Session, st: CorrectState) -> common.Session:
    """Put the edited masks into the session, re-measure and rewrite every download."""
    if s is None or s.image is None or st.history.current is None:
        raise CellposeWebError("Nothing to save: segment or draw cells first.")
    masks = edit.relabel(st.history.current)
    new = common.Session(**{**vars(s)})
    new.masks = masks
    pp = new.provenance.get("puncta")
    puncta = measure.PunctaParams(**pp) if pp and masks.ndim == 2 else None
    table, pts = measure.measure_cells(masks, new.image, new.pixel_size_um, channel_axis=-1, puncta=puncta)
    new.table, new.puncta = table, pts
    prov = dict(new.provenance) if new.provenance else {"model": {"name": None, "sha256": None}, "eval_params": {}}
    prov["edited"] = {"manual_edits": int(st.n_edits), "note": "masks corrected by hand in the Correct tab"}
    prov.setdefault("image", new.name)
    new.provenance = prov
    segment_tab.write_files(new)
    new.version = s.version  # same masks as the editor: no reload
    return new


def build(ctx: dict[str, Any]) -> dict[str, Any]:
    session: gr.State = ctx["session"]
    state = gr.State(CorrectState())
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=480):
            view = gr.Image(label="Click on the image to edit", type="numpy", interactive=False,
                            elem_id="cor-view", format="png", height=600, buttons=["fullscreen"],
                            placeholder="Segment an image in the Segment tab first; it appears here for "
                                        "correction.")
            status = gr.Markdown("No masks loaded — segment an image in the Segment tab (or load existing masks "
                                 "there), then come back here to correct them.", elem_id="cor-status")
        with gr.Column(scale=1, min_width=300):
            gr.Markdown(HELP)
            mode = gr.Radio([MODE_SELECT, MODE_OUTLINE, MODE_BRUSH, MODE_ERASE], value=MODE_SELECT, label="Tool",
                            elem_id="cor-mode")
            with gr.Row():
                radius = gr.Slider(1, 50, 5, step=1, label="Brush / eraser radius (px)", scale=2)
                multi = gr.Checkbox(False, label="Select two (merge)", scale=1, elem_id="cor-multi")
            overlays = gr.CheckboxGroup([W.OVERLAY_MASKS, W.OVERLAY_OUTLINES],
                                        value=[W.OVERLAY_MASKS, W.OVERLAY_OUTLINES], label="Overlays",
                                        elem_id="cor-overlays")
            with gr.Row():
                finish = gr.Button("Finish outline", variant="primary", elem_id="cor-finish", size="sm")
                cancel = gr.Button("Cancel outline", elem_id="cor-cancel", size="sm")
            with gr.Row():
                delete = gr.Button("Delete selected", variant="stop", elem_id="cor-delete", size="sm")
                merge = gr.Button("Merge 2 selected", elem_id="cor-merge", size="sm")
            with gr.Row():
                undo_btn = gr.Button("Undo", elem_id="cor-undo", size="sm")
                redo_btn = gr.Button("Redo", elem_id="cor-redo", size="sm")
            save_btn = gr.Button("Save corrected masks", variant="primary", elem_id="cor-save")
            files = gr.File(label="Corrected masks and tables", file_count="multiple", interactive=False, height=140,
                            elem_id="cor-files")
            with gr.Group():
                set_name = gr.Textbox("lab", label="Training set name", elem_id="cor-set")
                add_btn = gr.Button("Add to training set", elem_id="cor-add")
            set_msg = gr.Markdown("")

    outs = [state, view, status]

    @W.user_errors(outputs=3)
    def on_enter(s, st):
        st = enter(s, st)
        if s is not None and s.is_stack:
            gr.Warning("Correcting works on 2D images; this image is a z-stack.")
        return st, _render(s, st, [W.OVERLAY_MASKS, W.OVERLAY_OUTLINES]), _status(st)

    @W.user_errors(outputs=3)
    def on_click(s, st, md, r, mu, ov, evt: gr.SelectData):
        st = enter(s, st)
        k = W.display_scale(s.image.shape) if s is not None and s.image is not None else 1
        x, y = int(evt.index[0]) // k, int(evt.index[1]) // k
        st = click(s, st, md, r, y, x, bool(mu))
        return st, _render(s, st, ov), _status(st)

    view.select(on_click, [session, state, mode, radius, multi, overlays], outs, api_visibility="private",
                show_progress="hidden")

    def simple(fn):
        @W.user_errors(outputs=3)
        def handler(s, st, ov):
            st = enter(s, st)
            st = fn(st)
            return st, _render(s, st, ov), _status(st)
        return handler

    for btn, fn in ((finish, finish_outline), (cancel, cancel_outline), (delete, delete_selected),
                    (merge, merge_selected), (undo_btn, undo), (redo_btn, redo)):
        btn.click(simple(fn), [session, state, overlays], outs, api_visibility="private", show_progress="hidden")
    overlays.change(lambda s, st, ov: _render(s, st, ov), [session, state, overlays], [view],
                    api_visibility="private", show_progress="hidden")

    @W.user_errors(outputs=2)
    def on_save(s, st):
        st = enter(s, st)
        new = save(s, st)
        gr.Info(f"Saved {len(new.table)} cells; downloads updated (Segment tab too).")
        return new, new.files

    save_btn.click(on_save, [session, state], [session, files], api_visibility="private")

    @W.user_errors(outputs=1)
    def on_add(s, st, name, request: gr.Request):
        st = enter(s, st)
        if s is None or s.image is None or st.history.current is None:
            raise CellposeWebError("Nothing to add: segment or draw cells first.")
        masks = edit.relabel(st.history.current)
        chans = (s.provenance.get("channels") or {}).get("segment")  # train on what the model saw
        img = s.image[..., chans] if chans else s.image
        d = training.add_pair(name or "lab", img, masks, s.stem, W.username(request),
                              {"edits": st.n_edits, "model": (s.provenance.get("model") or {}).get("name")})
        sets = {x["name"]: x for x in training.list_sets(W.username(request))}
        info = sets.get(d.name, {})
        return (f"Added **{s.stem}** ({int(masks.max())} cells) to training set **{d.name}** — now "
                f"{info.get('n_images', '?')} image(s), {info.get('n_cells', '?')} cells. Use it in the Fine-tune tab.")

    add_btn.click(on_add, [session, state, set_name], [set_msg], api_visibility="private")
    return {"state": state, "on_enter": on_enter, "enter_outputs": outs, "view": view}
