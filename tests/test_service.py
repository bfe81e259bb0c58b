"""service/: hostile input checks, atomic storage, jobs that survive restarts, batch and training sets.

Segmentation here uses a small stand-in model (threshold + connected components) so the tests
check the service plumbing fast; the real engine is tested in test_models.py and the e2e tests.
"""
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.workflows import batch, inputs, model_cache as models_cache, finetune as training
from cellpose_web.service import jobs, storage
from cellpose_web.workflows import segment
from cellpose_web.service.config import Limits

import standin


@pytest.fixture
def fake_model(monkeypatch):
    return standin.install(monkeypatch)


def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _tif_bytes(arr):
    b = io.BytesIO()
    tifffile.imwrite(b, arr)
    return b.getvalue()


# ---------------------------------------------------------------- storage
def test_safe_join_and_names(tmp_path):
    assert storage.safe_name("my set 1/../x") == "my_set_1_.._x"
    with pytest.raises(CellposeWebError):
        storage.safe_join(tmp_path, "..", "etc")
    with pytest.raises(CellposeWebError):
        storage.safe_name("../..")
    p = storage.atomic_write_json(tmp_path / "a" / "b.json", {"x": np.int64(3)})
    assert json.loads(p.read_text()) == {"x": 3}
    assert not list((tmp_path / "a").glob(".*tmp"))


# ---------------------------------------------------------------- hostile input
def test_zip_slip_absolute_and_symlink_rejected(tmp_path):
    lim = Limits()
    for bad in ("../evil.tif", "/abs/evil.tif", "a/../../evil.tif", "C:/evil.tif"):
        z = _zip(tmp_path / "slip.zip", {bad: b"x"})
        with pytest.raises(CellposeWebError, match="unsafe path"):
            inputs.extract_zip(z, tmp_path / "out", lim)
    assert not (tmp_path / "evil.tif").exists()
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(CellposeWebError, match="symbolic link"):
        inputs.extract_zip(z, tmp_path / "out", lim)


