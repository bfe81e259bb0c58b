"""What every command shares: exit codes, the usage error, progress lines, flag parsing helpers, the
model a command uses, eval parameters and output options from the flags, result lines."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpose_web.errors import CellposeWebError, ModelNotAvailableError

if TYPE_CHECKING:  # the workflow layer is imported when a command runs, not when the CLI starts
    from cellpose_web.workflows import pipeline


EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPT = 0, 1, 2, 130


SUBCOMMANDS = ("serve", "models", "batch")


class UsageError(Exception):
    """A bad command line (argparse's error, as one line)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UsageError(f"{message} (see `{self.prog} --help`)")


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


def download_progress(name: str):
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


def tell(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def float_or_none(v: str) -> float | None:
    if v is None or str(v).strip().lower() in ("none", ""):
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None


def int_or_none(v: str) -> int | None:
    if v is None or str(v).strip().lower() in ("none", ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None


def command_name() -> str:
    """How this command line was started: ``cellpose-web`` (the installed command) or ``python -m cellpose_web``."""
    return "cellpose-web" if Path(sys.argv[0]).name.startswith("cellpose-web") else "python -m cellpose_web"


def deprecation_notices(args: argparse.Namespace) -> None:
    if args.all_channels:
        tell("notice: --all_channels is the default in Cellpose 4 (first 3 channels); ignored")
    for dep in ("pretrained_model_ortho", "restore_type", "chan2_restore", "transformer"):
        if getattr(args, dep) is not None:
            tell(f"notice: --{dep} is deprecated in Cellpose 4 and ignored")
    if args.SGD:
        tell("notice: --SGD is not used in Cellpose 4 (AdamW); ignored")
    if args.diam_mean is not None or args.train_size:
        tell("notice: --diam_mean/--train_size are not used in Cellpose 4; ignored")
    if args.no_interp:
        tell("notice: --no_interp is not used; ignored")


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def collect_images(args) -> list[Path]:
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


def model_spec(args) -> str:
    from cellpose_web import registry

    spec = args.pretrained_model
    if spec is None or str(spec).strip() in ("", "None", "False", "0"):
        if getattr(args, "puncta_channel", None) is not None and not getattr(args, "train", False):
            spec = registry.whole_cell_model()
            tell(f"model: {spec} (whole cells, for puncta per cell; choose with --pretrained_model)")
        else:
            spec = registry.best_available_model()
            tell(f"model: {spec} (default; choose with --pretrained_model)")
    return spec


def device_arg(args) -> str | None:
    if args.device:
        return args.device
    if args.use_gpu and args.gpu_device not in (None, ""):
        g = str(args.gpu_device)
        return f"cuda:{g}" if g.isdigit() else g
    return None


def resolve_model_for(args, spec: str, for_training: bool = False):
    """The registry entry for ``spec``; with ``--fallback MODEL``, that model when ``spec`` cannot be had.

    Without ``--fallback`` a model that cannot be fetched (offline, no cache) stops the run with the
    same message ``CellposeModel(pretrained_model=spec)`` raises (exit status 2): the outputs never
    silently come from another model. Training never falls back (its base model must be the one asked).
    """
    from cellpose_web import registry

    try:
        return registry.resolve_model(spec, progress=download_progress(spec), token=args.token)
    except ModelNotAvailableError as e:
        fallback = getattr(args, "fallback", None)
        if for_training or not fallback or fallback == str(spec):
            raise
        tell(f"notice: {' '.join(str(e).split())}")
        tell(f"notice: --fallback: using '{fallback}' instead of '{spec}' (the outputs record '{fallback}')")
        return registry.resolve_model(fallback, progress=download_progress(fallback), token=args.token)


def load_model(args, spec: str, for_training: bool = False):
    """(model, registry entry) for ``spec``. Segmentation uses the process's one model cache
    (``pipeline.get_model``); training gets a fresh float32 instance, since it changes the weights."""
    from cellpose_web.workflows import pipeline
    from cellpose_web.models import CellposeModel

    info = resolve_model_for(args, spec, for_training)
    if not for_training:
        return pipeline.get_model(info, device=device_arg(args), gpu=args.use_gpu).model, info
    model = CellposeModel(gpu=args.use_gpu, pretrained_model=info.path, device=device_arg(args), use_bfloat16=False)
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


def channels_notice(args, arch: str | None) -> None:
    """--chan/--chan2 mean something to Cellpose 1-3 U-Nets only; say so for the other models."""
    if (args.chan is not None or args.chan2 is not None) and arch != "cellpose3":
        tell(f"notice: --chan/--chan2 choose the inputs of Cellpose 1-3 models (cp_cyto, cyto3, ...); this "
             f"'{arch}' model ignores them and segments on the first 3 channels (use --channel_axis / "
             "--segment_channels)")


def check_params(args, training: bool = False) -> None:
    """Refuse absurd parameters before any model is loaded (one clear message)."""
    def bad(msg):
        raise CellposeWebError(msg)

    from cellpose_web.models import check_eval_params

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
        from cellpose_web.workflows.finetune import check_training_params  # the app's limits too
        try:
            check_training_params(args.n_epochs, args.learning_rate, args.weight_decay, max_epochs=100_000)  # train.MAX_EPOCHS
        except CellposeWebError as e:
            bad(f"--{e}")
        if args.train_batch_size is not None and args.train_batch_size < 1:
            bad(f"--train_batch_size must be at least 1, got {args.train_batch_size}")


def save_options(args) -> "pipeline.SaveOptions":
    """Which files the flags ask for (``_seg.npy`` unless --no_npy)."""
    from cellpose_web.workflows import pipeline

    return pipeline.SaveOptions(npy=not args.no_npy, png=args.save_png, tif=args.save_tif, txt=args.save_txt,
                                rois=args.save_rois, outlines=args.save_outlines, flows=args.save_flows,
                                mpl=args.save_mpl, cells_csv=args.save_csv, in_folders=args.in_folders,
                                dir_above=args.dir_above, suffix=args.output_name or "_cp_masks")


def image_settings(args) -> "pipeline.ImageSettings":
    """How each image is read, segmented and measured, from the flags (file channel numbering)."""
    from cellpose_web import measure
    from cellpose_web.workflows import pipeline
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


def print_result(r: dict[str, Any], done: int, total: int, where: str = "") -> None:
    for line in r.get("notices", []):
        tell(line)
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


def finish(files: list[Path], failed: int, total: float) -> int:
    if failed and len(files) == 1:
        return EXIT_INPUT
    if failed:
        tell(f"error: all {len(files)} image(s) failed (see above)" if failed == len(files) else
             f"error: {failed} of {len(files)} image(s) failed (see above); the others were saved")
        return EXIT_INPUT
    tell(f"done: {len(files)} image(s) in {total:.1f} s")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root.setLevel(level)
    if not verbose:  # keep third-party chatter out of the way
        for name in ("huggingface_hub", "httpx", "httpx2", "urllib3", "tifffile", "PIL"):
            logging.getLogger(name).setLevel(logging.ERROR)
