"""Issue 21 item 6: a training set remembers the channels its images were segmented with, and
fine-tuning and the held-out AP (before and after) use them, or channels chosen for the whole set.

The engine is replaced by recorders (train_seg, CellposeModel, the registry) so the tests see exactly
the arrays that training and scoring get.
"""
import json
import time

import numpy as np
import pytest
import tifffile

from cellpose_web.errors import CellposeWebError
from cellpose_web.service import jobs
from cellpose_web.workflows import finetune as training

SHAPE = (48, 56)


def _image(seed: int = 0) -> np.ndarray:
    """(Y, X, 3) with a different constant offset per channel, so a channel is known by its values."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 50, (*SHAPE, 3)) + np.array([1000, 2000, 3000])).astype(np.uint16)


def _masks() -> np.ndarray:
    m = np.zeros(SHAPE, np.uint16)
    m[4:14, 4:14] = 1
    m[20:34, 20:30] = 2
    return m


class _Recorder:
    """Stand-ins for CellposeModel, train_seg and registry.add_lab_model that record their inputs."""

    def __init__(self, monkeypatch, tmp_path):
        self.evals, self.train, self.meta = [], {}, None
        rec = self

        class FakeModel:
            def __init__(self, *a, **k):
                self.net = self

            def eval(self, x=None, **kw):  # CellposeModel.eval and net.eval() (train -> eval mode)
                if x is None:
                    return self
                rec.evals.append((np.asarray(x).copy(), kw.get("channel_axis")))
                return _masks(), None, None

        def fake_train_seg(net, train_data, train_labels, test_data=None, test_labels=None, channel_axis=None,
                           n_epochs=1, **kw):
            rec.train = {"train": [np.asarray(a).copy() for a in train_data],
                         "test": [np.asarray(a).copy() for a in test_data or []], "channel_axis": channel_axis}
            p = tmp_path / "fake_model.pth"
            p.write_bytes(b"x")
            return p, np.ones(n_epochs), np.ones(n_epochs)

        def fake_add_lab_model(path, name, meta):
            rec.meta = meta
            return type("Info", (), {"name": name, "path": path})()

        from cellpose_web import models, registry
        from cellpose_web.models import train
        from cellpose_web.workflows import model_cache as models_cache
        monkeypatch.setattr(models, "CellposeModel", FakeModel)
        monkeypatch.setattr(train, "train_seg", fake_train_seg)
        monkeypatch.setattr(registry, "add_lab_model", fake_add_lab_model)
        monkeypatch.setattr(models_cache, "resolve",
                            lambda name: {"path": None, "name": name, "sha256": "0" * 64, "arch": "cellpose3"})
        monkeypatch.setattr(models_cache, "forget", lambda name: None)

    def run(self, **kw):
        return training.run_finetune("s", "cp_cyto", "tuned", n_epochs=1, learning_rate=1e-3, weight_decay=0.1,
                                     make_default=False, **kw)


@pytest.fixture
def recorder(monkeypatch, tmp_path):
    return _Recorder(monkeypatch, tmp_path)


def _add_three(channels):
    imgs = [_image(i) for i in range(3)]
    for i, img in enumerate(imgs):
        training.add_pair("s", img, _masks(), f"p{i}", channels=channels)
    return imgs


def test_pair_stores_every_channel_and_remembers_the_segmentation_channels():
    img = _image()
    d = training.add_pair("s", img, _masks(), "a", channels=[1, 2])
    assert tifffile.imread(d / "a.tif").shape == (*SHAPE, 3)       # the whole image is kept
    setj = json.loads((d / "set.json").read_text())
    assert setj["channels"] == [1, 2] and setj["pairs"][0]["channels"] == [1, 2]
    row = training.list_sets()[0]
    assert row["channels"] == [1, 2] and row["channels_differ"] is False
    imgs, _, names = training.load_set("s")
    assert names == ["a"] and imgs[0].shape == (*SHAPE, 2)
    np.testing.assert_array_equal(imgs[0], img[..., [1, 2]])
    # an explicit choice for the whole set, in its order
    np.testing.assert_array_equal(training.load_set("s", channels="2,0")[0][0], img[..., [2, 0]])
    np.testing.assert_array_equal(training.load_set("s", channels=[0])[0][0], img[..., 0])
    with pytest.raises(CellposeWebError, match=r"image 'a' has 3 channel\(s\).*channel 5 does not exist"):
        training.load_set("s", channels=[1, 5])
    with pytest.raises(CellposeWebError, match="channel numbers"):
        training.load_set("s", channels="one")
    # the job starter's check reads only the TIFF headers, with the same verdicts
    assert training.check_set("s") == training.check_set("s", channels="2,0") == 1
    with pytest.raises(CellposeWebError, match=r"image 'a' has 3 channel\(s\).*channel 5 does not exist"):
        training.check_set("s", channels=[1, 5])
    training.add_pair("s", img[..., 0], _masks(), "grey")  # a one-channel (Y, X) pair
    assert training.check_set("s", channels=[0]) == 2
    with pytest.raises(CellposeWebError, match=r"image 'grey' has 1 channel\(s\)"):
        training.check_set("s", channels=[1])
    with pytest.raises(CellposeWebError, match="channel 3 does not exist"):
        training.add_pair("s", img, _masks(), "b", channels=[3])


def test_sets_without_recorded_channels_use_the_whole_stored_image():
    img = _image()
    d = training.add_pair("old", img[..., :2], _masks(), "a")
    setj = json.loads((d / "set.json").read_text())       # as written before channels were recorded
    setj.pop("channels")
    for p in setj["pairs"]:
        p.pop("channels")
    (d / "set.json").write_text(json.dumps(setj))
    assert training.list_sets()[0]["channels"] is None
    np.testing.assert_array_equal(training.load_set("old")[0][0], img[..., :2])
    with pytest.raises(CellposeWebError, match="channel 2 does not exist"):
        training.load_set("old", channels=[2])
    with pytest.raises(CellposeWebError, match="channel 2 does not exist"):
        training.check_set("old", channels=[2])
    assert training.check_set("old") == 1


def test_finetune_trains_and_scores_on_the_segmentation_channels(recorder):
    imgs = _add_three([1, 2])
    r = recorder.run()
    train, test = recorder.train["train"], recorder.train["test"]
    assert len(train) == 2 and len(test) == 1 and recorder.train["channel_axis"] == -1
    assert all(a.shape == (*SHAPE, 2) for a in train + test)
    names = r["metadata"]["train_images"] + r["metadata"]["test_images"]
    by_name = dict(zip(["p0", "p1", "p2"], imgs))
    for a, n in zip(train + test, names):
        np.testing.assert_array_equal(a, by_name[n][..., [1, 2]])
    # held-out AP before and after: the same two channels
    assert len(recorder.evals) == 2
    for x, ca in recorder.evals:
        np.testing.assert_array_equal(x, by_name[r["metadata"]["test_images"][0]][..., [1, 2]])
        assert ca == -1
    assert recorder.meta["training"]["channels"] == [1, 2] and recorder.meta["training"]["channels_source"] == "as segmented"


def test_finetune_channel_override_and_bad_channel(recorder):
    imgs = _add_three([1, 2])
    r = recorder.run(channels=[0])
    assert all(a.shape == SHAPE for a in recorder.train["train"] + recorder.train["test"])
    np.testing.assert_array_equal(recorder.train["test"][0], dict(zip(["p0", "p1", "p2"], imgs))[
        r["metadata"]["test_images"][0]][..., 0])
    assert all(x.shape == SHAPE for x, _ in recorder.evals)
    assert recorder.meta["training"]["channels"] == [0] and recorder.meta["training"]["channels_source"] == "chosen"
    recorder.train = {}
    with pytest.raises(CellposeWebError, match=r"image 'p0' has 3 channel\(s\).*channel 4 does not exist"):
        recorder.run(channels="1,4")
    assert recorder.train == {}                            # nothing trained


def test_mixed_channels_each_pair_on_its_own(recorder):
    img0, img1 = _image(0), _image(1)
    training.add_pair("s", img0, _masks(), "p0", channels=[2])
    training.add_pair("s", img1, _masks(), "p1", channels=[1, 2])
    row = training.list_sets()[0]
    assert row["channels"] == [1, 2] and row["channels_differ"] is True
    imgs, _, _ = training.load_set("s")
    np.testing.assert_array_equal(imgs[0], img0[..., 2])
    np.testing.assert_array_equal(imgs[1], img1[..., [1, 2]])
    recorder.run()
    assert recorder.meta["training"]["channels"] == {"p0": [2], "p1": [1, 2]}


def test_add_to_training_set_records_the_results_channels():
    from cellpose_web.ui import common
    from cellpose_web.ui.tabs import correct as C
    img = _image()
    s = common.Session(name="cells.tif", image=img, masks=_masks(),
                       provenance={"model": {"name": "cp_cyto"}, "channels": {"segment": [1, 2]}})
    msg = C.add_to_training_set(s, C.enter(s, None), "lab")
    assert "channels 1, 2" in msg
    d = training.sets_root() / "lab"
    assert tifffile.imread(d / "cells.tif").shape == (*SHAPE, 3)
    np.testing.assert_array_equal(training.load_set("lab")[0][0], img[..., [1, 2]])
    # Cellpose 3's cytoplasm/nucleus pickers (1-based) become the same file channels
    s2 = common.Session(name="picked.tif", image=img, masks=_masks(),
                        provenance={"channels": {"segment": None}, "eval_params": {"channels": [2, 3]}})
    C.add_to_training_set(s2, C.enter(s2, None), "lab")
    assert training.pair_channels("lab")["picked"] == [1, 2]
    assert training.segmentation_channels({"eval_params": {"channels": [2, 0]}}) == [1]
    assert training.segmentation_channels({"eval_params": {"channels": [0, 0]}}) is None
    # a z-stack: every plane with cells, each with the stack's channels
    stack = np.stack([img, img + 1])
    m3 = np.stack([_masks(), _masks()])
    s3 = common.Session(name="stack.tif", image=stack, masks=m3, is_stack=True,
                        provenance={"channels": {"segment": [2]}})
    C.add_to_training_set(s3, C.enter(s3, None), "zs")
    imgs, _, names = training.load_set("zs")
    assert names == ["stack_z000", "stack_z001"] and training.list_sets()[-1]["channels"] == [2]
    np.testing.assert_array_equal(imgs[1], stack[1][..., 2])


def test_finetune_tab_shows_and_passes_the_channels(monkeypatch):
    from cellpose_web.ui.tabs import finetune as F
    _add_three([1, 2])
    assert F.channels_for_set("s", None)[0] == "1,2"
    assert F.channels_for_set("nope", None)[0] == ""
    assert list(F.sets_table(None)["channels"]) == ["1,2"]
    training.add_pair("s", _image(), _masks(), "p9")           # an upload: every channel
    text, note = F.channels_for_set("s", None)
    assert text == "" and "different channels" in note
    assert list(F.sets_table(None)["channels"]) == ["all (latest; pairs differ)"]
    with pytest.raises(CellposeWebError, match="channel 7 does not exist"):
        training.start_finetune_job("s", "lite", "x", 1, 1e-3, 0.1, None, channels="7")
    seen = {}

    def fake_run(*a, **kw):
        seen.update(kw)
        return {"name": "x"}

    monkeypatch.setattr(training, "run_finetune", fake_run)
    job = training.start_finetune_job("s", "lite", "x", 1, 1e-3, 0.1, None, channels="2, 1")
    deadline = time.time() + 30
    while (jobs.manager(None).get(job.id) or {}).get("state") in jobs.ACTIVE and time.time() < deadline:
        time.sleep(0.05)
    assert seen["channels"] == [2, 1]
    assert F.trained_on({"metadata": {"channels": [1, 2], "channels_source": "as segmented"}}) == \
        "on channel(s) 1,2 (as segmented)"


def test_finetune_tab_wiring_picking_a_set_fills_the_channels_box():
    from cellpose_web.ui.app import build_app
    _add_three([1, 2])
    demo = build_app()
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    box = by_id["ft-channels"]
    on_set = next(f for f in demo.fns.values() if (by_id["ft-set"]._id, "change") in f.targets)
    assert on_set.outputs == [box]
    assert on_set.fn("s", None)["value"] == "1,2"
    start = next(f for f in demo.fns.values() if (by_id["ft-start"]._id, "click") in f.targets)
    assert box in start.inputs                              # what the box says reaches the job
