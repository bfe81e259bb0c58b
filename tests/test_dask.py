"""Dask scale-out: a LocalCluster of 2 worker processes writes the same masks as the single-process
command line, and an image whose worker dies is re-run on a fresh worker."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpose_web import cli, io, registry
from cellpose_web.workflows import pipeline

import dask.distributed  # noqa: E402,F401  (requirements-dev.txt: a missing install fails here)

NAMES = ["2022-10-14-U2OS-1", "2023-05-31-misc-4", "2022-05-26-RPE1-2198"]


@pytest.fixture
def images(tmp_path, data_dir):
    """Three 128x128 crops of the validation images."""
    d = tmp_path / "in"
    d.mkdir()
    for i, n in enumerate(NAMES):
        img = tifffile.imread(data_dir / "nuclei_2d" / "val" / f"{n}.tif")
        tifffile.imwrite(d / f"img{i}.tif", img[40:168, 40:168])
    return d


@pytest.fixture
def model_flags(reference_dir):
    """The trained built-in `lite` when it exists; else the random tiny Cellpose-SAM checkpoint with
    permissive thresholds (so its masks are not empty)."""
    if registry.builtin_path("lite").is_file():
        return ["--pretrained_model", "lite"]
    return ["--pretrained_model", str(reference_dir / "tiny_cpsam.pth"), "--cellprob_threshold", "-20",
            "--flow_threshold", "0"]


def _masks(folder: Path, n: int = 3) -> list[np.ndarray]:
    return [io.load_seg(folder / f"img{i}_seg.npy")["masks"] for i in range(n)]


def _single(images, model_flags, out, capsys):
    rc = cli.main(["batch", "--dir", str(images), "--savedir", str(out), "--save_png", *model_flags])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return _masks(out)


@pytest.mark.slow
def test_local_cluster_matches_single_process(images, model_flags, tmp_path, capsys):
    ref = _single(images, model_flags, tmp_path / "single", capsys)
    assert any(m.max() > 0 for m in ref), "the equality check needs at least one non-empty result"
    out = tmp_path / "dask"
    rc = cli.main(["batch", "--dir", str(images), "--savedir", str(out), "--save_png", *model_flags,
                   "--dask-workers", "2"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "local Dask cluster" in err and "done: 3 image(s)" in err
    for i, m in enumerate(_masks(out)):
        np.testing.assert_array_equal(m, ref[i])
        np.testing.assert_array_equal(io.imread(out / f"img{i}_cp_masks.png"), ref[i])
        assert f"img{i}.tif: {len(np.unique(ref[i])) - (ref[i] == 0).any()} masks" in stdout
        seg = io.load_seg(out / f"img{i}_seg.npy")
        assert seg["cellpose_web"]["model"]["sha256"] == io.load_seg(tmp_path / "single" / f"img{i}_seg.npy")[
            "cellpose_web"]["model"]["sha256"]
    assert "[3/3]" in stdout and "(worker " in stdout


def _die_once(marker: str):
    """Installed in every worker process: the first image processed anywhere kills its worker."""
    import cellpose_web.workflows.distributed as D

    real = D._process

    def dying(path, *a, **k):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-run, as if killed
        return real(path, *a, **k)

    D._process = dying
    return os.getpid()


@pytest.mark.slow
def test_worker_killed_mid_run_is_retried(images, model_flags, tmp_path, capsys):
    import dask
    from dask.distributed import Client, LocalCluster

    from cellpose_web.workflows import distributed

    ref = _single(images, model_flags, tmp_path / "single", capsys)
    args = cli.build_parser().parse_args(["--dir", str(images), *model_flags])
    info = registry.resolve_model(args.pretrained_model)
    marker = tmp_path / "died_once"
    seen = []
    with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster, set_as_default=False)
    try:
        pids = client.run(_die_once, str(marker))
        assert len(pids) == 2
        results = distributed.run_batch_dask(sorted(images.glob("*.tif")), tmp_path / "dask", info,
                                             cli.common.image_settings(args), pipeline.SaveOptions(png=True), retries=2,
                                             progress=lambda d, t, r: seen.append((d, t, r["name"])),
                                             client=client)
    finally:
        client.close()
        cluster.close()
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert [r.get("error") for r in results] == [None] * 3
    assert [r["name"] for r in results] == ["img0.tif", "img1.tif", "img2.tif"]
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 3 for s in seen)
    for i, m in enumerate(_masks(tmp_path / "dask")):
        np.testing.assert_array_equal(m, ref[i])


def test_missing_dask_message(monkeypatch):
    import builtins

    from cellpose_web.workflows import distributed
    from cellpose_web.errors import CellposeWebError

    real_import = builtins.__import__

    def no_dask(name, *a, **k):
        if name == "dask" or name.startswith("dask."):
            raise ImportError("No module named 'dask'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(CellposeWebError, match=r"pip install 'dask\[distributed\]'"):
        distributed.require_dask()


@pytest.mark.parametrize("addr, ok", [("tcp://10.0.0.5:8786", "tcp://10.0.0.5:8786"), ("node7:8786", "tcp://node7:8786"),
                                      ("tls://h:1", "tls://h:1"), ("bogus", None), ("http://h:80", None), ("", None)])
def test_scheduler_address(addr, ok):
    from cellpose_web.workflows import distributed
    from cellpose_web.errors import CellposeWebError

    if ok:
        assert distributed.scheduler_address(addr) == ok
    else:
        with pytest.raises(CellposeWebError, match="not a scheduler address"):
            distributed.scheduler_address(addr)
