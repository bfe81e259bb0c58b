"""The Gradio app at the level of its callbacks and of its API (gradio_client on a launched app).

A stand-in model (threshold + connected components) keeps these fast; the browser tests in
tests/e2e/ drive the real engine.
"""
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi

from cellpose_web.errors import CellposeWebError

import standin

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "u2os_nuclei.tif"
EXAMPLE_CELLS = int(standin.threshold_labels(tifffile.imread(EXAMPLE)).max())  # what the stand-in finds


@pytest.fixture
def fake_model(monkeypatch):
    return standin.install(monkeypatch)


def test_segment_tab_functions(fake_model):
    from cellpose_web.ui.tabs import segment as segment_tab
    from cellpose_web.ui import widgets as W
    with pytest.raises(CellposeWebError, match="No image"):
        segment_tab.load_image(None, None)
    s, ca, za = segment_tab.load_image(str(EXAMPLE), None)
    assert s.image.shape == (256, 256, 1) and not s.is_stack and ca is None
    with pytest.raises(CellposeWebError):
        segment_tab.run_segmentation(None, "thresh", segment_tab.make_params(None, 0.4, 0, 0, 15, "auto", "auto", "",
                                                                            1, 99, False, None, 0), None, None)
    params = segment_tab.make_params(None, 0.4, 0, 0, 15, "auto", "auto", "", 1, 99, False, None, 0)
    out = segment_tab.run_segmentation(s, "thresh", params, 0.65, segment_tab.make_puncta(True, 0, 1, 3, 0.2))
    n = len(np.unique(out.masks)) - 1
    assert n == EXAMPLE_CELLS > 3 and len(out.table) == n
    assert out.provenance["model"]["sha256"] == standin.SHA256 and out.provenance["pixel_size_um"] == 0.65
    names = {Path(f).name for f in out.files}
    assert {"u2os_nuclei_cp_masks.tif", "u2os_nuclei_cp_masks.png", "u2os_nuclei_seg.npy",
            "u2os_nuclei_cp_outlines.txt", "u2os_nuclei_cells.csv"} <= names
    saved = tifffile.imread(next(f for f in out.files if f.endswith("_cp_masks.tif")))
    assert (saved == out.masks).all()
    md = segment_tab.summary_md(out)
    assert f"{n} cells" in md and "µm²" in md and "sha256" in md
    assert "diameter estimated at 17 px; a second pass ran zoomed 1.76x" in md  # the stand-in's estimate
    img = segment_tab.render(out, [W.OVERLAY_MASKS, W.OVERLAY_OUTLINES], W.BG_IMAGE, 0)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    for bg in (W.BG_FLOWS, W.BG_CELLPROB):
        assert segment_tab.render(out, [], bg, 0).shape == (512, 512, 3)
    from cellpose_web.ui.results_view import histogram
    h, title = histogram(out)
    assert h["count"].sum() == n and title == "cell area (µm²)"