def test_zip_bomb_and_entry_limits(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.tif", b"\0" * (3 * 2**20))
    with pytest.raises(CellposeWebError, match="unpacks to more"):
        inputs.extract_zip(z, tmp_path / "out", Limits(max_zip_uncompressed_bytes=2**20))
    z2 = _zip(tmp_path / "many.zip", {f"{i}.tif": b"x" for i in range(6)})
    with pytest.raises(CellposeWebError, match="holds 6 files"):
        inputs.validate_zip(z2, Limits(max_zip_entries=5))
    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(CellposeWebError, match="not a valid zip"):
        inputs.validate_zip(tmp_path / "notzip.zip", Limits())


@pytest.mark.parametrize("name,data,match", [
    ("empty.tif", b"", "empty"),
    ("text.png", b"this is not a png at all" * 10, "text|PNG|read|image"),
    ("trunc.tif", None, "read|damaged|truncat|TIFF"),
    ("doc.pdf", b"%PDF-1.4 ....", "unsupported|not"),
])
def test_bad_files_give_messages(tmp_path, name, data, match):
    if data is None:
        data = _tif_bytes(standin.blobs())[:300]
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(CellposeWebError, match=match):
        inputs.read_image(p, Limits())


@pytest.mark.parametrize("arr,match", [
    (np.ones((10, 10), complex), "complex"),
    (np.full((10, 10), np.nan), "finite"),
    (np.ones((1, 50)), "at least 3"),
    (np.ones((2, 2, 2, 2, 9, 9)), "dimensions"),
    (np.array([["a", "b"], ["c", "d"]]), "numeric"),
])
def test_odd_arrays(arr, match):
    with pytest.raises(CellposeWebError, match=match):
        inputs.validate_array(arr, "x", Limits())


def test_odd_arrays_that_are_fixed():
    a = inputs.validate_array(np.ones((10, 10), bool), "x", Limits())
    assert a.dtype == np.uint8
    f = np.ones((10, 10), np.float32)
    f[0, 0] = np.inf
    assert np.isfinite(inputs.validate_array(f, "x", Limits())).all()
    with pytest.raises(CellposeWebError, match="limit"):
        inputs.validate_array(np.ones((100, 100)), "x", Limits(max_pixels=1000))


@pytest.mark.parametrize("kw,match", [
    ({"diameter": -5}, "Diameter"), ({"niter": 10**9}, "niter"), ({"flow_threshold": float("nan")}, "Flow"),
    ({"norm_percentile": (50, 10)}, "percentiles"), ({"cellprob_threshold": "abc"}, "number"),
    ({"stitch_threshold": 2}, "Stitch"),
    # a 0.5 px diameter would enlarge the image 60x per side and run out of memory minutes later
    ({"diameter": 0.5}, "at least 3 px"), ({"diameter": 1e5}, "at most 5000; got"),
])
def test_absurd_parameters(kw, match):
    with pytest.raises(CellposeWebError, match=match):
        segment.SegmentParams(**kw).validated(Limits())


def test_decimal_commas_are_read_as_in_the_pixel_size_box():
    """Diameter '30,5' was refused while pixel size '0,5' was read: one rule for typed decimals."""
    p = segment.SegmentParams(diameter="30,5", flow_threshold="0,6", cellprob_threshold=" -0,5 ").validated(Limits())
    assert (p.diameter, p.flow_threshold, p.cellprob_threshold) == (30.5, 0.6, -0.5)
    assert inputs.decimal_text("1,000.5") == "1,000.5" and inputs.decimal_text(3) == 3
    with pytest.raises(CellposeWebError, match="number"):
        segment.SegmentParams(diameter="30,5,1").validated(Limits())


def test_channels_last_layouts():
    from cellpose_web.workflows import pipeline
    img = np.zeros((2, 30, 40))
    out, stack = pipeline.to_channels_last(img, None, None)
    assert out.shape == (30, 40, 2) and not stack
    out, stack = pipeline.to_channels_last(np.zeros((7, 30, 40)), None, None)
    assert out.shape == (7, 30, 40, 1) and stack
    out, stack = pipeline.to_channels_last(np.zeros((5, 2, 30, 40)), None, None)
    assert out.shape == (5, 30, 40, 2) and stack
    out, stack = pipeline.to_channels_last(np.zeros((3, 30, 40)), file_axes="ZYX")  # the file says Z
    assert out.shape == (3, 30, 40, 1) and stack
    out, stack = pipeline.to_channels_last(np.zeros((3, 30, 40)), want_3d=True)
    assert out.shape == (3, 30, 40, 1) and stack
    assert pipeline.check_channels([2], 3) == [2]
    with pytest.raises(CellposeWebError, match="does not exist"):
        pipeline.check_channels([5], 3)


# ---------------------------------------------------------------- segmentation + files
def test_stack_without_3d_counts_cells_per_plane(fake_model):
    """Planes segmented on their own: cells in different planes never share a label."""
    plane = standin.blobs()
    n_plane = segment.segment(plane, segment.SegmentParams(), "thresh", "p.tif").n_cells
    stack = np.stack([plane, plane[:, ::-1], plane])
    res = segment.segment(stack, segment.SegmentParams(z_axis=0), "thresh", "s.tif")
    assert res.masks.shape == stack.shape and n_plane > 1
    assert res.n_cells == 3 * n_plane
    for z in range(3):  # each plane still holds its own segmentation, only renumbered
        labels_z = np.unique(res.masks[z][res.masks[z] > 0])
        assert len(labels_z) == n_plane
        assert not set(labels_z) & set(np.unique(res.masks[(z + 1) % 3]))


def test_segment_records_provenance_and_writes_files(tmp_path, fake_model):
    img = standin.blobs()
    res = segment.segment(img, segment.SegmentParams(flow_threshold=0.3), "thresh", "a.tif", 0.5)
    assert res.n_cells == standin.threshold_labels(img).max() > 1
    assert res.provenance["model"]["sha256"] == standin.SHA256
    assert res.provenance["eval_params"]["flow_threshold"] == 0.3
    from cellpose_web.workflows import pipeline
    files = pipeline.write_outputs(tmp_path / "a.tif", res.masks, res.image, [res.flow_rgb, res.dP, res.cellprob],
                                   res.provenance, res.table, pipeline.SaveOptions.everything())
    assert (tifffile.imread(files["masks_tif"]) == res.masks).all()
    from cellpose_web import io as cpio
    seg = cpio.load_seg(files["seg_npy"])
    assert (seg["masks"] == res.masks).all()
    assert "sha256" in json.dumps(seg["cellpose_web"], default=str)
    df = pd.read_csv(files["cells_csv"], comment="#")
    assert len(df) == res.n_cells
    assert "thresh" in files["cells_csv"].read_text().splitlines()[0]
    assert len(files["outlines_txt"].read_text().splitlines()) == res.n_cells


def test_puncta_on_a_stack_are_skipped_with_a_note(fake_model):
    """Puncta are 2D: a plane-by-plane stack is still segmented and measured, and the result says why
    it has no puncta (the app shows provenance notes under the count)."""
    from cellpose_web.measure import PunctaParams
    from cellpose_web.ui import common
    from cellpose_web.ui.tabs import segment as segment_tab

    stack = np.stack([standin.blobs(0), standin.blobs(1)])
    res = segment.segment(stack, segment.SegmentParams(z_axis=0), "thresh", "s.tif", puncta=PunctaParams(channel=0))
    assert res.puncta is None and len(res.table) == res.n_cells > 0 and "puncta_count" not in res.table
    assert any("puncta" in n for n in res.provenance["notices"])
    s = common.Session(name="s.tif", masks=res.masks, table=res.table, provenance=res.provenance)
    assert "note: puncta are counted on 2D images" in segment_tab.summary_md(s)


# ---------------------------------------------------------------- batch
def test_batch_asked_for_cellpose_sam_offline_stops_with_the_api_message(tmp_path, monkeypatch, fake_model):
    """Never another model's masks: the batch stops before any image, with CellposeModel's message."""
    from cellpose_web.errors import ModelNotAvailableError
    from cellpose_web.models import CellposeModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableError) as api:
        CellposeModel(pretrained_model="cpsam")
    z = _zip(tmp_path / "in.zip", {"one.tif": _tif_bytes(standin.blobs(1))})
    out = tmp_path / "job" / "results"
    with pytest.raises(ModelNotAvailableError) as e:
        batch.run_batch([z], segment.SegmentParams(), "cpsam", out)
    assert str(e.value) == str(api.value)
    assert not list(out.parent.rglob("*_cp_masks.tif")) and fake_model.model.calls == []


