"""Pooling and upsampling against PyTorch float64, their Jacobians, ties and errors.

The battery (``tests/test_layers.py``) runs the three-way check on every layer here;
this file holds what is particular to them: every option against torch (outputs and
input gradients at rtol 1e-10), the tie rule (one input takes the whole gradient, the
one torch picks) on inputs full of deliberate ties, NaN and all -inf windows, the
per-example Jacobians against ``torch.autograd.functional.jacobian``, the
``IndexSelection`` rules, a wrong backward caught by ``gradcheck``, and the errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_layers import apart

import backprop as bp
from backprop.jacobian import Dense, Diagonal, IndexSelection, Product, Sparse
from backprop.layer import OperatingPoint

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
F = torch.nn.functional


def tt(a: Any, grad: bool = True) -> Any:
    return torch.tensor(np.array(a, dtype=np.float64, copy=True), requires_grad=grad)


def torch_nearest(scale: Any) -> Callable[[Any], Any]:
    return torch.nn.Upsample(scale_factor=scale, mode="nearest")


# (id, library layer, the same function in torch, input shape (B, C, H, W))
OPTIONS: list[tuple[str, Callable[[], bp.Layer], Callable[[Any], Any], tuple[int, ...]]] = [
    ("max-k2", lambda: bp.MaxPool2d(2), lambda x: F.max_pool2d(x, 2), (3, 2, 7, 9)),
    (
        "max-k3-s2-p1",
        lambda: bp.MaxPool2d(3, stride=2, padding=1),
        lambda x: F.max_pool2d(x, 3, 2, 1),
        (3, 2, 7, 9),
    ),
    (
        "max-overlap-k3-s1",
        lambda: bp.MaxPool2d(3, 1),
        lambda x: F.max_pool2d(x, 3, 1),
        (2, 3, 6, 5),
    ),
    (
        "max-2x3-s(1,2)-p(1,0)",
        lambda: bp.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 0)),
        lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 0)),
        (2, 2, 7, 9),
    ),
    ("max-k2-s3", lambda: bp.MaxPool2d(2, 3), lambda x: F.max_pool2d(x, 2, 3), (2, 2, 8, 7)),
    (
        "max-k4-p2",
        lambda: bp.MaxPool2d(4, padding=2),
        lambda x: F.max_pool2d(x, 4, padding=2),
        (2, 2, 5, 6),
    ),
    ("avg-k2", lambda: bp.AvgPool2d(2), lambda x: F.avg_pool2d(x, 2), (3, 2, 7, 9)),
    (
        "avg-k3-s2-p1",
        lambda: bp.AvgPool2d(3, stride=2, padding=1),
        lambda x: F.avg_pool2d(x, 3, 2, 1),
        (3, 2, 7, 9),
    ),
    (
        "avg-overlap-k3-s1",
        lambda: bp.AvgPool2d(3, 1),
        lambda x: F.avg_pool2d(x, 3, 1),
        (2, 3, 6, 5),
    ),
    (
        "avg-2x3-s(1,2)-p1",
        lambda: bp.AvgPool2d((2, 3), stride=(1, 2), padding=1),
        lambda x: F.avg_pool2d(x, (2, 3), (1, 2), 1),
        (2, 2, 7, 9),
    ),
    ("avg-k2-s3", lambda: bp.AvgPool2d(2, 3), lambda x: F.avg_pool2d(x, 2, 3), (2, 2, 8, 7)),
    (
        "global-avg",
        bp.GlobalAvgPool,
        lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1),
        (3, 4, 5, 6),
    ),
    ("global-avg-1x1", bp.GlobalAvgPool, lambda x: x.mean((2, 3)), (2, 3, 1, 1)),
    (
        "global-max",
        bp.GlobalMaxPool,
        lambda x: F.adaptive_max_pool2d(x, 1).flatten(1),
        (3, 4, 5, 6),
    ),
    ("upsample-2", lambda: bp.Upsample(2), torch_nearest(2), (2, 3, 4, 5)),
    ("upsample-(2,3)", lambda: bp.Upsample((2, 3)), torch_nearest((2, 3)), (2, 2, 3, 4)),
    ("upsample-(1,3)", lambda: bp.Upsample((1, 3)), torch_nearest((1, 3)), (2, 2, 3, 4)),
]
IDS = [row[0] for row in OPTIONS]
MAX_OPTIONS = [row for row in OPTIONS if "max" in row[0]]
IDS_MAX = [row[0] for row in MAX_OPTIONS]


def run_both(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any], x: np.ndarray, seed: int = 1
) -> tuple[Any, ...]:
    """The library's and torch's output and input gradient for one random g_out."""
    layer = make()
    out = layer.forward(x)
    g_out = np.random.default_rng(seed).standard_normal(out.shape)
    g_in, grads = layer.backward(g_out)
    assert grads == {}
    x_t = tt(x)
    out_t = torch_fn(x_t)
    out_t.backward(torch.tensor(g_out))
    return layer, out, g_in, out_t.detach().numpy(), x_t.grad.numpy()


@pytest.mark.parametrize("make, torch_fn, shape", [row[1:] for row in OPTIONS], ids=IDS)
def test_every_option_matches_torch(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any], shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(0).standard_normal(shape)
    layer, out, g_in, out_t, g_t = run_both(make, torch_fn, x)
    assert out.shape == out_t.shape
    np.testing.assert_allclose(out, out_t, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g_in, g_t, rtol=1e-10, atol=1e-13)
    # the explicit path (g_out times the Jacobian object) gives the same gradient
    L_x, _ = layer.jacobians()
    g_out = np.random.default_rng(1).standard_normal(out.shape)
    explicit = L_x.vjp(g_out.reshape(shape[0], -1)).reshape(shape)
    np.testing.assert_allclose(explicit, g_t, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("make, torch_fn, shape", [row[1:] for row in MAX_OPTIONS], ids=IDS_MAX)
def test_ties_send_the_whole_gradient_where_torch_does(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any], shape: tuple[int, ...]
) -> None:
    # Entries drawn from {0, 1, 2}: almost every window holds its max several times.
    x = np.random.default_rng(2).integers(0, 3, size=shape).astype(np.float64)
    layer, out, g_in, out_t, g_t = run_both(make, torch_fn, x)
    np.testing.assert_array_equal(out, out_t)
    np.testing.assert_array_equal(g_in, g_t)
    # Each window's gradient went to one input, not shared among its tied entries: with
    # g_out all ones, g_in counts windows (integers), one per output entry.
    layer.forward(x)
    counts, _ = layer.backward(np.ones_like(out))
    assert np.all(counts == np.round(counts)) and counts.sum() == out.size
    # The ties were there: windows (read by torch) whose max appears more than once.
    if isinstance(layer, bp.MaxPool2d):
        k, s, (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    else:
        k, s, (ph, pw) = shape[2:], shape[2:], (0, 0)
    padded = F.pad(torch.tensor(x), (pw, pw, ph, ph), value=-float("inf"))
    windows = F.unfold(padded.reshape(-1, 1, *padded.shape[2:]), k, stride=s)
    tied = (windows == windows.max(dim=1, keepdim=True).values).sum(dim=1) > 1
    assert tied.sum() > out.size // 4, "the draw holds too few ties"
    # and the Jacobian holds the same choice
    L_x, _ = layer.jacobians()
    np.testing.assert_array_equal(
        L_x.vjp(np.ones((shape[0], L_x.shape[0]))), counts.reshape(shape[0], -1)
    )


def test_tie_rule_is_first_in_row_major_order() -> None:
    # A 2×2 window of four equal values: torch and the library pick the top-left one;
    # with the top-left smaller, the top-right; then the bottom-left.
    cases = [
        ([[1.0, 1.0], [1.0, 1.0]], 0),
        ([[0.0, 1.0], [1.0, 1.0]], 1),
        ([[0.0, 0.0], [1.0, 1.0]], 2),
    ]
    for window, expected in cases:
        x = np.array(window).reshape(1, 1, 2, 2)
        layer = bp.MaxPool2d(2)
        layer.forward(x)
        g_in, _ = layer.backward(np.ones((1, 1, 1, 1)))
        assert np.flatnonzero(g_in).tolist() == [expected]
        _, index = F.max_pool2d(tt(x, grad=False), 2, return_indices=True)
        assert index.item() == expected


@pytest.mark.parametrize(
    "make, torch_fn",
    [
        (lambda: bp.MaxPool2d(3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1)),
        (lambda: bp.MaxPool2d(2, 1), lambda x: F.max_pool2d(x, 2, 1)),
        (bp.GlobalMaxPool, lambda x: F.adaptive_max_pool2d(x, 1).flatten(1)),
    ],
    ids=["k3-s2-p1", "overlap-k2-s1", "global"],
)
def test_nan_and_all_minus_inf_windows_as_torch(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any]
) -> None:
    # Channel 0: two NaNs (torch's kernel keeps the last one of a window); channel 1:
    # nothing but -inf (with padding, torch keeps the window's first entry inside the
    # input); channel 2: -inf and a tie of finite values.
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 5))
    x[:, 0, 1, 1] = x[:, 0, 2, 2] = np.nan
    x[:, 1] = -np.inf
    x[:, 2, :2] = -np.inf
    x[:, 2, 3, 1] = x[:, 2, 3, 3] = 9.0
    with np.errstate(invalid="ignore"):
        layer, out, g_in, out_t, g_t = run_both(make, torch_fn, x)
    np.testing.assert_array_equal(out, out_t)  # NaN where torch has NaN, -inf where -inf
    np.testing.assert_array_equal(g_in, g_t)
    assert np.isnan(out).any() and np.isneginf(out).any()


def _torch_jacobians(torch_fn: Callable[[Any], Any], x: np.ndarray) -> list[np.ndarray]:
    """Per example, torch's Jacobian of the flattened output by the flattened input."""
    out = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: torch_fn(v[None])[0], tt(x[b], False))
        out.append(J.reshape(-1, x[b].size).numpy())
    return out


