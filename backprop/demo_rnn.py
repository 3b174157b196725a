"""The recurrent demo (``python -m backprop demo --model rnn``): an Elman net learns to add.

``backprop.demo.run`` hands ``--model rnn`` to ``run_rnn``, which

1. draws the adding problem (``backprop.datasets.make_adding``), seeded: sequences of
   ``T`` steps, each a value in ``[0, 1)`` and a marker; the target is the sum of the
   two marked values, so the net must remember the first one until the end;
2. builds ``x → unroll(RNNCell(2 → n, tanh), T) → h_T → Linear(n → 1)``: the unrolled
   net is a DAG with the cell's weights tied across the ``T`` steps, and backprop
   through time is Algorithm 14.1 on it (``--truncate k`` cuts it to ``k`` steps);
3. trains it with ``fit`` on the mean squared error, the learning rate divided by 3
   after half the epochs and by 10 after three quarters (the test set is watched,
   never tuned on);
4. runs the three-way ``gradcheck`` on the trained net with its loss, at a few test
   sequences;
5. draws the training curves and ``‖∂h_T/∂h_t‖`` over ``t`` before and after training,
   read off the explicit Jacobians of the steps (``backprop.recurrent.gradient_norms``);
6. ends with ``test accuracy: 0.xx``: the fraction of test sequences whose predicted
   sum is within ``SUCCESS`` (0.04) of the true one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from backprop.datasets import make_adding
from backprop.demo import DemoResult, _check_gradients, make_optimizer
from backprop.graph import Graph
from backprop.layers import L2Loss, Linear, RNNCell
from backprop.layers.backward import Slice
from backprop.optim import Optimizer
from backprop.recurrent import Unrolled, gradient_norms, unroll
from backprop.train import History, fit, predict

__all__ = ["SUCCESS", "StepDecay", "build_rnn", "run_rnn"]

#: A prediction counts as right when it is this close to the sum (the usual criterion).
SUCCESS = 0.04
#: Training and test sequences drawn.
N_TRAIN, N_TEST = 5000, 1000
#: Test sequences whose ``‖∂h_T/∂h_t‖`` are drawn.
N_NORMS = 64


def build_rnn(n_hidden: int, T: int, *, seed: int = 0) -> Graph:
    """``x (B, T, 2)`` → ``"rnn"``: the Elman cell unrolled from ``h_0 = 0`` → ``"h_T"``:
    the last state → ``"readout"``: ``Linear(n_hidden → 1)``, the predicted sum."""
    rng = np.random.default_rng(seed)
    model = Graph()
    x = model.input("x")
    states = model.add(unroll(RNNCell(2, n_hidden, rng=rng), T, h0="zeros"), x, name="rnn")
    last = model.add(Slice((T - 1) * n_hidden, T * n_hidden), states, name="h_T")
    model.output(model.add(Linear(n_hidden, 1, rng=rng), last, name="readout"))
    return model


class StepDecay(Optimizer):
    """``inner`` with its learning rate divided by 3 after ``steps // 2`` updates and by 10
    after ``3 * steps // 4``: large steps to find the memory, small ones to settle."""

    def __init__(self, inner: Optimizer, steps: int) -> None:
        super().__init__(inner.params, inner.lr)
        self.inner, self.lr0, self.steps, self.count = inner, inner.lr, steps, 0
        self.state = inner.state  # the same Parameters, one record of them

    def step(self, grads: Any) -> None:
        done = self.count / self.steps
        self.inner.lr = self.lr0 / (10.0 if done >= 0.75 else 3.0 if done >= 0.5 else 1.0)
        self.inner.step(grads)
        self.count += 1

    def __repr__(self) -> str:
        return f"{self.inner!r} (÷3 after half the epochs, ÷10 after three quarters)"


def _norms(model: Graph, X: np.ndarray) -> np.ndarray:
    """``‖∂h_T/∂h_t‖`` ``(B, T)`` of the model's recurrence on the sequences ``X``."""
    model.forward(x=X)
    return gradient_norms(cast(Unrolled, model["rnn"]))  # the demo's own node


