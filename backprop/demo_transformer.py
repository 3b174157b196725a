"""The transformer demo: a small encoder that learns to reverse sequences of digits.

``python -m backprop demo --model transformer`` calls ``run_transformer`` (through
``backprop.demo.run``, which checks the settings and the output folder first). It

1. draws, seeded, random sequences of 8 digits (``make_digit_sequences``): 2,000 for
   training and 1,000 held out for the test, each with its target, the same digits in
   reverse order. Out of 10⁸ possible sequences the held-out ones are, all but surely,
   new to the model;
2. builds the model (``build_transformer``) as a ``Graph``: the digit ids become
   vectors (``Embedding``), the sinusoidal codes of their positions are added
   (``PositionalEncoding``), one pre-norm ``transformer_block`` mixes the tokens
   (attention) and transforms each one (a token-wise MLP), a ``LayerNorm`` and a
   token-wise ``Linear`` give ten scores per position, and ``SoftmaxCrossEntropy``
   takes them as ``(B, C, T)`` (class axis 1) against the targets ``(B, T)``;
3. trains it with Adam, watching the test set after each epoch (token accuracy: the
   fraction of the 8 positions that are right);
4. runs the three-way ``gradcheck`` on the trained network at a few test sequences;
5. writes the training curves and the attention weights of one held-out sequence,
   one panel per head: position ``t`` of the output has to fetch the digit at ``7 − t``,
   and the attention matrix shows that as its anti-diagonal;
6. ends with ``test accuracy: 1.00`` (token accuracy on the held-out sequences).

Reversal needs nothing but the positions: each query must find the key whose position
mirrors its own, which one attention layer can do. ``task="sort"`` asks for the digits
in increasing order instead, a task that depends on the digits themselves.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from backprop.graph import Graph
from backprop.layers import (
    Embedding,
    LayerNorm,
    Linear,
    PositionalEncoding,
    SoftmaxCrossEntropy,
    Transpose,
    transformer_block,
)
from backprop.train import History, accuracy, fit, predict

__all__ = [
    "GRADCHECK_MODE",
    "TASKS",
    "TRANSFORMER_SHAPE",
    "attention_weights",
    "build_transformer",
    "make_digit_sequences",
    "run_transformer",
]

TASKS = ("reverse", "sort")

#: The trained transformer is checked entry by entry, which takes seconds where the
#: directions mode (what ``"auto"`` picks for 9,258 parameters) takes a fraction of one.
#: Trained longer than the default, its predictions get so sure (probabilities within
#: about 1e-5 of 1) that the cost changes by little more than its rounding along a random
#: direction of a whole Parameter, at every step the directions mode tries, and that
#: mode reports it cannot check; entry by entry every difference stays readable.
GRADCHECK_MODE = "entries"

#: The demo's model and data: vocabulary (the ten digits), sequence length, width,
#: heads, the feed-forward width of the block, blocks; training and test sequences.
TRANSFORMER_SHAPE: dict[str, int] = {
    "vocab": 10,
    "length": 8,
    "d": 32,
    "n_heads": 4,
    "dim_feedforward": 64,
    "n_blocks": 1,
    "n_train": 2_000,
    "n_test": 1_000,
}


def make_digit_sequences(
    n: int, length: int = 8, *, task: str = "reverse", vocab: int = 10, rng: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random sequences of ``length`` digits and their targets, as int64 arrays
    ``(n, length)``: the digits reversed (``task="reverse"``, ``y[:, t] = x[:, T−1−t]``)
    or sorted in increasing order (``task="sort"``). ``rng`` seeds the draw."""
    if task not in TASKS:
        raise ValueError(f"make_digit_sequences: task must be one of {TASKS}, got {task!r}")
    for what, value in (("n", n), ("length", length), ("vocab", vocab)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(
                f"make_digit_sequences: {what} must be a positive integer, got {value!r}"
            )
    X = np.random.default_rng(rng).integers(0, vocab, size=(n, length), dtype=np.int64)
    y = X[:, ::-1] if task == "reverse" else np.sort(X, axis=1)
    return X, np.ascontiguousarray(y)


def build_transformer(
    vocab: int = 10,
    length: int = 8,
    d: int = 32,
    n_heads: int = 4,
    dim_feedforward: int = 64,
    n_blocks: int = 1,
    *,
    seed: int = 0,
) -> Graph:
    """The demo's network as a ``Graph`` with inputs ``"ids"`` ``(B, T)`` and
    ``"labels"`` ``(B, T)`` and output the cost ``J``:

        ids → embed → position → block1 … → norm → logits → classes_first → loss

    ``logits`` is a token-wise ``Linear(d, vocab)`` on ``(B, T, d)``;
    ``classes_first`` transposes its ``(B, T, vocab)`` to ``(B, vocab, T)``, the layout
    of ``SoftmaxCrossEntropy`` (class axis 1, as torch's ``cross_entropy``), which
    averages over every position of every sequence. Each block is a
    ``transformer_block`` nested as one node; ``model["block1"]["attn"]`` is its
    ``MultiHeadAttention``. Weights are drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    g = Graph()
    ids, labels = g.input("ids"), g.input("labels")
    h = g.add(Embedding(vocab, d, rng=rng), ids, name="embed")
    h = g.add(PositionalEncoding(d, length), h, name="position")
    for i in range(1, n_blocks + 1):
        h = g.add(transformer_block(d, n_heads, dim_feedforward, rng=rng), h, name=f"block{i}")
    h = g.add(LayerNorm(d), h, name="norm")
    h = g.add(Linear(d, vocab, rng=rng), h, name="logits")
    h = g.add(Transpose((1, 0)), h, name="classes_first")
    g.output(g.add(SoftmaxCrossEntropy(), h, labels, name="loss"))
    return g


def attention_weights(model: Graph, ids: Any) -> np.ndarray:
    """The attention matrices of every block for the sequences ``ids`` ``(B, T)``:
    ``(B, n_blocks, n_heads, T, T)``, row ``t`` of a head the weights query ``t`` gives
    the keys (each row sums to 1). Runs ``model`` forward on ``ids`` (with zero labels,
    which the weights do not depend on) and reads each block's ``attention`` node."""
    ids = np.asarray(ids)
    model.forward({"ids": ids, "labels": np.zeros(ids.shape, dtype=np.int64)})
    blocks = [info.name for info in model.nodes() if info.name.startswith("block")]
    found = [model[b]["attn"].graph["attention"].operating_point().x_out for b in blocks]
    return np.stack(found, axis=1)


def _figures(
    plt: Any, model: Graph, history: History, X_test: np.ndarray, out: Path, say: Any
) -> list[Path]:
    from backprop import plot

    x = X_test[0]
    T = x.size
    A = attention_weights(model, x[None])[0, 0]
    fig = plot.plot_attention(
        A, [f"{t}:{v}" for t, v in enumerate(x)], [f"{t}:{x[T - 1 - t]}" for t in range(T)],
        key_label="key (position:digit)", query_label="query (position:target)",
        title=f"attention of a held-out sequence: query t takes the digit at position {T - 1} − t",
    )  # fmt: skip
    written = []
    for name, figure in (
        ("training_curves.png", plot.plot_history(history, val_label="test")),
        ("attention.png", fig),
    ):
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        written.append(out / name)
    say(f"figures written to {out}/: {', '.join(p.name for p in written)}")
    return written


def _announce(
    say: Any, model: Graph, opt: Any, s: dict[str, Any], n_train: int, n_test: int
) -> None:
    """The lines before training: the task, the data, the model, the settings."""
    shape, T = TRANSFORMER_SHAPE, TRANSFORMER_SHAPE["length"]
    say(
        f"backprop demo: a transformer ({shape['n_blocks']} pre-norm encoder block, "
        f"{shape['n_heads']} heads, d = {shape['d']}) that reverses sequences of {T} digits"
    )
    say(
        f"data: {n_train} random sequences of {T} digits for training, {n_test} held out "
        f"for the test; the target at position t is the digit at position {T - 1} − t"
    )
    say(str(model))
    say(
        f"training: {opt!r}, {s['epochs']} epochs, minibatches of {s['batch_size']}, "
        f"seed {s['seed']}"
    )


def run_transformer(
    s: dict[str, Any],
    plt: Any,
    folder: Path | None,
    say: Any,
    *,
    progress: bool | str = True,
    file: TextIO | None = None,
) -> Any:
    """The transformer demo with the checked settings ``s`` (``backprop.demo.run``'s,
    the model's defaults filled in); ``plt`` is matplotlib's pyplot or None, ``folder``
    where the figures go. Returns a ``DemoResult``; its ``test_accuracy`` is the token
    accuracy on the held-out sequences."""
    from backprop.demo import DemoResult, check_and_draw, make_optimizer

    start = time.perf_counter()
    shape = TRANSFORMER_SHAPE
    rng = np.random.default_rng(s["seed"])
    X_train, y_train = make_digit_sequences(shape["n_train"], shape["length"], rng=rng)
    X_test, y_test = make_digit_sequences(shape["n_test"], shape["length"], rng=rng)
    model = build_transformer(
        shape["vocab"], shape["length"], shape["d"], shape["n_heads"],
        shape["dim_feedforward"], shape["n_blocks"], seed=s["seed"],
    )  # fmt: skip
    opt = make_optimizer(s["optimizer"], model.parameters(), s["lr"], s["weight_decay"])
    _announce(say, model, opt, s, X_train.shape[0], X_test.shape[0])
    history = fit(
        model, X_train, y_train, epochs=s["epochs"], batch_size=s["batch_size"], optimizer=opt,
        validation=(X_test, y_test), validation_label="test", seed=s["seed"],
        progress=progress, file=file,
    )  # fmt: skip
    say(f"trained in {history.seconds[-1]:.1f} s")
    checked = X_test[: s["gradcheck_examples"]]
    worst, failure, figures = check_and_draw(
        model, checked, y_test, GRADCHECK_MODE, plt, folder, say,
        lambda out: _figures(plt, model, history, X_test, out, say),
    )  # fmt: skip
    test_acc = accuracy(model, X_test, y_test)
    right = np.argmax(predict(model, X_test), axis=1) == y_test
    seconds = time.perf_counter() - start
    say(
        f"total time {seconds:.1f} s; test set: {int(right.sum())} of {right.size} digits "
        f"correct, {int(right.all(axis=1).sum())} of {X_test.shape[0]} sequences entirely"
    )
    say(f"test accuracy: {test_acc:.2f}")
    if failure is not None:
        raise failure
    return DemoResult(test_acc, history, worst, figures, seconds)
