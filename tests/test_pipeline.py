"""One per-image pipeline under the command line, the web service and Dask: the three write the
same masks files for the same image; channels are numbered as in the file for segmenting and measuring."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellpose_web import cli, io, registry
from cellpose_web.workflows import distributed, pipeline
from cellpose_web.errors import CellposeWebError

NAME = "2022-10-14-U2OS-1"


@pytest.fixture
def image(tmp_path, data_dir):
    """A 2-channel 160x160 TIFF, channels first: channel 0 noise, channel 1 the nuclei."""
    nuclei = tifffile.imread(data_dir / "nuclei_2d" / "val" / f"{NAME}.tif")[100:260, 200:360]
    noise = np.random.default_rng(0).integers(0, 50, nuclei.shape).astype(nuclei.dtype)
    f = tmp_path / "two_channels.tif"
    tifffile.imwrite(f, np.stack([noise, nuclei]), imagej=True, metadata={"axes": "CYX", "unit": "um"},
                     resolution=(1 / 0.5, 1 / 0.5))
    return f


def _model() -> str:
    assert registry.builtin_path("lite").is_file(), "the built-in lite weights ship in cellpose_web/weights"
    return "lite"


@pytest.mark.slow
def test_cli_web_service_and_dask_write_identical_masks_files(image, tmp_path, capsys):
    """Same image, model and parameters through the three faces: byte-identical _cp_masks.png/.tif,
    the same _seg.npy masks and the same per-cell numbers."""
    import dask.distributed as dd  # requirements-dev.txt
    from cellpose_web.workflows import batch, segment

    model = _model()
    # 1. the command line
    rc = cli.main(["--image_path", str(image), "--savedir", str(tmp_path / "cli"), "--pretrained_model", model,
                   "--segment_channels", "1", "--save_png", "--save_tif", "--save_csv"])
    assert rc == 0, capsys.readouterr().err
    # 2. the app: the Segment tab's own callbacks (read the upload, segment, write the downloads)
    from cellpose_web.ui.tabs import segment as segment_tab
    s, _, _ = segment_tab.load_image(str(image), None)
    (tmp_path / "web").mkdir()
    s.workdir = str(tmp_path / "web")
    s = segment_tab.run_segmentation(s, model, segment.SegmentParams(channels=[1]), None, None)
    assert s.files and all(Path(f).parent == tmp_path / "web" for f in s.files)
    # ... and its Batch runner
    out = batch.run_batch([image], segment.SegmentParams(channels=[1]), model, tmp_path / "batch" / "results")
    assert out["n_ok"] == 1, out["errors"]
    # 3. Dask (an in-process cluster keeps the test quick; workers in processes run the same task)
    with dd.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, \
            dd.Client(cluster, set_as_default=False) as client:
        settings = pipeline.ImageSettings(eval_kwargs=segment.SegmentParams().validated().eval_kwargs(),
                                          segment_channels=[1])
        results = distributed.run_batch_dask(
            [image], tmp_path / "dask", model, settings, pipeline.SaveOptions(png=True, tif=True, cells_csv=True),
            client=client)
    assert [x.get("error") for x in results] == [None], results

    stem = image.stem
    dirs = [tmp_path / "cli", tmp_path / "web", tmp_path / "batch" / "results" / stem, tmp_path / "dask"]
    ref = io.load_seg(dirs[0] / f"{stem}_seg.npy")["masks"]
    assert ref.max() > 5, "the comparison needs cells"
    for d in dirs:
        for ext in (".png", ".tif"):
            assert (d / f"{stem}_cp_masks{ext}").read_bytes() == (dirs[0] / f"{stem}_cp_masks{ext}").read_bytes(), d
        np.testing.assert_array_equal(io.load_seg(d / f"{stem}_seg.npy")["masks"], ref)
        cells = pd.read_csv(d / f"{stem}_cells.csv", comment="#")
        pd.testing.assert_frame_equal(cells, pd.read_csv(dirs[0] / f"{stem}_cells.csv", comment="#"))
        seg = io.load_seg(d / f"{stem}_seg.npy")["cellpose_web"]
        assert seg["model"]["name"] == model and seg["channels"]["segment"] == [1]
    # every file channel is measured, numbered as in the file, though the model saw channel 1 only
    assert {"mean_intensity_ch0", "mean_intensity_ch1", "integrated_intensity_ch1"} <= set(cells.columns)
    np.testing.assert_allclose(cells.area_um2, cells.area_px * 0.25)


def test_segment_channels_are_file_channels():
    """The model gets exactly the file channels asked for, in that order; measurements keep all."""
    seen = []

    class Recorder:
        device, dtype = "cpu", "float32"

        def eval(self, x, channel_axis=None, **kw):
            seen.append(np.asarray(x)[0, 0].tolist())
            m = np.zeros(np.asarray(x).shape[:2], np.uint16)
            m[2:6, 2:6] = 1
            return m, [None, None, None], None

    img = np.stack([np.full((12, 12), v, np.uint16) for v in (10, 20, 30)])  # (C, Y, X)
    loaded = pipeline.LoadedModel(Recorder(), "rec", "0" * 64, "")
    seg = pipeline.segment(loaded, img, {}, file_axes="CYX", segment_channels=[2, 0])
    assert seen == [[30, 10]] and seg.image.shape == (12, 12, 3)
    table, _ = pipeline.measure_segmentation(seg)
    assert table[["mean_intensity_ch0", "mean_intensity_ch1", "mean_intensity_ch2"]].iloc[0].tolist() == [10, 20, 30]
    assert table["integrated_intensity_ch2"].iloc[0] == 30 * 16
    with pytest.raises(CellposeWebError, match="Segmentation channel 3 does not exist.*3 channel"):
        pipeline.segment(loaded, img, {}, file_axes="CYX", segment_channels=[3])
    with pytest.raises(CellposeWebError, match="one way"):  # Cellpose 3's pair counts in the file already
        pipeline.segment(loaded, img, {"channels": [2, 3]}, file_axes="CYX", segment_channels=[1, 2])


def test_one_model_cache_shared_and_forgotten_by_name():
    """The web service, Dask workers and scripts share pipeline.get_model's instances."""
    from cellpose_web.workflows import model_cache as models_cache

    _model()
    pipeline.forget_models()
    a = pipeline.get_model("lite", gpu=False)
    assert pipeline.get_model("lite", gpu=False) is a
    assert pipeline.get_model(registry.resolve_model("lite").to_dict(), gpu=False) is a  # what a Dask task carries
    pipeline.forget_models("some_other_model")
    assert pipeline.get_model("lite", gpu=False) is a
    models_cache.forget("lite")
    assert pipeline.get_model("lite", gpu=False) is not a


