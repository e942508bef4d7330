"""Triton kernels of the two fused ops (SPEC.md "What is fused"), registered as the custom ops
``cube_triton::gather_gate``, ``cube_triton::gather_gate_backward``, ``cube_triton::update``
and ``cube_triton::update_backward``, with the signatures of the C++ ``cube::`` ops.

Importing this package works without triton; ``available()`` says whether the ops can be used.
Set ``TRITON_INTERPRET=1`` before the first import to run them on CPU tensors in Triton's
interpreter (how the tests prove them without a GPU).
"""
from __future__ import annotations

__all__ = ["available", "interpreting", "gather_gate", "gather_gate_backward", "update",
           "update_backward"]

try:
    import triton as _triton  # noqa: F401
    _AVAILABLE = True
except ImportError:
    _AVAILABLE = False

if _AVAILABLE:
    from ._common import INTERPRET as _INTERPRET
    from .gather_gate import gather_gate, gather_gate_backward
    from .update import update, update_backward


def available() -> bool:
    """True when triton is importable, so the ops are defined."""
    return _AVAILABLE


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _AVAILABLE and _INTERPRET


def __getattr__(name: str):
    if name in __all__:
        raise ImportError(f"cube_kernels.triton_ops.{name} needs the triton package, which is not installed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