def test_batch_bad_file_listed_others_processed(tmp_path, fake_model):
    z = _zip(tmp_path / "in.zip", {
        "one.tif": _tif_bytes(standin.blobs(1)), "sub/two.tif": _tif_bytes(standin.blobs(2, 3)),
        "broken.tif": b"II*\x00garbage", "notes.txt": b"hello", "one_masks.tif": _tif_bytes(standin.blobs(1)),
    })
    out = tmp_path / "job" / "results"
    res = batch.run_batch([z], segment.SegmentParams(), "thresh", out, pixel_size_um=0.5,
                          puncta=batch.PunctaParams(channel=0, threshold=0.2))
    assert res["n_ok"] == 2
    # the Batch tab's counts: images found vs segmented, and the files that were not images to segment
    assert (res["n_images"], res["n_failed"], res["n_left_out"]) == (3, 1, 2), res
    assert len(res["errors"]) == res["n_failed"] + res["n_left_out"]
    summary = pd.read_csv(res["summary_csv"], comment="#")
    header = Path(res["summary_csv"]).read_text().splitlines()[:6]
    assert any(" date=20" in line for line in header), header  # when the batch ran, as every result records
    assert list(summary.columns[:3]) == ["image", "path", "n_cells"]  # the useful columns first, long ones last
    cols = list(summary.columns)
    assert cols.index("n_cells") < cols.index("status") < cols.index("reason") < cols.index("model_sha256")
    ok = summary[summary.status == "ok"].set_index("image")
    assert set(ok.index) == {"one.tif", "two.tif"}
    assert ok.loc["one.tif", "n_cells"] == standin.threshold_labels(standin.blobs(1)).max() > 1
    assert ok.loc["two.tif", "n_cells"] == standin.threshold_labels(standin.blobs(2, 3)).max() > 1
    bad = dict(zip(summary[summary.status == "error"].image, summary[summary.status == "error"].reason))
    assert "broken.tif" in bad and "notes.txt" in bad and "one_masks.tif" in bad
    cells = pd.read_csv(res["cells_csv"], comment="#")
    for name, row in ok.iterrows():
        assert (cells.image == name).sum() == row.n_cells
    assert "puncta_count" in cells
    with zipfile.ZipFile(res["zip"]) as zf:
        names = zf.namelist()
    assert "summary.csv" in names and "one/one_cp_masks.tif" in names and "sub/two/two_seg.npy" in names
    assert dict(zip(summary.image, summary.path))["two.tif"] == "sub/two.tif"


