"""The library against PyTorch autograd, in float64, on random inputs.

Every number on the PyTorch side comes from torch itself (its layers, its
autograd, its optimizers), fed the same input values and parameter values as
the library; nothing the library computed is handed to torch except the
starting values. The whole module is skipped when torch is not installed.

``TORCH_ROWS`` holds one row per layer that torch can compute (every exported layer
but ``Constant``, which is checked on hand-worked numbers): each is compared alone and
as a model's only node, in the fast and the explicit backward modes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

import backprop as bp
from backprop.jacobian import Dense, Kronecker, Sparse
from backprop.layers.backward import VJP, BatchSum, Gate, Slice, WeightGrad
from backprop.layers.worked import Constant, Scale, Shift, SumEntries

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
F = torch.nn.functional

RTOL = 1e-10
ATOL = 1e-13


def tt(a: Any, grad: bool = True) -> Any:
    """A float64 torch leaf holding a copy of ``a`` (library arrays are read-only)."""
    return torch.tensor(np.array(a, dtype=np.float64, copy=True), requires_grad=grad)


def close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    """``actual`` (a library array) equals ``expected`` (a torch tensor or an array)."""
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    assert actual is not None
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def away_from_zero(x: np.ndarray, margin: float = 1e-3) -> np.ndarray:
    """``x`` with every entry at least ``margin`` away from 0, sign kept.

    ReLU and LeakyReLU have a kink at 0, where the library takes h'(0) = 1 (the
    chapter's convention) and torch takes h'(0) = 0 for ReLU and ``slope`` for
    LeakyReLU. Both are subgradients; away from 0 they agree exactly.
    """
    return np.where(np.abs(x) < margin, np.copysign(margin, x) + x, x)


# ------------------------------------------------------------------------------ Linear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("B", [1, 4])
def test_linear_forward_and_backward(bias: bool, B: int) -> None:
    rng = np.random.default_rng(10 + B)
    lin = bp.Linear(5, 3, bias=bias, rng=rng)
    x = rng.standard_normal((B, 5))
    g_out = rng.standard_normal((B, 3))

    y = lin.forward(x)
    g_in, grads = lin.backward(g_out)

    x_t, W_t = tt(x), tt(lin.W.value)
    b_t = tt(lin.b.value) if bias else None
    y_t = F.linear(x_t, W_t, b_t)  # torch.nn.Linear.weight is (n_out, n_in), as W here
    y_t.backward(torch.tensor(g_out))

    close(y, y_t)
    close(g_in, x_t.grad)
    close(grads["W"], W_t.grad)
    assert grads["W"].shape == (3, 5)
    if bias:
        assert lin.b is not None
        close(grads["b"], b_t.grad)
        assert set(grads) == {"W", "b"}
    else:
        assert set(grads) == {"W"}
        assert lin.b is None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_jacobians_match_torch_jacobian_per_example(bias: bool) -> None:
    rng = np.random.default_rng(20)
    B, n_in, n_out = 3, 4, 2
    lin = bp.Linear(n_in, n_out, bias=bias, rng=rng)
    x = rng.standard_normal((B, n_in))
    lin.forward(x)
    L_x, L_theta = lin.jacobians()
    dense_x = L_x.to_dense()
    dense_W = L_theta["W"].to_dense()
    assert dense_x.shape == (B, n_out, n_in)
    assert dense_W.shape == (B, n_out, n_out * n_in)
    assert set(L_theta) == ({"W", "b"} if bias else {"W"})

    W_t = tt(lin.W.value, grad=False)
    b_t = tt(lin.b.value, grad=False) if bias else torch.zeros(n_out, dtype=torch.float64)
    for b in range(B):
        x_b = tt(x[b], grad=False)
        J_x, J_W, J_b = torch.autograd.functional.jacobian(
            lambda xv, Wv, bv: Wv @ xv + bv, (x_b, W_t, b_t)
        )
        close(dense_x[b], J_x)
        # torch gives ∂y/∂W as (n_out, n_out, n_in); vec(W) is row-major, so one reshape
        close(dense_W[b], J_W.reshape(n_out, n_out * n_in))
        if bias:
            close(L_theta["b"].to_dense()[b], J_b)


# --------------------------------------------------------------------------- pointwise

POINTWISE: list[tuple[str, Callable[[], bp.Layer], Callable[[Any], Any], bool]] = [
    # (id, library layer, torch function, has a kink at 0)
    ("relu", bp.ReLU, F.relu, True),
    ("leaky_relu_0.1", lambda: bp.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1), True),
    ("leaky_relu_0.3", lambda: bp.LeakyReLU(0.3), lambda x: F.leaky_relu(x, 0.3), True),
    ("sigmoid", bp.Sigmoid, torch.sigmoid, False),
    ("tanh", bp.Tanh, torch.tanh, False),
    ("softplus", bp.Softplus, F.softplus, False),
    ("sin", lambda: bp.Pointwise(np.sin, np.cos), torch.sin, False),
]


@pytest.mark.parametrize(
    "make, torch_fn, kink", [row[1:] for row in POINTWISE], ids=[row[0] for row in POINTWISE]
)
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 2)], ids=["flat", "3d"])
def test_pointwise(
    make: Callable[[], bp.Layer],
    torch_fn: Callable[[Any], Any],
    kink: bool,
    shape: tuple[int, ...],
) -> None:
    rng = np.random.default_rng(30)
    # |x| up to about 8: inside torch softplus's threshold (20), past which it returns x
    x = 2.5 * rng.standard_normal(shape)
    if kink:
        x = away_from_zero(x)
    g_out = rng.standard_normal(shape)
    layer = make()

    y = layer.forward(x)
    g_in, grads = layer.backward(g_out)

    x_t = tt(x)
    y_t = torch_fn(x_t)
    y_t.backward(torch.tensor(g_out))
    close(y, y_t)
    close(g_in, x_t.grad)
    assert grads == {}

    # The explicit Jacobian of each example against torch's, flattened as vec(x)
    L_x, _ = layer.jacobians()
    dense = L_x.to_dense()
    n = int(np.prod(shape[1:]))
    for b in range(shape[0]):
        J = torch.autograd.functional.jacobian(torch_fn, tt(x[b], grad=False))
        close(dense[b], J.reshape(n, n))


@pytest.mark.parametrize(
    "make, torch_fn",
    [(bp.Sigmoid, torch.sigmoid), (bp.Tanh, torch.tanh), (bp.Softplus, F.softplus)],
    ids=["sigmoid", "tanh", "softplus"],
)
def test_saturating_pointwise_at_extreme_inputs(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any]
) -> None:
    # Far past torch softplus's threshold (20) softplus(x) = x + log1p(e^-x) equals x in
    # float64 and its derivative is 1, so the two agree; between 20 and ~37 they differ
    # by e^-x in the derivative (torch's shortcut), which is why those values are avoided.
    x = np.array([[-800.0, -60.0, -7.5, -0.25, 0.0, 0.5, 9.0, 60.0, 800.0]])
    g_out = np.linspace(-1.0, 2.0, x.size).reshape(x.shape)
    layer = make()
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        y = layer.forward(x)
        g_in, _ = layer.backward(g_out)
    x_t = tt(x)
    y_t = torch_fn(x_t)
    y_t.backward(torch.tensor(g_out))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(g_in))
    close(y, y_t, atol=1e-300)
    # Both sides take h' from the output (σ(1 - σ), 1 - tanh²), which near saturation
    # is a difference of numbers close to 1: its rounding is absolute, about 1e-16, so
    # in the tails the relative agreement is only ~1e-9 (sech²(9) ≈ 6e-8 carries ~4e-16).
    close(g_in, x_t.grad, atol=1e-15)


@pytest.mark.parametrize(
    "make, torch_fn, slope",
    [(bp.ReLU, F.relu, 0.0), (lambda: bp.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2), 0.2)],
    ids=["relu", "leaky_relu"],
)
def test_kink_at_zero_follows_the_chapter_not_torch(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any], slope: float
) -> None:
    # A documented difference of convention, held here so that it stays deliberate:
    # at exactly 0 the library takes h'(0) = 1, torch takes the left slope.
    x = np.array([[-1.0, 0.0, 2.0]])
    layer = make()
    layer.forward(x)
    g_in, _ = layer.backward(np.ones_like(x))
    x_t = tt(x)
    torch_fn(x_t).sum().backward()
    close(g_in, [[slope, 1.0, 1.0]], atol=0)
    close(x_t.grad, [[slope, slope, 1.0]], atol=0)


# ------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("shape", [(4, 3), (1, 5), (3, 2, 2)])
def test_l2_loss(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(40)
    y_hat, y = rng.standard_normal(shape), rng.standard_normal(shape)
    loss = bp.L2Loss()
    J = loss.forward(y_hat, y)
    (g_hat, g_y), grads = loss.backward()

    y_hat_t, y_t = tt(y_hat), tt(y)
    J_t = ((y_hat_t - y_t) ** 2).sum() / shape[0]  # mean over the batch of ||ŷ - y||²
    J_t.backward()
    close(J, J_t)
    close(g_hat, y_hat_t.grad)
    close(g_y, y_t.grad)
    assert grads == {}
    # the same cost is torch's mse_loss (a mean over every entry) times the entries per example
    per_example = int(np.prod(shape[1:]))
    close(J, F.mse_loss(y_hat_t, y_t) * per_example)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e4], ids=lambda s: f"logits_x{s:g}")
@pytest.mark.parametrize("B, C", [(1, 3), (6, 5), (16, 10)])
def test_softmax_cross_entropy(scale: float, B: int, C: int) -> None:
    rng = np.random.default_rng(50 + B)
    z = scale * rng.standard_normal((B, C))
    labels = rng.integers(0, C, size=B)
    loss = bp.SoftmaxCrossEntropy()
    with np.errstate(
        over="raise", divide="raise", invalid="raise"
    ):  # large logits: no overflow anywhere
        J = loss.forward(z, labels)
        (g_z, g_labels), grads = loss.backward()
    assert np.isfinite(J) and np.all(np.isfinite(g_z))
    assert g_labels is None
    assert grads == {}

    z_t = tt(z)
    J_t = F.cross_entropy(z_t, torch.tensor(labels), reduction="mean")
    J_t.backward()
    assert torch.isfinite(J_t)
    close(J, J_t)
    close(g_z, z_t.grad)


def test_softmax_cross_entropy_rows_with_ties_and_one_hot_extremes() -> None:
    # equal logits (a uniform softmax), a row dominated by one class, and the label at
    # the dominant class and away from it
    z = np.array([[0.0, 0.0, 0.0], [1e4, 0.0, -1e4], [1e4, 0.0, -1e4], [-5.0, 2.0, 7.0]])
    labels = np.array([1, 0, 2, 1])
    loss = bp.SoftmaxCrossEntropy()
    J = loss.forward(z, labels)
    (g_z, _), _ = loss.backward()
    z_t = tt(z)
    J_t = F.cross_entropy(z_t, torch.tensor(labels))
    J_t.backward()
    close(J, J_t)
    close(g_z, z_t.grad)


# ------------------------------------------------------------------ structure layers


def test_add() -> None:
    rng = np.random.default_rng(60)
    a, b, g = (rng.standard_normal((3, 4)) for _ in range(3))
    layer = bp.Add()
    y = layer.forward(a, b)
    (g_a, g_b), _ = layer.backward(g)
    a_t, b_t = tt(a), tt(b)
    y_t = a_t + b_t
    y_t.backward(torch.tensor(g))
    close(y, y_t)
    close(g_a, a_t.grad)
    close(g_b, b_t.grad)


def test_multiply() -> None:
    rng = np.random.default_rng(61)
    a, b, g = (rng.standard_normal((3, 2, 2)) for _ in range(3))
    layer = bp.Multiply()
    y = layer.forward(a, b)
    (g_a, g_b), _ = layer.backward(g)
    a_t, b_t = tt(a), tt(b)
    y_t = a_t * b_t
    y_t.backward(torch.tensor(g))
    close(y, y_t)
    close(g_a, a_t.grad)
    close(g_b, b_t.grad)
    # and the explicit Jacobians, diag(x_b) and diag(x_a), per example
    (L_a, L_b), _ = layer.jacobians()
    for k in range(a.shape[0]):
        J_a, J_b = torch.autograd.functional.jacobian(
            lambda u, v: u * v, (tt(a[k], grad=False), tt(b[k], grad=False))
        )
        close(L_a.to_dense()[k], J_a.reshape(4, 4))
        close(L_b.to_dense()[k], J_b.reshape(4, 4))


MERGE_SHAPES = [
    [(3, 2)],
    [(3, 2), (3, 4)],
    [(3, 1), (3, 3), (3, 2)],
    [(2, 2, 3), (2, 5), (2, 1), (2, 2)],
]


@pytest.mark.parametrize("shapes", MERGE_SHAPES, ids=lambda s: f"{len(s)}_inputs")
def test_merge(shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(62)
    xs = [rng.standard_normal(s) for s in shapes]
    B = shapes[0][0]
    width = sum(int(np.prod(s[1:])) for s in shapes)
    g = rng.standard_normal((B, width))
    layer = bp.Merge()
    y = layer.forward(*xs)
    g_ins, _ = layer.backward(g)

    xs_t = [tt(x) for x in xs]
    y_t = torch.cat([x.reshape(B, -1) for x in xs_t], dim=1)
    y_t.backward(torch.tensor(g))
    close(y, y_t)
    assert len(g_ins) == len(xs)
    for g_in, x_t in zip(g_ins, xs_t, strict=True):
        close(g_in, x_t.grad)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_branch_in_a_graph(n: int) -> None:
    # x is copied n times; copy k goes through its own Linear; the copies are merged
    rng = np.random.default_rng(63 + n)
    B, d = 4, 3
    x, y = rng.standard_normal((B, d)), rng.standard_normal((B, 2))
    g = bp.Graph()
    xh, yh = g.input("x"), g.input("y")
    copies = g.add(bp.Branch(n), xh)
    assert isinstance(copies, tuple) and len(copies) == n  # a tuple even for n = 1
    lins = [bp.Linear(d, 2, rng=rng) for _ in range(n)]
    outs = [g.add(bp.Tanh(), g.add(lin, c)) for lin, c in zip(lins, copies, strict=True)]
    m = g.add(bp.Merge(), *outs)
    J = g.add(bp.L2Loss(), g.add(head := bp.Linear(2 * n, 2, rng=rng), m), yh)
    g.output(J)
    cost = g.forward(x=x, y=y)
    grads = g.backward()

    x_t, y_t = tt(x), tt(y)
    Ws = [(tt(lin.W.value), tt(lin.b.value)) for lin in lins]
    H = (tt(head.W.value), tt(head.b.value))
    merged = torch.cat([torch.tanh(F.linear(x_t, W, b)) for W, b in Ws], dim=1)
    J_t = ((F.linear(merged, *H) - y_t) ** 2).sum() / B
    J_t.backward()
    close(cost, J_t)
    close(grads.inputs["x"], x_t.grad)  # the n copies' gradients summed
    close(grads.inputs["y"], y_t.grad)
    for lin, (W, b) in zip(lins, Ws, strict=True):
        close(grads.params[lin.W], W.grad)
        close(grads.params[lin.b], b.grad)
    close(grads.params[head.W], H[0].grad)
    close(grads.params[head.b], H[1].grad)


# ------------------------------------------------------------ every layer, one table
#
# One row per layer of the library that PyTorch can compute: the library layer, its
# inputs, and the same function written with torch (its layers, its functional API, or
# tensor expressions for the worked pieces and the backward-network layers). Each row is
# compared on the layer alone, then as the one node of a model (a Sequential when the
# layer has one input and one output, else a Graph) in both backward modes: outputs,
# input gradients and parameter gradients for a random g_out, at rtol 1e-10.


@dataclass(frozen=True)
class TorchRow:
    name: str
    make: Callable[[], bp.Layer]
    inputs: Callable[[np.random.Generator], list[np.ndarray]]
    #: (*input tensors, **parameter tensors by name) -> an output tensor, or a tuple
    torch_fn: Callable[..., Any]


def _normal(*shapes: tuple[int, ...]) -> Callable[[np.random.Generator], list[np.ndarray]]:
    return lambda rng: [rng.standard_normal(s) for s in shapes]


def _kinked(shape: tuple[int, ...]) -> Callable[[np.random.Generator], list[np.ndarray]]:
    return lambda rng: [away_from_zero(2.0 * rng.standard_normal(shape))]


def _logits(*shape: int) -> Callable[[np.random.Generator], list[np.ndarray]]:
    labels = shape[:1] + shape[2:]
    return lambda rng: [2.0 * rng.standard_normal(shape), rng.integers(0, shape[1], size=labels)]


def _const(seed: int, *shape: int) -> np.ndarray:
    """A fixed array of the backward-network layers (the same numbers on both sides)."""
    return np.random.default_rng(seed).standard_normal(shape)


_B = 4  # the batch of every row
_GATE_D = _const(1, _B, 2, 3)
_VJP_A = _const(2, _B, 2, 5)  # one (2, 5) matrix per example
_VJP_S = sp.csr_array(
    ([1.5, -0.5, 2.0, 0.25, -1.0, 0.75, 3.0], ([0, 0, 1, 1, 2, 2, 2], [0, 3, 1, 4, 0, 2, 4])),
    shape=(3, 5),
)
_VJP_X = _const(3, _B, 3)  # Kronecker(2, X): g ↦ Σ_b g_b ⊗ x_b
_WG_X = _const(4, _B, 3)
_SHIFT_C = np.arange(6.0).reshape(2, 3) / 7


def _t(a: np.ndarray) -> Any:
    return torch.tensor(np.array(a, dtype=np.float64))


def _norm_params(layer: bp.Layer, seed: int) -> bp.Layer:
    """``layer`` with ``gamma`` and ``beta`` set to fixed random numbers."""
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p.value = rng.standard_normal(p.shape)
    return layer


def _running(c: int) -> tuple[Any, Any]:
    """Fixed running statistics (mean, var) for ``c`` channels, as torch tensors."""
    rng = np.random.default_rng(40 + c)
    return _t(rng.standard_normal(c)), _t(rng.uniform(0.5, 2.0, c))


def _bn_eval(layer: Any) -> bp.Layer:
    mean, var = _running(layer.c)
    layer.set_running_stats(mean.numpy(), var.numpy())
    return _norm_params(layer, 6).eval()


_DROPOUT_SEED = 9


def _dropout_scale(shape: Any, p: float) -> np.ndarray:
    """The first mask of a ``Dropout(p, rng=_DROPOUT_SEED)``, drawn by its documented rule
    (``keep = default_rng(seed).random(shape) >= p``), scaled by ``1/(1 - p)``."""
    keep = np.random.default_rng(_DROPOUT_SEED).random(tuple(shape)) >= p
    return keep / (1.0 - p)


def _linear(x: Any, W: Any, b: Any) -> Any:
    return F.linear(x, W, b)  # the library's parameter names, W and b, to torch's


# -- sequences and attention: inputs, and the torch side --


def _ids(n: int, *shape: int) -> Callable[[np.random.Generator], list[np.ndarray]]:
    """Token ids in ``0..n-1``; more positions than ids, so some repeat."""
    return lambda rng: [rng.integers(0, n, size=shape)]


def _scores_and_keys(
    shape: tuple[int, ...], keys: tuple[int, ...]
) -> Callable[[np.random.Generator], list[np.ndarray]]:
    """Float data and a boolean mask (True: left out) that leaves the first key of
    every row allowed, so torch (NaN on a row with nothing allowed) defines every row."""

    def draw(rng: np.random.Generator) -> list[np.ndarray]:
        mask = rng.random(keys) < 0.4
        mask[..., 0] = False
        return [rng.standard_normal(shape), mask]

    return draw


def _masked_softmax(x: Any, mask: Any) -> Any:
    """softmax over the last axis of (B, h, T, T) with a (B, T) key mask, in torch."""
    return F.softmax(x.masked_fill(mask[:, None, None, :], float("-inf")), dim=-1)


def _causal_softmax(x: Any) -> Any:
    T = x.shape[-1]
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return F.softmax(x.masked_fill(blocked, float("-inf")), dim=-1)


def _sinusoids(x: Any) -> Any:
    """x + the transformer paper's codes, written from its formula in torch."""
    T, d = x.shape[1:]
    t = torch.arange(T, dtype=torch.float64)[:, None]
    i = torch.arange(d, dtype=torch.float64)
    angle = t / torch.pow(torch.tensor(10000.0, dtype=torch.float64), (i - i % 2) / d)
    return x + torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))


