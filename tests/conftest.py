import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is
# first imported: its own library functions (tl.rand) are jitted at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def restore_threads():
    """Tests that change torch's thread count get it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
