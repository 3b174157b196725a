"""Recurrent nets: unrolling, backprop through time, truncation, and the state Jacobians.

The cells themselves run through the layer battery (``tests/test_layers.py``) and the
PyTorch table (``tests/test_torch_reference.py``). Here: the unrolled net against
PyTorch's ``nn.RNN`` and ``nn.LSTM`` in float64 (outputs and every gradient), the
per-step shares of the tied gradient against an untied computation, ``gradcheck`` on
an unrolled net (and failing on a wrong backward), truncated BPTT against PyTorch's
``detach`` recipe, and ``∂h_T/∂h_t`` against finite differences and
``torch.autograd.functional.jacobian``, with the bound its singular values give.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop.layers.recurrent import RNNCell
from backprop.recurrent import (
    cut_steps,
    gradient_norms,
    singular_values,
    state_jacobians,
    step_jacobians,
)

RTOL, ATOL = 1e-10, 1e-12


def close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    if hasattr(expected, "detach"):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def _torch() -> Any:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def rnn_problem(
    nonlinearity: str = "tanh", T: int = 6, B: int = 3, n_in: int = 4, n: int = 5, seed: int = 0
) -> tuple[RNNCell, np.ndarray, np.ndarray, np.ndarray]:
    """A cell, inputs ``x`` ``(B, T, n_in)``, ``h0`` and a seed for the states."""
    rng = np.random.default_rng(seed)
    cell = bp.RNNCell(n_in, n, nonlinearity=nonlinearity, rng=rng)
    x = rng.standard_normal((B, T, n_in))
    h0 = 0.5 * rng.standard_normal((B, n))
    seed_states = rng.standard_normal((B, T, n))
    return cell, x, h0, seed_states


def tt(a: Any, torch: Any, grad: bool = True) -> Any:
    return torch.tensor(np.array(a, dtype=np.float64), requires_grad=grad)


# ------------------------------------------------------------------ the unrolled DAG


def test_unroll_builds_one_node_per_step_with_tied_parameters() -> None:
    cell, x, h0, _ = rnn_problem(T=4)
    net = bp.unroll(cell, 4)
    assert isinstance(net, bp.Graph) and net.input_names() == ["x", "h0"]
    assert net.output_names() == ["states"]
    names = [n.name for n in net.nodes()]
    assert [f"step{t}" for t in range(4)] == [n for n in names if n.startswith("step")][::2]
    assert [net[f"step{t}"] for t in range(4)] == net.steps
    assert cell not in net.steps  # the cell itself is not a node: it can be unrolled again
    for step in net.steps:
        assert step.params == cell.params  # the same Parameter objects: tied (14.8)
    assert net.parameters() == list(cell.params.values())
    fanouts = [n for n in net.nodes() if n.auto]  # h_t feeds the next step and the output
    assert len(fanouts) == 3
    assert net.forward(x=x, h0=h0).shape == (3, 4, 5)
    assert repr(net) == "Unrolled(RNNCell(4→5, tanh), T=4)"


def test_unrolled_states_equal_the_cell_stepped_by_hand() -> None:
    cell, x, h0, _ = rnn_problem()
    states = bp.unroll(cell, 6).forward(x=x, h0=h0)
    h = h0
    W_x, W_h, b = (cell.params[k].value for k in ("W_x", "W_h", "b"))
    for t in range(6):
        h = np.tanh(x[:, t] @ W_x.T + h @ W_h.T + b)
        np.testing.assert_allclose(states[:, t], h, rtol=1e-14)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("mode", ["fast", "explicit"])
def test_unrolled_rnn_matches_torch_nn_rnn(nonlinearity: str, mode: str) -> None:
    torch = _torch()
    cell, x, h0, seed = rnn_problem(nonlinearity)
    net = bp.unroll(cell, 6)
    states = net.forward(x=x, h0=h0)
    grads = net.backward(seed, mode=mode)

    rnn = torch.nn.RNN(4, 5, nonlinearity=nonlinearity, batch_first=True, dtype=torch.float64)
    b_split = np.random.default_rng(9).standard_normal(5)  # b = b_ih + b_hh, split anyhow
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.tensor(cell.params["W_x"].value))
        rnn.weight_hh_l0.copy_(torch.tensor(cell.params["W_h"].value))
        rnn.bias_ih_l0.copy_(torch.tensor(cell.params["b"].value - b_split))
        rnn.bias_hh_l0.copy_(torch.tensor(b_split))
    x_t, h0_t = tt(x, torch), tt(h0[None], torch)
    out_t, h_n = rnn(x_t, h0_t)
    out_t.backward(torch.tensor(seed))

    close(states, out_t)
    close(states[:, -1], h_n[0])
    close(grads.inputs["x"], x_t.grad)
    close(grads.inputs["h0"], h0_t.grad[0])
    close(grads.params[cell.params["W_x"]], rnn.weight_ih_l0.grad)
    close(grads.params[cell.params["W_h"]], rnn.weight_hh_l0.grad)
    close(grads.params[cell.params["b"]], rnn.bias_ih_l0.grad)  # ∂J/∂b_ih = ∂J/∂b_hh = ∂J/∂b
    close(grads.params[cell.params["b"]], rnn.bias_hh_l0.grad)


def test_unrolled_lstm_matches_torch_nn_lstm() -> None:
    torch = _torch()
    rng = np.random.default_rng(3)
    B, T, n_in, n = 2, 5, 3, 4
    cell = bp.LSTMCell(n_in, n, rng=rng)
    x = rng.standard_normal((B, T, n_in))
    h0, c0 = rng.standard_normal((2, B, n))
    seed = rng.standard_normal((B, T, n))
    net = bp.unroll(cell, T)
    assert net.input_names() == ["x", "h0", "c0"]
    states = net.forward(x=x, h0=h0, c0=c0)
    grads = net.backward(seed)

    lstm = torch.nn.LSTM(n_in, n, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.tensor(cell.params["W_x"].value))
        lstm.weight_hh_l0.copy_(torch.tensor(cell.params["W_h"].value))
        lstm.bias_ih_l0.copy_(torch.tensor(cell.params["b"].value))
        lstm.bias_hh_l0.zero_()
    x_t, h0_t, c0_t = tt(x, torch), tt(h0[None], torch), tt(c0[None], torch)
    out_t, _ = lstm(x_t, (h0_t, c0_t))
    out_t.backward(torch.tensor(seed))

    close(states, out_t)
    for name, g_t in (("x", x_t.grad), ("h0", h0_t.grad[0]), ("c0", c0_t.grad[0])):
        close(grads.inputs[name], g_t)
    close(grads.params[cell.params["W_x"]], lstm.weight_ih_l0.grad)
    close(grads.params[cell.params["W_h"]], lstm.weight_hh_l0.grad)
    close(grads.params[cell.params["b"]], lstm.bias_ih_l0.grad)


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell"])
def test_unrolled_cell_matches_torch_cell_modules_stepped_by_hand(kind: str) -> None:
    """``torch.nn.RNNCell`` / ``nn.LSTMCell`` called once per step, against the unrolled net."""
    torch = _torch()
    rng = np.random.default_rng(11)
    B, T, n_in, n = 3, 4, 2, 5
    cell = getattr(bp, kind)(n_in, n, rng=rng)
    module = getattr(torch.nn, kind)(n_in, n, dtype=torch.float64)
    with torch.no_grad():
        module.weight_ih.copy_(torch.tensor(cell.params["W_x"].value))
        module.weight_hh.copy_(torch.tensor(cell.params["W_h"].value))
        module.bias_ih.copy_(torch.tensor(cell.params["b"].value))
        module.bias_hh.zero_()
    x, seed = rng.standard_normal((B, T, n_in)), rng.standard_normal((B, T, n))
    state = [rng.standard_normal((B, n)) for _ in cell.states]
    net = bp.unroll(cell, T)
    states = net.forward({"x": x, **{f"{s}0": v for s, v in zip(cell.states, state, strict=True)}})
    grads = net.backward(seed)
    x_t = tt(x, torch)
    held = [tt(v, torch) for v in state]
    carry, outs = tuple(held) if kind == "LSTMCell" else held[0], []
    for t in range(T):
        carry = module(x_t[:, t], carry)
        outs.append(carry[0] if kind == "LSTMCell" else carry)
    out_t = torch.stack(outs, dim=1)
    out_t.backward(torch.tensor(seed))
    close(states, out_t)
    close(grads.inputs["x"], x_t.grad)
    for s, v in zip(cell.states, held, strict=True):
        close(grads.inputs[f"{s}0"], v.grad)
    close(grads.params[cell.params["W_x"]], module.weight_ih.grad)
    close(grads.params[cell.params["W_h"]], module.weight_hh.grad)
    close(grads.params[cell.params["b"]], module.bias_ih.grad)


def test_per_step_shares_sum_to_the_total_and_equal_untied_copies() -> None:
    """Each step's term of the tied gradient (eq. 14.47) is the gradient of that step's own
    copy of the weights when the copies are untied: computed here by torch, one leaf per
    step."""
    torch = _torch()
    cell, x, h0, seed = rnn_problem(T=5)
    net = bp.unroll(cell, 5)
    net.forward(x=x, h0=h0)
    grads = net.backward(seed)
    copies = {name: [tt(p.value, torch) for _ in range(5)] for name, p in cell.params.items()}
    h, outs = torch.tensor(h0), []
    for t in range(5):
        h = torch.rnn_tanh_cell(
            torch.tensor(x[:, t]), h, copies["W_x"][t], copies["W_h"][t], copies["b"][t], None
        )
        outs.append(h)
    torch.autograd.backward(outs, [torch.tensor(seed[:, t]) for t in range(5)])
    for name, p in cell.params.items():
        shares = dict(grads.per_use[p])
        assert list(shares) == [f"step{t}" for t in range(4, -1, -1)]  # reverse order
        np.testing.assert_allclose(sum(shares.values()), grads.params[p], rtol=1e-13)
        for t in range(5):
            close(shares[f"step{t}"], copies[name][t].grad)


def test_gradcheck_passes_on_an_unrolled_rnn_and_fails_on_a_wrong_backward() -> None:
    cell, x, h0, _ = rnn_problem(T=4, B=2, n_in=3, n=3)
    report = bp.gradcheck(bp.unroll(cell, 4), x=x, h0=h0)
    assert report.checks and report.worst < 1e-6

    class Leaky(bp.RNNCell):
        """g_h 0.1 % too large: the recurrence carries the error back through time."""

        def _step_backward(self, op: Any, g_out: Any, input_grad: bool) -> Any:
            (g_x, g_h), grads = super()._step_backward(op, g_out, input_grad)
            return (g_x, None if g_h is None else 1.001 * g_h), grads

    leaky = Leaky(3, 3, W_x=cell.params["W_x"].value, W_h=cell.params["W_h"].value)
    with pytest.raises(
        bp.GradcheckError, match="fast backward vs explicit Algorithm 14.1 disagree"
    ):
        bp.gradcheck(bp.unroll(leaky, 4), x=x, h0=h0)


def test_lstm_unrolled_gradcheck_and_zero_state() -> None:
    rng = np.random.default_rng(4)
    cell = bp.LSTMCell(2, 3, rng=rng)
    net = bp.unroll(cell, 3, h0="zeros")
    assert net.input_names() == ["x"]
    x = rng.standard_normal((2, 3, 2))
    assert bp.gradcheck(net, x=x).worst < 1e-6
    with_input = bp.unroll(cell, 3)
    zero = np.zeros((2, 3))
    np.testing.assert_array_equal(net.forward(x=x), with_input.forward(x=x, h0=zero, c0=zero))


def test_float32_stays_float32_through_the_unrolled_net() -> None:
    cell, x, h0, seed = rnn_problem()
    cell32 = bp.RNNCell(4, 5, W_x=cell.params["W_x"].value.astype(np.float32), rng=0)
    assert cell32.params["W_h"].dtype == np.float32
    net = bp.unroll(cell32, 6)
    out = net.forward(x=x.astype(np.float32), h0=h0.astype(np.float32))
    grads = net.backward(seed.astype(np.float32))
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in [*grads.inputs.values(), *grads.params.values()])


# ------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_node_and_change_nothing() -> None:
    cell, x, h0, _ = rnn_problem(T=4)
    net = bp.unroll(cell, 4)
    good = net.forward(x=x, h0=h0)
    with pytest.raises(ValueError, match=r"unstack.*Unstack\(T=4\).*\(3, 5, 4\).*4 steps"):
        net.forward(x=np.zeros((3, 5, 4)), h0=h0)
    with pytest.raises(ValueError, match=r"step0.*h has shape \(3, 4\), expected \(B, 5\)"):
        net.forward(x=x, h0=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"x_t has shape \(3, 2\), expected \(B, 4\)"):
        net.forward(x=np.zeros((3, 4, 2)), h0=h0)
    with pytest.raises(TypeError, match="float32 but the layer works in float64"):
        net.forward(x=x.astype(np.float32), h0=h0)
    # The failed calls changed nothing: backward still runs at the good forward.
    seed = np.ones_like(good)
    np.testing.assert_array_equal(net.backward(seed).inputs["h0"], net.backward(seed)["h0"])
    np.testing.assert_array_equal(net.forward(x=x, h0=h0), good)


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match="expected a recurrent cell .* got Linear"):
        bp.unroll(bp.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="T must be a positive integer, got 0"):
        bp.unroll(bp.RNNCell(2, 2), 0)
    with pytest.raises(ValueError, match="h0 must be one of input, zeros"):
        bp.unroll(bp.RNNCell(2, 2), 2, h0="random")
    with pytest.raises(ValueError, match="nonlinearity must be one of tanh, relu"):
        bp.RNNCell(2, 2, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"RNNCell\(2→3, tanh\): W_h: expected shape \(3, 3\)"):
        bp.RNNCell(2, 3, W_h=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="b was given but bias=False"):
        bp.LSTMCell(2, 3, bias=False, b=np.zeros(12))
    with pytest.raises(ValueError, match="n_hidden must be a positive integer"):
        bp.LSTMCell(2, 0)
    with pytest.raises(TypeError, match=r"LSTMCell\(2→3\)\.backward takes a tuple of 2 gradients"):
        cell = bp.LSTMCell(2, 3)
        cell.forward(np.zeros((1, 2)), np.zeros((1, 3)), np.zeros((1, 3)))
        cell.backward(np.zeros((1, 3)))


def test_cells_are_initialised_as_torch_does() -> None:
    """Uniform in ±1/sqrt(n_hidden); b is the sum of two such draws (b_ih + b_hh)."""
    cell = bp.LSTMCell(50, 100, rng=0)
    bound = 1 / np.sqrt(100)
    for name in ("W_x", "W_h"):
        w = cell.params[name].value
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
        assert abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound  # a uniform's spread
    b = cell.params["b"].value
    assert np.abs(b).max() <= 2 * bound and np.abs(b).max() > bound  # beyond one draw
    assert abs(b.std() - bound * np.sqrt(2 / 3)) < 0.1 * bound  # the sum of two


# ------------------------------------------------------------------ truncation


def test_stop_state_gradient_cuts_only_the_state() -> None:
    rng = np.random.default_rng(5)
    cell = bp.LSTMCell(2, 3, rng=rng)
    xs = (rng.standard_normal((2, 2)), rng.standard_normal((2, 3)), rng.standard_normal((2, 3)))
    cell.forward(*xs)
    g = (rng.standard_normal((2, 3)), rng.standard_normal((2, 3)))
    (g_x, g_h, g_c), grads = cell.backward(g)
    (L_x, L_h, L_c), L_theta = cell.jacobians()
    cell.stop_state_gradient = True
    (g_x2, g_h2, g_c2), grads2 = cell.backward(g)
    assert g_h2 is None and g_c2 is None
    np.testing.assert_array_equal(g_x2, g_x)
    for name in grads:
        np.testing.assert_array_equal(grads2[name], grads[name])
    (L_x2, L_h2, L_c2), _ = cell.jacobians()
    assert L_h2 is None and L_c2 is None
    np.testing.assert_array_equal(L_x2.to_dense(), L_x.to_dense())


def test_cut_steps() -> None:
    assert cut_steps(10, 3) == [7, 4, 1]
    assert cut_steps(9, 3) == [6, 3]
    assert cut_steps(5, 5) == [] and cut_steps(5, 8) == []
    assert cut_steps(4, 1) == [3, 2, 1]


def _torch_truncated(cell: Any, x: Any, h0: Any, seed: Any, k: int, torch: Any) -> dict[str, Any]:
    """PyTorch's recipe for truncated BPTT: ``h.detach()`` where each window of k starts."""
    T = x.shape[1]
    params = {name: tt(p.value, torch) for name, p in cell.params.items()}
    h, outs = tt(h0, torch), []
    for t in range(T):
        if t in cut_steps(T, k):
            h = h.detach()
        h = torch.rnn_tanh_cell(
            torch.tensor(x[:, t]), h, params["W_x"], params["W_h"], params["b"], None
        )
        outs.append(h)
    torch.autograd.backward(outs, [torch.tensor(seed[:, t]) for t in range(T)])
    return {name: p.grad for name, p in params.items()}


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 20])
def test_truncated_gradient_matches_torch_detach(k: int) -> None:
    torch = _torch()
    cell, x, h0, seed = rnn_problem(T=7)
    net = bp.unroll(cell, 7)
    net.forward(x=x, h0=h0)
    exact = net.backward(seed)
    with bp.truncated(net, k):
        cut = net.backward(seed)
    assert not any(step.stop_state_gradient for step in net.steps)  # restored on leaving
    expected = _torch_truncated(cell, x, h0, seed, k, torch)
    for name, p in cell.params.items():
        close(cut.params[p], expected[name])
        if k >= 7:
            np.testing.assert_array_equal(cut.params[p], exact.params[p])
        else:
            assert not np.allclose(cut.params[p], exact.params[p])


