"""The directions mode of ``gradcheck``: no dense batch Jacobian, and it still fails.

``mode="directions"`` compares, along a few random directions ``u`` of each input
and parameter, ``<v L, u>`` from the fast backward, ``<v, L u>`` from the
Jacobian's forward product and the central difference of ``t ↦ <v, f(z + t·u)>``.
The meta-tests plant a 0.1 % error in each place a derivative comes from (a
pointwise ``h'``, a weight gradient, a Jacobian's ``jvp``) and demand a
``GradcheckError`` at every scale; the correct layers pass, including a token-wise
``Linear`` big enough that ``"auto"`` picks this mode (its batch Jacobian would
have 6·10^8 entries). ``python -m pytest tests/test_check_directions.py
--durations=5`` shows the times; no test asserts on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from test_check import WeightGradOff

import backprop as bp
from backprop.check.modes import MAX_DENSE, MAX_DIFFERENCED
from backprop.jacobian import Jacobian
from backprop.layer import OperatingPoint


class WrongTanh(bp.Tanh):
    """``h'`` is 0.1 % too large (fast path and Jacobian alike)."""

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return 1.001 * (1 - x_out * x_out)


class OffJvp(Jacobian):
    """A correct Jacobian whose forward product ``L u`` is off by ``factor`` (0.1 %)."""

    def __init__(self, inner: Jacobian, factor: float = 1.001) -> None:
        super().__init__(inner.shape, inner.batch, inner.dtype, f"{inner.label}, jvp off")
        self.inner, self.factor = inner, factor

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return self.inner.vjp(g)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self.inner.vjp_sum(g)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return self.factor * self.inner.jvp(u)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return self.inner.to_sparse(b)

    @property
    def nnz(self) -> int:
        return self.inner.nnz


class JvpOff(bp.Linear):
    """``L^x`` with a wrong ``jvp``; its backward and its matrix are right."""

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        L_x, L_theta = super()._jacobians(op)
        return OffJvp(L_x), L_theta


class WeightJvpOff(bp.Linear):
    """``L^W`` with a wrong ``jvp``."""

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        L_x, L_theta = super()._jacobians(op)
        return L_x, {**L_theta, "W": OffJvp(L_theta["W"])}


TOKENS = (3, 5, 4)  # (B, T, n): small, so both modes can run
BIG = (8, 64, 48)  # B·T·n = 24,576 entries: "auto" checks along directions


def _x(shape: tuple[int, ...], scale: float = 1.0, seed: int = 0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape)


def _linear(cls: type[bp.Linear], n: int, w_scale: float = 1.0) -> bp.Linear:
    layer = cls(n, n, rng=np.random.default_rng(1))
    layer.W.value = layer.W.value * w_scale
    return layer


# -- a wrong derivative fails, at any scale ---------------------------------------------

WRONG: list[tuple[str, Any, str]] = [
    ("wrong h'", lambda n, s: WrongTanh(), "input 0: fast backward vs finite differences along u"),
    (
        "wrong weight gradient",
        lambda n, s: _linear(WeightGradOff, n, s),
        "parameter 'W': fast backward vs finite differences along u",
    ),
    (
        "wrong jvp of L^x",
        lambda n, s: _linear(JvpOff, n, s),
        "input 0: explicit Jacobian vs finite differences along u",
    ),
    (
        "wrong jvp of L^W",
        lambda n, s: _linear(WeightJvpOff, n, s),
        "parameter 'W': explicit Jacobian vs finite differences along u",
    ),
]
RIGHT = {
    "wrong h'": lambda n, s: bp.Tanh(),
    "wrong weight gradient": lambda n, s: _linear(bp.Linear, n, s),
    "wrong jvp of L^x": lambda n, s: _linear(bp.Linear, n, s),
    "wrong jvp of L^W": lambda n, s: _linear(bp.Linear, n, s),
}


