"""``cube-viz``: what the question-answer lattice does with a question.

* ``signal.png``: how the question's signal travels through the lattice, step by step. The
  model reads its answer as the difference between a rollout with the question's surface and
  one with an empty surface; this draws that difference (its norm over a cell's channels) in
  every depth slice after every step, and its mean per slice against the step.
* ``answers_pca.png``: predicted and true answer embeddings of a held-out split, projected on
  their first two principal components, each prediction joined to its true answer.

It uses only the public pieces of the trainer: ``CubeTrainer.load``, ``predict``,
``model.surface``, ``model.initial_state``, ``model.lattice(..., return_states=True)`` and
``build_splits``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import resolve_checkpoint
from .cli import _Parser, _run, _run_dir, _teacher
from .common import derive_seed
from .data import build_splits
from .trainer import CubeTrainer


@torch.no_grad()
def signal(trainer: CubeTrainer, question_emb: torch.Tensor) -> torch.Tensor:
    """``[steps, D, H, W]``: after each lattice step, the norm over channels of the difference
    between the rollout with the question's surface and the one with an empty surface (the
    same initial state and fire masks as the model's evaluation)."""
    model = trainer.model.eval()
    D, H, W = model.lattice.shape
    surface = model.surface(question_emb.to(trainer.device)).view(1, H, W, -1)
    inject = torch.cat([surface, torch.zeros_like(surface)])
    states = model.lattice(model.initial_state(2), model.cfg.steps, seed=derive_seed(trainer.config.seed, "eval"),
                           inject=inject, return_states=True)
    return torch.stack([(s[0] - s[1]).norm(dim=-1) for s in states]).float().cpu()


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` on its first two principal components."""
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_signal(diff: torch.Tensor, question: str, path: Path):
    plt = _plt()
    from matplotlib.colors import LogNorm
    steps, D = diff.shape[:2]
    fig = plt.figure(figsize=(1.0 * D + 4.5, 1.0 * steps + 1.8))
    grid = fig.add_gridspec(steps, D + 4)
    top = float(diff.max()) or 1.0
    norm = LogNorm(vmin=max(top * 1e-4, 1e-12), vmax=top)  # zero (not reached yet) shows as the floor
    slices = []
    for t in range(steps):
        for d in range(D):
            ax = fig.add_subplot(grid[t, d])
            slices.append(ax)
            img = ax.imshow(diff[t, d].clamp(min=norm.vmin).numpy(), norm=norm, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_title(f"d={d}", fontsize=8)
            if d == 0:
                ax.set_ylabel(f"step {t + 1}", fontsize=8)
    fig.colorbar(img, ax=slices, location="bottom", fraction=0.3 / steps, pad=0.02,
                 label="|state(question) - state(empty)| per cell (norm over channels)")
    ax = fig.add_subplot(grid[:, D + 1:])
    mean = diff.flatten(2).mean(-1)
    for t in range(steps):
        ax.plot(range(D), mean[t].clamp(min=norm.vmin).numpy(), color=plt.cm.viridis(t / max(1, steps - 1)),
                label=f"step {t + 1}")
    ax.set(yscale="log", xlabel="depth slice d (front face d=0)", ylabel="mean difference in the slice",
           title="signal per depth, step by step")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"How the question travels: {question!r}", fontsize=11)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_answers(pred: torch.Tensor, true: torch.Tensor, asked: torch.Tensor, split: str, question: str,
                 path: Path):
    plt = _plt()
    pred, true, asked = F.normalize(pred, dim=-1), F.normalize(true, dim=-1), F.normalize(asked, dim=-1)
    xy = pca_2d(torch.cat([pred, true, asked.view(1, -1)]))
    n = pred.shape[0]
    p, t, a = xy[:n], xy[n:2 * n], xy[2 * n]
    cos = (pred * true).sum(-1).mean().item()
    fig, ax = plt.subplots(figsize=(7, 6))
    for i in range(n):
        ax.plot([p[i, 0], t[i, 0]], [p[i, 1], t[i, 1]], color="0.8", linewidth=0.6, zorder=1)
    ax.scatter(t[:, 0], t[:, 1], s=14, label="true answer", zorder=2)
    ax.scatter(p[:, 0], p[:, 1], s=14, marker="x", label="predicted answer", zorder=3)
    ax.scatter([a[0]], [a[1]], s=160, marker="*", color="crimson", label=f"prediction for {question!r}"[:60], zorder=4)
    ax.set(xlabel="PC 1", ylabel="PC 2",
           title=f"{split} split: {n} pairs, mean cosine(predicted, true) = {cos:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _viz(args) -> int:
    trainer = CubeTrainer.load(args.checkpoint, device=args.device)
    out = Path(args.out_dir) if args.out_dir else _run_dir(args.checkpoint) / "viz"
    out.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {resolve_checkpoint(args.checkpoint)} (step {trainer.global_step})")
    teacher = _teacher(trainer)
    q = teacher.encode([args.question], cache=False)
    diff = signal(trainer, q)
    plot_signal(diff, args.question, out / "signal.png")
    back = diff[:, -1].flatten(1).mean(1)
    first = next((t + 1 for t in range(diff.shape[0]) if back[t] > 1e-3 * float(diff.max())), None)
    print(f"signal: mean difference per depth slice after the last step: "
          + ", ".join(f"{v:.3g}" for v in diff[-1].flatten(1).mean(1).tolist())
          + (f"; it reaches the back face at step {first}" if first else "; it does not reach the back face"))
    data = build_splits(trainer.config.data, teacher)[args.split]
    plot_answers(trainer.predict(data.q), data.a, trainer.predict(q)[0], args.split, args.question,
                 out / "answers_pca.png")
    print(f"pictures: {out / 'signal.png'}, {out / 'answers_pca.png'}")
    return 0


def main(argv=None) -> int:
    p = _Parser(
        prog="cube-viz",
        description="Draw what a trained question-answer checkpoint does: how a question's signal travels through "
                    "the lattice's depth step by step (signal.png: per depth slice, the difference from the rollout "
                    "of an empty question) and a PCA projection of predicted vs true answer embeddings on a "
                    "held-out split (answers_pca.png).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file or run directory")
    p.add_argument("question", help="the question to follow through the lattice")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split of the PCA plot (default test)")
    p.add_argument("--out-dir", metavar="DIR", help="where the PNGs go (default: RUN_DIR/viz)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's)")
    return _run("cube-viz", _viz, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
