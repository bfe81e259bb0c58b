"""The entry point: dispatch to a command, map errors to exit codes."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Sequence
from cellpose_web.errors import CellposeWebError
from cellpose_web.cli.common import EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPT, EXIT_OK, SUBCOMMANDS, UsageError, deprecation_notices, setup_logging, tell
from cellpose_web.cli.parser import build_parser
from cellpose_web.cli.segment import run_segmentation
from cellpose_web.cli.train import run_training
from cellpose_web.cli.models import run_models
from cellpose_web.cli.serve import run_serve
from cellpose_web.cli.batch import run_batch


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "hitl":  # human-in-the-loop (issue 20): cellpose_web/cli/hitl.py
        from cellpose_web.cli.hitl import run_hitl
        return run_hitl(argv[1:])
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
        if cmd == "serve":
            return run_serve(rest)
        if cmd == "models":
            return run_models(rest)
        return run_batch(rest)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.version:
        from cellpose_web import __version__

        print(f"cellpose-web {__version__}")
        return EXIT_OK
    deprecation_notices(args)
    if args.add_model:
        return run_models(["add", args.add_model])
    if args.train:
        return run_training(args)
    if not args.dir and not args.image_path:
        raise UsageError("give --dir FOLDER or --image_path FILE to segment (or `serve` to start the web app; "
                          "see --help)")
    return run_segmentation(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises, except SystemExit from --help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        return _dispatch(argv)
    except UsageError as e:
        tell(f"error: {e}")
        return EXIT_INPUT
    except (CellposeWebError, FileNotFoundError) as e:  # ModelNotAvailableError is both
        msg = " ".join(str(e).split())
        tell(f"error: {msg}")
        if verbose:
            traceback.print_exc()
        return EXIT_INPUT
    except KeyboardInterrupt:
        tell("interrupted")
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # the reader went away (`cellpose-web models list | head`): stop quietly, as other command-line
        # tools do; stdout points at /dev/null so the interpreter's final flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAIL
    except MemoryError:
        tell("error: out of memory: use smaller images, a smaller --batch_size, or a machine with more memory")
        return EXIT_FAIL
    except Exception as e:  # unexpected: one line, traceback with --verbose
        msg = " ".join(str(e).split())[:300]
        tell(f"error: unexpected {type(e).__name__}: {msg} (run with --verbose for the traceback)")
        if verbose:
            traceback.print_exc()
        return EXIT_FAIL
