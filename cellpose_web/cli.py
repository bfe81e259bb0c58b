"""Command line: ``python -m cellpose_web`` with Cellpose 4's flags, plus ``serve``, ``models`` and ``batch``.

Segment a folder (writes ``_seg.npy`` and, as asked, ``_cp_masks.png/.tif``, outlines, flows, ROIs)::

    python -m cellpose_web --dir images/ --pretrained_model lite --save_png --save_txt --save_rois

Fine-tune (saves to ``images/models/<name>`` as Cellpose does, and registers a lab model)::

    python -m cellpose_web --train --dir train/ --test_dir val/ --pretrained_model lite --n_epochs 50 \\
        --model_name_out nuclei_lab

Models::

    python -m cellpose_web models list
    python -m cellpose_web models add weights.pth --name nuclei_lab
    python -m cellpose_web models fetch mylab/models nuclei_v2 --name nuclei_v2
    python -m cellpose_web models push nuclei_lab mylab/models

The web app: ``python -m cellpose_web serve [--port 7860 ...]``.

Exit status: 0 on success, 2 for bad input (one ``error: ...`` line on stderr), 1 for an
unexpected failure (one line; ``--verbose`` prints the traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cellpose_web.errors import CellposeWebError, ModelNotAvailableError

logger = logging.getLogger("cellpose_web.cli")

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPT = 0, 1, 2, 130
SUBCOMMANDS = ("serve", "models", "batch")


class _UsageError(Exception):
    """A bad command line (argparse's error, as one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------------------------
# output helpers
# ----------------------------------------------------------------------------------------------
class ProgressLine:
    """A tiny stderr progress bar: ``[#####-----] 3/10 name`` (redrawn in place on a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total = max(int(total), 1)
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""

    def show(self, done: int, label: str = "") -> None:
        if not self.tty:
            return
        frac = min(max(done / self.total, 0.0), 1.0)
        n = int(round(frac * self.width))
        line = f"[{'#' * n}{'-' * (self.width - n)}] {done}/{self.total} {label}"[:120]
        pad = max(0, len(self._last) - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._last = line

    def clear(self) -> None:
        if self.tty and self._last:
            self.stream.write("\r" + " " * len(self._last) + "\r")
            self.stream.flush()
            self._last = ""


def _download_progress(name: str):
    stream = sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    state = {"t": 0.0, "said": False}

    def cb(done: int, total: int | None) -> None:
        now = time.time()
        if not state["said"]:
            stream.write(f"downloading model '{name}'" + (f" ({total / 1e6:.0f} MB)" if total else "") + "\n")
            state["said"] = True
        if tty and (now - state["t"] > 0.2 or (total and done >= total)):
            state["t"] = now
            pct = f"{100 * done / total:5.1f}%" if total else ""
            stream.write(f"\r  {pct} {done / 1e6:.0f} MB")
            if total and done >= total:
                stream.write("\n")
            stream.flush()

    return cb


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def _float_or_none(v: str) -> float | None:
    if v is None or str(v).strip().lower() in ("none", ""):
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None


def _int_or_none(v: str) -> int | None:
    if v is None or str(v).strip().lower() in ("none", ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None


def command_name() -> str:
    """How this command line was started: ``cellpose-web`` (the installed command) or ``python -m cellpose_web``."""
    return "cellpose-web" if Path(sys.argv[0]).name.startswith("cellpose-web") else "python -m cellpose_web"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The Cellpose-4-compatible parser (segmentation and training flags)."""
    p = _Parser(prog=prog or command_name(),
                description="Cellpose 4 (Cellpose-SAM) segmentation, Cellpose-compatible command line. "
                "Subcommands: serve (web app), models (list/add/rename/delete/fetch/push), batch.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--verbose", action="store_true", help="log progress and print tracebacks")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--use_gpu", action="store_true", help="use a GPU (CUDA, else Apple MPS) if there is one")
    hw.add_argument("--gpu_device", default=None, help="CUDA device index with --use_gpu, e.g. 0")
    hw.add_argument("--device", default=None, help="explicit torch device: cpu, cuda, cuda:1, mps")

    inp = p.add_argument_group("input")
    inp.add_argument("--dir", default=None, help="folder of images to segment (or to train on with --train)")
    inp.add_argument("--image_path", default=None, nargs="+", help="one or more image files")
    inp.add_argument("--look_one_level_down", action="store_true", help="also use images in sub-folders")
    inp.add_argument("--img_filter", default=None, help="only images whose name ends with this (before the extension)")
    inp.add_argument("--channel_axis", type=_int_or_none, default=None, help="axis of the channels")
    inp.add_argument("--z_axis", type=_int_or_none, default=None, help="axis of the planes of a stack")
    inp.add_argument("--chan", type=int, default=None,
                     help="Cellpose 1-3 models (cp_cyto, cyto3, ...): channel to segment, 1-based (1 = red/first, "
                          "2 = green, 3 = blue; 0 = grey); Cellpose-SAM and lite ignore it")
    inp.add_argument("--chan2", type=int, default=None,
                     help="Cellpose 1-3 models: optional nucleus channel, 1-based (0 = none)")
    inp.add_argument("--segment_channels", type=int, nargs="+", default=None, metavar="C",
                     help="file channels fed to the model, numbered as in the file (0 = first), e.g. 1 2 for "
                          "membrane + DAPI; default: all (the model uses the first 3). For Cellpose 3 models: "
                          "cytoplasm then nucleus")
    inp.add_argument("--pixel_size_um", type=float, default=None,
                     help="µm per pixel for images whose file does not say (for µm² areas and densities)")
    inp.add_argument("--invert", action="store_true", help="invert intensities (dark cells on bright background)")
    inp.add_argument("--all_channels", action="store_true", help=argparse.SUPPRESS)
    inp.add_argument("--max_pixels", type=int, default=None,
                     help="refuse images with more values than this, checked from the file header before "
                          "reading (default: CELLPOSE_WEB_MAX_PIXELS, else 250 million)")

    mod = p.add_argument_group("model")
    mod.add_argument("--pretrained_model", default=None,
                     help="model name (lite, cpsam_v2, cpsam, a lab model, owner/repo:file) or a file path; "
                          "default: cpsam_v2/cpsam if already downloaded, else lite")
    mod.add_argument("--fallback", default=None, metavar="MODEL",
                     help="segment with MODEL (e.g. lite) when --pretrained_model cannot be had (offline, not "
                          "downloaded), and say so; default: stop with exit status 2")
    mod.add_argument("--add_model", default=None, help="register this model file as a lab model and exit")
    mod.add_argument("--token", default=None, help="Hugging Face token for private Hub models (default: HF_TOKEN)")
    for dep in ("--pretrained_model_ortho", "--restore_type", "--chan2_restore", "--transformer"):
        mod.add_argument(dep, default=None, help=argparse.SUPPRESS)

    alg = p.add_argument_group("algorithm")
    alg.add_argument("--no_norm", action="store_true", help="do not normalise images")
    alg.add_argument("--norm_percentile", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                     help="percentiles for normalisation (default 1 99)")
    alg.add_argument("--do_3D", action="store_true", help="segment stacks in 3D")
    alg.add_argument("--diameter", type=_float_or_none, default=None,
                     help="object diameter in px (default: none = no rescaling, as Cellpose 4)")
    alg.add_argument("--stitch_threshold", type=float, default=0.0, help="> 0: 2D per plane, stitched by IoU")
    alg.add_argument("--min_size", type=int, default=15, help="drop masks smaller than this (px)")
    alg.add_argument("--max_size_fraction", type=float, default=0.4, help="drop masks larger than this image fraction")
    alg.add_argument("--flow3D_smooth", type=float, nargs="+", default=[0.0], help="gaussian sigma on 3D flows")
    alg.add_argument("--flow_threshold", type=float, default=0.4, help="max flow error of a mask (0 = off)")
    alg.add_argument("--cellprob_threshold", type=float, default=0.0, help="cell probability threshold (logit)")
    alg.add_argument("--niter", type=int, default=0, help="dynamics steps (0 = automatic)")
    alg.add_argument("--anisotropy", type=float, default=1.0, help="z step / xy pixel size for 3D")
    alg.add_argument("--exclude_on_edges", action="store_true", help="drop masks touching the image border")
    alg.add_argument("--augment", action="store_true", help="test-time augmentation (flips)")
    alg.add_argument("--batch_size", type=int, default=None,
                     help="tiles per network call (default: 8 on a CPU, from free memory on a GPU; halved when "
                          "GPU memory runs short)")
    alg.add_argument("--bsize", type=int, default=None, help="tile size (default: the model's)")
    alg.add_argument("--no_resample", action="store_true", help="run dynamics at the rescaled size")
    alg.add_argument("--no_interp", action="store_true", help=argparse.SUPPRESS)

    out = p.add_argument_group("output")
    out.add_argument("--save_png", action="store_true", help="save masks as <name>_cp_masks.png")
    out.add_argument("--save_tif", action="store_true", help="save masks as <name>_cp_masks.tif")
    out.add_argument("--output_name", default=None, help="suffix of mask files (default _cp_masks)")
    out.add_argument("--no_npy", action="store_true", help="do not save <name>_seg.npy")
    out.add_argument("--savedir", default=None, help="folder for the outputs (default: beside the images)")
    out.add_argument("--dir_above", action="store_true", help="save in the folder above the images")
    out.add_argument("--in_folders", action="store_true", help="save into masks/, outlines/, flows/ sub-folders")
    out.add_argument("--save_flows", action="store_true", help="save _flows, _dP and _cellprob TIFFs")
    out.add_argument("--save_outlines", action="store_true", help="save an outline overlay PNG")
    out.add_argument("--save_rois", action="store_true", help="save ImageJ ROIs (<name>_rois.zip)")
    out.add_argument("--save_txt", action="store_true", help="save outlines as text (<name>_cp_outlines.txt)")
    out.add_argument("--save_mpl", action="store_true", help="save a summary figure (<name>_cp_output.png)")
    out.add_argument("--save_csv", action="store_true",
                     help="save the per-cell table (<name>_cells.csv: area px/µm², shape, mean and integrated "
                          "intensity of every file channel, puncta with --puncta_channel)")

    pu = p.add_argument_group("puncta (e.g. PIEZO1)")
    pu.add_argument("--puncta_channel", type=int, default=None, metavar="C",
                    help="count spots on this file channel (0 = first), per cell with density per µm²; "
                         "implies the per-cell table (add --save_csv to save it)")
    pu.add_argument("--puncta_sigma", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN", "MAX"),
                    help="spot size range in px (Laplacian of Gaussian sigma)")
    pu.add_argument("--puncta_threshold", type=float, default=0.1,
                    help="spot threshold on the normalised channel (lower finds more, fainter spots)")
    pu.add_argument("--puncta_max_distance_um", type=float, default=None, metavar="UM",
                    help="a spot just outside every mask counts for the nearest cell within UM µm (default "
                         "0.4; 0 = only spots on a mask)")

    tr = p.add_argument_group("training")
    tr.add_argument("--train", action="store_true", help="fine-tune the model on --dir (images + _masks files)")
    tr.add_argument("--test_dir", default=None, help="folder of held-out images with masks")
    tr.add_argument("--file_list", default=None, help=argparse.SUPPRESS)
    tr.add_argument("--mask_filter", default="_masks", help="label file suffix (_masks, or _seg.npy)")
    tr.add_argument("--learning_rate", type=float, default=None,
                    help="default: the base model's recipe (train.FINETUNE_DEFAULTS; lite 1e-3, Cellpose-SAM 1e-5)")
    tr.add_argument("--weight_decay", type=float, default=None, help="default: the base model's recipe")
    tr.add_argument("--n_epochs", type=int, default=None, help="default: the base model's recipe")
    tr.add_argument("--train_batch_size", type=int, default=None, help="default: the base model's recipe")
    tr.add_argument("--nimg_per_epoch", type=int, default=None)
    tr.add_argument("--nimg_test_per_epoch", type=int, default=None)
    tr.add_argument("--min_train_masks", type=int, default=5)
    tr.add_argument("--save_every", type=int, default=100)
    tr.add_argument("--save_each", action="store_true")
    tr.add_argument("--model_name_out", default=None, help="name of the trained model (and of its lab entry)")
    tr.add_argument("--seed", type=int, default=0, help="random seed for training")
    for dep, kw in (("--SGD", dict(type=int, default=None)), ("--diam_mean", dict(type=float, default=None)),
                    ("--train_size", dict(action="store_true")), ("--Zstack", dict(action="store_true"))):
        tr.add_argument(dep, help=argparse.SUPPRESS, **kw)
    return p


def _deprecation_notices(args: argparse.Namespace) -> None:
    if args.all_channels:
        _say("notice: --all_channels is the default in Cellpose 4 (first 3 channels); ignored")
    for dep in ("pretrained_model_ortho", "restore_type", "chan2_restore", "transformer"):
        if getattr(args, dep) is not None:
            _say(f"notice: --{dep} is deprecated in Cellpose 4 and ignored")
    if args.SGD:
        _say("notice: --SGD is not used in Cellpose 4 (AdamW); ignored")
    if args.diam_mean is not None or args.train_size:
        _say("notice: --diam_mean/--train_size are not used in Cellpose 4; ignored")
    if args.no_interp:
        _say("notice: --no_interp is not used; ignored")


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def _collect_images(args) -> list[Path]:
    from cellpose_web import io

    files: list[Path] = []
    if args.image_path:
        for f in args.image_path:
            p = Path(f).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"image not found: {p}")
            if p.is_dir():
                raise CellposeWebError(f"'{p}' is a folder: use --dir for folders")
            files.append(p)
    if args.dir:
        d = Path(args.dir).expanduser()
        if not d.exists():
            raise FileNotFoundError(f"folder not found: {d}")
        if not d.is_dir():
            raise CellposeWebError(f"--dir '{d}' is not a folder (use --image_path for a file)")
        mf = args.mask_filter if args.mask_filter else "_masks"
        files += [Path(f) for f in io.get_image_files(d, mf, imf=args.img_filter,
                                                      look_one_level_down=args.look_one_level_down)]
    if not files:
        raise CellposeWebError("no images: give --dir FOLDER or --image_path FILE")
    return files


