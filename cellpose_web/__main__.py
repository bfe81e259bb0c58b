"""``python -m cellpose_web``: the Cellpose-compatible command line (see :mod:`cellpose_web.cli`)."""
import sys

from cellpose_web.cli import main

if __name__ == "__main__":
    sys.exit(main())
