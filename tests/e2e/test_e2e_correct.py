"""Correct tab in a real browser: freehand outline, brush and eraser strokes on #correct-canvas, undo,
Ctrl+click delete, click to add, save; a z-stack plane corrected, saved and loaded back."""
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage import draw

from tests.e2e.conftest import shot
from tests.e2e.test_e2e_segment import EXAMPLE, upload_and_segment

pytestmark = pytest.mark.e2e


def download(page, selector, tmp_path, name):
    with page.expect_download() as dl:
        page.locator(selector).first.click()
    p = tmp_path / name
    dl.value.save_as(p)
    return p


def labels(page) -> np.ndarray:
    """The current plane's labels as the drawing surface holds them (Y, X)."""
    w, h, flat = page.evaluate("() => [cpwCorrect.W, cpwCorrect.H, Array.from(cpwCorrect.labels)]")
    return np.asarray(flat, np.int64).reshape(h, w)


def screen(page, y, x):
    """Page coordinates of the centre of image pixel (y, x) on #correct-canvas."""
    box = page.locator("#correct-canvas").bounding_box()
    s, tx, ty = page.evaluate("() => [cpwCorrect.s, cpwCorrect.tx, cpwCorrect.ty]")
    return box["x"] + tx + (x + 0.5) * s, box["y"] + ty + (y + 0.5) * s


def serial(page) -> int:
    return int(page.evaluate("() => +document.querySelector('#correct-canvas').dataset.serial || 0"))


def wait_applied(page, after: int):
    page.wait_for_function(f"() => +document.querySelector('#correct-canvas').dataset.serial > {after} "
                           "&& !cpwCorrect.busy && !cpwCorrect.queue.length")


def count(page) -> int:
    return int(page.inner_text("#correct-count").split()[0])


def wait_count(page, n, timeout=60_000):
    page.wait_for_function(f"() => /^{n} cells? /.test(document.querySelector('#correct-count').innerText)",
                           timeout=timeout)


def stroke(page, path):
    """One mouse drag through image pixels `path` [(y, x), ...]: down, moves, up."""
    page.mouse.move(*screen(page, *path[0]))
    page.mouse.down()
    for y, x in path[1:]:
        page.mouse.move(*screen(page, y, x), steps=2)
    page.mouse.up()


def tool(page, name):
    page.locator(f"#cor-wrap input[name=cor-tool][value={name}]").check()


def open_correct(page):
    page.get_by_role("tab", name="Correct").click()
    page.wait_for_function("() => window.cpwCorrect && cpwCorrect.W > 0 && !cpwCorrect.busy")


def segmented_correct_tab(page) -> tuple[np.ndarray, int]:
    """Segment the example, open the Correct tab; (its labels (Y, X), number of cells)."""
    upload_and_segment(page)
    open_correct(page)
    m0 = labels(page)
    n0 = len(np.unique(m0[m0 > 0]))
    wait_count(page, n0)
    return m0, n0


def ring(masks, ry, rx, wobble=0.0, at=0.5):
    """(A closed outline [(y, x), ...] of radii (ry, rx), its centre (y, x)): around a background pixel
    at least 16 px from any cell (the one at fraction `at` of them in raster order)."""
    free = np.argwhere(ndi.binary_erosion(masks == 0, iterations=16, border_value=0))
    cy, cx = free[int(len(free) * at)]
    t = np.linspace(0, 2 * np.pi, 40)
    return [(cy + ry * np.sin(a) + wobble * np.sin(3 * a), cx + rx * np.cos(a)) for a in t], (cy, cx)


def load_image_and_masks(page, image, masks) -> None:
    """Segment tab: upload `image`, then *Load existing masks instead* with the file `masks`."""
    page.set_input_files("#seg-file input[type=file]", str(image))
    page.wait_for_selector(f"#seg-info :text('{Path(image).name}')")
    page.get_by_text("Load existing masks instead").first.click()
    page.set_input_files("#seg-masks-file input[type=file]", str(masks))
    page.wait_for_function("() => document.querySelector('#seg-count').innerText.includes('masks loaded from')")