def _model_spec(args) -> str:
    from cellpose_web import registry

    spec = args.pretrained_model
    if spec is None or str(spec).strip() in ("", "None", "False", "0"):
        if getattr(args, "puncta_channel", None) is not None and not getattr(args, "train", False):
            spec = registry.whole_cell_model()
            _say(f"model: {spec} (whole cells, for puncta per cell; choose with --pretrained_model)")
        else:
            spec = registry.best_available_model()
            _say(f"model: {spec} (default; choose with --pretrained_model)")
    return spec


def _device_arg(args) -> str | None:
    if args.device:
        return args.device
    if args.use_gpu and args.gpu_device not in (None, ""):
        g = str(args.gpu_device)
        return f"cuda:{g}" if g.isdigit() else g
    return None


def _resolve_model(args, spec: str, for_training: bool = False):
    """The registry entry for ``spec``; with ``--fallback MODEL``, that model when ``spec`` cannot be had.

    Without ``--fallback`` a model that cannot be fetched (offline, no cache) stops the run with the
    same message ``CellposeModel(pretrained_model=spec)`` raises (exit status 2): the outputs never
    silently come from another model. Training never falls back (its base model must be the one asked).
    """
    from cellpose_web import registry

    try:
        return registry.resolve_model(spec, progress=_download_progress(spec), token=args.token)
    except ModelNotAvailableError as e:
        fallback = getattr(args, "fallback", None)
        if for_training or not fallback or fallback == str(spec):
            raise
        _say(f"notice: {' '.join(str(e).split())}")
        _say(f"notice: --fallback: using '{fallback}' instead of '{spec}' (the outputs record '{fallback}')")
        return registry.resolve_model(fallback, progress=_download_progress(fallback), token=args.token)