def _mha(heads: int, causal: bool = False) -> Callable[..., Any]:
    """torch's multi-head self-attention on (B, T, d) with the library's parameters."""

    def fn(x: Any, *mask: Any, Wq: Any, Wk: Any, Wv: Any, Wo: Any, **b: Any) -> Any:
        T, d = x.shape[1:]
        attn_mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True: hidden
        xt = x.transpose(0, 1)  # torch's functional form takes (T, B, d)
        bias = [b["bq"], b["bk"], b["bv"]] if b else None
        y, _ = F.multi_head_attention_forward(
            xt, xt, xt, d, heads,
            torch.cat([Wq, Wk, Wv]), None if bias is None else torch.cat(bias),
            None, None, False, 0.0, Wo, b.get("bo"),
            need_weights=False,
            attn_mask=attn_mask if causal else None,
            key_padding_mask=mask[0] if mask else None,
        )  # fmt: skip
        return y.transpose(0, 1)

    return fn


TORCH_ROWS = [
    TorchRow("Linear", lambda: bp.Linear(5, 3, rng=1), _normal((_B, 5)), _linear),
    TorchRow(
        "Linear-nobias",
        lambda: bp.Linear(5, 3, bias=False, rng=2),
        _normal((_B, 5)),
        lambda x, W: F.linear(x, W),
    ),
    TorchRow("Linear-tokens", lambda: bp.Linear(4, 2, rng=3), _normal((_B, 3, 4)), _linear),
    TorchRow("ReLU", bp.ReLU, _kinked((_B, 5)), F.relu),
    TorchRow(
        "LeakyReLU", lambda: bp.LeakyReLU(0.2), _kinked((_B, 5)), lambda x: F.leaky_relu(x, 0.2)
    ),
    TorchRow("Sigmoid", bp.Sigmoid, _normal((_B, 2, 3)), torch.sigmoid),
    TorchRow("Tanh", bp.Tanh, _normal((_B, 5)), torch.tanh),
    TorchRow("Softplus", bp.Softplus, _normal((_B, 5)), F.softplus),
    TorchRow("Pointwise-sin", lambda: bp.Pointwise(np.sin, np.cos), _normal((_B, 5)), torch.sin),
    TorchRow(
        "L2Loss",
        bp.L2Loss,
        _normal((_B, 3), (_B, 3)),
        lambda y_hat, y: ((y_hat - y) ** 2).sum(1).mean(),
    ),
    TorchRow(
        "L2Loss-3d",
        bp.L2Loss,
        _normal((_B, 2, 3), (_B, 2, 3)),
        lambda y_hat, y: ((y_hat - y) ** 2).flatten(1).sum(1).mean(),
    ),
    TorchRow("SoftmaxCrossEntropy", bp.SoftmaxCrossEntropy, _logits(_B, 5), F.cross_entropy),
    TorchRow("SoftmaxCE-BCd", bp.SoftmaxCrossEntropy, _logits(_B, 3, 2), F.cross_entropy),
    TorchRow("Add", bp.Add, _normal((_B, 2, 3), (_B, 2, 3)), torch.add),
    TorchRow("Multiply", bp.Multiply, _normal((_B, 2, 3), (_B, 2, 3)), torch.mul),
    TorchRow(
        "Merge-flatten",
        bp.Merge,
        _normal((_B, 2), (_B, 2, 3), (_B, 1)),
        lambda *ts: torch.cat([t.flatten(1) for t in ts], dim=1),
    ),
    TorchRow(
        "Merge-axis1",
        lambda: bp.Merge(axis=1),
        _normal((_B, 2, 3), (_B, 1, 3)),
        lambda *ts: torch.cat(ts, dim=1),
    ),
    TorchRow(
        "Branch",
        lambda: bp.Branch(3),
        _normal((_B, 4)),
        lambda x: (x.clone(), x.clone(), x.clone()),
    ),
    TorchRow(
        "Reshape",
        lambda: bp.Reshape(3, 2),
        _normal((_B, 2, 3)),
        lambda x: x.reshape(x.shape[0], 3, 2),
    ),
    TorchRow("Flatten", bp.Flatten, _normal((_B, 2, 3)), lambda x: torch.flatten(x, 1)),
    TorchRow(
        "Transpose",
        lambda: bp.Transpose((1, 0)),
        _normal((_B, 3, 5)),
        lambda x: x.permute(0, 2, 1),
    ),
    # -- the worked-example pieces: torch tensor expressions --
    TorchRow("Scale", lambda: Scale(0.7), _normal((_B, 2, 3)), lambda x, a: a * x),
    TorchRow(
        "Scale-fixed",
        lambda: Scale(-1.5, learnable=False),
        _normal((_B, 5)),
        lambda x: -1.5 * x,
    ),
    TorchRow("Shift", lambda: Shift(_SHIFT_C), _normal((_B, 2, 3)), lambda x: x + _t(_SHIFT_C)),
    TorchRow("Shift-scalar", lambda: Shift(0.5), _normal((_B, 3)), lambda x: x + 0.5),
    TorchRow(
        "SumEntries", SumEntries, _normal((_B, 2, 3)), lambda x: x.flatten(1).sum(1, keepdim=True)
    ),
    # -- the backward network's layers: torch tensor expressions --
    TorchRow("Gate", lambda: Gate(_GATE_D), _normal((_B, 2, 3)), lambda x: x * _t(_GATE_D)),
    TorchRow(
        "Slice",
        lambda: Slice(2, 6, (2, 2)),
        _normal((_B, 7)),
        lambda x: x.flatten(1)[:, 2:6].reshape(-1, 2, 2),
    ),
    TorchRow(
        "VJP-dense",
        lambda: VJP(Dense(_VJP_A), (5,)),
        _normal((_B, 2)),
        lambda x: torch.einsum("bm,bmn->bn", x, _t(_VJP_A)),
    ),
    TorchRow(
        "VJP-sparse",
        lambda: VJP(Sparse(_VJP_S, _B), (5,)),
        _normal((_B, 3)),
        lambda x: x @ _t(_VJP_S.toarray()),
    ),
    TorchRow(
        "VJP-sum-kronecker",
        lambda: VJP(Kronecker(2, _VJP_X), (2, 3), sum_batch=True),
        _normal((_B, 2)),
        lambda x: torch.einsum("bm,bn->mn", x, _t(_VJP_X)),
    ),
    TorchRow("WeightGrad", lambda: WeightGrad(_WG_X), _normal((_B, 2)), lambda x: x.T @ _t(_WG_X)),
    TorchRow("BatchSum", BatchSum, _normal((_B, 2, 3)), lambda x: x.sum(0)),
    # -- normalization, softmax, dropout --
    TorchRow("Softmax", bp.Softmax, _normal((_B, 5)), lambda x: F.softmax(x, dim=-1)),
    TorchRow(
        "Softmax-axis1-T0.5",
        lambda: bp.Softmax(axis=1, temperature=0.5),
        _normal((_B, 3, 4)),
        lambda x: F.softmax(x / 0.5, dim=1),
    ),
    TorchRow(
        "Softmax-rows-T3",
        lambda: bp.Softmax(temperature=3.0),
        _normal((_B, 3, 4)),
        lambda x: F.softmax(x / 3.0, dim=-1),
    ),
    TorchRow("LogSoftmax", bp.LogSoftmax, _normal((_B, 5)), lambda x: F.log_softmax(x, dim=-1)),
    TorchRow(
        "LogSoftmax-axis1",
        lambda: bp.LogSoftmax(axis=1),
        _normal((_B, 3, 4)),
        lambda x: F.log_softmax(x, dim=1),
    ),
    TorchRow(
        "LayerNorm-last",
        lambda: _norm_params(bp.LayerNorm(4), 1),
        _normal((_B, 3, 4)),
        lambda x, gamma, beta: F.layer_norm(x, (4,), gamma, beta, eps=1e-5),
    ),
    TorchRow(
        "LayerNorm-last2-eps",
        lambda: _norm_params(bp.LayerNorm((3, 4), eps=1e-3), 2),
        _normal((_B, 3, 4)),
        lambda x, gamma, beta: F.layer_norm(x, (3, 4), gamma, beta, eps=1e-3),
    ),
    TorchRow(
        "LayerNorm-noaffine",
        lambda: bp.LayerNorm((2, 3), affine=False),
        _normal((_B, 2, 3)),
        lambda x: F.layer_norm(x, (2, 3)),
    ),
    TorchRow(
        "BatchNorm1d-train",
        lambda: _norm_params(bp.BatchNorm1d(3), 3),
        _normal((_B, 3)),
        lambda x, gamma, beta: F.batch_norm(x, None, None, gamma, beta, training=True),
    ),
    TorchRow(
        "BatchNorm1d-train-BCL-eps",
        lambda: _norm_params(bp.BatchNorm1d(2, eps=1e-2, momentum=0.3), 4),
        _normal((_B, 2, 5)),
        lambda x, gamma, beta: F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-2),
    ),
    TorchRow(
        "BatchNorm2d-train",
        lambda: _norm_params(bp.BatchNorm2d(2), 5),
        _normal((_B, 2, 3, 3)),
        lambda x, gamma, beta: F.batch_norm(x, None, None, gamma, beta, training=True),
    ),
    TorchRow(
        "BatchNorm1d-eval",
        lambda: _bn_eval(bp.BatchNorm1d(3)),
        _normal((_B, 3)),
        lambda x, gamma, beta: F.batch_norm(x, *_running(3), gamma, beta, training=False),
    ),
    TorchRow(
        "BatchNorm2d-eval",
        lambda: _bn_eval(bp.BatchNorm2d(2, eps=1e-3)),
        _normal((_B, 2, 3, 2)),
        lambda x, gamma, beta: F.batch_norm(x, *_running(2), gamma, beta, training=False, eps=1e-3),
    ),
    TorchRow(
        "Dropout-eval",
        lambda: bp.Dropout(0.5, rng=3).eval(),
        _normal((_B, 5)),
        lambda x: F.dropout(x, 0.5, training=False),
    ),
    TorchRow(
        "Dropout-train",
        lambda: bp.Dropout(0.4, rng=_DROPOUT_SEED),
        _normal((_B, 2, 3)),
        lambda x: x * _t(_dropout_scale(x.shape, 0.4)),
    ),
    # -- convolution --
    TorchRow(
        "Conv2d",
        lambda: bp.Conv2d(2, 3, 3, stride=2, padding=1, rng=7),
        _normal((_B, 2, 7, 9)),
        lambda x, W, b: F.conv2d(x, W, b, stride=2, padding=1),
    ),
    TorchRow(
        "Conv2d-groups-dilation-nobias",
        lambda: bp.Conv2d(4, 2, (2, 3), dilation=(2, 1), groups=2, bias=False, rng=8),
        _normal((_B, 4, 6, 5)),
        lambda x, W: F.conv2d(x, W, dilation=(2, 1), groups=2),
    ),
    TorchRow(
        "ConvTranspose2d",
        lambda: bp.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, rng=9),
        _normal((_B, 2, 3, 4)),
        lambda x, W, b: F.conv_transpose2d(x, W, b, stride=2, padding=1, output_padding=1),
    ),
    # -- pooling --
    TorchRow(
        "MaxPool2d-k3-s2-p1",
        lambda: bp.MaxPool2d(3, 2, 1),
        _normal((_B, 2, 7, 9)),
        lambda x: F.max_pool2d(x, 3, 2, 1),
    ),
    TorchRow(
        "MaxPool2d-overlap-2x3",
        lambda: bp.MaxPool2d((2, 3), stride=1),
        _normal((_B, 2, 5, 6)),
        lambda x: F.max_pool2d(x, (2, 3), 1),
    ),
    TorchRow(
        "AvgPool2d-k3-s2-p1",
        lambda: bp.AvgPool2d(3, 2, 1),
        _normal((_B, 2, 7, 9)),
        lambda x: F.avg_pool2d(x, 3, 2, 1),
    ),
    TorchRow(
        "AvgPool2d-overlap-2x3",
        lambda: bp.AvgPool2d((2, 3), stride=1, padding=(1, 0)),
        _normal((_B, 2, 5, 6)),
        lambda x: F.avg_pool2d(x, (2, 3), 1, (1, 0)),
    ),
    TorchRow(
        "GlobalAvgPool",
        bp.GlobalAvgPool,
        _normal((_B, 3, 4, 5)),
        lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1),
    ),
    TorchRow(
        "GlobalMaxPool",
        bp.GlobalMaxPool,
        _normal((_B, 3, 4, 5)),
        lambda x: F.adaptive_max_pool2d(x, 1).flatten(1),
    ),
    TorchRow(
        "Upsample-2x3",
        lambda: bp.Upsample((2, 3)),
        _normal((_B, 2, 3, 4)),
        lambda x: torch.nn.Upsample(scale_factor=(2, 3), mode="nearest")(x),
    ),
    # -- sequences and attention: (B, T, d) --
    TorchRow(
        "Embedding",
        lambda: bp.Embedding(5, 3, rng=4),
        _ids(5, _B, 7),
        lambda ids, W: F.embedding(ids, W),
    ),
    TorchRow(
        "LayerNorm-tokens",
        lambda: _norm_params(bp.LayerNorm(6), 7),
        _normal((_B, 5, 6)),
        lambda x, gamma, beta: F.layer_norm(x, (6,), gamma, beta),
    ),
    TorchRow(
        "PositionalEncoding", lambda: bp.PositionalEncoding(6, 9), _normal((_B, 5, 6)), _sinusoids
    ),
    TorchRow("MatMul", bp.MatMul, _normal((_B, 3, 2), (_B, 2, 4)), torch.matmul),
    TorchRow("MatMul-heads", bp.MatMul, _normal((_B, 2, 3, 5), (_B, 2, 5, 4)), torch.matmul),
    TorchRow(
        "Softmax-causal", lambda: bp.Softmax(causal=True), _normal((_B, 2, 4, 4)), _causal_softmax
    ),
    TorchRow(
        "Softmax-key-mask",
        lambda: bp.Softmax(masked=True),
        _scores_and_keys((_B, 2, 3, 5), (_B, 5)),
        _masked_softmax,
    ),
    TorchRow(
        "MultiHeadAttention",
        lambda: _norm_params(bp.MultiHeadAttention(6, 2, rng=5), 8),
        _normal((_B, 5, 6)),
        _mha(2),
    ),
    TorchRow(
        "MultiHeadAttention-causal-key-mask",
        lambda: _norm_params(bp.MultiHeadAttention(8, 4, causal=True, rng=6), 9),
        _scores_and_keys((_B, 5, 8), (_B, 5)),
        _mha(4, causal=True),
    ),
    TorchRow(
        "MultiHeadAttention-nobias",
        lambda: _norm_params(bp.MultiHeadAttention(4, 1, bias=False, rng=7), 10),
        _normal((_B, 3, 4)),
        _mha(1),
    ),
    # torch's own cell functions, those nn.RNNCell and nn.LSTMCell call; b = b_ih (b_hh None)
    TorchRow(
        "RNNCell-tanh",
        lambda: bp.RNNCell(5, 3, rng=3),
        _normal((_B, 5), (_B, 3)),
        lambda x, h, W_x, W_h, b: torch.rnn_tanh_cell(x, h, W_x, W_h, b, None),
    ),
    TorchRow(
        "RNNCell-relu-nobias",
        lambda: bp.RNNCell(4, 3, nonlinearity="relu", bias=False, rng=4),
        _normal((_B, 4), (_B, 3)),
        lambda x, h, W_x, W_h: torch.rnn_relu_cell(x, h, W_x, W_h, None, None),
    ),
    TorchRow(
        "LSTMCell",
        lambda: bp.LSTMCell(5, 3, rng=5),
        _normal((_B, 5), (_B, 3), (_B, 3)),
        lambda x, h, c, W_x, W_h, b: torch.lstm_cell(x, (h, c), W_x, W_h, b, None),
    ),
    TorchRow("Unstack", lambda: bp.Unstack(3), _normal((_B, 3, 2, 2)), lambda x: x.unbind(1)),
    TorchRow(
        "ZeroState",
        lambda: bp.ZeroState(3),
        _normal((_B, 4, 2)),
        lambda x: 0.0 * x.reshape(x.shape[0], -1)[:, :1].expand(-1, 3),
    ),
]


