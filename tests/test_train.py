"""train_seg: Cellpose's schedule, repeatability, cancel, and that fine-tuning actually learns."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cellpose_web.engine import metrics
from cellpose_web.models import train
from cellpose_web.errors import CellposeWebError, TrainingDivergedError
from cellpose_web.engine.nets.unet import LiteUNet


def test_learning_rate_schedule_matches_cellpose():
    lr = train.learning_rate_schedule(1e-5, 100)
    assert len(lr) == 100
    assert lr[0] == 0 and np.isclose(lr[9], 1e-5)
    assert np.allclose(lr[10:50], 1e-5)
    assert np.isclose(lr[50], 0.5e-5) and np.isclose(lr[54], 0.5e-5) and np.isclose(lr[55], 0.25e-5)
    assert np.isclose(lr[-1], 1e-5 / 1024)
    lr400 = train.learning_rate_schedule(1e-3, 400)
    assert len(lr400) == 400 and np.isclose(lr400[299], 1e-3) and np.isclose(lr400[300], 0.5e-3)
    assert np.allclose(train.learning_rate_schedule(1e-3, 20)[10:], 1e-3)


def _crops(data_dir, names, size=192):
    imgs, labels = [], []
    for name in names:
        img = tifffile.imread(data_dir / "nuclei_2d" / "train" / f"{name}.tif")
        lbl = tifffile.imread(data_dir / "nuclei_2d" / "train" / f"{name}_masks.tif")
        y0, x0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2  # central crop: has nuclei
        imgs.append(img[y0:y0 + size, x0:x0 + size].astype(np.float32))
        labels.append(lbl[y0:y0 + size, x0:x0 + size].astype(np.int32))
    return imgs, labels


def test_train_seg_rejects_bad_input():
    net = LiteUNet(widths=(8, 16, 32, 64))
    with pytest.raises(CellposeWebError, match="no training images"):
        train.train_seg(net, [], [])
    with pytest.raises(CellposeWebError, match="does not match"):
        train.train_seg(net, [np.zeros((64, 64))], [np.zeros((32, 32), int)], n_epochs=1)
    with pytest.raises(CellposeWebError, match="min_train_masks"):
        train.train_seg(net, [np.random.rand(64, 64)], [np.zeros((64, 64), int)], n_epochs=1)


def test_train_seg_is_repeatable_and_cancellable(data_dir, tmp_path):
    imgs, labels = _crops(data_dir, ["2022-10-14-U2OS-3"], size=128)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = LiteUNet(widths=(8, 16, 32, 64))
        _, losses, _ = train.train_seg(net, imgs, labels, n_epochs=3, learning_rate=1e-3, bsize=64,
                                       save_path=tmp_path, model_name="rep", seed=7)
        runs.append(losses)
    assert np.allclose(runs[0], runs[1], rtol=1e-4)

    seen = []
    net = LiteUNet(widths=(8, 16, 32, 64))
    path, losses, _ = train.train_seg(net, imgs, labels, n_epochs=10, learning_rate=1e-3, bsize=64,
                                      save_path=tmp_path, model_name="stop",
                                      callback=lambda e, l, t, s: seen.append(e) or e < 1)
    assert seen == [0, 1] and len(losses) == 2 and path.exists()


@pytest.mark.slow
def test_finetune_lowers_loss_and_raises_ap(data_dir, tmp_path):
    """Three training crops, a held-out crop: loss falls and AP@0.5 on the held-out crop rises."""
    from cellpose_web.models import CellposeModel

    imgs, labels = _crops(data_dir, ["2022-10-14-U2OS-3", "2022-10-14-U2OS-5", "2022-05-25-RPE1-1"])
    held_img, held_lbl = _crops(data_dir, ["2022-10-14-U2OS-9"], size=256)
    torch.manual_seed(0)
    base = tmp_path / "base.pt"
    train.save_network(LiteUNet(widths=(16, 32, 64, 128)), base)
    model = CellposeModel(pretrained_model=str(base))

    def ap50():
        masks = model.eval(held_img[0], diameter=30)[0]
        return float(metrics.average_precision(held_lbl[0], masks)[0][0])

    ap_before = ap50()
    path, losses, _ = train.train_seg(model.net, imgs, labels, n_epochs=40, learning_rate=3e-3,
                                      weight_decay=1e-4, batch_size=4, nimg_per_epoch=8, bsize=128,
                                      save_path=tmp_path, model_name="ft", seed=0)
    ap_after = ap50()
    assert path.exists()
    assert losses[-5:].mean() < 0.6 * losses[:3].mean()
    assert ap_after > ap_before + 0.3, (ap_before, ap_after)


# ---------------------------------------------------------------------------------------------
# Cellpose's Python habits: keywords, per-epoch progress, io.logger_setup, load by name
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_data(data_dir):
    return _crops(data_dir, ["2022-10-14-U2OS-3"], size=128)


@pytest.fixture
def restore_logging():
    """io.logger_setup reconfigures the 'cellpose_web' logger: put it back after the test."""
    import logging

    log = logging.getLogger("cellpose_web")
    saved = (list(log.handlers), log.propagate, log.level)
    yield
    for h in list(log.handlers):
        log.removeHandler(h)
        if h not in saved[0]:
            h.close()
    for h in saved[0]:
        log.addHandler(h)
    log.propagate, log.level = saved[1], saved[2]


def test_unknown_keyword_is_a_type_error_naming_it(tiny_data, tmp_path):
    imgs, labels = tiny_data
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'train_batch_size'; did you mean 'batch_size'"):
        train.train_seg(LiteUNet(widths=(8, 16, 32, 64)), imgs, labels, train_batch_size=8, save_path=tmp_path)
    with pytest.raises(TypeError, match="'n_epoch'"):
        train.train_seg(LiteUNet(widths=(8, 16, 32, 64)), imgs, labels, n_epoch=3, save_path=tmp_path)
    assert not (tmp_path / "models").exists()  # refused before any work


def test_a_non_finite_loss_stops_training_with_a_typed_error_and_saves_nothing(tiny_data, tmp_path, monkeypatch):
    imgs, labels = tiny_data
    real, calls = train.flow_loss, []

    def blows_up_in_epoch_two(y, target):
        calls.append(1)
        loss = real(y, target)
        return loss * float("nan") if len(calls) > 2 else loss  # 2 steps per epoch below

    monkeypatch.setattr(train, "flow_loss", blows_up_in_epoch_two)
    epochs = []
    with pytest.raises(TrainingDivergedError, match=r"epoch 2: the loss became nan.*Lower the learning rate"):
        train.train_seg(LiteUNet(widths=(8, 16, 32, 64)), imgs, labels, n_epochs=4, batch_size=1, nimg_per_epoch=2,
                        bsize=64, learning_rate=1e-3, save_path=tmp_path, model_name="diverged", min_train_masks=1,
                        callback=lambda e, *a: epochs.append(e))
    assert epochs == [0] and len(calls) == 4 and not (tmp_path / "models" / "diverged").exists()


def test_label_flows_computed_once_across_calls(tiny_data, monkeypatch):
    imgs, labels = tiny_data
    calls = []
    orig = train.dynamics.labels_to_flows
    monkeypatch.setattr(train.dynamics, "labels_to_flows", lambda lbls, **kw: calls.append(1) or orig(lbls, **kw))
    lab = labels[0].astype(np.int64) + 0  # a label image no other test used (fresh cache key)
    lab[lab > 0] += 7
    a = train.prepare_training_data([imgs[0]], [lab], min_train_masks=1)[1]
    b = train.prepare_training_data([imgs[0]], [lab], min_train_masks=1)[1]
    assert len(calls) == 1 and np.array_equal(a[0], b[0])
    a[0][:] = 0  # callers get their own copy: the cache is not changed through it
    c = train.prepare_training_data([imgs[0]], [lab], min_train_masks=1)[1]
    assert len(calls) == 1 and np.array_equal(c[0], b[0])
    lab2 = lab.copy()
    lab2[lab2 == lab2.max()] = 0  # different labels: computed anew
    train.prepare_training_data([imgs[0]], [lab2], min_train_masks=1)
    assert len(calls) == 2


def _conv_dtypes(net, seen):
    """Record the output dtype of every convolution of ``net`` while it trains."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype) if mod.training else None)


