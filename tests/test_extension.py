"""Loading of cube_kernels._C: the fallback when it is not built, the errors when it is broken or
built for another torch, and what the built library reports."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from cube_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh(monkeypatch):
    """_extension as if nothing had been loaded yet (monkeypatch restores the cache after)."""
    monkeypatch.setattr(_extension, "_loaded", None)
    return monkeypatch


def _raise(exc):
    def import_c():
        raise exc
    return import_c


def test_missing_extension_warns_once_and_falls_back(fresh):
    fresh.setattr(_extension, "_import_c",
                  _raise(ModuleNotFoundError("No module named 'cube_kernels._C'", name="cube_kernels._C")))
    with pytest.warns(RuntimeWarning, match="cube_kernels._C is not built; falling back to the reference"):
        assert _extension.load() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert _extension.load() is False
        assert _extension.has_cuda() is False


def test_broken_extension_raises(fresh):
    fresh.setattr(_extension, "_import_c", _raise(ImportError("_C.so: undefined symbol: _ZN3c10")))
    with pytest.raises(ImportError, match=r"undefined symbol.*pip install --no-build-isolation"):
        _extension.load()


def test_extension_missing_a_dependency_raises(fresh):
    fresh.setattr(_extension, "_import_c", _raise(ModuleNotFoundError("No module named 'x'", name="x")))
    with pytest.raises(ImportError, match="failed to load"):
        _extension.load()


def test_extension_built_for_another_torch_raises(fresh):
    fresh.setattr(_extension, "_import_c", lambda: None)
    fresh.setattr(_extension, "build_info", lambda: {"torch": "1.13.1", "cuda": "0"})
    with pytest.raises(ImportError, match=r"built for torch 1\.13\.1, but torch \d+\.\d+\.\d+ is running"):
        _extension.load()


def test_wrappers_import_and_raise_without_extension():
    # A fresh interpreter in which `import cube_kernels._C` fails as if it had never been built.
    script = textwrap.dedent("""
        import sys, warnings

        class NotBuilt:
            def find_spec(self, name, path=None, target=None):
                if name == "cube_kernels._C":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NotBuilt())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from cube_kernels import _extension
            from cube_kernels.ops import gather_gate, update
            assert not _extension.load() and not _extension.has_cuda()
        assert sum("is not built" in str(w.message) for w in caught) == 1, caught
        for call in (lambda: gather_gate.gather_gate(None, None, None, None, "moore", "zero"),
                     lambda: update.update(None, None, None, None, 0, 0, 1.0)):
            try:
                call()
            except RuntimeError as e:
                assert "cube_kernels._C is not built" in str(e), e
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_built_library_reports_running_torch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _extension.load():
            pytest.skip("cube_kernels._C is not built")
    info = _extension.build_info()
    assert info["torch"] == _extension.running_torch_version()
    assert torch.__version__.startswith(info["torch"])
    # A CUDA build registers the CUDA kernels, a CPU-only one does not.
    assert _extension.has_cuda() == (info["cuda"] == "1")


def test_baseline_isa_matches_reference():
    """Where the AVX2 loops run, the portable baseline ones (SSE2 on x86-64) are hidden: the CPU
    ops' and the fused cell's reference comparisons again, in a process with CUBE_CPU_ISA=baseline."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _extension.load():
            pytest.skip("cube_kernels._C is not built")
    if os.environ.get("CUBE_CPU_ISA") == "baseline" or _extension.build_info()["cpu_isa"] == "baseline":
        pytest.skip("the other tests already run the baseline loops")
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(os.path.join(here, f)
           for f in ("test_gather_gate.py", "test_update.py", "test_gate_input.py", "test_rollout.py")),
         "-k", "(matches_reference and cpu) or (matches_functional and op) or low_precision "
               "or (gradcheck and (cpu or op)) or isa_in_use or micro_kernel "
               "or (rollout and (reference or gradcheck))"],
        env=dict(os.environ, CUBE_CPU_ISA="baseline"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout


def test_isa_in_use():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _extension.load():
            pytest.skip("cube_kernels._C is not built")
    isa = _extension.build_info()["cpu_isa"]
    assert isa in ("avx2", "baseline")
    if os.environ.get("CUBE_CPU_ISA") == "baseline":
        assert isa == "baseline"


def test_bf16_micro_kernel_where_the_cpu_has_avx512_bf16():
    """bf16 states run the bf16 micro-kernel on AVX512-BF16, AMX included (there the first-use
    probe also finds ATen's packing of B to be the cell's layout), and nowhere else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _extension.load():
            pytest.skip("cube_kernels._C is not built")
    if "ONEDNN_MAX_CPU_ISA" in os.environ or "DNNL_MAX_CPU_ISA" in os.environ:
        pytest.skip("oneDNN is capped here (the next test)")
    caps = torch._C._cpu._get_cpu_capability()
    expected = caps.get("avx512_bf16", False) and os.environ.get("CUBE_CPU_ISA") != "baseline"
    assert _extension.build_info()["bf16_gemm"] == ("1" if expected else "0")


def test_bf16_rollout_with_onednn_capped_below_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE leaves the CPU's flags as they are but takes oneDNN's bf16
    kernels away: bf16 states then run the fp32 GEMMs, forward and backward, instead of failing
    with oneDNN's "could not generate a kernel"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _extension.load():
            pytest.skip("cube_kernels._C is not built")
    script = textwrap.dedent("""
        import torch
        from cube_kernels import CubeLattice, _extension
        lattice = CubeLattice(2, 3, 5, channels=14, hidden=10, backend="cpu").bfloat16()
        y = lattice(torch.randn(1, 2, 3, 5, 14).bfloat16(), steps=2, seed=0)
        y.float().square().sum().backward()
        assert all(p.grad.isfinite().all() for p in lattice.parameters())
        print("bf16_gemm", _extension.build_info()["bf16_gemm"])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bf16_gemm 0" in done.stdout


def test_import_cube_kernels_registers_the_ops_autograd_and_fakes():
    """After a bare `import cube_kernels` in a fresh interpreter, torch.ops.cube.* are
    differentiable (no 'autograd kernel was not registered' warning, gradients arrive) and
    traceable with fake tensors."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import torch
        import cube_kernels
        from torch._subclasses.fake_tensor import FakeTensorMode

        u, vn = torch.randn(1, 2, 2, 2, 3, requires_grad=True), torch.randn(1, 2, 2, 2, 3)
        torch.ops.cube.gather_gate(u, vn, torch.randn(7, 3), torch.ones(3), "von_neumann", "zero").sum().backward()
        x, h = torch.randn(1, 2, 2, 2, 4, requires_grad=True), torch.randn(1, 2, 2, 2, 3, requires_grad=True)
        torch.ops.cube.update(x, h, torch.randn(3, 4), torch.zeros(4), 0, 0, 0.5).sum().backward()
        proj = torch.randn(5, 6, requires_grad=True)
        sum(t.sum() for t in torch.ops.cube.gate_input(proj, torch.zeros(6), torch.ones(3), torch.zeros(3))).backward()
        assert u.grad is not None and h.grad is not None and proj.grad is not None
        real = [u.detach(), vn, torch.randn(7, 3), torch.ones(3)]
        mode = FakeTensorMode()
        fake = [mode.from_tensor(t) for t in real]
        with mode:
            out = torch.ops.cube.gather_gate(*fake, "von_neumann", "zero")
        assert out.shape == u.shape
        print("ok")
    """)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _extension.load():
            pytest.skip("cube_kernels._C is not built")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
