"""The Cellpose 4 flags (``python -m cellpose_web --help``)."""
from __future__ import annotations

import argparse
from cellpose_web.cli.common import Parser, command_name, float_or_none, int_or_none


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The Cellpose-4-compatible parser (segmentation and training flags)."""
    p = Parser(prog=prog or command_name(),
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
    inp.add_argument("--channel_axis", type=int_or_none, default=None, help="axis of the channels")
    inp.add_argument("--z_axis", type=int_or_none, default=None, help="axis of the planes of a stack")
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
    alg.add_argument("--diameter", type=float_or_none, default=None,
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
