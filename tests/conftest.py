import os

import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is
# first imported: its own library functions (tl.rand) are jitted at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
