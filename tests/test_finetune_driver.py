"""One fine-tune driver (workflows.finetune.fine_tune) under every face: the Fine-tune tab's
job (run_finetune), ``--train`` and the human-in-the-loop rounds; one set of settings and limits;
one metadata record."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellpose_web.engine import synthetic
from cellpose_web.errors import BadInputError
from cellpose_web.models import train as train_mod
from cellpose_web.workflows import finetune

FAST = dict(n_epochs=1, nimg_per_epoch=2, batch_size=1, bsize=64)


def test_settings_take_the_family_recipe_and_one_set_of_limits():
    lite = train_mod.finetune_defaults("lite")
    s = finetune.training_settings("lite", 3)
    assert s["learning_rate"] == lite.learning_rate and s["n_epochs"] == lite.n_epochs
    assert s["batch_size"] == lite.batch_size and s["nimg_per_epoch"] == lite.nimg_per_epoch(3)
    assert finetune.training_settings("cellpose3", 3, "", "", "")["weight_decay"] == \
        train_mod.finetune_defaults("cellpose3").weight_decay  # blank boxes = the recipe
    given = finetune.training_settings("cpsam", 3, "7", "1e-4", 0.5, max_epochs=10)
    assert (given["n_epochs"], given["learning_rate"], given["weight_decay"]) == (7, 1e-4, 0.5)
    for bad in (dict(learning_rate=0.5), dict(learning_rate="fast"), dict(n_epochs=11), dict(weight_decay=-1),
                dict(batch_size=0), dict(bsize=224)):
        with pytest.raises(BadInputError):
            finetune.training_settings("cpsam", 3, max_epochs=10, **bad)
    assert finetune.training_settings("lite", 3, bsize=224)["bsize"] == 224  # only Cellpose-SAM needs 256


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    samples = [synthetic.whole_cell_sample(rng, (96, 96), diameter=20.0) for _ in range(3)]
    return [s.image[0] for s in samples], [s.labels.astype(np.uint16) for s in samples]


def test_fine_tune_trains_stops_and_records(pairs, tmp_path):
    from cellpose_web.models import CellposeModel
    imgs, labs = pairs
    model = CellposeModel(gpu=False, pretrained_model="lite")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    seen = []
    run = finetune.fine_tune(model.net, "lite", imgs[:2], labs[:2], test_images=imgs[2:], test_labels=labs[2:],
                             name="ft", save_dir=tmp_path, on_epoch=lambda *a: seen.append(a) or len(seen) < 2,
                             learning_rate=1e-3, **{**FAST, "n_epochs": 4})
    assert run.path.is_file() and run.path.parent == tmp_path / "models"
    assert run.stopped and run.epochs_done == 2 == len(seen) and len(run.test_losses) == 2
    assert any(not np.array_equal(before[k], v) for k, v in model.net.state_dict().items())
    rec = run.record({"name": "lite", "sha256": "ab"}, ["a", "b"], ["c"], ap_after=0.5)
    assert rec["base_model"] == "lite" and rec["n_epochs"] == 4 and rec["epochs_done"] == 2
    assert rec["learning_rate"] == 1e-3 and rec["train_images"] == ["a", "b"] and rec["ap_after"] == 0.5
    assert rec["device"] == "cpu" and rec["final_train_loss"] == run.train_losses[-1]


def test_a_run_inside_the_learning_rate_warm_up_says_so(pairs, tmp_path):
    from cellpose_web.models import CellposeModel
    imgs, labs = pairs
    model = CellposeModel(gpu=False, pretrained_model="lite")
    before = {k: v.detach().clone() for k, v in model.net.named_parameters()}
    one = finetune.fine_tune(model.net, "lite", imgs[:2], labs[:2], name="one", save_dir=tmp_path,
                             learning_rate=1e-3, **FAST)
    # epoch 1 of Cellpose's schedule has learning rate 0: the weights stay the base's, and the user is told
    assert all(np.array_equal(before[k], v.detach()) for k, v in model.net.named_parameters())
    assert len(one.notices) == 1 and "keeps its base's weights" in one.notices[0]
    assert finetune.warm_up_notice(5, 1e-3) and "0.000444" in finetune.warm_up_notice(5, 1e-3)
    assert finetune.warm_up_notice(train_mod.WARM_UP_EPOCHS, 1e-3) is None
    custom = finetune.fine_tune(model.net, "lite", imgs[:2], labs[:2], name="own", save_dir=tmp_path,
                                learning_rate=1e-3, lr_schedule=np.full(1, 1e-3), **FAST)
    assert custom.notices == ()  # a schedule of one's own has no warm-up to warn about


@pytest.fixture
def spy(monkeypatch):
    """Record every call of the one driver (and let it run)."""
    calls = []
    real = finetune.fine_tune

    def recording(net, arch, *a, **k):
        calls.append({"arch": arch, **k})
        return real(net, arch, *a, **k)

    monkeypatch.setattr(finetune, "fine_tune", recording)
    return calls


def test_the_app_the_command_line_and_hitl_train_through_fine_tune(pairs, tmp_path, monkeypatch, spy):
    monkeypatch.setenv("CELLPOSE_WEB_HOME", str(tmp_path / "home"))
    imgs, labs = pairs
    # the Fine-tune tab's job
    for i in range(3):
        finetune.add_pair("s", imgs[i], labs[i], f"p{i}")
    monkeypatch.setattr(train_mod, "FINETUNE_DEFAULTS", {**train_mod.FINETUNE_DEFAULTS,
                                                          "lite": train_mod.FinetuneRecipe(1e-3, 0.1, 1, 1, 64, 2)})
    from cellpose_web import registry
    real = finetune.fine_tune

    def someone_takes_the_name(*a, **k):  # another lab member adds a model of that name meanwhile
        registry.add_lab_model(registry.builtin_path("lite"), "tab_ft")
        return real(*a, **k)

    monkeypatch.setattr(finetune, "fine_tune", someone_takes_the_name)
    res = finetune.run_finetune("s", "lite", "tab_ft", make_default=False, work_dir=tmp_path / "w")
    monkeypatch.setattr(finetune, "fine_tune", real)
    assert res["name"] == "tab_ft_2" and "saved as 'tab_ft_2'" in res["notices"][-1]  # the weights are kept
    assert spy[-1]["name"] == "tab_ft" and spy[-1]["arch"] == "lite"
    assert res["metadata"]["train_images"] and res["metadata"]["n_epochs"] == 1
    # --train
    d = tmp_path / "train"
    d.mkdir()
    for i in range(2):
        tifffile.imwrite(d / f"i{i}.tif", imgs[i])
        tifffile.imwrite(d / f"i{i}_masks.tif", labs[i])
    from cellpose_web.cli.main import main
    assert main(["--train", "--dir", str(d), "--pretrained_model", "lite", "--n_epochs", "1", "--bsize", "64",
                 "--nimg_per_epoch", "2", "--min_train_masks", "1", "--model_name_out", "cli_ft"]) == 0
    assert spy[-1]["name"] == "cli_ft" and spy[-1]["n_epochs"] == 1 and spy[-1]["min_train_masks"] == 1
    from cellpose_web import registry
    training = registry.resolve_model("cli_ft").training
    assert training["epochs_done"] == 1 and training["base_model"] == "lite"
    assert set(training) >= set(res["metadata"]) - {"training_set", "channels", "channels_source", "ap_before",
                                                    "ap_after"}  # one record, whichever face trained
    # a human-in-the-loop round
    from cellpose_web.workflows import hitl
    s = hitl.start_session("p", d, "lite", root=tmp_path / "projects", gpu=False,
                           recipe={"n_epochs": 1, "crops_per_epoch": 2, "batch_size": 1, "bsize": 64,
                                   "min_epochs": 1, "time_limit_s": 120})
    s.next_image()
    rec = s.save_correction(labs[0]).handle.wait(timeout=300)
    assert rec["status"] == "done" and spy[-1]["name"] == rec["model"]["name"] and spy[-1]["lr_schedule"] is not None


def test_fine_tune_job_checks_before_it_exists_and_fills_blanks(pairs, tmp_path, monkeypatch):
    """The Fine-tune tab's Start: bad numbers are refused before any job is made; blank boxes take
    the base model's recipe (the job's progress counts the recipe's epochs)."""
    from cellpose_web.service import jobs
    monkeypatch.setenv("CELLPOSE_WEB_HOME", str(tmp_path / "home"))
    imgs, labs = pairs
    for i in range(3):
        finetune.add_pair("s", imgs[i], labs[i], f"p{i}")
    with pytest.raises(BadInputError, match="learning_rate"):
        finetune.start_finetune_job("s", "lite", "x", "", 0.5, "", None)
    # the new model's name is checked before training, not after it (a taken name cost the whole run)
    from cellpose_web import registry
    (registry.models_dir() / "taken").mkdir(parents=True)
    with pytest.raises(BadInputError, match="'taken' already exists.*before training"):
        finetune.start_finetune_job("s", "lite", "taken", "", "", "", None)
    with pytest.raises(BadInputError, match="Invalid model name"):
        finetune.start_finetune_job("s", "lite", "Modèl ü 1", "", "", "", None)
    assert jobs.manager(None).list("train") == []
    seen = {}
    monkeypatch.setattr(finetune, "run_finetune", lambda *a, **k: seen.update(args=a) or {"name": "x"})
    job = finetune.start_finetune_job("s", "lite", "x", "", "", "", None)
    recipe = train_mod.finetune_defaults("lite")
    import time
    deadline = time.time() + 30
    while (jobs.manager(None).get(job.id) or {}).get("state") in jobs.ACTIVE and time.time() < deadline:
        time.sleep(0.05)
    assert seen["args"][3:6] == (recipe.n_epochs, recipe.learning_rate, recipe.weight_decay)


