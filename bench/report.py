"""Derived numbers, tables, files and the README section, from a run's results.

    python -m bench.report [--results bench/results/results.json] [--readme README.md]

rewrites ``results.md``, ``results.csv`` and ``scaling.png`` next to the JSON and the README's
performance section between ``<!-- bench:start -->`` and ``<!-- bench:end -->``; without the
markers it says so and exits non-zero.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from cube_kernels.neighbourhood import num_tokens

from . import flops
from .config import Config
from .machine import ROOT, summary_line

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
SECTIONS = ("comparison", "growth", "sizes", "bf16", "scaling", "large", "trainer")
PHASES = ("forward", "backward", "forward_backward")
# Issue 10's targets for ours vs the baselines: forward+backward of the T=12 rollout, batch 8.
TARGETS = {
    "speedup_vs_eager": (">=", 4.0, "fwd+bwd at least 4x faster than eager"),
    "speedup_vs_compile": (">=", 3.0, "fwd+bwd at least 3x faster than torch.compile"),
    "memory_vs_eager": ("<=", 0.15, "peak memory at most 0.15 of eager's"),
    "fp32_gemm_fraction": (">=", 0.45, "at least 45% of the measured fp32 GEMM FLOP/s"),
    "backward_vs_forward": ("<=", 2.0, "backward at most 2x forward"),
}
# Ours in the targets: the rollout op (what CubeLattice runs on the CPU), else the per-step path.
OURS = ("cpu_rollout", "cpu")
# Cost per cell-step of ours (forward+backward) as the lattice grows, against the comparison's
# config, in the same interleaved run ("sizes"): target name -> (batch, lattice D x H x W or None
# for the comparison's), at most SIZE_BOUND times the comparison config's cost.
SIZES = {"cost_at_batch_32": (32, None), "cost_on_48x48x48": (1, (48, 48, 48))}
SIZE_BOUND = 1.15
# Ours in bf16 against ours in fp32 and torch.compile in bf16, on the comparison's config in a
# run of their own, repeats interleaved ("bf16"): the speed target holds on a CPU with native
# bf16 GEMM only (the machine's ISA flags), the error target everywhere.
BF16_TARGETS = {
    "bf16_vs_fp32": (">=", 3.0, "bf16 fwd+bwd at least 3x faster than our fp32 (a CPU with native bf16 GEMM)"),
    "bf16_grads_vs_compile": ("<=", 1.0, "bf16 gradient error at most torch.compile's bf16"),
}
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


def size_configs(cfg: Config) -> list[Config]:
    """The comparison's config, then the SIZES configs."""
    return [cfg] + [cfg.with_(batch=b, **({} if lat is None else dict(zip(("depth", "height", "width"), lat))))
                    for b, lat in SIZES.values()]


def _size_text(key: str) -> str:
    b, lat = SIZES[key]
    where = f"at batch {b}" if lat is None else f"on a {'x'.join(map(str, lat))} lattice (batch {b})"
    return f"cost per cell-step {where} at most {SIZE_BOUND}x the default config's"


# ---------------------------------------------------------------- derived numbers

def gemm_peak(results: dict, dtype: str, device: str = "cpu") -> float | None:
    for g in results.get("gemm", []):
        if g.get("status") == "ok" and g["device"] == device and dtype in g["dtypes"]:
            return g["dtypes"][dtype]["peak_flops"]
    return None


def derive(row: dict, results: dict) -> dict:
    """Throughput, FLOP/s and fraction of the GEMM peak of one measured row (in place)."""
    if row.get("status") != "ok":
        return row
    c = row["config"]
    count = flops.rollout(c["channels"], c["hidden"], row["tokens"], c["depth"] * c["height"] * c["width"],
                          c["batch"], c["steps"])
    work = {"forward": count.forward, "backward": count.backward, "forward_backward": count.forward_backward}
    cell_steps = c["depth"] * c["height"] * c["width"] * c["batch"] * c["steps"]
    peak = gemm_peak(results, c["dtype"], row["device"])
    d = {"flops": work, "cell_steps_per_s": {}, "flops_per_s": {}, "gemm_fraction": {}}
    for phase in PHASES:
        t = row["time"][phase]["median"]
        d["cell_steps_per_s"][phase] = cell_steps / t
        d["flops_per_s"][phase] = work[phase] / t
        d["gemm_fraction"][phase] = work[phase] / t / peak if peak else None
    d["samples_per_s"] = c["batch"] / row["time"]["forward_backward"]["median"]
    row["derived"] = d
    return row


