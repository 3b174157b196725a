"""The benchmark's contestants do correct work: each first step matches the numpy reference.

This is a correctness test of the case builders in ``benchmarks/bench/``, never a timing
test. The numpy reference is itself checked against a step written out independently
here. One quick run of ``benchmarks/run.py`` checks that the script still writes its
results.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_bench() -> Any:
    """The package ``benchmarks/bench`` (not on the import path), loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        "backprop_bench", _BENCHMARKS / "bench" / "__init__.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its submodules and dataclasses look it up there
    spec.loader.exec_module(module)
    return module


_load_bench()
problems = importlib.import_module("backprop_bench.problems")
steps = importlib.import_module("backprop_bench.steps")
jacobians = importlib.import_module("backprop_bench.jacobians")
goals = importlib.import_module("backprop_bench.goals")
cli = importlib.import_module("backprop_bench.cli")

CASES = [(size, dt) for size in ("tiny", "small") for dt in (np.float64, np.float32)]


def _independent_first_step(p: Any) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """One SGD step in float64 written without the benchmark's code (no in-place tricks)."""
    Ws = [W.astype(np.float64) for W, _ in p.weights]
    bs = [b.astype(np.float64) for _, b in p.weights]
    X = p.X.astype(np.float64)
    zs, acts = [], [X]
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        z = acts[-1] @ W.T + b
        zs.append(z)
        acts.append(np.maximum(z, 0.0) if i < len(Ws) - 1 else z)
    out, B = acts[-1], p.batch
    if p.loss == "l2":
        loss = np.sum((out - p.y) ** 2) / B
        g = 2.0 * (out - p.y) / B
    else:
        e = np.exp(out - out.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
        onehot = np.eye(out.shape[1])[p.y]
        loss = -np.mean(np.log(prob[np.arange(B), p.y]))
        g = (prob - onehot) / B
    new = []
    for i in range(len(Ws) - 1, -1, -1):
        gW, gb = g.T @ acts[i], g.sum(axis=0)
        if i > 0:
            g = (g @ Ws[i]) * (zs[i - 1] > 0)
        new.append((Ws[i] - p.lr * gW, bs[i] - p.lr * gb))
    return float(loss), new[::-1]


@pytest.mark.parametrize(("size", "dtype"), CASES)
def test_numpy_reference_matches_independent_step(size: str, dtype: Any) -> None:
    p = problems.make_problem(size, dtype)
    ref = steps.NumpyStep(p)
    loss = ref.step()
    want_loss, want = _independent_first_step(p)
    rtol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    for (W, b), (W0, b0) in zip(ref.weights(), want, strict=True):
        assert W.dtype == np.dtype(dtype) and b.dtype == np.dtype(dtype)
        np.testing.assert_allclose(W, W0, rtol=rtol, atol=rtol * np.abs(W0).max())
        np.testing.assert_allclose(b, b0, rtol=rtol, atol=rtol * np.abs(b0).max())
    # one step moved the weights: the check above compares something that changed
    assert not np.allclose(ref.weights()[0][0], p.weights[0][0], rtol=0, atol=0)


@pytest.mark.parametrize(("size", "dtype"), CASES)
def test_every_contestant_first_step_matches_reference(size: str, dtype: Any) -> None:
    p = problems.make_problem(size, dtype)
    contestants = steps.step_contestants(p)
    assert {"numpy", "engine"} <= set(contestants)
    assert not any("explicit" in name for name in contestants)  # explicit mode is not timed
    for name, factory in contestants.items():
        ok, msg = steps.check_first_step(factory, p)
        assert ok, f"{name} ({size}, {np.dtype(dtype).name}): {msg}"


def test_check_first_step_catches_a_wrong_contestant() -> None:
    p = problems.make_problem("small", np.float64)

    class OffByLr(steps.NumpyStep):  # a step with the wrong learning rate
        def __init__(self, q: Any) -> None:
            super().__init__(q)
            self.lr = q.lr * 1.001

    ok, msg = steps.check_first_step(OffByLr, p)
    assert not ok and "rel. error" in msg


def test_engine_jacobian_matches_numpy_chain_on_one_example() -> None:
    p = problems.make_problem("large", np.float64)
    X = p.X[:2].copy()
    net = problems.build_engine_net(p, loss=False)
    for wrt in ("x", "W1"):
        want = jacobians.numpy_chain(p, X[:1] if wrt == "W1" else X, wrt)
        got = jacobians.engine_jacobian(net, X[:1] if wrt == "W1" else X, wrt)
        ok, err = problems.close(got, want, 1e-10)
        assert ok, f"∂y/∂{wrt}: rel. error {err}"
    # the chain itself against a finite difference of the network output
    eps = 1e-6
    x0 = X[:1]
    J = jacobians.numpy_chain(p, x0, "x")[0]
    for k in (0, 100, 700):
        e = np.zeros_like(x0)
        e[0, k] = eps
        fd = (net.forward(x0 + e) - net.forward(x0 - e))[0] / (2 * eps)
        np.testing.assert_allclose(J[:, k], fd, rtol=1e-5, atol=1e-8)


def test_script_runs_as_make_bench_runs_it() -> None:
    """``python benchmarks/run.py`` finds its package (here only as far as ``--help``)."""
    cmd = [sys.executable, str(_BENCHMARKS / "run.py"), "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--cases" in done.stdout and "tiny,small,large,jacobians,memory" in done.stdout


def test_quick_run_writes_its_results(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "results.json", tmp_path / "results.md"
    args = ["--quick", "--repeats", "1", "--cases", "tiny", "--dtypes", "float64"]
    assert cli.main([*args, "--json", str(out_json), "--md", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    assert [(r["case"], r["dtype"]) for r in report["results"]] == [("tiny step", "float64")]
    (result,) = report["results"]
    assert all(msg.startswith("ok") for msg in result["checks"].values()), result["checks"]
    assert {"numpy", "engine"} <= set(result["timings"])
    measured = [g["goal"] for g in report["goals"] if g["holds"] is not None]
    assert measured == ["tiny step float64: engine / numpy"]
    md = out_md.read_text()
    assert "| tiny step | float64 | backprop (fast) |" in md
    assert "explicit" not in md and "explicit" not in out_json.read_text()


def test_goals_table_names_every_goal_once() -> None:
    names = [g["goal"] for g in goals.evaluate_goals([], None)]
    assert len(names) == len(set(names)) == 14
    assert all(g["holds"] is None for g in goals.evaluate_goals([], None))
    assert not any("explicit" in name for name in names)
