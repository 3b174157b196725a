"""Jacobians as matrices: a heatmap, where the entries are stored, and one backward step.

A Jacobian of one example is drawn with one row per entry of ``x_out`` and one
column per entry of ``x_in`` (or of θ), so a row vector ``g`` multiplies it from
the left (eq. 14.8 and 14.10).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.plot._figure import DIVERGING, figure_and_ax, index_ticks, pyplot, symmetric_limit


def _matrix(J: Any, example: int, where: str) -> np.ndarray:
    """Example ``example`` of ``J`` as a dense ``(M, N)`` array.

    ``J`` may be a ``backprop.jacobian.Jacobian`` (a batch of matrices), an array
    of shape ``(B, M, N)`` or ``(M, N)``, or a ``scipy.sparse`` matrix.
    """
    if hasattr(J, "to_sparse") and hasattr(J, "batch"):
        if not 0 <= example < J.batch:
            raise ValueError(f"{where}: example {example} is out of range for a batch of {J.batch}")
        return np.asarray(J.to_sparse(example).toarray())
    if hasattr(J, "toarray"):
        J = J.toarray()
    A = np.asarray(J)
    if A.ndim == 3:
        if not 0 <= example < A.shape[0]:
            raise ValueError(
                f"{where}: example {example} is out of range for a batch of {A.shape[0]}"
            )
        return A[example]
    if A.ndim == 2:
        if example != 0:
            raise ValueError(f"{where}: a single (M, N) matrix has only example 0")
        return A
    raise ValueError(f"{where}: expected a Jacobian, (B, M, N) or (M, N), got shape {A.shape}")


def _sparse(J: Any, example: int, where: str) -> Any:
    """Example ``example`` of ``J`` as a ``scipy.sparse.coo_array`` of its stored entries."""
    import scipy.sparse as sp

    if hasattr(J, "to_sparse") and hasattr(J, "batch"):
        if not 0 <= example < J.batch:
            raise ValueError(f"{where}: example {example} is out of range for a batch of {J.batch}")
        return sp.coo_array(J.to_sparse(example))
    if sp.issparse(J):
        return sp.coo_array(J)
    return sp.coo_array(_matrix(J, example, where))


def _aspect(M: int, N: int) -> str:
    """Square cells, unless the matrix is so long and thin that they would vanish."""
    return "equal" if max(M, N) <= 8 * min(M, N) else "auto"


def plot_jacobian(
    J: Any, example: int = 0, ax: Any = None, title: str | None = None, *, wrt: str = "x_in"
) -> Any:
    """One example's Jacobian as a heatmap: rows are ``x_out`` entries, columns ``wrt`` entries.

    ``J`` is a ``Jacobian`` object (``L^x`` or ``L^θ`` of a layer, or a chained
    one), an array ``(B, M, N)`` or ``(M, N)``, or a ``scipy.sparse`` matrix. Use
    ``wrt="θ"`` (or the parameter's name, ``"W"``) for a parameter Jacobian.
    Zero is white; the colour scale is symmetric.
    """
    A = _matrix(J, example, "plot_jacobian")
    M, N = A.shape
    fig, ax = figure_and_ax(ax, (min(10.0, 2.5 + 0.25 * N), min(8.0, 1.5 + 0.25 * M)))
    lim = symmetric_limit(A)
    image = ax.imshow(
        A, cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest", aspect=_aspect(M, N)
    )
    fig.colorbar(image, ax=ax, shrink=0.8)
    index_ticks(ax.xaxis, N)
    index_ticks(ax.yaxis, M)
    ax.set_xlabel(f"{wrt} entry (column j)")
    ax.set_ylabel("x_out entry (row i)")
    name = "L^x" if wrt == "x_in" else f"L^{wrt}"
    ax.set_title(title if title is not None else f"{name} = ∂x_out/∂{wrt}  ({M}×{N})")
    return fig


def plot_sparsity(J: Any, example: int = 0, ax: Any = None, *, wrt: str = "x_in") -> Any:
    """Where one example's Jacobian stores entries (rows ``x_out``, columns ``wrt``).

    The title gives the number of stored entries and the fraction of the
    ``M×N`` matrix they fill: the saving a structured Jacobian makes.
    """
    S = _sparse(J, example, "plot_sparsity")
    M, N = S.shape
    fig, ax = figure_and_ax(ax, (min(8.0, 3.5 + 0.2 * N), min(8.0, 2.0 + 0.2 * M)))
    size = max(1.0, min(8.0, 250.0 / max(M, N, 1)))
    ax.spy(S, markersize=size, precision="present", aspect=_aspect(M, N), color="#1f4e79")
    ax.xaxis.set_ticks_position("bottom")  # spy puts them on top, away from the label
    index_ticks(ax.xaxis, N)
    index_ticks(ax.yaxis, M)
    ax.set_xlabel(f"{wrt} entry (column j)")
    ax.set_ylabel("x_out entry (row i)")
    nnz = int(S.nnz)
    ax.set_title(
        f"sparsity of ∂x_out/∂{wrt}:\n{nnz} of {M}×{N} entries stored "
        f"({100.0 * nnz / max(M * N, 1):.1f}%)"
    )
    return fig


def _step_rows(g_out: Any, A: np.ndarray, g_in: Any, example: int) -> tuple[np.ndarray, ...]:
    """One example's ``g_out`` row and ``g_in`` row (``g_out · A`` when ``g_in`` is None)."""
    M, N = A.shape
    g = np.asarray(g_out, dtype=np.float64)
    rows = g.reshape(1, -1) if g.size == M else g.reshape(g.shape[0], -1) if g.ndim else g
    if rows.ndim != 2 or rows.shape[1] != M or not 0 <= example < rows.shape[0]:
        raise ValueError(
            f"plot_backward_step: g_out has shape {g.shape}, but L has {M} rows (x_out entries); "
            f"g_out must hold {M} entries per example"
        )
    g_row = rows[example if rows.shape[0] > 1 else 0]
    if g_in is None:
        return g_row, g_row @ A
    gi = np.asarray(g_in, dtype=np.float64)
    gi_rows = gi.reshape(1, -1) if gi.size == N else gi.reshape(gi.shape[0], -1)
    if gi_rows.shape[1] != N:
        raise ValueError(f"plot_backward_step: g_in has shape {gi.shape}, but L has {N} columns")
    return g_row, gi_rows[example if gi_rows.shape[0] > 1 else 0]


def _step_panel(ax: Any, data: np.ndarray, label: str, xlabel: str, is_L: bool) -> None:
    """One heatmap of the step: the row ``g_in`` or ``g_out``, or the matrix ``L``."""
    lim = symmetric_limit(data)
    ax.imshow(data, cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_title(label)
    ax.set_xlabel(xlabel)
    index_ticks(ax.xaxis, data.shape[1])
    if is_L:
        index_ticks(ax.yaxis, data.shape[0])
        ax.set_ylabel("x_out entry")
    else:
        ax.set_yticks([])  # a single row


def plot_backward_step(
    g_out: Any, L: Any, g_in: Any = None, example: int = 0, *, wrt: str = "x_in"
) -> Any:
    """One backward step as a matrix product: ``g_in = g_out · L^x`` (eq. 14.10).

    Three heatmaps side by side, as in figures 14.9 and 14.12: the row vector
    ``g_in`` (``1×N``), ``=``, the row vector ``g_out`` (``1×M``), ``·``, and
    the Jacobian ``L`` (``M×N``, rows ``x_out``, columns ``wrt``). With a
    parameter Jacobian (``wrt="θ"`` or ``"W"``) the picture is eq. 14.8,
    ``∂J/∂θ = g_out · L^θ``.

    ``g_out`` is a batch ``(B, *x_out shape)`` (or one example); ``L`` is a
    ``Jacobian``, ``(B, M, N)`` or ``(M, N)``. ``g_in`` defaults to the product,
    computed here; pass the backward pass's result to show it instead.
    """
    A = _matrix(L, example, "plot_backward_step")
    M, N = A.shape
    g_row, result = _step_rows(g_out, A, g_in, example)
    cell = min(0.35, 9.0 / (2 * N + M + 2))
    # constrained layout keeps every panel's labels inside its own column, so the
    # operator columns ("=" and "·") never run into the y label of L
    fig = pyplot().figure(
        figsize=(max(6.5, cell * (2 * N + M) + 3.5), max(2.6, cell * M + 2.0)), layout="constrained"
    )
    sign_width = 0.15 * (2 * N + M) / 4
    grid = fig.add_gridspec(1, 5, width_ratios=[N, sign_width, M, sign_width, N])
    param = wrt != "x_in"
    names = (f"∂J/∂{wrt}", "g_out", f"L^{wrt}") if param else ("g_in", "g_out", "L^x")
    panels = [
        (0, result[None, :], f"{names[0]}  (1×{N})", f"{wrt} entry"),
        (2, g_row[None, :], f"{names[1]}  (1×{M})", "x_out entry"),
        (4, A, f"{names[2]}  ({M}×{N})", f"{wrt} entry"),
    ]
    for col, data, label, xlabel in panels:
        _step_panel(fig.add_subplot(grid[0, col]), data, label, xlabel, is_L=col == 4)
    for col, sign in ((1, "="), (3, "·")):
        ax = fig.add_subplot(grid[0, col])
        ax.axis("off")
        ax.text(0.5, 0.5, sign, ha="center", va="center", fontsize=26, fontweight="bold")
    eq = "eq. 14.8" if param else "eq. 14.10"
    fig.suptitle(f"{names[0]} = {names[1]} · {names[2]}  ({eq})")
    return fig
