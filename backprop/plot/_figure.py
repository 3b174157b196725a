"""What the figures share: matplotlib on first use, one Axes, a symmetric scale, index ticks."""

from __future__ import annotations

from typing import Any

import numpy as np

#: The colour map of signed numbers: zero is white, red positive, blue negative.
DIVERGING = "RdBu_r"
#: Up to this many rows (or columns), every index gets a tick.
ALL_TICKS = 12


def pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError that names the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "backprop.plot needs matplotlib, an optional extra: pip install 'backprop[plot]'"
        ) from None
    return plt


def figure_and_ax(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``ax`` and its figure, or a new figure of ``figsize`` with one Axes."""
    if ax is None:
        fig, ax = pyplot().subplots(figsize=figsize, layout="constrained")
        return fig, ax
    pyplot()
    return ax.figure, ax


def symmetric_limit(*arrays: np.ndarray) -> float:
    """The largest ``|entry|`` of the arrays (1 when all are zero): the scale is ``±`` it."""
    m = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    return m if m > 0 else 1.0


def index_ticks(axis: Any, n: int) -> None:
    """Integer ticks only on one axis of a matrix picture with ``n`` rows or columns.

    Entry ``i`` of a matrix drawn by ``imshow`` or ``spy`` is centred on ``i``;
    matplotlib's default locator would also put ticks at ``-0.5, 0.5, ...``,
    between entries. Small matrices get a tick at every index, larger ones a
    few integer ticks.
    """
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if n <= ALL_TICKS:
        axis.set_major_locator(FixedLocator(list(range(n))))
    else:
        axis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=2))
