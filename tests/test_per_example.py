"""Per-example gradients of a Graph (eq. 14.11 made visible): ``backward(per_example=True)``."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.layers.worked import Scale

B = 4


def build(rng: np.random.Generator, dtype: type = np.float64) -> tuple[bp.Graph, bp.Linear]:
    """Linear, branch, relu | tied linear + tanh, merge, nested Sequential, L2 loss."""
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    first = bp.Linear(3, 3, rng=rng, dtype=dtype)
    h = g.add(first, x)
    a, b = g.add(bp.Branch(2), h)
    tied = bp.Linear(3, 3, W=first.W, bias=False, dtype=dtype)  # eq. 14.47
    m = g.add(bp.Merge(), g.add(bp.ReLU(), a), g.add(bp.Tanh(), g.add(tied, b)))
    head = bp.Sequential([bp.Linear(6, 4, rng=rng, dtype=dtype), bp.Sigmoid()])
    s = g.add(Scale(0.7, dtype=dtype), g.add(head, m))
    out = g.add(bp.Linear(4, 2, rng=rng, dtype=dtype), s, name="out")
    g.output(g.add(bp.L2Loss(), out, y, name="J"))
    return g, first


def test_rows_are_the_examples_own_gradients_over_B() -> None:
    rng = np.random.default_rng(0)
    g, _ = build(rng)
    X, Y = rng.standard_normal((B, 3)), rng.standard_normal((B, 2))
    g.forward(x=X, y=Y)
    batch = g.backward()
    terms = g.backward(per_example=True)
    # Inputs are per example already: unchanged.
    for name in ("x", "y"):
        np.testing.assert_array_equal(terms.inputs[name], batch.inputs[name])
    singles = []
    for b in range(B):  # the reference: B separate runs of one example each
        g.forward(x=X[b : b + 1], y=Y[b : b + 1])
        singles.append(g.backward())
    for p in g.parameters():
        rows = terms.params[p]
        assert rows.shape == (B, *p.shape)
        np.testing.assert_allclose(rows.sum(axis=0), batch.params[p], rtol=1e-12, atol=1e-15)
        for b in range(B):  # the batch cost is a mean: each row carries 1/B
            np.testing.assert_allclose(B * rows[b], singles[b].params[p], rtol=1e-12, atol=1e-15)


def test_seeded_output_rows_match_single_runs() -> None:
    rng = np.random.default_rng(1)
    g = bp.Graph()
    x = g.input("x")
    lin = bp.Linear(3, 2, rng=rng)
    g.output(g.add(bp.Tanh(), g.add(lin, x)))
    X, S = rng.standard_normal((B, 3)), rng.standard_normal((B, 2))
    g.forward(x=X)
    rows = g.backward(S, per_example=True).params
    W, b = lin.W.value, lin.b.value
    for k in range(B):  # by hand: g_z = s * tanh'(z), dJ/dW = g_zᵀ x, dJ/db = g_z
        z = W @ X[k] + b
        g_z = S[k] * (1 - np.tanh(z) ** 2)
        np.testing.assert_allclose(rows[lin.W][k], np.outer(g_z, X[k]), rtol=1e-13)
        np.testing.assert_allclose(rows[lin.b][k], g_z, rtol=1e-13)


def test_tied_parameter_per_use_terms_are_per_example() -> None:
    rng = np.random.default_rng(2)
    g, first = build(rng)
    g.forward(x=rng.standard_normal((B, 3)), y=rng.standard_normal((B, 2)))
    terms = g.backward(per_example=True)
    uses = terms.per_use[first.W]
    assert len(uses) == 2
    assert all(t.shape == (B, 3, 3) for _, t in uses)
    np.testing.assert_allclose(uses[0][1] + uses[1][1], terms.params[first.W], rtol=1e-15)
    plain = g.backward().per_use[first.W]
    for (name_e, t), (name_p, total) in zip(uses, plain, strict=True):
        assert name_e == name_p
        np.testing.assert_allclose(t.sum(axis=0), total, rtol=1e-12, atol=1e-15)


def test_nested_sequential_matches_its_own_per_example_backward() -> None:
    rng = np.random.default_rng(3)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.Linear(4, 2, rng=rng)])
    g = bp.Graph()
    g.output(g.add(net, g.input("x")))
    X, S = rng.standard_normal((B, 3)), rng.standard_normal((B, 2))
    g.forward(x=X)
    from_graph = g.backward(S, per_example=True).params
    net.forward(X)
    _, from_chain = net.backward(S, per_example=True)
    for p in net.parameters():
        np.testing.assert_allclose(from_graph[p], from_chain[p], rtol=1e-14)


def test_unreached_parameter_gets_zero_rows_and_float32_stays() -> None:
    rng = np.random.default_rng(4)
    g = bp.Graph()
    x = g.input("x")
    used = bp.Linear(2, 2, rng=rng, dtype=np.float32)
    unused = bp.Linear(2, 2, rng=rng, dtype=np.float32)
    g.add(unused, g.input("u"))  # a dead end: nothing reaches the output from it
    g.output(g.add(used, x))
    g.forward(x=np.ones((B, 2), np.float32), u=np.ones((B, 2), np.float32))
    grads = g.backward(np.ones((B, 2), np.float32), per_example=True)
    assert grads.params[unused.W].shape == (B, 2, 2)
    assert not grads.params[unused.W].any()
    assert grads.params[used.W].dtype == np.float32
    np.testing.assert_array_equal(grads.params[used.W], np.ones((B, 2, 2), np.float32))


def test_per_example_needs_fast_mode() -> None:
    rng = np.random.default_rng(5)
    g, _ = build(rng)
    g.forward(x=rng.standard_normal((B, 3)), y=rng.standard_normal((B, 2)))
    with pytest.raises(ValueError, match="per_example=True runs in mode='fast' only"):
        g.backward(mode="explicit", per_example=True)
