#!/usr/bin/env bash
# Run the Hugging Face tests under other transformers versions (default: the lowest one
# sft_kernels.integrations.transformers claims, MIN_TRANSFORMERS_VERSION).
#
#   scripts/check_transformers_versions.sh            # the minimum version
#   scripts/check_transformers_versions.sh 5.0.0 5.10.0
#
# For each version it makes a throw-away venv (under ${TMPDIR:-/tmp}) that installs only
# transformers==VERSION and its own dependencies (huggingface_hub, tokenizers, ...) from
# PyPI, and borrows everything else -- torch, triton, pytest, this package -- from the
# project's .venv (`make install` first) through a .pth file, so nothing large is
# downloaded. The venv's own packages come first on sys.path, so the pinned transformers
# is the one imported; the script checks that before running the tests.
# Exit status: 0 when every version passes.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BASE_PY="$ROOT/.venv/bin/python"
if [ ! -x "$BASE_PY" ]; then
  echo "check_transformers_versions: no $BASE_PY; run 'make install' first" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then
  set -- "$("$BASE_PY" -c 'from sft_kernels.integrations.transformers import MIN_TRANSFORMERS_VERSION as v; print(v)')"
fi
BASE_SITE=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TESTS="tests/test_transformers_integration.py tests/test_hf_matrix.py"
status=0
for version in "$@"; do
  venv="${TMPDIR:-/tmp}/sft-kernels-transformers-$version"
  echo "=== transformers $version ($venv)"
  rm -rf "$venv"
  "$BASE_PY" -m venv --without-pip "$venv" || { status=1; continue; }
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a plain path line) so the base venv's own .pth files -- the editable
  # install of this package -- are processed too
  echo "import site; site.addsitedir('$BASE_SITE')" > "$site/zz_sft_kernels_base.pth"
  if ! "$venv/bin/python" -m pip install -q --target "$site" --upgrade "transformers==$version"; then
    echo "transformers $version: install failed" >&2
    status=1
    continue
  fi
  got=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
  if [ "$got" != "$version" ]; then
    echo "transformers $version: the venv imports $got instead" >&2
    status=1
    continue
  fi
  start=$(date +%s)
  "$venv/bin/python" -m pytest $TESTS -q -p no:cacheprovider -p no:warnings
  rc=$?
  echo "=== transformers $version: pytest exited $rc after $(( $(date +%s) - start ))s"
  [ "$rc" -eq 0 ] || status=1
done
exit "$status"