def test_truncation_of_a_loss_on_the_last_state_keeps_the_last_k_steps() -> None:
    """With a loss on h_T only, the truncated gradient is the sum of the last k steps'
    shares of the exact one (those the cut does not reach)."""
    cell, x, h0, seed = rnn_problem(T=8)
    seed[:, :-1] = 0.0
    net = bp.unroll(cell, 8)
    net.forward(x=x, h0=h0)
    exact = net.backward(seed)
    for k in (1, 3, 8):
        with bp.truncated(net, k):
            cut = net.backward(seed)
        for p in cell.params.values():
            shares = dict(exact.per_use[p])
            kept = sum(shares[f"step{t}"] for t in range(8 - k, 8))
            np.testing.assert_allclose(cut.params[p], kept, rtol=1e-12, atol=1e-15)


def test_truncation_error_shrinks_to_zero_as_k_grows() -> None:
    cell, x, h0, seed = rnn_problem(T=10, n=6)
    seed[:, :-1] = 0.0  # a loss on the last state
    net = bp.unroll(cell, 10)
    net.forward(x=x, h0=h0)
    errors = bp.truncation_error(net, range(1, 12), seed)
    values = [errors[k] for k in range(1, 12)]
    assert values[0] > 0.1
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert errors[10] == errors[11] == 0.0


