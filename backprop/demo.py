"""The demo: an MLP (figure 14.1) or a small CNN on the real 8×8 digits, an RNN, or a
transformer.

``--model rnn`` is the recurrent demo, an Elman net unrolled over time that learns the
adding problem; it lives in ``backprop.demo_rnn``. ``--model transformer`` trains a
one-block transformer to reverse sequences of digits; it lives in
``backprop.demo_transformer``. Both share the settings, the output folder, the gradient
check and the last line with the two below.

``python -m backprop demo`` (and ``make demo``) calls ``run``. It

1. loads the 1,797 digits and splits them, seeded, into 75% training and 25% test;
2. builds the model: for ``model="mlp"`` ``Linear → ReLU → ... → Linear →
   SoftmaxCrossEntropy`` (64 inputs, 10 classes), the chain of figure 14.1
   ending in the cost ``J``; for ``model="cnn"`` ``Conv2d → ReLU → MaxPool2d →
   Conv2d → ReLU → Flatten → Linear → SoftmaxCrossEntropy`` on the images as
   ``(N, 1, 8, 8)``, two conv layers, each a linear layer whose W is Toeplitz;
3. trains it with seeded minibatches, showing the progress; the training set
   is enlarged with copies of each image shifted by one pixel. The test set is
   only watched: its loss and accuracy after each epoch are ``fit``'s
   validation columns, labelled "test" in the epoch lines and the figure, and
   nothing is chosen by them;
4. runs the three-way ``gradcheck`` on the trained network at a few test
   examples and prints the worst relative error (the CNN entry by entry: see
   ``CNN_GRADCHECK_MODE``);
5. writes figures (when matplotlib is installed): the training curves, the
   network drawn as a DAG (the MLP only), and ``∂ score / ∂ input`` for one
   test image, an 8×8 picture per class (chapter 14.9); for the CNN also the
   first conv layer's learned filters and its ``L^x``, the doubly-block
   Toeplitz matrix, next to the kernel it repeats;
6. ends with the line ``test accuracy: 0.98``.

The settings are checked, and the output folder made and tried, before the
data is loaded: a bad one raises ``DemoError`` at once, not after training.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from backprop.check import GradcheckError, gradcheck
from backprop.datasets import load_digits, train_test_split
from backprop.graph import Sequential
from backprop.layer import Layer
from backprop.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, SoftmaxCrossEntropy
from backprop.optim import SGD, Adam, Optimizer
from backprop.train import History, accuracy, fit

__all__ = [
    "DEFAULTS",
    "DemoError",
    "DemoResult",
    "build_cnn",
    "build_mlp",
    "make_optimizer",
    "run",
    "shift_augment",
]

_SHARED: dict[str, Any] = {
    "epochs": 20,
    "lr": 2e-3,
    "optimizer": "adam",
    "batch_size": 64,
    "weight_decay": 1e-4,
    "seed": 0,
    "out": "backprop-output",
    "augment": True,
    "gradcheck_examples": 3,
}

#: Each model's default settings (``python -m backprop demo --help`` shows them).
#: The CNN's were measured on seeds 0-4: at least 98.6% test accuracy each.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (256,), **_SHARED},
    "cnn": dict(_SHARED),
    # The RNN's were measured on seeds 0-4 (see the README): ``hidden`` is its state size.
    "rnn": {
        **_SHARED,
        "hidden": (32,),
        "epochs": 120,
        "lr": 3e-3,
        "batch_size": 32,
        "weight_decay": 0.0,
        "seq_len": 20,
        "truncate": None,
    },
    # backprop.demo_transformer: reversing digit sequences; seeds 0-3 measured (README)
    "transformer": {
        **_SHARED,
        "epochs": 12,
        "lr": 3e-3,
        "weight_decay": 0.0,
        "gradcheck_examples": 1,
    },  # fmt: skip
}
MODELS = tuple(DEFAULTS)

#: The CNN is checked entry by entry. The digits' blank background makes exact
#: ties in max pooling (the four ReLU(b) of a 2×2 window are equal), where the
#: max has a kink: every random direction of the input crosses one, so the
#: directions mode that ``"auto"`` picks for a net this size could not check
#: the input; entry by entry only the entries at a tie are excluded.
CNN_GRADCHECK_MODE = "entries"

OPTIMIZERS = ("sgd", "momentum", "adam")


class DemoError(ValueError):
    """A setting of the demo that cannot work, found before any training.

    ``setting`` is the name of ``run``'s argument (``"out"``, ``"seed"``);
    ``problem`` says what is wrong with it, in one line.
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass
class DemoResult:
    """What ``run`` measured and wrote.

    ``history.val_loss`` and ``history.val_accuracy`` are measured on the test
    set (it is ``fit``'s validation set here, watched but never tuned on).
    """

    test_accuracy: float
    history: History
    gradcheck_worst: float | None
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def build_mlp(
    hidden: Sequence[int], n_in: int = 64, n_classes: int = 10, *, seed: int = 0
) -> Sequential:
    """``Linear → ReLU`` per hidden size, then ``Linear → SoftmaxCrossEntropy`` (figure 14.1)."""
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    n = n_in
    for width in hidden:
        layers += [Linear(n, width, rng=rng), ReLU()]
        n = width
    layers += [Linear(n, n_classes, rng=rng), SoftmaxCrossEntropy()]
    return Sequential(layers)