def _load_model(args, spec: str, for_training: bool = False):
    """(model, registry entry) for ``spec``. Segmentation uses the process's one model cache
    (``pipeline.get_model``); training gets a fresh float32 instance, since it changes the weights."""
    from cellpose_web import pipeline
    from cellpose_web.models import CellposeModel

    info = _resolve_model(args, spec, for_training)
    if not for_training:
        return pipeline.get_model(info, device=_device_arg(args), gpu=args.use_gpu).model, info
    model = CellposeModel(gpu=args.use_gpu, pretrained_model=info.path, device=_device_arg(args), use_bfloat16=False)
    model.model_info = info  # keep the registry name (CellposeModel saw a path)
    return model, info


def eval_kwargs_from_args(args) -> dict[str, Any]:
    """``CellposeModel.eval`` keywords from the segmentation flags."""
    if args.no_norm:
        normalize: Any = False
    elif args.norm_percentile is not None:
        lo, hi = args.norm_percentile
        if not (0 <= lo < hi <= 100):
            raise CellposeWebError(f"--norm_percentile needs 0 <= LOW < HIGH <= 100, got {lo} {hi}")
        normalize = {"percentile": [float(lo), float(hi)]}
    else:
        normalize = True
    diameter = args.diameter if args.diameter not in (None, 0) else None
    smooth = args.flow3D_smooth
    smooth = smooth[0] if isinstance(smooth, list) and len(smooth) == 1 else smooth
    kw = dict(diameter=diameter, flow_threshold=args.flow_threshold, cellprob_threshold=args.cellprob_threshold,
              niter=args.niter or None, min_size=args.min_size, max_size_fraction=args.max_size_fraction,
              do_3D=args.do_3D, anisotropy=args.anisotropy, flow3D_smooth=smooth,
              stitch_threshold=args.stitch_threshold, batch_size=args.batch_size, augment=args.augment,
              resample=not args.no_resample, normalize=normalize, invert=args.invert, bsize=args.bsize)
    if getattr(args, "chan", None) is not None or getattr(args, "chan2", None) is not None:
        kw["channels"] = [int(args.chan or 0), int(args.chan2 or 0)]  # Cellpose 3's [cytoplasm, nucleus]
    return kw


