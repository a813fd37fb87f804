#!/usr/bin/env bash
# xrnn's GPU check: one command on a machine with an NVIDIA GPU, at most 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere in this checkout
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same stages against the CPU, tiny sizes (plumbing)
#
# Stages, in order, each under its own time limit (seconds; the limits add up to 460, and the
# script also stops starting stages once 470 s have passed, so the whole stays under 8 minutes):
#   1. tests     (170 s) the whole test suite; its `device` fixture includes cuda:0, so every
#                        backend-generic test also runs on CuPy (pytest-xdist used when installed)
#   2. equality  ( 45 s) fused CUDA kernels vs the portable path (tests/test_cuda_kernels.py) with
#                        XRNN_REQUIRE_GPU=1: a GPU test that would skip fails instead
#   3. train     (110 s) `xrnn train --device cuda` for 2,000 steps with the README's default model
#                        (2-layer LSTM, 128 units, 50x50 batches, Adam, clipping at 5) on the
#                        embedded corpus: time per step and validation loss, then
#                        `xrnn sample --device cpu` on its checkpoint
#   4. bench     (135 s) the GPU rows of benchmarks/bench.py: xrnn fused and xrnn portable (CuPy)
#                        vs torch with cuDNN vs xrnn's NumPy path, training step (forward, loss,
#                        BPTT, clipping, Adam) and forward, seed / char-rnn / medium / large,
#                        LSTM and GRU, float32; peak GPU memory and host syncs per step
#
# Records: benchmarks/results/gpu-check-<gpu>-<UTC time>/ (one log per stage, gpu.txt with
# nvidia-smi and CuPy's view of the device, summary.md and summary.json), and bench.py's
# benchmarks/results/<gpu>-cuda-<threads>t-<date>.json and latest-gpu.md. --dry-run writes to a
# temporary directory (or $XRNN_GPU_CHECK_OUT) and never into benchmarks/results/.
# Exit status: 0 when every stage passed, 1 otherwise (summary.md says which).
#
# Needs: python3 with numpy, cupy (matching the CUDA driver), torch with CUDA, pytest, and
# array-api-compat and array-api-strict. xrnn itself need not be installed (PYTHONPATH is set).
# PYTHON=/path/to/python overrides the interpreter; XRNN_GPU_CHECK_WORKERS=N sets stage 1's pytest-xdist
# workers (default 8 when pytest-xdist is installed; 0 runs the suite in one process).
#
# Missing wheels on a machine without internet access (array-api-compat, array-api-strict are
# pure Python; any version the project accepts will do):
#   on a machine with internet, in this checkout (.whl/ is in .gitignore):
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl array-api-compat array-api-strict
#   copy the checkout with its .whl/ folder to the GPU machine; there, either install them:
#     python3 -m pip install --no-index --find-links .whl array-api-compat array-api-strict
#   or just run this script: when they do not import and .whl/ exists, it installs them into a
#   scratch folder (pip install --no-index --no-deps --target) and puts it on PYTHONPATH.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown option $1 (expected --dry-run or nothing)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS
TOTAL_LIMIT=470  # seconds after which no further stage starts
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)

