"""Curvature of whole models against ``torch.func``, in float64, and its contract.

The torch side of every comparison is a function of one flat parameter vector (or of
the input batch) written with torch's own layers, differentiated by ``torch.func``
(``hessian``, ``jvp`` of ``grad``, ``jacrev``). The library's parameters are read in
``model.parameters()`` order to start it; nothing else crosses over.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.layer import Layer, OperatingPoint

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
F = torch.nn.functional
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

# torch's forward mode loads its decompositions on first use, through torch.jit.script,
# which warns of its own deprecation: load them once here, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _one = torch.ones(1, dtype=torch.float64)
    torch.func.jvp(torch.sin, (_one,), (_one,))

RTOL, ATOL = 1e-10, 1e-12


def close(a: Any, b: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol * scale)


def flat_params(model: bp.Graph) -> Any:
    return torch.tensor(np.concatenate([p.value.ravel() for p in model.parameters()]))


def unflatten(model: bp.Graph, theta: Any) -> list[Any]:
    """``theta`` cut into tensors of the parameters' shapes, in ``parameters()`` order."""
    out, start = [], 0
    for p in model.parameters():
        out.append(theta[start : start + p.size].reshape(p.shape))
        start += p.size
    return out


def torch_hessian(f: Callable[[Any], Any], x: Any) -> np.ndarray:
    n = x.numel()
    return torch.func.hessian(f)(x).reshape(n, n).numpy()


def torch_hvp(f: Callable[[Any], Any], x: Any, v: np.ndarray) -> np.ndarray:
    _, hv = torch.func.jvp(torch.func.grad(f), (x,), (torch.tensor(v).reshape(x.shape),))
    return hv.numpy()


# -- models, each with its torch twin -----------------------------------------------------

ACTS = {
    "tanh": (bp.Tanh, torch.tanh),
    "softplus": (bp.Softplus, F.softplus),
    "relu": (bp.ReLU, F.relu),
    "sigmoid": (bp.Sigmoid, torch.sigmoid),
}


def mlp(act: str, loss: str, rng: np.random.Generator) -> tuple[bp.Sequential, tuple, Callable]:
    """A 5-7-6-3 MLP with biases, its data, and ``J(θ)`` in torch."""
    ours, theirs = ACTS[act]
    sizes = (5, 7, 6, 3)
    layers: list[Layer] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(bp.Linear(a, b, rng=rng))
        if i < len(sizes) - 2:
            layers.append(ours())
    B = 8
    X = rng.standard_normal((B, 5))
    if loss == "ce":
        layers.append(bp.SoftmaxCrossEntropy())
        y: Any = rng.integers(0, 3, B)
    else:
        layers.append(bp.L2Loss())
        y = rng.standard_normal((B, 3))
    net = bp.Sequential(layers)

    def f(theta: Any, x: Any = None) -> Any:
        W1, b1, W2, b2, W3, b3 = unflatten(net, theta)
        h = torch.tensor(X) if x is None else x
        z = F.linear(theirs(F.linear(theirs(F.linear(h, W1, b1)), W2, b2)), W3, b3)
        if loss == "ce":
            return F.cross_entropy(z, torch.tensor(y))
        return ((z - torch.tensor(y)) ** 2).sum(1).mean()

    return net, (X, y), f


def cnn(rng: np.random.Generator) -> tuple[bp.Sequential, tuple, Callable]:
    """Conv2d → Tanh → MaxPool2d → Flatten → Linear → SoftmaxCrossEntropy on 1×6×6 images."""
    net = bp.Sequential(
        [
            bp.Conv2d(1, 2, 3, padding=1, rng=rng),
            bp.Tanh(),
            bp.MaxPool2d(2),
            bp.Flatten(),
            bp.Linear(18, 3, rng=rng),
            bp.SoftmaxCrossEntropy(),
        ]
    )
    X = rng.standard_normal((3, 1, 6, 6))
    y = rng.integers(0, 3, 3)

    def f(theta: Any, x: Any = None) -> Any:
        Wc, bc, W, b = unflatten(net, theta)
        h = torch.tensor(X) if x is None else x
        h = F.max_pool2d(torch.tanh(F.conv2d(h, Wc, bc, padding=1)), 2)
        return F.cross_entropy(F.linear(h.flatten(1), W, b), torch.tensor(y))

    return net, (X, y), f


