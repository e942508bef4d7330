"""Where one lattice step's time goes on the CPU: each op of the per-op fused step
(``cube_kernels.step.fused_step``), forward and backward, timed alone at the step's shapes, and
the same step as one call of the fused cell (``cube::rollout`` with T=1, csrc/cpu/cell.cpp).

    python -m bench.op_profile                      # the default config and the trainer model's
    python -m bench.op_profile --channels 64 --hidden 128 --batch 8

One thread, and each op's time is the CPU time of this thread (``time.thread_time``, the best of
``--repeats``): other processes on the machine do not enter it (sharing the caches and the
memory bandwidth still does), so the shares are meaningful on a busy machine, where wall-clock
profiles are not. The backward of a step recomputes its forward (SPEC's memory rule), which the
total counts.
"""
from __future__ import annotations

import argparse
import time

import torch

from .config import Config, make_inputs


def cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def step_ops(cfg: Config):
    """The forward and backward ops of one step on ``cfg``'s inputs: two dicts name -> thunk."""
    import cube_kernels  # noqa: F401  (registers torch.ops.cube)
    from cube_kernels.spec import LN_EPS
    ops, aten = torch.ops.cube, torch.ops.aten
    p, x, grad = make_inputs(cfg)
    p = {n: t.detach() for n, t in p.items()}
    C, F, stencil = cfg.channels, cfg.hidden, (cfg.neighbourhood, cfg.boundary)
    mask = (cfg.seed, 0, cfg.fire_rate)
    x2 = x.reshape(-1, C)
    y, mean, rstd = torch.native_layer_norm(x2, [C], p["ln1_weight"], p["ln1_bias"], LN_EPS)
    proj = y @ p["w_in"]
    u, vn = (t.view(*x.shape[:-1], F) for t in ops.gate_input(proj, p["b_in"], p["ln2_weight"], p["ln2_bias"]))
    h = ops.gather_gate(u, vn, p["w_sp"], p["b_sp"], *stencil)
    dh = ops.update_backward(grad, h, p["w_out"], *mask)[0]
    du, dvn = ops.gather_gate_backward(dh, u, vn, p["w_sp"], p["b_sp"], *stencil)[:2]
    dz = ops.gate_input_backward(du.view(-1, F), dvn.view(-1, F), proj, p["b_in"], p["ln2_weight"],
                                 p["ln2_bias"])[0]
    dy = dz.mm(p["w_in"].t())
    forward = {
        "layer norm (ATen)": lambda: torch.native_layer_norm(x2, [C], p["ln1_weight"], p["ln1_bias"], LN_EPS),
        "in-projection GEMM": lambda: y @ p["w_in"],
        "gate_input (bias, GELU, gate LayerNorm)": lambda: ops.gate_input(proj, p["b_in"], p["ln2_weight"],
                                                                         p["ln2_bias"]),
        "gather_gate": lambda: ops.gather_gate(u, vn, p["w_sp"], p["b_sp"], *stencil),
        "update (out-projection GEMM + epilogue)": lambda: ops.update(x, h, p["w_out"], p["b_out"], *mask),
    }
    backward = {
        "update_backward (dh, dw_out GEMMs)": lambda: ops.update_backward(grad, h, p["w_out"], *mask),
        "gather_gate_backward": lambda: ops.gather_gate_backward(dh, u, vn, p["w_sp"], p["b_sp"], *stencil),
        "gate_input_backward": lambda: ops.gate_input_backward(du.view(-1, F), dvn.view(-1, F), proj, p["b_in"],
                                                               p["ln2_weight"], p["ln2_bias"]),
        "dw_in GEMM": lambda: y.t().mm(dz),
        "dy GEMM": lambda: dz.mm(p["w_in"].t()),
        "layer norm backward (ATen)": lambda: aten.native_layer_norm_backward(
            dy, x2, [C], mean, rstd, p["ln1_weight"], p["ln1_bias"], [True, True, True]),
    }
    return forward, backward


GEMMS = ("in-projection GEMM", "update (out-projection GEMM + epilogue)", "update_backward (dh, dw_out GEMMs)",
         "dw_in GEMM", "dy GEMM")


def fused_cell_ms(cfg: Config, repeats: int) -> tuple[float, float]:
    """CPU ms of one step through the fused cell (``cube::rollout``, T=1) and of its backward."""
    import cube_kernels  # noqa: F401  (registers torch.ops.cube)
    from cube_kernels.spec import ALIVE_THRESHOLD, PARAM_NAMES
    p, x, grad = make_inputs(cfg)
    params = [p[n].detach() for n in PARAM_NAMES]
    args = (cfg.seed, cfg.neighbourhood, cfg.boundary, cfg.fire_rate, cfg.alive_channel, ALIVE_THRESHOLD)
    outs, keep = torch.ops.cube.rollout(x, None, *params, 1, *args, True)
    return (cpu_ms(lambda: torch.ops.cube.rollout(x, None, *params, 1, *args, True), repeats),
            cpu_ms(lambda: torch.ops.cube.rollout_backward(grad[None], x, outs, keep, None, *params, *args),
                   repeats))


def profile(cfg: Config, repeats: int) -> str:
    forward, backward = step_ops(cfg)
    fwd = {k: cpu_ms(f, repeats) for k, f in forward.items()}
    bwd = {k: cpu_ms(f, repeats) for k, f in backward.items()}
    t_fwd = sum(fwd.values())
    t_bwd = t_fwd + sum(bwd.values())  # the backward recomputes the forward
    total = t_fwd + t_bwd
    lines = [f"one step, {cfg.lattice} C={cfg.channels} F={cfg.hidden} {cfg.neighbourhood} batch {cfg.batch} "
             f"{cfg.dtype}: 1 thread, CPU ms (best of {repeats}), share of forward+backward",
             "| phase | op | ms | share |", "|---|---|---|---|"]
    for phase, times in (("forward", fwd), ("backward", bwd)):
        lines += [f"| {phase} | {k} | {v:.3f} | {v / total:.1%} |" for k, v in times.items()]
    lines.append(f"| backward | the forward, recomputed | {t_fwd:.3f} | {t_fwd / total:.1%} |")
    gemm = sum(t for k, t in {**fwd, **bwd}.items() if k in GEMMS)
    gemm += sum(t for k, t in fwd.items() if k in GEMMS)  # recomputed
    lines.append(f"\nforward {t_fwd:.3f} ms, backward {t_bwd:.3f} ms ({t_bwd / t_fwd:.2f}x forward); "
                 f"ops holding a GEMM {gemm / total:.0%} of forward+backward")
    c_fwd, c_bwd = fused_cell_ms(cfg, repeats)
    lines.append(f"fused cell (cube::rollout, one step): forward {c_fwd:.3f} ms, backward {c_bwd:.3f} ms "
                 f"({c_bwd / c_fwd:.2f}x forward); forward+backward {(c_fwd + c_bwd) / total:.2f}x the ops above")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.op_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--neighbourhood", default="von_neumann", choices=("von_neumann", "moore"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    given = {k: v for k, v in (("channels", args.channels), ("hidden", args.hidden), ("batch", args.batch))
             if v is not None}
    configs = [Config(neighbourhood=args.neighbourhood, **given)] if given else [
        Config(neighbourhood=args.neighbourhood),  # the benchmark's default
        Config(channels=16, hidden=32, batch=1, neighbourhood=args.neighbourhood)]  # one question, trainer model
    for cfg in configs:
        print(profile(cfg, args.repeats), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
