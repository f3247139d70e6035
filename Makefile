# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs the package, checks the kernels against the
#               references on the local device, benchmarks them
#   make test   creates .venv, installs the package with its test extras (dev, hf,
#               deepspeed), runs pytest
#   make test-fast
#               the inner loop: everything but the distributed, Hugging Face / DeepSpeed and
#               build tests (markers: tests/conftest.py FILE_MARKERS), in parallel: under 3 min on 2 cores
#   make wheel-check
#               builds the sdist and wheel, installs the wheel in a fresh venv outside the
#               checkout and runs info, toy benchmarks, the JIT CUDA build and smoke tests
#               there (scripts/wheel_check.sh; CI runs it)
#   make compile-check-triton36
#               the GPU compile check (tests/test_gpu_compile.py) again under Triton 3.6,
#               the GPU machine's version, from a second venv that holds only triton 3.6
#               and numpy < 2.4 and takes everything else from .venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

T36 := .venv-triton36
T36_STAMP := $(T36)/.installed-triton-3.6.0

.PHONY: install demo test test-fast bench info clean compile-check-triton36 wheel-check

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# plain `torch` takes the CUDA build from the local wheel cache, so the CUDA
	# extension can compile here with or without a GPU
	$(BIN)/python -m pip install -e ".[dev,train,trl]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sft-kernels demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the inner loop: FAST_EXAMPLES examples in each Triton property test (the interpreter is slow;
# `make test` draws them all), on FAST_WORKERS pytest-xdist workers of one intra-op thread each
FAST_EXAMPLES ?= 10
FAST_WORKERS ?= auto
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 SFT_KERNELS_MAX_EXAMPLES=$(FAST_EXAMPLES) $(BIN)/python -m pytest -n $(FAST_WORKERS) \
	  --dist worksteal -m "not distributed and not hf and not build and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/sft-kernels bench

info: $(STAMP)
	$(BIN)/sft-kernels info

# .venv's site-packages go on the second venv's path after its own (a .pth that calls
# site.addsitedir, so the editable install's own .pth is read too): triton 3.6 and numpy
# < 2.4 come from the second venv, torch and the package from .venv
$(T36_STAMP): $(STAMP)
	test -x $(T36)/bin/python || $(PYTHON) -m venv $(T36)
	$(T36)/bin/python -m pip install -q --no-deps --force-reinstall "triton==3.6.0" "numpy<2.4"
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$($(T36)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_sft_main_venv.pth"
	$(T36)/bin/python -c "import triton, torch, sft_kernels; assert triton.__version__ == '3.6.0', triton.__version__"
	touch $(T36_STAMP)

compile-check-triton36: $(T36_STAMP)
	$(T36)/bin/python -m pytest tests/test_gpu_compile.py $(PYTEST_ARGS)

wheel-check: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/wheel_check.sh

clean:
	rm -rf $(VENV) $(T36) build dist *.egg-info
