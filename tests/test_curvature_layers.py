"""Every layer's second-order hooks against PyTorch's double backward, in float64.

For each row of ``TORCH_ROWS`` (every layer torch can compute, training-mode BatchNorm
included) and random tangents ``(ẋ, θ̇)`` of its float inputs and parameters:

- ``layer_tangent`` equals ``torch.func.jvp`` of the row's torch function;
- ``layer_hvp`` equals the gradient of ``<∇<g_out, f>, (ẋ, θ̇)>``, the Hessian of
  ``<g_out, f>`` times the tangent, from torch's autograd run twice
  (``create_graph=True``).

Nothing the library computed goes to torch but the starting values. torch's attention
runs on its math kernel here (the same function, written with matmul and softmax): its
fused CPU kernel has neither a forward mode nor a double backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_torch_reference import TORCH_ROWS, TorchRow, _normal, _seed_for, close, tt

import backprop as bp
from backprop.curvature import layer_hvp, layer_tangent

torch = pytest.importorskip("torch")
# torch's forward mode loads its decompositions on first use, through torch.jit.script,
# which warns of its own deprecation: load them once here, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _one = torch.ones(1, dtype=torch.float64)
    torch.func.jvp(torch.sin, (_one,), (_one,))


#: The table, with a Pointwise that states its h''. The one built without it has
#: first derivatives only: curvature refuses it, by name.
ROWS = [
    *TORCH_ROWS,
    TorchRow(
        "Pointwise-sin-d2h",
        lambda: bp.Pointwise(np.sin, np.cos, d2h=lambda x: -np.sin(x)),
        _normal((4, 5)),
        torch.sin,
    ),
]
NO_SECOND_ORDER = {"Pointwise-sin"}
#: Rows with a second-order term that is not zero (the check below can fail).
NONZERO = {
    "Linear",
    "Tanh",
    "SoftmaxCrossEntropy",
    "BatchNorm1d-train",
    "MatMul",
    "Softmax-key-mask",
    "MultiHeadAttention",
    "RNNCell-tanh",
    "LSTMCell",
}
#: Parameters the output does not read: attention's key bias adds the same amount to every
#: score of a row, which the softmax ignores. torch differentiates through that sum, and
#: its (zero) curvature comes out as rounding noise, ~1e-12 beside products of ~100.
NOT_READ = {(name, "bk") for name in ("MultiHeadAttention", "MultiHeadAttention-causal-key-mask")}


@pytest.fixture(autouse=True)
def _math_attention() -> Iterator[None]:
    """torch's scaled dot-product attention on its math kernel, which torch can
    differentiate forward and twice (the fused one refuses both)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _is_float(x: np.ndarray) -> bool:
    return bool(np.issubdtype(x.dtype, np.floating))


def _as_tuple(v: Any) -> tuple[Any, ...]:
    return v if isinstance(v, tuple) else (v,)


def _setup(row: TorchRow, seed: int) -> tuple[bp.Layer, list[np.ndarray], Any, list[Any], dict]:
    rng = np.random.default_rng(seed)
    xs = row.inputs(rng)
    layer = row.make()
    out = layer.forward(*xs)
    g_out = _seed_for(out, rng)
    dx = [rng.standard_normal(x.shape) if _is_float(x) else None for x in xs]
    dtheta = {name: rng.standard_normal(p.shape) for name, p in layer.params.items()}
    return layer, xs, g_out, dx, dtheta


def _torch_call(row: TorchRow, layer: bp.Layer, xs: list[np.ndarray]) -> Any:
    """``f(*float inputs, *params)`` with the labels fixed, and its torch arguments."""
    floats = [i for i, x in enumerate(xs) if _is_float(x)]
    names = list(layer.params)

    def f(*args: Any) -> Any:
        full: list[Any] = [torch.tensor(x) for x in xs]
        for i, a in zip(floats, args, strict=False):
            full[i] = a
        params = dict(zip(names, args[len(floats) :], strict=True))
        return row.torch_fn(*full, **params)

    leaves = [tt(xs[i]) for i in floats] + [tt(layer.params[n].value) for n in names]
    return f, leaves, floats, names


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_tangent_matches_torch_jvp(row: TorchRow) -> None:
    layer, xs, _, dx, dtheta = _setup(row, 200)
    f, leaves, floats, names = _torch_call(row, layer, xs)
    tangents = [torch.tensor(dx[i]) for i in floats] + [torch.tensor(dtheta[n]) for n in names]
    _, jvp_t = torch.func.jvp(f, tuple(x.detach() for x in leaves), tuple(tangents))
    ours = layer_tangent(layer, dx, dtheta)
    for a, b in zip(_as_tuple(ours), _as_tuple(jvp_t), strict=True):
        assert a.shape == tuple(b.shape)
        close(a, b)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hvp_matches_torch_double_backward(row: TorchRow) -> None:
    layer, xs, g_out, dx, dtheta = _setup(row, 201)
    if row.name in NO_SECOND_ORDER:
        with pytest.raises(NotImplementedError, match=r"Pointwise\(sin\) has no second"):
            layer_hvp(layer, g_out, dx, dtheta)
        return
    f, leaves, floats, names = _torch_call(row, layer, xs)
    outs = _as_tuple(f(*leaves))
    seeds = [torch.tensor(np.asarray(g)) for g in _as_tuple(g_out)]
    s = sum((o * g).sum() for o, g in zip(outs, seeds, strict=True))
    grads = torch.autograd.grad(s, leaves, create_graph=True, allow_unused=True)
    u = [torch.tensor(dx[i]) for i in floats] + [torch.tensor(dtheta[n]) for n in names]
    q = sum((g * v).sum() for g, v in zip(grads, u, strict=True) if g is not None)
    if not isinstance(q, torch.Tensor) or not q.requires_grad:  # linear: no second derivative
        expected = [torch.zeros_like(x) for x in leaves]
    else:
        hv = torch.autograd.grad(q, leaves, allow_unused=True)
        expected = [
            torch.zeros_like(x) if h is None else h for h, x in zip(hv, leaves, strict=True)
        ]

    h_in, h_theta = layer_hvp(layer, g_out, dx, dtheta)
    for k, i in enumerate(floats):
        close(h_in[i], expected[k])
    for i, x in enumerate(xs):
        if not _is_float(x):
            assert h_in[i] is None  # labels take no tangent and get no curvature
    scale = max(float(np.abs(e.numpy()).max(initial=0.0)) for e in expected)
    for k, name in enumerate(names):
        if (row.name, name) in NOT_READ:
            # Ours is exactly zero; torch's, its rounding: small against the rest.
            assert not np.any(h_theta[name])
            assert np.abs(expected[len(floats) + k].numpy()).max() <= 1e-14 * scale
            continue
        close(h_theta[name], expected[len(floats) + k])
    # The test can fail: some row has a nonzero second-order term.
    if row.name in NONZERO:
        assert any(np.abs(e.numpy()).max() > 1e-3 for e in expected)
