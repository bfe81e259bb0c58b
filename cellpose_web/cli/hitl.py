"""``python -m cellpose_web hitl ...``: the human-in-the-loop from the command line (issue 20).

The same loop as the browser (:mod:`cellpose_web.workflows.hitl`): the next image arrives segmented
by the project's latest model, you correct its masks in any editor (Cellpose's GUI, napari, Fiji)
and save them back; a short fine-tune round runs, and its model segments the next image when it
beats the previous one on the held-out corrected images::

    python -m cellpose_web hitl start --dir images/ --model lite --project nuclei_lab
    python -m cellpose_web hitl next                  # writes .../proposals/NAME_masks.tif, prints its path
    # ... correct that file ...
    python -m cellpose_web hitl save --masks corrected_masks.tif   # learns (waits for the round)
    python -m cellpose_web hitl status                # rounds, held-out AP curve, current model
    python -m cellpose_web hitl rollback --round 2    # back to round 2's model
    python -m cellpose_web hitl publish --name nuclei_lab_v1       # make it a lab model
    python -m cellpose_web hitl simulate --dir train/ --labels-from-masks --model lite --n 8

The commands act on the project last started or opened (``--project`` chooses another); projects
live in ``$CELLPOSE_WEB_HOME/hitl`` unless ``--root`` says where.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence


from cellpose_web.engine.dynamics.labels import as_label_dtype
from cellpose_web.errors import CellposeWebError

__all__ = ["run_hitl", "build_hitl_parser"]

_CURRENT = ".current.json"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (exit status 2 through cli.main), as the other commands
        raise CellposeWebError(f"{message} (see `{self.prog} --help`)")


def _setup_logging(verbose: bool) -> None:
    import logging

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", default=None, help="project name (default: the last one started or opened)")
    p.add_argument("--root", default=None, help="folder of the projects (default: $CELLPOSE_WEB_HOME/hitl)")
    p.add_argument("--verbose", action="store_true", help="log progress and print tracebacks")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_round_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("round settings (default: the base model's row of the table in workflows/hitl.py)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per round")
    g.add_argument("--learning_rate", "--learning-rate", type=float, default=None)
    g.add_argument("--weight_decay", "--weight-decay", type=float, default=None)
    g.add_argument("--crops_per_epoch", "--crops-per-epoch", type=int, default=None)
    g.add_argument("--train_batch_size", "--batch-size", type=int, default=None)
    g.add_argument("--bsize", type=int, default=None, help="crop side in px")
    g.add_argument("--new_share", "--new-share", type=float, default=None,
                   help="fraction of the crops from the newly corrected image(s)")
    g.add_argument("--time_limit", "--time-limit", type=float, default=None, help="seconds per round")
    g.add_argument("--holdout_every", "--holdout-every", type=int, default=4,
                   help="held-out corrected images: the 2nd, then every k-th (0 = none, accept every round)")
    g.add_argument("--seed", type=int, default=0)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--pretrained_model", dest="model", default="lite",
                   help="base model: lite, cp_cyto, cpsam, a lab model or a file")
    p.add_argument("--channels", "--segment_channels", dest="channels", type=int, nargs="+", default=None,
                   metavar="C", help="file channels fed to the model (0 = first); Cellpose 1-3 models: "
                                     "cytoplasm then nucleus")
    p.add_argument("--diameter", type=float, default=None, help="object diameter in px (default: none)")
    p.add_argument("--use_gpu", action="store_true", help="use a GPU if there is one (default: CUDA when present)")
    p.add_argument("--cpu", action="store_true", help="train and segment on the CPU")
    p.add_argument("--overwrite", action="store_true", help="replace a project of the same name")


def build_hitl_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from cellpose_web.cli.common import command_name

    P = _Parser
    p = P(prog=prog or f"{command_name()} hitl",
          description="Human-in-the-loop: the model learns while you correct (see `hitl simulate` for a demo).")
    sub = p.add_subparsers(dest="action", required=True, parser_class=P)
    s = sub.add_parser("start", help="start a project on a folder or zip of images")
    s.add_argument("--dir", "--images", dest="images", required=True, help="folder (or .zip) of images")
    _add_model_options(s)
    _add_round_options(s)
    _add_common(s)
    n = sub.add_parser("next", help="segment the next image with the latest model and write its masks")
    n.add_argument("--index", type=int, default=None, help="this image (0-based) instead of the next uncorrected")
    n.add_argument("--out", default=None, help="also write the masks here (.tif/.png)")
    n.add_argument("--no-wait", dest="wait", action="store_false",
                   help="do not wait for a running round (segment with the current model now)")
    _add_common(n)
    sv = sub.add_parser("save", help="save corrected masks of the current image and learn from them")
    sv.add_argument("--masks", required=True, help="corrected masks: a label image (.tif/.png) or a _seg.npy")
    sv.add_argument("--index", type=int, default=None, help="image index (default: the current image)")
    sv.add_argument("--no-learn", dest="learn", action="store_false", help="save only; no round")
    _add_common(sv)
    ln = sub.add_parser("learn", help="run a round now on every corrected training image")
    _add_common(ln)
    st = sub.add_parser("status", help="images, rounds, held-out AP curve and the current model")
    _add_common(st)
    rb = sub.add_parser("rollback", help="go back to an earlier round's model")
    rb.add_argument("--round", dest="round_no", type=int, required=True, help="round number (0 = base model)")
    _add_common(rb)
    pu = sub.add_parser("publish", help="register a round's model as a lab model")
    pu.add_argument("--name", required=True, help="lab model name")
    pu.add_argument("--round", dest="round_no", type=int, default=None, help="default: the current model")
    pu.add_argument("--overwrite_model", action="store_true")
    _add_common(pu)
    ls = sub.add_parser("list", help="list the projects")
    _add_common(ls)
    sm = sub.add_parser("simulate", help="play a person who corrects with the true labels")
    sm.add_argument("--dir", "--images", dest="images", required=True,
                    help="folder of images with NAME_masks files (the person's corrections)")
    sm.add_argument("--labels-from-masks", "--labels_from_masks", dest="labels_from_masks", action="store_true",
                    help="corrections = the NAME_masks files beside the images (required)")
    sm.add_argument("--mask_filter", default="_masks")
    sm.add_argument("--n", type=int, default=None, help="correct this many images (default: all)")
    sm.add_argument("--test_dir", "--test-dir", dest="test_dir", default=None,
                    help="folder of further labelled images: score the current model on them after each image")
    _add_model_options(sm)
    _add_round_options(sm)
    _add_common(sm)
    return p


# ----------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _remember(root: Path, name: str) -> None:
    from cellpose_web.service.storage import atomic_write_json

    atomic_write_json(root / _CURRENT, {"project": name})


def _open(args):
    from cellpose_web.service.storage import read_json
    from cellpose_web.workflows import hitl

    root = hitl.hitl_root(args.root)
    name = args.project or (read_json(root / _CURRENT, {}) or {}).get("project")
    if not name:
        raise CellposeWebError("no project: give --project NAME, or start one with `hitl start --dir IMAGES`")
    s = hitl.open_session(name, root=root)
    if args.project:
        _remember(root, s.name)
    return s


def _recipe(args) -> dict[str, Any]:
    out = {"n_epochs": args.epochs, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
           "crops_per_epoch": args.crops_per_epoch, "batch_size": args.train_batch_size, "bsize": args.bsize,
           "new_share": args.new_share, "time_limit_s": args.time_limit}
    out = {k: v for k, v in out.items() if v is not None}
    if "n_epochs" in out:
        out.setdefault("min_epochs", min(out["n_epochs"], 12))
    return out


def _start(args, images, name: str, overwrite: bool):
    from cellpose_web.workflows import hitl

    eval_kwargs = {"diameter": args.diameter} if args.diameter else {}
    gpu = False if args.cpu else (True if args.use_gpu else None)
    root = hitl.hitl_root(args.root)
    s = hitl.start_session(name, images, base_model=args.model, channels=args.channels, root=root,
                           eval_kwargs=eval_kwargs, recipe=_recipe(args), holdout_every=args.holdout_every,
                           seed=args.seed, gpu=gpu, overwrite=overwrite)
    _remember(root, s.name)
    return s




def _round_line(r: dict[str, Any] | None) -> str:
    if r is None:
        return "no round (nothing new to learn)"
    if r.get("status") != "done":
        return f"round {r['round']}: {r.get('status')} ({r.get('reason', '')})"
    s, ps = r.get("scores"), r.get("parent_scores")
    ap = (f"held-out AP@0.5 {ps['ap50']:.3f} -> {s['ap50']:.3f}, AP@0.75 {ps['ap75']:.3f} -> {s['ap75']:.3f} "
          f"on {s['n_images']} image(s)") if s and ps else "no held-out images yet"
    ts, tps = r.get("train_scores"), r.get("parent_train_scores")
    if not (s and ps) and ts and tps:
        ap += f" (on its {ts['n_images']} training image(s) AP@0.5 {tps['ap50']:.3f} -> {ts['ap50']:.3f})"
    verdict = "accepted" if r.get("accepted") else "rejected (kept round %s)" % r.get("parent_round")
    limit = ", stopped at the time limit" if r.get("stopped_by_time_limit") else ""
    return (f"round {r['round']}: {verdict}; {ap}; learnt from {r['n_train_images']} image(s), {r['n_cells']} "
            f"cells; {r['epochs_done']} epochs in {r['train_seconds']:.0f} s{limit} (+{r.get('score_seconds', 0):.0f}"
            " s scoring)")


def _wait_round(s, handle, verbose_stream=None) -> list[dict[str, Any]]:
    """Wait for a worker, showing its progress on a terminal; the rounds it ran."""
    if handle is None:
        return []
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    last = ""
    while handle.running:
        if tty:
            st = handle.status()
            line = (f"\rround {st.get('round')}: {st.get('phase')} epoch {st.get('epoch')}/{st.get('n_epochs')} "
                    f"{st.get('elapsed_s', 0):.0f} s")
            if line != last:
                sys.stderr.write(line.ljust(len(last)))
                sys.stderr.flush()
                last = line
        time.sleep(0.5)
    if tty and last:
        sys.stderr.write("\r" + " " * len(last) + "\r")
    handle.wait()
    return list(handle.rounds)


def _print_status(s, as_json: bool) -> None:
    st = s.status()
    if as_json:
        print(json.dumps(st, indent=1, default=str))
        return
    cm = st["current_model"]
    print(f"project {st['name']} ({st['path']})")
    print(f"images: {st['n_images']} from {st['source']}; corrected {st['n_corrected']} "
          f"({st['n_heldout']} held out), {st['n_cells_corrected']} cells; current image {st['index']}")
    print(f"base model {st['base_model']['name']} ({st['base_model']['arch']}); current model: round {cm['round']} "
          f"({cm['name']}), learnt from {cm['n_cells']} corrected cells; training so far {st['train_minutes']:.1f} min")
    if st["pending"]:
        print("corrections waiting to be learnt (`hitl learn`)")
    print(f"{'round':>5} {'status':<11} {'from':>4} {'images':>6} {'cells':>6} {'epochs':>6} {'train s':>7} "
          f"{'AP@0.5':>7} {'AP@0.75':>7} {'prev@0.5':>8}  verdict")
    for r in st["rounds"]:
        sc, ps = r.get("scores") or {}, r.get("parent_scores") or {}
        f = lambda v, w=7: f"{v:>{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        verdict = "base" if r["round"] == 0 else ("accepted" if r.get("accepted") else "rejected") \
            if r.get("status") == "done" else r.get("status")
        cur = "  <- current" if r["round"] == cm["round"] else ""
        print(f"{r['round']:>5} {str(r.get('status')):<11} {str(r.get('parent_round') if r.get('parent_round') is not None else '-'):>4} "
              f"{r.get('n_train_images') or 0:>6} {r.get('n_cells') or 0:>6} {r.get('epochs_done') or 0:>6} "
              f"{(r.get('train_seconds') or 0):>7.1f} {f(sc.get('ap50'))} {f(sc.get('ap75'))} {f(ps.get('ap50'), 8)}"
              f"  {verdict}{cur}")
    if st["round_running"]:
        rr = st["round_running"]
        print(f"running: round {rr.get('round')} {rr.get('phase')} epoch {rr.get('epoch')}/{rr.get('n_epochs')}")


# ----------------------------------------------------------------------------------------------
def _simulate(args) -> int:
    from cellpose_web import io
    from cellpose_web.workflows import hitl

    if not args.labels_from_masks:
        raise CellposeWebError("simulate plays a person with the true labels: add --labels-from-masks")
    d = Path(args.images).expanduser()
    names = io.get_image_files(d, args.mask_filter)
    labels, _ = io.get_label_files(names, args.mask_filter)
    truth = list(labels)  # the project keeps copies of the images, in this order
    name = args.project or f"simulate_{d.resolve().name}"
    s = _start(args, [str(n) for n in names], name, overwrite=True)
    test = None
    if args.test_dir:
        tnames = io.get_image_files(args.test_dir, args.mask_filter)
        tlabels, _ = io.get_label_files(tnames, args.mask_filter)
        test = ([hitl.read_image_yxc(n) for n in tnames], [hitl.read_labels(f) for f in tlabels])
    st = s.state()
    total = len(st["images"]) if args.n is None else min(args.n, len(st["images"]))
    _say(f"simulating {total} corrected image(s) of {d} with '{st['base_model']['name']}' "
         f"(project {s.name} in {s.path})")
    rows = []
    t_start = time.perf_counter()

    def score_test():
        if test is None:
            return None
        cm = s.current_model()
        return hitl.score_model(cm, test[0], test[1], st.get("channels"), st.get("eval_kwargs"))

    sc = score_test()
    if sc:
        print(f"0 corrected: model round 0, test AP@0.5 {sc['ap50']:.3f} AP@0.75 {sc['ap75']:.3f}", flush=True)
    for k in range(total):
        shown = s.next_image(wait_for_round=None)
        if shown is None:
            break
        true = hitl.read_labels(truth[shown.index])
        from cellpose_web.engine.metrics import average_precision

        ap_prop = float(average_precision(true, shown.masks, threshold=[0.5])[0][0])
        res = s.save_correction(true, index=shown.index)
        rounds = _wait_round(s, res.handle)
        cm = s.current_model()
        sc = score_test()
        row = {"corrected": k + 1, "image": shown.name, "segmented_by_round": shown.model["round"],
               "proposal_ap50": round(ap_prop, 3), "n_cells": res.n_cells, "heldout": res.heldout,
               "rounds": rounds, "current_round": cm["round"], "cells_learnt": cm["n_cells"], "test": sc}
        rows.append(row)
        if not args.json:
            what = "held out" if res.heldout else "training"
            print(f"{k + 1} corrected: {shown.name} ({what}, {res.n_cells} cells) was segmented by round "
                  f"{shown.model['round']} with AP@0.5 {ap_prop:.3f} against the truth", flush=True)
            for r in rounds:
                print("  " + _round_line(r), flush=True)
            if sc:
                print(f"  current model: round {cm['round']}, test AP@0.5 {sc['ap50']:.3f} AP@0.75 "
                      f"{sc['ap75']:.3f}", flush=True)
    wall = time.perf_counter() - t_start
    status = s.status()
    if args.json:
        print(json.dumps({"steps": rows, "status": status, "wall_seconds": round(wall, 1)}, indent=1, default=str))
    else:
        _print_status(s, False)
        print(f"simulated in {wall / 60:.1f} min ({status['train_minutes']:.1f} min training)")
    return 0


def run_hitl(argv: Sequence[str]) -> int:
    """Run a ``hitl`` command; errors propagate to ``cli.main`` (one line, exit status 2)."""
    from cellpose_web.workflows import hitl

    args = build_hitl_parser().parse_args(list(argv))
    _setup_logging(args.verbose)
    if args.action == "start":
        s = _start(args, args.images, args.project or Path(args.images).expanduser().resolve().stem,
                   overwrite=args.overwrite)
        st = s.state()
        if args.json:
            print(json.dumps(s.status(), indent=1, default=str))
        else:
            print(f"started project '{s.name}' ({s.path}): {len(st['images'])} image(s), base model "
                  f"'{st['base_model']['name']}' ({st['base_model']['arch']}); round settings "
                  f"{json.dumps(s.recipe().as_dict())}")
            print("next: `hitl next` to segment the first image")
        return 0
    if args.action == "list":
        rows = hitl.list_sessions(args.root)
        if args.json:
            print(json.dumps(rows, indent=1, default=str))
        else:
            for r in rows:
                print(f"{r['name']:<24} {r['n_corrected']:>3}/{r['n_images']:<4} images corrected, "
                      f"{r['n_rounds']} round(s), current round {r['current_round']}, base {r['base_model']}")
            print(f"(projects in {hitl.hitl_root(args.root)})")
        return 0
    if args.action == "simulate":
        return _simulate(args)
    s = _open(args)
    if args.action == "next":
        shown = s.next_image(index=args.index, wait_for_round=None if args.wait else 0)
        if shown is None:
            print("every image of the project is corrected")
            return 0
        if args.out:
            from cellpose_web import io
            io.imsave(args.out, as_label_dtype(shown.masks))
        info = {"index": shown.index, "image": shown.path, "masks": args.out or shown.proposal_path,
                "n_masks": shown.n_masks, "model_round": shown.model["round"], "model": shown.model["name"],
                "cells_learnt": shown.model["n_cells"], "already_corrected": shown.corrected}
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            print(f"image {shown.index}: {shown.path}")
            print(f"masks ({shown.n_masks} cells, by round {shown.model['round']}: {shown.model['name']}, learnt from "
                  f"{shown.model['n_cells']} corrected cells): {info['masks']}")
            print("correct them, then `hitl save --masks FILE`")
        return 0
    if args.action == "save":
        masks = hitl.read_labels(args.masks)
        res = s.save_correction(masks, index=args.index, learn=args.learn)
        what = "held out (scores the rounds; not trained on)" if res.heldout else "added to the training set"
        if not args.json:
            print(f"saved image {res.index} ({res.name}, {res.n_cells} cells): {what}; {res.n_corrected} corrected")
        if res.queued and res.handle is None:
            print("another process is training this project; the correction is queued for its next round")
        rounds = _wait_round(s, res.handle)  # a queued correction: the running worker's next round
        if args.json:
            print(json.dumps({"saved": {"index": res.index, "name": res.name, "n_cells": res.n_cells,
                                        "heldout": res.heldout}, "rounds": rounds,
                              "current_model": s.current_model()}, indent=1, default=str))
        else:
            for r in rounds:
                print(_round_line(r))
        return 0
    if args.action == "learn":
        h = s.learn()
        if h is None:
            print("another process is training this project; the round is queued")
            return 0
        rounds = _wait_round(s, h)
        for r in rounds:
            print(json.dumps(r, default=str) if args.json else _round_line(r))
        return 0
    if args.action == "status":
        _print_status(s, args.json)
        return 0
    if args.action == "rollback":
        cm = s.rollback(args.round_no)
        print(json.dumps(cm, default=str) if args.json else
              f"current model: round {cm['round']} ({cm['name']}), learnt from {cm['n_cells']} corrected cells")
        return 0
    if args.action == "publish":
        info = s.publish(args.name, args.round_no, overwrite=args.overwrite_model)
        print(f"registered lab model '{info.name}' (sha256 {info.sha256[:12]})")
        return 0
    raise CellposeWebError(f"unknown hitl action {args.action!r}")  # pragma: no cover
