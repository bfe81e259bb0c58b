"""measure.py: per-cell tables and puncta detection, checked against independent numpy sums."""
import numpy as np
import pandas as pd
import pytest
import tifffile

from cellpose_web import measure
from cellpose_web.errors import CellposeWebError


def _two_cells():
    m = np.zeros((40, 60), np.uint16)
    m[5:15, 5:25] = 1      # 10 x 20 rectangle
    yy, xx = np.mgrid[:40, :60]
    m[(yy - 28) ** 2 + (xx - 40) ** 2 <= 64] = 2   # disk r=8
    img = np.stack([m * 10.0 + 1, np.full(m.shape, 3.0)], -1)
    return m, img


def test_cell_table_basic_units():
    m, img = _two_cells()
    t = measure.cell_table(m, img, pixel_size_um=0.5)
    assert list(t["label"]) == [1, 2]
    assert t["area_px"].tolist() == [200, int((m == 2).sum())]
    np.testing.assert_allclose(t["area_um2"], t["area_px"] * 0.25)
    np.testing.assert_allclose(t.loc[0, ["centroid_y_px", "centroid_x_px"]].to_numpy(float), [9.5, 14.5])
    np.testing.assert_allclose(t["centroid_x_um"], t["centroid_x_px"] * 0.5)
    np.testing.assert_allclose(t["mean_intensity_ch0"], [11.0, 21.0])
    np.testing.assert_allclose(t["mean_intensity_ch1"], [3.0, 3.0])
    assert t.loc[0, "solidity"] == pytest.approx(1.0)
    assert t.loc[1, "eccentricity"] < 0.2 < t.loc[0, "eccentricity"]


def test_cell_table_channel_first_and_no_pixel_size():
    m, img = _two_cells()
    t = measure.cell_table(m, np.moveaxis(img, -1, 0), pixel_size_um=None)
    assert t["area_um2"].isna().all()
    np.testing.assert_allclose(t["mean_intensity_ch0"], [11.0, 21.0])


def test_cell_table_empty_and_mismatch():
    t = measure.cell_table(np.zeros((8, 8), np.uint16), np.zeros((8, 8)))
    assert len(t) == 0 and "area_px" in t
    with pytest.raises(CellposeWebError):
        measure.cell_table(np.zeros((8, 8), np.uint16), np.zeros((9, 9)))


def test_cell_table_real_masks_match_bincount(data_dir):
    m = tifffile.imread(data_dir / "nuclei_2d/val/2022-10-14-U2OS-1_masks.tif")
    img = tifffile.imread(data_dir / "nuclei_2d/val/2022-10-14-U2OS-1.tif")
    t = measure.cell_table(m, img, pixel_size_um=0.65)
    labels = np.unique(m[m > 0])
    assert t["label"].tolist() == labels.tolist()
    counts = np.bincount(m.ravel())[labels]
    assert t["area_px"].tolist() == counts.tolist()
    sums = np.bincount(m.ravel(), weights=img.astype(np.float64).ravel())[labels]
    np.testing.assert_allclose(t["mean_intensity_ch0"], sums / counts, rtol=1e-5)


def test_cell_table_3d():
    m = np.zeros((4, 10, 10), np.uint16)
    m[1:3, 2:5, 2:5] = 1
    t = measure.cell_table(m, pixel_size_um=2.0)
    assert t.loc[0, "volume_px"] == 18
    assert t.loc[0, "volume_um3"] == pytest.approx(18 * 8)


def test_size_histogram_counts_all_cells():
    m, img = _two_cells()
    t = measure.cell_table(m, img, pixel_size_um=0.5)
    h = measure.size_histogram(t, bins=4)
    assert h["count"].sum() == 2
    assert h["quantity"].iloc[0] == "area_um2"
    h2 = measure.size_histogram(measure.cell_table(m), bins=3)
    assert h2["quantity"].iloc[0] == "area_px"


def _spots_image():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 2, (64, 64))
    yy, xx = np.mgrid[:64, :64]
    centres = [(10, 10), (12, 40), (40, 20), (50, 50), (30, 30)]
    for cy, cx in centres:
        img += 300 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5 ** 2))
    return img, centres


