"""Held-out evaluation of a trained model against baselines computed in the same run.

Metrics, for each held-out pair (q_i, a_i) and its prediction p_i in teacher space:

* mean cosine: mean_i cos(p_i, a_i). Easy to inflate: the mean training answer already scores high.
* retrieval among all distinct answers of the split: the candidates are ranked by cos(p_i, c);
  rank_i is the rank of the best-ranked *correct* answer (any answer the split gives to the same
  question). recall@k = mean_i [rank_i <= k], MRR = mean_i 1 / rank_i.

Baselines: the raw question embedding (p = q, no model), the mean training answer (what a model
that only maximises cosine converges to), ridge regression q -> a (alpha chosen on the validation
MRR), and a one-hidden-layer GELU MLP with the model's parameter count, trained with the same
teacher-space loss terms, batch size, steps and optimizer schedule as the model. For a residual
model (``model.residual``) ridge fits a - q and the MLP adds q to its output, like the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import derive_seed, epoch_permutation, lr_factor, param_groups
from .config import Config
from .data import PairSet, question_key
from .losses import answer_losses


@dataclass
class Candidates:
    """The distinct answers of a split and, for each pair, which of them are correct."""
    embeddings: torch.Tensor      # [M, T]
    relevant: torch.Tensor        # [N, M] bool


def candidates_of(pairs: PairSet) -> Candidates:
    first: dict[str, int] = {}  # distinct answer text -> its first row
    for i, text in enumerate(pairs.answers):
        first.setdefault(text, i)
    column = {text: j for j, text in enumerate(first)}
    emb = pairs.a[torch.tensor(list(first.values()), dtype=torch.long)]
    groups: dict[str, set[int]] = {}
    for q, a in zip(pairs.questions, pairs.answers):
        groups.setdefault(question_key(q), set()).add(column[a])
    relevant = torch.zeros(len(pairs), len(column), dtype=torch.bool)
    for i, q in enumerate(pairs.questions):
        relevant[i, list(groups[question_key(q)])] = True
    return Candidates(emb, relevant)


def candidates_of_tensors(answers: torch.Tensor) -> Candidates:
    """Candidates when only embeddings are known: the distinct rows; each pair's own is correct."""
    unique, inverse = torch.unique(answers.float().cpu(), dim=0, return_inverse=True)
    relevant = torch.zeros(answers.shape[0], unique.shape[0], dtype=torch.bool)
    relevant[torch.arange(answers.shape[0]), inverse] = True
    return Candidates(unique, relevant)


def retrieval_metrics(pred: torch.Tensor, answers: torch.Tensor, cands: Candidates,
                      ks=(1, 10)) -> dict[str, float]:
    pred, answers = pred.float().cpu(), answers.float().cpu()
    scores = F.normalize(pred, dim=-1) @ F.normalize(cands.embeddings.float(), dim=-1).T
    best = scores.masked_fill(~cands.relevant, float("-inf")).max(dim=1).values
    rank = 1 + ((scores > best.unsqueeze(1)) & ~cands.relevant).sum(dim=1)
    out = {"mean_cosine": F.cosine_similarity(pred, answers, dim=-1).mean().item()}
    out.update({f"recall@{k}": (rank <= k).float().mean().item() for k in ks})
    out["mrr"] = (1.0 / rank.float()).mean().item()
    return out


def ridge_fit(q: torch.Tensor, a: torch.Tensor, alpha: float):
    """Closed-form ridge regression with an unpenalised bias; returns ``x -> x W + b``."""
    q, a = q.double(), a.double()
    qm, am = q.mean(0), a.mean(0)
    qc = q - qm
    w = torch.linalg.solve(qc.T @ qc + alpha * torch.eye(q.shape[1], dtype=q.dtype), qc.T @ (a - am))
    b = am - qm @ w
    return lambda x: (x.double() @ w + b).float()