def shared_graph(rng: np.random.Generator) -> tuple[bp.Graph, dict, Callable]:
    """A DAG with fan-out, a tied weight, a product of two branches and a nested chain:

    h = tanh(W0 x + b0); a = softplus(U h); b = sigmoid(U' h) with U' tied to U;
    m = [a ⊙ b, h]; J = L2(seq(m), y) with seq = Linear → Tanh → Linear."""
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    h = g.add(bp.Tanh(), g.add(bp.Linear(3, 4, rng=rng), x))
    tied = bp.Linear(4, 4, bias=False, rng=rng)
    a = g.add(bp.Softplus(), g.add(tied, h))
    b = g.add(bp.Sigmoid(), g.add(bp.Linear(4, 4, bias=False, W=tied.W), h))
    m = g.add(bp.Merge(), g.add(bp.Multiply(), a, b), h)
    inner = bp.Sequential([bp.Linear(8, 5, rng=rng), bp.Tanh(), bp.Linear(5, 2, rng=rng)])
    g.output(g.add(bp.L2Loss(), g.add(inner, m), y))
    feed = {"x": rng.standard_normal((5, 3)), "y": rng.standard_normal((5, 2))}
    assert len(g.parameters()) == 7  # W0, b0, U (once, tied), the chain's W, b, W, b

    def f(theta: Any, x: Any = None, y: Any = None) -> Any:
        W0, b0, U, V1, c1, V2, c2 = unflatten(g, theta)
        hh = torch.tanh(F.linear(torch.tensor(feed["x"]) if x is None else x, W0, b0))
        mm = torch.cat([F.softplus(hh @ U.T) * torch.sigmoid(hh @ U.T), hh], dim=1)
        out = F.linear(torch.tanh(F.linear(mm, V1, c1)), V2, c2)
        target = torch.tensor(feed["y"]) if y is None else y
        return ((out - target) ** 2).sum(1).mean()

    return g, feed, f


# -- Hessians and Hessian-vector products --------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "l2"])
@pytest.mark.parametrize("act", list(ACTS))
def test_mlp_hessian_and_hvp_match_torch(act: str, loss: str) -> None:
    rng = np.random.default_rng(1)
    net, data, f = mlp(act, loss, rng)
    theta = flat_params(net)
    H = bp.hessian(net, *data)
    close(H, torch_hessian(f, theta))
    v = rng.standard_normal(H.shape[0])
    space = bp.curvature.Space(
        net.parameters(), [p.shape for p in net.parameters()], [np.float64] * 6
    )
    Hv = bp.hvp(net, *data, v=space.unflat(v))
    assert list(Hv) == net.parameters()
    close(space.flat(Hv), torch_hvp(f, theta, v))
    assert np.abs(H).max() > 1e-2  # not trivially zero


def test_cnn_hessian_matches_torch() -> None:
    rng = np.random.default_rng(2)
    net, data, f = cnn(rng)
    H = bp.hessian(net, *data)
    assert H.shape == (20 + 57, 20 + 57)
    close(H, torch_hessian(f, flat_params(net)))


def test_graph_with_fan_out_tied_weights_and_nesting_matches_torch() -> None:
    rng = np.random.default_rng(3)
    g, feed, f = shared_graph(rng)
    theta = flat_params(g)
    close(bp.hessian(g, feed), torch_hessian(f, theta))
    close(bp.hessian(g, **feed), torch_hessian(f, theta))  # inputs by name too
    v = {p: rng.standard_normal(p.shape) for p in g.parameters()[1:3]}  # a partial direction
    Hv = bp.hvp(g, feed, v=v)
    full = np.concatenate([v.get(p, np.zeros(p.shape)).ravel() for p in g.parameters()])
    got = np.concatenate([Hv[p].ravel() for p in g.parameters()])
    close(got, torch_hvp(f, theta, full))


def any_model(which: str, rng: np.random.Generator) -> tuple[bp.Graph, dict, Callable]:
    """``"mlp-<activation>"`` (cross-entropy), ``"cnn"`` or ``"graph"``, with its inputs
    by name and its torch twin."""
    if which == "graph":
        return shared_graph(rng)
    model, (X, y), f = cnn(rng) if which == "cnn" else mlp(which.split("-")[1], "ce", rng)
    return model, {"x": X, "labels": y}, f


@pytest.mark.parametrize("which", ["mlp-softplus", "cnn", "graph"])
def test_input_hessian_matches_torch(which: str) -> None:
    rng = np.random.default_rng(4)
    model, feed, f = any_model(which, rng)
    theta = flat_params(model)
    H = bp.hessian(model, feed, wrt="inputs")
    X = torch.tensor(feed["x"])
    if which == "graph":  # y is a float input: the Hessian covers x, then y
        Y, n = torch.tensor(feed["y"]), X.numel()

        def fxy(xy: Any) -> Any:
            return f(theta, xy[:n].reshape(X.shape), xy[n:].reshape(Y.shape))

        close(H, torch_hessian(fxy, torch.cat([X.ravel(), Y.ravel()])))
        return
    close(H, torch_hessian(lambda x: f(theta, x), X))
    v = rng.standard_normal(X.shape)
    Hv = bp.hvp(model, feed, v={"x": v}, wrt="inputs")
    assert set(Hv) == {"x"}  # integer labels take no tangent
    close(Hv["x"], torch_hvp(lambda x: f(theta, x), X, v))


# -- the generalized Gauss-Newton ----------------------------------------------------------


