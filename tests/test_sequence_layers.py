"""The layers of token sequences: Embedding, PositionalEncoding, MatMul, masked Softmax.

The battery (``tests/test_layers.py``) runs the three-way check on each of them and
``tests/test_torch_reference.py`` compares them with PyTorch; here are the things
those tables do not say: repeated ids add their gradients, codes and masked rows
worked out by hand, and the errors for bad ids, masks and shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import BlockKronecker, DiagonalPlusLowRank, IndexSelection

# -- Embedding ---------------------------------------------------------------------------


def test_embedding_looks_up_rows_and_repeated_ids_add_their_gradients() -> None:
    W = np.arange(15.0).reshape(5, 3)
    emb = bp.Embedding(5, 3, W=W)
    ids = np.array([[2, 0, 2], [4, 2, 1]])  # id 2 three times, twice in one sequence
    out = emb.forward(ids)
    np.testing.assert_array_equal(out, W[ids])
    g = np.arange(18.0).reshape(2, 3, 3) - 7.0
    g_in, grads = emb.backward(g)
    assert g_in is None  # ids are data: no gradient
    expected = np.zeros((5, 3))
    expected[2] = g[0, 0] + g[0, 2] + g[1, 1]
    expected[0] = g[0, 1]
    expected[4] = g[1, 0]
    expected[1] = g[1, 2]
    np.testing.assert_array_equal(grads["W"], expected)  # row 3 is never used: zero
    L_x, L_theta = emb.jacobians()
    assert L_x is None
    L_W = L_theta["W"]
    assert isinstance(L_W, IndexSelection) and L_W.shape == (9, 15)
    np.testing.assert_array_equal(L_W.vjp_sum(g.reshape(2, 9)).reshape(5, 3), expected)
    # Each row of L^W holds one 1, at W[id, j]: example 0, output (t=2, j=1) reads W[2, 1].
    assert L_W.to_dense()[0, 2 * 3 + 1].tolist() == [0.0] * 7 + [1.0] + [0.0] * 7
    per_example = emb.per_example_grads(g)
    assert per_example["W"].shape == (2, 5, 3)
    np.testing.assert_array_equal(per_example["W"].sum(axis=0), expected)


def test_embedding_refuses_ids_out_of_range_and_changes_nothing() -> None:
    emb = bp.Embedding(4, 2, rng=0)
    emb.forward(np.array([[0, 3]]))
    before = emb.backward(np.ones((1, 2, 2)))[1]["W"]
    for bad in (np.array([[0, 4]]), np.array([[-1, 2]])):
        with pytest.raises(ValueError, match=r"outside 0\.\.3.*4 rows of W"):
            emb.forward(bad)
    with pytest.raises(TypeError, match="integer"):
        emb.forward(np.array([[0.0, 1.0]]))
    np.testing.assert_array_equal(emb.backward(np.ones((1, 2, 2)))[1]["W"], before)
    with pytest.raises(ValueError, match="positive integer"):
        bp.Embedding(0, 3)
    with pytest.raises(ValueError, match=r"expected shape \(4, 2\)"):
        bp.Embedding(4, 2, W=np.zeros((2, 4)))


def test_embedding_keeps_the_dtype_of_its_table() -> None:
    emb = bp.Embedding(6, 4, rng=1, dtype=np.float32)
    out = emb.forward(np.array([[1, 5, 1]]))
    assert out.dtype == np.float32
    assert emb.backward(np.ones((1, 3, 4), np.float32))[1]["W"].dtype == np.float32


# -- PositionalEncoding ------------------------------------------------------------------


def test_positional_codes_by_hand() -> None:
    pe = bp.PositionalEncoding(4, max_len=3)
    # d = 4: features (0, 1) turn at rate 1, features (2, 3) at 10000^(-2/4) = 1/100.
    want = np.array(
        [
            [0.0, 1.0, 0.0, 1.0],
            [np.sin(1.0), np.cos(1.0), np.sin(0.01), np.cos(0.01)],
            [np.sin(2.0), np.cos(2.0), np.sin(0.02), np.cos(0.02)],
        ]
    )
    np.testing.assert_allclose(pe.codes, want, rtol=1e-15, atol=1e-16)
    x = np.random.default_rng(0).standard_normal((2, 2, 4))
    np.testing.assert_allclose(pe.forward(x), x + want[:2], rtol=1e-15)
    g = np.ones((2, 2, 4))
    g_in, grads = pe.backward(g)
    np.testing.assert_array_equal(g_in, g)
    assert grads == {}
    assert pe.forward(x.astype(np.float32)).dtype == np.float32


def test_positional_encoding_refuses_long_sequences_and_other_widths() -> None:
    pe = bp.PositionalEncoding(4, max_len=3)
    with pytest.raises(ValueError, match=r"T = 4 positions .* max_len = 3"):
        pe.forward(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"expected \(B, T, 4\)"):
        pe.forward(np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        bp.PositionalEncoding(4, 0)


# -- MatMul ------------------------------------------------------------------------------


def test_matmul_gradients_are_two_matrix_products() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 2, 5, 3))
    mm = bp.MatMul()
    out = mm.forward(a, b)
    np.testing.assert_allclose(out, np.einsum("bhik,bhkj->bhij", a, b), rtol=1e-12, atol=1e-15)
    g = rng.standard_normal(out.shape)
    (g_a, g_b), grads = mm.backward(g)
    np.testing.assert_allclose(g_a, np.einsum("bhij,bhkj->bhik", g, b), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_b, np.einsum("bhik,bhij->bhkj", a, g), rtol=1e-12, atol=1e-15)
    (L_a, L_b), _ = mm.jacobians()
    assert isinstance(L_a, BlockKronecker) and isinstance(L_b, BlockKronecker)
    assert (L_a.side, L_b.side) == ("left", "right")
    assert L_a.shape == (2 * 4 * 3, 2 * 4 * 5) and L_a.nnz == 2 * 4 * 3 * 5


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((2, 3, 4), (2, 5, 2)),
        ((2, 3), (2, 3)),
        ((2, 2, 3, 4), (2, 3, 4, 2)),
        ((2, 3, 4), (2, 2, 4, 1)),
    ],
)
def test_matmul_refuses_shapes_that_do_not_multiply(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"MatMul\(\): cannot multiply"):
        bp.MatMul().forward(np.zeros(a), np.zeros(b))


# -- Softmax with masks ------------------------------------------------------------------


def _softmax_over(z: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax of one row over its allowed entries, zeros elsewhere (zeros if none)."""
    out = np.zeros_like(z)
    if allowed.any():
        e = np.exp(z[allowed] - z[allowed].max())
        out[allowed] = e / e.sum()
    return out


