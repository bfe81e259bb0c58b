"""``python -m cellpose_web --train ...``: fine-tune through the one fine-tune driver's rules."""
from __future__ import annotations

import time
from pathlib import Path
from cellpose_web.errors import CellposeWebError
from cellpose_web.cli import common
from cellpose_web.cli.common import EXIT_OK, ProgressLine, check_params, model_spec, tell


#: the command line's own limit on epochs (the app's is the server's ``max_epochs``)
MAX_EPOCHS = 100_000


def run_training(args) -> int:
    """Fine-tune the model of ``--pretrained_model`` on ``--dir`` (and score ``--test_dir``) with
    :func:`cellpose_web.workflows.finetune.fine_tune`, then register it as a lab model."""
    from cellpose_web import io, registry
    from cellpose_web.models import train as train_mod
    from cellpose_web.workflows.finetune import check_new_model_name, fine_tune, training_settings

    if not args.dir:
        raise CellposeWebError("--train needs --dir FOLDER with images and their _masks files")
    if args.file_list:
        raise CellposeWebError("--file_list is not supported; put the images in --dir (and --test_dir)")
    check_params(args, training=True)
    name = args.model_name_out or f"cellpose_{time.strftime('%Y%m%d_%H%M%S')}"
    check_new_model_name(name)  # before the images are read: a taken name costs nothing
    images, labels, names, timgs, tlabels, tnames = io.load_train_test_data(
        args.dir, args.test_dir, image_filter=args.img_filter, mask_filter=args.mask_filter,
        look_one_level_down=args.look_one_level_down)
    spec = model_spec(args)
    model, info = common.load_model(args, spec, for_training=True)
    arch = info.arch or train_mod.net_arch(model.net)
    # flags not given take the base model's recipe (check_params has refused bad values by flag name)
    settings = training_settings(arch, len(images), args.n_epochs, args.learning_rate, args.weight_decay,
                                 args.train_batch_size, args.bsize, args.nimg_per_epoch, max_epochs=MAX_EPOCHS)
    tell(f"training '{name}' from '{info.name}' on {len(images)} image(s)"
         + (f", testing on {len(timgs)}" if timgs else "") + f", {settings['n_epochs']} epochs, learning rate "
         f"{settings['learning_rate']:g}, weight decay {settings['weight_decay']:g}, on {model.device}")
    bar = ProgressLine(settings["n_epochs"])

    def show(epoch, train_loss, test_loss, elapsed):
        line = (f"loss {train_loss:.4f}" + (f" test {test_loss:.4f}" if test_loss is not None else "")
                + f" {elapsed:.0f}s")
        if bar.tty:
            bar.show(epoch + 1, line)
        else:  # a log file or a pipe: one line per epoch, as Cellpose's training prints
            print(f"epoch {epoch + 1}/{settings['n_epochs']}: {line}", flush=True)

    run = fine_tune(model.net, arch, images, labels, test_images=timgs, test_labels=tlabels,
                    channel_axis=args.channel_axis, name=name, save_dir=args.dir, max_epochs=MAX_EPOCHS,
                    min_train_masks=args.min_train_masks, seed=args.seed, on_epoch=show,
                    nimg_test_per_epoch=args.nimg_test_per_epoch, save_every=args.save_every,
                    save_each=args.save_each, **settings)
    bar.clear()
    record = run.record(info, [Path(n).name for n in names], [Path(n).name for n in (tnames or [])])
    entry = registry.add_lab_model(run.path, name, {
        "description": f"fine-tuned from {info.name} with the command line on {Path(args.dir).name}",
        "base_model": info.name, "training": record})
    tl = run.train_losses
    print(f"model saved: {run.path}", flush=True)
    print(f"registered lab model '{entry.name}' (sha256 {entry.sha256[:12]}); train loss "
          f"{tl[0]:.4f} -> {tl[-1]:.4f} in {run.seconds:.0f} s", flush=True)
    for note in run.notices:
        tell(f"note: {note}.")
    return EXIT_OK
