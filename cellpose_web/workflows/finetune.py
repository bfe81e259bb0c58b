"""Training sets on the server and the fine-tune job.

Layout: ``<data>/training_sets/<set>/NAME.tif``, ``NAME_masks.tif``, ``set.json``.
Fine-tuning always starts from a base model (as Cellpose advises), reports AP before and after
on held-out images, and registers the new model in the registry with its recipe.

Channels: a pair's image is stored whole (every file channel, channels last) with the channels it
was segmented with (``channels`` in set.json, file numbering: 0 = first; None = all), and the set
remembers the latest pair's. :func:`load_set` gives each image on its own channels, or on channels
chosen for the whole set; :func:`run_finetune` trains and scores on the same. Sets made before
channels were recorded stored the segmentation channels only: their images are used whole.
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellpose_web.engine.dynamics.labels import as_label_dtype
from cellpose_web.engine import memory
from cellpose_web.errors import BadInputError, CellposeWebError
from cellpose_web.workflows import inputs, model_cache as models_cache
from cellpose_web.service.config import Limits
from cellpose_web.service import jobs
from cellpose_web.io import atomic_save
from cellpose_web.io.labels import instance_labels
from cellpose_web.service.storage import (atomic_write_json, named_dir, read_json, safe_name,
                                          sub_dir)

log = logging.getLogger(__name__)


def sets_root(user: str | None = None) -> Path:
    return sub_dir("training_sets", user)


def list_sets(user: str | None = None) -> list[dict[str, Any]]:
    """[{name, n_images, n_cells, updated, channels, channels_differ}] for every training set.

    channels : the set's channels (its latest pair's segmentation channels, file numbering; None =
        every stored channel); channels_differ : True when its pairs were segmented on different ones.
    """
    out = []
    for d in sorted(sets_root(user).iterdir()):
        if d.is_dir():
            meta = read_json(d / "set.json", {}) or {}
            pairs = meta.get("pairs", [])
            out.append({"name": d.name, "n_images": len(pairs),
                        "n_cells": int(sum(p.get("n_cells", 0) for p in pairs)), "updated": meta.get("updated"),
                        "channels": meta.get("channels"),
                        "channels_differ": len({_chan_key(p.get("channels")) for p in pairs}) > 1})
    return out


def _chan_key(channels: Any) -> tuple[int, ...] | None:
    return None if channels is None else tuple(int(c) for c in channels)


def parse_channels(channels: Any) -> list[int] | None:
    """Channels to train on as a list of file channel numbers (0 = first), in the order given; None
    for None, "" or [] (as each image was segmented). Accepts "1,2" or [1, 2]."""
    if channels is None:
        return None
    if isinstance(channels, str):
        parts = [t for t in channels.replace(" ", "").split(",") if t != ""]
    else:
        parts = list(np.atleast_1d(np.asarray(channels, dtype=object)).ravel())
    try:
        vals = [int(v) for v in parts]
        ok = all(float(v) == int(v) for v in parts)
    except (TypeError, ValueError):
        ok = False
    if not ok or any(v < 0 for v in vals):
        raise CellposeWebError(f"Channels to train on: write file channel numbers separated by commas, e.g. 1,2 "
                               f"(0 = first channel; blank = as each image was segmented); got {channels!r}.")
    if len(set(vals)) != len(vals):
        raise CellposeWebError(f"Channels to train on: each channel once, please; got {channels!r}.")
    return vals or None


def _n_channels(shape: tuple[int, ...]) -> int:
    """Channels of a stored (Y, X) or (Y, X, C) image of this shape."""
    return 1 if len(shape) == 2 else int(shape[-1])


def _check_channels_exist(channels: list[int] | None, img: np.ndarray | tuple[int, ...], where: str) -> None:
    """``img``: the stored image or its shape."""
    if channels is None:
        return
    n = _n_channels(tuple(img) if isinstance(img, tuple) else np.shape(img))
    bad = [c for c in channels if c >= n]
    if bad:
        raise CellposeWebError(f"{where} has {n} channel(s) (0-{n - 1}, numbered as in the file, 0 = first); "
                               f"channel {bad[0]} does not exist. Choose other channels to train on.")


def select_channels(img: np.ndarray, channels: list[int] | None, where: str = "The image") -> np.ndarray:
    """A stored (Y, X) or (Y, X, C) image on `channels` (file numbering, in that order; None = all):
    (Y, X) for one channel, (Y, X, k) for k > 1."""
    img = np.asarray(img)
    _check_channels_exist(channels, img, where)
    if channels is None or img.ndim == 2:
        return img
    out = img[..., list(channels)]
    return out[..., 0] if out.shape[-1] == 1 else out


def segmentation_channels(provenance: dict[str, Any] | None) -> list[int] | None:
    """The file channels (0 = first) a result was segmented with, from its provenance: the
    segmentation channels, or for a Cellpose 1-3 model run with its cytoplasm/nucleus pickers
    ([cyto, nucleus], 1-based) those two as file channels [cyto - 1, nucleus - 1] (the network sees
    the same two inputs). None: all channels (also for 'grey', the mean of every channel)."""
    p = provenance or {}
    seg = (p.get("channels") or {}).get("segment")
    if seg:
        return [int(c) for c in seg]
    cp3 = (p.get("eval_params") or {}).get("channels")
    if cp3 is not None:
        try:
            cyto, nuc = ([int(c) for c in np.atleast_1d(cp3).ravel()] + [0, 0])[:2]
        except (TypeError, ValueError):
            return None
        if cyto > 0:
            return [cyto - 1] + ([nuc - 1] if nuc > 0 and nuc != cyto else [])
    return None


def add_pair(set_name: str, image: np.ndarray, masks: np.ndarray, name: str, user: str | None = None,
             meta: dict[str, Any] | None = None, channels: list[int] | None = None) -> Path:
    """Store one image + corrected masks in a training set (replacing a pair of the same name).

    image : the whole image, (Y, X), (Y, X, C) or (C, Y, X): every channel is stored.
    channels : the file channels (0 = first) it was segmented with, which fine-tuning uses (None =
        all); also becomes the set's channels.
    """
    import tifffile
    channels = parse_channels(channels)
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise CellposeWebError("Only 2D masks can be added to a training set; pick a z-plane.")
    if masks.max(initial=0) == 0:
        raise CellposeWebError("These masks are empty; segment or draw cells before adding them to a training set.")
    d = named_dir(sets_root(user), set_name, "training set name")
    d.mkdir(parents=True, exist_ok=True)
    stem = safe_name(name, "image name")
    img = np.asarray(image)
    # store as (Y, X) or channels-last (Y, X, C) so every image of a set has one layout
    if img.ndim == 3 and img.shape[:2] != masks.shape and img.shape[1:] == masks.shape:
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.shape[:2] != masks.shape or img.ndim > 3:
        raise CellposeWebError(f"Image {img.shape} and masks {masks.shape} do not match; a training pair needs "
                               "a 2D image (optionally with channels) and masks of the same Y, X size.")
    _check_channels_exist(channels, img, f"Image {stem!r}")
    atomic_save(d / f"{stem}.tif", lambda p: tifffile.imwrite(p, img, compression="zlib"))
    m = as_label_dtype(masks)
    atomic_save(d / f"{stem}_masks.tif", lambda p: tifffile.imwrite(p, m, compression="zlib"))
    setj = read_json(d / "set.json", {}) or {}
    pairs = [p for p in setj.get("pairs", []) if p.get("name") != stem]
    pairs.append({"name": stem, "n_cells": int(len(np.unique(m[m > 0]))), "shape": list(img.shape),
                  "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(meta or {}),
                  "channels": channels})
    setj.update({"name": d.name, "pairs": pairs, "channels": channels,
                 "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    atomic_write_json(d / "set.json", setj)
    return d


def _read_labels(p: Path, limits: Limits) -> np.ndarray:
    if p.name.endswith("_seg.npy"):
        try:
            from cellpose_web import io as cpio
            dat = cpio.load_seg(str(p))
        except (ImportError, AttributeError):
            raise CellposeWebError("Reading _seg.npy files is not available on this server; use _masks.tif.")
        m = dat["masks"] if isinstance(dat, dict) else dat
        return instance_labels(np.asarray(m), p.name)
    return instance_labels(np.asarray(inputs.read_image(p, limits).data), p.name)


def import_pairs(files: list[str | Path], set_name: str, user: str | None = None,
                 limits: Limits | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Add image + `_masks`/`_seg.npy` pairs from zips or files; returns (n_added, [(name, reason)])."""
    limits = limits or Limits.from_env()
    work = Path(tempfile.mkdtemp(prefix="pairs_"))
    problems: list[tuple[str, str]] = []
    try:
        paths: list[Path] = []
        for i, f in enumerate(files):
            f = Path(f)
            if f.suffix.lower() == ".zip":
                paths += inputs.extract_zip(f, work / f"z{i}", limits)
            else:
                paths.append(f)
        label_files = {}
        for p in paths:
            for suf in ("_seg.npy", "_masks.tif", "_masks.tiff", "_masks.png"):
                if p.name.endswith(suf):
                    label_files[p.name[: -len(suf)]] = p
        imgs = [p for p in paths if p.suffix.lower() in inputs.IMAGE_EXTS and not inputs.is_mask_file(p)]
        n = 0
        for p in imgs:
            lab = label_files.get(p.stem)
            if lab is None:
                problems.append((p.name, "no matching NAME_masks.tif/.png or NAME_seg.npy"))
                continue
            try:
                img = inputs.read_image(p, limits).data
                m = _read_labels(lab, limits)
                add_pair(set_name, img, m, p.stem, user, {"source": "upload"})
                n += 1
            except (CellposeWebError, FileNotFoundError) as e:
                problems.append((p.name, str(e)))
        used = {p.stem for p in imgs}
        for stem, lab in label_files.items():
            if stem not in used:
                problems.append((lab.name, "no matching image"))
        if n == 0 and not problems:
            raise CellposeWebError("No image + mask pairs found: name masks NAME_masks.tif next to NAME.tif.")
        return n, problems
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _set_dir(set_name: str, user: str | None) -> Path:
    d = named_dir(sets_root(user), set_name, "training set name")
    if not d.is_dir():
        raise CellposeWebError(f"Training set {set_name!r} does not exist; add corrected images in the "
                               "Correct tab or upload pairs here.")
    return d


