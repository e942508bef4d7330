"""The answer bank of a run: every distinct answer of its corpus (train, val and test) with its
teacher embedding, saved in the run directory, so that ``cube-ask`` needs neither the corpus nor
its split."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .checkpoint import CheckpointError
from .data import PairSet, distinct_answers

BANK_FILE = "answer_bank.safetensors"
FORMAT = "cube-trainer-answer-bank/1"


@dataclass
class AnswerBank:
    texts: list[str]              # distinct answers, sorted
    embeddings: torch.Tensor      # [len(texts), teacher_dim] float32
    teacher_key: str              # Teacher.key of the teacher that embedded them

    @classmethod
    def from_splits(cls, splits: dict[str, PairSet], teacher_key: str) -> AnswerBank:
        rows = distinct_answers(splits.values())
        texts = sorted(rows)
        dim = next(iter(splits.values())).a.shape[1]
        emb = torch.stack([rows[t] for t in texts]).float() if texts else torch.empty(0, dim)
        return cls(texts, emb, teacher_key)

    def save(self, path: str | Path):
        with atomic_write(path) as tmp:
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp),
                      metadata={"format": FORMAT, "teacher_key": self.teacher_key, "texts": json.dumps(self.texts)})

    @classmethod
    def load(cls, path: str | Path) -> AnswerBank:
        """The bank in ``path``; a ``CheckpointError`` that says what is wrong with a damaged one."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"not a {FORMAT} file")
                texts, emb = json.loads(meta["texts"]), f.get_tensor("embeddings")
            if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts) and emb.dim() == 2
                    and emb.shape[0] == len(texts)):
                raise ValueError(f"{len(texts)} texts for embeddings of shape {tuple(emb.shape)}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
            raise CheckpointError(f"answer bank {path} cannot be read: {exc}") from None
        return cls(texts, emb, meta.get("teacher_key", ""))
