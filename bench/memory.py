"""Peak memory of one forward+backward.

CPU: PyTorch's CPU allocator keeps no peak counter, so we read the kernel's: the process's
resident-set high-water mark (``VmHWM``), reset just before the measured call through
``/proc/self/clear_refs``, minus the resident set (``VmRSS``) at that moment. glibc is first
told to hand large freed blocks straight back to the OS (fixed mmap threshold, then
``malloc_trim``) so that memory freed by earlier calls and reused silently does not hide the
call's own allocations. Where ``clear_refs`` cannot be written, the fallback is
``getrusage(RUSAGE_SELF).ru_maxrss`` after the process's first call minus ``VmRSS`` before it
(that call then also carries one-time costs such as compilation).

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource

import torch

CPU_METHOD = "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before the call"
CPU_FALLBACK_METHOD = "ru_maxrss after the first call minus RSS before it (includes one-time setup)"
CUDA_METHOD = "torch.cuda.max_memory_allocated minus memory allocated before the call"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _return_freed_memory():
    """Make freed memory leave the resident set so that reuse by the next call is counted."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_peak(call, first_call: bool = False) -> tuple[int, str]:
    """``(bytes, method)``: the peak resident memory ``call()`` adds to the process."""
    _return_freed_memory()
    if can_reset_peak():
        base = rss_bytes()
        call()
        return _status_kib("VmHWM") * 1024 - base, CPU_METHOD
    if not first_call:
        raise RuntimeError("cannot reset the RSS peak here; measure the first call instead")
    base = rss_bytes()
    call()
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, CPU_FALLBACK_METHOD


def cuda_peak(call) -> tuple[int, str]:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, CUDA_METHOD
