"""What the results were measured on: CPU, cores, memory, load, versions, commit."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")
# Other processes' average use during a run (cores) above which its timings are not the code's.
QUIET_OTHER_CORES = 0.25


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


def cpu_seconds() -> dict | None:
    """CPU seconds spent so far by the whole machine (/proc/stat, all cores, idle and iowait left
    out) and by this process with its reaped children (the benchmark and its workers)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle (3) and iowait (4)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    own = sum(getattr(resource.getrusage(who), t) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for t in ("ru_utime", "ru_stime"))
    return {"machine": busy / os.sysconf("SC_CLK_TCK"), "own": own, "wall": time.monotonic()}


def other_cores(start: dict | None, end: dict | None) -> float | None:
    """Cores that processes other than the benchmark kept busy between two ``cpu_seconds``, on
    average: what the load average cannot tell apart from the benchmark's own threads."""
    if start is None or end is None or end["wall"] <= start["wall"]:
        return None
    others = (end["machine"] - start["machine"]) - (end["own"] - start["own"])
    return max(others, 0.0) / (end["wall"] - start["wall"])


def under_load(start: dict, others: float | None) -> bool:
    """Whether a run's timings are not the code's: the machine was busy when it started, or other
    processes used more than a quarter of a core on average while it ran."""
    return not start["quiet"] or (others is not None and others > QUIET_OTHER_CORES)


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
