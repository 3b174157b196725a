"""Worked examples from the reference texts, written as Graphs, checked to the last digit."""

from __future__ import annotations

import math

import numpy as np
import pytest

import backprop as bp
from backprop.layers.worked import Constant, Scale, Shift

ONE = np.ones((1, 1))


def scalar(v: float) -> np.ndarray:
    return np.array([[v]])


# -- note 001: f = (x + y) z at x = -2, y = 5, z = -4 -----------------------------------


def build_xyz() -> tuple[bp.Graph, bp.Handle, bp.Handle]:
    g = bp.Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    q = g.add(bp.Add(), x, y, name="q")
    f = g.add(bp.Multiply(), q, z, name="f")
    return g, q, f


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_add_multiply_circuit(mode: str) -> None:
    g, _, f = build_xyz()
    g.output(f)
    out = g.forward(x=scalar(-2.0), y=scalar(5.0), z=scalar(-4.0))
    assert out.tolist() == [[-12.0]]
    # f is not a loss: the seed df/df = 1 has f's shape (1, 1).
    grads = g.backward(seed=ONE, mode=mode)
    assert grads.inputs["x"].tolist() == [[-4.0]]  # df/dx = z
    assert grads.inputs["y"].tolist() == [[-4.0]]  # df/dy = z
    assert grads.inputs["z"].tolist() == [[3.0]]  # df/dz = q = x + y
    assert grads.params == {}


def test_add_multiply_circuit_with_q_as_second_output() -> None:
    # q is read by the Multiply and is an output: the graph routes it through a Branch.
    g, q, f = build_xyz()
    g.output(f, q)
    f_val, q_val = g.forward(x=scalar(-2.0), y=scalar(5.0), z=scalar(-4.0))
    assert q_val.tolist() == [[3.0]] and f_val.tolist() == [[-12.0]]
    assert [n.name for n in g.nodes() if n.auto] == ["q_fanout"]
    # Only f is seeded: an output missing from the dict sends no gradient.
    grads = g.backward({"f": ONE})
    assert [grads.inputs[k].item() for k in "xyz"] == [-4.0, -4.0, 3.0]
    # Seeding q as well adds dq/dx = dq/dy = 1 on top of df/dx = df/dy = z.
    grads = g.backward((ONE, ONE))
    assert [grads.inputs[k].item() for k in "xyz"] == [-3.0, -3.0, 3.0]


# -- the sigmoid neuron f = σ(w0 x0 + w1 x1 + w2) --------------------------------------

W = [2.0, -3.0, -3.0]
X = [-1.0, -2.0]
SIGMA_1 = 1.0 / (1.0 + math.exp(-1.0))  # w0 x0 + w1 x1 + w2 = -2 + 6 - 3 = 1
DSIGMA_1 = SIGMA_1 * (1.0 - SIGMA_1)  # σ'(1) = σ(1)(1 - σ(1))


def test_closed_form_constants() -> None:
    assert SIGMA_1 == pytest.approx(0.7310585786300049, abs=1e-16)
    assert DSIGMA_1 == pytest.approx(0.19661193324148185, abs=1e-16)


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_sigmoid_neuron_as_linear_layer(mode: str) -> None:
    g = bp.Graph()
    x = g.input("x")
    lin = bp.Linear(2, 1, W=[[W[0], W[1]]], b=[W[2]])
    f = g.add(bp.Sigmoid(), g.add(lin, x))
    g.output(f)
    out = g.forward(x=np.array([X]))
    assert out.item() == pytest.approx(SIGMA_1, abs=1e-15)
    assert round(out.item(), 10) == 0.7310585786
    grads = g.backward(seed=ONE, mode=mode)
    dw = np.concatenate([grads.params[lin.W].ravel(), grads.params[lin.b]])
    dx = grads.inputs["x"].ravel()
    # df/dw = σ'(1) [x0, x1, 1] and df/dx = σ'(1) [w0, w1]
    np.testing.assert_allclose(dw, DSIGMA_1 * np.array([X[0], X[1], 1.0]), rtol=0, atol=1e-16)
    np.testing.assert_allclose(dx, DSIGMA_1 * np.array(W[:2]), rtol=0, atol=1e-16)
    assert np.round(dw, 8).tolist() == [-0.19661193, -0.39322387, 0.19661193]
    assert np.round(dx, 8).tolist() == [0.39322387, -0.5898358]


