"""CubeTrainer end to end on synthetic embeddings: learning, exact resume, checkpoint safety,
non-finite losses, the earlier trainer's API and the command-line entry points."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cube_trainer import (CheckpointError, CubeTrainer, EmergentCubeTrainer, EmergentTrainingConfig,
                          NonFiniteLossError, PairSet, cli, load_config)
from cube_trainer.checkpoint import read_checkpoint
from cube_trainer.metrics import read_metrics
from cube_trainer.rundir import RunDirectoryError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DIM = 16


def synthetic_pairs(n: int, seed: int = 0, dim: int = DIM) -> PairSet:
    """Unit question vectors and answers that are a fixed linear map of them: learnable."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    a = F.normalize(q @ torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)), dim=-1)
    return PairSet([f"q{seed}-{i}" for i in range(n)], [f"a{seed}-{i}" for i in range(n)], q, a)


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"out_dir={tmp_path / 'run'}", *overrides])


def test_tiny_config_trains_and_the_loss_falls(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM)
    data = synthetic_pairs(8)
    losses = [trainer.train_step(data.q, data.a)["total_loss"] for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_train_step_reports_every_loss_term_and_checks_its_input(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM)
    data = synthetic_pairs(8)
    out = trainer.train_step(data.q, data.a)
    assert {"total_loss", "surface_loss", "dialogue_loss", "contrastive_loss", "internal_loss",
            "cosine_similarity", "lr", "grad_norm"} <= set(out)
    with pytest.raises(ValueError, match=r"question_emb must be a \[batch, 16\]"):
        trainer.train_step(torch.randn(8, 15), data.a)
    with pytest.raises(ValueError, match="cannot be cut into"):
        CubeTrainer(tiny_config(tmp_path, "train.grad_accum=2"), teacher_dim=DIM).train_step(data.q[:7], data.a[:7])


def test_autocast_bf16_on_cpu_trains(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, "train.amp=true"), teacher_dim=DIM)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    data = synthetic_pairs(8)
    losses = [trainer.train_step(data.q, data.a)["total_loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def _resume_config(tmp_path, name):
    # fire_rate < 1, a sample pool and gradient accumulation: every piece of state that resume must restore.
    return tiny_config(tmp_path, f"out_dir={tmp_path / name}", "train.steps=8", "train.log_every=1",
                       "train.eval_every=4", "train.checkpoint_every=0", "train.pool_size=16",
                       "train.grad_accum=2", "model.fire_rate=0.5")


def _losses(records):
    return [(r["step"], r["total_loss"], r["contrastive_loss"]) for r in records if r["kind"] == "train"]


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    train, val = synthetic_pairs(40), synthetic_pairs(12, seed=1)
    full = CubeTrainer(_resume_config(tmp_path, "full"), teacher_dim=DIM)
    full.fit(train, val, log=lambda *a: None)

    half = CubeTrainer(_resume_config(tmp_path, "half"), teacher_dim=DIM)
    half.fit(train, val, stop_after=4, log=lambda *a: None)
    assert half.global_step == 4
    torch.rand(100)  # what runs between a checkpoint and a resume (a teacher loading) draws from torch's RNG
    resumed = CubeTrainer.load(tmp_path / "half")
    assert resumed.global_step == 4 and resumed.data_position == half.data_position
    resumed.fit(train, val, log=lambda *a: None)

    assert _losses(read_metrics(tmp_path / "half" / "metrics.jsonl")) == \
        _losses(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    # The whole final checkpoint, RNG states included, is the uninterrupted run's bit for bit.
    (meta_full, tensors_full), (meta_half, tensors_half) = (read_checkpoint(tmp_path / d) for d in ("full", "half"))
    assert tensors_full.keys() == tensors_half.keys() and {"rng/torch", "rng/generator"} <= tensors_full.keys()
    for name, value in tensors_full.items():
        assert torch.equal(value, tensors_half[name]), name
    for meta in (meta_full, meta_half):
        del meta["path"], meta["config"]["out_dir"]
    assert meta_full == meta_half
    assert (tmp_path / "half" / "training.png").stat().st_size > 0
    val_records = [r for r in read_metrics(tmp_path / "half" / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in val_records] == [4, 8]


def test_training_and_checkpoints_leave_the_process_rng_alone(saved, tmp_path):
    torch.manual_seed(1)
    trainer = CubeTrainer(tiny_config(tmp_path, "model.fire_rate=0.5", "train.pool_size=16"), teacher_dim=DIM)
    torch.manual_seed(2)  # the trainer's own RNG state comes from config.seed, not from the process
    assert torch.equal(CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM).rng_state["torch"],
                       trainer.rng_state["torch"])
    data = synthetic_pairs(8)
    before = torch.get_rng_state()
    trainer.train_step(data.q, data.a)
    CubeTrainer.load(tmp_path / "ckpt")
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_directory_is_never_replaced_unasked(tmp_path):
    train = synthetic_pairs(16)
    cfg = tiny_config(tmp_path, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    CubeTrainer(cfg, teacher_dim=DIM).fit(train, log=lambda *a: None)
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [
        "step_00000003.json", "step_00000003.safetensors", "step_00000004.json", "step_00000004.safetensors"]
    before = {p: p.read_bytes() for p in [*ckdir.iterdir(), run / "metrics.jsonl", run / "config.yaml"]}
    with pytest.raises(RunDirectoryError, match=r"holds a run \(checkpoints up to step_00000004.json\): --resume"):
        CubeTrainer(tiny_config(tmp_path, "train.steps=2"), teacher_dim=DIM).fit(train, log=lambda *a: None)
    assert {p: p.read_bytes() for p in before} == before
    CubeTrainer(tiny_config(tmp_path, "train.steps=2"), teacher_dim=DIM).fit(train, overwrite=True,
                                                                              log=lambda *a: None)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_00000002.json", "step_00000002.safetensors"]
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirectoryError, match="is a file, not a directory"):
        CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM).prepare_run_dir(tmp_path / "file")


def test_resuming_with_another_config_or_data_is_refused_unless_forced(tmp_path):
    train = synthetic_pairs(16)
    CubeTrainer(tiny_config(tmp_path, "train.steps=4"), teacher_dim=DIM).fit(train, stop_after=2, log=lambda *a: None)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"differs in train.lr \(0.01 -> 0.02\), train.steps \(4 -> 6\)"):
        CubeTrainer.load(run, overrides=["train.steps=6", "train.lr=0.02"])
    with pytest.raises(CheckpointError, match=r"differs in model.channels \(8 -> 4\)"):
        CubeTrainer(tiny_config(tmp_path, "train.steps=4", "model.channels=4"), teacher_dim=DIM).resume(run)
    assert CubeTrainer.load(run, overrides=["device=cpu", "train.progress=true"]).global_step == 2  # no effect
    with pytest.warns(UserWarning, match=r"different config \(train.steps"):
        longer = CubeTrainer.load(run, overrides=["train.steps=6"], force=True)
    assert longer.global_step == 2 and longer.config.train.steps == 6

    other = synthetic_pairs(16, seed=5)
    with pytest.raises(CheckpointError, match=r"the train split\(s\) differ from those of the run"):
        CubeTrainer.load(run).fit(other, log=lambda *a: None)
    forced = CubeTrainer.load(run, force=True)
    forced.check_data({"train": other})
    assert forced.data_fingerprint["train"] != CubeTrainer.load(run).data_fingerprint["train"]


@pytest.fixture
def saved(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path), teacher_dim=DIM)
    data = synthetic_pairs(8)
    trainer.train_step(data.q, data.a)
    return trainer, trainer.save(tmp_path / "ckpt")


