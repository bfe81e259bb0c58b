"""cellpose_web.io: reading images, Cellpose output files, _seg.npy (safe), ImageJ ROIs, training folders."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.draw import polygon as draw_polygon

from cellpose_web.engine import dynamics
from cellpose_web import io
from cellpose_web.io import render
from cellpose_web.errors import CellposeWebError

VAL = "nuclei_2d/val"


@pytest.fixture(scope="module")
def crop(data_dir):
    """A 200x200 crop of a real validation image and its labels (relabelled 1..N)."""
    from skimage.segmentation import relabel_sequential

    base = data_dir / VAL
    img = tifffile.imread(base / "2022-10-14-U2OS-1.tif")[100:300, 200:400]
    lab = tifffile.imread(base / "2022-10-14-U2OS-1_masks.tif")[100:300, 200:400]
    lab = relabel_sequential(lab)[0].astype(np.uint16)
    assert lab.max() > 5
    return img, lab


def _fake_flows(shape, seed=0):
    rng = np.random.default_rng(seed)
    dP = rng.standard_normal((2, *shape)).astype(np.float32)
    cp = rng.standard_normal(shape).astype(np.float32)
    return [dynamics.dx_to_circ(dP), dP, cp]


# ---------------------------------------------------------------------------------------------
# imread
# ---------------------------------------------------------------------------------------------
def test_imread_tiff_variants_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4000, (3, 2, 40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "hyper.tif", a, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    arr, meta = io.imread_with_meta(tmp_path / "hyper.tif")
    np.testing.assert_array_equal(arr, a)
    assert meta.axes == "ZCYX" and meta.format == "tiff"
    assert meta.pixel_size_um == pytest.approx((0.325, 0.325)) and meta.z_step_um == pytest.approx(2.0)

    tifffile.imwrite(tmp_path / "x.ome.tif", a, ome=True,
                     metadata={"axes": "ZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 1.5})
    arr, meta = io.imread_with_meta(tmp_path / "x.ome.tif")
    np.testing.assert_array_equal(arr, a)
    assert meta.axes == "ZCYX" and meta.pixel_size_um == pytest.approx((0.4, 0.5)) and meta.z_step_um == 1.5

    tifffile.imwrite(tmp_path / "nm.tif", a[:, 0], imagej=True, resolution=(1 / 250, 1 / 250),
                     metadata={"axes": "ZYX", "unit": "nm", "spacing": 500})
    arr, meta = io.imread_with_meta(tmp_path / "nm.tif")
    assert meta.axes == "ZYX" and meta.pixel_size_um == pytest.approx((0.25, 0.25)) and meta.z_step_um == 0.5

    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:  # plain multi-page file
        for z in range(5):
            tw.write(a[0, 0] + z, contiguous=False, metadata=None)
    arr, meta = io.imread_with_meta(tmp_path / "pages.tif")
    assert arr.shape == (5, 40, 50) and meta.axes == "ZYX" and meta.pixel_size_um is None
    np.testing.assert_array_equal(arr[3], a[0, 0] + 3)

    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    arr, meta = io.imread_with_meta(tmp_path / "rgb.tif")
    np.testing.assert_array_equal(arr, rgb)
    assert meta.axes == "YXC" and meta.pixel_size_um == pytest.approx((0.5, 0.5))
    tifffile.imwrite(tmp_path / "dpi.tif", rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert io.imread_with_meta(tmp_path / "dpi.tif")[1].pixel_size_um is None  # a DPI is not a pixel size


def test_imread_pillow_formats(tmp_path):
    rng = np.random.default_rng(2)
    g8 = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    g16 = rng.integers(0, 65535, (30, 40), dtype=np.uint16)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    Image.fromarray(g8).save(tmp_path / "g.gif")
    Image.fromarray(g8).save(tmp_path / "g.jpg", quality=95)
    frames = [Image.fromarray(np.roll(g8, k, 0)) for k in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])

    np.testing.assert_array_equal(io.imread(tmp_path / "g8.png"), g8)
    x = io.imread(tmp_path / "g16.png")
    assert x.dtype == np.uint16
    np.testing.assert_array_equal(x, g16)
    x, m = io.imread_with_meta(tmp_path / "rgba.png")
    np.testing.assert_array_equal(x, rgb)  # alpha dropped, as Cellpose's reader does
    assert m.axes == "YXC" and m.format == "png"
    np.testing.assert_array_equal(io.imread(tmp_path / "c.bmp"), rgb)
    np.testing.assert_array_equal(io.imread(tmp_path / "g.gif"), g8)
    j = io.imread(tmp_path / "g.jpg")
    assert j.shape == (30, 40) and np.abs(j.astype(int) - g8).mean() < 8
    x, m = io.imread_with_meta(tmp_path / "anim.gif")
    assert x.shape == (3, 30, 40) and m.axes == "ZYX"
    np.testing.assert_array_equal(x[2], np.roll(g8, 2, 0))


def test_imread_npy_and_seg(tmp_path, crop):
    img, lab = crop
    np.save(tmp_path / "a.npy", img)
    np.testing.assert_array_equal(io.imread(tmp_path / "a.npy"), img)
    io.masks_flows_to_seg(img, lab, _fake_flows(lab.shape), str(tmp_path / "a.tif"))
    np.testing.assert_array_equal(io.imread(tmp_path / "a_seg.npy"), lab)


def test_wrong_extension_but_valid_content_is_read(tmp_path):
    g8 = np.arange(1200, dtype=np.uint8).reshape(30, 40)
    Image.fromarray(g8).save(tmp_path / "really_png.tif", format="PNG")
    np.testing.assert_array_equal(io.imread(tmp_path / "really_png.tif"), g8)


def _bad_files(tmp: Path) -> dict[str, str]:
    """name -> regex the message must match."""
    rng = np.random.default_rng(3)
    (tmp / "empty.tif").write_bytes(b"")
    (tmp / "text.png").write_text("this is a text file, not a PNG\n")
    (tmp / "notes.tif").write_text("gene,count\nACTB,12\n")
    (tmp / "doc.png").write_bytes(b"PK\x03\x04" + bytes(200))
    (tmp / "page.jpg").write_bytes(b"<!DOCTYPE html><html></html>")
    stack = rng.integers(0, 4000, (6, 64, 64), dtype=np.uint16)
    tifffile.imwrite(tmp / "full.tif", stack)
    data = (tmp / "full.tif").read_bytes()
    (tmp / "trunc_half.tif").write_bytes(data[: len(data) // 2])
    tifffile.imwrite(tmp / "ij.tif", stack, imagej=True)
    data = (tmp / "ij.tif").read_bytes()
    (tmp / "trunc_ij.tif").write_bytes(data[: len(data) // 2])
    (tmp / "trunc_head.tif").write_bytes(data[:20])
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    (tmp / "trunc.png").write_bytes(data[: len(data) // 2])
    np.save(tmp / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return {
        "empty.tif": "empty", "text.png": "not a valid PNG.*text", "notes.tif": "not a valid TIFF.*text",
        "doc.png": "zip", "page.jpg": "HTML", "trunc_half.tif": "truncated", "trunc_ij.tif": "truncated",
        "trunc_head.tif": "truncated|damaged", "trunc.png": "truncated", "obj.npy": "segmentation|refused",
        "folder_not_file": "folder",
    }


def test_unreadable_files_give_one_clear_message(tmp_path):
    cases = _bad_files(tmp_path)
    (tmp_path / "folder_not_file").mkdir()
    for name, pattern in cases.items():
        with pytest.raises(CellposeWebError, match=pattern) as ei:
            io.imread(tmp_path / name)
        assert name in str(ei.value) or name == "folder_not_file"
    with pytest.raises(FileNotFoundError):
        io.imread(tmp_path / "missing.tif")


def test_max_pixels_checked_before_decoding(tmp_path):
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((4, 100, 100), np.uint8))
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    for f in ("big.tif", "big.png"):
        with pytest.raises(CellposeWebError, match="too large"):
            io.imread(tmp_path / f, max_pixels=5_000)
    assert io.imread(tmp_path / "big.tif", max_pixels=40_000).shape == (4, 100, 100)


# ---------------------------------------------------------------------------------------------
# outlines
# ---------------------------------------------------------------------------------------------
def test_outline_order_matches_opencv_convention():
    m = np.zeros((6, 7), np.uint16)
    m[1:4, 1:4] = 1
    # cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_NONE) of a 3x3 square: down the left side first
    assert io.outlines_list(m)[0].tolist() == [[1, 1], [1, 2], [1, 3], [2, 3], [3, 3], [3, 2], [3, 1], [2, 1]]
    m[5, 6] = 2  # a single pixel: <= 4 points -> empty, as Cellpose
    out = io.outlines_list(m)
    assert len(out) == 2 and out[1].shape == (0, 2)


def test_outlines_trace_each_mask_exactly(crop):
    _, lab = crop
    outl = io.outlines_list(lab)
    assert len(outl) == lab.max()
    border = render.outlines(lab)
    for i, o in enumerate(outl, start=1):
        if len(o) == 0:
            continue
        assert (lab[o[:, 1], o[:, 0]] == i).all()  # every point is a pixel of its mask
        assert border[o[:, 1], o[:, 0]].all()  # ... on its border
        steps = np.abs(np.diff(np.vstack([o, o[:1]]), axis=0)).max(axis=1)
        assert (steps == 1).all()  # a closed 8-connected chain
        rr, cc = draw_polygon(o[:, 1], o[:, 0], lab.shape)
        filled = np.zeros(lab.shape, bool)
        filled[rr, cc] = True
        filled[o[:, 1], o[:, 0]] = True
        mask = lab == i
        from scipy import ndimage as ndi

        mask = ndi.binary_fill_holes(mask)
        iou = (filled & mask).sum() / (filled | mask).sum()
        assert iou > 0.97, (i, iou)


# ---------------------------------------------------------------------------------------------
# save_masks
# ---------------------------------------------------------------------------------------------
def test_save_masks_writes_cellpose_names(tmp_path, crop):
    img, lab = crop
    f = tmp_path / "cells.tif"
    tifffile.imwrite(f, img)
    flows = _fake_flows(lab.shape)
    written = io.save_masks(img, lab, flows, str(f), png=True, tif=True, save_flows=True, save_outlines=True,
                            save_txt=True, save_mpl=True)
    names = sorted(p.name for p in written)
    assert names == sorted(["cells_cp_masks.png", "cells_cp_masks.tif", "cells_cp_outlines.txt",
                            "cells_outlines_cp_masks.png", "cells_flows_cp_masks.tif", "cells_dP_cp_masks.tif",
                            "cells_cellprob_cp_masks.tif", "cells_cp_output_cp_masks.png"])
    for n in names:
        assert (tmp_path / n).is_file()
    png = io.imread(tmp_path / "cells_cp_masks.png")
    assert png.dtype == np.uint16
    np.testing.assert_array_equal(png, lab)
    np.testing.assert_array_equal(io.imread(tmp_path / "cells_cp_masks.tif"), lab)
    np.testing.assert_allclose(io.imread(tmp_path / "cells_dP_cp_masks.tif"), flows[1])
    np.testing.assert_allclose(io.imread(tmp_path / "cells_cellprob_cp_masks.tif"), flows[2])
    np.testing.assert_array_equal(io.imread(tmp_path / "cells_flows_cp_masks.tif"), flows[0])
    over = io.imread(tmp_path / "cells_outlines_cp_masks.png")
    red = (over[..., 0] == 255) & (over[..., 1] == 0) & (over[..., 2] == 0)
    border = render.outlines(lab)
    assert red[border].all() and red.sum() == border.sum()
    txt = io.read_outlines_text(tmp_path / "cells_cp_outlines.txt")
    ref = io.outlines_list(lab)
    assert len(txt) == len(ref) and all(np.array_equal(a, b) for a, b in zip(txt, ref))
    first = (tmp_path / "cells_cp_outlines.txt").read_text().splitlines()[0]
    assert all(t.isdigit() for t in first.split(","))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_save_masks_folders_and_special_cases(tmp_path, crop):
    img, lab = crop
    sub = tmp_path / "exp" / "imgs"
    sub.mkdir(parents=True)
    f = sub / "a.png"
    io.save_masks(img, lab, _fake_flows(lab.shape), str(f), in_folders=True, save_txt=True, save_outlines=True,
                  save_flows=True, savedir=tmp_path / "out")
    for rel in ["masks/a_cp_masks.png", "txt_outlines/a_cp_outlines.txt", "outlines/a_outlines_cp_masks.png",
                "flows/a_flows_cp_masks.tif", "flows/a_dP_cp_masks.tif"]:
        assert (tmp_path / "out" / rel).is_file(), rel
    io.save_masks(img, lab, None, str(f), dir_above=True)
    assert (tmp_path / "exp" / "a_cp_masks.png").is_file()
    # empty masks: nothing unless tif
    assert io.save_masks(img, np.zeros_like(lab), None, str(tmp_path / "e.tif")) == []
    assert [p.name for p in io.save_masks(img, np.zeros_like(lab), None, str(tmp_path / "e.tif"), tif=True,
                                          png=False)] == ["e_cp_masks.tif"]
    # 3D masks go to TIFF
    m3 = np.stack([lab, lab])
    w = io.save_masks(np.stack([img, img]), m3, None, str(tmp_path / "z.tif"), png=True)
    assert [p.name for p in w] == ["z_cp_masks.tif"]
    np.testing.assert_array_equal(io.imread(w[0]), m3)
    # lists of images
    w = io.save_masks([img, img], [lab, lab], [None, None], [str(tmp_path / "l1.tif"), str(tmp_path / "l2.tif")])
    assert [p.name for p in w] == ["l1_cp_masks.png", "l2_cp_masks.png"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "x.bin", boom)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "x.bin", boom)
    assert (tmp_path / "x.bin").read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------------------------------------
# _seg.npy
# ---------------------------------------------------------------------------------------------
GUI_KEYS = {"outlines", "colors", "masks", "chan_choose", "filename", "flows", "ismanual", "manual_changes",
            "model_path", "flow_threshold", "cellprob_threshold", "normalize_params", "restore", "ratio",
            "diameter", "est_diam"}


def test_seg_round_trip_with_gui_keys_and_provenance(tmp_path, crop):
    img, lab = crop
    f = tmp_path / "cells.tif"
    tifffile.imwrite(f, img)
    flows = _fake_flows(lab.shape)
    meta = {"model": {"name": "tiny", "sha256": "ab" * 32, "path": "/m/tiny"},
            "eval_params": {"flow_threshold": 0.3, "cellprob_threshold": -1.0, "niter": 0}, "device": "cpu",
            "est_diam": 21.5}
    (p,) = io.masks_flows_to_seg(img, lab, flows, str(f), diameter=30.0, channels=[0, 0], metadata=meta)
    assert p.name == "cells_seg.npy"
    dat = io.load_seg(p)
    assert GUI_KEYS <= set(dat)
    np.testing.assert_array_equal(dat["masks"], lab)
    assert dat["masks"].dtype == np.uint16 and dat["outlines"].dtype == np.uint16
    border = render.outlines(lab)
    np.testing.assert_array_equal(dat["outlines"], lab * border)
    assert dat["colors"].shape == (lab.max(), 3) and dat["ismanual"].shape == (lab.max(),)
    assert dat["chan_choose"] == [0, 0] and dat["filename"] == str(f.resolve())
    assert dat["diameter"] == 30.0 and dat["est_diam"] == 21.5
    assert dat["flow_threshold"] == 0.3 and dat["cellprob_threshold"] == -1.0 and dat["model_path"] == "/m/tiny"
    fl = dat["flows"]
    assert fl[0].shape == (1, *lab.shape, 3) and fl[0].dtype == np.uint8
    assert fl[1].shape == (1, *lab.shape) and fl[1].dtype == np.uint8
    assert fl[2].shape == (1, *lab.shape, 3) and fl[3] == []
    np.testing.assert_allclose(fl[4][:2], flows[1])
    np.testing.assert_allclose(fl[4][2], flows[2])
    prov = dat["cellpose_web"]
    assert prov["model"]["sha256"] == "ab" * 32 and prov["eval_params"]["niter"] == 0
    assert prov["package"] == "cellpose_web" and prov["version"] and prov["date"]
    # and the standard loader (what Cellpose's GUI does) reads it too
    plain = np.load(p, allow_pickle=True).item()
    np.testing.assert_array_equal(plain["masks"], lab)


def test_seg_3d_layout(tmp_path, crop):
    img, lab = crop
    m3 = np.stack([lab, lab, lab])
    dP = np.random.default_rng(0).standard_normal((3, *m3.shape)).astype(np.float32)
    cp = np.zeros(m3.shape, np.float32)
    (p,) = io.masks_flows_to_seg(np.stack([img] * 3), m3, [None, dP, cp], str(tmp_path / "st.tif"))
    dat = io.load_seg(p)
    assert dat["flows"][0].shape == (*m3.shape, 3) and dat["flows"][4].shape == (4, *m3.shape)
    assert "zdraw" in dat and "ismanual" not in dat
    np.testing.assert_array_equal(dat["masks"], m3)


def _gui_style_seg_bytes(lab: np.ndarray) -> bytes:
    """A _seg.npy as written by Cellpose's GUI under numpy 1.x (module 'numpy.core', pickle protocol 3)."""
    n = int(lab.max())
    dat = {
        "outlines": lab * render.outlines(lab), "colors": np.random.default_rng(0).integers(0, 255, (n, 3)),
        "masks": lab, "chan_choose": [0, 0], "filename": "C:\\data\\img.tif",
        "flows": [np.zeros((1, *lab.shape, 3), np.uint8), np.zeros((1, *lab.shape), np.uint8),
                  np.zeros((1, *lab.shape, 3), np.uint8), [], np.zeros((3, *lab.shape), np.float32)],
        "ismanual": np.zeros(n, bool), "manual_changes": [], "model_path": "cpsam", "flow_threshold": 0.4,
        "cellprob_threshold": 0.0, "normalize_params": {"lowhigh": None, "percentile": [1.0, 99.0]},
        "restore": None, "ratio": 1.0, "diameter": np.float64(30.0),
    }
    arr = np.empty((), dtype=object)
    arr[()] = dat
    body = pickle.dumps(arr, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    import io as pyio

    buf = pyio.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    assert buf.getvalue().startswith(b"\x93NUMPY\x01\x00")
    return buf.getvalue() + body


def test_seg_made_by_cellpose_gui_loads(tmp_path, crop):
    _, lab = crop
    p = tmp_path / "img_seg.npy"
    p.write_bytes(_gui_style_seg_bytes(lab))
    assert b"numpy.core.multiarray" in p.read_bytes()
    dat = io.load_seg(p)
    np.testing.assert_array_equal(dat["masks"], lab)
    assert dat["diameter"] == 30.0 and dat["model_path"] == "cpsam"
    np.testing.assert_array_equal(io.imread(p), lab)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval", "top_level"])
def test_hostile_seg_is_refused_without_running_code(tmp_path, payload):
    target = tmp_path / "PWNED"
    p = tmp_path / "evil_seg.npy"
    if payload == "system":
        obj = {"masks": np.zeros((4, 4), np.uint16), "x": _Evil(target)}
    elif payload == "eval":
        obj = {"masks": np.zeros((4, 4), np.uint16), "flows": [_EvilEval()]}
    else:
        obj = _Evil(target)
    arr = np.empty((), dtype=object)
    arr[()] = obj
    np.save(p, arr, allow_pickle=True)
    with pytest.raises(CellposeWebError, match="refused"):
        io.load_seg(p)
    with pytest.raises(CellposeWebError, match="refused"):
        io.imread(p)
    assert not target.exists()


def test_damaged_seg_files(tmp_path):
    (tmp_path / "a_seg.npy").write_bytes(b"")
    (tmp_path / "b_seg.npy").write_bytes(b"hello")
    np.save(tmp_path / "c_seg.npy", np.array({"masks": np.zeros((3, 3))}, dtype=object), allow_pickle=True)
    data = (tmp_path / "c_seg.npy").read_bytes()
    (tmp_path / "d_seg.npy").write_bytes(data[: len(data) - 20])
    np.save(tmp_path / "e_seg.npy", np.array({"masks": np.zeros((3, 3), np.float32)}, dtype=object),
            allow_pickle=True)
    for n, pat in [("a", "empty"), ("b", "not a .npy"), ("d", "damaged"), ("e", "integer")]:
        with pytest.raises(CellposeWebError, match=pat):
            io.load_seg(tmp_path / f"{n}_seg.npy")


def test_npy_format_version_3_is_read(tmp_path):
    """Format 3.0 (utf-8 header) is read by our own header parser, for images and for _seg.npy."""
    img = np.arange(24, dtype=np.uint16).reshape(4, 6)
    with open(tmp_path / "v3.npy", "wb") as fh:
        np.lib.format.write_array(fh, img, version=(3, 0))
    np.testing.assert_array_equal(io.imread(tmp_path / "v3.npy"), img)
    lab = np.zeros((5, 5), np.uint16)
    lab[1:3, 1:3] = 1
    with open(tmp_path / "v3_seg.npy", "wb") as fh:
        np.lib.format.write_array(fh, np.array({"masks": lab}, dtype=object), version=(3, 0), allow_pickle=True)
    np.testing.assert_array_equal(io.load_seg(tmp_path / "v3_seg.npy")["masks"], lab)
    with open(tmp_path / "v2.npy", "wb") as fh:
        np.lib.format.write_array(fh, img, version=(2, 0))
    np.testing.assert_array_equal(io.imread(tmp_path / "v2.npy"), img)


@pytest.mark.parametrize("data, pat", [
    (b"\x93NUMPY\x09\x00" + b"x" * 40, "unknown .npy format version 9.0"),
    (b"\x93NUMPY\x03\x00\x20\x00\x00\x00{'descr': '<u2', 'fortran_or", "header is damaged"),
    (b"\x93NUMPY\x01\x00\x10\x00{'a': (1, 2)}  \n", "header is damaged"),
    (b"\x93NUMPY\x03\x00\x10\x00\x00\x00\xff\xfe\xfd" + b" " * 20, "header is damaged"),
    (b"\x93NUMPY\x01\x00\x40\x00{'descr': 'nonsense', 'fortran_order': False, 'shape': (3,), }  \n", "damaged"),
    (b"\x93NUMPY\x01\x00\x40\x00{'descr': '<u2', 'fortran_order': 0, 'shape': (-3,), }       \n", "damaged"),
])
def test_damaged_npy_header_gives_clear_message(tmp_path, data, pat):
    from cellpose_web.errors import BadInputError

    for name in ("bad.npy", "bad_seg.npy"):
        (tmp_path / name).write_bytes(data)
        for read in (io.imread, io.load_seg):
            with pytest.raises(BadInputError, match=pat) as ei:
                read(tmp_path / name)
            msg = str(ei.value)
            assert name in msg and str(tmp_path) not in msg
            assert "Error" not in msg and "numpy.lib" not in msg


# ---------------------------------------------------------------------------------------------
# ImageJ ROIs
# ---------------------------------------------------------------------------------------------
def test_rois_round_trip(tmp_path, crop):
    _, lab = crop
    p = io.save_rois(lab, tmp_path / "cells.tif")
    assert p.name == "cells_rois.zip"
    outl = io.outlines_list(lab)
    expected = [(i + 1, o) for i, o in enumerate(outl) if len(o)]
    with zipfile.ZipFile(p) as zf:
        entries = zf.namelist()
        raw = zf.read(entries[0])
    assert len(entries) == len(expected)
    # raw header: magic, version, polygon type, bounding box, count, 64-byte header, int16 coords
    assert raw[:4] == b"Iout" and raw[6] == 0
    top, left, bottom, right, n = struct.unpack(">hhhhH", raw[8:18])
    xy0 = expected[0][1]
    assert (top, left, bottom, right) == (xy0[:, 1].min(), xy0[:, 0].min(), xy0[:, 1].max() + 1, xy0[:, 0].max() + 1)
    assert n == len(xy0)
    xs = np.frombuffer(raw, ">i2", n, 64) + left
    np.testing.assert_array_equal(xs, xy0[:, 0])
    rois = io.read_rois(p)
    for roi, (label, xy) in zip(rois, expected):
        assert roi["type"] == 0
        np.testing.assert_array_equal(roi["xy"], xy)
        lab_id, yc, xc = roi["entry"][:-4].split("-")
        assert int(lab_id) == label and roi["name"] == roi["entry"][:-4]
        assert int(yc) == round((xy[:, 1].min() + xy[:, 1].max()) / 2)


# ---------------------------------------------------------------------------------------------
# training folders
# ---------------------------------------------------------------------------------------------
def test_load_train_test_data(tmp_path, crop):
    img, lab = crop
    tr, te = tmp_path / "train", tmp_path / "test"
    tr.mkdir()
    te.mkdir()
    tifffile.imwrite(tr / "img2.tif", img)
    tifffile.imwrite(tr / "img2_masks.tif", lab)
    tifffile.imwrite(tr / "img10.tif", img[::-1])
    io.masks_flows_to_seg(img[::-1], lab[::-1], None, str(tr / "img10.tif"))  # labels from a GUI file
    io.save_masks(img, lab, None, str(tr / "img2.tif"))  # outputs in the folder must be skipped
    tifffile.imwrite(te / "t1.tif", img)
    Image.fromarray(lab).save(te / "t1_masks.png")
    out = io.load_train_test_data(str(tr), str(te))
    images, labels, names, timgs, tlabels, tnames = out
    assert [Path(n).name for n in names] == ["img2.tif", "img10.tif"]  # natural sort
    np.testing.assert_array_equal(labels[0], lab)
    np.testing.assert_array_equal(labels[1], lab[::-1])
    np.testing.assert_array_equal(images[1], img[::-1])
    assert [Path(n).name for n in tnames] == ["t1.tif"]
    np.testing.assert_array_equal(tlabels[0], lab)
    _, _, _, ti, tl, tn = io.load_train_test_data(str(tr))
    assert ti is None and tl is None and tn is None
    # mask_filter "_seg.npy" reads GUI files only: img2 has none
    with pytest.raises(CellposeWebError, match="img2_seg.npy"):
        io.load_train_test_data(str(tr), mask_filter="_seg.npy")
    (tr / "img2_masks.tif").unlink()
    with pytest.raises(CellposeWebError, match="img2_masks"):
        io.load_train_test_data(str(tr))


def test_image_files_filters(tmp_path, crop):
    img, lab = crop
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for n in ["a_img.tif", "a_masks.tif", "b_img.png", "b_cp_masks.png", "c_flows.tif", "c_cellprob.tif",
              "note.txt", "sub/d_img.tif", "e_seg.npy"]:
        (d / n).write_bytes(b"x")
    names = [Path(p).name for p in io.get_image_files(d, "_masks")]
    assert names == ["a_img.tif", "b_img.png"]
    names = [Path(p).name for p in io.get_image_files(d, "_masks", imf="_img", look_one_level_down=True)]
    assert names == ["a_img.tif", "b_img.png", "d_img.tif"]
    with pytest.raises(CellposeWebError, match="No images"):
        io.get_image_files(d / "sub", "_masks", imf="_zzz")
    with pytest.raises(FileNotFoundError):
        io.get_image_files(tmp_path / "nope")


# ------------------------------------------------------------------ masks from a person's file
def test_instance_labels_take_labels_and_refuse_what_is_not():
    from cellpose_web.errors import BadInputError
    from cellpose_web.io.labels import instance_labels

    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6], lab[10:15, 10:15] = 1, 2
    out = instance_labels(lab.astype(np.float32), "a.tif")  # ImageJ's 32-bit labels
    assert out.dtype == np.uint16 and np.array_equal(out, lab)
    grey_rgb = np.repeat(lab.astype(np.uint8)[..., None], 4, axis=-1)
    assert np.array_equal(instance_labels(grey_rgb, "a.png"), lab)
    one = (lab == 1).astype(np.uint8)
    assert np.array_equal(instance_labels(one, "a.tif"), one)  # one cell labelled 1 is fine
    colour = grey_rgb.copy()
    colour[2:6, 2:6, 1] = 9
    with pytest.raises(BadInputError, match="colour picture"):
        instance_labels(colour, "c.png")
    with pytest.raises(BadInputError, match="binary mask: 2 separate regions"):
        instance_labels((lab > 0).astype(np.float32), "b.tif")
    with pytest.raises(BadInputError, match="binary mask"):
        instance_labels(lab > 0, "b.tif")
    with pytest.raises(BadInputError, match="fractions"):
        instance_labels(lab * 0.5, "p.tif")
    with pytest.raises(BadInputError, match="negative"):
        instance_labels(-lab, "n.tif")
