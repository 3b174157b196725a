"""The command line: ``python -m backprop demo [options]``.

A bad option or value prints one line (what is wrong, and where the help is)
and exits with status 2, as argparse does, but without the usage block; so
does an ``--out`` folder that cannot be made or written, found before training.
A failed gradcheck exits with status 1 once everything is reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from backprop.check import GradcheckError
from backprop.demo import DEFAULTS, MODELS, OPTIMIZERS, DemoError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: Callable[[str], Any], low: float, what: str, strict: bool = True) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_positive_int = _number(int, 0, "a positive integer")
_count = _number(int, 0, "an integer >= 0", strict=False)
_positive = _number(float, 0.0, "a positive number")
_non_negative = _number(float, 0.0, "a number >= 0", strict=False)


def _parser() -> _Parser:
    parser = _Parser(
        prog="python -m backprop",
        description="backprop: an explicit, layer-based backpropagation engine (Algorithm 14.1).",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train an MLP (figure 14.1) or a CNN on the 8×8 digits, an RNN on the adding "
        "problem, or a transformer that reverses digit sequences; gradcheck it, write figures",
        description=(
            "Train Linear → ReLU → Linear → SoftmaxCrossEntropy (--model mlp, the default) or "
            "Conv2d → ReLU → MaxPool2d → Conv2d → ReLU → Flatten → Linear → "
            "SoftmaxCrossEntropy (--model cnn) on the real 8×8 handwritten digits, an "
            "Elman RNN unrolled over time on the adding problem (--model rnn), or a one-block "
            "transformer that learns to reverse sequences of 8 digits (--model transformer); "
            "run the three-way gradcheck on the trained network, write figures, and end with "
            "the line 'test accuracy: 0.xx' (for the RNN: the sums predicted within 0.04; for "
            "the transformer: the digits of held-out sequences right)."
        ),
        formatter_class=_DefaultsFormatter,
        allow_abbrev=False,
    )
    _training_arguments(demo)
    _run_arguments(demo)
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for on/off flags (their default is 'off')
    and options whose default depends on the model (their help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _default(name: str) -> str:
    """``(default: X)``, or ``(default: mlp X, cnn Y)`` when the models differ."""
    shown = {m: d[name] for m, d in DEFAULTS.items() if name in d}
    text = [
        " ".join(map(str, v)) if isinstance(v, tuple | list) else str(v) for v in shown.values()
    ]
    if len(set(text)) == 1:
        return f"(default: {text[0]})"
    return "(default: " + ", ".join(f"{m} {t}" for m, t in zip(shown, text, strict=True)) + ")"


def _training_arguments(demo: argparse.ArgumentParser) -> None:
    """The network and how it is trained. Defaults are None here and filled in per
    model by ``run``; the help shows them."""
    demo.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="the network: mlp (figure 14.1), cnn (two conv layers, max pooling), rnn "
        "(an Elman net on the adding problem) or transformer (attention over digit sequences)",
    )
    demo.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help=f"hidden layer sizes of the MLP (--model mlp: one Linear → ReLU per size) or "
        f"the RNN's state size (--model rnn) {_default('hidden')}",
    )
    demo.add_argument(
        "--seq-len",
        type=_positive_int,
        metavar="T",
        help=f"steps per sequence of the adding problem (--model rnn only) {_default('seq_len')}",
    )
    demo.add_argument(
        "--truncate",
        type=_positive_int,
        metavar="K",
        help="truncated backprop through time, K steps back (--model rnn only; default: all "
        "the steps)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="N",
        help=f"passes over the training set {_default('epochs')}",
    )
    demo.add_argument(
        "--lr", type=_positive, metavar="RATE", help=f"learning rate η {_default('lr')}"
    )
    demo.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"the update rule {_default('optimizer')}",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help=f"examples per minibatch {_default('batch_size')}",
    )
    demo.add_argument(
        "--weight-decay",
        type=_non_negative,
        metavar="λ",
        help=f"L2 weight decay: each step uses g + λθ {_default('weight_decay')}",
    )


def _run_arguments(demo: argparse.ArgumentParser) -> None:
    """The run: its seed, its outputs and what it checks."""
    demo.add_argument(
        "--seed",
        type=_count,
        help=f"seeds the split, the initial weights and the minibatch order {_default('seed')}",
    )
    demo.add_argument(
        "--out", metavar="DIR", help=f"folder the figures are written to {_default('out')}"
    )
    demo.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train on the images as they are, without the one-pixel shifted copies (mlp, cnn)",
    )
    demo.add_argument(
        "--gradcheck-examples",
        type=_count,
        metavar="K",
        help=f"test examples the gradcheck runs on, 0 skips it {_default('gradcheck_examples')}",
    )
    demo.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const="plain",
        default=True,
        help="print one plain line per epoch instead of a progress bar",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:  # the demo only writes files: never open a window
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    from backprop.demo import run

    try:
        run(
            model=args.model,
            hidden=args.hidden,
            epochs=args.epochs,
            lr=args.lr,
            optimizer=args.optimizer,
            batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            seed=args.seed,
            out=args.out,
            augment=args.augment,
            gradcheck_examples=args.gradcheck_examples,
            seq_len=args.seq_len,
            truncate=args.truncate,
            progress=args.progress,
        )
    except DemoError as e:
        option = "--" + e.setting.replace("_", "-")
        print(
            f"{parser.prog} demo: error: argument {option}: {e.problem} "
            f"(see {parser.prog} demo --help)",
            file=sys.stderr,
        )
        return 2
    except GradcheckError:  # reported in full above, table included
        print(f"{parser.prog} demo: error: the gradcheck failed (see above)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{parser.prog} demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog} demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
