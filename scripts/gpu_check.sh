#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU, for a 7-minute budget (420 s, the
# machine's start not counted). The steps run in the order of PLAN below, each in its time
# box, each leaving its log and JSON as soon as it ends, so a run cut off anywhere still
# returns what it measured. Correctness first, then the headline numbers, then the rest:
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --plan                  # the steps, their time boxes and the slack
#   bash scripts/gpu_check.sh --dry-run               # the same plumbing on CPU at toy sizes (CI)
#
# $OUT (default ./gpu_out) receives few files: summary.md (the step table and every
# benchmark table), steps.jsonl (one line per step), results.tar.gz (every log, JSON, table
# and plot so far, rebuilt after each step). The files themselves are in $DETAIL (default
# $OUT/../gpu_check_detail). No step stops the others, except that a step whose `needs`
# failed is not run. GPU_CHECK_BUDGET (seconds) scales the time boxes (the dry run's test
# scales them up: a shared CI machine is slow).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# ----------------------------------------------------------------------------- the plan
# One line per step, in run order: name, time box in seconds (of the 420 s budget), the
# steps it needs (",": none), what it measures. Each box is sized from a cold start (empty
# Triton and extension caches): Triton compiles one config per kernel in 0.9-2.2 s (sm_90,
# Triton 3.6, measured on a 2-core CPU with the compile check), autotuning compiles each
# candidate (3-4 per kernel). docs/gpu-check.md has the reasoning per step.
PLAN="
environment      10 ,          GPU, driver, versions, sft-kernels info
smoke            60 ,          every op fwd+bwd vs float64 per element, first-choice configs pinned (~25 compiles)
bench_attention  85 ,          headline attention (bf16 d128 w4096 L16k/32k, softcap, sinks) vs flash SDPA, FlexAttention, cuDNN
bench_block_diag 40 ,          block-diagonal vs bmm, F.linear loop, grouped_mm, dense (bf16/fp16, g 4-32)
cuda_build       60 ,          the CUDA extension for this GPU's architecture (6 translation units, MAX_JOBS=16)
cuda_tests       20 cuda_build CUDA backend GPU tests against float64
cuda_bench       20 cuda_build sft_cuda beside sft_triton at the headline shapes (attention, block-diagonal)
triton_tests     40 ,          the Triton GPU suites: every autotune candidate pinned once, property tests at 3 examples
e2e              25 ,          one training step of a small Mistral at L=16k, sdpa vs sft_sliding_window
"
BUDGET_BASE=420
KILL_GRACE=2   # seconds between a time box's SIGTERM and its SIGKILL
SLACK_MIN=30   # what the boxes and kill graces must leave of the budget (installs, packing)

plan_lines() { echo "$PLAN" | sed '/^[[:space:]]*$/d'; }

print_plan() {
  local total=0 n=0
  printf '%-17s %5s  %-11s %s\n' step limit needs measures
  while read -r name secs needs what; do
    printf '%-17s %4ss  %-11s %s\n' "$name" "$secs" "${needs/#,/-}" "$what"
    total=$(( total + secs )); n=$(( n + 1 ))
  done < <(plan_lines)
  local slack=$(( BUDGET_BASE - total - n * KILL_GRACE ))
  echo "total ${total}s in ${n} steps + ${n} x ${KILL_GRACE}s kill grace; budget ${BUDGET_BASE}s; slack ${slack}s (needs >= ${SLACK_MIN}s)"
  for name in $(plan_lines | awk '{print $1}'); do
    echo "command $name: $(command_for "$name")"
  done
  [ "$slack" -ge "$SLACK_MIN" ]
}

DRY=0
PLAN_ONLY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    *) echo "usage: $0 [--dry-run | --plan]" >&2; exit 2 ;;
  esac
done

# $PYTHON, else this checkout's .venv (make install), else the machine's python3
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python
[ -z "$PY" ] && PY=$(command -v python3 || command -v python)
OUT=${OUT:-./gpu_out}
DETAIL_DEFAULT=1
[ -n "${DETAIL:-}" ] && DETAIL_DEFAULT=0

PYTEST="$PY -m pytest -v -p no:cacheprovider -rfEs --durations=0"
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SIZE=--toy; MEM=--no-memory
else
  DEVICE=cuda; SIZE=--headline; MEM=
fi

