"""``Linear`` on ``(B, ..., n_in)``: the last axis, the same ``W`` at every position.

Three ways agree: the fast backward, the explicit Jacobians (``I_P ⊗ W``, the
positions-major ``KroneckerMatrix``, the ``Tile`` of identities) and float64
central differences; and, when PyTorch is installed, ``torch.nn.Linear`` in
float64.
"""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import KroneckerMatrix, RepeatedBlock, Tile, explicit_vjp

SHAPES = {"tokens (B, T, n)": (2, 4, 3), "grid (B, 2, 3, n)": (2, 2, 3, 3)}
N_OUT = 2


def _layer(n_in: int, dtype: type = np.float64) -> bp.Linear:
    return bp.Linear(n_in, N_OUT, rng=np.random.default_rng(0), dtype=dtype)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_forward_acts_on_the_last_axis(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).standard_normal(shape)
    lin = _layer(shape[-1])
    W, b = lin.W.value, lin.b.value  # type: ignore[union-attr]
    out = lin.forward(x)
    assert out.shape == (*shape[:-1], N_OUT)
    expected = np.einsum("...k,ik->...i", x, W) + b
    np.testing.assert_allclose(out, expected, rtol=1e-13)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fast_explicit_and_numeric_agree(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    lin = _layer(shape[-1])
    W0, b0 = lin.W.value.copy(), lin.b.value.copy()  # type: ignore[union-attr]
    B, n_in = shape[0], shape[-1]
    P = int(np.prod(shape[1:-1]))
    g_out = rng.standard_normal((*shape[:-1], N_OUT))
    g_rows = g_out.reshape(B, -1)

    lin.forward(x)
    g_in, grads = lin.backward(g_out)
    L_x, L_theta = lin.jacobians()
    assert type(L_x) is RepeatedBlock and L_x.P == P
    assert type(L_theta["W"]) is KroneckerMatrix and L_theta["W"].rows == "positions"
    assert type(L_theta["b"]) is Tile and L_theta["b"].copies == P

    # Central differences, each a function of one argument with the others fixed.
    def with_params(W: np.ndarray, b: np.ndarray, v: np.ndarray) -> np.ndarray:
        return bp.Linear(n_in, N_OUT, W=W, b=b).forward(v)

    # Central differences in the (B, M, N) layout of to_dense(), by example.
    num_x = bp.numerical_jacobian(lambda v: with_params(W0, b0, v), x)
    num_W = bp.numerical_jacobian(lambda w: with_params(w, b0, x), W0, wrt_batch=False)
    num_b = bp.numerical_jacobian(lambda c: with_params(W0, c, x), b0, wrt_batch=False)
    for L, num in ((L_x, num_x), (L_theta["W"], num_W), (L_theta["b"], num_b)):
        np.testing.assert_allclose(L.to_dense(), num, rtol=1e-6, atol=1e-8)

    # The fast path against the explicit matrices (dense, then sparse as Algorithm 14.1).
    expected_in = np.einsum("bm,bmn->bn", g_rows, num_x).reshape(shape)
    np.testing.assert_allclose(g_in, expected_in, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        g_in, np.einsum("bm,bmn->bn", g_rows, L_x.to_dense()).reshape(shape), rtol=1e-12
    )
    np.testing.assert_allclose(g_in, explicit_vjp(L_x, g_rows).reshape(shape), rtol=1e-12)
    for name, num in (("W", num_W), ("b", num_b)):
        p_shape = lin.params[name].shape
        expected = np.einsum("bm,bmn->n", g_rows, num).reshape(p_shape)
        np.testing.assert_allclose(grads[name], expected, rtol=1e-6, atol=1e-8)
        L = L_theta[name]
        dense = np.einsum("bm,bmn->n", g_rows, L.to_dense()).reshape(p_shape)
        np.testing.assert_allclose(grads[name], dense, rtol=1e-12)
        sparse = explicit_vjp(L, g_rows, sum_batch=True).reshape(p_shape)
        np.testing.assert_allclose(grads[name], sparse, rtol=1e-12)


def test_gradients_written_out_per_position() -> None:
    # dJ/dW = Σ_b Σ_t g_out[b, t]ᵀ x_in[b, t], dJ/db = Σ_b Σ_t g_out[b, t], with loops.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 4))
    g = rng.standard_normal((3, 5, N_OUT))
    lin = _layer(4)
    lin.forward(x)
    g_in, grads = lin.backward(g)
    dW, db, dx = np.zeros((N_OUT, 4)), np.zeros(N_OUT), np.zeros_like(x)
    for b in range(3):
        for t in range(5):
            dW += np.outer(g[b, t], x[b, t])
            db += g[b, t]
            dx[b, t] = g[b, t] @ lin.W.value
    np.testing.assert_allclose(grads["W"], dW, rtol=1e-12)
    np.testing.assert_allclose(grads["b"], db, rtol=1e-12)
    np.testing.assert_allclose(g_in, dx, rtol=1e-12)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_gradcheck_passes(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(4).standard_normal(shape)
    report = bp.gradcheck(_layer(shape[-1]), x)
    assert "passed" in str(report)


def test_float32_stays_float32() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    lin = _layer(3, np.float32)
    out = lin.forward(x)
    g_in, grads = lin.backward(np.ones_like(out))
    assert out.dtype == g_in.dtype == np.float32
    assert grads["W"].dtype == grads["b"].dtype == np.float32
    L_x, L_theta = lin.jacobians()
    g = np.ones((2, 4 * N_OUT), dtype=np.float32)
    for L in (L_x, *L_theta.values()):
        assert L.dtype == np.float32, L
        assert L.vjp(g).dtype == np.float32, L
        assert explicit_vjp(L, g, sum_batch=True).dtype == np.float32, L


def test_bias_free_tokens() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4))
    lin = bp.Linear(4, 2, bias=False, rng=rng)
    out = lin.forward(x)
    np.testing.assert_allclose(out, x @ lin.W.value.T, rtol=1e-13)
    _, grads = lin.backward(np.ones_like(out))
    assert set(grads) == {"W"} and set(lin.jacobians()[1]) == {"W"}


@pytest.mark.parametrize(
    "bad, hint",
    [((2, 5), False), ((2, 3, 5), False), ((4,), True)],
    ids=["2-D", "3-D", "no batch axis"],
)
def test_wrong_last_axis_names_layer_and_shapes(bad: tuple[int, ...], hint: bool) -> None:
    lin = bp.Linear(4, 3, rng=0)
    with pytest.raises(ValueError) as info:
        lin.forward(np.ones(bad))
    msg = str(info.value)
    assert "Linear(4→3)" in msg and str(bad) in msg and "(B, ..., 4)" in msg
    assert ("batch axis" in msg) == hint
    assert lin._op is None  # nothing cached by the failed call


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_torch_linear(shape: tuple[int, ...]) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    g_out = rng.standard_normal((*shape[:-1], N_OUT))
    lin = _layer(shape[-1])
    out = lin.forward(x)
    g_in, grads = lin.backward(g_out)

    ref = torch.nn.Linear(shape[-1], N_OUT, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.array(lin.W.value)))
        ref.bias.copy_(torch.tensor(np.array(lin.b.value)))  # type: ignore[union-attr]
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g_out))
    assert xt.grad is not None and ref.weight.grad is not None and ref.bias.grad is not None
    for mine, theirs in (
        (out, yt),
        (g_in, xt.grad),
        (grads["W"], ref.weight.grad),
        (grads["b"], ref.bias.grad),
    ):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)
