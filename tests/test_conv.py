"""``Conv2d`` and ``ConvTranspose2d`` against PyTorch float64, their Jacobians against
``torch.autograd.functional.jacobian``, the Toeplitz nonzeros against a count by
loops, gradcheck on a small CNN, and a wrong backward that gradcheck must catch.

The layers' rows in the battery (``tests/test_layers.py``), the torch table
(``tests/test_torch_reference.py``) and the Jacobian table (``tests/test_jacobian.py``)
run everything else on them.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import (
    Convolution,
    ConvolutionTranspose,
    ConvolutionWeight,
    KroneckerMatrix,
    explicit_vjp,
)
from backprop.layer import OperatingPoint

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
F = torch.nn.functional

RTOL, ATOL = 1e-10, 1e-12


def tt(a: Any, grad: bool = True) -> Any:
    return torch.tensor(np.array(a, dtype=np.float64, copy=True), requires_grad=grad)


def close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


# -- every option, against torch ---------------------------------------------------------

#: (id, c_in, c_out, kernel, options, input (H, W))
CONV = [
    ("plain", 2, 3, 3, {}, (6, 5)),
    ("stride2-pad1-odd", 2, 3, 3, {"stride": 2, "padding": 1}, (7, 9)),
    ("pairs", 3, 2, (2, 3), {"stride": (2, 1), "padding": (1, 0)}, (6, 7)),
    ("dilation2", 2, 2, 3, {"dilation": 2, "padding": 2}, (7, 6)),
    ("dilation-pair", 2, 2, (2, 2), {"dilation": (1, 3), "stride": (1, 2)}, (5, 8)),
    ("groups2", 4, 6, 3, {"groups": 2, "padding": 1}, (5, 5)),
    ("depthwise", 3, 3, 3, {"groups": 3, "stride": 2}, (7, 7)),
    ("depthwise-multiplier", 2, 4, (3, 1), {"groups": 2}, (5, 4)),
    ("nonsquare-nobias", 2, 3, (1, 3), {"bias": False, "padding": (0, 1)}, (4, 6)),
    ("1x1", 3, 2, 1, {}, (3, 4)),
    ("kernel-equals-input", 2, 3, (4, 5), {}, (4, 5)),
    ("everything", 4, 2, (3, 2), {"stride": (2, 3), "padding": (1, 2), "dilation": (2, 1),
                                  "groups": 2}, (9, 8)),
    # 64 positions or more: the weight gradient takes its other path (per-example products)
    ("64-positions", 2, 3, 3, {"padding": 1}, (9, 8)),
    ("groups2-64-positions", 4, 2, 3, {"groups": 2, "padding": 1}, (8, 8)),
]  # fmt: skip

TRANSPOSED = [
    ("plain", 2, 3, 3, {}, (3, 4)),
    ("stride2-op1", 2, 3, 3, {"stride": 2, "padding": 1, "output_padding": 1}, (3, 4)),
    ("pairs", 3, 2, (2, 3), {"stride": (3, 2), "padding": (1, 0), "output_padding": (2, 1)},
     (3, 3)),
    ("dilation", 2, 2, 3, {"dilation": 2, "padding": 1}, (4, 3)),
    ("groups2-nobias", 4, 2, 2, {"groups": 2, "stride": 2, "bias": False}, (3, 2)),
]  # fmt: skip


def _torch_conv(x: Any, W: Any, b: Any, options: dict[str, Any], transposed: bool) -> Any:
    kw = {k: v for k, v in options.items() if k != "bias"}
    return (F.conv_transpose2d if transposed else F.conv2d)(x, W, b, **kw)


def _make(transposed: bool, c_in: int, c_out: int, k: Any, options: dict[str, Any]) -> Any:
    cls = bp.ConvTranspose2d if transposed else bp.Conv2d
    return cls(c_in, c_out, k, rng=np.random.default_rng(5), **options)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize(
    "transposed, row",
    [(False, r) for r in CONV] + [(True, r) for r in TRANSPOSED],
    ids=[f"Conv2d-{r[0]}" for r in CONV] + [f"ConvTranspose2d-{r[0]}" for r in TRANSPOSED],
)
def test_against_torch(transposed: bool, row: tuple[Any, ...], B: int) -> None:
    _, c_in, c_out, k, options, hw = row
    rng = np.random.default_rng(1)
    layer = _make(transposed, c_in, c_out, k, options)
    x = rng.standard_normal((B, c_in, *hw))
    y = layer.forward(x)
    g = rng.standard_normal(y.shape)
    g_in, grads = layer.backward(g)

    x_t, W_t = tt(x), tt(layer.params["W"].value)
    b_t = tt(layer.params["b"].value) if "b" in layer.params else None
    y_t = _torch_conv(x_t, W_t, b_t, options, transposed)
    y_t.backward(torch.tensor(g))
    assert y.shape == tuple(y_t.shape)
    close(y, y_t)
    close(g_in, x_t.grad)
    close(grads["W"], W_t.grad)
    assert set(grads) == ({"W"} if b_t is None else {"W", "b"})
    if b_t is not None:
        close(grads["b"], b_t.grad)
    # The explicit Jacobians give the same numbers (and the literal sparse products too).
    L_x, L_theta = layer.jacobians()
    rows = g.reshape(B, -1)
    close(L_x.vjp(rows).reshape(x.shape), x_t.grad)
    close(explicit_vjp(L_x, rows).reshape(x.shape), x_t.grad)
    for name, L in L_theta.items():
        p_t = W_t if name == "W" else b_t
        close(L.vjp_sum(rows).reshape(p_t.shape), p_t.grad)
        close(explicit_vjp(L, rows, sum_batch=True).reshape(p_t.shape), p_t.grad)


def test_initialization_and_parameter_layout_follow_torch() -> None:
    conv = bp.Conv2d(6, 4, (3, 2), groups=2, rng=0)
    assert conv.params["W"].shape == (4, 3, 3, 2) and conv.params["b"].shape == (4,)
    bound = 1 / np.sqrt(3 * 3 * 2)  # fan_in = (c_in / groups)·kh·kw
    assert np.abs(conv.params["W"].value).max() <= bound
    assert np.abs(conv.params["W"].value).max() > 0.8 * bound  # uniform over the range
    assert conv.params["W"].value.shape == torch.nn.Conv2d(6, 4, (3, 2), groups=2).weight.shape
    tconv = bp.ConvTranspose2d(6, 4, 3, groups=2, rng=0)
    assert tconv.params["W"].shape == tuple(
        torch.nn.ConvTranspose2d(6, 4, 3, groups=2).weight.shape
    )
    assert np.abs(tconv.params["W"].value).max() <= 1 / np.sqrt(2 * 3 * 3)
    # The same rng gives the same weights; a different one, different weights.
    same = bp.Conv2d(6, 4, (3, 2), groups=2, rng=0).params["W"].value
    np.testing.assert_array_equal(same, conv.params["W"].value)
    assert not np.array_equal(bp.Conv2d(6, 4, (3, 2), groups=2, rng=1).params["W"].value, same)


# -- the dense Jacobians, against torch.autograd.functional.jacobian ----------------------


JACOBIAN_CASES = [CONV[1], CONV[3], CONV[5], CONV[8], CONV[11]]


@pytest.mark.parametrize("row", JACOBIAN_CASES, ids=[r[0] for r in JACOBIAN_CASES])
def test_conv_dense_jacobians_equal_torch_per_example(row: tuple[Any, ...]) -> None:
    _, c_in, c_out, k, options, hw = row
    rng = np.random.default_rng(2)
    B = 2
    layer = _make(False, c_in, c_out, k, options)
    x = rng.standard_normal((B, c_in, *hw))
    y = layer.forward(x)
    L_x, L_theta = layer.jacobians()
    assert isinstance(L_x, Convolution) and L_x.shared
    assert isinstance(L_theta["W"], KroneckerMatrix if layer.groups == 1 else ConvolutionWeight)
    dense_x, dense_W = L_x.to_dense(), L_theta["W"].to_dense()
    M, N, nW = y[0].size, x[0].size, layer.params["W"].size
    assert dense_x.shape == (B, M, N) and dense_W.shape == (B, M, nW)
    W_t = tt(layer.params["W"].value, grad=False)
    for b in range(B):
        J_x, J_W = torch.autograd.functional.jacobian(
            lambda xv, Wv: _torch_conv(xv[None], Wv, None, options, False)[0],
            (tt(x[b], grad=False), W_t),
        )
        close(dense_x[b], J_x.reshape(M, N), atol=0)
        close(dense_W[b], J_W.reshape(M, nW), atol=0)
        if "b" in L_theta:
            J_b = torch.autograd.functional.jacobian(
                lambda bv, b=b: _torch_conv(tt(x[b : b + 1], False), W_t, bv, options, False)[0],
                tt(layer.params["b"].value, grad=False),
            )
            close(L_theta["b"].to_dense()[b], J_b.reshape(M, c_out), atol=0)


@pytest.mark.parametrize("row", TRANSPOSED[1:4], ids=[r[0] for r in TRANSPOSED[1:4]])
def test_transposed_dense_jacobians_equal_torch(row: tuple[Any, ...]) -> None:
    _, c_in, c_out, k, options, hw = row
    rng = np.random.default_rng(3)
    layer = _make(True, c_in, c_out, k, options)
    x = rng.standard_normal((2, c_in, *hw))
    y = layer.forward(x)
    L_x, L_theta = layer.jacobians()
    assert isinstance(L_x, ConvolutionTranspose)
    M, N, nW = y[0].size, x[0].size, layer.params["W"].size
    W_t = tt(layer.params["W"].value, grad=False)
    for b in range(2):
        J_x, J_W = torch.autograd.functional.jacobian(
            lambda xv, Wv: _torch_conv(xv[None], Wv, None, options, True)[0],
            (tt(x[b], grad=False), W_t),
        )
        close(L_x.to_dense()[b], J_x.reshape(M, N), atol=0)
        close(L_theta["W"].to_dense()[b], J_W.reshape(M, nW), atol=0)


# -- the structural nonzeros of the Toeplitz matrix ---------------------------------------


def _count_taps(c_in: int, c_out: int, groups: int, k: Any, options: dict[str, Any],
                hw: tuple[int, int]) -> int:  # fmt: skip
    """Loop over output positions and kernel taps: those that land inside the input."""
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    (kh, kw), (sh, sw) = pair(k), pair(options.get("stride", 1))
    (ph, pw), (dh, dw) = pair(options.get("padding", 0)), pair(options.get("dilation", 1))
    H, W = hw
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    inside = sum(
        0 <= i * sh - ph + ky * dh < H and 0 <= j * sw - pw + kx * dw < W
        for i, j, ky, kx in itertools.product(range(Ho), range(Wo), range(kh), range(kw))
    )
    return c_out * (c_in // groups) * inside


@pytest.mark.parametrize("row", CONV, ids=[r[0] for r in CONV])
def test_toeplitz_nonzeros_are_exactly_the_taps_inside_the_input(row: tuple[Any, ...]) -> None:
    _, c_in, c_out, k, options, hw = row
    layer = _make(False, c_in, c_out, k, options)
    x = np.random.default_rng(4).standard_normal((1, c_in, *hw))
    layer.forward(x)
    L_x, _ = layer.jacobians()
    expected = _count_taps(c_in, c_out, options.get("groups", 1), k, options, hw)
    S = L_x.to_sparse(0)
    assert L_x.nnz == expected
    assert S.nnz == expected  # no zero of the padding stored
    assert np.count_nonzero(S.data) == expected  # W has no zero entry
    # ... and they are where torch's dense Jacobian is nonzero.
    J = torch.autograd.functional.jacobian(
        lambda xv: _torch_conv(xv, tt(layer.params["W"].value, False), None, options, False),
        tt(x, grad=False),
    ).reshape(L_x.shape)
    assert np.count_nonzero(J.numpy()) == expected
    np.testing.assert_array_equal(S.toarray() != 0, J.numpy() != 0)
    assert L_x.to_sparse(0).has_canonical_format


def test_transposed_nonzeros_are_the_convolutions() -> None:
    layer = bp.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, rng=0)
    layer.forward(np.random.default_rng(0).standard_normal((1, 2, 3, 4)))
    L_x, _ = layer.jacobians()
    # Its adjoint: Conv2d(3 → 2, 3, stride 2, padding 1) on the 6×8 output.
    expected = _count_taps(3, 2, 1, 3, {"stride": 2, "padding": 1}, (6, 8))
    assert L_x.nnz == L_x.to_sparse(0).nnz == expected


def test_reprs_say_what_they_are() -> None:
    conv = bp.Conv2d(1, 16, 3, padding=1, rng=0)
    conv.forward(np.zeros((4, 1, 8, 4)))
    L_x, L_theta = conv.jacobians()
    assert repr(L_x) == (
        "Convolution 512×32: W 16×1×3×3, stride 1, padding 1 (doubly-block Toeplitz) "
        "(batch of 4, shared by the batch)"
    )
    assert repr(L_theta["W"]).startswith("KroneckerMatrix 512×144: I ⊗ X_colᵀ (rows channels")
    assert repr(L_theta["b"]).startswith("Sparse 512×16: I ⊗ 1_P")
    assert repr(conv) == "Conv2d(1→16, kernel 3, padding 1)"
    t = bp.ConvTranspose2d(4, 2, (3, 2), stride=2, output_padding=1, groups=2, bias=False, rng=0)
    assert repr(t) == (
        "ConvTranspose2d(4→2, kernel 3×2, stride 2, output_padding 1, groups 2, bias=False)"
    )
    t.forward(np.zeros((1, 4, 3, 3)))  # to (1, 2, 8, 7): (3 - 1)·2 + 3 + 1 rows
    L_x, L_theta = t.jacobians()
    assert repr(L_x).startswith(
        "ConvolutionTranspose 112×36: W 4×1×3×2, stride 2, padding 0, groups 2, output_padding 1 "
        "(transpose of a doubly-block Toeplitz)"
    )
    assert repr(L_theta["W"]).startswith("ConvolutionWeight 112×24: convᵀ(x_b; ·)")


def test_sums_of_convolutions_stay_convolutions() -> None:
    layer = bp.Conv2d(2, 3, 3, stride=2, padding=1, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    layer.forward(x)
    A, _ = layer.jacobians()
    Wb = np.random.default_rng(1).standard_normal(A.W.shape)
    Bj = Convolution(Wb, A.geo, 2)
    S = A + Bj
    assert type(S) is Convolution
    np.testing.assert_allclose(S.to_dense(), A.to_dense() + Bj.to_dense(), rtol=1e-14)
    T = ConvolutionTranspose(A) + ConvolutionTranspose(Bj)
    assert type(T) is ConvolutionTranspose
    np.testing.assert_allclose(T.to_dense(), S.to_dense().transpose(0, 2, 1), rtol=1e-14)


# -- gradcheck: a small CNN passes, a big input is checked along directions, a wrong
#    backward fails -------------------------------------------------------------------------


def test_gradcheck_small_cnn() -> None:
    rng = np.random.default_rng(6)
    net = bp.Sequential(
        [
            bp.Conv2d(1, 3, 3, padding=1, rng=rng),
            bp.ReLU(),
            bp.Conv2d(3, 2, 3, stride=2, rng=rng),
            bp.Flatten(),
            bp.Linear(2 * 2 * 2, 4, rng=rng),
            bp.SoftmaxCrossEntropy(),
        ]
    )
    x = rng.standard_normal((3, 1, 6, 5))
    labels = np.array([0, 3, 1])
    report = bp.gradcheck(net, x, labels)
    assert report.mode == "entries" and report.checks and report.worst < 1e-5
    assert any("0.W" in what for what in report.checks)


def test_gradcheck_big_input_goes_along_directions() -> None:
    rng = np.random.default_rng(7)
    layer = bp.Conv2d(3, 8, 3, stride=2, padding=1, groups=1, rng=rng)
    x = rng.standard_normal((4, 3, 24, 20))  # 5,760 input entries: too many to difference
    report = bp.gradcheck(layer, x)
    assert report.mode == "directions" and report.checks and report.worst < 1e-5
    t = bp.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, rng=rng)
    report = bp.gradcheck(t, rng.standard_normal((2, 4, 16, 16)))
    assert report.mode == "directions" and report.checks and report.worst < 1e-5


class SlightlyOffConv2d(bp.Conv2d):
    """A convolution whose fast backward scales ``g_in`` by 1.001: a bug to catch."""

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return (None if g_in is None else g_in * 1.001), grads


@pytest.mark.parametrize("mode", ["entries", "directions"])
def test_a_wrong_conv_backward_fails_gradcheck(mode: str) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 2, 5, 6))
    bp.gradcheck(bp.Conv2d(2, 3, 3, padding=1, rng=0), x, mode=mode)  # the right one passes
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(SlightlyOffConv2d(2, 3, 3, padding=1, rng=0), x, mode=mode)


# -- dtypes and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [bp.Conv2d, bp.ConvTranspose2d])
def test_float32_stays_float32_through_every_product(cls: type) -> None:
    layer = cls(2, 4, 3, stride=2, padding=1, groups=2, dtype=np.float32, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 4)).astype(np.float32)
    y = layer.forward(x)
    g = np.ones_like(y)
    g_in, grads = layer.backward(g)
    assert y.dtype == g_in.dtype == grads["W"].dtype == grads["b"].dtype == np.float32
    L_x, L_theta = layer.jacobians()
    rows = g.reshape(2, -1)
    for L in (L_x, *L_theta.values()):
        assert L.vjp(rows).dtype == np.float32, L
        assert L.vjp_sum(rows).dtype == np.float32, L
        assert L.jvp(np.ones((2, L.shape[1]), np.float32)).dtype == np.float32, L
        assert L.to_sparse(0).dtype == np.float32, L
    with pytest.raises(TypeError, match="float32"):
        layer.forward(x.astype(np.float64))


BAD_ARGUMENTS = [
    (lambda: bp.Conv2d(3, 4, 3, groups=2), ValueError, r"Conv2d: c_in \(3\) .* groups \(2\)"),
    (lambda: bp.Conv2d(4, 3, 3, groups=2), ValueError, r"c_out \(3\) .* divisible"),
    (lambda: bp.Conv2d(0, 4, 3), ValueError, "Conv2d: c_in must be a positive integer"),
    (lambda: bp.Conv2d(2, 4, 0), ValueError, "Conv2d: kernel_size must be positive"),
    (lambda: bp.Conv2d(2, 4, 3, stride=(1, 0)), ValueError, "stride must be positive"),
    (lambda: bp.Conv2d(2, 4, 3, padding=-1), ValueError, "padding must be non-negative"),
    (lambda: bp.Conv2d(2, 4, 3, dilation=0), ValueError, "dilation must be positive"),
    (lambda: bp.Conv2d(2, 4, (3, 3, 3)), TypeError, "kernel_size must be an int or a pair"),
    (lambda: bp.Conv2d(2, 4, 2.5), TypeError, "kernel_size must be an int or a pair"),
    (lambda: bp.Conv2d(2, 4, 3, W=np.zeros((4, 2, 3, 2))), ValueError, r"expected shape \(4, 2"),
    (lambda: bp.Conv2d(2, 4, 3, bias=False, b=np.zeros(4)), ValueError, "bias=False"),
    (lambda: bp.Conv2d(2, 4, 3, dtype=np.int64), TypeError, "float32 or float64"),
    (
        lambda: bp.ConvTranspose2d(2, 4, 3, stride=2, output_padding=2),
        ValueError,
        "ConvTranspose2d: output_padding 2 must be smaller than the stride",
    ),
    (lambda: bp.ConvTranspose2d(3, 4, 3, groups=2), ValueError, "divisible by groups"),
    (
        lambda: bp.ConvTranspose2d(2, 4, 3, W=np.zeros((4, 2, 3, 3))),
        ValueError,
        r"expected shape \(2, 4, 3, 3\)",
    ),
]


@pytest.mark.parametrize("make, error, match", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_clearly(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs_are_refused_and_change_nothing() -> None:
    conv = bp.Conv2d(2, 4, 3, padding=1, dilation=2, rng=0)
    good = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    conv.forward(good)
    before = conv.backward(np.ones((1, 4, 3, 3)))
    for bad, match in (
        (np.zeros((1, 3, 5, 5)), r"Conv2d\(2→4, .*\): x_in has shape \(1, 3, 5, 5\), expected "
                                  r"\(B, 2, H, W\)"),
        (np.zeros((2, 5, 5)), r"add a batch axis"),
        (np.zeros((1, 2, 5)), r"expected \(B, 2, H, W\)"),
        (np.zeros((1, 2, 2, 5)), r"padded size 4×7 is smaller than the \(dilated\) kernel 5×5"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            conv.forward(bad)
    after = conv.backward(np.ones((1, 4, 3, 3)))
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1]["W"], after[1]["W"])
    t = bp.ConvTranspose2d(2, 3, 2, padding=3, rng=0)
    with pytest.raises(ValueError, match=r"ConvTranspose2d.*empty output"):
        t.forward(np.zeros((1, 2, 2, 2)))


def test_models_of_convolutions_agree_in_the_fast_and_explicit_modes() -> None:
    rng = np.random.default_rng(9)
    net = bp.Sequential(
        [
            bp.Conv2d(2, 4, 3, stride=2, padding=1, rng=rng),
            bp.Tanh(),
            bp.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2, rng=rng),
        ]
    )
    x = rng.standard_normal((3, 2, 6, 4))
    y = net.forward(x)
    assert y.shape == x.shape
    g = rng.standard_normal(y.shape)
    fast, explicit = net.backward(g, mode="fast"), net.backward(g, mode="explicit")
    np.testing.assert_allclose(explicit.inputs["x"], fast.inputs["x"], rtol=1e-10, atol=1e-13)
    for p in net.parameters():
        np.testing.assert_allclose(explicit.params[p], fast.params[p], rtol=1e-10, atol=1e-13)
