"""Runs under control (cancel, ETA, results kept per browser), fine-tune defaults per base model,
"what to try" hints and z-stack counts."""
from pathlib import Path

import numpy as np
import pytest

import standin
from cellpose_web.workflows import hints
from cellpose_web.models import train
from cellpose_web.workflows import model_cache as models_cache
from cellpose_web.service import runs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "u2os_nuclei.tif"


# ------------------------------------------------------------------ run registry
def test_cancel_stops_a_run_at_its_next_progress_step():
    reg = runs.RunRegistry()
    steps = []

    def work(run):
        for i in range(100):
            if i == 3:
                assert reg.cancel("tab1")  # the Cancel button, from another request
            run.progress(i / 100, f"step {i}")
            steps.append(i)
        return "finished"

    with pytest.raises(runs.RunCancelled, match="cancelled"):
        reg.run("tab1", "sess1", work)
    assert steps == [0, 1, 2] and reg.active() == []
    assert not reg.cancel("tab1")  # nothing left to cancel


def test_browser_gone_cancels_only_its_own_runs():
    reg = runs.RunRegistry()
    a, b = reg.start("a", "sess-a"), reg.start("b", "sess-b")
    assert reg.cancel_session("sess-a") == 1
    assert a.cancelled and not b.cancelled
    with pytest.raises(runs.RunCancelled):
        a.check()
    b.check()
    # a new run from the same tab replaces (and cancels) the old one
    b2 = reg.start("b", "sess-b")
    assert b.cancelled and not b2.cancelled


def test_results_kept_per_owner_and_bounded():
    reg = runs.RunRegistry(max_kept=2)
    reg.keep(runs.owner_key("alice", "b1"), "r1")
    reg.keep(runs.owner_key(None, "b2"), "r2")
    assert reg.kept(runs.owner_key("alice", "b1")) == "r1"
    assert reg.kept(runs.owner_key("bob", "b1")) is None  # another account, same browser id
    reg.keep(runs.owner_key(None, "b3"), "r3")
    assert reg.kept(runs.owner_key("alice", "b1")) is None  # oldest dropped
    assert runs.owner_key("x", "") == "" and reg.kept("") is None
    small = runs.RunRegistry(max_bytes=100)
    assert small.keep("a", "ra", nbytes=60) and small.keep("b", "rb", nbytes=60)
    assert small.kept("a") is None and small.kept("b") == "rb"  # memory bound: oldest dropped
    assert not small.keep("c", "rc", nbytes=500) and small.kept("c") is None  # too big to keep at all


def test_progress_line_has_an_eta():
    assert runs.eta_seconds(0.25, 10.0) == pytest.approx(30.0)
    assert runs.eta_seconds(0.01, 10.0) is None
    line = runs.progress_line(0.5, 65.0, "image 3/6")
    assert line == "image 3/6 · 1 min 05 s elapsed, about 1 min 05 s left"
    assert runs.progress_line(0.5, 10.0, "network (about 9 s left)") == "network (about 9 s left) · 10 s elapsed"


@pytest.fixture
def thresh_model(monkeypatch):
    return standin.install(monkeypatch)


def test_segment_run_cancel_keeps_model_free_and_reload_restores(thresh_model):
    from cellpose_web.ui.tabs import segment as T
    s, _, _ = T.load_image(str(EXAMPLE), None)
    params = T.make_params("", 0.4, 0, 0, 15, "auto", "auto", "", 1, 99, False, None, 0)
    seen = []

    def cancel_on_first(fraction, desc=""):
        seen.append(desc)
        runs.registry().cancel("tab-x")

    with pytest.raises(runs.RunCancelled):
        T.run_under_control(s, "thresh", params, None, None, run_key="tab-x", browser_session="sx",
                            owner="o1", progress=cancel_on_first)
    assert runs.registry().kept("o1") is None and not thresh_model.lock.locked()
    lines = []
    out = T.run_under_control(s, "thresh", params, None, None, run_key="tab-x", browser_session="sx", owner="o1",
                              progress=lambda f, desc="": lines.append(desc))
    assert runs.registry().kept("o1") is out and out.masks.max() > 3
    assert any("elapsed" in ln for ln in lines)
    runs.registry().forget("o1")


