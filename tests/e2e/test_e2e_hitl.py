"""Learn while you correct, in a real browser: a project of small images in the Correct tab; each
"Save and learn" starts a fine-tune round in the background, and the image on screen is segmented
again by the new model as soon as the round has one (until the person edits it). Checks that the
third image is segmented by the second round's model, that Ctrl+Enter saves, and that the held-out
AP curve is drawn once a held-out image has scored the rounds."""
import io
import re
import zipfile

import numpy as np
import pytest
import tifffile
from playwright.sync_api import expect

from cellpose_web.workflows import hitl
from tests.e2e.conftest import REPO, shot

pytestmark = pytest.mark.e2e


def images_zip(path, size=128):
    """Four 128 px crops of the example nuclei images (lite finds nuclei there: masks to learn from)."""
    crops = []
    for name in ("u2os_nuclei.tif", "rpe1_nuclei.tif"):
        a = tifffile.imread(REPO / "examples" / name)
        crops += [a[:size, :size], a[size:, size:]]
    with zipfile.ZipFile(path, "w") as zf:
        for i, c in enumerate(crops):
            b = io.BytesIO()
            tifffile.imwrite(b, c)
            zf.writestr(f"img{i}.tif", b.getvalue())
    return path


def start(page, name, zip_path, holdout):
    page.get_by_role("tab", name="Correct").click()
    if not page.locator("#hitl-name").is_visible():
        page.get_by_text("Learn while you correct (human-in-the-loop)").click()
    page.locator("#hitl-name input, #hitl-name textarea").first.fill(name)
    clear = page.locator("#hitl-files button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.set_input_files("#hitl-files input[type=file]", str(zip_path))
    page.wait_for_selector("#hitl-files :text('images.zip')")
    page.locator("#hitl-holdout input").fill(str(holdout))
    # the recipe of a round: tiny images, so a short round (the project's recipe is the server's)
    expect(page.locator("#hitl-name input, #hitl-name textarea").first).to_have_value(name)
    page.click("#hitl-start")
    expect(page.locator("#hitl-status")).to_contain_text("segmented by round 0", timeout=120_000)
    expect(page.locator("#hitl-status")).to_contain_text(name)  # the project started is the one named


def segmented_by(page, k, timeout=300_000):
    expect(page.locator("#hitl-status")).to_contain_text(f"segmented by round {k}", timeout=timeout)


def test_three_rounds_in_the_browser(page, tmp_path, e2e_home, monkeypatch):
    z = images_zip(tmp_path / "images.zip")
    # rounds of 3 epochs on 64 px crops: the loop, not the learning, is under test here
    monkeypatch.setitem(hitl.ROUND_DEFAULTS, ("lite", "cpu"),
                        hitl.ROUND_DEFAULTS[("lite", "cpu")].replace(n_epochs=3, min_epochs=1, bsize=64, time_limit_s=60))
    start(page, "e2e_loop", z, holdout=0)
    page.click("#hitl-save")                               # image 1 -> round 1
    expect(page.locator("#hitl-status")).to_contain_text("1 of 4 images corrected")
    segmented_by(page, 1)                                  # image 2, segmented again once round 1 is in
    page.locator("#correct-canvas").click(position={"x": 5, "y": 5}, button="right")  # focus, no edit
    page.keyboard.press("Control+Enter")                   # image 2 -> round 2, by the shortcut
    expect(page.locator("#hitl-status")).to_contain_text("2 of 4 images corrected")
    segmented_by(page, 2)                                  # image 3 by round 2's model
    assert re.search(r"learnt from \*?\*?\d+ corrected cells", page.inner_text("#hitl-status"))
    st = hitl.open_session("e2e_loop").status()
    assert st["index"] == 2 and st["current_model"]["round"] == 2
    shot(page, "70_hitl_round2")
    page.click("#hitl-save")                               # image 3 -> round 3
    segmented_by(page, 3)
    done = [r["round"] for r in hitl.open_session("e2e_loop").status()["rounds"] if r.get("status") == "done"]
    assert done == [1, 2, 3]
    # the current model becomes a lab model from the browser, offered in every model list
    page.locator("#hitl-publish-name input, #hitl-publish-name textarea").first.fill("e2e_published")
    page.click("#hitl-publish")
    expect(page.locator("#hitl-status")).to_contain_text("as lab model e2e_published", timeout=60_000)
    from cellpose_web.workflows import lab_models
    assert "e2e_published" in lab_models.lab_names()
    shot(page, "72_hitl_published")

    # held-out images: the 2nd corrected image scores every later round; the curve is drawn
    start(page, "e2e_curve", z, holdout=4)
    page.click("#hitl-save")                               # image 1 -> round 1
    segmented_by(page, 1)
    page.click("#hitl-save")                               # image 2: held out
    expect(page.locator("#hitl-status")).to_contain_text("2 of 4 images corrected (", timeout=60_000)
    page.click("#hitl-save")                               # image 3 -> round 2, scored on image 2
    expect(page.locator("#hitl-status")).to_contain_text("Last round 2", timeout=300_000)
    curve = hitl.open_session("e2e_curve").ap_curve()
    assert len(curve) >= 2 and {p["round"] for p in curve} >= {1, 2}
    expect(page.locator("#hitl-curve canvas, #hitl-curve svg").first).to_be_visible(timeout=30_000)
    shot(page, "71_hitl_curve")


def test_reload_keeps_the_project_image_and_its_corrections(page, tmp_path, e2e_home, monkeypatch):
    """A page reload mid-project: the image on screen comes back with the corrections made on it, the
    panel with the project's name and status, Resume keeps the image, and Save and learn saves the
    corrected masks."""
    from tests.e2e.test_e2e_correct import labels, screen, serial, wait_applied, wait_count

    monkeypatch.setitem(hitl.ROUND_DEFAULTS, ("lite", "cpu"),
                        hitl.ROUND_DEFAULTS[("lite", "cpu")].replace(n_epochs=1, min_epochs=1, bsize=64, time_limit_s=60))
    start(page, "e2e_reload", images_zip(tmp_path / "images.zip"), holdout=0)
    page.wait_for_function("() => window.cpwCorrect && cpwCorrect.labels && cpwCorrect.labels.length > 0")
    m0 = labels(page)
    n0 = len(set(m0.ravel()) - {0})
    wait_count(page, n0)
    biggest = int(np.bincount(m0.ravel())[1:].argmax()) + 1
    y, x = np.argwhere(m0 == biggest).mean(axis=0)
    page.locator("#correct-canvas").scroll_into_view_if_needed()  # Start scrolled the page down
    s0 = serial(page)
    page.keyboard.down("Control")  # Ctrl+click deletes a cell
    page.mouse.click(*screen(page, y, x))
    page.keyboard.up("Control")
    wait_applied(page, s0)
    wait_count(page, n0 - 1)
    edited = labels(page)

    page.reload()
    page.wait_for_selector("#seg-run")
    page.get_by_role("tab", name="Correct").click()
    wait_count(page, n0 - 1)
    page.wait_for_function("() => window.cpwCorrect && cpwCorrect.labels && cpwCorrect.labels.length > 0")
    assert (labels(page) == edited).all() and "1 edit" in page.inner_text("#correct-count")
    if not page.locator("#hitl-resume").is_visible():
        page.get_by_text("Learn while you correct (human-in-the-loop)").click()
    page.click("#hitl-resume")  # the name box says my_project: the browser's project wins
    expect(page.locator("#hitl-status")).to_contain_text("0 of 4 images corrected", timeout=60_000)
    expect(page.locator("#hitl-status")).to_contain_text("segmented by round 0")
    expect(page.locator("#hitl-name input, #hitl-name textarea").first).to_have_value("e2e_reload")
    expect(page.locator("#hitl-status")).to_contain_text("0 of 4 images corrected", timeout=60_000)
    assert (labels(page) == edited).all()
    page.click("#hitl-save")
    expect(page.locator("#hitl-status")).to_contain_text("1 of 4 images corrected", timeout=120_000)
    s = hitl.open_session("e2e_reload")
    assert s.state()["corrected"][0]["n_cells"] == n0 - 1  # the correction made before the reload was saved
    s.wait(timeout=300)  # the round it started ends before the test does (no torch thread at exit)
