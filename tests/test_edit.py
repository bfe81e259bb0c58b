"""edit.py: mask editing keeps masks non-overlapping and labels consecutive."""
import numpy as np
import pytest

from cellpose_web import edit
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
    h = edit.EditHistory(m)
    h.push(edit.delete_label(m, 1))
    h.push(edit.delete_label(h.current, 1))
    assert h.current.max() == 1
    assert h.undo().max() == 2
    assert h.undo().max() == 3
    with pytest.raises(CellposeWebError):
        h.undo()
    assert h.redo().max() == 2
    h.push(m)
    assert not h.can_redo
