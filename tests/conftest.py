import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is
# first imported: its own library functions (tl.rand) are jitted at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cube_kernels import _extension
from cube_kernels.neighbourhood import num_tokens

requires_ext = pytest.mark.skipif(not _extension.load(), reason="cube_kernels._C is not built")


def random_params(C: int, F: int, neighbourhood: str = "von_neumann", dtype=torch.float32, seed: int = 0):
    """Cell parameters by SPEC name, all O(1) so that every term of the step matters in a test
    (the real initialisation keeps w_sp near zero, which would hide gating errors)."""
    g = torch.Generator().manual_seed(seed)
    K = num_tokens(neighbourhood)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    return {
        "ln1_weight": r(C, scale=0.2, shift=1.0), "ln1_bias": r(C, scale=0.1),
        "w_in": r(C, 2 * F, scale=C ** -0.5), "b_in": r(2 * F, scale=0.1),
        "ln2_weight": r(F, scale=0.2, shift=1.0), "ln2_bias": r(F, scale=0.1),
        "w_sp": r(K, F, scale=0.5), "b_sp": r(F, scale=0.1, shift=1.0),
        "w_out": r(F, C, scale=F ** -0.5), "b_out": r(C, scale=0.1),
    }