def _channels_notice(args, arch: str | None) -> None:
    """--chan/--chan2 mean something to Cellpose 1-3 U-Nets only; say so for the other models."""
    if (args.chan is not None or args.chan2 is not None) and arch != "cellpose3":
        _say(f"notice: --chan/--chan2 choose the inputs of Cellpose 1-3 models (cp_cyto, cyto3, ...); this "
             f"'{arch}' model ignores them and segments on the first 3 channels (use --channel_axis / "
             "--segment_channels)")


def _check_params(args, training: bool = False) -> None:
    """Refuse absurd parameters before any model is loaded (one clear message)."""
    def bad(msg):
        raise CellposeWebError(msg)

    from cellpose_web.models import check_eval_params

    finite = lambda v: v is None or np.isfinite(v)  # noqa: E731
    try:
        check_eval_params(
            diameter=args.diameter, flow_threshold=args.flow_threshold, cellprob_threshold=args.cellprob_threshold,
            niter=args.niter, min_size=args.min_size, max_size_fraction=args.max_size_fraction,
            anisotropy=args.anisotropy, stitch_threshold=args.stitch_threshold, flow3D_smooth=args.flow3D_smooth,
            batch_size=args.batch_size)
    except CellposeWebError as e:
        bad(f"--{e}")  # the message starts with the parameter's name, which is also the flag's
    if args.bsize is not None and not (16 <= args.bsize <= 4096):
        bad(f"--bsize must be between 16 and 4096, got {args.bsize}")
    if training:
        # None = not given: filled from the base model's recipe once it is loaded
        if args.n_epochs is not None and not 1 <= args.n_epochs <= 100000:
            bad(f"--n_epochs must be between 1 and 100000, got {args.n_epochs}")
        if args.learning_rate is not None and not (0 < args.learning_rate < 1):
            bad(f"--learning_rate must be between 0 and 1, got {args.learning_rate}")
        if args.weight_decay is not None and (not finite(args.weight_decay) or args.weight_decay < 0):
            bad(f"--weight_decay must be >= 0, got {args.weight_decay}")
        if args.train_batch_size is not None and args.train_batch_size < 1:
            bad(f"--train_batch_size must be at least 1, got {args.train_batch_size}")


