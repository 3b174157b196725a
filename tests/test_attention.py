"""MultiHeadAttention against PyTorch, its inner graph, its masks, and its gradient checks.

Every number on the torch side comes from ``torch.nn.MultiheadAttention`` (or
``TransformerEncoderLayer``) fed the library's parameter values: outputs, ``dJ/dx``
and every parameter gradient, in the fast and the explicit backward modes. Rows that
torch leaves undefined (NaN: a query that may see no key) are compared separately
with what the library promises there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import BlockKronecker, DiagonalPlusLowRank

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

RTOL, ATOL = 1e-10, 1e-12


def close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def randomized(mha: bp.MultiHeadAttention, seed: int, scale: float = 0.5) -> bp.MultiHeadAttention:
    """Every parameter drawn from N(0, scale²): biases not zero, so each one is tested."""
    rng = np.random.default_rng(seed)
    for p in mha.params.values():
        p.value = (scale * rng.standard_normal(p.shape)).astype(p.dtype)
    return mha


def torch_mha(mha: bp.MultiHeadAttention, dtype: Any = torch.float64, t: Any = None) -> Any:
    """``torch.nn.MultiheadAttention`` (``t``, or a new one) holding ``mha``'s parameters
    (the documented map)."""
    P = {k: torch.tensor(np.array(p.value)) for k, p in mha.params.items()}
    if t is None:
        t = torch.nn.MultiheadAttention(mha.d, mha.n_heads, bias=mha.bias, batch_first=True)
        t = t.to(dtype)
    with torch.no_grad():
        t.in_proj_weight.copy_(torch.cat([P["Wq"], P["Wk"], P["Wv"]]))
        t.out_proj.weight.copy_(P["Wo"])
        if mha.bias:
            t.in_proj_bias.copy_(torch.cat([P["bq"], P["bk"], P["bv"]]))
            t.out_proj.bias.copy_(P["bo"])
    return t


def torch_grads(t: Any) -> dict[str, np.ndarray]:
    """torch's parameter gradients under the library's names."""
    d = t.embed_dim
    W = t.in_proj_weight.grad.numpy()
    out = {"Wq": W[:d], "Wk": W[d : 2 * d], "Wv": W[2 * d :], "Wo": t.out_proj.weight.grad.numpy()}
    if t.in_proj_bias is not None:
        b = t.in_proj_bias.grad.numpy()
        out.update(bq=b[:d], bk=b[d : 2 * d], bv=b[2 * d :], bo=t.out_proj.bias.grad.numpy())
    return out


def run_torch(t: Any, x: np.ndarray, g: np.ndarray, causal: bool, mask: Any) -> tuple[Any, Any]:
    """torch's output and dJ/dx for ``J = <g, y>``."""
    xt = torch.tensor(x, requires_grad=True)
    T = x.shape[1]
    attn_mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1) if causal else None
    kpm = None if mask is None else torch.tensor(mask)
    y, _ = t(xt, xt, xt, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False)
    y.backward(torch.tensor(g))
    return y, xt.grad


def key_mask(rng: np.random.Generator, B: int, T: int) -> np.ndarray:
    """Padding at the end of some sequences; key 0 always allowed, so every query of a
    causal or plain attention sees a key and torch defines every row."""
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    return np.arange(T)[None, :] >= lengths[:, None]


def model_of(mha: bp.MultiHeadAttention, with_mask: bool) -> bp.Graph:
    """``mha`` as the one node of a Graph, the mask as its second input."""
    g = bp.Graph()
    x = g.input("x")
    if with_mask:
        g.output(g.add(mha, x, g.input("key_padding_mask")))
    else:
        g.output(g.add(mha, x))
    return g


# -- against PyTorch ------------------------------------------------------------------------

SHAPES = [(8, 2), (6, 3), (4, 1), (12, 4)]


