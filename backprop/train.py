"""Training: seeded minibatch epochs over a Sequential or a Graph.

``fit`` runs, for each minibatch, one forward pass, one backward pass
(Algorithm 14.1) and one optimizer step (eq. 14.9 or a refinement of it), and
returns a ``History`` of the per-epoch losses and accuracies.

What a model may be:

- a ``Sequential`` or a ``Graph`` whose output is the prediction (logits, say),
  with the loss layer given as ``loss=`` (``SoftmaxCrossEntropy()`` by default);
- a ``Sequential`` whose last layer is already a ``Loss`` (the chain of
  figure 14.1, ending in ``J``); the prediction is then the input of that loss.

A Graph used by ``fit`` has one data input and one output: its prediction.
``predict`` and ``accuracy`` run the forward pass only, in chunks, without
caching the operating point when the model's ``forward`` accepts ``cache=False``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from backprop.graph import Graph
from backprop.layer import Layer, Loss, Parameter
from backprop.layers import SoftmaxCrossEntropy
from backprop.optim import Adam, Optimizer
from backprop.recurrent.truncation import Truncation

__all__ = ["History", "accuracy", "fit", "predict"]


@dataclass
class History:
    """Per-epoch records of a ``fit``: entry ``i`` belongs to epoch ``epoch[i]``.

    ``train_loss`` and ``train_accuracy`` are averaged over the epoch's
    minibatches (weighted by their sizes) as the parameters moved;
    ``val_loss`` and ``val_accuracy`` are measured on the validation set at the
    end of each epoch. An accuracy is NaN when the task is not classification
    (labels not integers, or predictions not ``(B, C)``); the validation lists
    are empty when no validation set was given. ``seconds`` is the wall time
    since the start of training, at the end of each epoch.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Any]]:
        """The records as ``{name: list}``, copies that the caller may change."""
        return {k: list(v) for k, v in asdict(self).items()}

    def __len__(self) -> int:
        return len(self.epoch)


# ------------------------------------------------------------------ the model adapter


