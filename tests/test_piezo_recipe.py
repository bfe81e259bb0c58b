"""The README's PIEZO1 recipe, followed literally from Python and the command line, on PIEZO1-style
files with predicted (not true) masks: whole cells found, and each cell's puncta count right
(issue #21's bar: AP@0.5 >= 0.85, >= 85 % of matched cells exact, MAE <= 0.25 per cell, >= 95 % of
the planted puncta counted in cells). The browser run is tests/e2e/test_e2e_puncta.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellpose_web import io, measure, models, registry
from cellpose_web.workflows import pipeline
from tests import piezo_cells

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=[21, 37])
def piezo_file(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"piezo{request.param}")
    sample = piezo_cells.write(d / "piezo1.tif", seed=request.param)
    return d / "piezo1.tif", sample


def readme_python_recipe(path: Path):
    """The README's Python block, line for line."""
    img, meta = io.imread_with_meta(path)                                          # (3, Y, X), "CYX"
    model = models.CellposeModel(pretrained_model=registry.whole_cell_model())     # cp_cyto here
    masks, flows, styles = model.eval(img[[1, 2]], channel_axis=0)                 # cytoplasm, nucleus
    table, spots = measure.measure_cells(masks, img, pixel_size_um=meta.pixel_size_um[1], channel_axis=0,
                                         puncta=measure.PunctaParams(channel=0))
    return masks, table, spots


def test_python_recipe_counts_puncta_per_whole_cell(piezo_file):
    path, sample = piezo_file
    masks, table, spots = readme_python_recipe(path)
    sc = piezo_cells.scores(sample, masks, table)
    piezo_cells.assert_lab_numbers(sc)
    summ = measure.summarize(table, spots)
    assert summ["puncta_in_cells"] == table["puncta_count"].sum()
    assert summ["puncta_near_cell_edge"] > 0  # the rule this bar depends on did its part
    np.testing.assert_allclose(table["puncta_density_per_um2"], table["puncta_count"] / table["area_um2"])


def test_without_the_nearest_cell_rule_the_edge_spots_are_lost(piezo_file):
    """The same masks counting only spots under a mask miss the ones at the cell's edge (what the
    nearest-cell distance is for): the bar is not met."""
    path, sample = piezo_file
    masks, _, _ = readme_python_recipe(path)
    img, meta = io.imread_with_meta(path)
    table, _ = measure.measure_cells(masks, img, meta.pixel_size_um[1], channel_axis=0,
                                     puncta=measure.PunctaParams(channel=0, max_distance_um=0))
    sc = piezo_cells.scores(sample, masks, table)
    assert sc["exact"] < 0.85 and sc["bias"] < 0


def test_command_line_recipe_gives_the_same_table(piezo_file, tmp_path):
    path, sample = piezo_file
    out = subprocess.run([sys.executable, "-m", "cellpose_web", "--dir", str(path.parent), "--puncta_channel", "0",
                          "--save_csv", "--savedir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "cp_cyto (whole cells, for puncta per cell" in out.stderr + out.stdout
    table = pd.read_csv(tmp_path / "piezo1_cells.csv", comment="#")
    masks = io.load_seg(str(tmp_path / "piezo1_seg.npy"))["masks"]  # Cellpose's default output
    piezo_cells.assert_lab_numbers(piezo_cells.scores(sample, masks, table))
    _, py_table, _ = readme_python_recipe(path)
    np.testing.assert_array_equal(table["puncta_count"], py_table["puncta_count"])


def test_a_nuclei_model_counting_puncta_is_warned_about(piezo_file):
    path, _ = piezo_file
    loaded = pipeline.get_model("lite")
    r = pipeline.process_file(path, loaded, pipeline.ImageSettings(puncta=measure.PunctaParams(channel=0)))
    assert any("finds nuclei, not whole cells" in n for n in r["notices"])
    r = pipeline.process_file(path, pipeline.get_model("cp_cyto"),
                              pipeline.ImageSettings(puncta=measure.PunctaParams(channel=0)))
    assert not any("finds nuclei" in n for n in r["notices"])
