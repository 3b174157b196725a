"""Sequential: Algorithm 14.1 over a chain, in its fast and its literal (explicit) form."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.layers.backward import BatchSum


def rel_close(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    """``|a - b| <= rtol * max|b|``: relative to the array's scale, not entry by entry."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    assert float(np.abs(a - b).max(initial=0.0)) <= rtol * scale


def classifier(rng: np.random.Generator, sizes: tuple[int, ...] = (5, 8, 6, 4)) -> bp.Sequential:
    n0, n1, n2, n3 = sizes
    return bp.Sequential(
        [
            bp.Linear(n0, n1, rng=rng),
            bp.ReLU(),
            bp.Linear(n1, n2, rng=rng),
            bp.Tanh(),
            bp.Linear(n2, n3, rng=rng),
            bp.SoftmaxCrossEntropy(),
        ]
    )


def regressor(rng: np.random.Generator) -> bp.Sequential:
    return bp.Sequential(
        [bp.Linear(4, 6, rng=rng), bp.Sigmoid(), bp.Linear(6, 3, rng=rng), bp.Softplus()]
    )


# -- the chain equals the layers run by hand ---------------------------------------------


def test_forward_backward_equal_manual_chain() -> None:
    rng = np.random.default_rng(0)
    net = classifier(rng)
    x = rng.standard_normal((7, 5))
    y = rng.integers(0, 4, size=7)
    J = net.forward(x, y)
    g0, grads = net.backward()

    # The same layers by hand, in a second copy that shares the Parameters.
    l0, _, l2, _, l4, _ = net.layers
    copy = [
        bp.Linear(5, 8, W=l0.W, b=l0.b),
        bp.ReLU(),
        bp.Linear(8, 6, W=l2.W, b=l2.b),
        bp.Tanh(),
        bp.Linear(6, 4, W=l4.W, b=l4.b),
        bp.SoftmaxCrossEntropy(),
    ]
    h = x
    for layer in copy[:-1]:
        h = layer.forward(h)
    assert float(J) == float(copy[-1].forward(h, y))
    (g, _), _ = copy[-1].backward()
    manual: dict[bp.Parameter, np.ndarray] = {}
    for layer in reversed(copy[:-1]):
        g, layer_grads = layer.backward(g)
        for name, grad in layer_grads.items():
            manual[layer.params[name]] = grad
    np.testing.assert_array_equal(g0, g)
    assert set(grads) == set(manual) == set(net.parameters())
    for p in grads:
        np.testing.assert_array_equal(grads[p], manual[p])


def test_forward_returns_last_output_and_runs_every_layer() -> None:
    rng = np.random.default_rng(1)
    net = regressor(rng)
    x = rng.standard_normal((3, 4))
    out = net.forward(x)
    W1, b1 = net.layers[0].W.value, net.layers[0].b.value
    W2, b2 = net.layers[2].W.value, net.layers[2].b.value
    expected = np.logaddexp(0, (1 / (1 + np.exp(-(x @ W1.T + b1)))) @ W2.T + b2)
    np.testing.assert_allclose(out, expected, rtol=1e-13)


# -- fast and explicit agree -------------------------------------------------------------


def test_fast_and_explicit_agree_classifier() -> None:
    rng = np.random.default_rng(2)
    net = classifier(rng)
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 4, size=6)
    net.forward(x, y)
    g_fast, grads_fast = net.backward(mode="fast")
    g_exp, grads_exp = net.backward(mode="explicit")
    rel_close(g_exp, g_fast, 1e-12)
    assert set(grads_fast) == set(grads_exp)
    for p in grads_fast:
        rel_close(grads_exp[p], grads_fast[p], 1e-12)


