"""``GrowthTrainer``: a lattice that grows a target shape from one seed cell (Growing NCA).

One optimizer step draws a batch from the sample pool (the worst sample reseeded, the best ones
cut), runs a random number of lattice steps in ``[rollout_min, rollout_max]`` with alive
masking on the alpha channel, and descends the squared error of every cell's RGBA against the
target plus a penalty on state values outside [-1, 1]. Each parameter's gradient is scaled to
unit norm before Adam (as in Mordvintsev et al. 2020): the gradient of a long rollout varies
over orders of magnitude between batches, and this keeps the step size steady. With
``train.ema``, evaluation grows with an exponential moving average of the weights, which
smooths the last steps' noise out of the final model. All randomness comes from the config's
seed, so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cube_kernels import CubeLattice

from .. import checkpoint as ckpt
from ..atomic import write_text_atomic
from ..checkpoint import CheckpointError
from ..common import derive_seed, lr_factor
from ..config import ConfigError
from ..metrics import MetricsLog
from ..rundir import prepare_run_dir
from ..trainer import NonFiniteLossError, check_resume_config
from .config import RGBA, GrowConfig, config_from_dict, config_to_dict, target_config, target_name, validate
from .pool import SamplePool, Shape, axis_normals, cut
from .targets import iou, load_target, seed_position

ALPHA = 3  # the alive channel: alpha of RGBA
# The JSON structure of a growth checkpoint.
SCHEMA = {**ckpt.BASE_SCHEMA, "kind": str, "target": str, "train_seconds": (float, int),
          "train_cpu_seconds": (float, int)}
LOG_KEYS = ("loss", "rgba_loss", "overflow_loss", "iou", "rollout")
# What a growth run writes into its directory besides checkpoints/ (removed with it by overwrite).
RUN_FILES = ("config.yaml", "metrics.jsonl", "result.json", "growth.png", "growth.gif", "training.png")
# Config keys that do not change what training computes.
NOT_TRAINING = ("out_dir", "device", "targets", "train.progress", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints")


@dataclass
class Evaluation:
    """IoUs per sample (``[samples]``) at each stage, and the states of sample 0 after every
    step of each stage (for pictures; empty unless asked for)."""
    grown: torch.Tensor        # after the horizon, from the seed
    persisted: torch.Tensor    # after twice the horizon
    cut: torch.Tensor          # just after half of the shape was removed at the horizon
    regrown: torch.Tensor      # a horizon after the cut
    frames: dict[str, list[torch.Tensor]]

    def summary(self) -> dict[str, float]:
        out = {}
        for key in ("grown", "persisted", "cut", "regrown"):
            v = getattr(self, key)
            out[f"iou_{key}"], out[f"iou_{key}_min"] = v.mean().item(), v.min().item()
        return out


class GrowthTrainer:
    """Trains a ``CubeLattice`` to grow ``target`` (a built-in name or a ``.npy`` path; see
    ``targets.py``). ``grid``: the RGBA target itself ([D, H, W, 4]), instead of reading it
    (a checkpoint carries its target). The trainer's ``config`` is ``config`` with the target's
    ``per_target`` settings applied. ``device`` overrides ``config.device``."""

    def __init__(self, config: GrowConfig, target: str, *, grid: torch.Tensor | None = None, device=None):
        self.target_spec, self.name = target, target_name(target)
        self.config = cfg = target_config(validate(config), self.name)
        self.device = torch.device(device if device is not None else cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {str(self.device)!r}: CUDA is not available on this machine")
        m, t = cfg.model, cfg.train
        shape = (m.depth, m.height, m.width)
        if grid is None:
            grid = load_target(target, shape)
        if tuple(grid.shape) != (*shape, RGBA):
            raise CheckpointError(f"target grid of {target!r} has shape {list(grid.shape)}, "
                                  f"expected {[*shape, RGBA]}")
        self.target = grid.to(self.device, torch.float32)
        self.channel_weights = torch.tensor([1.0, 1.0, 1.0, t.alpha_weight], device=self.device)
        self.shape = Shape(self.target)
        self.seed_cell = seed_position(self.target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, self.name, "init"))
            self.lattice = CubeLattice(*shape, m.channels, m.hidden, neighbourhood=m.neighbourhood,
                                       boundary=m.boundary, fire_rate=m.fire_rate, alive_channel=ALPHA,
                                       alive_threshold=m.alive_threshold, backend=m.backend).to(self.device)
            if m.init_spatial:
                # Near-zero spatial weights (the gMLP init) leave a cell blind to its neighbours
                # at first, and growth from one cell then takes hundreds of steps to start.
                torch.nn.init.uniform_(self.lattice.cell.w_sp, -m.init_spatial, m.init_spatial)
        self.optimizer = torch.optim.Adam(self.lattice.parameters(), lr=t.lr)
        self.averaged = AveragedModel(self.lattice, multi_avg_fn=get_ema_multi_avg_fn(t.ema)) if t.ema else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, warmup=t.warmup_steps, total=t.steps, floor=t.min_lr_ratio))
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, self.name, "pool"))
        self.pool = SamplePool(self.seed_state(1)[0], t.pool_size)
        self.global_step = 0
        self.train_seconds = 0.0      # wall time of the optimizer steps
        self.train_cpu_seconds = 0.0  # this process's CPU time in them, all threads (a busy machine inflates wall time)
        self.checkpoint_path: Path | None = None  # the checkpoint restored or last saved

    # ------------------------------------------------------------------ model

    def seed_state(self, batch: int) -> torch.Tensor:
        """``[batch, D, H, W, C]``: all cells empty but the seed cell, whose alpha and hidden
        channels are 1 (its colour 0)."""
        x = torch.zeros(batch, *self.lattice.shape, self.lattice.channels, device=self.device)
        x[(slice(None), *self.seed_cell, slice(ALPHA, None))] = 1.0
        return x

    @property
    def eval_lattice(self) -> CubeLattice:
        """The lattice that evaluation grows: the weights' moving average with ``train.ema``."""
        return self.lattice if self.averaged is None else self.averaged.module

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the mean squared error of the RGBA channels against the target (alpha's
        weighted by ``train.alpha_weight``), and the mean square of every state value beyond
        [-1, 1]."""
        rgba = ((x[..., :RGBA] - self.target).square() * self.channel_weights).flatten(1).mean(1)
        overflow = (x - x.clamp(-1.0, 1.0)).square().flatten(1).mean(1)
        return rgba, overflow

    # ------------------------------------------------------------------ training

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns ``loss`` (what was descended), ``rgba_loss``,
        ``overflow_loss``, ``iou`` (of the batch's final states), ``rollout`` (steps run),
        ``lr`` and ``grad_norm`` (before normalisation)."""
        t = self.config.train
        idx = self.pool.sample(t.batch_size, self.generator)
        with torch.no_grad():
            start_losses = self.losses(self.pool.states[idx])[0]
        damaged = t.damaged if self.global_step >= t.damage_after else 0
        x = self.pool.start(idx, start_losses, damaged, self.shape, self.generator)
        steps = int(torch.randint(t.rollout_min, t.rollout_max + 1, (), generator=self.generator))
        self.lattice.train()
        states = self.lattice(x, steps, seed=derive_seed(self.config.seed, self.name, "fire", self.global_step),
                              return_states=True)
        y = states[-1]
        last = states[-min(t.loss_steps, steps):]
        rgba, overflow = (torch.stack(v).mean(0) for v in zip(*(self.losses(s) for s in last)))
        loss = rgba.mean() + t.overflow * overflow.mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{self.name}: non-finite loss at step {self.global_step + 1}: {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = [p.grad.norm() for p in self.lattice.parameters()]
        grad_norm = torch.stack(norms).norm()
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"{self.name}: non-finite gradient at step {self.global_step + 1} "
                                     f"(loss {loss.item():.4g})")
        for p, n in zip(self.lattice.parameters(), norms):
            p.grad.div_(n + 1e-8)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.lattice)
        self.pool.put(idx, y)
        self.global_step += 1
        return {"loss": loss.item(), "rgba_loss": rgba.mean().item(), "overflow_loss": overflow.mean().item(),
                "iou": iou(y.detach(), self.target).mean().item(), "rollout": steps, "lr": lr,
                "grad_norm": grad_norm.item()}

    def prepare_run_dir(self, out_dir: str | Path, *, overwrite: bool = False, log=print):
        """Readies ``out_dir`` for this run: a directory that holds another run is refused unless
        ``overwrite`` (see ``rundir.prepare_run_dir``)."""
        prepare_run_dir(out_dir, step=self.global_step, source=self.checkpoint_path, overwrite=overwrite,
                        files=RUN_FILES, log=log)

    def fit(self, out_dir: str | Path, *, stop_after: int | None = None, overwrite: bool = False,
            log=print) -> list[dict]:
        """Trains until ``train.steps`` (or ``stop_after`` more steps), logging to
        ``out_dir/metrics.jsonl`` and checkpointing to ``out_dir/checkpoints``. A directory that
        holds another run is refused unless ``overwrite``. Returns this call's records."""
        from tqdm.auto import tqdm
        t = self.config.train
        out = Path(out_dir)
        self.prepare_run_dir(out, overwrite=overwrite, log=log)
        ck_dir = out / "checkpoints"
        write_text_atomic(out / "config.yaml", yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        metrics = MetricsLog(out / "metrics.jsonl", self.global_step)
        history, window, done = [], [], 0
        bar = tqdm(total=t.steps, initial=self.global_step, desc=f"grow {self.name}", unit="step",
                   dynamic_ncols=True, disable=not t.progress)
        while self.global_step < t.steps and (stop_after is None or done < stop_after):
            tic, cpu = time.perf_counter(), time.process_time()
            res = self.train_step()
            self.train_seconds += time.perf_counter() - tic
            self.train_cpu_seconds += time.process_time() - cpu
            window.append(res)
            done += 1
            step = self.global_step
            if step % t.log_every == 0 or step == t.steps:
                rec = {"kind": "train", "step": step, **{k: sum(r[k] for r in window) / len(window) for k in LOG_KEYS},
                       "lr": res["lr"], "train_seconds": self.train_seconds,
                       "train_cpu_seconds": self.train_cpu_seconds}
                history.append(rec)
                metrics.write(rec)
                bar.set_postfix(loss=f"{rec['rgba_loss']:.4f}", iou=f"{rec['iou']:.3f}")
                window = []
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                self.save(ckpt.checkpoint_stem(ck_dir, step))
                ckpt.prune_checkpoints(ck_dir, t.keep_checkpoints)
            bar.update(1)
        bar.close()
        if done and not ckpt.checkpoint_stem(ck_dir, self.global_step).with_suffix(".json").exists():
            self.save(ckpt.checkpoint_stem(ck_dir, self.global_step))
            ckpt.prune_checkpoints(ck_dir, t.keep_checkpoints)
        return history

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, samples: int | None = None, frames: bool = False) -> Evaluation:
        """Grows ``samples`` (default ``eval.samples``) lattices from the seed for the horizon,
        runs them a second horizon (persistence), and cuts the grown ones in half (sample i
        across axis i % 3, see ``pool.axis_normals``) and runs them a horizon (regeneration).
        ``frames``: also keep sample 0's state after every step of each stage."""
        n, T = samples or self.config.eval.samples, self.config.horizon
        lattice = self.eval_lattice.eval()
        seed = functools.partial(derive_seed, self.config.seed, self.name, "eval")

        def stage(x, key):
            states = lattice(x, T, seed=seed(key), return_states=frames)
            if not frames:
                return states, []
            return states[-1], [s[0].cpu() for s in states]

        grown, f_grow = stage(self.seed_state(n), "grow")
        persisted, f_persist = stage(grown, "persist")
        was_cut = cut(grown, self.shape.centre, axis_normals(n))
        regrown, f_regrow = stage(was_cut, "regrow")
        return Evaluation(
            grown=iou(grown, self.target).cpu(), persisted=iou(persisted, self.target).cpu(),
            cut=iou(was_cut, self.target).cpu(), regrown=iou(regrown, self.target).cpu(),
            frames={"grow": f_grow, "persist": f_persist, "cut": [was_cut[0].cpu()] if frames else [],
                    "regrow": f_regrow})

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> Path:
        """The whole training state (lattice, optimizer, schedule, generator, pool, target) to
        ``path.safetensors`` + ``path.json``; returns the JSON path."""
        tensors = {f"lattice/{k}": v for k, v in self.lattice.state_dict().items()}
        opt_tensors, opt_json = ckpt.optimizer_state(self.optimizer)
        tensors.update(opt_tensors)
        tensors.update({"rng/generator": self.generator.get_state(), "pool/states": self.pool.states,
                        "target": self.target})
        if self.averaged is not None:
            tensors.update({f"ema/{k}": v for k, v in self.averaged.state_dict().items()})
        meta = {"kind": "growth", "step": self.global_step, "config": config_to_dict(self.config),
                "target": self.target_spec, "optimizer": opt_json, "scheduler": self.scheduler.state_dict(),
                "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                "versions": ckpt.library_versions()}
        self.checkpoint_path = ckpt.write_checkpoint(path, tensors, meta)
        return self.checkpoint_path

    @staticmethod
    def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(meta, tensors)`` of a growth checkpoint (a file or a run directory's newest)."""
        meta, tensors = ckpt.read_checkpoint(path, SCHEMA)
        if meta["kind"] != "growth":
            raise CheckpointError(f"{meta['path']} is a {meta['kind']!r} checkpoint, not a growth one")
        for key in ("target", "pool/states", "rng/generator"):
            if key not in tensors:
                raise CheckpointError(f"checkpoint {meta['path']} has no '{key}' tensor")
        return meta, tensors

    def _restore(self, meta: dict, tensors: dict[str, torch.Tensor]):
        where = meta["path"]
        state = {k[len("lattice/"):]: v for k, v in tensors.items() if k.startswith("lattice/")}
        ema = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
        try:
            self.lattice.load_state_dict(state)
            if self.averaged is not None and ema:  # none: train.ema was off before a forced resume; it starts here
                self.averaged.load_state_dict(ema)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {where} does not fit this lattice: {exc}") from None
        if tensors["pool/states"].shape != self.pool.states.shape:
            raise CheckpointError(f"checkpoint {where}: its pool is {list(tensors['pool/states'].shape)}, this run's "
                                  f"{list(self.pool.states.shape)} (train.pool_size or the lattice changed?)")
        ckpt.load_optimizer_state(self.optimizer, meta["optimizer"], tensors, where)
        try:
            self.scheduler.load_state_dict(meta["scheduler"])
            self.generator.set_state(tensors["rng/generator"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {where}: cannot restore the training state: {exc}") from None
        self.pool.states.copy_(tensors["pool/states"])
        self.global_step, self.train_seconds = meta["step"], meta["train_seconds"]
        self.train_cpu_seconds = meta["train_cpu_seconds"]
        self.checkpoint_path = Path(meta["path"])

    def resume(self, path: str | Path, *, force: bool = False) -> GrowthTrainer:
        """Continues from a checkpoint of the same target (a file or a run directory). A config
        that changes what training computes is refused unless ``force``: the continuation is
        then not the uninterrupted run."""
        meta, tensors = self.read(path)
        if meta["target"] != self.target_spec or not torch.equal(tensors["target"].to(self.target), self.target):
            raise CheckpointError(f"checkpoint {meta['path']} grows {meta['target']!r}, not {self.target_spec!r}")
        check_resume_config(meta["path"], meta["config"], config_to_dict(self.config),
                            lambda key: key in NOT_TRAINING or key.startswith("eval."), force, "cube-grow")
        self._restore(meta, tensors)
        return self

    @classmethod
    def load(cls, path: str | Path, *, device=None) -> GrowthTrainer:
        """A trainer rebuilt from a checkpoint: its config, target and state."""
        meta, tensors = cls.read(path)
        try:
            cfg = config_from_dict(meta["config"])
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {meta['path']} holds an invalid config: {exc}") from None
        trainer = cls(cfg, meta["target"], grid=tensors["target"], device=device)
        trainer._restore(meta, tensors)
        return trainer
