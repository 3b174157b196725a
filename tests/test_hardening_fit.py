"""``fit``, ``predict``, the losses and the optimizers on bad input: every array is
checked before the first step, an error names the argument and its first bad row,
and nothing changes; no NaN passes silently; Ctrl-C keeps the History."""

from __future__ import annotations

import os
import re
import signal
import warnings

import numpy as np
import pytest

import backprop as bp
from backprop import train_checks

N, D, C = 40, 3, 4


def mlp(seed: int = 0, dtype: type = np.float64, dropout: bool = False) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    layers: list[bp.Layer] = [bp.Linear(D, 8, rng=rng, dtype=dtype), bp.Tanh()]
    if dropout:
        layers.append(bp.Dropout(0.3, rng=seed))
    return bp.Sequential([*layers, bp.Linear(8, C, rng=rng, dtype=dtype)])


def data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)), rng.integers(0, C, N)


def snapshot(model, optimizer=None) -> list[np.ndarray]:
    out = [p.value.copy() for p in model.parameters()]
    if optimizer is not None:
        for p in optimizer.params:
            out += [np.array(v, copy=True) for v in optimizer.state[p].values()]
    return out


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def with_entry(a: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    a = a.copy()
    a[index] = value
    return a


X0, Y0 = data()
BAD = [
    # (X, y, validation, error, the words of the message)
    (with_entry(X0, (17, 2), np.nan), Y0, None, ValueError, [r"X\[17\] holds NaN or inf"]),
    (with_entry(X0, (5, 0), np.inf), Y0, None, ValueError, [r"X\[5\] holds NaN or inf"]),
    (
        X0,
        with_entry(Y0, (11,), C),
        None,
        ValueError,
        [r"y\[11\] holds the label 4, outside 0\.\.3"],
    ),
    (X0, with_entry(Y0, (3,), -1), None, ValueError, [r"y\[3\] holds the label -1"]),
    (
        X0.astype(np.float32),
        Y0,
        None,
        TypeError,
        ["X is float32 but the layer works in float64"],
    ),
    (X0.astype(np.int64), Y0, None, TypeError, ["X .* does not fit the model", "integer dtype"]),
    (X0, Y0.astype(str), None, TypeError, ["y has dtype <U"]),
    (X0[:, :2], Y0, None, ValueError, [r"X \(shape \(40, 2\)\) does not fit the model", "Linear"]),
    (X0[:0], Y0[:0], None, ValueError, ["empty"]),
    (X0, Y0[:-1], None, ValueError, [r"X has shape \(40, 3\) and y has shape \(39,\)"]),
    (X0, Y0, (with_entry(X0, (8, 1), np.nan), Y0), ValueError, [r"validation X\[8\] holds NaN"]),
    (X0, Y0, (X0, with_entry(Y0, (9,), 7)), ValueError, [r"validation y\[9\] holds the label 7"]),
    (X0, Y0, (X0[:5], Y0[:4]), ValueError, ["validation X has shape"]),
    (X0, Y0, (X0[:, :1], Y0), ValueError, [r"validation X \(shape \(40, 1\)\) does not fit"]),
    (X0, Y0, X0, TypeError, ["validation must be a pair"]),
    ([[1.0, 2.0, 3.0], [1.0]], Y0[:2], None, ValueError, ["X is not a rectangular array"]),
    (X0, Y0, (X0[:2], [[1], [2, 3]]), ValueError, ["validation y is not a rectangular"]),
]


@pytest.mark.parametrize("X, y, validation, error, words", BAD)
def test_bad_data_is_refused_before_the_first_step(X, y, validation, error, words) -> None:
    net = mlp()
    opt = bp.Adam(net, lr=0.1)
    opt.step({p: np.ones(p.shape) for p in net.parameters()})  # some state to protect
    before = snapshot(net, opt)
    with pytest.raises(error) as info:
        bp.fit(net, X, y, optimizer=opt, validation=validation, epochs=2, progress=False)
    for w in words:
        assert re.search(w, str(info.value)), f"{w!r} not in {info.value}"
    assert str(info.value).startswith("fit: ")
    assert same(snapshot(net, opt), before)
    assert all(layer._op is None for layer in net.layers)  # no operating point left behind


def test_the_check_runs_in_eval_mode_and_puts_modes_and_statistics_back() -> None:
    rng = np.random.default_rng(0)
    bn = bp.BatchNorm1d(8)
    drop = bp.Dropout(0.5, rng=3)
    net = bp.Sequential([bp.Linear(D, 8, rng=rng), bn, drop, bp.Linear(8, C, rng=rng)])
    net.forward(X0)  # an operating point to keep
    ops = [layer._op for layer in net.layers]
    stats = bn.running_mean.copy(), bn.running_var.copy()
    state = drop._rng.bit_generator.state
    with pytest.raises(ValueError, match=r"y\[0\] holds the label 9"):
        bp.fit(net, X0, with_entry(Y0, (0,), 9), progress=False)
    assert net.training and bn.training and drop.training
    assert [layer._op for layer in net.layers] == ops
    np.testing.assert_array_equal(bn.running_mean, stats[0])
    np.testing.assert_array_equal(bn.running_var, stats[1])
    assert drop._rng.bit_generator.state == state
    net.backward(np.ones((N, C)))  # the cached forward is still the model's


def test_a_model_in_eval_mode_stays_in_eval_mode() -> None:
    net = mlp(dropout=True).eval()
    bp.fit(net, X0, Y0, epochs=1, progress=False)
    assert not net.training and not net.layers[2].training


def test_float32_data_for_a_float32_model_and_l2_targets() -> None:
    net = mlp(dtype=np.float32)
    X = X0.astype(np.float32)
    bp.fit(net, X, Y0, epochs=1, progress=False)
    with pytest.raises(TypeError, match="y .*float64.*L2Loss"):
        bp.fit(net, X, np.zeros((N, C)), loss=bp.L2Loss(), progress=False)
    with pytest.raises(ValueError, match=r"y\[2\] holds NaN"):
        bp.fit(net, X, with_entry(np.zeros((N, C), np.float32), (2, 1), np.nan), loss=bp.L2Loss())
    with pytest.raises(
        ValueError, match=r"L2Loss.*y_hat has shape \(1, 4\) but y has shape \(1, 3\)"
    ):
        bp.fit(net, X, np.zeros((N, 3), np.float32), loss=bp.L2Loss(), progress=False)


def test_a_model_ending_in_its_loss_gets_the_same_checks() -> None:
    net = bp.Sequential([*mlp().layers, bp.SoftmaxCrossEntropy()])
    with pytest.raises(ValueError, match=r"y\[6\] holds the label 4"):
        bp.fit(net, X0, with_entry(Y0, (6,), 4), progress=False)
    bp.fit(net, X0, Y0, epochs=1, progress=False)


def test_a_model_without_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="no parameters to train"):
        bp.fit(bp.Sequential([bp.Tanh()]), X0, Y0, progress=False)


