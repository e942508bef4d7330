"""Loading of the compiled extension ``cube_kernels._C`` (the C++ CPU kernels and, in a CUDA
build, the CUDA kernels), which registers the ``torch.ops.cube`` operators.

A missing ``_C`` is an expected state (a source checkout nobody built): ``load()`` then warns
once and returns False, and callers fall back to ``cube_kernels.reference``. A ``_C`` that is
there but cannot run here (built for another torch, broken) is an error: ``ImportError``.
"""
from __future__ import annotations

import importlib
import re
import warnings

import torch

MISSING_WARNING = ("cube_kernels._C is not built; falling back to the reference: "
                   "run pip install --no-build-isolation .")
_REBUILD = ("rebuild it for the installed torch with `pip install --no-build-isolation .` "
            "(`-e .` for a development checkout)")

_loaded: bool | None = None  # None: not tried yet


def _import_c():
    return importlib.import_module("cube_kernels._C")


def build_info() -> dict[str, str]:
    """What the loaded ``_C`` was compiled against and the instruction set its CPU kernels use
    here, and whether bf16 states run the CPU's bf16 micro-kernel, e.g. ``{"torch": "2.13.0",
    "cuda": "0", "cpu_isa": "avx2", "bf16_gemm": "0"}``."""
    return dict(item.split("=", 1) for item in torch.ops.cube.build_info().split(";"))


def running_torch_version() -> str:
    """``X.Y.Z`` of the running torch, without local or pre-release tags."""
    match = re.match(r"\d+\.\d+\.\d+", torch.__version__)
    return match.group(0) if match else torch.__version__


def _check_build(info: dict[str, str]) -> None:
    built, running = info.get("torch"), running_torch_version()
    if built != running:
        raise ImportError(f"cube_kernels._C was built for torch {built}, but torch {running} "
                          f"is running; {_REBUILD}")


def load() -> bool:
    """Load ``_C`` once: True if the ``cube`` ops are registered, False (with one warning) if
    the extension is not built."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        _import_c()
    except ModuleNotFoundError as e:
        if e.name != "cube_kernels._C":  # _C is there but needs a module that is not
            raise ImportError(f"cube_kernels._C failed to load: {e}; {_REBUILD}") from e
        warnings.warn(MISSING_WARNING, RuntimeWarning, stacklevel=2)
        _loaded = False
        return False
    except (ImportError, OSError) as e:  # e.g. undefined symbols from another torch build
        raise ImportError(f"cube_kernels._C failed to load: {e}; {_REBUILD}") from e
    _check_build(build_info())
    _loaded = True
    return True


def require(op: str) -> None:
    """Raise, naming ``cube::op``, when the extension is not built."""
    if not load():
        raise RuntimeError(f"cube::{op} is unavailable: the extension cube_kernels._C is not "
                           "built (run pip install --no-build-isolation .); "
                           "cube_kernels.reference has the same function in plain PyTorch")


def has_cuda() -> bool:
    """Whether the loaded extension has CUDA implementations of the ops."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key("cube::gather_gate", "CUDA")