def test_masked_softmax_by_rows_and_a_fully_masked_row_gives_zeros() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4))
    mask = np.array([[False, True, False, True], [True, True, True, True]])  # (B, keys)
    sm = bp.Softmax(masked=True)
    p = sm.forward(x, mask)
    for b in range(2):
        for r in range(3):
            np.testing.assert_allclose(p[b, r], _softmax_over(x[b, r], ~mask[b]), rtol=1e-14)
    assert np.all(p[1] == 0)  # example 1 allows nothing: zeros, not NaN
    g = 1e3 * rng.standard_normal(p.shape)
    (g_in, g_mask), grads = sm.backward(g)
    assert g_mask is None and grads == {}
    assert np.all(np.isfinite(g_in))
    assert np.all(g_in[1] == 0) and np.all(g_in[0][:, mask[0]] == 0)
    (L, L_mask), _ = sm.jacobians()
    assert isinstance(L, DiagonalPlusLowRank) and L_mask is None
    D = L.to_dense()
    assert np.all(D[1] == 0)
    blocked = np.broadcast_to(mask[0], (3, 4)).ravel()
    assert np.all(D[0][blocked] == 0) and np.all(D[0][:, blocked] == 0)


def test_causal_softmax_sees_the_past_only() -> None:
    x = np.random.default_rng(4).standard_normal((1, 2, 3, 3))  # (B, heads, T, T)
    p = bp.Softmax(causal=True).forward(x)
    for i in range(3):
        allowed = np.arange(3) <= i
        for h in range(2):
            np.testing.assert_allclose(p[0, h, i], _softmax_over(x[0, h, i], allowed), rtol=1e-14)
    # combined with a key mask that hides key 0: query 0 then sees nothing
    p = bp.Softmax(causal=True, masked=True).forward(x, np.array([[True, False, False]]))
    assert np.all(p[0, :, 0] == 0)
    np.testing.assert_allclose(p[0, 0, 2], _softmax_over(x[0, 0, 2], np.array([0, 1, 1], bool)))


