"""Whole-graph Jacobians: ``Graph.jacobians`` and ``Sequential.jacobians`` in both orders."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.graph import chain
from backprop.jacobian import Diagonal, Jacobian
from backprop.layers.worked import SumEntries

B = 3


# -- reference: the Jacobian of the whole batch by finite differences -------------------


def batch_matrix(J: Any, scalar_out: bool, param: bool) -> np.ndarray:
    """Per-example blocks ``(B, M, N)`` laid out as the Jacobian of the whole batch."""
    D = J.to_dense()
    b, M, N = D.shape
    if param:
        return D.sum(axis=0) if scalar_out else D.reshape(b * M, N)
    if scalar_out:
        return D.transpose(1, 0, 2).reshape(M, b * N)
    full = np.zeros((b * M, b * N))
    for k in range(b):
        full[k * M : (k + 1) * M, k * N : (k + 1) * N] = D[k]
    return full


def check_against_differences(
    g: bp.Graph, feed: dict[str, np.ndarray], output: str | None = None
) -> None:
    names = g.output_names()
    out_name = output or names[0]
    g.forward(feed)
    rev = g.jacobians(output, order="reverse")
    fwd = g.jacobians(output, order="forward")

    def out(**changed: np.ndarray) -> np.ndarray:
        values = g.forward({**feed, **changed}, cache=False)
        return np.asarray(values[names.index(out_name)] if len(names) > 1 else values)

    scalar = out().ndim == 0
    assert set(rev.inputs) == set(fwd.inputs) and set(rev.params) == set(fwd.params)
    for key in rev.inputs:
        dense_r, dense_f = rev.inputs[key].to_dense(), fwd.inputs[key].to_dense()
        np.testing.assert_allclose(dense_r, dense_f, rtol=1e-12, atol=1e-14)
        numeric = bp.numerical_jacobian(lambda v, key=key: out(**{key: v}), feed[key], flat=True)
        np.testing.assert_allclose(
            batch_matrix(rev.inputs[key], scalar, False), numeric, rtol=1e-6, atol=1e-8
        )
    for p in rev.params:
        np.testing.assert_allclose(
            rev.params[p].to_dense(), fwd.params[p].to_dense(), rtol=1e-12, atol=1e-14
        )
        original = p.value

        def f_p(v: np.ndarray, p: bp.Parameter = p) -> np.ndarray:
            p.value = v
            return out()

        try:
            numeric = bp.numerical_jacobian(f_p, original, flat=True)
        finally:
            p.value = original
        np.testing.assert_allclose(
            batch_matrix(rev.params[p], scalar, True), numeric, rtol=1e-6, atol=1e-8
        )
    g.forward(feed)


# -- graphs ------------------------------------------------------------------------------


def dag(rng: np.random.Generator, scalar: bool) -> tuple[bp.Graph, dict[str, np.ndarray]]:
    """Two inputs, fan-out, merge of three paths, multiply, tied weights, a nested chain."""
    g = bp.Graph()
    x, u = g.input("x"), g.input("u")
    lin = bp.Linear(3, 4, rng=rng)
    h = g.add(bp.Tanh(), g.add(lin, x))
    p = g.add(bp.Linear(4, 2, rng=rng), h)
    q = g.add(bp.Multiply(), h, g.add(bp.Linear(2, 4, rng=rng), u))
    tied = bp.Linear(3, 4, W=lin.W, bias=False)
    r = g.add(bp.Sigmoid(), g.add(tied, g.add(bp.Reshape(3), x)))
    m = g.add(bp.Merge(3), p, q, r)
    chain = bp.Sequential([bp.Linear(10, 3, rng=rng), bp.Softplus()])
    out = g.add(bp.Add(), g.add(chain, m), g.add(bp.Linear(4, 3, rng=rng), h), name="out")
    feed = {"x": rng.standard_normal((B, 3)), "u": rng.standard_normal((B, 2))}
    if scalar:
        feed["y"] = rng.standard_normal((B, 3))
        g.output(g.add(bp.L2Loss(), out, g.input("y"), name="J"))
    else:
        g.output(out)
    return g, feed


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_both_orders_equal_finite_differences(scalar: bool, seed: int) -> None:
    g, feed = dag(np.random.default_rng(seed), scalar)
    check_against_differences(g, feed)


def test_several_outputs_and_nested_graph() -> None:
    rng = np.random.default_rng(7)
    inner = bp.Graph()
    a = inner.input("a")
    inner.output(inner.add(bp.Tanh(), inner.add(bp.Linear(2, 3, rng=rng), a)))
    g = bp.Graph()
    x = g.input("x")
    h = g.add(inner, x)
    o1 = g.add(bp.Linear(3, 2, rng=rng), h, name="o1")
    o2 = g.add(SumEntries(), h, name="o2")
    g.output(o1, o2)
    feed = {"x": rng.standard_normal((B, 2))}
    for name in ("o1", "o2"):
        check_against_differences(g, feed, name)


def test_worked_example_001_by_hand() -> None:
    """f = (x + y) z at (-2, 5, -4): ∂f/∂x = ∂f/∂y = z = -4, ∂f/∂z = x + y = 3."""
    g = bp.Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    g.output(g.add(bp.Multiply(), g.add(bp.Add(), x, y), z))
    g.forward(x=np.array([[-2.0]]), y=np.array([[5.0]]), z=np.array([[-4.0]]))
    for order in ("reverse", "forward", "auto"):
        jac = g.jacobians(order=order)
        ins, params = jac.inputs, jac.params
        assert params == {}
        assert {k: J.to_dense().item() for k, J in ins.items()} == {"x": -4.0, "y": -4.0, "z": 3.0}


def test_paths_add_and_tied_uses_add() -> None:
    """out = W x + W x through a branch: ∂out/∂x = 2W, and ∂out/∂W has both uses."""
    rng = np.random.default_rng(8)
    g = bp.Graph()
    x = g.input("x")
    first = bp.Linear(2, 2, bias=False, rng=rng)
    second = bp.Linear(2, 2, bias=False, W=first.W)
    g.output(g.add(bp.Add(), g.add(first, x), g.add(second, x)))
    X = rng.standard_normal((B, 2))
    g.forward(x=X)
    W = first.W.value
    for order in ("reverse", "forward"):
        jac = g.jacobians(order=order)
        ins, params = jac.inputs, jac.params
        np.testing.assert_allclose(ins["x"].to_dense(), np.broadcast_to(2 * W, (B, 2, 2)))
        # d(Wx)_i/dW_jk = δ_ij x_k, twice.
        expected = np.zeros((B, 2, 4))
        for b in range(B):
            expected[b] = 2 * np.kron(np.eye(2), X[b][None, :])
        np.testing.assert_allclose(params[first.W].to_dense(), expected, rtol=1e-15)


def test_no_path_gives_zeros_and_label_inputs_are_left_out() -> None:
    rng = np.random.default_rng(9)
    g = bp.Graph()
    x, v, labels = g.input("x"), g.input("v"), g.input("labels")
    lin = bp.Linear(2, 3, rng=rng)
    g.add(bp.Tanh(), v)  # v leads nowhere
    g.output(g.add(bp.SoftmaxCrossEntropy(), g.add(lin, x), labels))
    g.forward(x=rng.standard_normal((B, 2)), v=np.ones((B, 4)), labels=np.array([0, 2, 1]))
    jac = g.jacobians()
    ins, params = jac.inputs, jac.params
    assert set(ins) == {"x", "v"}
    assert ins["v"].shape == (1, 4) and not ins["v"].to_dense().any()
    grads = g.backward()
    np.testing.assert_allclose(ins["x"].to_dense()[:, 0, :], grads.inputs["x"], rtol=1e-14)
    np.testing.assert_allclose(
        params[lin.W].to_dense().sum(axis=0).reshape(3, 2), grads.params[lin.W], rtol=1e-14
    )


def test_requires_grad_false_input_is_left_out() -> None:
    rng = np.random.default_rng(10)
    g = bp.Graph()
    x, c = g.input("x"), g.input("c", requires_grad=False)
    g.output(g.add(bp.Multiply(), x, c))
    g.forward(x=rng.standard_normal((B, 2)), c=rng.standard_normal((B, 2)))
    jac = g.jacobians()
    ins, _ = jac.inputs, jac.params
    assert list(ins) == ["x"]


# -- the order rule ------------------------------------------------------------------------


def refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("this order was not expected")


def test_auto_takes_reverse_for_few_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    g = bp.Graph()
    g.output(g.add(bp.Linear(6, 1, rng=rng), g.input("x")))  # M = 1 < N_total = 6 + 7
    g.forward(x=rng.standard_normal((B, 6)))
    monkeypatch.setattr(chain, "forward", refuse)
    jac = g.jacobians()
    ins, _ = jac.inputs, jac.params
    assert ins["x"].shape == (1, 6)


def test_auto_takes_reverse_when_sizes_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    g = bp.Graph()
    g.output(g.add(bp.Tanh(), g.input("x")))  # M = N_total = 4
    g.forward(x=np.zeros((B, 4)))
    monkeypatch.setattr(chain, "forward", refuse)
    jac = g.jacobians()
    ins, _ = jac.inputs, jac.params
    np.testing.assert_array_equal(ins["x"].to_dense(), np.broadcast_to(np.eye(4), (B, 4, 4)))


def test_auto_forward_when_output_is_larger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter-free graph that widens its input: M = 6 > N_total = 2."""
    g = bp.Graph()
    x = g.input("x")
    a, b, c = g.add(bp.Branch(3), x)
    g.output(g.add(bp.Merge(3), a, g.add(bp.Tanh(), b), g.add(bp.Sigmoid(), c)))
    X = np.array([[0.5, -1.0], [2.0, 0.0], [0.1, 0.3]])
    g.forward(x=X)
    monkeypatch.setattr(chain, "reverse", refuse)
    jac = g.jacobians()
    ins, _ = jac.inputs, jac.params
    D = ins["x"].to_dense()
    expected = np.concatenate(
        [
            np.broadcast_to(np.eye(2), (B, 2, 2)),
            np.stack([np.diag(1 - np.tanh(r) ** 2) for r in X]),
            np.stack([np.diag(np.exp(-r) / (1 + np.exp(-r)) ** 2) for r in X]),
        ],
        axis=1,
    )
    np.testing.assert_allclose(D, expected, rtol=1e-14)


