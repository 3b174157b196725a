"""The checker itself: numerical Jacobians are right, and gradcheck can fail.

A gradient checker that cannot fail is worse than none. The meta-tests below plant
one wrong number (a 0.1 % error) in each place an analytic derivative comes from
(the fast input gradient, the fast weight gradient, the explicit Jacobian, its
forward product, a pointwise derivative) and demand a ``GradcheckError``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import Dense, Jacobian
from backprop.layer import OperatingPoint

# -- numerical_jacobian ------------------------------------------------------------------


def test_numerical_jacobian_of_linear_map() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 4))
    x = rng.standard_normal(4)
    x0 = x.copy()
    J = bp.numerical_jacobian(lambda v: A @ v, x, flat=True)
    assert J.shape == (3, 4)
    np.testing.assert_allclose(J, A, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x, x0)  # x is not changed


def test_numerical_jacobian_of_cube() -> None:
    x = np.array([-1.5, 0.5, 2.0])
    J = bp.numerical_jacobian(lambda v: v**3, x, flat=True)
    np.testing.assert_allclose(J, np.diag([6.75, 0.75, 12.0]), rtol=1e-8, atol=1e-8)


def test_numerical_jacobian_orders_entries_in_c_order() -> None:
    # f(X) = Xᵀ for X of shape (2, 3): output entry (j, i) is input entry (i, j).
    X = np.arange(6.0).reshape(2, 3)
    J = bp.numerical_jacobian(lambda M: M.T, X, flat=True)
    expected = np.zeros((6, 6))
    for i in range(2):
        for j in range(3):
            expected[j * 2 + i, i * 3 + j] = 1.0
    np.testing.assert_allclose(J, expected, atol=1e-9)


def test_numerical_jacobian_of_scalar_function() -> None:
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    J = bp.numerical_jacobian(lambda v: np.sum(v**2), x, flat=True)
    np.testing.assert_allclose(J, 2 * x.reshape(1, -1), rtol=1e-8)


# -- numerical_jacobian in the (B, M, N) layout of to_dense() -----------------------------


def test_numerical_jacobian_layouts_match_linear_jacobians() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4))  # B = 2 examples of 3 tokens of 4 features
    lin = bp.Linear(4, 5, rng=2)
    W0, b0 = lin.W.value.copy(), lin.params["b"].value.copy()
    lin.forward(x)
    L_x, L_theta = lin.jacobians()

    def out(W: np.ndarray = W0, b: np.ndarray = b0, v: np.ndarray = x) -> np.ndarray:
        return bp.Linear(4, 5, W=W, b=b).forward(v)

    num_x = bp.numerical_jacobian(lambda v: out(v=v), x)
    assert num_x.shape == (2, 3 * 5, 3 * 4)
    np.testing.assert_allclose(num_x, L_x.to_dense(), rtol=1e-7, atol=1e-9)
    num_W = bp.numerical_jacobian(lambda W: out(W=W), W0, wrt_batch=False)
    assert num_W.shape == (2, 3 * 5, 5 * 4)
    np.testing.assert_allclose(num_W, L_theta["W"].to_dense(), rtol=1e-7, atol=1e-9)
    num_b = bp.numerical_jacobian(lambda b: out(b=b), b0, wrt_batch=False)
    np.testing.assert_allclose(num_b, L_theta["b"].to_dense(), rtol=1e-7, atol=1e-9)
    # The flat layout holds the same numbers: block b sits on the diagonal.
    flat = bp.numerical_jacobian(lambda v: out(v=v), x, flat=True)
    assert flat.shape == (30, 24)
    np.testing.assert_array_equal(flat[15:, 12:], num_x[1])
    np.testing.assert_array_equal(flat[:15, 12:], 0.0)


def test_numerical_jacobian_layouts_by_hand() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]])  # B = 3, N = 2
    square = bp.numerical_jacobian(lambda v: v**2, x)
    by_hand = np.array([[[2.0, 0.0], [0.0, 4.0]], [[6.0, 0.0], [0.0, 8.0]], [[-2.0, 0], [0, 1.0]]])
    np.testing.assert_allclose(square, by_hand, rtol=1e-9, atol=1e-9)
    # A cost, the mean over the batch of Σ_i x_bi²: row b is 2·x[b]/B, shape (B, 1, N),
    # and the rows add up to the batch gradient.
    cost = bp.numerical_jacobian(lambda v: np.sum(v**2) / 3, x)
    assert cost.shape == (3, 1, 2)
    np.testing.assert_allclose(cost[:, 0, :], 2 * x / 3, rtol=1e-9, atol=1e-9)
    # A parameter θ (2,), f(θ)[b] = <x[b], θ>: ∂f[b]/∂θ = x[b], shape (B, 1, |θ|).
    theta = np.array([0.5, -2.0])
    dot = bp.numerical_jacobian(lambda t: x @ t, theta, wrt_batch=False)
    np.testing.assert_allclose(dot, x[:, None, :], rtol=1e-9, atol=1e-9)
    # The flat layout: diag(2·x) over all B·N entries.
    flat = bp.numerical_jacobian(lambda v: v**2, x, flat=True)
    np.testing.assert_allclose(flat, np.diag(2 * x.ravel()), rtol=1e-9, atol=1e-9)


def test_numerical_jacobian_refuses_what_blocks_cannot_hold() -> None:
    x = np.array([[1.0, 2.0], [3.0, 5.0]])
    with pytest.raises(ValueError, match=r"couples the examples.*flat=True"):
        bp.numerical_jacobian(lambda v: v - v.mean(axis=0), x)
    # centring over the batch: ∂(x_b - mean)/∂x_c = (δ_bc - 1/B)·I, in the flat layout
    flat = bp.numerical_jacobian(lambda v: v - v.mean(axis=0), x, flat=True)
    np.testing.assert_allclose(flat, np.kron(np.eye(2) - 0.5, np.eye(2)), atol=1e-9)
    with pytest.raises(TypeError, match="flat=True"):
        bp.numerical_jacobian(lambda v: (v, 2 * v), x)
    both = bp.numerical_jacobian(lambda v: (v, 2 * v), x, flat=True)
    np.testing.assert_allclose(both, np.vstack([np.eye(4), 2 * np.eye(4)]), atol=1e-9)
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*\(3,\)"):
        bp.numerical_jacobian(lambda v: np.ones(3) * v.sum(), x)


def test_numerical_jacobian_docstring_example_runs() -> None:
    import doctest

    from backprop.check import differences

    result = doctest.testmod(differences, extraglobs={"np": np})
    assert result.attempted >= 3
    assert result.failed == 0


# -- meta-tests: gradcheck must fail on a wrong derivative -------------------------------


class InputGradOff(bp.Linear):
    """g_in is 0.1 % too large."""

    def _backward(self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


class WeightGradOff(bp.Linear):
    """dJ/dW is 0.1 % too large."""

    def _backward(self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in, {**grads, "W": grads["W"] * 1.001}


class BiasGradOff(bp.Linear):
    """dJ/db misses the batch sum: it is the first example's g_out only."""

    def _backward(self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in, {**grads, "b": g_out[0].copy()}


class JacobianOff(bp.Linear):
    """The explicit L^x is 0.1 % off (the fast path is right)."""

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        L_x, L_theta = super()._jacobians(op)
        return Dense(op.theta["W"] * 1.001, batch=L_x.batch), L_theta


class _BadJvp(Dense):
    def jvp(self, u: np.ndarray) -> np.ndarray:
        return super().jvp(u) * 1.001


class JvpOff(bp.Linear):
    """L^x is right as a matrix, but its forward product ``L u`` is 0.1 % off:
    only the dot-product test can see it."""

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        L_x, L_theta = super()._jacobians(op)
        return _BadJvp(op.theta["W"], batch=L_x.batch), L_theta


X = np.random.default_rng(0).standard_normal((3, 4))


@pytest.mark.parametrize(
    "cls, what, labels",
    [
        (InputGradOff, "input 0: fast backward", ("fast", "explicit")),
        (WeightGradOff, "parameter 'W': fast backward", ("fast", "explicit")),
        (BiasGradOff, "parameter 'b': fast backward", ("fast", "explicit")),
        (JacobianOff, "input 0: explicit Jacobian vs finite differences", ("explicit", "numeric")),
        (JvpOff, "input 0: dot-product test", ("<v L, u>", "<v, L u>")),
    ],
    ids=["input-grad", "weight-grad", "bias-grad", "jacobian", "jvp"],
)
def test_gradcheck_catches_a_wrong_linear(
    cls: type[bp.Linear], what: str, labels: tuple[str, str]
) -> None:
    layer = cls(4, 2, rng=1)
    bp.gradcheck(bp.Linear(4, 2, rng=1), X)  # the same numbers pass in the correct layer
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(layer, X)
    msg = str(info.value)
    assert what in msg
    assert "Linear(4→2)" in msg
    assert "analytic" in msg, "the message says which computations are analytic"
    header = next(line for line in msg.splitlines() if line.strip().startswith("entry"))
    assert re.split(r"\s{2,}", header.strip())[1:3] == list(labels), "columns named as compared"
    assert re.search(r"-?\d+\.\d{4,}", msg), "the message shows the values side by side"


def test_gradcheck_catches_a_wrong_pointwise_derivative() -> None:
    layer = bp.Pointwise(np.sin, np.sin)  # the derivative of sin is not sin
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(layer, X)
    msg = str(info.value)
    assert "sin" in msg and "analytic" in msg and "numeric" in msg
    bp.gradcheck(bp.Pointwise(np.sin, np.cos), X)  # and the right one passes


def test_gradcheck_catches_wrong_derivative_in_a_network() -> None:
    rng = np.random.default_rng(2)
    bad = bp.Sequential(
        [bp.Linear(4, 3, rng=rng), bp.Pointwise(np.tanh, np.cos, name="tanh"), bp.Linear(3, 2)]
    )
    with pytest.raises(bp.GradcheckError, match="analytic"):
        bp.gradcheck(bad, X)


def test_gradcheck_error_is_an_assertion_error() -> None:
    assert issubclass(bp.GradcheckError, AssertionError)


def test_gradcheck_shows_worst_entries() -> None:
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(WeightGradOff(4, 2, rng=1), X)
    lines = str(info.value).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("entry"))
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1 :]]
    assert rows, "no rows of (entry, fast, explicit)"
    for entry, fast, explicit, *_ in rows:
        assert re.fullmatch(r"W\[\d, \d\]", entry), "entries as indices of W"
        a, n = float(fast), float(explicit)
        # The planted error: fast = 1.001 × explicit, up to rounding of the printout.
        assert a == pytest.approx(1.001 * n, rel=1e-6, abs=1e-9)


