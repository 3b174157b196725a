"""The executor: build a DAG of layers, run it forward and backward, chain Jacobians.

- ``build``: nodes, handles, fan-out, the topological order;
- ``graph``: the ``Graph`` class (building and the public interface);
- ``run``: the forward pass and the backward pass, three ways (``Gradients``);
- ``chain``: whole-model Jacobians (``Jacobians``);
- ``sequential``: ``Sequential``, a chain built on the same executor.

It knows the ``Layer`` protocol and no concrete layer.
"""

from backprop.graph.build import Handle, NodeInfo, topological_order
from backprop.graph.chain import ORDERS, Jacobians
from backprop.graph.graph import Graph
from backprop.graph.run import MODES, Gradients
from backprop.graph.sequential import Sequential

__all__ = [
    "MODES",
    "ORDERS",
    "Gradients",
    "Graph",
    "Handle",
    "Jacobians",
    "NodeInfo",
    "Sequential",
    "topological_order",
]
