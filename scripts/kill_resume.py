"""Kills `cube-train` with SIGKILL at random moments, resumes it each time with `cube-train
--resume RUN_DIR`, and checks that nothing is lost:

* every resume works and starts from the newest complete checkpoint (a kill never damages one);
* it loses at most the steps since that checkpoint (at most train.checkpoint_every);
* the final checkpoint (parameters, optimizer moments, RNG states, sample pool, schedule, scaler,
  data position) equals that of an uninterrupted run bit for bit, and so do the metrics and the
  final evaluation.

Half of the kills land at a random moment of training: this script sends SIGKILL a random
fraction of a step after a random step within two checkpoint periods of the start. The others
land in the windows that matter most, reached through hooks the child process installs: half-way
through writing a checkpoint's tensor file or its JSON, between a finished checkpoint and the
pruning of older ones, during a validation evaluation, half-way through a line of metrics.jsonl,
half-way through config.yaml or the answer bank, and (the last kill) during the final test
evaluation. The child kills itself there with SIGKILL, as an outside kill would.

    python scripts/kill_resume.py                 # 20 kills of the tiny config
    python scripts/kill_resume.py --kills 3 --steps 60 --no-eval --windows tensors,eval,json

Exit code 0 when every check passes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Every run uses one thread: runs are bit-equal only with the same thread count (the order of
# parallel sums), and one is the fastest for the tiny lattice.
THREADS = 1
LOG_OPEN = "kill_resume: metrics log open"
# Targeted windows, and how many times each happens in one process (for choosing the n-th).
WINDOWS = {"tensors": 3, "json": 3, "prune": 3, "eval": 3, "metrics": 20, "config": 1, "bank": 1, "report": 1}


# ---------------------------------------------------------------------------------- child

def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(window: str, nth: int):
    """Makes this process SIGKILL itself at the ``nth`` time it reaches ``window``."""
    from cube_trainer import bank, checkpoint, cli, metrics, trainer
    from cube_trainer.atomic import atomic_write

    count = itertools.count(1)

    def due() -> bool:
        return next(count) == nth

    def half_written(write):  # a writer killed half-way: its temporary file holds half the text
        def wrapper(path, text):
            if not due():
                return write(path, text)
            with atomic_write(path) as tmp:
                Path(tmp).write_text(text[:len(text) // 2])
                _die()
        return wrapper

    def predict_then_die(evaluation, questions):  # an evaluation killed half-way, after its predictions
        def wrapper(trainer_, data, *args, **kwargs):
            if due():
                trainer_.predict(questions(data))
                _die()
            return evaluation(trainer_, data, *args, **kwargs)
        return wrapper

    if window == "tensors":
        save_file = checkpoint.save_file

        def save_tensors(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)
            if due():
                os.truncate(path, os.path.getsize(path) // 2)
                _die()
        checkpoint.save_file = save_tensors
    elif window == "json":
        checkpoint.write_text_atomic = half_written(checkpoint.write_text_atomic)
    elif window == "config":
        trainer.write_text_atomic = half_written(trainer.write_text_atomic)
    elif window == "prune":
        prune = checkpoint.prune_checkpoints
        checkpoint.prune_checkpoints = lambda directory, keep: _die() if due() else prune(directory, keep)
    elif window == "eval":
        trainer.CubeTrainer.evaluate = predict_then_die(trainer.CubeTrainer.evaluate, lambda data: data.q)
    elif window == "metrics":
        write = metrics.MetricsLog.write

        def write_half(self, record):
            if not due():
                return write(self, record)
            line = json.dumps(record) + "\n"
            with open(self.path, "a") as f:
                f.write(line[:len(line) // 2])
            _die()
        metrics.MetricsLog.write = write_half
    elif window == "bank":
        save = bank.AnswerBank.save

        def save_half(self, path):
            if not due():
                return save(self, path)
            with atomic_write(path) as tmp:
                bank.save_file({"embeddings": self.embeddings.contiguous()}, str(tmp))
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                _die()
        bank.AnswerBank.save = save_half
    elif window == "report":
        cli.compare = predict_then_die(cli.compare, lambda splits: splits["test"].q)
    elif window not in ("timer", "none"):
        raise SystemExit(f"unknown window {window!r}")


def child(window: str, nth: int, argv: list[str]) -> int:
    from cube_trainer import cli, metrics

    install_kill(window, nth)
    log_init = metrics.MetricsLog.__init__

    def announce(self, *args, **kwargs):  # for timed kills: training starts now
        log_init(self, *args, **kwargs)
        print(LOG_OPEN, flush=True)
    metrics.MetricsLog.__init__ = announce
    return cli.train(argv)


# ---------------------------------------------------------------------------------- parent

def newest_valid_step(run: Path) -> int | None:
    """The step of the newest checkpoint of ``run`` that reads back whole, None if there is none."""
    from cube_trainer.checkpoint import CheckpointError, list_checkpoints, read_checkpoint, step_of
    for path in reversed(list_checkpoints(run / "checkpoints")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_checkpoint(path)
        except CheckpointError:
            continue
        return step_of(path)
    return None


def last_logged_step(run: Path) -> int:
    from cube_trainer.metrics import read_metrics
    return max((r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"), default=0)


def launch(argv: list[str], window: str | None, nth: int = 0, in_process: bool = False,
           timer: tuple[Path, int, float] | None = None) -> tuple[int, str]:
    """Runs cube-train in a child process with a kill planned at ``window``; for ``timer``,
    (metrics file, step, delay): a SIGKILL ``delay`` seconds after that step was logged. Returns
    (exit code, output). A run without a kill may run in this process (``in_process``: no
    start-up cost)."""
    if window is None and in_process:
        import torch
        from cube_trainer import cli
        buffer, threads = io.StringIO(), torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                rc = cli.train(argv)
        finally:
            torch.set_num_threads(threads)
        return rc, buffer.getvalue()
    cmd = [sys.executable, __file__, "--child", window or "none", str(nth), "--", *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    if window == "timer":
        metrics, step, delay = timer
        for line in proc.stdout:  # the earlier run's records are gone once the log is open
            lines.append(line)
            if line.startswith(LOG_OPEN):
                break
        while proc.poll() is None and last_logged_step(metrics.parent) < step:
            time.sleep(0.005)
        time.sleep(delay)
        proc.kill()
    lines += proc.stdout.readlines()
    proc.wait()
    return proc.returncode, "".join(lines)


def resumed_step(output: str) -> int:
    found = re.findall(r"^resumed \S+ at step (\d+)$", output, flags=re.M)
    return int(found[-1]) if found else 0


def schedule(rng: random.Random, kills: int, windows: list[str]) -> list[tuple[str, int]]:
    """With ``timer`` among ``windows`` every other kill lands at a random time; the others go
    round the targeted windows (shuffled), each at a random n-th occurrence. The final test
    evaluation (``report``) comes after the last step, so a kill there is the last one."""
    order = [w for w in windows if w not in ("timer", "report")]
    rng.shuffle(order)
    targeted = itertools.cycle(order)
    plan = []
    for i in range(kills):
        if "report" in windows and i == kills - 1:
            window = "report"
        elif "timer" in windows and (i % 2 == 0 or not order):
            window = "timer"
        else:
            window = next(targeted)
        plan.append((window, rng.randint(1, WINDOWS.get(window, 1))))
    return plan


def same_state(a: Path, b: Path) -> list[str]:
    """What differs between the final checkpoints of two runs (empty: bit for bit equal)."""
    import torch
    from cube_trainer.checkpoint import read_checkpoint

    def bits(t):
        return t.contiguous().view(-1).view(torch.uint8)

    (ma, ta), (mb, tb) = read_checkpoint(a), read_checkpoint(b)
    diffs = [f"tensor {k}" for k in sorted(set(ta) | set(tb))
             if k not in ta or k not in tb or ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
             or not torch.equal(bits(ta[k]), bits(tb[k]))]
    for meta in (ma, mb):
        meta.pop("path")
        meta["config"].pop("out_dir")
    return diffs + [f"json {k}" for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]


def comparable_metrics(run: Path) -> list[dict]:
    from cube_trainer.metrics import read_metrics
    return [{k: v for k, v in r.items() if k not in ("samples_per_s",)} for r in read_metrics(run / "metrics.jsonl")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=1200, help="train.steps of the run")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--config", default="tiny", help="config file or shipped config name (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--no-eval", action="store_true", help="skip the final test evaluation")
    p.add_argument("--windows", default=",".join(["timer", *WINDOWS]),
                   help="where kills land, comma-separated (default: all): timer, " + ", ".join(WINDOWS))
    p.add_argument("--max-delay", type=float, default=0.05,
                   help="a timed kill lands this long at most (s) after a random step within two checkpoint "
                        "periods of the start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the runs go (default: a temporary directory, removed at the end)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--child", nargs=2, metavar=("WINDOW", "N"), help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.windows.split(",")) - {"timer", *WINDOWS}
    if unknown:
        p.error(f"unknown windows {sorted(unknown)}")
    return args


def run(args: argparse.Namespace, in_process: bool = False) -> int:
    """The whole check; ``in_process`` runs the runs without a kill in this process."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    ref, run = work / "uninterrupted", work / "killed"
    # Every piece of state that resume must restore: fire masks, a sample pool, accumulation.
    base = ["--config", args.config, "--set", f"train.steps={args.steps}", "--set", "train.log_every=1",
            "--set", f"train.checkpoint_every={args.checkpoint_every}", "--set", f"train.eval_every={args.eval_every}",
            "--set", "train.keep_checkpoints=2", "--set", "train.pool_size=16", "--set", "train.grad_accum=2",
            "--set", "model.fire_rate=0.5", "--set", "train.progress=false",
            "--set", f"teacher.cache_dir={work / 'cache'}"]
    for s in args.set:
        base += ["--set", s]
    tail = ["--no-eval"] if args.no_eval else []
    rng = random.Random(args.seed)

    print(f"uninterrupted run: {ref}")
    rc, out = launch(base + ["--out-dir", str(ref), "--overwrite"] + tail, None, in_process=in_process)
    if rc != 0:
        print(out)
        raise SystemExit(f"the uninterrupted run failed with exit code {rc}")

    windows = [w for w in args.windows.split(",") if not (args.no_eval and w == "report")]
    rows, failures = [], []
    expected, reached = None, 0  # the step the next run must resume from; the step the last kill hit
    for i, (window, nth) in enumerate(schedule(rng, args.kills, windows) + [(None, 0)], 1):
        argv = (["--resume", str(run)] if expected is not None else base + ["--out-dir", str(run), "--overwrite"])
        target = (expected or 0) + rng.randint(1, 2 * args.checkpoint_every)
        delay = rng.uniform(0.0, args.max_delay)
        rc, out = launch(argv + tail, window, nth, in_process, (run / "metrics.jsonl", target, delay))
        start = resumed_step(out)
        row = {"run": i, "resumed_from": start, "lost": reached - start, "ok": start == (expected or 0)}
        if not row["ok"]:
            failures.append(f"run {i}: started at step {start}, but the newest complete checkpoint is {expected}")
        if row["lost"] > args.checkpoint_every:
            row["ok"] = False
            failures.append(f"run {i}: lost {row['lost']} steps, more than train.checkpoint_every")
        if window is None:
            rows.append(dict(row, kill=None, exit=rc))
            if rc != 0:
                failures.append(f"the last run (no kill) failed with exit code {rc}:\n{out[-3000:]}")
            break
        if rc != -signal.SIGKILL:
            failures.append(f"run {i}: expected a kill ({window} #{nth}), got exit code {rc}:\n{out[-3000:]}")
            break
        reached, expected = last_logged_step(run), newest_valid_step(run)
        kill = f"{window} #{nth}" if window != "timer" else f"step {target} + {1e3 * delay:.0f} ms"
        row.update(kill=kill, step_at_kill=reached, newest_checkpoint=expected)
        rows.append(row)
        print(f"run {i:2d}: started at step {start:5d}, killed ({row['kill']}) at step {reached:5d}; newest "
              f"complete checkpoint: {expected}")

    kills = [r for r in rows if r.get("kill")]
    resumes_ok = sum(r["ok"] for r in rows[1:])
    if not failures:
        diffs = same_state(ref, run)
        if diffs:
            failures.append(f"final state differs from the uninterrupted run: {', '.join(diffs)}")
        if comparable_metrics(ref) != comparable_metrics(run):
            failures.append("metrics.jsonl differs from the uninterrupted run's")
        if not args.no_eval and (ref / "eval_test.json").read_text() != (run / "eval_test.json").read_text():
            failures.append("eval_test.json differs from the uninterrupted run's")
    print(f"kills: {len(kills)}; resumes from the newest complete checkpoint: {resumes_ok}/{len(rows) - 1}; most "
          f"steps lost by a kill: {max(r['lost'] for r in rows)} (train.checkpoint_every={args.checkpoint_every})")
    what = "final checkpoint (model, optimizer, RNG states, pool, schedule, data position) and metrics" + (
        "" if args.no_eval else " and test evaluation")
    print(f"{what}: " + ("equal to the uninterrupted run's bit for bit" if not failures else "CHECK FAILED"))
    for f in failures:
        print("FAILED:", f)
    if args.json:
        Path(args.json).write_text(json.dumps({"kills": rows, "failures": failures}, indent=1))
    if not args.workdir and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.rest)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
