"""Correct tab in a real browser: draw a cell by outline, delete a cell, save, and check the saved masks."""
import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from tests.e2e.conftest import shot
from tests.e2e.test_e2e_segment import upload_and_segment

pytestmark = pytest.mark.e2e


def download(page, selector, tmp_path, name):
    with page.expect_download() as dl:
        page.locator(selector).first.click()
    p = tmp_path / name
    dl.value.save_as(p)
    return p


def click_pixel(page, y, x, shape):
    """Click image pixel (y, x) in the Correct viewer (handles zoom and letterboxing)."""
    img = page.locator("#cor-view img").first
    box = img.bounding_box()
    nw, nh = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    k = nw / shape[1]
    r = min(box["width"] / nw, box["height"] / nh, 1)
    ox = (box["width"] - nw * r) / 2
    oy = (box["height"] - nh * r) / 2
    page.mouse.click(box["x"] + ox + (x + 0.5) * k * r, box["y"] + oy + (y + 0.5) * k * r)


def wait_status(page, text):
    page.wait_for_function(f"() => document.querySelector('#cor-status').innerText.includes({text!r})")


def wait_count(page, n):
    word = "cell" if n == 1 else "cells"
    page.wait_for_function(
        f"() => document.querySelector('#cor-status').innerText.startsWith('{n} {word} ')")


def test_correct_draw_delete_save(page, tmp_path):
    upload_and_segment(page)
    page.get_by_role("tab", name="Downloads").click()
    before = tifffile.imread(download(page, '#seg-files a[download$="_cp_masks.tif"]', tmp_path, "before.tif"))
    n0 = int(before.max())
    page.get_by_role("tab", name="Correct").click()
    page.wait_for_selector("#cor-view img")
    wait_count(page, n0)
    # draw a square outline on free background
    free = ndi.binary_erosion(before == 0, iterations=14, border_value=0)
    cy, cx = np.argwhere(free)[len(np.argwhere(free)) // 2]
    page.get_by_role("radio", name="Draw outline").check()
    for dy, dx in ((-9, -9), (-9, 9), (9, 9), (9, -9)):
        click_pixel(page, cy + dy, cx + dx, before.shape)
        page.wait_for_timeout(300)
    wait_status(page, "outline: 4 point(s)")
    shot(page, "10_correct_outline")
    page.click("#cor-finish")
    wait_count(page, n0 + 1)
    # select a cell and delete it with the keyboard shortcut (Delete)
    target = 1 if n0 > 0 else n0 + 1
    if n0 > 0:
        cell = before == target
        inner = ndi.binary_erosion(cell, iterations=2)
        iy, ix = np.argwhere(inner if inner.any() else cell)[0]
    else:
        iy, ix = cy, cx
    page.get_by_role("radio", name="Select").check()
    click_pixel(page, iy, ix, before.shape)
    wait_status(page, "selected: ")
    page.wait_for_function("() => !document.querySelector('#cor-status').innerText.includes('selected: none')")
    page.locator("body").press("Delete")
    wait_count(page, n0)
    shot(page, "11_correct_after_edits")
    page.click("#cor-save")
    page.wait_for_selector('#cor-files a[download$="_cp_masks.tif"]')
    after = tifffile.imread(download(page, '#cor-files a[download$="_cp_masks.tif"]', tmp_path, "after.tif"))
    assert after[cy, cx] > 0, "the drawn cell is in the saved masks"
    assert (after[before > 0] > 0).sum() < (before > 0).sum() or n0 == 0
    if n0 > 0:
        assert (after[before == 1] == 0).all(), "the deleted cell is gone"
        assert len(np.unique(after[after > 0])) == n0
    # drawn cell never overlaps earlier cells
    drawn = after == after[cy, cx]
    assert not (drawn & (before > 0) & (before != 1)).any()
    # add to the training set
    page.click("#cor-add")
    page.wait_for_selector("text=/Added .* to training set/")
    shot(page, "12_correct_added_to_set")