# ---------------------------------------------------------------- jobs
def test_jobs_progress_cancel_and_restart_recovery():
    jm = jobs.JobManager()
    gate = threading.Event()

    def work(job):
        for i in range(100):
            if job.cancelled:
                return {"done": i}
            job.progress(i / 100, f"step {i}")
            gate.wait(0.01)
        return {"done": 100}

    j = jm.create("batch", {"x": 1})
    t = jm.start(j, work)
    time.sleep(0.05)
    assert jm.cancel(j.id)
    t.join(5)
    st = jm.get(j.id)
    assert st["state"] == "cancelled" and st["result"]["done"] < 100
    # a job left "running" by a killed process is reported as interrupted after a restart
    j2 = jm.create("train", {})
    j2.update(state="running", progress=0.4)
    jm2 = jobs.JobManager()
    assert jm2.get(j2.id)["state"] == "interrupted"
    assert jm2.get(j.id)["state"] == "cancelled"
    j3 = jm2.create("batch", {})
    jm2.start(j3, lambda job: (_ for _ in ()).throw(CellposeWebError("bad input, fix it"))).join(5)
    assert jm2.get(j3.id)["state"] == "failed" and "fix it" in jm2.get(j3.id)["message"]


def test_jobs_of_a_kind_wait_for_a_free_slot_and_can_be_cancelled_while_waiting():
    """With one slot, a second training job waits "queued" (also when its page was closed and the
    browser's own limit no longer holds it back) and starts when the first ends."""
    alice, bob = jobs.JobManager("alice"), jobs.JobManager("bob")  # the slots are process-wide
    release, order = threading.Event(), []

    def long_work(job):
        order.append(job.id)
        release.wait(120)
        return {"ok": 1}

    first = alice.create("slot-test", {})
    t1 = alice.start(first, long_work, slots=1)
    second, third = bob.create("slot-test", {}), bob.create("slot-test", {})
    t2 = bob.start(second, long_work, slots=1)
    t3 = bob.start(third, lambda job: order.append(job.id) or {"ok": 3}, slots=1)
    deadline = time.time() + 60  # a loaded machine may be slow to start threads
    while "waiting" not in (bob.get(third.id) or {}).get("message", "") and time.time() < deadline:
        time.sleep(0.02)
    assert order == [first.id] and alice.get(first.id)["state"] == "running"
    st = bob.get(third.id)
    assert st["state"] == "queued" and "1 slot-test job at a time" in st["message"]
    assert bob.cancel(third.id)
    t3.join(30)
    assert bob.get(third.id)["state"] == "cancelled" and "before it started" in bob.get(third.id)["message"]
    release.set()
    t1.join(30), t2.join(30)
    assert order == [first.id, second.id] and bob.get(second.id)["state"] == "done"
    # a slot is given back when a job fails too
    failing = alice.create("slot-test", {})
    alice.start(failing, lambda job: (_ for _ in ()).throw(CellposeWebError("no")), slots=1).join(5)
    after = alice.create("slot-test", {})
    alice.start(after, lambda job: {"ok": 4}, slots=1).join(5)
    assert alice.get(after.id)["state"] == "done"


# ---------------------------------------------------------------- training sets
def test_training_set_add_import_load(tmp_path):
    img, m = standin.blobs(), np.zeros((64, 64), np.uint16)
    m[5:10, 5:10] = 1
    m[20:30, 20:30] = 2
    # a set is named as lab models are, never rewritten ("lab set" and "lab_set" must not become one set)
    with pytest.raises(BadInputError, match=r"Invalid training set name 'lab set'.*e\.g\. 'lab_set'"):
        training.add_pair("lab set", img, m, "img 1")
    with pytest.raises(BadInputError, match="Invalid training set name"):
        training.load_set("../lab_set")
    training.add_pair("lab_set", img, m, "img 1")
    training.add_pair(" lab_set ", img, m, "img 1")  # replaced, not duplicated
    z = _zip(tmp_path / "pairs.zip", {"b.tif": _tif_bytes(img), "b_masks.tif": _tif_bytes(m),
                                      "c.tif": _tif_bytes(img)})
    n, problems = training.import_pairs([z], "lab_set")
    assert n == 1 and problems and problems[0][0] == "c.tif"
    # foreground masks (0/1 floats, as a thresholded image saves) are not one label per cell: refused
    z2 = _zip(tmp_path / "binary.zip", {"d.tif": _tif_bytes(img), "d_masks.tif": _tif_bytes((m > 0).astype(np.float32))})
    n, problems = training.import_pairs([z2], "lab_set")
    assert n == 0 and problems[0][0] == "d.tif" and "binary mask: 2 separate regions" in problems[0][1]
    sets = training.list_sets()
    assert sets == [{"name": "lab_set", "n_images": 2, "n_cells": 4, "updated": sets[0]["updated"],
                     "channels": None, "channels_differ": False}]
    imgs, labs, names = training.load_set("lab_set")
    assert names == ["b", "img_1"] and (labs[0] == m).all()
    with pytest.raises(CellposeWebError):
        training.add_pair("x", img, np.zeros_like(m), "empty")
    # the split is fixed by the seed (a fine-tune's held-out images must not change between runs)
    assert training.split_holdout(5) == ([0, 1, 3, 4], [2])
    assert training.split_holdout(1) == ([0], [])
    for n in range(2, 40):
        train, held = training.split_holdout(n)
        assert len(held) == max(1, round(n * 0.2)) and sorted(train + held) == list(range(n))
        assert training.split_holdout(n) == (train, held)


