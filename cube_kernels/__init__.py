"""cube-kernels: fused kernels for 3D cellular gMLP lattices (see SPEC.md)."""
from . import ops, reference
from .backends import BACKENDS
from .neighbourhood import BOUNDARIES, NEIGHBOURHOODS
from .nn import CubeLattice, GMLPCell
from .step import fused_step

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BOUNDARIES", "NEIGHBOURHOODS", "CubeLattice", "GMLPCell", "fused_step", "ops",
           "reference", "__version__"]
