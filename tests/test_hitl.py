"""Human-in-the-loop workflow (issue 20): session on disk, rounds in the background, acceptance on
held-out corrected images, rollback, resume after a restart, one round at a time per project, CLI.

Tiny synthetic images (96 px) and 1-2 epoch rounds of 64 px crops on ``lite`` keep every test fast.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpose_web.workflows import pipeline
from cellpose_web.engine import synthetic
from cellpose_web.models import train as train_mod
from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.workflows import hitl

FAST = {"n_epochs": 1, "crops_per_epoch": 2, "batch_size": 1, "bsize": 64, "min_epochs": 1, "time_limit_s": 120}


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hitl_images")
    rng = np.random.default_rng(0)
    for i in range(5):
        s = synthetic.whole_cell_sample(rng, (96, 96), diameter=20.0)
        tifffile.imwrite(d / f"img{i}.tif", s.image[0])
        tifffile.imwrite(d / f"img{i}_masks.tif", s.labels.astype(np.uint16))
    return d


def truth(images_dir: Path, i: int) -> np.ndarray:
    return tifffile.imread(images_dir / f"img{i}_masks.tif")


def start(tmp_path, images_dir, name="p", **kw) -> hitl.HitlSession:
    kw.setdefault("recipe", FAST)
    return hitl.start_session(name, images_dir, "lite", root=tmp_path / "projects", gpu=False, **kw)


@pytest.fixture
def fake_scores(monkeypatch):
    """Held-out AP by model name (the real scoring is covered by the first test)."""
    table: dict[str, dict] = {}

    def fake(ref, imgs, labs, *a, **k):
        if not imgs:
            return None
        ap50, ap75 = table.get(ref["name"], (0.5, 0.5))
        return {"ap50": ap50, "ap75": ap75, "n_images": len(imgs), "n_cells": 1}

    monkeypatch.setattr(hitl, "_score", fake)
    return table


def test_round_defaults_and_held_out_positions():
    lite = hitl.round_defaults("lite")
    assert lite.time_limit_s <= 90 and lite.bsize == 128 and 0 < lite.new_share < 1
    assert hitl.round_defaults("lite", gpu=True).time_limit_s >= lite.time_limit_s / 2
    assert hitl.round_defaults("cellpose3").rescale and not hitl.round_defaults("cpsam").rescale
    assert hitl.round_defaults("something") == hitl.round_defaults("cpsam")
    with pytest.raises(CellposeWebError, match="unknown round setting"):
        lite.replace(epochs=3)
    with pytest.raises(CellposeWebError, match="bsize"):
        lite.replace(bsize=50)
    assert [n for n in range(1, 12) if hitl.is_heldout(n, 4)] == [2, 6, 10]
    assert not any(hitl.is_heldout(n, 0) for n in range(1, 12))


def test_acceptance_rule():
    assert hitl.decide_acceptance(None, None)[0]  # nothing held out yet: accepted
    assert hitl.decide_acceptance({"ap50": 0.6, "ap75": 0.1}, {"ap50": 0.5, "ap75": 0.4})[0]
    assert not hitl.decide_acceptance({"ap50": 0.5, "ap75": 0.4}, {"ap50": 0.6, "ap75": 0.1})[0]
    assert not hitl.decide_acceptance({"ap50": 0.5, "ap75": 0.4}, {"ap50": 0.5, "ap75": 0.4})[0]  # a tie keeps
    assert hitl.decide_acceptance({"ap50": 0.5, "ap75": 0.5}, {"ap50": 0.5, "ap75": 0.4})[0]
    assert not hitl.decide_acceptance({"ap50": 0.52, "ap75": 0.4}, {"ap50": 0.5, "ap75": 0.4}, min_gain=0.05)[0]
    # nothing held out: checked on the training images, kept out only when they got clearly worse
    tr = {"ap50": 0.9, "ap75": 0.7, "n_images": 1}
    ok, why = hitl.decide_acceptance(None, None, train_new={**tr, "ap50": 0.85}, train_parent=tr)
    assert ok and "training image" in why and "0.900 -> 0.850" in why
    ok, why = hitl.decide_acceptance(None, None, train_new={**tr, "ap50": 0.2}, train_parent=tr)
    assert not ok and "kept the previous model" in why and "0.900 -> 0.200" in why
    # a parent that misses most cells has nothing to lose: a dip there is a step of learning
    assert hitl.decide_acceptance(None, None, train_new={**tr, "ap50": 0.0}, train_parent={**tr, "ap50": 0.1})[0]
    # held-out scores decide when there are some, whatever the training images say
    assert hitl.decide_acceptance({"ap50": 0.6, "ap75": 0.1}, {"ap50": 0.5, "ap75": 0.4},
                                  train_new={**tr, "ap50": 0.0}, train_parent=tr)[0]


def test_start_next_save_round_and_next_image_uses_the_new_model(tmp_path, images_dir):
    s = start(tmp_path, images_dir)
    shown = s.next_image()
    assert shown.index == 0 and shown.model["round"] == 0 and shown.model["name"] == "lite"
    assert shown.masks.shape == (96, 96) and shown.image.shape == (96, 96, 1) and shown.flows is not None
    assert Path(shown.proposal_path).is_file()
    res = s.save_correction(truth(images_dir, 0))
    assert not res.heldout and res.handle is not None and res.n_cells == len(np.unique(truth(images_dir, 0))) - 1
    rec = res.handle.wait(timeout=300)
    assert rec["status"] == "done" and rec["round"] == 1 and rec["accepted"] and rec["applied"]
    assert Path(rec["model"]["path"]).is_file() and rec["epochs_done"] == 1 and rec["n_cells"] == res.n_cells
    assert rec["schedule"] == "round" and rec["learning_rate"] == hitl.round_defaults("lite").learning_rate
    assert rec["train_images"] == ["0000_img0"] and rec["parent_round"] == 0 and rec["base_model"] == "lite"
    tdir = Path(s.state()["training_dir"])
    assert (tdir / "0000_img0.tif").is_file() and (tdir / "0000_img0_masks.tif").is_file()
    assert json.loads((tdir / "set.json").read_text())["pairs"][0]["name"] == "0000_img0"
    st = s.status()
    assert st["current_model"]["round"] == 1 and st["current_model"]["n_cells"] == res.n_cells
    assert not st["pending"] and st["n_corrected"] == 1
    shown2 = s.next_image()
    assert shown2.index == 1 and shown2.model["round"] == 1  # segmented by round 1's model
    assert shown2.model["path"] == rec["model"]["path"]
    # the second corrected image is held out: saved, no round
    res2 = s.save_correction(truth(images_dir, 1))
    assert res2.heldout and res2.handle is None
    # the third is trained on; the round is scored against its parent on the held-out image (real AP)
    s.next_image()
    rec3 = s.save_correction(truth(images_dir, 2)).handle.wait(timeout=300)
    assert rec3["round"] == 2 and rec3["heldout_images"] == ["0001_img1"]
    assert rec3["train_images"] == ["0000_img0", "0002_img2"] and rec3["new_images"] == ["0002_img2"]
    assert rec3["scores"]["n_images"] == 1 and rec3["parent_scores"]["n_images"] == 1
    assert 0 <= rec3["scores"]["ap50"] <= 1 and 0 <= rec3["parent_scores"]["ap50"] <= 1
    curve = s.ap_curve()
    assert [c["round"] for c in curve] == [0, 1, 2]  # the base, the parent and the new round


def test_rejected_round_keeps_the_old_model_and_accepted_one_replaces_it(tmp_path, images_dir, fake_scores):
    s = start(tmp_path, images_dir)
    for i in range(2):  # round 1 (accepted: nothing held out), then a held-out image
        s.next_image()
        res = s.save_correction(truth(images_dir, i))
        if res.handle:
            res.handle.wait(timeout=300)
    assert s.current_model()["round"] == 1
    fake_scores.update({"p-round001": (0.6, 0.5), "p-round002": (0.4, 0.9)})
    s.next_image()
    rec = s.save_correction(truth(images_dir, 2)).handle.wait(timeout=300)
    assert rec["round"] == 2 and not rec["accepted"] and "kept the previous model" in rec["reason"]
    assert rec["scores"]["ap50"] == 0.4 and rec["parent_scores"]["ap50"] == 0.6  # both recorded
    assert s.current_model()["round"] == 1
    assert s.next_image().model["round"] == 1  # the rejected model segments nothing
    fake_scores["p-round003"] = (0.7, 0.1)
    rec = s.save_correction(truth(images_dir, 3)).handle.wait(timeout=300)
    assert rec["round"] == 3 and rec["accepted"] and rec["parent_round"] == 1
    assert s.current_model()["round"] == 3
    assert [(c["round"], c["accepted"]) for c in s.ap_curve()] == [(0, True), (1, True), (2, False), (3, True)]


def test_first_round_is_checked_on_its_training_images(tmp_path, images_dir, fake_scores):
    """Before any held-out image, a round that ruins the very image it learnt from is not made current."""
    s = start(tmp_path, images_dir)
    fake_scores.update({"lite": (0.8, 0.6), "p-round001": (0.1, 0.0)})
    s.next_image()
    rec = s.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    assert rec["round"] == 1 and not rec["accepted"] and not rec["applied"]
    assert "training image" in rec["reason"] and "kept the previous model" in rec["reason"]
    assert rec["scores"] is None and rec["train_scores"]["ap50"] == 0.1
    assert rec["parent_train_scores"]["ap50"] == 0.8 and rec["train_scores"]["n_images"] == 1
    assert s.current_model()["round"] == 0 and s.next_image().model["round"] == 0
    assert s.ap_curve() == []  # training-image scores are not held-out AP
    assert s.status()["rounds"][1]["train_scores"]["ap50"] == 0.1
    fake_scores["p-round002"] = (0.75, 0.5)  # a round within noise of its parent is accepted
    s.next_image()
    assert s.save_correction(truth(images_dir, 1)).heldout  # the 2nd image is held out: no round
    s.next_image()
    rec = s.save_correction(truth(images_dir, 2)).handle.wait(timeout=300)
    assert rec["round"] == 2 and rec["parent_round"] == 0 and rec["train_scores"] is None  # held-out now


def test_rounds_without_held_out_images_are_checked_on_training_images(tmp_path, images_dir, fake_scores):
    s = start(tmp_path, images_dir, holdout_every=0)
    fake_scores.update({"lite": (0.8, 0.6), "p-round001": (0.75, 0.6)})
    s.next_image()
    rec = s.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    assert rec["accepted"] and "0.800 -> 0.750" in rec["reason"] and s.current_model()["round"] == 1


def test_rollback_to_any_round(tmp_path, images_dir, fake_scores):
    s = start(tmp_path, images_dir, holdout_every=0)
    for i in range(2):
        s.next_image()
        s.save_correction(truth(images_dir, i)).handle.wait(timeout=300)
    assert s.current_model()["round"] == 2
    cm = s.rollback(1)
    assert cm["round"] == 1 and s.current_model()["round"] == 1
    assert s.next_image().model["round"] == 1
    assert s.rollback(0)["name"] == "lite"
    assert s.next_image().model["round"] == 0
    with pytest.raises(CellposeWebError, match="does not exist"):
        s.rollback(7)
    # the next round fine-tunes from the model chosen
    s.next_image()
    rec = s.save_correction(truth(images_dir, 2)).handle.wait(timeout=300)
    assert rec["parent_round"] == 0 and s.current_model()["round"] == 3
    assert [e["what"] for e in s.state()["events"]].count("rollback") == 2


def test_resume_after_restart(tmp_path, images_dir, monkeypatch):
    s = start(tmp_path, images_dir)
    s.next_image()
    s.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    shown = s.next_image()
    # a restart: nothing in memory survives
    monkeypatch.setattr(hitl, "_RUNNING", {})
    pipeline.forget_models()
    again = hitl.open_session("p", root=tmp_path / "projects")
    st = again.status()
    assert st["current_model"]["round"] == 1 and st["n_corrected"] == 1 and st["index"] == shown.index
    shown2 = again.next_image()
    assert shown2.index == shown.index and shown2.reused and shown2.model["round"] == 1
    np.testing.assert_array_equal(shown2.masks, shown.masks)
    # a round that was running when the process died is marked interrupted and its images stay pending
    with again._update() as state:
        state["rounds"].append({"round": 2, "status": "running", "parent_round": 1, "model": {"name": "x"}})
        state["pending"] = False
    third = hitl.open_session(again.path)
    r2 = third.state()["rounds"][2]
    assert r2["status"] == "interrupted" and not r2["accepted"] and third.pending()
    rec = third.learn().wait(timeout=300)
    assert rec["round"] == 3 and rec["status"] == "done" and not third.pending()
    with pytest.raises(CellposeWebError, match="exists already"):
        start(tmp_path, images_dir)


def test_one_round_at_a_time_per_project(tmp_path, images_dir, monkeypatch):
    real = train_mod.train_seg
    gate = threading.Event()
    calls = []

    def slow_train(net, *a, model_name=None, **k):
        calls.append(model_name)
        if model_name.startswith("p-"):
            assert gate.wait(120)
        return real(net, *a, model_name=model_name, **k)

    monkeypatch.setattr(train_mod, "train_seg", slow_train)
    monkeypatch.setenv("CELLPOSE_WEB_CONCURRENCY_TRAIN", "2")  # two trainings may run at once
    s = start(tmp_path, images_dir, holdout_every=0)
    other = start(tmp_path, images_dir, name="q", holdout_every=0)
    s.next_image()
    h1 = s.save_correction(truth(images_dir, 0)).handle
    assert h1.running
    assert not hitl.FileLock(s.path / "round.lock").acquire(blocking=False)  # held for the round
    # a second correction while the round runs is queued on the same worker, also from another object
    res = hitl.open_session(s.path).save_correction(truth(images_dir, 1), index=1)
    assert res.queued and res.handle is h1
    assert s.learn() is h1
    # another project is not blocked while a training slot is free
    other.next_image()
    rq = other.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    assert rq["status"] == "done" and h1.running
    gate.set()
    h1.wait(timeout=300)
    assert [r["round"] for r in h1.rounds] == [1, 2]  # the queued corrections got the next round
    assert h1.rounds[1]["train_images"] == ["0000_img0", "0001_img1"]
    assert calls == ["p-round001", "q-round001", "p-round002"]
    assert s.current_model()["round"] == 2 and not s.pending()
    assert hitl.FileLock(s.path / "round.lock").acquire(blocking=False)  # released


def test_time_limit_cuts_a_round_and_the_next_fits_it(tmp_path, images_dir):
    s = start(tmp_path, images_dir, recipe={**FAST, "n_epochs": 4, "time_limit_s": 1e-3}, holdout_every=0)
    s.next_image()
    rec = s.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    assert rec["status"] == "done" and rec["stopped_by_time_limit"] and rec["epochs_done"] == 1
    assert rec["epochs"] == 4 and Path(rec["model"]["path"]).is_file() and rec["sec_per_crop"] > 0
    # the next round's epochs follow the measured speed: 0.9 * 10 s / (1 s per crop * 2 crops) -> 4 epochs
    with s._update() as st:
        st["recipe"].update(n_epochs=30, time_limit_s=10, min_epochs=2)
        st["rounds"][1]["sec_per_crop"] = 1.0
    s.next_image()
    rec = s.save_correction(truth(images_dir, 1)).handle.wait(timeout=300)
    assert rec["epochs"] == 4 and rec["epochs_done"] == 4 and not rec["stopped_by_time_limit"]


def test_round_learning_rate_schedule(tmp_path, images_dir):
    lr = hitl.round_lr_schedule(1e-3, 20)
    assert len(lr) == 20 and lr.max() == pytest.approx(1e-3) and lr[0] == pytest.approx(1e-4)
    assert lr[-1] == pytest.approx(5e-5) and np.all(np.diff(lr[3:]) <= 0)
    assert len(hitl.round_lr_schedule(1e-3, 1)) == 1 and hitl.round_defaults("lite").schedule == "round"
    from cellpose_web.models import CellposeModel

    net = CellposeModel(pretrained_model="lite").net
    img, lab = tifffile.imread(images_dir / "img0.tif"), truth(images_dir, 0)
    with pytest.raises(CellposeWebError, match="lr_schedule has 1 learning rates for 3 epochs"):
        train_mod.train_seg(net, [img], [lab], n_epochs=3, lr_schedule=[1e-3], save_path=tmp_path, bsize=64)


def test_bad_corrections_are_refused(tmp_path, images_dir):
    s = start(tmp_path, images_dir)
    s.next_image()
    with pytest.raises(CellposeWebError, match="empty"):
        s.save_correction(np.zeros((96, 96), np.uint16))
    with pytest.raises(CellposeWebError, match="do not match"):
        s.save_correction(np.ones((50, 96), np.uint16))
    with pytest.raises(CellposeWebError, match="does not exist"):
        s.save_correction(truth(images_dir, 0), index=9)
    assert s.status()["n_corrected"] == 0


def test_cli_start_next_save_status_rollback(tmp_path, images_dir, capsys):
    from cellpose_web.cli import main

    root = str(tmp_path / "cliprojects")
    fast = ["--epochs", "1", "--crops-per-epoch", "2", "--bsize", "64", "--cpu", "--root", root]
    assert main(["hitl", "start", "--dir", str(images_dir), "--model", "lite", "--project", "demo", *fast]) == 0
    assert "started project 'demo'" in capsys.readouterr().out
    assert main(["hitl", "next", "--root", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"] == 0 and info["model_round"] == 0 and Path(info["masks"]).is_file()
    masks = tmp_path / "corrected_masks.tif"
    tifffile.imwrite(masks, truth(images_dir, 0))
    assert main(["hitl", "save", "--masks", str(masks), "--root", root]) == 0
    out = capsys.readouterr().out
    assert "added to the training set" in out and "round 1: accepted" in out
    assert main(["hitl", "status", "--root", root, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["current_model"]["round"] == 1 and st["n_corrected"] == 1
    assert main(["hitl", "rollback", "--round", "0", "--root", root]) == 0
    assert "round 0" in capsys.readouterr().out
    assert main(["hitl", "rollback", "--round", "5", "--root", root]) == 2
    assert main(["hitl", "list", "--root", root]) == 0
    assert "demo" in capsys.readouterr().out


def test_cli_simulate(tmp_path, images_dir, capsys):
    from cellpose_web.cli import main

    root = str(tmp_path / "sim")
    rc = main(["hitl", "simulate", "--dir", str(images_dir), "--labels-from-masks", "--model", "lite", "--n", "3",
               "--epochs", "1", "--crops-per-epoch", "2", "--bsize", "64", "--cpu", "--root", root, "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    steps = out["steps"]
    assert [st["corrected"] for st in steps] == [1, 2, 3] and [st["heldout"] for st in steps] == [False, True, False]
    assert steps[1]["segmented_by_round"] == 1 and steps[2]["segmented_by_round"] == 1
    assert out["status"]["n_corrected"] == 3 and len(out["status"]["rounds"]) == 3
    assert main(["hitl", "simulate", "--dir", str(images_dir), "--root", root]) == 2  # needs --labels-from-masks


def test_zip_input_channels_and_list(tmp_path, images_dir):
    import zipfile

    two = tmp_path / "two"
    two.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):  # channel 0: noise, channel 1: the cells
        img = tifffile.imread(images_dir / f"img{i}.tif")
        tifffile.imwrite(two / f"c{i}.tif", np.stack([rng.random(img.shape, np.float32), img]), metadata={"axes": "CYX"})
    zpath = tmp_path / "two.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(two.iterdir()):
            zf.write(f, f"sub/{f.name}")
    with pytest.raises(CellposeWebError, match="does not exist"):
        start(tmp_path, zpath, name="bad", channels=[4])
    s = start(tmp_path, zpath, name="z", channels=[1])
    assert [Path(p).name for p in s.images()] == ["c0.tif", "c1.tif"] and all(s.path in Path(p).parents
                                                                            for p in s.images())
    shown = s.next_image()
    assert shown.image.shape == (96, 96, 2)
    rec = s.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    assert rec["status"] == "done"
    tdir = Path(s.state()["training_dir"])
    assert tifffile.imread(tdir / "0000_c0.tif").shape == (96, 96, 2)  # the pair keeps every channel
    assert hitl._read_pair(tdir, "0000_c0", [1])[0].shape == (96, 96, 1)  # the model learns on channel 1
    names = [r["name"] for r in hitl.list_sessions(tmp_path / "projects")]
    assert "z" in names and "bad" not in names


def test_images_at_any_depth_of_a_zip_and_uploaded_files_are_kept(tmp_path, images_dir):
    """A zip's images in folders two deep were left out without a word (Batch takes them); single
    uploaded files stayed in the upload's temporary folder, which a clean-up of /tmp would empty."""
    import zipfile

    zpath = tmp_path / "nested.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(images_dir / "img0.tif", "exp1/day 1/Zelle ä.tif")
        zf.write(images_dir / "img1.tif", "exp1/day2/细胞.tif")
        zf.write(images_dir / "img2.tif", "top.tif")
        zf.write(images_dir / "img2_masks.tif", "top_masks.tif")
        zf.writestr("__MACOSX/exp1/._top.tif", b"junk")
        zf.writestr("notes.txt", b"not an image")
    s = start(tmp_path, zpath, name="nested")
    assert [Path(p).relative_to(s.path / "images").as_posix() for p in s.images()] == [
        "exp1/day 1/Zelle ä.tif", "exp1/day2/细胞.tif", "top.tif"]
    assert s.status()["n_images"] == 3
    with zipfile.ZipFile(tmp_path / "masks_only.zip", "w") as zf:
        zf.write(images_dir / "img2_masks.tif", "a/img2_masks.tif")
    with pytest.raises(CellposeWebError, match="holds no images to correct.*mask or output"):
        start(tmp_path, tmp_path / "masks_only.zip", name="masks_only")

    up = [tmp_path / "upload1" / "a.tif", tmp_path / "upload2" / "a.tif"]  # two uploads of one name
    for i, f in enumerate(up):
        f.parent.mkdir()
        f.write_bytes((images_dir / f"img{i}.tif").read_bytes())
    s2 = start(tmp_path, [str(f) for f in up], name="loose")
    for f in up:
        f.unlink()  # the upload's temporary copies are gone
    assert [Path(p).name for p in s2.images()] == ["a.tif", "a_2.tif"]
    reopened = hitl.open_session("loose", root=tmp_path / "projects")
    np.testing.assert_array_equal(reopened.next_image().image[..., 0], tifffile.imread(images_dir / "img0.tif"))


