"""What a forward pass leaves behind, and what the backward pass reads of it.

- ``tokens``: the operating point each layer holds after the model's forward
  (and each nested graph's forward id); a backward whose tokens changed refuses
  to run, since some layer was run on its own since.
- ``snapshot``/``restore``: a failed forward puts every node back as it was.
- ``activation_bytes``: how much memory the values of the last forward take.
- ``needs_for``/``backward_plan``: which nodes backward visits, for the inputs
  that want a gradient, computed once per such set and kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from backprop.graph.graph import Graph


def tokens(graph: Graph) -> list[Any]:
    """What the last forward left in each layer (its operating point) and nested graph."""
    return [layer._op for layer in graph._layers] + [g._forward_id for g in graph._nested]


def snapshot(graph: Graph) -> tuple[Any, ...]:
    """Everything a forward changes, in ``graph`` and every layer and graph inside it."""
    own: tuple[Any, ...] = (graph._state, graph._values, graph._meta, graph._needs)
    own += (graph._wanted, graph._tokens, graph._forward_id)
    ops = [layer._op for layer in graph._layers]
    return own, ops, [(inner, snapshot(inner)) for inner in graph._nested]


def restore(graph: Graph, saved: tuple[Any, ...]) -> None:
    """Put back what ``snapshot`` saved."""
    own, ops, nested = saved
    (graph._state, graph._values, graph._meta, graph._needs) = own[:4]
    (graph._wanted, graph._tokens, graph._forward_id) = own[4:]
    for layer, op in zip(graph._layers, ops, strict=True):
        layer._op = op
    for inner, inner_saved in nested:
        restore(inner, inner_saved)


def activation_bytes(graph: Graph) -> int:
    """Bytes of every value the last forward computed, kept or let go (``cache=False``
    keeps each one's shape and dtype), in ``graph`` and the graphs nested in it."""
    total = 0
    for k, value in enumerate(graph._values):
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif graph._meta and graph._meta[k] is not None:
            shape, dtype = graph._meta[k]
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total + sum(activation_bytes(inner) for inner in graph._nested)


def needs_for(graph: Graph, wanted: tuple[bool, ...]) -> list[bool]:
    """Which nodes backward visits when input ``k`` wants a gradient iff ``wanted[k]``:
    those with parameters, or with such an input, below them."""
    needs = graph._needs_by_inputs.get(wanted)
    if needs is None:
        needs = [False] * len(graph._nodes)
        for i, want in zip(graph._inputs, wanted, strict=True):
            needs[i] = want
        for i in graph._order:
            node = graph._nodes[i]
            if node.kind != "input":
                needs[i] = graph._has_params[i] or any(needs[j] for j, _ in node.inputs)
        graph._needs_by_inputs[wanted] = needs
    return needs


def backward_plan(graph: Graph, wanted: tuple[bool, ...]) -> list[tuple[Any, ...]]:
    """The steps backward takes, in reverse order, when input ``k`` wants a gradient
    iff ``wanted[k]``: ``(index, node, layer, input slots, output slots, which inputs
    need a gradient, whether any does)`` for every node that needs one."""
    plan = graph._plans.get(wanted)
    if plan is None:
        needs = needs_for(graph, wanted)
        plan = []
        for i, node, ins, outs in reversed(graph._steps):
            if needs[i]:
                need_in = tuple(needs[j] for j, _ in node.inputs)
                plan.append((i, node, node.layer, ins, outs, need_in, any(need_in)))
        graph._plans[wanted] = plan
    return plan