@pytest.mark.parametrize("what, make, where", WRONG, ids=[w[0] for w in WRONG])
@pytest.mark.parametrize("g_scale", [1e-9, 1.0, 1e9])
@pytest.mark.parametrize("x_scale", [1e-3, 1.0, 1e3])
def test_a_wrong_layer_fails_along_directions(
    what: str, make: Any, where: str, g_scale: float, x_scale: float
) -> None:
    x = _x(TOKENS, x_scale)
    g = _x(TOKENS, g_scale, seed=2)
    n = TOKENS[-1]
    report = bp.gradcheck(RIGHT[what](n, 1.0), x, g_out=g, mode="directions")
    assert report.mode == "directions"  # the same numbers pass in the correct layer
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(make(n, 1.0), x, g_out=g, mode="directions")
    assert where in str(info.value)
    assert "along u_" in str(info.value), "entries named by their direction"


@pytest.mark.parametrize("w_scale", [1e-8, 1.0, 1e8])
def test_a_wrong_linear_fails_whatever_the_size_of_its_weights(w_scale: float) -> None:
    x = _x(TOKENS)
    bp.gradcheck(_linear(bp.Linear, TOKENS[-1], w_scale), x, mode="directions")
    for cls in (WeightGradOff, JvpOff, WeightJvpOff):
        with pytest.raises(bp.GradcheckError, match="along u"):
            bp.gradcheck(_linear(cls, TOKENS[-1], w_scale), x, mode="directions")


def test_the_dot_product_test_sees_what_differences_cannot() -> None:
    # A bias of 1e8 makes f so large that its central differences are known to a few
    # per cent only; a jvp 1 % off then passes both comparisons with differences, and
    # the dot-product test, which needs none, still fails it.
    class BigJvpOff(bp.Linear):
        def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
            L_x, L_theta = super()._jacobians(op)
            return OffJvp(L_x, 1.01), L_theta

    x = _x(TOKENS)
    right, wrong = _linear(bp.Linear, 4), _linear(BigJvpOff, 4)
    for layer in (right, wrong):
        layer.params["b"].value = np.full(4, 1e8)
    bp.gradcheck(right, x, mode="directions")
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(wrong, x, mode="directions")
    assert "input 0: dot-product test <v, L u> vs <v L, u> disagree" in str(info.value)


# -- correct layers pass ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (bp.Linear(4, 3, rng=0), (_x(TOKENS),)),
        (bp.Tanh(), (_x(TOKENS, 3.0),)),
        (bp.Branch(3), (_x(TOKENS),)),
        (bp.Multiply(), (_x(TOKENS), _x(TOKENS, seed=5))),
        (bp.L2Loss(), (_x((3, 4)), _x((3, 4), seed=6))),
        (bp.SoftmaxCrossEntropy(), (_x((3, 5)), np.array([0, 4, 2]))),
    ],
    ids=["Linear", "Tanh", "Branch", "Multiply", "L2Loss", "SoftmaxCrossEntropy"],
)
def test_correct_layers_pass_along_directions(layer: bp.Layer, inputs: tuple[Any, ...]) -> None:
    report = bp.gradcheck(layer, *inputs, mode="directions", directions=4)
    assert report.mode == "directions" and "'directions'" in str(report)
    n_float = sum(1 for x in inputs if x.dtype == np.float64)
    assert len(report.checks) == 3 * (n_float + len(layer.params))
    assert report.worst < 1e-6
    # And entry by entry too: both modes agree that the layer is right.
    assert bp.gradcheck(layer, *inputs, mode="entries").mode == "entries"


def test_auto_picks_directions_for_a_big_token_linear() -> None:
    x = _x(BIG)
    n = BIG[-1]
    assert x.size > MAX_DIFFERENCED and x.size * x.size > MAX_DENSE
    report = bp.gradcheck(bp.Linear(n, n, rng=0), x)
    assert report.mode == "directions"
    assert set(report.checks) == {
        f"{what}: {comparison}"
        for what in ("input 0", "parameter 'W'", "parameter 'b'")
        for comparison in (
            "fast backward vs finite differences along u",
            "explicit Jacobian vs finite differences along u",
            "dot-product test <v, L u> vs <v L, u>",
        )
    }
    assert report.worst < 1e-6


@pytest.mark.parametrize("make", [w[1] for w in WRONG], ids=[w[0] for w in WRONG])
def test_auto_fails_a_wrong_big_token_layer(make: Any) -> None:
    with pytest.raises(bp.GradcheckError, match="along u"):
        bp.gradcheck(make(BIG[-1], 1.0), _x(BIG))


