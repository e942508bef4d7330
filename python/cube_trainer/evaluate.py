"""Held-out evaluation of a trained model against baselines and ablations computed in the same run.

Each distinct question of a split (by ``text_key``) counts once; its relevant answers are every
answer the split gives it. Its prediction p is scored against a bank of candidate answers, by
default every distinct answer of the corpus (train, validation and test, as ``cube-ask`` would
face them):

* mean cosine: the mean over its relevant answers a of cos(p, a).
* rank: 1 + the number of non-relevant candidates that score *at least* as high as the best
  relevant one (ties count against the model); a prediction that is zero or not finite gets the
  worst rank, 1 + all non-relevant candidates (and cosine -1 when not finite).
  recall@k = [rank <= k], reciprocal rank = 1 / rank, averaged over questions (MRR).
* ``mrr_split``: the same MRR with only the split's own answers as candidates.

Baselines: the raw question embedding (p = q, no model), the mean training answer (what a model
that only maximises cosine converges to), ridge regression q -> a (alpha chosen on validation),
and a one-hidden-layer GELU MLP with the model's parameter count, trained with the model's
teacher-space loss terms and its settings plus ``eval.mlp``, kept at its best validation step
like the model. For a residual model (``model.residual``) ridge fits a - q and the MLP adds q to
its output, like the model. Validation ranks against the answers of train and validation only:
nothing of the test split is seen before the final evaluation.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import derive_seed, epoch_permutation, lr_factor, param_groups
from .config import Config, method_config
from .data import PairSet, distinct_answers, text_key
from .losses import answer_losses, same_question


@dataclass
class RankingBank:
    """Distinct answers (by ``text_key``), each with the embedding of its first text."""
    keys: list[str]
    embeddings: torch.Tensor      # [M, T]

    @classmethod
    def of(cls, *splits: PairSet) -> RankingBank:
        first = distinct_answers(splits, text_key)
        return cls(list(first), torch.stack(list(first.values())).float().cpu())


@dataclass
class Queries:
    """The distinct questions of a split (by ``text_key``, each once, with the embedding of its
    first text) and which answers of a bank are relevant to each."""
    keys: list[str]
    q: torch.Tensor               # [Nq, T]
    relevant: torch.Tensor        # [Nq, M] bool

    @classmethod
    def of(cls, pairs: PairSet, bank: RankingBank) -> Queries:
        column = {k: j for j, k in enumerate(bank.keys)}
        rows: dict[str, int] = {}
        first, answers = [], []
        for i, (question, answer) in enumerate(zip(pairs.questions, pairs.answers)):
            key = text_key(question)
            if key not in rows:
                rows[key] = len(rows)
                first.append(i)
                answers.append(set())
            if text_key(answer) not in column:
                raise ValueError(f"the answer bank lacks the answer {answer!r} of question {question!r}")
            answers[rows[key]].add(column[text_key(answer)])
        relevant = torch.zeros(len(rows), len(bank.keys), dtype=torch.bool)
        for r, cols in enumerate(answers):
            relevant[r, sorted(cols)] = True
        return cls(list(rows), pairs.q[torch.tensor(first, dtype=torch.long)].float().cpu(), relevant)


def question_scores(pred: torch.Tensor, queries: Queries, bank: RankingBank, ks=(1, 10)) -> dict[str, torch.Tensor]:
    """Per question ``[Nq]``: ``mean_cosine``, ``recall@k`` (0 or 1) and ``mrr`` (the reciprocal
    rank), with the rules of the module docstring."""
    pred = pred.float().cpu()
    rel = queries.relevant
    valid = torch.isfinite(pred).all(-1) & (pred.abs().sum(-1) > 0)
    scores = F.normalize(torch.where(valid.unsqueeze(1), pred, 0.0), dim=-1) @ F.normalize(bank.embeddings, dim=-1).T
    best = scores.masked_fill(~rel, float("-inf")).max(dim=1).values
    rank = 1 + ((scores >= best.unsqueeze(1)) & ~rel).sum(dim=1)
    rank = torch.where(valid, rank, 1 + (~rel).sum(dim=1))
    cosine = (scores * rel).sum(1) / rel.sum(1)
    out = {"mean_cosine": torch.where(torch.isfinite(pred).all(-1), cosine, -1.0)}
    out.update({f"recall@{k}": (rank <= k).float() for k in ks})
    out["mrr"] = 1.0 / rank.float()
    return out


class HeldOut:
    """A held-out split ready to be scored: its distinct questions ranked against ``bank`` (and,
    for ``mrr_split``, against the split's own answers)."""

    def __init__(self, pairs: PairSet, bank: RankingBank, ks=(1, 10)):
        self.pairs, self.bank, self.ks = pairs, bank, tuple(ks)
        self.queries = Queries.of(pairs, bank)
        self.own_bank = RankingBank.of(pairs)
        self.own = Queries.of(pairs, self.own_bank)

    @property
    def q(self) -> torch.Tensor:
        """The questions to predict, ``[Nq, T]``: one row per distinct question."""
        return self.queries.q

    def scores(self, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-question scores of the predictions ``pred`` ``[Nq, T]`` for ``self.q``."""
        out = question_scores(pred, self.queries, self.bank, self.ks)
        out["mrr_split"] = question_scores(pred, self.own, self.own_bank, ks=())["mrr"]
        return out

    def metrics(self, pred: torch.Tensor) -> dict[str, float]:
        return {k: v.mean().item() for k, v in self.scores(pred).items()}


def validation_set(splits: dict[str, PairSet], ks=(1, 10)) -> HeldOut:
    """The validation split, ranked against the answers of train and validation (not test)."""
    return HeldOut(splits["val"], RankingBank.of(splits["train"], splits["val"]), ks)


def ridge_fit(q: torch.Tensor, a: torch.Tensor, alpha: float):
    """Closed-form ridge regression with an unpenalised bias; returns ``x -> x W + b``."""
    q, a = q.double(), a.double()
    qm, am = q.mean(0), a.mean(0)
    qc = q - qm
    w = torch.linalg.solve(qc.T @ qc + alpha * torch.eye(q.shape[1], dtype=q.dtype), qc.T @ (a - am))
    b = am - qm @ w
    return lambda x: (x.double() @ w + b).float()


class MLP(nn.Module):
    """``q -> W2 gelu(W1 q + b1) + b2``, plus ``q`` (with W2 = 0 and b2 = 0 at the start, so it
    starts as the raw question like the model) when the model under comparison is residual."""

    def __init__(self, dim: int, hidden: int, residual: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.residual = residual
        if residual:
            with torch.no_grad():
                self.net[2].weight.zero_()
                self.net[2].bias.zero_()

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.net(q) + q if self.residual else self.net(q)


@dataclass
class Trained:
    """A trained method: its predictor, trainable parameter count and the step it was kept at."""
    predict: Callable[[torch.Tensor], torch.Tensor]
    params: int
    step: int
    val_mrr: float
    history: list[dict] = field(default_factory=list)


def train_mlp(train: PairSet, val: HeldOut, cfg: Config, hidden: int) -> Trained:
    """The MLP baseline, trained like the model (AdamW, warmup + cosine, batch, steps, the
    teacher-space loss terms with their weights, same-question answers not negatives), checked
    on validation at step 0 and every ``train.eval_every`` steps and kept at its best step."""
    d, t = train.q.shape[1], cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "mlp-init"))
        mlp = MLP(d, hidden, cfg.model.residual)
    opt = torch.optim.AdamW(param_groups(mlp, t.weight_decay), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    ids = train.question_ids()
    B, N = t.batch_size, len(train)
    epoch, cursor = 0, 0
    best, history = None, []

    def check(step: int):
        nonlocal best
        with torch.no_grad():
            metrics = val.metrics(mlp(val.q))
        history.append({"kind": "val", "step": step, **metrics})
        if best is None or metrics["mrr"] > best[1]:
            best = (step, metrics["mrr"], copy.deepcopy(mlp.state_dict()))

    check(0)
    for step in range(1, t.steps + 1):
        if cursor + B > N:
            epoch, cursor = epoch + 1, 0
        idx = epoch_permutation(cfg.seed, epoch, N)[cursor:cursor + B]
        cursor += B
        terms = answer_losses(mlp(train.q[idx]), train.a[idx], cfg.loss, same=same_question(ids[idx], ids[idx]))
        loss = cfg.loss.dialogue * terms["dialogue"] + cfg.loss.contrastive * terms["contrastive"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(mlp.parameters(), t.clip_grad_norm)
        opt.step()
        sched.step()
        if step == t.steps or (t.eval_every and step % t.eval_every == 0):
            check(step)
    mlp.load_state_dict(best[2])
    mlp.eval()

    def predict(q):
        with torch.no_grad():
            return mlp(q)

    return Trained(predict, sum(p.numel() for p in mlp.parameters()), best[0], best[1], history)


def mlp_width(n_params: int, dim: int) -> int:
    """The hidden width h of a dim -> h -> dim MLP (with biases) that has about n_params parameters."""
    return max(1, round((n_params - dim) / (2 * dim + 1)))


def ridge_baseline(splits: dict[str, PairSet], cfg: Config) -> tuple[Trained, float]:
    """Ridge regression (of a - q for a residual model), alpha chosen on the validation MRR."""
    train, val = splits["train"], validation_set(splits, cfg.eval.recall_at)
    res = 1.0 if cfg.model.residual else 0.0

    def ridge(alpha):
        fit = ridge_fit(train.q, train.a - res * train.q, alpha)
        return lambda q: fit(q) + res * q

    scored = [(val.metrics(ridge(alpha)(val.q))["mrr"], alpha) for alpha in cfg.eval.ridge_alphas]
    mrr, alpha = max(scored)
    d = train.q.shape[1]
    return Trained(ridge(alpha), d * d + d, 0, mrr), alpha


@dataclass
class Row:
    method: str
    params: int
    step: int | None                  # the training step evaluated (best on validation); None: untrained
    scores: dict[str, torch.Tensor]   # per question

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v.mean().item() for k, v in self.scores.items()}


def compare(trained: list[tuple[str, Trained]], splits: dict[str, PairSet], cfg: Config, split: str = "test",
            baselines: bool = True, log=print) -> tuple[HeldOut, list[Row]]:
    """Scores on ``splits[split]`` (ranked against every answer of the corpus) of the ``trained``
    methods (the model first, then its ablations) and, with ``baselines``, of every baseline."""
    held = HeldOut(splits[split], RankingBank.of(*splits.values()), cfg.eval.recall_at)
    rows = [Row(name, t.params, t.step, held.scores(t.predict(held.q))) for name, t in trained]
    if not baselines:
        return held, rows
    train = splits["train"]
    rows.append(Row("raw question embedding", 0, None, held.scores(held.q)))
    rows.append(Row("mean training answer", 0, None, held.scores(train.a.mean(0, keepdim=True).expand_as(held.q))))
    ridge, alpha = ridge_baseline(splits, cfg)
    residual = " of a - q" if cfg.model.residual else ""
    rows.append(Row(f"ridge regression{residual} (alpha={alpha:g})", ridge.params, None, held.scores(ridge.predict(held.q))))
    mlp_cfg = method_config(cfg, "mlp")
    hidden = mlp_cfg.eval.mlp_hidden or mlp_width(trained[0][1].params, train.q.shape[1])
    log(f"training the MLP baseline (hidden={hidden}, {mlp_cfg.train.steps} steps)...")
    mlp = train_mlp(train, validation_set(splits, cfg.eval.recall_at), mlp_cfg, hidden)
    rows.append(Row(f"{'residual ' if residual else ''}MLP (hidden={hidden})", mlp.params, mlp.step,
                    held.scores(mlp.predict(held.q))))
    return held, rows