def test_correct_tab_edit_and_save(fake_model):
    from cellpose_web.workflows import finetune as training
    from cellpose_web.ui.tabs import correct as C, segment as segment_tab
    s, _, _ = segment_tab.load_image(str(EXAMPLE), None)
    s = segment_tab.run_segmentation(s, "thresh", segment_tab.make_params(None, 0.4, 0, 0, 15, "auto", "auto", "",
                                                                          1, 99, False, None, 0), None, None)
    st, pay = C.apply_op(s, None, {"op": "load"})
    assert pay["kind"] == "full" and pay["image"].startswith("data:image/png;base64,")
    n0 = int(s.masks.max())
    assert C.status(st).startswith(f"**{n0} cells**")
    st, pay = C.apply_op(s, st, {"op": "delete", "labels": [1]})
    assert pay["kind"] == "patch" and st.editor.n_cells == n0 - 1 and pay["select"] == []
    bg = np.argwhere(ndi.binary_erosion(st.editor.masks == 0, iterations=12))
    cy, cx = (int(v) for v in bg[len(bg) // 2])
    square = [[cy - 8, cx - 8], [cy - 8, cx + 8], [cy + 8, cx + 8], [cy + 8, cx - 8]]
    st, pay = C.apply_op(s, st, {"op": "outline", "z": 0, "points": square})
    lab = int(st.editor.masks[cy, cx])
    assert lab > n0 and pay["select"] == [lab] and pay["labels"]["h"] >= 17
    # the patch is exactly the changed box of labels
    import base64
    import zlib
    box = np.frombuffer(zlib.decompress(base64.b64decode(pay["labels"]["data"])), "<u4").reshape(
        pay["labels"]["h"], pay["labels"]["w"])
    y0, x0 = pay["labels"]["y0"], pay["labels"]["x0"]
    assert (box == st.editor.masks[y0:y0 + box.shape[0], x0:x0 + box.shape[1]]).all()
    st, pay = C.apply_op(s, st, {"op": "undo"})
    assert st.editor.masks[cy, cx] == 0 and "1 edit" in C.status(st)
    st, pay = C.apply_op(s, st, {"op": "redo"})
    assert "2 edits" in C.status(st)
    st, pay = C.apply_op(s, st, {"op": "erase", "z": 0, "points": [[5, 5]], "radius": 0.1})
    assert pay["kind"] == "error" and "radius" in pay["message"] and "2 edits" in C.status(st)
    saved = C.save(s, st)
    m = tifffile.imread(next(f for f in saved.files if f.endswith("_cp_masks.tif")))
    assert m[cy, cx] > 0 and m.max() == n0 and len(np.unique(m)) == n0 + 1
    assert saved.provenance["edited"]["manual_edits"] == 2
    msg = C.add_to_training_set(saved, st, "lab")
    assert "Added" in msg and training.list_sets()[0]["n_images"] == 1


def test_correct_save_refreshes_the_segment_tab(fake_model):
    """Issue 21 item 7: after Save in the Correct tab the Segment tab's view, count, table, histogram,
    downloads and provenance show the saved masks (an event chained on the save, on success)."""
    from cellpose_web.ui.tabs import correct as C, segment as segment_tab
    from cellpose_web.ui import widgets as W
    from cellpose_web.ui.app import build_app
    demo = build_app()
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    save = next(f for f in demo.fns.values() if (by_id["cor-save"]._id, "click") in f.targets)
    after = [f for f in demo.fns.values() if f.trigger_after == save._id and f.trigger_only_on_success]
    assert len(after) == 1
    refresh = after[0]
    assert [o.elem_id for o in refresh.outputs] == list(C.SEGMENT_REFRESH_OUTPUTS)
    assert refresh.inputs[0] is demo._cpw_ctx["session"]
    assert [i.elem_id for i in refresh.inputs[1:]] == list(C.SEGMENT_REFRESH_INPUTS)
    # what it shows: the saved masks (one cell more), not the segmentation's
    s, _, _ = segment_tab.load_image(str(EXAMPLE), None)
    s = segment_tab.run_segmentation(s, "thresh", segment_tab.make_params(None, 0.4, 0, 0, 15, "auto", "auto", "",
                                                                          1, 99, False, None, 0), None, None)
    n0 = len(s.table)
    st = C.enter(s, None)
    bg = np.argwhere(ndi.binary_erosion(st.editor.masks == 0, iterations=12))
    cy, cx = (int(v) for v in bg[len(bg) // 2])
    st, _ = C.apply_op(s, st, {"op": "outline", "z": 0, "points": [[cy - 8, cx - 8], [cy - 8, cx + 8],
                                                                    [cy + 8, cx + 8], [cy + 8, cx - 8]]})
    saved = C.save(s, st)
    view, count, table, hist, files, prov, _ = refresh.fn(saved, [W.OVERLAY_MASKS], W.BG_IMAGE, 0)
    assert f"{n0 + 1} cells" in count and len(table) == n0 + 1 and prov["edited"]["manual_edits"] == 1
    m = tifffile.imread(next(f for f in files if f.endswith("_cp_masks.tif")))
    assert m.max() == n0 + 1 and m[cy, cx] > 0
    assert np.array_equal(view, segment_tab.render(saved, [W.OVERLAY_MASKS], W.BG_IMAGE, 0))
    assert not np.array_equal(view, segment_tab.render(s, [W.OVERLAY_MASKS], W.BG_IMAGE, 0))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gradio_client_segment_api(fake_model, tmp_path):
    from gradio_client import Client, handle_file

    from cellpose_web.ui.app import build_app, launch_kwargs
    demo = build_app()
    port = _free_port()
    kw = launch_kwargs()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **kw)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        masks_path, csv_path, n, prov = client.predict(handle_file(str(EXAMPLE)), "thresh", None, 0.4, 0.0, 0.5,
                                                       api_name="/segment")
        masks = tifffile.imread(masks_path)
        assert n == len(np.unique(masks)) - 1 == EXAMPLE_CELLS
        df = pd.read_csv(csv_path, comment="#")
        assert len(df) == n and np.allclose(df.area_um2, df.area_px * 0.25)
        assert prov["model"]["sha256"] == standin.SHA256
        # a bad file gives a readable error and the server keeps serving
        bad = tmp_path / "bad.tif"
        bad.write_bytes(b"not a tiff at all")
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(bad)), "thresh", None, 0.4, 0.0, None, api_name="/segment")
        assert "Traceback" not in str(e.value)
        _, _, n2, _ = client.predict(image=handle_file(str(EXAMPLE)), model="thresh", diameter_px=None,
                                     flow_threshold=0.4, cellprob_threshold=0.0, pixel_size_um=None,
                                     api_name="/segment")
        assert n2 == n
        # channels by purpose through the API: segment on file channel 0, puncta counted on it too
        _, csv3, n3, prov3 = client.predict(image=handle_file(str(EXAMPLE)), model="thresh", diameter_px=None,
                                            flow_threshold=0.4, cellprob_threshold=0.0, pixel_size_um=0.5,
                                            segment_channels="0", puncta_channel=0, api_name="/segment")
        cells = pd.read_csv(csv3, comment="#")
        assert n3 == n and "puncta_count" in cells and prov3["channels"]["segment"] == [0]
        assert prov3["puncta"]["channel"] == 0
    finally:
        demo.close()


def test_auth_helpers(tmp_path):
    from cellpose_web.ui.app import hash_password, make_auth, verify_password
    h = hash_password("s3cret")
    assert verify_password("s3cret", h) and not verify_password("wrong", h)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": h}))
    check = make_auth("bob:pw", str(users))
    assert check("alice", "s3cret") and check("bob", "pw") and not check("alice", "pw") and not check("eve", "x")
    with pytest.raises(CellposeWebError):
        make_auth("nocolon", None)


@pytest.mark.slow
def test_concurrent_clients_get_their_own_masks(fake_model, tmp_path):
    """Several gradio_client clients at once: every request succeeds and returns the masks of its image."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    from cellpose_web.ui.app import build_app
    demo = build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        base = tifffile.imread(EXAMPLE)
        paths, expected = [], []
        for i in range(8):
            img = np.rot90(base, i % 4)[: 200 + 7 * i, : 180 + 5 * i].copy()
            p = tmp_path / f"img{i}.tif"
            tifffile.imwrite(p, img)
            paths.append(p)
            expected.append(standin.threshold_labels(img))

        def one(i):
            c = Client(f"http://127.0.0.1:{port}/", verbose=False)
            masks_path, _, n, prov = c.predict(handle_file(str(paths[i])), "thresh", None, 0.4, 0.0, None,
                                               api_name="/segment")
            return i, tifffile.imread(masks_path), n, prov

        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(one, range(8)))
        for i, masks, n, prov in results:
            assert prov["image"] == f"img{i}.tif"
            assert masks.shape == expected[i].shape
            # same partition as the direct call (labels may be renumbered)
            assert n == len(np.unique(expected[i])) - 1
            assert ((masks > 0) == (expected[i] > 0)).all()
    finally:
        demo.close()


def test_stack_plane_by_plane_and_render(fake_model, tmp_path):
    from cellpose_web.ui.tabs import segment as segment_tab
    from cellpose_web.ui import widgets as W
    stack = np.stack([np.roll(tifffile.imread(EXAMPLE)[:96, :96], 5 * z, axis=1) for z in range(5)])
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, stack, imagej=True, metadata={"axes": "ZYX"})
    s, ca, za = segment_tab.load_image(str(p), None)
    assert s.is_stack and s.image.shape == (5, 96, 96, 1)
    out = segment_tab.run_segmentation(s, "thresh", segment_tab.make_params(
        None, 0.4, 0, 0, 15, "auto", "auto", "", 1, 99, False, None, 0), None, None)
    assert out.masks.shape == (5, 96, 96) and "volume_px" in out.table
    md = segment_tab.summary_md(out)  # plane-by-plane masks are areas, not volumes
    assert "Z planes" in md and "px per plane" in md and "voxels" not in md
    assert segment_tab.render(out, [W.OVERLAY_MASKS], W.BG_IMAGE, 3).shape[-1] == 3
    from cellpose_web.ui.tabs import correct as C
    st, pay = C.apply_op(out, None, {"op": "plane", "z": 3})
    st, pay = C.apply_op(out, st, {"op": "plane", "z": 3})
    assert pay["kind"] == "full" and pay["nz"] == 5 and pay["z"] == 3 and "plane 4/5" in C.status(st)
    st, pay = C.apply_op(out, st, {"op": "brush", "z": 3, "points": [[2, 2], [2, 40]], "radius": 2, "label": 0})
    lab = pay["select"][0]
    row, old = st.editor.masks[3, 2, 2:41], out.masks[3, 2, 2:41]
    assert lab > out.masks.max() and ((row == lab) | (row == old)).all() and (row == lab).sum() >= 8
    assert (st.editor.masks[[0, 1, 2, 4]] == out.masks[[0, 1, 2, 4]]).all()   # other planes untouched
    st, pay = C.apply_op(out, st, {"op": "plane", "z": 0})
    st, pay = C.apply_op(out, st, {"op": "undo"})                     # undo of plane 3 shows plane 3
    assert pay["kind"] == "full" and pay["z"] == 3 and (st.editor.masks == out.masks).all()
    saved = C.save(out, st)
    assert saved.masks.shape == (5, 96, 96)


def test_correct_brush_erase_merge(fake_model):
    from cellpose_web.ui.tabs import correct as C, segment as segment_tab
    s, _, _ = segment_tab.load_image(str(EXAMPLE), None)
    s = segment_tab.run_segmentation(s, "thresh", segment_tab.make_params(
        None, 0.4, 0, 0, 15, "auto", "auto", "", 1, 99, False, None, 0), None, None)
    st, _ = C.apply_op(s, None, {"op": "load"})
    m0 = st.editor.masks.copy()
    bg = np.argwhere(ndi.binary_erosion(m0 == 0, iterations=8))
    y, x = (int(v) for v in bg[len(bg) // 3])
    st, pay = C.apply_op(s, st, {"op": "brush", "z": 0, "points": [[y, x]], "radius": 4, "label": 0})
    new = int(st.editor.masks[y, x])
    assert new == m0.max() + 1 and pay["select"] == [new]
    st, pay = C.apply_op(s, st, {"op": "brush", "z": 0, "points": [[y, x], [y, x + 3]], "radius": 4, "label": new})
    assert st.editor.masks[y, x + 6] == new
    st, _ = C.apply_op(s, st, {"op": "erase", "z": 0, "points": [[y, x]], "radius": 2})
    assert st.editor.masks[y, x] == 0
    n_before = st.editor.n_cells
    st, pay = C.apply_op(s, st, {"op": "merge", "z": 0, "labels": [1, 2]})
    assert st.editor.n_cells == n_before - 1 and pay["select"] == [1]
    st, _ = C.apply_op(s, st, {"op": "undo"})
    assert st.editor.n_cells == n_before and "3 edits" in C.status(st)



def test_load_existing_masks(fake_model, tmp_path, data_dir):
    from cellpose_web.ui.tabs import segment as segment_tab
    img = tifffile.imread(data_dir / "nuclei_2d/val/2022-10-14-U2OS-1.tif")[:128, :128]
    m = tifffile.imread(data_dir / "nuclei_2d/val/2022-10-14-U2OS-1_masks.tif")[:128, :128]
    tifffile.imwrite(tmp_path / "x.tif", img)
    tifffile.imwrite(tmp_path / "x_masks.tif", m)
    s, _, _ = segment_tab.load_image(str(tmp_path / "x.tif"), None)
    out = segment_tab.load_masks(str(tmp_path / "x_masks.tif"), s)
    assert (out.masks == m).all() and len(out.table) == len(np.unique(m)) - 1
    assert "x_masks.tif" in segment_tab.summary_md(out)
    seg = next(f for f in out.files if f.endswith("_seg.npy"))
    again = segment_tab.load_masks(seg, s)  # a _seg.npy written by the app loads back
    assert (again.masks == m).all()
    tifffile.imwrite(tmp_path / "wrong.tif", m[:64])
    with pytest.raises(CellposeWebError, match="shape"):
        segment_tab.load_masks(str(tmp_path / "wrong.tif"), s)


def test_correct_tab_refuses_malformed_operations(fake_model):
    from cellpose_web.ui.tabs import correct as C, segment as segment_tab
    s, _, _ = segment_tab.load_image(str(EXAMPLE), None)
    st, pay = C.apply_op(s, None, {"op": "load"})                     # image only, no masks yet: draw from scratch
    assert pay["kind"] == "full" and st.editor.n_cells == 0
    for op in ({"op": "outline", "z": 0, "points": "x"}, {"op": "brush", "z": 0, "points": [[1, "a"]], "radius": 3},
               {"op": "outline", "z": 0, "points": [[1, 1], [2, float("nan")], [5, 5]]},
               {"op": "brush", "z": 0, "points": [[3, 3]], "radius": 1e9}, {"op": "delete", "labels": [7]},
               {"op": "merge", "labels": ["a", 2]}, {"op": "add", "z": 0, "y": 5, "x": 5},
               {"op": "outline", "z": 4, "points": [[1, 1], [1, 9], [9, 9]]}, {"op": "undo"}, {"op": "rm -rf"}):
        st, pay = C.apply_op(s, st, op)
        assert pay["kind"] == "error" and pay["message"], op
    assert st.editor.n_edits == 0 and st.editor.n_cells == 0


def test_summary_asks_for_the_pixel_size_only_when_it_is_unknown():
    """A result with no cells on an image whose file gives the pixel size must not ask for it."""
    from cellpose_web import measure
    from cellpose_web.ui import common
    from cellpose_web.ui.tabs import segment as segment_tab
    masks = np.zeros((32, 32), np.uint16)
    for px in (0.1, None):
        s = common.Session(name="a.tif", pixel_size_um=px, image=np.zeros((32, 32, 1)), masks=masks,
                           table=measure.cell_table(masks, np.zeros((32, 32, 1)), px, channel_axis=-1))
        asks = "enter the pixel size" in segment_tab.summary_md(s)
        assert asks == (px is None)


def test_pixel_size_box_reads_a_decimal_comma():
    """The box is text: a browser number box turned '0,1' into '01' (1 µm/px: areas 100x, densities
    1/100) without a word."""
    from cellpose_web.ui import common

    assert common.parse_pixel_size("0,1") == 0.1 and common.parse_pixel_size(" 0.65 ") == 0.65
    assert common.parse_pixel_size("") is None and common.parse_pixel_size("0") is None
    assert common.parse_pixel_size(0.2) == 0.2 and common.parse_pixel_size(None) is None
    with pytest.raises(CellposeWebError, match="e.g. 0.65"):
        common.parse_pixel_size("0.1 µm")
    with pytest.raises(CellposeWebError, match="between 0 and 1000"):
        common.parse_pixel_size("-0,5")


def test_hitl_status_keeps_naming_the_model_of_the_image_on_screen():
    """The panel's refresh while a round learns kept dropping 'This image was segmented by round N'."""
    from cellpose_web.ui import common, learn_panel

    prev = common.Session(name="0001_a", provenance={"model": {"name": "p-round001"},
                                                      "hitl": {"project": "p", "index": 1, "round": 1}})
    status = {"name": "p", "rounds": [{"round": 0, "n_cells": 0}, {"round": 1, "n_cells": 42}]}
    assert learn_panel.shown_model(prev, status) == {"round": 1, "name": "p-round001", "n_cells": 42}
    assert learn_panel.shown_model(prev, {**status, "name": "other"}) is None
    assert learn_panel.shown_model(None, status) is None
