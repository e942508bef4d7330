"""Question-answer pairs: JSONL files and two corpora that ship on PyPI, de-duplicated and split
deterministically by connected groups of texts, so that no question text and no answer text is
in two splits."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
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

    @classmethod
    def of_tensors(cls, q: torch.Tensor, a: torch.Tensor) -> PairSet:
        """Pairs known only by their embeddings: equal rows stand for the same text."""
        qi, ai = (torch.unique(x, dim=0, return_inverse=True)[1].tolist() for x in (q, a))
        return cls([f"q{i}" for i in qi], [f"a{i}" for i in ai], q, a)

    def pairs(self) -> list[Pair]:
        return [Pair(q, a) for q, a in zip(self.questions, self.answers)]

    def question_ids(self) -> torch.Tensor:
        """``[N]``: pairs with the same normalised question (``text_key``) share an id."""
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(text_key(q), len(ids)) for q in self.questions], dtype=torch.long)


def distinct_answers(splits: Iterable[PairSet], key: Callable[[str], str] = str) -> dict[str, torch.Tensor]:
    """Each answer of ``splits`` once, by ``key(text)``, with the embedding of its first
    occurrence, in order of first occurrence."""
    first: dict[str, torch.Tensor] = {}
    for pairs in splits:
        for text, emb in zip(pairs.answers, pairs.a):
            first.setdefault(key(text), emb)
    return first


def _clean(text) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def text_key(text: str) -> str:
    """What counts as "the same text" for de-duplication, the split and the answer bank: case,
    punctuation and whitespace folded ("What's AI?" and "whats ai" are one text). A text of
    punctuation only keeps its case-folded characters."""
    folded = " ".join(re.sub(r"[^\w\s]", "", str(text).casefold()).split())
    return folded or _clean(text).casefold()


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
    """Whitespace-normalised pairs without empty texts and without repeats (pairs whose question
    and answer have the same ``text_key``; the first one is kept)."""
    seen, out = set(), []
    for p in pairs:
        q, a = _clean(p.question), _clean(p.answer)
        if q and a and (text_key(q), text_key(a)) not in seen:
            seen.add((text_key(q), text_key(a)))
            out.append(Pair(q, a))
    return out


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def text_groups(pairs: list[Pair]) -> list[list[Pair]]:
    """The pairs cut into connected groups: two pairs are in one group when they share a text
    (by ``text_key``), as question or as answer, directly or through other pairs (union-find).
    A conversation ``t0 -> t1 -> t2`` is one group; so are all the questions of a common answer."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = find(text_key(p.question)), find(text_key(p.answer))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(find(text_key(p.question)), []).append(p)
    return list(groups.values())


def split_pairs(pairs: list[Pair], val_fraction: float, test_fraction: float, seed: int = 0,
                max_pairs: int | None = None) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test) by connected groups of texts (``text_groups``), so no question text and
    no answer text is in two splits. The groups are visited in the order of a hash seeded with
    ``seed`` (independent of the input order); each goes to test while test holds fewer than
    ``test_fraction`` of the distinct questions and the group fits, then to validation likewise,
    else to training (so a group too large for the held-out splits, such as the questions of a
    very common answer, stays in training). ``max_pairs`` first keeps, in the same order, the
    groups that fit under that many pairs."""
    groups = sorted(text_groups(pairs), key=lambda g: _rank(seed, min(text_key(p.question) for p in g)))
    if max_pairs is not None:
        kept, total = [], 0
        for g in groups:
            if total + len(g) <= max_pairs:
                kept.append(g)
                total += len(g)
        groups = kept

    def questions(g) -> int:
        return len({text_key(p.question) for p in g})

    n_questions = sum(map(questions, groups))
    room = {"test": max(1, round(test_fraction * n_questions)), "val": max(1, round(val_fraction * n_questions))}
    splits: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    for g in groups:
        name = next((k for k in ("test", "val") if questions(g) <= room[k]), "train")
        if name != "train":
            room[name] -= questions(g)
        splits[name] += g
    if not all(splits.values()):
        raise DataError(f"{len(groups)} groups of {n_questions} distinct questions are too few for a "
                        f"train/val/test split with val_fraction={val_fraction} and test_fraction={test_fraction}")
    return splits["train"], splits["val"], splits["test"]


def shared_texts(train: list[Pair], held_out: list[Pair]) -> tuple[int, int]:
    """(questions, answers) of ``held_out`` whose text (``text_key``) also occurs in ``train``, as a
    question or an answer: the leakage of a split (0 for ``split_pairs``)."""
    seen = {text_key(t) for p in train for t in (p.question, p.answer)}
    return (len({text_key(p.question) for p in held_out} & seen),
            len({text_key(p.answer) for p in held_out} & seen))


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


def split_summary(splits: dict[str, PairSet]) -> str:
    """Pairs and distinct questions of each split, and the question / answer texts that two splits
    share (counted afresh from the texts, not assumed from how the split was made)."""
    sizes = ", ".join(f"{k} {len(v)} pairs / {len({text_key(q) for q in v.questions})} questions"
                      for k, v in splits.items())
    shared = ", ".join(f"{a}-{b} {'/'.join(map(str, shared_texts(splits[b].pairs(), splits[a].pairs())))}"
                       for a, b in (("val", "train"), ("test", "train"), ("test", "val")))
    return f"{sizes}; texts shared (questions/answers): {shared}"
