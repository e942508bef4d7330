import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is
# first imported: its own library functions (tl.rand) are jitted at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# cube-train, cube-grow and the search's trials, run in this process by the tests, would otherwise
# switch off glibc's returning of freed memory (cube_trainer.heap) for the rest of the test run;
# its own tests run it in a process of their own.
os.environ.setdefault("CUBE_KEEP_FREED_MEMORY", "0")


@pytest.fixture
def restore_threads():
    """Tests that change torch's thread count get it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
