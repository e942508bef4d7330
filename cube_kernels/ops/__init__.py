"""The fused ops, one module per op: ``gather_gate``, ``update`` and ``gate_input``.

Each module holds the op's contract, shared by every implementation (input checks, fake
kernels for torch.compile, autograd), and the Python entry of its C++ op ``cube::<op>``.
Importing this package (``import cube_kernels`` does) registers the fake kernels and the
autograd of the ``cube::`` ops when the extension is built.
"""
from . import gate_input, gather_gate, update

__all__ = ["gate_input", "gather_gate", "update"]