def _ok(rows, key):
    return next((r for r in rows if r.get("impl") == key and r.get("status") == "ok"), None)


def ratios(rows: list[dict], baseline: str = "eager", compiled: str = "compile") -> None:
    """Speed-up of every row over eager and torch.compile, and its memory as a fraction of
    eager's (same device), in place."""
    for r in rows:
        if r.get("status") != "ok":
            continue
        suffix = "" if r["device"] == "cpu" else f"@{r['device']}"
        base, comp = _ok(rows, baseline + suffix), _ok(rows, compiled + suffix)
        t = r["time"]["forward_backward"]["median"]
        r["vs"] = {
            "speedup_vs_eager": base["time"]["forward_backward"]["median"] / t if base else None,
            "speedup_vs_compile": comp["time"]["forward_backward"]["median"] / t if comp else None,
            "memory_vs_eager": (r["peak_memory_bytes"] / base["peak_memory_bytes"]
                                if base and base["peak_memory_bytes"] > 0 else None),
        }


def _us_per_cell_step(row: dict | None) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    return 1 / row["derived"]["cell_steps_per_s"]["forward_backward"]


def bf16_measured(rows: list[dict]) -> dict:
    """BF16_TARGETS' values from the "bf16" rows (ours fp32, ours bf16, compile bf16), where they ran."""
    by = {(r["impl"], r["config"]["dtype"]): r for r in rows if r.get("status") == "ok"}
    fp32, bf16, comp = (by.get((OURS[0], "float32")), by.get((OURS[0], "bfloat16")),
                        by.get(("compile", "bfloat16")))
    err = lambda r: (r or {}).get("check", {}).get("grads")  # noqa: E731
    return {"bf16_vs_fp32": (fp32["time"]["forward_backward"]["median"] / bf16["time"]["forward_backward"]["median"]
                             if fp32 and bf16 else None),
            "bf16_grads_vs_compile": err(bf16) / err(comp) if err(bf16) is not None and err(comp) else None}


def evaluate_targets(rows: list[dict], sizes: list[dict] = (), bf16: list[dict] = (),
                     isa: list[str] = ()) -> dict:
    """Each target of issue 10 for ours (``OURS``): measured value, threshold, pass/fail; the
    size targets from ``sizes`` (the rows of ``size_configs``, ours only), and the bf16 ones from
    ``bf16`` on a machine with ``isa`` flags, where they ran."""
    ours = next((k for k in OURS if _ok(rows, k)), OURS[0])
    row = _ok(rows, ours)
    out = {"implementation": ours, "checked": []}
    if row is None:
        out["note"] = f"{ours} did not run, so no target could be checked"
        return out
    measured = dict(row.get("vs", {}))
    measured["fp32_gemm_fraction"] = (row["derived"]["gemm_fraction"]["forward_backward"]
                                      if row["config"]["dtype"] == "float32" else None)
    measured["backward_vs_forward"] = row["time"]["backward"]["median"] / row["time"]["forward"]["median"]
    targets = dict(TARGETS)
    if sizes:
        base = _us_per_cell_step(sizes[0])
        for key, size_row in zip(SIZES, sizes[1:]):
            cost = _us_per_cell_step(size_row)
            measured[key] = cost / base if cost and base else None
            targets[key] = ("<=", SIZE_BOUND, _size_text(key))
    if bf16:
        measured.update(bf16_measured(bf16))
        targets.update(BF16_TARGETS)
    native_bf16 = any(f in isa for f in NATIVE_BF16)
    for key, (op, bound, text) in targets.items():
        v = measured.get(key)
        ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
        if key == "bf16_vs_fp32" and not native_bf16:
            ok, text = None, text + ": no such GEMM here"
        out["checked"].append({"target": key, "text": text, "op": op, "bound": bound, "value": v, "pass": ok})
    correct = row.get("check", {}).get("ok")
    out["correct"] = correct
    out["all_pass"] = bool(correct) and all(t["pass"] for t in out["checked"])
    return out