def save_options(args) -> "pipeline.SaveOptions":
    """Which files the flags ask for (``_seg.npy`` unless --no_npy)."""
    from cellpose_web import pipeline

    return pipeline.SaveOptions(npy=not args.no_npy, png=args.save_png, tif=args.save_tif, txt=args.save_txt,
                                rois=args.save_rois, outlines=args.save_outlines, flows=args.save_flows,
                                mpl=args.save_mpl, cells_csv=args.save_csv, in_folders=args.in_folders,
                                dir_above=args.dir_above, suffix=args.output_name or "_cp_masks")


def image_settings(args) -> "pipeline.ImageSettings":
    """How each image is read, segmented and measured, from the flags (file channel numbering)."""
    from cellpose_web import measure, pipeline
    from cellpose_web.service.config import Limits

    puncta = None
    if args.puncta_channel is not None:
        puncta = pipeline.PunctaParams(channel=args.puncta_channel, sigma_min=args.puncta_sigma[0],
                                       sigma_max=args.puncta_sigma[1], threshold=args.puncta_threshold,
                                       max_distance_um=measure.DEFAULT_MAX_DISTANCE_UM
                                       if args.puncta_max_distance_um is None else args.puncta_max_distance_um)
    return pipeline.ImageSettings(
        eval_kwargs=eval_kwargs_from_args(args), channel_axis=args.channel_axis, z_axis=args.z_axis,
        segment_channels=args.segment_channels, exclude_on_edges=args.exclude_on_edges,
        pixel_size_um=args.pixel_size_um, puncta=puncta, measure=bool(args.save_csv or puncta is not None),
        max_pixels=args.max_pixels if args.max_pixels is not None else Limits.from_env().max_pixels)


def _print_result(r: dict[str, Any], done: int, total: int, where: str = "") -> None:
    for line in r.get("notices", []):
        _say(line)
    extra = ""
    summ = r.get("summary") or {}
    if "puncta_total" in summ:
        extra = (f", {summ['puncta_in_cells']} puncta in cells ({summ['puncta_outside_cells']} outside)")
    print(f"{r['name']}: {r['n_masks']} masks{extra}, {r['seconds']:.2f} s, {r['device']}{where} [{done}/{total}]",
          flush=True)
    if r.get("diameter_note"):
        print(f"  {r['diameter_note']}", flush=True)
    if r.get("hint"):
        print(f"  try: {r['hint']}", flush=True)


def _finish(files: list[Path], failed: int, total: float) -> int:
    if failed and len(files) == 1:
        return EXIT_INPUT
    if failed:
        _say(f"error: all {len(files)} image(s) failed (see above)" if failed == len(files) else
             f"error: {failed} of {len(files)} image(s) failed (see above); the others were saved")
        return EXIT_INPUT
    _say(f"done: {len(files)} image(s) in {total:.1f} s")
    return EXIT_OK