# ------------------------------------------------------------------ fine-tune defaults
def test_finetune_defaults_differ_per_family():
    lite, sam, cp3 = (train.finetune_defaults(a) for a in ("lite", "cpsam", "cellpose3"))
    assert lite.learning_rate >= 1e-3 and sam.learning_rate == 1e-5 and sam.weight_decay == 0.1
    assert cp3.learning_rate == 5e-3 and cp3.weight_decay == 1e-5 and cp3.batch_size == 8
    assert train.finetune_defaults("something_new") == sam  # Cellpose 4's own default
    assert lite.nimg_per_epoch(3) == lite.min_steps_per_epoch and sam.nimg_per_epoch(3) is None


def test_finetune_tab_fills_the_base_models_recipe():
    from cellpose_web.workflows import finetune as training
    from cellpose_web.ui.tabs import finetune as finetune_tab
    r = training.finetune_defaults("lite")
    assert r["arch"] == "lite" and r["learning_rate"] == train.FINETUNE_DEFAULTS["lite"].learning_rate
    epochs, lr, wd, note = finetune_tab.recipe_for("lite")
    assert (epochs, lr, wd) == (r["n_epochs"], r["learning_rate"], r["weight_decay"]) and "lite" in note
    assert finetune_tab.recipe_for("no_such_model")[1] == 1e-5
    assert training.finetune_defaults("cyto3")["arch"] == "cellpose3"  # known by name, nothing downloaded
    assert training.finetune_defaults("cpsam_v2")["learning_rate"] == 1e-5


# ------------------------------------------------------------------ hints and counts
def _grid(n_side, size, img=256, d=None):
    m = np.zeros((img, img), np.int32)
    step = img // n_side
    k = 0
    for i in range(n_side):
        for j in range(n_side):
            k += 1
            m[i * step + 2:i * step + 2 + size, j * step + 2:j * step + 2 + size] = k
    return m


def test_suggest_says_what_to_try():
    assert "No cells" in hints.suggest(np.zeros((256, 256), int), n_channels=2)
    assert "segmentation channels" in hints.suggest(np.zeros((256, 256), int), n_channels=2)
    few = np.zeros((512, 512), int)
    few[10:40, 10:40], few[100:130, 100:130] = 1, 2
    assert hints.suggest(few, model_name="lite").startswith("Only 2 cells") and "cpsam_v2" in \
        hints.suggest(few, model_name="lite")
    ok = _grid(8, 26)  # 64 cells about 29 px across
    assert hints.suggest(ok, diameter=30) == "" and hints.suggest(ok) == ""
    assert "diameter was 10 px" in hints.suggest(ok, diameter=10)
    assert "Diameter to about 29" in hints.suggest(ok, diameter=90)
    border = np.zeros((256, 256), int)  # big objects cut by the border: the model saw too few, too large
    for k, (y, x) in enumerate([(0, 0), (0, 186), (186, 0), (186, 186), (93, 93)], 1):
        border[y:y + 70, x:x + 70] = k
    assert "touch the image border" in hints.suggest(border, diameter=70)
    assert hints.suggest(ok[:100, :100], diameter=30) == ""  # a small crop cuts many cells: that is fine


def test_stack_counts_say_what_they_count():
    assert hints.count_text(834, 3, 60) == "834 masks in 60 Z planes"
    assert hints.count_text(20, 3, 60, volumetric=True) == "20 3D cells"
    assert hints.count_text(1, 2) == "1 cell"
    linked = np.zeros((4, 64, 64), np.uint16)
    linked[:, 10:30, 10:30] = np.arange(1, 5)[:, None, None]  # the same cell, a new label per plane
    assert hints.planes_linked(linked) == 1.0
    unlinked = linked.copy()
    unlinked[1::2] = 0
    assert hints.planes_linked(unlinked) == 0.0


