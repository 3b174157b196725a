"""Edges of the layer and graph contract: labels read by several losses, stale
operating points, dtype inference, read-only gradients, one-line Jacobian labels,
and argument checks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import backprop as bp
from backprop.layers.worked import Shift

RNG = np.random.default_rng(7)


# -- integer labels used by several nodes -------------------------------------------


def two_head_graph() -> tuple[bp.Graph, list[bp.Linear]]:
    g = bp.Graph()
    x, labels = g.input("x"), g.input("labels")
    heads = [bp.Linear(3, 4, rng=i) for i in range(2)]
    J1 = g.add(bp.SoftmaxCrossEntropy(), g.add(heads[0], x), labels)
    J2 = g.add(bp.SoftmaxCrossEntropy(), g.add(heads[1], x), labels)
    g.output(J1, J2)
    return g, heads


def test_labels_read_by_two_losses_go_through_the_automatic_branch() -> None:
    g, heads = two_head_graph()
    X = RNG.standard_normal((5, 3))
    y = np.array([0, 1, 2, 3, 1])
    J = g.forward(x=X, labels=y)
    grads = g.backward()
    assert list(grads.inputs) == ["x"]  # labels get no gradient
    # Each head is an ordinary classifier: its cost and gradients are those of a
    # chain of its own with the same Parameters.
    total = np.zeros_like(X)
    for J_head, head in zip(J, heads, strict=True):
        alone = bp.Sequential([bp.Linear(3, 4, W=head.W, b=head.b), bp.SoftmaxCrossEntropy()])
        assert float(alone.forward(X, y)) == pytest.approx(float(J_head), rel=1e-15)
        g_0, own = alone.backward()
        np.testing.assert_allclose(grads.params[head.W], own[head.W], rtol=1e-14)
        total += g_0
    np.testing.assert_allclose(grads.inputs["x"], total, rtol=1e-14)
    explicit = g.backward(mode="explicit")
    np.testing.assert_allclose(explicit.inputs["x"], grads.inputs["x"], rtol=1e-12)
    bp.gradcheck(g, x=X, labels=y)


def test_a_branch_of_labels_passes_them_on_and_sends_no_gradient() -> None:
    branch = bp.Branch(2)
    y = np.array([2, 0, 1])
    a, b = branch.forward(y)
    np.testing.assert_array_equal(a, y)
    np.testing.assert_array_equal(b, y)
    assert a.dtype == y.dtype
    assert branch.backward((None, None)) == (None, {})
    with pytest.raises(TypeError, match=r"integer data .*no gradient"):
        branch.backward((np.ones(3), None))
    with pytest.raises(TypeError, match="no Jacobian"):
        branch.jacobians()


# -- stale operating points in a chain ------------------------------------------------


def test_sequential_refuses_a_layer_run_on_its_own_since_the_chains_forward() -> None:
    first = bp.Linear(3, 3, rng=0)
    net = bp.Sequential([first, bp.Tanh()])
    X, G = RNG.standard_normal((2, 3)), RNG.standard_normal((2, 3))
    net.forward(X)
    before = net.backward(G)[1][first.W]
    first.forward(5 * X)  # now first's operating point is not the chain's
    with pytest.raises(RuntimeError, match=r"layer 0 \(Linear\(3→3\)\) was run outside this graph"):
        net.backward(G)
    net.forward(X)  # the chain's own forward makes it consistent again
    np.testing.assert_array_equal(net.backward(G)[1][first.W], before)


# -- dtype of a Linear built from given values --------------------------------------


def test_linear_takes_the_dtype_of_given_weights() -> None:
    lin = bp.Linear(2, 3, W=np.ones((3, 2), np.float32), b=np.zeros(3, np.float32))
    assert lin.W.dtype == lin.b.dtype == np.float32
    assert lin.forward(np.ones((1, 2), np.float32)).dtype == np.float32
    tied = bp.Linear(2, 3, W=lin.W)  # a float32 Parameter: the layer is float32
    assert tied.b.dtype == np.float32
    assert bp.Linear(2, 3, W=[[1, 0], [0, 1], [1, 1]]).W.dtype == np.float64


def test_linear_refuses_weights_of_another_dtype_than_the_one_asked_for() -> None:
    with pytest.raises(TypeError, match=r"W: expected dtype float64, got float32"):
        bp.Linear(2, 3, W=np.ones((3, 2), np.float32), dtype=np.float64)
    with pytest.raises(TypeError, match=r"b: expected dtype float32, got float64"):
        bp.Linear(2, 3, W=np.ones((3, 2), np.float32), b=np.zeros(3))


# -- gradients passed on unchanged are read-only ------------------------------------


@pytest.mark.parametrize(
    ("layer", "inputs"),
    [
        (bp.Reshape(6), [RNG.standard_normal((2, 2, 3))]),
        (bp.Flatten(), [RNG.standard_normal((2, 2, 3))]),
        (Shift(1.0), [RNG.standard_normal((2, 6))]),
        (bp.Merge(), [RNG.standard_normal((2, 2)), RNG.standard_normal((2, 4))]),
        (bp.Add(), [RNG.standard_normal((2, 6)), RNG.standard_normal((2, 6))]),
    ],
    ids=lambda v: repr(v) if isinstance(v, bp.Layer) else "",
)
def test_a_gradient_passed_on_unchanged_cannot_edit_the_callers_g_out(
    layer: bp.Layer, inputs: list[np.ndarray]
) -> None:
    out = layer.forward(*inputs)
    g_out = RNG.standard_normal(out.shape)
    kept = g_out.copy()
    g_in, _ = layer.backward(g_out)
    for g in g_in if isinstance(g_in, tuple) else (g_in,):
        assert not g.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            g[...] = 0
    np.testing.assert_array_equal(g_out, kept)


def test_a_branch_of_one_hands_back_a_read_only_gradient() -> None:
    branch = bp.Branch(1)
    branch.forward(RNG.standard_normal((2, 3)))
    g = RNG.standard_normal((2, 3))
    (g_in, _) = branch.backward((g,))
    np.testing.assert_array_equal(g_in, g)
    assert not g_in.flags.writeable


# -- Jacobian labels of long chains stay one short line ------------------------------


def test_the_label_of_a_long_chain_names_its_ends_and_counts_its_factors() -> None:
    X = RNG.standard_normal((2, 3)) * 0.1
    net = bp.Sequential([bp.Tanh() for _ in range(500)])
    net.forward(X)
    L_x, _ = net.jacobians()
    assert L_x.label == "tanh'(x_in) · … · tanh'(x_in) (500 factors)"
    assert len(repr(L_x)) < 120
    expected = np.ones_like(X)
    h = X
    for _ in range(500):
        h = np.tanh(h)
        expected = expected * (1 - h * h)  # the chain of diagonals, entry by entry
    np.testing.assert_allclose(L_x.d, expected, rtol=1e-12)
    short = bp.Sequential([bp.Tanh(), bp.Sigmoid()])
    short.forward(X)
    assert short.jacobians()[0].label == "sigmoid'(x_in) · tanh'(x_in)"


# -- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: bp.LeakyReLU("a"), TypeError, "LeakyReLU: slope must be a number"),
        (lambda: bp.Branch(True), ValueError, "Branch: n must be a positive integer"),
        (lambda: bp.Merge(True), ValueError, "Merge: n must be a positive integer"),
        (lambda: bp.Merge().forward(), TypeError, "Merge.forward needs at least one input"),
    ],
)
def test_bad_arguments_get_a_clear_error(
    build: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build()


def test_a_pointwise_derivative_of_the_wrong_shape_is_refused() -> None:
    layer = bp.Pointwise(np.sin, lambda x: np.cos(x)[:, :1], name="sin")
    x = RNG.standard_normal((2, 3))
    layer.forward(x)
    with pytest.raises(ValueError, match=r"h' returned shape \(2, 1\) for an input of shape"):
        layer.backward(np.ones((2, 3)))
    linear = bp.Pointwise(lambda x: 3 * x, lambda x: np.float64(3.0), name="triple")
    linear.forward(x)
    np.testing.assert_array_equal(linear.backward(np.ones((2, 3)))[0], np.full((2, 3), 3.0))
