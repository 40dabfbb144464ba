#!/usr/bin/env bash
# One-command GPU acceptance check (issue 11): on a machine with one NVIDIA GPU, in at most 8 minutes
#   1. the GPU, its driver, torch and the Python packages (wheels from .whl/ where missing; no network)
#   2. SDPA on CUDA: the default backend against the math backend on the decode and prefill shapes
#   3. the golden end-to-end tests through a CUDA server in float32 (actions exact), with the
#      captured decode graphs on (and the start-up measurement choosing graphs or eager)
#   4. weight updates (UpdateModel, PushWeights) on the device: decode steps after an update
#      give the new weights' scores, captured graphs included
#   5. bfloat16: the share of the golden greedy actions a bfloat16 server agrees with
#   6. bench/run.py --device cuda --quick --shapes mid,large (b up to 1,024 sessions)
# and prints one table (card, driver, torch, every figure) and writes it beside the bench results.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from a checkout (or a copy of one)
#   OUT=dir bash scripts/gpu_check.sh         # where the table, logs and JSON go (default bench/results/gpu-check-<time>)
#
# Without a CUDA GPU it stops within seconds with exit code 2 and says why. MOUSE_GPU_CHECK_DEVICE=cpu
# runs the same steps on the CPU (tests/ops/test_gpu_check.py does, with MOUSE_GPU_CHECK_TESTS and
# MOUSE_GPU_CHECK_UPDATE_TESTS selecting a few golden and update tests (pytest -k expressions) and
# MOUSE_GPU_CHECK_BENCH_ARGS a tiny bench). Exit code 0 when the golden and update tests passed
# and the bench ran.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${MOUSE_GPU_CHECK_DEVICE:-cuda}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/bench/results/gpu-check-$STAMP}
mkdir -p "$OUT"
# Python: the project's venv when there is one, else the machine's python3 (the lent GPU image).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" >&2; }
fail() { say "FAILED: $*"; exit "${2:-1}"; }

# 1. The GPU first: fail fast and clearly without one.
if [ "$DEVICE" = cuda ]; then
  command -v nvidia-smi >/dev/null 2>&1 || fail "no NVIDIA GPU here (nvidia-smi not found); this check needs one" 2
  nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no GPU (driver not loaded?)" 2
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || fail "torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)) sees no CUDA device" 2
fi

# Carried wheels (no network on the GPU machine): install them for this run only. Not for the CPU
# stand-in, which runs in the project's venv (wheels for the GPU machine's Python may not fit it).
if [ "$DEVICE" = cuda ] && compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${MOUSE_GPU_CHECK_SITE:-/tmp/mouse-gpu-check-site}
  say "installing $(ls .whl/*.whl | wc -l) carried wheel(s) into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || fail "installing the wheels in .whl/ failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project from this tree, uninstalled.
export PYTHONPATH="$ROOT:$ROOT/server:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PY" scripts/gpu_check.py probe --device "$DEVICE" --out "$OUT/probe.json" || fail "missing packages (see above)"

# 2. SDPA backends on the model's shapes.
"$PY" scripts/gpu_check.py sdpa --device "$DEVICE" --out "$OUT/sdpa.json" 2>&1 | tee "$OUT/sdpa.log" >&2

# 3, 4 and 5 side by side (each starts its own server on the device): golden end-to-end tests in
# float32 with graphs on; weight updates, whose decode steps after UpdateModel/PushWeights replay
# graphs captured before it and must read the new weights (scores against an in-process
# computation); bfloat16's agreement with the golden greedy actions.
say "bfloat16 agreement and weight updates (in the background)"
timeout 170 "$PY" scripts/gpu_check.py agreement --device "$DEVICE" --dtype bfloat16 --out "$OUT/bf16.json" \
  >"$OUT/bf16.log" 2>&1 &
BF16_PID=$!
MOUSE_TEST_DEVICE=$DEVICE MOUSE_TEST_DTYPE=float32 timeout 170 "$PY" -m pytest -q -p no:cacheprovider \
  tests/server/test_updates.py -o addopts="" --junitxml="$OUT/updates.xml" \
  -k "${MOUSE_GPU_CHECK_UPDATE_TESTS:-refill_rebuilds or keep_extends or reset_starts or pushed_weights}" >"$OUT/updates.log" 2>&1 &
UPDATES_PID=$!
trap 'kill "$BF16_PID" "$UPDATES_PID" 2>/dev/null' EXIT  # not left running if this script is stopped
say "golden end-to-end tests on $DEVICE, float32"
MOUSE_TEST_DEVICE=$DEVICE MOUSE_TEST_DTYPE=float32 timeout 170 "$PY" -m pytest -q -p no:cacheprovider \
  tests/server/test_golden_e2e.py -o addopts="" --junitxml="$OUT/golden_e2e.xml" -k "${MOUSE_GPU_CHECK_TESTS:-}" \
  >"$OUT/golden_e2e.log" 2>&1
echo $? >"$OUT/golden_e2e.rc"
tail -3 "$OUT/golden_e2e.log" >&2
wait "$UPDATES_PID"
tail -3 "$OUT/updates.log" >&2
wait "$BF16_PID" || say "bfloat16 agreement failed (see $OUT/bf16.log)"

# 6. The bench.
say "bench/run.py --device $DEVICE --quick"
BENCH_ARGS=${MOUSE_GPU_CHECK_BENCH_ARGS:---quick --shapes mid,large --skip-reference}
# shellcheck disable=SC2086
timeout 270 "$PY" bench/run.py --device "$DEVICE" $BENCH_ARGS --out "$OUT/bench.json" >"$OUT/bench.md" 2>"$OUT/bench.log" \
  || say "the bench failed (see $OUT/bench.log)"

"$PY" scripts/gpu_check.py table --out "$OUT" | tee "$OUT/table.md"
