"""Tensors of any shape against PyTorch in float64: the oracle for shapes and layouts.

``SoftmaxCrossEntropy`` on ``(B, C, d1, ...)`` logits is ``torch.nn.functional.cross_entropy``,
``Merge(axis=k)`` is ``torch.cat(dim=k)``, ``Transpose(axes)`` is ``torch.permute`` with the
batch axis kept first, and ``Reshape``/``Flatten`` are ``torch.reshape``/``torch.flatten``.
Each compares the outputs and the input gradients for a random seed ``g_out`` (the loss at
rtol 1e-10). Then the errors: each names the layer and the shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import Selection, Sparse

torch = pytest.importorskip("torch")

RTOL = 1e-10


def torch_grads(f: Any, xs: list[np.ndarray], g_out: np.ndarray | None = None) -> Any:
    """``f(*xs)`` in torch float64 and the gradients of ``<f(*xs), g_out>`` (or of ``f``)."""
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    out = f(*ts)
    seed = None if g_out is None else torch.tensor(g_out)
    out.backward(seed)
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


# -- SoftmaxCrossEntropy, the class axis 1 ------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(7, 5), (3, 5, 7), (3, 4, 2, 5), (1, 3, 1)], ids=["BC", "BCd", "BCd1d2", "B1C3d1"]
)
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_softmax_cross_entropy_matches_torch(shape: tuple[int, ...], scale: float) -> None:
    rng = np.random.default_rng(sum(shape))
    z = scale * rng.standard_normal(shape)
    y = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    loss = bp.SoftmaxCrossEntropy()
    J = loss.forward(z, y)
    (g_z, g_y), grads = loss.backward()
    J_ref, (g_ref,) = torch_grads(
        lambda t: torch.nn.functional.cross_entropy(t, torch.tensor(y)), [z]
    )
    np.testing.assert_allclose(J, J_ref, rtol=RTOL)
    np.testing.assert_allclose(g_z, g_ref, rtol=RTOL, atol=1e-15)
    assert g_y is None and grads == {}
    assert g_z.shape == z.shape
    # Per example L^z is one row over the example's C·d1·... logits, carrying the 1/(B·D).
    L_z, _ = loss.jacobians()[0]
    assert L_z.shape == (1, int(np.prod(shape[1:])))
    np.testing.assert_allclose(L_z.to_dense()[:, 0, :], g_ref.reshape(shape[0], -1), rtol=RTOL)


def test_softmax_cross_entropy_is_finite_for_huge_logits_of_any_shape() -> None:
    z = np.array([[[1e300, -1e300], [0.0, 0.0], [-1e300, 1e300]]])  # (B, C, d) = (1, 3, 2)
    y = np.array([[0, 2]])
    loss = bp.SoftmaxCrossEntropy()
    assert loss.forward(z, y) == 0.0  # both positions pick their (huge) maximum
    g = loss.backward()[0][0]
    assert np.all(np.isfinite(g)) and np.all(g == 0.0)


# -- Merge along an axis -------------------------------------------------------------------


MERGES = [
    # (axis, per-example shapes of the inputs)
    (1, [(2, 3, 5), (1, 3, 5)]),  # channels of (B, C, H, W): a U-Net skip
    (-3, [(2, 3, 5), (3, 3, 5)]),  # the same axis, counted from the end
    (2, [(2, 3, 5), (2, 1, 5), (2, 2, 5)]),  # rows of the images
    (-1, [(3, 2), (3, 5)]),  # features of (B, T, d)
    (1, [(3,), (5,)]),  # plain vectors: the same as Merge()
]


@pytest.mark.parametrize(("axis", "shapes"), MERGES)
def test_merge_along_an_axis_matches_torch_cat(axis: int, shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(len(shapes) + abs(axis))
    B = 3
    xs = [rng.standard_normal((B, *s)) for s in shapes]
    merge = bp.Merge(axis=axis)
    out = merge.forward(*xs)
    g_out = rng.standard_normal(out.shape)
    g_in, grads = merge.backward(g_out)
    out_ref, g_ref = torch_grads(lambda *ts: torch.cat(ts, dim=axis), xs, g_out)
    np.testing.assert_array_equal(out, out_ref)
    assert grads == {}
    for g, r in zip(g_in, g_ref, strict=True):
        np.testing.assert_array_equal(g, r)
        assert not g.flags.writeable
    # The explicit Jacobians give the same g_in: a 0-1 selection per input.
    for L, r in zip(merge.jacobians()[0], g_ref, strict=True):
        np.testing.assert_array_equal(L.vjp(g_out.reshape(B, -1)), r.reshape(B, -1))
        assert L.nnz == r[0].size


def test_merge_jacobian_is_a_selection_when_the_block_is_contiguous() -> None:
    x_a, x_b = np.ones((2, 2, 3, 5)), np.ones((2, 1, 3, 5))
    merge = bp.Merge(axis=1)
    merge.forward(x_a, x_b)
    L_a, L_b = merge.jacobians()[0]
    assert isinstance(L_a, Selection) and isinstance(L_b, Selection)
    assert (L_a.offset, L_b.offset) == (0, 30)  # input b starts after a's 2·3·5 entries
    merge = bp.Merge(axis=-1)
    merge.forward(np.ones((2, 3, 2)), np.ones((2, 3, 5)))
    L_a, L_b = merge.jacobians()[0]
    assert isinstance(L_a, Sparse) and L_a.shape == (21, 6)
    # Row t of the output holds a's 2 features then b's 5: a's entries sit at 7t, 7t+1.
    assert L_a.to_sparse().nonzero()[0].tolist() == [0, 1, 7, 8, 14, 15]
    assert repr(merge) == "Merge(2, axis=-1)"
    assert repr(bp.Merge()) == "Merge(2)"


# -- Transpose, Reshape, Flatten -----------------------------------------------------------


@pytest.mark.parametrize(
    ("axes", "shape"),
    [((1, 0), (3, 5)), ((2, 0, 1), (3, 1, 5)), ((0, 2, 1), (2, 3, 5)), ((0,), (5,))],
)
def test_transpose_matches_torch_permute(axes: tuple[int, ...], shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal((3, *shape))
    layer = bp.Transpose(axes)
    out = layer.forward(x)
    g_out = rng.standard_normal(out.shape)
    g_in, grads = layer.backward(g_out)
    dims = (0, *(a + 1 for a in axes))
    out_ref, (g_ref,) = torch_grads(lambda t: torch.permute(t, dims), [x], g_out)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(g_in, g_ref)
    assert grads == {} and not g_in.flags.writeable
    L_x, _ = layer.jacobians()
    assert isinstance(L_x, Sparse) and L_x.nnz == x[0].size  # a permutation matrix
    np.testing.assert_array_equal(L_x.vjp(g_out.reshape(3, -1)), g_ref.reshape(3, -1))
    np.testing.assert_array_equal(L_x.jvp(x.reshape(3, -1)), out_ref.reshape(3, -1))


def test_transpose_of_a_sequence_swaps_time_and_features() -> None:
    x = np.arange(6.0).reshape(1, 2, 3)  # (B, T, d) = (1, 2, 3)
    out = bp.Transpose((1, 0)).forward(x)
    assert out.tolist() == [[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]]
    assert repr(bp.Transpose(1, 0)) == "Transpose((1, 0))"


@pytest.mark.parametrize(
    ("layer", "shape", "torch_f"),
    [
        (bp.Reshape(5, 3), (3, 5), lambda t: torch.reshape(t, (t.shape[0], 5, 3))),
        (bp.Reshape(-1, 5), (3, 1, 5), lambda t: torch.reshape(t, (t.shape[0], -1, 5))),
        (bp.Flatten(), (2, 3, 5), lambda t: torch.flatten(t, start_dim=1)),
    ],
    ids=["Reshape", "Reshape-1", "Flatten"],
)
def test_reshape_and_flatten_match_torch(layer: Any, shape: tuple[int, ...], torch_f: Any) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, *shape))
    out = layer.forward(x)
    g_out = rng.standard_normal(out.shape)
    g_in, _ = layer.backward(g_out)
    out_ref, (g_ref,) = torch_grads(torch_f, [x], g_out)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(g_in, g_ref)


# -- errors name the layer and the shapes --------------------------------------------------


def test_softmax_labels_of_the_wrong_shape_are_refused() -> None:
    loss = bp.SoftmaxCrossEntropy()
    with pytest.raises(ValueError) as info:
        loss.forward(np.zeros((2, 3, 5)), np.zeros((2, 3), dtype=int))
    msg = str(info.value)
    assert "SoftmaxCrossEntropy" in msg and "(2, 3)" in msg and "(2, 5)" in msg
    assert "(2, 3, 5)" in msg
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: labels have shape \(2, 4\)"):
        loss.forward(np.zeros((2, 3, 4, 1)), np.zeros((2, 4), dtype=int))


def test_softmax_labels_out_of_range_show_the_first_bad_values() -> None:
    loss = bp.SoftmaxCrossEntropy()
    y = np.array([[0, 7, 2, -1, 1], [9, 3, 4, 5, 6]])  # 3 classes: 7, -1, 9, 3, 4, 5 are bad
    with pytest.raises(ValueError) as info:
        loss.forward(np.zeros((2, 3, 5)), y)
    msg = str(info.value)
    assert "SoftmaxCrossEntropy" in msg and "0..2" in msg and "(2, 3, 5)" in msg
    assert "[7, -1, 9, 3, 4]" in msg  # the first five, in order


def test_merge_refuses_inputs_that_disagree_off_the_axis() -> None:
    merge = bp.Merge(axis=1)
    with pytest.raises(ValueError) as info:
        merge.forward(np.zeros((2, 3, 4, 5)), np.zeros((2, 1, 4, 6)))
    msg = str(info.value)
    assert "Merge(2, axis=1)" in msg and "(2, 3, 4, 5)" in msg and "(2, 1, 4, 6)" in msg
    with pytest.raises(ValueError, match=r"Merge\(3, axis=1\).*\(2, 3\).*\(2, 3, 1\)"):
        merge.forward(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3, 1)))
    assert merge.inputs == ("x_in[0]", "x_in[1]")  # the failed call changed nothing
    with pytest.raises(ValueError, match=r"Merge\(2, axis=-3\).*axis -3.*\(2, 3\), \(2, 4\)"):
        bp.Merge(axis=-3).forward(np.zeros((2, 3)), np.zeros((2, 4)))  # -3 is not an axis


def test_merge_refuses_the_batch_axis() -> None:
    with pytest.raises(ValueError, match=r"Merge: axis=0 is the batch axis"):
        bp.Merge(axis=0)
    with pytest.raises(ValueError, match=r"Merge\(2, axis=-2\): axis -2 .*\(4, 3\)"):
        bp.Merge(axis=-2).forward(np.zeros((4, 3)), np.zeros((4, 3)))  # -2 is the batch here
    with pytest.raises(TypeError, match=r"Merge: axis must be an integer or None"):
        bp.Merge(axis=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("axes", [(1, 1), (0, 2), (1,), (), (-1, 0)])
def test_transpose_refuses_axes_that_are_not_a_permutation(axes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"Transpose: axes .* must be a permutation of 0..k-1"):
        bp.Transpose(axes)


def test_transpose_refuses_examples_of_another_rank() -> None:
    layer = bp.Transpose((1, 0))
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((2, 3, 4, 5)))
    msg = str(info.value)
    assert "Transpose((1, 0))" in msg and "(2, 3, 4, 5)" in msg and "3 axes" in msg
    with pytest.raises(TypeError, match=r"Transpose: axes must be integers"):
        bp.Transpose((1.0, 0))


# -- the pieces together, in a Graph ---------------------------------------------------------


def test_a_graph_of_any_shape_layers_matches_torch_and_its_backward_network() -> None:
    rng = np.random.default_rng(5)
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    a = g.add(bp.Transpose((1, 0)), x, name="T1")  # (B, 3, 5) -> (B, 5, 3)
    m = g.add(bp.Merge(axis=-1), a, g.add(bp.Tanh(), a, name="tanh"), name="cat")  # (B, 5, 6)
    t = g.add(bp.Transpose((1, 0)), m, name="T2")  # six classes at five positions
    g.output(g.add(bp.SoftmaxCrossEntropy(), t, y, name="J"))
    X, Y = rng.standard_normal((4, 3, 5)), rng.integers(0, 6, size=(4, 5))
    J = g.forward(x=X, y=Y)
    grads = g.backward()

    def reference(xt: Any) -> Any:
        at = torch.permute(xt, (0, 2, 1))
        logits = torch.permute(torch.cat([at, torch.tanh(at)], dim=-1), (0, 2, 1))
        return torch.nn.functional.cross_entropy(logits, torch.tensor(Y))

    J_ref, (g_ref,) = torch_grads(reference, [X])
    np.testing.assert_allclose(J, J_ref, rtol=RTOL)
    np.testing.assert_allclose(grads.inputs["x"], g_ref, rtol=RTOL, atol=1e-15)
    # The backward network (chapter 14.6.5) has sparse steps for the permutations.
    bg = bp.backward_graph(g)
    np.testing.assert_allclose(bg.forward(g_J=np.ones((4, 1))), g_ref, rtol=RTOL, atol=1e-15)
    # And the three ways agree: fast path, literal Algorithm 14.1, finite differences.
    report = bp.gradcheck(g, x=X, y=Y)
    assert report.checks and report.worst < 1e-6
