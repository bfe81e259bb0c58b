"""Human-in-the-loop: the recipe of one learning round (epochs, learning rate, schedule) per architecture, and
what a shown image and a save report.

Round defaults (:func:`round_defaults`; a session's ``recipe`` overrides any field). A round
fine-tunes from the current model on every corrected training image; ``new_share`` of the crops
come from the images corrected since the parent model (the rest replay the earlier ones, uniformly).
Rounds are cut at ``time_limit_s`` (the model so far is kept and scored), and after the first
round the number of epochs is fitted to the time limit from the measured seconds per crop. The
learning rate follows :func:`round_lr_schedule` (warm-up over ~15 % of the epochs, then a cosine
decay to 5 %), so a round ends on small steps instead of train_seg's constant rate.

==========  ========  ======  ======  ===========  ======  =========  ==========  ===========  ====================
family      device    lr      wd      epochs       crops   batch      crop (px)   new_share    time limit (s)
==========  ========  ======  ======  ===========  ======  =========  ==========  ===========  ====================
lite        CPU       2e-3    1e-4    20           8       1          128         0.5          60
lite        GPU       2e-3    1e-4    50           32      4          256         0.5          60
cellpose3   CPU       2e-3    1e-5    12           8       4          224         0.5          240
cellpose3   GPU       5e-3    1e-5    50           32      8          224         0.5          120
cpsam       CPU       1e-5    0.1     10           2       1          256         0.5          900
cpsam       GPU       1e-5    0.1     50           16      1          256         0.5          300
==========  ========  ======  ======  ===========  ======  =========  ==========  ===========  ====================

(crops = crops per epoch; Cellpose 1-3 U-Nets train with ``rescale=True``, objects scaled to the
net's diameter, as Cellpose 3.) Where the numbers come from: ``lite`` CPU is the Fine-tune tab's
recipe (``train.FINETUNE_DEFAULTS['lite']``: 20 epochs of 8 crops, 160 steps); in
``benchmarks/bench_hitl.py`` such a round took 17-39 s on 2 CPU cores shared with other jobs (load
average 4-5), so 60 s leaves room. On synthetic whole cells, with one seed, the rounds' schedule
(above) ended at held-out AP@0.5 0.941 / AP@0.75 0.767 after 8 corrected images where train_seg's
constant rate ended at 0.889 / 0.666. ``cellpose3`` keeps Cellpose 3's AdamW recipe (lr 5e-3,
weight decay 1e-5, 224 px) on a GPU with half its GUI's 100 epochs; on a CPU a 224 px crop costs
about 1-2 s on 2 cores, so a round is 12 epochs of 8 crops, with a lower peak rate (2e-3) as a
precaution for so few steps (not measured). ``cpsam`` keeps Cellpose 4's recipe (lr 1e-5, weight
decay 0.1, batch 1, 256 px); on a CPU a ViT-L step takes tens of seconds, so a CPU round is small
and slow: use a GPU. The GPU rows were not measured (no GPU on this project's machine); they are
sized so that a round takes one to a few minutes on one modern GPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any
import numpy as np
from cellpose_web.errors import CellposeWebError


# ----------------------------------------------------------------------------------------------
# round defaults
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRecipe:
    """One fine-tune round (see the table in the module docstring).

    learning_rate, weight_decay : AdamW (train_seg's warm-up over the first 10 epochs included).
    n_epochs : epochs of a round (fewer when the time limit would cut them; see ``min_epochs``).
    crops_per_epoch, batch_size, bsize : crops per epoch (train_seg's nimg_per_epoch), crops per
        optimiser step, crop side in px.
    new_share : fraction of the crops drawn from the images corrected since the parent model.
    time_limit_s : the round stops after this many seconds of training (its model is still scored).
    min_epochs : fitting the epochs to the time limit never goes below this.
    rescale : scale objects to the net's diameter (Cellpose 1-3 U-Nets, as Cellpose 3).
    schedule : "round" (:func:`round_lr_schedule`: a short warm-up, then a cosine decay to 5 %, so a
        round ends on small steps) or "cellpose" (train_seg's: 10 warm-up epochs, then constant).
    """
    learning_rate: float
    weight_decay: float
    n_epochs: int
    crops_per_epoch: int
    batch_size: int
    bsize: int
    new_share: float = 0.5
    time_limit_s: float = 60.0
    min_epochs: int = 12
    rescale: bool = False
    schedule: str = "round"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "RoundRecipe":
        """A copy with ``overrides`` (unknown keys raise CellposeWebError naming them)."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise CellposeWebError(f"unknown round setting(s) {', '.join(bad)}; known: {', '.join(sorted(names))}")
        kw = {k: v for k, v in overrides.items() if v is not None}
        out = dataclasses.replace(self, **kw)
        out.check()
        return out

    def check(self) -> None:
        if not (0 < self.learning_rate < 1) or not math.isfinite(self.learning_rate):
            raise CellposeWebError(f"round learning_rate must be between 0 and 1, got {self.learning_rate}")
        if not (0 <= self.weight_decay <= 10):
            raise CellposeWebError(f"round weight_decay must be between 0 and 10, got {self.weight_decay}")
        for k in ("n_epochs", "crops_per_epoch", "batch_size", "min_epochs"):
            if int(getattr(self, k)) < 1:
                raise CellposeWebError(f"round {k} must be at least 1, got {getattr(self, k)}")
        if int(self.bsize) < 32 or int(self.bsize) % 16:
            raise CellposeWebError(f"round bsize must be a multiple of 16 and at least 32, got {self.bsize}")
        if not (0 <= self.new_share <= 1):
            raise CellposeWebError(f"round new_share must be between 0 and 1, got {self.new_share}")
        if self.schedule not in ("round", "cellpose"):
            raise CellposeWebError(f"round schedule must be 'round' or 'cellpose', got {self.schedule!r}")
        if not (self.time_limit_s > 0):
            raise CellposeWebError(f"round time_limit_s must be positive, got {self.time_limit_s}")


#: (family, "cpu" | "gpu") -> the round recipe; the table of the module docstring.
ROUND_DEFAULTS: dict[tuple[str, str], RoundRecipe] = {
    ("lite", "cpu"): RoundRecipe(2e-3, 1e-4, n_epochs=20, crops_per_epoch=8, batch_size=1, bsize=128,
                                 time_limit_s=60, min_epochs=12),
    ("lite", "gpu"): RoundRecipe(2e-3, 1e-4, n_epochs=50, crops_per_epoch=32, batch_size=4, bsize=256,
                                 time_limit_s=60, min_epochs=15),
    ("cellpose3", "cpu"): RoundRecipe(2e-3, 1e-5, n_epochs=12, crops_per_epoch=8, batch_size=4, bsize=224,
                                      time_limit_s=240, min_epochs=11, rescale=True),
    ("cellpose3", "gpu"): RoundRecipe(5e-3, 1e-5, n_epochs=50, crops_per_epoch=32, batch_size=8, bsize=224,
                                      time_limit_s=120, min_epochs=15, rescale=True),
    ("cpsam", "cpu"): RoundRecipe(1e-5, 0.1, n_epochs=10, crops_per_epoch=2, batch_size=1, bsize=256,
                                  time_limit_s=900, min_epochs=10),
    ("cpsam", "gpu"): RoundRecipe(1e-5, 0.1, n_epochs=50, crops_per_epoch=16, batch_size=1, bsize=256,
                                  time_limit_s=300, min_epochs=15),
}


def round_lr_schedule(learning_rate: float, n_epochs: int) -> np.ndarray:
    """Per-epoch learning rates of a round: linear warm-up from 10 % over the first ~15 % of the
    epochs, then a cosine decay to 5 % at the last epoch."""
    n = max(int(n_epochs), 1)
    w = max(1, int(round(0.15 * n)))
    warm = np.linspace(0.1, 1.0, w, endpoint=False) if w > 1 else np.array([0.5])
    rest = n - len(warm)
    t = np.linspace(0.0, 1.0, rest) if rest > 1 else np.zeros(rest)
    decay = 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * t))
    return float(learning_rate) * np.concatenate([warm, decay])[:n]


def round_defaults(arch: str | None, gpu: bool = False) -> RoundRecipe:
    """The round recipe for a network family ("lite", "cellpose3", "cpsam"; unknown -> "cpsam") on
    a GPU or a CPU host."""
    fam = str(arch or "").lower()
    fam = fam if fam in ("lite", "cellpose3", "cpsam") else "cpsam"
    return ROUND_DEFAULTS[(fam, "gpu" if gpu else "cpu")]


# ----------------------------------------------------------------------------------------------
# results handed to callers
# ----------------------------------------------------------------------------------------------
@dataclass
class ShownImage:
    """An image as the person sees it: segmented by the project's current model.

    image : (Y, X, C), every channel of the file; masks (Y, X) labels; flows as
    ``CellposeModel.eval`` ([RGB, dP, cellprob]; None when the proposal was reused from disk);
    model : {round, name, path, sha256, n_cells}: which model segmented it.
    """
    index: int
    name: str
    path: str
    image: np.ndarray
    masks: np.ndarray
    flows: list | None
    model: dict[str, Any]
    proposal_path: str
    corrected: bool = False
    reused: bool = False
    seconds: float = 0.0

    @property
    def n_masks(self) -> int:
        return int(np.count_nonzero(np.unique(self.masks)))


@dataclass
class SaveResult:
    """What :meth:`HitlSession.save_correction` did: the pair saved, held out or trained on, and the
    round it started (``handle``; None when held out or ``learn=False``; when a round was already
    running the correction is ``queued`` for the round after it)."""
    index: int
    name: str
    n_cells: int
    heldout: bool
    n_corrected: int
    handle: "Any" = None
    queued: bool = False