def pair_names(set_name: str, user: str | None = None) -> set[str]:
    """The names of the pairs in a training set (empty when there is no such set yet)."""
    setj = read_json(named_dir(sets_root(user), set_name, "training set name") / "set.json", {}) or {}
    return {p.get("name") for p in setj.get("pairs", [])}


def pair_channels(set_name: str, user: str | None = None) -> dict[str, list[int] | None]:
    """{pair name: the file channels it was segmented with (None = all / not recorded)}."""
    setj = read_json(_set_dir(set_name, user) / "set.json", {}) or {}
    return {p.get("name"): (None if p.get("channels") is None else [int(c) for c in p["channels"]])
            for p in setj.get("pairs", [])}


def _set_pairs(set_name: str, user: str | None, channels: Any):
    """(name, image path, masks path, channels to train on, where) of each pair of a training set, in
    name order; ``channels`` None = each pair's recorded segmentation channels."""
    d = _set_dir(set_name, user)
    chosen = parse_channels(channels)
    recorded = pair_channels(set_name, user)
    for mp in sorted(d.glob("*_masks.tif")):
        stem = mp.name[: -len("_masks.tif")]
        ip = d / f"{stem}.tif"
        if ip.is_file():
            yield (stem, ip, mp, chosen if chosen is not None else recorded.get(stem),
                   f"Training set {d.name!r}: image {stem!r}")