def torch_ggn(model: bp.Graph, theta: Any, logits: Callable, loss: Callable) -> np.ndarray:
    """``Jᵀ H J`` from torch alone: ``J = ∂z/∂θ`` by ``jacrev`` of the logits, ``H`` the
    Hessian of the loss in the logits."""
    z = logits(theta)
    J = torch.func.jacrev(logits)(theta).reshape(z.numel(), -1)
    H = torch.func.hessian(loss)(z).reshape(z.numel(), z.numel())
    return (J.T @ H @ J).numpy()


@pytest.mark.parametrize("loss", ["ce", "l2"])
def test_ggn_matches_torch_jt_h_j(loss: str) -> None:
    rng = np.random.default_rng(5)
    net, (X, y), _ = mlp("tanh", loss, rng)
    theta = flat_params(net)

    def logits(th: Any) -> Any:
        W1, b1, W2, b2, W3, b3 = unflatten(net, th)
        h = torch.tanh(F.linear(torch.tanh(F.linear(torch.tensor(X), W1, b1)), W2, b2))
        return F.linear(h, W3, b3)

    def cost(z: Any) -> Any:
        if loss == "ce":
            return F.cross_entropy(z, torch.tensor(y))
        return ((z - torch.tensor(y)) ** 2).sum(1).mean()

    expected = torch_ggn(net, theta, logits, cost)
    G = bp.ggn(net, X, y)
    close(G, expected)
    v = rng.standard_normal(G.shape[0])
    space = bp.curvature.Space(net.parameters(), [p.shape for p in net.parameters()], [float] * 6)
    close(space.flat(bp.ggn_vp(net, X, y, v=space.unflat(v))), expected @ v)
    # The exact per-layer blocks are the diagonal blocks, computed another way.
    blocks = bp.ggn_blocks(net, X, y)
    assert list(blocks) == ["0", "2", "4"]
    start = 0
    for name, layer in zip(blocks, (net[0], net[2], net[4]), strict=True):
        n = sum(p.size for p in layer.params.values())
        close(blocks[name], expected[start : start + n, start : start + n])
        start += n
    # It differs from the Hessian (tanh's h'' and the bilinear terms), which it drops.
    H = bp.hessian(net, X, y)
    assert np.abs(H - G).max() > 1e-3 * np.abs(H).max()


@pytest.mark.parametrize("model", ["mlp-relu", "cnn", "graph"])
def test_hessian_symmetric_and_ggn_positive_semidefinite(model: str) -> None:
    m, feed, _ = any_model(model, np.random.default_rng(6))
    H, G = bp.hessian(m, feed), bp.ggn(m, feed)
    scale = np.abs(H).max()
    assert np.abs(H - H.T).max() <= 1e-13 * scale  # as computed, not symmetrized
    assert np.abs(G - G.T).max() <= 1e-13 * scale
    eig_G, eig_H = np.linalg.eigvalsh(G), np.linalg.eigvalsh((H + H.T) / 2)
    assert eig_G.min() >= -1e-12 * eig_G.max()
    assert eig_H.min() < -1e-6 * eig_H.max()  # the Hessian itself is indefinite here


def test_ggn_blocks_of_a_graph_with_tied_weights() -> None:
    rng = np.random.default_rng(7)
    g, feed, _ = shared_graph(rng)
    G = bp.ggn(g, feed)
    blocks = bp.ggn_blocks(g, feed)
    # One block per layer that names parameters; the tied U belongs to the first layer.
    named = list(g.named_parameters())
    groups = list(dict.fromkeys(n.rpartition(".")[0] for n in named))
    assert list(blocks) == groups
    start = 0
    for name in groups:
        n = sum(p.size for k, p in g.named_parameters().items() if k.rpartition(".")[0] == name)
        close(blocks[name], G[start : start + n, start : start + n])
        start += n


# -- the spectrum -------------------------------------------------------------------------


def test_hessian_eigs_match_the_dense_eigenvalues() -> None:
    rng = np.random.default_rng(8)
    net, data, _ = mlp("softplus", "ce", rng)
    H = bp.hessian(net, *data)
    exact = np.linalg.eigvalsh((H + H.T) / 2)
    top = bp.hessian_eigs(net, *data, k=3, rng=0)
    close(top.values, exact[::-1][:3], rtol=1e-7)
    space = bp.curvature.Space(net.parameters(), [p.shape for p in net.parameters()], [float] * 6)
    for lam, vec in zip(top.values, top.vectors, strict=True):
        v = space.flat(vec)
        assert abs(np.linalg.norm(v) - 1) < 1e-8
        close(H @ v, lam * v, rtol=1e-6, atol=1e-6)
    low = bp.hessian_eigs(net, *data, k=2, which="SA", rng=0)
    close(low.values, exact[:2][::-1], rtol=1e-7)
    ggn_top = bp.hessian_eigs(net, *data, k=1, ggn=True, rng=0)
    close(ggn_top.values, np.linalg.eigvalsh(bp.ggn(net, *data))[-1:], rtol=1e-7)
    inputs_top = bp.hessian_eigs(net, *data, wrt="inputs", rng=0)
    Hx = bp.hessian(net, *data, wrt="inputs")
    close(inputs_top.values, np.linalg.eigvalsh((Hx + Hx.T) / 2)[-1:], rtol=1e-7)
    assert set(inputs_top.vectors[0]) == {"x"}