def test_mixed_precision_trains_in_bf16_and_keeps_float32_weights(tiny_data, tmp_path):
    imgs, labels = tiny_data
    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        net = LiteUNet(widths=(8, 16, 32, 64))
        seen = []
        _conv_dtypes(net, seen)
        path, losses, _ = train.train_seg(net, imgs, labels, n_epochs=2, bsize=64, batch_size=2, seed=0,
                                          learning_rate=1e-3, save_path=tmp_path, mixed_precision=bf16)
        assert seen and set(seen) == {torch.bfloat16 if bf16 else torch.float32}
        assert all(p.dtype == torch.float32 for p in net.parameters()) and path.exists()
        runs[bf16] = losses
    # the same crops and weights: bfloat16 gives nearly the float32 loss (not a different computation)
    assert np.isfinite(runs[True]).all() and np.allclose(runs[True], runs[False], rtol=0.05), runs


def test_channels_last_and_fused_optimizer_train_as_before(tiny_data, tmp_path, monkeypatch):
    """The speed-ups (channels-last layout, fused AdamW) leave the float32 losses and weights as the
    plain layout and optimizer give them, and hand the network back in its usual layout."""
    from cellpose_web.engine.nets.cpnet import CPnet

    imgs, labels = tiny_data

    def run(fast: bool):
        torch.manual_seed(0)
        net = CPnet((2, 8, 16, 32))
        layouts = []
        net.downsample.down[0].conv[0][2].register_forward_hook(
            lambda mod, inp, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        if not fast:
            monkeypatch.setattr(train, "_CONV_NETS", ())
            monkeypatch.setattr(train, "_adamw", lambda n, lr, wd: torch.optim.AdamW(
                [p for p in n.parameters() if p.requires_grad], lr=lr, weight_decay=wd, foreach=False))
        path, losses, _ = train.train_seg(net, imgs, labels, channels=[0, 0], n_epochs=3, bsize=64, batch_size=2,
                                          nimg_per_epoch=4, learning_rate=1e-3, weight_decay=1e-5, rescale=True,
                                          min_train_masks=1, seed=3, save_path=tmp_path, model_name=f"cl{fast}",
                                          mixed_precision=False)
        monkeypatch.undo()
        assert layouts and set(layouts) == {fast}
        return net, path, losses

    fast_net, fast_path, fast_losses = run(True)
    _, _, plain_losses = run(False)
    # epochs 2 and 3 see the weights the earlier steps made, so equal losses mean equal updates (the
    # weights themselves are not compared: a conv bias before BatchNorm gets a ~0 gradient that Adam
    # scales up to +-lr, so it drifts with rounding in either version)
    assert np.allclose(fast_losses, plain_losses, rtol=1e-4), (fast_losses, plain_losses)
    assert all(v.is_contiguous() for v in fast_net.state_dict().values())
    assert all(v.is_contiguous() for v in torch.load(fast_path, weights_only=True).values())


def test_bf16_is_the_default_only_where_it_is_native(monkeypatch):
    from cellpose_web.engine.nets.cpnet import CPnet

    unet, lite = CPnet((2, 8, 16, 32)), LiteUNet(widths=(8, 16, 32, 64))
    monkeypatch.delenv(train.TRAIN_BF16_ENV, raising=False)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    from cellpose_web.engine.nets.vit_sam import CPSAMNet

    sam = CPSAMNet(embed_dim=32, depth=1, num_heads=2, out_chans=16)
    monkeypatch.setattr(train, "cuda_has_bf16", lambda device: True)
    assert train.training_uses_bf16(unet, "cpu") and train.training_uses_bf16(lite, "cpu")
    assert not train.training_uses_bf16(unet, "cpu", mixed_precision=False)
    # CUDA: Cellpose-SAM in bf16 autocast, the convolutional families in float32 (TF32) as Cellpose 3
    assert train.training_uses_bf16(sam, "cuda") and not train.training_uses_bf16(sam, "cuda", mixed_precision=False)
    assert not train.training_uses_bf16(unet, "cuda") and not train.training_uses_bf16(lite, "cuda")
    assert not train.training_uses_bf16(sam, "cpu")  # Cellpose-SAM on a CPU: float32
    monkeypatch.setattr(train, "cuda_has_bf16", lambda device: False)  # e.g. a V100 or a T4
    assert not train.training_uses_bf16(sam, "cuda")
    monkeypatch.setenv(train.TRAIN_BF16_ENV, "0")
    assert not train.training_uses_bf16(unet, "cpu") and train.training_uses_bf16(unet, "cpu", mixed_precision=True)
    monkeypatch.setenv(train.TRAIN_BF16_ENV, "1")
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.training_uses_bf16(unet, "cpu")
    monkeypatch.delenv(train.TRAIN_BF16_ENV)
    assert not train.training_uses_bf16(unet, "cpu") and not train.training_uses_bf16(lite, "cpu")


def test_cuda_tf32_is_scoped_to_training():
    """Cellpose 4 trains with TF32 matrix products on CUDA (it turns them on at import); train_seg does
    the same only while it trains and restores the caller's settings, also after an error."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with train.cuda_tf32("cpu"):
            assert not torch.backends.cuda.matmul.allow_tf32  # other devices: untouched
        with pytest.raises(ValueError):
            with train.cuda_tf32("cuda:0"):
                assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                raise ValueError("a step failed")
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_cellpose_keywords_accepted_with_notice_and_epochs_logged(tiny_data, tmp_path, caplog):
    imgs, labels = tiny_data
    caplog.set_level("INFO", logger="cellpose_web")
    path, losses, _ = train.train_seg(
        LiteUNet(widths=(8, 16, 32, 64)), train_data=imgs, train_labels=labels, n_epochs=2, bsize=64,
        learning_rate=1e-3, save_path=tmp_path, model_name="kw", SGD=True, compute_flows=True, load_files=False,
        class_weights=[1.0, 1.0], channels=[0, 0], momentum=0.9, rgb=False)
    text = caplog.text
    for word in ("SGD is deprecated", "class_weights", "channels is not used by Cellpose 4", "momentum", "rgb"):
        assert word in text, word
    epochs = [r.getMessage() for r in caplog.records if r.name == "cellpose_web.train" and
              r.getMessage().startswith("epoch ")]
    assert [m.split(",")[0] for m in epochs] == ["epoch 0", "epoch 1"]
    assert f"train_loss={losses[1]:.4f}" in epochs[1]
    assert path == tmp_path / "models" / "kw" and path.is_file()


def test_trained_model_loads_by_name_and_by_path(tiny_data, tmp_path, monkeypatch):
    from cellpose_web import registry
    from cellpose_web.models import CellposeModel

    imgs, labels = tiny_data
    monkeypatch.chdir(tmp_path)  # save_path=None: ./models/<model_name>, as Cellpose
    net = LiteUNet(widths=(8, 16, 32, 64))
    path, _, _ = train.train_seg(net, imgs, labels, n_epochs=1, bsize=64, learning_rate=1e-3,
                                 model_name="my_new_model")
    assert path == tmp_path / "models" / "my_new_model"
    by_name = CellposeModel(pretrained_model="my_new_model")
    by_path = CellposeModel(pretrained_model=path)
    assert by_name.model_name == "my_new_model" and by_name.pretrained_model == str(path.resolve())
    trained = net.state_dict()
    for m in (by_name, by_path):
        sd = m.net.state_dict()
        assert sd.keys() == trained.keys() and all(torch.equal(sd[k], trained[k].float()) for k in sd)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        registry.resolve_model("my_new_model")
    # a name that is a built-in model's is not taken over: the trained model loads by its path only
    path2, _, _ = train.train_seg(net, imgs, labels, n_epochs=1, bsize=64, learning_rate=1e-3, model_name="lite")
    assert registry.resolve_model("lite").source == "builtin" and CellposeModel(pretrained_model=path2).arch == "lite"


def test_logger_setup_logs_to_console_and_file(tmp_path, capsys, restore_logging):
    import logging

    from cellpose_web import io

    log, log_file = io.logger_setup(tmp_path / "logs")
    assert log.name == "cellpose_web" and log_file == tmp_path / "logs" / "run.log"
    logging.getLogger("cellpose_web.train").info("epoch 7, train_loss=0.1234")
    logging.getLogger("cellpose_web.train").debug("a detail for the file only")
    out = capsys.readouterr().out
    assert "epoch 7, train_loss=0.1234" in out and "a detail" not in out
    text = log_file.read_text()
    assert "epoch 7, train_loss=0.1234" in text and "a detail for the file only" in text
    io.logger_setup(tmp_path / "logs")  # a second call starts a fresh file, without doubled handlers
    logging.getLogger("cellpose_web.train").info("once")
    assert capsys.readouterr().out.count("once") == 1 and "epoch 7" not in log_file.read_text()


MANUAL_SCRIPT = '''
from cellpose_web import io, models, train
io.logger_setup()
train_dir, test_dir = "train", "test"
output = io.load_train_test_data(train_dir, test_dir, image_filter="_img",
                                 mask_filter="_masks", look_one_level_down=False)
images, labels, image_names, test_images, test_labels, image_names_test = output

# e.g. retrain a Cellpose model
model = models.CellposeModel(gpu=True)

model_path, train_losses, test_losses = train.train_seg(model.net,
                            train_data=images, train_labels=labels,
                            test_data=test_images, test_labels=test_labels,
                            weight_decay=0.1, learning_rate=1e-5,
                            n_epochs=100, model_name="my_new_model")
'''


@pytest.mark.slow
def test_manual_training_script_runs_with_only_the_import_changed(data_dir, tmp_path):
    """Cellpose's documented training script (n_epochs cut to 2): per-epoch progress on stdout, and
    the model then loads by its name."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    for folder, names, size in (("train", ["2022-10-14-U2OS-3", "2022-05-25-RPE1-1"], 128),
                                ("test", ["2022-10-14-U2OS-9"], 128)):
        (tmp_path / folder).mkdir()
        imgs, labels = _crops(data_dir, names, size=size)
        for name, img, lbl in zip(names, imgs, labels):
            tifffile.imwrite(tmp_path / folder / f"{name}_img.tif", img)
            tifffile.imwrite(tmp_path / folder / f"{name}_masks.tif", lbl.astype(np.uint16))
    script = MANUAL_SCRIPT.replace("n_epochs=100", "n_epochs=2")
    script += "\nprint('loaded', models.CellposeModel(pretrained_model='my_new_model').model_name)\n"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    epochs = [ln for ln in r.stdout.splitlines() if "[train INFO] epoch " in ln]
    assert [ln.split("epoch ")[1].split(",")[0] for ln in epochs] == ["0", "1"], r.stdout
    assert "train_loss=" in epochs[0] and "loaded my_new_model" in r.stdout
    assert (tmp_path / "models" / "my_new_model").is_file()
    assert "epoch 1," in (Path(env["CELLPOSE_WEB_HOME"]) / "run.log").read_text()


