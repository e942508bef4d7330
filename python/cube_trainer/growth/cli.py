"""``cube-grow``: train a lattice to grow each target of a config, then measure and draw it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from .. import checkpoint as ckpt
from ..atomic import write_text_atomic
from ..cli import _Parser, _positive_int, _run
from ..config import ConfigError
from ..heap import keep_freed_memory
from ..metrics import read_metrics
from . import render
from ..rundir import RunDirectoryError
from .config import GrowConfig, config_to_dict, load_config, target_name
from .targets import occupied
from .trainer import Evaluation, GrowthTrainer

STAGES = (("grown", "grown (T)"), ("persisted", "persisted (2T)"), ("cut", "after the cut"),
          ("regrown", "regrown (T after the cut)"))


def _load() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def pictures(trainer: GrowthTrainer, ev: Evaluation, run_dir: Path):
    """``growth.png`` (snapshots), ``growth.gif`` (growth, cut, regrowth of sample 0) and
    ``training.png`` in ``run_dir``."""
    T, f = trainer.config.horizon, ev.frames
    seed = trainer.seed_state(1)[0].cpu()
    panels = [("target", trainer.target.cpu()), ("seed", seed)]
    panels += [(f"step {s}", f["grow"][s - 1]) for s in sorted({max(1, T // 4), max(1, T // 2), T})]
    panels += [(f"step {2 * T}", f["persist"][-1]), ("cut in half", f["cut"][0]),
               (f"{T} steps later", f["regrow"][-1])]
    render.snapshots(panels, run_dir / "growth.png", f"{trainer.name}: growth from one cell, persistence, regrowth")
    every = max(1, T // 20)
    frames = [("seed", seed)] + [(f"growing: step {s}", f["grow"][s - 1]) for s in range(every, T + 1, every)]
    frames += [("cut in half", f["cut"][0])] * 4
    frames += [(f"regrowing: step {s}", f["regrow"][s - 1]) for s in range(every, T + 1, every)]
    render.animation(frames, run_dir / "growth.gif")
    render.training_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png",
                           f"{trainer.name}: training")


def results_table(cfg: GrowConfig, rows: list[dict]) -> str:
    m, T = cfg.model, cfg.horizon
    head = (f"Growth on a {m.depth}x{m.height}x{m.width} lattice (C={m.channels}, F={m.hidden}, {m.neighbourhood}, "
            f"fire rate {m.fire_rate}, alive masking), horizon T={T} steps"
            + (f", grown with the weights' moving average (decay {cfg.train.ema})" if cfg.train.ema else "")
            + f"; voxel IoU of the opaque cells against the target, mean [min] over {cfg.eval.samples} rollouts"
            + "".join(f"; {name} with {', '.join(s)}" for name, s in cfg.per_target.items() if s))
    cols = ["target", "cells", "steps", "train s (CPU s)"] + [label for _, label in STAGES]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ious = [f"{r[f'iou_{k}']:.3f} [{r[f'iou_{k}_min']:.3f}]" for k, _ in STAGES]
        lines.append(f"| {r['target']} | {r['cells']} | {r['steps']} | {r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f}) | " + " | ".join(ious) + " |")
    return "\n".join(lines)


def _grow(args) -> int:
    overrides = list(args.set)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    elif args.resume:
        overrides.append(f"out_dir={args.resume}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.config:
        cfg = load_config(args.config, overrides)
    elif args.resume:
        if not (Path(args.resume) / "config.yaml").is_file():
            raise ConfigError(f"--resume {args.resume}: no cube-grow run there (it has no config.yaml)")
        cfg = load_config(Path(args.resume) / "config.yaml", overrides)
    else:
        raise ConfigError("give --config FILE (or --resume RUN_DIR to continue a run)")
    if args.target:
        known = {target_name(t): t for t in cfg.targets}
        unknown = [t for t in args.target if t not in known]
        if unknown:
            raise ConfigError(f"--target {unknown[0]!r} is not a target of the config ({', '.join(known)})")
        cfg.targets = [known[t] for t in args.target]
        cfg.per_target = {t: s for t, s in cfg.per_target.items() if t in args.target}
    keep_freed_memory()
    out = Path(cfg.out_dir)
    trainers = []
    for target in cfg.targets:  # every run directory is checked before anything is trained or replaced
        trainer = GrowthTrainer(cfg, target)
        run_dir = out / trainer.name
        if args.resume and ckpt.list_checkpoints(run_dir / "checkpoints"):
            trainer.resume(run_dir / "checkpoints", force=args.force)
            print(f"{trainer.name}: resumed at step {trainer.global_step}")
        try:
            trainer.prepare_run_dir(run_dir, overwrite=args.overwrite)
        except RunDirectoryError as exc:
            raise RunDirectoryError(f"{exc} (cube-grow: --resume {out} continues each target's run)") from None
        trainers.append(trainer)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    print(f"load average at the start: {_load()} ({os.cpu_count()} cores)")
    rows = []
    for trainer in trainers:
        run_dir = out / trainer.name
        m, t = trainer.config.model, trainer.config.train
        print(f"{trainer.name}: {int(occupied(trainer.target).sum())} target cells in {m.depth}x{m.height}x{m.width}, "
              f"seed cell {trainer.seed_cell}, {sum(p.numel() for p in trainer.lattice.parameters()):,} parameters, "
              f"{t.steps} steps of {t.batch_size} rollouts of {t.rollout_min}-{t.rollout_max} lattice steps"
              + "".join(f", {s}" for s in cfg.per_target.get(trainer.name, [])))
        trainer.fit(run_dir, stop_after=args.stop_after)
        if trainer.global_step < t.steps:
            print(f"{trainer.name}: stopped at step {trainer.global_step}/{cfg.train.steps}; continue with "
                  f"cube-grow --resume {out}")
            continue
        tic = time.perf_counter()
        ev = trainer.evaluate(frames=trainer.config.eval.pictures)
        row = {"target": trainer.name, "cells": int(occupied(trainer.target).sum()), "steps": trainer.global_step,
               "train_seconds": trainer.train_seconds, "train_cpu_seconds": trainer.train_cpu_seconds,
               **ev.summary(),
               "iou_per_sample": {k: getattr(ev, k).tolist() for k, _ in STAGES}, "load_average": _load()}
        write_text_atomic(run_dir / "result.json", json.dumps(row, indent=1))
        if trainer.config.eval.pictures:
            pictures(trainer, ev, run_dir)
        print(f"{trainer.name}: " + ", ".join(f"{label} {row[f'iou_{k}']:.3f}" for k, label in STAGES)
              + f" ({time.perf_counter() - tic:.0f} s to evaluate{' and draw' if trainer.config.eval.pictures else ''}; "
              f"{run_dir})")
        rows.append(row)
    if rows:
        table = results_table(cfg, rows) + f"\nload average (1, 5, 15 min) at the end: {_load()}"
        print("\n" + table)
        write_text_atomic(out / "results.md", table + "\n")
        write_text_atomic(out / "results.json", json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    p = _Parser(
        prog="cube-grow", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the lattice to grow each target of the config from one seed cell (Growing NCA: alive "
                    "masking, stochastic updates, a sample pool, damage), one after the other, each into "
                    "OUT_DIR/<target>/. Then report the voxel IoU after the horizon, after twice the horizon and "
                    "after cutting the shape in half and running on, and draw growth.png, growth.gif and "
                    "training.png.",
        epilog="examples:\n"
               "  cube-grow --config configs/grow.yaml                  # every target in turn\n"
               "  cube-grow --config configs/grow.yaml --target torus   # one of them\n"
               "  cube-grow --config configs/grow.yaml --set 'targets=[my_shape.npy]'\n"
               "  cube-grow --config configs/grow.yaml --set 'per_target.tree=[train.steps=3000]'  # one target's settings\n"
               "  cube-grow --resume runs/grow                          # continue from the checkpoints")
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/grow.yaml and docs/growth.md)")
    p.add_argument("--target", action="append", metavar="NAME",
                   help="train only this target of the config (repeatable; a .npy target by its file's stem)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run: each target from its newest checkpoint; without --config the run's "
                        "config.yaml is used")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even where the config differs from the checkpoint's in what "
                        "training computes (the continuation is then not the uninterrupted run)")
    p.add_argument("--overwrite", action="store_true",
                   help="start even where a target's run directory holds a run, deleting its checkpoints, metrics, "
                        "result and pictures (without it cube-grow refuses)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--out-dir", metavar="DIR", help="run directory (overrides out_dir)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (overrides device)")
    p.add_argument("--stop-after", type=_positive_int, metavar="N", help="stop each target after N steps of this invocation")
    return _run("cube-grow", _grow, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