@pytest.mark.parametrize("make, torch_fn, shape", [row[1:] for row in OPTIONS], ids=IDS)
def test_jacobian_per_example_matches_torch(
    make: Callable[[], bp.Layer], torch_fn: Callable[[Any], Any], shape: tuple[int, ...]
) -> None:
    x = apart(*shape[1:])(np.random.default_rng(4), shape[0], np.float64)[0]
    layer = make()
    layer.forward(x)
    L_x, theta = layer.jacobians()
    assert theta == {}
    kind = IndexSelection if "Max" in type(layer).__name__ else Sparse
    assert type(L_x) is kind
    dense = L_x.to_dense()
    for b, J in enumerate(_torch_jacobians(torch_fn, x)):
        np.testing.assert_array_equal(dense[b], J)
        np.testing.assert_array_equal(L_x.to_sparse(b).toarray(), J)
    # a 0-1 matrix with one 1 per row, or an average: what the structure says
    if "Avg" in type(layer).__name__:
        K = np.prod(getattr(layer, "kernel_size", shape[2:]))
        assert set(np.unique(dense)) <= {0.0, 1 / K}
    else:
        assert L_x.nnz == L_x.shape[0]
        assert np.all(dense.sum(axis=2) == 1) and set(np.unique(dense)) == {0.0, 1.0}