def check_set(set_name: str, user: str | None = None, channels: Any = None) -> int:
    """The number of pairs of a training set, checked as :func:`load_set` checks them (not empty,
    every channel to train on present) from the TIFF headers alone: no image is read."""
    import tifffile
    n = 0
    for _, ip, _, chans, where in _set_pairs(set_name, user, channels):
        with tifffile.TiffFile(ip) as tif:
            _check_channels_exist(chans, tuple(int(v) for v in tif.series[0].shape), where)
        n += 1
    if not n:
        raise CellposeWebError(f"Training set {set_name!r} is empty.")
    return n


def load_set(set_name: str, user: str | None = None, channels: Any = None
             ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """(images, labels, names) of a training set, each image on the channels to train on.

    channels : None (or blank) = each pair's own segmentation channels (every stored channel when none
        were recorded); a list (or "1,2") = those file channels for every pair, in that order.
        A channel an image does not have raises CellposeWebError naming the pair.
    """
    import tifffile
    imgs, labs, names = [], [], []
    for stem, ip, mp, chans, where in _set_pairs(set_name, user, channels):
        imgs.append(select_channels(tifffile.imread(ip), chans, where))
        labs.append(tifffile.imread(mp))
        names.append(stem)
    if not imgs:
        raise CellposeWebError(f"Training set {set_name!r} is empty.")
    return imgs, labs, names


def delete_set(set_name: str, user: str | None = None) -> None:
    d = named_dir(sets_root(user), set_name, "training set name")
    if d.is_dir():
        shutil.rmtree(d)


def _ap_on(model: Any, images: list[np.ndarray], labels: list[np.ndarray], channel_axis: int | None
           ) -> float | None:
    """Mean AP@0.5 of `model` on held-out pairs (None if no metric module)."""
    if not images:
        return None
    from cellpose_web.engine.metrics import average_precision
    preds = []
    for img in images:
        kw = {"channel_axis": channel_axis} if (channel_axis is not None and np.ndim(img) == 3) else {}
        m, _, _ = model.eval(img, **kw)
        preds.append(np.asarray(m))
    ap, _, _, _ = average_precision([np.asarray(x) for x in labels], preds, threshold=[0.5, 0.75, 0.9])
    ap = np.asarray(ap)
    return float(np.mean(ap[:, 0])) if ap.ndim == 2 else float(np.mean(ap))


def _channels_used(chosen: list[int] | None, recorded: dict[str, list[int] | None], names: list[str]) -> Any:
    """For a model's metadata: the channel list every image was used on (None = all stored channels),
    or {image: channels} when they differ."""
    if chosen is not None:
        return chosen
    per = {n: recorded.get(n) for n in names}
    distinct = {_chan_key(c) for c in per.values()}
    return next(iter(per.values())) if len(distinct) == 1 else per


def split_holdout(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, held-out): about `fraction` held out, at least one when n ≥ 2."""
    if n < 1:
        raise CellposeWebError("The training set is empty.")
    if n == 1:
        return [0], []
    k = max(1, int(round(n * fraction)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held = sorted(order[:k].tolist())
    return [i for i in range(n) if i not in held], held


def base_model_arch(base_model: str) -> str:
    """Network family of a model name: "lite", "cpsam", "cellpose3" ("" when it cannot be told).
    Hub and Cellpose 1-3 names are known without downloading them."""
    from cellpose_web import registry
    if base_model in registry.LEGACY_MODELS:
        return "cellpose3"
    if base_model in registry.HUB_MODELS:
        return "cpsam"
    try:
        return models_cache.resolve(base_model).get("arch") or ""
    except CellposeWebError:
        return ""


def finetune_defaults(base_model: str) -> dict[str, Any]:
    """The fine-tuning recipe for a base model name (its network family's entry in
    ``train.FINETUNE_DEFAULTS``): {learning_rate, weight_decay, n_epochs, batch_size, bsize,
    min_steps_per_epoch, source, arch}. The Fine-tune tab fills its boxes from it."""
    from cellpose_web.models.train import finetune_defaults as recipe_for
    arch = base_model_arch(base_model)
    return {**recipe_for(arch).as_dict(), "arch": arch}


#: the one set of limits for a fine-tune, whichever face starts it (app, command line, hitl)
MAX_LEARNING_RATE = 0.1
MAX_WEIGHT_DECAY = 10.0


def check_new_model_name(name: Any) -> str:
    """The name a fine-tuned model will be registered under, checked before any training: the lab
    registry's rule (letters, digits, ``. _ + -``; not a built-in name) and not taken by a lab model.
    Returns the name (stripped); raises :class:`BadInputError` saying what to change."""
    from cellpose_web import registry

    name = str(name or "").strip()
    if not name:
        raise BadInputError("Give the new model a name, e.g. 'nuclei_lab_v1'.")
    try:
        registry.validate_name(name)
    except CellposeWebError as e:
        raise BadInputError(str(e)) from None
    if (registry.models_dir() / name).exists():
        raise BadInputError(f"A lab model named '{name}' already exists: choose another name for the new model "
                            "(or delete the old one in the Models tab) before training.")
    return name


def _free_name(name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... when a lab model took it while training ran."""
    from cellpose_web import registry

    root, k, candidate = registry.models_dir(), 2, name
    while (root / candidate).exists():
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def check_training_params(n_epochs: int | None, learning_rate: float | None, weight_decay: float | None,
                          max_epochs: int) -> None:
    """Raise BadInputError (the message starts with the parameter's name) for values outside the
    limits: 1 <= n_epochs <= max_epochs, 0 < learning_rate <= 0.1, 0 <= weight_decay <= 10.
    None means "not given" (the base model's recipe fills it)."""
    if n_epochs is not None and not 1 <= n_epochs <= max_epochs:
        raise BadInputError(f"n_epochs must be between 1 and {max_epochs}; got {n_epochs}.")
    if learning_rate is not None and (not np.isfinite(learning_rate) or not 0 < learning_rate <= MAX_LEARNING_RATE):
        raise BadInputError(f"learning_rate must be a small positive number (at most {MAX_LEARNING_RATE:g}), "
                            f"e.g. 1e-5 (Cellpose-SAM) or 1e-3 (lite); got {learning_rate}.")
    if weight_decay is not None and (not np.isfinite(weight_decay) or not 0 <= weight_decay <= MAX_WEIGHT_DECAY):
        raise BadInputError(f"weight_decay must be between 0 and {MAX_WEIGHT_DECAY:g} (Cellpose uses 0.1); "
                            f"got {weight_decay}.")


@dataclass
class TrainingRun:
    """What one fine-tune produced (:func:`fine_tune`).

    path : the checkpoint ``train_seg`` wrote (``<save_dir>/models/<name>``).
    train_losses, test_losses : per epoch run (test 0 where no held-out loss was computed, as Cellpose).
    seconds : wall time of the training loop.
    settings : the values used (n_epochs, learning_rate, weight_decay, batch_size, bsize,
        nimg_per_epoch, min_train_masks, seed), recipe defaults filled in.
    stopped : ``on_epoch`` ended the run before ``n_epochs``.
    notices : what happened that the user should know (e.g. the batch halved after running out of
        GPU memory).
    """
    path: Path
    train_losses: list[float]
    test_losses: list[float]
    seconds: float
    settings: dict[str, Any]
    stopped: bool = False
    device: str = ""
    notices: tuple[str, ...] = ()

    @property
    def epochs_done(self) -> int:
        return len(self.train_losses)

    def record(self, base: Any, train_images: list[str], test_images: list[str], **facts: Any) -> dict[str, Any]:
        """The one ``training`` record a fine-tuned model's metadata keeps, whichever face trained it.

        base : the base model's registry entry (a ``ModelInfo`` or a dict with name and sha256).
        train_images, test_images : file or pair names; facts : anything else worth keeping
        (training_set, channels, ap_before, ap_after ...).
        """
        get = (lambda k: base.get(k)) if isinstance(base, dict) else (lambda k: getattr(base, k, None))
        final = self.train_losses[-1] if self.train_losses else None
        return {"base_model": get("name"), "base_sha256": get("sha256"), "train_images": list(train_images),
                "test_images": list(test_images), **self.settings, "epochs_done": self.epochs_done,
                "train_seconds": round(self.seconds, 1), "device": self.device,
                "train_losses": list(self.train_losses), "test_losses": list(self.test_losses),
                "final_train_loss": final, "notices": list(self.notices), **facts}


def training_settings(arch: str, n_images: int, n_epochs: Any = None, learning_rate: Any = None,
                      weight_decay: Any = None, batch_size: Any = None, bsize: Any = None,
                      nimg_per_epoch: Any = None, max_epochs: int | None = None) -> dict[str, Any]:
    """The settings of a fine-tune of a network family ``arch`` on ``n_images`` images: each value
    given (None or "" = the family's recipe, ``models.train.finetune_defaults``), checked against
    the one set of limits (:func:`check_training_params`). Raises BadInputError."""
    from cellpose_web.models.train import finetune_defaults as recipe_for
    recipe = recipe_for(arch)

    def number(value: Any, default: Any, kind: type, name: str) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise BadInputError(f"{name} must be a number; got {value!r}.") from None

    out = {"n_epochs": number(n_epochs, recipe.n_epochs, int, "n_epochs"),
           "learning_rate": number(learning_rate, recipe.learning_rate, float, "learning_rate"),
           "weight_decay": number(weight_decay, recipe.weight_decay, float, "weight_decay"),
           "batch_size": number(batch_size, recipe.batch_size, int, "batch_size"),
           "bsize": number(bsize, recipe.bsize, int, "bsize"),
           "nimg_per_epoch": number(nimg_per_epoch, recipe.nimg_per_epoch(n_images), int, "nimg_per_epoch")}
    check_training_params(out["n_epochs"], out["learning_rate"], out["weight_decay"],
                          max_epochs or Limits.from_env().max_epochs)
    if out["batch_size"] < 1:
        raise BadInputError(f"batch_size must be at least 1; got {out['batch_size']}.")
    if arch == "cpsam" and out["bsize"] != 256:
        raise BadInputError(f"Cellpose-SAM models train on 256x256 tiles; bsize {out['bsize']} is not possible.")
    return out


def fine_tune(net: Any, arch: str, train_images: list[np.ndarray], train_labels: list[np.ndarray], *,
              name: str, save_dir: str | Path, test_images: list[np.ndarray] | None = None,
              test_labels: list[np.ndarray] | None = None, channel_axis: int | None = None,
              n_epochs: Any = None, learning_rate: Any = None, weight_decay: Any = None, batch_size: Any = None,
              bsize: Any = None, nimg_per_epoch: Any = None, min_train_masks: int = 1, seed: int = 0,
              max_epochs: int | None = None,
              on_epoch: Callable[[int, float, float | None, float], bool | None] | None = None,
              retry_out_of_memory: bool | None = None, **loop: Any) -> TrainingRun:
    """Fine-tune a network in place: the one driver under the Fine-tune tab, ``--train`` and the
    human-in-the-loop rounds.

    net : ``CellposeModel(...).net``, float32 (its weights change).
    arch : its family ("lite", "cpsam", "cellpose3"): the recipe for the values not given.
    train_images, train_labels : (Y, X) or (Y, X, C) / (C, Y, X) images (``channel_axis``) and
        their (Y, X) instance labels.
    n_epochs ... nimg_per_epoch : :func:`training_settings` (None = the recipe).
    on_epoch : called after every epoch with (epoch, train_loss, test_loss or None, seconds);
        returning False stops the run (cancel, a time limit).
    retry_out_of_memory : on torch's out-of-memory error, start again from the starting weights (kept
        on the host) with half the batch, down to 1, and say so in ``TrainingRun.notices``; at batch
        size 1 raise :class:`~cellpose_web.errors.OutOfMemoryError`. None: on a GPU (a CPU runs out of
        memory with other errors, and keeping a copy of the weights there would cost host memory for
        nothing).
    loop : other ``models.train.train_seg`` keywords (nimg_test_per_epoch, save_every, save_each,
        train_probs, rescale, lr_schedule).

    Returns
    -------
    TrainingRun
    """
    from cellpose_web.models.train import train_seg

    settings = training_settings(arch, len(train_images), n_epochs, learning_rate, weight_decay, batch_size,
                                 bsize, nimg_per_epoch, max_epochs)
    settings.update(min_train_masks=int(min_train_masks), seed=int(seed))

    def callback(epoch, train_loss, test_loss, elapsed):
        if on_epoch is None:
            return True
        return on_epoch(int(epoch), float(train_loss), None if test_loss is None else float(test_loss),
                        float(elapsed)) is not False

    device = _device_of(net)
    # on a GPU, the starting weights are kept on the host so a run that runs out of memory can start
    # again from them with half the batch (the batch is the part of the memory the user can give up)
    initial = None
    if retry_out_of_memory is None:
        retry_out_of_memory = bool(device) and not device.startswith("cpu")
    if retry_out_of_memory:
        initial = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    notices: list[str] = []

    def train(batch_size: int):
        settings["batch_size"] = batch_size
        return train_seg(
            net, train_images, train_labels, test_data=test_images or None, test_labels=test_labels or None,
            channel_axis=channel_axis, learning_rate=settings["learning_rate"],
            weight_decay=settings["weight_decay"], n_epochs=settings["n_epochs"],
            batch_size=batch_size, bsize=settings["bsize"], nimg_per_epoch=settings["nimg_per_epoch"],
            save_path=str(save_dir), model_name=name, min_train_masks=settings["min_train_masks"],
            seed=settings["seed"], callback=callback, **loop)

    def start_again(batch_size: int) -> None:
        net.load_state_dict(initial)
        note = f"out of GPU memory: training started again from the base model with batch size {batch_size}"
        log.warning("fine-tune %s: %s", name, note)
        notices.append(note)

    t0 = time.perf_counter()
    if initial is None:
        path, train_losses, test_losses = train(settings["batch_size"])
    else:
        (path, train_losses, test_losses), _ = memory.halve_on_out_of_memory(
            train, settings["batch_size"], device, on_halved=start_again,
            at_one=(f"Out of GPU memory while fine-tuning, even one {settings['bsize']} px crop at a time. Free the "
                    "GPU (other segmentations or programs using it) and start again, or fine-tune on the CPU."))
    seconds = time.perf_counter() - t0
    train_losses = [float(x) for x in np.asarray(train_losses, float)]
    if loop.get("lr_schedule") is None:
        note = warm_up_notice(len(train_losses), settings["learning_rate"])
        if note:
            notices.append(note)
    return TrainingRun(Path(path), train_losses, [float(x) for x in np.asarray(test_losses, float)], seconds,
                       settings, stopped=len(train_losses) < settings["n_epochs"],
                       device=device, notices=tuple(notices))


def warm_up_notice(epochs_run: int, learning_rate: float) -> str | None:
    """What a user should know when a run ended inside the learning-rate warm-up, or None.

    The standard schedule (:func:`~cellpose_web.models.train.learning_rate_schedule`, as Cellpose's)
    rises linearly from 0 over the first 10 epochs: epoch 1 does not change the weights, and a run
    of fewer than 10 epochs never trains at the learning rate that was set.
    """
    from cellpose_web.models.train import WARM_UP_EPOCHS, learning_rate_schedule

    if epochs_run >= WARM_UP_EPOCHS or epochs_run < 1:
        return None
    if epochs_run == 1:
        return ("1 epoch trains nothing: the learning rate starts at 0 and rises over the first "
                f"{WARM_UP_EPOCHS} epochs (as in Cellpose), so the saved model keeps its base's weights. Train for "
                f"at least {WARM_UP_EPOCHS} epochs")
    reached = float(learning_rate_schedule(learning_rate, epochs_run)[-1])
    return (f"{epochs_run} epochs end inside the {WARM_UP_EPOCHS}-epoch learning-rate warm-up (as in Cellpose): "
            f"the learning rate reached {reached:.3g} of the {learning_rate:g} set, so the model changed less "
            f"than a full run would. Train for at least {WARM_UP_EPOCHS} epochs")


def _device_of(net: Any) -> str:
    """The device a network's weights are on ("" when it has none)."""
    try:
        return str(next(iter(net.parameters())).device)
    except (AttributeError, StopIteration, TypeError):
        return ""


def run_finetune(set_name: str, base_model: str, new_name: str, n_epochs: int | None = None,
                 learning_rate: float | None = None, weight_decay: float | None = None,
                 holdout_fraction: float = 0.2,
                 user: str | None = None, work_dir: Path | None = None,
                 on_epoch: Callable[[int, float, float | None, float], None] | None = None,
                 cancelled: Callable[[], bool] | None = None, on_status: Callable[[str], None] | None = None,
                 limits: Limits | None = None, min_train_masks: int = 1, make_default: bool = True,
                 seed: int = 0, channels: Any = None) -> dict[str, Any]:
    """Fine-tune `base_model` on a training set; register and return {name, path, ap_before, ap_after, ...}.

    n_epochs, learning_rate, weight_decay : None takes the base model's entry of
        ``finetune_defaults`` (as do batch size, crop size and steps per epoch, always).
    make_default : when the new model scores a higher AP@0.5 than its base on the held-out images,
        make it the pre-selected model in every model list (``result['is_default']``).
    channels : file channels (0 = first) to train on for every image, e.g. [1, 2]; None = each image
        on the channels it was segmented with (:func:`load_set`). Training and the held-out AP before
        and after use the same images; the new model's metadata records them.
    """
    limits = limits or Limits.from_env()
    arch = base_model_arch(base_model)
    new_name = check_new_model_name(new_name)
    say = on_status or (lambda s: None)
    chosen = parse_channels(channels)
    imgs, labs, names = load_set(set_name, user, chosen)
    used = _channels_used(chosen, pair_channels(set_name, user), names)
    tr, ho = split_holdout(len(imgs), holdout_fraction)
    # the limits before the base model is loaded (a typo should not cost a model load)
    training_settings(arch, len(tr), n_epochs, learning_rate, weight_decay, max_epochs=limits.max_epochs)
    info = models_cache.resolve(base_model)
    from cellpose_web.models import CellposeModel
    say("loading the base model")
    model = CellposeModel(gpu=models_cache.use_gpu(), pretrained_model=info["path"] or info["name"])
    ca = -1 if any(np.ndim(i) == 3 for i in imgs) else None  # sets are stored (Y, X) or (Y, X, C)
    say("measuring AP of the base model on held-out images")
    ap_before = _ap_on(model, [imgs[i] for i in ho], [labs[i] for i in ho], ca)

    def on_epoch_and_cancel(epoch, train_loss, test_loss, elapsed):
        if on_epoch:
            on_epoch(epoch, train_loss, test_loss, elapsed)
        return not (cancelled and cancelled())

    say("training")
    run = fine_tune(model.net, arch or "cpsam", [imgs[i] for i in tr], [labs[i] for i in tr],
                    test_images=[imgs[i] for i in ho], test_labels=[labs[i] for i in ho], channel_axis=ca,
                    name=new_name, save_dir=Path(work_dir or tempfile.mkdtemp(prefix="finetune_")),
                    n_epochs=n_epochs, learning_rate=learning_rate, weight_decay=weight_decay,
                    min_train_masks=min_train_masks, seed=seed, max_epochs=limits.max_epochs,
                    on_epoch=on_epoch_and_cancel)
    if cancelled and cancelled():
        return {"cancelled": True, "epochs_done": run.epochs_done, "name": None,
                "message": f"Cancelled after {run.epochs_done} epoch(s); no model was saved."}
    say("measuring AP of the new model on held-out images")
    model.net.eval()
    ap_after = _ap_on(model, [imgs[i] for i in ho], [labs[i] for i in ho], ca)
    meta = run.record(info, [names[i] for i in tr], [names[i] for i in ho], training_set=set_name,
                      channels=used, channels_source="chosen" if chosen is not None else "as segmented",
                      ap_before=ap_before, ap_after=ap_after)
    path, train_s = run.path, round(run.seconds, 1)
    from cellpose_web import registry
    notices = list(run.notices)
    free = _free_name(new_name)
    if free != new_name:  # taken while training ran: keep the weights under a free name
        notices.append(f"a lab model named '{new_name}' was added while this one trained: saved as '{free}'")
        new_name = free
    registered = registry.add_lab_model(str(path), new_name, {
        "description": f"fine-tuned from {info['name']} in the app on the training set {set_name}",
        "base_model": info["name"], "test_ap": ap_after, "training": meta})
    models_cache.forget(new_name)
    reg_name = getattr(registered, "name", new_name)
    better = ap_before is not None and ap_after is not None and ap_after > ap_before
    if make_default and better:
        models_cache.set_preferred_model(reg_name, f"held-out AP@0.5 {ap_before:.3f} -> {ap_after:.3f} "
                                                   f"(base {info['name']})")
    return {"name": reg_name, "path": str(getattr(registered, "path", path)), "ap_before": ap_before,
            "ap_after": ap_after, "is_default": bool(make_default and better), "train_seconds": train_s,
            "train_losses": run.train_losses, "test_losses": run.test_losses, "metadata": meta,
            "notices": notices}


def start_finetune_job(set_name: str, base: str, new_name: str, epochs: Any, lr: Any, wd: Any, user: str | None,
                       limits: Limits | None = None, channels: Any = None) -> jobs.Job:
    """Check a fine-tune request and start :func:`run_finetune` as a background job of ``user`` (the
    Fine-tune tab's Start); the job's ``losses`` ([epoch, train, held-out]) grow while it trains.

    epochs, lr, wd : as typed (blank = the base model's recipe); checked here, before a job exists.
    channels : file channels to train on ("1,2" or [1, 2]); blank/None = each image on the channels it
        was segmented with.
    """
    if not set_name:
        raise BadInputError("Choose a training set (add corrected images in the Correct tab, or upload pairs).")
    if not base:
        raise BadInputError("Choose a base model to start from.")
    new_name = check_new_model_name(new_name)
    limits = limits or Limits.from_env()
    models_cache.check_offered(base)
    chans = parse_channels(channels)
    n_pairs = check_set(set_name, user, chans)  # fails early if empty or a channel is missing
    settings = training_settings(base_model_arch(base), n_pairs, epochs, lr, wd, max_epochs=limits.max_epochs)
    n_epochs = settings["n_epochs"]
    jm = jobs.manager(user)
    job = jm.create("train", {"set": set_name, "base": base, "name": new_name, "epochs": n_epochs,
                              "lr": settings["learning_rate"], "wd": settings["weight_decay"], "channels": chans},
                    owner=user)
    job.update(losses=[])

    def work(j: jobs.Job):
        losses: list = []

        def on_epoch(e, tr, te, el):
            losses.append([e, tr, te])
            j.update(losses=list(losses), progress=(e + 1) / n_epochs,
                     message=f"epoch {e + 1}/{n_epochs}: loss {tr:.4f}" + (f", held-out {te:.4f}" if te else ""))

        return run_finetune(set_name, base, new_name, n_epochs, settings["learning_rate"], settings["weight_decay"],
                            user=user, work_dir=j.dir / "work", on_epoch=on_epoch, cancelled=lambda: j.cancelled,
                            on_status=lambda m: j.update(message=m), limits=limits, channels=chans)

    jm.start(job, work, slots=limits.concurrency["train"])
    return job
