"""The cube_kernels.triton_ops package itself: it imports without triton, and its kernels
compile for GPUs where there is none (the op tests run them in the interpreter)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import harness


def _run_python(*args):
    """A fresh interpreter on this checkout, without TRITON_INTERPRET."""
    env = harness.in_subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_package_imports_without_triton():
    res = _run_python("-c", (
        "import sys; sys.modules['triton'] = None  # import triton raises ImportError\n"
        "import cube_kernels.triton_ops as t\n"
        "assert not t.available() and not t.interpreting()\n"
        "try:\n    from cube_kernels.triton_ops import gather_gate\n"
        "except ImportError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise SystemExit('no ImportError')\n"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_kernels_compile_for_gpu():
    """What the interpreter accepts the compiler may not: compile every kernel for sm_90 in bf16
    (the tensor-core path) ahead of time; this needs no GPU, only Triton's LLVM and ptxas."""
    pytest.importorskip("triton")
    res = _run_python("-m", "cube_kernels.triton_ops.compile_check",
                      "--arch", "90", "--dtypes", "bf16", "--quick")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "compiled 12 kernel variants" in res.stdout
