"""Training sets on the server and the fine-tune job.

Layout: ``<data>/training_sets/<set>/NAME.tif``, ``NAME_masks.tif``, ``set.json``.
Fine-tuning always starts from a base model (as Cellpose advises), reports AP before and after
on held-out images, and registers the new model in the registry with its recipe.
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellpose_web.errors import CellposeWebError
from cellpose_web.service import inputs, models_cache
from cellpose_web.service.config import Limits
from cellpose_web.io import atomic_save
from cellpose_web.service.storage import (atomic_write_json, read_json, safe_join, safe_name,
                                          sub_dir)

log = logging.getLogger(__name__)


def sets_root(user: str | None = None) -> Path:
    return sub_dir("training_sets", user)


def list_sets(user: str | None = None) -> list[dict[str, Any]]:
    """[{name, n_images, n_cells, updated}] for every training set."""
    out = []
    for d in sorted(sets_root(user).iterdir()):
        if d.is_dir():
            meta = read_json(d / "set.json", {}) or {}
            pairs = meta.get("pairs", [])
            out.append({"name": d.name, "n_images": len(pairs),
                        "n_cells": int(sum(p.get("n_cells", 0) for p in pairs)), "updated": meta.get("updated")})
    return out


def add_pair(set_name: str, image: np.ndarray, masks: np.ndarray, name: str, user: str | None = None,
             meta: dict[str, Any] | None = None) -> Path:
    """Store one image + corrected masks in a training set (replacing a pair of the same name)."""
    import tifffile
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise CellposeWebError("Only 2D masks can be added to a training set; pick a z-plane.")
    if masks.max(initial=0) == 0:
        raise CellposeWebError("These masks are empty; segment or draw cells before adding them to a training set.")
    d = safe_join(sets_root(user), safe_name(set_name, "training set name"))
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
    atomic_save(d / f"{stem}.tif", lambda p: tifffile.imwrite(p, img, compression="zlib"))
    m = masks.astype(np.uint16 if masks.max() < 65535 else np.uint32)
    atomic_save(d / f"{stem}_masks.tif", lambda p: tifffile.imwrite(p, m, compression="zlib"))
    setj = read_json(d / "set.json", {}) or {}
    pairs = [p for p in setj.get("pairs", []) if p.get("name") != stem]
    pairs.append({"name": stem, "n_cells": int(len(np.unique(m[m > 0]))), "shape": list(img.shape),
                  "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(meta or {})})
    setj.update({"name": d.name, "pairs": pairs,
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
        return np.asarray(m)
    return np.asarray(inputs.read_image(p, limits).data)


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
                if not np.issubdtype(m.dtype, np.integer):
                    m = m.astype(np.int64)
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


def load_set(set_name: str, user: str | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    import tifffile
    d = safe_join(sets_root(user), safe_name(set_name, "training set name"))
    if not d.is_dir():
        raise CellposeWebError(f"Training set {set_name!r} does not exist; add corrected images in the "
                               "Correct tab or upload pairs here.")
    imgs, labs, names = [], [], []
    for mp in sorted(d.glob("*_masks.tif")):
        stem = mp.name[: -len("_masks.tif")]
        ip = d / f"{stem}.tif"
        if ip.is_file():
            imgs.append(tifffile.imread(ip))
            labs.append(tifffile.imread(mp))
            names.append(stem)
    if not imgs:
        raise CellposeWebError(f"Training set {set_name!r} is empty.")
    return imgs, labs, names


def delete_set(set_name: str, user: str | None = None) -> None:
    d = safe_join(sets_root(user), safe_name(set_name, "training set name"))
    if d.is_dir():
        shutil.rmtree(d)


def _ap_on(model: Any, images: list[np.ndarray], labels: list[np.ndarray], channel_axis: int | None
           ) -> float | None:
    """Mean AP@0.5 of `model` on held-out pairs (None if no metric module)."""
    if not images:
        return None
    from cellpose_web.metrics import average_precision
    preds = []
    for img in images:
        kw = {"channel_axis": channel_axis} if (channel_axis is not None and np.ndim(img) == 3) else {}
        m, _, _ = model.eval(img, **kw)
        preds.append(np.asarray(m))
    ap, _, _, _ = average_precision([np.asarray(x) for x in labels], preds, threshold=[0.5, 0.75, 0.9])
    ap = np.asarray(ap)
    return float(np.mean(ap[:, 0])) if ap.ndim == 2 else float(np.mean(ap))


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
    from cellpose_web.train import finetune_defaults as recipe_for
    arch = base_model_arch(base_model)
    return {**recipe_for(arch).as_dict(), "arch": arch}


def run_finetune(set_name: str, base_model: str, new_name: str, n_epochs: int | None = None,
                 learning_rate: float | None = None, weight_decay: float | None = None,
                 holdout_fraction: float = 0.2,
                 user: str | None = None, work_dir: Path | None = None,
                 on_epoch: Callable[[int, float, float | None, float], None] | None = None,
                 cancelled: Callable[[], bool] | None = None, on_status: Callable[[str], None] | None = None,
                 limits: Limits | None = None, min_train_masks: int = 1, make_default: bool = True,
                 seed: int = 0) -> dict[str, Any]:
    """Fine-tune `base_model` on a training set; register and return {name, path, ap_before, ap_after, ...}.

    n_epochs, learning_rate, weight_decay : None takes the base model's entry of
        ``finetune_defaults`` (as do batch size, crop size and steps per epoch, always).
    make_default : when the new model scores a higher AP@0.5 than its base on the held-out images,
        make it the pre-selected model in every model list (``result['is_default']``).
    """
    limits = limits or Limits.from_env()
    from cellpose_web.train import finetune_defaults as recipe_for
    recipe = recipe_for(base_model_arch(base_model))
    n_epochs = recipe.n_epochs if n_epochs in (None, "") else n_epochs
    learning_rate = recipe.learning_rate if learning_rate in (None, "") else learning_rate
    weight_decay = recipe.weight_decay if weight_decay in (None, "") else weight_decay
    try:
        n_epochs = int(n_epochs)
        learning_rate = float(learning_rate)
        weight_decay = float(weight_decay)
    except (TypeError, ValueError):
        raise CellposeWebError("Epochs, learning rate and weight decay must be numbers.") from None
    if not 1 <= n_epochs <= limits.max_epochs:
        raise CellposeWebError(f"Epochs must be between 1 and {limits.max_epochs}; got {n_epochs}.")
    if not (0 < learning_rate <= 1e-1) or not np.isfinite(learning_rate):
        raise CellposeWebError("Learning rate must be a small positive number, e.g. 1e-5 (Cellpose-SAM) "
                               "or 1e-3 (lite).")
    if not (0 <= weight_decay <= 10) or not np.isfinite(weight_decay):
        raise CellposeWebError("Weight decay must be between 0 and 10 (Cellpose uses 0.1).")
    new_name = safe_name(new_name, "model name")
    say = on_status or (lambda s: None)
    imgs, labs, names = load_set(set_name, user)
    tr, ho = split_holdout(len(imgs), holdout_fraction)
    info = models_cache.resolve(base_model)
    from cellpose_web.models import CellposeModel
    from cellpose_web.train import train_seg
    say("loading the base model")
    model = CellposeModel(gpu=models_cache.use_gpu(), pretrained_model=info["path"] or info["name"])
    ca = -1 if any(np.ndim(i) == 3 for i in imgs) else None  # sets are stored (Y, X) or (Y, X, C)
    say("measuring AP of the base model on held-out images")
    ap_before = _ap_on(model, [imgs[i] for i in ho], [labs[i] for i in ho], ca)

    def cb(epoch, train_loss, test_loss, elapsed):
        if on_epoch:
            on_epoch(int(epoch), float(train_loss), None if test_loss is None else float(test_loss), float(elapsed))
        return not (cancelled and cancelled())

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="finetune_"))
    say("training")
    t0 = time.perf_counter()
    path, tl, vl = train_seg(model.net, [imgs[i] for i in tr], [labs[i] for i in tr],
                             test_data=[imgs[i] for i in ho] or None, test_labels=[labs[i] for i in ho] or None,
                             channel_axis=ca, learning_rate=learning_rate, weight_decay=weight_decay,
                             n_epochs=n_epochs, batch_size=recipe.batch_size, bsize=recipe.bsize,
                             nimg_per_epoch=recipe.nimg_per_epoch(len(tr)), save_path=str(work_dir),
                             model_name=new_name, min_train_masks=min_train_masks, callback=cb, seed=seed)
    train_s = time.perf_counter() - t0
    if cancelled and cancelled():
        return {"cancelled": True, "epochs_done": int(np.count_nonzero(np.asarray(tl))), "name": None}
    say("measuring AP of the new model on held-out images")
    model.net.eval()
    ap_after = _ap_on(model, [imgs[i] for i in ho], [labs[i] for i in ho], ca)
    meta = {"base_model": info["name"], "base_sha256": info["sha256"], "training_set": set_name,
            "train_images": [names[i] for i in tr], "test_images": [names[i] for i in ho],
            "n_epochs": n_epochs, "learning_rate": learning_rate, "weight_decay": weight_decay,
            "batch_size": recipe.batch_size, "bsize": recipe.bsize,
            "train_seconds": round(train_s, 1), "ap_before": ap_before, "ap_after": ap_after,
            "test_ap": ap_after, "final_train_loss": float(np.asarray(tl)[-1]) if len(tl) else None}
    from cellpose_web import registry
    registered = registry.add_lab_model(str(path), new_name, meta)
    models_cache.forget(new_name)
    reg_name = getattr(registered, "name", new_name)
    better = ap_before is not None and ap_after is not None and ap_after > ap_before
    if make_default and better:
        models_cache.set_preferred_model(reg_name, f"held-out AP@0.5 {ap_before:.3f} -> {ap_after:.3f} "
                                                   f"(base {info['name']})")
    return {"name": reg_name, "path": str(getattr(registered, "path", path)), "ap_before": ap_before,
            "ap_after": ap_after, "is_default": bool(make_default and better), "train_seconds": round(train_s, 1),
            "train_losses": [float(x) for x in tl],
            "test_losses": [None if x is None or not np.isfinite(x) else float(x) for x in np.asarray(vl, float)],
            "metadata": meta}
