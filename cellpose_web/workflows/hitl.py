"""Human-in-the-loop: the model learns while a person corrects (issue 20; Cellpose 2.0's loop).

A *project* works through a folder (or a zip) of images one by one. Each image arrives segmented by
the project's current model; the person corrects the masks and saves them; the corrected image
joins the project's training set and a short fine-tune round starts in the background from the
current model. When the round ends, its model becomes the current model only if it beats the
previous one on the project's *held-out* corrected images; otherwise the old model stays (both
are recorded). Every round's model is kept with its provenance, the person can go back to any of
them, and the whole state lives in one JSON file, so a page reload or a server restart resumes
where it stopped.

Python::

    from cellpose_web.workflows import hitl
    s = hitl.start_session("nuclei_lab", "images/", base_model="lite")
    shown = s.next_image()              # shown.masks, shown.flows, shown.model["round"]
    res = s.save_correction(corrected)  # joins the training set; a round starts in the background
    res.handle.wait()                   # (the browser polls s.status() instead)
    s.status()["ap_curve"]              # held-out AP@0.5 / AP@0.75 per round
    s.rollback(1)                       # back to round 1's model
    s = hitl.open_session("nuclei_lab") # after a restart

Command line: ``python -m cellpose_web hitl start|next|save|status|rollback|learn|publish|list|simulate``
(:mod:`cellpose_web.cli.hitl`).

Project layout (``<root>/<project>/``, root = ``$CELLPOSE_WEB_HOME/hitl`` unless given)::

    session.json          the state (atomic writes; see HitlSession.state)
    images/               images unpacked from a zip (a folder is used where it is)
    proposals/NAME_masks.tif   the last segmentation shown for an image (what the person corrects)
    models/round_NNN      every round's model (train_seg's layout: <save_path>/models/<name>)
    training_set/         corrected pairs NAME.tif + NAME_masks.tif + set.json (the layout of
                          service.training); for projects in the app's data folder the pairs go to
                          the lab's training set ``training_sets/hitl_<project>`` instead, so the
                          Fine-tune tab sees them

Held-out images: the 2nd corrected image, then every ``holdout_every``-th one after it (2, 6, 10, ...
for the default 4), i.e. about a quarter; they are saved to the training set (marked ``heldout``)
but never trained on by a round. ``holdout_every=0`` keeps no held-out images.

Acceptance: the round's model replaces its parent (the model it started from) when its mean
AP@0.5 over the held-out images is higher by more than ``min_gain`` (default 0: strictly higher),
or equal with a higher AP@0.75. Both scores are recorded in the round (``scores`` and
``parent_scores``, on the same images). Until the first held-out image exists (and always with
``holdout_every=0``) there is nothing unseen to compare on: the round and its parent are scored on
the round's last ``hitl_data.TRAIN_CHECK_IMAGES`` (4) training images (``train_scores``,
``parent_train_scores``) and the round is accepted (as Cellpose 2.0 accepts every round) unless it
collapsed there: AP@0.5 below ``hitl_data.TRAIN_CHECK_MIN_FRACTION`` (half) of its parent's, where
the parent scored at least ``hitl_data.TRAIN_CHECK_USEFUL_AP`` (0.5) (a check against a ruined model,
not a comparison: the parent scores high on corrections that kept its proposals).

Round defaults per family and device, and where their numbers come from: :mod:`cellpose_web.workflows.hitl_recipes`.

One round at a time per project: a file lock (``round.lock``, released by the OS when a process
dies) plus an in-process handle; corrections saved while a round runs mark the project
``pending`` and the running worker starts the next round when it finishes. Rounds of different
projects run in their own threads and never wait for each other.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from cellpose_web.engine.dynamics.labels import as_label_dtype
from cellpose_web.workflows import pipeline
from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.service import jobs
from cellpose_web.service.config import Limits
from cellpose_web.service.storage import atomic_write_json, named_dir, read_json, safe_name, sub_dir
from cellpose_web.workflows.hitl_recipes import ROUND_DEFAULTS  # noqa: F401 - part of this module's API
from cellpose_web.workflows.hitl_data import read_labels  # noqa: F401 - part of this module's API
from cellpose_web.workflows.hitl_recipes import RoundRecipe, SaveResult, ShownImage, round_defaults, round_lr_schedule
from cellpose_web.workflows.hitl_data import TRAIN_CHECK_IMAGES, FileLock, decide_acceptance, is_inside, list_images, loaded_model, read_image_yxc, score_model, select_channels, thread_lock, update_set_json, utc_now, write_image, write_masks


log = logging.getLogger(__name__)


SESSION_FILE = "session.json"


STATE_VERSION = 1


def hitl_root(root: str | os.PathLike | None = None, user: str | None = None) -> Path:
    """The folder that holds the projects: ``root`` when given, else ``<data folder>/hitl``."""
    if root is not None:
        p = Path(root).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p
    return sub_dir("hitl", user)


def project_dir(name: str, root: str | os.PathLike | None = None, user: str | None = None) -> Path:
    """``<root>/<name>``; the name follows the rule of lab model names (``io.names.NAME_RULE``)."""
    return named_dir(hitl_root(root, user), name, "project name")


def _pair_name(index: int, path: str) -> str:
    """Training-pair name of image ``index``: unique even when files in sub-folders share a name."""
    stem = Path(path).name
    for suf in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    else:
        stem = Path(stem).stem
    return f"{index:04d}_{safe_name(stem, 'image name', 80)}"


def is_heldout(n: int, holdout_every: int) -> bool:
    """Whether the ``n``-th corrected image (1-based) is held out: the 2nd, then every ``holdout_every``-th."""
    k = int(holdout_every or 0)
    return k > 0 and n >= 2 and (n - 2) % k == 0


# ----------------------------------------------------------------------------------------------
# the background round
# ----------------------------------------------------------------------------------------------
_RUNNING: dict[str, "RoundHandle"] = {}


_START_LOCK = threading.Lock()


class RoundHandle:
    """A running (or finished) fine-tune worker of one project; it may run several rounds in a row
    when corrections arrive during a round. Poll :meth:`status`; :meth:`wait` blocks."""

    def __init__(self, session: "HitlSession", lock: FileLock):
        self.session = session
        self._lock = lock
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._progress: dict[str, Any] = {"phase": "starting", "round": None, "epoch": 0, "n_epochs": 0,
                                          "elapsed_s": 0.0}
        self.rounds: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    # -- for callers
    def status(self) -> dict[str, Any]:
        return {"running": self.running, **dict(self._progress), "rounds_done": [r["round"] for r in self.rounds],
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def done(self) -> bool:
        return not self.running

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the worker (all its rounds); the last round's record, or None when it had none.
        Raises the worker's error, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None and not self.running:
            raise self.error
        return self.rounds[-1] if self.rounds else None

    def result(self) -> dict[str, Any] | None:
        return self.rounds[-1] if self.rounds else None

    def cancel(self) -> None:
        """Stop after the current epoch (the round is recorded as cancelled and not used)."""
        self._cancel.set()

    # -- the worker
    def _waiting(self, message: str) -> None:
        self._progress.update(phase="queued", message=message)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"hitl-round-{self.session.name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        key = str(self.session.path)
        try:
            while True:
                # a round trains like a fine-tuning job: it takes one of the server's training slots, so
                # rounds of several projects and Fine-tune jobs do not all share the GPU at once
                with jobs.hold_slot("train", Limits.from_env().concurrency["train"], cancelled=self._cancel.is_set,
                                    on_wait=self._waiting) as held:
                    rec = self.session._run_one_round(self._cancel, self._progress) if held else None
                if rec is not None:
                    self.rounds.append(rec)
                with _START_LOCK:
                    st = self.session.state()
                    again = bool(st.get("pending")) and not self._cancel.is_set() and rec is not None \
                        and rec.get("status") == "done"
                    if not again:
                        self._progress["phase"] = "done"
                        self._lock.release()
                        if _RUNNING.get(key) is self:
                            del _RUNNING[key]
                        return
        except BaseException as e:  # noqa: BLE001 - recorded and re-raised by wait()
            log.exception("human-in-the-loop round failed in project %s", self.session.name)
            self.error = e
            self._progress["phase"] = "failed"
            with _START_LOCK:
                self._lock.release()
                if _RUNNING.get(key) is self:
                    del _RUNNING[key]


# ----------------------------------------------------------------------------------------------
# the session
# ----------------------------------------------------------------------------------------------
class HitlSession:
    """One project's loop, backed by ``<project>/session.json``. Cheap to create: every method reads
    the state from disk, so several objects (browser tabs, a restarted server) see the same project.

    The state (``state()``)::

        version, name, created, updated, source, images [absolute paths], index (the image being worked on),
        channels (file channels fed to the model, file numbering; Cellpose 1-3: [cytoplasm, nucleus]),
        eval_kwargs (CellposeModel.eval keywords), base_model {name, path, sha256, arch},
        recipe (overrides of the round defaults), holdout_every, min_gain, seed, gpu, device,
        training_dir, current_round, pending (corrections not learnt yet),
        corrected [{index, name, n_cells, heldout, saved, segmented_by_round}],
        rounds [{round, status, parent_round, model {name, path, sha256}, train_images, heldout_images,
                 n_train_images, n_cells, new_images, epochs, epochs_done, learning_rate, weight_decay,
                 batch_size, bsize, crops_per_epoch, new_share, time_limit_s, stopped_by_time_limit,
                 train_seconds, score_seconds, sec_per_crop, scores {ap50, ap75, n_images, n_cells},
                 parent_scores, accepted, applied, reason, base_model, started, finished, device}],
        shown {index, round, proposal, at}, events [{at, what, ...}]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not (self.path / SESSION_FILE).is_file():
            raise CellposeWebError(f"There is no human-in-the-loop project named '{self.path.name}': check the name, "
                                   "or start one.")
        self.name = self.path.name

    def __repr__(self) -> str:
        return f"HitlSession({self.name!r}, {self.path})"

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """The project's state as stored (a fresh copy: change it through the methods)."""
        st = read_json(self.path / SESSION_FILE)
        if not isinstance(st, dict):
            raise CellposeWebError(f"the project file {self.path / SESSION_FILE} is damaged or unreadable")
        return st

    @contextlib.contextmanager
    def _update(self):
        """Read-modify-write of the state under the project's locks (threads and processes)."""
        with thread_lock(str(self.path)):
            fl = FileLock(self.path / ".state.lock")
            fl.acquire()
            try:
                st = self.state()
                yield st
                st["updated"] = utc_now()
                atomic_write_json(self.path / SESSION_FILE, st)
            finally:
                fl.release()

    def _event(self, st: dict[str, Any], what: str, **kw: Any) -> None:
        ev = st.setdefault("events", [])
        ev.append({"at": utc_now(), "what": what, **kw})
        del ev[:-200]

    # ------------------------------------------------------------------ models
    def _device_is_gpu(self, st: dict[str, Any]) -> bool:
        dev = st.get("device")
        if dev:
            return not str(dev).startswith("cpu")
        return pipeline.default_gpu() if st.get("gpu") is None else bool(st.get("gpu"))

    def recipe(self, st: dict[str, Any] | None = None) -> RoundRecipe:
        """The round recipe of this project: the defaults of its base model's family and device, with
        the project's overrides."""
        st = st or self.state()
        base = round_defaults(st["base_model"].get("arch"), self._device_is_gpu(st))
        return base.replace(**(st.get("recipe") or {}))

    def current_model(self, st: dict[str, Any] | None = None) -> dict[str, Any]:
        """{round, name, path, sha256, arch, n_cells (corrected cells it learnt from), n_images, scores}."""
        st = st or self.state()
        r = st["rounds"][int(st["current_round"])]
        return {"round": r["round"], **r["model"], "arch": st["base_model"].get("arch"),
                "n_cells": int(r.get("n_cells", 0)), "n_images": int(r.get("n_train_images", 0)),
                "scores": r.get("scores")}

    def model_path(self, round_no: int | None = None) -> str:
        """The weights file of a round's model (the current one by default)."""
        st = self.state()
        k = int(st["current_round"] if round_no is None else round_no)
        if not 0 <= k < len(st["rounds"]):
            raise CellposeWebError(f"round {k} does not exist (rounds 0..{len(st['rounds']) - 1})")
        r = st["rounds"][k]
        return r["model"].get("path") or r["model"]["name"]

    # ------------------------------------------------------------------ images
    def images(self) -> list[str]:
        return list(self.state()["images"])

    def goto(self, index: int) -> int:
        """Work on image ``index`` next."""
        with self._update() as st:
            n = len(st["images"])
            if not 0 <= int(index) < n:
                raise CellposeWebError(f"image {index} does not exist (0..{n - 1})")
            st["index"] = int(index)
        return int(index)

    def _corrected_map(self, st: dict[str, Any]) -> dict[int, dict[str, Any]]:
        return {int(c["index"]): c for c in st.get("corrected", [])}

    def next_image(self, index: int | None = None, reuse: bool = True,
                   wait_for_round: float | None = 0.0) -> ShownImage | None:
        """The image to correct, segmented by the current model; None when every image is corrected.

        index : this image (default: the first not yet corrected at or after the current one,
            wrapping to the start).
        reuse : give the proposal saved on disk when the same model already segmented this image
            (a page reload; ``flows`` is then None).
        wait_for_round : seconds to wait for a running round first (None = until it ends), so the
            image is segmented by the newest model; 0 = do not wait.
        """
        if wait_for_round is None or wait_for_round > 0:
            h = self.running_round()
            if h is not None:
                h._thread.join(wait_for_round)  # type: ignore[union-attr]
        st = self.state()
        n = len(st["images"])
        done = self._corrected_map(st)
        if index is None:  # the next image to correct; one that cannot be read is skipped, and recorded
            start = int(st.get("index", 0))
            order = list(range(start, n)) + list(range(0, start))
            skipped = {int(k) for k in (st.get("skipped") or {})}
            for i in order:
                if i in done or i in skipped:
                    continue
                try:
                    img = read_image_yxc(st["images"][i])
                except CellposeWebError as e:
                    self._skip(i, e)
                    continue
                return self._show(st, i, img, done, reuse)
            return None
        index = int(index)
        if not 0 <= index < n:
            raise CellposeWebError(f"image {index} does not exist (0..{n - 1})")
        return self._show(st, index, read_image_yxc(st["images"][index]), done, reuse)

    def _skip(self, index: int, error: Exception) -> None:
        """Record an image that cannot be read (it is left out of the project, with the reason)."""
        reason = " ".join(str(error).split())[:300]
        with self._update() as st:
            st.setdefault("skipped", {})[str(index)] = reason
            self._event(st, "image skipped", index=index, reason=reason)
        log.warning("project %s: image %d skipped: %s", self.name, index, reason)

    def _show(self, st: dict[str, Any], index: int, img: np.ndarray, done: dict[int, Any],
              reuse: bool) -> ShownImage:
        """Image ``index`` (read: ``img``, (Y, X, C)) segmented by the current model (or its saved proposal)."""
        path = st["images"][index]
        name = _pair_name(index, path)
        model = self.current_model(st)
        prop = self.path / "proposals" / f"{name}_masks.tif"
        shown = st.get("shown") or {}
        if reuse and shown.get("index") == index and shown.get("round") == model["round"] and prop.is_file():
            import tifffile

            masks = tifffile.imread(prop)
            with self._update() as st2:
                st2["index"] = index
            return ShownImage(index, name, path, img, masks, None, model, str(prop), index in done, reused=True)
        t0 = time.perf_counter()
        loaded = loaded_model(model, st.get("device"), st.get("gpu"))
        seg = pipeline.segment(loaded, img, dict(st.get("eval_kwargs") or {}), channel_axis=2,
                               segment_channels=st.get("channels") or None)
        secs = time.perf_counter() - t0
        masks = np.asarray(seg.masks)
        write_masks(prop, masks)
        with self._update() as st2:
            st2["index"] = index
            st2["shown"] = {"index": index, "round": model["round"], "proposal": str(prop), "at": utc_now(),
                            "n_masks": int(len(np.unique(masks[masks > 0])))}
        return ShownImage(index, name, path, img, masks, list(seg.flows), model, str(prop), index in done,
                          seconds=round(secs, 2))

    # ------------------------------------------------------------------ corrections
    def save_correction(self, masks: np.ndarray, index: int | None = None, learn: bool = True) -> SaveResult:
        """Save the person's corrected masks of image ``index`` (default: the current one) into the
        project's training set; with ``learn`` a round starts in the background (or is queued behind
        the running one). Held-out images start no round."""
        st = self.state()
        index = int(st.get("index", 0) if index is None else index)
        n = len(st["images"])
        if not 0 <= index < n:
            raise CellposeWebError(f"image {index} does not exist (0..{n - 1})")
        masks = np.asarray(masks)
        if masks.ndim == 3 and masks.shape[0] == 1:
            masks = masks[0]
        if masks.ndim != 2 or masks.dtype.kind not in "iub":
            raise CellposeWebError(f"corrected masks must be a 2D label image (integers), got {masks.dtype} "
                                   f"{masks.shape}")
        if masks.max(initial=0) <= 0:
            raise CellposeWebError("these masks are empty: draw the cells before saving")
        if masks.min(initial=0) < 0:
            raise CellposeWebError("masks must not be negative (0 = background, 1..N = cells)")
        path = st["images"][index]
        img = read_image_yxc(path)
        if img.shape[:2] != masks.shape:
            raise CellposeWebError(f"masks {masks.shape} do not match the image {img.shape[:2]}")
        name = _pair_name(index, path)
        m = as_label_dtype(masks)
        n_cells = int(len(np.unique(m[m > 0])))
        tdir = Path(st["training_dir"])
        write_image(tdir / f"{name}.tif", img)
        write_masks(tdir / f"{name}_masks.tif", m)
        with self._update() as st:
            done = self._corrected_map(st)
            shown = st.get("shown") or {}
            seg_by = shown.get("round") if shown.get("index") == index else None
            if index in done:
                entry = done[index]
                entry.update(n_cells=n_cells, saved=utc_now(), segmented_by_round=seg_by)
            else:
                heldout = is_heldout(len(done) + 1, int(st.get("holdout_every", 0)))
                entry = {"index": index, "name": name, "n_cells": n_cells, "heldout": heldout, "saved": utc_now(),
                         "segmented_by_round": seg_by}
                st.setdefault("corrected", []).append(entry)
            heldout = bool(entry["heldout"])
            if not heldout:
                st["pending"] = True
            uncorrected = [i for i in range(n) if i not in self._corrected_map(st)]
            later = [i for i in uncorrected if i > index]
            st["index"] = later[0] if later else (uncorrected[0] if uncorrected else index)
            n_corr = len(st["corrected"])
            self._event(st, "saved", index=index, name=name, n_cells=n_cells, heldout=heldout)
        update_set_json(tdir, name, n_cells, list(img.shape), heldout, index)
        res = SaveResult(index, name, n_cells, heldout, n_corr)
        if learn and not heldout:
            res.handle, res.queued = self._start_round()
        return res

    def pending(self) -> bool:
        """Whether corrected training images exist that no finished round has learnt from yet."""
        return bool(self.state().get("pending"))

    # ------------------------------------------------------------------ rounds
    def running_round(self) -> RoundHandle | None:
        """This process's worker for the project, while it runs."""
        h = _RUNNING.get(str(self.path))
        return h if h is not None and h.running else None

    def learn(self) -> RoundHandle | None:
        """Start a round now on every corrected training image (e.g. after a restart left corrections
        unlearnt). Returns the worker, or None when another process is training this project (the
        round is then queued for it)."""
        st = self.state()
        if not any(not c["heldout"] for c in st.get("corrected", [])):
            raise CellposeWebError("no corrected training images yet: correct an image first")
        with self._update() as st:
            st["pending"] = True
        return self._start_round()[0]

    def _start_round(self) -> tuple[RoundHandle | None, bool]:
        """(worker, queued): start a worker unless one runs; one that runs picks the correction up."""
        key = str(self.path)
        with _START_LOCK:
            h = _RUNNING.get(key)
            if h is not None and h.running:
                return h, True
            lock = FileLock(self.path / "round.lock")
            if not lock.acquire(blocking=False):  # another process trains this project
                return None, True
            h = RoundHandle(self, lock)
            _RUNNING[key] = h
            h._start()
            return h, False

    def _run_one_round(self, cancel: threading.Event, progress: dict[str, Any]) -> dict[str, Any] | None:
        """One round (the worker holds the project's round lock): train, score, accept or keep."""
        from cellpose_web.models import train as train_mod
        from cellpose_web.models import CellposeModel
        from cellpose_web.workflows.finetune import fine_tune

        with self._update() as st:
            train_items = [c for c in st.get("corrected", []) if not c["heldout"]]
            if not train_items:
                st["pending"] = False
                return None
            st["pending"] = False
            k = len(st["rounds"])
            parent_no = int(st["current_round"])
            parent = st["rounds"][parent_no]
            recipe = self.recipe(st)
            held_items = [c for c in st.get("corrected", []) if c["heldout"]]
            known = set(parent.get("train_images") or [])
            new = [c["name"] for c in train_items if c["name"] not in known]
            # fit the epochs to the time limit from the last measured speed
            n_epochs = int(recipe.n_epochs)
            spc = next((r.get("sec_per_crop") for r in reversed(st["rounds"]) if r.get("sec_per_crop")), None)
            if spc:
                fit = int(0.9 * recipe.time_limit_s / (spc * recipe.crops_per_epoch))
                n_epochs = max(min(n_epochs, fit), min(recipe.min_epochs, n_epochs))
            rec = {"round": k, "status": "running", "parent_round": parent_no, "base_model": st["base_model"]["name"],
                   "model": {"name": f"{self.name}-round{k:03d}", "path": None, "sha256": None},
                   "train_images": [c["name"] for c in train_items],
                   "heldout_images": [c["name"] for c in held_items], "n_train_images": len(train_items),
                   "n_cells": int(sum(int(c["n_cells"]) for c in train_items)), "new_images": new,
                   "epochs": n_epochs, "epochs_done": 0, **{f: getattr(recipe, f) for f in (
                       "learning_rate", "weight_decay", "batch_size", "bsize", "crops_per_epoch", "new_share",
                       "time_limit_s", "rescale", "schedule")},
                   "started": utc_now(), "pid": os.getpid()}
            st["rounds"].append(rec)
            self._event(st, "round started", round=k, parent_round=parent_no)
            seed = int(st.get("seed", 0)) + k
            channels = st.get("channels") or None
            eval_kwargs = dict(st.get("eval_kwargs") or {})
            device, gpu = st.get("device"), st.get("gpu")
            tdir = Path(st["training_dir"])
            parent_ref = dict(parent["model"])
            parent_scores_cached = parent.get("scores_latest") or parent.get("scores")
            base_ref, base_unscored = dict(st["rounds"][0]["model"]), st["rounds"][0].get("scores") is None
        progress.update(phase="loading", round=k, epoch=0, n_epochs=n_epochs, elapsed_s=0.0)
        try:
            imgs, labs = zip(*[_read_pair(tdir, c["name"], channels) for c in train_items])
            probs = None
            if new and len(new) < len(train_items) and recipe.new_share > 0:
                is_new = np.array([c["name"] in new for c in train_items])
                probs = np.where(is_new, recipe.new_share / is_new.sum(),
                                 (1 - recipe.new_share) / (~is_new).sum())
            use_gpu = self._device_is_gpu(st)
            model = CellposeModel(gpu=use_gpu if gpu is None else bool(gpu), device=device,
                                  pretrained_model=parent_ref.get("path") or parent_ref["name"], use_bfloat16=False)
            limit = float(recipe.time_limit_s)
            state = {"stopped": False, "epochs": 0}

            def cb(epoch, train_loss, test_loss, elapsed):
                state["epochs"] = epoch + 1
                progress.update(phase="training", epoch=epoch + 1, elapsed_s=round(elapsed, 1),
                                train_loss=round(float(train_loss), 4))
                if cancel.is_set():
                    return False
                if elapsed >= limit and epoch + 1 < n_epochs:
                    state["stopped"] = True
                    return False
                return True

            progress.update(phase="training")
            run = fine_tune(
                model.net, train_mod.net_arch(model.net), list(imgs), list(labs), channel_axis=2,
                name=rec["model"]["name"], save_dir=self.path, n_epochs=n_epochs,
                learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
                bsize=recipe.bsize, nimg_per_epoch=recipe.crops_per_epoch, min_train_masks=1, seed=seed,
                on_epoch=cb, train_probs=None if probs is None else list(probs), rescale=recipe.rescale,
                lr_schedule=round_lr_schedule(recipe.learning_rate, n_epochs) if recipe.schedule == "round" else None)
            mpath, tl, train_s = run.path, run.train_losses, run.seconds
            train_device = str(model.device)
            del model
            if cancel.is_set():
                with self._update() as st:
                    r = st["rounds"][k]
                    r.update(status="cancelled", accepted=False, applied=False, finished=utc_now(),
                             epochs_done=int(len(tl)), train_seconds=round(train_s, 1),
                             model={"name": rec["model"]["name"], "path": str(mpath), "sha256": None},
                             reason="cancelled")
                    st["pending"] = True  # the corrections are still to be learnt
                    self._event(st, "round cancelled", round=k)
                    return dict(r)
            from cellpose_web.registry import file_sha256

            model_ref = {"name": rec["model"]["name"], "path": str(Path(mpath).resolve()),
                         "sha256": file_sha256(mpath)}
            progress.update(phase="scoring")
            t1 = time.perf_counter()
            held = [_read_pair(tdir, c["name"], None) for c in held_items]
            held_imgs, held_labs = [h[0] for h in held], [h[1] for h in held]
            names = [c["name"] for c in held_items]
            new_scores = _score(model_ref, held_imgs, held_labs, channels, eval_kwargs, device, gpu)
            if parent_scores_cached and parent_scores_cached.get("heldout") == names:
                parent_scores = parent_scores_cached
            else:
                parent_scores = _score(parent_ref, held_imgs, held_labs, channels, eval_kwargs, device, gpu)
            if new_scores is not None:
                new_scores["heldout"] = names
            if parent_scores is not None:
                parent_scores["heldout"] = names
            base_scores = None  # the curve starts at the base model: score it once, when it can be
            if held and base_unscored and parent_no != 0:
                base_scores = _score(base_ref, held_imgs, held_labs, channels, eval_kwargs, device, gpu)
                base_scores["heldout"] = names
            train_scores = parent_train_scores = None
            if not held:  # nothing held out yet: check the round on (the last few of) its own images
                check = [_read_pair(tdir, c["name"], None) for c in train_items[-TRAIN_CHECK_IMAGES:]]
                check_imgs, check_labs = [c[0] for c in check], [c[1] for c in check]
                train_scores = _score(model_ref, check_imgs, check_labs, channels, eval_kwargs, device, gpu)
                parent_train_scores = _score(parent_ref, check_imgs, check_labs, channels, eval_kwargs, device, gpu)
            score_s = time.perf_counter() - t1
            with self._update() as st:
                accepted, reason = decide_acceptance(new_scores, parent_scores, float(st.get("min_gain", 0.0)),
                                                     train_new=train_scores, train_parent=parent_train_scores)
                applied = accepted and int(st["current_round"]) == parent_no
                if accepted and not applied:
                    reason += f"; not made current: the model was changed to round {st['current_round']} meanwhile"
                r = st["rounds"][k]
                ep = int(len(tl))
                r.update(status="done", model=model_ref, epochs_done=ep, stopped_by_time_limit=state["stopped"],
                         train_seconds=round(train_s, 1), score_seconds=round(score_s, 1),
                         sec_per_crop=round(train_s / max(1, ep * recipe.crops_per_epoch), 4),
                         final_train_loss=float(np.asarray(tl)[-1]) if len(tl) else None,
                         scores=new_scores, parent_scores=parent_scores, train_scores=train_scores,
                         parent_train_scores=parent_train_scores, accepted=accepted, applied=applied,
                         reason=reason, finished=utc_now(), device=train_device)
                if parent_scores is not None and parent_no < len(st["rounds"]):
                    st["rounds"][parent_no]["scores_latest"] = parent_scores
                    if st["rounds"][parent_no].get("scores") is None:
                        st["rounds"][parent_no]["scores"] = parent_scores
                if base_scores is not None and st["rounds"][0].get("scores") is None:
                    st["rounds"][0]["scores"] = base_scores
                if applied:
                    st["current_round"] = k
                old_current = parent_ref if applied else model_ref
                self._event(st, "round finished", round=k, accepted=accepted, applied=applied, reason=reason)
                out = dict(r)
            if is_inside(old_current.get("path"), self.path):  # keep the process's model cache small
                pipeline.forget_models(old_current["path"])
            progress.update(phase="finished")
            return out
        except BaseException as e:
            with self._update() as st:
                r = st["rounds"][k]
                r.update(status="failed", accepted=False, applied=False, finished=utc_now(),
                         reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                st["pending"] = True
                self._event(st, "round failed", round=k, error=r["reason"])
            raise

    def rollback(self, round_no: int) -> dict[str, Any]:
        """Make round ``round_no``'s model the current one (0 = the base model); later rounds stay
        recorded and can be chosen again. Returns the new current model."""
        with self._update() as st:
            k = int(round_no)
            if not 0 <= k < len(st["rounds"]):
                raise CellposeWebError(f"round {k} does not exist (rounds 0..{len(st['rounds']) - 1})")
            r = st["rounds"][k]
            if k > 0 and (r.get("status") != "done" or not r["model"].get("path")
                          or not Path(r["model"]["path"]).is_file()):
                raise CellposeWebError(f"round {k} has no usable model ({r.get('status')}); choose a finished round")
            before = int(st["current_round"])
            st["current_round"] = k
            self._event(st, "rollback", round=k, previous_round=before)
            return self.current_model(st)

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for this process's running worker, if any; the last round it ran."""
        h = _RUNNING.get(str(self.path))
        return h.wait(timeout) if h is not None else None

    # ------------------------------------------------------------------ views
    def ap_curve(self) -> list[dict[str, Any]]:
        """Held-out AP per round: [{round, ap50, ap75, n_images, accepted, current, n_cells}] for every
        round with scores (round 0 = the base model, scored when the first held-out image was used)."""
        st = self.state()
        cur = int(st["current_round"])
        out = []
        for r in st["rounds"]:
            s = r.get("scores")
            if s is None:
                continue
            out.append({"round": r["round"], "ap50": s["ap50"], "ap75": s["ap75"], "n_images": s["n_images"],
                        "accepted": bool(r.get("accepted", r["round"] == 0)), "current": r["round"] == cur,
                        "n_cells": int(r.get("n_cells", 0))})
        return out

    def status(self) -> dict[str, Any]:
        """Everything a view shows: images, progress, current model, rounds, AP curve, running worker."""
        st = self.state()
        h = self.running_round()
        corrected = st.get("corrected", [])
        rounds = [{k: r.get(k) for k in ("round", "status", "parent_round", "n_train_images", "n_cells", "epochs",
                                         "epochs_done", "train_seconds", "score_seconds", "scores", "parent_scores",
                                         "train_scores", "parent_train_scores", "accepted", "applied", "reason", "stopped_by_time_limit")}
                  for r in st["rounds"]]
        skipped = st.get("skipped") or {}
        return {"name": self.name, "path": str(self.path), "source": st.get("source"),
                # the images to correct: files found unreadable are not counted (listed under skipped)
                "n_images": len(st["images"]) - len(skipped),
                "skipped": [{"index": int(k), "name": Path(st["images"][int(k)]).name, "reason": v}
                            for k, v in sorted(skipped.items(), key=lambda kv: int(kv[0]))],
                "index": int(st.get("index", 0)), "n_corrected": len(corrected),
                "n_heldout": sum(1 for c in corrected if c["heldout"]),
                "n_cells_corrected": int(sum(int(c["n_cells"]) for c in corrected)),
                "base_model": st["base_model"], "channels": st.get("channels"),
                "current_model": self.current_model(st), "recipe": self.recipe(st).as_dict(),
                "rounds": rounds, "ap_curve": self.ap_curve(), "pending": bool(st.get("pending")),
                "round_running": h.status() if h is not None else None,
                "train_minutes": round(sum(float(r.get("train_seconds") or 0) for r in st["rounds"]) / 60, 2)}

    def publish(self, name: str, round_no: int | None = None, overwrite: bool = False):
        """Register a round's model (the current one by default) as a lab model with its provenance;
        returns the registry entry."""
        from cellpose_web import registry

        st = self.state()
        k = int(st["current_round"] if round_no is None else round_no)
        if not 0 <= k < len(st["rounds"]):
            raise BadInputError(f"Project {self.name} has no round {k}: it has rounds 0 to {len(st['rounds']) - 1}.")
        if k == 0:
            raise BadInputError("Nothing to publish yet: round 0 is the base model itself. Save corrections until "
                                "a round has learnt from them (or go back to a round that did), then publish.")
        r = st["rounds"][k]
        if r.get("status") != "done":
            raise BadInputError(f"Round {k} has no finished model: wait for it to end, or publish another round.")
        s = r.get("scores") or {}
        meta = {"description": f"human-in-the-loop project {self.name}, round {k}",
                "base_model": st["base_model"]["name"], "test_ap": s.get("ap50"),
                "training": {"hitl_project": self.name, "round": k, "lineage": self._lineage(st, k),
                             "train_images": r.get("train_images"), "test_images": r.get("heldout_images"),
                             "n_cells": r.get("n_cells"), "n_epochs": r.get("epochs_done"),
                             "learning_rate": r.get("learning_rate"), "weight_decay": r.get("weight_decay"),
                             "train_seconds": r.get("train_seconds"), "heldout_ap50": s.get("ap50"),
                             "heldout_ap75": s.get("ap75")}}
        return registry.add_lab_model(r["model"]["path"], name, meta, overwrite=overwrite)

    @staticmethod
    def _lineage(st: dict[str, Any], k: int) -> list[int]:
        out = [k]
        while k > 0:
            k = int(st["rounds"][k]["parent_round"])
            out.append(k)
        return out[::-1]


# ----------------------------------------------------------------------------------------------
# module functions
# ----------------------------------------------------------------------------------------------
def start_session(name: str, images: Any, base_model: str = "lite", channels: Sequence[int] | None = None, *,
                  root: str | os.PathLike | None = None, user: str | None = None,
                  eval_kwargs: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                  holdout_every: int = 4, min_gain: float = 0.0, seed: int = 0, gpu: bool | None = None,
                  device: str | None = None, training_dir: str | os.PathLike | None = None,
                  overwrite: bool = False) -> HitlSession:
    """Start a project: ``images`` (a folder, a zip, or a list of files), the base model (a registry
    name or a file) and the channels fed to the model (file numbering; Cellpose 1-3 models:
    [cytoplasm, nucleus]; None = all, i.e. the first three). ``recipe`` overrides fields of the
    round defaults (:class:`RoundRecipe`). ``overwrite`` replaces an existing project of that name
    (otherwise it is an error: use :func:`open_session`)."""
    from cellpose_web import registry

    pdir = project_dir(name, root, user)
    if (pdir / SESSION_FILE).exists():
        if not overwrite:
            raise CellposeWebError(f"a project named '{pdir.name}' exists already: open it, or choose another name")
        if _RUNNING.get(str(pdir)) is not None and _RUNNING[str(pdir)].running:
            raise CellposeWebError(f"project '{pdir.name}' is training; wait for the round before replacing it")
        old_tdir = (read_json(pdir / SESSION_FILE, {}) or {}).get("training_dir")
        shutil.rmtree(pdir)
        if old_tdir and Path(old_tdir).name.startswith("hitl_") and Path(old_tdir).is_dir():
            shutil.rmtree(old_tdir)  # the project's own pairs in the lab's training sets
    pdir.mkdir(parents=True, exist_ok=True)
    try:
        files, source = list_images(images, pdir)
        if not files:
            raise CellposeWebError("no images found")
        info = registry.resolve_model(base_model)
        by_name = not Path(str(base_model)).expanduser().exists()
        if training_dir is None:
            training_dir = (sub_dir("training_sets", user) / f"hitl_{pdir.name}") if root is None \
                else pdir / "training_set"
        chans = [int(c) for c in channels] if channels else None
        if chans and any(c < 0 for c in chans):
            raise CellposeWebError(f"channels are file channel numbers (0 = first), got {chans}")
        # the first readable image: a z-stack or a missing channel fails now, not at the first image; an
        # unreadable file (truncated, not an image) is skipped with its reason, as Batch does
        skipped, problems = {}, []
        for i, f in enumerate(files):
            try:
                first = read_image_yxc(f)
            except CellposeWebError as e:
                skipped[str(i)] = " ".join(str(e).split())[:300]
                problems.append(f"{Path(f).name}: {skipped[str(i)]}")
                continue
            select_channels(first, chans)
            break
        else:
            raise CellposeWebError("None of the images could be read: " + "; ".join(problems[:5]))
        st = {"version": STATE_VERSION, "name": pdir.name, "created": utc_now(), "updated": utc_now(),
              "source": source, "images": files, "index": 0, "channels": chans,
              "eval_kwargs": dict(eval_kwargs or {}),
              "base_model": {"name": info.name, "path": info.path, "sha256": info.sha256, "arch": info.arch},
              "recipe": dict(recipe or {}), "holdout_every": int(holdout_every), "min_gain": float(min_gain),
              "seed": int(seed), "gpu": gpu, "device": device, "training_dir": str(Path(training_dir).resolve()),
              "current_round": 0, "pending": False, "corrected": [], "skipped": skipped,
              "rounds": [{"round": 0, "status": "base", "parent_round": None, "base_model": info.name,
                          # a registry name loads as the Segment tab loads it (its table entries too)
                          "model": {"name": info.name, "path": None if by_name else info.path,
                                    "sha256": info.sha256},
                          "train_images": [], "n_train_images": 0, "n_cells": 0, "accepted": True,
                          "applied": True, "scores": None, "reason": "the base model"}],
              "shown": None, "events": [{"at": utc_now(), "what": "started", "base_model": info.name}]}
        round_defaults(info.arch).replace(**(recipe or {}))  # unknown / bad overrides fail now
        atomic_write_json(pdir / SESSION_FILE, st)
    except BaseException:
        shutil.rmtree(pdir, ignore_errors=True)
        raise
    return HitlSession(pdir)


def open_session(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None,
                 user: str | None = None) -> HitlSession:
    """Open a project by name (under ``root``) or by its folder; a round that was running when the
    process stopped (no worker holds the round lock) is marked ``interrupted``, and its corrections
    stay ``pending`` (``learn()`` trains on them)."""
    p = Path(name_or_path).expanduser()
    if not (p / SESSION_FILE).is_file():
        p = project_dir(str(name_or_path), root, user)
    s = HitlSession(p)
    running = [r for r in s.state()["rounds"] if r.get("status") == "running"]
    if running and s.running_round() is None:
        probe = FileLock(s.path / "round.lock")
        if probe.acquire(blocking=False):  # nobody trains it: those rounds died with their process
            try:
                with s._update() as st:
                    for r in st["rounds"]:
                        if r.get("status") == "running":
                            r.update(status="interrupted", accepted=False, applied=False, finished=utc_now(),
                                     reason="the process stopped during the round (restart)")
                            st["pending"] = True
                    s._event(st, "resumed after an interrupted round")
            finally:
                probe.release()
    return s


def session_exists(name: str, root: str | os.PathLike | None = None, user: str | None = None) -> bool:
    """Whether a project of that name exists (False for a name that is not a valid project name)."""
    try:
        return (project_dir(name, root, user) / SESSION_FILE).is_file()
    except CellposeWebError:
        return False


def list_sessions(root: str | os.PathLike | None = None, user: str | None = None) -> list[dict[str, Any]]:
    """[{name, path, n_images, n_corrected, current_round, base_model, updated}] of the projects under root."""
    out = []
    base = hitl_root(root, user)
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        st = read_json(d / SESSION_FILE)
        if not isinstance(st, dict):
            continue
        out.append({"name": d.name, "path": str(d),
                    "n_images": len(st.get("images", [])) - len(st.get("skipped") or {}),
                    "n_corrected": len(st.get("corrected", [])), "current_round": st.get("current_round"),
                    "n_rounds": len(st.get("rounds", [])) - 1,
                    "base_model": (st.get("base_model") or {}).get("name"), "updated": st.get("updated")})
    return out


def _read_pair(tdir: Path, name: str, channels: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """A saved pair as ((Y, X, C) image with the model's channels, labels)."""
    import tifffile

    img = tifffile.imread(tdir / f"{name}.tif")
    if img.ndim == 2:
        img = img[..., None]
    lab = tifffile.imread(tdir / f"{name}_masks.tif")
    return select_channels(img, channels), lab


def _score(ref, imgs, labs, channels, eval_kwargs, device, gpu) -> dict[str, Any] | None:
    """:func:`score_model` (a seam for tests)."""
    return score_model(ref, imgs, labs, channels, eval_kwargs, device, gpu)
