#!/usr/bin/env bash
# The GPU check of issue #23: one command prints the issue's whole table, ours against the published
# Cellpose 4.2.1.1 (C4) and Cellpose 3.1.1.2 (C3) on the same GPU, same weights and inputs, then runs the
# `pytest -m gpu` suite. Prints numbers and ratios (and which of the issue's limits are met), no pass/fail.
#
#   bash benchmarks/gpu_check.sh fetch     # on a connected machine, in the repo root: both reference packages and
#                                          # the wheels they need that a CUDA image with PyTorch usually lacks,
#                                          # into .whl/ (git-ignored, ~150 MB); PYVER (default 3.12) is the CUDA
#                                          # machine's Python
#   bash benchmarks/gpu_check.sh run       # on the CUDA machine (a copy of the repo with .whl/, the project's
#                                          # requirements installed): installs C4 into /tmp/site and C3 into
#                                          # /tmp/site3 for the references only (the project never imports
#                                          # cellpose), runs every stage, prints the table (under 8 min)
#   bash benchmarks/gpu_check.sh selftest  # any machine, on the CPU with tiny sizes (a few minutes): the same
#                                          # chain, to check this script without a GPU
#
# Each stage runs under its own time cap and the whole run under BUDGET seconds (default 450: 8 minutes with
# the install); a stage that fails, or that its cap stops, becomes a row saying so and the others go on.
# Output: $OUT (default gpu_results/, gpu_results_selftest/ for selftest): per stage <stage>.txt (what it
# printed), <stage>.jsonl (its results), <stage>.rc (exit status); table.md (the table).
# Environment: PYTHON (default python3), THREADS (CPU threads, default: up to 8), BUDGET, and for the
# references CELLPOSE4_PYTHON / CELLPOSE3_PYTHON (a Python with that package; selftest uses them, or a previous
# run's /tmp/cellpose4-python and /tmp/cellpose3-python; without one the Cellpose columns say so).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
PY=${PYTHON:-python3}

fetch() {
  mkdir -p .whl
  local exclude plat
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  plat=(--no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
  # What the lent H200 machine's image lacks (its Python has opencv-python-headless, numba, llvmlite, tqdm and
  # pytest): 3 MB, so the checkout (~50 MB) and .whl/ stay under the 64 MiB a device call carries.
  # FETCH_ALL=1 adds those for a CUDA machine without them (150 MB; copy them over yourself).
  local extra=()
  [ -n "${FETCH_ALL:-}" ] && extra=(opencv-python-headless tqdm numba llvmlite pytest pluggy iniconfig packaging pygments)
  # two calls: pip refuses two versions of one package in one call
  python3 -m pip download -q "${plat[@]}" cellpose==4.2.1.1 natsort fastremap roifile fill-voids segment_anything \
    "${extra[@]}" || exit 1
  python3 -m pip download -q "${plat[@]}" cellpose==3.1.1.2 || exit 1
  ls -l .whl
  du -sh .whl
}

# wheel files of .whl/ for the packages in "$@" (pip names) whose module the CUDA machine's Python lacks
missing_wheels() {
  local pkg mod
  for pkg in "$@"; do
    mod=${pkg%%:*}; pkg=${pkg#*:}
    "$PY" -c "import $mod" 2>/dev/null || ls .whl/"$pkg"-*.whl
  done
}

# install_reference TARGET WHEEL... : the wheels into TARGET, and TARGET's Python wrapper /tmp/<name>-python
install_reference() {
  local target=$1 wrapper=$2; shift 2
  rm -rf "$target"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" || return 1
  printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$target" "$(command -v "$PY")" > "$wrapper"
  chmod +x "$wrapper"
}

# check_reference PYTHON IMPORTS : prints the package's version, or why it cannot be used (then returns 1)
check_reference() {
  local py=$1 imports=$2 err
  if err=$("$py" -c "import cellpose, $imports; print('cellpose', cellpose.version)" 2>&1); then
    echo "reference $py: ${err##*$'\n'}"
  else
    echo "reference $py unusable, its Cellpose column stays empty: ${err##*$'\n'}" >&2
    return 1
  fi
}

# stage NAME CAP COMMAND... : run COMMAND under min(CAP, what is left of BUDGET), output to $out/NAME.txt,
# exit status to $out/NAME.rc ("skipped" when under 15 s of the budget are left)
stage() {
  local name=$1 cap=$2 left
  shift 2
  left=$(( budget - (SECONDS - start) ))
  rm -f "$out/$name".{jsonl,txt,rc}
  if (( left < 15 )); then
    echo skipped > "$out/$name.rc"
    echo "== $name: skipped, the time budget (${budget} s) is spent"
    return
  fi
  (( cap > left )) && cap=$left
  echo "== $name (at most ${cap} s)"
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$out/$name.txt"
  echo "${PIPESTATUS[0]}" > "$out/$name.rc"
}

case "$mode" in
  fetch) fetch; exit ;;
  run) dev=cuda; out=${OUT:-gpu_results}; budget=${BUDGET:-450} ;;
  selftest) dev=cpu; out=${OUT:-gpu_results_selftest}; budget=${BUDGET:-420} ;;
  *) echo "usage: $0 fetch|run|selftest" >&2; exit 2 ;;
