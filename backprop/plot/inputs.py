"""Gradients with respect to an input image (chapter 14.9), one panel per gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backprop.plot._figure import DIVERGING, pyplot, symmetric_limit

#: A panel: the picture, its title, and whether it is signed (a gradient) or grey (the input).
_Panel = tuple[np.ndarray, str, bool]


def _panels(
    grads: Any, shape: tuple[int, ...], titles: Sequence[str] | None, image: Any
) -> tuple[np.ndarray, list[_Panel]]:
    """The gradients as ``(K, *shape)`` and the panels to draw: the input first, if given."""
    G = np.asarray(grads, dtype=np.float64)
    size = int(np.prod(shape))
    if G.ndim < 1 or G.size % size or (G.ndim > 1 and int(np.prod(G.shape[1:])) != size):
        raise ValueError(
            f"plot_input_gradients: grads has shape {G.shape}; expected (K, {size}) or "
            f"(K, {', '.join(map(str, shape))})"
        )
    G = G.reshape(-1, *shape)
    K = G.shape[0]
    if titles is not None and len(titles) != K:
        raise ValueError(f"plot_input_gradients: {len(titles)} titles for {K} panels")
    names = list(titles) if titles is not None else [f"∂score_{k}/∂x" for k in range(K)]
    panels: list[_Panel] = []
    if image is not None:
        img = np.asarray(image, dtype=np.float64)
        if img.size != size:
            raise ValueError(f"plot_input_gradients: image has {img.size} entries, not {size}")
        panels.append((img.reshape(shape), "input x", False))
    panels += [(G[k], names[k], True) for k in range(K)]
    return G, panels


def plot_input_gradients(
    grads: Any,
    shape: tuple[int, ...] = (8, 8),
    titles: Sequence[str] | None = None,
    *,
    image: Any = None,
    ncols: int = 6,
) -> Any:
    """A grid of gradients with respect to an input image, one panel per row of ``grads``.

    ``grads`` is ``(K, *shape)`` or ``(K, prod(shape))``: for example row ``k``
    of ``∂ score / ∂ x`` (the gradient of class ``k``'s score with respect to
    the input, chapter 14.9). All gradient panels share one symmetric colour
    scale (red raises the score, blue lowers it), shown by one colour bar at
    the right; the bar is the figure's last Axes. ``image`` (one input, any
    shape with ``prod(shape)`` entries) is shown first, in grey.
    """
    G, panels = _panels(grads, shape, titles, image)
    cols = max(1, min(ncols, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = pyplot().subplots(
        rows, cols, figsize=(1.8 * cols + 0.9, 2.0 * rows), squeeze=False, layout="constrained"
    )
    lim = symmetric_limit(G)
    mappable = None
    for ax, (data, title, signed) in zip(axes.flat, panels, strict=False):
        data2 = data if data.ndim == 2 else data.reshape(data.shape[0], -1)
        if signed:
            mappable = ax.imshow(
                data2, cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest"
            )
        else:
            ax.imshow(data2, cmap="gray_r", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if mappable is not None:  # one bar for all gradient panels: they share the scale
        bar = fig.colorbar(mappable, ax=list(axes.flat), shrink=0.9, aspect=30, pad=0.02)
        bar.set_label("gradient", fontsize=8)
        bar.ax.tick_params(labelsize=8)
    return fig
