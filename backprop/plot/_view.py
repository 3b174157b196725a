"""A model as the nodes to draw: data, layers, parameters and outputs, in topological order.

Read through the public interface every model has (``nodes()``, ``output_names()``,
``output_values()``, ``named_parameters()``); a ``Sequential`` is a ``Graph``, so
there is one path. How a layer is drawn comes from the ``Layer`` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backprop.graph.build import node_params
from backprop.layer import Layer, Loss
from backprop.layers.structure import Merge


@dataclass
class DrawNode:
    """One box of the drawing and the edges into it."""

    key: str
    label: str
    kind: str  # "data", "layer", "branch", "merge", "loss", "param", "output"
    inputs: list[str] = field(default_factory=list)  # keys of upstream nodes
    edge_labels: list[str] = field(default_factory=list)
    auto: bool = False


def layer_kind(layer: Any) -> str:
    """How a node's layer is drawn: a loss, a fan-out, a concatenation, or a plain layer.

    A layer with several outputs (or one that returns a tuple) fans out: a
    ``Branch``. A concatenation is a ``Merge``; ``Add`` and ``Multiply`` also join
    inputs but are drawn as the layers they are. A nested model is one plain box.
    """
    if not isinstance(layer, Layer):
        return "layer"
    if isinstance(layer, Loss):
        return "loss"
    if layer.n_outputs > 1 or layer.returns_tuple:
        return "branch"
    if isinstance(layer, Merge):
        return "merge"
    return "layer"


def _short(layer: Any) -> str:
    if not isinstance(layer, Layer):  # a nested Sequential or Graph: one box
        return f"{type(layer).__name__} of {len(layer)}"
    text = repr(layer).splitlines()[0]
    return text[:-2] if text.endswith("()") else text


def _param_nodes(
    key: str, layer: Any, names: dict[int, str], drawn: dict[int, DrawNode], nodes: list[DrawNode]
) -> list[str]:
    """The keys of the parameter boxes of node ``key``; a box not drawn yet joins ``nodes``.

    A parameter is named as ``model.named_parameters()`` names it, so a tied one
    is one box, drawn at its first use.
    """
    keys = []
    for pname, p in node_params(layer):
        node = drawn.get(id(p))
        if node is None:
            full = names.get(id(p), f"{key}.{pname}")
            node = DrawNode(f"param:{full}", f"{full}\n{'×'.join(map(str, p.shape))}", "param")
            drawn[id(p)] = node
            nodes.append(node)
        keys.append(node.key)
    return keys


def _layer_node(info: Any, param_keys: list[str]) -> DrawNode:
    """The box of a layer node (a ``NodeInfo``); an edge from output ``k`` is labelled ``k``."""
    srcs = [s.rsplit(":", 1)[0] if ":" in s else s for s in info.inputs]
    labels = [s.rsplit(":", 1)[1] if ":" in s else "" for s in info.inputs]
    text = f"Branch (auto)\n{info.name}" if info.auto else f"{_short(info.layer)}\n{info.name}"
    return DrawNode(
        info.name,
        text,
        layer_kind(info.layer),
        srcs + param_keys,
        labels + [""] * len(param_keys),
        auto=info.auto,
    )


def view(model: Any) -> list[DrawNode]:
    """The nodes to draw, in topological order: data, layers, parameters, outputs."""
    if isinstance(model, Layer):
        raise TypeError("draw_graph: give a Sequential or a Graph (wrap a layer in a Sequential)")
    if not hasattr(model, "nodes"):
        raise TypeError(f"draw_graph: expected a Sequential or a Graph, got {type(model).__name__}")
    names = {id(p): n for n, p in model.named_parameters().items()}
    nodes: list[DrawNode] = []
    drawn: dict[int, DrawNode] = {}
    for info in model.nodes():
        if info.kind == "input":
            nodes.append(DrawNode(info.name, info.name, "data"))
        else:
            param_keys = _param_nodes(info.name, info.layer, names, drawn, nodes)
            nodes.append(_layer_node(info, param_keys))
    pairs = zip(model.output_names(), model.output_values(), strict=True)
    for i, (out, value) in enumerate(pairs):
        src, _, port = value.partition(":")
        label = out if out != value else f"output {i}" if i else "output"
        nodes.append(DrawNode(f"output:{out}", label, "output", [src], [port]))
    return nodes
