"""The checker at the edges: tiny gradients, large inputs, kinks, several outputs.

``gradcheck`` must decide pass or fail the same way whatever the scale of the
numbers (a 0.1 % error fails with gradients of 1e-9 as with gradients of 1e9),
take finite-difference steps that suit the size of each input entry, exclude
(and say so) only the entries where the function has a kink within the step,
check layers with several outputs, and label what it shows.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from test_check import InputGradOff, JacobianOff, WeightGradOff

import backprop as bp
from backprop.jacobian import Dense
from backprop.layer import OperatingPoint

X = np.random.default_rng(0).standard_normal((3, 4))


class OffTanh(bp.Tanh):
    """g_in is 0.1 % too large."""

    def _backward(self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


# The wrong layers of the meta-tests, under the names this file uses.
OffLinear = WeightGradOff
OffInputLinear = InputGradOff
OffJacobianLinear = JacobianOff


# -- 1. pass or fail does not depend on the scale of the gradients ----------------------


@pytest.mark.parametrize("scale", [1e-12, 1e-9, 1e-3, 1.0, 1e3, 1e9])
def test_a_wrong_backward_fails_at_any_scale_of_g_out(scale: float) -> None:
    g = np.random.default_rng(1).standard_normal(X.shape) * scale
    bp.gradcheck(bp.Tanh(), X, g_out=g)  # the right layer passes at this scale
    with pytest.raises(bp.GradcheckError, match="input 0: fast backward"):
        bp.gradcheck(OffTanh(), X, g_out=g)


def test_a_wrong_backward_fails_with_a_constant_tiny_g_out() -> None:
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(OffTanh(), X, g_out=np.full(X.shape, 1e-9))


def _near_fit(tanh: bp.Tanh, offset: float) -> tuple[bp.Sequential, np.ndarray]:
    rng = np.random.default_rng(2)
    first, last = bp.Linear(4, 3, rng=rng), bp.Linear(3, 2, rng=rng)
    prediction = bp.Sequential([first, tanh, last]).forward(X, cache=False)
    return bp.Sequential([first, tanh, last, bp.L2Loss()]), prediction + offset


@pytest.mark.parametrize("offset", [1e-5, 1e-7])
def test_a_wrong_backward_fails_near_a_fit(offset: float) -> None:
    net, target = _near_fit(bp.Tanh(), offset)
    report = bp.gradcheck(net, X, target)
    assert not report.excluded, "a smooth loss has no kink to exclude"
    bad, target = _near_fit(OffTanh(), offset)
    with pytest.raises(bp.GradcheckError, match="fast backward"):
        bp.gradcheck(bad, X, target)


def test_an_exact_fit_passes() -> None:
    # The L2 loss at its minimum: every gradient is zero and the one-sided
    # differences have opposite signs (curvature, not a kink).
    net, target = _near_fit(bp.Tanh(), 0.0)
    report = bp.gradcheck(net, X, target)
    assert not report.excluded


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_a_wrong_linear_fails_whatever_the_size_of_its_weights(scale: float) -> None:
    def build(cls: type[bp.Linear]) -> bp.Linear:
        layer = cls(4, 3, rng=5)
        layer.W.value = layer.W.value * scale
        return layer

    bp.gradcheck(build(bp.Linear), X)
    for cls in (OffLinear, OffInputLinear, OffJacobianLinear):
        with pytest.raises(bp.GradcheckError):
            bp.gradcheck(build(cls), X)


# -- 2. the step follows the size of each input entry -----------------------------------


def test_numerical_jacobian_at_large_inputs() -> None:
    x = np.array([3e8, -2e5, 1.5, 0.0])
    J = bp.numerical_jacobian(lambda v: v**2, x, flat=True)
    np.testing.assert_allclose(J, np.diag(2 * x), rtol=1e-9, atol=1e-9)


def test_correct_layers_pass_at_large_inputs() -> None:
    X5 = np.random.default_rng(0).standard_normal((3, 5))
    bp.gradcheck(bp.L2Loss(), X * 1e3, X)
    bp.gradcheck(bp.Linear(5, 3, rng=0), X5 * 1e4)
    bp.gradcheck(bp.Linear(5, 3, rng=0), X5 * 1e8)
    bp.gradcheck(bp.Tanh(), X * 30)


def test_wrong_layers_fail_at_large_inputs() -> None:
    X5 = np.random.default_rng(0).standard_normal((3, 5)) * 1e4
    for cls in (OffLinear, OffInputLinear, OffJacobianLinear):
        with pytest.raises(bp.GradcheckError):
            bp.gradcheck(cls(5, 3, rng=0), X5)


def test_graph_passes_at_large_inputs() -> None:
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    g.output(g.add(bp.L2Loss(), g.add(bp.Linear(4, 2, rng=0), x), y))
    Y = np.random.default_rng(1).standard_normal((3, 2))
    report = bp.gradcheck(g, x=X * 1e4, y=Y * 1e4)
    assert report.checks


def _confident(seed: int, last: type[bp.Linear] = bp.Linear, tanh: Any = None) -> Any:
    """A net whose softmax is sure of each example's class (1 - p_y down to 1e-9)."""
    rng = np.random.default_rng(seed)
    first, out = bp.Linear(8, 16, rng=rng), last(16, 10, rng=rng)
    out.W.value = out.W.value * 60
    x = rng.standard_normal((3, 8))
    labels = bp.Sequential([first, bp.Tanh(), out]).forward(x, cache=False).argmax(axis=1)
    return bp.Sequential([first, tanh or bp.Tanh(), out, bp.SoftmaxCrossEntropy()]), x, labels