# -- refusals ----------------------------------------------------------------------------


def test_gradcheck_refuses_float32_input() -> None:
    with pytest.raises(TypeError, match="float32"):
        bp.gradcheck(bp.Tanh(), X.astype(np.float32))


def test_gradcheck_refuses_float32_parameters() -> None:
    with pytest.raises(TypeError, match=r"float32.*float64"):
        bp.gradcheck(bp.Linear(4, 2, dtype=np.float32), X)


# -- operating point and report ----------------------------------------------------------


def test_gradcheck_leaves_layer_at_operating_point() -> None:
    lin = bp.Linear(4, 2, rng=3)
    W0, b0 = lin.W.value.copy(), lin.params["b"].value.copy()
    lin.forward(X)
    g = np.random.default_rng(4).standard_normal((3, 2))
    g_in, grads = lin.backward(g)
    bp.gradcheck(lin, X)
    g_in2, grads2 = lin.backward(g)
    np.testing.assert_array_equal(g_in, g_in2)
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads2[k])
    np.testing.assert_array_equal(lin.W.value, W0)
    np.testing.assert_array_equal(lin.params["b"].value, b0)


def test_gradcheck_leaves_network_at_operating_point() -> None:
    rng = np.random.default_rng(5)
    net = bp.Sequential([bp.Linear(4, 5, rng=rng), bp.ReLU(), bp.Linear(5, 3, rng=rng)])
    net.forward(X)
    g = rng.standard_normal((3, 3))
    g0, grads = net.backward(g)
    values = [p.value.copy() for p in net.parameters()]
    bp.gradcheck(net, X)
    g0b, gradsb = net.backward(g)
    np.testing.assert_array_equal(g0, g0b)
    for p in grads:
        np.testing.assert_array_equal(grads[p], gradsb[p])
    for p, v in zip(net.parameters(), values, strict=True):
        np.testing.assert_array_equal(p.value, v)


