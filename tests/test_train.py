"""``fit``, ``predict`` and ``accuracy`` over Sequential and Graph models."""

from __future__ import annotations

import re

import numpy as np
import pytest

import backprop as bp
from backprop.datasets import make_spirals, train_test_split


def mlp(seed: int = 0, loss: bool = False) -> bp.Sequential:
    rng = np.random.default_rng(seed)
    layers: list[bp.Layer] = [
        bp.Linear(2, 64, rng=rng),
        bp.Tanh(),
        bp.Linear(64, 64, rng=rng),
        bp.Tanh(),
        bp.Linear(64, 3, rng=rng),
    ]
    return bp.Sequential(layers + ([bp.SoftmaxCrossEntropy()] if loss else []))


@pytest.fixture(scope="module")
def spirals():
    X, y = make_spirals(100, 3, noise=0.1, rng=0)
    return train_test_split(X, y, test_fraction=0.25, rng=0)


def logits_by_hand(net: bp.Sequential, X: np.ndarray) -> np.ndarray:
    """The MLP above in plain numpy, from its parameter values."""
    W1, b1, W2, b2, W3, b3 = (p.value for p in net.parameters())
    return np.tanh(np.tanh(X @ W1.T + b1) @ W2.T + b2) @ W3.T + b3


def test_fit_learns_spirals(spirals) -> None:
    X_train, X_test, y_train, y_test = spirals
    net = mlp()
    history = bp.fit(
        net,
        X_train,
        y_train,
        epochs=150,
        batch_size=32,
        optimizer=bp.Adam(net, lr=1e-2),
        validation=(X_test, y_test),
        progress=False,
    )
    # accuracy measured independently of the library's forward pass
    held_out = np.mean(np.argmax(logits_by_hand(net, X_test), axis=1) == y_test)
    assert held_out >= 0.95
    assert bp.accuracy(net, X_test, y_test) == held_out
    assert history.val_accuracy[-1] == held_out
    assert history.train_accuracy[-1] >= 0.95
    assert history.train_loss[-1] < 0.25 * history.train_loss[0]


def test_history_lengths_and_as_dict(spirals) -> None:
    X_train, X_test, y_train, y_test = spirals
    history = bp.fit(mlp(), X_train, y_train, epochs=3, progress=False)
    assert len(history) == 3
    assert history.epoch == [1, 2, 3]
    assert len(history.train_loss) == len(history.train_accuracy) == len(history.seconds) == 3
    assert history.val_loss == [] and history.val_accuracy == []
    assert history.seconds == sorted(history.seconds)
    with_val = bp.fit(
        mlp(), X_train, y_train, epochs=2, validation=(X_test, y_test), progress=False
    )
    assert len(with_val.val_loss) == len(with_val.val_accuracy) == 2
    d = with_val.as_dict()
    assert set(d) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
    }
    d["train_loss"].append(99.0)  # a copy: the history is not changed
    assert len(with_val.train_loss) == 2


def test_val_loss_is_the_mean_cross_entropy(spirals) -> None:
    X_train, X_test, y_train, y_test = spirals
    net = mlp()
    history = bp.fit(net, X_train, y_train, epochs=2, validation=(X_test, y_test), progress=False)
    z = logits_by_hand(net, X_test)
    z = z - z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y_test)), y_test]
    np.testing.assert_allclose(history.val_loss[-1], nll.mean(), rtol=1e-12)


def test_same_seed_same_run_and_other_seed_differs(spirals) -> None:
    X_train, _, y_train, _ = spirals

    def run(seed: int) -> tuple[list[float], list[np.ndarray]]:
        net = mlp(seed=0)
        h = bp.fit(net, X_train, y_train, epochs=3, batch_size=16, seed=seed, progress=False)
        return h.train_loss, [p.value.copy() for p in net.parameters()]

    loss_a, params_a = run(7)
    loss_b, params_b = run(7)
    loss_c, _ = run(8)
    assert loss_a == loss_b
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert loss_a != loss_c


