"""Side-by-side benchmark of the engine against hand-written numpy, PyTorch and autograd.

The command line of ``benchmarks/run.py``: which cases, which dtypes, how many
repeats, where the results go.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .convnets import CONV_NETS, run_conv_case
from .curvature import run_eigen_case, run_hvp_case
from .goals import evaluate_goals
from .jacobians import run_jacobian_case
from .machine import machine_info
from .memory import run_memory_case
from .problems import DTYPES
from .report import LABELS, print_report, write_report
from .rnn import run_rnn_case
from .steps import run_step_case, torch_ok, torch_version
from .timing import FINE, FINE_CASES
from .transformer import run_transformer_case

#: Where ``results.json`` and ``results.md`` go by default: ``benchmarks/``.
HERE = Path(__file__).resolve().parent.parent
ALL_CASES = (
    "tiny",
    "small",
    "large",
    "cnn",
    "lenet",
    "rnn",
    "transformer",
    "jacobians",
    "memory",
    "curvature",
)
#: The Jacobian cases: (with respect to, batch).
JACOBIAN_CASES = (("x", 1), ("x", 32), ("W1", 1))
#: The batch whose dense ∂y/∂W1 is asked for, to show that it is refused.
REFUSED_BATCH = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="few, short repeats (a smoke run)")
    ap.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated subset of {','.join(ALL_CASES)} (default: all)",
    )
    ap.add_argument("--dtypes", default="float64,float32", help="comma-separated dtypes")
    ap.add_argument(
        "--repeats", type=int, default=None, help="repeats per case (default 15, quick 3)"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="where to write the JSON (default benchmarks/results.json; a --quick run "
        "writes nothing unless given a path)",
    )
    ap.add_argument("--md", default=None, help="where to write the markdown table (as --json)")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in ALL_CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {ALL_CASES}")
    args.dtypes = [c.strip() for c in args.dtypes.split(",") if c.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; choose from {tuple(DTYPES)}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if not args.quick:
        args.json = args.json or str(HERE / "results.json")
        args.md = args.md or str(HERE / "results.md")
    return args


def print_machine(machine: dict[str, Any]) -> None:
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['platform']}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(f"BLAS: {machine['blas'].get('numpy_blas')}; {machine['blas'].get('numpy_blas_config')}")
    print("threads:", machine["blas"]["threads_env"], machine["blas"].get("threadpools", ""))
    if not torch_ok():
        print(f"PyTorch 2.13.0 not importable (found {torch_version()}): left out")


def run_timed_cases(args: argparse.Namespace, target: float) -> list[dict[str, Any]]:
    """The step cases asked for (MLPs, convnets, the RNN, the transformer block), in every
    dtype asked for, then the Jacobian cases, then the curvature cases (float64)."""
    results: list[dict[str, Any]] = []
    for size in ("tiny", "small", "large", *CONV_NETS, "rnn"):
        if size in args.cases:
            fine = FINE if size in FINE_CASES else 1  # see FINE
            run = (
                run_rnn_case
                if size == "rnn"
                else run_conv_case
                if size in CONV_NETS
                else run_step_case
            )
            for dt in (DTYPES[d] for d in args.dtypes):
                print(f"timing {size} step, {dt.name} ...", flush=True)
                results.append(run(size, dt, args.repeats * fine, target / fine))
    if "transformer" in args.cases:
        for dt in (DTYPES[d] for d in args.dtypes):
            print(f"timing transformer step, {dt.name} ...", flush=True)
            results.append(run_transformer_case(dt, args.repeats, target))
    if "jacobians" in args.cases:
        for wrt, batch in JACOBIAN_CASES:
            print(f"timing ∂y/∂{wrt}, batch {batch} ...", flush=True)
            repeats = max(3, args.repeats)
            results.append(run_jacobian_case(wrt, batch, repeats, target, REFUSED_BATCH))
    if "curvature" in args.cases:
        print("timing a Hessian-vector product of the small MLP ...", flush=True)
        results.append(run_hvp_case(args.repeats * FINE, target / FINE))
        print("timing the top Hessian eigenvalue of the digits MLP ...", flush=True)
        results.append(run_eigen_case(args.repeats, target))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = 0.01 if args.quick else 0.05  # seconds per timed repeat
    machine = machine_info()
    print_machine(machine)
    results = run_timed_cases(args, target)
    memory = None
    if "memory" in args.cases:
        print("measuring peak memory of the large step ...", flush=True)
        memory = run_memory_case([DTYPES[d] for d in args.dtypes])
    for r in results:
        for cname, msg in r["checks"].items():
            if not msg.startswith("ok"):
                print(f"CHECK FAILED: {r['case']} {r['dtype']} {LABELS[cname]}: {msg}")
    report = {
        "machine": machine,
        "repeats": args.repeats,
        "quick": args.quick,
        "results": results,
        "memory": memory,
        "goals": evaluate_goals(results, memory),
    }
    print_report(report)
    write_report(report, args.json, args.md)
    return 0
