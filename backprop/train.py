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
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from backprop.graph import Graph
from backprop.layer import Layer, Loss, Parameter
from backprop.layers import SoftmaxCrossEntropy
from backprop.optim import Adam, Optimizer
from backprop.recurrent.truncation import Truncation
from backprop.train_checks import as_array, check_data, dry_run, warn_if_over_budget

__all__ = ["History", "accuracy", "fit", "predict"]

_UNSET: Any = object()


@dataclass
class History:
    """Per-epoch records of a ``fit``: entry ``i`` belongs to epoch ``epoch[i]``.

    ``train_loss`` and ``train_accuracy`` are averaged over the epoch's
    minibatches (weighted by their sizes) as the parameters moved;
    ``val_loss`` and ``val_accuracy`` are measured on the validation set at the
    end of each epoch. An accuracy is NaN when the task is not classification
    (labels not integers). For sequences or images, logits ``(B, C, d1, ...)`` with
    labels ``(B, d1, ...)`` (``SoftmaxCrossEntropy``'s class axis 1), it is the
    fraction of labelled positions that are right (token accuracy); the validation lists
    are empty when no validation set was given. ``seconds`` is the wall time
    since the start of training, at the end of each epoch.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    #: True when Ctrl-C stopped ``fit``: the lists hold the epochs that were complete.
    interrupted: bool = False

    def as_dict(self) -> dict[str, list[Any]]:
        """The records as ``{name: list}``, copies that the caller may change."""
        return {k: list(v) for k, v in asdict(self).items() if isinstance(v, list)}

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
        return total / n, (correct / y.size if _is_classification(y) else math.nan)


def _is_classification(y: np.ndarray) -> bool:
    """Integer labels: one per example ``(B,)``, or one per position ``(B, d1, ...)``."""
    return np.issubdtype(y.dtype, np.integer) and y.ndim >= 1


def _n_correct(y_hat: np.ndarray, y: np.ndarray) -> int:
    """How many labelled positions the logits ``y_hat`` ``(B, C, d1, ...)`` get right
    (class axis 1, as ``SoftmaxCrossEntropy``); 0 when they are not such logits."""
    if not _is_classification(y) or y_hat.shape[:1] + y_hat.shape[2:] != y.shape:
        return 0
    return int(np.count_nonzero(np.argmax(y_hat, axis=1) == y))


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


def _generator(rng: Any, seed: Any) -> np.random.Generator:
    """``rng`` (the name every other seeded function takes), or its old alias ``seed``."""
    if seed is not _UNSET:
        if rng is not _UNSET:
            raise TypeError("fit: give rng= (or its old name seed=), not both")
        rng = seed
    if rng is _UNSET:
        rng = 0
    if isinstance(rng, bool) or not (
        rng is None or isinstance(rng, int | np.integer | np.random.Generator)
    ):
        raise TypeError(f"fit: rng must be an int, a numpy Generator or None, got {rng!r}")
    if isinstance(rng, int | np.integer) and rng < 0:
        raise ValueError(f"fit: rng must be a seed >= 0, got {rng!r}")
    return np.random.default_rng(rng)


@dataclass
class _Plan:
    """Everything ``fit`` checked before its first step."""

    net: _Net
    optimizer: Optimizer
    X: np.ndarray
    y: np.ndarray
    val: tuple[np.ndarray, np.ndarray] | None
    batch_size: int
    start: float = 0.0


def _prepare(
    model: Any,
    data: tuple[Any, Any],
    loss: Layer | None,
    batch_size: int,
    optimizer: Optimizer | None,
    validation: tuple[Any, Any] | None,
    truncate: int | None,
) -> _Plan:
    """Check every argument and every array (``train_checks``), changing nothing."""
    net = _Net(model, loss, truncate=truncate)
    params = net.parameters()
    if not params:
        raise ValueError(f"fit: the model has no parameters to train ({model!r})")
    dtype = params[0].dtype
    X, y = check_data(("X", "y"), *data, dtype)
    val = None
    if validation is not None:
        if not isinstance(validation, tuple | list) or len(validation) != 2:
            raise TypeError(
                f"fit: validation must be a pair (X_val, y_val), got {type(validation).__name__}"
            )
        val = check_data(("validation X", "validation y"), *validation, dtype)
    optimizer = _optimizer_for(net, optimizer)
    per_example = dry_run(net, ("X", "y"), X, y)
    if val is not None:
        dry_run(net, ("validation X", "validation y"), *val)
    warn_if_over_budget(per_example, batch_size, X.shape[0])
    return _Plan(net, optimizer, X, y, val, batch_size)


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
    rng: int | np.random.Generator | None = _UNSET,
    progress: bool | str = True,
    file: TextIO | None = None,
    truncate: int | None = None,
    seed: int | np.random.Generator | None = _UNSET,
) -> History:
    """Train ``model`` on ``(X, y)`` with shuffled minibatches; return the ``History``.

    Shapes: ``X`` is ``(N, *features)`` in the model's float dtype; ``y`` is
    ``(N,)`` integer labels for ``SoftmaxCrossEntropy`` or ``(N, *out)`` targets
    for ``L2Loss``.

    - ``loss``: the loss layer; ``SoftmaxCrossEntropy()`` when omitted, and not
      allowed when the model (a Sequential) already ends with one.
    - ``optimizer``: built over ``model.parameters()``; ``Adam(lr=1e-3)`` when
      omitted. It must cover every parameter of the model.
    - ``rng``: seeds the order of the examples in every epoch (an int, 0 by
      default, or a ``numpy.random.Generator``, which then carries on from one
      call to the next), so equal seeds give equal runs. ``seed`` is its old name.
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

    Every argument and every array is checked before the first step
    (``backprop.train_checks``: shapes, dtypes, finite values, label ranges, the
    validation set too); an error names the argument and its first bad row, and
    nothing changes. A minibatch whose activations would pass
    ``train_checks.ACTIVATION_BUDGET`` bytes is warned about, with the figure.
    An error during training (a cost or gradient that overflowed) says where and
    what, and leaves the parameters as the last complete step left them.

    Ctrl-C (``KeyboardInterrupt``) stops training after the step under way: the
    ``History`` of the complete epochs is returned with ``interrupted=True``. A
    second Ctrl-C before that step ends raises at once.
    """
    if progress not in (True, False, "plain"):
        raise ValueError(f"fit: progress must be True, False or 'plain', got {progress!r}")
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    generator = _generator(rng, seed)
    plan = _prepare(model, (X, y), loss, batch_size, optimizer, validation, truncate)
    out = sys.stdout if file is None else file
    history = History()
    plan.start = time.perf_counter()
    with _Interrupt() as stop:
        try:
            _epochs(plan, history, epochs, generator, stop, progress, out, validation_label)
        except KeyboardInterrupt:
            stop.requested = True
    if stop.requested:
        history.interrupted = True
        if progress:
            print(
                f"interrupted: the history of the {len(history)} complete epoch(s) is returned; "
                f"the parameters are those of the last complete step",
                file=out,
            )
    return history


def _epochs(
    plan: _Plan,
    history: History,
    epochs: int,
    generator: np.random.Generator,
    stop: _Interrupt,
    progress: bool | str,
    out: TextIO,
    val_label: str,
) -> None:
    """The epochs of ``fit``, each recorded in ``history`` and reported as asked."""
    bar = _progress_bar_factory(out) if progress is True else None
    for epoch in range(1, epochs + 1):
        label = f"epoch {epoch:>{len(str(epochs))}}/{epochs}"
        pbar = _open_bar(bar, plan, label, out)
        try:
            order = generator.permutation(plan.X.shape[0])
            done = _epoch(plan, order, pbar, stop, epoch)
            if done is None:
                return
            _record(history, plan, done, pbar, val_label)
        finally:
            if pbar is not None:
                pbar.close()
        if progress and pbar is None:
            summary = _summary(history, -1, val_label)
            print(f"{label}  {summary}  ({history.seconds[-1]:.1f} s)", file=out)


def _open_bar(bar: Any, plan: _Plan, label: str, out: TextIO) -> Any:
    if bar is None:
        return None
    n_batches = -(-plan.X.shape[0] // plan.batch_size)
    return bar(total=n_batches, desc=label, leave=True, file=out, mininterval=0.2)


def _record(
    history: History, plan: _Plan, done: tuple[float, int], pbar: Any, val_label: str
) -> None:
    """Append one complete epoch to ``history``."""
    total, correct = done
    n = plan.X.shape[0]
    history.epoch.append(len(history.epoch) + 1)
    history.train_loss.append(total / n)
    history.train_accuracy.append(correct / plan.y.size if _is_classification(plan.y) else math.nan)
    if plan.val is not None:
        val_loss, val_acc = plan.net.evaluate(*plan.val, batch_size=max(plan.batch_size, 256))
        history.val_loss.append(val_loss)
        history.val_accuracy.append(val_acc)
    history.seconds.append(time.perf_counter() - plan.start)
    if pbar is not None:
        pbar.set_postfix_str(_summary(history, -1, val_label))


class _Interrupt:
    """Ctrl-C during ``fit``: the step under way finishes, then training stops.

    In the main thread SIGINT only sets ``requested``, which the loop reads
    between steps; a second SIGINT raises ``KeyboardInterrupt`` at once. Elsewhere
    (no signal handler can be set) a ``KeyboardInterrupt`` is caught by ``fit``.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):  # not in the main interpreter, say
                pass
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


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
    plan: _Plan, order: np.ndarray, pbar: Any, stop: _Interrupt, epoch: int
) -> tuple[float, int] | None:
    """One pass over the minibatches in ``order``: ``(Σ loss·size, correct predictions)``,
    or None when a Ctrl-C asked to stop (after the step it came in)."""
    net, optimizer, X, y, batch_size = plan.net, plan.optimizer, plan.X, plan.y, plan.batch_size
    total, correct = 0.0, 0
    n_batches = -(-order.size // batch_size)
    for b in range(n_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        xb, yb = _minibatch(X, idx), _minibatch(y, idx)
        J = None
        try:
            J, y_hat, grads = net.step(xb, yb)
            optimizer.step(grads)
        except ValueError as e:
            raise _step_error(e, J, epoch, b, n_batches) from e
        total += J * idx.size
        correct += _n_correct(y_hat, yb)
        if pbar is not None:
            pbar.update(1)
            if b % 10 == 0 or b == n_batches - 1:
                seen = b * batch_size + idx.size
                pbar.set_postfix_str(f"loss {total / seen:.4f}", refresh=False)
        if stop.requested:
            return None
    return total, correct


def _minibatch(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The rows ``idx`` of ``a``: a fresh array that only this step sees, so it is
    handed over read-only and a layer keeps it in its operating point without a copy."""
    rows = a[idx]
    rows.setflags(write=False)
    return rows


def _step_error(e: ValueError, J: float | None, epoch: int, b: int, n: int) -> ValueError:
    """A failed step, told with its place and with what overflowed: the data were all
    finite (checked before the first step), so it was the model's output or the loss
    (``J`` None: the forward failed) or a gradient (``J`` finite: the backward did)."""
    where = f"fit: epoch {epoch}, minibatch {b + 1} of {n}"
    if J is None:
        what = (
            "the model's output or the loss overflowed (the data are finite: checked before "
            "training)"
        )
    else:
        what = (
            f"the loss was finite (J = {J:.6g}) but a gradient overflowed in the backward pass; "
            f"the data are finite (checked before training)"
        )
    return ValueError(
        f"{where}: {what}: {e}. The parameters are as the last complete step left them; "
        f"a smaller learning rate, or inputs on a smaller scale, often helps"
    )


def predict(model: Any, X: Any, *, batch_size: int = 1024) -> np.ndarray:
    """The model's output for ``X`` (``(N, *features)``), computed in chunks.

    For a Sequential that ends with a loss, this is the input of the loss (the
    logits). The operating point is not cached when the model's ``forward``
    accepts ``cache=False``.
    """
    return _predict(model, X, batch_size, "predict")


def _predict(model: Any, X: Any, batch_size: int, where: str) -> np.ndarray:
    """``predict``, with errors that name the public function ``where``."""
    return np.concatenate(list(_chunks(model, X, batch_size, where)), axis=0)


def _chunks(model: Any, X: Any, batch_size: int, where: str) -> Iterator[np.ndarray]:
    """The model's output for ``X``, chunk by chunk of ``batch_size`` examples."""
    batch_size = _positive_int("batch_size", batch_size, where)
    X = as_array(where, "X", X)
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(f"{where}: X must be a non-empty batch (N, ...), got shape {X.shape}")
    net = _Net(model, None, where)
    for i in range(0, X.shape[0], batch_size):
        yield net.predict(X[i : i + batch_size])


def accuracy(model: Any, X: Any, y: Any, *, batch_size: int = 1024) -> float:
    """The fraction of labels the largest output hits: ``mean(argmax = y)``.

    ``y`` is ``(N,)`` for outputs ``(N, C)``, or ``(N, d1, ...)`` for outputs ``(N, C,
    d1, ...)`` (a label per token or pixel, class axis 1): then it is the fraction of
    all ``y.size`` labelled positions (token accuracy). The model runs on chunks of
    ``batch_size`` examples; only the count of correct predictions is kept from each,
    so no output for the whole of ``X`` is ever held.
    """
    X, y = as_array("accuracy", "X", X), as_array("accuracy", "y", y)
    n = X.shape[0] if X.ndim else "?"
    if not np.issubdtype(y.dtype, np.integer) or y.ndim == 0 or y.shape[0] != n:
        raise ValueError(
            f"accuracy: y must be integer labels of shape ({n},) or ({n}, d1, ...), got dtype "
            f"{y.dtype} and shape {y.shape}"
        )
    correct, start = 0, 0
    for y_hat in _chunks(model, X, batch_size, "accuracy"):
        part = y[start : start + len(y_hat)]
        if y_hat.shape[:1] + y_hat.shape[2:] != part.shape:
            want = "(N, C)" if y.ndim == 1 else f"(N, C, {', '.join(map(str, y.shape[1:]))})"
            raise ValueError(
                f"accuracy: the model's output has shape {y_hat.shape}, not {want} for labels "
                f"of shape {y.shape} (classes on axis 1)"
            )
        correct += int(np.count_nonzero(np.argmax(y_hat, axis=1) == part))
        start += len(y_hat)
    return correct / y.size
