"""Out of GPU memory (item 6 of issue 23), on the CPU by injecting CUDA's error: the network's batch
is halved and the run goes on with the same masks and a notice; one tile that does not fit is a
typed error; the service and the app say what happened without a traceback; the default batch size
on a GPU follows its free memory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellpose_web.engine import memory, synthetic
from cellpose_web import models
from cellpose_web.errors import CellposeWebError, OutOfMemoryError

import standin

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB"


def limit_batch(monkeypatch, net: torch.nn.Module, largest: int) -> list[int]:
    """``net`` raises CUDA's out-of-memory error (torch.cuda.OutOfMemoryError) for batches larger than
    ``largest``; returns the batch sizes it was called with."""
    seen: list[int] = []
    forward = net.forward

    def limited(x, *a, **k):
        seen.append(int(x.shape[0]))
        if x.shape[0] > largest:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return forward(x, *a, **k)

    monkeypatch.setattr(net, "forward", limited)
    return seen


@pytest.fixture
def releases(monkeypatch) -> list:
    """Calls of memory.release (torch.cuda.empty_cache() on CUDA), recorded."""
    calls = []
    real = memory.release
    monkeypatch.setattr(memory, "release", lambda device=None: (calls.append(device), real(device)))
    return calls


@pytest.fixture(scope="module")
def cp_cyto():
    return models.CellposeModel(pretrained_model="cp_cyto")


@pytest.fixture(scope="module")
def lite():
    return models.CellposeModel(pretrained_model="lite")


@pytest.fixture(scope="module")
def whole_cell():
    z = np.load(Path(__file__).parent / "data" / "cp3_wholecell_seed9000.npz")
    return z["image"][:128, :128], z["channels"].tolist(), float(z["diameter"])


def blobs(seed: int = 3, size: int = 300) -> np.ndarray:
    s = synthetic.synthetic_sample(np.random.default_rng(seed), (size, size), "nuclei", diameter=24.0)
    return np.moveaxis(s.image, 0, -1)


# ------------------------------------------------------------------ the network's batches
def test_cellpose3_unet_halves_its_batch_and_gives_the_same_masks(cp_cyto, whole_cell, monkeypatch, releases):
    img, ch, diam = whole_cell
    kw = dict(channels=ch, channel_axis=-1, diameter=diam, bsize=64)  # 16 tiles of 64 px: two batches of 8
    masks, flows, styles = cp_cyto.eval(img, **kw)
    assert cp_cyto.last_notices == [] and cp_cyto.last_eval_params["batch_size_used"] == 8 and masks.max() > 3
    seen = limit_batch(monkeypatch, cp_cyto.net, 2)
    masks2, flows2, styles2 = cp_cyto.eval(img, **kw)
    assert np.array_equal(masks2, masks)
    np.testing.assert_allclose(flows2[1], flows[1], atol=1e-5)
    np.testing.assert_allclose(styles2, styles, atol=1e-6)
    assert seen[:3] == [8, 4, 2] and max(seen[3:]) == 2  # halved twice, then 2 for the rest of the run
    assert len(releases) == 2  # memory released after each failed batch
    assert cp_cyto.last_notices == ["memory ran short: batch size lowered from 8 to 2 (same result, slower)"]
    assert cp_cyto.last_eval_params["batch_size"] == 8 and cp_cyto.last_eval_params["batch_size_used"] == 2
    assert cp_cyto.last_eval_params["notices"] == cp_cyto.last_notices


def test_tiled_network_halves_its_batch_and_gives_the_same_masks(lite, monkeypatch, releases):
    img = blobs()
    kw = dict(channel_axis=-1, diameter=24.0, augment=True)  # augment: 256 px tiles (4), not the whole image
    masks, flows, _ = lite.eval(img, **kw)
    seen = limit_batch(monkeypatch, lite.net, 3)
    masks2, flows2, _ = lite.eval(img, batch_size=8, **kw)
    assert np.array_equal(masks2, masks) and masks.max() > 3
    np.testing.assert_allclose(flows2[1], flows[1], atol=1e-5)
    first = seen.index(2)  # the tiles of the image (4) failed, then 2 ran, and 2 for the rest
    assert seen[:first] == [4] and set(seen[first:]) == {2}
    assert "batch size lowered from 8 to 2" in lite.last_notices[0] and len(releases) == 1


def test_one_tile_that_does_not_fit_is_a_typed_error(lite, monkeypatch, releases):
    limit_batch(monkeypatch, lite.net, 0)
    with pytest.raises(OutOfMemoryError) as err:
        lite.eval(blobs(size=96), channel_axis=-1, diameter=24.0, batch_size=4)
    e = err.value
    assert isinstance(e, CellposeWebError) and isinstance(e, MemoryError)
    assert "ran out even with batch size 1 (the run asked for 4)" in str(e) and "crop the image" in str(e)
    assert e.__cause__ is None and e.__suppress_context__  # no chained CUDA traceback for the user
    assert releases


def test_out_of_memory_after_the_network_is_a_typed_error(lite, monkeypatch, releases):
    """E.g. the masks step on the GPU: eval raises OutOfMemoryError (its memory given back first)."""
    def compute_masks(*a, **k):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)
    monkeypatch.setattr(models.core.dynamics, "compute_masks", compute_masks)
    with pytest.raises(OutOfMemoryError, match="ran out while segmenting"):
        lite.eval(blobs(size=96), channel_axis=-1, diameter=24.0)
    assert releases


def test_only_out_of_memory_errors_are_matched_by_type(lite, monkeypatch):
    """A RuntimeError that merely mentions memory is not halved away: it reaches the caller as it is."""
    def broken(x, *a, **k):
        raise RuntimeError("CUDA out of memory (but a plain RuntimeError)")
    monkeypatch.setattr(lite.net, "forward", broken)
    with pytest.raises(RuntimeError, match="plain RuntimeError") as err:
        lite.eval(blobs(size=96), channel_axis=-1, diameter=24.0)
    assert not isinstance(err.value, OutOfMemoryError)
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and memory.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert memory.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 7.6 GiB)"))  # MPS: untyped
    assert not memory.is_out_of_memory(RuntimeError("CUDA out of memory"))
    assert not memory.is_out_of_memory(MemoryError())


def test_adaptive_batch_joins_pieces_and_tuples():
    calls = []

    def fn(x):
        calls.append(len(x))
        if len(x) > 3:
            raise torch.OutOfMemoryError("no room")
        return x * 2, np.asarray(x).sum(axis=1)

    b = memory.AdaptiveBatch(8, "cuda")
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    y, s = b.run(fn, x)
    assert np.array_equal(y, x * 2) and np.array_equal(s, x.sum(axis=1))
    assert calls == [7, 3, 3, 1] and b.size == 3 and b.requested == 8
    assert b.notice == "GPU memory ran short: batch size lowered from 8 to 3 (same result, slower)"
    assert memory.AdaptiveBatch(8).notice is None


def test_halving_rule_retries_with_half_and_stops_at_one(releases):
    tried, halved = [], []

    def attempt(size):
        tried.append(size)
        if size > 2:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return f"done with {size}"

    out = memory.halve_on_out_of_memory(attempt, 11, "cuda", at_one="give up", on_halved=halved.append)
    assert out == ("done with 2", 2) and tried == [11, 5, 2] and halved == [5, 2] and len(releases) == 2

    def never(size):
        raise torch.OutOfMemoryError("no room")

    with pytest.raises(OutOfMemoryError, match="^give up$"):
        memory.halve_on_out_of_memory(never, 4, "cuda", at_one="give up")

    def other(size):
        raise ValueError("not about memory")

    with pytest.raises(ValueError):
        memory.halve_on_out_of_memory(other, 4, "cuda", at_one="give up")
    assert len(releases) == 2 + 3  # 4, 2, 1 failed for `never`; nothing released for `other`


# ------------------------------------------------------------------ default batch size
def test_default_batch_size_follows_free_gpu_memory(monkeypatch):
    cuda = torch.device("cuda")
    assert memory.default_batch_size("cpu", "cpsam") == 8 == memory.default_batch_size("mps", "cellpose3")
    # Cellpose-SAM in bfloat16: 48 MB per 256² tile, half of the free memory for the batch
    assert memory.default_batch_size(cuda, "cpsam", 256, torch.bfloat16, free_bytes=10 * 10**9) == 64
    assert memory.default_batch_size(cuda, "cpsam", 256, torch.bfloat16, free_bytes=10**9) == 8
    assert memory.default_batch_size(cuda, "cpsam", 256, torch.float32, free_bytes=10**9) == 4  # 96 MB a tile
    assert memory.default_batch_size(cuda, "cellpose3", 224, torch.float32, free_bytes=2 * 10**9) == 8  # 64 MB
    assert memory.default_batch_size(cuda, "cpsam", 256, torch.bfloat16, free_bytes=10**7) == 1
    assert memory.default_batch_size(cuda, "someone's", 256, free_bytes=10**9) == 4  # unknown: the largest per pixel

    def no_driver(*a):
        raise RuntimeError("no CUDA driver")
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_driver)
    assert memory.default_batch_size(cuda, "cpsam") == 8


def test_eval_picks_the_default_batch_size(lite, monkeypatch):
    monkeypatch.setattr(memory, "default_batch_size", lambda device, arch, bsize, dtype: 3)
    lite.eval(blobs(size=96), channel_axis=-1, diameter=24.0)
    assert lite.last_eval_params["batch_size"] == 3 == lite.last_eval_params["batch_size_used"]
    lite.eval(blobs(size=96), channel_axis=-1, diameter=24.0, batch_size=5)
    assert lite.last_eval_params["batch_size"] == 5
    with pytest.raises(CellposeWebError, match="batch_size"):
        lite.eval(blobs(size=96), channel_axis=-1, batch_size=0)


# ------------------------------------------------------------------ the service and the app
def test_service_says_what_happened_without_a_traceback(monkeypatch):
    from cellpose_web.workflows import segment
    from cellpose_web.ui import common, widgets
    from cellpose_web.ui.tabs import segment as segment_tab

    cm = standin.install(monkeypatch)
    img = blobs(size=96)[..., 0]
    cm.model.last_notices = ["GPU memory ran short: batch size lowered from 8 to 2 (same result, slower)"]
    res = segment.segment(img, segment.SegmentParams(), standin.NAME, "a.tif")
    assert res.provenance["notices"] == cm.model.last_notices
    s = common.Session(name="a.tif", masks=res.masks, table=res.table, provenance=res.provenance)
    assert "note: GPU memory ran short: batch size lowered from 8 to 2" in segment_tab.summary_md(s)

    def eval_oom(*a, **k):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)
    monkeypatch.setattr(cm.model, "eval", eval_oom)
    with pytest.raises(OutOfMemoryError) as err:
        segment.segment(img, segment.SegmentParams(), standin.NAME, "a.tif")
    e = err.value
    assert str(e).startswith("Out of memory while segmenting: crop the image")
    assert "Tried to allocate" not in str(e) and e.__cause__ is None and e.__context__ is None
    assert widgets._message(e, eval_oom) == ("Out of memory", str(e))
    assert widgets._message(torch.cuda.OutOfMemoryError(CUDA_OOM), eval_oom)[0] == "Out of memory"

    def eval_typed(*a, **k):  # the model's own typed error passes through with its message
        raise OutOfMemoryError("GPU memory ran out even with batch size 1 (the run asked for 8): crop the image")
    monkeypatch.setattr(cm.model, "eval", eval_typed)
    with pytest.raises(OutOfMemoryError, match="even with batch size 1"):
        segment.segment(img, segment.SegmentParams(), standin.NAME, "a.tif")

    def eval_other(*a, **k):  # matched by type, not by message
        raise RuntimeError("index out of memory range")
    monkeypatch.setattr(cm.model, "eval", eval_other)
    with pytest.raises(CellposeWebError, match=r"Segmentation failed \(RuntimeError") as err:
        segment.segment(img, segment.SegmentParams(), standin.NAME, "a.tif")
    assert not isinstance(err.value, OutOfMemoryError)
