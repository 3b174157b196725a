"""Where each box of a DAG goes: a layered layout, computed here (no graphviz).

A node's column is the longest path to it from a source (a source sits just
before its first consumer). In each column, nodes are ordered by the mean height
of their inputs (the barycenter heuristic), sources last, and pushed apart to
``GAP``. Parameters sit in a row just above the first layer that uses them.
"""

from __future__ import annotations

import numpy as np

from backprop.plot._view import DrawNode

GAP = 3.0  # vertical distance between the nodes of one column
COLUMN = 2.6  # horizontal distance between columns

Positions = dict[str, tuple[float, float]]


def _columns(nodes: list[DrawNode], by_key: dict[str, DrawNode]) -> dict[str, int]:
    """The column of every node but the parameters: its longest path from a source."""
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
    return column


def _place_column(c: int, keys: list[str], by_key: dict[str, DrawNode], pos: Positions) -> None:
    """Put the nodes of column ``c`` near the mean height of their inputs, ``GAP`` apart."""
    wanted: dict[str, float | None] = {}
    for key in keys:
        placed = [u for u in by_key[key].inputs if u in pos]
        inner = [u for u in placed if by_key[u].inputs]  # a target joining late does not pull
        ys = [pos[u][1] for u in (inner or placed)]
        wanted[key] = float(np.mean(ys)) if ys else None
    order = sorted(keys, key=lambda k: (wanted[k] is None, -(wanted[k] or 0.0)))
    ys_out: list[float] = []
    for key in order:
        w = wanted[key]
        y = (ys_out[-1] - GAP if ys_out else 0.0) if w is None else w
        ys_out.append(min(y, ys_out[-1] - GAP) if ys_out else y)
    shifts = [w - y for k, y in zip(order, ys_out, strict=True) if (w := wanted[k]) is not None]
    shift = float(np.mean(shifts)) if shifts else (ys_out[0] - ys_out[-1]) / 2
    for key, y in zip(order, ys_out, strict=True):
        pos[key] = (COLUMN * c, y + shift)


def layout(nodes: list[DrawNode]) -> Positions:
    """The ``(x, y)`` of every node's centre; data flows left to right."""
    by_key = {n.key: n for n in nodes}
    columns: dict[int, list[str]] = {}
    for key, c in _columns(nodes, by_key).items():
        columns.setdefault(c, []).append(key)
    pos: Positions = {}
    for c in sorted(columns):
        _place_column(c, columns[c], by_key, pos)
    for n in nodes:
        params = [k for k in n.inputs if by_key[k].kind == "param" and k not in pos]
        if not params:
            continue
        x, y = pos[n.key]
        for j, k in enumerate(params):
            pos[k] = (x + (j - (len(params) - 1) / 2) * 1.2, y + 1.4)
    return pos
