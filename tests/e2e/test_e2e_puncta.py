"""The PIEZO1 workflow in a real browser: a 3-channel TIFF (puncta on channel 0, membrane on 1, DAPI
on 2, 0.1 µm/px in the ImageJ metadata) segmented on channels 1 + 2 with puncta counted on channel 0,
in the Segment tab and in Batch; the numbers planted come back, and Batch gives the Python table."""
import numpy as np
import pandas as pd
import pytest

from cellpose_web import io, measure, models
from tests import piezo_image
from tests.e2e.conftest import shot

pytestmark = pytest.mark.e2e


def _fill(page, sel, value):
    box = page.locator(f"{sel} textarea:visible, {sel} input:visible").first
    box.wait_for(state="visible")
    box.fill(str(value))
    box.press("Tab")
    assert box.input_value() == str(value)


def test_puncta_per_cell_in_segment_and_batch(page, tmp_path):
    planted = piezo_image.make(tmp_path / "piezo1.tif")
    n_in = sum(planted.counts)
    # --- Segment tab
    page.set_input_files("#seg-file input[type=file]", str(planted.path))
    page.wait_for_selector("#seg-info :text('0.1 µm/px')")
    page.get_by_text("More parameters").first.click()
    _fill(page, "#seg-channels", "1,2")
    page.get_by_text("Puncta (e.g. PIEZO1)").click()
    page.locator("#seg-puncta-on input").check()
    _fill(page, "#seg-puncta-ch", 0)
    page.click("#seg-run")
    page.wait_for_selector("#seg-count .cpw-puncta", timeout=180_000)
    text = page.inner_text("#seg-count")
    shot(page, "30_puncta_segment")
    assert f"{len(planted.counts)} cells" in text
    assert f"on channel 0: {n_in} inside cells" in text and f"{planted.outside} outside cells" in text
    assert "per µm²" in text
    page.get_by_role("tab", name="Downloads").click()
    with page.expect_download() as dl:
        page.locator('#seg-files a[download$="_cells.csv"]').first.click()
    seg_table = pd.read_csv(dl.value.path(), comment="#")
    expected = piezo_image.planted_per_row(planted, seg_table)
    assert np.abs(seg_table["puncta_count"] - expected).max() <= np.ceil(0.02 * expected.max())
    np.testing.assert_allclose(seg_table["puncta_density_per_um2"], seg_table["puncta_count"] / seg_table["area_um2"],
                               rtol=1e-4)
    # --- Batch tab, same file and settings
    page.get_by_role("tab", name="Batch").click()
    page.set_input_files("#batch-files input[type=file]", str(planted.path))
    page.wait_for_selector("#batch-files :text('piezo1')")
    page.locator("#tab-batch").get_by_text("More parameters").click()
    _fill(page, "#batch-channels", "1,2")
    page.locator("#tab-batch").get_by_text("Puncta", exact=True).click()
    page.locator("#batch-puncta-on input").check()
    _fill(page, "#batch-puncta-ch", 0)
    page.click("#batch-run")
    page.wait_for_selector("#batch-status :text('1 of 1 image(s)')", timeout=300_000)
    shot(page, "31_puncta_batch")
    with page.expect_download() as dl:
        page.locator('#batch-result a[download="all_cells.csv"]').click()
    batch_cells = pd.read_csv(dl.value.path(), comment="#").drop(columns=["image"])
    with page.expect_download() as dl:
        page.locator('#batch-result a[download="summary.csv"]').click()
    summ = pd.read_csv(dl.value.path(), comment="#").iloc[0]
    assert (summ.n_cells, summ.puncta_in_cells, summ.puncta_outside_cells) == (len(planted.counts), n_in,
                                                                              planted.outside)
    pd.testing.assert_frame_equal(batch_cells, seg_table)
    # --- and from Python (the README's recipe): the same table
    img, meta = io.imread_with_meta(planted.path)
    masks, _, _ = models.CellposeModel(pretrained_model="lite").eval(img[[1, 2]], channel_axis=0)
    py, _ = measure.measure_cells(masks, img, meta.pixel_size_um[1], channel_axis=0,
                                  puncta=measure.PunctaParams(channel=0))
    py = pd.read_csv(pd.io.common.StringIO(py.to_csv(index=False, float_format="%.6g")))
    pd.testing.assert_frame_equal(batch_cells, py)