def test_hessian_eigs_of_a_tiny_model_take_the_dense_path() -> None:
    net = bp.Sequential([bp.Linear(1, 1, rng=0), bp.L2Loss()])  # 2 parameters
    X, Y = np.array([[1.0], [2.0]]), np.array([[0.5], [-1.0]])
    eig = bp.hessian_eigs(net, X, Y, k=2)
    # J = mean (w x + b - y)²: H = 2 [[mean x², mean x], [mean x, 1]] = [[5, 3], [3, 2]]
    close(eig.values, np.linalg.eigvalsh(np.array([[5.0, 3.0], [3.0, 2.0]]))[::-1])


def test_hessian_trace_is_within_its_stated_error_of_the_exact_trace() -> None:
    rng = np.random.default_rng(9)
    net, data, _ = mlp("tanh", "l2", rng)
    exact = np.trace(bp.hessian(net, *data))
    est = bp.hessian_trace(net, *data, n=400, rng=1)
    assert est.samples.shape == (400,)
    # Rademacher probes: the variance of one sample is 2 Σ_{i≠j} H_ij², known here.
    H = bp.hessian(net, *data)
    sd = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 400)
    assert abs(est.stderr - sd) < 0.25 * sd
    assert abs(est.value - exact) < 4 * sd  # the stated tolerance: four standard errors
    assert float(est) == est.value
    again = bp.hessian_trace(net, *data, n=400, rng=1)
    assert again.value == est.value  # repeatable for a seed


def test_hessian_spectrum_recovers_the_eigenvalues_with_full_lanczos() -> None:
    rng = np.random.default_rng(10)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.Linear(4, 2, rng=rng)])
    net = bp.Sequential([*net.layers, bp.SoftmaxCrossEntropy()])
    X, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    H = bp.hessian(net, X, y)
    exact = np.linalg.eigvalsh((H + H.T) / 2)
    spec = bp.hessian_spectrum(net, X, y, steps=H.shape[0], runs=2, rng=0)
    np.testing.assert_allclose(spec.weights.sum(axis=1), 1.0, rtol=1e-10)
    for nodes, weights in zip(spec.nodes, spec.weights, strict=True):
        kept = nodes[weights > 1e-10]
        assert np.abs(kept[:, None] - exact[None, :]).min(axis=1).max() < 1e-8
    grid = np.linspace(exact.min() - 1, exact.max() + 1, 20001)
    density = spec.density(grid, sigma=0.01)
    assert abs(np.sum(density) * (grid[1] - grid[0]) - 1) < 1e-6
    # Its first moment is the trace over the size, the same quantity Hutchinson estimates.
    mean = np.mean(np.sum(spec.nodes * spec.weights, axis=1))
    assert abs(mean - np.trace(H) / H.shape[0]) < 0.5 * np.abs(exact).max()


# -- sequence models: a transformer block, unrolled recurrences ------------------------------


def _named(model: bp.Graph, theta: Any, prefix: str) -> dict[str, Any]:
    """``theta`` cut as ``unflatten`` does, by parameter name less ``prefix``."""
    names = [n.removeprefix(prefix) for n in model.named_parameters()]
    return dict(zip(names, unflatten(model, theta), strict=True))


def param_space(model: bp.Graph) -> Any:
    """The parameters of ``model`` as one flat float64 vector (``bp.curvature.Space``)."""
    params = model.parameters()
    return bp.curvature.Space(params, [p.shape for p in params], [float] * len(params))


def span(model: bp.Graph, name: str) -> slice:
    """Where the parameter ``name`` sits in the flat vector of ``model.parameters()``."""
    start = 0
    for n, p in model.named_parameters().items():
        if n == name:
            return slice(start, start + p.size)
        start += p.size
    raise KeyError(name)


