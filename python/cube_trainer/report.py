"""The results table of one or more runs (seeds) with bootstrap intervals.

Every run's evaluation (``eval_<split>.json``, written by ``cube-train`` and ``cube-eval``) holds
the per-question scores of every method. For S runs and Q questions a method's scores form an
S x Q matrix x; its mean is the table's number. An interval resamples both: seeds (S of them,
with replacement) and questions (Q, with replacement), the statistic being the mean of x over the
resampled seeds and questions; the 95% interval is the 2.5th..97.5th percentile over the
resamples. A difference (the model minus a method) uses the same resamples for both (paired),
and the model "beats" a method only when the whole interval of the difference lies above 0.
With one run the interval is over questions only.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

RESAMPLES = 10_000


class ReportError(ValueError):
    """Evaluations that are missing or cannot be put in one table."""


def source_commit() -> str:
    """The git commit of this source tree (``-dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def bootstrap(x: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """``[resamples, ...]``: means of ``x`` ``[S, Q, ...]`` over resampled seeds and questions
    (the same resamples for every trailing index: paired)."""
    S, Q = x.shape[:2]
    g = torch.Generator().manual_seed(seed)

    def counts(n):
        idx = torch.randint(n, (resamples, n), generator=g)
        return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))

    ws = counts(S) if S > 1 else torch.ones(resamples, 1, dtype=torch.float64)
    wq = counts(Q)
    return torch.einsum("bs,sq...,bq->b...", ws, x.double(), wq) / (S * Q)


def interval(samples: torch.Tensor) -> tuple[float, float]:
    lo, hi = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def load_results(paths) -> list[dict]:
    """The evaluation JSON of each run directory (its ``eval_test.json``) or file."""
    results = []
    for path in map(Path, paths):
        file = path / "eval_test.json" if path.is_dir() else path
        if not file.is_file():
            raise ReportError(f"no evaluation in {path}: expected {file} (written by cube-train or cube-eval)")
        results.append(json.loads(file.read_text()))
    return results


def _stack(results: list[dict]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The methods and, per metric, their scores ``[S, Q, methods]``; checks that the runs agree."""
    first = results[0]
    methods = [r["method"] for r in first["rows"]]
    for res in results[1:]:
        if res["questions"] != first["questions"] or res["split"] != first["split"]:
            raise ReportError("the runs were evaluated on different questions (different data, split or split_seed)")
        if [r["method"] for r in res["rows"]] != methods:
            raise ReportError(f"the runs compare different methods: {methods} vs {[r['method'] for r in res['rows']]}")
    return methods, {k: torch.tensor([[r["scores"][k] for r in res["rows"]] for res in results]).transpose(1, 2)
                     for k in first["rows"][0]["scores"]}


def verdict(lo: float, hi: float) -> str:
    return "beats" if lo > 0 else "worse" if hi < 0 else "not shown"


def format_report(results: list[dict], resamples: int = RESAMPLES) -> str:
    """The results table of ``results`` (one per run; the first method is the model)."""
    methods, scores = _stack(results)
    first, split = results[0], results[0]["split"]
    S, Q = scores["mrr"].shape[:2]
    means = {k: v.double().mean((0, 1)) for k, v in scores.items()}
    columns = [k for k in scores if k != "mrr_split"]
    width = max(map(len, methods)) + 2
    lines = [f"{split.capitalize()} split of {first['data']}: {Q} questions, each ranked among all "
             f"{first['bank']:,} distinct answers of the corpus (chance recall@1 ~ {first['chance']:.2%}); "
             f"'{split} pool': among the split's {first['split_answers']:,} answers only",
             f"{S} run(s): seed {', '.join(str(r['seed']) for r in results)}; commit "
             f"{', '.join(sorted({r['commit'] for r in results}))}; intervals: 95% bootstrap over "
             f"{'seeds and ' if S > 1 else ''}questions ({resamples:,} resamples); step: the one kept on validation",
             "",
             f"{'method':<{width}}{'params':>9}  {'step':<14}" + "".join(f"{k:>12}" for k in columns)
             + f"  {'mrr 95% CI':<18}{'mrr ' + split + ' pool':>14}"]
    boot = bootstrap(scores["mrr"], resamples)
    for i, m in enumerate(methods):
        rows = [res["rows"][i] for res in results]
        step = "/".join("-" if r["step"] is None else str(r["step"]) for r in rows)
        lo, hi = interval(boot[:, i])
        lines.append(f"{m:<{width}}{rows[0]['params']:>9,}  {step:<14}" + "".join(f"{means[k][i]:>12.4f}" for k in columns)
                     + f"  [{lo:.4f}, {hi:.4f}]  {means['mrr_split'][i]:>12.4f}")
    compared = ("mrr", "recall@1", "mean_cosine")
    lines += ["", f"{methods[0]} minus each method (paired 95% interval; 'beats' only when it lies above 0):",
              f"{'method':<{width}}" + "".join(f"{k:>28}" for k in compared) + "  on mrr"]
    diffs = {k: bootstrap(scores[k][..., :1] - scores[k], resamples) for k in compared}
    beaten, not_beaten = [], []
    for i, m in enumerate(methods[1:], 1):
        cells = []
        for k in compared:
            lo, hi = interval(diffs[k][:, i])
            cells.append(f"{means[k][0] - means[k][i]:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        v = verdict(*interval(diffs["mrr"][:, i]))
        (beaten if v == "beats" else not_beaten).append(m.split(" (")[0])
        lines.append(f"{m:<{width}}" + "".join(f"{c:>28}" for c in cells) + f"  {v}")
    lines += ["", f"On mrr the model beats: {', '.join(beaten) or 'none'}; "
                  f"it does not beat: {', '.join(not_beaten) or 'none'}."]
    return "\n".join(lines)