def test_stitch_planes_links_planes_and_remeasures():
    from cellpose_web.workflows import pipeline
    planes = np.zeros((4, 64, 64), np.uint16)
    planes[:, 10:30, 10:30] = 1                      # one cell seen in every plane
    planes[1:3, 40:60, 40:60] = 2                    # a second one in planes 1-2
    planes[3, 40:60, 5:20] = 3                       # unrelated mask in the last plane
    per_plane = pipeline.distinct_plane_labels(list(planes))
    image = np.random.default_rng(0).random((4, 64, 64, 2)).astype(np.float32)
    prov = {"eval_params": {"diameter": 30}}
    masks, table, new_prov = pipeline.stitch_planes(per_plane, image, prov, pixel_size_um=0.5, threshold=0.25)
    assert int(per_plane.max()) == 8 and len(np.unique(masks)) - 1 == 3
    assert sorted(table["volume_px"]) == sorted([4 * 400, 2 * 400, 15 * 20])
    assert {"mean_intensity_ch0", "mean_intensity_ch1"} <= set(table.columns)
    assert new_prov["eval_params"] == {"diameter": 30, "stitch_threshold": 0.25}
    assert new_prov["stitched_after_segmentation"] is True and "stitch_threshold" not in prov["eval_params"]
    with pytest.raises(CellposeWebError, match="plane by plane"):
        pipeline.stitch_planes(per_plane[0], None)
    with pytest.raises(CellposeWebError, match="between 0 and 1"):
        pipeline.stitch_planes(per_plane, None, threshold=1.5)


def test_masks_file_from_another_image_is_loaded_with_a_warning(tmp_path):
    """A _seg.npy records its image: one made from another image of the same size is not silently
    put on this one (its cells would not sit on these nuclei, and could go into a training set)."""
    from cellpose_web.workflows import results

    masks = np.zeros((32, 32), np.uint16)
    masks[4:10, 4:10] = 1
    img = np.zeros((32, 32), np.float32)
    [seg] = io.masks_flows_to_seg(img, masks, None, tmp_path / "plate2.b.tif")
    m, warning = results.read_masks_file(seg, (32, 32), image_name="plate4.b.tif")
    assert np.array_equal(m, masks) and "made from 'plate2.b.tif'" in warning and "'plate4.b.tif'" in warning
    assert results.read_masks_file(seg, (32, 32), image_name="plate2.b.tif")[1] is None
    assert results.read_masks_file(seg, (32, 32), image_name="plate2.b.png")[1] is None  # same image, converted
    tifffile.imwrite(tmp_path / "m.tif", masks)
    assert results.read_masks_file(tmp_path / "m.tif", (32, 32), image_name="x.tif")[1] is None  # no record
