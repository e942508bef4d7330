"""Triton kernels of the two fused ops (SPEC.md "What is fused"), registered as the custom ops
``cube_triton::gather_gate``, ``cube_triton::gather_gate_backward``, ``cube_triton::update``
and ``cube_triton::update_backward``, with the signatures of the C++ ``cube::`` ops.

Importing this package works without triton, or with one older than 3.4 (whose ``tl.rand``
is not SPEC's mask bit for bit, and which lacks ``triton.knobs``); ``available()`` says whether
the ops can be used, ``unavailable_reason()`` why not. Set ``TRITON_INTERPRET=1`` before the
first import to run them on CPU tensors in Triton's interpreter (how the tests prove them
without a GPU).
"""
from __future__ import annotations

import re

__all__ = ["available", "interpreting", "unavailable_reason", "gather_gate", "gather_gate_backward",
           "update", "update_backward"]

MIN_TRITON = (3, 4)


def _why_not() -> str | None:
    try:
        import triton
    except ImportError:
        return "the triton package is not installed"
    version = getattr(triton, "__version__", "0")
    if tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < MIN_TRITON:
        return f"triton {version} is installed; the Triton ops need triton >= 3.4"
    return None


_REASON = _why_not()
if _REASON is None:
    try:
        from ._common import INTERPRET as _INTERPRET
        from .gather_gate import gather_gate, gather_gate_backward
        from .update import update, update_backward
    except AttributeError as e:  # a triton that says >= 3.4 but lacks what the kernels use
        _REASON = f"the installed triton lacks what the Triton ops use: {e}"


def available() -> bool:
    """True when a triton >= 3.4 is importable, so the ops are defined."""
    return _REASON is None


def unavailable_reason() -> str | None:
    """Why the ops are not defined, or None."""
    return _REASON


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _REASON is None and _INTERPRET


def __getattr__(name: str):
    if name in __all__:
        raise ImportError(f"cube_kernels.triton_ops.{name} is unavailable: {_REASON}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
