"""cube-grow: target shapes, IoU, the sample pool and its damage, the config, a tiny growth run
that learns, exact resume and the command line."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch

from cube_trainer import ConfigError
from cube_trainer.checkpoint import CheckpointError
from cube_trainer.growth import cli
from cube_trainer.growth.config import GrowConfig, config_from_dict, load_config
from cube_trainer.growth.pool import SamplePool, Shape, axis_normals, cut
from cube_trainer.growth.targets import BUILTIN, OPAQUE, TargetError, iou, load_target, occupied, seed_position
from cube_trainer.growth.trainer import GrowthTrainer

SIZE = (16, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny lattices: one thread is as fast, and far faster than two on a machine that is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
# A lattice and model small enough to train in seconds.
TINY = {"model": {"depth": 8, "height": 8, "width": 8, "channels": 8, "hidden": 16},
        "train": {"steps": 40, "batch_size": 4, "pool_size": 16, "rollout_min": 6, "rollout_max": 10,
                  "damaged": 1, "lr": 0.01, "checkpoint_every": 0, "progress": False},
        "eval": {"samples": 2, "pictures": False}}


def components(mask: np.ndarray) -> list[set]:
    """The 6-connected components of a boolean grid."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        part, todo = set(), deque([start])
        seen[start] = True
        while todo:
            p = todo.popleft()
            part.add(p)
            for axis in range(3):
                for step in (-1, 1):
                    q = list(p)
                    q[axis] += step
                    q = tuple(q)
                    if all(0 <= q[i] < mask.shape[i] for i in range(3)) and mask[q] and not seen[q]:
                        seen[q] = True
                        todo.append(q)
        found.append(part)
    return found


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("size", [SIZE, (13, 20, 17)])
def test_builtin_targets_are_rgba_grids_of_one_piece(name, size):
    t = load_target(name, size)
    assert t.shape == (*size, 4) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1
    assert set(t[..., 3].unique().tolist()) == {0.0, 1.0}
    # colour only where the shape is
    assert (t[..., :3][t[..., 3] == 0] == 0).all()
    cells = occupied(t)
    assert 0.02 * cells.numel() < cells.sum() < 0.25 * cells.numel()
    assert len(components(cells.numpy())) == 1
    assert torch.equal(t, load_target(name, size))  # deterministic
    assert cells[seed_position(t)]