def block_model(causal: bool, rng: np.random.Generator) -> tuple[bp.Graph, dict, Callable]:
    """A pre-norm transformer block (``bp.transformer_block``, nested as node ``block``)
    under an L2 loss, with a key padding mask, and the block's output in torch as a
    function of ``θ`` (and of ``x``): torch's own layer norm and multi-head attention (on
    the math kernel, which torch differentiates twice)."""
    d, heads, T, B = 4, 2, 3, 2
    tb = bp.transformer_block(d, heads, 6, causal=causal, key_padding_mask=True, rng=rng)
    g = bp.Graph()
    x, mask, y = g.input("x"), g.input("mask", requires_grad=False), g.input("y")
    g.output(g.add(bp.L2Loss(), g.add(tb, x, mask, name="block"), y))
    for p in g.parameters():  # biases and LayerNorm away from their plain 0 and 1
        p.value = p.value + 0.3 * rng.standard_normal(p.shape)
    keys = rng.random((B, T)) < 0.5
    keys[:, 0] = False  # every query keeps a key: torch's rows are then all defined
    feed = {"x": rng.standard_normal((B, T, d)), "mask": keys, "y": rng.standard_normal((B, T, d))}
    hidden = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1) if causal else None

    def block(theta: Any, x: Any = None) -> Any:
        P = _named(g, theta, "block.")
        xx = torch.tensor(feed["x"]) if x is None else x
        n1 = F.layer_norm(xx, (d,), P["norm1.gamma"], P["norm1.beta"])
        q = n1.transpose(0, 1)  # (T, B, d)
        w_in = torch.cat([P["attn.Wq"], P["attn.Wk"], P["attn.Wv"]])
        b_in = torch.cat([P["attn.bq"], P["attn.bk"], P["attn.bv"]])
        with sdpa_kernel(SDPBackend.MATH):
            a, _ = F.multi_head_attention_forward(
                q, q, q, d, heads, w_in, b_in, None, None, False, 0.0,
                P["attn.Wo"], P["attn.bo"], need_weights=False,
                key_padding_mask=torch.tensor(feed["mask"]), attn_mask=hidden,
            )  # fmt: skip
        h = xx + a.transpose(0, 1)
        n2 = F.layer_norm(h, (d,), P["norm2.gamma"], P["norm2.beta"])
        return h + F.linear(F.relu(F.linear(n2, P["ff1.W"], P["ff1.b"])), P["ff2.W"], P["ff2.b"])

    return g, feed, block


