"""Console scripts: ``cube-train``, ``cube-eval`` and ``cube-ask``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .atomic import write_text_atomic
from .bank import BANK_FILE, AnswerBank
from .checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint
from .config import ConfigError, load_config, packaged_configs
from .data import DataError, build_splits, split_summary
from .heap import keep_freed_memory
from .report import ReportError, format_report, load_results
from .runs import evaluate_run, train_ablations
from .teacher import Teacher, TeacherError
from .trainer import CubeTrainer, NonFiniteLossError, best_checkpoint, resolve_device

_ERRORS = (ConfigError, CheckpointError, DataError, TeacherError, ReportError)


def _one_line(message) -> str:
    return " ".join(str(message).split())


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line, like every other error of these commands."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _run(prog: str, fn, args) -> int:
    """Runs a command: a user error (bad config, data, checkpoint, teacher) is one line on stderr
    and exit code 2, a failure of the run or of the system one line and exit code 1; warnings are
    one line each."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"{prog}: warning: {_one_line(message)}",
                                                               file=sys.stderr)
        try:
            return fn(args)
        except _ERRORS as exc:
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except (NonFiniteLossError, OSError) as exc:
            print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
            return 1


def _teacher(trainer: CubeTrainer) -> Teacher:
    tc = trainer.config.teacher
    teacher = Teacher(tc.model, device=tc.device or trainer.device, dtype=tc.dtype, max_length=tc.max_length,
                      batch_size=tc.batch_size, cache_dir=tc.cache_dir)
    if teacher.dim != trainer.teacher_dim:
        raise TeacherError(f"teacher.model {tc.model!r} gives {teacher.dim}-D embeddings but the model "
                           f"was built for {trainer.teacher_dim}-D")
    return teacher


def _splits(trainer: CubeTrainer, log) -> dict:
    """The data splits with teacher embeddings; under DDP rank 0 fills the cache first."""
    tic = time.perf_counter()
    teacher = _teacher(trainer)
    if trainer.world > 1 and trainer.rank != 0:
        dist.barrier()
    splits = build_splits(trainer.config.data, teacher)
    if trainer.world > 1 and trainer.rank == 0:
        dist.barrier()
    log(f"data: {trainer.config.data.source}: {split_summary(splits)}; teacher {teacher.path.name} "
        f"({teacher.dim}-D), {time.perf_counter() - tic:.1f} s (cache: {teacher.cache.path})")
    return splits


def _report(model, cfg, splits: dict, split: str, baselines: bool, out_dir: Path | None, log, device=None) -> dict:
    """Evaluates ``model`` (a run directory or checkpoint), its ablations and the baselines on
    ``splits[split]``; prints the table and writes ``eval_<split>.{json,txt}`` into ``out_dir``."""
    tic = time.perf_counter()
    result = evaluate_run(model, splits, cfg, split, baselines, device=device, log=log)
    table = format_report([result])
    log(table)
    log(f"evaluation: {time.perf_counter() - tic:.1f} s")
    if out_dir is not None:
        write_text_atomic(out_dir / f"eval_{split}.json", json.dumps(result))
        write_text_atomic(out_dir / f"eval_{split}.txt", table + "\n")
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": split, **{k: v for k, v in result.items() if k != "questions"},
                                "rows": [{k: v for k, v in r.items() if k != "scores"} for r in result["rows"]]})
                    + "\n")
    return result


def _init_distributed(device_of) -> bool:
    """Joins the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1;
    ``device_of()`` gives the configured device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = resolve_device(device_of()).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _run_dir(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint path (``run/checkpoints/step_N.json`` -> ``run``)."""
    path = resolve_checkpoint(checkpoint).parent
    return path.parent if path.name == "checkpoints" else path


def _answer_bank(trainer: CubeTrainer, teacher: Teacher) -> AnswerBank:
    """The answer bank of the checkpoint's run; rebuilt from the corpus (and saved) only when it
    is missing, damaged or was embedded by another teacher setup (a run of an older version)."""
    path = _run_dir(trainer.checkpoint_path) / BANK_FILE
    if not path.is_file():
        problem = "is missing"
    else:
        try:
            bank = AnswerBank.load(path)
        except CheckpointError as exc:
            problem = f"is damaged ({exc})"
        else:
            if bank.teacher_key == teacher.key:
                return bank
            problem = "was embedded by another teacher setup (the model or its settings changed)"
    warnings.warn(f"the answer bank {path} {problem}: rebuilding it from the corpus")
    bank = AnswerBank.from_splits(_splits(trainer, print), teacher.key)
    bank.save(path)
    return bank


