"""Fine-tune and Models tabs in a real browser: upload image+mask pairs, fine-tune for 2 epochs,
see the new model in the Models table and in Segment's model list."""
import io
import zipfile

import pytest
import tifffile
from playwright.sync_api import expect

from tests.e2e.conftest import shot

pytestmark = pytest.mark.e2e

TRAIN = ["2022-05-26-RPE1-2199", "2022-10-14-U2OS-2", "2023-05-31-misc-1"]


def _pairs_zip(data_dir, tmp_path):
    z = tmp_path / "pairs.zip"
    src = data_dir / "nuclei_2d" / "train"
    names = sorted(p.name[:-len("_masks.tif")] for p in src.glob("*_masks.tif"))[:3]
    with zipfile.ZipFile(z, "w") as zf:
        for n in names:
            img = tifffile.imread(src / f"{n}.tif")[:256, :256]
            m = tifffile.imread(src / f"{n}_masks.tif")[:256, :256]
            for name, arr in ((f"{n}.tif", img), (f"{n}_masks.tif", m)):
                b = io.BytesIO()
                tifffile.imwrite(b, arr)
                zf.writestr(name, b.getvalue())
    return z, names


def add_pairs(page, set_name: str, zip_path, n_pairs: int) -> None:
    """In the Fine-tune tab, upload a zip of image + mask pairs into training set `set_name`."""
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#ft-set input").fill(set_name)
    page.get_by_text("Upload image + mask pairs").click()
    page.set_input_files("#ft-pairs input[type=file]", str(zip_path))
    page.wait_for_selector("#ft-pairs :text('pairs')")
    page.get_by_role("button", name="Add pairs to the training set").click()
    page.wait_for_selector(f"text=Added {n_pairs} pair(s)")


def test_finetune_two_epochs_new_model_everywhere(page, data_dir, tmp_path):
    z, names = _pairs_zip(data_dir, tmp_path)
    add_pairs(page, "e2e_set", z, 3)
    page.locator("#ft-name textarea, #ft-name input").first.fill("e2e_tuned")
    # the boxes hold the base model's own fine-tune defaults (lite's, not Cellpose-SAM's 1e-5)
    from cellpose_web.models.train import FINETUNE_DEFAULTS
    expect(page.locator("#ft-recipe")).to_contain_text("Defaults for lite")
    assert float(page.locator("#ft-lr input").input_value()) == FINETUNE_DEFAULTS["lite"].learning_rate
    assert int(page.locator("#ft-epochs input").input_value()) == FINETUNE_DEFAULTS["lite"].n_epochs
    page.locator("#ft-epochs input").fill("2")
    page.locator("#ft-lr input").fill("0.001")
    shot(page, "30_finetune_ready")
    page.click("#ft-start")
    page.wait_for_selector("#ft-status :text('Done: model')", timeout=540_000)
    status = page.inner_text("#ft-status")
    assert "e2e_tuned" in status and "AP (IoU 0.5)" in status
    shot(page, "31_finetune_done")
    # Models tab lists it with its training metadata
    page.get_by_role("tab", name="Models").click()
    page.click("#models-refresh")
    expect(page.locator("#models-table")).to_contain_text("e2e_tuned", timeout=30_000)
    shot(page, "32_models")
    # Segment's model list offers it
    page.get_by_role("tab", name="Segment").click()
    page.locator("#seg-model input").click()
    expect(page.locator("ul[role=listbox]")).to_contain_text("e2e_tuned", timeout=30_000)
    shot(page, "33_segment_model_list")