def test_fast_and_explicit_agree_with_given_g_L() -> None:
    rng = np.random.default_rng(3)
    net = regressor(rng)
    x = rng.standard_normal((5, 4))
    target = rng.standard_normal((5, 3))
    out = net.forward(x)
    g_L = 2 * (out - target) / 5  # dJ/dx_L of the mean L2 loss, computed outside the chain
    g_fast, grads_fast = net.backward(g_L)
    g_exp, grads_exp = net.backward(g_L, mode="explicit")
    rel_close(g_exp, g_fast, 1e-12)
    for p in grads_fast:
        rel_close(grads_exp[p], grads_fast[p], 1e-12)
    # And a given g_L is the same as ending the chain with the L2 loss.
    with_loss = bp.Sequential([*net.layers, bp.L2Loss()])
    with_loss.forward(x, target)
    g_loss, grads_loss = with_loss.backward()
    np.testing.assert_allclose(g_loss, g_fast, rtol=1e-12)
    for p in grads_fast:
        np.testing.assert_allclose(grads_loss[p], grads_fast[p], rtol=1e-12)


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_input_grad_false(mode: str) -> None:
    rng = np.random.default_rng(4)
    net = classifier(rng)
    x = rng.standard_normal((4, 5))
    y = rng.integers(0, 4, size=4)
    net.forward(x, y)
    g0, grads = net.backward(mode=mode)
    none, grads_no_input = net.backward(mode=mode, input_grad=False)
    assert g0 is not None and none is None
    assert set(grads) == set(grads_no_input)
    for p in grads:
        np.testing.assert_array_equal(grads_no_input[p], grads[p])


def test_gradients_are_returned_not_accumulated() -> None:
    rng = np.random.default_rng(5)
    net = classifier(rng)
    x = rng.standard_normal((4, 5))
    y = rng.integers(0, 4, size=4)
    net.forward(x, y)
    g_a, grads_a = net.backward()
    g_b, grads_b = net.backward()
    np.testing.assert_array_equal(g_a, g_b)
    for p in grads_a:
        np.testing.assert_array_equal(grads_a[p], grads_b[p])
    # A new forward at other inputs gives that point's gradients, with nothing left over.
    fresh = classifier(np.random.default_rng(5))
    x2 = rng.standard_normal((4, 5))
    net.forward(x2, y)
    fresh.forward(x2, y)
    _, grads_net = net.backward()
    _, grads_fresh = fresh.backward()
    for p, q in zip(net.parameters(), fresh.parameters(), strict=True):
        np.testing.assert_array_equal(grads_net[p], grads_fresh[q])


# -- tied weights: eq. 14.47 -------------------------------------------------------------


def tied_net(rng: np.random.Generator) -> tuple[bp.Sequential, bp.Parameter]:
    W = bp.Parameter(rng.uniform(-0.6, 0.6, size=(3, 3)), name="W")
    first = bp.Linear(3, 3, W=W, b=rng.standard_normal(3))
    second = bp.Linear(3, 3, W=W, bias=False)
    return bp.Sequential([first, bp.Tanh(), second, bp.Sigmoid()]), W


def test_tied_weights_get_the_sum_of_both_uses() -> None:
    rng = np.random.default_rng(6)
    net, W = tied_net(rng)
    x = rng.standard_normal((4, 3))
    g_L = rng.standard_normal((4, 3))
    net.forward(x)
    _, grads = net.backward(g_L)
    assert list(net.parameters()).count(W) == 1
    assert sum(1 for p in grads if p is W) == 1
    # Manual sum: each use's own gradient, from the layers' own backward passes.
    first, tanh, second, sig = net.layers
    g, _ = sig.backward(g_L)
    g, grads_second = second.backward(g)
    g, _ = tanh.backward(g)
    _, grads_first = first.backward(g)
    np.testing.assert_allclose(grads[W], grads_first["W"] + grads_second["W"], rtol=1e-14)
    assert not np.allclose(grads_first["W"], 0) and not np.allclose(grads_second["W"], 0)
    _, grads_exp = net.backward(g_L, mode="explicit")
    rel_close(grads_exp[W], grads[W], 1e-12)


def test_tied_weights_against_finite_differences() -> None:
    rng = np.random.default_rng(7)
    net, W = tied_net(rng)
    x = rng.standard_normal((2, 3))
    report = bp.gradcheck(net, x)
    assert any("'0.W'" in k for k in report.checks)
    # And by hand: the scalar <g_L, f(x)> as a function of the one shared W.
    g_L = rng.standard_normal((2, 3))
    net.forward(x)
    _, grads = net.backward(g_L)
    W0 = W.value.copy()

    def f(value: np.ndarray) -> np.ndarray:
        W.value = value
        return np.sum(g_L * net.forward(x))

    numeric = bp.numerical_jacobian(f, W0, flat=True).reshape(3, 3)
    W.value = W0
    np.testing.assert_allclose(grads[W], numeric, rtol=1e-6, atol=1e-9)


