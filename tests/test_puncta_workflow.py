"""The PIEZO1 workflow from Python: segment on membrane + DAPI (file channels 1, 2), count puncta on
file channel 0; the planted numbers come back, and the pipeline (CLI / app / Batch) gives the same table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellpose_web import io, measure, models, registry
from cellpose_web.workflows import pipeline
from tests import piezo_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return piezo_image.make(tmp_path_factory.mktemp("piezo") / "piezo1.tif")


@pytest.fixture(scope="module")
def lite():
    assert registry.builtin_path("lite").is_file(), "the built-in lite weights ship in cellpose_web/weights"
    return models.CellposeModel(pretrained_model="lite")


def python_table(planted, lite):
    """The README's Python recipe."""
    img, meta = io.imread_with_meta(planted.path)                         # (3, Y, X), axes "CYX"
    masks, flows, styles = lite.eval(img[[1, 2]], channel_axis=0)         # membrane + DAPI
    return measure.measure_cells(masks, img, pixel_size_um=meta.pixel_size_um[1], channel_axis=0,
                                 puncta=measure.PunctaParams(channel=0))  # puncta on file channel 0


def test_python_puncta_per_cell_match_what_was_planted(planted, lite):
    table, spots = python_table(planted, lite)
    assert len(table) == len(planted.counts)
    expected = piezo_image.planted_per_row(planted, table)
    np.testing.assert_array_equal(table["puncta_count"], expected)
    np.testing.assert_allclose(table["puncta_density_per_um2"], expected / table["area_um2"])
    np.testing.assert_allclose(table["area_um2"], table["area_px"] * piezo_image.PIXEL_UM ** 2)
    s = measure.summarize(table, spots)
    assert (s["puncta_in_cells"], s["puncta_outside_cells"]) == (sum(planted.counts), planted.outside)
    # every file channel measured; the puncta channel is brighter inside cells with more puncta
    for c in range(3):
        assert {f"mean_intensity_ch{c}", f"integrated_intensity_ch{c}"} <= set(table.columns)
    assert np.corrcoef(table["integrated_intensity_ch0"], expected)[0, 1] > 0.9
    assert (table["puncta_mean_intensity"] > 0).all()


def test_pipeline_gives_the_python_table(planted, lite, tmp_path):
    """What the CLI, the app and Batch run (pipeline.process_file) gives the same table as Python."""
    py, _ = python_table(planted, lite)
    loaded = pipeline.LoadedModel(lite, "lite", "", "")
    settings = pipeline.ImageSettings(segment_channels=[1, 2], puncta=measure.PunctaParams(channel=0))
    r = pipeline.process_file(planted.path, loaded, settings, tmp_path, pipeline.SaveOptions(cells_csv=True))
    assert r["summary"]["puncta_in_cells"] == sum(planted.counts)
    csv = pd.read_csv(r["files"]["cells_csv"], comment="#")
    pd.testing.assert_frame_equal(csv, pd.read_csv(pd.io.common.StringIO(py.to_csv(index=False,
                                                                                   float_format="%.6g"))))


def test_cli_puncta_flags_give_the_python_table(planted, lite, tmp_path, capsys):
    from cellpose_web import cli

    rc = cli.main(["--image_path", str(planted.path), "--pretrained_model", "lite", "--segment_channels", "1", "2",
                   "--puncta_channel", "0", "--save_csv", "--savedir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"{sum(planted.counts)} puncta in cells ({planted.outside} outside)" in out
    py, _ = python_table(planted, lite)
    csv = pd.read_csv(tmp_path / "piezo1_cells.csv", comment="#")
    pd.testing.assert_frame_equal(csv, pd.read_csv(pd.io.common.StringIO(py.to_csv(index=False, float_format="%.6g"))))
    assert '"segment": [1, 2]' in (tmp_path / "piezo1_cells.csv").read_text()


def test_puncta_channel_is_kept_out_of_segmentation_by_default(planted, lite, tmp_path):
    """With no segmentation channels chosen, the named puncta channel is measured, not segmented:
    the same cells and puncta as choosing the other two channels by hand (the issue's 295 "cells"
    of 25 px came from segmenting the spots)."""
    loaded = pipeline.LoadedModel(lite, "lite", "", "")
    chosen = pipeline.process_file(planted.path, loaded, pipeline.ImageSettings(
        segment_channels=[1, 2], puncta=measure.PunctaParams(channel=0)), tmp_path / "a",
        pipeline.SaveOptions(tif=True))
    default = pipeline.process_file(planted.path, loaded, pipeline.ImageSettings(
        puncta=measure.PunctaParams(channel=0)), tmp_path / "b", pipeline.SaveOptions(tif=True))
    assert default["n_masks"] == chosen["n_masks"] == len(planted.counts)
    assert default["summary"]["puncta_in_cells"] == sum(planted.counts)
    np.testing.assert_array_equal(io.imread(default["files"]["masks_tif"]), io.imread(chosen["files"]["masks_tif"]))
    assert any("only measured" in n for n in default["notices"])
