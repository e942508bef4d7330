"""The main job's run directory: the model, its two ablations, and their evaluation with the
baselines on a held-out split.

    run_dir/                      the model (``CubeTrainer.fit``: checkpoints/, best.json, metrics)
    run_dir/ablations/no_lattice/     the same adapters, residual and losses without the lattice
    run_dir/ablations/frozen_lattice/ the lattice frozen at its initialisation
    run_dir/eval_test.{json,txt}  per-question scores of every method, and the table

Each trained method is evaluated at its best validation step (``best.json``).
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from .config import Config, method_config
from .data import PairSet
from .evaluate import Trained, compare
from .report import source_commit
from .trainer import CubeTrainer, best_checkpoint

MODEL = "cube lattice (this model)"
ABLATIONS = {"no_lattice": "no-lattice ablation (adapters only)",
             "frozen_lattice": "frozen-lattice ablation (cell at init)"}


def ablation_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "ablations" / name


def train_ablations(cfg: Config, splits: dict[str, PairSet], teacher_dim: int, run_dir: str | Path, *,
                    resume: bool = False, log=print):
    """Trains each ablation with ``method_config(cfg, name)`` into ``ablation_dir``; with
    ``resume``, an ablation that has checkpoints there continues from the newest one."""
    for name, label in ABLATIONS.items():
        out = ablation_dir(run_dir, name)
        acfg = method_config(cfg, name)
        acfg.out_dir = str(out)
        trainer = CubeTrainer(acfg, teacher_dim)
        if resume and ckpt.list_checkpoints(out / "checkpoints"):
            trainer.resume(out)
        log(f"{label}: {trainer.num_parameters():,} trainable parameters, from step {trainer.global_step}")
        trainer.fit(splits["train"], splits["val"], out_dir=out, log=log)
        trainer.release_process_group()


def load_trained(path: str | Path, device=None) -> Trained:
    """A trained model: a checkpoint, or a run directory's best-on-validation checkpoint (its
    newest one when it has none)."""
    path = Path(path)
    trainer = CubeTrainer.load((best_checkpoint(path) or path) if path.is_dir() else path, device=device)
    return Trained(trainer.predict, trainer.num_parameters(), trainer.global_step,
                   (trainer.best_val or {}).get("mrr", float("nan")))


def evaluate_run(model: str | Path, splits: dict[str, PairSet], cfg: Config, split: str = "test",
                 baselines: bool = True, device=None, log=print) -> dict:
    """The evaluation record of a run (``report.format_report`` reads it): the model of
    ``model`` (a run directory or a checkpoint), the ablations of its run directory and, with
    ``baselines``, every baseline, each with its per-question scores on ``splits[split]``."""
    model = Path(model)
    run_dir = model if model.is_dir() else ckpt.resolve_checkpoint(model).parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    trained = [(MODEL, load_trained(model, device))]
    if baselines:
        for name, label in ABLATIONS.items():
            where = ablation_dir(run_dir, name)
            if best_checkpoint(where) or ckpt.list_checkpoints(where / "checkpoints"):
                trained.append((label, load_trained(where, device)))
            else:
                log(f"{label}: no run in {where}, left out of the table")
    held, rows = compare(trained, splits, cfg, split, baselines, log)
    return {"split": split, "seed": cfg.seed, "commit": source_commit(),
            "data": f"{cfg.data.source} (split_seed {cfg.data.split_seed})", "questions": held.queries.keys,
            "bank": len(held.bank.keys), "split_answers": len(held.own_bank.keys),
            "chance": held.queries.relevant.float().mean(1).mean().item(),
            "rows": [{"method": r.method, "params": r.params, "step": r.step, "metrics": r.metrics,
                      "scores": {k: v.tolist() for k, v in r.scores.items()}} for r in rows]}