def best_batches(scaling: list[dict]) -> dict:
    """Per implementation, the batch size with the most samples/s (forward+backward)."""
    best = {}
    for r in scaling:
        if r.get("status") != "ok":
            continue
        b = best.get(r["impl"])
        if b is None or r["derived"]["samples_per_s"] > b["samples_per_s"]:
            best[r["impl"]] = {"batch": r["config"]["batch"], "samples_per_s": r["derived"]["samples_per_s"]}
    return best


def finalize(results: dict) -> dict:
    """Fill in every derived number of a results dict (idempotent)."""
    for section in SECTIONS:
        for r in results.get(section, []):
            derive(r, results)
    for section in ("comparison", "growth", "large", "trainer"):
        ratios(results.get(section, []))
    results["targets"] = evaluate_targets(results.get("comparison", []), results.get("sizes", []),
                                          results.get("bf16", []), results.get("machine", {}).get("isa", []))
    results["best_batch"] = best_batches(results.get("scaling", []))
    return results


# ---------------------------------------------------------------- formatting

def _ms(t: dict) -> str:
    return f"{t['median'] * 1e3:.0f} [{t['q1'] * 1e3:.0f}-{t['q3'] * 1e3:.0f}]"


def _x(v, fmt="{:.2f}x") -> str:
    return "-" if v is None else fmt.format(v)


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _err(r) -> str:
    c = r.get("check")
    if not c:
        return "-"
    flag = "" if c["ok"] else " **WRONG**"
    return f"{c['output']:.1e} / {c['grads']:.1e}{flag}"


def comparison_table(rows: list[dict]) -> str:
    head = ("| implementation | forward ms | backward ms | fwd+bwd ms | peak MiB fwd / fwd+bwd | us per cell-step "
            "| Mcell-steps/s | GFLOP/s "
            "| % fp32 GEMM | vs eager | vs compile | mem vs eager | rel. err out / grads |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = f"**{r['label']}**" if r.get("ours") else r.get("label", r.get("impl"))
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} |" + " |" * 11)
            continue
        d, t, vs = r["derived"], r["time"], r.get("vs", {})
        frac = d["gemm_fraction"]["forward_backward"]
        lines.append(
            f"| {name} | {_ms(t['forward'])} | {_ms(t['backward'])} | {_ms(t['forward_backward'])} "
            f"| {_mib(r.get('peak_memory_forward_bytes'))} / {_mib(r['peak_memory_bytes'])} "
            f"| {1e6 / d['cell_steps_per_s']['forward_backward']:.3g} "
            f"| {d['cell_steps_per_s']['forward_backward'] / 1e6:.3g} "
            f"| {d['flops_per_s']['forward_backward'] / 1e9:.3g} | {_x(frac and frac * 100, '{:.1f}%')} "
            f"| {_x(vs.get('speedup_vs_eager'))} | {_x(vs.get('speedup_vs_compile'))} "
            f"| {_x(vs.get('memory_vs_eager'), '{:.2f}')} | {_err(r)} |")
    return "\n".join(lines)


def sizes_table(rows: list[dict]) -> str:
    lines = ["| lattice (DxHxW), batch | fwd+bwd ms | us per cell-step | vs the first row |", "|---|---|---|---|"]
    base = _us_per_cell_step(rows[0]) if rows else None
    for r in rows:
        c = r["config"]
        name = f"{c['depth']}x{c['height']}x{c['width']}, batch {c['batch']}"
        cost = _us_per_cell_step(r)
        if cost is None:
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} | | |")
            continue
        lines.append(f"| {name} | {_ms(r['time']['forward_backward'])} | {cost * 1e6:.3g} "
                     f"| {_x(cost / base if base else None, '{:.2f}x')} |")
    return "\n".join(lines)


def bf16_table(rows: list[dict]) -> str:
    lines = ["| implementation | dtype | forward ms | backward ms | fwd+bwd ms | rel. err out / grads |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['label']}**" if r.get("ours") else r.get("label", r.get("impl"))
        dtype = r["config"]["dtype"]
        if r.get("status") != "ok":
            lines.append(f"| {name} | {dtype} | {r.get('status')}: {r.get('reason', '')} | | | |")
            continue
        t = r["time"]
        lines.append(f"| {name} | {dtype} | {_ms(t['forward'])} | {_ms(t['backward'])} "
                     f"| {_ms(t['forward_backward'])} | {_err(r)} |")
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    lines = ["| implementation | latency ms, median [IQR] | us per cell-step |", "|---|---|---|"]
    for r in rows:
        name = f"**{r['label']}**" if r.get("ours") else r.get("label", r.get("impl"))
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} | |")
            continue
        c = r["config"]
        cell_steps = c["depth"] * c["height"] * c["width"] * c["batch"] * c["steps"]
        lines.append(f"| {name} | {_ms(r['latency'])} | {r['latency']['median'] * 1e6 / cell_steps:.3g} |")
    return "\n".join(lines)


