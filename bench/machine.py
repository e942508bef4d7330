"""What the results were measured on: CPU, cores, memory, load, versions, commit."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        if ":" in line:
            k, v = (s.strip() for s in line.split(":", 1))
            fields.setdefault(k, v)
    model = fields.get("model name") or fields.get("Model") or platform.machine()
    if "cpu family" in fields:  # "AMD EPYC" alone does not say which generation
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return model


def isa_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in _ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def quiet_load(cores: int | None) -> float:
    """The 1-min load average below which nothing else is taken to run: half a core per core."""
    return 0.5 * (cores or 1)


def wait_for_quiet(max_wait_s: float, cores: int | None, poll_s: float = 10.0) -> dict:
    """Wait (at most ``max_wait_s``) until the 1-min load average is below ``quiet_load``.
    Returns the load seen first and last, the seconds waited and whether it became quiet."""
    limit = quiet_load(cores)
    first = load = load_average()
    start = time.monotonic()
    while load is not None and load > limit and time.monotonic() - start + poll_s <= max_wait_s:
        time.sleep(poll_s)
        load = load_average()
    return {"load_first": first, "load": load, "waited_s": round(time.monotonic() - start, 1),
            "limit": limit, "quiet": load is not None and load <= limit}


def under_load(start: dict, load_end: float | None, cores: int | None) -> bool:
    """Whether a run's timings are not the code's: the machine was busy when it started, or the
    load at its end exceeds what the benchmark itself adds (one runnable thread per core)."""
    limit = quiet_load(cores)
    return not start["quiet"] or (load_end is not None and load_end > (cores or 1) + limit)


def mem_total_bytes() -> int | None:
    return _meminfo("MemTotal")


def mem_available_bytes() -> int | None:
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def describe() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "isa": isa_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_bytes": mem_total_bytes(),
        "load_average_1min": load_average(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in (
            ("torch", "torch"), ("cube-kernels", "cube-kernels"), ("torch-geometric", "torch-geometric"),
            ("jax", "jax"), ("jaxlib", "jaxlib"), ("triton", "triton"), ("numpy", "numpy"))},
        "git_commit": git_commit(),
    }


def summary_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, {m['torch_cpu_capability']}), "
            f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB{gpu}; torch {m['versions']['torch']}, "
            f"Python {m['python']}")