def test_checkpoint_round_trip(saved, tmp_path):
    trainer, path = saved
    assert path.name == "ckpt.json" and (tmp_path / "ckpt.safetensors").exists()
    loaded = CubeTrainer.load(tmp_path / "ckpt.safetensors")
    assert loaded.global_step == 1
    for p, q in zip(trainer.model.parameters(), loaded.model.parameters()):
        assert torch.equal(p, q)
    data = synthetic_pairs(8, seed=3)
    assert trainer.train_step(data.q, data.a) == loaded.train_step(data.q, data.a)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    st = tmp_path / "ckpt.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"is \d+ bytes, expected \d+ \(truncated"):
        CubeTrainer.load(tmp_path / "ckpt")


def test_corrupted_checkpoint_is_refused(saved, tmp_path):
    st = tmp_path / "ckpt.safetensors"
    raw = bytearray(st.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    st.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        CubeTrainer.load(tmp_path / "ckpt")


def test_truncated_checkpoint_json_is_refused(saved, tmp_path):
    js = tmp_path / "ckpt.json"
    js.write_text(js.read_text()[:200])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CubeTrainer.load(js)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        CubeTrainer.load(tmp_path / "nothing.json")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_unpickles(saved, tmp_path):
    """A pickle in place of the tensor file, with a JSON that vouches for it, is refused unread."""
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    st, js = tmp_path / "ckpt.safetensors", tmp_path / "ckpt.json"
    st.write_bytes(pickle.dumps({"model": payload}))
    meta = json.loads(js.read_text())
    import hashlib
    meta.update(tensors_bytes=st.stat().st_size, tensors_sha256=hashlib.sha256(st.read_bytes()).hexdigest())
    js.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read"):
        CubeTrainer.load(js)
    assert not marker.exists()


def test_checkpoint_of_another_model_is_refused(saved, tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, "model.channels=4"), teacher_dim=DIM)
    with pytest.raises(CheckpointError, match="does not fit this model"), \
            pytest.warns(UserWarning, match=r"different config \(model.channels \(8 -> 4\)\)"):
        trainer.resume(tmp_path / "ckpt", force=True)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, "train.checkpoint_every=2"), teacher_dim=DIM)
    train = synthetic_pairs(16)
    trainer.fit(train, stop_after=2, log=lambda *a: None)
    good = tmp_path / "run" / "checkpoints" / "step_00000002.json"
    before = good.read_bytes()
    with torch.no_grad():
        trainer.model.adapter_out.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3.*last good checkpoint is .*step_00000002"):
        trainer.fit(train, log=lambda *a: None)
    assert good.read_bytes() == before
    restored = CubeTrainer.load(good)
    assert restored.global_step == 2
    assert all(torch.isfinite(p).all() for p in restored.model.parameters())