def test_sigmoid_neuron_as_circuit_of_gates() -> None:
    """The same neuron gate by gate: *, +, *-1, exp, +1, 1/x, with w and x all inputs."""
    g = bp.Graph()
    w0, x0, w1, x1, w2 = (g.input(n) for n in ("w0", "x0", "w1", "x1", "w2"))
    s = g.add(bp.Add(), g.add(bp.Multiply(), w0, x0), g.add(bp.Multiply(), w1, x1))
    s = g.add(bp.Add(), s, w2)
    e = g.add(bp.Pointwise(np.exp, np.exp), g.add(Scale(-1.0, learnable=False), s))
    f = g.add(bp.Pointwise(np.reciprocal, lambda v: -1.0 / v**2, name="inv"), g.add(Shift(1.0), e))
    g.output(f)
    feed = {"w0": W[0], "x0": X[0], "w1": W[1], "x1": X[1], "w2": W[2]}
    out = g.forward({k: scalar(v) for k, v in feed.items()})
    assert out.item() == pytest.approx(SIGMA_1, abs=1e-15)
    for mode in ("fast", "explicit"):
        grads = g.backward(seed=ONE, mode=mode)
        got = {k: v.item() for k, v in grads.inputs.items()}
        expected = {
            "w0": DSIGMA_1 * X[0],
            "x0": DSIGMA_1 * W[0],
            "w1": DSIGMA_1 * X[1],
            "x1": DSIGMA_1 * W[1],
            "w2": DSIGMA_1,
        }
        assert got == pytest.approx(expected, abs=1e-15)
        assert round(got["w0"], 8) == -0.19661193 and round(got["x1"], 8) == -0.5898358


# -- note 003: b = w1 a, c = w2 a, d = w3 b + w4 c, L = 10 - d --------------------------

A, W1, W2, W3, W4 = 2.0, 3.0, -1.0, 0.5, 4.0


def build_note_003(ten_as_constant: bool) -> tuple[bp.Graph, list[Scale]]:
    g = bp.Graph()
    a = g.input("a")
    s1, s2, s3, s4 = (Scale(w) for w in (W1, W2, W3, W4))
    b = g.add(s1, a, name="b")  # a is read twice: the graph inserts a Branch
    c = g.add(s2, a, name="c")
    d = g.add(bp.Add(), g.add(s3, b), g.add(s4, c), name="d")
    minus_d = g.add(Scale(-1.0, learnable=False), d)
    if ten_as_constant:
        L = g.add(bp.Add(), g.add(Constant([[10.0]]), name="ten"), minus_d, name="L")
    else:
        L = g.add(Shift(10.0), minus_d, name="L")
    g.output(L)
    return g, [s1, s2, s3, s4]


@pytest.mark.parametrize("ten_as_constant", [False, True])
@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_note_003_sum_over_paths(ten_as_constant: bool, mode: str) -> None:
    g, scales = build_note_003(ten_as_constant)
    b, c = W1 * A, W2 * A  # 6, -2
    d = W3 * b + W4 * c  # 3 - 8 = -5
    assert g.forward(a=scalar(A)).tolist() == [[10.0 - d]] == [[15.0]]
    grads = g.backward(seed=ONE, mode=mode)
    dw = [grads.params[s.params["a"]].item() for s in scales]
    assert dw == [-W3 * A, -W4 * A, -b, -c] == [-1.0, -8.0, -6.0, 2.0]
    # dL/da is the sum over the two paths a -> b -> d and a -> c -> d.
    path_b, path_c = -W3 * W1, -W4 * W2  # -1.5 and 4.0
    assert grads.inputs["a"].item() == path_b + path_c == 2.5
    fanout = [n for n in g.nodes() if n.auto]
    assert [(n.name, n.inputs, n.n_outputs) for n in fanout] == [("a_fanout", ("a",), 2)]
    assert isinstance(fanout[0].layer, bp.Branch)


def test_note_003_paths_one_at_a_time() -> None:
    # Seeding through each path alone (the other weight set to zero downstream)
    # gives each term of the sum; together they give the total.
    totals = []
    for w3, w4 in ((W3, 0.0), (0.0, W4)):
        g = bp.Graph()
        a = g.input("a")
        b = g.add(Scale(W1), a)
        c = g.add(Scale(W2), a)
        d = g.add(bp.Add(), g.add(Scale(w3), b), g.add(Scale(w4), c))
        g.output(g.add(Scale(-1.0, learnable=False), d))
        g.forward(a=scalar(A))
        totals.append(g.backward(seed=ONE).inputs["a"].item())
    assert totals == [-1.5, 4.0]
