"""Every user error of the command-line tools is one line on stderr, exit code 2, no traceback.

The entry points run in this process on a small JSONL corpus whose teacher embeddings are put
in the cache beforehand (unit vectors, not the teacher's), so that no model is loaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cube_trainer import Teacher, cli
from cube_trainer.bank import AnswerBank
from cube_trainer.teacher import text_hash

PAIRS = [(f"What is item {i}?", f"Item {i} is number {7 * i}.") for i in range(40)]
EXTRA = ("What is the extra item?", "It came later.")


def _write_jsonl(path: Path, pairs):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))


def corpus_with_cached_embeddings(d: Path, pairs=PAIRS) -> tuple[Path, Path]:
    """``d/pairs.jsonl`` and a teacher cache ``d/cache`` that holds an embedding of each of its
    texts (and of EXTRA's), so that the default teacher is never loaded."""
    texts = sorted({t for pair in pairs + [EXTRA] for t in pair})
    emb = F.normalize(torch.randn(len(texts), 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    Teacher(cache_dir=d / "cache").cache.add([text_hash(t) for t in texts], emb)
    _write_jsonl(d / "pairs.jsonl", pairs)
    return d / "pairs.jsonl", d / "cache"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files for every case, and a run stopped at step 2 with a checkpoint."""
    d = tmp_path_factory.mktemp("cli")
    _, cache = corpus_with_cached_embeddings(d)
    _write_jsonl(d / "changing.jsonl", PAIRS)
    (d / "bad.jsonl").write_text(json.dumps({"question": "a?", "answer": "b"}) + "\n\n{oops\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00train: 1")
    (d / "broken.yaml").write_text("train: [1,\n")
    (d / "a_dir.yaml").mkdir()
    (d / "a_file").write_text("")
    (d / "garbage.json").write_text("{not json")
    env = {"d": d, "base": ["--config", "tiny", "--set", "data.source=jsonl", "--set", f"data.path={d / 'pairs.jsonl'}",
                            "--set", f"teacher.cache_dir={cache}", "--set", "train.steps=4",
                            "--set", "train.checkpoint_every=2", "--no-eval"]}
    for name, data in (("run", "pairs.jsonl"), ("changed", "changing.jsonl")):
        argv = env["base"] + ["--set", f"data.path={d / data}", "--out-dir", str(d / name), "--stop-after", "2"]
        assert cli.train(argv) == 0
    _write_jsonl(d / "changing.jsonl", PAIRS[:-1] + [EXTRA])  # the corpus changed under the run
    ckpt = d / "run" / "checkpoints" / "step_00000002"
    for name in ("corrupt", "nested"):
        (d / name).mkdir()
        for ext in (".json", ".safetensors"):
            shutil.copy(ckpt.with_suffix(ext), d / name)
    raw = bytearray((d / "corrupt" / "step_00000002.safetensors").read_bytes())
    raw[-5] ^= 1
    (d / "corrupt" / "step_00000002.safetensors").write_bytes(bytes(raw))
    meta = json.loads((d / "nested" / "step_00000002.json").read_text())
    del meta["optimizer"]["param_groups"][0]["betas"]
    (d / "nested" / "step_00000002.json").write_text(json.dumps(meta))
    return env


def _base(env, *more):
    return env["base"] + list(more)


CASES = [
    ("train", lambda e: _base(e, "--set", "train.stepz=3"), "unknown config key 'train.stepz' (did you mean"),
    ("train", lambda e: _base(e, "--set", "train.warmup_steps=50"),
     "'train.warmup_steps': must be in [0, train.steps=4], got 50"),
    ("train", lambda e: _base(e, "--set", "train.lr=fast"), "'train.lr' must be a number, got str 'fast'"),
    ("train", lambda e: ["--config", str(e["d"] / "missing.yaml")], "config file not found"),
    ("train", lambda e: ["--config", str(e["d"] / "binary.yaml")], "binary.yaml cannot be read"),
    ("train", lambda e: ["--config", str(e["d"] / "broken.yaml")], "broken.yaml is not valid YAML"),
    ("train", lambda e: ["--config", str(e["d"] / "a_dir.yaml")], "config file is not a file"),
    ("train", lambda e: ["--config", "no-such-name"], "the shipped configs, given by name: chitchat, default"),
    ("train", lambda e: _base(e, "--set", "train.steps"), "must look like KEY=VALUE"),
    ("train", lambda e: [], "give --config FILE (or --resume RUN_DIR"),
    ("train", lambda e: _base(e, "--set", "train.batch_size=64", "--out-dir", str(e["d"] / "few")),
     "pairs, fewer than train.batch_size=64"),
    ("train", lambda e: _base(e, "--set", f"data.path={e['d'] / 'bad.jsonl'}", "--out-dir", str(e["d"] / "x")),
     "bad.jsonl:3: not valid JSON"),
    ("train", lambda e: _base(e, "--set", f"data.path={e['d'] / 'none.jsonl'}"), "data file not found"),
    ("train", lambda e: _base(e, "--set", f"teacher.model={e['d'] / 'no-model'}"),
     "is not a local transformers model directory"),
    ("train", lambda e: _base(e, "--device", "cuda"), "'cuda': CUDA is not available on this machine"),
    ("train", lambda e: _base(e, "--out-dir", str(e["d"] / "run")), "holds a run (checkpoints up to step_00000002"),
    ("train", lambda e: _base(e, "--out-dir", str(e["d"] / "a_file")), "is a file, not a directory"),
    ("train", lambda e: ["--resume", str(e["d"] / "nothing")], "checkpoint not found"),
    ("train", lambda e: ["--resume", str(e["d"] / "garbage.json")], "is not valid JSON"),
    ("train", lambda e: ["--resume", str(e["d"] / "a_dir.yaml")], "no checkpoint (step_*.json) in"),
    ("train", lambda e: ["--resume", str(e["d"] / "run"), "--set", "train.lr=0.5"],
     "differs in train.lr (0.01 -> 0.5)"),
    ("train", lambda e: ["--resume", str(e["d"] / "run"), "--config", "default"], "model.channels (8 -> 16)"),
    ("train", lambda e: ["--resume", str(e["d"] / "changed")], "the train, val, test split(s) differ from those"),
    ("train", lambda e: _base(e, "--stop-after", "0"), "--stop-after: expected a whole number >= 1, got 0"),
    ("train", lambda e: _base(e, "--stepz", "3"), "unrecognized arguments: --stepz"),
    ("evaluate", lambda e: ["--checkpoint", str(e["d"] / "nothing")], "checkpoint not found"),
    ("evaluate", lambda e: ["--checkpoint", str(e["d"] / "corrupt" / "step_00000002.json")], "fails its SHA-256 check"),
    ("evaluate", lambda e: ["--checkpoint", str(e["d"] / "nested" / "step_00000002.json")],
     "field 'optimizer.param_groups[0].betas' is missing"),
    ("evaluate", lambda e: ["--checkpoint", str(e["d"] / "run"), "--split", "train"], "invalid choice: 'train'"),
    ("ask", lambda e: ["--checkpoint", str(e["d"] / "run"), "-k", "0", "Hi?"],
     "-k/--top: expected a whole number >= 1"),
    ("ask", lambda e: ["--checkpoint", str(e["d"] / "run"), "-k", "-1", "Hi?"], "got -1"),
    ("ask", lambda e: ["--checkpoint", str(e["d"] / "run"), "-k", "many", "Hi?"], "got 'many'"),
    ("ask", lambda e: ["--checkpoint", str(e["d"] / "run"), "Hi?", ""], "question 2 is empty"),
    ("ask", lambda e: ["--checkpoint", str(e["d"] / "run"), "   "], "question 1 is empty"),
    ("ask", lambda e: ["--checkpoint", str(e["d"] / "nothing"), "Hi?"], "checkpoint not found"),
]
ENTRIES = {"train": cli.train, "evaluate": cli.evaluate, "ask": cli.ask}
PROGS = {"train": "cube-train", "evaluate": "cube-eval", "ask": "cube-ask"}


@pytest.mark.parametrize("entry,argv,message", CASES, ids=[f"{c[0]}:{c[2][:40]}" for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(env, entry, argv, message, capsys):
    if "CUDA is not available" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    try:
        code = ENTRIES[entry](argv(env))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{PROGS[entry]}: error: ") and message in lines[0], err


def test_the_table_has_at_least_20_cases():
    assert len(CASES) >= 20


def test_a_run_continues_with_the_data_it_trained_on(env, capsys):
    assert cli.train(["--resume", str(env["d"] / "run")]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "step_00000002" in out and "step 4/4" in out
    bank = AnswerBank.load(env["d"] / "run" / "answer_bank.safetensors")
    assert bank.texts == sorted(a for _, a in PAIRS)  # every answer of the corpus: train, val and test
