"""Batch results named after the uploaded files: folders inside a zip kept (a ``path`` column and
mirrored result folders), file names in any language, and uploads with nothing to segment refused
with the reason for each file. Segmentation uses the stand-in model (tests/standin.py)."""
import io
import json
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellpose_web.errors import BadInputError
from cellpose_web.io.names import OUTPUT_NAME_MAX_BYTES, output_folders, output_name
from cellpose_web.service import jobs
from cellpose_web.workflows import batch, model_cache as models_cache, segment

import standin


@pytest.fixture
def fake_model(monkeypatch):
    cm = standin.install(monkeypatch)
    monkeypatch.setattr(models_cache, "check_offered", lambda name: name)
    return cm


def _tif_bytes(arr):
    b = io.BytesIO()
    tifffile.imwrite(b, arr)
    return b.getvalue()


def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _run(files, out):
    return batch.run_batch([str(f) for f in files], segment.SegmentParams(), standin.NAME, out)


def _zip_names(res):
    with zipfile.ZipFile(res["zip"]) as zf:
        return zf.namelist()


# ---------------------------------------------------------------- 1. folders inside a zip
def test_nested_zip_keeps_each_images_path(tmp_path, fake_model):
    imgs = {"exp1/day1/a.tif": standin.blobs(1), "exp1/day2/a.tif": standin.blobs(2, 3), "exp2/b.tif": standin.blobs(3, 4)}
    z = _zip(tmp_path / "nested.zip", {k: _tif_bytes(v) for k, v in imgs.items()})
    res = _run([z], tmp_path / "job" / "results")
    assert res["n_ok"] == 3 and res["errors"] == []
    summary = pd.read_csv(res["summary_csv"], comment="#")
    assert list(summary.columns[:3]) == ["image", "path", "n_cells"]
    assert sorted(summary.path) == sorted(imgs)  # the identity: unique, relative, POSIX
    assert sorted(summary.image) == ["a.tif", "a.tif", "b.tif"]  # the old column, as before
    counts = dict(zip(summary.path, summary.n_cells))
    for path, img in imgs.items():
        assert counts[path] == standin.threshold_labels(img).max() > 1
    cells = pd.read_csv(res["cells_csv"], comment="#")
    assert list(cells.columns[:2]) == ["image", "path"]
    assert cells.groupby("path").size().to_dict() == counts
    names = _zip_names(res)
    for folder in ("exp1/day1/a", "exp1/day2/a", "exp2/b"):
        stem = folder.rsplit("/", 1)[1]
        assert f"{folder}/{stem}_cp_masks.tif" in names and f"{folder}/{stem}_cells.csv" in names
    # each folder holds that image's own masks
    with zipfile.ZipFile(res["zip"]) as zf:
        for path, img in imgs.items():
            folder = path.rsplit(".", 1)[0]
            m = tifffile.imread(io.BytesIO(zf.read(f"{folder}/{folder.rsplit('/', 1)[1]}_cp_masks.tif")))
            np.testing.assert_array_equal(m, standin.threshold_labels(img))
    book = json.loads((tmp_path / "job" / "results" / "batch.json").read_text())
    assert {d["path"]: d["folder"] for d in book["images"]} == {k: k.rsplit(".", 1)[0] for k in imgs}


def test_single_files_keep_the_flat_layout_and_several_zips_are_told_apart(tmp_path, fake_model):
    a, b = tmp_path / "a.tif", tmp_path / "b.png"
    tifffile.imwrite(a, standin.blobs(1))
    from PIL import Image
    Image.fromarray(standin.blobs(2).astype(np.uint8)).save(b)
    res = _run([a, b], tmp_path / "flat" / "results")
    summary = pd.read_csv(res["summary_csv"], comment="#")
    assert list(summary.path) == list(summary.image) == ["a.tif", "b.png"]
    assert {"a/a_cp_masks.tif", "b/b_cp_masks.tif"} <= set(_zip_names(res))
    z1 = _zip(tmp_path / "plate1.zip", {"a.tif": _tif_bytes(standin.blobs(1))})
    z2 = _zip(tmp_path / "plate2.zip", {"a.tif": _tif_bytes(standin.blobs(2))})
    res = _run([z1, z2], tmp_path / "two" / "results")
    summary = pd.read_csv(res["summary_csv"], comment="#")
    assert sorted(summary.path) == ["plate1/a.tif", "plate2/a.tif"]
    assert {"plate1/a/a_cp_masks.tif", "plate2/a/a_cp_masks.tif"} <= set(_zip_names(res))


def test_bad_files_in_folders_are_named_by_their_path(tmp_path, fake_model):
    z = _zip(tmp_path / "in.zip", {"exp1/ok.tif": _tif_bytes(standin.blobs(1)), "exp1/broken.tif": b"II*\x00garbage",
                                   "exp2/broken.tif": b"II*\x00garbage too", "exp2/notes.txt": b"hi"})
    res = _run([z], tmp_path / "job" / "results")
    assert {n for n, _ in res["errors"]} == {"exp1/broken.tif", "exp2/broken.tif", "exp2/notes.txt"}
    summary = pd.read_csv(res["summary_csv"], comment="#")
    bad = summary[summary.status == "error"]
    assert sorted(bad.path) == ["exp1/broken.tif", "exp2/broken.tif", "exp2/notes.txt"]
    assert sorted(bad.image) == ["broken.tif", "broken.tif", "notes.txt"]


