#!/usr/bin/env bash
# The package as a user installs it: build the sdist and, from it, the wheel; install the
# wheel into a fresh venv outside the checkout; run there, from a folder outside the
# checkout: `sft-kernels info`, the toy benchmarks, the just-in-time CUDA build from the
# installed sources (one architecture; no GPU needed), and a smoke subset of the tests
# against the installed package (tests/conftest.py refuses to run them on the checkout's).
#
#   bash scripts/wheel_check.sh [WORKDIR]     (CI: .ci/run; WORKDIR default: a new temp folder,
#                                              removed after a passing run: its venv is ~6 GB)
#
# Needs: $PYTHON (default .venv/bin/python, else python3) with `build` (the [dev] extra),
# nvcc (CUDA_HOME or /usr/local/cuda) for the build step. Prints one line per step and
# exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python
[ -z "$PY" ] && PY=$(command -v python3)
WORK=${1:-$(mktemp -d /tmp/sft_wheel_check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
case "$WORK/" in "$ROOT"/*) echo "wheel_check: WORKDIR must be outside the checkout" >&2; exit 2 ;; esac
t0=$(date +%s)
say() { echo "wheel_check [$(( $(date +%s) - t0 ))s]: $*"; }

say "building the sdist, then the wheel from the sdist, into $WORK/dist"
rm -rf "$WORK/dist"
# no isolation: setuptools comes from $PY's environment (no download); the wheel is
# built from the unpacked sdist, so a file the sdist forgets is missing from the wheel too
"$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/sft_kernels-*.whl)
SDIST=$(ls "$WORK"/dist/sft_kernels-*.tar.gz)
say "built $(basename "$SDIST") and $(basename "$WHEEL")"
"$PY" - "$WHEEL" "$SDIST" <<'PYEOF'
import sys, tarfile, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = ["sft_kernels/csrc/binding.cpp", "sft_kernels/csrc/swa_kernels.cuh", "sft_kernels/csrc/sft_kernels.h",
        "sft_kernels/csrc/mma.cuh", "sft_kernels/csrc/block_diag.cu", "sft_kernels/data/sft_tiny.jsonl",
        "sft_kernels/bench/attention.py", "sft_kernels/bench/common.py", "sft_kernels/cli.py"]
missing = [w for w in want if w not in names]
assert not missing, f"the wheel lacks {missing}"
stray = sorted(n for n in names if not (n.startswith("sft_kernels/") or ".dist-info/" in n))
assert not stray, f"the wheel carries files outside the package: {stray}"
cu = sorted(n for n in names if n.startswith("sft_kernels/csrc/") and n.endswith(".cu"))
sdist = tarfile.open(sys.argv[2]).getnames()
assert any(n.endswith("sft_kernels/csrc/swa_api.cu") for n in sdist), "the sdist lacks the CUDA sources"
print(f"  wheel: {len(names)} files, {len(cu)} CUDA translation units; sdist: {len(sdist)} entries")
PYEOF

say "installing the wheel (with its [dev] extra, for pytest) into a fresh venv: $WORK/venv"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip >"$WORK/pip.log" 2>&1
"$V/python" -m pip install "${WHEEL}[dev]" >>"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log"; exit 1; }
cd "$WORK"  # nothing of the checkout on sys.path from here on
"$V/python" - "$ROOT" <<'PYEOF'
import os, sys
import sft_kernels, sft_kernels._build as b
root = sys.argv[1]
assert not os.path.abspath(sft_kernels.__file__).startswith(root + os.sep), sft_kernels.__file__
srcs = b.sources()
print(f"  sft_kernels {sft_kernels.__version__} from {os.path.dirname(sft_kernels.__file__)}; {len(srcs)} CUDA sources")
PYEOF

say "sft-kernels info"
"$V/sft-kernels" info >"$WORK/info.log" 2>&1 || { cat "$WORK/info.log"; exit 1; }
grep -E "^(sft_kernels|torch|triton)" "$WORK/info.log" | sed 's/^/  /' || true

say "sft-kernels bench --toy (attention, block_diag; e2e needs transformers: skipped with a note)"
"$V/sft-kernels" bench --toy --device cpu --out "$WORK/bench" >"$WORK/bench.log" 2>&1 || { tail -30 "$WORK/bench.log"; exit 1; }
for f in attention/attention.json attention/attention.md block_diag/block_diag.json; do
  [ -s "$WORK/bench/$f" ] || { echo "wheel_check: bench wrote no $f" >&2; tail -30 "$WORK/bench.log"; exit 1; }
done
grep -q "skipping e2e: it needs transformers" "$WORK/bench.log" || { echo "wheel_check: no e2e skip note" >&2; exit 1; }

say "just-in-time CUDA build from the installed sources (sm_90 only; no GPU needed)"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$V/python" -m sft_kernels._build "$WORK/jit" >"$WORK/jit.log" 2>&1 || { tail -40 "$WORK/jit.log"; exit 1; }
tail -n 1 "$WORK/jit.log" | sed 's/^/  /'
if grep -E "spill [1-9]|spill [0-9]+/[1-9]" "$WORK/jit.log"; then echo "wheel_check: register spills" >&2; exit 1; fi

say "smoke tests against the installed package"
SFT_KERNELS_TEST_INSTALLED=1 "$V/python" -m pytest -q -p no:cacheprovider -c "$ROOT/pytest.ini" --rootdir "$ROOT" \
  "$ROOT/tests/test_reference.py" "$ROOT/tests/test_torch_path.py" "$ROOT/tests/test_empty_inputs.py" \
  "$ROOT/tests/test_benchmarks.py" 2>&1 | tail -n 15
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "wheel_check: smoke tests failed (pytest exit $rc)" >&2; exit 1; }
# a temp folder of our own goes once everything passed (a failure keeps it for its logs)
[ -z "${1:-}" ] && cd / && rm -rf "$WORK"
say "ok"
