"""Normalization, softmax and dropout beyond the battery.

The battery (``tests/test_layers.py``) checks per-example structures, so it takes
BatchNorm in eval mode only. Training-mode BatchNorm couples the examples: here it
is checked as a layer (``gradcheck`` of the whole-batch Jacobian, and its dense
matrix against torch's Jacobian of the whole batch), in a model (fast backward =
explicit Algorithm 14.1 = finite differences = torch), and for the refusals of
per-example gradients and of whole-model Jacobians. PyTorch float64 is the oracle
wherever it is used; the tests that need it are skipped without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.jacobian import Diagonal, DiagonalPlusLowRank, Identity, WholeBatch

RTOL = 1e-10


def _torch() -> Any:
    return pytest.importorskip("torch")


def _randomize(layer: bp.Layer, seed: int) -> bp.Layer:
    rng = np.random.default_rng(seed)
    for p in layer.params.values():
        p.value = rng.standard_normal(p.shape)
    return layer


# -- L^x of one example against torch's Jacobian of one example ---------------------------

PER_EXAMPLE = [
    ("Softmax", lambda: bp.Softmax(), (5,), lambda F, x: F.softmax(x, -1)),
    ("Softmax-rows", lambda: bp.Softmax(), (3, 4), lambda F, x: F.softmax(x, -1)),
    (
        "Softmax-axis1-T0.5",
        lambda: bp.Softmax(axis=1, temperature=0.5),
        (3, 4),
        lambda F, x: F.softmax(x / 0.5, 0),  # one example: torch's dim 0 is our axis 1
    ),
    ("LogSoftmax-axis1", lambda: bp.LogSoftmax(axis=1), (3, 4), lambda F, x: F.log_softmax(x, 0)),
    (
        "LayerNorm-last",
        lambda: _randomize(bp.LayerNorm(4), 1),
        (3, 4),
        "layer_norm",
    ),
    (
        "LayerNorm-last2",
        lambda: _randomize(bp.LayerNorm((3, 4)), 2),
        (3, 4),
        "layer_norm",
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "shape", "fn"), PER_EXAMPLE, ids=[r[0] for r in PER_EXAMPLE]
)
def test_jacobian_per_example_matches_torch(name: str, make: Any, shape: Any, fn: Any) -> None:
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    layer = make()
    x = rng.standard_normal((3, *shape))
    layer.forward(x)
    L_x, _ = layer.jacobians()
    assert isinstance(L_x, DiagonalPlusLowRank)
    dense = L_x.to_dense()
    assert dense.shape == (3, x[0].size, x[0].size)
    for b in range(3):
        if fn == "layer_norm":
            ps = {k: torch.tensor(np.array(p.value)) for k, p in layer.params.items()}
            ln_shape = layer.shape  # type: ignore[attr-defined]

            def f(t: Any, ps: Any = ps, s: Any = ln_shape) -> Any:
                return F.layer_norm(t, s, ps["gamma"], ps["beta"], eps=1e-5)
        else:

            def f(t: Any) -> Any:
                return fn(F, t)

        J = torch.autograd.functional.jacobian(f, torch.tensor(x[b]))
        np.testing.assert_allclose(
            dense[b], J.reshape(x[b].size, x[b].size).numpy(), rtol=RTOL, atol=1e-13
        )


def test_softmax_last_axis_is_the_rank_one_form() -> None:
    p_layer = bp.Softmax()
    x = np.random.default_rng(0).standard_normal((2, 5))
    p = p_layer.forward(x)
    L_x, _ = p_layer.jacobians()
    assert L_x.rank == 1 and "diag(p) − p pᵀ" in repr(L_x)
    # (diag(p) − p pᵀ) written out by hand from the output
    np.testing.assert_allclose(L_x.to_dense()[1], np.diag(p[1]) - np.outer(p[1], p[1]), rtol=1e-15)
    t = bp.Softmax(temperature=0.5)
    q = t.forward(x)
    np.testing.assert_allclose(
        t.jacobians()[0].to_dense()[0], (np.diag(q[0]) - np.outer(q[0], q[0])) / 0.5, rtol=1e-14
    )


def test_layernorm_jacobian_is_diagonal_plus_rank_two_per_group() -> None:
    ln = _randomize(bp.LayerNorm(4), 3)
    ln.forward(np.random.default_rng(1).standard_normal((2, 3, 4)))
    L_x, L_theta = ln.jacobians()
    assert isinstance(L_x, DiagonalPlusLowRank) and L_x.rank == 2 * 3
    dense = L_x.to_dense()
    # entries of different groups (tokens) do not interact
    assert np.all(dense[:, :4, 4:] == 0) and np.all(dense[:, 4:8, 8:] == 0)
    assert set(L_theta) == {"gamma", "beta"}


# -- small nets: gradcheck passes, a wrong backward fails ---------------------------------


def test_gradcheck_on_a_net_with_layernorm_and_softmax() -> None:
    rng = np.random.default_rng(0)
    net = bp.Sequential(
        [
            bp.Linear(4, 6, rng=1),
            _randomize(bp.LayerNorm(6), 2),
            bp.Tanh(),
            bp.Linear(6, 5, rng=3),
            bp.Softmax(temperature=2.0),
        ]
    )
    report = bp.gradcheck(net, rng.standard_normal((3, 4)))
    assert report.checks and report.worst < 1e-5


def test_gradcheck_on_a_net_with_logsoftmax_and_eval_batchnorm() -> None:
    rng = np.random.default_rng(1)
    bn = _randomize(bp.BatchNorm1d(5), 4)
    bn.set_running_stats(rng.standard_normal(5), rng.uniform(0.5, 2, 5))
    net = bp.Sequential([bp.Linear(4, 5, rng=1), bn, bp.LogSoftmax()])
    net.eval()
    report = bp.gradcheck(net, rng.standard_normal((3, 4)))
    assert report.checks and report.worst < 1e-5
    grads = net.backward(np.ones((3, 5)), per_example=True)  # eval: per example works
    total = net.backward(np.ones((3, 5)))
    for p in net.parameters():
        np.testing.assert_allclose(grads.params[p].sum(axis=0), total.params[p], rtol=1e-12)


class _WrongSoftmax(bp.Softmax):
    def _backward(self, op: Any, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


class _WrongLayerNorm(bp.LayerNorm):
    def _backward(self, op: Any, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


class _WrongBatchNorm(bp.BatchNorm1d):
    def _backward(self, op: Any, g_out: np.ndarray, input_grad: bool) -> Any:
        g_in, grads = super()._backward(op, g_out, input_grad)
        return g_in * 1.001, grads


@pytest.mark.parametrize(
    "make",
    [lambda: _WrongSoftmax(), lambda: _WrongLayerNorm(4), lambda: _WrongBatchNorm(4)],
    ids=["Softmax", "LayerNorm", "BatchNorm1d-train"],
)
def test_a_wrong_backward_fails_gradcheck(make: Any) -> None:
    x = np.random.default_rng(2).standard_normal((3, 4))
    with pytest.raises(bp.GradcheckError, match="fast"):
        bp.gradcheck(make(), x)


# -- BatchNorm in training mode: one Jacobian over the whole batch -------------------------


def test_training_batchnorm_jacobian_is_over_the_whole_batch_and_matches_torch() -> None:
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    bn = _randomize(bp.BatchNorm1d(2), 5)
    x = rng.standard_normal((4, 2, 3))
    bn.forward(x)
    L_x, L_theta = bn.jacobians()
    assert isinstance(L_x, WholeBatch) and L_x.batch == 1 and L_x.shape == (24, 24)
    assert "couples the batch" in repr(L_x) and "couples the batch" in repr(L_theta["gamma"])
    g, b = (torch.tensor(np.array(bn.params[k].value)) for k in ("gamma", "beta"))

    def f(t: Any) -> Any:
        return F.batch_norm(t, None, None, g, b, training=True)

    J = torch.autograd.functional.jacobian(f, torch.tensor(x)).reshape(24, 24).numpy()
    np.testing.assert_allclose(L_x.to_dense()[0], J, rtol=RTOL, atol=1e-12)
    Jg = torch.autograd.functional.jacobian(
        lambda gg: F.batch_norm(torch.tensor(x), None, None, gg, b, training=True), g
    )
    np.testing.assert_allclose(L_theta["gamma"].to_dense()[0], Jg.reshape(24, 2).numpy(), rtol=RTOL)
    # the layer's own three-way check works on the whole-batch matrix
    report = bp.gradcheck(bn, x)
    assert report.checks


def _bn_net(seed: int = 0) -> bp.Sequential:
    return bp.Sequential(
        [
            bp.Linear(3, 4, rng=seed),
            _randomize(bp.BatchNorm1d(4), seed + 1),
            bp.Tanh(),
            bp.Linear(4, 2, rng=seed + 2),
            bp.L2Loss(),
        ]
    )


def test_training_batchnorm_in_a_model_fast_explicit_numeric_and_torch_agree() -> None:
    rng = np.random.default_rng(4)
    net = _bn_net()
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    net.forward(x, y)
    fast = net.backward()
    explicit = net.backward(mode="explicit")
    np.testing.assert_allclose(fast.inputs["x"], explicit.inputs["x"], rtol=1e-12)
    for p in net.parameters():
        np.testing.assert_allclose(fast.params[p], explicit.params[p], rtol=1e-12, atol=1e-15)

    def cost(xx: np.ndarray) -> np.ndarray:
        return np.asarray(net.forward(xx, y, cache=False)).reshape(1)

    numeric = bp.numerical_jacobian(cost, x, flat=True).reshape(x.shape)
    np.testing.assert_allclose(fast.inputs["x"], numeric, rtol=1e-6, atol=1e-9)
    for p in net.parameters():
        original = p.value

        def cost_p(v: np.ndarray, p: Any = p) -> np.ndarray:
            p.value = v
            return np.asarray(net.forward(x, y, cache=False)).reshape(1)

        numeric_p = bp.numerical_jacobian(cost_p, original, flat=True).reshape(p.shape)
        p.value = original
        np.testing.assert_allclose(fast.params[p], numeric_p, rtol=1e-6, atol=1e-9)

    torch = _torch()
    F = torch.nn.functional
    lin0, bn, _, lin3, _ = net.layers
    ts = {id(p): torch.tensor(np.array(p.value), requires_grad=True) for p in net.parameters()}
    xt = torch.tensor(x, requires_grad=True)
    h = F.linear(xt, ts[id(lin0.params["W"])], ts[id(lin0.params["b"])])
    h = F.batch_norm(
        h, None, None, ts[id(bn.params["gamma"])], ts[id(bn.params["beta"])], training=True
    )
    h = F.linear(torch.tanh(h), ts[id(lin3.params["W"])], ts[id(lin3.params["b"])])
    ((h - torch.tensor(y)) ** 2).sum(1).mean().backward()
    np.testing.assert_allclose(fast.inputs["x"], xt.grad.numpy(), rtol=RTOL, atol=1e-13)
    for p in net.parameters():
        np.testing.assert_allclose(fast.params[p], ts[id(p)].grad.numpy(), rtol=RTOL, atol=1e-13)


def test_training_batchnorm_refuses_per_example_gradients() -> None:
    rng = np.random.default_rng(5)
    bn = bp.BatchNorm1d(3)
    bn.forward(rng.standard_normal((4, 3)))
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(3.*per-example gradients.*mixed"):
        bn.per_example_grads(np.ones((4, 3)))
    net = _bn_net()
    net.forward(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))
    with pytest.raises(RuntimeError, match="per-example gradients"):
        net.backward(per_example=True)


def test_whole_model_jacobians_through_training_batchnorm_are_refused_clearly() -> None:
    rng = np.random.default_rng(6)
    net = _bn_net()
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    net.forward(x, y)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(4.*one matrix over the whole batch"):
        net.jacobians()
    # gradcheck of the model reaches the whole-model Jacobians (its dot-product test)
    # and stops there with the same error; in eval mode everything is per example.
    with pytest.raises(RuntimeError, match="whole batch"):
        bp.gradcheck(net, x, y)
    net.eval()
    report = bp.gradcheck(net, x, y)
    assert report.checks and report.worst < 1e-5


# -- BatchNorm: modes and running statistics against torch --------------------------------


@pytest.mark.parametrize(
    ("cls", "shape"),
    [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (5, 3, 4)), ("BatchNorm2d", (4, 3, 2, 3))],
)
def test_batchnorm_running_statistics_and_modes_match_torch(cls: str, shape: Any) -> None:
    torch = _torch()
    rng = np.random.default_rng(8)
    ours = getattr(bp, cls)(3, eps=1e-3, momentum=0.3)
    ref = getattr(torch.nn, cls)(3, eps=1e-3, momentum=0.3).double()
    _randomize(ours, 9)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.array(ours.params["gamma"].value)))
        ref.bias.copy_(torch.tensor(np.array(ours.params["beta"].value)))
    for step in range(4):  # training steps, the last one without a cache
        x = 2.0 * rng.standard_normal(shape) + 1.0
        out = ours.forward(x, cache=step < 3)
        out_t = ref(torch.tensor(x))
        np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=RTOL, atol=1e-13)
        np.testing.assert_allclose(ours.running_mean, ref.running_mean.numpy(), rtol=RTOL)
        np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=RTOL)
    ours.eval()
    ref.eval()
    x = rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    out_t = ref(xt)
    out_t.backward(torch.tensor(g))
    np.testing.assert_allclose(ours.forward(x), out_t.detach().numpy(), rtol=RTOL, atol=1e-13)
    g_in, grads = ours.backward(g)
    np.testing.assert_allclose(g_in, xt.grad.numpy(), rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(grads["gamma"], ref.weight.grad.numpy(), rtol=RTOL)
    np.testing.assert_allclose(grads["beta"], ref.bias.grad.numpy(), rtol=RTOL)
    before = ours.running_mean.copy()
    ours.forward(x)  # eval: the running statistics stay
    np.testing.assert_array_equal(ours.running_mean, before)
    assert isinstance(ours.jacobians()[0], Diagonal)


def test_running_statistics_are_read_only_buffers_and_failed_calls_change_nothing() -> None:
    rng = np.random.default_rng(10)
    bn = bp.BatchNorm1d(3)
    assert set(bn.params) == {"gamma", "beta"}  # the running statistics are not Parameters
    assert set(bn.buffers) == {"running_mean", "running_var"}
    with pytest.raises(ValueError):
        bn.running_mean[0] = 1.0
    bn.forward(rng.standard_normal((4, 3)))
    mean, var, op = bn.running_mean.copy(), bn.running_var.copy(), bn.operating_point()
    with pytest.raises(ValueError, match=r"BatchNorm1d.*\(4, 5\)"):
        bn.forward(rng.standard_normal((4, 5)))  # wrong number of channels
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.forward(rng.standard_normal((1, 3)))  # torch refuses this too
    with pytest.raises(ValueError, match="running var"):
        bn.set_running_stats(mean=np.zeros(3), var=np.zeros(2))
    np.testing.assert_array_equal(bn.running_mean, mean)
    np.testing.assert_array_equal(bn.running_var, var)
    assert bn.operating_point() is op
    bn.set_running_stats(mean=np.arange(3.0))
    np.testing.assert_array_equal(bn.running_mean, np.arange(3.0))


def test_constructor_checks() -> None:
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="Dropout: p"):
            bp.Dropout(bad)
    with pytest.raises(ValueError, match="momentum"):
        bp.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="temperature"):
        bp.Softmax(temperature=0.0)
    with pytest.raises(ValueError, match="batch axis"):
        bp.Softmax(axis=0).forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"LayerNorm.*\(B, \.\.\., 4\)"):
        bp.LayerNorm(4).forward(np.ones((2, 3)))


# -- Dropout -----------------------------------------------------------------------------------


def test_dropout_is_deterministic_for_a_seed_and_fresh_on_every_forward() -> None:
    x = np.random.default_rng(11).standard_normal((50, 40)) + 5.0  # no entry is 0
    a, b = bp.Dropout(0.3, rng=1), bp.Dropout(0.3, rng=1)
    first = [a.forward(x) for _ in range(3)]
    second = [b.forward(x, cache=False) for _ in range(3)]
    for u, v in zip(first, second, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(first[0] == 0, first[1] == 0)  # a fresh mask each time
    kept = first[2] != 0
    assert 0.65 < kept.mean() < 0.75  # about 1 - p of 2000 entries kept
    np.testing.assert_allclose(first[2][kept], x[kept] / 0.7, rtol=1e-15)
    g = np.random.default_rng(12).standard_normal(x.shape)
    g_in, _ = a.backward(g)  # the mask of the last cached forward
    np.testing.assert_allclose(g_in, np.where(kept, g / 0.7, 0.0), rtol=1e-15)
    L_x, _ = a.jacobians()
    assert isinstance(L_x, Diagonal)
    np.testing.assert_allclose(L_x.d, np.where(kept, 1 / 0.7, 0.0), rtol=1e-15)


def test_dropout_is_the_identity_in_eval_mode() -> None:
    x = np.random.default_rng(13).standard_normal((3, 4))
    d = bp.Dropout(0.9, rng=0).eval()
    np.testing.assert_array_equal(d.forward(x), x)
    g = np.random.default_rng(14).standard_normal((3, 4))
    g_in, grads = d.backward(g)
    np.testing.assert_array_equal(g_in, g)
    assert grads == {} and isinstance(d.jacobians()[0], Identity)
    net = bp.Sequential([bp.Linear(4, 3, rng=0), bp.Dropout(0.5, rng=0)])
    net.eval()
    np.testing.assert_array_equal(net.forward(x), net.layers[0].forward(x))