def draw_outline(page, poly, n_before, timeout=60_000) -> float:
    """Draw `poly` with the Outline tool; wait until the count is n_before + 1 (within `timeout` ms of
    the release) and the browser has the new labels. Returns the seconds from release to count."""
    tool(page, "outline")
    s0 = serial(page)
    stroke(page, poly)
    t_release = time.perf_counter()
    wait_count(page, n_before + 1, timeout=timeout)
    latency = time.perf_counter() - t_release
    wait_applied(page, s0)
    return latency


def polygon_iou(cell, poly) -> float:
    """IoU of a boolean (Y, X) mask with the filled polygon [(y, x), ...]."""
    pv = np.asarray(poly)
    truth = np.zeros_like(cell)
    rr, cc = draw.polygon(pv[:, 0], pv[:, 1], cell.shape)
    truth[rr, cc] = True
    return (cell & truth).sum() / (cell | truth).sum()


def test_correct_strokes_undo_click_add_save(page, tmp_path):
    m0, n0 = segmented_correct_tab(page)
    # --- outline: one drag around free background adds exactly one cell, shown within 2 s
    poly, (cy, cx) = ring(m0, 11, 13, wobble=2)
    latency = draw_outline(page, poly, n0)
    shot(page, "10_correct_outline")
    m1 = labels(page)
    new = set(np.unique(m1)) - set(np.unique(m0))
    assert len(new) == 1 and (m1[m0 > 0] == m0[m0 > 0]).all()
    cell = m1 == new.pop()
    iou = polygon_iou(cell, poly)
    print(f"outline: IoU {iou:.3f} against the drawn polygon, count shown {latency:.2f} s after release")
    assert iou >= 0.8
    # --- brush from the new cell out over background: the selected cell grows along the whole path
    tool(page, "brush")
    page.locator("#cor-radius").fill("3")
    path = [(cy, cx + x) for x in range(0, 30, 3)]
    s0 = serial(page)
    stroke(page, path)
    wait_applied(page, s0)
    m2 = labels(page)
    lab = m1[cy, cx]
    was_free = [(y, x) for y, x in path if m1[y, x] in (0, lab)]
    assert all(m2[y, x] == lab for y, x in was_free) and len(was_free) >= len(path) - 2
    # --- eraser across the biggest old cell: background along the whole path
    big = np.bincount(m0.ravel())[1:].argmax() + 1
    ys, xs = np.nonzero(m2 == big)
    ey = int(np.median(ys))
    row = xs[ys == ey]
    epath = [(ey, x) for x in range(int(row.min()) - 2, int(row.max()) + 3, 2)]
    tool(page, "erase")
    s0 = serial(page)
    stroke(page, epath)
    wait_applied(page, s0)
    m3 = labels(page)
    assert all(m3[y, x] == 0 for y, x in epath if 0 <= x < m3.shape[1])
    assert (m3 != m2).sum() > 0 and page.inner_text("#correct-count").split(" · ")[1] == "3 edits"
    shot(page, "11_correct_brush_erase")
    # --- undo three strokes (Ctrl+Z): the masks are exactly as before, the edit counter follows
    page.locator("#correct-canvas").focus()
    for k in (2, 1, 0):
        s0 = serial(page)
        page.keyboard.press("Control+z")
        wait_applied(page, s0)
        assert f"{k} edit" in page.inner_text("#correct-count")
    assert np.array_equal(labels(page), m0)
    wait_count(page, n0)
    # --- Ctrl+click deletes a cell; one click with "Click to add" brings it back from the flows
    target = np.bincount(m0.ravel())[1:].argmax() + 1
    obj = m0 == target
    dist = ndi.distance_transform_edt(obj)
    ty, tx = np.unravel_index(int(dist.argmax()), dist.shape)
    s0 = serial(page)
    page.keyboard.down("Control")
    page.mouse.click(*screen(page, ty, tx))
    page.keyboard.up("Control")
    wait_applied(page, s0)
    wait_count(page, n0 - 1)
    tool(page, "add")
    s0 = serial(page)
    page.mouse.click(*screen(page, ty, tx))
    wait_applied(page, s0)
    wait_count(page, n0)
    m4 = labels(page)
    back = m4 == m4[ty, tx]
    assert m4[ty, tx] > 0 and (back & obj).sum() / (back | obj).sum() >= 0.7
    shot(page, "12_correct_click_to_add")
    # --- redo is gone after a new edit; save with Ctrl+S and check the saved file
    page.locator("#correct-canvas").focus()
    page.keyboard.press("Control+s")
    page.wait_for_selector('#cor-files a[download$="_cp_masks.tif"]')
    saved = tifffile.imread(download(page, '#cor-files a[download$="_cp_masks.tif"]', tmp_path, "after.tif"))
    assert len(np.unique(saved[saved > 0])) == n0 == saved.max()
    assert ((saved > 0) == (m4 > 0)).all()
    page.fill("#cor-set textarea, #cor-set input", "e2e_correct_set")
    page.click("#cor-add")
    page.wait_for_selector("text=/Added .* to training set/")
    page.get_by_role("tab", name="Fine-tune").click()           # the Fine-tune tab lists the new set
    page.wait_for_function("() => document.querySelector('#tab-finetune').innerText.includes('e2e_correct_set')")