def l2(out: Any, y: np.ndarray) -> Any:
    """``L2Loss`` in torch: the squared error summed per example, averaged over the batch."""
    return ((out - torch.tensor(y)) ** 2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_block_hessian_and_hvp_match_torch(causal: bool) -> None:
    rng = np.random.default_rng(20)
    g, feed, block = block_model(causal, rng)
    theta = flat_params(g)

    def f(th: Any, x: Any = None) -> Any:
        return l2(block(th, x), feed["y"])

    H = bp.hessian(g, feed)
    assert H.shape == (154, 154)  # LayerNorms 16, attention 80, feed-forward 30 + 28
    expected = torch.autograd.functional.hessian(f, theta).numpy()
    close(H, expected)
    v = rng.standard_normal(H.shape[0])
    space = param_space(g)
    close(space.flat(bp.hvp(g, feed, v=space.unflat(v))), expected @ v)
    # Attention's own curvature is in it: W_q against W_k (queries against keys).
    assert np.abs(H[span(g, "block.attn.Wq"), span(g, "block.attn.Wk")]).max() > 1e-2
    assert not H[:, span(g, "block.attn.bk")].any()  # b_k shifts whole rows of scores
    # Along the data too (mixed through every layer), against torch's forward over reverse.
    X = torch.tensor(feed["x"])
    u = rng.standard_normal(X.shape)
    Hx = bp.hvp(g, feed, v={"x": u}, wrt="inputs")
    close(Hx["x"], torch_hvp(lambda x: f(theta, x), X, u))
    # The Gauss-Newton part walks the same inner layers, to first order only.
    G = bp.ggn(g, feed)
    close(G, torch_ggn(g, theta, block, lambda z: l2(z, feed["y"])))
    assert bp.gradcheck(g, feed, order=2, mode="directions").worst < 1e-6


def test_attention_whose_inner_graph_ran_alone_is_refused() -> None:
    # Its second derivatives come from the inner graph's operating point: one that no
    # longer belongs to the layer's forward is refused, in a model and alone.
    rng = np.random.default_rng(24)
    g, feed, _ = block_model(False, rng)
    g.forward(feed)
    mha = g["block"]["attn"]
    x = mha.operating_point().x_in[0]
    mha.graph.forward(x=x + 1.0, key_padding_mask=feed["mask"])
    with pytest.raises(RuntimeError, match=r"MultiHeadAttention.*inner graph .* on its own"):
        bp.hessian(g)
    with pytest.raises(RuntimeError, match="inner graph"):
        bp.curvature.layer_hvp(mha, np.ones(x.shape), [np.ones(x.shape), None])
    mha.forward(x, feed["mask"])  # its own forward again: the products are back
    h_in, _ = bp.curvature.layer_hvp(mha, np.ones(x.shape), [np.ones(x.shape), None])
    assert h_in[1] is None and np.abs(h_in[0]).max() > 0  # the mask takes no curvature


def rnn_model(kind: str, rng: np.random.Generator) -> tuple[bp.Graph, dict, Callable]:
    """``bp.unroll(cell, 4)`` (nested as node ``rnn``, its weights tied across the steps)
    under a token-wise Linear and an L2 loss, and its torch twin: torch's own cell
    functions, step by step."""
    n_in, n, T, B = 3, 4, 4, 3
    cell = bp.RNNCell(n_in, n, rng=rng) if kind == "rnn" else bp.LSTMCell(n_in, n, rng=rng)
    rnn = bp.unroll(cell, T)
    g = bp.Graph()
    states = [g.input(name) for name in rnn.input_names()]  # x, h0 (and c0)
    y = g.input("y")
    hidden = g.add(rnn, *states, name="rnn")
    g.output(g.add(bp.L2Loss(), g.add(bp.Linear(n, 2, rng=rng), hidden, name="head"), y))
    feed = {name: rng.standard_normal((B, n)) for name in rnn.input_names()[1:]}
    feed.update(x=rng.standard_normal((B, T, n_in)), y=rng.standard_normal((B, T, 2)))

    def f(theta: Any) -> Any:
        P = _named(g, theta, "")
        W_x, W_h, b = P["rnn.step0.W_x"], P["rnn.step0.W_h"], P["rnn.step0.b"]
        X = torch.tensor(feed["x"])
        h, out = torch.tensor(feed["h0"]), []
        c = torch.tensor(feed["c0"]) if kind == "lstm" else None
        for t in range(T):
            if kind == "rnn":
                h = torch.rnn_tanh_cell(X[:, t], h, W_x, W_h, b, None)
            else:
                h, c = torch.lstm_cell(X[:, t], (h, c), W_x, W_h, b, None)
            out.append(h)
        return l2(F.linear(torch.stack(out, 1), P["head.W"], P["head.b"]), feed["y"])

    return g, feed, f


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_unrolled_recurrence_hessian_and_hvp_match_torch(kind: str) -> None:
    rng = np.random.default_rng(21)
    g, feed, f = rnn_model(kind, rng)
    theta = flat_params(g)
    assert len(g.parameters()) == 5  # W_x, W_h, b once for all four steps, then the head
    H = bp.hessian(g, feed)
    expected = torch_hessian(f, theta)
    close(H, expected)
    v = rng.standard_normal(H.shape[0])
    space = param_space(g)
    close(space.flat(bp.hvp(g, feed, v=space.unflat(v))), torch_hvp(f, theta, v))
    W_h = span(g, "rnn.step0.W_h")  # the recurrence's own curvature, summed over the steps
    assert np.abs(H[W_h, W_h]).max() > 1e-2


def test_a_truncated_recurrence_has_no_hessian() -> None:
    g, feed, f = rnn_model("rnn", np.random.default_rng(23))
    v = {p: np.ones(p.shape) for p in g.parameters()}
    with bp.truncated(g, 2), pytest.raises(RuntimeError, match=r"RNNCell.*truncated .*no Hessian"):
        bp.hvp(g, feed, v=v)
    space = param_space(g)  # the same call outside the context: the true Hessian
    close(space.flat(bp.hvp(g, feed, v=v)), torch_hvp(f, flat_params(g), space.flat(v)))


def test_hessian_eigs_of_an_unrolled_rnn_with_tied_weights() -> None:
    rng = np.random.default_rng(22)
    g, feed, f = rnn_model("rnn", rng)
    expected = torch_hessian(f, flat_params(g))
    exact = np.linalg.eigvalsh((expected + expected.T) / 2)
    space = param_space(g)
    for which, want in (("LA", exact[::-1][:2]), ("SA", exact[:2][::-1])):
        eig = bp.hessian_eigs(g, feed, k=2, which=which, rng=0)
        close(eig.values, want, rtol=1e-7)
        for lam, vec in zip(eig.values, eig.vectors, strict=True):
            assert list(vec) == g.parameters()  # one direction per tied Parameter
            u = space.flat(vec)
            close(expected @ u, lam * u, rtol=1e-6, atol=1e-6)
    assert exact[0] < 0 < exact[-1]  # indefinite: both ends are worth finding


# -- training-mode layers: the mask held, the batch statistics differentiated ---------------


class FixedMaskDropout(bp.Dropout):
    """A training-mode Dropout whose every forward draws the same mask: one function."""

    def _draw(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng(5).random(shape) >= self.p


def test_training_mode_dropout_holds_the_mask_of_the_forward() -> None:
    # The Hessian is that of the cost with the forward's mask held (backward's gradient is
    # too): finite differences of the gradient under that one mask agree with it.
    rng = np.random.default_rng(11)
    net = bp.Sequential(
        [bp.Linear(4, 6, rng=rng), bp.Tanh(), FixedMaskDropout(0.5), bp.Linear(6, 2, rng=rng)]
        + [bp.SoftmaxCrossEntropy()]
    )
    X, y = rng.standard_normal((5, 4)), rng.integers(0, 2, 5)
    report = bp.gradcheck(net, X, y, order=2)
    assert report.worst < 1e-6
    plain = bp.Sequential(
        [bp.Linear(4, 6, W=net[0].W, b=net[0].b), bp.Tanh(), bp.Dropout(0.5, rng=3)]
        + [bp.Linear(6, 2, W=net[3].W, b=net[3].b), bp.SoftmaxCrossEntropy()]
    )
    H_train = bp.hessian(plain, X, y)  # some mask
    H_eval = bp.hessian(plain.eval(), X, y)
    assert not np.allclose(H_train, H_eval)  # the mask is in it


def test_training_mode_batchnorm_matches_torch() -> None:
    # Batch statistics couple the examples; the Hessian follows them (torch: training=True).
    rng = np.random.default_rng(12)
    net = bp.Sequential(
        [bp.Linear(3, 4, rng=rng), bp.BatchNorm1d(4), bp.Tanh(), bp.Linear(4, 2, rng=rng)]
        + [bp.SoftmaxCrossEntropy()]
    )
    for p in net[1].params.values():
        p.value = rng.standard_normal(p.shape)
    X, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)

    def f(theta: Any) -> Any:
        W1, b1, gamma, beta, W2, b2 = unflatten(net, theta)
        h = F.linear(torch.tensor(X), W1, b1)
        h = F.batch_norm(h, None, None, gamma, beta, training=True)
        return F.cross_entropy(F.linear(torch.tanh(h), W2, b2), torch.tensor(y))

    H = bp.hessian(net, X, y)
    # torch's reverse over reverse: its forward mode through batch_norm's training-mode
    # statistics gives wrong second derivatives (pytorch/pytorch#196699), which here
    # shows as an asymmetric Hessian with a curvature along b1, on which J cannot depend.
    expected = torch.autograd.functional.hessian(f, flat_params(net)).numpy()
    close(H, expected)
    assert np.abs(H[:, 12:16]).max() < 1e-14  # the centring removes b1
    assert bp.gradcheck(net, X, y, order=2, mode="directions").worst < 1e-6


def test_float32_model_gives_float32_products_close_to_float64() -> None:
    rng = np.random.default_rng(13)
    net64, (X, y), _ = mlp("tanh", "ce", rng)
    layers: list[Layer] = []
    for layer in net64.layers:
        if isinstance(layer, bp.Linear):
            W, b = (layer.params[k].value.astype(np.float32) for k in ("W", "b"))
            layers.append(bp.Linear(layer.n_in, layer.n_out, W=W, b=b))
        else:
            layers.append(type(layer)())
    net32 = bp.Sequential(layers)
    v64 = {p: rng.standard_normal(p.shape) for p in net64.parameters()}
    v32 = {
        q: v64[p].astype(np.float32)
        for p, q in zip(net64.parameters(), net32.parameters(), strict=True)
    }
    Hv64 = bp.hvp(net64, X, y, v=v64)
    Hv32 = bp.hvp(net32, X.astype(np.float32), y, v=v32)
    for p, q in zip(net64.parameters(), net32.parameters(), strict=True):
        assert Hv32[q].dtype == np.float32
        close(Hv32[q], Hv64[p], rtol=1e-3, atol=1e-4)


# -- gradcheck's second order, and the failure it must catch --------------------------------


class OffTanh(bp.Tanh):
    """Tanh whose h'' is off by 0.1 %: first derivatives right, second ones wrong."""

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return 1.001 * super().d2h(x_in, x_out)


@pytest.mark.parametrize("mode", ["entries", "directions"])
def test_second_order_gradcheck_fails_on_h2_off_by_a_tenth_of_a_percent(mode: str) -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 4))
    assert bp.gradcheck(bp.Tanh(), x, order=2, mode=mode).worst < 1e-7
    assert bp.gradcheck(OffTanh(), x, mode=mode).worst < 1e-7  # first order cannot see it
    with pytest.raises(bp.GradcheckError, match="Hessian products vs finite differences"):
        bp.gradcheck(OffTanh(), x, order=2, mode=mode)
    layers = [bp.Linear(4, 5, rng=1), bp.Tanh(), bp.Linear(5, 3, rng=2), bp.SoftmaxCrossEntropy()]
    X, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    assert bp.gradcheck(bp.Sequential(layers), X, y, order=2, mode=mode).worst < 1e-7
    layers[1] = OffTanh()
    with pytest.raises(bp.GradcheckError, match="Hessian products vs finite differences"):
        bp.gradcheck(bp.Sequential(layers), X, y, order=2, mode=mode)


