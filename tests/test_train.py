"""train_seg: Cellpose's schedule, repeatability, cancel, and that fine-tuning actually learns."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cellpose_web import metrics, train
from cellpose_web.errors import CellposeWebError
from cellpose_web.nets.unet import LiteUNet


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
