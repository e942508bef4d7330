#!/usr/bin/env bash
# Checks that a wheel user has what a checkout user has: builds the wheel as the README says
# (pip wheel --no-build-isolation .), installs it into a fresh venv beside the CPU build of torch,
# and, from an empty directory, trains with a shipped config given by name, asks the trained
# model a question and checks the error for an unknown name. A few minutes (the C++ build).
#
#   scripts/check_wheel.sh          # PYTHON: the interpreter that builds (default .venv/bin/python)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== pip wheel --no-build-isolation $ROOT"
"$PYTHON" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/dist" "$ROOT"
WHEEL="$(ls "$WORK"/dist/cube_kernels-*.whl)"
expected="$(cd "$ROOT/configs" && ls *.yaml | sort)"
shipped="$(unzip -Z1 "$WHEEL" | sed -n 's|^cube_trainer/configs/||p' | sort)"
if [[ "$shipped" != "$expected" ]]; then
  echo "check_wheel: the wheel holds configs [$shipped], configs/ has [$expected]" >&2
  exit 1
fi
echo "== the wheel holds every config: $(echo $shipped)"

echo "== a fresh venv: torch 2.13.0 (the CPU build on this machine's index) and the wheel"
python3 -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
"$BIN/pip" install --quiet "torch==2.13.0" numpy
"$BIN/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" ||
  { echo "check_wheel: pip installed a CUDA build of torch" >&2; exit 1; }
"$BIN/pip" install --quiet "$WHEEL"

mkdir "$WORK/empty" && cd "$WORK/empty"
echo "== cube-train --config tiny, from an empty directory"
"$BIN/cube-train" --config tiny --set train.steps=4 --set train.eval_every=0 --set "teacher.cache_dir=$WORK/cache" \
  --out-dir run --no-baselines
"$BIN/cube-ask" --checkpoint run -k 2 "What is AI?"
if "$BIN/cube-train" --config no-such-config 2> err.txt; then
  echo "check_wheel: an unknown config name was accepted" >&2
  exit 1
fi
grep -q "the shipped configs, given by name: $(echo $expected | sed 's/\.yaml//g; s/ /, /g')" err.txt ||
  { echo "check_wheel: unexpected error for an unknown config: $(cat err.txt)" >&2; exit 1; }
echo "== $(cat err.txt)"
echo "== wheel: OK"