def test_progress_off_prints_nothing(spirals, capsys) -> None:
    X_train, X_test, y_train, y_test = spirals
    bp.fit(mlp(), X_train, y_train, epochs=2, validation=(X_test, y_test), progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("progress", ["plain", True])  # True: stdout is not a terminal here
def test_plain_progress_prints_one_line_per_epoch(spirals, capsys, progress) -> None:
    X_train, X_test, y_train, y_test = spirals
    history = bp.fit(
        mlp(), X_train, y_train, epochs=3, validation=(X_test, y_test), progress=progress
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    pattern = re.compile(
        r"epoch (\d)/3  train loss (\d\.\d{4})  acc (\d\.\d{4})  "
        r"val loss (\d\.\d{4})  acc (\d\.\d{4})  \(\d+\.\d s\)"
    )
    for i, line in enumerate(lines):
        m = pattern.fullmatch(line)
        assert m, line
        assert int(m[1]) == i + 1
        assert float(m[2]) == pytest.approx(history.train_loss[i], abs=5e-5)
        assert float(m[5]) == pytest.approx(history.val_accuracy[i], abs=5e-5)


def test_graph_model_with_loss_given_separately(spirals) -> None:
    X_train, X_test, y_train, y_test = spirals
    rng = np.random.default_rng(0)
    g = bp.Graph()
    x = g.input("x")
    h = g.add(bp.Tanh(), g.add(bp.Linear(2, 64, rng=rng), x))
    h = g.add(bp.Tanh(), g.add(bp.Linear(64, 64, rng=rng), h))
    g.output(g.add(bp.Linear(64, 3, rng=rng), h))
    before = [p.value.copy() for p in g.parameters()]
    history = bp.fit(
        g,
        X_train,
        y_train,
        loss=bp.SoftmaxCrossEntropy(),
        epochs=150,
        optimizer=bp.Adam(g, lr=1e-2),
        validation=(X_test, y_test),
        progress=False,
    )
    assert history.val_accuracy[-1] >= 0.9
    # the same architecture as a Sequential, same initial values, same seed: same run
    net = mlp()
    for p, value in zip(net.parameters(), before, strict=True):
        p.value = value
    same = bp.fit(
        net, X_train, y_train, epochs=150, optimizer=bp.Adam(net, lr=1e-2), progress=False
    )
    np.testing.assert_allclose(same.train_loss, history.train_loss, rtol=1e-10)


def test_sequential_ending_in_its_loss(spirals) -> None:
    X_train, X_test, y_train, y_test = spirals
    with_loss, without = mlp(loss=True), mlp()
    h1 = bp.fit(with_loss, X_train, y_train, epochs=3, progress=False)
    h2 = bp.fit(without, X_train, y_train, epochs=3, progress=False)
    assert h1.train_loss == h2.train_loss
    # predict gives the loss's input: the logits
    np.testing.assert_allclose(
        bp.predict(with_loss, X_test), logits_by_hand(with_loss, X_test), rtol=1e-12
    )
    with pytest.raises(ValueError, match="already ends with the loss"):
        bp.fit(with_loss, X_train, y_train, loss=bp.SoftmaxCrossEntropy(), progress=False)


def test_predict_keeps_no_operating_point(spirals) -> None:
    X_train, X_test, y_train, _ = spirals
    net = mlp(loss=True)
    net.forward(X_train[:5], y_train[:5])
    logits = bp.predict(net, X_test, batch_size=7)  # several chunks
    np.testing.assert_allclose(logits, logits_by_hand(net, X_test), rtol=1e-12)
    # inference ran with cache=False: nothing is kept for a backward pass
    with pytest.raises(RuntimeError, match="call forward"):
        net.backward()


def test_l2_regression_has_no_accuracy() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3))
    Y = X @ np.array([[1.0], [-2.0], [0.5]])
    net = bp.Sequential([bp.Linear(3, 1, rng=rng)])
    h = bp.fit(
        net,
        X,
        Y,
        loss=bp.L2Loss(),
        epochs=60,
        optimizer=bp.SGD(net, lr=0.05),
        seed=1,
        progress=False,
    )
    assert np.all(np.isnan(h.train_accuracy))
    np.testing.assert_allclose(net[0].W.value, [[1.0, -2.0, 0.5]], atol=1e-3)
    assert h.train_loss[-1] < 1e-5