class MLP(nn.Module):
    """``q -> W2 gelu(W1 q + b1) + b2``, plus ``q`` (with W2 = 0 at the start) when the model
    under comparison is residual."""

    def __init__(self, dim: int, hidden: int, residual: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.residual = residual
        if residual:
            with torch.no_grad():
                self.net[2].weight.zero_()

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.net(q) + q if self.residual else self.net(q)


def train_mlp(train: PairSet, cfg: Config, hidden: int) -> nn.Module:
    """The MLP baseline, trained like the model (AdamW, warmup + cosine, same batch and steps,
    the teacher-space loss terms with the same weights)."""
    d, t = train.q.shape[1], cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "mlp-init"))
        mlp = MLP(d, hidden, cfg.model.residual)
    opt = torch.optim.AdamW(param_groups(mlp, t.weight_decay), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    B, N = t.batch_size, len(train)
    epoch, cursor = 0, 0
    for _ in range(t.steps):
        if cursor + B > N:
            epoch, cursor = epoch + 1, 0
        idx = epoch_permutation(cfg.seed, epoch, N)[cursor:cursor + B]
        cursor += B
        terms = answer_losses(mlp(train.q[idx]), train.a[idx], cfg.loss)
        loss = cfg.loss.dialogue * terms["dialogue"] + cfg.loss.contrastive * terms["contrastive"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(mlp.parameters(), t.clip_grad_norm)
        opt.step()
        sched.step()
    return mlp.eval()


def mlp_width(n_params: int, dim: int) -> int:
    """The hidden width h of a dim -> h -> dim MLP (with biases) that has about n_params parameters."""
    return max(1, round((n_params - dim) / (2 * dim + 1)))


@dataclass
class Row:
    method: str
    params: int
    metrics: dict[str, float]


def compare(trainer, splits: dict[str, PairSet], split: str = "test", baselines: bool = True,
            log=print) -> list[Row]:
    """The model's metrics on ``splits[split]`` and, with ``baselines``, those of every baseline."""
    cfg = trainer.config
    ks = tuple(cfg.eval.recall_at)
    test = splits[split]
    cands = candidates_of(test)
    rows = [Row("cube lattice (this model)", trainer.num_parameters(),
                retrieval_metrics(trainer.predict(test.q), test.a, cands, ks))]
    if not baselines:
        return rows
    train, val = splits["train"], splits["val"]
    rows.append(Row("raw question embedding", 0, retrieval_metrics(test.q, test.a, cands, ks)))
    mean_answer = train.a.mean(0, keepdim=True).expand_as(test.a)
    rows.append(Row("mean training answer", 0, retrieval_metrics(mean_answer, test.a, cands, ks)))
    # A residual model is compared with a ridge that also predicts the change a - q.
    res = 1.0 if cfg.model.residual else 0.0

    def ridge(alpha):
        fit = ridge_fit(train.q, train.a - res * train.q, alpha)
        return lambda q: fit(q) + res * q

    val_cands = candidates_of(val)
    scored = [(retrieval_metrics(ridge(alpha)(val.q), val.a, val_cands, ks)["mrr"], alpha)
              for alpha in cfg.eval.ridge_alphas]
    alpha = max(scored)[1]
    d = train.q.shape[1]
    rows.append(Row(f"ridge regression{' of a - q' if res else ''} (alpha={alpha:g}, chosen on val)", d * d + d,
                    retrieval_metrics(ridge(alpha)(test.q), test.a, cands, ks)))
    hidden = cfg.eval.mlp_hidden or mlp_width(trainer.num_parameters(), d)
    log(f"training the MLP baseline (hidden={hidden}, {cfg.train.steps} steps)...")
    mlp = train_mlp(train, cfg, hidden)
    with torch.no_grad():
        pred = mlp(test.q)
    rows.append(Row(f"{'residual ' if res else ''}MLP (hidden={hidden}, same loss and steps)",
                    sum(p.numel() for p in mlp.parameters()), retrieval_metrics(pred, test.a, cands, ks)))
    return rows


def format_table(rows: list[Row], pairs: PairSet, split: str = "test") -> str:
    """A plain-text table, the chance level, and whether the model beats every baseline."""
    keys = list(rows[0].metrics)
    cands = candidates_of(pairs)
    chance = cands.relevant.float().mean(1).mean().item()
    lines = [f"Evaluation on the {split} split: {len(pairs)} pairs, {len({question_key(q) for q in pairs.questions})} "
             f"questions, {cands.embeddings.shape[0]} candidate answers (chance recall@1 ~ {chance:.2%})",
             f"{'method':<56}{'params':>10}" + "".join(f"{k:>13}" for k in keys)]
    for r in rows:
        lines.append(f"{r.method:<56}{r.params:>10,}" + "".join(f"{r.metrics[k]:>13.4f}" for k in keys))
    if len(rows) > 1:
        ours, others = rows[0], rows[1:]
        lines.append("Does the model beat every baseline?")
        for k in keys:
            best = max(others, key=lambda r: r.metrics[k])
            beats = ours.metrics[k] > best.metrics[k]
            lines.append(f"  {k:<12} {'yes' if beats else 'NO ':<4} ({ours.metrics[k]:.4f}; best baseline: "
                         f"{best.method.split(' (')[0]}, {best.metrics[k]:.4f})")
    return "\n".join(lines)
