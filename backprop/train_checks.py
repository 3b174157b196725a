"""What ``fit`` checks before its first step, so that bad data never costs a step.

Every array is checked whole before anything moves: the shapes (as many
examples in ``X`` as in ``y``, none of them empty), the dtypes (float data in
the model's dtype; integer labels or float targets), the values (no NaN or
inf anywhere, integer labels inside the classes the model gives), for the
training set and for the validation set alike. An error names the argument
(``X``, ``y``, ``validation X``, ``validation y``) and the first offending row.

Shapes that only the model knows (the features it takes, the classes it gives,
the targets its loss compares with) are found by a dry run: the model's forward
on the first example in evaluation mode, after which every layer's mode and
cached operating point are put back as they were. Nothing the run could touch
(running statistics, dropout generators) changes in evaluation mode. The dry
run also measures the activations of one example, from which ``fit`` warns
when a minibatch would hold more than ``ACTIVATION_BUDGET`` bytes of them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from backprop.finite import first_bad_row, non_finite
from backprop.graph import Graph, state
from backprop.graph.build import leaf_layers
from backprop.layer import check_float

__all__ = ["ACTIVATION_BUDGET", "as_array", "check_data", "dry_run", "warn_if_over_budget"]

#: Bytes of activations (every value a forward computes) one minibatch of ``fit`` may
#: hold before ``fit`` warns, with the figure, that the batch is too large for comfort.
ACTIVATION_BUDGET = 2 * 1024**3


def check_data(
    names: tuple[str, str], X: Any, y: Any, dtype: np.dtype[Any] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` as arrays, or the error that names the argument and the first bad row.

    ``names`` are how the errors call the two (``("X", "y")``); ``dtype`` is the
    model's (that of its parameters), or None for a model without parameters.
    """
    nx, ny = names
    X, y = as_array("fit", nx, X), as_array("fit", ny, y)
    if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"fit: {nx} has shape {X.shape} and {ny} has shape {y.shape}; they need the "
            f"same number of examples on axis 0"
        )
    if X.shape[0] == 0:
        raise ValueError(f"fit: {nx} and {ny} are empty (shape {X.shape}): there is nothing to fit")
    if X.dtype.kind in "iu":
        pass  # integer ids (an embedding's input), or a mistake: the dry run's layer says
    else:
        X = check_float("fit", nx, X, dtype)
    if y.dtype.kind not in "iuf":
        raise TypeError(
            f"fit: {ny} has dtype {y.dtype}; it holds integer class labels or float targets"
        )
    for name, a in ((nx, X), (ny, y)):
        count, first = non_finite(a)
        if count:
            raise ValueError(
                f"fit: {name}[{first}] holds NaN or inf (the first of {count} non-finite "
                f"entries in {name}); nothing was trained"
            )
    return X, y


def as_array(where: str, name: str, a: Any) -> np.ndarray:
    """``a`` as an array, or a ``ValueError`` naming it (a ragged list, say)."""
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {name} is not a rectangular array: {e}") from None


def check_labels(name: str, y: np.ndarray, y_hat: np.ndarray) -> None:
    """Integer labels must lie in ``0..C-1`` for a prediction with ``C`` classes on axis 1."""
    if y.dtype.kind not in "iu" or y_hat.ndim < 2:
        return
    C = y_hat.shape[1]
    rows = y.reshape(y.shape[0], -1)
    first = first_bad_row(((rows >= 0) & (rows < C)).all(axis=1))
    if first is not None:
        bad = rows[first][(rows[first] < 0) | (rows[first] >= C)]
        raise ValueError(
            f"fit: {name}[{first}] holds the label {int(bad[0])}, outside 0..{C - 1}: the "
            f"model gives {C} classes (axis 1 of its output, shape {y_hat.shape[1:]} per "
            f"example); nothing was trained"
        )


@contextmanager
def untouched(model: Graph) -> Iterator[None]:
    """Evaluation mode inside; afterwards every mode and operating point as before."""
    graphs = _graphs(model)
    leaves = leaf_layers(model)
    modes = [g.training for g in graphs], [layer.training for layer in leaves]
    saved = state.snapshot(model)
    try:
        model.eval()
        yield
    finally:
        state.restore(model, saved)
        for g, mode in zip(graphs, modes[0], strict=True):
            g.training = mode
        for layer, mode in zip(leaves, modes[1], strict=True):
            layer.training = mode


def _graphs(model: Graph) -> list[Graph]:
    found, stack = [], [model]
    while stack:
        g = stack.pop()
        found.append(g)
        stack.extend(n.layer for n in g.nodes() if isinstance(n.layer, Graph))
    return found


def dry_run(net: Any, names: tuple[str, str], X: np.ndarray, y: np.ndarray) -> int:
    """Run the model and its loss on the first example; check ``y`` against the
    prediction; return the bytes of activations that one example takes."""
    nx, ny = names
    model, loss = net.model, net.loss
    with untouched(model):
        try:
            y_hat = net.predict(X[:1])
        except (ValueError, TypeError) as e:
            raise type(e)(f"fit: {nx} (shape {X.shape}) does not fit the model: {e}") from e
        check_labels(ny, y, y_hat)
        try:
            if net.own_loss:
                model.forward({net.input_name: X[:1], net.label_name: y[:1]}, cache=False)
            else:
                copy.copy(loss).forward(y_hat, y[:1], cache=False)  # its own state stays
        except (ValueError, TypeError) as e:
            raise type(e)(
                f"fit: the loss {loss!r} refuses the first example of {nx} and {ny} ({ny} "
                f"has shape {y.shape} and dtype {y.dtype}; the model's output has shape "
                f"{y_hat.shape[1:]} per example): {e}"
            ) from e
        return state.activation_bytes(model)


def warn_if_over_budget(per_example: int, batch_size: int, n: int) -> None:
    """A ``UserWarning`` with the figure when a minibatch's activations exceed the budget."""
    total = per_example * min(batch_size, n)
    if total > ACTIVATION_BUDGET:
        warnings.warn(
            f"fit: a minibatch of {min(batch_size, n)} examples holds about "
            f"{total / 1024**3:.1f} GiB of activations ({per_example:,} bytes per example), "
            f"over the budget of {ACTIVATION_BUDGET / 1024**3:.1f} GiB "
            f"(backprop.train_checks.ACTIVATION_BUDGET); a smaller batch_size uses less memory",
            stacklevel=3,
        )
