# `make train` and `make test` each do all set-up on a fresh machine: a venv in .venv, the CPU
# build of torch when no torch is there yet, and this package built in place with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test train results results-chitchat bench cuda-check cuda-build gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q setuptools wheel ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"

# bench/test_tools.py: the benchmark's own machinery (its timings, bench/test_benchmarks.py, are not tests)
test: setup cuda-check
	$(BIN)/python -m pytest -q tests bench/test_tools.py

train: setup
	$(BIN)/cube-train --config configs/default.yaml

# The README's results: the default config over SEEDS (model, ablations, baselines per seed), then
# one table with intervals over seeds and questions; and the chitchat config with one seed.
RESULTS ?= runs/results
SEEDS ?= 0 1 2
results: setup
	for s in $(SEEDS); do $(BIN)/cube-train --config configs/default.yaml --set seed=$$s --set train.progress=false \
		--out-dir $(RESULTS)/default/seed_$$s || exit 1; done
	$(BIN)/cube-eval --runs $(addprefix $(RESULTS)/default/seed_,$(SEEDS)) --out $(RESULTS)/default/report.txt

results-chitchat: setup
	$(BIN)/cube-train --config configs/chitchat.yaml --set train.progress=false --out-dir $(RESULTS)/chitchat/seed_0
	$(BIN)/cube-eval --runs $(RESULTS)/chitchat/seed_0 --out $(RESULTS)/chitchat/report.txt

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