def test_plane_by_plane_stack_offers_stitching(thresh_model):
    from cellpose_web.ui import common
    from cellpose_web.ui.tabs import segment as T
    stack = np.zeros((6, 128, 128), np.float32)
    stack[:, 20:50, 20:50] = 1.0
    stack[:, 70:100, 60:90] = 1.0
    s = common.Session(name="st.tif", raw=stack, image=stack[..., None], is_stack=True)
    out = T.run_segmentation(s, "thresh", T.make_params("", 0.4, 0, 0, 15, "auto", "0", "", 1, 99, False, None, 0),
                             None, None)
    md = T.summary_md(out)
    assert "12 masks in 6 Z planes" in md and "Stitch planes" in md
    assert T.stitch_offer(out)["visible"] is True
    st = T.stitch_session(out)
    assert "2 3D cells" in T.summary_md(st) and T.stitch_offer(st)["visible"] is False


def test_histogram_bins_in_numeric_order_with_units(thresh_model):
    from cellpose_web.ui.tabs import segment as T
    s, _, _ = T.load_image(str(EXAMPLE), None)
    out = T.run_segmentation(s, "thresh", T.make_params("", 0.4, 0, 0, 15, "auto", "auto", "", 1, 99, False, None,
                                                        0), None, None)
    upd = T.histogram_update(out)
    bins = list(upd["value"]["bin"])
    starts = [float(b.split("–")[0]) for b in bins]
    assert starts == sorted(starts) and all(b.endswith(" px") for b in bins)
    assert upd["sort"] == bins and upd["x_title"] == "cell area (px)"


def test_a_better_finetuned_model_becomes_the_preselected_one(monkeypatch):
    from cellpose_web import registry
    monkeypatch.delenv("CELLPOSE_WEB_DEFAULT_MODEL", raising=False)
    before = models_cache.default_model_name()
    registry.add_lab_model(str(registry.builtin_path("lite")), "lab_v1", {"base_model": "lite"})
    models_cache.set_preferred_model("lab_v1", "held-out AP@0.5 0.10 -> 0.60")
    assert models_cache.default_model_name() == "lab_v1"
    monkeypatch.setenv("CELLPOSE_WEB_DEFAULT_MODEL", "lite")  # the admin's choice still wins
    assert models_cache.default_model_name() == "lite"
    monkeypatch.delenv("CELLPOSE_WEB_DEFAULT_MODEL")
    registry.delete_lab_model("lab_v1")
    assert models_cache.default_model_name() == before  # a deleted model is no longer pre-selected


def test_attached_values_live_and_die_with_the_kept_result():
    reg = runs.RunRegistry(max_kept=2, max_bytes=1000)
    assert not reg.attach("a", "correct", "edits")              # nothing kept for "a" yet
    assert reg.keep("a", "result a", nbytes=400)
    assert reg.attach("a", "correct", "edits a", nbytes=300)
    assert reg.attached("a", "correct") == "edits a" and reg.attached("a", "other") is None
    assert not reg.attach("a", "correct", "too big", nbytes=700)  # 400 + 700 > 1000: refused, old dropped
    assert reg.attached("a", "correct") is None and reg.kept("a") == "result a"
    reg.attach("a", "correct", "edits a2", nbytes=300)
    reg.keep("a", "new result a", nbytes=100)                    # a new result replaces the edits too
    assert reg.attached("a", "correct") is None
    reg.attach("a", "correct", "edits a3", nbytes=500)
    reg.keep("b", "result b", nbytes=500)                        # 100 + 500 + 500 > 1000: oldest ("a") goes
    assert reg.kept("a") is None and reg.attached("a", "correct") is None and reg.kept("b") == "result b"