# -- the missing wheels ------------------------------------------------------------------------
if ! "$PY" -c "import array_api_compat, array_api_strict" 2>/dev/null; then
  if [ -d "$ROOT/.whl" ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/xrnn-site.XXXXXX")
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ROOT"/.whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
  "$PY" -c "import array_api_compat, array_api_strict" 2>/dev/null || {
    echo "gpu_check.sh: array-api-compat / array-api-strict do not import; see this script's header" >&2; exit 2; }
fi

# -- the GPU and where the records go ----------------------------------------------------------
if [ "$DRY" = 1 ]; then
  GPU_NAME="dry-run-cpu"
  OUT_BASE=${XRNN_GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/xrnn-gpu-check.XXXXXX")}
else
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  [ -n "$GPU_NAME" ] || GPU_NAME=$("$PY" -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print(p['name'].decode() if isinstance(p['name'], bytes) else p['name'])" 2>/dev/null)
  [ -n "$GPU_NAME" ] || { echo "gpu_check.sh: no NVIDIA GPU found (nvidia-smi and CuPy both failed); try --dry-run" >&2; exit 2; }
  OUT_BASE="$ROOT/benchmarks/results"
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
RUN="$OUT_BASE/gpu-check-$SLUG-$STAMP"
mkdir -p "$RUN" || exit 2
{
  echo "gpu_check.sh at $STAMP, dry run: $DRY"
  echo "checkout: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  if [ "$DRY" = 0 ]; then
    nvidia-smi 2>&1 || true
    "$PY" - <<'EOF' 2>&1 || true
import json, cupy
p = cupy.cuda.runtime.getDeviceProperties(0)
print(json.dumps({"name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
                  "total_memory_bytes": p["totalGlobalMem"], "multiprocessors": p["multiProcessorCount"],
                  "compute_capability": f"{p['major']}.{p['minor']}", "cupy": cupy.__version__,
                  "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                  "cuda_driver": cupy.cuda.runtime.driverGetVersion()}))
EOF
  fi
  "$PY" -c "import sys, numpy; print('python', sys.version.split()[0], 'numpy', numpy.__version__)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" 2>&1 || true
} > "$RUN/gpu.txt"
echo "gpu_check: $GPU_NAME; records in $RUN"

# -- stages ------------------------------------------------------------------------------------
SUMMARY_ROWS=()
FAILED=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local elapsed=$((SECONDS - START))
  local log="$RUN/$name.log"
  if [ "$elapsed" -ge "$TOTAL_LIMIT" ]; then
    echo "[$elapsed s] $name: not started (the 8-minute budget is spent)" | tee "$log"
    SUMMARY_ROWS+=("$name|not started|0|$log")
    FAILED=1
    return
  fi
  local left=$((TOTAL_LIMIT - elapsed + 10))
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$elapsed s] $name: start (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  local status="passed"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT after ${limit} s"; FAILED=1
  elif [ "$rc" != 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
  echo "[$((SECONDS - START)) s] $name: $status in ${took} s; last lines:"
  tail -n 5 "$log" | sed 's/^/    /'
  SUMMARY_ROWS+=("$name|$status|$took|$log")
}

XDIST=()
WORKERS=${XRNN_GPU_CHECK_WORKERS:-8}  # pytest-xdist workers for stage 1 (0: one process)
if [ "$DRY" = 0 ] && [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$WORKERS")
fi

if [ "$DRY" = 1 ]; then
  TESTS=(tests/test_kernels.py -k "dispatch or signatures")
  EQUALITY=(tests/test_cuda_kernels.py -k "dispatch or signatures or package_data")
  TRAIN_ARGS=(--device cpu --steps 20 --hidden-size 16 --batch-size 4 --seq-len 10 --eval-every 10 --sample-every 0)
  BENCH_ARGS=(--device cuda --dry-run --smoke --shapes seed char-rnn --threads 1 --out "$RUN/bench")
else
  TESTS=(tests)
  EQUALITY=(tests/test_cuda_kernels.py tests/test_kernels.py)
  TRAIN_ARGS=(--device cuda --steps 2000)
  THREADS=$(nproc 2>/dev/null || echo 4)
  [ "$THREADS" -gt 16 ] && THREADS=16
  BENCH_ARGS=(--device cuda --threads "$THREADS" --repeats 3 --out "$ROOT/benchmarks/results")
fi

stage 1-tests 170 "$PY" -m pytest -q --maxfail=25 -p no:cacheprovider -rs "${XDIST[@]}" "${TESTS[@]}"
stage 2-equality 45 env XRNN_REQUIRE_GPU=$((1 - DRY)) "$PY" -m pytest -q -p no:cacheprovider -rs "${EQUALITY[@]}"

train_and_sample() {
  local t0=$SECONDS
  "$PY" -m xrnn train "${TRAIN_ARGS[@]}" --out "$RUN/train" --overwrite --progress lines --log-every 100 || return $?
  echo "RESULT xrnn train took $((SECONDS - t0)) s of wall time (start-up, kernel compilation, validation, samples, saves included)"
  "$PY" -m xrnn info --json "$RUN/train/last.ckpt" > "$RUN/train/info.json" || return $?
  "$PY" - "$RUN/train/info.json" <<'EOF' || return $?
import json, sys
d = json.load(open(sys.argv[1]))
step, secs = d["step"], d["training_seconds"]
print(f"RESULT steps {step}, {secs:.1f} s in training steps, {1e3 * secs / max(step, 1):.2f} ms per step "
      f"(the trainer's clock: steps only, validation and samples excluded), validation loss "
      f"{d['last_val_loss']:.4f} nats (best {d['best_val_loss']:.4f} at step {d['best_val_step']})")
EOF
  local sample
  sample=$("$PY" -m xrnn sample "$RUN/train/last.ckpt" --device cpu --length 200 --seed 1) || return $?
  [ -n "$sample" ] || { echo "xrnn sample printed nothing"; return 1; }
  printf 'SAMPLE (cpu, from the checkpoint):\n%s\n' "$sample"
}
stage 3-train 110 bash -c "$(declare -p PY TRAIN_ARGS RUN); $(declare -f train_and_sample); train_and_sample"
stage 4-bench 135 "$PY" benchmarks/bench.py "${BENCH_ARGS[@]}"

# -- summary -----------------------------------------------------------------------------------
{
  echo "# xrnn GPU check: $GPU_NAME, $STAMP"
  echo
  [ "$DRY" = 1 ] && echo "DRY RUN: the CPU stood in for the GPU; nothing here is a GPU result." && echo
  echo "Total $((SECONDS - START)) s. Device details: gpu.txt."
  echo
  echo "| stage | result | seconds | log |"
  echo "|---|---|---:|---|"
  for row in "${SUMMARY_ROWS[@]}"; do
    IFS='|' read -r n s t l <<< "$row"
    echo "| $n | $s | $t | $(basename "$l") |"
  done
  echo
  grep -h '^RESULT' "$RUN/3-train.log" 2>/dev/null | sed 's/^RESULT /Training: /'
  tail -n 3 "$RUN/1-tests.log" 2>/dev/null | sed 's/^/    /'
} > "$RUN/summary.md"
"$PY" - "$RUN" "${SUMMARY_ROWS[@]}" <<'EOF'
import json, sys
run, rows = sys.argv[1], sys.argv[2:]
stages = [dict(zip(("stage", "result", "seconds", "log"), r.split("|"))) for r in rows]
json.dump({"run": run, "stages": stages}, open(f"{run}/summary.json", "w"), indent=1)
EOF
cat "$RUN/summary.md"
exit "$FAILED"
