"""One table-driven battery over every layer.

Each row of ``CASES`` says how to build the layer (for a dtype), how to draw its
inputs (with the layer's own input domain) and how to draw a ``g_out`` for its
output. Every test below runs on every row, for a batch of 1 and a batch of 4:
the three-way ``gradcheck``, the dot-product test with the Jacobian objects,
zero ``g_out`` giving exactly zero gradients, no mutation of ``g_out``, no
corruption by a caller mutating its inputs, float32 staying float32, shapes of
the gradients and the Jacobians, and read-only outputs.

Adding a layer to the library means adding one row here, and a test holds that:
every ``Layer`` subclass that the library exports has a row (the abstract bases
excepted). The layers of the backward network (``backprop.layers.backward``) hold
constants frozen per example, so their rows build them at the row's batch size. Two
layers defined below write only ``_forward`` and ``_jacobians``: their rows run the
base ``Layer._backward``, which multiplies through the structured Jacobians.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

import backprop as bp
import backprop.layers.backward
import backprop.layers.worked
from backprop.jacobian import Dense, Diagonal, Identity, Jacobian, Kronecker, Sparse
from backprop.layer import Layer, OperatingPoint
from backprop.layers.backward import VJP, BatchSum, Gate, Slice, WeightGrad
from backprop.layers.second_order import linear_hvp
from backprop.layers.worked import Constant, Scale, Shift, SumEntries

Arrays = tuple[np.ndarray, ...]


def normal(*shape: int) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Inputs drawn from N(0, 1), one array of shape ``(B, *shape)``."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        return (rng.standard_normal((B, *shape)).astype(dtype),)

    return draw


def away_from_zero(*shape: int) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Inputs with ``|x| in [0.1, 2]``: finite differences never straddle a kink at 0."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        size = (B, *shape)
        x = rng.choice([-1.0, 1.0], size=size) * rng.uniform(0.1, 2.0, size=size)
        return (x.astype(dtype),)

    return draw


def apart(*shape: int) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Inputs ``(B, *shape)`` whose entries all differ, by 0.05 at least: no max-pooling
    window holds a tie, so finite differences never straddle a kink."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        n = B * int(np.prod(shape))
        return ((0.05 * (rng.permutation(n) - n / 2)).reshape(B, *shape).astype(dtype),)

    return draw


def several(*shapes: tuple[int, ...]) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Several float inputs, of shapes ``(B, *shape_i)``."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        return tuple(rng.standard_normal((B, *s)).astype(dtype) for s in shapes)

    return draw


def logits_and_labels(C: int, *positions: int) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Logits ``(B, C, *positions)`` and integer labels ``(B, *positions)`` in ``0..C-1``."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        z = (2.0 * rng.standard_normal((B, C, *positions))).astype(dtype)
        return z, rng.integers(0, C, size=(B, *positions))

    return draw


def token_ids(n: int, *shape: int) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Integer ids ``(B, *shape)`` in ``0..n-1``; with more positions than ids, some repeat."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        return (rng.integers(0, n, size=(B, *shape)),)

    return draw


def with_mask(
    shape: tuple[int, ...], mask: tuple[int, ...], *, full_row: bool = False
) -> Callable[[np.random.Generator, int, Any], Arrays]:
    """Float data ``(B, *shape)`` and a boolean mask ``(B, *mask)`` (True: left out), with
    about a third of the entries masked; ``full_row`` masks the whole of example 0's
    second row (a row with nothing allowed)."""

    def draw(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
        x = rng.standard_normal((B, *shape)).astype(dtype)
        m = rng.random((B, *mask)) < 0.35
        if full_row:
            m[0, 1] = True
        return x, m

    return draw


def nothing(rng: np.random.Generator, B: int, dtype: Any) -> Arrays:
    """No input at all: a source of the graph (``Constant``)."""
    return ()


def g_like(rng: np.random.Generator, x_out: Any) -> Any:
    """A random ``g_out`` of the output's shape and dtype (a tuple for a tuple)."""
    if isinstance(x_out, tuple):
        return tuple(g_like(rng, x) for x in x_out)
    if x_out.ndim == 0:  # a loss: g_out is a scalar
        return np.asarray(0.75, dtype=x_out.dtype)
    return rng.standard_normal(x_out.shape).astype(x_out.dtype)


def frozen(seed: int, *shape: int) -> Callable[[Any], np.ndarray]:
    """A constant of ``shape`` drawn from N(0, 1) with its own seed, in a given dtype:
    the same numbers for every build of a row, so float32 and float64 builds agree."""

    def draw(dtype: Any) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(shape).astype(dtype)

    return draw


def sparse_matrix(dtype: Any) -> sp.csr_array:
    """A fixed ``3 × 5`` matrix with 7 stored entries (a shared ``Sparse`` Jacobian)."""
    rows, cols = [0, 0, 1, 1, 2, 2, 2], [0, 3, 1, 4, 0, 2, 4]
    values = [1.5, -0.5, 2.0, 0.25, -1.0, 0.75, 3.0]
    return sp.csr_array((np.array(values, dtype=dtype), (rows, cols)), shape=(3, 5))


# -- layers that write only ``_forward`` and ``_jacobians`` ------------------------------