# ------------------------------------------------------------------ overflow while training


def test_a_cost_that_overflows_names_the_step_and_the_logits() -> None:
    rng = np.random.default_rng(0)
    net = bp.Sequential([bp.Linear(D, 8, rng=rng), bp.ReLU(), bp.Linear(8, C, rng=rng)])
    opt = bp.SGD(net, lr=1e150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow in the products
        with pytest.raises(ValueError) as info:
            bp.fit(net, X0 * 1e150, Y0, optimizer=opt, batch_size=8, progress=False)
    message = str(info.value)
    assert message.startswith("fit: epoch 1, minibatch 2 of 5")
    assert "the model's output or the loss overflowed" in message
    assert "data are finite" in message
    assert "logits (shape (8, 4)) has" in message and "non-finite entries" in message


def test_a_gradient_that_overflows_names_the_parameter_and_says_the_loss_was_finite() -> None:
    rng = np.random.default_rng(0)
    blowup = bp.Pointwise(lambda x: x, lambda x: np.full_like(x, np.inf))
    net = bp.Sequential([bp.Linear(D, 8, rng=rng), blowup, bp.Linear(8, C, rng=rng)])
    before = snapshot(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError) as info:
            bp.fit(net, X0, Y0, optimizer=bp.SGD(net, lr=0.1), progress=False)
    message = str(info.value)
    assert "fit: epoch 1, minibatch 1 of 2" in message
    assert "the loss was finite (J = " in message and "a gradient overflowed" in message
    assert "the gradient of parameter '0.W'" in message and "no parameter was updated" in message
    assert same(snapshot(net), before)


def test_the_optimizer_alone_names_the_parameter_by_its_model_name() -> None:
    net = mlp()
    p = net[2].b
    with pytest.raises(ValueError, match=r"gradient of parameter '2\.b' \(4,\) has 1 non-finite"):
        bp.SGD(net, lr=0.1).step({p: np.array([0.0, 0.0, np.nan, 0.0])})


# ------------------------------------------------------------------ no silent NaN


@pytest.mark.parametrize(
    "loss, inputs",
    [
        (bp.SoftmaxCrossEntropy(), (np.zeros((0, 3)), np.zeros(0, int))),
        (bp.SoftmaxCrossEntropy(), (np.zeros((2, 3, 0)), np.zeros((2, 0), int))),
        (bp.L2Loss(), (np.zeros((0, 2)), np.zeros((0, 2)))),
    ],
)
def test_an_empty_batch_is_an_error_in_every_loss(loss, inputs) -> None:
    with pytest.raises(ValueError, match="empty|no labelled position"):
        loss.forward(*inputs)
    assert loss._op is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_named(bad: float) -> None:
    loss = bp.SoftmaxCrossEntropy()
    z = np.zeros((3, 4))
    loss.forward(z, np.zeros(3, int))
    op = loss._op
    z[2, 0] = bad
    with pytest.raises(
        ValueError, match=r"logits \(shape \(3, 4\)\) has 1 non-finite .* example 2"
    ):
        loss.forward(z, np.zeros(3, int))  # the label 0 sits on the bad entry
    assert loss._op is op


def test_an_l2_cost_that_overflows_says_so() -> None:
    loss = bp.L2Loss()
    with pytest.raises(
        ValueError, match="inputs are finite, so the cost itself overflowed float32"
    ):
        loss.forward(np.full((2, 2), 1e30, np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"y \(shape \(2, 2\)\) has 1 non-finite"):
        loss.forward(np.zeros((2, 2)), with_entry(np.zeros((2, 2)), (1, 1), np.nan))


def test_predict_and_accuracy_refuse_an_empty_batch_and_chunk() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="predict: X must be a non-empty batch"):
        bp.predict(net, np.zeros((0, D)))
    with pytest.raises(ValueError, match="accuracy: X must be a non-empty batch"):
        bp.accuracy(net, np.zeros((0, D)), np.zeros(0, int))
    whole = net.forward(X0, cache=False)
    np.testing.assert_array_equal(bp.predict(net, X0, batch_size=7), whole)
    expected = np.mean(np.argmax(whole, axis=1) == Y0)
    assert bp.accuracy(net, X0, Y0, batch_size=7) == expected
    assert bp.accuracy(net, X0, Y0, batch_size=1) == expected


# ------------------------------------------------------------------ memory, seeds, Ctrl-C


def test_a_batch_over_the_activation_budget_warns_with_the_figure(monkeypatch) -> None:
    # One example of the MLP: x (3) + Linear (8) + Tanh (8) + Linear (4) = 23 float64s.
    monkeypatch.setattr(train_checks, "ACTIVATION_BUDGET", 23 * 8 * 10)
    with pytest.warns(UserWarning, match=r"minibatch of 16 examples .* \(184 bytes per example\)"):
        bp.fit(mlp(), X0, Y0, epochs=1, batch_size=16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bp.fit(mlp(), X0, Y0, epochs=1, batch_size=10, progress=False)  # 1840 bytes: within


def test_rng_is_the_name_and_seed_its_alias() -> None:
    runs = []
    for kwargs in ({"rng": 5}, {"seed": 5}, {"rng": np.random.default_rng(5)}):
        net = mlp()
        runs.append(bp.fit(net, X0, Y0, epochs=2, progress=False, **kwargs).train_loss)
    assert runs[0] == runs[1] == runs[2]
    with pytest.raises(TypeError, match="not both"):
        bp.fit(mlp(), X0, Y0, rng=1, seed=1, progress=False)
    with pytest.raises(TypeError, match="rng must be an int"):
        bp.fit(mlp(), X0, Y0, rng="1", progress=False)


def test_a_generator_carries_on_from_one_call_to_the_next() -> None:
    straight, split = mlp(), mlp()
    bp.fit(straight, X0, Y0, epochs=4, rng=np.random.default_rng(3), progress=False)
    opt, rng = bp.Adam(split, lr=1e-3), np.random.default_rng(3)
    bp.fit(split, X0, Y0, epochs=2, optimizer=opt, rng=rng, progress=False)
    bp.fit(split, X0, Y0, epochs=2, optimizer=opt, rng=rng, progress=False)
    assert same(snapshot(straight), snapshot(split))


class Interrupting(bp.Layer):
    """The identity, which sends this process a SIGINT (or raises) on call ``at``."""

    def __init__(self, at: int, raise_it: bool = False) -> None:
        super().__init__()
        self.calls, self.at, self.raise_it = 0, at, raise_it

    def _forward(self, op, x_in):
        self.calls += 1
        if self.calls == self.at:
            if self.raise_it:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return x_in.copy()

    def _jacobians(self, op):
        from backprop.jacobian import Identity

        x = op.x_in[0]
        return Identity(x[0].size, x.shape[0], x.dtype), {}


@pytest.mark.parametrize("raise_it", [False, True], ids=["sigint", "raised"])
def test_ctrl_c_returns_the_history_of_the_complete_epochs(raise_it: bool, capsys) -> None:
    rng = np.random.default_rng(0)
    stopper = Interrupting(at=1 + 4 + 2, raise_it=raise_it)  # the dry run, 4 steps an epoch
    net = bp.Sequential([bp.Linear(D, C, rng=rng), stopper])
    opt = bp.Adam(net)
    history = bp.fit(net, X0, Y0, epochs=5, batch_size=10, optimizer=opt, progress="plain")
    assert history.interrupted
    assert history.epoch == [1] and len(history.train_loss) == 1
    assert "interrupted" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert stopper.calls == 1 + 4 + 2  # nothing ran after the interrupted step
    # A SIGINT lets its step finish (6 updates); a KeyboardInterrupt raised inside the
    # step's forward stops it before its update (5).
    assert opt.state[net[0].W]["t"] == (5 if raise_it else 6)
    assert not history.as_dict().keys() & {"interrupted"}


def test_a_second_sigint_raises_at_once() -> None:
    class Twice(Interrupting):
        def _forward(self, op, x_in):
            if self.calls + 1 == self.at:
                os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
            return super()._forward(op, x_in)  # the second, at once

    rng = np.random.default_rng(0)
    twice = Twice(at=2)  # call 1 is the dry run; both SIGINTs come in call 2
    net = bp.Sequential([bp.Linear(D, C, rng=rng), twice])
    opt = bp.Adam(net)
    history = bp.fit(net, X0, Y0, epochs=5, batch_size=10, optimizer=opt, progress=False)
    assert history.interrupted and history.epoch == []
    assert twice.calls == 2  # the first step, during which both signals came
    assert opt.state[net[0].W] == {}  # the second one stopped it before its update


# ------------------------------------------------------------------ optimizers


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda ps: bp.SGD(ps, lr="0.1"), TypeError, "SGD: lr must be a number, got '0.1'"),
        (lambda ps: bp.SGD(ps, lr=True), TypeError, "lr must be a number"),
        (lambda ps: bp.Adam(ps, lr=None), TypeError, "Adam: lr must be a number"),
        (lambda ps: bp.SGD(ps, lr=0.1, momentum="0.9"), TypeError, "momentum must be a number"),
        (lambda ps: bp.Adam(ps, betas=(0.9, "0.99")), TypeError, r"betas\[1\] must be a number"),
        (lambda ps: bp.Adam(ps, betas=0.9), ValueError, "betas must be a pair"),
        (lambda ps: bp.Adam([]), ValueError, "Adam: no parameters to update"),
        (lambda ps: bp.SGD([], lr=0.1), ValueError, "SGD: no parameters to update"),
        (lambda ps: bp.SGD(bp.Sequential([bp.ReLU()]), lr=0.1), ValueError, "no parameters"),
        (
            lambda ps: bp.SGD(ps, lr=0.1, nesterov=True),
            ValueError,
            "nesterov=True needs a momentum",
        ),
        (lambda ps: bp.SGD(ps, lr=0.1, momentum=0.9, nesterov=1), TypeError, "nesterov must be"),
        (lambda ps: bp.Adam(3), TypeError, "Adam: params must be Parameters"),
    ],
)
def test_optimizers_refuse_bad_settings(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make([bp.Parameter(np.ones(2))])


def test_numpy_numbers_are_rates() -> None:
    p = bp.Parameter(np.ones(2))
    assert bp.SGD([p], lr=np.float32(0.5), momentum=np.float64(0.5)).lr == 0.5
    assert repr(bp.SGD([p], lr=0.1, momentum=0.9, nesterov=True)) == (
        "SGD(lr=0.1, momentum=0.9, nesterov=True)"
    )


def test_nesterov_by_hand() -> None:
    # v1 = g1, θ1 = θ0 - η(g1 + μ v1); v2 = μ v1 + g2, θ2 = θ1 - η(g2 + μ v2)
    p = bp.Parameter(np.array([1.0]))
    opt = bp.SGD([p], lr=0.1, momentum=0.5, nesterov=True)
    opt.step({p: np.array([2.0])})
    np.testing.assert_allclose(p.value, [1.0 - 0.1 * (2.0 + 0.5 * 2.0)], rtol=1e-15)
    opt.step({p: np.array([-1.0])})
    v2 = 0.5 * 2.0 - 1.0
    np.testing.assert_allclose(p.value, [0.7 - 0.1 * (-1.0 + 0.5 * v2)], rtol=1e-15)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_nesterov_equals_torch(weight_decay: float) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    values = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    params = [bp.Parameter(v) for v in values]
    tensors = [torch.tensor(v, requires_grad=True) for v in values]
    hyper = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": weight_decay}
    opt, opt_t = bp.SGD(params, **hyper), torch.optim.SGD(tensors, **hyper)
    for _ in range(6):
        grads = [rng.standard_normal(v.shape) for v in values]
        opt.step(dict(zip(params, grads, strict=True)))
        for t, g in zip(tensors, grads, strict=True):
            t.grad = torch.tensor(g)
        opt_t.step()
        for p, t in zip(params, tensors, strict=True):
            np.testing.assert_allclose(p.value, t.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert not np.allclose(params[0].value, values[0])


# ------------------------------------------------------------------ small frictions


def test_datasets_is_reachable_after_import_backprop() -> None:
    assert bp.datasets.load_digits is not None
    X, y = bp.datasets.make_spirals(10, 2, rng=0)
    assert X.shape == (20, 2)


def test_a_ragged_input_is_named() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="Sequential.forward: input 'x' is not an array"):
        net.forward([[1.0, 2.0, 3.0], [1.0]])
    with pytest.raises(ValueError, match="predict: X is not a rectangular array"):
        bp.predict(net, [[1.0, 2.0, 3.0], [1.0]])


def test_gradcheck_takes_rng_and_its_old_name_seed() -> None:
    net = bp.Sequential([bp.Linear(2, 2, rng=np.random.default_rng(0)), bp.Tanh()])
    x = np.random.default_rng(1).standard_normal((2, 2))
    assert bp.gradcheck(net, x, rng=3).worst == bp.gradcheck(net, x, seed=3).worst
    bp.gradcheck(net, x, rng=np.random.default_rng(3))
    with pytest.raises(TypeError, match="not both"):
        bp.gradcheck(net, x, rng=1, seed=1)


def test_sequential_errors_give_the_layer_position_and_graph_asks_for_names() -> None:
    net = bp.Sequential([bp.Linear(3, 4), bp.ReLU(), bp.Linear(5, 2)])
    with pytest.raises(ValueError, match=r"Sequential layer 2 \(Linear\(5→2\)\)"):
        net.forward(np.ones((2, 3)))
    g = bp.Graph()
    g.output(g.add(bp.ReLU(), g.input("x")))
    with pytest.raises(TypeError, match=r"pass the inputs by name, forward\(x=\.\.\.\)"):
        g.forward(np.ones((2, 3)))
