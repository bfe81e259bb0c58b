"""The shipped `lite` weights: they load offline, say what they are, and segment real nuclei."""
import numpy as np
import tifffile

from cellpose_web import registry
from cellpose_web.engine.metrics import average_precision
from cellpose_web.models import CellposeModel


def test_lite_metadata_is_a_model_card():
    info = registry.inspect_checkpoint(registry.builtin_path("lite"))
    meta = info["meta"]
    assert info["arch"] == "lite" and meta["params"] < 3_000_000
    assert "command" in meta["recipe"] and meta["train_seconds"] > 0
    assert "nuclei_2d/train" in meta["data"]["real"] and meta["data"]["synthetic"] > 0
    assert meta["validation"]["diameter"].startswith("None")
    assert set(meta["validation"]["ap_mean_over_images"]) == {"0.5", "0.75", "0.9"}


def test_lite_segments_a_validation_image(data_dir):
    """diameter=None on a whole 768x869 validation image (never trained on): far above chance."""
    img = tifffile.imread(data_dir / "nuclei_2d" / "val" / "2022-10-14-U2OS-1.tif")
    true = tifffile.imread(data_dir / "nuclei_2d" / "val" / "2022-10-14-U2OS-1_masks.tif")
    model = CellposeModel(pretrained_model="lite")
    masks, flows, styles = model.eval(img, diameter=None)
    assert masks.shape == img.shape and masks.dtype == np.uint16
    ap = average_precision([true], [masks])[0][0]
    # measured 0.88 / 0.84; a model predicting blobs at random or one merged mask scores ~0
    assert ap[0] >= 0.8 and ap[1] >= 0.65, ap
    assert 20 < model.diam_estimate < 40  # the nuclei are ~30 px
