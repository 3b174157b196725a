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

from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from backprop.layer import Layer

if TYPE_CHECKING:
    from backprop.graph.build import _Node
    from backprop.graph.graph import Graph

#: What kind of step a node is, fixed when the graph is built, so that the
#: forward and backward loops branch once per node on a small int: an input; a
#: layer with one input and one output (most nodes); any other layer; a nested graph.
INPUT, SIMPLE, LAYER, GRAPH = range(4)


def step_kind(node: _Node) -> int:
    """The kind of ``node``'s step (``INPUT``, ``SIMPLE``, ``LAYER`` or ``GRAPH``)."""
    if node.layer is None:
        return INPUT
    if not isinstance(node.layer, Layer):
        return GRAPH
    return SIMPLE if len(node.inputs) == 1 and not node.multi else LAYER


#: ``layer._op``, as a C-level getter: the hot paths map it over the layers.
operating_point = attrgetter("_op")


def tokens(graph: Graph) -> list[Any]:
    """What the last forward left in each layer (its operating point) and nested graph."""
    ops = list(map(operating_point, graph._layers))
    return ops + [g._forward_id for g in graph._nested] if graph._nested else ops


def snapshot(graph: Graph) -> tuple[Any, ...]:
    """Everything a forward changes, in ``graph`` and every layer and graph inside it."""
    own: tuple[Any, ...] = (graph._state, graph._values, graph._meta, graph._needs)
    own += (graph._wanted, graph._tokens, graph._forward_id)
    ops = list(map(operating_point, graph._layers))
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


class Chain:
    """A model that is one chain of layers (a Sequential): each layer's first input is
    the output of the layer before it, the first layer's is the model's first input,
    and the last layer may also read further model inputs (a loss's targets). Its
    forward is then Algorithm 14.1's plain loop; see ``find_chain``.
    """

    __slots__ = ("layers", "nodes", "slots", "steps", "foot", "extras", "inputs")

    def __init__(self, graph: Graph, steps: list[tuple[Any, ...]], inputs: list[Any]) -> None:
        self.layers = [layer for _, _, layer, _, _, _ in steps]
        self.nodes = [i for i, _, _, _, _, _ in steps]  # node indices, in order
        self.slots = [outs[0] for _, _, _, _, outs, _ in steps]  # each layer's output
        self.steps = list(zip(self.layers[:-1], self.slots[:-1], strict=True))  # (layer, slot)
        by_slot = {outs[0]: (node.name, outs[0]) for _, node, _, _, outs, _ in inputs}
        self.foot = by_slot[steps[0][3][0]]  # the first layer's input: (name, slot)
        self.extras = [by_slot[k] for k in steps[-1][3][1:]]  # the last layer's others
        #: (requires_grad, slot) for every input, in the model's input order.
        self.inputs = [(graph._nodes[i].requires_grad, graph._slots[(i, 0)]) for i in graph._inputs]


def find_chain(graph: Graph) -> Chain | None:
    """The graph as a ``Chain``, or None when it is not one."""
    steps = [step for step in graph._steps if step[5] != INPUT]
    inputs = [step for step in graph._steps if step[5] == INPUT]
    input_slots = {outs[0] for _, _, _, _, outs, _ in inputs}
    if not steps or len(graph._outputs) != 1:
        return None
    if graph._slots[graph._outputs[0]] != steps[-1][4][0]:
        return None
    previous = None
    for k, (_, node, _, ins, _, kind) in enumerate(steps):
        if kind == GRAPH or node.multi or (kind == LAYER and k < len(steps) - 1):
            return None
        if k and ins[0] != previous or not k and ins[0] not in input_slots:
            return None
        if any(j not in input_slots for j in ins[1:]):
            return None
        previous = steps[k][4][0]
    if input_slots != {steps[0][3][0], *steps[-1][3][1:]}:  # an input the chain never reads
        return None
    return Chain(graph, steps, inputs)


class Plan(list[tuple[Any, ...]]):
    """The backward steps (see ``backward_plan``); ``chain`` is set when they form one
    chain, which ``run.backward`` then walks with a single gradient in hand."""

    chain: list[tuple[Any, str, bool]] | None = None
    chain_input: str | None = None


def backward_plan(graph: Graph, wanted: tuple[bool, ...]) -> Plan:
    """The steps backward takes, in reverse order, when input ``k`` wants a gradient
    iff ``wanted[k]``: ``(index, node, layer, input slots, output slots, which inputs
    need a gradient, whether any does, step kind)`` for every node that needs one."""
    plan = graph._plans.get(wanted)
    if plan is None:
        needs = needs_for(graph, wanted)
        plan = Plan()
        for i, node, layer, ins, outs, kind in reversed(graph._steps):
            if needs[i]:
                need_in = tuple(needs[j] for j, _ in node.inputs)
                plan.append((i, node, layer, ins, outs, need_in, any(need_in), kind))
        _find_chain(graph, plan)
        graph._plans[wanted] = plan
    return plan


def _find_chain(graph: Graph, plan: Plan) -> None:
    """Set ``plan.chain`` to ``[(layer, node name, input gradient wanted), ...]`` when the
    model is a chain (``graph._chain``) and no target of its last layer wants a gradient:
    the nodes that need one are then a suffix of the chain, walked from the output
    down. ``plan.chain_input`` names the input at its foot when that wants one."""
    if graph._chain is None:
        return
    steps = [entry for entry in plan if entry[7] != INPUT]
    if any(any(need_in[1:]) for _, _, _, _, _, need_in, _, _ in steps):
        return  # a target wants its gradient: the general walk gives it
    plan.chain = [(layer, node.name, want) for _, node, layer, _, _, _, want, _ in steps]
    feet = [entry[1].name for entry in plan if entry[7] == INPUT]
    plan.chain_input = feet[0] if feet else None
