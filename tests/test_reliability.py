"""Failure modes of the trainer: damaged and foreign checkpoints, mixed precision that skips
steps, device choice, configs by name, the teacher cache key and the answer bank."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cube_trainer import CheckpointError, ConfigError, CubeTrainer, NonFiniteLossError, Teacher, load_config
from cube_trainer import trainer as trainer_module
from cube_trainer.bank import AnswerBank
from cube_trainer.config import config_from_dict, packaged_configs
from cube_trainer.metrics import read_metrics
from cube_trainer.trainer import amp_dtype, resolve_device
from test_trainer import DIM, ROOT, synthetic_pairs, tiny_config

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tmp, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    CubeTrainer(cfg, teacher_dim=DIM).fit(synthetic_pairs(16), **QUIET)
    return tmp / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    """A run directory of its own with checkpoints at steps 3 and 4."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ------------------------------------------------------------------ damaged checkpoints

@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "cut the json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, damage):
    newest = run / "checkpoints" / "step_00000004"
    tensors, js = newest.with_suffix(".safetensors"), newest.with_suffix(".json")
    if damage == "flip a byte":
        raw = bytearray(tensors.read_bytes())
        raw[len(raw) // 2] ^= 1
        tensors.write_bytes(bytes(raw))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-10])
    else:
        js.write_text(js.read_text()[:100])
    bad = js if damage == "cut the json" else tensors
    with pytest.warns(UserWarning, match=rf"skipping a damaged checkpoint: .*{bad.name}.*using .*step_00000003.json"):
        trainer = CubeTrainer.load(run)
    assert trainer.global_step == 3
    with pytest.raises(CheckpointError, match=bad.name):  # named explicitly, the damaged file is an error
        CubeTrainer.load(newest)


def test_no_readable_checkpoint_names_every_damaged_one(run):
    for path in (run / "checkpoints").glob("*.safetensors"):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*step_00000004.*step_00000003"):
        CubeTrainer.load(run)