esac
"$PY" -c "import cellpose_web.models, tifffile, scipy" || { echo "the project's requirements are missing: $PY -m pip install -r requirements.txt" >&2; exit 2; }
mkdir -p "$out"
T=${THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
c4=${CELLPOSE4_PYTHON:-} c3=${CELLPOSE3_PYTHON:-}
if [ "$mode" = run ]; then
  ls .whl/cellpose-4.2.1.1-*.whl .whl/cellpose-3.1.1.2-*.whl >/dev/null 2>&1 || { echo "no reference wheels in .whl/: run '$0 fetch' first" >&2; exit 2; }
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here (selftest runs on the CPU)')" || exit 2
  common=(natsort:natsort fastremap:fastremap roifile:roifile fill_voids:fill_voids cv2:opencv_python_headless
          tqdm:tqdm)
  if [ -z "$c4" ]; then
    install_reference /tmp/site /tmp/cellpose4-python .whl/cellpose-4.2.1.1-*.whl .whl/segment_anything-*.whl \
      $(missing_wheels "${common[@]}") && c4=/tmp/cellpose4-python
  fi
  if [ -z "$c3" ]; then
    install_reference /tmp/site3 /tmp/cellpose3-python .whl/cellpose-3.1.1.2-*.whl \
      $(missing_wheels "${common[@]}" numba:numba llvmlite:llvmlite) && c3=/tmp/cellpose3-python
  fi
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    install_reference /tmp/site-pytest /tmp/pytest-python $(missing_wheels pytest:pytest pluggy:pluggy \
      iniconfig:iniconfig packaging:packaging pygments:pygments) && export PYTHONPATH=$PYTHONPATH:/tmp/site-pytest
  fi
  nvidia-smi -L | head -1 > "$out/device.txt"
else
  [ -z "$c4" ] && [ -x /tmp/cellpose4-python ] && c4=/tmp/cellpose4-python
  [ -z "$c3" ] && [ -x /tmp/cellpose3-python ] && c3=/tmp/cellpose3-python
  echo "cpu (selftest: tiny sizes, the tiny Cellpose-SAM; the numbers say nothing about a GPU)" > "$out/device.txt"
fi
[ -n "$c4" ] && { check_reference "$c4" "cellpose.vit, cellpose.train" || c4=; }
[ -n "$c3" ] && { check_reference "$c3" "cellpose.models, cellpose.train" || c3=; }
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$out/device.txt"
start=$SECONDS
j() { echo "--json=$out/$1.jsonl"; }
if [ "$mode" = run ]; then
  W=$out/cpsam_vitl_random.pth
  n=30 sides=(450 700) dyn=(1024 5 3 2048 3 2) train_sam=(--epochs 4 --nimg 64 --batch 8)
  fw=(8 64) ev=(1024 2048 4096) ev3=(32 512) legacy_train=()
  stage weights 40 "$PY" benchmarks/bench_engine.py --make-weights "$W"
else
  W=tests/fixtures/reference/tiny_cpsam.pth
  n=3 sides=(160 200) dyn=(256 2 1 512 1 1) train_sam=(--epochs 1 --nimg 4 --batch 2)
  fw=(2 4) ev=(256 512) ev3=(4 32) legacy_train=(--epochs 1 --nimg 8 --batch 4)
fi
# the correctness suite first: the timing stages after it may use up the budget
stage pytest_gpu 60 env CELLPOSE_WEB_TEST_DEVICE="$dev" "$PY" -m pytest -m gpu -q tests/test_gpu.py
stage legacy_eval 75 env CELLPOSE_REF_PYTHON="$c3" "$PY" benchmarks/bench_cp_cyto.py --table --device "$dev" \
  --n "$n" --min-side "${sides[0]}" --max-side "${sides[1]}" --threads "$T" "$(j legacy_eval)"
stage dynamics_1024 40 env CELLPOSE_REF_PYTHON="$c4" "$PY" benchmarks/bench_dynamics.py --device "$dev" \
  --size "${dyn[0]}" --repeats "${dyn[1]}" --ref-repeats "${dyn[2]}" --threads "$T" "$(j dynamics_1024)"
stage dynamics_2048 50 env CELLPOSE_REF_PYTHON="$c4" "$PY" benchmarks/bench_dynamics.py --device "$dev" \
  --size "${dyn[3]}" --repeats "${dyn[4]}" --ref-repeats "${dyn[5]}" --threads "$T" "$(j dynamics_2048)"
stage cpsam_train 110 env CELLPOSE_REF_PYTHON="$c4" "$PY" benchmarks/bench_train_sam.py --device "$dev" \
  --weights "$W" "${train_sam[@]}" --repeats 1 --precisions auto float32 "$(j cpsam_train)"
engine=(env CELLPOSE_REF_PYTHON="$c4" "$PY" benchmarks/bench_engine.py --table --device "$dev" --weights "$W"
        --threads "$T")
stage vit_forward 45 "${engine[@]}" --repeat 3 --forward-batches "${fw[@]}" --eval-sizes --eval-3d 0 0 \
  "$(j vit_forward)"
stage cpsam_eval_2d 60 "${engine[@]}" --forward-batches --eval-sizes "${ev[@]}" --eval-3d 0 0 "$(j cpsam_eval_2d)"
stage cpsam_eval_3d 75 "${engine[@]}" --forward-batches --eval-sizes --eval-3d "${ev3[@]}" "$(j cpsam_eval_3d)"
stage legacy_train 45 env CELLPOSE3_REF_PYTHON="${c3:-none}" "$PY" benchmarks/bench_train.py --device "$dev" \
  --variants float32 --repeats 1 --threads "$T" "${legacy_train[@]}" "$(j legacy_train)"
rm -f "$out/cpsam_vitl_random.pth"
echo
"$PY" benchmarks/gpu_table.py "$out" | tee "$out/table.md"
echo "pytest -m gpu: $(grep -E ' in [0-9.]+s' "$out/pytest_gpu.txt" 2>/dev/null | tail -1 | tr -d '=' | xargs)"
echo "(stages took $(( SECONDS - start )) s; per-stage output in $out/)"