# -- Sequential ------------------------------------------------------------------------------


def test_sequential_orders_agree_with_differences() -> None:
    rng = np.random.default_rng(12)
    net = bp.Sequential(
        [bp.Linear(3, 4, rng=rng), bp.Tanh(), bp.Linear(4, 2, rng=rng), bp.Sigmoid()]
    )
    X = rng.standard_normal((B, 3))
    net.forward(X)
    rev, fwd = net.jacobians(order="reverse"), net.jacobians(order="forward")
    auto = net.jacobians()
    np.testing.assert_allclose(rev["x"].to_dense(), fwd["x"].to_dense(), rtol=1e-13)
    np.testing.assert_allclose(rev["x"].to_dense(), auto["x"].to_dense(), rtol=1e-13)
    numeric = bp.numerical_jacobian(lambda v: net.forward(v, cache=False), X, flat=True)
    np.testing.assert_allclose(batch_matrix(rev["x"], False, False), numeric, rtol=1e-6, atol=1e-9)
    for p in net.parameters():
        np.testing.assert_allclose(rev.params[p].to_dense(), fwd.params[p].to_dense(), rtol=1e-13)
        original = p.value

        def f_p(v: np.ndarray, p: bp.Parameter = p) -> np.ndarray:
            p.value = v
            return net.forward(X, cache=False)

        try:
            numeric = bp.numerical_jacobian(f_p, original, flat=True)
        finally:
            p.value = original
        np.testing.assert_allclose(
            batch_matrix(rev.params[p], False, True), numeric, rtol=1e-6, atol=1e-9
        )


