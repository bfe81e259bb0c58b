#!/usr/bin/env bash
# Install everything the tests need and run the whole suite (fast, slow and browser tests).
# Browser tests use Debian's chromium (never a downloaded browser).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped"
  fi
fi
# torch (the CPU build unless there is an NVIDIA GPU) + requirements-dev.txt; the tests import the
# package from this checkout, so it is not installed
PYTHON=python3 bash scripts/install.sh --dev
# The tests read only what is in the repository (tests/fixtures, cellpose_web/weights). The project's
# reference folder that benchmarks may read (CELLPOSE_WEB_SHARED, else ../shared) is pointed at an empty
# folder, so a run beside one proves the same as a fresh clone without it.
no_shared="$(mktemp -d)"
trap 'rmdir "$no_shared"' EXIT
CELLPOSE_WEB_SHARED="$no_shared" python3 -m pytest -q -ra "$@"
# The GPU suite (tests/test_gpu.py) skips without CUDA; run its device code on the CPU too, so it
# cannot rot between GPU sessions (about 15 s).
if [ $# -eq 0 ]; then
  CELLPOSE_WEB_SHARED="$no_shared" CELLPOSE_WEB_TEST_DEVICE=cpu python3 -m pytest -q -m gpu tests/test_gpu.py
fi
