"""Segment tab in a real browser: upload an example, segment, see count and overlay, download masks."""

import numpy as np
import pytest
from playwright.sync_api import expect
import tifffile

from cellpose_web import io as cpio
from cellpose_web.models import CellposeModel
from tests.e2e.conftest import REPO, shot

pytestmark = pytest.mark.e2e
EXAMPLE = REPO / "examples" / "u2os_nuclei.tif"


def upload_and_segment(page, path=EXAMPLE, example=False):
    if example:  # click the example button under the uploader
        page.get_by_role("button", name=path.name).first.click()
    else:
        page.set_input_files("#seg-file input[type=file]", str(path))
    page.wait_for_selector(f"#seg-info :text('{path.name}')")
    page.click("#seg-run")
    page.wait_for_function(
        "() => { const s = document.querySelector('#seg-count strong');"
        " return s && /^\\d+ (cells?|3D cells?|masks? in \\d+ Z planes?)$/.test(s.innerText.trim()); }",
        timeout=180_000)
    return page.inner_text("#seg-count")


def test_segment_upload_run_download(page, tmp_path):
    shot(page, "00_start")
    count_text = upload_and_segment(page, example=True)
    n = int(page.inner_text("#seg-count strong").split()[0])
    assert "sha256" in count_text
    # the count a script gets from the Python API with the same model (lite) and defaults
    expected = CellposeModel(pretrained_model="lite").eval(cpio.imread(EXAMPLE), diameter=None)[0]
    assert n == int(expected.max()) >= 10
    # overlay shown
    assert page.locator("#seg-view img").count() == 1
    shot(page, "01_segment_result")
    page.get_by_role("tab", name="Size histogram").click()
    page.locator("#seg-hist").first.wait_for(state="visible")
    shot(page, "01b_segment_histogram")
    # the per-cell table has one row per cell
    page.get_by_role("tab", name="Downloads").click()
    link = page.locator('#seg-files a[download$="_cp_masks.tif"]').first
    with page.expect_download() as dl:
        link.click()
    f = tmp_path / "masks.tif"
    dl.value.save_as(f)
    masks = tifffile.imread(f)
    assert masks.shape == (256, 256)
    assert len(np.unique(masks[masks > 0])) == n
    np.testing.assert_array_equal(masks, expected)
    shot(page, "02_segment_downloads")
    # switch views: flows and cell probability render without errors
    for name, picture in (("Flow field (RGB)", "03_segment_flows"), ("Cell probability", "03b_segment_cellprob")):
        before = page.locator("#seg-view img").get_attribute("src")
        page.get_by_role("radio", name=name).check()
        # the view is redrawn (a new picture) or an error toast appears: wait for either, not a fixed time
        page.wait_for_function("([src]) => { const i = document.querySelector('#seg-view img'); "
                               "return (i && i.getAttribute('src') !== src) || "
                               "document.querySelector('.toast-body.error') !== null; }", arg=[before])
        shot(page, picture)
        assert page.locator(".toast-body.error").count() == 0
    # a new image: the previous result (count, cells, downloads) must not pass for this one's
    tifffile.imwrite(tmp_path / "other.tif", tifffile.imread(EXAMPLE)[:128, :128])
    page.locator("#seg-file button[aria-label='Clear']").first.click()
    page.set_input_files("#seg-file input[type=file]", str(tmp_path / "other.tif"))
    expect(page.locator("#seg-count")).to_contain_text("No result yet for other.tif", timeout=60_000)
    assert page.locator('#seg-files a[download$="_cp_masks.tif"]').count() == 0


def test_segment_without_image_shows_message(page):
    page.click("#seg-run")
    page.wait_for_selector("text=No image")
    page.screenshot(path=str(shot(page, "04_segment_error_no_image")))  # viewport: the message toast
    assert "Traceback" not in page.content()


def test_unreadable_file_shows_message(page, tmp_path):
    upload_and_segment(page, example=True)
    count = page.inner_text("#seg-count strong")
    page.locator("#seg-file button[aria-label='Clear']").first.click()
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"this is text, not a TIFF")
    page.set_input_files("#seg-file input[type=file]", str(bad))
    page.wait_for_selector("text=/could not|not a|cannot|text/i")
    assert "Traceback" not in page.content()
    # the earlier result stays, and the line under the uploader no longer describes the old file as if
    # it were the one shown in the uploader
    page.wait_for_selector("#seg-info :text('broken.tif could not be read')")
    assert f"still {EXAMPLE.name}" in page.inner_text("#seg-info")
    assert page.inner_text("#seg-count strong") == count


def test_number_boxes_take_a_decimal_comma_as_a_point(page):
    """Typing '2,5' in a number box gives 2.5 (the browser dropped the comma: 25, silently)."""
    page.get_by_text("3D (z-stacks)").first.click()
    box = page.locator("#seg-aniso input").first
    box.click()
    box.press("Control+a")
    page.keyboard.type("2,5")
    assert box.input_value() == "2.5"
