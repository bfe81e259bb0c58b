#!/usr/bin/env bash
# The prepared GPU check of issue #14: Cellpose-SAM eval (bf16, batch 8) and the dynamics on CUDA,
# ours against the published Cellpose 4.2.1.1 on the same device. Prints numbers, no pass/fail.
#
#   bash benchmarks/gpu_check.sh fetch     # on a connected machine, in the repo root: the reference
#                                          # package and the wheels it needs that a CUDA image with
#                                          # PyTorch usually lacks, into .whl/ (git-ignored, ~30 MB)
#   bash benchmarks/gpu_check.sh run       # on the CUDA machine (a copy of the repo with .whl/):
#                                          # installs them into /tmp/site for the reference only
#                                          # (the project never imports cellpose), then benchmarks
#
# Output goes to the terminal and to $OUT (default gpu_results/): engine.txt, dynamics.txt.
# PYVER (default 3.12) is the CUDA machine's Python for the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
if [ "$mode" = fetch ]; then
  mkdir -p .whl
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    "${plat[@]}" -d .whl cellpose==4.2.1.1 natsort fastremap imagecodecs roifile fill-voids segment_anything
  ls -l .whl
  exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 fetch|run" >&2; exit 2; }
ls .whl/cellpose-4.2.1.1-*.whl >/dev/null 2>&1 || { echo "no .whl/cellpose-4.2.1.1 wheel: run '$0 fetch' first" >&2; exit 2; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
printf '#!/bin/sh\nPYTHONPATH=/tmp/site exec python3 "$@"\n' > /tmp/cellpose4-python
chmod +x /tmp/cellpose4-python
export CELLPOSE_REF_PYTHON=/tmp/cellpose4-python PYTHONUNBUFFERED=1
out=${OUT:-gpu_results}
mkdir -p "$out"
nvidia-smi -L | tee "$out/device.txt"
python3 benchmarks/bench_engine.py --device cuda --batch 8 2>&1 | tee "$out/engine.txt"
python3 benchmarks/bench_dynamics.py --device cuda --repeats 5 --ref-repeats 3 2>&1 | tee "$out/dynamics.txt"
python3 benchmarks/bench_dynamics.py --device cuda --size 2048 --repeats 3 --ref-repeats 2 2>&1 | tee -a "$out/dynamics.txt"