def test_correct_zstack_plane_save_and_reload(page, tmp_path):
    img = tifffile.imread(EXAMPLE)[:128, :128]
    stack = np.stack([np.roll(img, 4 * z, axis=1) for z in range(3)])
    p = tmp_path / "stack3.tif"
    tifffile.imwrite(p, stack, imagej=True, metadata={"axes": "ZYX"})
    upload_and_segment(page, p)
    open_correct(page)
    assert page.evaluate("() => cpwCorrect.nz") == 3
    page.locator("#correct-canvas").focus()
    s0 = serial(page)
    page.keyboard.press("PageDown")
    page.keyboard.press("PageDown")
    page.wait_for_function("() => cpwCorrect.z === 2 && !cpwCorrect.busy && !cpwCorrect.queue.length")
    assert "plane 3/3" in page.inner_text("#correct-count")
    m_before = labels(page)
    free = ndi.binary_erosion(m_before == 0, iterations=10, border_value=0)
    cy, cx = np.argwhere(free)[len(np.argwhere(free)) // 2]
    tool(page, "outline")
    s0 = serial(page)
    stroke(page, [(cy - 7, cx - 7), (cy - 7, cx + 7), (cy + 7, cx + 7), (cy + 7, cx - 7), (cy - 6, cx - 7)])
    wait_applied(page, s0)
    new_label = labels(page)[cy, cx]
    assert new_label > m_before.max()
    shot(page, "13_correct_zstack_plane")
    page.click("#cor-save")
    page.wait_for_selector('#cor-files a[download$="_seg.npy"]')
    seg = download(page, '#cor-files a[download$="_seg.npy"]', tmp_path, "stack3_seg.npy")
    masks3d = np.load(seg, allow_pickle=True).item()["masks"]
    assert masks3d.shape == (3, 128, 128) and masks3d[2, cy, cx] > 0 and masks3d[0, cy, cx] == 0
    n_saved = len(np.unique(masks3d[masks3d > 0]))
    # load the saved 3D masks back in the Segment tab
    page.get_by_role("tab", name="Segment").click()
    page.get_by_text("Load existing masks instead").first.click()
    page.set_input_files("#seg-masks-file input[type=file]", str(seg))
    page.wait_for_function(f"() => /^{n_saved} cells?$/.test((document.querySelector('#seg-count strong') || "
                           "{innerText: ''}).innerText.trim()) && "
                           "document.querySelector('#seg-count').innerText.includes('masks loaded from')")
    open_correct(page)
    page.wait_for_function(f"() => /^{n_saved} cells? /.test(document.querySelector('#correct-count').innerText)")


def test_correct_2048_zoom_to_pixels_and_stroke(page, tmp_path):
    """A 2048x2048 image with masks loaded from a file: zoom in to single pixels and brush."""
    from benchmarks.bench_correct_strokes import voronoi_cells
    masks = voronoi_cells(2048)
    img = (np.where(masks > 0, 3000, 400) + np.random.default_rng(0).integers(0, 200, masks.shape)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", img)
    tifffile.imwrite(tmp_path / "big_masks.tif", masks)
    load_image_and_masks(page, tmp_path / "big.tif", tmp_path / "big_masks.tif")
    open_correct(page)
    n0 = len(np.unique(masks)) - 1
    wait_count(page, n0)
    assert page.evaluate("() => [cpwCorrect.W, cpwCorrect.H]") == [2048, 2048]
    # zoom with the wheel around pixel (1000, 1000) until one image pixel is >= 16 screen pixels
    page.mouse.move(*screen(page, 1000, 1000))
    for _ in range(40):
        if page.evaluate("() => cpwCorrect.s") >= 16:
            break
        page.mouse.wheel(0, -240)
        page.wait_for_timeout(30)
    assert page.evaluate("() => cpwCorrect.s") >= 16
    shot(page, "14_correct_2048_zoomed")
    # a 1-px-radius eraser stroke across a few pixels, then a brush stroke that starts a new cell
    y = 1000
    row = masks[y]
    x0 = int(np.flatnonzero(row[1000:] > 0)[0]) + 1000
    tool(page, "erase")
    page.locator("#cor-radius").fill("1")
    s0 = serial(page)
    stroke(page, [(y, x0), (y, x0 + 4)])
    t = time.perf_counter()
    wait_applied(page, s0)
    print(f"2048x2048: eraser stroke applied in the browser {time.perf_counter() - t:.2f} s after release")
    got = page.evaluate(f"() => Array.from(cpwCorrect.labels.slice({y} * 2048 + {x0}, {y} * 2048 + {x0 + 5}))")
    assert got == [0] * 5
    assert "1 edit" in page.inner_text("#correct-count")


def test_correct_hidpi_canvas_is_sharp_and_strokes_land(browser, app_url):
    """On a 2x (HiDPI) screen the canvas backing store has 2x the pixels and strokes land where drawn."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=2)
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(app_url)
        page.wait_for_selector("#seg-run")
        m0, n0 = segmented_correct_tab(page)
        cw, ch, bw, bh = page.evaluate("() => { const c = document.querySelector('#correct-canvas'); "
                                       "return [c.clientWidth, c.clientHeight, c.width, c.height]; }")
        assert cw > 100 and (bw, bh) == (2 * cw, 2 * ch)
        poly, _ = ring(m0, 12, 12)
        draw_outline(page, poly, n0)
        shot(page, "15_correct_hidpi")
        m1 = labels(page)
        new = set(np.unique(m1)) - set(np.unique(m0))
        assert len(new) == 1
        assert polygon_iou(m1 == new.pop(), poly) >= 0.8
    finally:
        ctx.close()


def test_correct_edits_survive_a_page_reload(page, tmp_path):
    """Edits are attached to the browser's kept result: after a reload the Correct tab shows them, with
    their undo history, and saving still works."""
    m0, n0 = segmented_correct_tab(page)
    draw_outline(page, ring(m0, 10, 10, at=1 / 3)[0], n0)
    m1 = labels(page)

    page.reload()
    page.wait_for_selector("#seg-run")
    page.wait_for_function("() => (document.querySelector('#seg-info') || {innerText: ''}).innerText"
                           ".includes('u2os_nuclei')")
    open_correct(page)
    wait_count(page, n0 + 1)
    np.testing.assert_array_equal(labels(page), m1)
    assert "1 edit" in page.inner_text("#correct-count") and "undo" in page.inner_text("#correct-count")
    shot(page, "16_correct_after_reload")
    # the restored history still undoes the stroke
    s1 = serial(page)
    page.locator("#cor-wrap").get_by_role("button", name="Undo").click()
    wait_applied(page, s1)
    wait_count(page, n0)
    np.testing.assert_array_equal(labels(page), m0)


def test_masks_loaded_from_a_file_and_their_edits_survive_a_page_reload(page, tmp_path):
    """Masks from a file are kept for the browser like a segmentation: a reload reopens them (not the
    result before them) with the edits made on them."""
    masks = np.zeros((256, 256), np.uint16)
    for k, (y, x) in enumerate([(30, 30), (30, 200), (200, 40), (210, 210)], start=1):
        masks[y - 12:y + 12, x - 12:x + 12] = k
    img = np.where(masks > 0, 3000, 300).astype(np.uint16)
    tifffile.imwrite(tmp_path / "plate.tif", img)
    tifffile.imwrite(tmp_path / "plate_masks.tif", masks)
    load_image_and_masks(page, tmp_path / "plate.tif", tmp_path / "plate_masks.tif")
    open_correct(page)
    wait_count(page, 4)
    draw_outline(page, ring(masks, 10, 10)[0], 4)
    edited = labels(page)

    page.reload()
    page.wait_for_selector("#seg-run")
    page.wait_for_function("() => (document.querySelector('#seg-info') || {innerText: ''}).innerText"
                           ".includes('plate.tif')")
    open_correct(page)
    wait_count(page, 5)
    np.testing.assert_array_equal(labels(page), edited)
    assert "1 edit" in page.inner_text("#correct-count")


def test_brush_after_outline_is_a_new_cell_and_save_refreshes_segment(page, tmp_path):
    """Issue 21 item 7: a Brush stroke away from the just-outlined (still selected) cell is a cell of
    its own; Save shows the saved masks in the Segment tab (count, downloads) without a reload."""
    m0, n0 = segmented_correct_tab(page)
    poly, (cy, cx) = ring(m0, 10, 10, at=1 / 3)
    draw_outline(page, poly, n0)
    m1 = labels(page)
    outlined = int(m1[cy, cx])
    assert page.evaluate("() => cpwCorrect.selected") == [outlined]
    _, (by, bx) = ring(m1, 6, 6, at=2 / 3)                   # free background away from every cell
    tool(page, "brush")
    page.locator("#cor-radius").fill("4")
    s0 = serial(page)
    stroke(page, [(by, bx - 4), (by, bx), (by, bx + 4)])
    wait_applied(page, s0)
    wait_count(page, n0 + 2)
    m2 = labels(page)
    brushed = int(m2[by, bx])
    assert brushed not in (0, outlined) and (m2 == outlined).sum() == (m1 == outlined).sum()
    shot(page, "17_correct_brush_after_outline")
    page.click("#cor-save")
    page.wait_for_selector('#cor-files a[download$="_cp_masks.tif"]')
    page.get_by_role("tab", name="Segment").click()
    page.wait_for_function(f"() => /^{n0 + 2} cells?$/.test((document.querySelector('#seg-count strong') || "
                           "{innerText: ''}).innerText.trim())")
    page.get_by_role("tab", name="Downloads").click()
    seg = tifffile.imread(download(page, '#seg-files a[download$="_cp_masks.tif"]', tmp_path, "seg_after.tif"))
    assert seg.max() == n0 + 2 and seg[cy, cx] > 0 and seg[by, bx] > 0 and seg[cy, cx] != seg[by, bx]
    shot(page, "18_segment_after_correct_save")


def test_loading_masks_over_unsaved_edits_is_refused_until_saved(page, tmp_path):
    """A masks file would replace the Correct tab's unsaved edits: refused with what to do; after a save
    it loads."""
    masks = np.zeros((256, 256), np.uint16)
    for k, (y, x) in enumerate([(30, 30), (30, 200), (200, 40)], start=1):
        masks[y - 12:y + 12, x - 12:x + 12] = k
    img = np.where(masks > 0, 3000, 300).astype(np.uint16)
    tifffile.imwrite(tmp_path / "plate.tif", img)
    tifffile.imwrite(tmp_path / "plate_masks.tif", masks)
    other = masks.copy()
    other[other == 3] = 0
    tifffile.imwrite(tmp_path / "other_masks.tif", other)
    load_image_and_masks(page, tmp_path / "plate.tif", tmp_path / "plate_masks.tif")
    open_correct(page)
    wait_count(page, 3)
    draw_outline(page, ring(masks, 10, 10)[0], 3)
    page.get_by_role("tab", name="Segment").click()
    page.locator("#seg-masks-file button[aria-label='Clear']").first.click()
    page.set_input_files("#seg-masks-file input[type=file]", str(tmp_path / "other_masks.tif"))
    page.wait_for_selector("text=/unsaved edits of plate.tif/", timeout=60_000)
    open_correct(page)
    wait_count(page, 4)  # the edit is still there
    page.keyboard.press("Control+s")
    page.wait_for_selector("text=/Saved 4 cells/", timeout=60_000)
    page.get_by_role("tab", name="Segment").click()
    page.locator("#seg-masks-file button[aria-label='Clear']").first.click()
    page.set_input_files("#seg-masks-file input[type=file]", str(tmp_path / "other_masks.tif"))
    page.wait_for_function("() => document.querySelector('#seg-count').innerText.includes('other_masks')",
                           timeout=60_000)