def targets_table(targets: dict) -> str:
    if not targets.get("checked"):
        return f"_{targets.get('note', 'no targets checked')}_"
    lines = ["| target | measured | result |", "|---|---|---|"]
    for t in targets["checked"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        res = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "**FAIL**")
        lines.append(f"| {t['text']} ({t['op']} {t['bound']}) | {v} | {res} |")
    lines.append(f"| output and gradients match the float64 reference | "
                 f"{'yes' if targets.get('correct') else 'no'} | "
                 f"{'pass' if targets.get('correct') else '**FAIL**'} |")
    return "\n".join(lines)


def gemm_table(results: dict) -> str:
    lines = ["| device | dtype | peak GFLOP/s (best square mm) | per size | cell-shaped mm GFLOP/s |",
             "|---|---|---|---|---|"]
    for g in results.get("gemm", []):
        if g.get("status") != "ok":
            lines.append(f"| - | - | {g.get('status')}: {g.get('reason', '')} | | |")
            continue
        for dtype, e in g["dtypes"].items():
            sizes = ", ".join(f"{n}: {v / 1e9:.3g}" for n, v in e["square_flops"].items())
            cells = ", ".join(f"{k}: {v / 1e9:.3g}" for k, v in e.get("cell_shaped_flops", {}).items())
            lines.append(f"| {g['device']} | {dtype} | {e['peak_flops'] / 1e9:.3g} | {sizes} | {cells or '-'} |")
    return "\n".join(lines)


def scaling_table(results: dict) -> str:
    rows = results.get("scaling", [])
    if not rows:
        return "_not run (full run only)_"
    best = results.get("best_batch", {})
    lines = ["| implementation | batch | fwd+bwd ms | samples/s | peak MiB |", "|---|---|---|---|---|"]
    for r in rows:
        b = r.get("config", {}).get("batch", r.get("batch"))
        if r.get("status") != "ok":
            lines.append(f"| {r.get('label', r.get('impl'))} | {b} | {r.get('status')}: {r.get('reason', '')} | | |")
            continue
        mark = " (best)" if best.get(r["impl"], {}).get("batch") == b else ""
        lines.append(f"| {r['label']} | {b}{mark} | {_ms(r['time']['forward_backward'])} "
                     f"| {r['derived']['samples_per_s']:.2f} | {_mib(r['peak_memory_bytes'])} |")
    return "\n".join(lines)


def _config_line(c: dict) -> str:
    return (f"lattice {c['depth']}x{c['height']}x{c['width']} (DxHxW), C={c['channels']}, F={c['hidden']}, "
            f"{c['neighbourhood']}, {c['boundary']} boundary, fire_rate={c['fire_rate']}, T={c['steps']}, "
            f"batch {c['batch']}, {c['dtype']}")


def _memory_method(results: dict) -> str:
    methods = sorted({r["memory_method"] for s in SECTIONS
                      for r in results.get(s, []) if r.get("status") == "ok"})
    return "; ".join(methods) or "-"


def _flops_line(c: dict, tokens: int) -> str:
    one = flops.per_cell_step(c["channels"], c["hidden"], tokens)
    return (f"{one.forward:,} FLOPs per cell and step forward (2·C·2F in-projection + 2·F·C out-projection "
            f"+ 2·K·F gating), backward counted as 2x forward; layer norms, GELU and elementwise work "
            f"are not counted (see `bench/flops.py`).")