def test_second_order_gradcheck_of_a_graph_with_fan_out_and_tied_weights() -> None:
    g, feed, _ = shared_graph(np.random.default_rng(15))
    report = bp.gradcheck(g, feed, order=2)
    assert report.mode == "entries" and report.worst < 1e-6
    assert "symmetry <u', H u> vs <u, H u'>" in report.checks


# -- the contract: errors, refusals, the operating point ------------------------------------


class Cube(Layer):
    """``x³`` with a first derivative and no second-order hook."""

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in**3

    def _jacobians(self, op: OperatingPoint) -> Any:
        from backprop.jacobian import Diagonal

        x = op.x_in[0]
        return Diagonal((3 * x**2).reshape(x.shape[0], -1), "3 x²"), {}


class SquaredNorm(Layer):
    """``Σ_b ‖x_b‖²``, a scalar cost that is not a ``bp.Loss``; ``H = 2 I``."""

    reduces_batch = True

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return np.asarray(np.vdot(x_in, x_in))

    def _jacobians(self, op: OperatingPoint) -> Any:
        from backprop.jacobian import Dense

        x = op.x_in[0]
        return Dense((2 * x).reshape(x.shape[0], 1, -1), "2 x"), {}

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: Any, dtheta: Any, input_grad: bool
    ) -> Any:
        return (2 * float(g_out) * dx_in[0],), {}