def run_segmentation(args) -> int:
    from cellpose_web import pipeline

    _check_params(args)
    files = _collect_images(args)
    spec = _model_spec(args)
    model, info = _load_model(args, spec)
    _channels_notice(args, info.arch)
    loaded = pipeline.LoadedModel(model, info.name, info.sha256 or "", str(info.path or ""), info.arch or "",
                                  source=info.source or "")
    settings, save = image_settings(args), save_options(args)
    command = pipeline.command_line()
    savedir = Path(args.savedir).expanduser() if args.savedir else None
    if savedir is not None:
        savedir.mkdir(parents=True, exist_ok=True)
    _say(f"segmenting {len(files)} image(s) with '{info.name}' ({info.arch}) on {model.device}")
    bar = ProgressLine(len(files))
    failed = 0
    t_all = time.perf_counter()
    for i, f in enumerate(files):
        bar.show(i, f.name)
        try:
            r = pipeline.process_file(f, loaded, settings, savedir, save, command=command)
            bar.clear()
            _print_result(r, i + 1, len(files))
        except (CellposeWebError, FileNotFoundError) as e:
            bar.clear()
            failed += 1
            _say(f"error: {f.name}: {e}")
    bar.clear()
    return _finish(files, failed, time.perf_counter() - t_all)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def run_training(args) -> int:
    from cellpose_web import io, registry
    from cellpose_web import train as train_mod

    if not args.dir:
        raise CellposeWebError("--train needs --dir FOLDER with images and their _masks files")
    if args.file_list:
        raise CellposeWebError("--file_list is not supported; put the images in --dir (and --test_dir)")
    _check_params(args, training=True)
    name = args.model_name_out or f"cellpose_{time.strftime('%Y%m%d_%H%M%S')}"
    registry.validate_name(name)
    if (registry.models_dir() / name).exists():
        raise CellposeWebError(f"a lab model named '{name}' already exists; choose another --model_name_out")
    images, labels, names, timgs, tlabels, tnames = io.load_train_test_data(
        args.dir, args.test_dir, image_filter=args.img_filter, mask_filter=args.mask_filter,
        look_one_level_down=args.look_one_level_down)
    spec = _model_spec(args)
    model, info = _load_model(args, spec, for_training=True)
    if info.arch == "cpsam" and args.bsize not in (None, 256):
        raise CellposeWebError(f"Cellpose-SAM models train on 256x256 tiles; --bsize {args.bsize} is not possible")
    recipe = train_mod.finetune_defaults(info.arch or train_mod.net_arch(model.net))
    for flag, value in (("learning_rate", recipe.learning_rate), ("weight_decay", recipe.weight_decay),
                        ("n_epochs", recipe.n_epochs), ("train_batch_size", recipe.batch_size)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.nimg_per_epoch is None:
        args.nimg_per_epoch = recipe.nimg_per_epoch(len(images))
    _say(f"training '{name}' from '{info.name}' on {len(images)} image(s)"
         + (f", testing on {len(timgs)}" if timgs else "") + f", {args.n_epochs} epochs, learning rate "
         f"{args.learning_rate:g}, weight decay {args.weight_decay:g}, on {model.device}")
    bar = ProgressLine(args.n_epochs)

    def cb(epoch, train_loss, test_loss, elapsed):
        line = (f"loss {train_loss:.4f}" + (f" test {test_loss:.4f}" if test_loss is not None else "")
                + f" {elapsed:.0f}s")
        if bar.tty:
            bar.show(epoch + 1, line)
        else:  # a log file or a pipe: one line per epoch, as Cellpose's training prints
            print(f"epoch {epoch + 1}/{args.n_epochs}: {line}", flush=True)

    t0 = time.perf_counter()
    model_path, train_losses, test_losses = train_mod.train_seg(
        model.net, train_data=images, train_labels=labels, test_data=timgs, test_labels=tlabels,
        channel_axis=args.channel_axis, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        n_epochs=args.n_epochs, batch_size=args.train_batch_size, save_path=args.dir, model_name=name,
        min_train_masks=args.min_train_masks, nimg_per_epoch=args.nimg_per_epoch,
        nimg_test_per_epoch=args.nimg_test_per_epoch, save_every=args.save_every, save_each=args.save_each,
        bsize=args.bsize or recipe.bsize, seed=args.seed, callback=cb)
    bar.clear()
    secs = time.perf_counter() - t0
    tl = np.asarray(train_losses, float)
    meta = {
        "description": f"fine-tuned from {info.name} with the command line on {Path(args.dir).name}",
        "base_model": info.name,
        "training": {"base_sha256": info.sha256, "train_images": [Path(n).name for n in names],
                     "test_images": [Path(n).name for n in (tnames or [])], "learning_rate": args.learning_rate,
                     "weight_decay": args.weight_decay, "n_epochs": args.n_epochs,
                     "batch_size": args.train_batch_size, "min_train_masks": args.min_train_masks,
                     "seed": args.seed, "train_seconds": round(secs, 1),
                     "train_losses": [float(x) for x in tl],
                     "test_losses": [float(x) for x in np.asarray(test_losses, float)]},
    }
    entry = registry.add_lab_model(model_path, name, meta)
    print(f"model saved: {model_path}", flush=True)
    print(f"registered lab model '{entry.name}' (sha256 {entry.sha256[:12]}); train loss "
          f"{tl[0]:.4f} -> {tl[-1]:.4f} in {secs:.0f} s", flush=True)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# models subcommand
# ----------------------------------------------------------------------------------------------
def _models_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{command_name()} models", description="Manage models: list, add, rename, delete, "
                "fetch from / push to the Hugging Face Hub.")
    p.add_argument("--verbose", action="store_true")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="list models")
    ls.add_argument("--json", action="store_true", help="print JSON")
    a = sub.add_parser("add", help="add a model file as a lab model")
    a.add_argument("file")
    a.add_argument("--name", default=None, help="lab name (default: the file name)")
    a.add_argument("--description", default="")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--size_model", default=None,
                   help="Cellpose 1-3 models: its size model (.npy; default FILE_size.npy when present)")
    r = sub.add_parser("rename", help="rename a lab model")
    r.add_argument("old")
    r.add_argument("new")
    d = sub.add_parser("delete", help="delete a lab model")
    d.add_argument("name")
    i = sub.add_parser("info", help="show everything known about a model")
    i.add_argument("name")
    f = sub.add_parser("fetch", help="download a Hub file and add it as a lab model")
    f.add_argument("repo_id")
    f.add_argument("filename")
    f.add_argument("--name", default=None)
    f.add_argument("--revision", default=None)
    f.add_argument("--token", default=None)
    f.add_argument("--overwrite", action="store_true")
    pu = sub.add_parser("push", help="upload a lab model to a Hub repository")
    pu.add_argument("name")
    pu.add_argument("repo_id")
    pu.add_argument("--token", default=None)
    pu.add_argument("--public", action="store_true", help="create the repository as public (default private)")
    return p


