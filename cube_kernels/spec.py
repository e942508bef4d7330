"""The constants of SPEC.md, written once: every module (and the benchmarks) imports them from
here. The C++ kernels hold the LayerNorm eps as ``cube::kLayerNormEps`` (csrc/cell_math.h)."""
from __future__ import annotations

LN_EPS = 1e-5  # both LayerNorms of a step
ALIVE_THRESHOLD = 0.1  # alive masking: max_pool3d of the alive channel > threshold

# The cell parameters by their SPEC names, in the order every op and the fused step take them,
# with their shapes in terms of C (channels), F (the gate's hidden width) and K (tokens).
PARAM_SHAPES = {
    "ln1_weight": ("C",), "ln1_bias": ("C",),
    "w_in": ("C", "2F"), "b_in": ("2F",),
    "ln2_weight": ("F",), "ln2_bias": ("F",),
    "w_sp": ("K", "F"), "b_sp": ("F",),
    "w_out": ("F", "C"), "b_out": ("C",),
}
PARAM_NAMES = tuple(PARAM_SHAPES)


def param_shapes(C: int, F: int, K: int) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every cell parameter for C channels, gate width F and K tokens."""
    sizes = {"C": C, "F": F, "2F": 2 * F, "K": K}
    return {name: tuple(sizes[d] for d in dims) for name, dims in PARAM_SHAPES.items()}