# ---------------------------------------------------------------- 2. names in any language
def test_output_name_keeps_letters_of_every_script():
    assert output_name("细胞 图像 2") == "细胞_图像_2"
    assert output_name("Zelle Färbung 1") == "Zelle_Färbung_1"
    assert output_name("Zelle Fa\u0308rbung") == "Zelle_Färbung"  # macOS's decomposed form, composed
    assert output_name('a<b>c:d"e/f\\g|h?i*j') == "a_b_c_d_e_f_g_h_i_j"
    assert output_name("tab\there\x00nul") == "tab_here_nul"
    assert output_name(" .. name. ") == "name"
    assert output_name("..") == "image" and output_name("...", "x") == "x"
    assert output_name("CON").upper() != "CON"  # a Windows device name
    assert output_name("sample-(1)+é#") == "sample-(1)+é#"  # nothing but the unsafe characters changes
    long = output_name("细" * 200)
    assert len(long.encode()) <= OUTPUT_NAME_MAX_BYTES and set(long) == {"细"}  # no half characters


def test_output_folders_unique_per_place():
    assert output_folders(["细胞 2.tif", "图像 2.tif"]) == ["细胞_2", "图像_2"]
    assert output_folders(["a.tif", "a.png", "A.jpg"]) == ["a", "a_1", "A_2"]  # case-insensitive disks
    assert output_folders(["x/a.tif", "y/a.tif"]) == ["x/a", "y/a"]
    assert output_folders(["exp1.tif", "exp1/a.tif"]) == ["exp1_1", "exp1/a"]  # never inside another's folder
    assert output_folders(["summary.csv.tif"], reserved=("summary.csv",)) == ["summary.csv_1"]


def test_batch_folders_keep_non_ascii_names(tmp_path, fake_model):
    names = ["细胞 图像 2.tif", "Zelle Färbung 1.tif", "细胞 2.tif", "图像 2.tif"]
    z = _zip(tmp_path / "unicode.zip", {n: _tif_bytes(standin.blobs(k, 3)) for k, n in enumerate(names)})
    res = _run([z], tmp_path / "job" / "results")
    assert res["n_ok"] == 4
    zn = set(_zip_names(res))
    for folder in ("细胞_图像_2", "Zelle_Färbung_1", "细胞_2", "图像_2"):
        assert f"{folder}/{folder}_cp_masks.tif" in zn, sorted(zn)
    with zipfile.ZipFile(res["zip"]) as zf:  # UTF-8 names (flag 0x800) so every unzip tool shows them
        assert all(i.flag_bits & 0x800 for i in zf.infolist() if not i.filename.isascii())
    summary = pd.read_csv(res["summary_csv"], comment="#")
    assert sorted(summary.path) == sorted(names)


# ---------------------------------------------------------------- 3./4. nothing to segment
@pytest.mark.parametrize("entries, expect", [
    ({}, "holds no files"),
    ({"a_masks.tif": b"x", "b_seg.npy": b"x"}, "upload the images, not the masks"),
    ({"notes.txt": b"x", "sub/readme.md": b"x"}, "notes.txt: not an image type"),
    ({"__MACOSX/._a.tif": b"x", ".DS_Store": b"x"}, "holds no files"),
])
def test_nothing_to_segment_is_refused_before_a_job(tmp_path, fake_model, entries, expect):
    z = _zip(tmp_path / "up.zip", entries)
    with pytest.raises(BadInputError, match="No images to segment") as e:
        batch.start_batch_job([str(z)], standin.NAME, segment.SegmentParams(), None, None, None)
    assert expect in str(e.value)
    assert jobs.manager(None).list("batch") == []  # no job (no 'queued' line that never ends)
    with pytest.raises(BadInputError) as direct:  # the same refusal when the batch itself unpacks it
        _run([z], tmp_path / "direct" / "results")
    assert str(direct.value) == str(e.value)


def test_refusal_lists_why_each_file_was_left_out(tmp_path, fake_model):
    z = _zip(tmp_path / "mixed.zip", {"a_masks.tif": b"x", "notes.txt": b"x"})
    bad = _zip(tmp_path / "evil.zip", {"../x.tif": b"x"})
    with pytest.raises(BadInputError) as e:
        batch.start_batch_job([str(z), str(bad)], standin.NAME, segment.SegmentParams(), None, None, None)
    msg = str(e.value)
    assert "mixed/a_masks.tif" in msg and "upload the images, not the masks" in msg
    assert "mixed/notes.txt: not an image type" in msg and "evil.zip" in msg and "unsafe path" in msg


def test_start_batch_job_runs_a_nested_zip(tmp_path, fake_model):
    z = _zip(tmp_path / "nested.zip", {"d1/a.tif": _tif_bytes(standin.blobs(1)), "d2/a.tif": _tif_bytes(standin.blobs(2))})
    job = batch.start_batch_job([str(z)], standin.NAME, segment.SegmentParams(), None, None, None)
    jm = jobs.manager(None)
    for _ in range(200):
        st = jm.get(job.id)
        if st["state"] not in jobs.ACTIVE:
            break
        time.sleep(0.05)
    assert st["state"] == "done", st
    summary = pd.read_csv(st["result"]["summary_csv"], comment="#")
    assert sorted(summary.path) == ["d1/a.tif", "d2/a.tif"]