def test_fit_with_truncation_trains_with_the_truncated_gradient() -> None:
    rng = np.random.default_rng(6)
    T, n = 6, 4
    model = bp.Graph()
    x = model.input("x")
    states = model.add(bp.unroll(bp.RNNCell(2, n, rng=rng), T, h0="zeros"), x, name="rnn")
    last = model.add(bp.layers.backward.Slice((T - 1) * n, T * n), states, name="h_T")
    model.output(model.add(bp.Linear(n, 1, rng=rng), last, name="readout"))
    X, y = rng.standard_normal((40, T, 2)), rng.standard_normal((40, 1))
    start = {p: p.value for p in model.parameters()}

    def run(truncate: int | None) -> list[np.ndarray]:
        for p, v in start.items():
            p.value = v
        opt = bp.SGD(model.parameters(), lr=0.1)
        bp.fit(model, X, y, loss=bp.L2Loss(), epochs=1, batch_size=40, optimizer=opt,
               progress=False, truncate=truncate)  # fmt: skip
        return [p.value.copy() for p in model.parameters()]

    full, cut, by_hand = run(None), run(2), []
    # The same one step by hand: truncated gradient, then θ ← θ − η g.
    for p, v in start.items():
        p.value = v
    loss = bp.L2Loss()
    y_hat = model.forward(x=X)
    loss.forward(y_hat, y)
    (g, _), _ = loss.backward()
    with bp.truncated(model, 2):
        grads = model.backward(g).params
    by_hand = [start[p] - 0.1 * grads[p] for p in model.parameters()]
    for a, b in zip(cut, by_hand, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not all(np.allclose(a, b) for a, b in zip(cut, full, strict=True))
    assert not any(step.stop_state_gradient for step in model["rnn"].steps)


def test_truncation_refuses_what_it_cannot_cut() -> None:
    net = bp.Sequential([bp.Linear(2, 2)])
    with pytest.raises(ValueError, match="no unrolled recurrence to truncate"):
        bp.truncated(net, 3)
    with pytest.raises(ValueError, match="fit: the truncation k must be a positive integer"):
        bp.fit(bp.unroll(bp.RNNCell(1, 1), 2, h0="zeros"), np.zeros((2, 2, 1)),
               np.zeros((2, 2, 1)), loss=bp.L2Loss(), truncate=0)  # fmt: skip
    with pytest.raises(TypeError, match="expected a Graph or a Sequential"):
        bp.truncated(bp.RNNCell(1, 1), 2)
    bp.truncated(net, None)  # None: nothing to cut, nothing refused


# ------------------------------------------------------------------ the state Jacobians


def test_state_jacobians_match_finite_differences_and_torch() -> None:
    torch = _torch()
    cell, x, h0, _ = rnn_problem(T=5, B=2)
    net = bp.unroll(cell, 5)
    net.forward(x=x, h0=h0)
    J = state_jacobians(net)
    assert len(J) == 5 and J[0].shape == (5, 5) and J[0].batch == 2
    # ∂h_T/∂h_0 by finite differences of the whole net in h_0
    numeric = bp.numerical_jacobian(lambda h: net.forward(x=x, h0=h, cache=False)[:, -1], h0)
    np.testing.assert_allclose(J[0].to_dense(), numeric, rtol=1e-7, atol=1e-9)
    # every ∂h_T/∂h_t by torch.autograd.functional.jacobian, per example
    net.forward(x=x, h0=h0)
    states = net.forward(x=x, h0=h0)
    W = {k: torch.tensor(p.value) for k, p in cell.params.items()}
    for t in range(5):
        h_t = h0 if t == 0 else states[:, t - 1]
        for b in range(2):

            def to_end(h: Any, t: int = t, b: int = b) -> Any:
                for s in range(t, 5):
                    xs = torch.tensor(x[b : b + 1, s])
                    h = torch.rnn_tanh_cell(xs, h[None], W["W_x"], W["W_h"], W["b"], None)[0]
                return h

            jac = torch.autograd.functional.jacobian(to_end, torch.tensor(h_t[b]))
            close(J[t].to_dense()[b], jac, rtol=1e-11, atol=1e-13)


def test_step_jacobians_are_the_chapters_R_W() -> None:
    cell, x, h0, _ = rnn_problem(T=3)
    net = bp.unroll(cell, 3)
    states = net.forward(x=x, h0=h0)
    W_h = cell.params["W_h"].value
    for t, L in enumerate(step_jacobians(net)):
        assert isinstance(L, bp.jacobian.Product) and "1 − h'²" in L.label and "W_h" in L.label
        R = 1 - states[:, t] ** 2  # tanh' at step t, from h_{t+1}
        np.testing.assert_allclose(L.to_dense(), R[:, :, None] * W_h, rtol=1e-14)


def test_vanishing_ratio_obeys_the_singular_value_bound() -> None:
    """‖∂h_T/∂h_1‖ / ‖∂h_T/∂h_{T−1}‖ ≤ Π_{s=2}^{T−1} σ_max(L_s) ≤ σ_max(W_h)^{T−2}
    for tanh (|f'| ≤ 1); with σ_max(W_h) < 1 the gradient vanishes geometrically."""
    rng = np.random.default_rng(7)
    n, T = 6, 12
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    cell = bp.RNNCell(3, n, W_h=0.8 * Q, rng=rng)  # every singular value of W_h is 0.8
    net = bp.unroll(cell, T)
    net.forward(x=rng.standard_normal((4, T, 3)), h0=rng.standard_normal((4, n)))
    norms = gradient_norms(net)  # (B, T): t = 0 … T−1
    steps = singular_values(step_jacobians(net))  # (B, T, n): L_1 … L_T
    ratio = norms[:, 1] / norms[:, T - 1]  # ∂h_T/∂h_1 over ∂h_T/∂h_{T−1}
    bound = np.prod(steps[:, 1 : T - 1, 0], axis=1)  # σ_max of L_2 … L_{T−1}
    assert np.all(ratio <= bound * (1 + 1e-12))
    assert np.all(bound <= 0.8 ** (T - 2) * (1 + 1e-12))
    assert np.all(ratio < 0.8 ** (T - 2))  # vanished: a factor ~ 0.07 or less
    np.testing.assert_allclose(norms[:, T - 1], steps[:, T - 1, 0], rtol=1e-12)  # ‖L_T‖


def test_exploding_ratio_obeys_the_lower_bound() -> None:
    """ReLU with every unit active and W_h = 1.3 P (P a permutation, which keeps a positive
    state positive): each L_t = W_h, all of whose singular values are 1.3, so
    ‖∂h_T/∂h_t‖ = 1.3^{T−t}: the gradient explodes."""
    rng = np.random.default_rng(8)
    n, T = 5, 10
    P = np.eye(n)[rng.permutation(n)]
    cell = bp.RNNCell(2, n, nonlinearity="relu", W_h=1.3 * P, W_x=np.zeros((n, 2)), b=np.zeros(n))
    net = bp.unroll(cell, T)
    h0 = np.abs(rng.standard_normal((3, n))) + 1.0
    net.forward(x=np.zeros((3, T, 2)), h0=h0)
    norms = gradient_norms(net)
    steps = singular_values(step_jacobians(net))
    lower = np.prod(steps[:, :, -1], axis=1)  # Π σ_min(L_t) ≤ ‖∂h_T/∂h_0‖
    assert np.all(norms[:, 0] >= lower * (1 - 1e-12))
    np.testing.assert_allclose(norms, np.tile(1.3 ** np.arange(T, 0, -1), (3, 1)), rtol=1e-10)


def test_lstm_state_jacobians_cover_h_and_c() -> None:
    rng = np.random.default_rng(9)
    cell = bp.LSTMCell(2, 3, rng=rng)
    net = bp.unroll(cell, 4)
    x, h0, c0 = rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 3)), np.zeros((2, 3))
    net.forward(x=x, h0=h0, c0=c0)
    J = state_jacobians(net)
    assert J[0].shape == (6, 6)  # (h, c) stacked

    def end_state(hc: np.ndarray) -> np.ndarray:
        """(h_T, c_T) from (h_0, c_0), stepping a copy of the cell by hand."""
        state, probe = (hc[:, :3], hc[:, 3:]), cell.shared_copy()
        for t in range(4):
            state = probe.forward(x[:, t], *state)
        return np.concatenate(state, axis=1)

    numeric = bp.numerical_jacobian(end_state, np.concatenate([h0, c0], axis=1))
    np.testing.assert_allclose(J[0].to_dense(), numeric, rtol=1e-7, atol=1e-9)
    with bp.truncated(net, 2), pytest.raises(RuntimeError, match="inside bp.truncated"):
        step_jacobians(net)


def test_diagnostics_need_a_forward_and_an_unrolled_net() -> None:
    net = bp.unroll(bp.RNNCell(2, 2), 3)
    with pytest.raises(RuntimeError, match="no forward pass yet"):
        gradient_norms(net)
    with pytest.raises(TypeError, match="expected an unrolled net"):
        gradient_norms(bp.Sequential([bp.Linear(2, 2)]))  # type: ignore[arg-type]


def test_a_new_parameter_value_is_used_at_the_next_forward() -> None:
    """The cells keep a contiguous copy of each Wᵀ while the Parameter holds the same
    array; an optimizer's new array must be read at the next forward."""
    cell, x, h0, seed = rnn_problem(T=3)
    net = bp.unroll(cell, 3)
    net.forward(x=x, h0=h0)
    bp.SGD(net.parameters(), lr=0.5).step(net.backward(seed).params)
    states, h = net.forward(x=x, h0=h0), h0
    W_x, W_h, b = (cell.params[k].value for k in ("W_x", "W_h", "b"))
    for t in range(3):
        h = np.tanh(x[:, t] @ W_x.T + h @ W_h.T + b)
        np.testing.assert_allclose(states[:, t], h, rtol=1e-14)