def test_auto_picks_entries_for_a_small_layer() -> None:
    report = bp.gradcheck(bp.Linear(4, 3, rng=0), _x(TOKENS))
    assert report.mode == "entries"
    assert any("explicit Jacobian vs finite differences" in what for what in report.checks)


# -- graphs ------------------------------------------------------------------------------


def _net(middle: bp.Layer, first: type[bp.Linear] = bp.Linear, n: int = 4) -> bp.Sequential:
    rng = np.random.default_rng(7)
    return bp.Sequential([first(n, 6, rng=rng), middle, bp.Linear(6, 3, rng=rng)])


def test_a_graph_along_directions() -> None:
    x = _x(TOKENS)
    report = bp.gradcheck(_net(bp.Tanh()), x, mode="directions")
    assert report.mode == "directions"
    names = " | ".join(report.checks)
    for part in (
        "input 'x': fast backward vs explicit Algorithm 14.1",
        "parameter '0.W': fast backward vs finite differences along u",
        "parameter '2.b': graph Jacobians vs finite differences along u",
        "input 'x': dot-product test",
    ):
        assert part in names
    assert len(report.checks) == 4 * 5  # x and four parameters, four comparisons each


@pytest.mark.parametrize(
    "net, where",
    [
        (lambda: _net(WrongTanh()), "fast backward vs finite differences along u"),
        (lambda: _net(bp.Tanh(), JvpOff), "graph Jacobians vs finite differences along u"),
        (lambda: _net(bp.Tanh(), WeightGradOff), "parameter '0.W': fast backward vs explicit"),
    ],
    ids=["wrong h'", "wrong jvp", "wrong weight gradient"],
)
@pytest.mark.parametrize("shape", [TOKENS, (8, 64, 4)], ids=["small", "auto-directions"])
def test_a_wrong_graph_fails_along_directions(net: Any, where: str, shape: Any) -> None:
    x = _x(shape)
    mode = "directions" if shape == TOKENS else "auto"
    assert bp.gradcheck(_net(bp.Tanh()), x, mode=mode).mode == "directions"  # the right net
    with pytest.raises(bp.GradcheckError) as info:
        bp.gradcheck(net(), x, mode=mode)
    assert where in str(info.value)


def test_a_big_graph_chooses_directions() -> None:
    net = _net(bp.Tanh(), n=BIG[-1])
    report = bp.gradcheck(net, _x(BIG))
    assert report.mode == "directions"
    assert report.worst < 1e-6


# -- arguments ----------------------------------------------------------------------------


def test_a_bad_mode_or_number_of_directions_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        bp.gradcheck(bp.Tanh(), _x(TOKENS), mode="sideways")
    with pytest.raises(ValueError, match="directions must be a positive int"):
        bp.gradcheck(bp.Tanh(), _x(TOKENS), mode="directions", directions=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        bp.gradcheck(_net(bp.Tanh()), _x(TOKENS), mode="sideways")


def test_directions_leave_parameters_and_operating_point_alone() -> None:
    lin = _linear(WeightGradOff, 4)
    W0 = lin.W.value.copy()
    x = _x(TOKENS)
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(lin, x, mode="directions")
    np.testing.assert_array_equal(lin.W.value, W0)
    net = _net(bp.Tanh())
    values = [p.value.copy() for p in net.parameters()]
    bp.gradcheck(net, x, mode="directions")
    for p, v in zip(net.parameters(), values, strict=True):
        np.testing.assert_array_equal(p.value, v)
    g = _x((3, 5, 3), seed=8)
    g_0, _ = net.backward(g)  # still at the operating point of x
    net.forward(x)
    np.testing.assert_array_equal(g_0, net.backward(g)[0])


def test_a_kink_on_every_direction_cannot_be_checked_along_directions() -> None:
    x = _x(TOKENS)
    assert bp.gradcheck(bp.ReLU(), x, mode="directions").mode == "directions"
    x[0, 0, 0] = 0.0  # one entry at the kink: every direction crosses it
    with pytest.raises(bp.GradcheckError, match=r"could not check.*mode='entries'"):
        bp.gradcheck(bp.ReLU(), x, mode="directions")
    report = bp.gradcheck(bp.ReLU(), x, mode="entries")  # which excludes that entry only
    assert report.excluded["input 0: fast backward vs finite differences"] == (1, x.size)
