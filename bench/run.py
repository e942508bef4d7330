"""Side-by-side benchmark of every way to run the lattice, in one command.

    python -m bench --quick        # batch-8 comparison + GEMM ceiling (a few minutes)
    python -m bench                # + batch scaling 1..64, the 64x64x64 lattice, the default
                                   #   trainer model (one question's latency, training samples/s)

Each (implementation, config) runs in a fresh ``bench.worker`` process; results go to
``bench/results/`` (JSON, CSV, markdown, PNG) and the README's performance section.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import select
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__" and not __package__:  # `python bench/run.py`: run as the package module
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.run import main as _main
    sys.exit(_main())

from . import impls, machine, report
from .config import DTYPES, Config
from .worker import RESULT_PREFIX

DEFAULT_BACKENDS = ("cpu_rollout", "cpu", "cuda", "triton", "eager", "eager_ckpt", "compile", "pyg", "jax")
GPU_BASELINES = ("eager@cuda", "compile@cuda", "pyg@cuda")
# torch.compile is left out by default: every batch size is a fresh process and a recompile.
SCALING_BACKENDS = ("cpu_rollout", "cpu", "cuda", "triton", "eager")
# The default trainer model (configs/default.yaml): one question's latency and training samples/s.
TRAINER_CONFIG = os.path.join(machine.ROOT, "configs", "default.yaml")
TRAINER_BACKENDS = ("cpu_rollout", "cpu", "eager", "compile")
SCALING_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# Keep a batch only if twice the previous batch's peak fits in this share of the free memory.
MEMORY_HEADROOM = 0.7
# The growth workload (configs/grow.yaml's cell, docs/growth.md) on a 32x32x32 lattice: Moore
# neighbourhood, fire rate 0.5, alive masking on the alpha channel.
GROWTH = Config(depth=32, height=32, width=32, channels=16, hidden=64, neighbourhood="moore", fire_rate=0.5,
                alive_channel=3, steps=16, batch=1)


def parse_lattice(s: str) -> tuple[int, int, int]:
    try:
        d, h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"lattice must be DxHxW, e.g. 11x15x15, got {s!r}") from None
    return d, h, w


def parse_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the batch comparison and the GEMM ceiling")
    p.add_argument("--backends", type=parse_list, default=None,
                   help=f"comma-separated, from {', '.join(impls.IMPLS)} (default: all, the @cuda baselines "
                        f"only with a GPU; ones that cannot run here are listed as skipped with the reason)")
    p.add_argument("--scaling-backends", type=parse_list, default=list(SCALING_BACKENDS))
    p.add_argument("--batches", type=lambda s: [int(v) for v in parse_list(s)], default=list(SCALING_BATCHES),
                   help="batch sizes of the scaling run (CUDA continues doubling to the memory limit)")
    p.add_argument("--lattice", type=parse_lattice, default=(11, 15, 15), help="D x H x W (default 11x15x15)")
    p.add_argument("--large", type=parse_lattice, default=(64, 64, 64), help="the large lattice (full run)")
    p.add_argument("--large-batch", type=int, default=1)
    p.add_argument("--large-channels", type=int, default=16, help="C of the large lattice")
    p.add_argument("--large-hidden", type=int, default=32, help="F of the large lattice")
    p.add_argument("--max-wait", type=float, default=300,
                   help="seconds to wait at the start for a quiet machine (1-min load average at most "
                        "half a core per core); a run on a busy machine is marked as measured under load")
    p.add_argument("--force-readme", action="store_true",
                   help="regenerate the README section even from a run measured under load")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--neighbourhood", default="von_neumann", choices=("von_neumann", "moore"))
    p.add_argument("--boundary", default="zero", choices=("zero", "periodic"))
    p.add_argument("--fire-rate", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 quick, 2 full)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 quick, 7 full)")
    p.add_argument("--no-growth", action="store_true",
                   help="skip the growth workload (32x32x32, Moore, fire rate 0.5, alive masking)")
    p.add_argument("--no-sizes", action="store_true",
                   help="skip the cost per cell-step of ours at batch 32 and on a 48x48x48 lattice")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip ours in bf16 against ours in fp32 and torch.compile in bf16 (the comparison's config)")
    p.add_argument("--sequential", action="store_true",
                   help="run the comparison's implementations one after the other instead of interleaving "
                        "their repeats (lower total memory: one live worker at a time)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of our backends' fwd+bwd to bench/results/")
    p.add_argument("--out", default=os.path.join(machine.ROOT, "bench", "results"))
    p.add_argument("--readme", default=os.path.join(machine.ROOT, "README.md"))
    p.add_argument("--no-readme", action="store_true", help="do not regenerate the README section")
    return p


def run_worker(job: dict, timeout: float) -> dict:
    """Run one job in a fresh interpreter and return its result (errors become result rows)."""
    cmd = [sys.executable, "-m", "bench.worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, cwd=machine.ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": job.get("impl"), "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            if result.get("status") == "error":
                sys.stderr.write(proc.stderr[-3000:])
            return result
    sys.stderr.write(proc.stderr[-3000:])
    reason = f"worker exited with status {proc.returncode} without a result"
    if proc.returncode < 0 or proc.returncode == 137:
        reason += " (killed: out of memory?)"
    return {"impl": job.get("impl"), "status": "error", "reason": reason}


class ServedWorker:
    """A ``bench.worker --serve`` process: set up and warmed up once, then asked for one timed
    repeat at a time. Its stderr goes to a temporary file (shown if it fails)."""

    def __init__(self, job: dict, timeout: float):
        self.job, self.timeout = job, timeout
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", "--serve"], cwd=machine.ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def request(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._failed("worker exited")
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return self._failed(f"timed out after {self.timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                return self._failed(f"worker exited with status {self.proc.returncode} without a result")
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                if result.get("status") == "error":
                    self._show_stderr()
                return result

    def _show_stderr(self):
        self.err.seek(0)
        sys.stderr.write(self.err.read()[-3000:])

    def _failed(self, reason: str) -> dict:
        self._show_stderr()
        self.close()
        return {"impl": self.job.get("impl"), "status": "error", "reason": reason}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def run_interleaved(jobs: list[dict], repeats: int, timeout: float, on_row) -> list[dict]:
    """Run the jobs' repeats round-robin, each job in its own live worker, so that whatever
    else the machine does while they run hits every implementation alike. Set-up and warm-up
    (compilation) run one worker at a time; each round starts at a different worker."""
    rows: list[dict | None] = [None] * len(jobs)
    workers: dict[int, ServedWorker] = {}
    try:
        for i, job in enumerate(jobs):
            w = ServedWorker(job, timeout)
            ready = w.request(job)
            if ready.get("status") == "ready":
                workers[i] = w
            else:
                rows[i] = ready
                w.close()
                on_row(i, ready)
        for r in range(repeats):
            live = sorted(workers)
            if not live:
                break
            k = r % len(live)
            for i in live[k:] + live[:k]:
                reply = workers[i].request({"cmd": "repeat"})
                if reply.get("status") != "ok":
                    rows[i] = reply
                    workers.pop(i).close()
                    on_row(i, reply)
        for i in sorted(workers):
            rows[i] = workers[i].request({"cmd": "finish"})
            on_row(i, rows[i])
    finally:
        for w in workers.values():
            w.close()
    return rows


def compare(jobs: list[dict], args, repeats: int) -> list[dict]:
    """The rows of one side-by-side comparison, interleaved unless ``--sequential``."""
    if args.sequential:
        rows = []
        for job in jobs:
            rows.append(row := run_worker(job, args.timeout))
            progress(row, impls.get(job["impl"]).label)
        return rows
    return run_interleaved(jobs, repeats, args.timeout,
                           lambda i, row: progress(row, impls.get(jobs[i]["impl"]).label))


def progress(row: dict, what: str):
    if row.get("status") != "ok":
        print(f"  {what:<40} {row.get('status')}: {row.get('reason')}", flush=True)
        return
    t = row["time"]
    err = row.get("check")
    err_s = f"  err {err['output']:.1e}/{err['grads']:.1e}{'' if err['ok'] else ' WRONG'}" if err else ""
    print(f"  {what:<40} fwd {t['forward']['median'] * 1e3:8.1f} ms  bwd {t['backward']['median'] * 1e3:8.1f} ms"
          f"  fwd+bwd {t['forward_backward']['median'] * 1e3:8.1f} ms  peak {row['peak_memory_bytes'] / 2**20:7.0f} MiB"
          f"{err_s}", flush=True)


def wait_for_quiet(max_wait_s: float, cores: int | None) -> dict:
    """Wait (bounded) for other work to end before timing anything, and say what was seen."""
    limit = machine.quiet_load(cores)
    load = machine.load_average()
    if load is not None and load > limit and max_wait_s > 0:
        print(f"1-min load average {load:.1f} > {limit:.1f}: waiting up to {max_wait_s:.0f} s for a "
              "quiet machine", flush=True)
    quiet = machine.wait_for_quiet(max_wait_s, cores)
    if not quiet["quiet"]:
        print(f"warning: 1-min load average is {quiet['load'] or 0:.1f} on {cores} cores after "
              f"{quiet['waited_s']:.0f} s; other work is running: these timings are marked as measured "
              "under load", flush=True)
    return quiet


def trainer_config() -> tuple[Config, int]:
    """The lattice of the default trainer model and its training batch (one sample more: the
    trainer adds one empty-surface sample per batch)."""
    import yaml
    with open(TRAINER_CONFIG) as f:
        c = yaml.safe_load(f)
    m = c["model"]
    cfg = Config(depth=m["depth"], height=m["height"], width=m["width"], channels=m["channels"],
                 hidden=m["hidden"], steps=m["steps"], batch=1)
    return cfg, c["train"]["batch_size"] + 1


def run_trainer_model(results: dict, base_job: dict, timeout: float) -> None:
    """The default trainer model's lattice: one question's latency (batch 1, no autograd) and
    training samples/s (a training batch, forward and backward)."""
    cfg, batch = trainer_config()
    print(f"trainer model, one question (no grad): {report._config_line(cfg.to_dict())}", flush=True)
    for key in TRAINER_BACKENDS:
        row = run_worker({**base_job, "kind": "latency", "impl": key, "config": cfg.to_dict(),
                          "repeats": max(20, base_job["repeats"])}, timeout)
        results["inference"].append(row)
        lat = row.get("latency")
        print(f"  {impls.get(key).label:<40} "
              + (f"{lat['median'] * 1e3:8.2f} ms" if lat else f"{row.get('status')}: {row.get('reason')}"),
              flush=True)
    train = cfg.with_(batch=batch)
    print(f"trainer model, training batch: {report._config_line(train.to_dict())}", flush=True)
    for key in TRAINER_BACKENDS:
        row = run_worker({**base_job, "impl": key, "config": train.to_dict()}, timeout)
        results["trainer"].append(row)
        progress(row, impls.get(key).label)


def command_line(argv: list[str]) -> str:
    return "python -m bench" + "".join(" " + shlex.quote(a) for a in argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.backends is None:
        import torch
        args.backends = list(DEFAULT_BACKENDS) + (list(GPU_BASELINES) if torch.cuda.is_available() else [])
    for key in set(args.backends) | set(args.scaling_backends):
        impls.get(key)  # unknown names fail now, not after an hour
    repeats = args.repeats or (5 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    D, H, W = args.lattice
    cfg = Config(depth=D, height=H, width=W, channels=args.channels, hidden=args.hidden,
                 neighbourhood=args.neighbourhood, boundary=args.boundary, fire_rate=args.fire_rate,
                 steps=args.steps, batch=args.batch, dtype=args.dtype)
    base_job = {"warmup": warmup, "repeats": repeats, "threads": args.threads}
    m = machine.describe()
    print(f"machine: {machine.summary_line(m)}")
    quiet = wait_for_quiet(args.max_wait, m["cores"])
    m["load_average_1min"] = quiet["load"]
    results = {"schema": 1, "command": command_line(argv), "mode": "quick" if args.quick else "full",
               "machine": m, "config": cfg.to_dict(), "warmup": warmup, "repeats": repeats,
               "gemm": [], "comparison": [], "growth": [], "sizes": [], "bf16": [], "scaling": [], "large": [],
               "inference": [], "trainer": [], "quiet": quiet}
    start = time.perf_counter()
    cpu_start = machine.cpu_seconds()

    print("GEMM ceiling (torch.mm):", flush=True)
    sizes = [1024, 2048] if args.quick else [1024, 2048, 4096]
    for device in ["cpu"] + (["cuda"] if m["gpu"] else []):
        g = run_worker({**base_job, "kind": "gemm", "gemm": {
            "device": device, "sizes": sizes, "cell_rows": cfg.batch * cfg.cells,
            "channels": cfg.channels, "hidden": cfg.hidden}}, args.timeout)
        results["gemm"].append(g)
        if g.get("status") == "ok":
            for dtype, e in g["dtypes"].items():
                print(f"  {device} {dtype:<9} {e['peak_flops'] / 1e9:8.1f} GFLOP/s", flush=True)
        else:
            print(f"  {device}: {g.get('status')}: {g.get('reason')}", flush=True)

    print(f"comparison: {report._config_line(cfg.to_dict())}"
          + (" (repeats interleaved)" if not args.sequential else ""), flush=True)
    jobs = [{**base_job, "impl": key, "config": cfg.to_dict(), "check": True} for key in args.backends]
    results["comparison"] = compare(jobs, args, repeats)
    results["interleaved"] = not args.sequential
    if not args.no_growth:
        print(f"growth workload: {report._config_line(GROWTH.to_dict())}", flush=True)
        results["growth"] = compare([{**job, "config": GROWTH.to_dict()} for job in jobs], args, repeats)
    ours = next((job for job in jobs if job["impl"] == report.OURS[0]), None)
    if ours is not None and not args.no_sizes:
        sizes = report.size_configs(cfg)
        print("cost per cell-step with the lattice's size: " + "; ".join(
            f"{c.lattice} batch {c.batch}" for c in sizes), flush=True)
        results["sizes"] = compare([{**ours, "config": c.to_dict(), "check": False} for c in sizes], args, repeats)
    if ours is not None and not args.no_bf16 and cfg.dtype == "float32":
        low = cfg.with_(dtype="bfloat16").to_dict()
        compiled = ([{**base_job, "impl": "compile", "config": low, "check": True}]
                    if "compile" in args.backends else [])
        print("bf16: ours in fp32 and bf16" + (", torch.compile in bf16" if compiled else ""), flush=True)
        results["bf16"] = compare([{**ours, "check": False}, {**ours, "config": low}] + compiled, args, repeats)
    if args.profile:
        for job, row in zip(jobs, results["comparison"]):
            if impls.get(job["impl"]).ours and row.get("status") == "ok":
                path = os.path.join(args.out, f"profile_{job['impl'].replace('@', '_')}.txt")
                os.makedirs(args.out, exist_ok=True)
                run_worker({**job, "warmup": 1, "repeats": 1, "check": False, "profile": path}, args.timeout)
                print(f"  profile of {job['impl']}: {path}", flush=True)

    if not args.quick:
        print("batch scaling:", flush=True)
        for key in args.scaling_backends:
            impl = impls.get(key)
            reason = impl.unavailable(cfg)
            if reason:
                print(f"  {impl.label}: skipped: {reason}", flush=True)
                continue
            batches = list(args.batches)
            last_peak = None
            while batches:
                b = batches.pop(0)
                free = machine.mem_available_bytes()
                if last_peak is not None and impl.device == "cpu" and free and 2 * last_peak > MEMORY_HEADROOM * free:
                    row = {"impl": key, "label": impl.label, "device": impl.device, "status": "skipped",
                           "config": cfg.with_(batch=b).to_dict(),
                           "reason": f"needs about {2 * last_peak / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
                else:
                    row = run_worker({**base_job, "impl": key, "config": cfg.with_(batch=b).to_dict(),
                                      "repeats": max(3, repeats // 2)}, args.timeout)
                results["scaling"].append(row)
                progress(row, f"{impl.label} batch {b}")
                if row.get("status") != "ok":
                    break  # a bigger batch will not fit either
                last_peak = row["peak_memory_bytes"]
                # On a GPU keep doubling past the list until memory runs out.
                if not batches and impl.device == "cuda" and b < 4096:
                    batches.append(2 * b)
        LD, LH, LW = args.large
        large = cfg.with_(depth=LD, height=LH, width=LW, batch=args.large_batch,
                          channels=args.large_channels, hidden=args.large_hidden)
        print(f"large lattice: {report._config_line(large.to_dict())}", flush=True)
        for key in args.backends:
            row = run_worker({**base_job, "impl": key, "config": large.to_dict(),
                              "repeats": max(3, repeats // 2)}, args.timeout)
            results["large"].append(row)
            progress(row, impls.get(key).label)

        run_trainer_model(results, base_job, args.timeout)

    results["elapsed_s"] = time.perf_counter() - start
    others = machine.other_cores(cpu_start, machine.cpu_seconds())
    # The 1-min load average right now still holds the benchmark's own threads; once they have
    # stopped it falls below the quiet limit within about a minute unless other work runs.
    settled = machine.wait_for_quiet(args.max_wait, m["cores"])
    results["machine"]["load_average_1min_end"] = settled["load"]
    results["machine"]["other_processes_cores"] = others
    results["under_load"] = machine.under_load(quiet, others) or not settled["quiet"]
    readme = None if args.no_readme else args.readme
    if results["under_load"] and readme and not args.force_readme:
        print(f"measured under load (1-min load average {quiet['load'] or 0:.1f} at the start; other processes "
              f"kept {others or 0:.2f} cores busy on average while it ran): the README is left as it is "
              "(--force-readme writes it anyway, marked)", flush=True)
        readme = None
    readme_ok = report.write_all(results, args.out, readme)
    print()
    print(report.comparison_table(results["comparison"]))
    print()
    print(report.targets_table(results["targets"]))
    print(f"\nresults: {args.out}/results.{{json,csv,md}}"
          + (" and scaling.png" if results["scaling"] else "") + f" ({results['elapsed_s']:.0f} s)")
    if not readme_ok:
        print("the README section was not regenerated (see above); rerun with --no-readme to skip it")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