class CubeScale(Layer):
    """``x_out = c ⊙ x_in³`` on ``(B, n)``, with a learnable ``c`` of shape ``(n,)``.

    Per example ``L^x = diag(3 c ⊙ x_in²)`` and ``L^c = diag(x_in³)``. It writes no
    ``_backward``: its gradients come from the base ``Layer._backward``.
    """

    def __init__(self, n: int, dtype: Any = np.float64) -> None:
        super().__init__()
        self.params["c"] = bp.Parameter(np.linspace(0.5, 1.5, n).astype(dtype))

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return op.theta["c"] * x_in**3

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        c = op.theta["c"]
        return Diagonal(3 * c * x**2, "3c x²"), {"c": Diagonal(x**3, "x³")}


class MatVecPlus(Layer):
    """``x_out = A x_a + x_b`` for a fixed ``A`` (2 × 3): two inputs, no parameter.

    Per example ``L^a = A`` and ``L^b = I``. It writes no ``_backward``: its input
    gradients come from the base ``Layer._backward``. Being linear it has no
    second-order term (``_hvp = linear_hvp``); it writes no ``_tangent``, which the
    Jacobians' forward products then give.
    """

    inputs = ("x_a", "x_b")
    _hvp = linear_hvp
    A = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])

    def _forward(self, op: OperatingPoint, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
        return x_a @ self.A.T.astype(x_a.dtype) + x_b

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x_a = op.x_in[0]
        B = x_a.shape[0]
        return (Dense(self.A.astype(x_a.dtype), "A", batch=B), Identity(2, B, x_a.dtype)), {}


DEFAULT_BACKWARD = (CubeScale, MatVecPlus)


# -- helpers of the normalization, softmax and dropout rows -------------------------------


def with_params(layer: Layer, seed: int, scale: float = 1.0) -> Layer:
    """``layer`` with every parameter set to fixed N(0, scale²) numbers (γ = 1, β = 0 at
    construction would leave the affine part untested)."""
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p.value = (scale * rng.standard_normal(p.shape)).astype(p.dtype)
    return layer


def batchnorm_eval(cls: type[Layer], c: int, dtype: Any) -> Layer:
    """A BatchNorm in eval mode with fixed running statistics and parameters."""
    layer = with_params(cls(c, dtype=dtype), 20 + c)  # type: ignore[call-arg]
    rng = np.random.default_rng(30 + c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    layer.set_running_stats(mean.astype(dtype), var.astype(dtype))  # type: ignore[attr-defined]
    return layer.eval()


class FixedMaskDropout(bp.Dropout):
    """Training-mode ``Dropout`` whose every forward draws the same mask (a generator
    seeded afresh per draw), so that finite differences see one function."""

    def _draw(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng(5).random(shape) >= self.p


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., Layer]  # dtype -> layer; (dtype, B) -> layer when ``batched``
    inputs: Callable[[np.random.Generator, int, Any], Arrays]  # rng, B, dtype -> inputs
    batched: bool = False  # the layer holds constants per example: built for a batch size

    def build(self, dtype: Any, B: int) -> Layer:
        return self.make(dtype, B) if self.batched else self.make(dtype)


CASES = [
    Case("Linear", lambda dt: bp.Linear(3, 2, rng=0, dtype=dt), normal(3)),
    Case("Linear-nobias", lambda dt: bp.Linear(4, 3, bias=False, rng=1, dtype=dt), normal(4)),
    Case("ReLU", lambda dt: bp.ReLU(), away_from_zero(5)),
    Case("LeakyReLU", lambda dt: bp.LeakyReLU(0.1), away_from_zero(2, 3)),
    Case("Sigmoid", lambda dt: bp.Sigmoid(), normal(5)),
    Case("Tanh", lambda dt: bp.Tanh(), normal(2, 2)),
    Case("Softplus", lambda dt: bp.Softplus(), normal(5)),
    Case("Pointwise-sin", lambda dt: bp.Pointwise(np.sin, np.cos), normal(4)),
    Case(
        "Pointwise-sin-d2h",
        lambda dt: bp.Pointwise(np.sin, np.cos, d2h=lambda x: -np.sin(x)),
        normal(4),
    ),
    Case("L2Loss", lambda dt: bp.L2Loss(), several((3,), (3,))),
    Case("SoftmaxCrossEntropy", lambda dt: bp.SoftmaxCrossEntropy(), logits_and_labels(4)),
    Case("Merge-2", lambda dt: bp.Merge(2), several((3,), (2, 2))),
    Case("Merge-3", lambda dt: bp.Merge(3), several((2,), (3,), (1, 2))),
    Case("Branch", lambda dt: bp.Branch(3), normal(4)),
    Case("Add", lambda dt: bp.Add(), several((2, 3), (2, 3))),
    Case("Multiply", lambda dt: bp.Multiply(), several((2, 3), (2, 3))),
    Case("Reshape", lambda dt: bp.Reshape(2, 3), normal(6)),
    Case("Flatten", lambda dt: bp.Flatten(), normal(2, 3)),
    # -- tensors of any shape: images (B, C, H, W), sequences (B, T, d) --
    Case("Transpose", lambda dt: bp.Transpose((1, 0)), normal(3, 5)),
    Case("Transpose-3", lambda dt: bp.Transpose((2, 0, 1)), normal(3, 1, 5)),
    Case("Merge-axis1", lambda dt: bp.Merge(axis=1), several((2, 3, 5), (1, 3, 5))),
    Case("Merge-axis-1", lambda dt: bp.Merge(2, axis=-1), several((3, 2), (3, 5))),
    Case("Merge-axis2", lambda dt: bp.Merge(axis=2), several((1, 3, 5), (1, 1, 5), (1, 2, 5))),
    Case("SoftmaxCE-BC5", lambda dt: bp.SoftmaxCrossEntropy(), logits_and_labels(3, 5)),
    Case("SoftmaxCE-BC23", lambda dt: bp.SoftmaxCrossEntropy(), logits_and_labels(3, 2, 3)),
    # -- the worked-example pieces (backprop.layers.worked) --
    Case("Constant", lambda dt: Constant(np.linspace(-1, 2, 15).reshape(3, 5).astype(dt)), nothing),
    Case("Scale", lambda dt: Scale(0.7, dtype=dt), normal(3, 5)),
    Case("Scale-fixed", lambda dt: Scale(-1.5, learnable=False), normal(5)),
    Case("Shift", lambda dt: Shift(np.arange(15.0).reshape(3, 5) / 7), normal(3, 5)),
    Case("Shift-scalar", lambda dt: Shift(0.5), normal(3)),
    Case("SumEntries", lambda dt: SumEntries(), normal(3, 5)),
    # -- the backward network (backprop.layers.backward), built at the row's batch size --
    Case("Gate", lambda dt, B: Gate(frozen(1, B, 2, 3)(dt)), normal(2, 3), batched=True),
    Case("Slice", lambda dt: Slice(2, 6, (2, 2)), normal(7)),
    Case("Slice-of-2d", lambda dt: Slice(1, 4), normal(2, 3)),
    Case("VJP-dense", lambda dt, B: VJP(Dense(frozen(2, B, 2, 5)(dt)), (5,)), normal(2), True),
    Case(
        "VJP-shared-reshaped",
        lambda dt, B: VJP(Dense(frozen(3, 2, 6)(dt), batch=B), (2, 3)),
        normal(2),
        batched=True,
    ),
    Case("VJP-sparse", lambda dt, B: VJP(Sparse(sparse_matrix(dt), B), (5,)), normal(3), True),
    Case("VJP-identity", lambda dt, B: VJP(Identity(3, B, dt), (3,)), normal(3), batched=True),
    Case(
        "VJP-sum-kronecker",
        lambda dt, B: VJP(Kronecker(2, frozen(4, B, 3)(dt)), (2, 3), sum_batch=True),
        normal(2),
        batched=True,
    ),
    Case(
        "VJP-sum-dense",
        lambda dt, B: VJP(Dense(frozen(5, B, 3, 4)(dt)), (2, 2), sum_batch=True),
        normal(3),
        batched=True,
    ),
    Case("WeightGrad", lambda dt, B: WeightGrad(frozen(6, B, 3)(dt)), normal(2), batched=True),
    Case("BatchSum", lambda dt: BatchSum(), normal(2, 2)),
    # -- the default backward: Layer._backward through the Jacobians (defined above) --
    Case("CubeScale-default-backward", lambda dt: CubeScale(4, dt), normal(4)),
    Case("MatVecPlus-default-backward", lambda dt: MatVecPlus(), several((3,), (2,))),
    # -- normalization, softmax, dropout --
    Case("Softmax", lambda dt: bp.Softmax(), normal(5)),
    Case("Softmax-rows", lambda dt: bp.Softmax(), normal(3, 4)),
    Case("Softmax-axis1", lambda dt: bp.Softmax(axis=1), normal(3, 4)),
    Case("Softmax-T0.5", lambda dt: bp.Softmax(temperature=0.5), normal(5)),
    Case("Softmax-axis1-T0.5", lambda dt: bp.Softmax(axis=1, temperature=0.5), normal(3, 4)),
    Case("LogSoftmax", lambda dt: bp.LogSoftmax(), normal(5)),
    Case("LogSoftmax-axis1", lambda dt: bp.LogSoftmax(axis=1), normal(3, 4)),
    Case("LayerNorm-last", lambda dt: with_params(bp.LayerNorm(4, dtype=dt), 1), normal(3, 4)),
    Case(
        "LayerNorm-last2", lambda dt: with_params(bp.LayerNorm((3, 4), dtype=dt), 2), normal(3, 4)
    ),
    Case("LayerNorm-noaffine", lambda dt: bp.LayerNorm(5, affine=False), normal(5)),
    Case("LayerNorm-noaffine-last2", lambda dt: bp.LayerNorm((2, 3), affine=False), normal(2, 3)),
    Case("BatchNorm1d-eval", lambda dt: batchnorm_eval(bp.BatchNorm1d, 3, dt), normal(3)),
    Case("BatchNorm1d-eval-BCL", lambda dt: batchnorm_eval(bp.BatchNorm1d, 2, dt), normal(2, 5)),
    Case("BatchNorm2d-eval", lambda dt: batchnorm_eval(bp.BatchNorm2d, 2, dt), normal(2, 3, 2)),
    Case("Dropout-eval", lambda dt: bp.Dropout(0.3, rng=0).eval(), normal(2, 3)),
    Case("Dropout-train-fixed-mask", lambda dt: FixedMaskDropout(0.4), normal(2, 3)),
    # -- convolution --
    Case(
        "Conv2d-stride2-pad1",
        lambda dt: bp.Conv2d(2, 3, 3, stride=2, padding=1, rng=0, dtype=dt),
        normal(2, 7, 9),
    ),
    Case(
        "Conv2d-dilation2",
        lambda dt: bp.Conv2d(2, 2, 3, padding=1, dilation=2, rng=1, dtype=dt),
        normal(2, 6, 7),
    ),
    Case(
        "Conv2d-groups2",
        lambda dt: bp.Conv2d(4, 2, (2, 3), stride=(2, 1), groups=2, rng=2, dtype=dt),
        normal(4, 5, 5),
    ),
    Case(
        "Conv2d-depthwise",
        lambda dt: bp.Conv2d(3, 3, 3, padding=1, groups=3, rng=3, dtype=dt),
        normal(3, 4, 5),
    ),
    Case(
        "Conv2d-nonsquare-nobias",
        lambda dt: bp.Conv2d(2, 3, (1, 3), padding=(0, 1), bias=False, rng=4, dtype=dt),
        normal(2, 3, 4),
    ),
    Case(
        "ConvTranspose2d-stride2-op1",
        lambda dt: bp.ConvTranspose2d(
            2, 3, 3, stride=2, padding=1, output_padding=1, rng=5, dtype=dt
        ),
        normal(2, 3, 4),
    ),
    Case(
        "ConvTranspose2d-groups-dilation",
        lambda dt: bp.ConvTranspose2d(4, 2, 2, dilation=2, groups=2, bias=False, rng=6, dtype=dt),
        normal(4, 3, 3),
    ),
    # -- pooling --
    Case("MaxPool2d-7x9-k3-s2-p1", lambda dt: bp.MaxPool2d(3, stride=2, padding=1), apart(2, 7, 9)),
    Case("MaxPool2d-k2-floors", lambda dt: bp.MaxPool2d(2), apart(3, 5, 7)),
    Case("MaxPool2d-overlap-k3-s1", lambda dt: bp.MaxPool2d(3, stride=1), apart(2, 5, 6)),
    Case("MaxPool2d-2x3-s12-p10", lambda dt: bp.MaxPool2d((2, 3), (1, 2), (1, 0)), apart(2, 5, 7)),
    Case(
        "AvgPool2d-7x9-k3-s2-p1", lambda dt: bp.AvgPool2d(3, stride=2, padding=1), normal(2, 7, 9)
    ),
    Case("AvgPool2d-k2-floors", lambda dt: bp.AvgPool2d(2), normal(3, 5, 7)),
    Case("AvgPool2d-overlap-2x3-p1", lambda dt: bp.AvgPool2d((2, 3), 1, 1), normal(2, 4, 5)),
    Case("GlobalAvgPool", lambda dt: bp.GlobalAvgPool(), normal(3, 4, 5)),
    Case("GlobalMaxPool", lambda dt: bp.GlobalMaxPool(), apart(3, 4, 5)),
    Case("Upsample-2", lambda dt: bp.Upsample(2), normal(2, 3, 2)),
    Case("Upsample-2x3", lambda dt: bp.Upsample((2, 3)), normal(2, 2, 3)),
    # -- sequences and attention: (B, T, d) --
    Case("Embedding", lambda dt: bp.Embedding(5, 3, rng=0, dtype=dt), token_ids(5, 7)),
    Case("Embedding-2d-ids", lambda dt: bp.Embedding(4, 2, rng=1, dtype=dt), token_ids(4, 2, 3)),
    Case("PositionalEncoding", lambda dt: bp.PositionalEncoding(6, 8), normal(5, 6)),
    Case("MatMul", lambda dt: bp.MatMul(), several((3, 2), (2, 4))),
    Case("MatMul-heads", lambda dt: bp.MatMul(), several((2, 3, 2), (2, 2, 4))),
    Case("Softmax-causal", lambda dt: bp.Softmax(causal=True), normal(2, 4, 4)),
    Case(
        "Softmax-masked-full-row",
        lambda dt: bp.Softmax(masked=True),
        with_mask((2, 3, 4), (3, 4), full_row=True),
    ),
    Case(
        "Softmax-causal-keys-T0.5",
        lambda dt: bp.Softmax(temperature=0.5, causal=True, masked=True),
        with_mask((2, 4, 4), (4,)),
    ),
    Case(
        "MultiHeadAttention",
        lambda dt: with_params(bp.MultiHeadAttention(6, 2, rng=0, dtype=dt), 40, 0.5),
        normal(4, 6),
    ),
    Case(
        "MultiHeadAttention-causal-masked-nobias",
        lambda dt: with_params(
            bp.MultiHeadAttention(4, 2, causal=True, bias=False, rng=1, dtype=dt), 41, 0.5
        ),
        with_mask((3, 4), (3,)),
    ),
    # -- recurrence: one step of a cell, and taking a sequence apart --
    Case("RNNCell-tanh", lambda dt: bp.RNNCell(3, 4, rng=0, dtype=dt), several((3,), (4,))),
    Case(
        "RNNCell-relu-nobias",
        lambda dt: bp.RNNCell(2, 3, nonlinearity="relu", bias=False, rng=1, dtype=dt),
        several((2,), (3,)),
    ),
    Case("LSTMCell", lambda dt: bp.LSTMCell(3, 2, rng=2, dtype=dt), several((3,), (2,), (2,))),
    Case(
        "LSTMCell-nobias",
        lambda dt: bp.LSTMCell(2, 3, bias=False, rng=3, dtype=dt),
        several((2,), (3,), (3,)),
    ),
    Case("Unstack", lambda dt: bp.Unstack(3), normal(3, 2)),
    Case("Unstack-images", lambda dt: bp.Unstack(2), normal(2, 1, 2, 3)),
    Case("ZeroState", lambda dt: bp.ZeroState(3), normal(4, 2)),
]

BATCHES = [1, 4]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(params=BATCHES, ids=[f"B{b}" for b in BATCHES])
def batch(request: pytest.FixtureRequest) -> int:
    return request.param


def setup(case: Case, B: int, dtype: Any = np.float64, seed: int = 0) -> tuple[Layer, Arrays, Any]:
    """The layer, its inputs, and a g_out for it (after one forward)."""
    rng = np.random.default_rng(seed)
    layer = case.build(dtype, B)
    xs = case.inputs(rng, B, dtype)
    out = layer.forward(*xs)
    return layer, xs, g_like(rng, out)


def is_source(layer: Layer) -> bool:
    """A layer with no input and no parameter (``Constant``): nothing to differentiate."""
    return not layer.inputs and not layer.params


def as_tuple(g_in: Any) -> tuple[Any, ...]:
    return g_in if isinstance(g_in, tuple) else (g_in,)


def is_float(x: np.ndarray) -> bool:
    return bool(np.issubdtype(x.dtype, np.floating))


def flat_rows(g: Any, B: int, layer: Layer) -> np.ndarray:
    """``g_out`` as the ``(B, M)`` rows the Jacobians act on (outputs side by side)."""
    if isinstance(g, tuple):
        return np.concatenate([gi.reshape(B, -1) for gi in g], axis=1)
    if g.ndim == 0 or layer.reduces_batch:
        # The output is a sum over the examples (a cost, a parameter gradient): every
        # example's row is all of g_out.
        return np.broadcast_to(g.reshape(1, -1), (B, max(g.size, 1))).copy()
    return g.reshape(B, -1)


def example_0(out: Any, layer: Layer) -> np.ndarray:
    """What example 0's Jacobian differentiates: its own output, or, for an output
    that sums the examples (``reduces_batch``, a loss), the whole output."""
    if isinstance(out, tuple):
        return np.concatenate([o[0].ravel() for o in out])
    return out.ravel() if out.ndim == 0 or layer.reduces_batch else out[0].ravel()


def copy_g(g: Any) -> Any:
    return tuple(x.copy() for x in g) if isinstance(g, tuple) else g.copy()


def assert_same_results(
    a: tuple[Any, dict[str, np.ndarray]], b: tuple[Any, dict[str, np.ndarray]]
) -> None:
    for x, y in zip(as_tuple(a[0]), as_tuple(b[0]), strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            np.testing.assert_array_equal(x, y)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name])


# -- the three-way check -----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gradcheck(case: Case, batch: int) -> None:
    layer, xs, _ = setup(case, batch)
    report = bp.gradcheck(layer, *xs)
    if is_source(layer):  # no Jacobian and no gradient: gradcheck has nothing to compare
        assert not report.checks
        assert layer.jacobians() == ((), {})
        return
    assert report.checks, "gradcheck compared nothing"
    assert report.worst < 1e-5


#: Rows whose layer states no second derivative: a ``Pointwise`` built without ``d2h``,
#: and a layer that writes no ``_hvp``. Curvature refuses them, naming the layer.
NO_SECOND_ORDER = {"Pointwise-sin": r"Pointwise\(sin\)", "CubeScale-default-backward": "CubeScale"}


def test_second_order_gradcheck(case: Case, batch: int) -> None:
    # The layer's _hvp against central differences of backward(g_out) in its inputs and
    # parameters (the Hessian of <g_out, f>, entry by entry), its symmetry, and its
    # _tangent against differences of forward, plus the dot-product test.
    layer, xs, g_out = setup(case, batch)
    if is_source(layer):  # nothing moves a constant
        return
    if case.name in NO_SECOND_ORDER:
        with pytest.raises(NotImplementedError, match=NO_SECOND_ORDER[case.name]):
            bp.gradcheck(layer, *xs, g_out=g_out, order=2)
        return
    report = bp.gradcheck(layer, *xs, g_out=g_out, order=2)
    assert len(report.checks) == 4, report
    assert report.worst < 1e-5


def test_branch_three_ways(batch: int) -> None:
    """Branch by hand: fast backward = Tile Jacobian = finite differences."""
    rng = np.random.default_rng(3)
    n = 3
    layer = bp.Branch(n)
    x = rng.standard_normal((batch, 4))
    outs = layer.forward(x)
    assert len(outs) == n
    for o in outs:
        np.testing.assert_array_equal(o, x)
    g = tuple(rng.standard_normal(x.shape) for _ in range(n))
    g_in, grads = layer.backward(g)
    assert grads == {}
    np.testing.assert_allclose(g_in, g[0] + g[1] + g[2], rtol=1e-15)

    def stacked(xi: np.ndarray) -> np.ndarray:
        return np.concatenate([o.reshape(batch, -1) for o in bp.Branch(n).forward(xi)], axis=1)

    numeric = bp.numerical_jacobian(stacked, x, flat=True)  # (B*n*4, B*4)
    L_x, L_theta = layer.jacobians()
    assert L_theta == {}
    explicit = L_x.block_diagonal().toarray()
    np.testing.assert_allclose(explicit, numeric, rtol=1e-7, atol=1e-8)
    g_rows = flat_rows(g, batch, layer)
    np.testing.assert_allclose(g_in.ravel(), g_rows.ravel() @ numeric, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(g_in, L_x.vjp(g_rows), rtol=1e-15)


# -- the dot-product test with the Jacobian objects --------------------------------------


def test_dot_product(case: Case, batch: int) -> None:
    """``<v, L u> = <v L, u>``: forward product of the Jacobian vs the backward pass."""
    layer, xs, v = setup(case, batch)
    rng = np.random.default_rng(11)
    g_in, grads = layer.backward(v)
    L_x, L_theta = layer.jacobians()
    if is_source(layer):  # Constant: no Jacobian to multiply, no gradient to send
        assert (g_in, grads, L_x, L_theta) == ((), {}, (), {})
        return
    v_rows = flat_rows(v, batch, layer)
    checked = 0
    for x, L, g in zip(xs, as_tuple(L_x), as_tuple(g_in), strict=True):
        if not is_float(x):
            assert L is None and g is None
            continue
        u = rng.standard_normal(x.shape)
        lhs = np.sum(v_rows * L.jvp(u.reshape(batch, -1)))
        rhs = np.sum(g * u)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-12)
        checked += 1
    for name, L in L_theta.items():
        u = rng.standard_normal(layer.params[name].shape)
        Lu = L.jvp(np.broadcast_to(u.ravel(), (batch, u.size)).copy())
        np.testing.assert_allclose(np.sum(v_rows * Lu), np.sum(grads[name] * u), rtol=1e-10)
        checked += 1
    assert checked >= 1


# -- zero in, zero out; nothing mutated --------------------------------------------------


def zeros_like_g(g: Any) -> Any:
    return tuple(np.zeros_like(x) for x in g) if isinstance(g, tuple) else np.zeros_like(g)


def test_zero_g_out_gives_exactly_zero(case: Case, batch: int) -> None:
    layer, xs, g = setup(case, batch)
    g_in, grads = layer.backward(zeros_like_g(g))
    for x, gi in zip(xs, as_tuple(g_in), strict=True):
        if is_float(x):
            assert gi.shape == x.shape
            assert np.all(gi == 0)
        else:
            assert gi is None
    assert grads.keys() == layer.params.keys()
    for name, grad in grads.items():
        assert grad.shape == layer.params[name].shape
        assert np.all(grad == 0)


def test_g_out_and_inputs_not_mutated(case: Case, batch: int) -> None:
    layer, xs, g = setup(case, batch)
    g_copy, xs_copy = copy_g(g), tuple(x.copy() for x in xs)
    params_copy = {n: p.value.copy() for n, p in layer.params.items()}
    layer.backward(g)
    layer.backward(g, input_grad=False)
    layer.jacobians()
    for a, b in zip(as_tuple(g), as_tuple(g_copy), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(xs, xs_copy, strict=True):
        np.testing.assert_array_equal(a, b)
    for n, p in layer.params.items():
        np.testing.assert_array_equal(p.value, params_copy[n])


def test_caller_mutating_inputs_cannot_corrupt_gradients(case: Case, batch: int) -> None:
    layer, xs, g = setup(case, batch)
    before = layer.backward(g)
    dense_before = [L.to_dense() for L in as_tuple(layer.jacobians()[0]) if L is not None]
    for x in xs:  # the caller reuses its buffers
        x[...] = 0 if not is_float(x) else 123.0
    after = layer.backward(g)
    assert_same_results(before, after)
    dense_after = [L.to_dense() for L in as_tuple(layer.jacobians()[0]) if L is not None]
    for a, b in zip(dense_before, dense_after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_outputs_are_read_only(case: Case, batch: int) -> None:
    layer, xs, _ = setup(case, batch)
    out = layer.forward(*xs)
    for o in as_tuple(out):
        assert not o.flags.writeable
        with pytest.raises(ValueError):
            o[...] = 0


def test_input_grad_false(case: Case, batch: int) -> None:
    layer, xs, g = setup(case, batch)
    g_in_full, grads_full = layer.backward(g)
    g_in, grads = layer.backward(g, input_grad=False)
    assert all(gi is None for gi in as_tuple(g_in))
    assert_same_results((None, grads_full), (None, grads))


# -- dtypes ------------------------------------------------------------------------------


def test_float32_stays_float32_and_matches_float64(case: Case, batch: int) -> None:
    layer64, xs64, g64 = setup(case, batch, np.float64)
    layer32, xs32, g32 = setup(case, batch, np.float32)
    out32 = layer32.forward(*xs32)
    out64 = layer64.forward(*xs64)
    for o32, o64 in zip(as_tuple(out32), as_tuple(out64), strict=True):
        assert o32.dtype == np.float32
        np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-5)
    g_in32, grads32 = layer32.backward(g32)
    g_in64, grads64 = layer64.backward(g64)
    for x, a, b in zip(xs32, as_tuple(g_in32), as_tuple(g_in64), strict=True):
        if not is_float(x):
            continue
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for name in grads64:
        assert grads32[name].dtype == np.float32
        np.testing.assert_allclose(grads32[name], grads64[name], rtol=1e-4, atol=1e-5)
    L_x, L_theta = layer32.jacobians()
    for L in as_tuple(L_x):
        if L is not None:
            assert L.to_dense().dtype == np.float32


# -- shapes, with values -----------------------------------------------------------------


def test_gradient_shapes(case: Case, batch: int) -> None:
    layer, xs, g = setup(case, batch)
    g_in, grads = layer.backward(g)
    for x, gi in zip(xs, as_tuple(g_in), strict=True):
        if is_float(x):
            assert gi.shape == x.shape and gi.dtype == x.dtype
    assert {n: v.shape for n, v in grads.items()} == {n: p.shape for n, p in layer.params.items()}


def test_jacobian_shapes_and_values_per_example(case: Case, batch: int) -> None:
    """Per example ``L^x`` is ``(|x_out|, |x_in|)`` and ``L^θ`` is ``(|x_out|, |θ|)``,
    and example 0's matrix equals the finite differences of example 0's output."""
    layer, xs, _ = setup(case, batch)
    out = layer.forward(*xs)
    m = example_0(out, layer).size
    L_x, L_theta = layer.jacobians()

    def out0(*inputs: np.ndarray) -> np.ndarray:
        o = case.build(np.float64, batch)
        for name, p in layer.params.items():
            o.params[name].value = p.value
        return example_0(o.forward(*inputs), o)

    for i, (x, L) in enumerate(zip(xs, as_tuple(L_x), strict=True)):
        if not is_float(x):
            assert L is None
            continue
        assert L.shape == (m, x[0].size)
        assert L.batch == batch

        def f(x0: np.ndarray, i: int = i) -> np.ndarray:
            xi = xs[i].copy()
            xi[0] = x0
            return out0(*xs[:i], xi, *xs[i + 1 :])

        numeric = bp.numerical_jacobian(f, xs[i][0], flat=True)
        np.testing.assert_allclose(L.to_dense()[0], numeric, rtol=1e-6, atol=1e-8)
    assert L_theta.keys() == layer.params.keys()
    for name, L in L_theta.items():
        p = layer.params[name]
        assert L.shape == (m, p.size)
        assert L.batch == batch
        original = p.value

        def f_theta(value: np.ndarray, name: str = name) -> np.ndarray:
            o = case.build(np.float64, batch)
            for n, q in layer.params.items():
                o.params[n].value = value if n == name else q.value
            return example_0(o.forward(*xs), o)

        numeric = bp.numerical_jacobian(f_theta, original, flat=True)
        np.testing.assert_allclose(L.to_dense()[0], numeric, rtol=1e-6, atol=1e-8)


# -- parameters and read-only views cannot be changed behind the layer's back ----------


def test_parameter_value_is_read_only_and_assigned_values_are_copied() -> None:
    lin = bp.Linear(3, 2, rng=0)
    with pytest.raises(ValueError, match="read-only"):
        lin.W.value[0, 0] = 1.0
    new = np.ones((2, 3))
    lin.W.value = new
    new[0, 0] = 7.0  # the caller's array is theirs: the Parameter kept a copy
    assert lin.W.value[0, 0] == 1.0


def test_forward_copies_a_read_only_view_of_a_writeable_array() -> None:
    data = np.random.default_rng(0).standard_normal((4, 3))
    original = data.copy()
    view = data.view()
    view.flags.writeable = False  # read-only, yet it shows whatever happens to ``data``
    lin = bp.Linear(3, 2, rng=0)
    lin.forward(view)
    data[:] = 0.0
    g = np.ones((4, 2))
    np.testing.assert_array_equal(lin.backward(g)[1]["W"], g.T @ original)  # eq. 14.18


# -- the worked-example pieces, on numbers worked by hand -------------------------------


def test_worked_pieces_compute_what_they_say() -> None:
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    ten = Constant([[10.0]])
    assert ten.forward().tolist() == [[10.0]]
    assert ten.backward(np.ones((1, 1))) == ((), {})

    scale = Scale(2.5)
    assert scale.forward(x).tolist() == [[2.5, 5.0, 7.5], [10.0, 12.5, 15.0]]
    g_in, grads = scale.backward(np.ones((2, 3)))
    assert g_in.tolist() == [[2.5] * 3] * 2
    assert grads["a"] == 21.0  # dJ/da = Σ g·x = 1 + 2 + ... + 6

    minus = Scale(-1.0, learnable=False)
    assert minus.params == {}
    assert minus.forward(x).tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]

    shift = Shift([0.5, 0.0, -1.0])
    assert shift.forward(x).tolist() == [[1.5, 2.0, 2.0], [4.5, 5.0, 5.0]]
    assert shift.backward(x)[0].tolist() == x.tolist()  # L^x = I: g passes through

    total = SumEntries()
    assert total.forward(x).tolist() == [[6.0], [15.0]]
    assert total.backward(np.array([[2.0], [-1.0]]))[0].tolist() == [[2.0] * 3, [-1.0] * 3]
    assert repr(total) == "SumEntries()"


def test_worked_pieces_left_the_top_level_namespace() -> None:
    # ``backprop.jacobian.Sum`` (a sum of Jacobians) is the only ``Sum``; the layer is
    # ``SumEntries``, and the worked pieces and backward-network layers live in their modules.
    for name in ("Constant", "Scale", "Shift", "Sum", "SumEntries", "VJP", "Gate", "Slice"):
        assert not hasattr(bp, name), name
    for name in ("WeightGrad", "BatchSum"):
        assert not hasattr(bp, name), name
    assert bp.Transpose is bp.layers.shape.Transpose
    assert bp.Reshape is bp.layers.structure.Reshape  # the old import path still works


# -- the battery is authoritative: every exported layer has a row ------------------------

#: Where the library exports layers: the top-level namespace, and the two modules whose
#: layers stay out of it (the backward network, the worked-example pieces).
EXPORTING_MODULES = (bp, backprop.layers.backward, backprop.layers.worked)

#: Abstract bases, which compute nothing themselves: ``Layer`` is the protocol (its
#: ``_jacobians`` raises NotImplementedError) and ``Loss`` only adds the seed
#: ``dJ/dJ = 1``. Every concrete subclass of them needs a row.
ABSTRACT_BASES = {"Layer", "Loss"}


def exported_layers(modules: tuple[Any, ...] = EXPORTING_MODULES) -> set[type[Layer]]:
    """Every concrete ``Layer`` subclass reachable as an attribute of ``modules``."""
    found = set()
    for module in modules:
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, Layer):
                if obj.__name__ not in ABSTRACT_BASES:
                    found.add(obj)
    return found


