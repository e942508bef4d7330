#!/usr/bin/env bash
# One command for the first machine with a GPU (`make gpu-check`): build the extension with the
# CUDA kernels, run every CUDA and Triton test (the slow large-index ones too), then the GPU
# columns of the benchmark. About 10 minutes on one H100/H200-class GPU.
#
#   scripts/gpu_check.sh          the whole check; exits non-zero at once where no GPU is visible
#   scripts/gpu_check.sh --list   only list the tests it would run (works anywhere)
#
# Environment: PYTHON (default .venv/bin/python, else python3; needs a CUDA build of torch >= 2.8
# and triton >= 3.4), CUBE_CUDA_ARCHS (default: the visible GPU's compute capability),
# GPU_CHECK_OUT (benchmark results, default bench/results/gpu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
[[ -z "$PY" && -x .venv/bin/python ]] && PY=.venv/bin/python
PY="${PY:-python3}"
# Every test that runs CUDA or Triton code: the `cuda` and `triton` cases of the harness, the
# Triton package's own tests and the compiled tl.rand check. The slow ones are included.
SELECT=(-k "cuda or triton" -m "slow or not slow")

if [[ "${1:-}" == "--list" ]]; then
  exec "$PY" -m pytest tests --collect-only -q -p no:cacheprovider "${SELECT[@]}"
fi
[[ -z "${1:-}" ]] || { echo "usage: $0 [--list]" >&2; exit 2; }

"$PY" - <<'PYEOF' || exit 1
import sys
import torch
if torch.version.cuda is None or not torch.cuda.is_available():
    why = ("torch " + torch.__version__ + " is a CPU build") if torch.version.cuda is None \
        else "torch.cuda.is_available() is False"
    sys.exit(f"gpu-check: no CUDA GPU here ({why}). Run it on a machine with an NVIDIA GPU, with "
             "PYTHON pointing at an environment that has a CUDA build of torch >= 2.8 and triton >= 3.4.")
print(f"== {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
      f"torch {torch.__version__}")
PYEOF

START=$SECONDS
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
echo "== FORCE_CUDA=1 build for sm ${CUBE_CUDA_ARCHS:-$ARCH}"
FORCE_CUDA=1 CUBE_CUDA_ARCHS="${CUBE_CUDA_ARCHS:-$ARCH}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c 'import cube_kernels._extension as e; assert e.has_cuda(), "no CUDA kernels in the build"
print("== build:", e.build_info())'

echo "== CUDA and Triton tests ($((SECONDS - START)) s so far)"
status=0
"$PY" -m pytest tests -q -p no:cacheprovider -rs "${SELECT[@]}" || status=$?

echo "== GPU benchmark columns ($((SECONDS - START)) s so far)"
"$PY" -m bench --quick --backends cuda,triton,eager@cuda,compile@cuda --no-readme \
  --out "${GPU_CHECK_OUT:-bench/results/gpu}" || status=$?
echo "== gpu-check done in $((SECONDS - START)) s, exit $status"
exit $status
