"""Optimizers against steps worked by hand, weight decay, tied Parameters, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp


def param(*values: float, dtype: type = np.float64) -> bp.Parameter:
    return bp.Parameter(np.array(values, dtype=dtype))


# ------------------------------------------------------------------ hand-computed steps


def test_sgd_step_is_eq_14_9() -> None:
    # θ = [1, -2], g = [0.5, 0.25], η = 0.1: θ - ηg = [0.95, -2.025]
    p = param(1.0, -2.0)
    bp.SGD([p], lr=0.1).step({p: np.array([0.5, 0.25])})
    np.testing.assert_allclose(p.value, [0.95, -2.025], rtol=0, atol=1e-15)


def test_sgd_weight_decay_adds_lambda_theta() -> None:
    # g + λθ = [0.5 + 0.1, 0.25 - 0.2] = [0.6, 0.05]; θ - 0.1 (g + λθ) = [0.94, -2.005]
    p = param(1.0, -2.0)
    bp.SGD([p], lr=0.1, weight_decay=0.1).step({p: np.array([0.5, 0.25])})
    np.testing.assert_allclose(p.value, [0.94, -2.005], rtol=0, atol=1e-15)


def test_momentum_three_steps() -> None:
    # μ = 0.9, η = 0.1, θ = 1:
    # g = 2:  v = 2,                 θ = 1 - 0.2     = 0.8
    # g = 2:  v = 0.9·2 + 2 = 3.8,   θ = 0.8 - 0.38  = 0.42
    # g = -1: v = 0.9·3.8 - 1 = 2.42, θ = 0.42 - 0.242 = 0.178
    p = param(1.0)
    opt = bp.SGD([p], lr=0.1, momentum=0.9)
    for g, theta, v in ((2.0, 0.8, 2.0), (2.0, 0.42, 3.8), (-1.0, 0.178, 2.42)):
        opt.step({p: np.array([g])})
        np.testing.assert_allclose(p.value, [theta], rtol=1e-14)
        np.testing.assert_allclose(opt.state[p]["v"], [v], rtol=1e-14)


def test_adam_two_steps() -> None:
    # η = 0.1, β = (0.9, 0.999), ε = 1e-8, θ = 1.
    # t = 1, g = 2: m = 0.2, v = 0.004, m̂ = 2, v̂ = 4, θ = 1 - 0.1·2/(2 + 1e-8) = 0.9000000005
    # t = 2, g = 1: m = 0.28, v = 0.004996, m̂ = 0.28/0.19 = 1.47368421052632,
    #   v̂ = 0.004996/0.001999 = 2.49924962481244, √v̂ = 1.58090152280667,
    #   θ = 0.9000000005 - 0.1·1.47368421052632/1.58090152280667 = 0.806782037208510
    p = param(1.0)
    opt = bp.Adam([p], lr=0.1)
    opt.step({p: np.array([2.0])})
    np.testing.assert_allclose(p.value, [0.9000000005], rtol=1e-14)
    opt.step({p: np.array([1.0])})
    np.testing.assert_allclose(p.value, [0.806782037208510], rtol=1e-13)
    np.testing.assert_allclose(opt.state[p]["m"], [0.28], rtol=1e-14)
    np.testing.assert_allclose(opt.state[p]["v"], [0.004996], rtol=1e-14)
    assert opt.state[p]["t"] == 2


def test_adam_weight_decay_coupled_and_decoupled() -> None:
    # θ = [1, 2], g = 0, λ = 0.5, η = 0.1.
    # coupled (L2): g + λθ = [0.5, 1]; Adam's first step is η·sign: θ = [0.9, 1.9]
    # decoupled (AdamW): the adaptive step of g = 0 is 0; θ - ηλθ = [0.95, 1.9]
    coupled, decoupled = param(1.0, 2.0), param(1.0, 2.0)
    bp.Adam([coupled], lr=0.1, weight_decay=0.5).step({coupled: np.zeros(2)})
    bp.Adam([decoupled], lr=0.1, weight_decay=0.5, decoupled=True).step({decoupled: np.zeros(2)})
    np.testing.assert_allclose(coupled.value, [0.9, 1.9], rtol=1e-7)
    np.testing.assert_allclose(decoupled.value, [0.95, 1.9], rtol=1e-14)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: bp.SGD(ps, lr=0.1),
        lambda ps: bp.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda ps: bp.Adam(ps, lr=0.1, weight_decay=0.01),
    ],
)
def test_float32_parameters_stay_float32(make) -> None:
    p = param(1.0, -1.0, dtype=np.float32)
    opt = make([p])
    for _ in range(2):
        opt.step({p: np.array([0.5, 0.5], dtype=np.float32)})
    assert p.value.dtype == np.float32
    assert p.value[0] < 1.0 and p.value[1] < -1.0


def test_state_is_per_parameter() -> None:
    a, b = param(1.0), param(1.0)
    opt = bp.SGD([a, b], lr=0.1, momentum=0.5)
    opt.step({a: np.array([1.0]), b: np.array([3.0])})
    opt.step({a: np.array([1.0])})  # b has no gradient this time: untouched
    # a: v = 1 then 0.5 + 1 = 1.5; θ = 1 - 0.1 - 0.15 = 0.75.  b: one step, 1 - 0.3 = 0.7
    np.testing.assert_allclose(a.value, [0.75], rtol=1e-14)
    np.testing.assert_allclose(b.value, [0.7], rtol=1e-14)
    np.testing.assert_allclose(opt.state[b]["v"], [3.0])


# ------------------------------------------------------------------ tied Parameters


def test_tied_parameter_is_updated_once_with_the_summed_gradient() -> None:
    rng = np.random.default_rng(0)
    W = bp.Parameter(rng.standard_normal((2, 2)))
    first = bp.Linear(2, 2, W=W, bias=False)
    second = bp.Linear(2, 2, W=W, bias=False)
    net = bp.Sequential([first, second, bp.L2Loss()])
    x, y = rng.standard_normal((1, 2)), rng.standard_normal((1, 2))
    W0 = W.value.copy()
    # By hand for one example: J = ‖W W x - y‖², r = W W x - y,
    # dJ/dW = 2 r (W x)ᵀ (second use) + 2 Wᵀ r xᵀ (first use).
    h = W0 @ x[0]
    r = W0 @ h - y[0]
    grad = 2 * np.outer(r, h) + 2 * np.outer(W0.T @ r, x[0])
    opt = bp.SGD(net, lr=0.1)
    assert opt.params == [W]
    net.forward(x, y)
    _, grads = net.backward()
    assert list(grads) == [W]
    opt.step(grads)
    np.testing.assert_allclose(W.value, W0 - 0.1 * grad, rtol=1e-12)


def test_graph_gradients_object_is_accepted() -> None:
    g = bp.Graph()
    x = g.input("x")
    lin = bp.Linear(2, 1, W=np.array([[1.0, 2.0]]), b=np.array([0.0]))
    g.output(g.add(lin, x))
    g.forward(x=np.array([[3.0, 4.0]]))
    # output = 3 + 8 = 11; with seed 1: dJ/dW = x = [3, 4], dJ/db = 1
    bp.SGD(g, lr=0.5).step(g.backward(seed=np.ones((1, 1))))
    np.testing.assert_allclose(lin.W.value, [[-0.5, 0.0]])
    np.testing.assert_allclose(lin.b.value, [-0.5])


# ------------------------------------------------------------------ bad input changes nothing


def _snapshot(opt: bp.Optimizer) -> list:
    return [(p.value.copy(), {k: np.copy(v) for k, v in opt.state[p].items()}) for p in opt.params]


def _assert_unchanged(opt: bp.Optimizer, before: list) -> None:
    for p, (value, state) in zip(opt.params, before, strict=True):
        np.testing.assert_array_equal(p.value, value)
        assert opt.state[p].keys() == state.keys()
        for k in state:
            np.testing.assert_array_equal(opt.state[p][k], state[k])


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize(
    "bad, error, words",
    [
        (lambda b: np.zeros(3), ValueError, ["shape (3,)", "expected (2,)"]),
        (lambda b: np.array([np.nan, 0.0]), ValueError, ["non-finite", "no parameter"]),
        (lambda b: np.array([1, 2]), TypeError, ["dtype int"]),
    ],
)
def test_bad_gradient_changes_nothing(kind, bad, error, words) -> None:
    a, b = param(1.0, 2.0), param(3.0, 4.0)
    opt = {
        "sgd": lambda: bp.SGD([a, b], lr=0.1),
        "momentum": lambda: bp.SGD([a, b], lr=0.1, momentum=0.9),
        "adam": lambda: bp.Adam([a, b], lr=0.1),
    }[kind]()
    opt.step({a: np.ones(2), b: np.ones(2)})  # some state to protect
    before = _snapshot(opt)
    with pytest.raises(error) as info:
        opt.step({a: np.ones(2), b: bad(b)})  # a is fine and comes first
    for w in words:
        assert w in str(info.value)
    _assert_unchanged(opt, before)


def test_unknown_parameter_and_wrong_container() -> None:
    a, stranger = param(1.0), param(2.0)
    opt = bp.Adam([a], lr=0.1)
    with pytest.raises(ValueError, match="not one this optimizer updates"):
        opt.step({a: np.ones(1), stranger: np.ones(1)})
    with pytest.raises(TypeError, match="keys must be Parameters"):
        opt.step({"W": np.ones(1)})
    with pytest.raises(TypeError, match="takes a mapping"):
        opt.step([np.ones(1)])
    np.testing.assert_array_equal(a.value, [1.0])
    assert opt.state[a] == {}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: bp.SGD(ps, lr=0), "lr must lie in"),
        (lambda ps: bp.SGD(ps, lr=-1.0), "lr must lie in"),
        (lambda ps: bp.SGD(ps, lr=float("nan")), "lr must lie in"),
        (lambda ps: bp.SGD(ps, lr=0.1, momentum=1.0), "momentum must lie in"),
        (lambda ps: bp.SGD(ps, lr=0.1, weight_decay=-0.1), "weight_decay must lie in"),
        (lambda ps: bp.Adam(ps, betas=(0.9, 1.0)), r"betas\[1\] must lie in"),
        (lambda ps: bp.Adam(ps, eps=0.0), "eps must lie in"),
    ],
)
def test_bad_settings_are_rejected(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make([param(1.0)])


def test_repr_names_the_settings() -> None:
    p = param(1.0)
    assert repr(bp.SGD([p], lr=0.1, momentum=0.9)) == "SGD(lr=0.1, momentum=0.9)"
    assert repr(bp.Adam([p], weight_decay=0.01)) == "Adam(lr=0.001, weight_decay=0.01)"


# ------------------------------------------------------------------ ownership of arrays


def test_momentum_keeps_its_own_copy_of_the_first_gradient() -> None:
    # The caller reuses its gradient buffer after the step; the velocity must not follow.
    p = param(1.0)
    opt = bp.SGD([p], lr=0.1, momentum=0.9)
    g = np.array([2.0])
    opt.step({p: g})
    g[0] = 100.0
    np.testing.assert_array_equal(opt.state[p]["v"], [2.0])
    opt.step({p: np.array([2.0])})  # v = 0.9·2 + 2 = 3.8, θ = 0.8 - 0.38
    np.testing.assert_allclose(p.value, [0.42], rtol=1e-14)


@pytest.mark.parametrize("make", [lambda ps: bp.SGD(ps, lr=0.1), lambda ps: bp.Adam(ps)])
def test_updated_values_are_read_only(make) -> None:
    p = param(1.0, 2.0)
    make([p]).step({p: np.array([0.5, 0.5])})
    assert not p.value.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        p.value[0] = 3.0