@pytest.mark.parametrize("mode", ["fast", "explicit"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("d", "heads"), SHAPES, ids=[f"d{d}h{h}" for d, h in SHAPES])
def test_multi_head_attention_matches_torch(
    d: int, heads: int, causal: bool, masked: bool, mode: str
) -> None:
    rng = np.random.default_rng(d * 10 + heads)
    B, T = 3, 5
    mha = randomized(bp.MultiHeadAttention(d, heads, causal=causal, rng=1), seed=d + heads)
    x = rng.standard_normal((B, T, d))
    mask = key_mask(rng, B, T) if masked else None
    model = model_of(mha, masked)
    feed = {"x": x} if mask is None else {"x": x, "key_padding_mask": mask}
    y = model.forward(feed)
    g = rng.standard_normal(y.shape)
    grads = model.backward(g, mode=mode)
    t = torch_mha(mha)
    y_t, gx_t = run_torch(t, x, g, causal, mask)
    close(y, y_t)
    close(grads.inputs["x"], gx_t)
    assert set(grads.inputs) == {"x"}  # the mask gets no gradient
    for name, grad_t in torch_grads(t).items():
        close(grads.params[mha.params[name]], grad_t)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_alone_with_the_mask_by_keyword(bias: bool) -> None:
    rng = np.random.default_rng(7)
    mha = randomized(bp.MultiHeadAttention(8, 2, causal=True, bias=bias, rng=2), seed=3)
    x, mask = rng.standard_normal((4, 6, 8)), key_mask(rng, 4, 6)
    y = mha.forward(x, key_padding_mask=mask)
    np.testing.assert_array_equal(mha.forward(x, mask), y)  # the same as positionally
    g = rng.standard_normal(y.shape)
    (g_x, g_mask), grads = mha.backward(g)
    assert g_mask is None
    t = torch_mha(mha)
    y_t, gx_t = run_torch(t, x, g, True, mask)
    close(y, y_t)
    close(g_x, gx_t)
    assert grads.keys() == mha.params.keys()
    for name, grad_t in torch_grads(t).items():
        close(grads[name], grad_t)


def test_float32_stays_float32_and_matches_torch_loosely() -> None:
    rng = np.random.default_rng(8)
    mha = randomized(bp.MultiHeadAttention(8, 2, rng=3, dtype=np.float32), seed=4)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mask = key_mask(rng, 3, 5)
    y = mha.forward(x, key_padding_mask=mask)
    g = rng.standard_normal(y.shape).astype(np.float32)
    (g_x, _), grads = mha.backward(g)
    assert y.dtype == g_x.dtype == np.float32
    assert all(v.dtype == np.float32 for v in grads.values())
    t = torch_mha(mha, torch.float64)  # the float64 truth at the float32 weights
    y_t, gx_t = run_torch(t, x.astype(np.float64), g.astype(np.float64), False, mask)
    close(y, y_t, rtol=1e-4, atol=1e-5)
    close(g_x, gx_t, rtol=1e-4, atol=1e-5)
    for name, grad_t in torch_grads(t).items():
        close(grads[name], grad_t, rtol=1e-4, atol=1e-5)


def test_whole_layer_jacobians_match_torch_per_example() -> None:
    rng = np.random.default_rng(9)
    mha = randomized(bp.MultiHeadAttention(4, 2, causal=True, rng=4), seed=5)
    x = rng.standard_normal((2, 3, 4))
    mha.forward(x)
    L_x, L_theta = mha.jacobians()
    t = torch_mha(mha)
    T = x.shape[1]
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)

    def f(xb: Any) -> Any:
        y, _ = t(xb[None], xb[None], xb[None], attn_mask=blocked, need_weights=False)
        return y[0]

    for b in range(2):
        J = torch.autograd.functional.jacobian(f, torch.tensor(x[b]))
        close(L_x.to_dense()[b], J.reshape(12, 12))
    # L^W_o per example: ∂y/∂W_o, against torch's Jacobian with respect to out_proj.weight.
    W_o = t.out_proj.weight.detach().clone()

    def f_wo(W: Any) -> Any:
        y, _ = torch.nn.functional.multi_head_attention_forward(
            torch.tensor(x).transpose(0, 1), *(torch.tensor(x).transpose(0, 1),) * 2,
            4, 2, t.in_proj_weight, t.in_proj_bias, None, None, False, 0.0, W,
            t.out_proj.bias, need_weights=False, attn_mask=blocked,
        )  # fmt: skip
        return y.transpose(0, 1)

    J_wo = torch.autograd.functional.jacobian(f_wo, W_o)  # (B, T, d, d, d)
    close(L_theta["Wo"].to_dense(), J_wo.reshape(2, 12, 16))
    assert np.all(L_theta["bk"].to_dense() == 0)  # y does not depend on b_k


