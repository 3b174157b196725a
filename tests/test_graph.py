"""Graph: any DAG forward and backward, fan-out, tied weights, composition, modes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.graph import topological_order
from backprop.layers.worked import Scale

B = 3


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


# -- a graph checked against independent numpy ----------------------------------------


def design_graph(rng: np.random.Generator) -> tuple[bp.Graph, bp.Linear, bp.Linear]:
    """The DESIGN example: linear, branch, relu | tanh, merge, linear, L2 loss."""
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    lin1, lin2 = bp.Linear(4, 3, rng=rng), bp.Linear(6, 2, rng=rng)
    h = g.add(lin1, x)
    a, b = g.add(bp.Branch(2), h)
    m = g.add(bp.Merge(), g.add(bp.ReLU(), a), g.add(bp.Tanh(), b))
    J = g.add(bp.L2Loss(), g.add(lin2, m), y)
    g.output(J)
    return g, lin1, lin2


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_merge_branch_graph_against_numpy(mode: str) -> None:
    rng = np.random.default_rng(1)
    g, lin1, lin2 = design_graph(rng)
    X, Y = rand(rng, 5, 4), rand(rng, 5, 2)
    W1, b1, W2, b2 = lin1.W.value, lin1.b.value, lin2.W.value, lin2.b.value
    # Forward and backward by hand (eq. 14.12, 14.37, 14.34, 14.41, 14.46).
    h = X @ W1.T + b1
    m = np.concatenate([np.maximum(h, 0), np.tanh(h)], axis=1)
    out = m @ W2.T + b2
    J = np.sum((out - Y) ** 2) / 5
    g_out = 2 * (out - Y) / 5
    g_m = g_out @ W2
    g_h = g_m[:, :3] * (h >= 0) + g_m[:, 3:] * (1 - np.tanh(h) ** 2)  # the branch sums
    expected = {
        lin1.W: g_h.T @ X,
        lin1.b: g_h.sum(0),
        lin2.W: g_out.T @ m,
        lin2.b: g_out.sum(0),
    }
    assert g.forward(x=X, y=Y) == pytest.approx(J, rel=1e-14)
    grads = g.backward(mode=mode)
    np.testing.assert_allclose(grads.inputs["x"], g_h @ W1, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grads.inputs["y"], -g_out, rtol=1e-12, atol=1e-15)
    assert set(grads.params) == set(expected)
    for p, value in expected.items():
        np.testing.assert_allclose(grads.params[p], value, rtol=1e-12, atol=1e-15)
    assert grads[lin1.W] is grads.params[lin1.W] and grads["x"] is grads.inputs["x"]


def test_figure_14_20_like_dag() -> None:
    """Two inputs, a branch, a merge of three paths, a skip connection and a loss."""
    rng = np.random.default_rng(2)
    g = bp.Graph()
    x, u, y = g.input("x"), g.input("u"), g.input("y")
    h = g.add(bp.Linear(3, 4, rng=rng), x)
    h1, h2, h3 = g.add(bp.Branch(3), g.add(bp.Tanh(), h))
    p = g.add(bp.Linear(4, 2, rng=rng), h1)
    q = g.add(bp.Multiply(), h2, g.add(bp.Linear(2, 4, rng=rng), u))
    m = g.add(bp.Merge(3), p, q, g.add(bp.Sigmoid(), h3))
    s = g.add(bp.Add(), g.add(bp.Linear(10, 4, rng=rng), m), h)  # h is read twice: fan-out
    J = g.add(bp.L2Loss(), g.add(bp.Linear(4, 2, rng=rng), s), y)
    g.output(J)
    feed = {"x": rand(rng, B, 3), "u": rand(rng, B, 2), "y": rand(rng, B, 2)}
    report = bp.gradcheck(g, **feed)
    n_params = len(g.parameters())
    assert n_params == 10
    assert len(report.checks) == 4 * (3 + n_params) + 1
    assert report.worst < 1e-5
    assert [n.name for n in g.nodes() if n.auto] == ["linear_0_fanout"]


# -- random DAGs against finite differences ---------------------------------------------


def random_dag(seed: int, scalar: bool = True) -> tuple[bp.Graph, dict[str, np.ndarray]]:
    """A random DAG of Linear/Tanh/Add/Multiply/Merge with fan-out and tied weights."""
    rng = np.random.default_rng(seed)
    g = bp.Graph()
    pool = [(g.input("x"), 4), (g.input("u"), 3)]
    feed = {"x": rand(rng, B, 4), "u": rand(rng, B, 3)}
    linears: dict[tuple[int, int], bp.Linear] = {}
    for _ in range(int(rng.integers(6, 12))):
        op = rng.choice(["linear", "linear", "tanh", "add", "multiply", "merge"])
        h, w = pool[int(rng.integers(len(pool)))]
        if op == "linear":
            n_out = int(rng.integers(2, 5))
            prev = linears.get((w, n_out))
            if prev is not None and rng.random() < 0.6:  # tie to an earlier layer
                layer = bp.Linear(w, n_out, W=prev.W, b=prev.b)
            else:
                layer = linears[(w, n_out)] = bp.Linear(w, n_out, rng=rng)
            pool.append((g.add(layer, h), n_out))
        elif op == "tanh":
            pool.append((g.add(bp.Tanh(), h), w))
        elif op in ("add", "multiply"):
            same = [hw for hw in pool if hw[1] == w]  # may be h itself: a + a
            other = same[int(rng.integers(len(same)))][0]
            layer = bp.Add() if op == "add" else bp.Multiply()
            pool.append((g.add(layer, h, other), w))
        else:
            picks = [pool[int(i)] for i in rng.integers(len(pool), size=int(rng.integers(2, 4)))]
            pool.append(
                (g.add(bp.Merge(len(picks)), *(p for p, _ in picks)), sum(w for _, w in picks))
            )
    # Everything built so far feeds the output, through one more merge.
    top = g.add(bp.Merge(len(pool) - 2), *(h for h, _ in pool[2:]))
    width = sum(w for _, w in pool[2:])
    out = g.add(bp.Linear(width, 2, rng=rng), top)
    if scalar:
        y = g.input("y")
        feed["y"] = rand(rng, B, 2)
        g.output(g.add(bp.L2Loss(), out, y))
    else:
        g.output(out)
    return g, feed


@pytest.mark.parametrize("seed", range(8))
def test_random_dag_gradcheck(seed: int) -> None:
    g, feed = random_dag(seed, scalar=seed % 2 == 0)
    report = bp.gradcheck(g, feed)
    n_inputs = len(feed)
    assert len(report.checks) == 4 * (n_inputs + len(g.parameters())) + 1
    assert report.worst < 1e-5


def test_random_dags_have_fanout_and_ties() -> None:
    # The generator really exercises what the tests above claim to check.
    fanouts = ties = 0
    for seed in range(8):
        g, _ = random_dag(seed)
        fanouts += sum(n.auto for n in g.nodes())
        linears = [n.layer for n in g.nodes() if isinstance(n.layer, bp.Linear)]
        ties += len(linears) - len({id(lin.W) for lin in linears})
    assert fanouts >= 8 and ties >= 1


@pytest.mark.parametrize("seed", range(8))
def test_fast_and_explicit_modes_agree(seed: int) -> None:
    g, feed = random_dag(seed, scalar=seed % 2 == 1)
    out = g.forward(feed)
    seed_arr = None if np.ndim(out) == 0 else np.random.default_rng(seed).standard_normal(out.shape)
    fast = g.backward(seed_arr)
    explicit = g.backward(seed_arr, mode="explicit")
    assert list(fast.inputs) == list(explicit.inputs) == list(feed)
    for k in fast.inputs:
        np.testing.assert_allclose(fast.inputs[k], explicit.inputs[k], rtol=1e-12, atol=1e-14)
    for p in fast.params:
        np.testing.assert_allclose(fast.params[p], explicit.params[p], rtol=1e-12, atol=1e-14)


def test_gradcheck_fails_on_a_wrong_layer_inside_a_graph() -> None:
    class WrongTanh(bp.Tanh):
        def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
            return 1 - 0.9 * x_out * x_out  # wrong by 10% of tanh²

    rng = np.random.default_rng(3)
    g = bp.Graph()
    x = g.input("x")
    g.output(
        g.add(bp.Linear(3, 2, rng=rng), g.add(WrongTanh(), g.add(bp.Linear(2, 3, rng=rng), x)))
    )
    with pytest.raises(bp.GradcheckError, match="finite differences"):
        bp.gradcheck(g, x=rand(rng, B, 2))


# -- fan-out ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_a_plus_a_gets_twice_the_gradient(mode: str) -> None:
    g = bp.Graph()
    a = g.input("a")
    g.output(g.add(bp.Add(), a, a))
    A = np.array([[1.0, -2.0, 0.5]])
    np.testing.assert_array_equal(g.forward(a=A), [[2.0, -4.0, 1.0]])
    seed = np.array([[1.0, 10.0, -3.0]])
    np.testing.assert_array_equal(g.backward(seed, mode=mode).inputs["a"], 2 * seed)
    info = {n.name: n for n in g.nodes()}
    assert info["a_fanout"].auto and info["a_fanout"].inputs == ("a",)
    assert info["add_0"].inputs == ("a_fanout:0", "a_fanout:1")


def test_three_readers_and_a_user_branch_output_read_twice() -> None:
    g = bp.Graph()
    x = g.input("x")
    s1, s2, s3 = (Scale(c) for c in (2.0, 3.0, 5.0))
    left, right = g.add(bp.Branch(2), x, name="split")
    total = g.add(bp.Add(), g.add(s1, left), g.add(s2, left))  # left read twice
    total = g.add(bp.Add(), total, g.add(s3, left))  # and a third time
    g.output(g.add(bp.Multiply(), total, right))
    X = np.array([[2.0]])
    # f = (2 + 3 + 5) x · x = 10 x², df/dx = 20 x = 40
    assert g.forward(x=X).item() == 40.0
    grads = g.backward(seed=np.ones((1, 1)))
    assert grads.inputs["x"].item() == 40.0
    assert [grads.params[s.params["a"]].item() for s in (s1, s2, s3)] == [4.0, 4.0, 4.0]
    auto = [n for n in g.nodes() if n.auto]
    assert [(n.name, n.inputs, n.n_outputs) for n in auto] == [("split_0_fanout", ("split:0",), 3)]


def test_seed_is_copied_not_aliased() -> None:
    g = bp.Graph()
    x = g.input("x")
    g.output(x)  # an input can be an output: its gradient is the seed itself
    g.forward(x=np.zeros((1, 2)))
    seed = np.array([[1.0, 2.0]])
    grads = g.backward(seed)
    seed[0, 0] = 99.0
    np.testing.assert_array_equal(grads.inputs["x"], [[1.0, 2.0]])


def test_output_also_read_by_a_node_gets_both_gradients() -> None:
    g = bp.Graph()
    x = g.input("x")
    h = g.add(Scale(3.0, learnable=False), x, name="h")
    f = g.add(Scale(-2.0, learnable=False), h, name="f")
    g.output(f, h)
    f_val, h_val = g.forward(x=np.array([[1.0]]))
    assert (f_val.item(), h_val.item()) == (-6.0, 3.0)
    grads = g.backward((np.array([[1.0]]), np.array([[10.0]])))
    assert grads.inputs["x"].item() == 3.0 * (-2.0 * 1.0 + 10.0)


# -- tied weights (eq. 14.47) -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_tied_weights_sum_their_uses(mode: str) -> None:
    rng = np.random.default_rng(4)
    first = bp.Linear(3, 3, rng=rng)
    second = bp.Linear(3, 3, W=first.W, b=first.b)
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    h1 = g.add(first, x, name="first")
    g.output(g.add(bp.L2Loss(), g.add(second, h1, name="second"), y))
    X, Y = rand(rng, 4, 3), rand(rng, 4, 3)
    g.forward(x=X, y=Y)
    grads = g.backward(mode=mode)
    W, b = first.W.value, first.b.value
    h1v = X @ W.T + b
    h2v = h1v @ W.T + b
    g2 = 2 * (h2v - Y) / 4
    g1 = g2 @ W
    assert list(grads.params) == [first.W, first.b]
    np.testing.assert_allclose(grads.params[first.W], g2.T @ h1v + g1.T @ X, rtol=1e-12)
    np.testing.assert_allclose(grads.params[first.b], g2.sum(0) + g1.sum(0), rtol=1e-12)
    uses = grads.per_use[first.W]
    assert [name for name, _ in uses] == ["second", "first"]
    np.testing.assert_allclose(uses[0][1], g2.T @ h1v, rtol=1e-12)
    np.testing.assert_allclose(uses[1][1], g1.T @ X, rtol=1e-12)
    assert list(g.named_parameters()) == ["first.W", "first.b"]
    bp.gradcheck(g, x=X, y=Y)


def test_unreached_parameters_get_zeros() -> None:
    rng = np.random.default_rng(5)
    g = bp.Graph()
    x = g.input("x")
    used, unused = bp.Linear(2, 2, rng=rng), bp.Linear(2, 5, rng=rng)
    g.add(unused, x)  # a dead end: its output reaches no output
    g.output(g.add(used, x))
    g.forward(x=np.ones((1, 2)))
    grads = g.backward(seed=np.array([[1.0, 2.0]]))
    np.testing.assert_array_equal(grads.params[unused.W], np.zeros((5, 2)))
    assert grads.per_use[unused.W] == []
    np.testing.assert_array_equal(grads.params[used.W], [[1.0, 1.0], [2.0, 2.0]])


# -- several outputs and seeds --------------------------------------------------------------


def test_several_outputs_seeds_add_linearly() -> None:
    rng = np.random.default_rng(6)
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    h = g.add(bp.Tanh(), g.add(bp.Linear(3, 2, rng=rng), x), name="h")
    J = g.add(bp.L2Loss(), g.add(bp.Linear(2, 2, rng=rng), h), y, name="J")
    g.output(J, h)
    assert g.output_names() == ["J", "h"]
    X, Y = rand(rng, B, 3), rand(rng, B, 2)
    J_val, h_val = g.forward(x=X, y=Y)
    assert J_val.shape == () and h_val.shape == (B, 2)
    S = rand(rng, B, 2)
    both = g.backward((None, S))  # None: J is a scalar, seeded with 1
    only_J = g.backward({"J": 1.0})
    only_h = g.backward({"h": S})
    for key in ("x", "y"):
        np.testing.assert_allclose(
            both.inputs[key], only_J.inputs[key] + only_h.inputs[key], rtol=1e-12
        )
    for p in g.parameters():
        np.testing.assert_allclose(both.params[p], only_J.params[p] + only_h.params[p], rtol=1e-12)
    np.testing.assert_array_equal(only_h.inputs["y"], np.zeros((B, 2)))  # h does not read y
    bp.gradcheck(g, x=X, y=Y)


def test_two_scalar_outputs_default_seed_is_their_sum() -> None:
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    j1 = g.add(bp.L2Loss(), x, y)
    j2 = g.add(bp.L2Loss(), g.add(Scale(2.0, learnable=False), x), y)
    g.output(j1, j2)
    X, Y = np.array([[1.0, 2.0]]), np.array([[0.0, 1.0]])
    assert g.forward(x=X, y=Y) == (2.0, 13.0)  # 1 + 1, 4 + 9
    # dJ1/dx = 2(x - y) = [2, 2]; dJ2/dx = 2·2(2x - y) = [8, 12]
    np.testing.assert_array_equal(g.backward().inputs["x"], [[10.0, 14.0]])


# -- composition --------------------------------------------------------------------------


def test_sequential_node_matches_flat_graph() -> None:
    rng = np.random.default_rng(7)
    seq = bp.Sequential(
        [bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.Linear(4, 2, rng=rng), bp.L2Loss()]
    )
    nested = bp.Graph()
    x, y = nested.input("x"), nested.input("y")
    nested.output(nested.add(seq, x, y, name="net"))
    flat = bp.Graph()
    fx, fy = flat.input("x"), flat.input("y")
    h = flat.add(bp.Linear(3, 4, W=seq[0].W, b=seq[0].b), fx)
    h = flat.add(bp.Linear(4, 2, W=seq[2].W, b=seq[2].b), flat.add(bp.Tanh(), h))
    flat.output(flat.add(bp.L2Loss(), h, fy))
    X, Y = rand(rng, B, 3), rand(rng, B, 2)
    assert nested.forward(x=X, y=Y) == flat.forward(x=X, y=Y)
    for mode in ("fast", "explicit"):
        a, b = nested.backward(mode=mode), flat.backward(mode=mode)
        for key in ("x", "y"):  # y: the target's gradient comes out of the chain too
            np.testing.assert_allclose(a.inputs[key], b.inputs[key], rtol=1e-14, atol=1e-16)
        assert set(a.params) == set(b.params) == set(seq.parameters())
        for p in a.params:
            np.testing.assert_allclose(a.params[p], b.params[p], rtol=1e-14, atol=1e-16)
    _, seq_grads = seq.backward()
    for p, value in seq_grads.items():
        np.testing.assert_allclose(nested.backward().params[p], value, rtol=1e-14)
    assert [u for u, _ in nested.backward().per_use[seq[2].W]] == ["net/2"]
    assert list(nested.named_parameters()) == ["net.0.W", "net.0.b", "net.2.W", "net.2.b"]
    bp.gradcheck(nested, x=X, y=Y)


def inner_graph(rng: np.random.Generator) -> bp.Graph:
    """Two inputs, two outputs: (tanh(W p + b) * q, W p + b)."""
    inner = bp.Graph()
    p, q = inner.input("p"), inner.input("q")
    h = inner.add(bp.Linear(2, 3, rng=rng), p, name="lin")
    inner.output(inner.add(bp.Multiply(), inner.add(bp.Tanh(), h), q, name="gate"), h)
    return inner


def test_graph_node_matches_flat_graph() -> None:
    rng = np.random.default_rng(8)
    inner = inner_graph(rng)
    lin = inner["lin"]
    outer = bp.Graph()
    x, z, y = outer.input("x"), outer.input("z"), outer.input("y")
    gate, h = outer.add(inner, x, z, name="block")  # p <- x, q <- z
    s = outer.add(bp.Merge(), gate, h)
    outer.output(outer.add(bp.L2Loss(), outer.add(bp.Linear(6, 2, rng=rng), s), y))
    top = outer.nodes()[-2].layer
    flat = bp.Graph()
    fx, fz, fy = flat.input("x"), flat.input("z"), flat.input("y")
    fh = flat.add(bp.Linear(2, 3, W=lin.W, b=lin.b), fx)
    fgate = flat.add(bp.Multiply(), flat.add(bp.Tanh(), fh), fz)
    fs = flat.add(bp.Merge(), fgate, fh)
    flat.output(flat.add(bp.L2Loss(), flat.add(bp.Linear(6, 2, W=top.W, b=top.b), fs), fy))
    X, Z, Y = rand(rng, B, 2), rand(rng, B, 3), rand(rng, B, 2)
    assert outer.forward(x=X, z=Z, y=Y) == pytest.approx(flat.forward(x=X, z=Z, y=Y), rel=1e-15)
    for mode in ("fast", "explicit"):
        a, b = outer.backward(mode=mode), flat.backward(mode=mode)
        for key in ("x", "z", "y"):
            np.testing.assert_allclose(a.inputs[key], b.inputs[key], rtol=1e-13, atol=1e-16)
        for p in a.params:
            np.testing.assert_allclose(a.params[p], b.params[p], rtol=1e-13, atol=1e-16)
    assert list(outer.named_parameters())[:2] == ["block.lin.W", "block.lin.b"]
    assert [u for u, _ in outer.backward().per_use[lin.W]] == ["block/lin"]
    assert outer.nodes()[3].name == "block" and outer.nodes()[3].n_outputs == 2
    bp.gradcheck(outer, x=X, z=Z, y=Y)


def test_nested_graph_failure_restores_it_too() -> None:
    rng = np.random.default_rng(9)
    inner = inner_graph(rng)
    outer = bp.Graph()
    x, z, y = outer.input("x"), outer.input("z"), outer.input("y")
    gate, h = outer.add(inner, x, z)
    s = outer.add(bp.Add(), gate, outer.add(bp.Linear(3, 3, rng=rng), h))
    outer.output(outer.add(bp.L2Loss(), s, y))
    X, Z, Y = rand(rng, B, 2), rand(rng, B, 3), rand(rng, B, 3)
    outer.forward(x=X, z=Z, y=Y)
    before = outer.backward()
    # Fails inside the nested graph: both node names are in the message.
    with pytest.raises(ValueError, match=r"'graph_0'.*'gate'.*\(4, 3\).*\(3, 3\)"):
        outer.forward(x=rand(rng, B + 1, 2), z=Z, y=Y)
    # Fails at the loss, after the nested graph ran on other data: it is restored too.
    with pytest.raises(ValueError, match=r"'l2loss_3'.*y \(3, 2\)"):
        outer.forward(x=2 * X, z=Z, y=rand(rng, B, 2))
    after = outer.backward()
    for key in ("x", "z", "y"):
        np.testing.assert_array_equal(before.inputs[key], after.inputs[key])
    for p in outer.parameters():
        np.testing.assert_array_equal(before.params[p], after.params[p])
    inner_grads = inner.backward({"gate": np.ones((B, 3))})
    assert inner_grads.inputs["p"].shape == X.shape


# -- inference without caching, inputs without gradient ------------------------------------


def test_forward_without_cache() -> None:
    rng = np.random.default_rng(10)
    g, lin1, lin2 = design_graph(rng)
    X, Y = rand(rng, 5, 4), rand(rng, 5, 2)
    J_cached = g.forward(x=X, y=Y)
    J_free = g.forward(x=X, y=Y, cache=False)
    assert J_free == J_cached
    with pytest.raises(RuntimeError, match="cache=False"):
        g.backward()
    for node in g.nodes():
        if node.layer is not None:  # the previous operating points were dropped as well
            with pytest.raises(RuntimeError, match="forward"):
                node.layer.jacobians()
    g.forward(x=X, y=Y)
    assert np.all(np.isfinite(g.backward().params[lin1.W]))


def test_layer_forward_cache_false_drops_the_operating_point() -> None:
    lin = bp.Linear(2, 2, rng=0)
    lin.forward(np.ones((1, 2)))
    lin.backward(np.ones((1, 2)))
    out = lin.forward(np.ones((1, 2)), cache=False)
    np.testing.assert_allclose(out, lin.W.value.sum(1)[None] + lin.b.value)
    with pytest.raises(RuntimeError, match="forward"):
        lin.backward(np.ones((1, 2)))


class Spy(bp.Layer):
    """The identity, recording every backward call (with its input_grad flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def _forward(self, op: Any, x_in: np.ndarray) -> np.ndarray:
        return x_in.copy()

    def _backward(self, op: Any, g_out: np.ndarray, input_grad: bool) -> tuple[Any, dict]:
        self.calls.append(input_grad)
        return (g_out.copy() if input_grad else None), {}

    def _jacobians(self, op: Any) -> tuple[Any, dict]:
        x = op.x_in[0]
        return bp.jacobian.Identity(x[0].size, x.shape[0], x.dtype), {}


def test_input_without_gradient_is_never_computed() -> None:
    rng = np.random.default_rng(11)
    g = bp.Graph()
    x, c = g.input("x"), g.input("c", requires_grad=False)
    spy_c, spy_x = Spy(), Spy()
    lin = bp.Linear(4, 2, rng=rng)
    m = g.add(bp.Merge(), g.add(spy_x, x), g.add(spy_c, c))
    g.output(g.add(lin, m))
    g.forward(x=rand(rng, B, 2), c=rand(rng, B, 2))
    grads = g.backward(seed=np.ones((B, 2)))
    assert list(grads.inputs) == ["x"]
    assert spy_c.calls == [] and spy_x.calls == [True]
    # Nothing upstream of the Linear needs a gradient: it is asked for none.
    g2 = bp.Graph()
    c2 = g2.input("c", requires_grad=False)
    spy = Spy()
    g2.output(g2.add(bp.Linear(2, 2, rng=rng), g2.add(spy, c2)))
    g2.forward(c=np.ones((1, 2)))
    assert list(g2.backward(seed=np.ones((1, 2))).inputs) == []
    assert spy.calls == []


def test_integer_labels_get_no_gradient() -> None:
    rng = np.random.default_rng(12)
    g = bp.Graph()
    x, labels = g.input("x"), g.input("labels")
    lin = bp.Linear(3, 4, rng=rng)
    g.output(g.add(bp.SoftmaxCrossEntropy(), g.add(lin, x), labels))
    X, T = rand(rng, 5, 3), np.array([0, 3, 1, 1, 2])
    J = g.forward(x=X, labels=T)
    z = X @ lin.W.value.T + lin.b.value
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert J == pytest.approx(-logp[np.arange(5), T].mean(), rel=1e-14)
    grads = g.backward()
    assert list(grads.inputs) == ["x"]
    e = (np.exp(logp) - np.eye(4)[T]) / 5
    np.testing.assert_allclose(grads.inputs["x"], e @ lin.W.value, rtol=1e-12)
    bp.gradcheck(g, x=X, labels=T)


# -- dtype --------------------------------------------------------------------------------------


def test_float32_stays_float32() -> None:
    rng = np.random.default_rng(13)
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    h = g.add(bp.Linear(3, 3, rng=rng, dtype=np.float32), x)
    s = g.add(bp.Add(), g.add(bp.Tanh(), h), g.add(Scale(0.5, dtype=np.float32), h))
    g.output(g.add(bp.L2Loss(), s, y))
    J = g.forward(x=rand(rng, B, 3).astype(np.float32), y=rand(rng, B, 3).astype(np.float32))
    assert J.dtype == np.float32
    for mode in ("fast", "explicit"):
        grads = g.backward(mode=mode)
        assert {v.dtype for v in grads.inputs.values()} == {np.dtype(np.float32)}
        assert {v.dtype for v in grads.params.values()} == {np.dtype(np.float32)}


# -- depth: a chain of 100,000 layers ------------------------------------------------------------


def test_chain_of_100000_layers() -> None:
    n = 100_000
    a = bp.Parameter(np.array(1.0))  # one scalar tied through 50,000 Scale layers
    g = bp.Graph()
    h = g.input("x")
    for i in range(n):
        h = g.add(Scale(a) if i % 2 else bp.ReLU(), h)
    g.output(h)
    X = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(g.forward(x=X), X)
    seed = np.array([[1.0, -1.0, 0.5]])
    grads = g.backward(seed=seed)
    np.testing.assert_array_equal(grads.inputs["x"], seed)
    # dJ/da = Σ over the 50,000 uses of <seed, x> = 50,000 · (1 - 2 + 1.5)
    assert grads.params[a].item() == 25_000.0
    assert len(grads.per_use[a]) == n // 2
    assert len(g.nodes()) == n + 1


# -- order and introspection ---------------------------------------------------------------------


def test_topological_order_is_kahn_and_detects_cycles() -> None:
    assert topological_order([[], [0], [0, 1], [2, 2]]) == [0, 1, 2, 3]
    assert topological_order([[2], [], [1]]) == [1, 2, 0]
    with pytest.raises(ValueError, match="cycle: c -> b -> c"):
        topological_order([[], [0, 2], [1]], ["a", "b", "c"])


def test_nodes_listing_and_summary() -> None:
    rng = np.random.default_rng(14)
    g, lin1, lin2 = design_graph(rng)
    assert g.input_names() == ["x", "y"] and g.output_names() == ["l2loss_6"]
    assert [n.name for n in g.nodes()] == [
        "x", "y", "linear_0", "branch_1", "relu_2", "tanh_3", "merge_4", "linear_5", "l2loss_6",
    ]  # fmt: skip
    assert all(n.shape is None for n in g.nodes())
    g.forward(x=rand(rng, 5, 4), y=rand(rng, 5, 2))
    info = {n.name: n for n in g.nodes()}
    assert info["x"] == bp.NodeInfo(
        "x", "input", None, (), (5, 4), (), False, 1, ((5, 4),), ("x",), (np.dtype(np.float64),),
        (True,), True,
    )  # fmt: skip
    assert info["l2loss_6"].batched == (False,) and info["relu_2"].batched == (True,)
    assert info["branch_1"].outputs == ("branch_1:0", "branch_1:1")
    assert info["linear_0"].layer is lin1 and info["linear_0"].params == ("W", "b")
    assert info["branch_1"].shapes == ((5, 3), (5, 3)) and not info["branch_1"].auto
    assert info["merge_4"].inputs == ("relu_2", "tanh_3") and info["merge_4"].shape == (5, 6)
    assert info["l2loss_6"].inputs == ("linear_5", "y") and info["l2loss_6"].shape == ()
    assert g["linear_5"] is lin2 and g["x"] is None
    text = str(g)
    assert text == g.summary()
    lines = text.splitlines()
    assert lines[0].split() == ["node", "layer", "inputs", "output", "shape", "params"]
    assert lines[4].split() == ["linear_0", "Linear(4→3)", "x", "(5,", "3)", "15"]
    assert lines[5].split()[:3] == ["branch_1", "Branch(2)", "linear_0"]
    assert lines[-1] == "outputs: l2loss_6; 29 parameters"
    assert repr(g) == "Graph(2 input(s), 7 layer node(s), 1 output(s))"


def test_add_gradients_cannot_be_edited_through_each_other() -> None:
    add = bp.Add()
    add.forward(np.ones((2, 3)), np.ones((2, 3)))
    g_out = np.full((2, 3), 2.0)
    (g_a, g_b), _ = add.backward(g_out)
    np.testing.assert_array_equal(g_a, g_out)
    np.testing.assert_array_equal(g_b, g_out)
    for g in (g_a, g_b):
        with pytest.raises(ValueError, match="read-only"):
            g[0, 0] = 5.0
    assert g_out[0, 0] == 2.0


def test_merge_without_a_count_takes_what_it_is_given() -> None:
    rng = np.random.default_rng(5)
    a, b, c = rng.standard_normal((2, 3)), rng.standard_normal((2, 1)), rng.standard_normal((2, 2))
    g = bp.Graph()
    ins = [g.input(n) for n in "abc"]
    g.output(g.add(bp.Sigmoid(), g.add(bp.Merge(), *ins)))
    out = g.forward(a=a, b=b, c=c)
    np.testing.assert_array_equal(out, 1 / (1 + np.exp(-np.concatenate([a, b, c], axis=1))))
    bp.gradcheck(g, a=a, b=b, c=c)
    alone = bp.Merge()  # outside a graph too, and a failed call leaves the count alone
    assert alone.forward(a, b, c).shape == (2, 6)
    with pytest.raises(ValueError, match="batch sizes"):
        alone.forward(a, b[:1], c, a)
    assert repr(alone) == "Merge(3)"
    g_in, _ = alone.backward(np.ones((2, 6)))
    assert [x.shape for x in g_in] == [(2, 3), (2, 1), (2, 2)]


def test_a_scalar_parameter_tied_three_times_sums_its_uses_beside_a_fan_out() -> None:
    # y = a³ t + t with t = tanh(x): not a chain (t is read twice), so the general walk
    # sums the three uses of the 0-d a; dJ/da = 3 a² <seed, t>.
    a = bp.Parameter(np.array(1.5))
    g = bp.Graph()
    t = g.add(bp.Tanh(), g.input("x"))
    h = t
    for _ in range(3):
        h = g.add(Scale(a), h)
    g.output(g.add(bp.Add(), h, t))
    X = np.array([[0.3, -0.7, 1.1]])
    g.forward(x=X)
    seed = np.array([[1.0, -2.0, 0.5]])
    grads = g.backward(seed=seed)
    assert grads.params[a].shape == ()
    np.testing.assert_allclose(grads.params[a], 3 * 1.5**2 * np.vdot(seed, np.tanh(X)))
    assert len(grads.per_use[a]) == 3