def test_out_of_memory_halves_the_batch_from_the_starting_weights(pairs, tmp_path, monkeypatch):
    """A run that runs out of (GPU) memory starts again from the base weights with half the batch and
    says so; at batch size 1 it stops with OutOfMemoryError (a message, not a traceback)."""
    import torch

    from cellpose_web.errors import OutOfMemoryError
    from cellpose_web.models import CellposeModel

    imgs, labs = pairs
    model = CellposeModel(gpu=False, pretrained_model="lite")
    start = {k: v.clone() for k, v in model.net.state_dict().items()}
    real_train_seg = train_mod.train_seg
    attempts = []

    def train_seg_running_out(net, *a, batch_size, **kw):
        attempts.append((batch_size, all(torch.equal(start[k], v) for k, v in net.state_dict().items())))
        if batch_size > 2:
            with torch.no_grad():  # the failed attempt has already changed the weights
                next(net.parameters()).add_(1.0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train_seg(net, *a, batch_size=batch_size, **kw)

    monkeypatch.setattr(train_mod, "train_seg", train_seg_running_out)
    run = finetune.fine_tune(model.net, "lite", imgs[:2], labs[:2], name="oom", save_dir=tmp_path,
                             retry_out_of_memory=True, learning_rate=1e-3, **{**FAST, "batch_size": 8})
    assert attempts == [(8, True), (4, True), (2, True)]  # each attempt starts from the base weights
    oom = [n for n in run.notices if "out of GPU memory" in n]  # (and one about the short run's warm-up)
    assert run.settings["batch_size"] == 2 and run.path.is_file() and len(oom) == 2
    assert "batch size 2" in oom[-1] and run.record({"name": "lite"}, [], [])["notices"] == list(run.notices)

    attempts.clear()
    monkeypatch.setattr(train_mod, "train_seg", lambda net, *a, batch_size, **kw: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(OutOfMemoryError, match="even one"):
        finetune.fine_tune(model.net, "lite", imgs[:2], labs[:2], name="oom2", save_dir=tmp_path,
                           retry_out_of_memory=True, **{**FAST, "batch_size": 2})
    # on the CPU (the default there) the error is not retried: it is not a GPU running out
    with pytest.raises(torch.OutOfMemoryError):
        finetune.fine_tune(model.net, "lite", imgs[:2], labs[:2], name="oom3", save_dir=tmp_path, **FAST)