def run_models(argv: Sequence[str]) -> int:
    from cellpose_web import registry

    args = _models_parser().parse_args(list(argv))
    _setup_logging(args.verbose)
    if args.action == "list":
        models = registry.list_models()
        if args.json:
            print(json.dumps([m.to_dict() for m in models], indent=1, default=str))
            return EXIT_OK
        print(f"{'name':<24} {'for':<12} {'source':<8} {'arch':<9} {'here':<4} {'size':>9} {'sha256':<12} {'AP':>5}  "
              "description")
        for m in models:
            size = f"{m.size_bytes / 1e6:.1f}MB" if m.size_bytes else "-"
            ap = f"{m.test_ap:.3f}" if isinstance(m.test_ap, (int, float)) else "-"
            print(f"{m.name:<24} {m.purpose or '-':<12} {m.source:<8} {m.arch or '-':<9} "
                  f"{'yes' if m.available else 'no':<4} {size:>9} {(m.sha256 or '-')[:12]:<12} {ap:>5}  {m.description}")
        print(f"(lab models in {registry.models_dir()})")
        return EXIT_OK
    if args.action == "add":
        name = args.name or Path(args.file).name.split(".")[0]
        info = registry.add_lab_model(args.file, name, {"description": args.description}, overwrite=args.overwrite,
                                      size_model=args.size_model)
        print(f"added lab model '{info.name}' ({info.arch}, {info.size_bytes / 1e6:.1f} MB, sha256 {info.sha256[:12]})")
        return EXIT_OK
    if args.action == "rename":
        info = registry.rename_lab_model(args.old, args.new)
        print(f"renamed '{args.old}' to '{info.name}'")
        return EXIT_OK
    if args.action == "delete":
        registry.delete_lab_model(args.name)
        print(f"deleted lab model '{args.name}'")
        return EXIT_OK
    if args.action == "info":
        info = registry.resolve_model(args.name, download=False)
        print(json.dumps(info.to_dict(), indent=1, default=str))
        return EXIT_OK
    if args.action == "fetch":
        info = registry.fetch_from_hub(args.repo_id, args.filename, name=args.name, token=args.token,
                                       revision=args.revision, progress=_download_progress(args.filename),
                                       overwrite=args.overwrite)
        print(f"fetched {args.repo_id}/{args.filename} as lab model '{info.name}' ({info.arch}, sha256 "
              f"{info.sha256[:12]})")
        return EXIT_OK
    if args.action == "push":
        url = registry.push_to_hub(args.name, args.repo_id, token=args.token, private=not args.public)
        print(f"pushed '{args.name}' to {url}")
        return EXIT_OK
    raise _UsageError(f"unknown models action {args.action!r}")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# serve / batch
# ----------------------------------------------------------------------------------------------
def run_serve(argv: Sequence[str]) -> int:
    try:
        from cellpose_web.ui.app import main as serve_main
    except ImportError as e:
        raise CellposeWebError(f"the web app is not available in this installation ({e})") from None
    return int(serve_main(list(argv)) or 0)


def run_batch(argv: Sequence[str]) -> int:
    """``batch``: the segmentation flags, in this process or spread over a Dask cluster (issue 6).

    ``--dask-scheduler tcp://HOST:8786`` uses a running cluster; ``--dask-scheduler local`` or
    ``--dask-workers N`` alone starts a LocalCluster of N worker processes on this machine.
    """
    p = build_parser(prog=f"{command_name()} batch")
    dk = p.add_argument_group("Dask scale-out (pip install 'dask[distributed]')")
    dk.add_argument("--dask-scheduler", dest="dask_scheduler", default=None,
                    help="address of a Dask scheduler, tcp://HOST:8786, or 'local' for a LocalCluster here; the "
                         "images, the output folder and the model file must be at the same paths on every worker")
    dk.add_argument("--dask-workers", "--workers", dest="dask_workers", type=int, default=None,
                    help="worker processes of a LocalCluster; implies --dask-scheduler local (None: 2 workers)")
    dk.add_argument("--dask-retries", dest="dask_retries", type=int, default=2,
                    help="times an image is retried when its worker dies or fails unexpectedly")
    dk.add_argument("--dask-timeout", dest="dask_timeout", type=float, default=20.0,
                    help="seconds to wait when connecting to the scheduler")
    args = p.parse_args(list(argv))
    _setup_logging(args.verbose)
    if args.dask_scheduler is None and args.dask_workers is None:
        return run_segmentation(args)
    return run_segmentation_dask(args)


