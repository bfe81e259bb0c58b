"""edit.py: mask editing keeps masks non-overlapping and labels consecutive."""
import numpy as np
import pytest

from cellpose_web.engine import edit
from cellpose_web.errors import CellposeWebError


def _masks():
    m = np.zeros((30, 30), np.uint16)
    m[2:8, 2:8] = 1
    m[2:8, 10:16] = 2
    m[20:26, 20:26] = 3
    return m


def test_delete_relabels_consecutively():
    m = _masks()
    out = edit.delete_label(m, 2)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[20:26, 20:26] == 2).all() and (out[2:8, 10:16] == 0).all()
    assert (m == _masks()).all()  # input untouched
    with pytest.raises(CellposeWebError):
        edit.delete_label(m, 0)


def test_polygon_add_never_overlaps():
    m = _masks()
    region = edit.polygon_region([(0, 0), (0, 12), (12, 12), (12, 0)], m.shape)
    out, lab = edit.add_mask(m, region)
    assert lab == 4
    assert (out[2:8, 2:8] == 1).all()           # old cell kept whole
    assert (out[2:8, 10:12] == 2).all()
    assert (out[10, 5] == 4) and (out[0, 0] == 4)
    assert ((out == 4) & (m > 0)).sum() == 0
    with pytest.raises(CellposeWebError):
        edit.add_mask(m, m == 1)                # only covers another cell
    with pytest.raises(CellposeWebError):
        edit.polygon_region([(0, 0), (1, 1)], m.shape)


def test_brush_extend_and_erase():
    m = _masks()
    stroke = edit.brush_region([(15, 2), (15, 8)], 1.5, m.shape)
    assert stroke[15, 5] and not stroke[15, 12]
    out, lab = edit.add_mask(m, stroke, label=1)
    assert lab == 1 and out[15, 5] == 1
    er = edit.erase(m, edit.brush_region([(5, 5)], 2, m.shape), label=1)
    assert er[5, 5] == 0 and er[2, 2] == 1 and er[5, 12] == 2
    gone = edit.erase(m, m == 1)
    assert gone.max() == 2


def test_merge_fills_gap():
    m = _masks()
    out = edit.merge_labels(m, 1, 2)
    assert out.max() == 2
    assert out[5, 9] == 1 and out[5, 12] == 1   # the 2-px gap joined
    assert (out[20:26, 20:26] == 2).all()
    with pytest.raises(CellposeWebError):
        edit.merge_labels(m, 1, 1)


def test_label_at_and_history():
    m = _masks()
    assert edit.label_at(m, 3, 3) == 1 and edit.label_at(m, -1, 3) == 0
    h = edit.MaskEditor(m)
    h.delete(1)
    h.delete(3)
    assert h.n_cells == 1
    h.undo()
    assert h.n_cells == 2
    h.undo()
    assert h.n_cells == 3 and np.array_equal(h.masks, m)
    with pytest.raises(CellposeWebError):
        h.undo()
    h.redo()
    assert h.n_cells == 2
    h.delete(2)
    assert not h.can_redo


def test_editor_outline_brush_erase_undo_redo():
    m = _masks()
    ed = edit.MaskEditor(m)
    ch = ed.outline([(10, 0), (10, 12), (18, 12), (18, 0)])
    assert ch.label == 4 and ed.n_cells == 4 and ed.n_edits == 1
    assert (ch.y0, ch.y1, ch.x0, ch.x1) == (9, 20, 0, 14)
    assert (ed.masks[10:19, 0:13] == 4).all() and (ed.masks[2:8, 2:8] == 1).all()
    before = ed.masks.copy()
    ch = ed.brush([(17, 2), (24, 2), (24, 14)], 1.5, label=4)  # from the selected cell out: extends it, path only
    assert ch.label == 4 and (ed.masks[24, 2:15] == 4).all() and ed.masks[27, 8] == 0
    ch = ed.brush([(28, 0), (28, 10)], 1, label=None)          # starts a new cell
    assert ch.label == 5 and ed.n_cells == 5
    ed.erase([(5, 0), (5, 29)], 1)                              # cuts cells 1 and 2 along the row
    assert (ed.masks[4:7, :] == 0).all() and ed.masks[3, 3] == 1 and ed.n_edits == 4
    with pytest.raises(CellposeWebError):
        ed.erase([(13, 20), (13, 29)], 1)                       # nothing to erase: not recorded
    for _ in range(3):
        ed.undo()
    assert np.array_equal(ed.masks, before) and ed.n_edits == 1
    ed.redo()
    assert ed.masks[24, 8] == 4 and ed.n_edits == 2
    ed.undo()
    ed.undo()
    assert np.array_equal(ed.masks, m) and ed.n_edits == 0 and ed.n_cells == 3
    with pytest.raises(CellposeWebError):
        ed.undo()