def test_bad_arguments_fail_before_training(spirals) -> None:
    X_train, _, y_train, _ = spirals
    net = mlp()
    values = [p.value.copy() for p in net.parameters()]
    other = bp.Adam([net.parameters()[0]], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold these parameters of the model: 0\.b"):
        bp.fit(net, X_train, y_train, optimizer=other, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        bp.fit(net, X_train, y_train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        bp.fit(net, X_train, y_train, batch_size=2.5, progress=False)
    with pytest.raises(ValueError, match=r"X has shape \(225, 2\) and y has shape \(224,\)"):
        bp.fit(net, X_train, y_train[:-1], progress=False)
    with pytest.raises(ValueError, match="progress must be"):
        bp.fit(net, X_train, y_train, progress="bar")
    for p, v in zip(net.parameters(), values, strict=True):
        np.testing.assert_array_equal(p.value, v)


def test_graph_with_two_data_inputs_is_refused() -> None:
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    g.output(g.add(bp.Add(), g.add(bp.Linear(2, 2), x), y))
    with pytest.raises(ValueError, match=r"one data input and one output.*pass it as loss="):
        bp.fit(g, np.zeros((4, 2)), np.zeros((4, 2)), progress=False)


def test_a_graph_ending_in_its_loss_trains_like_a_sequential() -> None:
    rng = np.random.default_rng(3)
    g = bp.Graph()
    x, y = g.input("x"), g.input("y")
    g.output(g.add(bp.L2Loss(), g.add(bp.Linear(2, 2, rng=rng), x), y))
    X = rng.standard_normal((32, 2))
    Y = X @ np.array([[1.0, -2.0], [0.5, 3.0]])
    opt = bp.SGD(g.parameters(), lr=0.05)
    history = bp.fit(g, X, Y, epochs=40, batch_size=8, optimizer=opt, progress=False, seed=0)
    assert history.train_loss[-1] < 0.01 * history.train_loss[0]
    assert bp.predict(g, X).shape == (32, 2)  # the prediction, without the targets


def token_tagger(n: int, d: int, n_classes: int, seed: int = 0) -> bp.Graph:
    """Token ids ``(B, T)`` to logits ``(B, C, T)``: one class per token."""
    rng = np.random.default_rng(seed)
    g = bp.Graph()
    h = g.add(bp.Embedding(n, d, rng=rng), g.input("ids"))
    h = g.add(bp.Linear(d, n_classes, rng=rng), h)
    g.output(g.add(bp.Transpose((1, 0)), h))
    return g


def test_accuracy_of_a_label_per_token_counts_positions() -> None:
    rng = np.random.default_rng(5)
    g = bp.Graph()
    g.output(g.add(bp.Transpose((1, 0)), g.add(bp.Embedding(4, 4, W=np.eye(4)), g.input("ids"))))
    ids = rng.integers(0, 4, size=(7, 5))  # the logits are one-hot(id): argmax is the id
    labels = np.where(rng.random((7, 5)) < 0.5, ids, (ids + 1) % 4)
    expected = np.mean(labels == ids)
    assert 0.2 < expected < 0.8
    assert bp.accuracy(g, ids, labels, batch_size=3) == expected
    with pytest.raises(ValueError, match=r"output has shape \(3, 4, 5\), not \(N, C, 6\)"):
        bp.accuracy(g, ids, np.zeros((7, 6), dtype=int), batch_size=3)


def test_fit_records_token_accuracy(capsys) -> None:
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 6, size=(120, 4))
    tags = ids % 3  # the class of each token is its id mod 3
    net = token_tagger(6, 4, 3)
    history = bp.fit(
        net, ids[:90], tags[:90], epochs=15, batch_size=16, optimizer=bp.Adam(net, lr=0.05),
        validation=(ids[90:], tags[90:]), progress="plain",
    )  # fmt: skip
    W_e, W, b = (p.value for p in net.parameters())
    by_hand = np.mean(np.argmax(W_e[ids[90:]] @ W.T + b, axis=-1) == tags[90:])
    assert history.val_accuracy[-1] == by_hand == bp.accuracy(net, ids[90:], tags[90:])
    assert by_hand == 1.0 and 0 < history.train_accuracy[0] <= 1
    assert " acc " in capsys.readouterr().out.splitlines()[-1]


def test_accuracy_checks_labels() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="integer labels"):
        bp.accuracy(net, np.zeros((3, 2)), np.zeros(3))


def test_progress_bar_in_a_terminal(spirals) -> None:
    pytest.importorskip("tqdm")
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    X_train, X_test, y_train, y_test = spirals
    out = Terminal()
    history = bp.fit(
        mlp(), X_train, y_train, epochs=2, validation=(X_test, y_test), progress=True, file=out
    )
    text = out.getvalue()
    assert "\r" in text  # a bar redrawn in place, not plain lines
    for epoch in (1, 2):
        assert f"epoch {epoch}/2" in text
    assert "8/8" in text  # 225 examples in minibatches of 32
    assert f"val loss {history.val_loss[-1]:.4f}" in text
