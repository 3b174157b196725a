"""How far back a gradient reaches in an unrolled recurrent net: ``‖∂h_T/∂h_t‖`` over ``t``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from backprop.plot._figure import figure_and_ax


def plot_gradient_norms(
    norms: Mapping[str, Any], ax: Any = None, *, title: str | None = None
) -> Any:
    """One curve per entry of ``norms``: ``‖∂h_T/∂h_t‖`` against ``t``, on a log scale.

    ``norms`` maps a label (``"before training"``) to an array ``(B, T)`` or ``(T,)``,
    as ``backprop.recurrent.gradient_norms`` returns it (entry ``t`` for the state
    ``h_t``, ``t = 0 … T−1``). For a batch the curve is the geometric mean over the
    examples and the band their range. A curve that falls towards ``t = 0`` is a
    gradient that vanishes on its way back through time.
    """
    if not isinstance(norms, Mapping) or not norms:
        raise TypeError("plot_gradient_norms: expected {label: norms (B, T) or (T,)}")
    fig, ax = figure_and_ax(ax, (6.0, 3.6))
    for label, values in norms.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] < 1 or np.any(v <= 0) or not np.all(np.isfinite(v)):
            raise ValueError(
                f"plot_gradient_norms: {label!r} must be positive finite norms of shape "
                f"(B, T) or (T,), got shape {np.shape(values)}"
            )
        t = np.arange(v.shape[1])
        (line,) = ax.semilogy(t, np.exp(np.log(v).mean(axis=0)), marker=".", label=label)
        if v.shape[0] > 1:
            ax.fill_between(t, v.min(axis=0), v.max(axis=0), color=line.get_color(), alpha=0.15)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("t (the state h_t)")
    ax.set_ylabel("‖∂h_T / ∂h_t‖")
    ax.set_title(title or "how strongly h_t still moves the last state h_T")
    ax.legend()
    return fig