def markdown(results: dict, readme: bool = False) -> str:
    """The results as markdown: the full report, or the README's shorter section."""
    c = results["config"]
    m = results["machine"]
    comp = results.get("comparison", [])
    tokens = num_tokens(c["neighbourhood"])
    load, load_end = m.get("load_average_1min"), m.get("load_average_1min_end")
    others = m.get("other_processes_cores")
    parts = [
        *(["**Measured under load** (other work ran on the machine; see the load averages below): "
           "these timings are not the code's, re-measure on a quiet machine.", ""]
          if results.get("under_load") else []),
        f"Measured with `{results['command']}` on {summary_line(m)} "
        f"({m['date']}, commit {m.get('git_commit') or 'unknown'}"
        + (f", 1-min load average {load:.1f} at the start" if load is not None else "")
        + (f" and {load_end:.1f} after it, once its own threads had stopped" if load_end is not None else "")
        + (f"; other processes kept {others:.2f} cores busy on average while it ran" if others is not None else "")
        + ").",
        "",
        f"**T={c['steps']} rollout, forward+backward** — {_config_line(c)}. Times are the median "
        f"[interquartile range] of {results['repeats']} repeats after {results['warmup']} untimed warm-up "
        f"run(s); each implementation runs in its own process on the same inputs"
        + (", the repeats of all of them interleaved round-robin" if results.get("interleaved") else "")
        + f". Peak memory: "
        f"{_memory_method(results)}. Relative error: max |error| / max |value| of the output and of the "
        f"worst parameter gradient against the float64 reference.",
        "",
        comparison_table(comp),
        "",
        *([f"**{results['sizes'][0].get('label')}, as the lattice grows** (the same cell, forward+backward, "
           f"in a run of its own, repeats interleaved; not checked against the reference):", "",
           sizes_table(results["sizes"]), ""] if results.get("sizes") else []),
        *(["**bf16** (the comparison's config; ours in fp32 and bf16 and torch.compile in bf16, in a run "
           "of their own, repeats interleaved; bf16 parameters, the errors against the float64 reference):",
           "", bf16_table(results["bf16"]), ""] if results.get("bf16") else []),
        f"**Targets** (issue 10, ours = {results.get('targets', {}).get('implementation', '-')}):",
        "",
        targets_table(results.get("targets", {})),
        "",
        f"**Machine ceiling** (`torch.mm`, same run): GEMM FLOP/s; {_flops_line(c, tokens)}",
        "",
        gemm_table(results),
    ]
    if results.get("growth"):
        gc = results["growth"][0]["config"]
        parts += ["", f"**Growth workload** (`cube-grow`, docs/growth.md) — {_config_line(gc)}, alive masking on "
                      f"channel {gc['alive_channel']}:", "", comparison_table(results["growth"])]
    if results.get("scaling"):
        best = ", ".join(f"{k}: batch {v['batch']} ({v['samples_per_s']:.2f} samples/s)"
                         for k, v in results.get("best_batch", {}).items())
        parts += ["", f"**Batch scaling** (T={c['steps']} rollout fwd+bwd; a sample is one lattice "
                      f"rollout). Best batch size: {best or '-'}.", ""]
        parts += ["![time and memory against batch size](bench/results/scaling.png)" if readme
                  else "![time and memory against batch size](scaling.png)", ""]
        if not readme:
            parts += [scaling_table(results)]
    if results.get("large"):
        lc = results["large"][0]["config"]
        parts += ["", f"**Large lattice** — {_config_line(lc)}:", "", comparison_table(results["large"])]
    if results.get("inference"):
        ic = results["inference"][0]["config"]
        parts += ["", f"**Default trainer model, one question** (no autograd) — {_config_line(ic)}:", "",
                  latency_table(results["inference"])]
    if results.get("trainer"):
        tc = results["trainer"][0]["config"]
        samples = ", ".join(f"{r['label']}: {r['derived']['samples_per_s']:.1f}"
                            for r in results["trainer"] if r.get("status") == "ok")
        parts += ["", f"**Default trainer model, one training batch** (the lattice's forward+backward; "
                      f"samples/s {samples or '-'}) — {_config_line(tc)}:", "", comparison_table(results["trainer"])]
    if not readme:
        parts += ["", "Skipped or failed implementations say why in the table. "
                      "See `docs/bench.md` for how everything is measured."]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- files

CSV_FIELDS = ["section", "impl", "label", "device", "status", "reason", "lattice", "batch", "steps", "dtype",
              "forward_ms", "backward_ms", "forward_backward_ms", "forward_backward_q1_ms",
              "forward_backward_q3_ms", "peak_memory_forward_mib", "peak_memory_mib", "cell_steps_per_s", "samples_per_s",
              "gflops_per_s", "fp32_gemm_fraction", "speedup_vs_eager", "speedup_vs_compile",
              "memory_vs_eager", "rel_err_output", "rel_err_grads"]