def test_sequential_bad_order() -> None:
    net = bp.Sequential([bp.Tanh()])
    net.forward(np.ones((1, 2)))
    with pytest.raises(ValueError, match="order must be one of"):
        net.jacobians(order="sideways")


# -- errors ------------------------------------------------------------------------------------


def test_errors_name_the_problem() -> None:
    g = bp.Graph()
    x = g.input("x")
    g.output(g.add(bp.Tanh(), x, name="a"), g.add(bp.Sigmoid(), x, name="b"))
    with pytest.raises(RuntimeError, match=r"Graph.jacobians: no forward pass yet"):
        g.jacobians("a")
    g.forward(x=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"2 outputs \('a', 'b'\); name one with output="):
        g.jacobians()
    with pytest.raises(ValueError, match=r"no output named 'c'"):
        g.jacobians("c")
    with pytest.raises(ValueError, match="order must be one of"):
        g.jacobians("a", order="both")
    g.forward(x=np.ones((2, 2)), cache=False)
    with pytest.raises(RuntimeError, match="cache=False"):
        g.jacobians("a")


# -- the dot-product test in gradcheck uses these Jacobians ---------------------------------


class WrongForwardProduct(Jacobian):
    """A diagonal whose ``jvp`` is off by 10% (its ``vjp`` and matrices are right):
    fast, explicit and finite differences agree, and only the dot-product test,
    which uses the forward product, can see it."""

    kind = "WrongForwardProduct"

    def __init__(self, inner: Diagonal) -> None:
        super().__init__(inner.shape, inner.batch, inner.dtype, inner.label)
        self.inner = inner

    def vjp(self, g: np.ndarray) -> np.ndarray:
        return self.inner.vjp(g)

    def jvp(self, u: np.ndarray) -> np.ndarray:
        return 1.1 * self.inner.jvp(u)

    def to_sparse(self, b: int = 0) -> Any:
        return self.inner.to_sparse(b)

    @property
    def nnz(self) -> int:
        return self.inner.nnz


class SneakyTanh(bp.Tanh):
    def _jacobians(self, op: Any) -> Any:
        L, _ = super()._jacobians(op)
        return WrongForwardProduct(L), {}


def test_gradcheck_graph_dot_product_test_catches_a_wrong_jvp() -> None:
    rng = np.random.default_rng(13)
    g = bp.Graph()
    g.output(g.add(bp.Linear(3, 2, rng=rng), g.add(SneakyTanh(), g.input("x"))))
    feed = {"x": rng.standard_normal((B, 3))}
    with pytest.raises(bp.GradcheckError, match="dot-product test"):
        bp.gradcheck(g, feed)
    h = bp.Graph()
    h.output(h.add(bp.Linear(3, 2, rng=rng), h.add(bp.Tanh(), h.input("x"))))
    report = bp.gradcheck(h, feed)
    dot = {k: v for k, v in report.checks.items() if "dot-product test" in k}
    assert len(dot) == 1 + 2  # the input and the two parameters
    assert max(dot.values()) < 1e-10