def test_gradcheck_restores_parameters_after_failure() -> None:
    layer = WeightGradOff(4, 2, rng=1)
    W0 = layer.W.value.copy()
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(layer, X)
    np.testing.assert_array_equal(layer.W.value, W0)


def test_report_of_a_correct_layer() -> None:
    report = bp.gradcheck(bp.Linear(4, 2, rng=6), X)
    assert isinstance(report, bp.GradcheckReport)
    assert report.worst < 1e-6
    names = " | ".join(report.checks)
    for what in ("input 0", "parameter 'W'", "parameter 'b'", "dot-product"):
        assert what in names
    assert len(report.checks) == 3 * 4  # 3 things checked, 4 comparisons each
    assert "passed" in str(report)


def test_a_bad_input_fails_once_with_the_layers_own_error() -> None:
    with pytest.raises(ValueError, match=r"Linear\(4→3\)") as info:
        bp.gradcheck(bp.Linear(4, 3, rng=0), np.zeros((2, 5)))
    assert info.value.__context__ is None  # not raised again while handling the first


def test_a_graph_with_a_bad_input_fails_once() -> None:
    g = bp.Graph()
    g.output(g.add(bp.Linear(4, 3, rng=0), g.input("x")))
    with pytest.raises(ValueError) as info:
        bp.gradcheck(g, x=np.zeros((2, 5)))
    # The graph's error wraps the layer's (its cause), and nothing else came before it.
    assert "Graph node 'linear_0'" in str(info.value)
    assert info.value.__context__ is info.value.__cause__
    assert info.value.__cause__.__context__ is None
