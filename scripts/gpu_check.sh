#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: build what exists, run the GPU tests,
# benchmark at sizes that fill the chip, write logs and JSON under $OUT (default
# ./gpu_out), print a short table last. Budget: under 8 minutes on an H200.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh
#
# Extra wheels (DeepSpeed has none on the device machine) may be carried in .whl/;
# they are installed with --no-index into $OUT/../pydeps when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python}
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
git rev-parse HEAD 2>/dev/null | tee "$OUT/commit.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step "installing carried wheels"
  DEPS="$(pwd)/.pydeps"
  $PY -m pip install -q --no-index --no-deps --target "$DEPS" .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="$DEPS:${PYTHONPATH:-}"
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}"
$PY -m sft_kernels.cli info 2>&1 | tee "$OUT/info.txt"

if ls csrc/*.cu >/dev/null 2>&1; then
  step "building the CUDA extension (ahead of time, in place) for this GPU"
  cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  TORCH_CUDA_ARCH_LIST="$cap" SFT_KERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1 || echo "BUILD FAILED (see build.log)" | tee -a "$LOG"
  if command -v cmake >/dev/null 2>&1; then
    step "CMake build and the C++ GPU test executable"
    (cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log" 2>&1 \
      && cmake --build build-cmake -j "${MAX_JOBS:-16}" >>"$OUT/cmake.log" 2>&1 \
      && timeout 120 ./build-cmake/sft_kernels_test >"$OUT/cpp_gpu_test.log" 2>&1) ; echo "C++ GPU test exit code $?" | tee -a "$LOG"
    tail -n 5 "$OUT/cpp_gpu_test.log" 2>/dev/null | tee -a "$LOG"
  fi
fi

step "GPU tests (pytest -m 'gpu or interpret')"
timeout 240 $PY -m pytest -q -x -m "gpu or interpret" -p no:cacheprovider tests \
  --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
echo "pytest exit code $?" | tee -a "$LOG"
tail -n 5 "$OUT/pytest_gpu.log" | tee -a "$LOG"

step "benchmarks"
for b in benchmarks/bench_attention.py benchmarks/bench_block_diag.py benchmarks/bench_e2e.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 200 $PY "$b" --device cuda --quick --out "$OUT" >"$OUT/$name.log" 2>&1
  echo "$name exit code $?" | tee -a "$LOG"
done

if $PY -c "import deepspeed" >/dev/null 2>&1; then
  step "DeepSpeed: build through SFTKernelsBuilder().load(), then one short training run"
  timeout 150 $PY -c "from sft_kernels.integrations.deepspeed import SFTKernelsBuilder; SFTKernelsBuilder().load(verbose=True)" \
    >"$OUT/ds_builder.log" 2>&1; echo "SFTKernelsBuilder load exit code $?" | tee -a "$LOG"
  timeout 150 $PY -m sft_kernels.train --max_steps 20 --dtype bf16 --output_dir "$OUT/sft_output" --no_progress \
    >"$OUT/train.log" 2>&1; echo "train exit code $?" | tee -a "$LOG"
  tail -n 4 "$OUT/train.log" | tee -a "$LOG"
else
  echo "deepspeed not importable: carry its wheel in .whl/ (pip download --no-deps deepspeed hjson -d .whl)" | tee -a "$LOG"
fi

step "done"
for md in "$OUT"/*.md; do
  [ -f "$md" ] && { echo; cat "$md"; }
done
