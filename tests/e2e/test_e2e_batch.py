"""Batch tab in a real browser: a zip of three images (and one bad file) -> CSVs and a result zip."""
import zipfile

import pandas as pd
import pytest
from playwright.sync_api import expect

from cellpose_web import io as cpio
from cellpose_web.models import CellposeModel
from tests.e2e.conftest import REPO, shot

pytestmark = pytest.mark.e2e


def start_batch(page, zip_path) -> None:
    """Batch tab: upload a zip and press Run."""
    page.get_by_role("tab", name="Batch").click()
    page.set_input_files("#batch-files input[type=file]", str(zip_path))
    page.wait_for_selector(f"#batch-files :text('{zip_path.stem}')")
    page.click("#batch-run")


def test_batch_zip_of_three(page, tmp_path):
    z = tmp_path / "three_images.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted((REPO / "examples").iterdir()):
            if p.suffix in (".tif", ".png"):
                zf.write(p, f"images/{p.name}")
        zf.writestr("images/broken.tif", b"II*\x00 not really a tiff")
        zf.write(REPO / "examples" / "u2os_nuclei.tif", "images/u2os_nuclei_masks.tif")  # not an image to segment
    start_batch(page, z)
    page.wait_for_selector("#batch-status :text('3 of 4 image(s)')", timeout=300_000)
    # an image that failed and a file that is not an image are told apart (not "3 of 4 ... 2 problems")
    expect(page.locator("#batch-status")).to_contain_text("1 image(s) not segmented, 1 file(s) left out")
    shot(page, "20_batch_done")
    with page.expect_download() as dl:
        page.locator('#batch-result a[download="summary.csv"]').click()
    f = tmp_path / "summary.csv"
    dl.value.save_as(f)
    summ = pd.read_csv(f, comment="#", dtype={"model_sha256": str})
    ok = summ[summ.status == "ok"]
    assert sorted(ok.image) == ["mixed_nuclei.png", "rpe1_nuclei.tif", "u2os_nuclei.tif"]
    assert sorted(ok.path) == ["images/mixed_nuclei.png", "images/rpe1_nuclei.tif", "images/u2os_nuclei.tif"]
    assert ok.model.eq("lite").all() and ok.model_sha256.str.len().eq(64).all()
    # the same counts a script gets from the Python API with the same model and defaults
    model = CellposeModel(pretrained_model="lite")
    for _, row in ok.iterrows():
        expected = int(model.eval(cpio.imread(REPO / "examples" / row.image), diameter=None)[0].max())
        assert row.n_cells == expected >= 5, (row.image, row.n_cells, expected)
    bad = summ[summ.status == "error"]
    assert sorted(bad.image) == ["broken.tif", "u2os_nuclei_masks.tif"] and bad.reason.str.len().gt(10).all()
    header = f.read_text().splitlines()[0]
    assert header.startswith("# model:") and "sha256=" in header
    with page.expect_download() as dl:
        page.locator('#batch-result a[download="all_cells.csv"]').click()
    cells = pd.read_csv(dl.value.path(), comment="#")
    for _, row in ok.iterrows():
        assert (cells.image == row.image).sum() == row.n_cells
    with page.expect_download() as dl:
        page.locator('#batch-result a[download$=".zip"]').click()
    with zipfile.ZipFile(dl.value.path()) as zf:
        names = zf.namelist()
    assert "summary.csv" in names and "images/u2os_nuclei/u2os_nuclei_cp_masks.tif" in names  # the zip's folders


def test_batch_with_nothing_to_segment_says_why(page, tmp_path):
    """An empty zip (or one of masks only) is refused at once: the status line says why, no job is
    left 'queued', and the earlier-batches table keeps its column names."""
    z = tmp_path / "masks_only.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a_masks.tif", b"not read")
    start_batch(page, z)
    page.wait_for_selector("#batch-status :text('Batch not started')", timeout=60_000)
    status = page.locator("#batch-status").inner_text()
    assert "upload the images, not the masks" in status and "queued" not in status
    page.get_by_text("Earlier batches").click()
    expect(page.locator("#batch-history thead")).to_contain_text("state", timeout=10_000)
    page.wait_for_timeout(1000)  # and it stays so (it turned to 0, 1, 2 ... when updated while folded)
    header = page.locator("#batch-history thead").inner_text()
    assert "state" in header and "message" in header, header