def test_a_layer_without_second_derivatives_is_refused_by_name() -> None:
    X, y = np.ones((2, 3)), np.array([0, 1])
    net = bp.Sequential(
        [bp.Linear(3, 3, rng=0), Cube(), bp.Linear(3, 2, rng=1), bp.SoftmaxCrossEntropy()]
    )
    with pytest.raises(NotImplementedError, match=r"Cube\(\) has no second-order hook"):
        bp.hvp(net, X, y, v={})
    G = bp.ggn(net, X, y)  # the Gauss-Newton needs first derivatives only
    assert G.shape == (20, 20)
    sin = bp.Sequential(
        [bp.Linear(3, 3, rng=0), bp.Pointwise(np.sin, np.cos), bp.Linear(3, 2, rng=1)]
    )
    sin = bp.Sequential([*sin.layers, bp.SoftmaxCrossEntropy()])
    with pytest.raises(NotImplementedError, match=r"Pointwise\(sin\) has no second derivative"):
        bp.hessian(sin, X, y)


def test_refusals_name_the_problem_and_change_nothing() -> None:
    rng = np.random.default_rng(16)
    net, (X, y), _ = mlp("tanh", "ce", rng)
    before = [p.value.copy() for p in net.parameters()]
    W = net.parameters()[0]
    net.forward(X[:3], y[:3])  # an operating point that a refused call must leave alone
    g_before = net.backward().params
    with pytest.raises(ValueError, match=r"over the limit of .*; use the products"):
        bp.hessian(net, X, y, max_bytes=1000)
    with pytest.raises(ValueError, match=r"v\[.*\] has shape \(2,\)"):
        bp.hvp(net, X, y, v={W: np.ones(2)})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        bp.hvp(net, X, y, v={bp.Parameter(np.ones(2)): np.ones(2)})
    with pytest.raises(TypeError, match="v must be a mapping"):
        bp.hvp(net, X, y, v=[1.0])
    with pytest.raises(ValueError, match="wrt must be one of"):
        bp.hvp(net, X, y, v={}, wrt="weights")
    with pytest.raises(ValueError, match="not an input taking a gradient"):
        bp.hvp(net, X, y, v={"labels": np.ones(y.shape)}, wrt="inputs")
    with pytest.raises(TypeError, match="expected a Sequential or a Graph"):
        bp.hvp(bp.Tanh(), X, v={})
    no_loss = bp.Sequential([bp.Linear(5, 2, rng=0), bp.Tanh()])
    with pytest.raises(ValueError, match="scalar cost"):
        bp.hvp(no_loss, X, v={})
    cost = bp.Sequential([bp.Linear(5, 2, rng=0), SquaredNorm()])  # a cost, not a bp.Loss
    assert np.abs(bp.hessian(cost, X)).max() > 0
    with pytest.raises(ValueError, match="splits the model at its loss layers"):
        bp.ggn(cost, X)
    with pytest.raises(ValueError, match="k must be a positive int"):
        bp.hessian_eigs(net, X, y, k=0)
    for p, b in zip(net.parameters(), before, strict=True):
        assert np.array_equal(p.value, b)
    g_after = net.backward().params  # still at the point of X[:3]: no refused call ran it
    assert all(np.array_equal(g_after[p], g_before[p]) for p in net.parameters())


def test_without_inputs_the_last_forward_is_used_and_a_stale_point_is_refused() -> None:
    rng = np.random.default_rng(17)
    net, (X, y), _ = mlp("sigmoid", "l2", rng)
    with pytest.raises(RuntimeError, match="no forward pass yet"):
        bp.hessian(net)
    net.forward(X, y)
    H_cached = bp.hessian(net)
    close(H_cached, bp.hessian(net, X, y))
    point = bp.curvature.Point(net, {}, "params", "test")
    net.forward(X[:3], y[:3])  # the model moves on
    with pytest.raises(RuntimeError, match="was run again since this operating point"):
        point.apply({})
