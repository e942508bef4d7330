"""``CubeTrainer``: the model with its optimizer, schedule and training state.

One optimizer step (``train_step``) takes a global batch of question / answer embeddings. The
batch is cut into ``train.grad_accum`` micro-batches and each micro-batch into one slice per DDP
rank, so that one process and N processes see the same pairs, the same contrastive negatives
(the whole micro-batch) and average the same gradients. Everything random is drawn from seeds
derived from (``seed``, purpose, step, ...), or from generators saved in checkpoints, so a
resumed run repeats the losses of an uninterrupted one. Training steps draw from the trainer's
own torch RNG state (saved in checkpoints), never from the process's, which torch seeds
differently in every process and which evaluation or a teacher model's loading may move.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .atomic import write_text_atomic
from .checkpoint import CheckpointError
from .common import derive_seed, epoch_permutation, lr_factor, param_groups
from .config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config, validate
from .data import DataError, PairSet
from .evaluate import HeldOut, RankingBank
from .losses import compute_losses, same_question, surface_target
from .metrics import MetricsLog, plot_metrics, read_metrics
from .model import CubeModel
from .rundir import data_fingerprint, prepare_run_dir
from .teacher import model_dim

LOSS_KEYS = ("total_loss", "surface_loss", "dialogue_loss", "contrastive_loss", "internal_loss", "cosine_similarity")
# Config keys a resumed run may change: they do not change what it computes.
FREE_KEYS = ("out_dir", "device", "train.progress", "teacher.cache_dir", "teacher.device", "teacher.batch_size",
             "eval.batch_size")
# Steps in a row that float16 may skip (GradScaler backing off, overflowing forwards) before the run stops.
MAX_SKIPPED_IN_A_ROW = 50


BEST = "best"  # out_dir/best.{json,safetensors}: the model of the best validation MRR


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The best-on-validation checkpoint of a run directory (``fit``), if it has one."""
    path = Path(run_dir) / f"{BEST}.json"
    return path if path.is_file() else None


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss or gradient norm: the step is not applied."""


def resolve_device(name: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; under torchrun (``local_rank``
    given) every CUDA rank takes the GPU of its local rank, whatever N says."""
    if str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r}: CUDA is not available on this machine (use --device cpu)")
    if local_rank is not None:
        device = torch.device("cuda", local_rank)
    if (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: no autocast)."""
    if amp is True:
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(amp)


def _coerce_config(config) -> Config:
    if config is None:
        return config_from_dict({})
    if isinstance(config, Config):
        return validate(copy.deepcopy(config))
    if isinstance(config, dict):
        return config_from_dict(copy.deepcopy(config))
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a Config, a dict, a YAML path or None, got {type(config).__name__}")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key (old -> new)`` for every key whose value differs, nested keys dotted."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _config_diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k} ({a.get(k)!r} -> {b.get(k)!r})")
    return keys


def check_resume_config(where, saved: dict, new: dict, free, force: bool, command: str):
    """Resuming the checkpoint ``where`` with config ``new`` (a dict) where it was saved with
    ``saved``: a difference in a key that is not ``free`` (a predicate on dotted keys) is a
    ``CheckpointError`` unless ``force``, then a warning."""
    changed = [k for k in _config_diff(saved, new) if not free(k.split(" ")[0])]
    if changed and not force:
        raise CheckpointError(f"resuming {where} with a config that differs in {', '.join(changed)}: "
                              f"the run would not continue as it started ({command} --force, or force=True, "
                              f"resumes anyway)")
    if changed:
        warnings.warn(f"resuming {where} with a different config ({', '.join(changed)}): "
                      f"the continuation is not the uninterrupted run")


class CubeTrainer(nn.Module):
    """Trains ``CubeModel`` (adapter -> lattice -> inverse adapter) on teacher embeddings.

    ``config``: a ``Config``, a dict, a YAML path or None (defaults). ``teacher_dim``: the
    embedding width; read from ``teacher.model``'s config.json when None. ``device``: overrides
    ``config.device``. Under ``torch.distributed`` (torchrun) the model is wrapped in DDP.
    """

    def __init__(self, config=None, teacher_dim: int | None = None, *, device=None):
        super().__init__()
        self.config = cfg = _coerce_config(config)
        if device is not None:
            cfg.device = str(device)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", self.rank)) if self.world > 1
                                     else None)
        self.teacher_dim = teacher_dim if teacher_dim is not None else model_dim(cfg.teacher.model)
        with torch.random.fork_rng(devices=[]):  # the same initial model in every process
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            self.model = CubeModel(self.teacher_dim, cfg.model)
        self.model.to(self.device)
        # The DDP wrapper stays out of the module tree, so state_dict() holds each parameter once.
        self.__dict__["_engine"] = self.model if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, warmup=t.warmup_steps, total=t.steps, floor=t.min_lr_ratio))
        self.amp_dtype = amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.skipped_in_a_row = 0
        self.global_step = 0
        self.best_val: dict | None = None  # {"step", "mrr"} of the best validation so far (fit)
        self.data_position = {"epoch": 0, "cursor": 0, "size": None}
        self.data_fingerprint: dict[str, str] = {}
        self.checkpoint_path: str | None = None  # the checkpoint last restored or saved
        self.allow_changes = False  # resumed with force=True: a changed config or data split is accepted
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "pool"))
        # The torch RNG states that training steps run with: the CPU's, and this GPU's.
        seed = derive_seed(cfg.seed, "torch")
        self.rng_state = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            self.rng_state["cuda"] = torch.Generator(self.device).manual_seed(seed).get_state()
        self.pool_states = self.pool_filled = None
        if t.pool_size:
            D, H, W = self.model.lattice.shape
            self.pool_states = torch.zeros(t.pool_size, D, H, W, cfg.model.channels, device=self.device)
            self.pool_filled = torch.zeros(t.pool_size, dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ inference

    def num_parameters(self) -> int:
        """The trainable parameters (a frozen lattice's are not counted)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def forward(self, question_emb: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The model's outputs for ``question_emb`` [B, teacher_dim] (see ``CubeModel.forward``);
        ``final_output`` is the predicted answer embedding."""
        q = self._check("question_emb", question_emb)
        return self.model(q, seed=derive_seed(self.config.seed, "eval") if seed is None else seed)

    @torch.no_grad()
    def predict(self, question_emb: torch.Tensor) -> torch.Tensor:
        """Predicted answer embeddings ``[N, teacher_dim]`` (float32, on the CPU), in batches."""
        q = self._check("question_emb", question_emb)
        was_training = self.model.training
        self.model.eval()
        bs = self.config.eval.batch_size
        try:
            out = [self.forward(q[i:i + bs])["final_output"].float().cpu() for i in range(0, q.shape[0], bs)]
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.teacher_dim)

    def evaluate(self, data: PairSet | HeldOut | torch.Tensor, answer_emb: torch.Tensor | None = None) -> dict[str, float]:
        """Mean cosine, recall@k and MRR (``evaluate.py``) on held-out data: a ``HeldOut`` (its
        questions ranked against its answer bank), a ``PairSet`` (ranked against its own
        answers), or question and answer embeddings (equal rows are the same text)."""
        if isinstance(data, torch.Tensor):
            data = PairSet.of_tensors(self._check("question_emb", data).cpu(),
                                      self._check("answer_emb", answer_emb).cpu())
        if isinstance(data, PairSet):
            data = HeldOut(data, RankingBank.of(data), self.config.eval.recall_at)
        return data.metrics(self.predict(data.q))

    def _check(self, name: str, emb) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[1] != self.teacher_dim:
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"{name} must be a [batch, {self.teacher_dim}] tensor (the teacher's width), got {got}")
        if not emb.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {emb.dtype}")
        return emb.to(self.device, torch.float32)

    # ------------------------------------------------------------------ training

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def _own_rng(self):
        """Runs the block on the trainer's RNG states and keeps what it leaves; the process's states
        are put back after it."""
        cuda = "cuda" in self.rng_state
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self.rng_state["torch"])
            if cuda:
                torch.cuda.set_rng_state(self.rng_state["cuda"], self.device)
            yield
            self.rng_state = {"torch": torch.get_rng_state()}
            if cuda:
                self.rng_state["cuda"] = torch.cuda.get_rng_state(self.device)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def _pool_take(self, batch: int):
        """Pool slots for the batch, and which of them start from a stored state."""
        slots = torch.randperm(self.pool_states.shape[0], generator=self.generator)[:batch].to(self.device)
        n_reset = round(batch * self.config.train.pool_reset)
        self.pool_filled[slots[:n_reset]] = False
        return slots, self.pool_states[slots], self.pool_filled[slots]

    def train_step(self, question_emb: torch.Tensor, answer_emb: torch.Tensor,
                   question_ids: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on a batch; returns ``total_loss``, each ``<term>_loss``,
        ``cosine_similarity``, ``lr`` (of this step), ``grad_norm`` (before clipping) and
        ``skipped``. Under DDP every rank passes the same global batch and trains on its slice of it.
        ``question_ids`` ``[B]``: pairs with the same id share a question, and their answers are
        not each other's contrastive negatives (default: pairs with equal question embeddings).

        Under float16 autocast a step with non-finite gradients (the GradScaler lowers its scale)
        or a non-finite loss (an overflow in the forward) is skipped: ``skipped`` is True, there is
        no ``grad_norm``, and neither the parameters, the schedule nor ``global_step`` move."""
        q, a = self._check("question_emb", question_emb), self._check("answer_emb", answer_emb)
        if q.shape[0] != a.shape[0]:
            raise ValueError(f"question_emb has {q.shape[0]} rows but answer_emb has {a.shape[0]}")
        if question_ids is None:
            question_ids = torch.unique(q, dim=0, return_inverse=True)[1]
        elif tuple(question_ids.shape) != (q.shape[0],):
            raise ValueError(f"question_ids must have shape [{q.shape[0]}], got {tuple(question_ids.shape)}")
        question_ids = question_ids.to(self.device)
        t, lc = self.config.train, self.config.loss
        B, accum = q.shape[0], t.grad_accum
        if B % (accum * self.world):
            raise ValueError(f"a batch of {B} pairs cannot be cut into train.grad_accum={accum} micro-batches "
                             f"over {self.world} process(es)")
        Bm = B // accum
        if lc.contrastive > 0 and Bm < 2:
            raise ValueError(f"the contrastive loss needs micro-batches of >= 2 pairs, got {Bm}")
        with self._own_rng():
            return self._step(q, a, question_ids, Bm, Bm // self.world)

    def _step(self, q: torch.Tensor, a: torch.Tensor, question_ids: torch.Tensor, Bm: int, Bl: int) -> dict[str, float]:
        t, lc = self.config.train, self.config.loss
        B, accum = q.shape[0], t.grad_accum
        pool = self._pool_take(B) if self.pool_states is not None else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(LOSS_KEYS), device=self.device)
        finals = []
        for m in range(accum):
            rows = slice(m * Bm + self.rank * Bl, m * Bm + (self.rank + 1) * Bl)
            sync = m == accum - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self._engine.no_sync():
                start = {} if pool is None else {"start": pool[1][rows], "use_start": pool[2][rows]}
                with self._autocast():
                    out = self._engine(q[rows], seed=derive_seed(self.config.seed, "fire", self.global_step, m,
                                                                 self.rank), **start)
                micro = slice(m * Bm, (m + 1) * Bm)
                losses = compute_losses(out, a[rows], surface_target(self.model, a[rows]), lc,
                                        negatives=a[micro], offset=self.rank * Bl,
                                        same=same_question(question_ids[rows], question_ids[micro]))
                self.scaler.scale(losses["total_loss"] / accum).backward()
            sums += torch.stack([losses[k].detach().float() for k in LOSS_KEYS]) / accum
            if pool is not None:
                finals.append(self._gather(out["final_cube_state"].detach().float()))
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        result = dict(zip(LOSS_KEYS, sums.tolist()), lr=self.optimizer.param_groups[0]["lr"])
        if not torch.isfinite(sums).all():
            bad = ", ".join(f"{k}={v}" for k, v in result.items())
            if self.scaler.is_enabled():  # a float16 overflow in the forward
                return self._skipped(result, f"a non-finite loss ({bad})")
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step + 1}: {bad}")
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm or float("inf"))
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm at step {self.global_step + 1} "
                                     f"(losses were finite: total_loss={result['total_loss']:.4g})")
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:  # the scaler found inf/NaN gradients and skipped the update
            return self._skipped(result, "non-finite gradients")
        self.skipped_in_a_row = 0
        result.update(grad_norm=grad_norm.item(), skipped=False)
        self.scheduler.step()
        if pool is not None:  # every rank holds the whole pool, updated identically
            slots = pool[0]
            self.pool_states[slots] = torch.cat(finals)
            self.pool_filled[slots] = True
        self.global_step += 1
        return result

    def _skipped(self, result: dict, why: str) -> dict:
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteLossError(f"{self.skipped_in_a_row} float16 steps in a row skipped for {why} at step "
                                     f"{self.global_step + 1}")
        return dict(result, skipped=True)

    def _next_batch(self, n: int) -> torch.Tensor:
        """The next global batch of training indices (epochs of seeded permutations, no partial batch)."""
        B, pos = self.config.train.batch_size, self.data_position
        if pos["cursor"] + B > n:
            pos["epoch"], pos["cursor"] = pos["epoch"] + 1, 0
        idx = epoch_permutation(self.config.seed, pos["epoch"], n)[pos["cursor"]:pos["cursor"] + B]
        pos["cursor"] += B
        return idx

    def fit(self, train: PairSet, val: PairSet | None = None, *, out_dir: str | Path | None = None,
            stop_after: int | None = None, overwrite: bool = False, log=print) -> list[dict]:
        """Trains until ``train.steps`` (or for ``stop_after`` more steps), logging to
        ``out_dir/metrics.jsonl``, checkpointing to ``out_dir/checkpoints`` and plotting to
        ``out_dir/training.png``. With ``val``, evaluates on it (ranked against the answers of
        ``train`` and ``val``) at step 0, every ``train.eval_every`` steps and at the end, and
        keeps the model of the best validation MRR so far in ``out_dir/best`` (``best_checkpoint``;
        ``best_val`` says which step). Continues from the trainer's state (see ``resume``). An
        ``out_dir`` that holds another run is refused unless ``overwrite`` (``prepare_run_dir``),
        and a resumed run must get the data it trained on (``check_data``).
        Returns the metric records of this call."""
        from tqdm.auto import tqdm
        cfg, t = self.config, self.config.train
        out = Path(out_dir or cfg.out_dir)
        ck_dir = out / "checkpoints"
        main = self.rank == 0
        self._check("train.q", train.q)
        N, B = len(train), t.batch_size
        if N < B:
            raise DataError(f"the training split has {N} pairs, fewer than train.batch_size={B}")
        self.check_data({"train": train, "val": val})
        metrics = None
        if main:
            self.prepare_run_dir(out, overwrite=overwrite, log=log)
            write_text_atomic(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            metrics = MetricsLog(out / "metrics.jsonl", self.global_step)
        history = []

        def record(rec: dict):
            history.append(rec)
            if metrics is not None:
                metrics.write(rec)

        held = HeldOut(val, RankingBank.of(train, val), cfg.eval.recall_at) if val is not None else None
        if held is not None and self.global_step == 0:
            self.best_val = None
            self._validate(held, out, record)
        bar = tqdm(total=t.steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (main and t.progress))
        window, n_window, busy, done, skipped = defaultdict(float), 0, 0.0, 0, 0
        question_ids = train.question_ids()
        while self.global_step < t.steps and (stop_after is None or done < stop_after):
            idx = self._next_batch(N)
            tic = time.perf_counter()
            try:
                res = self.train_step(train.q[idx], train.a[idx], question_ids[idx])
            except NonFiniteLossError as exc:
                bar.close()
                where = (f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path
                         else "no checkpoint was written yet")
                raise NonFiniteLossError(f"{exc}. Training stopped; {where}.") from None
            busy += time.perf_counter() - tic
            if res["skipped"]:
                skipped += 1
                continue
            done += 1
            n_window += 1
            for k in LOSS_KEYS + ("grad_norm",):
                window[k] += res[k]
            step = self.global_step
            if step % t.log_every == 0 or step == t.steps:
                rec = {"kind": "train", "step": step, **{k: v / n_window for k, v in window.items()},
                       "lr": res["lr"], "samples_per_s": n_window * B / busy, "skipped_steps": skipped}
                record(rec)
                bar.set_postfix(loss=f"{rec['total_loss']:.4f}", cos=f"{rec['cosine_similarity']:.3f}",
                                samples_s=f"{rec['samples_per_s']:.1f}")
                window, n_window, busy, skipped = defaultdict(float), 0, 0.0, 0
            if held is not None and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                self._validate(held, out, record)
            if main and t.checkpoint_every and step % t.checkpoint_every == 0:
                self._save_run_checkpoint(ck_dir)
            bar.update(1)
        bar.close()
        if self.global_step == t.steps and held is not None and done:
            rec = self._validate(held, out, record)
            log(f"validation at step {rec['step']}: " + ", ".join(f"{k}={rec[k]:.4f}" for k in ("mrr", "recall@1"))
                + f"; best MRR {self.best_val['mrr']:.4f} at step {self.best_val['step']} ({out / BEST}.json)")
        if main:
            final = ckpt.checkpoint_stem(ck_dir, self.global_step)
            if done and (self.checkpoint_path is None or ckpt.stem_of(self.checkpoint_path) != final):
                self._save_run_checkpoint(ck_dir)
            plot_metrics(read_metrics(out / "metrics.jsonl"), out / "training.png")
            log(f"checkpoint: {self.checkpoint_path}\nmetrics: {out / 'metrics.jsonl'}\nplot: {out / 'training.png'}")
        return history

    def _validate(self, held: HeldOut, out: Path, record) -> dict:
        """Evaluates on validation, records it and keeps the model if it is the best so far
        (strictly better MRR: a tie keeps the earlier step, at first the untrained model)."""
        rec = {"kind": "val", "step": self.global_step, **self.evaluate(held)}
        if self.best_val is None or rec["mrr"] > self.best_val["mrr"]:
            self.best_val = {"step": self.global_step, "mrr": rec["mrr"]}
            if self.rank == 0:
                self.save(out / BEST)
        record(dict(rec, best_step=self.best_val["step"]))
        return rec

    def prepare_run_dir(self, out_dir: str | Path | None = None, *, overwrite: bool = False, log=print):
        """Readies ``out_dir`` (default: ``config.out_dir``) for this run: a directory that holds
        another run is refused unless ``overwrite`` (see ``rundir.prepare_run_dir``)."""
        prepare_run_dir(out_dir or self.config.out_dir, step=self.global_step, source=self.checkpoint_path,
                        overwrite=overwrite, log=log)

    def check_data(self, splits: dict[str, PairSet | None]):
        """Records the fingerprint of each split; for a resumed run, first checks that each is the
        data it trained on: a ``CheckpointError`` naming those that changed (unless the run was
        resumed with ``force=True``)."""
        new = {name: data_fingerprint(pairs) for name, pairs in splits.items() if pairs is not None}
        changed = [name for name, fp in new.items() if self.data_fingerprint.get(name, fp) != fp]
        size = self.data_position["size"]
        if "train" in new and "train" not in changed and size not in (None, len(splits["train"])):
            changed.append("train")  # a checkpoint without fingerprints (older format)
        if changed and not self.allow_changes:
            raise CheckpointError(f"the {', '.join(changed)} split(s) differ from those of the run in "
                                  f"{self.checkpoint_path}: the corpus or its split changed, so the run cannot "
                                  f"continue exactly (cube-train --force, or resume(force=True), continues anyway)")
        self.data_fingerprint.update(new)
        if "train" in new:
            self.data_position["size"] = len(splits["train"])

    def release_process_group(self):
        """Drops the DDP wrapper, which holds on to the process group. Call it before
        ``torch.distributed.destroy_process_group()``: a gloo group that outlives it can abort the
        process at exit. The trainer still predicts, evaluates and saves, but no longer trains."""
        self.__dict__["_engine"] = self.model
        gc.collect()

    # ------------------------------------------------------------------ checkpoints

    def _save_run_checkpoint(self, ck_dir: Path):
        self.save(ckpt.checkpoint_stem(ck_dir, self.global_step))
        ckpt.prune_checkpoints(ck_dir, self.config.train.keep_checkpoints)

    def save(self, path: str | Path) -> Path:
        """Writes the whole training state to ``path.safetensors`` + ``path.json`` (atomically);
        returns the JSON path."""
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        opt_tensors, opt_json = ckpt.optimizer_state(self.optimizer)
        tensors.update(opt_tensors)
        tensors.update({f"rng/{k}": v for k, v in self.rng_state.items()})
        tensors["rng/generator"] = self.generator.get_state()
        if self.pool_states is not None:
            tensors["pool/states"], tensors["pool/filled"] = self.pool_states, self.pool_filled
        meta = {"step": self.global_step, "config": config_to_dict(self.config), "teacher_dim": self.teacher_dim,
                "optimizer": opt_json,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "data_position": dict(self.data_position), "data_fingerprint": dict(self.data_fingerprint),
                "best_val": self.best_val, "versions": ckpt.library_versions()}
        json_path = ckpt.write_checkpoint(path, tensors, meta)
        self.checkpoint_path = str(json_path)
        return json_path

    def _restore(self, meta: dict, tensors: dict[str, torch.Tensor]):
        where = meta["path"]
        model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(model_sd)), sorted(set(model_sd) - set(own))
        wrong = [f"{k} {tuple(model_sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in model_sd and model_sd[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise CheckpointError(f"checkpoint {where} does not fit this model: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}, shape mismatches {wrong[:4]}")
        ckpt.check_structure(meta["scheduler"], self.scheduler.state_dict(), where, "scheduler")
        if self.scaler.is_enabled() and meta["scaler"]:
            ckpt.check_structure(meta["scaler"], self.scaler.state_dict(), where, "scaler")
        ckpt.load_optimizer_state(self.optimizer, meta["optimizer"], tensors, where)
        self.model.load_state_dict(model_sd)
        try:
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.scaler.is_enabled() and meta["scaler"]:
                self.scaler.load_state_dict(meta["scaler"])
            restored = {k: tensors[f"rng/{k}"] for k in self.rng_state if k == "torch" or f"rng/{k}" in tensors}
            for key, state in restored.items():  # a scratch generator checks each state
                torch.Generator("cpu" if key == "torch" else self.device).set_state(state)
            self.rng_state.update(restored)
            self.generator.set_state(tensors["rng/generator"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {where}: cannot restore the training state: {exc}") from None
        if self.pool_states is not None:
            if "pool/states" not in tensors or tensors["pool/states"].shape != self.pool_states.shape:
                raise CheckpointError(f"checkpoint {where} has no sample pool of shape {tuple(self.pool_states.shape)} "
                                      f"(train.pool_size changed?)")
            self.pool_states.copy_(tensors["pool/states"])
            self.pool_filled.copy_(tensors["pool/filled"])
        self.global_step = meta["step"]
        self.data_position = dict(meta["data_position"])
        self.best_val = meta.get("best_val")
        self.data_fingerprint = dict(meta.get("data_fingerprint") or {})
        self.checkpoint_path = where

    def resume(self, path: str | Path, *, force: bool = False) -> CubeTrainer:
        """Restores model, optimizer, schedule, scaler, RNG, data position and pool from a
        checkpoint (a file, or a run directory: its newest checkpoint that is not damaged). A
        config that differs from the checkpoint's (beyond ``FREE_KEYS``) is refused, and so is
        other data in ``fit``, unless ``force``: the continuation is then not the uninterrupted run."""
        meta, tensors = ckpt.read_checkpoint(path)
        self._check_config(meta, self.config, force)
        self._restore(meta, tensors)
        self.allow_changes = force
        return self

    @classmethod
    def load(cls, path: str | Path, *, device=None, overrides=(), force: bool = False) -> CubeTrainer:
        """A trainer rebuilt from a checkpoint's config and state; ``overrides`` are ``KEY=VALUE``
        config changes, refused unless ``force`` where they change what the run computes (e.g.
        ``train.steps=2000`` to train longer than planned)."""
        meta, tensors = ckpt.read_checkpoint(path)
        cfg = config_from_dict(apply_overrides(config_to_dict(cls._saved_config(meta)), overrides))
        cls._check_config(meta, cfg, force)
        trainer = cls(cfg, meta["teacher_dim"], device=device)
        trainer._restore(meta, tensors)
        trainer.allow_changes = force
        return trainer

    @staticmethod
    def _saved_config(meta: dict) -> Config:
        try:
            return config_from_dict(copy.deepcopy(meta["config"]))
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {meta['path']} holds an invalid config: {exc}") from None

    @classmethod
    def _check_config(cls, meta: dict, cfg: Config, force: bool):
        check_resume_config(meta["path"], config_to_dict(cls._saved_config(meta)), config_to_dict(cfg),
                            FREE_KEYS.__contains__, force, "cube-train")
