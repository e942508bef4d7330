"""The trainer's parts on their own: config validation, data loading and splitting, the loss
terms and the evaluation metrics."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cube_trainer import ConfigError, DataError, load_config
from cube_trainer.config import LossConfig, config_from_dict
from cube_trainer.data import Pair, PairSet, deduplicate, load_chatterbot, load_jsonl, question_key, split_pairs
from cube_trainer.evaluate import (Candidates, candidates_of, mlp_width, retrieval_metrics, ridge_fit)
from cube_trainer.losses import compute_losses, contrastive_loss, internal_loss, surface_target
from cube_trainer.model import CubeModel

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


def test_deduplicate_normalises_whitespace_and_drops_empties():
    pairs = [Pair("Hi  there", "Hello."), Pair("hi there", "Hello."), Pair("Hi there", " Hello. "),
             Pair("Hi there", "Hey"), Pair(" ", "x")]
    assert deduplicate(pairs) == [Pair("Hi there", "Hello."), Pair("Hi there", "Hey")]


def test_split_is_by_question_deterministic_and_order_free():
    pairs = [Pair(f"question {i % 40}", f"answer {i}") for i in range(120)]
    train, val, test = split_pairs(pairs, 0.1, 0.2, seed=3)
    keys = [{question_key(p.question) for p in s} for s in (train, val, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert [len(k) for k in keys] == [28, 4, 8] and len(train) + len(val) + len(test) == 120
    again = split_pairs(list(reversed(pairs)), 0.1, 0.2, seed=3)
    assert [{p.question for p in s} for s in again] == [{p.question for p in s} for s in (train, val, test)]
    assert split_pairs(pairs, 0.1, 0.2, seed=4)[2] != test
    limited = split_pairs(pairs, 0.1, 0.2, seed=3, max_pairs=30)
    assert sum(map(len, limited)) == 30
    with pytest.raises(DataError, match="too few"):
        split_pairs(pairs[:2], 0.1, 0.2)


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


# ------------------------------------------------------------------ evaluation

def test_retrieval_metrics_on_a_worked_example():
    cands = torch.eye(4)
    relevant = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    pred = torch.tensor([[1.0, 0.1, 0, 0],      # rank 1
                         [0.9, 0.5, 0.8, 0],    # rank 3
                         [0, 0, 0.2, 0.7]])     # best correct answer (3) first: rank 1
    m = retrieval_metrics(pred, torch.eye(4)[[0, 1, 2]], Candidates(cands, relevant), ks=(1, 2))
    assert m["recall@1"] == pytest.approx(2 / 3) and m["recall@2"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)


def test_candidates_group_the_answers_of_one_question():
    pairs = PairSet(["Hi?", "hi?", "Bye?"], ["Hello", "Hey", "Hello"], torch.zeros(3, 2), torch.eye(3)[:, :2])
    c = candidates_of(pairs)
    assert c.embeddings.shape[0] == 2
    assert c.relevant.tolist() == [[True, True], [True, True], [True, False]]


def test_ridge_recovers_a_linear_map_and_mlp_width_matches_parameters():
    q = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ridge_fit(q, q @ w + 2.0, 1e-6)(q), q @ w + 2.0, atol=1e-4, rtol=1e-4)
    h = mlp_width(10_000, 20)
    assert abs((2 * 20 * h + h + 20) - 10_000) <= 41
