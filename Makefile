# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs the package, checks the kernels against the
#               references on the local device, benchmarks them
#   make test   creates .venv, installs the package with its test extras (dev, hf,
#               deepspeed), runs pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo test bench info clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# plain `torch` takes the CUDA build from the local wheel cache, so the CUDA
	# extension can compile here with or without a GPU
	$(BIN)/python -m pip install -e ".[dev,hf,deepspeed]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sft-kernels demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/sft-kernels bench

info: $(STAMP)
	$(BIN)/sft-kernels info

clean:
	rm -rf $(VENV) build *.egg-info