def test_brush_away_from_the_new_outline_starts_a_new_cell():
    """Issue 21 item 7: after an Outline the new cell is selected; a Brush stroke elsewhere (the
    browser sends that cell's label) must be a cell of its own, not a detached piece of it."""
    ed = edit.MaskEditor(_masks())
    new = ed.outline([(10, 0), (10, 8), (16, 8), (16, 0)]).label
    area = int((ed.masks == new).sum())
    ch = ed.brush([(12, 20), (12, 26)], 1.5, label=new)       # far from cell `new`
    assert ch.label not in (0, new) and ed.n_cells == 5
    assert int((ed.masks == new).sum()) == area and ed.masks[12, 23] == ch.label
    from scipy import ndimage as ndi
    assert all(ndi.label(ed.masks == lab, structure=np.ones((3, 3)))[1] == 1 for lab in (new, ch.label))
    # a stroke from the selected cell out over background extends it; painted pieces cut off from
    # it by another cell are not added
    ch = ed.brush([(13, 7), (13, 14)], 1, label=new)
    assert ch.label == new and ed.masks[13, 12] == new and ed.n_cells == 5
    assert ndi.label(ed.masks == new, structure=np.ones((3, 3)))[1] == 1
    ed.brush([(5, 8), (5, 18)], 1, label=1)                    # crosses cell 2: beyond it is not cell 1's
    assert ed.masks[5, 8] == 1 and ed.masks[5, 17] == 0
    # undo takes the strokes back one by one, the first stroke's new cell last
    ed.undo(), ed.undo(), ed.undo()
    assert ed.n_cells == 4 and int((ed.masks == new).sum()) == area


def test_editor_delete_merge_and_stack_labels():
    st = np.zeros((3, 20, 20), np.uint16)
    st[0:2, 2:8, 2:8] = 1      # a 3D cell on planes 0-1
    st[1, 2:8, 10:16] = 2
    ed = edit.MaskEditor(st)
    ch = ed.outline([(12, 12), (12, 18), (18, 18), (18, 12)], z=2)
    assert ch.label == 3 and ch.z0 == 2 and ed.masks[2, 15, 15] == 3 and ed.masks[1, 15, 15] == 0
    ed.brush([(5, 5)], 2, z=2, label=1)                        # same 3D cell continued on plane 2
    assert ed.masks[2, 5, 5] == 1
    ch = ed.merge(1, 2, z=1)
    assert ch.label == 1 and (ed.masks[1, 5, 9] == 1) and 2 not in ed.masks and ed.n_cells == 2
    ed.delete([1])
    assert 1 not in ed.masks and ed.n_cells == 1
    ed.undo(), ed.undo()
    assert ed.masks[1, 5, 12] == 2 and ed.n_cells == 3
    assert np.array_equal(edit.relabel(ed.masks)[2], np.where(ed.masks[2] == 3, 3, ed.masks[2]))


def test_cell_from_flows_finds_the_clicked_cell():
    from cellpose_web.engine import dynamics
    truth = np.zeros((60, 70), np.uint16)
    yy, xx = np.mgrid[:60, :70]
    truth[(yy - 20) ** 2 + (xx - 20) ** 2 < 100] = 1
    truth[(yy - 35) ** 2 + ((xx - 45) / 1.5) ** 2 < 110] = 2
    dP = 5 * dynamics.masks_to_flows(truth)
    cellprob = np.where(truth > 0, 3.0, -6.0).astype(np.float32)
    present = np.where(truth == 1, 1, 0).astype(np.uint16)      # cell 2 was missed
    region = edit.cell_from_flows(dP, cellprob, 35, 45, masks=present)
    assert (region & (truth == 2)).sum() / (region | (truth == 2)).sum() > 0.9
    ed = edit.MaskEditor(present)
    ch = ed.add_from_flows(dP, cellprob, 35, 45)
    assert ch.label == 2 and ed.n_cells == 2
    with pytest.raises(CellposeWebError, match="already"):
        edit.cell_from_flows(dP, cellprob, 20, 20, masks=present)