def _is_float(x: np.ndarray) -> bool:
    return bool(np.issubdtype(x.dtype, np.floating))


def _seed_for(out: Any, rng: np.random.Generator) -> Any:
    """A random g_out of the output's shape (a tuple for several, a scalar for a cost)."""
    if isinstance(out, tuple):
        return tuple(_seed_for(o, rng) for o in out)
    return np.asarray(rng.uniform(0.5, 2.0)) if out.ndim == 0 else rng.standard_normal(out.shape)


def _torch_side(row: TorchRow, layer: bp.Layer, xs: list[np.ndarray], g_out: Any) -> Any:
    """torch's output, input gradients (None for labels) and parameter gradients."""
    xs_t = [tt(x) if _is_float(x) else torch.tensor(x) for x in xs]
    ps_t = {name: tt(p.value) for name, p in layer.params.items()}
    out_t = row.torch_fn(*xs_t, **ps_t)
    outs_t = out_t if isinstance(out_t, tuple) else (out_t,)
    seeds = g_out if isinstance(g_out, tuple) else (g_out,)
    torch.autograd.backward(outs_t, [torch.tensor(s) for s in seeds])
    g_in_t = [t.grad if _is_float(x) else None for t, x in zip(xs_t, xs, strict=True)]
    return out_t, g_in_t, ps_t


