"""Building a ``Graph``: nodes, handles, fan-out, the topological order.

A graph is a list of nodes. A node is an input (fed by ``forward``) or a layer
(a ``Layer``, or a whole ``Graph`` nested as one node) that reads values: each
value is output ``port`` of some node. ``output()`` freezes the structure: it
routes every value read more than once through a fan-out layer (a ``Branch``,
so that fan-out means "gradients add", eq. 14.46) and fixes the order.

This module knows the ``Layer`` protocol (how many inputs a layer takes and how
many outputs it gives) and no concrete layer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from backprop.layer import Layer, Parameter

__all__ = ["Handle", "NodeInfo", "summary_table", "topological_order"]


def topological_order(inputs_of: list[list[int]], names: list[str] | None = None) -> list[int]:
    """A topological order of a DAG by Kahn's algorithm, without recursion.

    ``inputs_of[i]`` lists the nodes whose outputs node ``i`` reads (with
    repeats allowed). Among the nodes that are ready, the one created first
    comes first, so a graph built in order keeps its order. A cycle raises a
    ``ValueError`` naming the nodes on it (``names[i]``, or the indices).
    """
    n = len(inputs_of)
    indegree = [len(ins) for ins in inputs_of]
    consumers: list[list[int]] = [[] for _ in range(n)]
    for i, ins in enumerate(inputs_of):
        for j in ins:
            consumers[j].append(i)
    ready = [i for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in consumers[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    if len(order) == n:
        return order
    # Walk back along unresolved inputs until a node repeats: that closes a cycle.
    label = (lambda i: names[i]) if names is not None else str  # noqa: E731
    start = next(i for i in range(n) if indegree[i] > 0)
    seen: dict[int, int] = {}
    path: list[int] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(j for j in inputs_of[node] if indegree[j] > 0)
    cycle = path[seen[node] :][::-1]
    ring = " -> ".join(label(i) for i in cycle + [cycle[0]])
    raise ValueError(f"the graph has a cycle: {ring}; a Graph must be acyclic (a DAG)")


class Handle:
    """One value of a ``Graph``: output ``port`` of a node. Made by ``Graph.input``
    and ``Graph.add``; used only as an argument of ``add`` and ``output``."""

    __slots__ = ("graph", "node", "port", "name")

    def __init__(self, graph: Any, node: int, port: int, name: str) -> None:
        self.graph, self.node, self.port, self.name = graph, node, port, name

    def __repr__(self) -> str:
        return f"<Handle {self.name}>"


@dataclass(frozen=True)
class NodeInfo:
    """A node of a ``Graph`` as ``Graph.nodes()`` lists it (the public view).

    - ``kind``: ``"input"`` or ``"layer"``; ``layer``: the ``Layer`` or nested
      ``Graph`` (None for an input); ``auto``: True for a fan-out ``Branch`` the
      Graph inserted.
    - ``inputs``: the values it reads, by name (``"node"``, or ``"node:k"`` for
      output ``k`` of a node with several outputs); ``outputs``: the names of its
      own values, in port order.
    - ``params``: the layer's parameter names.
    - At the last ``forward`` (else None or empty): ``shapes`` and ``dtypes`` of
      its outputs (``shape`` is that of output 0); ``batched[k]``: False when
      output ``k`` has no batch axis (a sum over the examples, as a loss's
      ``J``); ``requires_grad``: whether ``backward`` computes a gradient for
      this node (it has parameters, or a float input below it wants one).
    """

    name: str
    kind: str
    layer: Any
    inputs: tuple[str, ...]
    shape: tuple[int, ...] | None
    params: tuple[str, ...]
    auto: bool = False
    n_outputs: int = 1
    shapes: tuple[tuple[int, ...] | None, ...] = ()
    outputs: tuple[str, ...] = ()
    dtypes: tuple[np.dtype[Any] | None, ...] = ()
    batched: tuple[bool, ...] = ()
    requires_grad: bool = False


class _Node:
    """A node as the executor keeps it: ``inputs`` are ``(node index, port)`` pairs."""

    __slots__ = ("name", "kind", "layer", "inputs", "n_out", "multi", "auto", "requires_grad")

    def __init__(
        self,
        name: str,
        kind: str,
        layer: Any,
        inputs: list[tuple[int, int]],
        n_out: int,
        multi: bool,
        auto: bool = False,
        requires_grad: bool = True,
    ) -> None:
        self.name, self.kind, self.layer, self.inputs = name, kind, layer, inputs
        self.n_out, self.multi, self.auto, self.requires_grad = n_out, multi, auto, requires_grad


def leaf_layers(layer: Any) -> list[Layer]:
    """Every Layer instance inside ``layer`` (itself, or a nested graph's at any depth)."""
    leaves: list[Layer] = []
    stack = [layer]
    while stack:
        item = stack.pop()
        if isinstance(item, Layer):
            leaves.append(item)
        elif item is not None:
            stack.extend(n.layer for n in item._nodes if n.layer is not None)
    return leaves


def node_params(layer: Any) -> list[tuple[str, Parameter]]:
    """``[(name, Parameter)]`` of a node's layer: its own, or a nested graph's named ones."""
    if layer is None:
        return []
    if isinstance(layer, Layer):
        return list(layer.params.items())
    return list(layer.named_parameters().items())


def reduces_batch(layer: Any, port: int = 0) -> bool:
    """True when output ``port`` of a node's layer has no batch axis (a sum over the batch)."""
    while not isinstance(layer, Layer):
        node_index, port = layer._outputs[port]
        layer = layer._nodes[node_index].layer
        if layer is None:  # an input given straight to the output
            return False
    return bool(layer.reduces_batch)


def summary_table(graph: Any) -> str:
    """``Graph.summary``: a text table of node, layer, inputs, output shape, parameters."""
    rows = [("node", "layer", "inputs", "output shape", "params")]
    for info in graph.nodes():
        layer = "input" if info.layer is None else repr(info.layer).splitlines()[0]
        if info.auto:
            layer += " (auto)"
        count = sum(p.size for _, p in node_params(info.layer))
        shape = "-" if info.shape is None else str(info.shape)
        if info.n_outputs > 1 and info.shape is not None:
            shape = f"{info.n_outputs} × {shape}"
        rows.append((info.name, layer, ", ".join(info.inputs) or "-", shape, str(count)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(p.size for p in graph.parameters())
    outs = ", ".join(graph.output_names()) or "(not declared)"
    lines.append(f"outputs: {outs}; {total} parameters")
    return "\n".join(lines)
