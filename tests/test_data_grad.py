"""Backprop to the data (chapter 14.9): ``input_gradient`` and ``optimize_input``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.layers.worked import SumEntries


def mlp(seed: int = 0) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    return bp.Sequential(
        [bp.Linear(5, 8, rng=rng), bp.Tanh(), bp.Linear(8, 8, rng=rng), bp.Tanh(),
         bp.Linear(8, 3, rng=rng)]
    )  # fmt: skip


def as_graph(net: bp.Sequential) -> bp.Graph:
    g = bp.Graph()
    g.output(g.add(net, g.input("x")))
    return g


def snapshot(model: Any) -> list[np.ndarray]:
    return [p.value.copy() for p in model.parameters()]


# -- the gradient -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequential", "graph"])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_unit_gradient_against_finite_differences(kind: str, l2: float) -> None:
    net = mlp(1)
    model: Any = net if kind == "sequential" else as_graph(net)
    x = np.random.default_rng(2).standard_normal((3, 5))
    J, g = bp.input_gradient(model, x, 1, l2=l2)

    def cost(v: np.ndarray) -> float:
        out = net.forward(v, cache=False)
        return -float(out[:, 1].mean()) + 0.5 * l2 * float(np.sum(v * v)) / 3

    assert J == pytest.approx(cost(x), rel=1e-14)
    numeric = bp.numerical_jacobian(cost, x, flat=True).reshape(x.shape)
    np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-9)


def test_linear_network_gradient_by_hand() -> None:
    """x_out = W x: J = -(1/B) Σ_b (W x_b)_k, so dJ/dx_b = -W[k] / B exactly."""
    W = np.array([[1.0, -2.0], [0.5, 3.0]])
    net = bp.Sequential([bp.Linear(2, 2, bias=False, W=W)])
    x = np.array([[0.1, 0.2], [0.3, -0.4], [1.0, 1.0], [0.0, 2.0]])
    J, g = bp.input_gradient(net, x, 1)
    assert J == pytest.approx(-float((x @ W.T)[:, 1].mean()), rel=1e-15)
    np.testing.assert_array_equal(g, np.broadcast_to(-W[1] / 4, (4, 2)))


def test_loss_and_callable_objectives() -> None:
    rng = np.random.default_rng(3)
    net = mlp(4)
    x, labels = rng.standard_normal((2, 5)), np.array([2, 0])
    chain = bp.Sequential([*net.layers, bp.SoftmaxCrossEntropy()])
    J, g = bp.input_gradient(chain, x, fixed=(labels,))
    assert J == pytest.approx(float(chain.forward(x, labels)), rel=1e-15)
    numeric = bp.numerical_jacobian(lambda v: chain.forward(v, labels, cache=False), x, flat=True)
    np.testing.assert_allclose(g, numeric.reshape(x.shape), rtol=1e-6, atol=1e-9)
    # A callable: J = ½ ‖x_out‖², dJ/dx_out = x_out.
    J2, g2 = bp.input_gradient(net, x, lambda out: (0.5 * float(np.sum(out * out)), out))
    numeric = bp.numerical_jacobian(
        lambda v: 0.5 * float(np.sum(net.forward(v, cache=False) ** 2)), x, flat=True
    )
    np.testing.assert_allclose(g2, numeric.reshape(x.shape), rtol=1e-6, atol=1e-9)
    assert J2 > 0


def test_graph_with_fixed_inputs_and_named_output() -> None:
    rng = np.random.default_rng(5)
    g = bp.Graph()
    img, bias = g.input("img"), g.input("bias")
    lin = bp.Linear(4, 3, rng=rng)
    h = g.add(bp.Add(), g.add(lin, img), bias)
    g.output(g.add(bp.Tanh(), h, name="act"), g.add(SumEntries(), h, name="total"))
    x, c = rng.standard_normal((2, 4)), rng.standard_normal((2, 3))
    J, grad = bp.input_gradient(g, x, 2, input="img", fixed={"bias": c}, output="act")
    z = x @ lin.W.value.T + lin.b.value + c
    expected = -(1 - np.tanh(z[:, 2:3]) ** 2) * lin.W.value[2] / 2  # by hand
    np.testing.assert_allclose(grad, expected, rtol=1e-13)
    assert J == pytest.approx(-float(np.tanh(z[:, 2]).mean()), rel=1e-14)


# -- the optimization ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequential", "graph"])
def test_optimize_unit_increases_and_parameters_stay(kind: str) -> None:
    net = mlp(6)
    model: Any = net if kind == "sequential" else as_graph(net)
    before = snapshot(net)
    x0 = 0.1 * np.random.default_rng(7).standard_normal((1, 5))
    x0_copy = x0.copy()
    x, history = bp.optimize_input(model, x0, 0, steps=150, lr=1.0)
    unit = history["unit"]
    assert unit.shape == history["J"].shape == (151,)
    np.testing.assert_allclose(history["J"], -unit, rtol=1e-15)  # no l2: J = -unit
    steps = np.diff(unit)
    assert np.mean(steps > 0) >= 0.95  # monotone, or nearly
    # Far above the start: more than any of 1000 random inputs gives, and the gain is
    # more than twice the unit's spread over those inputs.
    random_units = net.forward(np.random.default_rng(8).standard_normal((1000, 5)))[:, 0]
    assert unit[-1] > random_units.max()
    assert unit[-1] - unit[0] > 2 * random_units.std()
    assert float(net.forward(x[:1])[0, 0]) == pytest.approx(unit[-1], rel=1e-12)
    for p, v in zip(net.parameters(), before, strict=True):
        np.testing.assert_array_equal(p.value, v)
    np.testing.assert_array_equal(x0, x0_copy)


def test_sgd_steps_are_exact_for_a_linear_network() -> None:
    """With J = -(W x)_k the gradient is -W[k]: each step adds lr · W[k]."""
    W = np.array([[2.0, -1.0, 0.5]])
    net = bp.Sequential([bp.Linear(3, 1, bias=False, W=W)])
    x0 = np.zeros((1, 3))
    x, history = bp.optimize_input(net, x0, 0, steps=4, lr=0.25)
    np.testing.assert_allclose(x, 4 * 0.25 * W, rtol=1e-15)
    step = 0.25 * float(np.sum(W * W))  # each step raises the unit by lr ‖W[k]‖²
    np.testing.assert_allclose(history["unit"], step * np.arange(5), rtol=1e-14)


def test_clip_l2_and_adam() -> None:
    net = mlp(8)
    x0 = np.zeros((2, 5))
    x, history = bp.optimize_input(net, x0, 2, steps=40, lr=0.1, optimizer="adam", clip=(-0.5, 0.5))
    assert x.min() >= -0.5 and x.max() <= 0.5
    assert np.isclose(np.abs(x), 0.5).mean() > 0.5  # pushed against the box
    assert history["unit"][-1] > history["unit"][0]
    # A strong l2 term keeps x small: the optimum of -a·x + (λ/2)‖x‖² is x = a/λ.
    W = np.array([[1.0, 2.0]])
    lin = bp.Sequential([bp.Linear(2, 1, bias=False, W=W)])
    x, history = bp.optimize_input(lin, np.zeros((1, 2)), 0, steps=200, lr=0.2, l2=4.0)
    np.testing.assert_allclose(x, W / 4.0, rtol=1e-8)
    assert history["J"][-1] == pytest.approx(-0.5 * float(np.sum(W * W)) / 4.0, rel=1e-10)


def test_float32_stays_float32() -> None:
    rng = np.random.default_rng(9)
    net = bp.Sequential([bp.Linear(3, 2, rng=rng, dtype=np.float32), bp.Tanh()])
    x, _ = bp.optimize_input(net, np.zeros((1, 3), np.float32), 1, steps=3, lr=0.1)
    assert x.dtype == np.float32


# -- errors ------------------------------------------------------------------------------------


def test_errors_say_what_is_wrong() -> None:
    net = mlp(10)
    x = np.zeros((1, 5))
    with pytest.raises(ValueError, match=r"unit 3 does not index one example"):
        bp.input_gradient(net, x, 3)
    with pytest.raises(ValueError, match=r"objective=None needs a scalar cost.*\(1, 3\)"):
        bp.input_gradient(net, x)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        bp.optimize_input(net, x, 0, optimizer="lbfgs")
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        bp.optimize_input(net, x, 0, steps=-1)
    with pytest.raises(ValueError, match="clip must be"):
        bp.optimize_input(net, x, 0, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        bp.input_gradient(net, x, 0, l2=-1.0)
    with pytest.raises(TypeError, match="integer dtype"):
        bp.input_gradient(net, np.zeros((1, 5), dtype=int), 0)
    with pytest.raises(TypeError, match="Sequential or a Graph"):
        bp.input_gradient(bp.Tanh(), x, 0)  # type: ignore[arg-type]
    g = bp.Graph()
    g.output(g.add(bp.Add(), g.input("a"), g.input("b")))
    with pytest.raises(ValueError, match=r"inputs 'a', 'b'; say which one"):
        bp.input_gradient(g, x, 0)
    with pytest.raises(ValueError, match=r"no input 'c'"):
        bp.input_gradient(g, x, 0, input="c", fixed={"b": x})
    g2 = bp.Graph()
    g2.output(g2.add(bp.Tanh(), g2.input("a"), name="t"), g2.add(bp.Sigmoid(), g2.input("b")))
    with pytest.raises(ValueError, match="choose one with output="):
        bp.input_gradient(g2, x, 0, input="a", fixed={"b": x})
    g3 = bp.Graph()
    g3.output(g3.add(bp.Tanh(), g3.input("a", requires_grad=False)))
    with pytest.raises(ValueError, match="gets no gradient"):
        bp.input_gradient(g3, x, 0)
