"""``python -m cellpose_web --dir/--image_path ...``: segment images through the per-image pipeline."""
from __future__ import annotations

import time
from pathlib import Path
from cellpose_web.errors import CellposeWebError
from cellpose_web.cli import common
from cellpose_web.cli.common import ProgressLine, channels_notice, check_params, collect_images, finish, image_settings, model_spec, print_result, save_options, tell


def run_segmentation(args) -> int:
    from cellpose_web.workflows import pipeline

    check_params(args)
    files = collect_images(args)
    spec = model_spec(args)
    model, info = common.load_model(args, spec)
    channels_notice(args, info.arch)
    loaded = pipeline.LoadedModel(model, info.name, info.sha256 or "", str(info.path or ""), info.arch or "",
                                  source=info.source or "")
    settings, save = image_settings(args), save_options(args)
    command = pipeline.command_line()
    savedir = Path(args.savedir).expanduser() if args.savedir else None
    if savedir is not None:
        savedir.mkdir(parents=True, exist_ok=True)
    tell(f"segmenting {len(files)} image(s) with '{info.name}' ({info.arch}) on {model.device}")
    bar = ProgressLine(len(files))
    failed = 0
    t_all = time.perf_counter()
    for i, f in enumerate(files):
        bar.show(i, f.name)
        try:
            r = pipeline.process_file(f, loaded, settings, savedir, save, command=command)
            bar.clear()
            print_result(r, i + 1, len(files))
        except (CellposeWebError, FileNotFoundError) as e:
            bar.clear()
            failed += 1
            tell(f"error: {f.name}: {e}")
    bar.clear()
    return finish(files, failed, time.perf_counter() - t_all)
