"""``python -m cellpose_web models list|add|rename|delete|fetch|push``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence
from cellpose_web.cli.common import EXIT_OK, Parser, UsageError, command_name, download_progress, setup_logging


# ----------------------------------------------------------------------------------------------
# models subcommand
# ----------------------------------------------------------------------------------------------
def _models_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{command_name()} models", description="Manage models: list, add, rename, delete, "
                "fetch from / push to the Hugging Face Hub.")
    p.add_argument("--verbose", action="store_true")
    sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
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
    setup_logging(args.verbose)
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
                                       revision=args.revision, progress=download_progress(args.filename),
                                       overwrite=args.overwrite)
        print(f"fetched {args.repo_id}/{args.filename} as lab model '{info.name}' ({info.arch}, sha256 "
              f"{info.sha256[:12]})")
        return EXIT_OK
    if args.action == "push":
        url = registry.push_to_hub(args.name, args.repo_id, token=args.token, private=not args.public)
        print(f"pushed '{args.name}' to {url}")
        return EXIT_OK
    raise UsageError(f"unknown models action {args.action!r}")  # pragma: no cover