def run_segmentation_dask(args) -> int:
    """The ``batch`` loop on a Dask cluster: same files as :func:`run_segmentation`, one line per image."""
    from cellpose_web import distributed, pipeline, registry

    if args.train:
        raise CellposeWebError("--train does not run on Dask; drop --dask-scheduler/--dask-workers")
    if args.dask_workers is not None and not (1 <= args.dask_workers <= 256):
        raise CellposeWebError(f"--dask-workers must be between 1 and 256, got {args.dask_workers}")
    if not (0 <= args.dask_retries <= 100):
        raise CellposeWebError(f"--dask-retries must be between 0 and 100, got {args.dask_retries}")
    _check_params(args)
    distributed.require_dask()
    sched = args.dask_scheduler
    if sched not in (None, "", "local"):
        sched = distributed.scheduler_address(sched)
    files = _collect_images(args)
    spec = _model_spec(args)
    info = _resolve_model(args, spec)
    _channels_notice(args, info.arch)
    settings, save = image_settings(args), save_options(args)
    savedir = Path(args.savedir).expanduser().resolve() if args.savedir else None
    if savedir is not None:
        savedir.mkdir(parents=True, exist_ok=True)
    where = "a local Dask cluster" if sched in (None, "", "local") else f"the Dask cluster at {sched}"
    _say(f"segmenting {len(files)} image(s) with '{info.name}' ({info.arch}) on {where}")
    bar = ProgressLine(len(files))
    state = {"done": 0, "failed": 0}

    def progress(done: int, total: int, result: dict[str, Any]) -> None:
        state["done"] = done
        bar.clear()
        name = result.get("name", "?")
        if result.get("error"):
            state["failed"] += 1
            _say(f"error: {name}: {result['error']}")
        else:
            _print_result(result, done, total, f" (worker {result.get('worker', '?')})")
        bar.show(done, name)

    t0 = time.perf_counter()
    distributed.run_batch_dask(
        [str(Path(f).resolve()) for f in files], savedir, info, settings, save,
        scheduler=None if sched in (None, "", "local") else sched, n_workers=args.dask_workers or 2,
        retries=args.dask_retries, progress=progress, device=_device_arg(args), use_gpu=args.use_gpu,
        timeout=args.dask_timeout, command=pipeline.command_line())
    bar.clear()
    return _finish(files, state["failed"], time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root.setLevel(level)
    if not verbose:  # keep third-party chatter out of the way
        for name in ("huggingface_hub", "httpx", "httpx2", "urllib3", "tifffile", "PIL"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "hitl":  # human-in-the-loop (issue 20): cellpose_web/cli_hitl.py
        return __import__("cellpose_web.cli_hitl", fromlist=["run_hitl"]).run_hitl(argv[1:])
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
        if cmd == "serve":
            return run_serve(rest)
        if cmd == "models":
            return run_models(rest)
        return run_batch(rest)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.version:
        from cellpose_web import __version__

        print(f"cellpose-web {__version__}")
        return EXIT_OK
    _deprecation_notices(args)
    if args.add_model:
        return run_models(["add", args.add_model])
    if args.train:
        return run_training(args)
    if not args.dir and not args.image_path:
        raise _UsageError("give --dir FOLDER or --image_path FILE to segment (or `serve` to start the web app; "
                          "see --help)")
    return run_segmentation(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises, except SystemExit from --help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        return _dispatch(argv)
    except _UsageError as e:
        _say(f"error: {e}")
        return EXIT_INPUT
    except (CellposeWebError, FileNotFoundError) as e:  # ModelNotAvailableError is both
        msg = " ".join(str(e).split())
        _say(f"error: {msg}")
        if verbose:
            traceback.print_exc()
        return EXIT_INPUT
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # the reader went away (`cellpose-web models list | head`): stop quietly, as other command-line
        # tools do; stdout points at /dev/null so the interpreter's final flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAIL
    except MemoryError:
        _say("error: out of memory: use smaller images, a smaller --batch_size, or a machine with more memory")
        return EXIT_FAIL
    except Exception as e:  # unexpected: one line, traceback with --verbose
        msg = " ".join(str(e).split())[:300]
        _say(f"error: unexpected {type(e).__name__}: {msg} (run with --verbose for the traceback)")
        if verbose:
            traceback.print_exc()
        return EXIT_FAIL