def test_named_parameters() -> None:
    rng = np.random.default_rng(8)
    net = bp.Sequential([bp.Linear(2, 3, rng=rng), bp.ReLU(), bp.Linear(3, 1, bias=False, rng=rng)])
    named = net.named_parameters()
    assert list(named) == ["0.W", "0.b", "2.W"]
    assert named["0.W"] is net.layers[0].W
    assert named["0.b"] is net.layers[0].b
    assert named["2.W"] is net.layers[2].W
    assert net.parameters() == [named["0.W"], named["0.b"], named["2.W"]]
    tied, W = tied_net(rng)
    assert list(tied.named_parameters()) == ["0.W", "0.b"]
    assert tied.named_parameters()["0.W"] is W


# -- whole-chain Jacobians ---------------------------------------------------------------


def test_chain_jacobian_is_product_of_layer_jacobians() -> None:
    rng = np.random.default_rng(9)
    net = regressor(rng)
    B = 3
    x = rng.standard_normal((B, 4))
    net.forward(x)
    L_x, L_theta = net.jacobians()
    per_layer = [layer.jacobians()[0].to_dense() for layer in net.layers]
    expected = per_layer[-1]
    for D in reversed(per_layer[:-1]):
        expected = np.matmul(expected, D)
    assert (L_x.batch, *L_x.shape) == (B, 3, 4)
    np.testing.assert_allclose(L_x.to_dense(), expected, rtol=1e-12, atol=1e-15)
    # Finite differences of each example's output with respect to its own input.
    for b in range(B):

        def f(xb: np.ndarray, b: int = b) -> np.ndarray:
            xx = x.copy()
            xx[b] = xb
            return net.forward(xx)[b]

        np.testing.assert_allclose(
            L_x.to_dense()[b], bp.numerical_jacobian(f, x[b], flat=True), rtol=1e-6, atol=1e-9
        )
    net.forward(x)
    # A parameter's whole-chain Jacobian: ∂x_L/∂W1 per example, against finite differences.
    W1 = net.layers[0].W
    W0 = W1.value.copy()

    def f_w(value: np.ndarray) -> np.ndarray:
        W1.value = value
        return net.forward(x)

    numeric = bp.numerical_jacobian(f_w, W0, flat=True)  # (B*3, |W1|)
    W1.value = W0
    net.forward(x)
    np.testing.assert_allclose(
        L_theta[W1].to_dense().reshape(B * 3, -1), numeric, rtol=1e-6, atol=1e-9
    )


def test_chain_jacobian_of_tied_weights_is_summed() -> None:
    rng = np.random.default_rng(10)
    net, W = tied_net(rng)
    x = rng.standard_normal((2, 3))
    net.forward(x)
    _, L_theta = net.jacobians()
    W0 = W.value.copy()

    def f(value: np.ndarray) -> np.ndarray:
        W.value = value
        return net.forward(x)

    numeric = bp.numerical_jacobian(f, W0, flat=True)
    W.value = W0
    np.testing.assert_allclose(L_theta[W].to_dense().reshape(6, 9), numeric, rtol=1e-6, atol=1e-9)


# -- the checker on networks, and the literal mode at size -------------------------------


def test_gradcheck_on_sequential() -> None:
    rng = np.random.default_rng(11)
    net = classifier(rng, (3, 4, 4, 3))
    x = rng.standard_normal((3, 3))
    y = rng.integers(0, 3, size=3)
    report = bp.gradcheck(net, x, y)
    assert report.worst < 1e-5
    assert sum(k.startswith("parameter") for k in report.checks) == 4 * len(net.parameters())


