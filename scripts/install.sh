#!/usr/bin/env bash
# Install cellpose-web and its dependencies into the current Python (a virtual environment is best).
#
#   bash scripts/install.sh          # torch + the package (editable: `pip install -e .`) + `cellpose-web`
#   bash scripts/install.sh --dev    # torch + requirements-dev.txt (what the tests need), no package
#
# torch 2.13.0 comes first, so pip never picks the CUDA build by accident:
#   - a machine with an NVIDIA GPU (nvidia-smi lists one): PyPI's wheel (the CUDA build on Linux);
#   - otherwise the CPU build from PyTorch's CPU index (a few hundred MB instead of several GB),
#     used as an extra index only when it can be reached; else whatever the configured indexes offer.
#   - torch 2.13.0 already installed (either build): kept.
# CELLPOSE_WEB_TORCH=cpu|cuda overrides the choice; PYTHON=/path/to/python picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=package
case "${1:-}" in
  --dev) MODE=dev ;;
  "") ;;
  *) echo "usage: bash scripts/install.sh [--dev]" >&2; exit 2 ;;
esac
TORCH_SPEC=$(grep -E '^torch==' requirements.txt)
TORCH_VERSION=${TORCH_SPEC#torch==}
CPU_INDEX=https://download.pytorch.org/whl/cpu
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" = "$TORCH_VERSION" ]; then
  echo "install: torch $TORCH_VERSION already installed"
else
  want=${CELLPOSE_WEB_TORCH:-}
  if [ -z "$want" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
      want=cuda
    else
      want=cpu
    fi
  fi
  if [ "$want" = cuda ]; then
    echo "install: NVIDIA GPU found: torch $TORCH_VERSION with CUDA"
    pip_install "$TORCH_SPEC"
  elif "$PY" - "$CPU_INDEX/" <<'PYEOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).close()
PYEOF
  then
    echo "install: no NVIDIA GPU: the CPU build of torch $TORCH_VERSION"
    pip_install "$TORCH_SPEC" --extra-index-url "$CPU_INDEX"
  else
    echo "install: no NVIDIA GPU and the PyTorch CPU index cannot be reached: torch $TORCH_VERSION from the"
    echo "install: configured indexes"
    pip_install "$TORCH_SPEC"
  fi
  # say which build was installed, not which one was hoped for (a local index may hold either)
  "$PY" -c 'import torch; c = torch.version.cuda
print("install: torch", torch.__version__, "(CUDA " + c + " build)" if c else "(CPU build)",
      "- see README, GPU or CPU, to switch" if not c else "")' 2>/dev/null || true
fi

if [ "$MODE" = dev ]; then
  pip_install -q -r requirements-dev.txt
else
  pip_install -q -e .
  echo "install: done; start the app with: $PY -m cellpose_web serve   (or: cellpose-web serve)"
fi
