#!/usr/bin/env bash
# Checks that the CUDA kernels build, on a machine without a GPU.
#
#   scripts/check_cuda.sh          nvcc -c of every csrc/cuda/*.cu for sm_80 and sm_90 (seconds)
#   scripts/check_cuda.sh --full   also the whole extension with FORCE_CUDA=1, in a venv of its own
#                                  holding a CUDA build of torch, then an import check that the four
#                                  cube:: ops have CUDA kernels registered
#
# Environment: NVCC (compiler, default: nvcc on PATH, then $CUDA_HOME/bin/nvcc, then
# /usr/local/cuda-13.0/bin/nvcc), CUBE_CUDA_VENV (default /tmp/cube-cuda-venv, reused when
# present), CUBE_CUDA_TORCH (torch version for that venv, default 2.14.1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FULL=0
case "${1:-}" in
  "") ;;
  --full) FULL=1 ;;
  *) echo "usage: $0 [--full]" >&2; exit 2 ;;
esac

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
[[ -z "$NVCC" && -x "$CUDA_HOME/bin/nvcc" ]] && NVCC="$CUDA_HOME/bin/nvcc"
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: SKIPPED, no nvcc found (set NVCC or CUDA_HOME)"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# (a) The kernels include no torch headers (csrc/cuda/launch.h is their whole interface), so
# nvcc checks them alone. Warnings are errors: they are cheap to fix now and easy to miss later.
echo "== nvcc -c csrc/cuda/*.cu ($("$NVCC" --version | tail -n 1))"
for src in "$ROOT"/csrc/cuda/*.cu; do
  echo "   $(basename "$src")"
  "$NVCC" -c "$src" -o "$WORK/$(basename "$src").o" -std=c++17 -O3 -I "$ROOT/csrc" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    --Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror
done
echo "== nvcc: OK"
[[ "$FULL" == 1 ]] || exit 0

# (b) The full build needs a CUDA torch; it gets a venv of its own so that the project's CPU venv
# keeps its torch. The nvidia-* wheels that come with that torch hold the CUDA headers and
# libraries the toolkit at $CUDA_HOME lacks (cuBLAS, cuSPARSE, ...).
VENV="${CUBE_CUDA_VENV:-/tmp/cube-cuda-venv}"
TORCH_VERSION="${CUBE_CUDA_TORCH:-2.14.1}"
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
HAVE_TORCH="import sys, torch
sys.exit(not (torch.__version__.split('+')[0] == '$TORCH_VERSION' and torch.version.cuda))"
if ! "$PY" -c "$HAVE_TORCH" 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION (a CUDA build) into $VENV"
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION" setuptools wheel ninja numpy
fi
"$PY" -c "import torch; print('== torch', torch.__version__, 'cuda', torch.version.cuda)"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"
if [[ ! -d "$CU/include" ]]; then
  echo "check_cuda: no $CU/include in $VENV (a torch without the cu13 nvidia-* wheels?)" >&2
  exit 1
fi
export CUDA_HOME
export CPATH="$CU/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# Build from a copy of the sources (tracked and untracked, not ignored) so the CPU build's
# build/ and _C*.so in the work tree are neither reused nor overwritten.
SRC="$WORK/src"
mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
  xargs -0 cp --parents -t "$SRC")
echo "== FORCE_CUDA=1 pip install --no-build-isolation . (into $VENV)"
(cd "$SRC" && FORCE_CUDA=1 "$PY" -m pip install --quiet --no-build-isolation --no-deps .)

# No GPU here: import only. The installed cube_kernels/_C*.so is loaded by itself (not through
# the package's __init__), so this checks the build and nothing else.
(cd "$WORK" && "$PY" - <<'EOF'
import glob
import importlib.util
import sysconfig

import torch

found = glob.glob(sysconfig.get_paths()["platlib"] + "/cube_kernels/_C*.so")
if len(found) != 1:
    raise SystemExit(f"check_cuda: expected one installed cube_kernels/_C*.so, found {found}")
spec = importlib.util.spec_from_file_location("cube_kernels._C", found[0])
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers torch.ops.cube

ops = ("gather_gate", "gather_gate_backward", "update", "update_backward")
has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
missing = [op for op in ops if not has_kernel(f"cube::{op}", "CUDA")]
print("== build_info:", torch.ops.cube.build_info())
if missing:
    raise SystemExit(f"check_cuda: no CUDA kernel registered for {missing}")
print("== CUDA kernels registered for", ", ".join(f"cube::{op}" for op in ops))
EOF
)
echo "== full CUDA build: OK"
