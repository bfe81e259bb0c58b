"""Batch tab in a real browser: a zip of three images (and one bad file) -> CSVs and a result zip."""
import zipfile

import pandas as pd
import pytest

from cellpose_web import io as cpio
from cellpose_web.models import CellposeModel
from tests.e2e.conftest import REPO, shot

pytestmark = pytest.mark.e2e


def test_batch_zip_of_three(page, tmp_path):
    z = tmp_path / "three_images.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted((REPO / "examples").iterdir()):
            if p.suffix in (".tif", ".png"):
                zf.write(p, f"images/{p.name}")
        zf.writestr("images/broken.tif", b"II*\x00 not really a tiff")
    page.get_by_role("tab", name="Batch").click()
    page.set_input_files("#batch-files input[type=file]", str(z))
    page.wait_for_selector("#batch-files :text('three_images')")
    page.click("#batch-run")
    page.wait_for_selector("#batch-status :text('3 of 4 image(s)')", timeout=300_000)
    shot(page, "20_batch_done")
    with page.expect_download() as dl:
        page.locator('#batch-result a[download="summary.csv"]').click()
    f = tmp_path / "summary.csv"
    dl.value.save_as(f)
    summ = pd.read_csv(f, comment="#", dtype={"model_sha256": str})
    ok = summ[summ.status == "ok"]
    assert sorted(ok.image) == ["mixed_nuclei.png", "rpe1_nuclei.tif", "u2os_nuclei.tif"]
    assert ok.model.eq("lite").all() and ok.model_sha256.str.len().eq(64).all()
    # the same counts a script gets from the Python API with the same model and defaults
    model = CellposeModel(pretrained_model="lite")
    for _, row in ok.iterrows():
        expected = int(model.eval(cpio.imread(REPO / "examples" / row.image), diameter=None)[0].max())
        assert row.n_cells == expected >= 5, (row.image, row.n_cells, expected)
    bad = summ[summ.status == "error"]
    assert list(bad.image) == ["broken.tif"] and bad.reason.str.len().gt(10).all()
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
    assert "summary.csv" in names and "u2os_nuclei/u2os_nuclei_cp_masks.tif" in names
