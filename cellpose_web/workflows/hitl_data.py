"""Human-in-the-loop: images and labels in and out of a project (reading, channels, writing pairs),
scoring a model on the held-out pairs, the acceptance rule, and the file lock of a project's rounds."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence
import numpy as np

try:  # POSIX file locks; elsewhere the in-process locks alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from cellpose_web.io.labels import instance_labels
from cellpose_web.engine.dynamics.labels import as_label_dtype
from cellpose_web import io as cpio
from cellpose_web.workflows import pipeline
from cellpose_web.errors import CellposeWebError
from cellpose_web.service.storage import atomic_write_json, read_json


# ----------------------------------------------------------------------------------------------
# small helpers: time, locks, paths
# ----------------------------------------------------------------------------------------------
def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_THREAD_LOCKS: dict[str, threading.RLock] = {}


_THREAD_LOCKS_GUARD = threading.Lock()


def thread_lock(key: str) -> threading.RLock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.RLock())


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def list_images(images: Any, dest: Path) -> tuple[list[str], str]:
    """(absolute image paths, source description) from a folder, a zip or a list of files.

    A folder's images stay where they are; a zip is unpacked into ``dest/images`` with its folders
    (images at any depth, as Batch takes them); single files are copied there too, so the project
    keeps its images when the upload's temporary copies are cleaned up.
    """
    from cellpose_web.workflows.inputs import extract_zip, image_files, no_images_message

    if isinstance(images, (str, os.PathLike)):
        p = Path(images).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"images not found: {p}")
        if p.is_dir():
            files = cpio.get_image_files(p, "_masks")
            return [str(Path(f).resolve()) for f in files], str(p.resolve())
        if p.suffix.lower() == ".zip":
            out = dest / "images"
            extracted = extract_zip(p, out)  # the one validated unzip (limits, zip bombs)
            good, skipped = image_files(extracted, [x.relative_to(out.resolve()).as_posix() for x in extracted])
            if not good:
                raise CellposeWebError(f"The zip '{p.name}' holds no images to correct. "
                                       + no_images_message(skipped))
            return [str(f) for f in good], str(p.resolve())
        images = [p]
    files = [Path(f).expanduser() for f in images]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}")
    if not files:
        raise CellposeWebError("no images: give a folder, a zip or a list of image files")
    out = dest / "images"
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    for f in files:
        target, k = out / f.name, 2
        while target.exists():  # two uploads of one name (from different folders) both stay
            target, k = out / f"{f.stem}_{k}{f.suffix}", k + 1
        shutil.copyfile(f, target)
        kept.append(str(target.resolve()))
    return kept, "files"


def read_image_yxc(path: str | os.PathLike) -> np.ndarray:
    """An image file as (Y, X, C), every channel in the file's order; z-stacks are refused."""
    img, axes, _ = pipeline.read_image(path)
    yxc, stack = pipeline.to_channels_last(img, file_axes=axes)
    if stack:
        raise CellposeWebError(f"{Path(path).name} is a z-stack; the human-in-the-loop works on 2D images "
                               "(save the planes as separate images)")
    return yxc


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Masks from a file: a label image (.tif/.png; whole numbers, 0 = background) or a Cellpose
    ``_seg.npy`` (its ``masks``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"masks file not found: {p}")
    m = np.asarray(cpio.load_seg(str(p))["masks"] if p.name.endswith(".npy") else cpio.imread(str(p)))
    return instance_labels(m, p.name)


def select_channels(img: np.ndarray, channels: Sequence[int] | None) -> np.ndarray:
    chans = pipeline.check_channels(list(channels) if channels else None, img.shape[-1])
    return img[..., chans] if chans else img


# ----------------------------------------------------------------------------------------------
# scoring and the acceptance rule
# ----------------------------------------------------------------------------------------------
def loaded_model(ref: dict[str, Any], device: str | None, gpu: bool | None) -> pipeline.LoadedModel:
    return pipeline.get_model(ref.get("path") or ref["name"], device=device, gpu=gpu)


def score_model(model_ref: dict[str, Any] | str, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                channels: Sequence[int] | None = None, eval_kwargs: dict[str, Any] | None = None,
                device: str | None = None, gpu: bool | None = None) -> dict[str, Any] | None:
    """Mean AP@0.5 / AP@0.75 (``metrics.average_precision``) of a model on (Y, X, C) images with
    true labels, segmented exactly as :meth:`HitlSession.next_image` does; None without images."""
    from cellpose_web.engine.metrics import average_precision

    if not images:
        return None
    ref = {"name": model_ref, "path": None} if isinstance(model_ref, str) else model_ref
    loaded = loaded_model(ref, device, gpu)
    preds = [pipeline.segment(loaded, img, dict(eval_kwargs or {}), channel_axis=2,
                              segment_channels=list(channels) if channels else None).masks for img in images]
    ap, _, _, _ = average_precision([np.asarray(x) for x in labels], preds, threshold=[0.5, 0.75])
    ap = np.nan_to_num(np.asarray(ap, np.float64), nan=0.0)
    return {"ap50": round(float(ap[:, 0].mean()), 4), "ap75": round(float(ap[:, 1].mean()), 4),
            "n_images": len(images), "n_cells": int(sum(len(np.unique(x[x > 0])) for x in labels))}