@pytest.mark.parametrize("seed", range(6))
def test_a_confident_softmax_passes_and_wrong_layers_fail(seed: int) -> None:
    # log(Σ e^(z - max)) rounds in steps of 2^-52 however small the cost: the
    # differences at the first step can be off by far more than 2^-52·|J|/h.
    bp.gradcheck(*_confident(seed))
    for last, tanh in ((OffLinear, None), (OffJacobianLinear, None), (bp.Linear, OffTanh())):
        with pytest.raises(bp.GradcheckError):
            bp.gradcheck(*_confident(seed, last, tanh))


def test_a_derivative_below_the_resolution_of_f_is_explained() -> None:
    # A softmax so sure that the cost rounds to the same value at every step tried.
    z = np.array([[61.2, -76.7, 12.5, -17.0]])
    with pytest.raises(bp.GradcheckError, match="f did not change at any step tried"):
        bp.gradcheck(bp.SoftmaxCrossEntropy(), z, np.array([0]))


# -- 3. kinks within the step are excluded, and said so; wrong gradients still fail -----


def _kink_net(linear: type[bp.Linear] = bp.Linear, pointwise: bp.Layer | None = None) -> Any:
    """Linear(3, 4) whose unit 2 sits at the kink of the ReLU, then L2Loss."""
    rng = np.random.default_rng(7)
    lin = linear(3, 4, rng=rng)
    W, b = lin.W.value.copy(), lin.params["b"].value.copy()
    W[2] = 1e-11 * rng.standard_normal(3)
    b[2] = 1e-11
    lin.W.value, lin.params["b"].value = W, b
    layers = [lin, bp.ReLU()] + ([pointwise] if pointwise is not None else []) + [bp.L2Loss()]
    x = rng.standard_normal((5, 3))
    y = rng.standard_normal((5, 4))
    return bp.Sequential(layers), x, y


def test_a_relu_at_its_kink_passes_with_the_exclusion_reported() -> None:
    net, x, y = _kink_net()
    report = bp.gradcheck(net, x, y)
    excluded = {what: k for what, (k, _) in report.excluded.items() if k}
    assert any(w.startswith("parameter '0.W'") for w in excluded), report
    assert any(w.startswith("parameter '0.b'") for w in excluded), report
    # Only unit 2's entries: W[2, :] (3 of 12) and b[2] (1 of 4).
    for what, (k, total) in report.excluded.items():
        if what.startswith("parameter '0.W'"):
            assert (k, total) in ((0, 12), (3, 12)), what
        if what.startswith("parameter '0.b'"):
            assert (k, total) in ((0, 4), (1, 4)), what
    text = str(report)
    assert "excluded" in text and "kink" in text
    assert re.search(r"3 of 12 entries excluded", text)


def test_the_kink_net_fails_with_a_wrong_gradient() -> None:
    net, x, y = _kink_net(OffLinear)
    with pytest.raises(bp.GradcheckError, match="parameter '0.W'"):
        bp.gradcheck(net, x, y)
    net, x, y = _kink_net(pointwise=OffTanh())
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(net, x, y)
    net, x, y = _kink_net(OffInputLinear)
    with pytest.raises(bp.GradcheckError, match="input 'x'"):
        bp.gradcheck(net, x, y)


def test_the_kink_net_as_a_graph() -> None:
    net, x, y = _kink_net()
    g = bp.Graph()
    xi, yi = g.input("x"), g.input("y")
    h = g.add(net.layers[1], g.add(net.layers[0], xi))
    g.output(g.add(net.layers[2], h, yi))
    report = bp.gradcheck(g, x=x, y=y)
    assert any(k for k, _ in report.excluded.values()), report
    assert "kink" in str(report)


def test_a_wrong_layer_at_a_kink_in_a_graph_fails() -> None:
    net, x, y = _kink_net(OffLinear)
    g = bp.Graph()
    xi, yi = g.input("x"), g.input("y")
    h = g.add(net.layers[1], g.add(net.layers[0], xi))
    g.output(g.add(net.layers[2], h, yi))
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(g, x=x, y=y)


