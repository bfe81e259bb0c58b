"""The README's PIEZO1 recipe in a real browser, followed literally, on a PIEZO1-style ImageJ file
(channel 0 = PIEZO1-HaloTag puncta, 1 = cytoplasm, 2 = DAPI, 0.1 µm/px; tests/piezo_cells.py):
upload, tick *Count puncta per cell*, Run. The app switches from the nuclei model to the whole-cell
model, keeps the puncta channel out of segmentation, and the per-cell counts meet issue #21's bar
with the masks it predicted; Batch with the same two steps gives the same table, and so does Python."""
import re

import numpy as np
import pandas as pd
import pytest
from playwright.sync_api import expect

from cellpose_web import io
from tests import piezo_cells
from tests.e2e.conftest import shot
from tests.test_piezo_recipe import readme_python_recipe

pytestmark = pytest.mark.e2e


def _download(page, selector):
    with page.expect_download() as dl:
        page.locator(selector).first.click()
    return dl.value.path()


def test_readme_piezo1_recipe_in_segment_and_batch(page, tmp_path):
    path = tmp_path / "piezo1.tif"
    sample = piezo_cells.write(path, seed=21)
    # --- Segment tab: upload, tick "Count puncta per cell", Run
    page.set_input_files("#seg-file input[type=file]", str(path))
    page.wait_for_selector("#seg-info :text('0.1 µm/px')")
    expect(page.locator("#seg-info")).to_contain_text("0 = PIEZO1-HaloTag")
    page.get_by_text("Puncta (e.g. PIEZO1)").click()
    expect(page.locator("#seg-model input")).to_have_value(re.compile(r"^lite "))  # the nuclei model is the default here
    page.locator("#seg-puncta-on input").check()
    expect(page.locator("#seg-model input")).to_have_value(re.compile(r"^cp_cyto "), timeout=20_000)
    assert page.locator("#seg-puncta-ch input").input_value() == "0"
    expect(page.locator("#seg-channel-map")).to_contain_text(
        "cytoplasm = channel 1 (cytoplasm), nucleus = channel 2 (DAPI)", timeout=20_000)
    expect(page.locator("#seg-channel-map")).to_contain_text("puncta counted on channel 0 (PIEZO1-HaloTag)")
    page.click("#seg-run")
    page.wait_for_selector("#seg-count .cpw-puncta", timeout=300_000)
    text = page.inner_text("#seg-count")
    shot(page, "30_puncta_segment")
    assert "model **cp_cyto**" in page.inner_html("#seg-count") or "cp_cyto" in text
    assert "lay just outside a mask and count for the nearest cell (within 0.4 µm)" in text
    page.get_by_role("tab", name="Downloads").click()
    seg_table = pd.read_csv(_download(page, '#seg-files a[download$="_cells.csv"]'), comment="#")
    masks = io.imread(str(_download(page, '#seg-files a[download$="_cp_masks.tif"]')))
    sc = piezo_cells.scores(sample, masks, seg_table)
    piezo_cells.assert_lab_numbers(sc)
    np.testing.assert_allclose(seg_table["puncta_density_per_um2"], seg_table["puncta_count"] / seg_table["area_um2"],
                               rtol=1e-4)
    # --- Batch tab: the same two steps
    page.get_by_role("tab", name="Batch").click()
    page.set_input_files("#batch-files input[type=file]", str(path))
    page.wait_for_selector("#batch-files :text('piezo1')")
    page.locator("#tab-batch").get_by_text("Puncta (e.g. PIEZO1)").click()
    page.locator("#batch-puncta-on input").check()
    expect(page.locator("#batch-model input")).to_have_value(re.compile(r"^cp_cyto "), timeout=20_000)
    page.click("#batch-run")
    page.wait_for_selector("#batch-status :text('1 of 1 image(s)')", timeout=300_000)
    shot(page, "31_puncta_batch")
    batch_cells = pd.read_csv(_download(page, '#batch-result a[download="all_cells.csv"]'), comment="#")
    summ = pd.read_csv(_download(page, '#batch-result a[download="summary.csv"]'), comment="#").iloc[0]
    assert summ.model == "cp_cyto" and summ.n_cells == len(seg_table)
    assert summ.puncta_in_cells == seg_table["puncta_count"].sum()
    pd.testing.assert_frame_equal(batch_cells.drop(columns=["image", "path"]), seg_table)
    # --- and the README's Python block: the same counts
    _, py_table, _ = readme_python_recipe(path)
    np.testing.assert_array_equal(py_table["puncta_count"], seg_table["puncta_count"])


def test_pixel_size_typed_with_a_decimal_comma(page, tmp_path):
    """'0,2' in the pixel-size box is 0.2 µm/px (a browser number box made it 2, silently)."""
    path = tmp_path / "piezo1.tif"
    piezo_cells.write(path, seed=5)
    page.set_input_files("#seg-file input[type=file]", str(path))
    page.wait_for_selector("#seg-info :text('0.1 µm/px')")
    page.locator("#seg-pixel textarea, #seg-pixel input").first.fill("0,2")
    page.click("#seg-run")
    page.wait_for_selector("#seg-count :text('cells')", timeout=300_000)
    page.get_by_role("tab", name="Downloads").click()
    table = pd.read_csv(_download(page, '#seg-files a[download$="_cells.csv"]'), comment="#")
    np.testing.assert_allclose(table["area_um2"], table["area_px"] * 0.2 ** 2, rtol=1e-6)
