"""A network drawn as a DAG: with matplotlib (``draw_graph``) or as DOT text (``to_dot``)."""

from __future__ import annotations

from typing import Any

from backprop.plot._figure import figure_and_ax
from backprop.plot._layout import COLUMN, Positions, layout
from backprop.plot._view import DrawNode, view

#: The fill colour and the matplotlib box of each kind of node.
_STYLE = {
    "data": ("#d6e6f5", "round,pad=0.3"),
    "output": ("#d6e6f5", "round,pad=0.3"),
    "layer": ("#fbe3c8", "square,pad=0.3"),
    "branch": ("#d5ecd4", "sawtooth,pad=0.3"),
    "merge": ("#d5ecd4", "sawtooth,pad=0.3"),
    "loss": ("#f6cfd2", "square,pad=0.3"),
    "param": ("#fff2b3", "round,pad=0.25"),
}

#: The graphviz shape of each kind of node.
_DOT_SHAPE = {
    "data": "ellipse",
    "output": "ellipse",
    "layer": "box",
    "branch": "trapezium",
    "merge": "invtrapezium",
    "loss": "box",
    "param": "box",
}


def _draw_box(ax: Any, n: DrawNode, xy: tuple[float, float]) -> Any:
    """The node's label in its box (dashed for an automatic Branch): a matplotlib Text."""
    color, box = _STYLE[n.kind]
    return ax.text(
        *xy,
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


def _draw_edge(ax: Any, a: Any, b: Any, param: bool, label: str) -> None:
    """An arrow from box ``a`` to box ``b`` (Texts), dotted from a parameter."""
    from matplotlib.patches import FancyArrowPatch

    (x0, y0), (x1, y1) = a.get_position(), b.get_position()
    # an edge that skips a column along one row bends below the nodes it passes
    skip = not param and abs(x1 - x0) > 1.01 * COLUMN and abs(y1 - y0) < 0.5
    arrow = FancyArrowPatch(
        posA=(x0, y0),
        posB=(x1, y1),
        patchA=a.get_bbox_patch(),
        patchB=b.get_bbox_patch(),
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


def _figure(ax: Any, pos: Positions) -> tuple[Any, Any]:
    """The figure and Axes, sized to the layout when new, with the layout in view."""
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    width = max(xs) - min(xs) + COLUMN
    height = max(ys) - min(ys) + 2.0
    fig, ax = figure_and_ax(ax, (min(16.0, 1.0 + 0.75 * width), min(12.0, 1.0 + 0.6 * height)))
    ax.set_xlim(min(xs) - COLUMN / 2, max(xs) + COLUMN / 2)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    return fig, ax


def draw_graph(model: Any, ax: Any = None) -> Any:
    """Draw a ``Graph`` or ``Sequential`` as a DAG, data flowing left to right.

    Blue rounded boxes are data (the inputs and the outputs), orange boxes are
    layers, green jagged boxes are ``Branch`` and ``Merge`` (an automatically
    inserted Branch is dashed and says "(auto)"), red is the loss, and small
    yellow rounded boxes above a layer are its parameters θ, joined to it by a
    dotted arrow (a tied Parameter is one box with an arrow to every layer that
    uses it). A box names the layer and, below it, its node: a layer of a
    ``Sequential`` is numbered from 0, as ``print(model)`` numbers it and as its
    parameters are named (``0.W``). An edge from a node with several outputs is
    labelled with the output's index. The layout is computed here: no graphviz
    is needed (``to_dot`` gives the DOT text for those who have it).
    """
    nodes = view(model)
    pos = layout(nodes)
    fig, ax = _figure(ax, pos)
    by_key = {n.key: n for n in nodes}
    boxes = {n.key: _draw_box(ax, n, pos[n.key]) for n in nodes}
    for n in nodes:
        for k, label in zip(n.inputs, n.edge_labels, strict=True):
            _draw_edge(ax, boxes[k], boxes[n.key], by_key[k].kind == "param", label)
    ax.set_axis_off()
    ax.set_title(f"{type(model).__name__}: data (blue), layers (orange), parameters θ (yellow)")
    return fig


def _dot_id(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_node(n: DrawNode) -> str:
    label = n.label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    style = (
        ', style="filled,dashed"'
        if n.auto
        else ', style="rounded,filled"'
        if n.kind == "param"
        else ""
    )
    return (
        f'  {_dot_id(n.key)} [label="{label}", shape={_DOT_SHAPE[n.kind]}, '
        f'fillcolor="{_STYLE[n.kind][0]}"{style}];'
    )


def to_dot(model: Any) -> str:
    """The model as DOT text for graphviz (``dot -Tsvg``), with the styles ``draw_graph`` uses."""
    nodes = view(model)
    by_key = {n.key: n for n in nodes}
    lines = [
        f"digraph {_dot_id(type(model).__name__)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10, style=filled];',
    ]
    lines += [_dot_node(n) for n in nodes]
    for n in nodes:
        for k, label in zip(n.inputs, n.edge_labels, strict=True):
            attrs = [f'label="{label}"'] if label else []
            if by_key[k].kind == "param":
                attrs.append("style=dotted")
            tail = f" [{', '.join(attrs)}]" if attrs else ""
            lines.append(f"  {_dot_id(k)} -> {_dot_id(n.key)}{tail};")
    lines.append("}")
    return "\n".join(lines) + "\n"
