"""The cube_kernels.triton_ops package itself: it imports without triton, and its kernels
compile for GPUs where there is none (the op tests run them in the interpreter)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
        "except ImportError as e:\n    assert 'triton package is not installed' in str(e), e\n"
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


def test_an_older_triton_is_reported_not_raised():
    """triton < 3.4 (no triton.knobs; tl.rand not SPEC's mask): the package imports, says why
    the ops are unavailable, and the backend refuses with that reason."""
    res = _run_python("-c", (
        "import sys, types\n"
        "sys.modules['triton'] = types.SimpleNamespace(__version__='3.2.0')\n"
        "import cube_kernels.triton_ops as t\n"
        "assert not t.available() and not t.interpreting(), t.unavailable_reason()\n"
        "assert 'triton 3.2.0' in t.unavailable_reason() and '3.4' in t.unavailable_reason()\n"
        "from cube_kernels import backends\n"
        "try:\n    backends.resolve('triton', 'cpu')\n"
        "except RuntimeError as e:\n    assert 'triton 3.2.0' in str(e), e\n"
        "else:\n    raise SystemExit('no RuntimeError')\n"))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_go_to_the_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on cuda:1."""
    from cube_kernels import reference, triton_ops
    torch.cuda.set_device(0)
    fast_in, ref_in = harness.leaves(harness.update_inputs(harness.SMALL[1], 19, 13), torch.float32, "cuda:1")
    harness.check_op("triton", triton_ops.update, reference.update, fast_in, ref_in, (1, 0, 0.5),
                     ("x", "h", "w_out", "b_out"))
    fast_in, ref_in = harness.leaves(harness.gather_gate_inputs(harness.SMALL[1], 19, "moore"), torch.float32,
                                     "cuda:1")
    harness.check_op("triton", triton_ops.gather_gate, reference.gather_gate, fast_in, ref_in, ("moore", "zero"),
                     ("u", "vn", "w_sp", "b_sp"))
