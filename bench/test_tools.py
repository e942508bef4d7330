"""Tests of the benchmark's own machinery: FLOP count, the PyG and JAX implementations against
the reference, the correctness check, the memory probe and the report/README writer.
``pytest bench --benchmark-skip`` runs these (and skips the timings)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from . import flops, machine, memory, report, worker
from .config import Config

TINY = dict(depth=2, height=3, width=5, batch=2, steps=2)
CASES = [("von_neumann", "zero", 0.5), ("von_neumann", "periodic", 1.0),
         ("moore", "zero", 1.0), ("moore", "periodic", 0.5)]


def test_flops_of_the_default_cell():
    one = flops.per_cell_step(64, 128, 7)
    # 2*64*256 in-projection + 2*128*64 out-projection + 2*7*128 gating
    assert one.forward == 32768 + 16384 + 1792
    assert one.backward == 2 * one.forward
    roll = flops.rollout(64, 128, 7, cells=2475, batch=8, steps=12)
    assert roll.forward_backward == 3 * one.forward * 2475 * 8 * 12


def test_lattice_graph_edges():
    pytest.importorskip("torch_geometric")
    from .pyg_impl import lattice_graph
    edge_index, edge_type = lattice_graph(2, 3, 5, "von_neumann", "zero")
    # every cell's self edge, plus both directions of each adjacent pair along d, h and w
    pairs = 1 * 3 * 5 + 2 * 2 * 5 + 2 * 3 * 4
    assert edge_index.shape == (2, 30 + 2 * pairs) and edge_type.shape == (30 + 2 * pairs,)
    edge_index, _ = lattice_graph(2, 3, 5, "moore", "periodic")
    assert edge_index.shape == (2, 27 * 30)
    assert torch.bincount(edge_index[1], minlength=30).eq(27).all()


def _check(impl: str, neighbourhood: str, boundary: str, fire_rate: float) -> dict:
    cfg = dict(TINY, neighbourhood=neighbourhood, boundary=boundary, fire_rate=fire_rate)
    row = worker.run_rollout({"impl": impl, "config": cfg, "warmup": 0, "repeats": 1, "check": True})
    assert row["status"] == "ok", row.get("reason")
    return row["check"]


@pytest.mark.parametrize("neighbourhood,boundary,fire_rate", CASES)
def test_pyg_matches_reference(neighbourhood, boundary, fire_rate):
    pytest.importorskip("torch_geometric")
    c = _check("pyg", neighbourhood, boundary, fire_rate)
    assert c["ok"] and c["output"] < 1e-5 and c["grads"] < 1e-5, c


@pytest.mark.parametrize("neighbourhood,boundary,fire_rate", CASES[::3])
def test_jax_matches_reference(neighbourhood, boundary, fire_rate):
    pytest.importorskip("jax")
    c = _check("jax", neighbourhood, boundary, fire_rate)
    assert c["ok"] and c["output"] < 1e-5 and c["grads"] < 1e-5, c


class _Perturbed:
    """A runner whose output or one gradient is slightly wrong."""

    def __init__(self, cfg, which):
        out, grads = worker.reference_result(cfg)
        out, grads = out.float(), {n: g.float() for n, g in grads.items()}
        if which == "output":
            out[0, 0, 0, 0, 0] += 1e-2 * out.abs().max()
        else:
            grads[which] = grads[which] * 1.01
        self._result = out, grads

    def result(self):
        return self._result


@pytest.mark.parametrize("which", ["output", "w_sp", "ln1_bias"])
def test_check_rejects_a_wrong_result(which):
    cfg = Config(**TINY, fire_rate=0.5)
    c = worker.check(_Perturbed(cfg, which), cfg)
    assert not c["ok"]
    if which != "output":
        assert c["worst_grad"] == which


def test_cpu_peak_sees_an_allocation():
    if not memory.can_reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    n = 64 * 2**20

    def call():
        t = torch.ones(n // 4)  # written, so resident
        assert t[-1].item() == 1.0

    peak, method = memory.cpu_peak(call)
    assert 0.9 * n <= peak <= 1.5 * n
    assert method == memory.CPU_METHOD


@pytest.mark.parametrize("impl", ["cpu", "cpu_rollout", "eager", "pyg"])
def test_the_growth_workload_is_alive_masked_or_skipped(impl):
    """The growth workload's alive masking reaches the implementations (checked against the float64
    reference), and those without it say so instead of timing another computation."""
    cfg = Config(**{**TINY, "depth": 5}, channels=8, hidden=8, neighbourhood="moore", fire_rate=0.5, alive_channel=3)
    row = worker.run_rollout({"impl": impl, "config": cfg.to_dict(), "warmup": 0, "repeats": 1, "check": True})
    if impl == "pyg":
        assert row["status"] == "skipped" and "alive masking" in row["reason"]
    else:
        assert row["status"] == "ok" and row["check"]["ok"], row


@pytest.fixture(scope="module")
def tiny_results():
    """A real (tiny) run of eager and eager_ckpt, plus a GEMM row, as the runner assembles it."""
    cfg = Config(**TINY)
    rows = [worker.run_rollout({"impl": k, "config": cfg.to_dict(), "warmup": 0, "repeats": 2, "check": True})
            for k in ("eager", "eager_ckpt")]
    scaling = [worker.run_rollout({"impl": "eager", "config": cfg.with_(batch=b).to_dict(), "warmup": 0,
                                   "repeats": 2}) for b in (1, 2)]
    gemm = worker.run_gemm({"gemm": {"dtypes": ["float32"], "sizes": [128], "repeats": 2}})
    from .machine import describe
    return {"schema": 1, "command": "python -m bench --test", "mode": "full", "machine": describe(),
            "config": cfg.to_dict(), "warmup": 0, "repeats": 2, "gemm": [gemm], "comparison": rows,
            "scaling": scaling, "large": []}


def test_report_files_and_readme_section(tiny_results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{report.README_START}\nold text\n{report.README_END}\nafter\n")
    assert report.write_all(tiny_results, str(tmp_path / "results"), str(readme))
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "old text" not in text and "python -m bench --test" in text and "PyTorch eager reference" in text
    for name in ("results.json", "results.csv", "results.md", "scaling.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    eager, ckpt = saved["comparison"]
    assert eager["vs"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert ckpt["vs"]["memory_vs_eager"] == pytest.approx(ckpt["peak_memory_bytes"] / eager["peak_memory_bytes"])
    assert saved["best_batch"]["eager"]["batch"] in (1, 2)
    # ours (cpu) was not run, so no target can be claimed
    assert saved["targets"]["checked"] == [] and "did not run" in saved["targets"]["note"]


def test_readme_without_markers_fails(tiny_results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert not report.update_readme(report.finalize(tiny_results), str(readme))
    assert readme.read_text() == "# no markers\n"
    results = tmp_path / "results.json"
    results.write_text(json.dumps(tiny_results))
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 1


def test_targets_are_evaluated_for_ours():
    def row(impl, t, mem, ours=False):
        return {"impl": impl, "label": impl, "ours": ours, "device": "cpu", "status": "ok", "tokens": 7,
                "config": Config().to_dict(), "peak_memory_bytes": mem, "check": {"ok": True},
                "time": {p: {"median": t, "q1": t, "q3": t} for p in report.PHASES}}
    results = {"gemm": [{"status": "ok", "device": "cpu", "dtypes": {"float32": {"peak_flops": 1e11}}}],
               "comparison": [row("cpu_rollout", 1.0, 70, ours=True), row("cpu", 2.0, 100, ours=True),
                              row("eager", 4.0, 500), row("compile", 1.4, 300)]}
    targets = report.finalize(results)["targets"]
    assert targets["implementation"] == "cpu_rollout"  # the rollout op, what CubeLattice runs
    t = {c["target"]: c for c in targets["checked"]}
    assert t["speedup_vs_eager"]["pass"] and t["speedup_vs_eager"]["value"] == pytest.approx(4.0)
    assert not t["speedup_vs_compile"]["pass"]
    assert t["memory_vs_eager"]["pass"] and t["memory_vs_eager"]["value"] == pytest.approx(0.14)
    assert t["backward_vs_forward"]["pass"] and t["backward_vs_forward"]["value"] == pytest.approx(1.0)
    work = flops.rollout(64, 128, 7, 2475, 8, 12).forward_backward
    assert t["fp32_gemm_fraction"]["value"] == pytest.approx(work / 1e11)
    assert not targets["all_pass"]


def test_size_targets_compare_the_cost_per_cell_step_with_the_default_configs():
    def row(cfg, t):
        return {"impl": "cpu_rollout", "label": "rollout op", "ours": True, "device": "cpu", "status": "ok",
                "tokens": 7, "config": cfg.to_dict(), "peak_memory_bytes": 1,
                "time": {p: {"median": t, "q1": t, "q3": t} for p in report.PHASES}}
    base, b32, big = report.size_configs(Config())
    assert (b32.batch, b32.lattice, big.batch, big.lattice) == (32, "11x15x15", 1, "48x48x48")
    cost = lambda c, ratio: ratio * c.cell_steps()  # noqa: E731  (1 s per cell-step, times ratio)
    results = {"gemm": [], "comparison": [{**row(base, 1.0), "check": {"ok": True}}],
               "sizes": [row(base, cost(base, 1.0)), row(b32, cost(b32, 1.1)), row(big, cost(big, 1.3))]}
    targets = report.finalize(results)["targets"]
    assert targets["correct"]  # the comparison's row, not a size row (those are not checked)
    t = {c["target"]: c for c in targets["checked"]}
    assert t["cost_at_batch_32"]["value"] == pytest.approx(1.1) and t["cost_at_batch_32"]["pass"]
    assert t["cost_on_48x48x48"]["value"] == pytest.approx(1.3) and not t["cost_on_48x48x48"]["pass"]
    results["sizes"][2] = {**results["sizes"][2], "status": "error", "reason": "timed out"}
    t = {c["target"]: c for c in report.finalize(results)["targets"]["checked"]}
    assert t["cost_on_48x48x48"]["value"] is None and t["cost_on_48x48x48"]["pass"] is None
    assert "48x48x48, batch 1 | error: timed out" in report.sizes_table(results["sizes"])


def test_bf16_targets_compare_ours_with_our_fp32_and_compiles_bf16():
    def row(impl, dtype, t, grads=None):
        return {"impl": impl, "label": impl, "ours": impl == "cpu_rollout", "device": "cpu", "status": "ok",
                "tokens": 7, "config": Config(dtype=dtype).to_dict(), "peak_memory_bytes": 1,
                **({"check": {"ok": True, "output": 1e-3, "grads": grads}} if grads else {}),
                "time": {p: {"median": t, "q1": t, "q3": t} for p in report.PHASES}}
    results = {"gemm": [], "machine": {"isa": ["avx2", "avx512_bf16"]},
               "comparison": [{**row("cpu_rollout", "float32", 3.0), "check": {"ok": True}}],
               "bf16": [row("cpu_rollout", "float32", 3.0), row("cpu_rollout", "bfloat16", 2.0, grads=6e-3),
                        row("compile", "bfloat16", 4.0, grads=1.2e-2)]}
    t = {c["target"]: c for c in report.finalize(results)["targets"]["checked"]}
    assert t["bf16_vs_fp32"]["value"] == pytest.approx(1.5) and t["bf16_vs_fp32"]["pass"] is False
    assert t["bf16_grads_vs_compile"]["value"] == pytest.approx(0.5) and t["bf16_grads_vs_compile"]["pass"]
    # without native bf16 GEMM the speed target does not apply; the error target still does
    results["machine"]["isa"] = ["avx2"]
    t = {c["target"]: c for c in report.finalize(results)["targets"]["checked"]}
    assert t["bf16_vs_fp32"]["pass"] is None and "no such GEMM here" in t["bf16_vs_fp32"]["text"]
    assert t["bf16_grads_vs_compile"]["pass"]
    table = report.bf16_table(results["bf16"])
    assert "| bfloat16 | 2000 [2000-2000] |" in table and "6.0e-03" in table


def test_interleaved_workers_return_rows_in_job_order():
    from .run import run_interleaved
    cfg = Config(**TINY).to_dict()
    jobs = [{"impl": k, "config": cfg, "warmup": 0, "repeats": 2, "check": k == "eager"}
            for k in ("cuda" if not torch.cuda.is_available() else "eager_ckpt", "cpu_rollout", "eager")]
    seen = []
    rows = run_interleaved(jobs, repeats=2, timeout=300, on_row=lambda i, row: seen.append(i))
    assert sorted(seen) == [0, 1, 2]
    if not torch.cuda.is_available():
        assert rows[0]["status"] == "skipped" and "CUDA" in rows[0]["reason"]
    # each row under its own name: the rollout op's backend is "cpu", its row is not the per-step one's
    assert rows[1]["status"] == "ok" and rows[1]["impl"] == "cpu_rollout"
    assert rows[2]["status"] == "ok" and rows[2]["impl"] == "eager" and rows[2]["check"]["ok"]
    assert len(rows[2]["time"]["forward_backward"]["all"]) == 2


def test_a_busy_machine_marks_the_run_as_measured_under_load(monkeypatch):
    loads = iter([3.0, 2.5, 0.4])
    monkeypatch.setattr(machine, "load_average", lambda: next(loads))
    monkeypatch.setattr(machine.time, "sleep", lambda s: None)
    quiet = machine.wait_for_quiet(max_wait_s=60, cores=2, poll_s=0)
    assert quiet["quiet"] and quiet["load_first"] == 3.0 and quiet["load"] == 0.4
    assert not machine.under_load(quiet, others=0.1)
    assert machine.under_load(quiet, others=0.6)  # something else joined
    monkeypatch.setattr(machine, "load_average", lambda: 3.0)
    busy = machine.wait_for_quiet(max_wait_s=0, cores=2)
    assert not busy["quiet"] and machine.under_load(busy, others=0.0)


def test_other_processes_cpu_time_is_told_apart_from_the_benchmarks_own():
    """This process's work is its own; a process it has not reaped yet is another's."""
    start = machine.cpu_seconds()
    t0 = time.process_time()  # CPU time, not wall time: on a busy machine this spin gets less than a core
    while time.process_time() - t0 < 0.5:
        pass
    end = machine.cpu_seconds()
    assert end["own"] - start["own"] > 0.4 and end["machine"] - start["machine"] > 0.4
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass"
    other = subprocess.Popen([sys.executable, "-c", spin])
    try:
        start = machine.cpu_seconds()
        time.sleep(1.0)  # sleeping costs no CPU; the spinning child is not reaped yet
        assert machine.other_cores(start, machine.cpu_seconds()) > 0.5
    finally:
        other.wait()
    results = {"command": "python -m bench", "config": Config().to_dict(), "repeats": 1, "warmup": 0,
               "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch_cpu_capability": "AVX2",
                           "memory_bytes": 0, "versions": {"torch": "2"}, "python": "3", "date": "d"},
               "comparison": [], "under_load": True}
    assert report.markdown(report.finalize(results)).startswith("**Measured under load**")