def test_detect_puncta_finds_spots_and_labels():
    img, centres = _spots_image()
    masks = np.zeros((64, 64), np.uint16)
    masks[:32, :] = 1   # spots (10,10) (12,40) (30,30) inside
    masks[32:, :32] = 2  # (40,20)
    p = measure.detect_puncta(img, sigma_min=1, sigma_max=3, threshold=0.1, masks=masks)
    assert len(p) == len(centres)
    found = sorted(zip(np.round(p.y_px).astype(int), np.round(p.x_px).astype(int)))
    assert found == sorted(centres)
    per = measure.puncta_per_cell(masks, p, pixel_size_um=0.5)
    assert per.set_index("label")["puncta_count"].to_dict() == {1: 3, 2: 1}
    area1 = (masks == 1).sum()
    assert per.loc[per.label == 1, "puncta_density_per_um2"].item() == pytest.approx(3 / (area1 * 0.25))
    table = measure.add_puncta(measure.cell_table(masks, img, 0.5), per)
    assert table["puncta_count"].tolist() == [3, 1]
    s = measure.summarize(table, p)
    assert s["n_cells"] == 2 and s["puncta_total"] == 5 and s["puncta_in_cells"] == 4


def test_detect_puncta_threshold_changes_count_and_bad_params():
    img, _ = _spots_image()
    assert len(measure.detect_puncta(img, threshold=2.0)) < len(measure.detect_puncta(img, threshold=0.1))
    for kw in ({"sigma_min": -1}, {"sigma_min": 3, "sigma_max": 1}, {"threshold": 0}, {"threshold": float("nan")}):
        with pytest.raises(CellposeWebError):
            measure.detect_puncta(img, **kw)
    with pytest.raises(CellposeWebError):
        measure.detect_puncta(np.zeros((3, 4, 5)))


def test_nearest_cell_distance_in_um_needs_a_pixel_size():
    """0.4 µm (the default) becomes 4 px without a pixel size; another µm distance cannot be converted and
    says what to enter, instead of silently counting only the spots on a mask."""
    from cellpose_web.errors import BadInputError

    default = measure.PunctaParams(channel=0)
    assert measure.max_distance_px(default, 0.1) == pytest.approx(4.0)
    assert measure.max_distance_px(default, None) == measure.FALLBACK_MAX_DISTANCE_PX
    assert measure.max_distance_px(measure.PunctaParams(channel=0, max_distance_um=0), None) == 0.0
    wider = measure.PunctaParams(channel=0, max_distance_um=0.6)
    assert measure.max_distance_px(wider, 0.2) == pytest.approx(3.0)
    with pytest.raises(BadInputError, match="pixel size"):
        measure.max_distance_px(wider, None)
    img = np.zeros((32, 32), np.float32)
    masks = np.zeros((32, 32), np.int32)
    masks[8:20, 8:20] = 1
    with pytest.raises(BadInputError):
        measure.measure_cells(masks, img, None, puncta=wider)


def test_count_line_names_the_reach_it_used():
    """The Segment tab's count line says 4 px when the image had no pixel size (the default distance ran in
    pixels), and the distance in µm when it had one."""
    from cellpose_web.ui import common
    from cellpose_web.ui.results_view import summary_md

    masks = np.zeros((64, 64), np.int32)
    masks[10:30, 10:30] = 1
    spots_img = np.zeros((64, 64), np.float32)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in ((20, 20), (20, 32)):  # one on the cell, one 3 px right of its edge
        spots_img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    img = np.stack([masks.astype(np.float32), spots_img], -1)
    params = measure.PunctaParams(channel=1)
    for pixel_size, reach in ((None, "within 4 px"), (0.1, "within 0.4 µm")):
        table, spots = measure.measure_cells(masks, img, pixel_size, puncta=params)
        assert measure.summarize(table, spots)["puncta_near_cell_edge"] == 1
        s = common.Session(name="a.tif", masks=masks, table=table, puncta=spots, pixel_size_um=pixel_size,
                           provenance={"puncta": {"channel": 1, "max_distance_um": 0.4}})
        assert reach in summary_md(s)
