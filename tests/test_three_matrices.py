"""The transformers chapter's three matrices: ``∂Y/∂X`` of a token-wise Linear (block
diagonal), a convolution over tokens (block Toeplitz) and self-attention (dense, moving
with the input), from the engine's Jacobians; and the figures that draw them."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.plot.mixing import MIXERS, mixing_jacobians, token_mixers

T, D = 7, 3


def blocks(J: np.ndarray, d: int = D) -> np.ndarray:
    """``J`` ``(T·d, T·d)`` as ``(T, T, d, d)``: ``[t, s]`` is the block of output token
    ``t`` and input token ``s``."""
    n = J.shape[0] // d
    return J.reshape(n, d, n, d).transpose(0, 2, 1, 3)


def inputs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, D))


def test_a_token_wise_linear_is_I_kron_W() -> None:
    mixers = token_mixers(D, rng=1)
    J = mixing_jacobians(inputs(0), mixers)["token-wise Linear"]
    W = mixers["token-wise Linear"].params["W"].value
    np.testing.assert_array_equal(J, np.kron(np.eye(T), W))
    B = blocks(J)
    for t in range(T):
        for s in range(T):
            assert np.array_equal(B[t, s], W) if s == t else not B[t, s].any()


@pytest.mark.parametrize("k", [3, 5])
def test_a_convolution_over_tokens_is_block_toeplitz(k: int) -> None:
    mixers = token_mixers(D, kernel_size=k, rng=2)
    conv = mixers["convolution over tokens"]
    W, b = conv.layers[2].params["W"].value[:, :, 0], conv.layers[2].params["b"].value
    x = inputs(1)
    # the layer is the cross-correlation over tokens, with zero padding, written out
    padded = np.vstack([np.zeros((k // 2, D)), x, np.zeros((k // 2, D))])
    by_hand = np.stack([sum(W[:, :, j] @ padded[t + j] for j in range(k)) + b for t in range(T)])
    np.testing.assert_allclose(conv.forward(x[None])[0], by_hand, rtol=1e-12, atol=1e-14)

    B = blocks(mixing_jacobians(x, mixers)["convolution over tokens"])
    for t in range(T):
        for s in range(T):
            tap = s - t + k // 2
            if 0 <= tap < k:
                np.testing.assert_allclose(B[t, s], W[:, :, tap], rtol=1e-14, atol=0)
                if t + 1 < T and s + 1 < T:  # constant along the block diagonals
                    np.testing.assert_array_equal(B[t + 1, s + 1], B[t, s])
            else:
                assert not B[t, s].any(), (t, s)  # zero beyond the kernel
    assert np.count_nonzero(B.any(axis=(2, 3))) == sum(
        min(T, t + k // 2 + 1) - max(0, t - k // 2) for t in range(T)
    )


def numeric_jacobian(layer, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of ``layer.forward`` at one sequence ``x``, column by column."""
    columns = []
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = h
        up = layer.forward((x.ravel() + e).reshape(1, *x.shape), cache=False)
        down = layer.forward((x.ravel() - e).reshape(1, *x.shape), cache=False)
        columns.append((up - down).ravel() / (2 * h))
    return np.stack(columns, axis=1)


def test_self_attention_is_dense_and_moves_with_the_input() -> None:
    mixers = token_mixers(D, n_heads=1, rng=3)
    x1, x2 = inputs(4), inputs(5)
    J1, J2 = mixing_jacobians(x1, mixers), mixing_jacobians(x2, mixers)
    A1, A2 = J1["self-attention"], J2["self-attention"]
    assert np.count_nonzero(A1) == A1.size  # every output entry depends on every input one
    assert blocks(A1).any(axis=(2, 3)).all()
    np.testing.assert_allclose(
        A1, numeric_jacobian(mixers["self-attention"], x1), rtol=1e-6, atol=1e-9
    )
    assert np.abs(A1 - A2).max() > 0.1 * np.abs(A1).max()  # data-dependent
    for name in MIXERS[:2]:  # the other two are the same matrix at every input
        np.testing.assert_array_equal(J1[name], J2[name])


def test_token_mixers_refuse_an_even_kernel() -> None:
    with pytest.raises(ValueError, match="kernel_size must be an odd positive integer"):
        token_mixers(4, kernel_size=4)
    with pytest.raises(ValueError, match=r"x has shape \(3,\); expected one sequence"):
        mixing_jacobians(np.zeros(3))


def test_plot_three_matrices_draws_the_engine_jacobians() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    x = inputs(6)
    fig = bp.plot.plot_three_matrices(x, token_mixers(D, rng=7))
    try:
        panels = fig.axes[:3]
        expected = mixing_jacobians(x, token_mixers(D, rng=7))
        for ax, (name, J) in zip(panels, expected.items(), strict=True):
            assert ax.get_title().startswith(name)
            np.testing.assert_array_equal(ax.images[0].get_array(), J)
        assert "block diagonal" in panels[0].get_title()
        assert "Toeplitz" in panels[1].get_title() and "dense" in panels[2].get_title()
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 4\)"):
        bp.plot.plot_three_matrices(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="mixers must have the keys"):
        bp.plot.plot_three_matrices(x, {"one": bp.Linear(D, D)})


def test_plot_attention_draws_one_panel_per_head() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(8)
    A = rng.random((3, 4, 4))
    A /= A.sum(-1, keepdims=True)
    fig = bp.plot.plot_attention(A, list("abcd"), ["w", "x", "y", "z"], key_label="keys here")
    try:
        heads = fig.axes[:3]
        assert [ax.get_title() for ax in heads] == ["head 0", "head 1", "head 2"]
        for h, ax in enumerate(heads):
            np.testing.assert_array_equal(ax.images[0].get_array(), A[h])
        assert [t.get_text() for t in heads[0].get_xticklabels()] == list("abcd")
        assert [t.get_text() for t in heads[0].get_yticklabels()] == list("wxyz")
        assert heads[1].get_xlabel() == "keys here"
    finally:
        plt.close(fig)
    plt.close(bp.plot.plot_attention(A[0]))  # one head
    with pytest.raises(ValueError, match=r"weights has shape \(4,\)"):
        bp.plot.plot_attention(np.ones(4))
    with pytest.raises(ValueError, match="keys has 3 labels for 4 tokens"):
        bp.plot.plot_attention(A, ["a", "b", "c"])
