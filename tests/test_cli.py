"""Command line: Cellpose-compatible flags, files written, one-line errors, models/serve/batch subcommands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpose_web import cli, io, registry

import standin

REPO = Path(__file__).resolve().parents[1]
CROPS = [("2022-10-14-U2OS-1", (slice(100, 300), slice(200, 400))),
         ("2023-05-31-misc-4", (slice(150, 350), slice(150, 350)))]


@pytest.fixture
def folder(tmp_path, data_dir):
    """Two ~200x200 crops of the real validation images (and their labels, kept aside)."""
    from skimage.segmentation import relabel_sequential

    d = tmp_path / "imgs"
    d.mkdir()
    labels = {}
    for i, (name, sl) in enumerate(CROPS):
        img = tifffile.imread(data_dir / "nuclei_2d" / "val" / f"{name}.tif")[sl]
        lab = tifffile.imread(data_dir / "nuclei_2d" / "val" / f"{name}_masks.tif")[sl]
        tifffile.imwrite(d / f"cells{i}.tif", img)
        labels[f"cells{i}.tif"] = relabel_sequential(lab)[0].astype(np.uint16)
    return d, labels


@pytest.fixture
def stub(folder, monkeypatch):
    d, labels = folder
    answers = {standin.image_key(tifffile.imread(d / name)): lab for name, lab in labels.items()}
    model = standin.StandInModel(answers)  # answers each image with its ground-truth labels
    info = registry.ModelInfo(name="stub", source="lab", arch="lite", path="/models/stub", sha256="ab" * 32)
    monkeypatch.setattr(cli.common, "load_model", lambda args, spec, for_training=False: (model, info))
    return model


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# segmentation (stand-in model: checks the plumbing and the files exactly)
# ---------------------------------------------------------------------------------------------
def test_cli_writes_all_files(folder, stub, capsys):
    d, labels = folder
    rc, out, err = _run(["--dir", str(d), "--pretrained_model", "stub", "--save_png", "--save_tif", "--save_txt",
                         "--save_rois", "--save_outlines", "--save_flows", "--diameter", "25",
                         "--flow_threshold", "0.5", "--norm_percentile", "2", "98", "--chan", "2", "--chan2", "1"],
                        capsys)
    assert rc == 0, err
    assert "--chan/--chan2" in err  # accepted with a notice
    assert "diameter estimated" not in out  # --diameter 25 was given
    for name, lab in labels.items():
        stem = Path(name).stem
        n = int(lab.max())
        assert f"{name}: {n} masks" in out and "cpu" in out
        for suffix in ["_seg.npy", "_cp_masks.png", "_cp_masks.tif", "_cp_outlines.txt", "_rois.zip",
                       "_outlines_cp_masks.png", "_flows_cp_masks.tif", "_dP_cp_masks.tif",
                       "_cellprob_cp_masks.tif"]:
            assert (d / f"{stem}{suffix}").is_file(), stem + suffix
        np.testing.assert_array_equal(io.imread(d / f"{stem}_cp_masks.png"), lab)
        seg = io.load_seg(d / f"{stem}_seg.npy")
        np.testing.assert_array_equal(seg["masks"], lab)
        assert seg["diameter"] == 25.0 and seg["flow_threshold"] == 0.5
        assert seg["normalize_params"]["percentile"] == [2.0, 98.0]
        prov = seg["cellpose_web"]
        assert prov["model"]["name"] == "stub" and prov["model"]["sha256"] == "ab" * 32
        assert prov["eval_params"]["flow_threshold"] == 0.5 and prov["device"] == "cpu"
        assert len(io.read_outlines_text(d / f"{stem}_cp_outlines.txt")) == n
        assert len(io.read_rois(d / f"{stem}_rois.zip")) == sum(len(o) > 0 for o in io.outlines_list(lab))
    kw = stub.calls[0]
    assert kw["diameter"] == 25.0 and kw["normalize"] == {"percentile": [2.0, 98.0]} and kw["resample"] is True


def test_cli_summary_says_what_to_try(tmp_path, stub, capsys):
    blank = tmp_path / "blank"
    blank.mkdir()
    tifffile.imwrite(blank / "empty.tif", np.zeros((128, 128), np.uint16))  # the stand-in finds nothing
    rc, out, err = _run(["--dir", str(blank), "--pretrained_model", "stub"], capsys)
    assert rc == 0, err
    assert "empty.tif: 0 masks" in out and "  try: No cells found" in out
    # automatic diameter: the stand-in estimates 17 px, as lite would report it
    assert "  diameter estimated at 17 px; a second pass ran zoomed 1.76x (3.1x the pixels)" in out


def test_cli_savedir_in_folders_no_npy_and_edges(folder, stub, capsys, tmp_path):
    from cellpose_web.engine import dynamics

    d, labels = folder
    out_dir = tmp_path / "results"
    rc, out, err = _run(["--image_path", str(d / "cells0.tif"), "--save_png", "--save_txt", "--in_folders",
                         "--savedir", str(out_dir), "--no_npy", "--exclude_on_edges"], capsys)
    assert rc == 0, err
    lab = labels["cells0.tif"]
    expected = dynamics.remove_edge_masks(lab)
    got = io.imread(out_dir / "masks" / "cells0_cp_masks.png")
    np.testing.assert_array_equal(got, expected)
    assert got.max() < lab.max()  # some cells touched the border
    assert (out_dir / "txt_outlines" / "cells0_cp_outlines.txt").is_file()
    assert not list(d.glob("*_seg.npy")) and not list(out_dir.rglob("*_seg.npy"))


def test_cli_continues_after_a_bad_image(folder, stub, capsys):
    d, labels = folder
    (d / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 10)
    (d / "notes.png").write_text("not an image")
    rc, out, err = _run(["--dir", str(d)], capsys)
    assert rc == 2
    assert "cells0.tif" in out and "cells1.tif" in out
    assert "error: broken.tif" in err and "error: notes.png" in err and "2 of 4 image(s) failed" in err
    assert "Traceback" not in err
    assert (d / "cells0_seg.npy").is_file() and (d / "cells1_seg.npy").is_file()


# ---------------------------------------------------------------------------------------------
# bad input: non-zero exit and one line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expect", [
    (["--dir", "/no/such/folder"], "folder not found"),
    (["--image_path", "/no/such/image.tif"], "image not found"),
    ([], "give --dir"),
    (["--not_a_flag"], "unrecognized arguments"),
    (["--diameter", "abc", "--dir", "."], "expected a number"),
    (["--norm_percentile", "99", "1", "--dir", "."], "norm_percentile"),
    (["models", "add", "/no/such.pth", "--name", "x"], "not found"),
    (["models", "rename", "nope", "other"], "no lab model"),
    (["models", "add", __file__, "--name", "../evil"], "Invalid model name"),
    (["models"], "required"),
])
def test_bad_input_exits_2_with_one_line(argv, expect, capsys, stub, monkeypatch, folder):
    d, _ = folder
    monkeypatch.chdir(d)
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert expect.lower() in line.lower(), line


def _odd_arrays(tmp: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    np.save(tmp / "complex.npy", rng.random((64, 64)) + 1j)
    np.save(tmp / "row.npy", rng.random((1, 300)))
    np.save(tmp / "five_d.npy", rng.random((2, 2, 2, 32, 32)))
    np.save(tmp / "text.npy", np.array(["a", "b"]))
    np.save(tmp / "empty.npy", np.zeros((0, 5)))
    (tmp / "zero.tif").write_bytes(b"")
    (tmp / "fake.png").write_text("hello")
    return {"complex.npy": "complex", "row.npy": "at least 3 pixels", "five_d.npy": "5 dimensions",
            "text.npy": "expected numbers", "empty.npy": "empty", "zero.tif": "empty", "fake.png": "not a valid PNG"}


def test_odd_arrays_refused_one_line(tmp_path, stub, capsys):
    for name, expect in _odd_arrays(tmp_path).items():
        rc, out, err = _run(["--image_path", str(tmp_path / name), "--no_npy"], capsys)
        assert rc == 2, name
        line = _one_error_line(err)
        assert name in line and expect in line, line


@pytest.mark.parametrize("flags, expect", [
    (["--diameter", "-5"], "--diameter"), (["--niter", "1000000000"], "--niter"), (["--batch_size", "0"], "--batch_size"),
    (["--flow_threshold", "-1"], "--flow_threshold"), (["--anisotropy", "0"], "--anisotropy"),
    (["--cellprob_threshold", "1e308"], "--cellprob_threshold"), (["--stitch_threshold", "2"], "--stitch_threshold"),
    (["--diameter", "nan"], "--diameter"), (["--bsize", "3"], "--bsize"),
    (["--train", "--n_epochs", "0"], "--n_epochs"), (["--train", "--learning_rate", "5"], "--learning_rate"),
])
def test_absurd_parameters_refused_before_work(folder, stub, capsys, flags, expect):
    d, _ = folder
    rc, out, err = _run(["--dir", str(d), *flags], capsys)
    assert rc == 2 and expect in _one_error_line(err)
    assert stub.calls == [] and not list(d.glob("*_seg.npy"))


def test_unknown_model_one_line(folder, capsys):
    d, _ = folder
    rc, out, err = _run(["--dir", str(d), "--pretrained_model", "no_such_model"], capsys)
    assert rc == 2 and "Unknown model 'no_such_model'" in _one_error_line(err)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: Cellpose-SAM cannot be had."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    from cellpose_web.errors import ModelNotAvailableError
    from cellpose_web.models import CellposeModel

    with pytest.raises(ModelNotAvailableError) as e:
        CellposeModel(pretrained_model="cpsam")
    return " ".join(str(e.value).split())  # the Python API's message, as the CLI prints it


@pytest.mark.parametrize("sub", [[], ["batch", "--dask-workers", "1"]], ids=["segment", "dask-batch"])
def test_offline_hub_model_exits_2_with_the_api_message(folder, offline, capsys, sub):
    d, labels = folder
    rc, out, err = _run([*sub, "--dir", str(d), "--pretrained_model", "cpsam", "--save_png"], capsys)
    assert rc == 2
    assert _one_error_line(err) == f"error: {offline}"
    assert "lite" not in out and not list(d.glob("*_cp_masks.png")) and not list(d.glob("*_seg.npy"))


def test_offline_fallback_is_explicit_and_said(folder, offline, capsys):
    d, labels = folder
    rc, out, err = _run(["--dir", str(d), "--pretrained_model", "cpsam", "--fallback", "lite", "--save_png"], capsys)
    assert rc == 0, err
    assert f"notice: {offline}" in err and "--fallback: using 'lite' instead of 'cpsam'" in err
    for name in labels:
        seg = io.load_seg(d / f"{Path(name).stem}_seg.npy")
        assert seg["cellpose_web"]["model"]["name"] == "lite"
        assert seg["cellpose_web"]["model"]["sha256"] == registry.file_sha256(registry.builtin_path("lite"))


def test_hostile_seg_as_input_is_refused(folder, stub, capsys, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    arr = np.empty((), dtype=object)
    arr[()] = {"masks": np.zeros((8, 8), np.uint16), "x": Evil()}
    np.save(tmp_path / "evil_seg.npy", arr, allow_pickle=True)
    rc, out, err = _run(["--image_path", str(tmp_path / "evil_seg.npy")], capsys)
    assert rc == 2 and "refused" in err and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()


def test_unexpected_error_is_one_line_with_hint(folder, monkeypatch, capsys):
    d, _ = folder

    def boom(args, spec, for_training=False):
        raise RuntimeError("CUDA driver exploded\nsecond line")

    monkeypatch.setattr(cli.common, "load_model", boom)
    rc, out, err = _run(["--dir", str(d), "--pretrained_model", "x"], capsys)
    assert rc == 1
    line = _one_error_line(err)
    assert "RuntimeError" in line and "--verbose" in line
    rc, out, err = _run(["--dir", str(d), "--pretrained_model", "x", "--verbose"], capsys)
    assert rc == 1 and "Traceback" in err


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
def test_models_subcommand(reference_dir, capsys):
    tiny = reference_dir / "tiny_cpsam.pth"
    rc, out, err = _run(["models", "add", str(tiny), "--name", "tiny_lab", "--description", "test model"], capsys)
    assert rc == 0 and "tiny_lab" in out, err
    rc, out, err = _run(["models", "list"], capsys)
    assert rc == 0 and "tiny_lab" in out and "cpsam_v2" in out and "lite" in out
    rc, out, err = _run(["models", "rename", "tiny_lab", "tiny2"], capsys)
    assert rc == 0
    rc, out, err = _run(["models", "list", "--json"], capsys)
    import json

    names = [m["name"] for m in json.loads(out)]
    assert "tiny2" in names and "tiny_lab" not in names
    rc, out, err = _run(["models", "info", "tiny2"], capsys)
    assert rc == 0 and json.loads(out)["arch"] == "cpsam"
    rc, out, err = _run(["models", "delete", "tiny2"], capsys)
    assert rc == 0 and registry.list_models()[-1].name != "tiny2"
    rc, out, err = _run(["--add_model", str(tiny)], capsys)  # Cellpose's flag
    assert rc == 0 and registry.get_lab_model("tiny_cpsam").arch == "cpsam"


def test_serve_passes_arguments(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("cellpose_web.ui.app")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "cellpose_web.ui.app", fake)
    assert cli.main(["serve", "--port", "7999", "--host", "127.0.0.1"]) == 0
    assert seen["argv"] == ["--port", "7999", "--host", "127.0.0.1"]


def test_batch_runs_like_eval_and_dask_errors(folder, stub, capsys, reference_dir):
    d, labels = folder
    rc, out, err = _run(["batch", "--dir", str(d), "--save_png"], capsys)
    assert rc == 0 and (d / "cells1_cp_masks.png").is_file()
    import dask.distributed  # noqa: F401  (requirements-dev.txt)
    tiny = str(reference_dir / "tiny_cpsam.pth")
    rc, out, err = _run(["batch", "--dir", str(d), "--pretrained_model", tiny, "--dask-scheduler",
                         "tcp://127.0.0.1:1", "--dask-timeout", "1"], capsys)
    assert rc == 2 and "could not connect to the Dask scheduler" in _one_error_line(err)
    rc, out, err = _run(["batch", "--dir", str(d), "--dask-scheduler", "not-an-address"], capsys)
    assert rc == 2 and "not a scheduler address" in _one_error_line(err)
    rc, out, err = _run(["batch", "--dir", str(d), "--dask-workers", "0"], capsys)
    assert rc == 2 and "--dask-workers" in _one_error_line(err)


def test_version(capsys):
    rc, out, err = _run(["--version"], capsys)
    from cellpose_web import __version__

    assert rc == 0 and __version__ in out


# ---------------------------------------------------------------------------------------------
# real models, in a subprocess (python -m cellpose_web)
# ---------------------------------------------------------------------------------------------
def _cli(args, cwd, env_extra=None, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "cellpose_web", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_real_tiny_checkpoint(folder, reference_dir, tmp_path):
    d, _ = folder
    out = tmp_path / "out"
    r = _cli(["--dir", str(d), "--pretrained_model", str(reference_dir / "tiny_cpsam.pth"), "--save_png",
              "--save_txt", "--save_rois", "--save_outlines", "--save_flows", "--savedir", str(out),
              "--cellprob_threshold", "-20", "--flow_threshold", "0", "--batch_size", "4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tiny_cpsam.pth" in r.stderr and "done: 2 image(s)" in r.stderr
    for stem in ("cells0", "cells1"):
        seg = io.load_seg(out / f"{stem}_seg.npy")
        n = int(seg["masks"].max())
        assert f"{stem}.tif: {len(np.unique(seg['masks'])) - 1} masks" in r.stdout
        assert seg["masks"].shape == (200, 200) and seg["flows"][4].shape == (3, 200, 200)
        assert seg["cellpose_web"]["model"]["sha256"] == registry.file_sha256(reference_dir / "tiny_cpsam.pth")
        if n:  # a random network: masks only because of the permissive thresholds
            np.testing.assert_array_equal(io.imread(out / f"{stem}_cp_masks.png"), seg["masks"])
            for suffix in ("_cp_outlines.txt", "_rois.zip", "_outlines_cp_masks.png", "_dP_cp_masks.tif"):
                assert (out / f"{stem}{suffix}").is_file()


@pytest.mark.slow
def test_cli_lite_segments_nuclei(folder, tmp_path):
    assert registry.builtin_path("lite").is_file(), "the built-in lite weights ship in cellpose_web/weights"
    from cellpose_web.engine.metrics import average_precision

    d, labels = folder
    r = _cli(["--dir", str(d), "--pretrained_model", "lite", "--save_png"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name, lab in labels.items():
        pred = io.imread(d / f"{Path(name).stem}_cp_masks.png")
        ap = average_precision([lab], [pred])[0]
        assert np.asarray(ap).reshape(-1)[0] >= 0.5, (name, ap)  # 200x200 crops: cut nuclei at the edges


@pytest.mark.slow
def test_cli_train_registers_lab_model(folder, reference_dir, tmp_path):
    d, labels = folder
    for name, lab in labels.items():
        tifffile.imwrite(d / f"{Path(name).stem}_masks.tif", lab)
    home = tmp_path / "home"
    env = {"CELLPOSE_WEB_HOME": str(home)}
    r = _cli(["--train", "--dir", str(d), "--pretrained_model", str(reference_dir / "tiny_cpsam.pth"),
              "--n_epochs", "2", "--learning_rate", "1e-4", "--model_name_out", "cli_ft", "--min_train_masks", "1"],
             cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert (d / "models" / "cli_ft").is_file()
    assert "registered lab model 'cli_ft'" in r.stdout
    assert "epoch 1/2: loss " in r.stdout and "epoch 2/2: loss " in r.stdout  # one line per epoch (not a tty)
    r2 = _cli(["models", "list", "--json"], cwd=tmp_path, env_extra=env)
    import json

    entry = [m for m in json.loads(r2.stdout) if m["name"] == "cli_ft"][0]
    assert entry["source"] == "lab" and entry["arch"] == "cpsam" and entry["base_model"] == "tiny_cpsam.pth"
    assert len(entry["training"]["train_losses"]) == 2
    assert entry["sha256"] == registry.file_sha256(d / "models" / "cli_ft")
    # the same name again is refused before any training
    r3 = _cli(["--train", "--dir", str(d), "--pretrained_model", "cli_ft", "--model_name_out", "cli_ft"],
              cwd=tmp_path, env_extra=env)
    assert r3.returncode == 2 and "already exists" in r3.stderr


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """`cellpose-web models list | head -1`: the reader leaves early; no 'unexpected BrokenPipeError' line."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CELLPOSE_WEB_HOME=str(tmp_path))
    try:
        r = subprocess.run([sys.executable, "-m", "cellpose_web", "models", "list"], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=120)
    finally:
        os.close(write_end)
    assert "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert r.returncode == 1
