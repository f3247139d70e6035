#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU, for a 7-minute budget (420 s, the
# machine's start not counted). Steps run in priority order, each with its own time box,
# and each leaves its log and JSON as soon as it ends, so a run cut off anywhere still
# returns what it measured:
#
#   1. environment, then the Triton GPU tests of both ops (every autotune candidate too)
#   2. attention benchmark at the headline shapes (bf16, batch 2, 16 heads, d128, causal
#      window 4096, L 16k and 32k, fwd and fwd+bwd) against FlexAttention, dense flash
#      SDPA and cuDNN's sliding-window SDPA (when nvidia-cudnn-frontend imports); then
#      L 16k with Gemma2's soft-cap 50 (against FlexAttention's score_mod) and with sinks
#   3. block-diagonal benchmark against torch.bmm, the F.linear loop and grouped_mm
#   4. the CUDA extension build (this GPU's architecture) and its GPU tests
#   5. one end-to-end training-step benchmark
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run               # the same plumbing on CPU at toy sizes (CI)
#
# $OUT (default ./gpu_out) receives few files: summary.md (the step table and every
# benchmark table), steps.jsonl (one line per finished step), results.tar.gz (every log,
# JSON, table and plot so far, rebuilt after each step). The files themselves are in
# $DETAIL (default $OUT/../gpu_check_detail). No step stops the others: a failure is
# recorded and the next step runs. GPU_CHECK_BUDGET (seconds) scales the time boxes.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DETAIL=${DETAIL:-$(dirname "$OUT")/$(basename "$OUT")_detail}
mkdir -p "$DETAIL"
# $PYTHON, else this checkout's .venv (make install), else the machine's python3
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python
[ -z "$PY" ] && PY=$(command -v python3 || command -v python)
BUDGET=${GPU_CHECK_BUDGET:-420}
START=$(date +%s)
STEPS="$OUT/steps.jsonl"
: >"$STEPS"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  DEVICE=cuda
fi
# carried wheels (the GPU machine has no registry): installed aside, never over its own packages
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$DETAIL/pydeps" .whl/*.whl >"$DETAIL/wheels.log" 2>&1
  export PYTHONPATH="$PYTHONPATH:$DETAIL/pydeps"
fi

elapsed() { echo $(( $(date +%s) - START )); }

