"""One trial of the settings search, on validation only (the test split is never touched):

    python -m cube_trainer.search --config configs/default.yaml --method lattice --set model.surface_channels=4
    python -m cube_trainer.search --config configs/default.yaml --method mlp --set train.lr=0.01

trains ``--method`` (the model, one of its ablations or the MLP baseline) with the config plus
the ``--set`` settings, and prints its best validation MRR and the step it was reached at
(validation at step 0, every ``train.eval_every`` steps and at the end, as in training). The
ablations and the MLP take the ``--set`` settings instead of their ``eval.<method>`` ones:
their search is what fills those in. ``--log FILE`` appends the result, with the whole config
it ran, as a JSON line; ``--table FILE --config BASE`` prints the trials of such a log as a
Markdown table whose commands reproduce each of them from BASE (docs/trainer.md holds it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .cli import _run, _splits
from .config import METHOD_SETTINGS, apply_overrides, config_from_dict, config_to_dict, load_config
from .evaluate import mlp_width, train_mlp, validation_set
from .heap import keep_freed_memory
from .trainer import CubeTrainer

METHODS = ("lattice", *METHOD_SETTINGS)


def _trial(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    if args.method != "lattice":
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), METHOD_SETTINGS[args.method]))
    cfg.out_dir = args.out_dir or str(Path("runs/search") / args.method)
    cfg.train.progress = False
    keep_freed_memory()
    tic = time.perf_counter()
    quiet = lambda *a, **k: None  # noqa: E731
    trainer = CubeTrainer(cfg)
    splits = _splits(trainer, quiet)
    if args.method == "mlp":  # as wide as the config's own model has parameters
        hidden = cfg.eval.mlp_hidden or mlp_width(CubeTrainer(load_config(args.config)).num_parameters(),
                                                  trainer.teacher_dim)
        result = train_mlp(splits["train"], validation_set(splits, cfg.eval.recall_at), cfg, hidden)
        history, best = result.history, {"step": result.step, "mrr": result.val_mrr}
    else:
        history = trainer.fit(splits["train"], splits["val"], overwrite=True, log=quiet)
        best = trainer.best_val
    at_best = next(r for r in history if r["kind"] == "val" and r["step"] == best["step"])
    record = {"method": args.method, "config": args.config, "set": args.set, "best_step": best["step"],
              "effective": _settings(cfg),
              "steps": cfg.train.steps, **{f"val_{k}": at_best[k] for k in ("mrr", "recall@1", "mean_cosine")},
              "val_mrr_by_step": {r["step"]: round(r["mrr"], 4) for r in history if r["kind"] == "val"},
              "seconds": round(time.perf_counter() - tic, 1)}
    print(f"{args.method} {' '.join(args.set)}: best validation MRR {best['mrr']:.4f} at step {best['step']} "
          f"of {cfg.train.steps} (recall@1 {at_best['recall@1']:.4f}); by step {record['val_mrr_by_step']}")
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


def _settings(cfg) -> dict[str, object]:
    """A config as flat ``{"section.key": value}``, without what leaves a trial's result alone: where
    it writes, how often it checkpoints, how it shows progress and the comparison methods' own
    settings (a trial takes its method's from ``--set``)."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items() if isinstance(values, dict) else [(None, values)]:
            flat[f"{section}.{key}" if key else section] = value
    ignored = ("out_dir", "train.progress", "train.checkpoint_every", "device", *(f"eval.{m}" for m in METHOD_SETTINGS))
    for key in ignored:
        flat.pop(key, None)
    return flat


def _table(args) -> int:
    """The trials of ``args.table`` as Markdown rows, best validation MRR first within each method."""
    records = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
    print("| method | settings (besides the base config) | best val MRR | at step | command |")
    print("| --- | --- | ---: | ---: | --- |")
    for method in METHODS:
        base = load_config(args.config)
        if method != "lattice":
            base = config_from_dict(apply_overrides(config_to_dict(base), METHOD_SETTINGS[method]))
        base = _settings(base)
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: -r["val_mrr"])
        for r in rows:
            sets = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in r["effective"].items()
                    if k in base and base[k] != v]  # keys _settings leaves out were logged by older trials
            command = (f"`python -m cube_trainer.search --config {args.config} --method {method}"
                       + "".join(f" --set {s}" for s in sets) + "`")
            print(f"| {method} | {', '.join(sets) or '(base)'} | {r['val_mrr']:.4f} | {r['best_step']} of "
                  f"{r['steps']} | {command} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cube_trainer.search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="the base config")
    p.add_argument("--method", choices=METHODS, default="lattice")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting to try (repeatable)")
    p.add_argument("--out-dir", metavar="DIR", help="scratch run directory, replaced by each trial (default runs/search/METHOD)")
    p.add_argument("--log", metavar="FILE", help="append the result as a JSON line")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--table", metavar="LOG", help="print the trials of LOG (from --log) as a Markdown table")
    args = p.parse_args(argv)
    return _run("search", _table if args.table else _trial, args)


if __name__ == "__main__":
    sys.exit(main())
