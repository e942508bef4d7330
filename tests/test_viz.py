"""cube-viz: the question's signal through the lattice, the PCA of the answers, and the command
on a checkpoint of the trainer (the real teacher: deselect with ``-k "not real_teacher"``)."""
from __future__ import annotations

import torch

from cube_trainer import CubeTrainer, cli, viz
from test_trainer import DIM, tiny_config
from test_trainer_teacher import capitals_jsonl


def test_signal_starts_at_the_front_face_and_moves_one_slice_per_step(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, "model.depth=4", "model.steps=4"), teacher_dim=DIM)
    diff = viz.signal(trainer, torch.randn(1, DIM))
    D = trainer.config.model.depth
    assert diff.shape == (4, D, 4, 4) and (diff >= 0).all()
    for t in range(4):
        reached = diff[t].flatten(1).amax(1) > 0
        # von Neumann, one step: after step t+1 the surface's signal is in slices 0..t+1 only
        assert reached[:min(D, t + 2)].all() and not reached[t + 2:].any(), (t, reached)
    viz.plot_signal(diff, "a question?", tmp_path / "signal.png")
    assert (tmp_path / "signal.png").stat().st_size > 0


def test_pca_keeps_the_two_main_directions(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g) * torch.tensor([5.0, 2.0]) @ torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:2]
    xy = viz.pca_2d(x)
    assert xy.shape == (50, 2)
    torch.testing.assert_close(xy.norm(dim=1), (x - x.mean(0)).norm(dim=1), rtol=1e-4, atol=1e-4)
    viz.plot_answers(torch.randn(10, 8), torch.randn(10, 8), torch.randn(8), "test", "q?", tmp_path / "pca.png")
    assert (tmp_path / "pca.png").stat().st_size > 0


def test_real_teacher_viz_on_a_trained_checkpoint(tmp_path, capsys):
    data = capitals_jsonl(tmp_path)
    run = tmp_path / "run"
    assert cli.train(["--config", "configs/tiny.yaml", "--set", "data.source=jsonl", "--set", f"data.path={data}",
                      "--set", f"teacher.cache_dir={tmp_path / 'cache'}", "--set", "data.val_fraction=0.2",
                      "--set", "data.test_fraction=0.2", "--set", "train.steps=4", "--out-dir", str(run),
                      "--no-eval"]) == 0
    capsys.readouterr()
    assert viz.main(["--checkpoint", str(run), "What is the capital of Peru?"]) == 0
    out = capsys.readouterr().out
    assert "it reaches the back face at step" in out
    for name in ("signal.png", "answers_pca.png"):
        assert (run / "viz" / name).stat().st_size > 0
    assert viz.main(["--checkpoint", str(tmp_path / "nowhere"), "q"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
