"""glibc's malloc, told to keep the memory a training process frees.

A training step frees and allocates tens of MB of tensors. glibc maps every block of more than
32 MB (and, below its dynamic threshold's limit, others) afresh and unmaps it when freed, so
each step faults its pages in again, and on this project's VM (whose balloon device hands freed
pages back to the host) a few steps in a hundred took twice as long. Kept in the heap,
the default config's steps are even: a mean of 198-200 ms against 208-210 ms, the slowest of 140
steps 206-231 ms against 418-462 ms, at the cost of 60-70 MB more peak memory
(docs/performance.md, "glibc's malloc in the trainer"). The process keeps its peak heap until it
exits.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
OPT_OUT = "CUBE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Allocate every block from the heap (no mmap) and never return its free top to the kernel,
    from now on in this process. Returns whether it did: only with glibc, not with
    ``CUBE_KEEP_FREED_MEMORY=0``, and not where the environment tunes glibc's malloc itself
    (``MALLOC_*_`` variables, ``glibc.malloc`` tunables): the user's settings stand."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or \
            any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