def _configured_device(args, overrides) -> str:
    if args.device:
        return args.device
    if args.config:
        return load_config(args.config, overrides).device
    return read_checkpoint(args.resume)[0]["config"].get("device", "auto")


def _train(args) -> int:
    overrides = list(args.set)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.resume and not args.config:
        if not args.out_dir:  # continue in the run's own directory, wherever it was moved
            overrides.insert(0, f"out_dir={_run_dir(args.resume)}")
    elif not args.config:
        raise ConfigError("give --config FILE (or --resume RUN_DIR to continue a run)")
    else:
        load_config(args.config, overrides)  # a bad config fails before anything starts
    keep_freed_memory()
    distributed = _init_distributed(lambda: _configured_device(args, overrides))
    trainer = None
    try:
        rank = dist.get_rank() if distributed else 0
        log = print if rank == 0 else (lambda *a, **k: None)
        if args.resume and not args.config:
            trainer = CubeTrainer.load(args.resume, overrides=overrides, force=args.force)
        else:
            trainer = CubeTrainer(load_config(args.config, overrides))
            if args.resume:
                trainer.resume(args.resume, force=args.force)
        if args.resume:
            log(f"resumed {trainer.checkpoint_path} at step {trainer.global_step}")
        cfg = trainer.config
        if rank == 0:  # before anything is written or computed: a run directory is never replaced unasked
            trainer.prepare_run_dir(overwrite=args.overwrite, log=log)
        log(f"model: {trainer.num_parameters():,} parameters (lattice {cfg.model.depth}x{cfg.model.height}x"
            f"{cfg.model.width}, {cfg.model.channels} channels, {cfg.model.steps} steps), device {trainer.device}, "
            f"{trainer.world} process(es)")
        splits = _splits(trainer, log)
        trainer.check_data(splits)  # test included: a changed corpus must not move test pairs into training
        if rank == 0:
            AnswerBank.from_splits(splits, _teacher(trainer).key).save(Path(cfg.out_dir) / BANK_FILE)
        tic = time.perf_counter()
        trainer.fit(splits["train"], splits["val"], stop_after=args.stop_after, log=log)
        log(f"training: {time.perf_counter() - tic:.1f} s, step {trainer.global_step}/{cfg.train.steps}")
        finished = trainer.global_step == cfg.train.steps
        baselines = cfg.eval.baselines and not args.no_baselines
        if finished and baselines and not args.no_eval:
            tic = time.perf_counter()
            train_ablations(cfg, splits, trainer.teacher_dim, cfg.out_dir, resume=bool(args.resume), log=log)
            log(f"ablations: {time.perf_counter() - tic:.1f} s")
    finally:
        if distributed:
            if trainer is not None:
                trainer.release_process_group()
            dist.destroy_process_group()
    if rank == 0 and not args.no_eval and finished:
        _report(Path(cfg.out_dir), cfg, splits, "test", baselines, Path(cfg.out_dir), log, trainer.device)
    return 0


def train(argv=None) -> int:
    p = _Parser(
        prog="cube-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the cube lattice to answer questions in a teacher's embedding space, then "
                    "evaluate it on the held-out test split against baselines.",
        epilog="examples:\n"
               "  cube-train --config default                   # a shipped config, by name\n"
               "  cube-train --config configs/tiny.yaml --set train.steps=50 --out-dir runs/try\n"
               "  cube-train --resume runs/default              # continue from the newest checkpoint\n"
               "  torchrun --nproc_per_node=2 -m cube_trainer.cli train --config configs/default.yaml")
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML config file, or the name of a shipped config ({', '.join(packaged_configs())}); "
                        f"see docs/trainer.md")
    p.add_argument("--resume", metavar="PATH",
                   help="continue a run from a checkpoint or a run directory (its newest checkpoint that is not "
                        "damaged); without --config the checkpoint's own config is used")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even where the config (--config, --set) or the data split differs "
                        "from the checkpoint's (the continuation is then not the uninterrupted run)")
    p.add_argument("--overwrite", action="store_true",
                   help="start even where the run directory holds a run, deleting its checkpoints, metrics, plot, "
                        "evaluation and answer bank (without it cube-train refuses)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--out-dir", metavar="DIR", help="run directory (overrides out_dir)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides device; under torchrun each rank "
                                    "takes the GPU of its local rank)")
    p.add_argument("--stop-after", type=_positive_int, metavar="N",
                   help="stop after N steps of this invocation (the schedule still spans train.steps)")
    p.add_argument("--no-eval", action="store_true", help="skip the ablations and the final test evaluation")
    p.add_argument("--no-baselines", action="store_true",
                   help="evaluate the model only, without training the ablations and without baselines")
    return _run("cube-train", _train, p.parse_args(argv))