def test_max_pooling_jacobian_differs_per_example_and_prints_what_it_is() -> None:
    rng = np.random.default_rng(5)
    x = apart(1, 8, 8)(rng, 4, np.float64)[0]
    layer = bp.MaxPool2d(2)
    layer.forward(x)
    L_x, _ = layer.jacobians()
    assert repr(L_x) == "IndexSelection 16×64: argmax of 2×2 windows (batch of 4, per example)"
    assert not L_x.shared
    dense = L_x.to_dense()
    assert not np.array_equal(dense[0], dense[1])  # the argmax is the data's
    layer = bp.AvgPool2d(2)
    layer.forward(x)
    assert repr(layer.jacobians()[0]) == (
        "Sparse 16×64: mean of 2×2 windows (batch of 4, shared by the batch)"
    )
    up = bp.Upsample((2, 3))
    up.forward(x)
    assert repr(up.jacobians()[0]).startswith("Sparse 384×64: nearest, ×(2, 3)")


# -- the IndexSelection rules: a diagonal on either side, a selection of a selection ------


def _dense_ref(J: Any) -> np.ndarray:
    return np.stack([J.to_sparse(b).toarray() for b in range(J.batch)])


def test_index_selection_rules_keep_one_entry_per_row() -> None:
    rng = np.random.default_rng(6)
    B = 3
    P = IndexSelection(rng.integers(0, 6, size=(B, 4)), 6, label="P")  # 4×6, repeats allowed
    Q = IndexSelection(rng.integers(0, 4, size=(B, 5)), 4, label="Q")  # 5×4
    d_out, d_in = rng.standard_normal((B, 4)), rng.standard_normal((B, 6))
    P_ref, Q_ref = _dense_ref(P), _dense_ref(Q)
    cases = {
        "Diagonal@P": (
            Diagonal(d_out) @ P,
            np.matmul(np.stack([np.diag(d) for d in d_out]), P_ref),
        ),
        "P@Diagonal": (P @ Diagonal(d_in), np.matmul(P_ref, np.stack([np.diag(d) for d in d_in]))),
        "Q@P": (Q @ P, np.matmul(Q_ref, P_ref)),
    }
    cases["Q@(Diagonal@P)"] = (Q @ cases["Diagonal@P"][0], np.matmul(Q_ref, cases["Diagonal@P"][1]))
    for name, (C, expected) in cases.items():
        assert type(C) is IndexSelection, name
        np.testing.assert_allclose(C.to_dense(), expected, rtol=1e-15, err_msg=name)
        g = rng.standard_normal((B, C.shape[0]))
        np.testing.assert_allclose(C.vjp(g), np.einsum("bm,bmn->bn", g, expected), rtol=1e-12)
        np.testing.assert_allclose(C.vjp_sum(g), np.einsum("bm,bmn->n", g, expected), rtol=1e-12)
    assert repr(cases["Diagonal@P"][0]).startswith("IndexSelection 4×6: d · P, scaled")
    # no rule for a dense matrix: the generic product
    assert type(Dense(rng.standard_normal((2, 4)), batch=B) @ P) is Product