def test_cellpose3_round_and_lab_training_set(tmp_path, images_dir, monkeypatch):
    # no root: the project lives in the data folder and its pairs in the lab's training sets
    s = hitl.start_session("cp3", images_dir, "cp_cyto", channels=[0], recipe=FAST, gpu=False)
    assert s.recipe().rescale and s.state()["base_model"]["arch"] == "cellpose3"
    assert Path(s.state()["training_dir"]).name == "hitl_cp3"
    from cellpose_web.workflows import finetune as training

    s.next_image()
    with pytest.raises(BadInputError):  # round 0 is the base model: nothing learnt to publish yet
        s.publish("cp3_lab")
    rec = s.save_correction(truth(images_dir, 0)).handle.wait(timeout=300)
    assert rec["status"] == "done" and rec["rescale"]
    assert s.next_image().model["round"] == 1
    sets = {d["name"]: d for d in training.list_sets()}
    assert sets["hitl_cp3"]["n_images"] == 1  # the Fine-tune tab sees the corrected pairs
    with pytest.raises(BadInputError):
        s.publish("cp3_lab", round_no=7)
    info = s.publish("cp3_lab")
    assert info.name == "cp3_lab" and info.training["hitl_project"] == "cp3"


def test_rounds_of_two_projects_take_turns_on_one_training_slot(tmp_path, images_dir, monkeypatch):
    """The server's training slots (CELLPOSE_WEB_CONCURRENCY_TRAIN, 1 by default) hold for rounds as
    for Fine-tune jobs: a second project's round waits, says so, and can be cancelled while it waits."""
    from cellpose_web.ui import learn_panel

    real = train_mod.train_seg
    gate, calls = threading.Event(), []

    def slow_train(net, *a, model_name=None, **k):
        calls.append(model_name)
        if model_name.startswith("p-"):
            assert gate.wait(120)
        return real(net, *a, model_name=model_name, **k)

    monkeypatch.setattr(train_mod, "train_seg", slow_train)
    monkeypatch.setenv("CELLPOSE_WEB_CONCURRENCY_TRAIN", "1")
    p, q, r = (start(tmp_path, images_dir, name=n, holdout_every=0) for n in "pqr")
    p.next_image()
    hp = p.save_correction(truth(images_dir, 0)).handle
    deadline = time.time() + 60
    while calls != ["p-round001"] and time.time() < deadline:
        time.sleep(0.02)
    q.next_image()
    hq = q.save_correction(truth(images_dir, 0)).handle
    while hq.status().get("phase") != "queued" and time.time() < deadline:
        time.sleep(0.02)
    st = q.status()
    assert st["round_running"]["phase"] == "queued" and "1 training job at a time" in st["round_running"]["message"]
    assert "The next round is queued" in learn_panel.status_md(st)
    assert calls == ["p-round001"] and not q.state()["rounds"][1:]  # no round recorded while it waits
    r.next_image()
    hr = r.save_correction(truth(images_dir, 0)).handle
    while hr.status().get("phase") != "queued" and time.time() < deadline:
        time.sleep(0.02)
    hr.cancel()  # a cancel while waiting ends the wait; the correction stays for the next round
    assert hr.wait(timeout=30) is None and r.pending() and r.current_model()["round"] == 0
    gate.set()
    assert hp.wait(timeout=300)["status"] == "done" and hq.wait(timeout=300)["status"] == "done"
    assert calls == ["p-round001", "q-round001"]


