"""`make gpu-check` (scripts/gpu_check.sh), as far as a machine without a GPU can check it: it
stops at once with a clear message, and it selects every CUDA and Triton test and nothing else."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import harness

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")


def _run(*args):
    return subprocess.run(["bash", SCRIPT, *args], env=harness.in_subprocess_env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu-check would run")
def test_fails_fast_without_a_gpu():
    done = _run()
    assert done.returncode != 0
    assert "gpu-check: no CUDA GPU here" in done.stderr + done.stdout
    assert "FORCE_CUDA" not in done.stdout  # stopped before building anything


def test_selects_every_cuda_and_triton_test():
    done = _run("--list")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    others = [i for i in ids if "cuda" not in i and "triton" not in i]
    assert ids and not others, others
    for expected in ("test_update.py::test_fp32_gemms_ignore_the_global_tf32_setting[cuda]",
                     "test_step.py::test_large_indices[cuda]",
                     "test_step.py::test_matches_reference[cuda-",
                     "test_lattice.py::test_rollout_with_injection_matches_reference_backend[triton]",
                     "test_gather_gate.py::test_every_autotune_config_matches_reference[triton]",
                     "test_triton_ops.py::test_launches_go_to_the_tensors_gpu",
                     "test_reference.py::test_philox_matches_triton_rand_bit_for_bit"):
        assert any(expected in i for i in ids), expected
    assert not any("[cpu" in i or "-cpu-" in i for i in ids)
