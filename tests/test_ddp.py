"""DDP with two gloo processes on the CPU trains exactly what one process does with the same
global batch (gradient accumulation and the sample pool included)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cube_trainer import CubeTrainer, load_config
from test_trainer import DIM, TINY, synthetic_pairs

STEPS = 3
OVERRIDES = ["train.batch_size=8", "train.grad_accum=2", "train.pool_size=16", "model.fire_rate=1.0",
             "train.progress=false"]


def _train(trainer: CubeTrainer) -> list[float]:
    data = synthetic_pairs(8 * STEPS)
    return [trainer.train_step(data.q[8 * s:8 * s + 8], data.a[8 * s:8 * s + 8])["total_loss"] for s in range(STEPS)]


def _worker(rank: int, world: int, init_file: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = CubeTrainer(load_config(TINY, OVERRIDES), teacher_dim=DIM)
        assert trainer.world == world
        losses = _train(trainer)
        if rank == 0:
            tensors = dict(trainer.model.state_dict(), losses=torch.tensor(losses), pool=trainer.pool_states)
            save_file({k: v.contiguous() for k, v in tensors.items()}, out)
        trainer.release_process_group()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    ddp = load_file(out)
    single = CubeTrainer(load_config(TINY, OVERRIDES), teacher_dim=DIM)
    losses = _train(single)
    torch.testing.assert_close(ddp.pop("losses"), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ddp.pop("pool"), single.pool_states, atol=1e-5, rtol=1e-5)
    state = single.model.state_dict()
    assert set(ddp) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # The run moved the parameters, so agreeing is not trivial.
    assert not torch.allclose(state["adapter_in.weight"], CubeTrainer(load_config(TINY, OVERRIDES),
                                                                        teacher_dim=DIM).model.adapter_in.weight)
