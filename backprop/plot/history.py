"""Training curves: the loss (and the accuracy) of each epoch, as ``fit`` recorded them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from backprop.plot._figure import figure_and_ax, pyplot


def _curve(key: str, val_label: str) -> str:
    """``"train_loss"`` -> ``"train loss"``; ``"val_loss"`` -> ``"<val_label> loss"``."""
    split, what = key.split("_", 1)
    return f"{val_label if split == 'val' else split} {what}"


def _axes(ax: Any, has_acc: bool) -> tuple[Any, Any, Any]:
    """``(fig, loss_ax, acc_ax)``: two panels of a new figure, or ``ax`` and its twin."""
    if ax is None:
        n = 2 if has_acc else 1
        fig, axes = pyplot().subplots(
            1, n, figsize=(5.0 * n, 3.6), layout="constrained", squeeze=False
        )
        return fig, axes[0, 0], (axes[0, 1] if has_acc else None)
    fig, loss_ax = figure_and_ax(ax, (5.0, 3.6))
    return fig, loss_ax, (loss_ax.twinx() if has_acc else None)


def plot_history(history: Any, ax: Any = None, *, val_label: str = "val") -> Any:
    """Training curves: loss per epoch (and accuracy, when there is one).

    The validation curves are labelled ``val_label`` (``"test"`` for a held-out
    test set that was only watched).

    ``history`` is a ``backprop.train.History`` or its ``as_dict()``. With
    ``ax=None`` the figure has two panels, loss and accuracy; with one Axes
    the losses go on it and the accuracies on a twin axis at the right.
    """
    h = history.as_dict() if hasattr(history, "as_dict") else dict(history)
    if not isinstance(h, Mapping) or "epoch" not in h or "train_loss" not in h:
        raise TypeError("plot_history: expected a History or its as_dict()")
    epochs = np.asarray(h["epoch"])
    accs = {k: np.asarray(h.get(k, []), dtype=float) for k in ("train_accuracy", "val_accuracy")}
    has_acc = any(a.size and not np.all(np.isnan(a)) for a in accs.values())
    fig, loss_ax, acc_ax = _axes(ax, has_acc)
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        values = np.asarray(h.get(key, []), dtype=float)
        if values.size:
            loss_ax.plot(epochs, values, style, marker=".", label=_curve(key, val_label))
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_ax, acc_ax) if acc_ax is not None else (loss_ax,):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss J")
    loss_ax.set_title("loss")
    loss_ax.legend(loc="upper right")
    if acc_ax is not None:
        for key, style in (("train_accuracy", "-"), ("val_accuracy", "--")):
            values = accs[key]
            if values.size and not np.all(np.isnan(values)):
                acc_ax.plot(epochs, values, style, marker=".", label=_curve(key, val_label))
        acc_ax.set_ylabel("accuracy")
        if ax is None:
            acc_ax.set_xlabel("epoch")
            acc_ax.set_title("accuracy")
        acc_ax.legend(loc="lower right")
    return fig