def test_earlier_trainer_api_runs_after_an_import_change():
    config = EmergentTrainingConfig(teacher_embedding_dim=DIM, cube_dimensions=(4, 4, 3), spatial_propagation_depth=3,
                                    gmlp_config={"state_size": 8, "hidden_dim": 16, "neighbor_count": 6},
                                    loss_weights={"surface_reconstruction": 0.3, "internal_consistency": 0.3,
                                                  "dialogue_similarity": 0.4},
                                    batch_size=4, epochs=2, warmup_epochs=1, steps_per_epoch=5, mixed_precision=False)
    trainer = EmergentCubeTrainer(config, device="cpu")
    assert trainer.config.model.depth == 3 and trainer.config.train.steps == 10
    assert trainer.config.loss.surface == 0.3 and trainer.config.loss.dialogue == 0.4
    data = synthetic_pairs(4)
    outputs = trainer.forward(data.q)
    assert outputs["final_output"].shape == (4, DIM) and outputs["output_surface"].shape == (4, 16)
    metrics = trainer.train_step(data.q, data.a)
    assert {"total_loss", "surface_loss", "internal_loss", "dialogue_loss", "cosine_similarity", "lr"} <= set(metrics)
    assert trainer.training_step == 1
    assert trainer.get_system_info()["total_cells"] == 48


def test_earlier_config_with_an_unknown_teacher_asks_for_its_width():
    with pytest.raises(ValueError, match="teacher_embedding_dim"):
        EmergentCubeTrainer(EmergentTrainingConfig(teacher_model="my-private-model"))


@pytest.mark.parametrize("entry", [cli.train, cli.evaluate, cli.ask])
def test_cli_help(entry, capsys):
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_cli_reports_bad_config_and_missing_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert cli.train(["--config", str(bad)]) == 2
    assert "unknown config key 'train.stepz' (did you mean 'train.steps'?)" in capsys.readouterr().err
    assert cli.train(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.train(["--config", str(TINY), "--set", "data.source=jsonl",
                      "--set", f"data.path={tmp_path / 'none.jsonl'}"]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert cli.evaluate(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