@pytest.mark.parametrize("row", TORCH_ROWS, ids=[r.name for r in TORCH_ROWS])
def test_layer_matches_torch(row: TorchRow) -> None:
    rng = np.random.default_rng(100)
    xs = row.inputs(rng)
    layer = row.make()
    out = layer.forward(*xs)
    g_out = _seed_for(out, rng)
    g_in, grads = layer.backward(g_out)
    out_t, g_in_t, ps_t = _torch_side(row, layer, xs, g_out)

    for o, o_t in zip(_as_tuple(out), _as_tuple(out_t), strict=True):
        assert o.shape == tuple(o_t.shape)
        close(o, o_t)
    for x, g, g_t in zip(xs, _as_tuple(g_in), g_in_t, strict=True):
        if _is_float(x):
            assert g.shape == x.shape
            close(g, g_t)
        else:
            assert g is None  # integer labels get no gradient
    assert grads.keys() == ps_t.keys()
    for name, p_t in ps_t.items():
        close(grads[name], p_t.grad)


def _as_tuple(v: Any) -> tuple[Any, ...]:
    return v if isinstance(v, tuple) else (v,)


def _one_node_model(layer: bp.Layer, n_inputs: int) -> bp.Graph:
    """``layer`` as the one node of a model: a Sequential for one input and one
    output, else a Graph with inputs ``x0, x1, ...``."""
    if n_inputs == 1 and not layer.returns_tuple:
        return bp.Sequential([layer])
    g = bp.Graph()
    handles = [g.input(f"x{i}") for i in range(n_inputs)]
    out = g.add(layer, *handles)
    g.output(*_as_tuple(out))
    return g


