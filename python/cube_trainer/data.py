"""Question-answer pairs: JSONL files and two corpora that ship on PyPI, de-duplicated and split
deterministically by question (all pairs of one question land in the same split)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .config import DataConfig


class DataError(ValueError):
    """A data file or corpus that is missing or malformed."""


@dataclass(frozen=True)
class Pair:
    question: str
    answer: str


@dataclass
class PairSet:
    """Pairs with their teacher embeddings, ``q`` and ``a`` of shape ``[N, dim]``."""
    questions: list[str]
    answers: list[str]
    q: torch.Tensor
    a: torch.Tensor

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, index) -> PairSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return PairSet([self.questions[i] for i in index.tolist()], [self.answers[i] for i in index.tolist()],
                       self.q[index], self.a[index])


def _clean(text) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def question_key(question: str) -> str:
    """What counts as "the same question" for de-duplication and the split."""
    return _clean(question).casefold()


def load_jsonl(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file of ``{"question": ..., "answer": ...}`` objects (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("question", "answer")):
                raise DataError(f"{path}:{n}: expected an object with string fields 'question' and 'answer'")
            pairs.append(Pair(row["question"], row["answer"]))
    if not pairs:
        raise DataError(f"{path}: no question-answer pairs")
    return pairs


def load_chatterbot(language: str = "english") -> list[Pair]:
    """chatterbot-corpus: every conversation ``[t0, t1, ...]`` gives the pairs ``(t_i, t_i+1)``."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("data.source 'chatterbot' needs the package chatterbot-corpus") from None
    root = Path(chatterbot_corpus.__file__).parent / "data" / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"data.language {language!r}: no chatterbot-corpus YAML files in {root}")
    pairs = []
    for file in files:
        conversations = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations") or []
        for conv in conversations:
            turns = [t for t in conv if isinstance(t, str)] if isinstance(conv, list) else []
            pairs += [Pair(q, a) for q, a in zip(turns, turns[1:])]
    return pairs


def load_chitchat() -> list[Pair]:
    """chitchat-dataset: consecutive messages (each a speaker's run of utterances) as prompt -> reply."""
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("data.source 'chitchat' needs the package chitchat-dataset") from None
    path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)
    pairs = []
    for conv in conversations.values():
        messages = [" ".join(u["text"] for u in m) for m in conv["messages"]]
        pairs += [Pair(q, a) for q, a in zip(messages, messages[1:])]
    return pairs


def deduplicate(pairs: list[Pair]) -> list[Pair]:
    """Whitespace-normalised pairs without empty texts and without repeats (first one kept)."""
    seen, out = set(), []
    for p in pairs:
        q, a = _clean(p.question), _clean(p.answer)
        if q and a and (question_key(q), a) not in seen:
            seen.add((question_key(q), a))
            out.append(Pair(q, a))
    return out


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def split_pairs(pairs: list[Pair], val_fraction: float, test_fraction: float, seed: int = 0,
                max_pairs: int | None = None) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test): distinct questions ordered by a seeded hash; the first ``test_fraction``
    of them go to test, the next ``val_fraction`` to validation, the rest to training. The order
    does not depend on the input order, and no question is in two splits. ``max_pairs`` keeps
    whole questions in that order until the limit."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(question_key(p.question), []).append(p)
    keys = sorted(groups, key=lambda k: _rank(seed, k))
    if max_pairs is not None:
        kept, total = [], 0
        for k in keys:
            if total >= max_pairs:
                break
            kept.append(k)
            total += len(groups[k])
        keys = kept
    n_test = max(1, round(test_fraction * len(keys)))
    n_val = max(1, round(val_fraction * len(keys)))
    if n_test + n_val >= len(keys):
        raise DataError(f"{len(keys)} distinct questions are too few for a train/val/test split "
                        f"with val_fraction={val_fraction} and test_fraction={test_fraction}")

    def flat(ks):
        return [p for k in ks for p in groups[k]]

    return flat(keys[n_test + n_val:]), flat(keys[n_test:n_test + n_val]), flat(keys[:n_test])


def load_pairs(cfg: DataConfig) -> list[Pair]:
    """The de-duplicated pairs of ``cfg.source``."""
    if cfg.source == "jsonl":
        pairs = load_jsonl(cfg.path)
    elif cfg.source == "chatterbot":
        pairs = load_chatterbot(cfg.language)
    else:
        pairs = load_chitchat()
    if cfg.questions_only:
        pairs = [p for p in pairs if p.question.rstrip().endswith("?")]
    pairs = deduplicate(pairs)
    if not pairs:
        raise DataError(f"data.source {cfg.source!r}: no pairs left after filtering and de-duplication")
    return pairs


def embed_pairs(pairs: list[Pair], teacher) -> PairSet:
    """Embeds every distinct text once with ``teacher.encode``."""
    texts = sorted({p.question for p in pairs} | {p.answer for p in pairs})
    emb = teacher.encode(texts)
    row = {t: i for i, t in enumerate(texts)}
    qi = torch.tensor([row[p.question] for p in pairs], dtype=torch.long)
    ai = torch.tensor([row[p.answer] for p in pairs], dtype=torch.long)
    return PairSet([p.question for p in pairs], [p.answer for p in pairs], emb[qi], emb[ai])


def build_splits(cfg: DataConfig, teacher) -> dict[str, PairSet]:
    """``{"train", "val", "test"}`` PairSets of the configured data."""
    train, val, test = split_pairs(load_pairs(cfg), cfg.val_fraction, cfg.test_fraction,
                                   cfg.split_seed, cfg.max_pairs)
    everything = embed_pairs(train + val + test, teacher)
    n1, n2 = len(train), len(train) + len(val)
    return {"train": everything.subset(range(n1)), "val": everything.subset(range(n1, n2)),
            "test": everything.subset(range(n2, len(everything)))}
