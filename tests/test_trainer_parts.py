"""The trainer's parts on their own: config validation, data loading and splitting, the loss
terms, the evaluation metrics and the process set-up."""
from __future__ import annotations

import importlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cube_trainer import ConfigError, DataError, load_config
from cube_trainer.config import LossConfig, config_from_dict
from cube_trainer.data import (Pair, PairSet, deduplicate, load_chatterbot, load_jsonl, shared_texts, split_pairs,
                               split_summary, text_key)
from cube_trainer.evaluate import RankingBank, HeldOut, Queries, mlp_width, question_scores, ridge_fit
from cube_trainer.losses import compute_losses, contrastive_loss, internal_loss, same_question, surface_target
from cube_trainer.model import CubeModel, unit_length
from cube_trainer.report import ReportError, bootstrap, format_report, interval

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "chitchat.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.steps >= cfg.model.depth - 1


@pytest.mark.parametrize("data,message", [
    ({"train": {"stepz": 3}}, "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    ({"modle": {}}, "unknown config key 'modle' (did you mean 'model'?)"),
    ({"train": {"lr": "fast"}}, "config key 'train.lr' must be a number, got str 'fast'"),
    ({"train": {"steps": 1.5}}, "config key 'train.steps' must be an int, got float 1.5"),
    ({"train": {"amp": 1}}, "config key 'train.amp' must be a bool (true/false) or a string, got int 1"),
    ({"model": {"depth": True}}, "config key 'model.depth' must be an int, got bool True"),
    ({"eval": {"ridge_alphas": [1, "x"]}}, "config key 'eval.ridge_alphas[1]' must be a number"),
    ({"model": "big"}, "config section 'model.' must be a mapping"),
    ({"model": {"neighbourhood": "hex"}}, "config key 'model.neighbourhood' must be one of ['von_neumann', 'moore']"),
    ({"model": {"depth": 11, "steps": 5}}, "config key 'model.steps': must be >= max(1, model.depth - 1) = 10"),
    ({"model": {"depth": 0}}, "config key 'model.depth': must be >= 1, got 0"),
    ({"model": {"channels": 4, "surface_channels": 5}},
     "config key 'model.surface_channels': must be in [1, model.channels=4]"),
    ({"model": {"fire_rate": 0.0}}, "config key 'model.fire_rate': must be in (0, 1]"),
    ({"train": {"batch_size": 10, "grad_accum": 4}}, "'train.batch_size': 10 is not divisible by train.grad_accum=4"),
    ({"train": {"batch_size": 4, "pool_size": 2}}, "'train.pool_size': must be 0 (off) or >= train.batch_size=4"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "leaves no training data"),
    ({"data": {"source": "jsonl"}}, "'data.path': is required when data.source is 'jsonl'"),
    ({"loss": {"dialogue": 0, "contrastive": 0}}, "nothing trains the answer prediction"),
    ({"device": "gpu"}, "'device': must be auto, cpu, cuda or cuda:N"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert message in str(exc.value)


def test_config_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=7", "train.clip_grad_norm=null"])
    assert cfg.train.steps == 7 and cfg.train.clip_grad_norm is None
    with pytest.raises(ConfigError, match="tiny.yaml: unknown config key 'train.nope'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.nope=1"])
    with pytest.raises(ConfigError, match="must look like KEY=VALUE"):
        load_config(None, ["train.steps"])


# ------------------------------------------------------------------ data

def test_jsonl_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_jsonl(tmp_path / "none.jsonl")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "a?", "answer": "b"}\n\n{"question": "c?"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:3: expected an object with string fields"):
        load_jsonl(path)
    path.write_text('{"question": "a?", "answer": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:2: not valid JSON"):
        load_jsonl(path)
    path.write_text('{"question": "a?", "answer": "b"}\n')
    assert load_jsonl(path) == [Pair("a?", "b")]


def test_text_key_folds_case_punctuation_and_whitespace():
    assert text_key("  What's   AI?? ") == text_key("whats ai") == "whats ai"
    assert text_key("Hello, World!") == text_key("hello world")
    assert text_key(":-)") == ":-)" and text_key("?") != text_key("!")  # punctuation only: kept


def test_deduplicate_normalises_whitespace_and_drops_empties():
    pairs = [Pair("Hi  there", "Hello."), Pair("hi there!", "hello"), Pair("Hi there", " Hello. "),
             Pair("Hi there", "Hey"), Pair(" ", "x")]
    assert deduplicate(pairs) == [Pair("Hi there", "Hello."), Pair("Hi there", "Hey")]


def _tangled_pairs():
    """Conversations (t0 -> t1 -> t2) and answers shared by several questions, with texts that
    differ only in case and punctuation: a split by question alone would leak all of them."""
    pairs = []
    for c in range(60):
        turns = [f"Turn {c}-{i}?" if i % 2 else f"turn {c}-{i}" for i in range(4)]
        pairs += [Pair(q, a) for q, a in zip(turns, turns[1:])]
    pairs += [Pair(f"Question {i}", "Yes." if i % 3 else "yes") for i in range(30)]
    pairs += [Pair(f"Other {i}", f"Answer {i}") for i in range(80)]
    pairs += [Pair(f"other {i}!", f"Another answer {i}") for i in range(0, 80, 4)]
    return pairs


def test_split_by_connected_texts_shares_no_question_or_answer_text():
    pairs = _tangled_pairs()
    train, val, test = split_pairs(pairs, 0.1, 0.2, seed=3)
    assert sorted(map(str, train + val + test)) == sorted(map(str, pairs))
    texts = [{text_key(t) for p in s for t in (p.question, p.answer)} for s in (train, val, test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for held_out in (val, test):
        assert shared_texts(train, held_out) == (0, 0)
    n_questions = [len({text_key(p.question) for p in s}) for s in (train, val, test)]
    total = sum(n_questions)
    assert abs(n_questions[2] - 0.2 * total) <= 3 and abs(n_questions[1] - 0.1 * total) <= 3
    # The 30 questions of "yes" are one group, too large for a held-out split: training keeps it.
    assert sum(p.answer.lower().startswith("yes") for p in train) == 30
    # shared_texts counts what a split by question alone would leak.
    leaky_test = [Pair("Turn 0-1?", "turn 0-2"), Pair("Question 5", "Yes.")]
    assert shared_texts(pairs, leaky_test) == (2, 2)


def test_split_is_deterministic_order_free_and_seeded():
    pairs = _tangled_pairs()
    train, val, test = split_pairs(pairs, 0.1, 0.2, seed=3)
    again = split_pairs(list(reversed(pairs)), 0.1, 0.2, seed=3)
    assert [sorted(map(str, s)) for s in again] == [sorted(map(str, s)) for s in (train, val, test)]
    assert sorted(map(str, split_pairs(pairs, 0.1, 0.2, seed=4)[2])) != sorted(map(str, test))
    limited = split_pairs(pairs, 0.1, 0.2, seed=3, max_pairs=100)
    assert 90 <= sum(map(len, limited)) <= 100
    with pytest.raises(DataError, match="too few"):
        split_pairs(pairs[:2], 0.1, 0.2)


def test_split_summary_reports_sizes_and_shared_texts():
    emb = torch.zeros(3, 2)
    splits = {"train": PairSet(["A?", "B?", "C"], ["x", "y", "z"], emb, emb),
              "val": PairSet(["a", "D?"], ["w", "x!"], emb[:2], emb[:2]),
              "test": PairSet(["E?"], ["F"], emb[:1], emb[:1])}
    line = split_summary(splits)
    assert "train 3 pairs / 3 questions, val 2 pairs / 2 questions, test 1 pairs / 1 questions" in line
    assert "val-train 1/1, test-train 0/0, test-val 0/0" in line


def test_chatterbot_corpus_gives_about_2400_pairs():
    pairs = load_chatterbot()
    assert 2300 <= len(pairs) <= 2500
    assert Pair("What is AI?", "Artificial Intelligence is the branch of engineering and science devoted to "
                               "constructing machines that think.") in pairs
    with pytest.raises(DataError, match="no chatterbot-corpus YAML files"):
        load_chatterbot("klingon")


# ------------------------------------------------------------------ losses

def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_contrastive_loss_is_infonce_with_temperature():
    pred, ans = torch.randn(4, 8), _unit(4, 8)
    logits = F.normalize(pred, dim=-1) @ ans.T / 0.1
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    torch.testing.assert_close(contrastive_loss(pred, ans, 0.1), expected)
    # A slice of a larger batch: rows 2..3 against all six answers.
    more = torch.cat([_unit(2, 8, seed=1), ans[:2], _unit(2, 8, seed=2)])
    sliced = contrastive_loss(pred[:2], ans[:2], 0.1, negatives=more, offset=2)
    ref = -torch.log_softmax(F.normalize(pred[:2], dim=-1) @ more.T / 0.1, dim=1)[[0, 1], [2, 3]].mean()
    torch.testing.assert_close(sliced, ref)


def test_contrastive_loss_ignores_copies_of_the_true_answer():
    ans = _unit(3, 8)
    ans_dup = torch.stack([ans[0], ans[0], ans[1]])
    pred = ans_dup.clone()
    loss = contrastive_loss(pred, ans_dup, 0.05)
    logits = pred @ ans_dup.T / 0.05
    # Row 0 and row 1 each see one copy masked, so only two candidates compete.
    expected = torch.stack([-torch.log_softmax(logits[0, [0, 2]], 0)[0], -torch.log_softmax(logits[1, [1, 2]], 0)[0],
                            -torch.log_softmax(logits[2], 0)[2]]).mean()
    torch.testing.assert_close(loss, expected)


def test_contrastive_loss_leaves_out_other_answers_of_the_same_question():
    ans, pred = _unit(4, 8), _unit(4, 8, seed=5)
    ids = torch.tensor([0, 0, 1, 2])  # pairs 0 and 1: one question, two answers
    loss = contrastive_loss(pred, ans, 0.1, same=same_question(ids, ids))
    logits = pred @ ans.T / 0.1
    expected = torch.stack([-torch.log_softmax(logits[0, [0, 2, 3]], 0)[0], -torch.log_softmax(logits[1, [1, 2, 3]], 0)[0],
                            -torch.log_softmax(logits[2], 0)[2], -torch.log_softmax(logits[3], 0)[3]]).mean()
    torch.testing.assert_close(loss, expected)


def test_the_mean_answer_gets_cosine_but_not_the_contrastive_term():
    ans = F.normalize(_unit(16, 8) + 2.0, dim=-1)  # answers that share a large common direction
    mean_pred = ans.mean(0, keepdim=True).expand_as(ans)
    assert F.cosine_similarity(mean_pred, ans).mean() > 0.9
    # One prediction for every question ranks them all alike: no better than chance, log(B).
    assert contrastive_loss(mean_pred, ans, 0.05) >= math.log(16) - 1e-5
    # Predicting each question's own answer does better, though these answers are all alike.
    assert contrastive_loss(ans, ans, 0.05) < contrastive_loss(mean_pred, ans, 0.05) - 0.3


def test_compute_losses_combines_the_terms_and_stops_the_surface_gradient():
    cfg = config_from_dict({"model": {"depth": 3, "height": 2, "width": 2, "channels": 4, "hidden": 4, "steps": 2}})
    model = CubeModel(8, cfg.model)
    q, a = _unit(4, 8), _unit(4, 8, seed=1)
    out = model(q, seed=0)
    target = surface_target(model, a)
    assert not target.requires_grad
    weights = LossConfig(surface=0.5, dialogue=2.0, contrastive=0.25, internal=3.0, temperature=0.2)
    losses = compute_losses(out, a, target, weights)
    total = sum(w * losses[f"{k}_loss"] for k, w in
                (("surface", 0.5), ("dialogue", 2.0), ("contrastive", 0.25), ("internal", 3.0)))
    torch.testing.assert_close(losses["total_loss"], total)
    torch.testing.assert_close(losses["internal_loss"],
                               (out["final_cube_state"][:, 1] - out["previous_cube_state"][:, 1]).pow(2).mean())
    losses["surface_loss"].backward()
    assert model.adapter_in.weight.grad is not None  # through the question path only
    thin = torch.zeros(2, 2, 3, 3, 4)
    assert internal_loss(thin, thin + 1) == 0


# ------------------------------------------------------------------ model

def test_the_read_out_is_unit_length_and_its_gradient_stays_bounded_where_it_vanishes():
    x = torch.randn(3, 225, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unit_length(x), F.normalize(x, dim=-1), atol=1e-4, rtol=0)
    for scale in (1e-3, 1e-9, 0.0):
        tiny = (scale * x).requires_grad_()
        unit_length(tiny).sum().backward()
        assert torch.isfinite(tiny.grad).all() and tiny.grad.abs().max() <= 1.0001 / math.sqrt(225 * 1e-4)
    # F.normalize, the read-out before, at the same point:
    tiny = (1e-9 * x).requires_grad_()
    F.normalize(tiny, dim=-1).sum().backward()
    assert tiny.grad.abs().max() > 1e6


def _small_model(**model):
    return CubeModel(8, config_from_dict({"model": {"depth": 3, "height": 2, "width": 2, "channels": 4, "hidden": 4,
                                                    "steps": 2, **model}}).model)


def test_the_no_lattice_ablation_reads_the_surface_out_directly():
    model = _small_model(lattice="none")
    assert model.lattice is None and model.init_state is None
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"adapter_in", "adapter_out"}
    q = _unit(3, 8)
    out = model(q, seed=0)
    torch.testing.assert_close(out["output_surface"], unit_length(model.surface(q)))
    assert out["final_cube_state"] is None and internal_loss(None, None) == 0
    with pytest.raises(ConfigError, match="train.pool_size"):
        config_from_dict({"model": {"lattice": "none"}, "train": {"pool_size": 64}})


def test_the_frozen_ablation_trains_the_adapters_only():
    model = _small_model(lattice="frozen")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"adapter_in.weight", "adapter_in.bias", "adapter_out.weight", "adapter_out.bias"}


# ------------------------------------------------------------------ evaluation

def _held_out():
    """Three questions (one asked twice with different answers) over a bank of five answers, one
    of which (Paris) is in the bank twice, with the same embedding."""
    e = torch.eye(4)
    train = PairSet(["Capital of Italy?"], ["Rome"], e[:1], e[3:4])
    test = PairSet(["Capital of France?", "capital of france", "Hi?", "Bye?"],
                   ["Paris.", "It is Paris", "Hello", "Goodbye"],
                   torch.stack([e[0], e[0], e[1], e[2]]), torch.stack([e[0], e[0] + 1e-3, e[1], e[2]]))
    other = PairSet(["Where is the Louvre?"], ["paris"], e[:1], e[:1])
    return HeldOut(test, RankingBank.of(train, test, other))


def test_each_question_counts_once_with_all_its_answers_relevant():
    held = _held_out()
    assert held.queries.keys == ["capital of france", "hi", "bye"]
    assert held.bank.keys == ["rome", "paris", "it is paris", "hello", "goodbye"]  # "paris" of the other split folded in
    assert held.queries.relevant.tolist() == [[False, True, True, False, False], [False, False, False, True, False],
                                              [False, False, False, False, True]]
    assert held.own_bank.keys == ["paris", "it is paris", "hello", "goodbye"]


def test_ties_count_against_the_model():
    bank = RankingBank(["a", "b", "c"], torch.eye(3))
    queries = Queries(["q1", "q2"], torch.zeros(2, 3), torch.tensor([[True, False, False], [False, True, False]]))
    pred = torch.tensor([[1.0, 1.0, 0.0],     # a and b tie: rank 2
                         [0.0, 1.0, 0.9]])    # rank 1
    s = question_scores(pred, queries, bank, ks=(1, 2))
    assert s["mrr"].tolist() == [0.5, 1.0] and s["recall@1"].tolist() == [0.0, 1.0]
    assert s["recall@2"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", ["zeros", "nan", "inf"])
def test_a_zero_or_non_finite_prediction_gets_the_worst_rank(name):
    held = _held_out()
    n = held.q.shape[0]
    pred = {"zeros": torch.zeros(n, 4), "nan": torch.full((n, 4), float("nan")),
            "inf": torch.full((n, 4), float("inf"))}[name]
    m = held.metrics(pred)
    # Bank of 5: question 1 has 2 relevant answers (worst rank 4), the others 1 (worst rank 5).
    assert m["mrr"] == pytest.approx((1 / 4 + 1 / 5 + 1 / 5) / 3)
    assert m["recall@1"] == 0.0 and m["recall@10"] == 1.0
    assert m["mean_cosine"] == (0.0 if name == "zeros" else -1.0)


def test_a_constant_prediction_is_at_chance_and_the_true_answer_is_perfect():
    held = _held_out()
    bank = RankingBank(list("abcd"), torch.eye(4))
    q = Queries(["q1", "q2"], torch.zeros(2, 4), torch.tensor([[True, False, False, False], [False, True, True, False]]))
    constant = question_scores(torch.ones(2, 4), q, bank)  # the same cosine to every candidate: ties
    assert constant["mrr"].tolist() == pytest.approx([1 / 4, 1 / 3])
    # The answer itself: rank 1, except where a non-relevant answer has the same embedding.
    answers = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2]])
    m = held.metrics(answers)
    assert m["mrr"] == 1.0 and m["recall@1"] == 1.0 and m["mrr_split"] == 1.0
    assert m["mean_cosine"] == pytest.approx((1 + 1) / 3 + (1 + 1) / 2 / 3, abs=1e-3)
    bank = RankingBank(["right", "wrong copy"], torch.eye(2)[[0, 0]])
    q = Queries(["q"], torch.zeros(1, 2), torch.tensor([[True, False]]))
    assert question_scores(bank.embeddings[:1], q, bank)["mrr"].item() == 0.5


def test_the_raw_question_ranks_against_the_whole_bank_and_the_split_pool():
    held = _held_out()
    m = held.metrics(held.q)
    assert m["mrr"] == pytest.approx(1.0)
    assert m["mrr_split"] == pytest.approx(1.0)
    far = torch.stack([torch.eye(4)[3]] * 3) + 0.01 * torch.eye(4)[[0, 1, 2]]  # nearest: Rome, not in the split
    m = held.metrics(far)
    assert m["mrr"] < m["mrr_split"]


def test_ridge_recovers_a_linear_map_and_mlp_width_matches_parameters():
    q = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ridge_fit(q, q @ w + 2.0, 1e-6)(q), q @ w + 2.0, atol=1e-4, rtol=1e-4)
    h = mlp_width(10_000, 20)
    assert abs((2 * 20 * h + h + 20) - 10_000) <= 41


# ------------------------------------------------------------------ report

def _result(seed, scores: dict[str, list[float]], questions=None):
    n = len(next(iter(scores.values())))
    return {"split": "test", "seed": seed, "commit": "abc", "data": "toy", "bank": 50, "split_answers": 10,
            "chance": 0.02, "questions": questions or [f"q{i}" for i in range(n)],
            "rows": [{"method": m, "params": 1, "step": None,
                      "scores": {"mean_cosine": v, "recall@1": v, "mrr": v, "mrr_split": v}} for m, v in scores.items()]}


def test_bootstrap_intervals_of_a_constant_and_of_noise():
    const = torch.full((2, 40), 0.25)
    assert interval(bootstrap(const, 500)) == pytest.approx((0.25, 0.25))
    noise = torch.randn(3, 400, generator=torch.Generator().manual_seed(0))
    lo, hi = interval(bootstrap(noise, 2000))
    assert lo < 0 < hi and hi - lo < 0.5
    # Resampling seeds as well widens the interval when the seeds disagree.
    seeds = noise + torch.tensor([[-1.0], [0.0], [1.0]])
    lo2, hi2 = interval(bootstrap(seeds, 2000))
    assert hi2 - lo2 > 2 * (hi - lo)


def test_the_report_says_beats_only_when_the_interval_of_the_difference_is_above_zero():
    g = torch.Generator().manual_seed(1)
    model = torch.rand(2, 60, generator=g)
    runs = [_result(s, {"model": model[s].tolist(), "much worse": (model[s] - 0.3).tolist(),
                        "identical": model[s].tolist(),
                        "noisy": (model[s] + 0.3 * torch.randn(60, generator=g)).tolist(),
                        "better": (model[s] + 0.2).tolist()}) for s in range(2)]
    text = format_report(runs, resamples=2000)
    verdicts = {line.split()[0]: line.split()[-1] for line in text.splitlines()[-8:] if line.endswith(
        ("beats", "shown", "worse"))}
    assert verdicts == {"much": "beats", "identical": "shown", "noisy": "shown", "better": "worse"}
    assert "2 run(s): seed 0, 1; commit abc" in text
    assert "the model beats: much worse; it does not beat: identical, noisy, better." in text
    with pytest.raises(ReportError, match="different questions"):
        format_report([runs[0], _result(1, {"model": [0.0] * 60}, questions=[f"x{i}" for i in range(60)])])


# ------------------------------------------------------------------ search log

def test_the_search_table_lists_each_trial_against_the_base_config(tmp_path, capsys):
    from cube_trainer.search import _settings, main
    base = ROOT / "configs" / "tiny.yaml"
    def record(method, sets, mrr):
        unrelated = ["train.checkpoint_every=7", "out_dir=elsewhere", "eval.mlp=[train.lr=1]"]  # not in the table
        effective = _settings(load_config(base, [*sets, *unrelated]))
        return {"method": method, "effective": effective, "val_mrr": mrr, "best_step": 10, "steps": 20}
    log = tmp_path / "trials.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        record("lattice", ["train.lr=0.05"], 0.41), record("lattice", [], 0.43),
        record("mlp", ["train.lr=0.05", "model.residual=false"], 0.2)]) + "\n")
    assert main(["--table", str(log), "--config", str(base)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| lattice", "(base)", "0.4300"], ["| lattice", "train.lr=0.05", "0.4100"],
        ["| mlp", "model.residual=false, train.lr=0.05", "0.2000"]]
    assert rows[1].endswith(f"`python -m cube_trainer.search --config {base} --method lattice --set train.lr=0.05` |")


# ------------------------------------------------------------------ process set-up

@pytest.mark.parametrize("setting, expected", [(None, "1"), ("0", "0")])
def test_the_trainer_turns_on_torch_huge_page_allocations_unless_told_not_to(setting, expected):
    """Importing cube_trainer (as cube-train does, before torch allocates) sets PyTorch's
    THP_MEM_ALLOC_ENABLE; a value in the environment is kept. PyTorch's allocator shows that it
    took the setting by aligning a 4 MB tensor to a page (64 bytes without it)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    code = ("import os, cube_trainer, torch; t = torch.empty(2 ** 20); "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], t.data_ptr() % 4096 == 0)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    value, page_aligned = out.stdout.split()
    assert value == expected
    if expected == "1":
        assert page_aligned == "True"


GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize("setting, kept", [
    ({}, True), ({"CUBE_KEEP_FREED_MEMORY": "0"}, False), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, False)])
def test_the_trainer_keeps_freed_memory_unless_told_not_to(setting, kept):
    """keep_freed_memory (the training commands call it) makes glibc keep a freed 64 MB tensor in
    the heap, where by default it is unmapped at once (blocks over 32 MB are always mapped
    afresh); the opt-out and a user's own malloc settings leave glibc as it was."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUBE_KEEP_FREED_MEMORY", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    code = ("import os, torch; from cube_trainer.heap import keep_freed_memory; "
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'); "
            "on = keep_freed_memory(); t = torch.ones(2 ** 24); before = rss(); del t; "
            "print(on, (before - rss()) >> 20)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **setting}, capture_output=True, text=True,
                         check=True)
    on, freed_mib = out.stdout.split()
    assert on == str(kept)
    assert (int(freed_mib) < 8) if kept else (int(freed_mib) >= 60)


@pytest.mark.parametrize("command, argv", [("cube_trainer.cli", ["train", "--config", "configs/tiny.yaml"]),
                                           ("cube_trainer.growth.cli", ["--config", "configs/grow.yaml"]),
                                           ("cube_trainer.search", ["--config", "configs/tiny.yaml"])])
def test_training_commands_keep_freed_memory_before_they_train(monkeypatch, tmp_path, command, argv):
    """cube-train, cube-grow and a search trial set glibc up (keep_freed_memory) once their config
    has loaded."""
    module = importlib.import_module(command)

    class Called(Exception):
        pass

    def called():
        raise Called
    monkeypatch.setattr(module, "keep_freed_memory", called)
    with pytest.raises(Called):
        module.main(argv + ["--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