def test_image_names_keep_their_letters_and_a_replaced_pair_is_named():
    """'Zelle ä' and 'Zelle ö' are two images of a training set (they became one 'Zelle' pair, the
    first silently lost); adding an image of a name the set has says it replaces that pair."""
    from cellpose_web.workflows import results
    img, m = standin.blobs(), np.zeros((64, 64), np.uint16)
    m[5:10, 5:10] = 1
    assert storage.safe_name("Zelle ä 细胞") == "Zelle_ä_细胞" and storage.safe_name("Zelle\u0308") == "Zell\u00eb"  # NFC, as macOS names are shown
    first = results.add_correction_to_training_set(img, m, storage.safe_name("Zelle ä"), False, {}, 0, "uni")
    second = results.add_correction_to_training_set(img, m, storage.safe_name("Zelle ö"), False, {}, 0, "uni")
    assert "replacing" not in first + second and "now 2 image(s)" in second
    assert sorted(training.pair_names("uni")) == ["Zelle_ä", "Zelle_ö"] and training.pair_names("new_set") == set()
    again = results.add_correction_to_training_set(img, m, "Zelle_ö", False, {}, 0, "uni")
    assert "now 2 image(s)" in again and "replacing the earlier pair named Zelle_ö" in again


# ---------------------------------------------------------------- kill during fine-tuning
_CHILD = r'''
import sys, time, numpy as np, tifffile, torch
torch.set_num_threads(1)
from pathlib import Path
from cellpose_web import registry
from cellpose_web.service import jobs
from cellpose_web.workflows import finetune as training
data = Path(sys.argv[1])
registry.add_lab_model(sys.argv[2], "earlier", {"description": "made before the crash"})
for n in sorted(p.name[:-10] for p in (data / "nuclei_2d/train").glob("*_masks.tif"))[:3]:
    training.add_pair("s", tifffile.imread(data / f"nuclei_2d/train/{n}.tif")[:128, :128],
                      tifffile.imread(data / f"nuclei_2d/train/{n}_masks.tif")[:128, :128], n)
jm = jobs.manager(None)
job = jm.create("train", {"set": "s"})
def work(j):
    def on_epoch(e, tr, te, el):
        j.update(losses=(j.status.get("losses") or []) + [[e, tr, te]])
    return training.run_finetune("s", sys.argv[2], "after_crash", 500, 1e-3, 0.1, work_dir=j.dir / "work",
                                 on_epoch=on_epoch, cancelled=lambda: j.cancelled)
jm.start(job, work)
print(job.id, flush=True)
time.sleep(600)
'''