@pytest.mark.parametrize("mode", ["fast", "explicit"])
@pytest.mark.parametrize("row", TORCH_ROWS, ids=[r.name for r in TORCH_ROWS])
def test_layer_in_a_model_matches_torch(row: TorchRow, mode: str) -> None:
    rng = np.random.default_rng(101)
    xs = row.inputs(rng)
    layer = row.make()
    model = _one_node_model(layer, len(xs))
    if isinstance(model, bp.Sequential):
        out = model.forward(xs[0])
    else:
        out = model.forward({f"x{i}": x for i, x in enumerate(xs)})
    g_out = _seed_for(out, rng)
    grads = model.backward(g_out, mode=mode)
    out_t, g_in_t, ps_t = _torch_side(row, layer, xs, g_out)

    for o, o_t in zip(_as_tuple(out), _as_tuple(out_t), strict=True):
        close(o, o_t)
    names = ["x"] if isinstance(model, bp.Sequential) else [f"x{i}" for i in range(len(xs))]
    for name, x, g_t in zip(names, xs, g_in_t, strict=True):
        if _is_float(x):
            close(grads.inputs[name], g_t)
        else:
            assert name not in grads.inputs
    assert set(grads.params) == set(layer.params.values())
    for name, p_t in ps_t.items():
        close(grads.params[layer.params[name]], p_t.grad)


