"""The tables: on the console, in ``results.md``; and the report written to ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rnn import TorchFusedRNNStep
from .steps import AutogradStep, EngineStep, NumpyStep, TorchStep
from .timing import FINE, FINE_CASES

LABELS = {
    "numpy": NumpyStep.label,
    "engine": EngineStep.label,
    "torch": TorchStep.label,
    "autograd": AutogradStep.label,
    "torch_fused": TorchFusedRNNStep.label,
    "numpy_chain": "numpy chain W3 diag W2 diag W1",
    "jacrev": "torch.func.jacrev",
    "numpy_grad": "numpy gradient (hand-written)",
    "engine_grad": "backprop gradient (forward + backward)",
    "engine_hvp": "backprop hvp (forward over reverse)",
    "torch_hvp": "torch.func jvp(grad), eager",
    "torch_rr": "torch autograd, reverse over reverse",
    "engine_eigs": "backprop hessian_eigs (eigsh)",
    "torch_eigs": "eigsh on torch.func jvp(grad)",
}

HEADER = ["case", "dtype", "contestant", "median ms", "× numpy", "× PyTorch"]
GOAL_HEADER = ["goal", "measured", "bound", "holds", "note"]
MEMORY_HEADER = ["dtype", "contestant", "held MiB", "step extra MiB", "peak MiB", "peak × numpy"]


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def timing_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        t = r["timings"]
        torch_t = next(
            (t[k] for k in ("torch", "jacrev", "torch_hvp", "torch_eigs") if k in t), None
        )
        for cname, v in t.items():
            vs_torch = "" if torch_t is None else f"{v['median_s'] / torch_t['median_s']:.2f}"
            ratio = f"{v['ratio_numpy']:.2f}"
            rows.append([r["case"], r["dtype"], LABELS[cname], _ms(v["median_s"]), ratio, vs_torch])
    return rows


def goal_rows(goals: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for g in goals:
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        bound = "" if g["bound"] is None else f"<= {g['bound']}"
        holds = {True: "yes", False: "NO", None: "not measured"}[g["holds"]]
        if g["bound"] is None and g["ratio"] is not None:
            holds = ""  # a ratio reported, held to no bound
        rows.append([g["goal"], ratio, bound, holds, g["note"]])
    return rows


def memory_rows(memory: dict[str, Any]) -> list[list[str]]:
    rows = []
    for dt, m in memory["by_dtype"].items():
        for who in ("numpy", "engine"):
            v = m[who]
            ratio = "" if who == "numpy" else f"{m['ratio_peak']:.2f}"
            rows.append(
                [dt, LABELS[who], _mib(v["held"]), _mib(v["step_extra"]), _mib(v["peak"]), ratio]
            )
    return rows


def format_text_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def format_md_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; Python {v['python']}, "
        f"numpy {v['numpy']}, scipy {v['scipy']}, BLAS {m['blas'].get('numpy_blas')} "
        f"(one thread), PyTorch {v.get('torch') or 'not installed'}, "
        f"autograd {v.get('autograd') or 'not installed'}. "
        f"Medians of {report['repeats']} interleaved repeats "
        f"({report['repeats'] * FINE} shorter ones for the {', '.join(FINE_CASES)} steps)"
        + (" (quick run)" if report["quick"] else "")
        + "."
    )


def render_markdown(report: dict[str, Any]) -> str:
    """``results.md``: the machine, the timings, memory, the refusal, the goals."""
    lines = [
        "<!-- written by benchmarks/run.py; do not edit by hand -->",
        _machine_line(report),
        "",
        format_md_table(timing_rows(report["results"]), HEADER),
    ]
    if report.get("memory"):
        mem = report["memory"]
        lines += ["", "Peak memory of the large step (tracemalloc):", ""]
        lines.append(format_md_table(memory_rows(mem), MEMORY_HEADER))
        if "float64_in_float32_step" in mem:
            found = mem["float64_in_float32_step"]
            lines += ["", f"float64 arrays in a float32 step: {len(found) or 'none'}"]
            lines += [f"- {f}" for f in found]
    for r in report["results"]:
        if "refusal" in r:
            lines += ["", f"Dense ∂y/∂W1 for a large batch: {r['refusal']}"]
    lines += ["", "Goals:", "", format_md_table(goal_rows(report["goals"]), GOAL_HEADER)]
    return "\n".join(lines) + "\n"


def print_report(report: dict[str, Any]) -> None:
    """The timings, memory, the refusal and the goals as plain-text tables."""
    results, memory = report["results"], report["memory"]
    print()
    print(format_text_table(timing_rows(results), HEADER))
    if memory:
        print()
        print(format_text_table(memory_rows(memory), MEMORY_HEADER))
        if "float64_in_float32_step" in memory:
            found = memory["float64_in_float32_step"]
            print(f"float64 arrays in a float32 step: {len(found) or 'none'}")
            for f in found:
                print("  ", f)
    for r in results:
        if "refusal" in r:
            print(f"dense ∂y/∂W1, {r['refusal']}")
    print()
    print(format_text_table(goal_rows(report["goals"]), GOAL_HEADER))


def write_report(report: dict[str, Any], json_path: str | None, md_path: str | None) -> None:
    """The report as JSON and as markdown, to the paths given (None: not written)."""
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {json_path}")
    if md_path:
        Path(md_path).write_text(render_markdown(report))
        print(f"wrote {md_path}")
