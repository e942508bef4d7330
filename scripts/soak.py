"""Trains the tiny config for 10,000 steps with `cube-train` (checkpointing and evaluating every
500 steps, then the final test evaluation) and records the process's resident memory (RSS) at
every 500 steps; checks that after the warm-up (the first 1,000 steps) it grows by at most 5%.

    nice -n 10 python scripts/soak.py                 # writes docs/soak.png and docs/soak.json

Prints the table that docs/trainer.md shows. Exit code 0 when the check passes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def logged_step(metrics: Path) -> int:
    """The last step with a train record (a torn last line is skipped)."""
    step = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "train":
                step = record["step"]
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--every", type=int, default=500, help="checkpoint, evaluation and memory period (steps)")
    p.add_argument("--warmup", type=int, default=1_000, help="steps before the memory baseline")
    p.add_argument("--limit", type=float, default=0.05, help="allowed growth after the warm-up (fraction)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--workdir", help="run directory and teacher cache (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "docs" / "soak"), help="writes OUT.png and OUT.json")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    run = work / "run"
    cmd = [sys.executable, "-m", "cube_trainer.cli", "train", "--config", args.config, "--out-dir", str(run),
           "--overwrite", "--set", f"train.steps={args.steps}", "--set", f"train.checkpoint_every={args.every}",
           "--set", f"train.eval_every={args.every}", "--set", "train.log_every=100",
           "--set", "train.progress=false", "--set", f"teacher.cache_dir={work / 'cache'}"]
    print(" ".join(cmd))
    tic = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    samples: dict[int, float] = {}  # step (multiple of --every) -> RSS in MiB just after it was logged
    peaks: dict[int, float] = {}  # the same for the peak so far (VmHWM)
    final_rss, peak = None, 0.0
    while proc.poll() is None:
        step = logged_step(run / "metrics.jsonl")
        rss = rss_mib(proc.pid)
        mark = step - step % args.every
        if rss is not None and mark and mark not in samples:
            samples[mark], peaks[mark] = rss, rss_mib(proc.pid, "VmHWM") or rss
        if step >= args.steps and rss is not None:
            final_rss = max(final_rss or 0.0, rss)  # during the final test evaluation
        peak = max(peak, rss_mib(proc.pid, "VmHWM") or 0.0)
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        print("".join(output))
        raise SystemExit(f"cube-train failed with exit code {proc.returncode}")
    wall = time.time() - tic

    steps = sorted(samples)
    base = samples.get(args.warmup) or samples[min(s for s in steps if s >= args.warmup)]
    after = [samples[s] for s in steps if s >= args.warmup]
    growth = max(after) / base - 1
    ok = growth <= args.limit
    peak_by = min((s for s in steps if peaks[s] >= peak), default=None)  # None: during the final evaluation
    result = {"command": " ".join(cmd[1:]), "steps": args.steps, "every": args.every, "wall_s": round(wall, 1),
              "rss_mib": {str(s): round(samples[s], 1) for s in steps}, "baseline_step": args.warmup,
              "baseline_mib": round(base, 1), "max_after_warmup_mib": round(max(after), 1),
              "growth": round(growth, 4), "limit": args.limit, "peak_mib": round(peak, 1), "peak_by_step": peak_by,
              "final_evaluation_mib": round(final_rss, 1) if final_rss else None, "passed": ok,
              "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(samples, base, args, Path(args.out + ".png"))

    print("| step | " + " | ".join(str(s) for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    print("| RSS MiB | " + " | ".join(f"{samples[s]:.0f}" for s in steps) + " |")
    print(f"RSS at step {args.warmup}: {base:.1f} MiB; highest after it: {max(after):.1f} MiB ({growth:+.2%}, "
          f"limit {args.limit:+.0%}): {'pass' if ok else 'FAIL'}; peak (VmHWM) {peak:.1f} MiB, reached "
          f"{f'by step {peak_by}' if peak_by else 'in the final evaluation'}; "
          f"{args.steps} steps in {wall:.0f} s (load average {' '.join(result['loadavg'])})")
    print(f"wrote {args.out}.png and {args.out}.json")
    return 0 if ok else 1


def plot(samples: dict[int, float], base: float, args, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(samples)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [samples[s] for s in steps], marker="o", label="RSS of cube-train")
    ax.axhline(base * (1 + args.limit), color="red", linestyle="--",
               label=f"+{args.limit:.0%} over step {args.warmup}")
    ax.axvline(args.warmup, color="gray", linestyle=":", label="end of warm-up")
    ax.set(xlabel="step", ylabel="MiB", title=f"{args.config} config, {args.steps} steps: resident memory",
           ylim=(0, max(samples.values()) * 1.2))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