def test_explicit_mode_at_size_agrees_with_fast() -> None:
    rng = np.random.default_rng(12)
    net = bp.Sequential(
        [
            bp.Linear(64, 128, rng=rng),
            bp.ReLU(),
            bp.Linear(128, 10, rng=rng),
            bp.SoftmaxCrossEntropy(),
        ]
    )
    x = rng.standard_normal((64, 64))
    y = rng.integers(0, 10, size=64)
    net.forward(x, y)
    g_fast, grads_fast = net.backward()
    g_exp, grads_exp = net.backward(mode="explicit")
    rel_close(g_exp, g_fast, 1e-12)
    for p in grads_fast:
        rel_close(grads_exp[p], grads_fast[p], 1e-12)


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_float32_chain_stays_float32(mode: str) -> None:
    def build(dtype: type) -> bp.Sequential:
        rng = np.random.default_rng(13)
        return bp.Sequential(
            [
                bp.Linear(5, 6, rng=rng, dtype=dtype),
                bp.Tanh(),
                bp.Linear(6, 3, rng=rng, dtype=dtype),
                bp.SoftmaxCrossEntropy(),
            ]
        )

    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 5))
    y = rng.integers(0, 3, size=4)
    net32, net64 = build(np.float32), build(np.float64)
    J32 = net32.forward(x.astype(np.float32), y)
    J64 = net64.forward(x, y)
    assert J32.dtype == np.float32
    np.testing.assert_allclose(J32, J64, rtol=1e-5)
    g32, grads32 = net32.backward(mode=mode)
    g64, grads64 = net64.backward(mode=mode)
    assert g32.dtype == np.float32
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)
    for p32, p64 in zip(net32.parameters(), net64.parameters(), strict=True):
        assert grads32[p32].dtype == np.float32
        np.testing.assert_allclose(grads32[p32], grads64[p64], rtol=1e-4, atol=1e-6)


def test_gradcheck_on_sequential_with_float_target():
    # The target of an L2 loss is data the chain compares against: the check
    # covers x and every parameter, and a wrong weight gradient still fails it.
    rng = np.random.default_rng(3)
    net = bp.Sequential([bp.Linear(3, 2, rng=rng), bp.Tanh(), bp.L2Loss()])
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    report = bp.gradcheck(net, x, y)
    assert report.worst < 1e-6
    assert any(what.startswith("input 'x'") for what in report.checks)
    assert not any(what.startswith("input 1") for what in report.checks)

    class OffLinear(bp.Linear):
        def _backward(self, op, g_out, input_grad):
            g_in, grads = super()._backward(op, g_out, input_grad)
            return g_in, {**grads, "W": grads["W"] * 1.001}

    bad = bp.Sequential([OffLinear(3, 2, rng=rng), bp.Tanh(), bp.L2Loss()])
    with pytest.raises(bp.GradcheckError, match="analytic"):
        bp.gradcheck(bad, x, y)


# -- layers whose output has no batch axis, and chains a Sequential cannot hold ----------


def test_explicit_mode_through_a_layer_that_sums_the_batch() -> None:
    # x_out = Σ_b tanh(W x_b + b): the explicit step must hand each example all of g_out.
    rng = np.random.default_rng(3)
    net = bp.Sequential([bp.Linear(3, 2, rng=rng), bp.Tanh(), BatchSum()])
    net.forward(rng.standard_normal((5, 3)))
    g_L = rng.standard_normal(2)
    fast_in, fast = net.backward(g_L)
    slow_in, slow = net.backward(g_L, mode="explicit")
    assert net.reduces_batch
    rel_close(slow_in, fast_in, 1e-12)
    for p in net.parameters():
        rel_close(slow[p], fast[p], 1e-12)


def test_a_branch_inside_a_chain_is_refused() -> None:
    with pytest.raises(ValueError, match=r"layer 1 \(Branch\(2\)\) has 2 outputs.*Graph"):
        bp.Sequential([bp.Linear(3, 2), bp.Branch(2), bp.ReLU()])


def test_non_loss_chain_without_g_L_names_the_missing_seed() -> None:
    net = bp.Sequential([bp.Linear(3, 2), bp.ReLU()])
    net.forward(np.ones((4, 3)))
    with pytest.raises(TypeError, match=r"Sequential.backward needs g_L .*\(4, 2\)"):
        net.backward()


# -- the chain loop and the executor's general walk --------------------------------------


