"""``python -m cellpose_web --train ...``: fine-tune through the one fine-tune driver's rules."""
from __future__ import annotations

import time
from pathlib import Path
import numpy as np
from cellpose_web.errors import CellposeWebError
from cellpose_web.cli import common
from cellpose_web.cli.common import EXIT_OK, ProgressLine, check_params, model_spec, tell


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def run_training(args) -> int:
    from cellpose_web import io, registry
    from cellpose_web.models import train as train_mod

    if not args.dir:
        raise CellposeWebError("--train needs --dir FOLDER with images and their _masks files")
    if args.file_list:
        raise CellposeWebError("--file_list is not supported; put the images in --dir (and --test_dir)")
    check_params(args, training=True)
    name = args.model_name_out or f"cellpose_{time.strftime('%Y%m%d_%H%M%S')}"
    registry.validate_name(name)
    if (registry.models_dir() / name).exists():
        raise CellposeWebError(f"a lab model named '{name}' already exists; choose another --model_name_out")
    images, labels, names, timgs, tlabels, tnames = io.load_train_test_data(
        args.dir, args.test_dir, image_filter=args.img_filter, mask_filter=args.mask_filter,
        look_one_level_down=args.look_one_level_down)
    spec = model_spec(args)
    model, info = common.load_model(args, spec, for_training=True)
    if info.arch == "cpsam" and args.bsize not in (None, 256):
        raise CellposeWebError(f"Cellpose-SAM models train on 256x256 tiles; --bsize {args.bsize} is not possible")
    recipe = train_mod.finetune_defaults(info.arch or train_mod.net_arch(model.net))
    for flag, value in (("learning_rate", recipe.learning_rate), ("weight_decay", recipe.weight_decay),
                        ("n_epochs", recipe.n_epochs), ("train_batch_size", recipe.batch_size)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.nimg_per_epoch is None:
        args.nimg_per_epoch = recipe.nimg_per_epoch(len(images))
    tell(f"training '{name}' from '{info.name}' on {len(images)} image(s)"
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