def _with_loss(model: Graph) -> Graph:
    """``model`` followed by its loss: inputs ``x`` and ``y``, output the cost ``J``."""
    checked = Graph()
    x, y = checked.input("x"), checked.input("y")
    checked.output(checked.add(L2Loss(), checked.add(model, x, name="net"), y, name="loss"))
    return checked


def _figures(
    plt: Any, history: History, norms: dict[str, np.ndarray], out: Path, say: Any
) -> list[Path]:
    from backprop import plot

    written = []
    for fig, name in (
        (plot.plot_history(history, val_label="test"), "training_curves.png"),
        (plot.plot_gradient_norms(norms), "gradient_norms.png"),
    ):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    say(f"figures written to {out}/: {', '.join(p.name for p in written)}")
    return written


def run_rnn(s: dict[str, Any], plt: Any, folder: Path | None, say: Any, **train: Any) -> DemoResult:
    """The demo for ``--model rnn`` with the settings ``s`` (see the module docstring);
    ``train`` holds ``fit``'s ``progress`` and ``file``."""
    start = time.perf_counter()
    T, n_hidden, seed = s["seq_len"], s["hidden"][0], s["seed"]
    X_train, y_train = make_adding(N_TRAIN, T, rng=seed)
    X_test, y_test = make_adding(N_TEST, T, rng=seed + 10_000)
    net = build_rnn(n_hidden, T, seed=seed)
    n_batches = -(-N_TRAIN // s["batch_size"])
    inner = make_optimizer(s["optimizer"], net.parameters(), s["lr"], s["weight_decay"])
    opt = StepDecay(inner, s["epochs"] * n_batches)
    say(f"backprop demo: an Elman RNN unrolled over {T} steps learns the adding problem")
    say(
        f"data: {N_TRAIN} training and {N_TEST} test sequences of {T} steps (a value and a "
        f"marker); the target is the sum of the 2 marked values (predicting 1: MSE 0.1667)"
    )
    say(str(net))
    cut = s["truncate"]
    how = f"truncated to {cut} steps" if cut else f"through all {T} steps"
    say(f"training: {opt!r}, {s['epochs']} epochs, minibatches of {s['batch_size']}, "
        f"seed {seed}; backprop through time {how}")  # fmt: skip
    before = _norms(net, X_test[:N_NORMS])
    history = fit(
        net,
        X_train,
        y_train,
        loss=L2Loss(),
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        optimizer=opt,
        validation=(X_test, y_test),
        validation_label="test",
        seed=seed,
        truncate=cut,
        **train,
    )
    say(f"trained in {history.seconds[-1]:.1f} s")
    checked = X_test[: s["gradcheck_examples"]]
    worst, failure = _check_gradients(_with_loss(net), checked, y_test, say, "auto")
    norms = {"before training": before, "after training": _norms(net, X_test[:N_NORMS])}
    say(
        f"‖∂h_T/∂h_0‖ over {N_NORMS} test sequences (geometric mean): "
        f"{_mean(norms['before training']):.2e} before training, "
        f"{_mean(norms['after training']):.2e} after"
    )
    if plt is None or folder is None:
        say("figures skipped: matplotlib is not installed (pip install 'backprop[plot]')")
        figures = []
    else:
        figures = _figures(plt, history, norms, folder, say)
    error = np.abs(predict(net, X_test) - y_test)[:, 0]
    right = int(np.sum(error < SUCCESS))
    seconds = time.perf_counter() - start
    say(
        f"total time {seconds:.1f} s; test set: {right} of {N_TEST} sums within {SUCCESS} "
        f"(mean squared error {float(np.mean(error**2)):.4f})"
    )
    test_acc = right / N_TEST
    say(f"test accuracy: {test_acc:.2f}")
    if failure is not None:
        raise failure
    return DemoResult(test_acc, history, worst, figures, seconds)


def _mean(norms: np.ndarray) -> float:
    return float(np.exp(np.log(norms[:, 0]).mean()))