def missing_rows(layers: set[type[Layer]], cases: list[Case]) -> list[str]:
    """The names of the classes in ``layers`` that no row of ``cases`` builds (exactly:
    a row of a subclass does not cover its base)."""
    covered = {type(case.build(np.float64, 1)) for case in cases}
    return sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in layers - covered)


def test_every_exported_layer_has_a_battery_row() -> None:
    missing = missing_rows(exported_layers(), CASES)
    assert not missing, (
        f"no battery row for {', '.join(missing)}: add a row to CASES in tests/test_layers.py"
    )


def test_the_row_check_finds_a_missing_row() -> None:
    # The check above can fail: without its rows, a class is reported, by its full name.
    without_gate = [c for c in CASES if c.name != "Gate"]
    assert missing_rows(exported_layers(), without_gate) == ["backprop.layers.backward.Gate"]
    without_flatten = [c for c in CASES if c.name != "Flatten"]  # Reshape's row does not count
    assert missing_rows(exported_layers(), without_flatten) == ["backprop.layers.shape.Flatten"]
    found = exported_layers()
    assert {bp.Linear, bp.Pointwise, Gate, VJP, WeightGrad, BatchSum, Constant, SumEntries} <= found
    assert not {Layer, bp.Loss} & found


@pytest.mark.parametrize("cls", DEFAULT_BACKWARD, ids=lambda c: c.__name__)
def test_default_backward_rows_write_no_backward(cls: type[Layer]) -> None:
    """The rows of these classes run the base ``Layer._backward``: neither the class nor
    any base between it and ``Layer`` defines ``_backward``."""
    assert cls._backward is Layer._backward
    below_layer = cls.__mro__[: cls.__mro__.index(Layer)]
    assert all("_backward" not in vars(k) for k in below_layer)
    assert "_jacobians" in vars(cls) and "_forward" in vars(cls)
    assert any(type(case.build(np.float64, 1)) is cls for case in CASES)