def write_csv(results: dict, path: str):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for section in SECTIONS:
            for r in results.get(section, []):
                c = r.get("config", {})
                row = {"section": section, "impl": r.get("impl"), "label": r.get("label"),
                       "device": r.get("device"), "status": r.get("status"), "reason": r.get("reason", ""),
                       "lattice": f"{c.get('depth')}x{c.get('height')}x{c.get('width')}",
                       "batch": c.get("batch"), "steps": c.get("steps"), "dtype": c.get("dtype")}
                if r.get("status") == "ok":
                    t, d, vs = r["time"], r["derived"], r.get("vs", {})
                    row.update({
                        "forward_ms": t["forward"]["median"] * 1e3, "backward_ms": t["backward"]["median"] * 1e3,
                        "forward_backward_ms": t["forward_backward"]["median"] * 1e3,
                        "forward_backward_q1_ms": t["forward_backward"]["q1"] * 1e3,
                        "forward_backward_q3_ms": t["forward_backward"]["q3"] * 1e3,
                        "peak_memory_forward_mib": (r["peak_memory_forward_bytes"] / 2**20
                                                    if r.get("peak_memory_forward_bytes") is not None else None),
                        "peak_memory_mib": r["peak_memory_bytes"] / 2**20,
                        "cell_steps_per_s": d["cell_steps_per_s"]["forward_backward"],
                        "samples_per_s": d["samples_per_s"],
                        "gflops_per_s": d["flops_per_s"]["forward_backward"] / 1e9,
                        "fp32_gemm_fraction": d["gemm_fraction"]["forward_backward"],
                        **{k: vs.get(k) for k in ("speedup_vs_eager", "speedup_vs_compile", "memory_vs_eager")},
                        "rel_err_output": r.get("check", {}).get("output"),
                        "rel_err_grads": r.get("check", {}).get("grads")})
                w.writerow(row)


def plot_scaling(results: dict, path: str) -> bool:
    rows = [r for r in results.get("scaling", []) if r.get("status") == "ok"]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        rs = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["config"]["batch"])
        b = [r["config"]["batch"] for r in rs]
        style = dict(marker="o", label=rs[0]["label"], linewidth=2.5 if rs[0].get("ours") else 1.5)
        axes[0].errorbar(b, [r["time"]["forward_backward"]["median"] for r in rs],
                         yerr=[[r["time"]["forward_backward"]["median"] - r["time"]["forward_backward"]["q1"]
                                for r in rs],
                               [r["time"]["forward_backward"]["q3"] - r["time"]["forward_backward"]["median"]
                                for r in rs]], capsize=3, **style)
        axes[1].plot(b, [r["derived"]["samples_per_s"] for r in rs], **style)
        axes[2].plot(b, [r["peak_memory_bytes"] / 2**20 for r in rs], **style)
    c = rows[0]["config"]
    titles = ("fwd+bwd time per rollout (s)", "samples/s (fwd+bwd)", "peak memory (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{c['depth']}x{c['height']}x{c['width']} lattice, C={c['channels']}, F={c['hidden']}, "
                 f"T={c['steps']}, {c['dtype']} — {results['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(results: dict, readme: str) -> bool:
    """Rewrite the README between the bench markers; False (and a message) without them."""
    try:
        with open(readme) as f:
            text = f.read()
    except FileNotFoundError:
        print(f"{readme} does not exist; nothing regenerated", file=sys.stderr)
        return False
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        print(f"{readme} has no '{README_START}' ... '{README_END}' markers; "
              f"add them where the performance section belongs", file=sys.stderr)
        return False
    body = ("\n<!-- generated by `python -m bench.report` from bench/results/results.json: "
            "edit bench/report.py, not this text -->\n" + markdown(results, readme=True))
    with open(readme, "w") as f:
        f.write(text[:start + len(README_START)] + body + text[end:])
    return True


def write_all(results: dict, out_dir: str, readme: str | None) -> bool:
    """Write JSON, CSV, markdown and PNG into ``out_dir`` and regenerate the README section.
    Returns False when the README could not be regenerated."""
    finalize(results)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_csv(results, os.path.join(out_dir, "results.csv"))
    plot_scaling(results, os.path.join(out_dir, "scaling.png"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("# Benchmark results\n\n" + markdown(results))
    return update_readme(results, readme) if readme else True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "results.json"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    ok = write_all(results, os.path.dirname(os.path.abspath(args.results)), args.readme)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
