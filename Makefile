# `make train` and `make test` each do all set-up on a fresh machine: a venv in .venv, the CPU
# build of torch when no torch is there yet, and this package built in place with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test train bench cuda-check cuda-build gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q setuptools wheel ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"

test: setup cuda-check
	$(BIN)/python -m pytest -q tests

train: setup
	$(BIN)/cube-train --config configs/default.yaml

bench: setup
	$(BIN)/pip install -q --no-build-isolation -e ".[bench]"
	$(BIN)/python -m bench --quick

cuda-check:
	bash scripts/check_cuda.sh

cuda-build:
	bash scripts/check_cuda.sh --full

# On a machine with a GPU: the CUDA build, every CUDA and Triton test, the GPU benchmark columns.
gpu-check:
	bash scripts/gpu_check.sh
