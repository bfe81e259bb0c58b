"""Hostile input through the app's API (gradio_client on a launched app): each bad request gets a
clear message, no traceback, and the server keeps serving (a normal request right after succeeds)."""
import io
import socket
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellpose_web import io as cpio

import standin

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "u2os_nuclei.tif"

pytestmark = pytest.mark.slow


def _tif(arr, **kw):
    b = io.BytesIO()
    tifffile.imwrite(b, arr, **kw)
    return b.getvalue()


def _png(arr):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


GOOD = _tif((np.random.default_rng(0).random((64, 64)) * 1000).astype(np.uint16))
NAN = np.random.default_rng(1).random((64, 64)).astype(np.float32)
NAN[:5] = np.nan

# (case id, file name, bytes, model, diameter, flow, cellprob, pixel size, expected: "ok" or message regex)
CASES = [
    ("empty file", "a.tif", b"", None, None, 0.4, 0, None, "empty"),
    ("text as png", "a.png", b"hello, I am text" * 20, None, None, 0.4, 0, None, "text|read|image|PNG"),
    ("truncated tiff", "a.tif", GOOD[:200], None, None, 0.4, 0, None, "read|damaged|truncat|TIFF"),
    ("pdf renamed", "a.tif", b"%PDF-1.5\n" + b"x" * 200, None, None, 0.4, 0, None, "PDF|read|image|not"),
    ("zip renamed", "a.png", b"PK\x03\x04" + b"\0" * 100, None, None, 0.4, 0, None, "zip|read|image|not"),
    ("html", "a.jpg", b"<html><script>alert(1)</script></html>", None, None, 0.4, 0, None, "read|image|HTML|text|not"),
    ("wrong extension", "a.exe", GOOD, None, None, 0.4, 0, None, "unsupported|type"),
    ("no extension", "noext", GOOD, None, None, 0.4, 0, None, "unsupported|type"),
    ("complex tiff", "a.tif", _tif(np.ones((32, 32), np.complex64)), None, None, 0.4, 0, None, "complex"),
    ("all-NaN tiff", "a.tif", _tif(np.full((32, 32), np.nan, np.float32)), None, None, 0.4, 0, None, "finite"),
    ("inf tiff", "a.tif", _tif(np.full((32, 32), np.inf, np.float32)), None, None, 0.4, 0, None, "finite"),
    ("1xN tiff", "a.tif", _tif(np.ones((1, 500), np.uint16)), None, None, 0.4, 0, None, "at least 3"),
    ("5-D tiff", "a.tif", _tif(np.ones((2, 2, 2, 16, 16), np.uint8)), None, None, 0.4, 0, None, "dimensions"),
    ("6-D tiff", "a.tif", _tif(np.ones((2, 2, 2, 2, 16, 16), np.uint8)), None, None, 0.4, 0, None, "dimensions"),
    ("tiny image", "a.tif", _tif(np.ones((3, 3), np.uint8)), None, None, 0.4, 0, None, "larger|pixels|small"),
    ("negative diameter", "a.tif", GOOD, None, -5, 0.4, 0, None, "Diameter"),
    ("huge diameter", "a.tif", GOOD, None, 1e9, 0.4, 0, None, "Diameter"),
    ("negative flow", "a.tif", GOOD, None, None, -1, 0, None, "Flow threshold"),
    ("huge flow", "a.tif", GOOD, None, None, 1e6, 0, None, "Flow threshold"),
    ("huge cellprob", "a.tif", GOOD, None, None, 0.4, 1e9, None, "probability"),
    ("negative pixel size", "a.tif", GOOD, None, None, 0.4, 0, -1, "Pixel size"),
    ("huge pixel size", "a.tif", GOOD, None, None, 0.4, 0, 1e7, "Pixel size"),
    ("unknown model", "a.tif", GOOD, "no_such_model_xyz", None, 0.4, 0, None, "not a model on this server"),
    ("model path traversal", "a.tif", GOOD, "../../../../etc/passwd", None, 0.4, 0, None, "not a model on this server"),
    ("model absolute path", "a.tif", GOOD, "/etc/hostname", None, 0.4, 0, None, "not a model on this server"),
    ("bool image", "a.tif", _tif(np.eye(64, dtype=bool)), "thresh", None, 0.4, 0, None, "ok"),
    ("partly NaN image", "a.tif", _tif(NAN), "thresh", None, 0.4, 0, None, "ok"),
    ("RGBA png", "a.png", _png(np.zeros((40, 40, 4), np.uint8) + 7), "thresh", None, 0.4, 0, None, "ok"),
    ("200 planes", "a.tif", _tif(np.random.default_rng(2).random((200, 24, 24)).astype(np.float32)), "thresh",
     None, 0.4, 0, None, "ok"),
    ("float64 image", "a.tif", _tif(np.random.default_rng(3).random((48, 48))), "thresh", None, 0.4, 0, None, "ok"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    from cellpose_web.ui.app import build_app
    mp = pytest.MonkeyPatch()
    standin.install(mp)
    demo = build_app()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()
    mp.undo()


def _expected_cells(path: Path) -> int:
    """Cells the stand-in model finds in the file as the app reads it (a stack plane by plane)."""
    img = cpio.imread(path)
    if img.ndim == 3 and img.shape[-1] > 4:
        return sum(int(standin.threshold_labels(plane).max()) for plane in img)
    return int(standin.threshold_labels(img, channel_axis=-1 if img.ndim == 3 else None).max())


def _normal(client):
    from gradio_client import handle_file
    return client.predict(handle_file(str(EXAMPLE)), "thresh", None, 0.4, 0.0, None, api_name="/segment")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_then_normal_request(client, tmp_path, case):
    from gradio_client import handle_file
    _, name, data, model, diam, flow, cp, px, expect = case
    p = tmp_path / name
    p.write_bytes(data)
    if expect == "ok":
        masks, csv, n, prov = client.predict(handle_file(str(p)), model, diam, flow, cp, px, api_name="/segment")
        assert len(np.unique(tifffile.imread(masks))) - 1 == n == _expected_cells(p)
    else:
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(p)), model, diam, flow, cp, px, api_name="/segment")
        msg = str(e.value)
        assert "Traceback" not in msg and 'File "' not in msg
        import re
        assert re.search(expect, msg, re.I), msg
    masks, _, n, _ = _normal(client)
    assert n == len(np.unique(tifffile.imread(masks))) - 1 == _expected_cells(EXAMPLE) > 0
