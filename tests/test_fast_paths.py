"""Fused fast paths against the literal products of their own Jacobians, where they
take a shortcut: ties in tiled max pooling, grouped strided transposed convolution."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import explicit_vjp


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tiled_max_pooling_after_relu_with_many_ties(dtype: type) -> None:
    # After a ReLU most windows hold several exact zeros: the fused backward must send
    # each window's gradient to one entry, the one the selection Jacobian names.
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((3, 2, 8, 6)) - 0.8, 0).astype(dtype)
    assert (x == 0).mean() > 0.6
    pool = bp.MaxPool2d(2)
    out = pool.forward(x)
    g = rng.standard_normal(out.shape).astype(dtype)
    fast, _ = pool.backward(g)
    L_x, _ = pool.jacobians()
    literal = explicit_vjp(L_x, g.reshape(3, -1)).reshape(x.shape)
    np.testing.assert_array_equal(fast, literal)
    # one entry per window receives the window's gradient, the first in row-major order
    windows = fast.reshape(3, 2, 4, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(3, 2, 4, 3, 4)
    assert ((windows != 0).sum(axis=-1) <= 1).all()
    all_zero = x.reshape(3, 2, 4, 2, 3, 2).max(axis=(3, 5)) == 0
    first = windows[..., 0]
    np.testing.assert_array_equal(first[all_zero], g[all_zero])


def test_grouped_strided_transposed_convolution_fast_equals_explicit() -> None:
    rng = np.random.default_rng(6)
    layer = bp.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, rng=7)
    x = rng.standard_normal((2, 4, 3, 5))
    out = layer.forward(x)
    g = rng.standard_normal(out.shape)
    fast, grads = layer.backward(g)
    L_x, L_theta = layer.jacobians()
    np.testing.assert_allclose(
        fast, explicit_vjp(L_x, g.reshape(2, -1)).reshape(x.shape), rtol=1e-12, atol=1e-13
    )
    for name, L in L_theta.items():
        literal = explicit_vjp(L, g.reshape(2, -1), sum_batch=True).reshape(grads[name].shape)
        np.testing.assert_allclose(grads[name], literal, rtol=1e-12, atol=1e-13)
    assert bp.gradcheck(layer, x, mode="entries").worst < 1e-6


def test_conv_layers_name_their_kernel_and_bias() -> None:
    conv = bp.Conv2d(2, 3, 3, rng=0)
    assert conv.W is conv.params["W"] and conv.b is conv.params["b"]
    assert bp.ConvTranspose2d(2, 3, 3, bias=False, rng=0).b is None