def test_cancelled_round_is_recorded_and_its_images_stay_pending(tmp_path, images_dir, monkeypatch):
    real = train_mod.train_seg
    started = threading.Event()

    def waiting_train(net, *a, callback=None, **k):
        def cb(*args):
            started.set()
            assert h.done() is False
            while not h._cancel.is_set():
                threading.Event().wait(0.01)
            return callback(*args)
        return real(net, *a, callback=cb, **k)

    monkeypatch.setattr(train_mod, "train_seg", waiting_train)
    s = start(tmp_path, images_dir, recipe={**FAST, "n_epochs": 3})
    s.next_image()
    h = s.save_correction(truth(images_dir, 0)).handle
    assert started.wait(120)
    h.cancel()
    rec = h.wait(timeout=300)
    assert rec["status"] == "cancelled" and not rec["accepted"] and rec["epochs_done"] == 1
    assert s.current_model()["round"] == 0 and s.pending()
    assert not h.running and s.running_round() is None


def test_unreadable_images_are_skipped_with_their_reason(tmp_path, images_dir):
    """A truncated TIFF among the images no longer refuses the whole project (Batch skips such files
    too): it is left out, and the status says which file and why."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a_broken.tif").write_bytes((images_dir / "img0.tif").read_bytes()[:300])
    for i in (1, 2):
        (d / f"img{i}.tif").write_bytes((images_dir / f"img{i}.tif").read_bytes())
    (d / "img3.tif").write_bytes(b"II*\x00 not really a tiff")
    s = start(tmp_path, d)
    shown = s.next_image()
    assert shown.index == 1 and shown.name.endswith("img1")
    s.save_correction(truth(images_dir, 1), learn=False)
    assert s.next_image().index == 2
    s.save_correction(truth(images_dir, 2), learn=False)
    assert s.next_image() is None  # img3 cannot be read either: nothing is left to correct
    st = s.status()
    assert [x["name"] for x in st["skipped"]] == ["a_broken.tif", "img3.tif"] and st["skipped"][0]["reason"]
    assert st["n_images"] == 2 and st["n_corrected"] == 2  # "2 of 2 images corrected", not "2 of 4"
    with pytest.raises(CellposeWebError, match="None of the images could be read"):
        hitl.start_session("q", [str(d / "a_broken.tif")], "lite", root=tmp_path / "projects", gpu=False)
