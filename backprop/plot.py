"""Figures: training curves, Jacobians, one backward step, and networks drawn as DAGs.

Matplotlib is an optional extra (``pip install 'backprop[plot]'``); it is imported
inside each function, so ``import backprop`` never needs it. ``to_dot`` needs
nothing. Every function returns the matplotlib ``Figure`` it drew on (that of
``ax`` when one is given) and never calls ``plt.show()``.

The chapter's conventions hold in every picture: a Jacobian ``L`` of one example
is drawn as a matrix with one row per entry of ``x_out`` and one column per
entry of ``x_in`` (or of θ), so a gradient, a row vector ``g``, multiplies it
from the left (eq. 14.8 and 14.10).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backprop.layer import Layer, Loss, Parameter

__all__ = [
    "draw_graph",
    "plot_backward_step",
    "plot_history",
    "plot_input_gradients",
    "plot_jacobian",
    "plot_sparsity",
    "to_dot",
]

_DIVERGING = "RdBu_r"


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "backprop.plot needs matplotlib, an optional extra: pip install 'backprop[plot]'"
        ) from None
    return plt


def _figure_and_ax(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
        return fig, ax
    _pyplot()
    return ax.figure, ax


def _symmetric_limit(*arrays: np.ndarray) -> float:
    m = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    return m if m > 0 else 1.0


_ALL_TICKS = 12  # up to this many rows (or columns), every index gets a tick


def _index_ticks(axis: Any, n: int) -> None:
    """Integer ticks only on one axis of a matrix picture with ``n`` rows or columns.

    Entry ``i`` of a matrix drawn by ``imshow`` or ``spy`` is centred on ``i``;
    matplotlib's default locator would also put ticks at ``-0.5, 0.5, ...``,
    between entries. Small matrices get a tick at every index, larger ones a
    few integer ticks.
    """
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if n <= _ALL_TICKS:
        axis.set_major_locator(FixedLocator(list(range(n))))
    else:
        axis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=2))


# ------------------------------------------------------------------ Jacobians as matrices


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
    import scipy.sparse as sp

    if hasattr(J, "to_sparse") and hasattr(J, "batch"):
        if not 0 <= example < J.batch:
            raise ValueError(f"{where}: example {example} is out of range for a batch of {J.batch}")
        return sp.coo_array(J.to_sparse(example))
    if sp.issparse(J):
        return sp.coo_array(J)
    return sp.coo_array(_matrix(J, example, where))


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
    fig, ax = _figure_and_ax(ax, (min(10.0, 2.5 + 0.25 * N), min(8.0, 1.5 + 0.25 * M)))
    lim = _symmetric_limit(A)
    aspect = "equal" if max(M, N) <= 8 * min(M, N) else "auto"
    image = ax.imshow(
        A, cmap=_DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest", aspect=aspect
    )
    fig.colorbar(image, ax=ax, shrink=0.8)
    _index_ticks(ax.xaxis, N)
    _index_ticks(ax.yaxis, M)
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
    fig, ax = _figure_and_ax(ax, (min(8.0, 3.5 + 0.2 * N), min(8.0, 2.0 + 0.2 * M)))
    size = max(1.0, min(8.0, 250.0 / max(M, N, 1)))
    aspect = "equal" if max(M, N) <= 8 * min(M, N) else "auto"
    ax.spy(S, markersize=size, precision="present", aspect=aspect, color="#1f4e79")
    ax.xaxis.set_ticks_position("bottom")  # spy puts them on top, away from the label
    _index_ticks(ax.xaxis, N)
    _index_ticks(ax.yaxis, M)
    ax.set_xlabel(f"{wrt} entry (column j)")
    ax.set_ylabel("x_out entry (row i)")
    nnz = int(S.nnz)
    ax.set_title(
        f"sparsity of ∂x_out/∂{wrt}:\n{nnz} of {M}×{N} entries stored "
        f"({100.0 * nnz / max(M * N, 1):.1f}%)"
    )
    return fig


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
    g = np.asarray(g_out, dtype=np.float64)
    rows = g.reshape(1, -1) if g.size == M else g.reshape(g.shape[0], -1) if g.ndim else g
    if rows.ndim != 2 or rows.shape[1] != M or not 0 <= example < rows.shape[0]:
        raise ValueError(
            f"plot_backward_step: g_out has shape {g.shape}, but L has {M} rows (x_out entries); "
            f"g_out must hold {M} entries per example"
        )
    g_row = rows[example if rows.shape[0] > 1 else 0]
    if g_in is None:
        result = g_row @ A
    else:
        gi = np.asarray(g_in, dtype=np.float64)
        gi_rows = gi.reshape(1, -1) if gi.size == N else gi.reshape(gi.shape[0], -1)
        if gi_rows.shape[1] != N:
            raise ValueError(
                f"plot_backward_step: g_in has shape {gi.shape}, but L has {N} columns"
            )
        result = gi_rows[example if gi_rows.shape[0] > 1 else 0]
    plt = _pyplot()
    cell = min(0.35, 9.0 / (2 * N + M + 2))
    # constrained layout keeps every panel's labels inside its own column, so the
    # operator columns ("=" and "·") never run into the y label of L
    fig = plt.figure(
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
        ax = fig.add_subplot(grid[0, col])
        lim = _symmetric_limit(data)
        ax.imshow(data, cmap=_DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel(xlabel)
        _index_ticks(ax.xaxis, data.shape[1])
        if col == 4:
            _index_ticks(ax.yaxis, M)
            ax.set_ylabel("x_out entry")
        else:
            ax.set_yticks([])  # a single row
    for col, sign in ((1, "="), (3, "·")):
        ax = fig.add_subplot(grid[0, col])
        ax.axis("off")
        ax.text(0.5, 0.5, sign, ha="center", va="center", fontsize=26, fontweight="bold")
    eq = "eq. 14.8" if param else "eq. 14.10"
    fig.suptitle(f"{names[0]} = {names[1]} · {names[2]}  ({eq})")
    return fig


# ------------------------------------------------------------------ training and inputs


def _curve(key: str, val_label: str) -> str:
    """``"train_loss"`` -> ``"train loss"``; ``"val_loss"`` -> ``"<val_label> loss"``."""
    split, what = key.split("_", 1)
    return f"{val_label if split == 'val' else split} {what}"


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
    if ax is None:
        plt = _pyplot()
        n = 2 if has_acc else 1
        fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 3.6), layout="constrained", squeeze=False)
        loss_ax, acc_ax = axes[0, 0], (axes[0, 1] if has_acc else None)
    else:
        fig, loss_ax = _figure_and_ax(ax, (5.0, 3.6))
        acc_ax = loss_ax.twinx() if has_acc else None
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
    panels: list[tuple[np.ndarray, str, bool]] = []
    if image is not None:
        img = np.asarray(image, dtype=np.float64)
        if img.size != size:
            raise ValueError(f"plot_input_gradients: image has {img.size} entries, not {size}")
        panels.append((img.reshape(shape), "input x", False))
    panels += [(G[k], names[k], True) for k in range(K)]
    cols = max(1, min(ncols, len(panels)))
    rows = -(-len(panels) // cols)
    plt = _pyplot()
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.8 * cols + 0.9, 2.0 * rows), squeeze=False, layout="constrained"
    )
    lim = _symmetric_limit(G)
    mappable = None
    for ax, (data, title, signed) in zip(axes.flat, panels, strict=False):
        data2 = data if data.ndim == 2 else data.reshape(data.shape[0], -1)
        if signed:
            mappable = ax.imshow(
                data2, cmap=_DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest"
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


# ------------------------------------------------------------------ networks as DAGs


@dataclass
class _DrawNode:
    key: str
    label: str
    kind: str  # "data", "layer", "branch", "merge", "loss", "param", "output"
    inputs: list[str] = field(default_factory=list)  # keys of upstream nodes
    edge_labels: list[str] = field(default_factory=list)
    auto: bool = False


def _short(layer: Any) -> str:
    if not isinstance(layer, Layer):  # a nested Sequential or Graph: one box
        return f"{type(layer).__name__} of {len(layer)}"
    text = repr(layer).splitlines()[0]
    return text[:-2] if text.endswith("()") else text


def _layer_kind(layer: Any) -> str:
    name = type(layer).__name__
    if isinstance(layer, Loss):
        return "loss"
    if name == "Branch":
        return "branch"
    if name == "Merge":
        return "merge"
    return "layer"


def _layer_params(layer: Any) -> list[tuple[str, Parameter]]:
    if isinstance(layer, Layer):
        return list(layer.params.items())
    if hasattr(layer, "named_parameters"):
        return list(layer.named_parameters().items())
    return []


def _shape_text(shape: Any) -> str:
    if shape is None:
        return ""
    return "×".join(map(str, tuple(shape)[1:])) or "scalar"


def _view(model: Any) -> list[_DrawNode]:
    """The nodes to draw, in topological order: data, layers, parameters, outputs."""
    if isinstance(model, Layer):
        raise TypeError("draw_graph: give a Sequential or a Graph (wrap a layer in a Sequential)")
    if not hasattr(model, "nodes"):
        raise TypeError(f"draw_graph: expected a Sequential or a Graph, got {type(model).__name__}")
    names = {id(p): n for n, p in model.named_parameters().items()}
    nodes: list[_DrawNode] = []
    param_keys: dict[int, _DrawNode] = {}

    def add_params(key: str, layer: Any) -> list[str]:
        keys = []
        for pname, p in _layer_params(layer):
            node = param_keys.get(id(p))
            if node is None:
                label = f"{names.get(id(p), f'{key}.{pname}')}\n{'×'.join(map(str, p.shape))}"
                node = _DrawNode(f"param:{names.get(id(p), f'{key}.{pname}')}", label, "param")
                param_keys[id(p)] = node
                nodes.append(node)
            keys.append(node.key)
        return keys

    for info in model.nodes():
        if info.kind == "input":
            nodes.append(_DrawNode(info.name, info.name, "data"))
            continue
        srcs = [s.rsplit(":", 1)[0] if ":" in s else s for s in info.inputs]
        labels = [s.rsplit(":", 1)[1] if ":" in s else "" for s in info.inputs]
        kind = _layer_kind(info.layer)
        text = f"{_short(info.layer)}\n{info.name}"
        if info.auto:
            text = f"Branch (auto)\n{info.name}"
        pkeys = add_params(info.name, info.layer)
        nodes.append(
            _DrawNode(
                info.name, text, kind, srcs + pkeys, labels + [""] * len(pkeys), auto=info.auto
            )
        )
    pairs = zip(model.output_names(), model.output_values(), strict=True)
    for i, (out, value) in enumerate(pairs):
        src, _, port = value.partition(":")
        label = out if out != value else f"output {i}" if i else "output"
        nodes.append(_DrawNode(f"output:{out}", label, "output", [src], [port]))
    return nodes


_GAP = 3.0  # vertical distance between the nodes of one column
_COLUMN = 2.6  # horizontal distance between columns


def _layout(nodes: list[_DrawNode]) -> dict[str, tuple[float, float]]:
    """A layered layout, computed here (no graphviz).

    A node's column is the longest path to it from a source (a source sits just
    before its first consumer). In each column, nodes are ordered by the mean
    height of their inputs (the barycenter heuristic), sources last, and pushed
    apart to ``_GAP``. Parameters sit in a row just above the first layer that
    uses them.
    """
    by_key = {n.key: n for n in nodes}
    column: dict[str, int] = {}
    for n in nodes:  # topological order
        if n.kind == "param":
            continue
        ups = [column[k] for k in n.inputs if by_key[k].kind != "param"]
        column[n.key] = 1 + max(ups) if ups else 0
    for n in nodes:
        uses = [column[m.key] for m in nodes if n.key in m.inputs and m.key in column]
        if n.kind != "param" and not n.inputs and uses:
            column[n.key] = max(0, min(uses) - 1)
    columns: dict[int, list[str]] = {}
    for key, c in column.items():
        columns.setdefault(c, []).append(key)
    pos: dict[str, tuple[float, float]] = {}
    for c in sorted(columns):
        wanted: dict[str, float | None] = {}
        for key in columns[c]:
            placed = [u for u in by_key[key].inputs if u in pos]
            inner = [u for u in placed if by_key[u].inputs]  # a target joining late does not pull
            ys = [pos[u][1] for u in (inner or placed)]
            wanted[key] = float(np.mean(ys)) if ys else None
        order = sorted(columns[c], key=lambda k: (wanted[k] is None, -(wanted[k] or 0.0)))
        ys_out: list[float] = []
        for key in order:
            w = wanted[key]
            y = (ys_out[-1] - _GAP if ys_out else 0.0) if w is None else w
            ys_out.append(min(y, ys_out[-1] - _GAP) if ys_out else y)
        shifts = [w - y for k, y in zip(order, ys_out, strict=True) if (w := wanted[k]) is not None]
        shift = float(np.mean(shifts)) if shifts else (ys_out[0] - ys_out[-1]) / 2
        for key, y in zip(order, ys_out, strict=True):
            pos[key] = (_COLUMN * c, y + shift)
    for n in nodes:
        params = [k for k in n.inputs if by_key[k].kind == "param" and k not in pos]
        if not params:
            continue
        x, y = pos[n.key]
        for j, k in enumerate(params):
            pos[k] = (x + (j - (len(params) - 1) / 2) * 1.2, y + 1.4)
    return pos


_STYLE = {
    "data": ("#d6e6f5", "round,pad=0.3"),
    "output": ("#d6e6f5", "round,pad=0.3"),
    "layer": ("#fbe3c8", "square,pad=0.3"),
    "branch": ("#d5ecd4", "sawtooth,pad=0.3"),
    "merge": ("#d5ecd4", "sawtooth,pad=0.3"),
    "loss": ("#f6cfd2", "square,pad=0.3"),
    "param": ("#fff2b3", "round,pad=0.25"),
}


def draw_graph(model: Any, ax: Any = None) -> Any:
    """Draw a ``Graph`` or ``Sequential`` as a DAG, data flowing left to right.

    Blue rounded boxes are data (the inputs and the outputs), orange boxes are
    layers, green jagged boxes are ``Branch`` and ``Merge`` (an automatically
    inserted Branch is dashed and says "(auto)"), red is the loss, and small
    yellow rounded boxes above a layer are its parameters θ, joined to it by a
    dotted arrow (a tied Parameter is one box with an arrow to every layer that
    uses it). A layer of a ``Sequential`` is numbered ``(i)`` from 0, as
    ``print(model)`` numbers it and as its parameters are named (``0.W``);
    after a forward pass, ``→`` and the shape of one example's output follow.
    An edge from a node with several outputs is labelled with the output's
    index. The layout is computed here: no graphviz is needed (``to_dot`` gives
    the DOT text for those who have it).
    """
    from matplotlib.patches import FancyArrowPatch

    nodes = _view(model)
    pos = _layout(nodes)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    width = max(xs) - min(xs) + _COLUMN
    height = max(ys) - min(ys) + 2.0
    fig, ax = _figure_and_ax(ax, (min(16.0, 1.0 + 0.75 * width), min(12.0, 1.0 + 0.6 * height)))
    by_key = {n.key: n for n in nodes}
    boxes = {}
    for n in nodes:
        x, y = pos[n.key]
        color, box = _STYLE[n.kind]
        boxes[n.key] = ax.text(
            x,
            y,
            n.label,
            ha="center",
            va="center",
            fontsize=7 if n.kind == "param" else 8,
            zorder=3,
            bbox={
                "boxstyle": box,
                "facecolor": color,
                "edgecolor": "#555555",
                "linestyle": "--" if n.auto else "-",
            },
        )
    for n in nodes:
        for k, label in zip(n.inputs, n.edge_labels, strict=True):
            param = by_key[k].kind == "param"
            (x0, y0), (x1, y1) = pos[k], pos[n.key]
            # an edge that skips a column along one row bends below the nodes it passes
            skip = not param and abs(x1 - x0) > 1.01 * _COLUMN and abs(y1 - y0) < 0.5
            arrow = FancyArrowPatch(
                posA=pos[k],
                posB=pos[n.key],
                patchA=boxes[k].get_bbox_patch(),
                patchB=boxes[n.key].get_bbox_patch(),
                arrowstyle="-|>",
                mutation_scale=10,
                color="#b08d00" if param else "#333333",
                linestyle=":" if param else "-",
                connectionstyle=f"arc3,rad={0.3 if skip else 0.0}",
                zorder=4,  # after the boxes, so it is clipped to their drawn outlines
            )
            ax.add_patch(arrow)
            if label:  # the output index, next to the node it leaves
                ax.text(
                    x0 + (0.3 if skip else 0.45) * (x1 - x0),
                    y0 + 0.45 * (y1 - y0) + (-0.6 if skip else 0.3 if y1 >= y0 else -0.5),
                    label,
                    fontsize=7,
                    color="#333333",
                    zorder=5,
                )
    ax.set_xlim(min(xs) - _COLUMN / 2, max(xs) + _COLUMN / 2)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.set_axis_off()
    ax.set_title(f"{type(model).__name__}: data (blue), layers (orange), parameters θ (yellow)")
    return fig


def _dot_id(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(model: Any) -> str:
    """The model as DOT text for graphviz (``dot -Tsvg``), with the styles ``draw_graph`` uses."""
    shapes = {
        "data": "ellipse",
        "output": "ellipse",
        "layer": "box",
        "branch": "trapezium",
        "merge": "invtrapezium",
        "loss": "box",
        "param": "box",
    }
    lines = [
        f"digraph {_dot_id(type(model).__name__)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10, style=filled];',
    ]
    by_key = {}
    for n in _view(model):
        by_key[n.key] = n
        color = _STYLE[n.kind][0]
        label = n.label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        style = (
            ', style="filled,dashed"'
            if n.auto
            else ', style="rounded,filled"'
            if n.kind == "param"
            else ""
        )
        lines.append(
            f'  {_dot_id(n.key)} [label="{label}", shape={shapes[n.kind]}, '
            f'fillcolor="{color}"{style}];'
        )
    for n in by_key.values():
        for k, label in zip(n.inputs, n.edge_labels, strict=True):
            attrs = []
            if label:
                attrs.append(f'label="{label}"')
            if by_key[k].kind == "param":
                attrs.append("style=dotted")
            tail = f" [{', '.join(attrs)}]" if attrs else ""
            lines.append(f"  {_dot_id(k)} -> {_dot_id(n.key)}{tail};")
    lines.append("}")
    return "\n".join(lines) + "\n"
