"""Convolutions: the learned filters, and ``L^x`` as the Toeplitz matrix of its kernel.

"A conv layer is a linear layer whose W is Toeplitz" (textbook ch. 24). For one
example, ``L^x`` of a ``Conv2d`` is ``(c_out·Ho·Wo, c_in·H·W)``, rows in the
order ``(o, i, j)`` and columns ``(c, y, x)``; the block of output channel ``o``
and input channel ``c`` holds, in row ``(i, j)``, the taps of the kernel
``W[o, c]`` shifted to output position ``(i, j)``. ``plot_toeplitz`` draws that
block (or the blocks of every output channel, stacked) next to the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.plot._figure import DIVERGING, index_ticks, pyplot, symmetric_limit

#: What ``plot_toeplitz`` writes under its panels.
TOEPLITZ_CAPTION = (
    "Each row of L^x holds the kernel's taps, shifted along the image to that row's output "
    "position (taps on the zero padding are dropped):\nthe same few numbers repeated on "
    "every diagonal, in blocks that repeat too, which is why W is (doubly-block) Toeplitz."
)


def _array(W: Any) -> np.ndarray:
    """A weight as a float64 array: a ``Parameter`` (its ``value``) or anything array-like."""
    return np.asarray(getattr(W, "value", W), dtype=np.float64)


def plot_filters(W: Any, *, in_channel: int = 0, ncols: int = 8, title: str | None = None) -> Any:
    """The kernels of a convolution, one small image per output channel.

    ``W`` is ``(c_out, c_in, kh, kw)`` (a ``Conv2d``'s ``"W"``, array or
    ``Parameter``) or ``(c_out, kh, kw)``; panel ``o`` is ``W[o, in_channel]``.
    All panels share one symmetric colour scale (red positive, blue negative,
    zero white), shown by one colour bar, the figure's last Axes.
    """
    A = _array(W)
    if A.ndim == 3:
        A = A[:, None]
    if A.ndim != 4:
        raise ValueError(
            f"plot_filters: W has shape {A.shape}; expected (c_out, c_in, kh, kw) or "
            f"(c_out, kh, kw)"
        )
    if not 0 <= in_channel < A.shape[1]:
        raise ValueError(f"plot_filters: in_channel {in_channel} is out of range for {A.shape[1]}")
    kernels = A[:, in_channel]
    cols = max(1, min(ncols, len(kernels)))
    rows = -(-len(kernels) // cols)
    fig, axes = pyplot().subplots(
        rows,
        cols,
        figsize=(1.1 * cols + 0.9, 1.25 * rows + 0.5),
        squeeze=False,
        layout="constrained",
    )
    lim = symmetric_limit(kernels)
    image = None
    for o, ax in enumerate(axes.flat):
        if o >= len(kernels):
            ax.axis("off")
            continue
        image = ax.imshow(kernels[o], cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"{o}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=list(axes.flat), shrink=0.9, aspect=25, pad=0.02)
    bar.ax.tick_params(labelsize=8)
    kh, kw = kernels.shape[1:]
    fig.suptitle(title or f"the {len(kernels)} learned {kh}×{kw} filters W[o, {in_channel}]")
    return fig


def _convolution(conv: Any, size: tuple[int, int] | None) -> Any:
    """The ``Convolution`` (``L^x``) of ``conv``: a ``Conv2d`` on a ``size`` input, or one given."""
    from backprop.jacobian.conv import Convolution
    from backprop.layers.conv import Conv2d

    if isinstance(conv, Convolution):
        return conv
    if not isinstance(conv, Conv2d):
        raise TypeError(
            f"plot_toeplitz: expected a Conv2d or its L^x (a Convolution), got {conv!r}"
        )
    if size is None:
        raise ValueError("plot_toeplitz: give the input size (H, W) the Conv2d is applied to")
    return Convolution(_array(conv.params["W"]), conv.geometry(*size), 1)


def toeplitz_block(L_x: Any, out_channel: int | None = 0, in_channel: int = 0) -> Any:
    """The rows of ``out_channel`` (all output channels when None) and the columns of
    ``in_channel`` of ``L_x.to_sparse(0)``, as a ``scipy.sparse.coo_array`` of its
    stored entries (the structural nonzeros: one per kernel tap inside the image)."""
    import scipy.sparse as sp

    geo = L_x.geo
    P, HW = geo.Ho * geo.Wo, geo.H * geo.W
    if geo.groups != 1:
        raise ValueError(f"plot_toeplitz: draws convolutions with groups=1, not {geo.groups}")
    if not 0 <= in_channel < geo.c_in:
        raise ValueError(f"plot_toeplitz: in_channel {in_channel} is out of range for {geo.c_in}")
    if out_channel is not None and not 0 <= out_channel < geo.c_out:
        raise ValueError(
            f"plot_toeplitz: out_channel {out_channel} is out of range for {geo.c_out}"
        )
    rows = slice(None) if out_channel is None else slice(out_channel * P, (out_channel + 1) * P)
    S = sp.csr_array(L_x.to_sparse(0))[rows][:, in_channel * HW : (in_channel + 1) * HW]
    return sp.coo_array(S)


def _block_lines(ax: Any, geo: Any, M: int, N: int) -> None:
    """Thin lines between the blocks: one block column per input row ``y``, one block
    row per output row ``i``."""
    for k in range(geo.W, N, geo.W):
        ax.axvline(k - 0.5, color="0.85", lw=0.5)
    for k in range(geo.Wo, M, geo.Wo):
        ax.axhline(k - 0.5, color="0.85", lw=0.5)


def plot_toeplitz(
    conv: Any,
    size: tuple[int, int] | None = None,
    *,
    out_channel: int | None = 0,
    in_channel: int = 0,
) -> Any:
    """``L^x`` of a convolution as the doubly-block Toeplitz matrix, next to its kernel.

    ``conv`` is a ``Conv2d`` applied to ``size = (H, W)`` images (its ``L^x`` is
    built from its weights and geometry: exactly ``conv.jacobians()[0]`` after
    a forward pass at that size, without running one) or that ``Convolution``
    itself. Three panels: where the block of ``out_channel`` and ``in_channel``
    stores entries (black: the pattern of ``to_sparse``), the values stored
    there (white where nothing is stored), and the kernel ``W[out_channel,
    in_channel]`` on the same colour scale. With ``out_channel=None`` the blocks
    of every output channel are stacked, and so are their kernels. Thin lines
    mark the blocks; a caption says why the matrix is Toeplitz. The figure's
    Axes are the three panels, then the colour bar.
    """
    L_x = _convolution(conv, size)
    geo = L_x.geo
    S = toeplitz_block(L_x, out_channel, in_channel)
    M, N = S.shape
    stored = np.zeros((M, N), dtype=bool)
    stored[S.row, S.col] = True
    values = np.ma.masked_array(np.zeros((M, N)), mask=~stored)
    values[S.row, S.col] = S.data
    W = np.asarray(L_x.W, dtype=np.float64)[:, in_channel]
    kernels = W if out_channel is None else W[out_channel : out_channel + 1]
    kh, kw = kernels.shape[1:]
    kernel = kernels.reshape(-1, kw)  # stacked vertically when there are several

    fig, axes = pyplot().subplots(
        1, 3, figsize=(11.0, 5.0), width_ratios=[1.0, 1.0, 0.45], layout="constrained"
    )
    lim = symmetric_limit(values.compressed(), kernel)
    aspect = "equal" if M <= 3 * N else "auto"
    signed = {"cmap": DIVERGING, "vmin": -lim, "vmax": lim, "interpolation": "nearest"}
    pattern = {"cmap": "gray_r", "vmin": 0, "vmax": 1, "interpolation": "nearest"}
    axes[0].imshow(stored.astype(np.float64), aspect=aspect, **pattern)
    axes[1].imshow(values, aspect=aspect, **signed)
    shown = axes[2].imshow(kernel, **signed)
    axes[0].set_title(f"where L^x stores entries: {S.nnz} of {M}×{N}", fontsize=9)
    axes[1].set_title("the values stored there", fontsize=9)
    o = ":" if out_channel is None else out_channel
    plural = "s" if out_channel is None else ""
    axes[2].set_title(f"the kernel{plural} W[{o}, {in_channel}]", fontsize=9)
    stacked = ", stacked by output channel" if out_channel is None else ""
    for ax in axes[:2]:
        _block_lines(ax, geo, M, N)
        ax.set_xlabel(f"column: input entry (y, x) of channel {in_channel}", fontsize=8)
        ax.set_ylabel(f"row: output entry (i, j){stacked}", fontsize=8)
        index_ticks(ax.xaxis, N)
        index_ticks(ax.yaxis, M)
    for k in range(kh, kernel.shape[0], kh):
        axes[2].axhline(k - 0.5, color="0.5", lw=0.5)
    axes[2].set_xticks(range(kw))
    axes[2].set_yticks(range(kh) if len(kernels) == 1 else [])
    fig.colorbar(shown, ax=list(axes[1:]), shrink=0.8)
    which = "all output channels" if out_channel is None else f"output channel {out_channel}"
    fig.suptitle(
        f"L^x of a {kh}×{kw} convolution ({geo.describe()}) on {geo.H}×{geo.W} images: "
        f"{which}, input channel {in_channel}"
    )
    fig.supxlabel(TOEPLITZ_CAPTION, fontsize=8)
    return fig