# -- a query that sees no key ---------------------------------------------------------------


def test_a_query_with_no_key_gives_b_o_zero_gradient_and_no_nan() -> None:
    rng = np.random.default_rng(10)
    mha = randomized(bp.MultiHeadAttention(6, 2, causal=True, rng=5), seed=6)
    B, T = 3, 4
    x = rng.standard_normal((B, T, 6))
    mask = np.zeros((B, T), bool)
    mask[1] = True  # example 1: every key padded, so no query sees anything
    mask[2, 0] = True  # example 2, causal: query 0 sees only key 0, which is padded
    y = mha.forward(x, key_padding_mask=mask)
    b_o = mha.params["bo"].value
    np.testing.assert_array_equal(y[1], np.broadcast_to(b_o, (T, 6)))
    np.testing.assert_array_equal(y[2, 0], b_o)
    attention = mha.graph["attention"].operating_point().x_out  # (B, h, T, T)
    assert np.all(attention[1] == 0) and np.all(attention[2, :, 0] == 0)
    # A gradient that reaches only those queries moves nothing but b_o.
    g = np.zeros_like(y)
    g[1] = rng.standard_normal((T, 6))
    g[2, 0] = rng.standard_normal(6)
    (g_x, _), grads = mha.backward(g)
    assert np.all(g_x == 0)
    for name, grad in grads.items():
        if name == "bo":
            np.testing.assert_allclose(grad, g.sum(axis=(0, 1)), rtol=1e-14)
        else:
            assert np.all(grad == 0), name
    # Everything is finite, and torch's fused path agrees everywhere, gradients too ...
    g = rng.standard_normal(y.shape)
    (g_x, _), grads = mha.backward(g)
    assert np.all(np.isfinite(g_x)) and all(np.all(np.isfinite(v)) for v in grads.values())
    t = torch_mha(mha)
    y_t, gx_t = run_torch(t, x, g, True, mask)
    close(y, y_t)
    close(g_x, gx_t)
    for name, grad_t in torch_grads(t).items():
        close(grads[name], grad_t)
    # ... while the path that returns the weights gives NaN on exactly those queries.
    xt = torch.tensor(x)
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    y_w, _ = t(xt, xt, xt, attn_mask=blocked, key_padding_mask=torch.tensor(mask))
    undefined = np.isnan(y_w.detach().numpy())
    assert undefined[1].all() and undefined[2, 0].all() and undefined.sum() == (T + 1) * 6
    close(y[~undefined], y_w.detach().numpy()[~undefined])
    assert bp.gradcheck(mha, x, mask).checks


# -- the inner graph ------------------------------------------------------------------------