def test_relu_then_max_pooling_chains_to_one_selection() -> None:
    # In a CNN, max pooling follows a ReLU: the chained Jacobian stays one pick per row.
    rng = np.random.default_rng(7)
    x = apart(2, 4, 4)(rng, 2, np.float64)[0]
    relu, pool = bp.ReLU(), bp.MaxPool2d(2)
    pool.forward(relu.forward(x))
    chained = pool.jacobians()[0] @ relu.jacobians()[0]
    assert type(chained) is IndexSelection
    expected = np.matmul(pool.jacobians()[0].to_dense(), relu.jacobians()[0].to_dense())
    np.testing.assert_array_equal(chained.to_dense(), expected)


def test_index_selection_refuses_bad_indices() -> None:
    with pytest.raises(ValueError, match=r"outside the 4 columns 0\.\.3"):
        IndexSelection(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"shape \(B, M\)"):
        IndexSelection(np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="one value per picked entry"):
        IndexSelection(np.array([[0, 1]]), 4, values=np.ones((1, 3)))


# -- a wrong backward is caught ----------------------------------------------------------


class MaxPoolOff(bp.MaxPool2d):
    """g_in 0.1 % too large."""

    def _backward(self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


class AvgPoolOff(bp.AvgPool2d):
    """g_in 0.1 % too large."""

    def _backward(self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


@pytest.mark.parametrize("mode", ["entries", "directions"])
@pytest.mark.parametrize(
    "good, bad", [(bp.MaxPool2d, MaxPoolOff), (bp.AvgPool2d, AvgPoolOff)], ids=["max", "avg"]
)
def test_a_wrong_backward_fails_gradcheck(good: Any, bad: Any, mode: str) -> None:
    x = apart(2, 7, 9)(np.random.default_rng(8), 2, np.float64)[0]
    assert bp.gradcheck(good(3, 2, 1), x, mode=mode).checks  # the right one passes
    with pytest.raises(bp.GradcheckError):
        bp.gradcheck(bad(3, 2, 1), x, mode=mode)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: bp.MaxPool2d(3, padding=2), ValueError, r"MaxPool2d: padding 2 is more than half"),
        (lambda: bp.AvgPool2d((2, 4), padding=(2, 1)), ValueError, r"padding \(2, 1\).*\(2, 4\)"),
        (lambda: bp.MaxPool2d(0), ValueError, "kernel_size must be positive, got 0"),
        (lambda: bp.AvgPool2d(2, stride=(1, 0)), ValueError, r"stride must be positive"),
        (lambda: bp.MaxPool2d(2, padding=-1), ValueError, "padding must be non-negative"),
        (lambda: bp.MaxPool2d(2.5), TypeError, "MaxPool2d: kernel_size must be an int or a pair"),
        (lambda: bp.MaxPool2d((2, 2, 2)), TypeError, "kernel_size must be an int or a pair"),
        (lambda: bp.AvgPool2d(True), TypeError, "kernel_size must be an int"),
        (lambda: bp.Upsample(0), ValueError, "Upsample: scale must be positive"),
        (lambda: bp.Upsample(1.5), TypeError, "Upsample: scale must be an int or a pair"),
    ],
)
def test_bad_settings_are_refused(build: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "layer",
    [bp.MaxPool2d(2), bp.AvgPool2d(2), bp.GlobalAvgPool(), bp.GlobalMaxPool(), bp.Upsample(2)],
    ids=lambda layer: repr(layer),
)
def test_wrong_rank_names_the_layer_and_shape(layer: bp.Layer) -> None:
    good = np.random.default_rng(9).standard_normal((2, 1, 4, 4))
    layer.forward(good)
    before = layer.backward(np.ones_like(layer.forward(good)))[0].copy()
    with pytest.raises(ValueError, match=r"x_in has shape \(2, 4, 4\).*\(B, C, H, W\)") as info:
        layer.forward(good[:, 0])
    assert repr(layer) in str(info.value) and "add a channel axis" in str(info.value)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        layer.forward(np.zeros((3, 2)))
    # the failed calls changed nothing: the cached operating point is the good one
    np.testing.assert_array_equal(
        layer.backward(np.ones_like(layer.operating_point().x_out))[0], before
    )


