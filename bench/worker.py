"""One measurement in a fresh process: ``python -m bench.worker '<json job>'``, or
``python -m bench.worker --serve`` driven line by line over stdin (interleaved repeats).

Every (implementation, config) runs in its own process so that its peak memory is its own
and nothing (compiled graphs, allocator caches, thread pools) leaks from one to the next.
Results are printed as lines ``RESULT {json}`` on stdout.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import traceback

import torch

from . import gemm, impls, memory
from .config import Config, make_inputs

RESULT_PREFIX = "RESULT "
# Relative error (max |err| / max |reference|) above which an implementation is marked wrong.
TOLERANCE = {"float32": {"output": 1e-4, "grads": 1e-3},
             "bfloat16": {"output": 5e-2, "grads": 1e-1},
             "float16": {"output": 1e-2, "grads": 5e-2}}


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "min": min(times),
            "max": max(times), "all": times}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    scale = want.abs().max().item() or 1.0
    return (got.double() - want).abs().max().item() / scale


def reference_result(cfg: Config):
    """The float64 reference rollout and its parameter gradients on the same inputs."""
    from cube_kernels import reference
    params, x, grad_out = make_inputs(cfg)
    params = {n: p.detach().double().requires_grad_(True) for n, p in params.items()}
    out = reference.rollout(x.double(), params, cfg.steps, seed=cfg.seed, neighbourhood=cfg.neighbourhood,
                            boundary=cfg.boundary, fire_rate=cfg.fire_rate, alive_channel=cfg.alive_channel)
    out.backward(grad_out.double())
    return out.detach(), {n: p.grad for n, p in params.items()}


def check(runner, cfg: Config) -> dict:
    out, grads = runner.result()
    ref_out, ref_grads = reference_result(cfg)
    errs = {"output": rel_err(out, ref_out)}
    errs["grads"] = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    errs["worst_grad"] = max(ref_grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
    tol = TOLERANCE[cfg.dtype]
    errs["ok"] = errs["output"] <= tol["output"] and errs["grads"] <= tol["grads"]
    errs["tolerance"] = tol
    return errs


def profile(runner, path: str, device: str):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        runner.forward()
        runner.backward()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30))


class Measurement:
    """One (implementation, config) in this process: ``setup`` (inputs, warm-up), ``repeat``
    (one timed forward and backward), ``finish`` (memory, check, the result row). The runner
    calls them one at a time so that the repeats of several implementations can interleave."""

    def __init__(self, job: dict):
        self.job, self.impl, self.cfg = job, impls.get(job["impl"]), Config(**job["config"])
        self.result = {"impl": self.impl.key, "label": self.impl.label, "ours": self.impl.ours,
                       "device": self.impl.device, "config": self.cfg.to_dict(), "tokens": self.cfg.tokens,
                       "threads": torch.get_num_threads()}
        self.fwd, self.bwd = [], []
        self.mem = self.runner = None

    def setup(self) -> dict:
        """``{"status": "ready", ...}``, or the final ``skipped`` row."""
        impl, cfg = self.impl, self.cfg
        reason = impl.unavailable(cfg)
        if reason:
            return {**self.result, "status": "skipped", "reason": reason}
        torch.manual_seed(cfg.seed)
        params, x, grad_out = make_inputs(cfg)
        if impl.device != "cpu":
            params = {n: p.detach().to(impl.device).requires_grad_(True) for n, p in params.items()}
            x, grad_out = x.to(impl.device), grad_out.to(impl.device)
        self.runner = impl.runner(cfg, params, x, grad_out)
        if impl.device == "cpu" and not memory.can_reset_peak():
            # No way to reset the RSS peak later: the first call is the measured one.
            self.mem = memory.cpu_peak(self._fwd_bwd, first_call=True)
        t0 = time.perf_counter()
        for _ in range(self.job["warmup"]):
            self._fwd_bwd()
        self.result["warmup_s"] = time.perf_counter() - t0
        return {"status": "ready", "warmup_s": self.result["warmup_s"]}

    def _fwd_bwd(self):
        self.runner.forward()
        self.runner.backward()

    def repeat(self) -> dict:
        t0 = time.perf_counter()
        self.runner.forward()
        t1 = time.perf_counter()
        self.runner.backward()
        self.fwd.append(t1 - t0)
        self.bwd.append(time.perf_counter() - t1)
        return {"status": "ok", "forward": self.fwd[-1], "backward": self.bwd[-1]}

    def finish(self) -> dict:
        result, runner, fwd, bwd = self.result, self.runner, self.fwd, self.bwd
        result["time"] = {"forward": summary(fwd), "backward": summary(bwd),
                          "forward_backward": summary([a + b for a, b in zip(fwd, bwd)])}
        result["peak_memory_forward_bytes"] = None
        mem = self.mem
        if mem is None:
            peak = memory.cuda_peak if self.impl.device == "cuda" else memory.cpu_peak
            runner.release()
            result["peak_memory_forward_bytes"] = peak(runner.forward)[0]  # what the graph holds
            runner.backward()
            runner.release()
            mem = peak(self._fwd_bwd)
        result["peak_memory_bytes"], result["memory_method"] = mem
        if self.job.get("check"):
            result["check"] = check(runner, self.cfg)
        if self.job.get("profile"):
            profile(runner, self.job["profile"], self.impl.device)
        result["status"] = "ok"
        return result


def run_rollout(job: dict) -> dict:
    """Setup, ``job["repeats"]`` repeats and finish, back to back."""
    m = Measurement(job)
    ready = m.setup()
    if ready["status"] != "ready":
        return ready
    for _ in range(job["repeats"]):
        m.repeat()
    return m.finish()


def run_latency(job: dict) -> dict:
    """One forward rollout without autograd (``torch.no_grad``), timed ``job["repeats"]`` times:
    the latency of answering one question."""
    impl, cfg = impls.get(job["impl"]), Config(**job["config"])
    row = {"impl": job["impl"], "label": impl.label, "ours": impl.ours, "device": impl.device,
           "config": cfg.to_dict(), "tokens": cfg.tokens, "threads": torch.get_num_threads()}
    reason = impl.unavailable(cfg)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    torch.manual_seed(cfg.seed)
    params, x, _ = make_inputs(cfg)
    rollout = impl.rollout_fn(cfg)
    times = []
    with torch.no_grad():
        for i in range(job["warmup"] + job["repeats"]):
            t0 = time.perf_counter()
            rollout(x, params)
            impls.sync(impl.device)
            if i >= job["warmup"]:
                times.append(time.perf_counter() - t0)
    return {**row, "status": "ok", "latency": summary(times)}


def run_gemm(job: dict) -> dict:
    return {"status": "ok", **gemm.measure(**job["gemm"])}


def _error(job: dict, e: Exception) -> dict:
    traceback.print_exc()
    return {"impl": job.get("impl"), "status": "error", "reason": f"{type(e).__name__}: {e}"}


def _reply(result: dict):
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def serve():
    """``--serve``: read a job, then commands (``repeat``, ``finish``), one JSON line each from
    stdin, and answer each with one ``RESULT`` line, until ``finish`` or end of input."""
    job = json.loads(sys.stdin.readline())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    m = Measurement(job)
    try:
        ready = m.setup()
    except Exception as e:
        return _reply(_error(job, e))
    _reply(ready)
    if ready["status"] != "ready":
        return
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        try:
            if cmd == "repeat":
                _reply(m.repeat())
                continue
            if cmd != "finish":
                raise ValueError(f"unknown command {cmd!r}")
            _reply(m.finish())
        except Exception as e:
            _reply(_error(job, e))
        return


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        return serve()
    job = json.loads(argv[0])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        run = {"gemm": run_gemm, "latency": run_latency}.get(job.get("kind"), run_rollout)
        result = run(job)
    except Exception as e:  # reported in the table instead of stopping the whole run
        result = _error(job, e)
    _reply(result)


if __name__ == "__main__":
    main()
