"""The benchmark's contestants do correct work: each first step matches the numpy reference.

This is a correctness test of ``benchmarks/run.py``'s case builders, never a timing test.
The numpy reference is itself checked against a step written out independently here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("backprop_bench_run", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

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
    p = bench.make_problem(size, dtype)
    ref = bench.NumpyStep(p)
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
    p = bench.make_problem(size, dtype)
    contestants = bench.step_contestants(p)
    assert {"numpy", "engine", "engine_explicit"} <= set(contestants)
    for name, factory in contestants.items():
        ok, msg = bench.check_first_step(factory, p)
        assert ok, f"{name} ({size}, {np.dtype(dtype).name}): {msg}"


def test_check_first_step_catches_a_wrong_contestant() -> None:
    p = bench.make_problem("small", np.float64)

    class OffByLr(bench.NumpyStep):  # a step with the wrong learning rate
        def __init__(self, q: Any) -> None:
            super().__init__(q)
            self.lr = q.lr * 1.001

    ok, msg = bench.check_first_step(OffByLr, p)
    assert not ok and "rel. error" in msg


def test_engine_jacobian_matches_numpy_chain_on_one_example() -> None:
    p = bench.make_problem("large", np.float64)
    X = p.X[:2].copy()
    net = bench.build_engine_net(p, loss=False)
    for wrt in ("x", "W1"):
        want = bench.numpy_chain(p, X[:1] if wrt == "W1" else X, wrt)
        got = bench.engine_jacobian(net, X[:1] if wrt == "W1" else X, wrt)
        ok, err = bench._close(got, want, 1e-10)
        assert ok, f"∂y/∂{wrt}: rel. error {err}"
    # the chain itself against a finite difference of the network output
    eps = 1e-6
    x0 = X[:1]
    J = bench.numpy_chain(p, x0, "x")[0]
    for k in (0, 100, 700):
        e = np.zeros_like(x0)
        e[0, k] = eps
        fd = (net.forward(x0 + e) - net.forward(x0 - e))[0] / (2 * eps)
        np.testing.assert_allclose(J[:, k], fd, rtol=1e-5, atol=1e-8)