def test_window_larger_than_the_padded_input() -> None:
    x = np.zeros((2, 3, 2, 5))
    with pytest.raises(
        ValueError, match=r"the 3×3 window does not fit in x_in of shape \(2, 3, 2, 5\)"
    ):
        bp.MaxPool2d(3).forward(x)
    with pytest.raises(ValueError, match=r"2×5 per channel, 4×7 padded"):
        bp.AvgPool2d(5, padding=1).forward(x)
    assert bp.MaxPool2d(3, padding=1).forward(x).shape == (2, 3, 1, 2)  # fits once padded
    with pytest.raises(TypeError, match="integer dtype"):
        bp.MaxPool2d(2).forward(np.zeros((1, 1, 2, 2), dtype=int))


def test_reprs_read_like_torch() -> None:
    assert repr(bp.MaxPool2d(2)) == "MaxPool2d(kernel_size=2, stride=2, padding=0)"
    assert repr(bp.AvgPool2d((2, 3), (1, 2), 1)) == (
        "AvgPool2d(kernel_size=(2, 3), stride=(1, 2), padding=1)"
    )
    assert repr(bp.Upsample((2, 2))) == "Upsample(scale=2)"
    assert repr(bp.GlobalMaxPool()) == "GlobalMaxPool()"


def test_float32_stays_float32_in_every_product() -> None:
    x = apart(2, 5, 6)(np.random.default_rng(10), 2, np.float32)[0]
    for layer in (bp.MaxPool2d(3, 2, 1), bp.AvgPool2d(3, 2, 1), bp.GlobalMaxPool(), bp.Upsample(2)):
        out = layer.forward(x)
        g_in, _ = layer.backward(np.ones_like(out))
        L_x, _ = layer.jacobians()
        g = np.ones((2, L_x.shape[0]), dtype=np.float32)
        u = np.ones((2, L_x.shape[1]), dtype=np.float32)
        assert out.dtype == g_in.dtype == np.float32, layer
        assert L_x.vjp(g).dtype == L_x.jvp(u).dtype == L_x.to_dense().dtype == np.float32, layer