def test_torch_table_covers_every_layer_with_a_torch_counterpart() -> None:
    # Every exported layer but Constant (a source with no input and no gradient: it is
    # checked on numbers worked by hand below) has a row in the torch table.
    import backprop.layers.backward
    import backprop.layers.worked

    exported = set()
    for module in (bp, backprop.layers.backward, backprop.layers.worked):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, bp.Layer):
                exported.add(obj)
    exempt = {bp.Layer, bp.Loss, Constant}
    compared = {type(row.make()) for row in TORCH_ROWS}
    assert Constant in exported and {bp.Linear, VJP, Scale} <= compared  # it looked
    missing = sorted(cls.__name__ for cls in exported - exempt - compared)
    assert not missing, f"no torch comparison for {', '.join(missing)}: add a row to TORCH_ROWS"


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_constant_in_a_graph_by_hand(mode: str) -> None:
    # L = 10 - d (the lecture notes' example), per example, with d = Linear(x): the
    # Constant's value goes forward unchanged and no gradient comes back to it.
    x = np.array([[1.0, 2.0], [-1.0, 0.5]])
    W, b = np.array([[0.5, -1.0]]), np.array([0.25])
    g = bp.Graph()
    d = g.add(bp.Linear(2, 1, W=W, b=b), g.input("x"))
    ten = g.add(Constant([[10.0], [10.0]]), name="ten")
    g.output(g.add(bp.Add(), ten, g.add(Scale(-1.0, learnable=False), d)))
    seed = np.array([[2.0], [-3.0]])
    out = g.forward(x=x)
    # d = 0.5 x1 - x2 + 0.25: -1.25 and -0.75 -> L = 11.25 and 10.75
    np.testing.assert_array_equal(out, [[11.25], [10.75]])
    grads = g.backward(seed, mode=mode)
    # dL/dx = -W per example, times the seed; dL/dW = -Σ seed x; dL/db = -Σ seed
    np.testing.assert_allclose(grads.inputs["x"], [[-1.0, 2.0], [1.5, -3.0]], rtol=1e-15)
    (lin,) = [n.layer for n in g.nodes() if isinstance(n.layer, bp.Linear)]
    np.testing.assert_allclose(grads.params[lin.W], np.array([[-5.0, -2.5]]), rtol=1e-15)
    np.testing.assert_allclose(grads.params[lin.params["b"]], np.array([1.0]), rtol=1e-15)