@pytest.mark.slow
def test_kill_during_finetune_leaves_consistent_state(tmp_path, reference_dir, data_dir, _isolated_home):
    import os
    import signal
    import subprocess
    import sys

    tiny = reference_dir / "tiny_cpsam.pth"
    from cellpose_web import registry
    env = dict(os.environ, CELLPOSE_WEB_HOME=str(_isolated_home))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(data_dir), str(tiny)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[1]))
    try:
        jid = proc.stdout.readline().strip()
        assert jid, proc.stderr.read()
        st_path = _isolated_home / "jobs" / jid / "status.json"
        deadline = time.time() + 240
        while time.time() < deadline:
            st = json.loads(st_path.read_text()) if st_path.exists() else {}
            if len(st.get("losses") or []) >= 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail("training did not start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # "restart": a fresh manager and registry view of the same data folder
    jm = jobs.JobManager()
    st = jm.get(jid)
    assert st["state"] == "interrupted" and "finished results are kept" in st["message"]
    registry.cleanup_incomplete()
    names = [m.name for m in registry.list_models() if m.source == "lab"]
    assert names == ["earlier"]
    earlier = registry.get_lab_model("earlier")
    assert earlier.sha256 == registry.file_sha256(tiny)
    assert training.list_sets()[0]["n_images"] == 3
    assert not [p for p in (_isolated_home / "models").iterdir() if p.name.startswith(".")]


def test_training_pairs_stored_channels_last():
    m = np.zeros((40, 50), np.uint16)
    m[5:15, 5:15] = 1
    training.add_pair("s", np.zeros((2, 40, 50), np.uint8), m, "chw")
    training.add_pair("s", np.zeros((40, 50, 1), np.uint8), m, "yx1")
    imgs, _, names = training.load_set("s")
    assert [i.shape for i in imgs] == [(40, 50, 2), (40, 50)]
    with pytest.raises(CellposeWebError, match="do not match"):
        training.add_pair("s", np.zeros((30, 50), np.uint8), m, "bad")


@pytest.mark.slow
def test_batch_on_dask_localcluster_matches_single_process(tmp_path, reference_dir):
    import dask.distributed  # noqa: F401  (requirements-dev.txt)
    tiny = reference_dir / "tiny_cpsam.pth"
    repo = Path(__file__).resolve().parents[1]
    files = []
    for n in ("rpe1_nuclei.tif", "u2os_nuclei.tif"):  # small crops keep the test fast
        for k, (y, x) in enumerate(((0, 0), (128, 128))):
            f = tmp_path / "in" / f"{Path(n).stem}_{k}.tif"
            f.parent.mkdir(exist_ok=True)
            tifffile.imwrite(f, tifffile.imread(repo / "examples" / n)[y:y + 128, x:x + 128])
            files.append(f)
    files = files[:3]
    params = segment.SegmentParams(cellprob_threshold=-2.0)
    one = batch.run_batch(files, params, str(tiny), tmp_path / "one" / "results")
    many = batch.run_batch(files, params, str(tiny), tmp_path / "dask" / "results", scheduler="local", n_workers=2)
    assert one["n_ok"] == many["n_ok"] == 3
    for f in files:
        a = tifffile.imread(tmp_path / "one" / "results" / f.stem / f"{f.stem}_cp_masks.tif")
        b = tifffile.imread(tmp_path / "dask" / "results" / f.stem / f"{f.stem}_cp_masks.tif")
        assert np.array_equal(a, b)
    s1 = pd.read_csv(one["summary_csv"], comment="#")
    s2 = pd.read_csv(many["summary_csv"], comment="#")
    assert s1.drop(columns=["reason"]).equals(s2.drop(columns=["reason"]))


def test_zero_gpu_duration_tiers():
    from cellpose_web.service import gpu
    assert gpu.gpu_duration((512, 512)) == 10
    assert gpu.gpu_duration((1000, 800, 3)) == 10
    assert gpu.gpu_duration((2048, 2048)) == 60
    assert gpu.gpu_duration((6000, 4000)) == 240
    assert gpu.gpu_duration((30, 512, 512)) > 10      # a stack asks for more time per plane
    with pytest.raises(CellposeWebError, match="20,000"):
        gpu.gpu_duration((25000, 100))
    if not gpu.on_zero_gpu():
        f = lambda x: x  # noqa: E731
        assert gpu.gpu_task(lambda *a: 10)(f) is f


def test_per_user_storage_is_separate(monkeypatch):
    monkeypatch.setenv("CELLPOSE_WEB_PER_USER", "1")
    m = np.zeros((20, 20), np.uint16)
    m[2:8, 2:8] = 1
    training.add_pair("mine", np.zeros((20, 20), np.uint8), m, "a", user="alice")
    assert [s["name"] for s in training.list_sets("alice")] == ["mine"]
    assert training.list_sets("bob") == []
    assert jobs.manager("alice").root != jobs.manager("bob").root
    from cellpose_web.service.config import home_dir
    evil = storage.user_root("../../etc")
    assert home_dir() in evil.parents          # a hostile user name stays inside the data folder
    with pytest.raises(CellposeWebError):
        storage.safe_join(storage.user_root("x"), "..", "..", "y")