def test_no_host_sync_per_training_step(tiny_data, tmp_path, monkeypatch):
    """The epoch's loss is summed on the device: one host read per epoch, however many steps (on a
    GPU a per-step ``.item()`` stalls the queue of kernels)."""
    imgs, labels = tiny_data
    reads = {"item": 0, "float": 0}
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counting_item(t):
        reads["item"] += 1
        return item(t)

    def counting_float(t):
        reads["float"] += 1
        return to_float(t)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "__float__", counting_float)
    _, losses, _ = train.train_seg(LiteUNet(widths=(8, 16, 32, 64)), imgs, labels, n_epochs=2, batch_size=1,
                                   nimg_per_epoch=6, bsize=64, min_train_masks=1, save_path=tmp_path,
                                   learning_rate=1e-3)
    assert np.all(np.asarray(losses) > 0)
    assert reads["item"] == 0 and reads["float"] <= 2 * 2  # 12 steps; a read or two per epoch


def test_training_flows_for_an_apple_gpu_are_made_on_the_cpu():
    """MPS has no float64 (the flows' heat diffusion): the label flows are made on the CPU there (no MPS
    tensor is made, so this runs anywhere) and equal the CPU's."""
    lab = np.zeros((40, 40), np.int64)
    lab[5:15, 5:15], lab[20:35, 18:30] = 1, 2
    img = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    _, on_mps, _, _ = train.prepare_training_data([img], [lab + 0], min_train_masks=1, device=torch.device("mps"))
    _, on_cpu, _, _ = train.prepare_training_data([img], [lab + 0], min_train_masks=1, device=torch.device("cpu"))
    assert np.array_equal(np.asarray(on_mps[0]), np.asarray(on_cpu[0]))