def _evaluate(args) -> int:
    if args.runs:
        results = load_results(args.runs)
        table = format_report(results)
        print(table)
        if args.out:
            write_text_atomic(args.out, table + "\n")
        return 0
    if not args.checkpoint:
        raise ConfigError("give --checkpoint PATH (a run directory or checkpoint) or --runs RUN_DIR ...")
    model = Path(args.checkpoint)
    path = (best_checkpoint(model) or resolve_checkpoint(model)) if model.is_dir() else resolve_checkpoint(model)
    trainer = CubeTrainer.load(path, device=args.device)
    print(f"checkpoint {path} (step {trainer.global_step})")
    splits = _splits(trainer, print)
    result = _report(model, trainer.config, splits, args.split, not args.no_baselines, None, print, trainer.device)
    if args.json:
        write_text_atomic(args.json, json.dumps(result))
    if args.out:
        write_text_atomic(args.out, format_report([result]) + "\n")
    return 0


def evaluate(argv=None) -> int:
    p = _Parser(
        prog="cube-eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a run on a held-out split: each distinct question ranks every distinct answer of "
                    "the corpus (recall@k, MRR; ties count against the model) and its mean cosine to its "
                    "answers, for the model at its best validation step, its two ablations (no lattice, frozen "
                    "lattice) and the baselines (raw question embedding, mean answer, ridge regression, an MLP "
                    "of the same size), with 95% bootstrap intervals. --runs aggregates the evaluations of "
                    "several runs (seeds) into one table.",
        epilog="examples:\n"
               "  cube-eval --checkpoint runs/default\n"
               "  cube-eval --runs runs/results/default/seed_*        # mean and intervals over seeds and questions")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="run directory (its best-on-validation checkpoint and its ablations) or a checkpoint file")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                   help="aggregate the test evaluations (eval_test.json) of these run directories")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--no-baselines", action="store_true", help="the model only (no ablations, no baselines)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's)")
    p.add_argument("--json", metavar="FILE", help="also write the evaluation (with per-question scores) as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the table to FILE")
    return _run("cube-eval", _evaluate, p.parse_args(argv))


def _ask(args) -> int:
    tic = time.perf_counter()
    trainer = CubeTrainer.load(args.checkpoint, device=args.device)
    teacher = _teacher(trainer)
    answer_bank = _answer_bank(trainer, teacher)
    answers, bank = answer_bank.texts, F.normalize(answer_bank.embeddings, dim=-1)
    teacher.load()  # a one-off cost, kept out of the per-question latency
    print(f"loaded in {time.perf_counter() - tic:.1f} s; {len(answers)} answers (every answer of the corpus)")
    for question in args.question:
        t0 = time.perf_counter()
        q = teacher.encode([question], cache=False)
        t1 = time.perf_counter()
        pred = F.normalize(trainer.predict(q), dim=-1)
        t2 = time.perf_counter()
        scores, idx = (pred @ bank.T)[0].topk(min(args.top, len(answers)))
        t3 = time.perf_counter()
        print(f"\nQ: {question}")
        for s, i in zip(scores.tolist(), idx.tolist()):
            print(f"  {s:+.3f}  {answers[i]}")
        print(f"latency: teacher {1e3 * (t1 - t0):.1f} ms, model {1e3 * (t2 - t1):.1f} ms, "
              f"search {1e3 * (t3 - t2):.1f} ms, total {1e3 * (t3 - t0):.1f} ms")
    return 0


def ask(argv=None) -> int:
    p = _Parser(
        prog="cube-ask",
        description="Answer questions with a trained checkpoint: embeds each question with the teacher, runs the "
                    "model and prints the nearest answers of the run's answer bank (every distinct answer of its "
                    "corpus, saved beside the checkpoints: no corpus is read) with their cosine scores and the "
                    "latency of each stage.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file or run directory")
    p.add_argument("question", nargs="+", help="one or more questions")
    p.add_argument("-k", "--top", type=_positive_int, default=5, help="how many answers to show (default 5)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's)")
    args = p.parse_args(argv)
    empty = [i for i, q in enumerate(args.question, 1) if not q.strip()]
    if empty:
        p.error(f"question {empty[0]} is empty")
    return _run("cube-ask", _ask, args)


def main(argv=None) -> int:
    """``python -m cube_trainer.cli {train,evaluate,ask} ...`` (what torchrun runs)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train, "evaluate": evaluate, "ask": ask}
    if not argv or argv[0] not in commands:
        print("usage: python -m cube_trainer.cli {train,evaluate,ask} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
