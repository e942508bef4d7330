"""The short version of scripts/kill_resume.py: three SIGKILLs (half-way through a checkpoint's
tensor file, during a validation evaluation, half-way through a checkpoint's JSON) and three
resumes of cube-train, whose final state must equal the uninterrupted run's bit for bit."""
from __future__ import annotations

import importlib.util

from test_cli_errors import corpus_with_cached_embeddings
from test_trainer import ROOT


def test_three_kills_lose_nothing(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "scripts" / "kill_resume.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpus, cache = corpus_with_cached_embeddings(tmp_path)
    args = script.parse_args(["--kills", "3", "--steps", "40", "--checkpoint-every", "5", "--eval-every", "4",
                              "--windows", "tensors,eval,json", "--no-eval", "--workdir", str(tmp_path / "work"),
                              "--set", "data.source=jsonl", "--set", f"data.path={corpus}",
                              "--set", f"teacher.cache_dir={cache}"])
    assert script.run(args, in_process=True) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "kills: 3; resumes from the newest complete checkpoint: 3/3" in out
    assert "equal to the uninterrupted run's bit for bit" in out