def test_the_three_targets_have_different_topology():
    D, H, W = SIZE
    torus = occupied(load_target("torus", SIZE)).numpy()
    # a ring: nothing on the axis through its middle, and cutting it across one side leaves one piece
    assert not torus[:, H // 2 - 1:H // 2 + 1, W // 2 - 1:W // 2 + 1].any()
    half = torus.copy()
    half[:, :, W // 2 - 1:W // 2 + 1] = False
    assert len(components(half)) == 2
    one_cut = torus.copy()
    one_cut[:, :H // 2, W // 2 - 1:W // 2 + 1] = False
    assert len(components(one_cut)) == 1
    # a tree: one trunk below the fork, three branches above it
    tree = occupied(load_target("tree", SIZE)).numpy()
    assert len(components(tree[:D // 2])) == 1 and len(components(tree[3 * D // 4:])) == 3
    # a hollow shell with an opening: its cavity is reached from outside, and the shell is not solid
    shell = occupied(load_target("shell", SIZE)).numpy()
    assert not shell[D // 2 - 2, H // 2, W // 2]
    outside = components(~shell)
    assert len(outside) == 1 and (0, 0, 0) in outside[0] and (D // 2 - 2, H // 2, W // 2) in outside[0]


def test_npy_targets_load_and_bad_ones_are_refused(tmp_path):
    grid = np.zeros((*SIZE, 4), np.float32)
    grid[5:9, 5:9, 5:9] = (0.2, 0.4, 0.6, 1.0)
    path = tmp_path / "cube.npy"
    np.save(path, grid)
    t = load_target(str(path), SIZE)
    assert torch.equal(t, torch.from_numpy(grid))
    assert seed_position(t) == (7, 7, 7)  # the opaque cell nearest the centre
    with pytest.raises(TargetError, match=r"must be a \[D, H, W, 4\] = \[12, 16, 16, 4\]"):
        load_target(str(path), (12, 16, 16))
    np.save(tmp_path / "bad.npy", grid * 2)
    with pytest.raises(TargetError, match=r"in \[0, 1\]"):
        load_target(str(tmp_path / "bad.npy"), SIZE)
    np.save(tmp_path / "empty.npy", np.zeros_like(grid))
    with pytest.raises(TargetError, match="no opaque cell"):
        load_target(str(tmp_path / "empty.npy"), SIZE)
    with pytest.raises(TargetError, match="not found"):
        load_target(str(tmp_path / "missing.npy"), SIZE)
    with pytest.raises(TargetError, match="neither a built-in target"):
        load_target("sphere", SIZE)


def test_iou():
    target = torch.zeros(4, 4, 4, 4)
    target[:2, ..., 3] = 1.0                       # 32 cells
    state = torch.zeros(3, 4, 4, 4, 6)
    state[0, :2, ..., 3] = 0.9                     # the same cells: 1
    state[1, 2:, ..., 3] = 1.0                     # disjoint: 0
    state[2, :3, ..., 3] = 1.0                     # 32 of 48: 2/3
    state[2, 3, ..., 3] = OPAQUE                   # not above the threshold: not counted
    assert torch.allclose(iou(state, target), torch.tensor([1.0, 0.0, 2 / 3]))
    assert iou(torch.zeros(1, 4, 4, 4, 6), torch.zeros(4, 4, 4, 4)).item() == 0.0


def test_cut_removes_the_cells_on_one_side_of_the_plane():
    x = torch.ones(6, 4, 6, 8, 5)
    out = cut(x, torch.tensor([2.0, 3.0, 4.0]), axis_normals(6))
    for i, (axis, size) in enumerate(zip((0, 1, 2, 0, 1, 2), (4, 6, 8, 4, 6, 8))):
        kept = out[i].sum(-1).amax(dim=[a for a in range(3) if a != axis]) > 0
        low = torch.arange(size) < size // 2
        assert torch.equal(kept, low if i < 3 else ~low), i  # +axis then -axis halves removed
    assert torch.equal(cut(x[:1], torch.tensor([2.0, 3.0, 4.0]), axis_normals(1), torch.tensor([10.0])), x[:1])


def test_pool_reseeds_the_worst_and_cuts_the_best():
    target = load_target("torus", SIZE)
    shape = Shape(target)
    seed = torch.zeros(*SIZE, 6)
    pool = SamplePool(seed, 10)
    assert pool.states.shape == (10, *SIZE, 6) and (pool.states == 0).all()
    grown = torch.zeros(4, *SIZE, 6)
    grown[..., :4] = target
    g = torch.Generator().manual_seed(0)
    idx = pool.sample(4, g)
    assert len(set(idx.tolist())) == 4
    pool.put(idx, grown)
    assert torch.equal(pool.states[idx], grown)
    losses = torch.tensor([0.5, 0.1, 0.9, 0.2])
    start = pool.start(idx, losses, 2, shape, g)
    assert torch.equal(start[2], seed)                        # the worst starts again
    assert torch.equal(start[0], grown[0])                    # the middle one is untouched
    full = int(occupied(target).sum())
    for b in (1, 3):                                          # the two best lose part of the shape
        left = int(occupied(start[b]).sum())
        assert 0.2 * full < left < 0.8 * full
    assert torch.equal(pool.states[idx], grown)               # the pool itself is not changed


def test_config_is_checked():
    cfg = config_from_dict(TINY)
    assert isinstance(cfg, GrowConfig) and cfg.horizon == 10 and cfg.targets == ["torus", "tree", "shell"]
    for bad, match in [({"train": {"damaged": 4, "batch_size": 4}}, "train.damaged"),
                       ({"train": {"rollout_min": 10, "rollout_max": 5}}, "train.rollout_max"),
                       ({"model": {"channels": 4}}, "model.channels"),
                       ({"model": {"neighbourhood": "hex"}}, "model.neighbourhood"),
                       ({"targets": ["sphere"]}, r"targets\[0\]"),
                       ({"train": {"alpha_weight": 0}}, "train.alpha_weight"),
                       ({"train": {"ema": 1.0}}, "train.ema"),
                       ({"train": {"pool_sise": 8}}, "did you mean 'train.pool_size'")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(bad)


def test_per_target_settings_change_only_their_target(tmp_path):
    data = {**TINY, "per_target": {"tree": ["train.damaged=2", "model.hidden=12"]}}
    tree, torus = GrowthTrainer(config_from_dict(data), "tree"), GrowthTrainer(config_from_dict(data), "torus")
    assert (tree.config.train.damaged, tree.config.model.hidden, tree.config.per_target) == (2, 12, {})
    assert (torus.config.train.damaged, torus.config.model.hidden) == (1, 16)
    assert tree.lattice.cell.w_in.shape != torus.lattice.cell.w_in.shape
    for settings, match in [({"cube": ["train.damaged=2"]}, r"per_target.cube': is not a target"),
                            ({"tree": ["train.damaged=4"]}, r"per_target.tree: config key 'train.damaged'"),
                            ({"tree": ["seed=1"]}, "model.*, train.* and eval.* only"),
                            ({"tree": "train.damaged=2"}, "'per_target.tree' must be a list")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**TINY, "per_target": settings})
    config = tmp_path / "grow.yaml"
    config.write_text(json.dumps({**data, "train": {**TINY["train"], "steps": 1}, "per_target": {
        "torus": ["train.damaged=2"], "tree": ["train.rollout_max=8"]}}))
    assert cli.main(["--config", str(config), "--target", "tree", "--out-dir", str(tmp_path / "run")]) == 0
    assert load_config(tmp_path / "run" / "tree" / "config.yaml").train.rollout_max == 8


def tiny_trainer(target="torus", **sections):
    data = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        data[key].update(value)
    return GrowthTrainer(config_from_dict(data), target)


def test_the_loss_weights_alpha_by_alpha_weight():
    plain, weighted = tiny_trainer(), tiny_trainer(train={"alpha_weight": 3.0})
    x = torch.rand(2, 8, 8, 8, 8)
    err = (x[..., :4] - plain.target).square()
    colour, alpha = err[..., :3].sum(-1).flatten(1).sum(1), err[..., 3].flatten(1).sum(1)
    cells = 8 ** 3 * 4
    torch.testing.assert_close(plain.losses(x)[0], (colour + alpha) / cells)
    torch.testing.assert_close(weighted.losses(x)[0], (colour + 3 * alpha) / cells)
    torch.testing.assert_close(weighted.losses(x)[1], plain.losses(x)[1])


def test_the_loss_averages_the_rollouts_last_loss_steps_states():
    trainer = tiny_trainer(train={"loss_steps": 3})
    seen, losses = [], trainer.losses
    trainer.losses = lambda x: seen.append(x.detach().clone()) or losses(x)
    res = trainer.train_step()
    _, *last = seen  # the first call ranks the pool's samples before the rollout
    assert len(last) == 3 and not torch.equal(last[0], last[1]) and not torch.equal(last[1], last[2])
    assert any(torch.equal(state, last[-1][0]) for state in trainer.pool.states)  # the final state
    expected = torch.stack([losses(s)[0] for s in last]).mean()
    assert res["rgba_loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_a_tiny_growth_run_learns():
    # 6^3 and short rollouts: 100 steps take ~2 s of one core and grow a fifth to a third of the shape.
    trainer = tiny_trainer("shell", model={"depth": 6, "height": 6, "width": 6},
                           train={"damaged": 0, "rollout_min": 4, "rollout_max": 8})
    seed = trainer.seed_state(2)
    assert seed[(0, *trainer.seed_cell)].tolist() == [0, 0, 0] + [1] * 5 and seed.sum() == 2 * 5
    before = trainer.evaluate()
    losses = [trainer.train_step()["rgba_loss"] for _ in range(100)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    after = trainer.evaluate(frames=True)
    assert after.grown.mean() > 0.15 and after.grown.mean() > 4 * before.grown.mean()  # from the seed cell alone
    assert after.grown.shape == (2,) and len(after.frames["grow"]) == 8 and len(after.frames["regrow"]) == 8


def test_evaluation_grows_with_the_moving_average_of_the_weights():
    trainer = tiny_trainer(train={"ema": 0.5})
    weights = []
    for _ in range(3):
        trainer.train_step()
        weights.append([p.detach().clone() for p in trainer.lattice.parameters()])
    for e, w1, w2, w3 in zip(trainer.eval_lattice.parameters(), *weights):
        torch.testing.assert_close(e, 0.25 * w1 + 0.25 * w2 + 0.5 * w3)  # the first update copies
    averaged, last = tiny_trainer(), tiny_trainer()
    averaged.lattice.load_state_dict(trainer.eval_lattice.state_dict())
    last.lattice.load_state_dict(trainer.lattice.state_dict())
    grown = trainer.evaluate(frames=True).frames["grow"][-1]
    assert torch.equal(grown, averaged.evaluate(frames=True).frames["grow"][-1])
    assert not torch.equal(grown, last.evaluate(frames=True).frames["grow"][-1])


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    a = tiny_trainer(train={"steps": 5, "ema": 0.8})
    a.fit(tmp_path / "a")
    b = tiny_trainer(train={"steps": 5, "ema": 0.8, "checkpoint_every": 3})
    b.fit(tmp_path / "b", stop_after=3)
    c = tiny_trainer(train={"steps": 5, "ema": 0.8}).resume(tmp_path / "b" / "checkpoints")
    assert c.global_step == 3
    c.fit(tmp_path / "b")
    for p, q in zip([*a.lattice.parameters(), *a.eval_lattice.parameters()],
                    [*c.lattice.parameters(), *c.eval_lattice.parameters()]):
        assert torch.equal(p, q)
    assert torch.equal(a.pool.states, c.pool.states)
    loaded = GrowthTrainer.load(tmp_path / "b" / "checkpoints")
    assert loaded.global_step == 5 and torch.equal(loaded.target, a.target)
    with pytest.raises(CheckpointError, match="grows 'torus', not 'tree'"):
        tiny_trainer("tree").resume(tmp_path / "b" / "checkpoints")
    smaller_pool = tiny_trainer(train={"pool_size": 8, "steps": 5, "ema": 0.8})
    with pytest.raises(CheckpointError, match="differs in train.pool_size"):
        smaller_pool.resume(tmp_path / "b" / "checkpoints")
    with pytest.raises(CheckpointError, match="its pool is"), pytest.warns(UserWarning, match="train.pool_size"):
        smaller_pool.resume(tmp_path / "b" / "checkpoints", force=True)
    tiny_trainer(train={"steps": 5, "ema": 0.8, "log_every": 2}).resume(tmp_path / "b" / "checkpoints")  # logging is free


def test_cli_grows_draws_and_reports(tmp_path, capsys):
    config = tmp_path / "grow.yaml"
    config.write_text(json.dumps({**TINY, "train": {**TINY["train"], "steps": 4},
                                  "eval": {"samples": 2, "horizon": 4, "pictures": True}}))
    run = tmp_path / "run"
    assert cli.main(["--config", str(config), "--target", "tree", "--out-dir", str(run), "--stop-after", "2"]) == 0
    assert "stopped at step 2/4" in capsys.readouterr().out
    assert cli.main(["--resume", str(run), "--target", "tree"]) == 0
    out = capsys.readouterr().out
    assert "tree: resumed at step 2" in out and "| tree |" in out and "load average" in out
    for name in ("growth.png", "growth.gif", "training.png", "result.json", "metrics.jsonl"):
        assert (run / "tree" / name).stat().st_size > 0, name
    result = json.loads((run / "tree" / "result.json").read_text())
    assert result["steps"] == 4 and 0 <= result["iou_regrown"] <= 1
    assert (run / "results.md").read_text().startswith("Growth on a 8x8x8 lattice")
    assert cli.main(["--config", str(config), "--target", "cube"]) == 2
    assert "--target 'cube' is not a target of the config" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no cube-grow run there" in capsys.readouterr().err


def test_cli_never_replaces_a_run_unasked(tmp_path, capsys):
    config = tmp_path / "grow.yaml"
    config.write_text(json.dumps({**TINY, "train": {**TINY["train"], "steps": 2}}))
    run = tmp_path / "run"
    args = ["--config", str(config), "--target", "torus", "--out-dir", str(run)]
    assert cli.main(args) == 0
    capsys.readouterr()
    first = (run / "torus" / "result.json").read_text()
    assert cli.main(args) == 2                                  # a second start is refused ...
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite replaces it" in err and f"--resume {run}" in err
    assert (run / "torus" / "result.json").read_text() == first  # ... and leaves the run alone
    assert cli.main(args + ["--overwrite"]) == 0
    assert "replacing the earlier run" in capsys.readouterr().out
    # resuming with a config that changes training is refused unless forced
    assert cli.main(["--resume", str(run), "--set", "train.lr=0.5"]) == 2
    assert "differs in train.lr" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="train.lr"):
        GrowthTrainer(load_config(run / "config.yaml", ["train.lr=0.5"]), "torus").resume(run / "torus", force=True)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 3, 3, 4), np.float32))
    assert cli.main(["--config", str(config), "--set", f"targets=[{bad}]", "--out-dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith("cube-grow: error: ")


def test_shipped_configs_load():
    cfg = load_config("configs/grow.yaml")
    assert cfg.model.depth * cfg.model.height * cfg.model.width >= 16 ** 3
    for cfg in (cfg, load_config("grow_small")):  # a shipped config by name
        assert cfg.model.neighbourhood == "moore" and cfg.model.fire_rate == 0.5
        assert cfg.targets == list(BUILTIN)
