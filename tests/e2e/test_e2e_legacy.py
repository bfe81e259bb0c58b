"""A lab's Cellpose 3 model in a real browser: upload it in the Models tab, segment a two-channel
whole-cell image with its cytoplasm and nucleus channels, run it in Batch and fine-tune from it."""
import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import tifffile
from playwright.sync_api import expect

from cellpose_web.engine import synthetic
from cellpose_web.models import CellposeModel
from tests.e2e.conftest import shot
from tests.e2e.test_e2e_finetune import add_pairs

pytestmark = pytest.mark.e2e


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator("ul[role=listbox] li", has_text=option).first.click()


def test_cellpose3_model_uploaded_segments_batches_and_fine_tunes(page, cp3_dir, cp3_files, tmp_path):
    rgb = np.load(cp3_dir / "cp3_eval.npz")["rgb"]  # R = nuclei, G = cytoplasm
    img_path = tmp_path / "whole_cells.tif"
    tifffile.imwrite(img_path, rgb)
    weights = tmp_path / "lab_cyto3_finetune.pth"
    weights.write_bytes(cp3_files[0].read_bytes())  # the Cellpose 3 checkpoint of the reference

    # Models tab: upload the Cellpose 3 checkpoint
    page.get_by_role("tab", name="Models").click()
    page.set_input_files("#models-upload input[type=file]", str(weights))
    page.get_by_label("Name for it").fill("lab_cp3")
    page.get_by_role("button", name="Add to lab models").click()
    expect(page.locator("#models-msg")).to_contain_text("Cellpose 1-3 U-Net", timeout=60_000)
    expect(page.locator("#models-table")).to_contain_text("whole cells")

    # Segment tab: the segmentation channels in file numbering, mapped to the model's cytoplasm and
    # nucleus inputs (what Cellpose 3's channels=[2, 1] means: green = file channel 1, red = 0)
    page.get_by_role("tab", name="Segment").click()
    choose(page, "seg-model", "lab_cp3")
    page.set_input_files("#seg-file input[type=file]", str(img_path))
    page.wait_for_selector("#seg-info :text('whole_cells.tif')")
    box = page.locator("#seg-channels textarea, #seg-channels input").first
    box.fill("1,0")
    box.press("Tab")
    expect(page.locator("#seg-channel-map")).to_contain_text("cytoplasm = channel 1, nucleus = channel 0")
    page.locator("#seg-diameter input, #seg-diameter textarea").first.fill("40")
    page.click("#seg-run")
    page.wait_for_function("() => { const s = document.querySelector('#seg-count strong');"
                           " return s && /^\\d+ cells?$/.test(s.innerText.trim()); }", timeout=300_000)
    n = int(page.inner_text("#seg-count strong").split()[0])
    model = CellposeModel(pretrained_model=str(weights))
    expected = model.eval(rgb, channels=[2, 1], channel_axis=-1, diameter=40)[0]
    assert n == int(expected.max()) >= 10
    shot(page, "60_legacy_segment")

    # Batch tab: the same model on the same file (no channels chosen: the first two, as Cellpose 3)
    page.get_by_role("tab", name="Batch").click()
    page.set_input_files("#batch-files input[type=file]", str(img_path))
    page.wait_for_selector("#batch-files :text('whole_cells')")
    choose(page, "batch-model", "lab_cp3")
    page.click("#batch-run")
    page.wait_for_selector("#batch-status :text('1 of 1 image(s)')", timeout=300_000)
    with page.expect_download() as dl:
        page.locator('#batch-result a[download="summary.csv"]').click()
    summ = pd.read_csv(dl.value.path(), comment="#")
    batch_expected = model.eval(rgb, channel_axis=-1, diameter=None)[0]
    assert summ.loc[0, "model"] == "lab_cp3" and int(summ.loc[0, "n_cells"]) == int(batch_expected.max())
    shot(page, "61_legacy_batch")

    # Fine-tune tab: one epoch from the uploaded model on two small whole-cell pairs
    z = tmp_path / "pairs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for seed in (11, 12):
            s = synthetic.synthetic_sample(np.random.default_rng(seed), (128, 128), "cyto", diameter=30)
            for name, arr in ((f"cells{seed}.tif", s.image[0]), (f"cells{seed}_masks.tif", s.labels.astype(np.uint16))):
                b = io.BytesIO()
                tifffile.imwrite(b, arr)
                zf.writestr(name, b.getvalue())
    add_pairs(page, "legacy_set", z, 2)
    choose(page, "ft-base", "lab_cp3")
    # the base model's fine-tune defaults fill the boxes first (Cellpose 3's recipe), then we override
    page.wait_for_selector("#ft-recipe :text('Defaults for lab_cp3')")
    assert float(page.locator("#ft-lr input").input_value()) == 0.005
    page.locator("#ft-name textarea, #ft-name input").first.fill("lab_cp3_tuned")
    page.locator("#ft-epochs input").fill("1")
    page.click("#ft-start")
    page.wait_for_selector("#ft-status :text('Done: model')", timeout=540_000)
    assert "lab_cp3_tuned" in page.inner_text("#ft-status")
    shot(page, "62_legacy_finetuned")
    tuned = CellposeModel(pretrained_model="lab_cp3_tuned")
    assert tuned.legacy