#: without held-out images a round is checked on the images it trained on: it is kept out only when
#: its AP@0.5 there falls below this fraction of its parent's, i.e. the round collapsed (a learning
#: rate too high for the data, a wrong correction, a non-finite loss: a model that finds next to no
#: cells). Smaller drops are not a verdict: the parent's score there is inflated whenever a
#: correction kept most of its proposal (saved unchanged, it scores 1.0), and a short round moves
#: the masks of a few images by tenths of AP either way.
TRAIN_CHECK_MIN_FRACTION = 0.5
#: ... and only when the parent was of use there (AP@0.5 at least this): from a model that misses most
#: cells anyway, a round's dip is a step of learning, not the loss of a working model
TRAIN_CHECK_USEFUL_AP = 0.5
#: how many of a round's training images (the last corrected) that check scores: it costs two evals each
TRAIN_CHECK_IMAGES = 4


def decide_acceptance(new: dict[str, Any] | None, parent: dict[str, Any] | None,
                      min_gain: float = 0.0, *, train_new: dict[str, Any] | None = None,
                      train_parent: dict[str, Any] | None = None) -> tuple[bool, str]:
    """(accepted, reason) for a round's model against its parent.

    With held-out scores (``new``, ``parent``: ``score_model`` on the held-out corrected images) the
    new model replaces its parent when its AP@0.5 is higher by more than ``min_gain``, or equal with a
    higher AP@0.75. Without them, ``train_new`` / ``train_parent`` (the same on the round's training
    images) keep out a round that collapsed there: AP@0.5 below :data:`TRAIN_CHECK_MIN_FRACTION` of
    its parent's, where the parent scored at least :data:`TRAIN_CHECK_USEFUL_AP`; anything else is accepted (as Cellpose 2.0 accepts every round). With no scores
    at all the round is accepted.
    """
    if new is None or parent is None:
        if train_new is None or train_parent is None:
            return True, "no held-out corrected images yet: accepted without a comparison"
        a, b = float(train_new["ap50"]), float(train_parent["ap50"])
        n = int(train_new.get("n_images", 0))
        on = f"on the {n} corrected training image{'s' if n != 1 else ''}"
        if b >= TRAIN_CHECK_USEFUL_AP and a < TRAIN_CHECK_MIN_FRACTION * b:
            return False, (f"no held-out corrected images yet; {on} AP@0.5 fell {b:.3f} -> {a:.3f}: the round "
                           "collapsed (check the last correction), kept the previous model")
        return True, f"no held-out corrected images yet: accepted (AP@0.5 {on} {b:.3f} -> {a:.3f})"
    a, b = float(new["ap50"]), float(parent["ap50"])
    a75, b75 = float(new.get("ap75", 0.0)), float(parent.get("ap75", 0.0))
    if a > b + float(min_gain):
        return True, f"held-out AP@0.5 {b:.3f} -> {a:.3f}"
    if abs(a - b) <= 1e-9 and a75 > b75 and min_gain <= 0:
        return True, f"held-out AP@0.5 equal ({a:.3f}); AP@0.75 {b75:.3f} -> {a75:.3f}"
    return False, (f"held-out AP@0.5 {a:.3f} (AP@0.75 {a75:.3f}) does not beat the previous model's "
                   f"{b:.3f} ({b75:.3f}): kept the previous model")


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------
class FileLock:
    """An exclusive ``flock`` on a file (held per open file, released by the OS if the process dies)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fh is not None:
            raise RuntimeError("lock already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError:
                fh.close()
                return False
        self._fh = fh
        return True

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    @property
    def held(self) -> bool:
        return self._fh is not None


def is_inside(path: str | None, folder: Path) -> bool:
    if not path:
        return False
    try:
        return Path(folder).resolve() in Path(path).resolve().parents
    except OSError:
        return False


def write_masks(path: Path, masks: np.ndarray) -> None:
    import tifffile

    m = np.asarray(masks)
    m = as_label_dtype(m)
    cpio.atomic_save(path, lambda p: tifffile.imwrite(p, m, compression="zlib"))


def write_image(path: Path, img: np.ndarray) -> None:
    import tifffile

    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    cpio.atomic_save(path, lambda p: tifffile.imwrite(p, a, compression="zlib"))


def update_set_json(tdir: Path, name: str, n_cells: int, shape: list[int], heldout: bool, index: int) -> None:
    """Keep ``set.json`` in service.training's layout, so the Fine-tune tab lists the pairs."""
    with thread_lock(str(tdir)):
        sj = read_json(tdir / "set.json", {}) or {}
        pairs = [p for p in sj.get("pairs", []) if p.get("name") != name]
        pairs.append({"name": name, "n_cells": int(n_cells), "shape": shape, "added": utc_now(), "source": "hitl",
                      "heldout": bool(heldout), "image_index": int(index)})
        sj.update({"name": tdir.name, "pairs": pairs, "updated": utc_now()})
        atomic_write_json(tdir / "set.json", sj)
