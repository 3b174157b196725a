"""Attention weights: the matrix ``A`` of each head, query by key.

Row ``i`` of a head's ``A = softmax(Q Kᵀ / √m)`` says how much query token ``i`` takes
from each key token: the entries are in ``[0, 1]`` and each row sums to 1 (a masked key
gets 0; a row with no allowed key is all zeros). ``plot_attention`` draws one panel per
head on one scale from 0 (white) to 1 (black), with the tokens on the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backprop.plot._figure import index_ticks, pyplot


def _labels(what: str, given: Any, n: int) -> list[str] | None:
    if given is None:
        return None
    labels = [str(v) for v in np.asarray(given).ravel()]
    if len(labels) != n:
        raise ValueError(f"plot_attention: {what} has {len(labels)} labels for {n} tokens")
    return labels


def plot_attention(
    weights: Any,
    keys: Sequence[Any] | np.ndarray | None = None,
    queries: Sequence[Any] | np.ndarray | None = None,
    *,
    key_label: str = "key",
    query_label: str = "query",
    title: str | None = None,
) -> Any:
    """The attention matrices ``weights``, ``(T_q, T_k)`` for one head or ``(H, T_q,
    T_k)`` for ``H`` heads (``MultiHeadAttention``'s ``graph["attention"]`` output for
    one example), one panel per head: rows are queries, columns keys.

    ``keys`` and ``queries`` label the columns and rows (the tokens, say); by default
    they are the positions; ``key_label`` and ``query_label`` name the two axes. Returns
    the figure; its last Axes is the colour bar.
    """
    A = np.asarray(weights, dtype=np.float64)
    if A.ndim == 2:
        A = A[None]
    if A.ndim != 3 or A.size == 0:
        raise ValueError(
            f"plot_attention: weights has shape {np.shape(weights)}; expected (T_q, T_k) or "
            f"(heads, T_q, T_k)"
        )
    H, Tq, Tk = A.shape
    key_labels, query_labels = _labels("keys", keys, Tk), _labels("queries", queries, Tq)
    fig, axes = pyplot().subplots(
        1, H, figsize=(2.6 * H + 1.0, 3.2), squeeze=False, layout="constrained"
    )
    image = None
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(A[h], cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}" if H > 1 else "attention", fontsize=9)
        index_ticks(ax.xaxis, Tk)
        index_ticks(ax.yaxis, Tq)
        if key_labels is not None and Tk <= 24:
            ax.set_xticks(range(Tk), key_labels)
        if query_labels is not None and Tq <= 24:
            ax.set_yticks(range(Tq), query_labels)
        ax.set_xlabel(key_label, fontsize=8)
        ax.tick_params(labelsize=7)
        if h == 0:
            ax.set_ylabel(query_label, fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.85, aspect=20, pad=0.02)
    fig.suptitle(title or "attention weights A = softmax(Q Kᵀ/√m): row i, what query i takes")
    return fig