# command_for NAME: the step's command line (also printed by --plan)
command_for() {
  case "$1" in
    environment)
      echo "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true;" \
           "git rev-parse HEAD || true; $PY -c 'import sys, torch, triton; print(sys.version);" \
           "print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)';" \
           "$PY -m sft_kernels.cli info" ;;
    smoke)
      echo "$PYTEST --junitxml=\$DETAIL/smoke.xml tests/test_gpu_smoke.py" ;;
    bench_attention)  # the PyTorch path and the dense band mask are not timed at 32k (minutes, known slower)
      if [ "$DRY" = 1 ]; then providers=sdpa_causal,flex,cudnn,sft_torch; else providers=sft_triton,sdpa_causal,flex,cudnn; fi
      echo "$PY -m sft_kernels.bench.attention --device $DEVICE $SIZE $MEM --out \$DETAIL/bench --providers $providers" ;;
    bench_block_diag)
      echo "$PY -m sft_kernels.bench.block_diag --device $DEVICE $SIZE --out \$DETAIL/bench" \
           "--providers sft_auto,sft_triton,bmm,linear_loop,grouped_mm,dense" ;;
    cuda_build)
      if [ "$DRY" = 1 ]; then
        # the build itself is CI's tests/test_cuda_build.py and scripts/wheel_check.sh; here:
        # the command line parses and the sources are found
        echo "SFT_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 $PY setup.py --name &&" \
             "$PY -c 'from sft_kernels import _build; print(_build.gencode_flags(\"9.0\"), _build.sources())'"
      else
        echo "TORCH_CUDA_ARCH_LIST=\$CAP SFT_KERNELS_BUILD_CUDA=1 MAX_JOBS=\${MAX_JOBS:-16} $PY setup.py build_ext --inplace"
      fi ;;
    cuda_tests)
      echo "$PYTEST -m gpu --junitxml=\$DETAIL/cuda_tests.xml tests/test_cuda_backend.py" ;;
    cuda_bench)
      echo "$PY -m sft_kernels.bench.attention --device $DEVICE $SIZE $MEM --no-competing --out \$DETAIL/bench_cuda" \
           "--providers sft_cuda,sft_triton && $PY -m sft_kernels.bench.block_diag --device $DEVICE $SIZE" \
           "--out \$DETAIL/bench_cuda --providers sft_cuda,sft_triton" ;;
    triton_tests)
      if [ "$DRY" = 1 ]; then  # a few interpreter tests stand in; the GPU-only files collect and skip
        echo "SFT_KERNELS_MAX_EXAMPLES=3 $PYTEST -m 'gpu or interpret' --junitxml=\$DETAIL/triton_tests.xml" \
             "tests/test_attention.py::test_triton_backward_is_deterministic" \
             "tests/test_block_diag.py::test_triton_pinned_config_runs tests/test_gpu_configs.py"
      else
        echo "SFT_KERNELS_MAX_EXAMPLES=3 $PYTEST -m 'gpu or interpret' --junitxml=\$DETAIL/triton_tests.xml" \
             "tests/test_gpu_configs.py tests/test_triton_limits.py tests/test_block_diag.py tests/test_attention.py"
      fi ;;
    e2e)
      if [ "$DRY" = 1 ]; then
        echo "$PY -m sft_kernels.bench.e2e --device cpu --toy --no-memory --out \$DETAIL/bench"
      else
        echo "$PY -m sft_kernels.bench.e2e --device cuda --lengths 16384 --out \$DETAIL/bench"
      fi ;;
    *) echo "false  # no command for $1" ;;
  esac
}

if [ "$PLAN_ONLY" = 1 ]; then
  print_plan
  exit $?
fi
print_plan >/dev/null || { echo "gpu_check: the time boxes leave under ${SLACK_MIN}s of slack (--plan)" >&2; exit 2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ "$DETAIL_DEFAULT" = 1 ] && DETAIL=$(dirname "$OUT")/$(basename "$OUT")_detail
mkdir -p "$DETAIL"
export DETAIL
BUDGET=${GPU_CHECK_BUDGET:-$BUDGET_BASE}
START=$(date +%s)
STEPS="$OUT/steps.jsonl"
: >"$STEPS"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  export CAP=9.0
else
  CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  export CAP
  if $PY -c "import xdist, pytest_timeout" >/dev/null 2>&1; then
    # Triton compiles on the CPU: 8 workers share the 16 cores while the GPU runs the tests
    PYTEST="$PYTEST -n 8 --timeout=240"
  fi
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

declare -A STATUS
# step NAME SECONDS NEEDS: run the step's command with a time box of SECONDS (scaled to the
# budget, cut to what is left of it), log to $DETAIL/NAME.log, record the outcome
step() {
  local name=$1 limit=$2 needs=$3
  limit=$(( limit * BUDGET / BUDGET_BASE ))
  local left=$(( BUDGET - $(elapsed) - 5 ))
  [ "$limit" -gt "$left" ] && limit=$left
  local status rc t0=$(date +%s) missing=""
  for n in ${needs//,/ }; do
    [ "${STATUS[$n]:-}" = ok ] || missing="$missing $n"
  done
  if [ -n "$missing" ]; then
    status="not run: needs$missing"; rc=-1
  elif [ "$limit" -lt 10 ]; then
    status="not run: budget spent"; rc=-1
  else
    echo "== [$(elapsed)s] $name (time box ${limit}s)" | tee -a "$OUT/gpu_check.log"
    timeout --kill-after=$KILL_GRACE "$limit" bash -c "$(command_for "$name")" >"$DETAIL/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out" ;;
      *) status=failed ;;
    esac
  fi
  STATUS[$name]=$status
  local secs=$(( $(date +%s) - t0 ))
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit": %d, "at": %d}\n' \
    "$name" "$status" "$rc" "$secs" "$limit" "$(elapsed)" >>"$STEPS"
  echo "   $name: $status (rc $rc, ${secs}s)" | tee -a "$OUT/gpu_check.log"
  tail -n 3 "$DETAIL/$name.log" 2>/dev/null | sed 's/^/   | /' | tee -a "$OUT/gpu_check.log"
  pack
}

mkdir -p "$DETAIL/bench" "$DETAIL/bench_cuda"
while read -r name secs needs what; do
  step "$name" "$secs" "$needs"
done < <(plan_lines)

echo "== [$(elapsed)s] done; $OUT: summary.md, steps.jsonl, results.tar.gz" | tee -a "$OUT/gpu_check.log"
cat "$OUT/summary.md"
# exit status: 0 when every step passed (a dry run in CI must pass entirely)
! grep -qv '"status": "ok"' "$STEPS"
