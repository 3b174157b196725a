"""Bad input gets a clear error naming the layer and the shapes, and changes nothing.

Every test that provokes an error then checks that the failed call left no trace:
the cached operating point still gives the old ``backward`` and ``jacobians``, and
no parameter moved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp


def snapshot(layer: Any, g: Any = None) -> tuple[Any, dict[str, np.ndarray], list[np.ndarray]]:
    """Copies of what backward and jacobians give now (to compare after an error)."""
    g_in, grads = layer.backward(g)
    L_x, L_theta = layer.jacobians()
    Ls = [L_x] if not isinstance(L_x, tuple) else [L for L in L_x if L is not None]
    Ls += list(L_theta.values())
    g_in = (
        tuple(None if x is None else x.copy() for x in g_in)
        if isinstance(g_in, tuple)
        else g_in.copy()
    )
    return g_in, {k: v.copy() for k, v in grads.items()}, [L.to_dense() for L in Ls]


def assert_snapshot_equal(a: Any, b: Any) -> None:
    g_a, grads_a, dense_a = a
    g_b, grads_b, dense_b = b
    if isinstance(g_a, tuple):
        for x, y in zip(g_a, g_b, strict=True):
            assert (x is None and y is None) or np.array_equal(x, y)
    else:
        np.testing.assert_array_equal(g_a, g_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        np.testing.assert_array_equal(grads_a[k], grads_b[k])
    for x, y in zip(dense_a, dense_b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def lin() -> bp.Linear:
    return bp.Linear(3, 2, rng=0)


X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
G = np.array([[1.0, -2.0], [0.5, 3.0]])


# -- before forward ----------------------------------------------------------------------


def test_backward_before_forward(lin: bp.Linear) -> None:
    with pytest.raises(RuntimeError, match=r"Linear\(3→2\).*backward\(\).*forward\(\) first"):
        lin.backward(G)


def test_jacobians_before_forward() -> None:
    with pytest.raises(RuntimeError, match=r"Tanh\(\).*jacobians\(\).*forward"):
        bp.Tanh().jacobians()


def test_sequential_backward_before_forward() -> None:
    net = bp.Sequential([bp.Linear(3, 2), bp.ReLU()])
    with pytest.raises(
        RuntimeError, match=r"Sequential.backward: no forward pass yet; call forward"
    ):
        net.backward(G)


# -- wrong shapes ------------------------------------------------------------------------


def test_linear_wrong_feature_size(lin: bp.Linear) -> None:
    with pytest.raises(ValueError) as info:
        lin.forward(np.ones((2, 4)))
    msg = str(info.value)
    assert "Linear(3→2)" in msg and "(2, 4)" in msg and "expected (B, 3)" in msg


def test_linear_one_dimensional_input_hints_batch_axis(lin: bp.Linear) -> None:
    with pytest.raises(ValueError) as info:
        lin.forward(np.ones(3))
    msg = str(info.value)
    assert "Linear(3→2)" in msg and "(3,)" in msg and "batch axis" in msg


def test_g_out_wrong_shape(lin: bp.Linear) -> None:
    lin.forward(X)
    before = snapshot(lin, G)
    with pytest.raises(ValueError) as info:
        lin.backward(np.ones((2, 3)))
    msg = str(info.value)
    assert "Linear" in msg and "(2, 3)" in msg and "(2, 2)" in msg
    assert_snapshot_equal(before, snapshot(lin, G))


def test_branch_g_out_wrong_count() -> None:
    br = bp.Branch(2)
    br.forward(X)
    with pytest.raises(TypeError, match=r"Branch\(2\).*tuple of 2"):
        br.backward(X)
    with pytest.raises(ValueError, match=r"g_out\[1\].*\(2, 2\).*\(2, 3\)"):
        br.backward((X, np.ones((2, 2))))


def test_loss_g_out_must_be_scalar() -> None:
    loss = bp.L2Loss()
    loss.forward(X, X + 1.0)
    with pytest.raises(ValueError, match=r"L2Loss.*\(2,\).*scalar"):
        loss.backward(np.ones(2))


# -- dtypes ------------------------------------------------------------------------------


def test_integer_data_is_refused(lin: bp.Linear) -> None:
    with pytest.raises(TypeError) as info:
        lin.forward(np.ones((2, 3), dtype=np.int64))
    msg = str(info.value)
    assert "Linear" in msg and "int64" in msg and "astype" in msg and "(2, 3)" in msg
    with pytest.raises(TypeError, match="astype"):
        bp.ReLU().forward(np.arange(6).reshape(2, 3))


def test_integer_g_out_is_refused(lin: bp.Linear) -> None:
    lin.forward(X)
    with pytest.raises(TypeError, match="astype"):
        lin.backward(np.ones((2, 2), dtype=np.int32))


def test_float64_into_float32_linear() -> None:
    lin32 = bp.Linear(3, 2, rng=0, dtype=np.float32)
    with pytest.raises(TypeError) as info:
        lin32.forward(X)
    msg = str(info.value)
    assert "Linear" in msg and "float64" in msg and "float32" in msg and "astype" in msg
    out = lin32.forward(X.astype(np.float32))
    with pytest.raises(TypeError, match="float32"):
        lin32.backward(np.ones(out.shape))  # float64 g_out for a float32 layer


def test_parameter_rejects_integer_value() -> None:
    with pytest.raises(TypeError, match="int64"):
        bp.Parameter(np.arange(3))


# -- losses ------------------------------------------------------------------------------


def test_softmax_labels_out_of_range() -> None:
    loss = bp.SoftmaxCrossEntropy()
    z = np.zeros((3, 4))
    loss.forward(z, np.array([0, 1, 3]))
    before = snapshot(loss)
    with pytest.raises(ValueError) as info:
        loss.forward(np.ones((3, 4)), np.array([0, 4, -1]))
    msg = str(info.value)
    assert "SoftmaxCrossEntropy" in msg and "0..3" in msg and "(3, 4)" in msg and "4" in msg
    assert_snapshot_equal(before, snapshot(loss))


@pytest.mark.parametrize("dtype", ["i1", "i2", "i4", "i8", ">i4", "u1"])
@pytest.mark.parametrize("C", [3, 127, 128, 129, 300])
def test_softmax_every_label_dtype_range_is_checked(dtype: str, C: int) -> None:
    # A negative label must be refused however many classes there are, including
    # more than a small signed dtype can count (int8 -1 seen as unsigned is 255).
    loss = bp.SoftmaxCrossEntropy()
    z = np.zeros((2, C))
    for bad in ([0, -1], [C - 1, C]) if dtype != "u1" else ([0, C],):
        if not np.can_cast(np.min_scalar_type(bad[1]), np.dtype(dtype)) and bad[1] >= 0:
            continue  # C itself does not fit the dtype: nothing to test
        with pytest.raises(ValueError, match=rf"labels must lie in 0..{C - 1}"):
            loss.forward(z, np.array(bad, dtype=dtype))
    ok = np.array([0, min(C - 1, np.iinfo(np.dtype(dtype)).max)], dtype=dtype)
    assert np.isfinite(loss.forward(z, ok))


def test_softmax_labels_wrong_shape() -> None:
    loss = bp.SoftmaxCrossEntropy()
    with pytest.raises(ValueError) as info:
        loss.forward(np.zeros((3, 4)), np.array([[0], [1], [2]]))
    msg = str(info.value)
    assert "SoftmaxCrossEntropy" in msg and "(3, 1)" in msg and "(3,)" in msg


def test_softmax_labels_must_be_integers() -> None:
    with pytest.raises(TypeError, match=r"SoftmaxCrossEntropy.*integer.*float64"):
        bp.SoftmaxCrossEntropy().forward(np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]))


def test_l2_shape_mismatch() -> None:
    loss = bp.L2Loss()
    with pytest.raises(ValueError) as info:
        loss.forward(np.zeros((2, 3)), np.zeros((2, 4)))
    msg = str(info.value)
    assert "L2Loss" in msg and "(2, 3)" in msg and "(2, 4)" in msg


def test_batch_size_mismatch_between_inputs() -> None:
    # The layer's own check words it where it has one; the generic message otherwise.
    with pytest.raises(ValueError, match=r"Add: x_a has shape \(2, 3\) but x_b has shape \(3, 3\)"):
        bp.Add().forward(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"Merge\(2\).*batch sizes.*\(2, 3\).*\(3, 1\)"):
        bp.Merge().forward(np.zeros((2, 3)), np.zeros((3, 1)))


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(TypeError, match=r"L2Loss.*forward takes 2 input"):
        bp.L2Loss().forward(np.zeros((2, 3)))


# -- nothing half-updated after a failed forward -----------------------------------------


@pytest.mark.parametrize(
    "bad",
    [np.ones((2, 4)), np.ones((2, 3), dtype=np.int64), np.ones(3), np.ones((2, 3), np.float32)],
    ids=["features", "integer", "1-D", "float32"],
)
def test_failed_forward_keeps_operating_point(lin: bp.Linear, bad: np.ndarray) -> None:
    lin.forward(X)
    W0 = lin.W.value.copy()
    before = snapshot(lin, G)
    with pytest.raises((TypeError, ValueError)):
        lin.forward(bad)
    assert_snapshot_equal(before, snapshot(lin, G))
    np.testing.assert_array_equal(lin.W.value, W0)


def test_failed_forward_before_any_forward_leaves_no_operating_point(lin: bp.Linear) -> None:
    with pytest.raises(ValueError):
        lin.forward(np.ones((2, 4)))
    with pytest.raises(RuntimeError, match="forward"):
        lin.backward(G)


# -- parameters --------------------------------------------------------------------------


def test_parameter_setter_wrong_shape_and_dtype() -> None:
    p = bp.Parameter(np.arange(6.0).reshape(2, 3), name="W")
    with pytest.raises(ValueError) as info:
        p.value = np.zeros((3, 2))
    assert "'W'" in str(info.value) and "(3, 2)" in str(info.value) and "(2, 3)" in str(info.value)
    with pytest.raises(TypeError) as info2:
        p.value = np.zeros((2, 3), dtype=np.float32)
    assert "float32" in str(info2.value) and "float64" in str(info2.value)
    np.testing.assert_array_equal(p.value, np.arange(6.0).reshape(2, 3))


def test_linear_given_parameter_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"Linear.*\(2, 3\).*\(3, 2\)"):
        bp.Linear(3, 2, W=bp.Parameter(np.zeros((3, 2))))


# -- Sequential --------------------------------------------------------------------------


def test_sequential_same_instance_twice() -> None:
    lin = bp.Linear(3, 3)
    with pytest.raises(ValueError) as info:
        bp.Sequential([lin, bp.Tanh(), lin])
    msg = str(info.value)
    assert "layer 2" in msg and "Linear(3→3)" in msg and "share weights" in msg
    assert "W=" in msg  # shows the fix


def test_sequential_missing_target() -> None:
    net = bp.Sequential([bp.Linear(3, 4), bp.SoftmaxCrossEntropy()])
    with pytest.raises(TypeError, match=r"SoftmaxCrossEntropy.*labels"):
        net.forward(X)


def test_sequential_failure_in_third_layer_keeps_all_operating_points() -> None:
    rng = np.random.default_rng(0)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.SoftmaxCrossEntropy()])
    net.forward(X, np.array([0, 3]))
    g0, grads = net.backward()
    before = [snapshot(net.layers[0], np.ones((2, 4))), snapshot(net.layers[1], np.ones((2, 4)))]
    ops = [layer._op for layer in net.layers]
    with pytest.raises(ValueError, match="SoftmaxCrossEntropy"):
        net.forward(X * 2.0, np.array([0, 7]))  # layers 0 and 1 ran; layer 2 refuses the labels
    assert [layer._op for layer in net.layers] == ops
    after = [snapshot(net.layers[0], np.ones((2, 4))), snapshot(net.layers[1], np.ones((2, 4)))]
    for a, b in zip(before, after, strict=True):
        assert_snapshot_equal(a, b)
    g0_after, grads_after = net.backward()
    np.testing.assert_array_equal(g0, g0_after)
    for p in grads:
        np.testing.assert_array_equal(grads[p], grads_after[p])


def test_sequential_bad_mode() -> None:
    net = bp.Sequential([bp.Tanh()])
    net.forward(X)
    with pytest.raises(ValueError, match="mode"):
        net.backward(X, mode="literal")


# -- SGD ---------------------------------------------------------------------------------


def test_sgd_foreign_parameter_updates_nothing() -> None:
    rng = np.random.default_rng(0)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.Linear(4, 2, rng=rng)])
    net.forward(X)
    _, grads = net.backward(G)
    values = [p.value.copy() for p in net.parameters()]
    foreign = bp.Parameter(np.zeros(2))
    opt = bp.SGD(net.parameters(), lr=0.1)
    bad = dict(grads)
    bad[foreign] = np.ones(2)  # the bad entry comes last
    with pytest.raises(ValueError, match=r"Parameter \(2,\) float64.*not one this optimizer"):
        opt.step(bad)
    for p, v in zip(net.parameters(), values, strict=True):
        np.testing.assert_array_equal(p.value, v)


def test_sgd_wrong_shaped_gradient_updates_nothing() -> None:
    rng = np.random.default_rng(0)
    net = bp.Sequential([bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.Linear(4, 2, rng=rng)])
    net.forward(X)
    _, grads = net.backward(G)
    params = net.parameters()
    values = [p.value.copy() for p in params]
    bad = {p: grads[p] for p in params[:-1]}
    bad[params[-1]] = np.ones(7)  # last entry has the wrong shape
    with pytest.raises(ValueError) as info:
        bp.SGD(params, lr=0.1).step(bad)
    assert "(7,)" in str(info.value) and "(2,)" in str(info.value)
    for p, v in zip(params, values, strict=True):
        np.testing.assert_array_equal(p.value, v)


def test_sgd_bad_arguments() -> None:
    lin = bp.Linear(3, 2)
    with pytest.raises(ValueError, match="lr"):
        bp.SGD(lin.parameters(), lr=0.0)
    with pytest.raises(TypeError, match="Parameter"):
        bp.SGD(lin.parameters(), lr=0.1).step({"W": np.zeros((2, 3))})


def test_linear_init_errors_name_the_layer_as_built() -> None:
    # Raised while the layer is half built: the message must still describe it truly.
    with pytest.raises(
        ValueError, match=r"^Linear\(3→2\): W: expected shape \(2, 3\), got \(3, 3\)"
    ):
        bp.Linear(3, 2, W=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"^Linear\(3→2\): b: expected shape \(2,\), got \(3,\)"):
        bp.Linear(3, 2, b=np.zeros(3))


@pytest.mark.parametrize("shape", [(-1, -1), (0,), (2, -2)])
def test_reshape_refuses_impossible_shapes_when_built(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"Reshape: .*at most one may be -1"):
        bp.Reshape(*shape)


def test_softmax_logits_without_a_batch_axis_say_so() -> None:
    with pytest.raises(ValueError, match=r"logits must have shape \(B, C\), got \(3,\)"):
        bp.SoftmaxCrossEntropy().forward(np.zeros(3), np.array([0]))


def test_helpers_name_themselves_in_their_errors() -> None:
    net = bp.Sequential([bp.Linear(3, 2)])
    X = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"^predict: batch_size"):
        bp.predict(net, X, batch_size=0)
    with pytest.raises(ValueError, match=r"^accuracy: batch_size"):
        bp.accuracy(net, X, np.array([0, 1]), batch_size=0)
    with pytest.raises(TypeError, match=r"^predict: expected a Sequential or a Graph"):
        bp.predict(5, X)
    with pytest.raises(ValueError, match=r"^input_gradient: l2 must be >= 0"):
        bp.input_gradient(net, X, l2=-1.0)
    with pytest.raises(ValueError, match=r"^optimize_input: l2 must be >= 0"):
        bp.optimize_input(net, X, l2=-1.0)
