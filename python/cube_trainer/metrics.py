"""The JSONL metrics log of a run and its loss / similarity plot."""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_text_atomic


class MetricsLog:
    """Appends one JSON object per line. Opened for a run resumed at ``step``, it first drops
    the records of later steps (written after the checkpoint it resumes from)."""

    def __init__(self, path: str | Path, step: int = 0):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if step else []
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(records: list[dict], path: str | Path):
    """Training losses (left) and similarity (right: training cosine, validation cosine and MRR)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_sim) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("total_loss", "surface_loss", "dialogue_loss", "contrastive_loss", "internal_loss"):
        if train and key in train[0]:
            ax_loss.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="training losses")
    if ax_loss.lines:
        ax_loss.set_yscale("log")
    if train:
        ax_sim.plot([r["step"] for r in train], [r["cosine_similarity"] for r in train], label="train cosine")
    for key, label in (("mean_cosine", "val cosine"), ("mrr", "val MRR"), ("recall@1", "val recall@1")):
        if val and key in val[0]:
            ax_sim.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=label)
    ax_sim.set(xlabel="step", title="similarity and retrieval", ylim=(0, 1))
    for ax in (ax_loss, ax_sim):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
