"""The forward-backward network (chapter 14.6.5) and the layers it is made of."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import Dense
from backprop.layers.backward import VJP, BatchSum, Gate, Slice, WeightGrad
from backprop.layers.worked import Scale, Shift, SumEntries

B = 4


def close(a: Any, b: Any) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# -- the new layers: values by hand, and their errors ----------------------------------------
# The three-way check, the dot-product test, float32 and the rest of the battery run on
# every one of them (Gate, Slice, VJP of several Jacobian kinds, WeightGrad, BatchSum) as
# rows of CASES in tests/test_layers.py.


def test_new_layers_values_by_hand() -> None:
    rng = np.random.default_rng(20)
    g = rng.standard_normal((B, 2))
    x = rng.standard_normal((B, 3))
    assert WeightGrad(x).forward(g).tolist() == (g.T @ x).tolist()  # eq. 14.29
    assert BatchSum().forward(g).tolist() == [g[:, 0].sum(), g[:, 1].sum()]
    d = rng.standard_normal((B, 2))
    np.testing.assert_array_equal(Gate(d).forward(g), g * d)
    np.testing.assert_array_equal(Slice(1, 3).forward(x), x[:, 1:3])
    row = rng.standard_normal((B, 1, 3))
    np.testing.assert_allclose(VJP(Dense(row), (3,)).forward(g[:, :1]), g[:, :1] * row[:, 0])
    # Backward of the weight gradient: G ↦ x Gᵀ, the adjoint of g ↦ gᵀ x.
    wg = WeightGrad(x)
    wg.forward(g)
    G = rng.standard_normal((2, 3))
    g_in, grads = wg.backward(G)
    assert grads == {}
    np.testing.assert_allclose(g_in, x @ G.T, rtol=1e-15)
    assert np.vdot(G, g.T @ x) == pytest.approx(np.vdot(g_in, g), rel=1e-13)


def test_new_layers_errors() -> None:
    with pytest.raises(ValueError, match=r"Gate\(d\): x_in has shape \(2, 3\), expected \(2, 2\)"):
        Gate(np.ones((2, 2))).forward(np.ones((2, 3)))
    with pytest.raises(TypeError, match="float64"):
        Gate(np.ones((2, 2))).forward(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="start < stop"):
        Slice(3, 3)
    with pytest.raises(ValueError, match=r"shape \(3,\) does not hold 2 entries"):
        Slice(0, 2, (3,))
    with pytest.raises(ValueError, match="4 entries per example"):
        Slice(2, 6).forward(np.ones((1, 4)))
    with pytest.raises(ValueError, match="expected a batch of 2 with 3 entries"):
        VJP(Dense(np.ones((3, 4)), batch=2), (4,)).forward(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"does not hold the 4 columns"):
        VJP(Dense(np.ones((3, 4)), batch=2), (5,))
    with pytest.raises(TypeError, match="backprop.jacobian object"):
        VJP(np.ones((3, 4)), (4,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected \(2, n_out\)"):
        WeightGrad(np.ones((2, 3))).forward(np.ones((3, 2)))


# -- the backward network reproduces backward() -------------------------------------------------


def random_dag(seed: int) -> tuple[bp.Graph, dict[str, np.ndarray]]:
    """A random DAG over many layer kinds, with fan-out, tied weights and a nested chain."""
    rng = np.random.default_rng(seed)
    g = bp.Graph()
    x, u = g.input("x"), g.input("u")
    first = bp.Linear(3, 3, rng=rng)
    tied = bp.Linear(3, 3, W=first.W, b=first.b)  # the same θ in two places (eq. 14.47)
    pool: list[tuple[Any, int]] = [
        (x, 3),
        (u, 2),
        (g.add(first, x), 3),
        (g.add(tied, g.add(bp.Sigmoid(), x)), 3),
    ]
    linears: list[bp.Linear] = [first]
    for _ in range(6 + seed % 4):
        kind = rng.integers(6)
        h, w = pool[rng.integers(len(pool))]
        if kind == 0:
            n = int(rng.integers(2, 5))
            same = [lin for lin in linears if lin.n_in == w]
            if same and rng.random() < 0.7:  # tie to an earlier layer (eq. 14.47)
                n = same[0].n_out
                lin = bp.Linear(w, n, W=same[0].W, b=same[0].b)
            else:
                lin = bp.Linear(w, n, rng=rng)
                linears.append(lin)
            pool.append((g.add(lin, h), n))
        elif kind == 1:
            act = [bp.Tanh(), bp.Sigmoid(), bp.Softplus(), bp.LeakyReLU(0.1)][rng.integers(4)]
            pool.append((g.add(act, h), w))
        elif kind == 2:
            h2, w2 = pool[rng.integers(len(pool))]
            pool.append((g.add(bp.Merge(), h, h2), w + w2))
        elif kind == 3:
            op = bp.Multiply() if rng.random() < 0.5 else bp.Add()
            pool.append((g.add(op, h, g.add(bp.Tanh(), h)), w))  # h read twice: fan-out
        elif kind == 4:
            pool.append((g.add(Scale(float(rng.uniform(0.5, 1.5))), h), w))
        else:
            chain = bp.Sequential([bp.Linear(w, 3, rng=rng), bp.Tanh(), Shift(0.5)])
            pool.append((g.add(chain, h), 3))
    top = g.add(bp.Merge(len(pool)), *(h for h, _ in pool))
    width = sum(w for _, w in pool)
    flat = g.add(bp.Flatten(), g.add(bp.Reshape(width, 1), top))
    out = g.add(bp.Linear(width, 2, rng=rng), flat)
    g.output(g.add(bp.L2Loss(), out, g.input("y"), name="J"))
    feed = {
        "x": rng.standard_normal((B, 3)),
        "u": rng.standard_normal((B, 2)),
        "y": rng.standard_normal((B, 2)),
    }
    return g, feed


def assert_reproduces(model: Any, bg: bp.Graph, outs: Any, grads: Any, g0: Any = None) -> None:
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = bg.output_names()
    values = dict(zip(names, outs, strict=True))
    if not isinstance(grads, dict):  # Gradients (a dict: the pair's params)
        assert [n for n in names if n.startswith("g_")] == [f"g_{k}" for k in grads.inputs]
        for k, v in grads.inputs.items():
            close(values[f"g_{k}"], v)
        params = grads.params
    else:
        close(values["g_x"], g0)
        params = grads
    named = model.named_parameters()
    assert [n for n in names if n.startswith("dJ/d")] == [f"dJ/d{k}" for k in named]
    for k, p in named.items():
        assert values[f"dJ/d{k}"].shape == p.shape
        close(values[f"dJ/d{k}"], params[p])


@pytest.mark.parametrize("seed", range(6))
def test_random_dag_backward_network_reproduces_every_gradient(seed: int) -> None:
    g, feed = random_dag(seed)
    g.forward(feed)
    grads = g.backward()
    bg = bp.backward_graph(g)
    assert bg.input_names() == ["g_J"]
    assert_reproduces(g, bg, bg.forward(g_J=np.ones((B, 1))), grads)
    # A seed s scales every gradient by s (the backward network is linear in it).
    again = bg.forward(g_J=np.full((B, 1), -2.5))
    for name, v in zip(bg.output_names(), again, strict=True):
        if name == "g_x":
            close(v, -2.5 * grads.inputs["x"])


@pytest.mark.parametrize("loss", ["l2", "xent"])
def test_mlp_backward_network_reproduces_sequential_backward(loss: str) -> None:
    rng = np.random.default_rng(30)
    layers: list[bp.Layer] = [
        bp.Linear(4, 5, rng=rng),
        bp.ReLU(),
        bp.Linear(5, 3, rng=rng),
        bp.Tanh(),
        bp.Linear(3, 3, rng=rng),
    ]
    X = rng.standard_normal((B, 4))
    if loss == "l2":
        net = bp.Sequential([*layers, bp.L2Loss()])
        target: np.ndarray = rng.standard_normal((B, 3))
    else:
        net = bp.Sequential([*layers, bp.SoftmaxCrossEntropy()])
        target = np.array([0, 2, 1, 2])
    net.forward(X, target)
    g0, grads = net.backward()
    bg = bp.backward_graph(net)
    assert bg.input_names() == ["g_J"]
    assert bg.output_names() == [
        "g_x",
        *(["g_y"] if loss == "l2" else []),  # a float target gets a gradient, as in a Graph
        "dJ/d0.W",
        "dJ/d0.b",
        "dJ/d2.W",
        "dJ/d2.b",
        "dJ/d4.W",
        "dJ/d4.b",
    ]
    outs = bg.forward(g_J=np.ones((B, 1)))
    assert_reproduces(net, bg, outs, net.backward())


def test_figure_14_17_structure() -> None:
    """A three-layer MLP without biases: transposed weights, relu gates, outer products."""
    rng = np.random.default_rng(31)
    W = [rng.standard_normal(s) for s in ((3, 4), (3, 3), (2, 3))]
    net = bp.Sequential(
        [
            bp.Linear(4, 3, bias=False, W=W[0]),
            bp.ReLU(),
            bp.Linear(3, 3, bias=False, W=W[1]),
            bp.ReLU(),
            bp.Linear(3, 2, bias=False, W=W[2]),
            bp.L2Loss(),
        ]
    )
    X, Y = rng.standard_normal((B, 4)), rng.standard_normal((B, 2))
    net.forward(X, Y)
    bg = bp.backward_graph(net)
    layers = {n.name: n.layer for n in bg.nodes()}
    # Linear layers of the forward net: linear layers with the transposed weights (eq. 14.36).
    for idx, Wi in zip((0, 2, 4), W, strict=True):
        back = layers["g_x" if idx == 0 else f"linear_{idx}_back"]
        assert isinstance(back, bp.Linear) and "b" not in back.params
        np.testing.assert_array_equal(back.W.value, Wi.T)
    # relu layers become gates holding relu'(x_in) from the forward activations.
    z1 = X @ W[0].T
    z2 = np.maximum(z1, 0) @ W[1].T
    for idx, z in ((1, z1), (3, z2)):
        gate = layers[f"relu_{idx}_back"]
        assert isinstance(gate, Gate)
        np.testing.assert_array_equal(gate.d, (z >= 0).astype(float))
    # Parameter gradients: one matrix product g_outᵀ x_in per layer.
    assert isinstance(layers["dJ/d0.W"], WeightGrad)
    np.testing.assert_array_equal(layers["dJ/d0.W"].x, X)
    assert isinstance(layers["l2loss_5_back0"], VJP)  # input 0 of the loss: ŷ
    # Every layer of the backward network is linear in g: twice the seed, twice everything.
    one = bg.forward(g_J=np.ones((B, 1)))
    two = bg.forward(g_J=np.full((B, 1), 2.0))
    for a, b in zip(one, two, strict=True):
        close(2 * a, b)
    text = bg.summary()
    for name in ("g_J", "relu_1_back", "Gate(relu'(x_in))", "WeightGrad", "dJ/d4.W"):
        assert name in text


def test_graph_with_non_scalar_outputs_and_seeds() -> None:
    rng = np.random.default_rng(32)
    g = bp.Graph()
    x = g.input("x")
    h = g.add(bp.Tanh(), g.add(bp.Linear(3, 4, rng=rng), x), name="h")
    o1 = g.add(bp.Linear(4, 2, rng=rng), h, name="o1")
    o2 = g.add(SumEntries(), h, name="o2")
    g.output(o1, o2, h)  # h is also an output: a fan-out to the output
    g.forward(x=rng.standard_normal((B, 3)))
    seeds = (rng.standard_normal((B, 2)), rng.standard_normal((B, 1)), rng.standard_normal((B, 4)))
    grads = g.backward(seeds)
    bg = bp.backward_graph(g)
    assert bg.input_names() == ["g_o1", "g_o2", "g_h"]
    outs = bg.forward(g_o1=seeds[0], g_o2=seeds[1], g_h=seeds[2])
    assert_reproduces(g, bg, outs, grads)


def test_nested_graph_merge_multiply_and_unreached_parts() -> None:
    rng = np.random.default_rng(33)
    inner = bp.Graph()
    a, c = inner.input("a"), inner.input("c")
    inner.output(inner.add(bp.Multiply(), inner.add(bp.Linear(2, 2, rng=rng), a), c))
    g = bp.Graph()
    x, v, w = g.input("x"), g.input("v"), g.input("w")
    dead = bp.Linear(2, 2, rng=rng)
    g.add(dead, w)  # w and dead lead nowhere: zero gradients
    m = g.add(bp.Merge(), g.add(inner, x, v), g.add(Scale(2.0, learnable=False), v))
    g.output(g.add(bp.Linear(4, 1, rng=rng), m, name="o"))
    feed = {k: rng.standard_normal((B, 2)) for k in "xvw"}
    g.forward(feed)
    seed = rng.standard_normal((B, 1))
    grads = g.backward(seed)
    bg = bp.backward_graph(g)
    assert_reproduces(g, bg, bg.forward(g_o=seed), grads)
    assert not bg.forward(g_o=seed)[bg.output_names().index("g_w")].any()


def test_backward_network_is_a_checkable_graph() -> None:
    """gradcheck on the backward network: linear in the seed, with outputs without a batch axis."""
    g, feed = random_dag(1)
    g.forward(feed)
    bg = bp.backward_graph(g)
    report = bp.gradcheck(bg, g_J=np.ones((B, 1)))
    assert report.worst < 1e-5
    assert any("dot-product test" in k for k in report.checks)
    outs = bg.forward(g_J=np.ones((B, 1)))
    seeds = {n: np.ones(o.shape) for n, o in zip(bg.output_names(), outs, strict=True)}
    fast, explicit = bg.backward(seeds), bg.backward(seeds, mode="explicit")
    np.testing.assert_allclose(explicit.inputs["g_J"], fast.inputs["g_J"], rtol=1e-12)
    # The adjoint identity: <seed, backward(ones)> = <ones, outputs> (the net is linear).
    total = sum(float(o.sum()) for o in outs)
    assert float(fast.inputs["g_J"].sum()) == pytest.approx(total, rel=1e-12)


def test_backward_network_is_a_snapshot() -> None:
    rng = np.random.default_rng(34)
    net = bp.Sequential([bp.Linear(3, 2, rng=rng), bp.Tanh(), bp.L2Loss()])
    X, Y = rng.standard_normal((B, 3)), rng.standard_normal((B, 2))
    net.forward(X, Y)
    g0, grads = net.backward()
    bg = bp.backward_graph(net)
    net.forward(2 * X, Y)  # a new operating point for the model, not for bg
    assert_reproduces(net, bg, bg.forward(g_J=np.ones((B, 1))), grads, g0)


def test_backward_graph_errors() -> None:
    g = bp.Graph()
    g.output(g.add(bp.Tanh(), g.input("x")))
    with pytest.raises(RuntimeError, match="Graph.backward_graph: no forward pass yet"):
        bp.backward_graph(g)
    net = bp.Sequential([bp.Tanh()])
    with pytest.raises(RuntimeError, match="call forward"):
        bp.backward_graph(net)
    with pytest.raises(TypeError, match="expected a Sequential or a Graph, got Tanh"):
        bp.backward_graph(bp.Tanh())  # type: ignore[arg-type]
    g.forward(x=np.ones((1, 2)))
    bg = bp.backward_graph(g)
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        bg.forward(g_tanh_0=np.ones((1, 3)))


def test_draw_backward_network() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from backprop.plot import draw_graph

    rng = np.random.default_rng(35)
    net = bp.Sequential([bp.Linear(2, 3, rng=rng), bp.ReLU(), bp.Linear(3, 1, rng=rng)])
    net.forward(rng.standard_normal((B, 2)))
    bg = bp.backward_graph(net)
    drawn = draw_graph(bg)
    fig = getattr(drawn, "figure", drawn)
    labels = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "g_x_L" in labels and "Gate" in labels and "WeightGrad" in labels
    import matplotlib.pyplot as plt

    plt.close(fig)