def _run_both_ways(
    monkeypatch: pytest.MonkeyPatch, net: bp.Sequential, *inputs: np.ndarray
) -> list[tuple[object, bp.Gradients]]:
    """``forward`` then ``backward`` of ``net``, once as the chain loop that a Sequential
    runs and once by the executor's general walk over the DAG (chains not recognized)."""
    from backprop.graph import state

    results = [(net.forward(*inputs), net.backward())]
    monkeypatch.setattr(state, "_find_chain", lambda graph, plan: None)
    monkeypatch.setattr(net, "_chain", None)
    monkeypatch.setattr(net, "_plans", {})
    results.append((net.forward(*inputs), net.backward()))
    return results


def test_the_chain_loop_and_the_general_walk_give_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    net = classifier(rng)
    X, y = rng.standard_normal((7, 5)), rng.integers(0, 4, size=7)
    assert net._chain is not None  # a Sequential is recognized as one chain
    (J1, g1), (J2, g2) = _run_both_ways(monkeypatch, net, X, y)
    assert J1 == J2
    assert list(g1.inputs) == list(g2.inputs) == ["x"]
    np.testing.assert_array_equal(g1.inputs["x"], g2.inputs["x"])
    assert list(g1.params) == list(g2.params) == net.parameters()
    for p in net.parameters():
        np.testing.assert_array_equal(g1.params[p], g2.params[p])
        assert [name for name, _ in g1.per_use[p]] == [name for name, _ in g2.per_use[p]]


def test_a_failing_layer_in_the_chain_loop_is_named_and_changes_nothing() -> None:
    rng = np.random.default_rng(12)
    net = classifier(rng)
    X, y = rng.standard_normal((3, 5)), rng.integers(0, 4, size=3)
    net.forward(X, y)
    ops = [layer._op for layer in net]
    with pytest.raises(ValueError, match=r"layer 5 .*labels \(3,\).*labels must lie in 0\.\.3"):
        net.forward(X, np.array([0, 1, 9]))  # the loss, last, refuses a label
    with pytest.raises(ValueError, match=r"layer 0 \(Linear.*x \(3, 6\)"):
        net.forward(np.hstack([X, X[:, :1]]), y)  # the first layer refuses the width
    assert [layer._op for layer in net] == ops
    grads = net.backward()  # still at the first forward's point
    assert grads.inputs["x"].shape == X.shape


def test_a_graph_that_is_a_chain_runs_as_one_and_fan_out_does_not() -> None:
    g = bp.Graph()
    x = g.input("x")
    g.output(g.add(bp.Tanh(), g.add(bp.Linear(3, 2, rng=0), x)))
    assert g._chain is not None
    h = bp.Graph()
    x = h.input("x")
    t = h.add(bp.Tanh(), x)
    h.output(h.add(bp.Add(), t, h.add(bp.Sigmoid(), t)))  # t is read twice: a fan-out
    assert h._chain is None
    u = bp.Graph()  # an input that no layer reads: the general walk gives it its value
    x, _ = u.input("x"), u.input("unused")
    u.output(u.add(bp.Tanh(), x))
    assert u._chain is None
    X = np.ones((2, 3))
    np.testing.assert_array_equal(u.forward(x=X, unused=X), np.tanh(X))
    assert u.backward(np.ones((2, 3))).inputs["unused"].shape == (2, 3)


def test_a_parameter_that_no_gradient_reaches_gets_zeros_beside_a_tied_one() -> None:
    # Three uses of one tied W on the seeded output, and two Parameters only on the other
    # output: as many uses as Parameters, yet two Parameters have none.
    rng = np.random.default_rng(3)
    W = bp.Parameter(rng.standard_normal((3, 3)))
    g = bp.Graph()
    x = g.input("x")
    a, b = g.add(bp.Branch(2), x)
    seeded = a
    for _ in range(3):
        seeded = g.add(bp.Linear(3, 3, W=W, bias=False), seeded)
    other = g.add(bp.Linear(3, 2, rng=1), b, name="other")
    g.output(seeded, other, names=["y", "z"])
    X = rng.standard_normal((4, 3))
    g.forward(x=X)
    grads = g.backward({"y": np.ones((4, 3))})
    unused = g.node("other").layer.params
    for p in unused.values():
        np.testing.assert_array_equal(grads.params[p], np.zeros(p.shape))
        assert grads.per_use[p] == []
    np.testing.assert_allclose(grads.params[W], sum(t for _, t in grads.per_use[W]), rtol=1e-15)
    assert len(grads.per_use[W]) == 3