def _leaves(node, path=()):
    """Every key path of a JSON document (objects and lists), outermost first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield path + (key,)
        yield from _leaves(value, path + (key,))


def _damaged(meta, path, how):
    meta = json.loads(json.dumps(meta))
    node = meta
    for key in path[:-1]:
        node = node[key]
    if how == "delete":
        del node[path[-1]]
    else:
        node[path[-1]] = "damaged" if not isinstance(node[path[-1]], str) else 7
    return meta


def test_every_damaged_json_field_is_a_checkpoint_error(tmp_path):
    """Deleting any field of the checkpoint JSON, or giving it a value of another type, either
    loads (fields that do not matter) or raises a CheckpointError: never a KeyError or TypeError."""
    trainer = CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM)
    data = synthetic_pairs(8)
    trainer.train_step(data.q, data.a)
    js = trainer.save(tmp_path / "ckpt")
    meta = json.loads(js.read_text())
    paths = [p for p in _leaves(meta) if p[0] not in ("config", "tensor_index", "data_fingerprint")]
    paths += [("config",), ("config", "train", "steps"), ("tensor_index",), ("data_fingerprint",)]
    errors = 0
    for path in paths:
        for how in ("delete", "retype"):
            if how == "delete" and isinstance(path[-1], int):
                continue
            js.write_text(json.dumps(_damaged(meta, path, how)))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # changed versions are reported, not refused
                    CubeTrainer.load(js)
            except CheckpointError:
                errors += 1
    assert errors > len(paths)  # most damage is caught, the rest is harmless


@pytest.mark.parametrize("path,message", [
    (("optimizer", "param_groups"), "field 'optimizer.param_groups' is missing"),
    (("optimizer", "param_groups", 0, "betas"), "field 'optimizer.param_groups[0].betas' is missing"),
    (("scheduler", "base_lrs"), "field 'scheduler.base_lrs' is missing"),
    (("data_position", "cursor"), "field 'data_position.cursor' is missing"),
    (("format",), "is not a cube-trainer-checkpoint file"),
])
def test_damaged_nested_fields_are_named(tmp_path, path, message):
    trainer = CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM)
    js = trainer.save(tmp_path / "ckpt")
    js.write_text(json.dumps(_damaged(json.loads(js.read_text()), path, "delete")))
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CubeTrainer.load(js)


def test_other_library_versions_are_reported(tmp_path):
    js = CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM).save(tmp_path / "ckpt")
    meta = json.loads(js.read_text())
    meta["versions"]["torch"] = "1.0.0"
    js.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=re.escape(f"other library versions (torch 1.0.0 -> {torch.__version__})")):
        CubeTrainer.load(js)


# ------------------------------------------------------------------ mixed precision

def _fp16_trainer(tmp_path, *overrides):
    trainer = CubeTrainer(tiny_config(tmp_path, "train.amp=float16", *overrides), teacher_dim=DIM)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    return trainer


def _state(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()], trainer.scheduler.last_epoch, trainer.global_step


def _unchanged(trainer, before):
    params, epoch, step = before
    return (all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), params))
            and trainer.scheduler.last_epoch == epoch and trainer.global_step == step)


def test_float16_steps_with_inf_gradients_are_skipped(tmp_path):
    trainer, data = _fp16_trainer(tmp_path), synthetic_pairs(8)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # these gradients fit in float16 at it
    hook = trainer.model.init_state.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _state(trainer)
    out = trainer.train_step(data.q, data.a)
    assert out["skipped"] and "grad_norm" not in out and trainer.scaler.get_scale() == 2.0 ** 9
    assert _unchanged(trainer, before)
    hook.remove()
    out = trainer.train_step(data.q, data.a)
    assert not out["skipped"] and torch.isfinite(torch.tensor(out["grad_norm"])) and trainer.global_step == 1
    assert trainer.scheduler.last_epoch == 1


def test_a_float16_overflow_in_the_forward_skips_the_step(tmp_path, monkeypatch):
    trainer, data = _fp16_trainer(tmp_path), synthetic_pairs(8)
    with torch.no_grad():
        trainer.model.adapter_out.weight.fill_(1e5)  # beyond float16's 65504
    before = _state(trainer)
    out = trainer.train_step(data.q, data.a)
    assert out["skipped"] and not torch.isfinite(torch.tensor(out["total_loss"])) and _unchanged(trainer, before)
    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_IN_A_ROW", 3)
    trainer.train_step(data.q, data.a)
    with pytest.raises(NonFiniteLossError, match="3 float16 steps in a row skipped for a non-finite loss"):
        trainer.train_step(data.q, data.a)


def test_fit_under_float16_logs_no_skipped_step(tmp_path):
    trainer = _fp16_trainer(tmp_path, "train.steps=4", "train.log_every=1")
    trainer.fit(synthetic_pairs(16), **QUIET)  # the first step overflows at the scaler's initial scale
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and trainer.global_step == 4
    assert sum(r["skipped_steps"] for r in records) >= 1
    assert all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in records)


@pytest.mark.parametrize("amp,cpu,cuda", [(False, None, None), (True, torch.bfloat16, torch.float16),
                                          ("bfloat16", torch.bfloat16, torch.bfloat16),
                                          ("float16", torch.float16, torch.float16)])
def test_amp_settings(amp, cpu, cuda):
    assert amp_dtype(amp, torch.device("cpu")) == cpu and amp_dtype(amp, torch.device("cuda")) == cuda
    assert config_from_dict({"train": {"amp": amp}}).train.amp == amp
    with pytest.raises(ConfigError, match="'train.amp': must be true, false, bfloat16 or float16, got 'fp8'"):
        config_from_dict({"train": {"amp": "fp8"}})


# ------------------------------------------------------------------ devices

def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda:3", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="'cuda:5': this machine has 4 CUDA device"):
        resolve_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
        resolve_device("cuda:0", local_rank=0)
    assert resolve_device("auto") == torch.device("cpu")


# ------------------------------------------------------------------ configs

def test_yaml_exponents_are_the_numbers_users_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-2\neval:\n  ridge_alphas: [1e-2, 10]\n")
    cfg = load_config(path, ["train.min_lr_ratio=1e-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.min_lr_ratio) == (1e-3, 5e-2, 0.1)
    assert cfg.eval.ridge_alphas == [0.01, 10.0]
    with pytest.raises(ConfigError, match="'train.steps' must be an int, got str '1e3'"):
        load_config(path, ["train.steps=1e3"])


def test_shipped_configs_by_name(tmp_path, monkeypatch):
    names = packaged_configs()
    assert set(names) == {p.stem for p in (ROOT / "configs").glob("*.yaml")} >= {"default", "tiny", "chitchat"}
    monkeypatch.chdir(tmp_path)  # names work from anywhere
    assert load_config("tiny") == load_config(ROOT / "configs" / "tiny.yaml") == load_config("tiny.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: tinny \(the shipped configs, given by name: "
                                          r"chitchat, default, .*tiny"):
        load_config("tinny")
    (tmp_path / "tiny").mkdir()  # a path that exists wins over a name, and must be a file
    with pytest.raises(ConfigError, match="config file is not a file: tiny"):
        load_config("tiny")


def test_periodic_boundaries_need_one_step_and_say_why():
    with pytest.raises(ConfigError, match=r"'model.steps': must be >= max\(1, model.depth - 1\) = 10"):
        config_from_dict({"model": {"depth": 11, "steps": 3}})
    with pytest.warns(UserWarning, match="back face .* neighbours the front face.*shortcut"):
        cfg = config_from_dict({"model": {"depth": 11, "steps": 3, "boundary": "periodic"}})
    assert cfg.model.steps == 3
    with pytest.raises(ConfigError, match="'model.steps': must be >= 1, got 0"):
        config_from_dict({"model": {"boundary": "periodic", "steps": 0}})


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(ConfigError, match=r"'train.warmup_steps': must be in \[0, train.steps=10\], got 20"):
        config_from_dict({"train": {"steps": 10, "warmup_steps": 20}})


# ------------------------------------------------------------------ teacher cache key

def _fake_model(path, weights: bytes):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("documentation does not change embeddings")


def test_the_cache_key_follows_the_weights_content(tmp_path, monkeypatch):
    model = tmp_path / "model"
    _fake_model(model, b"a" * 1000)
    first = Teacher(str(model), cache_dir=tmp_path / "cache").key
    stat = (model / "model.safetensors").stat()
    with open(model / "model.safetensors", "r+b") as f:  # changed in place: same size, mtime put back
        f.write(b"b")
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = Teacher(str(model), cache_dir=tmp_path / "cache").key
    assert second != first
    (model / "README.md").write_text("edited")
    hashed = []
    monkeypatch.setattr("cube_trainer.teacher.file_sha256", lambda p: hashed.append(p) or "x")
    monkeypatch.setattr("cube_trainer.teacher._HASHES", {})  # a new process: only the memo file is left
    assert Teacher(str(model), cache_dir=tmp_path / "cache").key == second and not hashed


# ------------------------------------------------------------------ answer bank

def test_answer_bank_holds_every_distinct_answer(tmp_path):
    train, val = synthetic_pairs(6), synthetic_pairs(3, seed=1)
    val.answers[0] = train.answers[2]
    val.a[0] = train.a[2]
    bank = AnswerBank.from_splits({"train": train, "val": val}, "key")
    assert bank.texts == sorted(set(train.answers) | set(val.answers)) and len(bank.texts) == 8
    assert torch.equal(bank.embeddings[bank.texts.index(val.answers[1])], val.a[1])
    bank.save(tmp_path / "bank.safetensors")
    again = AnswerBank.load(tmp_path / "bank.safetensors")
    assert again.texts == bank.texts and torch.equal(again.embeddings, bank.embeddings) and again.teacher_key == "key"
    save_file({"embeddings": torch.zeros(2, 3)}, str(tmp_path / "other.safetensors"))
    for path in (tmp_path / "other.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError, match="answer bank .* cannot be read"):
            AnswerBank.load(path)