pack() {  # everything so far into one archive, and the tables into summary.md
  tar -czf "$OUT/results.tar.gz.tmp" -C "$DETAIL" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  {
    echo "# gpu_check $( [ "$DRY" = 1 ] && echo '(dry run, CPU)' ) at $(git rev-parse --short=12 HEAD 2>/dev/null), $(date -u +%FT%TZ)"
    echo
    echo "| step | status | rc | seconds | limit |"
    echo "|---|---|---|---|---|"
    $PY - "$STEPS" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    s = json.loads(line)
    print(f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['limit']} |")
EOF
    for md in "$DETAIL"/*/*.md; do
      [ -f "$md" ] && { echo; cat "$md"; }
    done
  } >"$OUT/summary.md"
}

# step NAME SECONDS COMMAND...: run COMMAND in bash with a time box of SECONDS (scaled to
# the budget, cut to what is left of it), log to $DETAIL/NAME.log, record the outcome
step() {
  local name=$1 limit=$2
  shift 2
  limit=$(( limit * BUDGET / 420 ))
  local left=$(( BUDGET - $(elapsed) - 5 ))
  [ "$limit" -gt "$left" ] && limit=$left
  local status rc t0=$(date +%s)
  if [ "$limit" -lt 10 ]; then
    status="not run: budget spent"; rc=-1
  else
    echo "== [$(elapsed)s] $name (time box ${limit}s)" | tee -a "$OUT/gpu_check.log"
    timeout --kill-after=10 "$limit" bash -c "$*" >"$DETAIL/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out" ;;
      *) status=failed ;;
    esac
  fi
  local secs=$(( $(date +%s) - t0 ))
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit": %d, "at": %d}\n' \
    "$name" "$status" "$rc" "$secs" "$limit" "$(elapsed)" >>"$STEPS"
  echo "   $name: $status (rc $rc, ${secs}s)" | tee -a "$OUT/gpu_check.log"
  tail -n 3 "$DETAIL/$name.log" 2>/dev/null | sed 's/^/   | /' | tee -a "$OUT/gpu_check.log"
  pack
}

PYTEST="$PY -m pytest -v -p no:cacheprovider -rfEs"
if [ "$DRY" = 0 ] && $PY -c "import xdist, pytest_timeout" >/dev/null 2>&1; then
  # Triton compiles on the CPU: 8 workers share the 16 cores while the GPU runs the tests
  PYTEST="$PYTEST -n 8 --timeout=240"
fi

# ----------------------------------------------------------------------------- 1. tests
step environment 15 "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true;
  git rev-parse HEAD || true; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)';
  $PY -m sft_kernels.cli info"
if [ "$DRY" = 1 ]; then
  # a few interpreter tests stand in for the GPU suites; the GPU-only files collect and skip
  step triton_tests 130 "$PYTEST -m 'gpu or interpret' --junitxml=$DETAIL/triton_tests.xml \
    tests/test_attention.py::test_triton_backward_is_deterministic tests/test_block_diag.py::test_triton_pinned_config_runs \
    tests/test_gpu_configs.py"
else
  step triton_tests 130 "$PYTEST -m 'gpu or interpret' --junitxml=$DETAIL/triton_tests.xml \
    tests/test_attention.py tests/test_block_diag.py tests/test_gpu_configs.py tests/test_triton_limits.py"
fi

# ----------------------------------------------------------------------------- 2-3. benchmarks
if [ "$DRY" = 1 ]; then
  SIZE=--toy; MEM=--no-memory; ATTN=sdpa_causal,flex,cudnn,sft_torch
else  # (the PyTorch path and the dense band mask are not timed at 32k: minutes, and known slower)
  SIZE=--headline; MEM=; ATTN=sft_triton,sdpa_causal,flex,cudnn,sft_cuda
fi
mkdir -p "$DETAIL/bench"
step bench_attention 100 "$PY -m sft_kernels.bench.attention --device $DEVICE $SIZE $MEM --out $DETAIL/bench --providers $ATTN"
step bench_block_diag 50 "$PY -m sft_kernels.bench.block_diag --device $DEVICE $SIZE --out $DETAIL/bench \
  --providers sft_auto,sft_triton,bmm,linear_loop,grouped_mm,dense"

# ----------------------------------------------------------------------------- 4. CUDA extension
if [ "$DRY" = 1 ]; then
  # the build itself is CI's tests/test_cuda_build.py; here: the command line parses and
  # the GPU tests collect (and skip without a GPU)
  step cuda_build 25 "SFT_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 $PY setup.py --name && \
    $PY -c 'from sft_kernels import _build; print(_build.gencode_flags(\"9.0\"), _build.sources())'"
else
  CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  step cuda_build 75 "TORCH_CUDA_ARCH_LIST=$CAP SFT_KERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace"
fi
step cuda_tests 25 "$PYTEST -m gpu --junitxml=$DETAIL/cuda_tests.xml tests/test_cuda_backend.py"

# ----------------------------------------------------------------------------- 5. end to end
if [ "$DRY" = 1 ]; then
  step e2e 25 "$PY -m sft_kernels.bench.e2e --device cpu --toy --no-memory --out $DETAIL/bench"
else
  step e2e 25 "$PY -m sft_kernels.bench.e2e --device cuda --lengths 16384 --out $DETAIL/bench"
fi

echo "== [$(elapsed)s] done; $OUT: summary.md, steps.jsonl, results.tar.gz" | tee -a "$OUT/gpu_check.log"
cat "$OUT/summary.md"
# exit status: 0 when every step passed (a dry run in CI must pass entirely)
! grep -qv '"status": "ok"' "$STEPS"