def test_softmax_mask_errors() -> None:
    x = np.zeros((2, 3, 4))
    sm = bp.Softmax(masked=True)
    with pytest.raises(TypeError, match="boolean mask"):
        sm.forward(x, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\) does not broadcast"):
        sm.forward(x, np.zeros((2, 3), bool))
    with pytest.raises(TypeError, match=r"takes 2 input\(s\) \(x_in, mask\), got 1"):
        sm.forward(x)
    with pytest.raises(ValueError, match="causal masking runs along the last axis"):
        bp.Softmax(axis=1, causal=True).forward(x)
    with pytest.raises(ValueError, match="causal masking"):
        bp.Softmax(causal=True).forward(np.zeros((2, 4)))


def test_a_mask_is_a_graph_input_without_gradient_and_fans_out() -> None:
    # One key mask read by two masked softmaxes: the graph routes it through a Branch.
    g = bp.Graph()
    x, y, mask = g.input("x"), g.input("y"), g.input("mask")
    a = g.add(bp.Softmax(masked=True), x, mask)
    b = g.add(bp.Softmax(masked=True), y, mask)
    g.output(g.add(bp.Multiply(), a, b))
    rng = np.random.default_rng(5)
    feed = {
        "x": rng.standard_normal((3, 2, 4)),
        "y": rng.standard_normal((3, 2, 4)),
        "mask": np.array([[False, True, False, False], [True] * 4, [False] * 4]),
    }
    out = g.forward(feed)
    assert np.all(out[1] == 0)
    grads = g.backward(rng.standard_normal(out.shape))
    assert set(grads.inputs) == {"x", "y"}
    assert any(info.auto for info in g.nodes())  # the mask's fan-out
    report = bp.gradcheck(g, feed)
    assert report.checks and report.worst < 1e-6
    explicit = g.backward(np.ones(out.shape), mode="explicit")
    fast = g.backward(np.ones(out.shape))
    np.testing.assert_allclose(explicit.inputs["x"], fast.inputs["x"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [1.0, 50.0, 1e3])
def test_softmax_is_stable_with_and_without_the_row_shift(dtype: type, scale: float) -> None:
    # Small scores skip the shift by the row maximum, large ones take it (the bound
    # depends on the dtype): both give the softmax, never inf or NaN.
    rng = np.random.default_rng(6)
    x = (scale * rng.standard_normal((2, 3, 5))).astype(dtype)
    mask = np.zeros((2, 5), bool)
    mask[1] = True  # example 1: every row fully masked
    mask[0, 2] = True
    for layer, args in ((bp.Softmax(), (x,)), (bp.Softmax(masked=True), (x, mask))):
        p = layer.forward(*args)
        assert p.dtype == dtype and np.all(np.isfinite(p))
        blocked = np.broadcast_to(mask[:, None, :], x.shape) if len(args) == 2 else None
        for b in range(2):
            for r in range(3):
                allowed = np.ones(5, bool) if blocked is None else ~blocked[b, r]
                want = _softmax_over(x[b, r].astype(np.float64), allowed)
                np.testing.assert_allclose(
                    p[b, r], want, rtol=2e-5 if dtype == np.float32 else 1e-12, atol=1e-30
                )