def build_cnn(image: tuple[int, int] = (8, 8), n_classes: int = 10, *, seed: int = 0) -> Sequential:
    """Two 3×3 conv layers (16 and 32 channels, padding 1) with a 2×2 max pooling
    between them, then ``Flatten → Linear → SoftmaxCrossEntropy``; input ``(B, 1, *image)``."""
    rng = np.random.default_rng(seed)
    features = 32 * (image[0] // 2) * (image[1] // 2)
    return Sequential(
        [
            Conv2d(1, 16, 3, padding=1, rng=rng),
            ReLU(),
            MaxPool2d(2),
            Conv2d(16, 32, 3, padding=1, rng=rng),
            ReLU(),
            Flatten(),
            Linear(features, n_classes, rng=rng),
            SoftmaxCrossEntropy(),
        ]
    )


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> Optimizer:
    """``"sgd"`` (eq. 14.9), ``"momentum"`` (SGD with μ = 0.9) or ``"adam"``."""
    if name == "sgd":
        return SGD(params, lr, weight_decay=weight_decay)
    if name == "momentum":
        return SGD(params, lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return Adam(params, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def shift_augment(X: np.ndarray, y: np.ndarray, shape: tuple[int, int] = (8, 8)) -> tuple[Any, Any]:
    """``X`` and its copies shifted one pixel up, down, left and right (blank edges).

    ``X`` is ``(N, h·w)``; returns ``(5N, h·w)`` and the labels repeated to match.
    """
    images = X.reshape(-1, *shape)
    copies = [images]
    for axis in (1, 2):
        for step in (1, -1):
            moved = np.roll(images, step, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = slice(0, 1) if step == 1 else slice(-1, None)
            moved[tuple(edge)] = 0.0
            copies.append(moved)
    return np.concatenate(copies).reshape(-1, X.shape[1]), np.tile(y, len(copies))


def _score_gradients(net: Sequential, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ∂ score / ∂ x)`` for one input ``x`` (``(64,)``, or ``(1, 8, 8)`` for the CNN).

    The network without its loss maps ``x`` to the 10 class scores. Running it on
    10 copies of ``x`` and seeding the backward pass with the identity, row ``k``
    of ``g_0`` is ``e_k · L``: the gradient of score ``k`` (chapter 14.9).
    """
    scorer = Sequential(net.layers[:-1])
    n_classes = net.layers[-2].params["W"].shape[0]
    scores = scorer.forward(np.repeat(x[None], n_classes, axis=0))
    g_0, _ = scorer.backward(np.eye(n_classes, dtype=x.dtype))
    return np.array(scores[0]), np.asarray(g_0)


def _pyplot() -> Any:
    """``matplotlib.pyplot``, or None when matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _output_folder(out: str | Path) -> Path:
    """``out`` as a folder the figures can be written to: made when missing, then tried.

    Raises ``DemoError`` when ``out`` is a file, cannot be made, or takes no new file.
    """
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise DemoError("out", f"{path} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError("out", f"cannot make the folder {path}: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DemoError("out", f"cannot write in the folder {path}: {e.strerror or e}") from None
    return path


def _figures(
    plt: Any,
    net: Sequential,
    history: History,
    X_test: np.ndarray,
    y_test: np.ndarray,
    out: Path,
    say: Any,
) -> list[Path]:
    from backprop import plot

    written = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    save(plot.plot_history(history, val_label="test"), "training_curves.png")
    conv = net.layers[0]
    if not isinstance(conv, Conv2d):  # the CNN's long layer names overlap in draw_graph
        save(plot.draw_graph(net), "network.png")
    x, label = X_test[0], int(y_test[0])
    scores, grads = _score_gradients(net, x)
    guess = int(np.argmax(scores))
    titles = [f"∂score_{k}/∂x" + (" (top)" if k == guess else "") for k in range(len(grads))]
    fig = plot.plot_input_gradients(grads, (8, 8), titles, image=x)
    fig.axes[0].set_title(f"input x: a {label}", fontsize=9)
    fig.suptitle("gradient of each class score with respect to the input image")
    save(fig, "input_gradients.png")
    if isinstance(conv, Conv2d):
        save(plot.plot_filters(conv.params["W"]), "filters.png")
        strongest = int(np.argmax(np.abs(conv.params["W"].value).sum(axis=(1, 2, 3))))
        save(plot.plot_toeplitz(conv, X_test.shape[2:], out_channel=strongest), "toeplitz.png")
    say(f"figures written to {out}/: {', '.join(p.name for p in written)}")
    return written


def _check_gradients(
    net: Any, X: np.ndarray, y: np.ndarray, say: Callable[[str], None], mode: str = "auto"
) -> tuple[float | None, GradcheckError | None]:
    """The three-way check of the trained net on the examples ``X``: ``(worst
    relative error, None)``, or ``(None, the error)`` when it fails."""
    k = X.shape[0]
    if k == 0:
        return None, None
    t = time.perf_counter()
    try:
        report = gradcheck(net, X, y[:k], mode=mode)
    except GradcheckError as e:
        say(f"gradcheck FAILED: {e}")
        return None, e
    exact = max(v for c, v in report.checks.items() if "finite" not in c and "directional" not in c)
    kinks = sum(
        n
        for c, (n, _) in report.excluded.items()
        if c.endswith("fast backward vs finite differences")
    )
    skipped = f"; {kinks} entries at a kink within the step left out" if kinks else ""
    say(
        f"gradcheck on {k} test examples: {len(report.checks)} comparisons passed in "
        f"{time.perf_counter() - t:.1f} s; worst relative error {report.worst:.1e} "
        f"(against finite differences{skipped}), {exact:.1e} between the fast backward "
        f"pass and the explicit Jacobians"
    )
    return report.worst, None


def check_and_draw(
    net: Any,
    X: np.ndarray,
    y: np.ndarray,
    mode: str,
    plt: Any,
    folder: Path | None,
    say: Callable[[str], None],
    draw: Callable[[Path], list[Path]],
) -> tuple[float | None, GradcheckError | None, list[Path]]:
    """The end of every demo: the three-way check of the trained ``net`` on ``X`` (see
    ``_check_gradients``), then its figures, ``draw(folder)``, or the line saying they
    were skipped. Returns ``(worst error, the failure or None, the figures written)``."""
    worst, failure = _check_gradients(net, X, y, say, mode)
    if plt is None or folder is None:
        say("figures skipped: matplotlib is not installed (pip install 'backprop[plot]')")
        return worst, failure, []
    return worst, failure, draw(folder)


_TITLES = {
    "mlp": "a multilayer perceptron (figure 14.1)",
    "cnn": "a convolutional network (each conv layer a linear layer whose W is Toeplitz)",
}

#: The settings only the RNN has (the others refuse them).
_RNN_ONLY = ("seq_len", "truncate")


def _settings(model: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with each None replaced by ``model``'s default; checks the model,
    that ``hidden`` is only given to the MLP and the RNN, and the seed."""
    if model not in DEFAULTS:
        raise DemoError("model", f"must be one of {', '.join(MODELS)}, got {model!r}")
    if model in ("cnn", "transformer") and given.get("hidden") is not None:
        raise DemoError("hidden", f"sets the MLP's hidden layers; it does not apply to {model!r}")
    if model == "rnn" and given.get("hidden") is not None and len(given["hidden"]) != 1:
        raise DemoError("hidden", f"the RNN has one state size, got {len(given['hidden'])}")
    for name in _RNN_ONLY:
        if model != "rnn" and given.get(name) is not None:
            raise DemoError(name, f"applies to the RNN only (--model rnn), not to {model!r}")
    settings = {k: DEFAULTS[model].get(k) if v is None else v for k, v in given.items()}
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DemoError("seed", f"must be an integer >= 0, got {seed!r}")
    return settings


def run(
    *,
    model: str = "mlp",
    hidden: Sequence[int] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    augment: bool | None = None,
    gradcheck_examples: int | None = None,
    seq_len: int | None = None,
    truncate: int | None = None,
    progress: bool | str = True,
    file: TextIO | None = None,
) -> DemoResult:
    """Train, check and draw (see the module docstring); print as it goes.

    ``model`` is ``"mlp"``, ``"cnn"``, ``"rnn"`` or ``"transformer"``; every setting left
    at None takes that model's value in ``DEFAULTS`` (``hidden`` is the MLP's layers or the
    RNN's state size; ``seq_len`` and ``truncate`` are the RNN's only). The last line
    printed is ``test accuracy: 0.xx``. A failing gradcheck is reported in full
    (with its table of worst entries) and its ``GradcheckError`` re-raised
    after the figures are written. A bad ``model``, ``seed`` or ``out``, or a
    setting of another model (``hidden`` given to the CNN, say), raises ``DemoError``
    before anything is printed or trained.
    """
    given = dict(
        hidden=hidden, epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size,
        weight_decay=weight_decay, seed=seed, out=out, augment=augment,
        gradcheck_examples=gradcheck_examples, seq_len=seq_len, truncate=truncate,
    )  # fmt: skip
    s = _settings(model, given)
    plt = _pyplot()
    folder = _output_folder(s["out"]) if plt is not None else None
    stream = sys.stdout if file is None else file

    def say(line: str = "") -> None:
        print(line, file=stream, flush=True)

    if model == "rnn":
        from backprop.demo_rnn import run_rnn

        return run_rnn(s, plt, folder, say, progress=progress, file=stream)
    if model == "transformer":
        from backprop.demo_transformer import run_transformer

        return run_transformer(s, plt, folder, say, progress=progress, file=stream)
    start = time.perf_counter()
    X, y = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_fraction=0.25, rng=s["seed"])
    n_real = X_train.shape[0]
    if s["augment"]:
        X_train, y_train = shift_augment(X_train, y_train)
    n_classes = int(y.max()) + 1
    if model == "cnn":
        X_train, X_test = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)
        net = build_cnn((8, 8), n_classes, seed=s["seed"])
    else:
        net = build_mlp(s["hidden"], X.shape[1], n_classes, seed=s["seed"])
    opt = make_optimizer(s["optimizer"], net.parameters(), s["lr"], s["weight_decay"])
    say(f"backprop demo: {_TITLES[model]} on the 8×8 handwritten digits")
    extra = f", {X_train.shape[0]} with one-pixel shifts" if s["augment"] else ""
    say(
        f"data: {X.shape[0]} images of 8×8 pixels, {n_real} for training{extra}, "
        f"{X_test.shape[0]} held out for the test"
    )
    say(str(net))
    say(
        f"training: {opt!r}, {s['epochs']} epochs, minibatches of {s['batch_size']}, "
        f"seed {s['seed']}"
    )
    history = fit(
        net,
        X_train,
        y_train,
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        optimizer=opt,
        validation=(X_test, y_test),
        validation_label="test",
        seed=s["seed"],
        progress=progress,
        file=stream,
    )
    say(f"trained in {history.seconds[-1]:.1f} s")

    mode = CNN_GRADCHECK_MODE if model == "cnn" else "auto"
    checked = X_test[: s["gradcheck_examples"]]
    worst, failure, figures = check_and_draw(
        net, checked, y_test, mode, plt, folder, say,
        lambda out: _figures(plt, net, history, X_test, y_test, out, say),
    )  # fmt: skip
    test_acc = accuracy(net, X_test, y_test)
    seconds = time.perf_counter() - start
    correct = round(test_acc * X_test.shape[0])
    say(f"total time {seconds:.1f} s; test set: {correct} of {X_test.shape[0]} correct")
    say(f"test accuracy: {test_acc:.2f}")
    if failure is not None:
        raise failure
    return DemoResult(test_acc, history, worst, figures, seconds)
