"""Use cases on one image's result, the same for the app, scripts and tests: load a masks file,
re-measure (re-detect puncta), save a correction, add a correction to a training set.

No Gradio here: the Segment and Correct tabs call these and only show what comes back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellpose_web.engine import edit  # noqa: F401 - MaskEditor for the Correct tab
from cellpose_web.engine.edit import relabel
from cellpose_web.errors import BadInputError
from cellpose_web.io import load_seg
from cellpose_web.measure import DEFAULT_MAX_DISTANCE_UM, FALLBACK_MAX_DISTANCE_PX, PunctaParams, measure_cells, size_histogram, summarize  # noqa: F401
from cellpose_web.service.config import Limits
from cellpose_web.workflows import finetune, inputs, pipeline

from cellpose_web.io.labels import instance_labels

__all__ = ["read_masks_file", "masks_file_provenance", "measure_result", "redetect_puncta", "save_correction",
           "add_correction_to_training_set", "edit", "PunctaParams", "DEFAULT_MAX_DISTANCE_UM", "FALLBACK_MAX_DISTANCE_PX", "summarize",
           "size_histogram"]


def read_masks_file(path: str | Path, image_shape: tuple[int, ...], limits: Limits | None = None,
                    image_name: str | None = None) -> tuple[np.ndarray, str | None]:
    """Masks from a Cellpose ``_seg.npy`` or a label image, checked against the image they belong to.

    Parameters
    ----------
    path : the masks file.
    image_shape : the image's shape without its channel axis: (Y, X) or (Z, Y, X).
    image_name : the image's file name; a ``_seg.npy`` records the image it was made from, and a
        different one gives a warning (same size, other image: the cells would not sit on this one).

    Returns
    -------
    ((Y, X) or (Z, Y, X) uint16 labels (uint32 past 65535), a warning for the person or None)
    """
    p = Path(path)
    warning = None
    if p.name.endswith(".npy"):
        inputs.check_file_size(p, limits or Limits.from_env())
        seg = load_seg(str(p))
        m = np.asarray(seg["masks"])
        made_from = Path(str(seg.get("filename") or "").replace("\\", "/")).name
        if image_name and made_from and _without_image_ext(made_from) != _without_image_ext(Path(image_name).name):
            warning = (f"{p.name} was made from '{made_from}', not from '{Path(image_name).name}': check that these "
                       "masks belong to this image before correcting or training on them.")
    else:
        m = inputs.read_image(p).data
    m = instance_labels(m, p.name)
    if m.shape != tuple(image_shape):
        raise BadInputError(f"{p.name} has shape {m.shape} but the image is {tuple(image_shape)}; load the masks "
                            "made from this image.")
    return m, warning


def _without_image_ext(name: str) -> str:
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in inputs.IMAGE_EXTS else name


def masks_file_provenance(file_name: str, image_name: str, image_shape: tuple[int, ...],
                          pixel_size_um: float | None) -> dict[str, Any]:
    """How masks loaded from a file were made (no model, no eval parameters)."""
    return pipeline.provenance_record(None, None, image_name, masks_from_file=file_name,
                                      image_shape=list(image_shape), pixel_size_um=pixel_size_um)


def measure_result(masks: np.ndarray, image: np.ndarray, pixel_size_um: float | None,
                   puncta: PunctaParams | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The per-cell table (and puncta) of masks on a channels-last image."""
    return measure_cells(masks, image, pixel_size_um, channel_axis=-1, puncta=puncta)


def redetect_puncta(masks: np.ndarray, image: np.ndarray, pixel_size_um: float | None, provenance: dict[str, Any],
                    puncta: PunctaParams) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """Count puncta again with new settings on the same masks: (table, puncta, provenance)."""
    if masks.ndim != 2:
        raise BadInputError("Puncta detection works on 2D images; pick a 2D image or one plane.")
    table, spots = measure_result(masks, image, pixel_size_um, puncta)
    return table, spots, {**(provenance or {}), "puncta": vars(puncta).copy()}


def save_correction(edited: np.ndarray, image: np.ndarray, pixel_size_um: float | None,
                    provenance: dict[str, Any] | None, n_edits: int, image_name: str
                    ) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """Masks corrected by hand (labels renumbered 1..N), re-measured with the result's puncta settings:
    (masks, table, puncta, provenance)."""
    masks = relabel(edited)
    pp = (provenance or {}).get("puncta")
    puncta = PunctaParams(**pp) if pp and masks.ndim == 2 else None
    table, pts = measure_result(masks, image, pixel_size_um, puncta)
    prov = dict(provenance) if provenance else {"model": {"name": None, "sha256": None}, "eval_params": {}}
    prov["edited"] = {"manual_edits": int(n_edits), "note": "masks corrected by hand in the Correct tab"}
    prov.setdefault("image", image_name)
    return masks, table, pts, prov


def add_correction_to_training_set(image: np.ndarray, edited: np.ndarray, stem: str, is_stack: bool,
                                   provenance: dict[str, Any] | None, n_edits: int, set_name: str,
                                   user: str | None = None) -> str:
    """Store the image (every channel) + corrected masks in a training set (a z-stack: every plane
    with cells), with the channels it was segmented with; returns a line saying what was added."""
    provenance = provenance or {}
    masks = relabel(edited)
    meta = {"edits": n_edits, "model": (provenance.get("model") or {}).get("name")}
    chans = finetune.segmentation_channels(provenance)  # train on what the model saw
    had = finetune.pair_names(set_name or "lab", user)
    if is_stack:
        planes = [z for z in range(masks.shape[0]) if masks[z].any()]
        if not planes:
            raise BadInputError("These masks are empty; draw cells before adding them to a training set.")
        for z in planes:
            d = finetune.add_pair(set_name or "lab", image[z], relabel(masks[z]), f"{stem}_z{z:03d}", user,
                                  {**meta, "plane": z}, channels=chans)
        what = f"{len(planes)} planes of **{stem}**"
        replaced = sum(f"{stem}_z{z:03d}" in had for z in planes)
    else:
        d = finetune.add_pair(set_name or "lab", image, masks, stem, user, meta, channels=chans)
        what = f"**{stem}** ({int(masks.max())} cells)"
        replaced = int(stem in had)
    if replaced:  # the same image corrected again, or another file of the same name: say which pair went
        what += (f", replacing the earlier {'pair' if replaced == 1 else f'{replaced} planes'} named {stem} in "
                 "this set (rename the file to keep both)")
    info = {x["name"]: x for x in finetune.list_sets(user)}.get(d.name, {})
    on = ("every channel" if chans is None else
          f"channel{'s' if len(chans) > 1 else ''} {', '.join(map(str, chans))}")
    return (f"Added {what} to training set **{d.name}** — now {info.get('n_images', '?')} image(s), "
            f"{info.get('n_cells', '?')} cells; fine-tuning uses {on} (as segmented, 0 = first). "
            "Use it in the Fine-tune tab.")