def test_abs_at_zero_is_excluded_entry_by_entry() -> None:
    x = X.copy()
    x[0, 1] = 0.0
    x[2, 3] = 0.0

    def sign(v: np.ndarray) -> np.ndarray:  # the subgradient +1 at 0
        return np.where(v >= 0, 1.0, -1.0)

    report = bp.gradcheck(bp.Pointwise(np.abs, sign, name="abs"), x)
    assert report.excluded["input 0: explicit Jacobian vs finite differences"] == (2, 12)
    assert report.excluded["input 0: fast backward vs finite differences"] == (2, 12)
    # A wrong derivative elsewhere still fails, and so does a wrong one at 0 that is
    # no subgradient at all when the others are right.
    with pytest.raises(bp.GradcheckError, match="input 0"):
        bp.gradcheck(bp.Pointwise(np.abs, lambda v: 1.001 * sign(v), name="abs"), x)
    # Where the central difference happens to equal the derivative, nothing is excluded.
    report = bp.gradcheck(bp.Pointwise(np.abs, np.sign, name="abs"), x)
    assert not report.excluded


def test_all_entries_at_a_kink_cannot_be_checked() -> None:
    with pytest.raises(bp.GradcheckError, match="could not check"):
        bp.gradcheck(bp.ReLU(), np.zeros((2, 3)))


def test_a_smooth_layer_has_nothing_excluded() -> None:
    for layer in (bp.Tanh(), bp.Sigmoid(), bp.Softplus()):
        report = bp.gradcheck(layer, X * 3)
        assert not report.excluded, layer
        assert "excluded" not in str(report)


# -- 4. layers with several outputs -------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_branch(n: int, batch: int) -> None:
    x = np.random.default_rng(n).standard_normal((batch, 2, 3))
    report = bp.gradcheck(bp.Branch(n), x)
    assert len(report.checks) == 4
    assert report.worst < 1e-6


def test_gradcheck_branch_with_given_g_out() -> None:
    rng = np.random.default_rng(3)
    g = tuple(rng.standard_normal(X.shape) for _ in range(2))
    bp.gradcheck(bp.Branch(2), X, g_out=g)


class WrongBranch(bp.Branch):
    """Backward forgets the last copy's gradient."""

    def _backward(self, op: OperatingPoint, g_out: Any, input_grad: bool) -> Any:
        return super()._backward(op, g_out[:-1], input_grad)


class OffBranch(bp.Branch):
    """Backward is 0.1 % too large."""

    def _backward(self, op: OperatingPoint, g_out: Any, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


@pytest.mark.parametrize("cls", [WrongBranch, OffBranch])
def test_gradcheck_fails_on_a_wrong_branch(cls: type[bp.Branch]) -> None:
    with pytest.raises(bp.GradcheckError, match="Branch"):
        bp.gradcheck(cls(3), X)


def test_branch_failure_names_the_copy() -> None:
    class JacobianOffBranch(bp.Branch):
        def _jacobians(self, op: OperatingPoint) -> Any:
            L, _ = super()._jacobians(op)
            A = L.to_dense()[0].copy()
            A[4 + 1, 1] = 1.001  # copy 1, entry 1
            return Dense(A, batch=L.batch), {}

    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(JacobianOffBranch(2), X)
    assert "x_out[1][" in str(info.value)


# -- 5. the table says what it compares, at readable indices ----------------------------


def _table(msg: str) -> tuple[list[str], list[list[str]]]:
    lines = msg.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("entry"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1 :] if line.strip()]
    return header, rows


def test_fast_vs_explicit_columns_are_labelled() -> None:
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(OffLinear(4, 2, rng=1), X)
    msg = str(info.value)
    assert "fast backward vs explicit" in msg
    header, rows = _table(msg)
    assert header[:3] == ["entry", "fast", "explicit"]
    for row in rows:
        assert re.fullmatch(r"W\[\d, \d\]", row[0]), row
        assert float(row[1]) == pytest.approx(1.001 * float(row[2]), rel=1e-6, abs=1e-12)


def test_jacobian_entries_are_example_output_input() -> None:
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(OffJacobianLinear(4, 2, rng=1), X)
    header, rows = _table(str(info.value))
    assert header[:3] == ["entry", "explicit", "numeric"]
    for row in rows:
        m = re.fullmatch(r"∂x_out\[(\d), (\d)\]/∂x_in\[(\d), (\d)\]", row[0])
        assert m, row
        assert m[1] == m[3], "a wrong entry of L^x lies in its own example's block"


def test_dot_product_columns_are_labelled() -> None:
    class BadJvp(Dense):
        def jvp(self, u: np.ndarray) -> np.ndarray:
            return super().jvp(u) * 1.001

    class JvpOff(bp.Linear):
        def _jacobians(self, op: OperatingPoint) -> Any:
            L_x, L_theta = super()._jacobians(op)
            return BadJvp(op.theta["W"], batch=L_x.batch), L_theta

    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(JvpOff(4, 2, rng=1), X)
    header, _ = _table(str(info.value))
    assert header[1:3] == ["<v L, u>", "<v, L u>"]


def test_graph_columns_are_labelled() -> None:
    class WrongTanh(bp.Tanh):
        def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
            return 1 - 0.9 * x_out * x_out

    g = bp.Graph()
    g.output(g.add(bp.Linear(2, 3, rng=0), g.add(WrongTanh(), g.input("x"))))
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(g, x=X[:, :2])
    header, rows = _table(str(info.value))
    assert header[1:3] == ["fast", "numeric"]
    assert all(re.fullmatch(r"x\[\d, \d\]", row[0]) for row in rows), rows