class _Net:
    """What ``fit`` needs of a model: predict, and the loss with its gradients.

    The model (any ``Graph``; a ``Sequential`` is one) either ends in a loss,
    fed by its first input's prediction and its labels input, or has one data
    input and one output, its prediction, and the loss is separate.
    """

    def __init__(
        self, model: Any, loss: Layer | None, where: str = "fit", truncate: int | None = None
    ) -> None:
        if not isinstance(model, Graph):
            raise TypeError(
                f"{where}: expected a Sequential or a Graph, got {type(model).__name__}"
            )
        self.model = model
        ins, outs = tuple(model.input_names()), tuple(model.output_names())
        last = model.node(outs[0]) if len(outs) == 1 else None
        self.own_loss = last is not None and isinstance(last.layer, Loss)
        if last is not None and self.own_loss and len(ins) == 2:
            if loss is not None:
                raise ValueError(
                    f"fit: the model already ends with the loss {last.layer!r}; "
                    f"do not pass loss= as well"
                )
            self.loss: Layer = last.layer
            self.prediction = last.inputs[0]  # the value the loss reads first
        elif len(ins) != 1 or len(outs) != 1 or self.own_loss:
            raise ValueError(
                f"{where}: a model used here needs one data input and one output (its "
                f"prediction), or ends in a loss fed by its data and label inputs; this one "
                f"has inputs {ins} and outputs {outs}. Leave the loss out of a Graph and pass "
                f"it as loss="
            )
        else:
            self.loss = SoftmaxCrossEntropy() if loss is None else loss
            if not isinstance(self.loss, Loss):
                raise TypeError(f"fit: loss must be a Loss layer, got {self.loss!r}")
        self.input_name, self.label_name = ins[0], ins[-1]
        self.truncation = Truncation(model, truncate, where)  # a no-op for None

    def parameters(self) -> list[Parameter]:
        return list(self.model.parameters())

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.own_loss:
            return np.asarray(self.model.evaluate(self.prediction, {self.input_name: x}))
        return np.asarray(self.model.forward({self.input_name: x}, cache=False))

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, dict[Parameter, Any]]:
        """``(J, prediction, {Parameter: dJ/dθ})`` for one minibatch."""
        if self.own_loss:
            J = self.model.forward({self.input_name: x, self.label_name: y})
            y_hat = self.loss.operating_point("fit").x_in[0]
            with self.truncation:
                return float(J), y_hat, self.model.backward(input_grad=False).params
        y_hat = self.model.forward({self.input_name: x})
        J = self.loss.forward(y_hat, y)
        g_in, _ = self.loss.backward()
        g = g_in[0] if isinstance(g_in, tuple) else g_in
        with self.truncation:
            return float(J), y_hat, self.model.backward(g, input_grad=False).params

    def evaluate(self, X: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
        """``(mean loss, accuracy)`` over a whole set, forward only."""
        total, correct, n = 0.0, 0, X.shape[0]
        for start in range(0, n, batch_size):
            xb, yb = X[start : start + batch_size], y[start : start + batch_size]
            y_hat = self.predict(xb)
            total += float(self.loss.forward(y_hat, yb, cache=False)) * xb.shape[0]
            correct += _n_correct(y_hat, yb)
        return total / n, (correct / n if _is_classification(y) else math.nan)


def _is_classification(y: np.ndarray) -> bool:
    return np.issubdtype(y.dtype, np.integer) and y.ndim == 1


def _n_correct(y_hat: np.ndarray, y: np.ndarray) -> int:
    if y_hat.ndim != 2 or not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        return 0
    return int(np.sum(np.argmax(y_hat, axis=1) == y))


# ------------------------------------------------------------------ progress


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = getattr(shell, "get_ipython", lambda: None)()
    return type(ip).__name__ == "ZMQInteractiveShell"


def _wide(out: TextIO) -> bool:
    """False for a terminal too narrow for a bar, or one that reports no size at all."""
    try:
        return os.get_terminal_size(out.fileno()).columns >= 60
    except (AttributeError, OSError, ValueError):
        return True  # a stream without a file descriptor that says it is a terminal


def _progress_bar_factory(out: TextIO) -> Any:
    """``tqdm`` (``tqdm.auto`` in a notebook) when it can draw a bar here, else None."""
    notebook = _in_notebook()
    if not notebook and not (hasattr(out, "isatty") and out.isatty() and _wide(out)):
        return None
    if notebook and importlib.util.find_spec("ipywidgets") is None:
        return None  # tqdm.auto would fall back to text with a warning
    try:
        if notebook:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _summary(history: History, i: int, val: str) -> str:
    parts = [f"train loss {history.train_loss[i]:.4f}"]
    if not math.isnan(history.train_accuracy[i]):
        parts.append(f"acc {history.train_accuracy[i]:.4f}")
    if history.val_loss:
        parts.append(f"{val} loss {history.val_loss[i]:.4f}")
        if not math.isnan(history.val_accuracy[i]):
            parts.append(f"acc {history.val_accuracy[i]:.4f}")
    return "  ".join(parts)


# ------------------------------------------------------------------ checks


def _positive_int(what: str, value: Any, where: str = "fit") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{where}: {what} must be a positive integer, got {value!r}")
    return int(value)


def _data(what: str, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"fit: {what} X has shape {X.shape} and y has shape {y.shape}; they need the "
            f"same number of examples on axis 0"
        )
    if X.shape[0] == 0:
        raise ValueError(f"fit: {what} set is empty")
    return X, y


# ------------------------------------------------------------------ the loop


def fit(
    model: Any,
    X: Any,
    y: Any,
    *,
    loss: Layer | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: Optimizer | None = None,
    validation: tuple[Any, Any] | None = None,
    validation_label: str = "val",
    seed: int | np.random.Generator | None = 0,
    progress: bool | str = True,
    file: TextIO | None = None,
    truncate: int | None = None,
) -> History:
    """Train ``model`` on ``(X, y)`` with shuffled minibatches; return the ``History``.

    Shapes: ``X`` is ``(N, *features)`` in the model's float dtype; ``y`` is
    ``(N,)`` integer labels for ``SoftmaxCrossEntropy`` or ``(N, *out)`` targets
    for ``L2Loss``.

    - ``loss``: the loss layer; ``SoftmaxCrossEntropy()`` when omitted, and not
      allowed when the model (a Sequential) already ends with one.
    - ``optimizer``: built over ``model.parameters()``; ``Adam(lr=1e-3)`` when
      omitted. It must cover every parameter of the model.
    - ``seed``: seeds the order of the examples in every epoch (an int or a
      ``numpy.random.Generator``), so equal seeds give equal runs.
    - ``validation``: ``(X_val, y_val)``, evaluated after every epoch;
      ``validation_label`` names it in the progress lines (``"test"`` when it is
      a held-out test set that is only watched).
    - ``progress``: ``True`` shows a progress bar (``tqdm``, when installed and
      the output is a terminal or a notebook) or else prints one line per epoch;
      ``"plain"`` always prints the lines; ``False`` prints nothing.
    - ``file``: where progress goes (``sys.stdout`` by default).
    - ``truncate``: truncated backprop through time, ``k`` steps back, for every
      recurrence the model unrolls (``backprop.recurrent.truncated``); None, the
      default, backpropagates through all the steps.

    Every argument is checked before the first step. An error during training
    (a NaN gradient, say) leaves the parameters as the last complete step left them.
    """
    if progress not in (True, False, "plain"):
        raise ValueError(f"fit: progress must be True, False or 'plain', got {progress!r}")
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    X, y = _data("training", X, y)
    val = _data("validation", *validation) if validation is not None else None
    net = _Net(model, loss, truncate=truncate)
    optimizer = _optimizer_for(net, optimizer)
    rng = np.random.default_rng(seed)
    out = sys.stdout if file is None else file
    bar = _progress_bar_factory(out) if progress is True else None
    classify = _is_classification(y)
    history = History()
    n = X.shape[0]
    n_batches = -(-n // batch_size)
    width = len(str(epochs))
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        label = f"epoch {epoch:>{width}}/{epochs}"
        pbar = (
            bar(total=n_batches, desc=label, leave=True, file=out, mininterval=0.2) if bar else None
        )
        try:
            total, correct = _epoch(net, optimizer, X, y, order, batch_size, pbar)
            history.epoch.append(epoch)
            history.train_loss.append(total / n)
            history.train_accuracy.append(correct / n if classify else math.nan)
            if val is not None:
                val_loss, val_acc = net.evaluate(*val, batch_size=max(batch_size, 256))
                history.val_loss.append(val_loss)
                history.val_accuracy.append(val_acc)
            history.seconds.append(time.perf_counter() - start)
            if pbar is not None:
                pbar.set_postfix_str(_summary(history, -1, validation_label))
        finally:
            if pbar is not None:
                pbar.close()
        if progress and pbar is None:
            summary = _summary(history, -1, validation_label)
            print(f"{label}  {summary}  ({history.seconds[-1]:.1f} s)", file=out)
    return history


def _optimizer_for(net: _Net, optimizer: Optimizer | None) -> Optimizer:
    """The optimizer ``fit`` steps: ``Adam(lr=1e-3)`` by default; a given one must
    hold every parameter of the model."""
    params = net.parameters()
    if optimizer is None:
        return Adam(params, lr=1e-3)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"fit: optimizer must be an Optimizer, got {type(optimizer).__name__}")
    missing = [p for p in params if p not in optimizer.state]
    if missing:
        names = {id(p): n for n, p in net.model.named_parameters().items()}
        listed = ", ".join(names.get(id(p), repr(p)) for p in missing)
        raise ValueError(
            f"fit: the optimizer does not hold these parameters of the model: {listed}; "
            f"build it over model.parameters()"
        )
    return optimizer


def _epoch(
    net: _Net,
    optimizer: Optimizer,
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    batch_size: int,
    pbar: Any,
) -> tuple[float, int]:
    """One pass over the minibatches in ``order``: ``(Σ loss·size, correct predictions)``."""
    total, correct = 0.0, 0
    n_batches = -(-order.size // batch_size)
    for b in range(n_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        J, y_hat, grads = net.step(X[idx], y[idx])
        optimizer.step(grads)
        total += J * idx.size
        correct += _n_correct(y_hat, y[idx])
        if pbar is not None:
            pbar.update(1)
            if b % 10 == 0 or b == n_batches - 1:
                seen = b * batch_size + idx.size
                pbar.set_postfix_str(f"loss {total / seen:.4f}", refresh=False)
    return total, correct


def predict(model: Any, X: Any, *, batch_size: int = 1024) -> np.ndarray:
    """The model's output for ``X`` (``(N, *features)``), computed in chunks.

    For a Sequential that ends with a loss, this is the input of the loss (the
    logits). The operating point is not cached when the model's ``forward``
    accepts ``cache=False``.
    """
    return _predict(model, X, batch_size, "predict")


def _predict(model: Any, X: Any, batch_size: int, where: str) -> np.ndarray:
    """``predict``, with errors that name the public function ``where``."""
    batch_size = _positive_int("batch_size", batch_size, where)
    X = np.asarray(X)
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(f"{where}: X must be a non-empty batch (N, ...), got shape {X.shape}")
    net = _Net(model, None, where)
    chunks = [net.predict(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    return np.concatenate(chunks, axis=0)


def accuracy(model: Any, X: Any, y: Any, *, batch_size: int = 1024) -> float:
    """The fraction of examples whose largest output is at the label: ``mean(argmax = y)``."""
    X, y = np.asarray(X), np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"accuracy: y must be integer labels of shape ({X.shape[0] if X.ndim else '?'},), "
            f"got dtype {y.dtype} and shape {y.shape}"
        )
    y_hat = _predict(model, X, batch_size, "accuracy")
    if y_hat.ndim != 2:
        raise ValueError(f"accuracy: the model's output has shape {y_hat.shape}, not (N, C)")
    return float(np.mean(np.argmax(y_hat, axis=1) == y))