def test_default_backward_values_by_hand() -> None:
    # CubeScale: x_out = c x³, so g_in = 3 c x² g and dJ/dc = Σ_b g x³ (numpy here, not
    # the library).
    x = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]])
    g = np.array([[1.0, 2.0, -1.0, 0.5], [3.0, -1.0, 2.0, 1.0]])
    c = np.linspace(0.5, 1.5, 4)
    layer = CubeScale(4)
    np.testing.assert_allclose(layer.forward(x), c * x**3, rtol=1e-15)
    g_in, grads = layer.backward(g)
    np.testing.assert_allclose(g_in, 3 * c * x**2 * g, rtol=1e-15)
    np.testing.assert_allclose(grads["c"], (g * x**3).sum(axis=0), rtol=1e-15)
    # MatVecPlus: x_out = A x_a + x_b, so g_a = g A and g_b = g.
    A = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    x_a, x_b = x[:, :3], x[:, 2:]
    two = MatVecPlus()
    np.testing.assert_allclose(two.forward(x_a, x_b), x_a @ A.T + x_b, rtol=1e-15)
    (g_a, g_b), grads = two.backward(g[:, :2])
    np.testing.assert_allclose(g_a, g[:, :2] @ A, rtol=1e-15)
    np.testing.assert_array_equal(g_b, g[:, :2])
    assert grads == {}