# ------------------------------------------- the pieces chained, in a Sequential and a Graph


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_sequential_of_shape_and_worked_layers(mode: str) -> None:
    # Linear without bias, Sigmoid, Reshape, Scale, Shift, Flatten, LeakyReLU, Linear,
    # Softplus and L2Loss, against the same chain in torch.
    rng = np.random.default_rng(110)
    B = 5
    x, y = rng.standard_normal((B, 6)), rng.standard_normal((B, 3))
    first, last = bp.Linear(6, 4, bias=False, rng=rng), bp.Linear(4, 3, rng=rng)
    scale = Scale(0.7)
    net = bp.Sequential(
        [
            first,
            bp.Sigmoid(),
            bp.Reshape(2, 2),
            scale,
            Shift(-0.4),
            bp.Flatten(),
            bp.LeakyReLU(0.1),
            last,
            bp.Softplus(),
            bp.L2Loss(),
        ]
    )
    J = net.forward(x, y)
    g_0, grads = net.backward(mode=mode)

    x_t, y_t = tt(x), tt(y)
    W1, a = tt(first.W.value), tt(scale.params["a"].value)
    W2, b2 = tt(last.W.value), tt(last.params["b"].value)
    h = (a * torch.sigmoid(F.linear(x_t, W1)).reshape(B, 2, 2) - 0.4).flatten(1)
    out = F.softplus(F.linear(F.leaky_relu(h, 0.1), W2, b2))
    J_t = ((out - y_t) ** 2).sum(1).mean()
    J_t.backward()
    close(J, J_t)
    close(g_0, x_t.grad)
    assert set(grads) == {first.W, scale.params["a"], last.W, last.params["b"]}
    close(grads[first.W], W1.grad)
    close(grads[scale.params["a"]], a.grad)
    close(grads[last.W], W2.grad)
    close(grads[last.params["b"]], b2.grad)


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_graph_of_structure_layers(mode: str) -> None:
    # x (B, 3, 4) ─► Transpose ─► Flatten ─► Branch(2) ─► lin_a ─► tanh ─┐
    #                                           └──────► lin_b ────────┴► Multiply ─┐
    #  x ─► SumEntries ─────────────────────────────────────────────────────────────┤
    #  (lin_a + lin_b via Add) ──────────────────────────────────────────────────────┴► Merge()
    #  ─► head ─► SoftmaxCrossEntropy
    rng = np.random.default_rng(111)
    B = 4
    x, labels = rng.standard_normal((B, 3, 4)), rng.integers(0, 3, size=B)
    lin_a, lin_b = bp.Linear(12, 3, rng=rng), bp.Linear(12, 3, rng=rng)
    head = bp.Linear(7, 3, rng=rng)
    g = bp.Graph()
    xh, yh = g.input("x"), g.input("y")
    flat = g.add(bp.Flatten(), g.add(bp.Transpose((1, 0)), xh))
    c1, c2 = g.add(bp.Branch(2), flat)
    a = g.add(lin_a, c1)
    bh = g.add(lin_b, c2)
    prod = g.add(bp.Multiply(), g.add(bp.Tanh(), a), bh)
    total = g.add(bp.Add(), a, bh)  # a and bh are read twice: fan-out inserted
    merged = g.add(bp.Merge(), prod, total, g.add(SumEntries(), xh))
    g.output(g.add(bp.SoftmaxCrossEntropy(), g.add(head, merged), yh))
    J = g.forward(x=x, y=labels)
    grads = g.backward(mode=mode)

    x_t = tt(x)
    Wa, ba, Wb, bb = (
        tt(v)
        for v in (lin_a.W.value, lin_a.params["b"].value, lin_b.W.value, lin_b.params["b"].value)
    )
    Wh, bh_t = tt(head.W.value), tt(head.params["b"].value)
    flat_t = x_t.permute(0, 2, 1).flatten(1)
    a_t, b_t = F.linear(flat_t, Wa, ba), F.linear(flat_t, Wb, bb)
    merged_t = torch.cat([torch.tanh(a_t) * b_t, a_t + b_t, x_t.flatten(1).sum(1, keepdim=True)], 1)
    J_t = F.cross_entropy(F.linear(merged_t, Wh, bh_t), torch.tensor(labels))
    J_t.backward()
    close(J, J_t)
    close(grads.inputs["x"], x_t.grad)
    assert "y" not in grads.inputs
    for p, t in (
        (lin_a.W, Wa),
        (lin_a.params["b"], ba),
        (lin_b.W, Wb),
        (lin_b.params["b"], bb),
        (head.W, Wh),
        (head.params["b"], bh_t),
    ):
        close(grads.params[p], t.grad)


# ------------------------------------------------------------------------- Sequential


def _mlp(rng: np.random.Generator, loss: bp.Layer | None) -> tuple[bp.Sequential, list[bp.Linear]]:
    lins = [bp.Linear(5, 8, rng=rng), bp.Linear(8, 6, rng=rng), bp.Linear(6, 3, rng=rng)]
    layers: list[bp.Layer] = [lins[0], bp.ReLU(), lins[1], bp.Tanh(), lins[2]]
    if loss is not None:
        layers.append(loss)
    return bp.Sequential(layers), lins


def _torch_mlp(x: Any, params: list[tuple[Any, Any]]) -> Any:
    (W1, b1), (W2, b2), (W3, b3) = params
    return F.linear(torch.tanh(F.linear(F.relu(F.linear(x, W1, b1)), W2, b2)), W3, b3)


@pytest.mark.parametrize("mode", ["fast", "explicit"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "l2"])
def test_sequential_mlp_with_a_loss(loss_name: str, mode: str) -> None:
    rng = np.random.default_rng(70)
    B = 7
    x = rng.standard_normal((B, 5))
    if loss_name == "cross_entropy":
        target: np.ndarray = rng.integers(0, 3, size=B)
        loss: bp.Layer = bp.SoftmaxCrossEntropy()
    else:
        target = rng.standard_normal((B, 3))
        loss = bp.L2Loss()
    net, lins = _mlp(rng, loss)

    J = net.forward(x, target)
    g_0, grads = net.backward(mode=mode)

    x_t = tt(x)
    params_t = [(tt(lin.W.value), tt(lin.b.value)) for lin in lins]
    out = _torch_mlp(x_t, params_t)
    if loss_name == "cross_entropy":
        J_t = F.cross_entropy(out, torch.tensor(target))
    else:
        J_t = ((out - tt(target, grad=False)) ** 2).sum() / B
    J_t.backward()

    close(J, J_t)
    close(g_0, x_t.grad)
    assert len(grads) == 6 and set(grads) == set(net.parameters())
    for lin, (W_t, b_t) in zip(lins, params_t, strict=True):
        close(grads[lin.W], W_t.grad)
        close(grads[lin.b], b_t.grad)


def test_sequential_jacobians_match_torch_jacobian_per_example() -> None:
    rng = np.random.default_rng(71)
    B = 3
    x = rng.standard_normal((B, 5))
    net, lins = _mlp(rng, None)
    net.forward(x)
    L_x, L_theta = net.jacobians()
    dense_x = L_x.to_dense()
    params_t = [(tt(lin.W.value, False), tt(lin.b.value, False)) for lin in lins]
    flat = [t for pair in params_t for t in pair]
    for b in range(B):

        def f(xv: Any, *ps: Any) -> Any:
            pairs = list(zip(ps[0::2], ps[1::2], strict=True))
            return _torch_mlp(xv[None], pairs)[0]

        Js = torch.autograd.functional.jacobian(f, (tt(x[b], False), *flat))
        close(dense_x[b], Js[0])
        for k, lin in enumerate(lins):
            J_W, J_b = Js[1 + 2 * k], Js[2 + 2 * k]
            close(L_theta[lin.W].to_dense()[b], J_W.reshape(3, -1))
            close(L_theta[lin.b].to_dense()[b], J_b)


# ------------------------------------------------------------------------------ Graph