def test_inner_graph_nodes_hold_the_attention_and_its_jacobians() -> None:
    rng = np.random.default_rng(11)
    mha = randomized(bp.MultiHeadAttention(6, 2, rng=6), seed=7)
    x = rng.standard_normal((2, 3, 6))
    mha.forward(x)
    P = {k: p.value for k, p in mha.params.items()}
    # The attention weights from the formula, in numpy: softmax(Q_h K_hᵀ / √m) per head.
    Q = (x @ P["Wq"].T + P["bq"]).reshape(2, 3, 2, 3).transpose(0, 2, 1, 3)
    K = (x @ P["Wk"].T + P["bk"]).reshape(2, 3, 2, 3).transpose(0, 2, 1, 3)
    S = Q @ K.transpose(0, 1, 3, 2) / np.sqrt(3)
    A = np.exp(S - S.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    attention = mha.graph["attention"]
    np.testing.assert_allclose(attention.operating_point().x_out, A, rtol=1e-12)
    L_A, L_mask = attention.jacobians()[0]
    assert isinstance(L_A, DiagonalPlusLowRank) and L_mask is None
    assert L_A.shape == (18, 18) and L_A.rank == 6  # one rank-1 term per row of each head
    (L_q, L_k), _ = mha.graph["scores"].jacobians()
    assert isinstance(L_q, BlockKronecker) and isinstance(L_k, BlockKronecker)
    assert [info.name for info in mha.graph.nodes()][:2] == ["x", "key_padding_mask"]
    assert bp.gradcheck(mha.graph, x=x, key_padding_mask=np.zeros((2, 3), bool)).checks


def test_a_stale_inner_graph_is_refused() -> None:
    rng = np.random.default_rng(12)
    mha = bp.MultiHeadAttention(4, 2, rng=7)
    x = rng.standard_normal((2, 3, 4))
    mha.forward(x)
    mha.graph.forward(x=2 * x, key_padding_mask=np.zeros((2, 3), bool))
    with pytest.raises(RuntimeError, match=r"inner graph \(\.graph\) was run on its own"):
        mha.backward(np.ones((2, 3, 4)))
    with pytest.raises(RuntimeError, match="inner graph"):
        mha.jacobians()
    mha.forward(x)
    assert mha.backward(np.ones((2, 3, 4)))[0].shape == x.shape


def test_in_a_sequential_parameters_are_named_by_place_and_per_example_grads_add_up() -> None:
    rng = np.random.default_rng(13)
    mha = randomized(bp.MultiHeadAttention(4, 2, rng=8), seed=8)
    net = bp.Sequential([bp.Linear(3, 4, rng=9), mha, bp.Tanh()])
    x = rng.standard_normal((3, 5, 3))
    y = net.forward(x)
    assert repr(mha.params["Wq"]).startswith("Parameter '1.Wq'")
    g = rng.standard_normal(y.shape)
    total = net.backward(g)
    per = net.backward(g, per_example=True)
    for p in net.parameters():
        assert per.params[p].shape == (3, *p.shape)
        np.testing.assert_allclose(
            per.params[p].sum(axis=0), total.params[p], rtol=1e-10, atol=1e-14
        )
    # Example 1's term is its own gradient: the same net on that example alone.
    net.forward(x[1:2])
    alone = net.backward(g[1:2])
    for p in mha.parameters():
        np.testing.assert_allclose(per.params[p][1], alone.params[p], rtol=1e-10, atol=1e-14)
    assert bp.gradcheck(net, x).checks


# -- gradcheck passes, and fails on a wrong backward ----------------------------------------


class OffByOne(bp.MultiHeadAttention):
    """Its backward returns dJ/dWq scaled by 1.001: a wrong derivative."""

    def _backward(self, op: Any, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in, {**grads, "Wq": grads["Wq"] * 1.001}


def test_gradcheck_passes_on_attention_and_fails_on_a_wrong_backward() -> None:
    rng = np.random.default_rng(14)
    x, mask = rng.standard_normal((2, 4, 6)), key_mask(rng, 2, 4)
    report = bp.gradcheck(randomized(bp.MultiHeadAttention(6, 3, causal=True, rng=1), 9), x, mask)
    assert len(report.checks) == 9 * 4 and report.worst < 1e-6
    with pytest.raises(bp.GradcheckError, match="parameter 'Wq'"):
        bp.gradcheck(randomized(OffByOne(6, 3, causal=True, rng=1), 9), x, mask)
    # In a model, the mask a second input of the node: the graph check (fast, explicit
    # Algorithm 14.1 and finite differences) passes too, and fails with the wrong layer.
    model = model_of(randomized(bp.MultiHeadAttention(6, 3, rng=1), 9), with_mask=True)
    assert bp.gradcheck(model, x=x, key_padding_mask=mask).worst < 1e-6
    wrong = model_of(randomized(OffByOne(6, 3, rng=1), 9), with_mask=True)
    with pytest.raises(bp.GradcheckError, match="Wq"):
        bp.gradcheck(wrong, x=x, key_padding_mask=mask)


def test_gradcheck_fails_on_a_wrong_piece_of_the_inner_graph() -> None:
    rng = np.random.default_rng(15)
    mha = randomized(bp.MultiHeadAttention(4, 2, rng=2), 10)
    softmax = mha.graph["attention"]
    right = softmax._backward

    def wrong(op: Any, g_out: np.ndarray, input_grad: bool) -> Any:
        (g, none), grads = right(op, g_out, input_grad)
        return (g + 1e-3 * op.x_out, none), grads  # drops the row sums' correction

    softmax._backward = wrong  # type: ignore[method-assign]
    with pytest.raises(bp.GradcheckError, match="fast backward vs"):
        bp.gradcheck(mha, rng.standard_normal((2, 3, 4)))


# -- errors ---------------------------------------------------------------------------------


def test_bad_shapes_and_masks_are_refused_by_name() -> None:
    mha = bp.MultiHeadAttention(4, 2, rng=0)
    x = np.zeros((2, 3, 4))
    with pytest.raises(
        ValueError, match=r"MultiHeadAttention\(4, n_heads=2\): x has shape \(2, 3, 5\)"
    ):
        mha.forward(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 4\), expected \(B, T\)"):
        mha.forward(x, key_padding_mask=np.zeros((2, 4), bool))
    with pytest.raises(TypeError, match="boolean mask"):
        mha.forward(x, key_padding_mask=np.zeros((2, 3)))
    with pytest.raises(TypeError, match="key_padding_mask once"):
        mha.forward(x, np.zeros((2, 3), bool), key_padding_mask=np.zeros((2, 3), bool))
    with pytest.raises(TypeError, match="float32 but the layer works in float64"):
        mha.forward(x.astype(np.float32))
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        bp.MultiHeadAttention(6, 4)
    with pytest.raises(TypeError, match=r"1 or 2 inputs\), got 3"):
        g = bp.Graph()
        a, b, c = g.input("a"), g.input("b"), g.input("c")
        g.add(bp.MultiHeadAttention(4, 2), a, b, c)
    with pytest.raises(RuntimeError, match="call forward"):
        bp.MultiHeadAttention(4, 2).backward(np.zeros((2, 3, 4)))


# -- the transformer encoder block ----------------------------------------------------------


def torch_block(block: bp.Graph, d: int, heads: int, ff: int) -> Any:
    """``torch.nn.TransformerEncoderLayer`` (pre-norm, no dropout) with ``block``'s weights."""
    t = torch.nn.TransformerEncoderLayer(
        d, heads, ff, dropout=0.0, batch_first=True, norm_first=True, dtype=torch.float64
    )
    torch_mha(block["attn"], t=t.self_attn)
    with torch.no_grad():
        for ours, theirs in (("ff1", t.linear1), ("ff2", t.linear2)):
            theirs.weight.copy_(torch.tensor(np.array(block[ours].params["W"].value)))
            theirs.bias.copy_(torch.tensor(np.array(block[ours].params["b"].value)))
        for ours, theirs in (("norm1", t.norm1), ("norm2", t.norm2)):
            theirs.weight.copy_(torch.tensor(np.array(block[ours].params["gamma"].value)))
            theirs.bias.copy_(torch.tensor(np.array(block[ours].params["beta"].value)))
    return t.train()


def torch_block_grads(block: bp.Graph, t: Any) -> dict[bp.Parameter, np.ndarray]:
    """torch's gradients, keyed by the block's Parameters."""
    out = {p: torch_grads(t.self_attn)[name] for name, p in block["attn"].params.items()}
    for ours, theirs in (("ff1", t.linear1), ("ff2", t.linear2)):
        out[block[ours].params["W"]] = theirs.weight.grad.numpy()
        out[block[ours].params["b"]] = theirs.bias.grad.numpy()
    for ours, theirs in (("norm1", t.norm1), ("norm2", t.norm2)):
        out[block[ours].params["gamma"]] = theirs.weight.grad.numpy()
        out[block[ours].params["beta"]] = theirs.bias.grad.numpy()
    return out


def randomize(model: bp.Graph, seed: int, scale: float = 0.5) -> bp.Graph:
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.value = (scale * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


@pytest.mark.parametrize("mode", ["fast", "explicit"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_transformer_block_matches_torch_encoder_layer(
    causal: bool, masked: bool, mode: str
) -> None:
    rng = np.random.default_rng(16)
    d, heads, ff, B, T = 8, 2, 16, 3, 5
    block = bp.transformer_block(d, heads, ff, causal=causal, key_padding_mask=masked, rng=3)
    randomize(block, seed=11)
    x = rng.standard_normal((B, T, d))
    mask = key_mask(rng, B, T) if masked else None
    y = block.forward(x=x) if mask is None else block.forward(x=x, key_padding_mask=mask)
    g = rng.standard_normal(y.shape)
    grads = block.backward(g, mode=mode)
    t = torch_block(block, d, heads, ff)
    xt = torch.tensor(x, requires_grad=True)
    src_mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1) if causal else None
    kpm = None if mask is None else torch.tensor(mask)
    y_t = t(xt, src_mask=src_mask, src_key_padding_mask=kpm)
    y_t.backward(torch.tensor(g))
    close(y, y_t)
    close(grads.inputs["x"], xt.grad)
    expected = torch_block_grads(block, t)
    assert set(expected) == set(block.parameters())  # every parameter is compared
    for p, grad_t in expected.items():
        close(grads.params[p], grad_t)


def test_transformer_block_in_float32_and_its_gradient_check() -> None:
    rng = np.random.default_rng(17)
    block = randomize(bp.transformer_block(4, 2, 8, causal=True, rng=4), seed=12)
    x = rng.standard_normal((2, 3, 4))
    report = bp.gradcheck(block, x=x)
    assert report.checks and report.worst < 1e-6
    block32 = bp.transformer_block(4, 2, 8, causal=True, rng=4, dtype=np.float32)
    for p32, p64 in zip(block32.parameters(), block.parameters(), strict=True):
        p32.value = p64.value.astype(np.float32)
    y32 = block32.forward(x=x.astype(np.float32))
    y64 = block.forward(x=x)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    g = rng.standard_normal(y64.shape)
    grads32, grads64 = block32.backward(g.astype(np.float32)), block.backward(g)
    np.testing.assert_allclose(grads32.inputs["x"], grads64.inputs["x"], rtol=1e-4, atol=1e-5)
    for p32, p64 in zip(block32.parameters(), block.parameters(), strict=True):
        assert grads32.params[p32].dtype == np.float32
        np.testing.assert_allclose(grads32.params[p32], grads64.params[p64], rtol=1e-4, atol=1e-4)
    names = [info.name for info in block.nodes() if not info.auto]
    assert names == [
        "x", "norm1", "attn", "residual1", "norm2", "ff1", "relu", "ff2", "residual2"
    ]  # fmt: skip