@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_graph_dag_with_fan_out_merge_and_tied_weights(mode: str) -> None:
    # x ──► lin_a (W, b_a) ─► tanh ─► t ──────────────┐
    #  └──► lin_b (W, b_b) ─► sigmoid ─► s            ├─► merge ─► head ─► L2Loss(·, y)
    #                          t * s ─► product ──────┘
    # x is used twice, t is used twice, and W is one Parameter in two layers.
    rng = np.random.default_rng(80)
    B = 5
    x, y = rng.standard_normal((B, 4)), rng.standard_normal((B, 2))
    W = bp.Parameter(rng.standard_normal((3, 4)) / 2, name="W")
    lin_a = bp.Linear(4, 3, W=W, rng=rng)
    lin_b = bp.Linear(4, 3, W=W, rng=rng)
    head = bp.Linear(6, 2, rng=rng)

    g = bp.Graph()
    xh, yh = g.input("x"), g.input("y")
    t = g.add(bp.Tanh(), g.add(lin_a, xh, name="lin_a"))
    s = g.add(bp.Sigmoid(), g.add(lin_b, xh, name="lin_b"))
    prod = g.add(bp.Multiply(), t, s)
    merged = g.add(bp.Merge(), t, prod)
    J = g.add(bp.L2Loss(), g.add(head, merged), yh)
    g.output(J)
    cost = g.forward(x=x, y=y)
    grads = g.backward(mode=mode)

    x_t, y_t = tt(x), tt(y)
    W_t = tt(W.value)
    b_a, b_b = tt(lin_a.b.value), tt(lin_b.b.value)
    H_W, H_b = tt(head.W.value), tt(head.b.value)
    t_t = torch.tanh(F.linear(x_t, W_t, b_a))
    s_t = torch.sigmoid(F.linear(x_t, W_t, b_b))
    out = F.linear(torch.cat([t_t, t_t * s_t], dim=1), H_W, H_b)
    J_t = ((out - y_t) ** 2).sum() / B
    J_t.backward()

    close(cost, J_t)
    close(grads.inputs["x"], x_t.grad)
    close(grads.inputs["y"], y_t.grad)
    close(grads.params[W], W_t.grad)  # both uses summed (eq. 14.47)
    close(grads.params[lin_a.b], b_a.grad)
    close(grads.params[lin_b.b], b_b.grad)
    close(grads.params[head.W], H_W.grad)
    close(grads.params[head.b], H_b.grad)
    assert set(grads.params) == {W, lin_a.b, lin_b.b, head.W, head.b}

    # each use's term on its own: torch with two untied copies of W
    W1, W2 = tt(W.value), tt(W.value)
    t_t = torch.tanh(F.linear(x_t.detach(), W1, b_a.detach()))
    s_t = torch.sigmoid(F.linear(x_t.detach(), W2, b_b.detach()))
    out = F.linear(torch.cat([t_t, t_t * s_t], dim=1), H_W.detach(), H_b.detach())
    (((out - y_t.detach()) ** 2).sum() / B).backward()
    uses = dict(grads.per_use[W])
    assert set(uses) == {"lin_a", "lin_b"}
    close(uses["lin_a"], W1.grad)
    close(uses["lin_b"], W2.grad)
    close(W1.grad + W2.grad, W_t.grad)


# -------------------------------------------------------------------------- optimizers

OPTIMIZERS: list[tuple[str, Callable[..., bp.Optimizer], Callable[..., Any], dict[str, Any]]] = [
    # (id, library optimizer, torch optimizer, the hyperparameters both take)
    ("sgd", bp.SGD, torch.optim.SGD, {"lr": 0.1}),
    ("sgd_momentum", bp.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ("sgd_weight_decay", bp.SGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.03}),
    (
        "sgd_momentum_weight_decay",
        bp.SGD,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1},
    ),
    (
        "sgd_nesterov",
        bp.SGD,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("adam", bp.Adam, torch.optim.Adam, {"lr": 0.01}),
    ("adam_defaults", bp.Adam, torch.optim.Adam, {}),
    (
        "adam_betas_eps",
        bp.Adam,
        torch.optim.Adam,
        {"lr": 0.02, "betas": (0.7, 0.95), "eps": 1e-4},
    ),
    # weight decay as L2 (λθ added to the gradient): torch's Adam
    ("adam_l2", bp.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
]
# decoupled weight decay (θ shrunk by ηλθ beside the adaptive step): torch's AdamW
OPTIMIZERS.append(
    (
        "adamw",
        lambda params, **kw: bp.Adam(params, decoupled=True, **kw),
        torch.optim.AdamW,
        {"lr": 0.01, "weight_decay": 0.1},
    )
)


@pytest.mark.parametrize(
    "ours, theirs, hyper", [row[1:] for row in OPTIMIZERS], ids=[row[0] for row in OPTIMIZERS]
)
def test_optimizer_on_the_same_gradients(
    ours: Callable[..., bp.Optimizer], theirs: Callable[..., Any], hyper: dict[str, Any]
) -> None:
    rng = np.random.default_rng(90)
    values = [rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(())]
    params = [bp.Parameter(v) for v in values]
    tensors = [tt(v) for v in values]
    opt = ours(params, **hyper)
    opt_t = theirs(tensors, **hyper)
    for step in range(8):
        # gradients of very different sizes per entry, and a sign change half way
        grads = [rng.standard_normal(v.shape) * 10.0 ** rng.integers(-3, 2) for v in values]
        if step == 4:
            grads = [-gr for gr in grads]
        opt.step({p: gr for p, gr in zip(params, grads, strict=True)})
        for t, gr in zip(tensors, grads, strict=True):
            t.grad = torch.tensor(gr)
        opt_t.step()
        for p, t in zip(params, tensors, strict=True):
            close(p.value, t, rtol=1e-12, atol=1e-14)
    # the run moved the parameters: the comparison above was not of untouched values
    assert not np.allclose(params[0].value, values[0])


@pytest.mark.parametrize(
    "ours, theirs, hyper",
    [
        (bp.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        (bp.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-3}),
        (
            lambda params, **kw: bp.Adam(params, decoupled=True, **kw),
            torch.optim.AdamW,
            {"lr": 0.01, "weight_decay": 1e-2},
        ),
    ],
    ids=["sgd_momentum", "adam", "adamw"],
)
def test_training_steps_match_torch(
    ours: Callable[..., bp.Optimizer], theirs: Callable[..., Any], hyper: dict[str, Any]
) -> None:
    # Each side computes its own gradients at its own current parameters, then steps.
    rng = np.random.default_rng(91)
    B = 16
    x = rng.standard_normal((B, 5))
    labels = rng.integers(0, 3, size=B)
    net, lins = _mlp(rng, bp.SoftmaxCrossEntropy())
    params_t = [(tt(lin.W.value), tt(lin.b.value)) for lin in lins]
    opt = ours(net, **hyper)
    opt_t = theirs([t for pair in params_t for t in pair], **hyper)
    x_t, labels_t = tt(x, grad=False), torch.tensor(labels)
    costs = []
    for _ in range(10):
        J = net.forward(x, labels)
        _, grads = net.backward(input_grad=False)
        opt.step(grads)

        opt_t.zero_grad()
        J_t = F.cross_entropy(_torch_mlp(x_t, params_t), labels_t)
        J_t.backward()
        opt_t.step()

        close(J, J_t, rtol=1e-9)
        costs.append(float(J))
        for lin, (W_t, b_t) in zip(lins, params_t, strict=True):
            close(lin.W.value, W_t, rtol=1e-9, atol=1e-12)
            close(lin.b.value, b_t, rtol=1e-9, atol=1e-12)
    assert costs[-1] < costs[0]  # it trained
