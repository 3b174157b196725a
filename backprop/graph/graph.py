"""``Graph``: any DAG of layers, run forward then backward (chapter 14.7–14.9)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from backprop.graph import chain, run, state
from backprop.graph.build import (
    Handle,
    NodeInfo,
    _Node,
    leaf_layers,
    node_params,
    reduces_batch,
    summary_table,
    topological_order,
)
from backprop.layer import Layer, Parameter

__all__ = ["Graph"]

_RESERVED = frozenset({"cache"})


class Graph:
    """Any DAG of layers, run forward then backward (chapter 14.7–14.9).

    Build it with ``input(name)``, ``add(layer, *handles)`` and
    ``output(*handles)``; then ``forward(**inputs)`` evaluates it in a
    topological order and ``backward(seed)`` runs the reverse order, returning
    ``Gradients`` with ``.inputs[name]`` (backprop to the data, 14.9) and
    ``.params[p]``.

    - A value used more than once (by several nodes, twice by one node, or by a
      node and as an output) is routed through a fan-out ``Branch`` that
      ``output()`` inserts (``auto=True`` in ``nodes()``), so fan-out means
      "gradients add" (eq. 14.46) and every value has exactly one consumer.
    - A Parameter used by several layers gets the sum of its uses (eq. 14.47);
      ``Gradients.per_use`` lists the terms. Parameters are named by their
      place: ``"<node>.<name>"`` (``"linear_0.W"``).
    - Another ``Graph`` (a ``Sequential`` is one) can be a node: it takes its
      inputs in the order they were declared and gives its outputs in the
      order of its ``output()`` call.
    - ``backward(mode="explicit")`` is the literal Algorithm 14.1 over the DAG:
      every layer's Jacobians as sparse matrices, multiplied one by one.
    - ``forward(..., cache=False)`` is inference only: no layer keeps its
      operating point (the counterpart of ``torch.no_grad``).
    - ``train()`` and ``eval()`` set the mode of every layer (Dropout and
      BatchNorm behave differently in the two).

    The node order is found by Kahn's algorithm, with no recursion, so a chain
    of 10^5 layers runs. Nodes cannot be added after ``output()``.
    """

    def __init__(self) -> None:
        self._nodes: list[_Node] = []
        self._names: dict[str, int] = {}
        self._layer_ids: dict[int, str] = {}
        self._counter = 0
        self._outputs: list[tuple[int, int]] = []
        self._output_names: list[str] = []
        self._frozen = False
        self._order: list[int] = []
        self._has_params: list[bool] = []
        self._parameters: list[Parameter] = []
        self.training = True
        # set by forward
        self._state: str | None = None  # None, "cached" or "uncached"
        self._values: list[Any] = []  # by slot: each value of the last forward
        self._meta: list[Any] = []  # by slot, after cache=False: (shape, dtype) of a let-go value
        self._needs: list[bool] = []
        self._wanted: tuple[bool, ...] = ()  # which inputs got float data needing a gradient
        self._tokens: list[Any] = []
        self._forward_id = 0

    # -- building -------------------------------------------------------------------
    def input(self, name: str, *, requires_grad: bool = True) -> Handle:
        """Declare a graph input, fed by ``forward(name=array)``.

        ``requires_grad=False`` says that ``dJ/d(name)`` is never wanted: it is
        not computed and ``Gradients.inputs`` omits it. Integer inputs (class
        labels) and boolean ones (masks) never get a gradient.
        """
        self._check_open("input")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"Graph.input: name must be a Python identifier (it is passed as a keyword to "
                f"forward), got {name!r}"
            )
        if name in _RESERVED:
            raise ValueError(f"Graph.input: {name!r} is reserved (forward(..., cache=...))")
        self._claim(name)
        node = _Node(name, "input", None, [], 1, False, requires_grad=requires_grad)
        return self._new_node(node)[0]

    def add(self, layer: Any, *inputs: Handle, name: str | None = None) -> Any:
        """Add ``layer`` as a node fed by ``inputs``; return its output handle.

        ``layer`` is a ``Layer`` or a ``Graph`` whose ``output()`` was declared
        (fed its inputs in declaration order; a ``Sequential`` takes ``x`` and
        then its last layer's targets). A node with several outputs (``Branch``,
        a Graph with several outputs) returns a tuple of handles. ``name``
        defaults to ``"<layer type>_<k>"``, e.g. ``"linear_0"``.
        """
        self._check_open("add")
        n_in, n_out = self._arity(layer, len(inputs))
        label = name if name is not None else f"{type(layer).__name__.lower()}_{self._counter}"
        for leaf in [layer, *leaf_layers(layer)]:
            if id(leaf) in self._layer_ids:
                raise ValueError(
                    f"Graph.add: {leaf!r} is already node {self._layer_ids[id(leaf)]!r} of this "
                    f"graph; a layer instance is one node. To share weights, build a second "
                    f"layer with the same Parameters, e.g. Linear(n_in, n_out, W=first.W, "
                    f"b=first.b): their gradients add up (eq. 14.47)"
                )
        if len(inputs) != n_in:
            need = ", ".join(self._input_labels(layer)) or "no input"
            raise TypeError(
                f"Graph.add: node {label!r} ({layer!r}) takes {n_in} input(s) ({need}), "
                f"got {len(inputs)}"
            )
        srcs = [self._source(h, label, i) for i, h in enumerate(inputs)]
        self._claim(label)
        self._counter += 1
        for leaf in [layer, *leaf_layers(layer)]:
            self._layer_ids[id(leaf)] = label
        if isinstance(layer, Layer) and layer.variadic:
            layer.take_inputs(n_in)
        multi = n_out > 1 or (isinstance(layer, Layer) and layer.returns_tuple)
        handles = self._new_node(_Node(label, "layer", layer, srcs, n_out, multi))
        return tuple(handles) if multi else handles[0]

    def _arity(self, layer: Any, given: int) -> tuple[int, int]:
        """``(inputs, outputs)`` of a node for ``layer``, as the layer declares them."""
        if isinstance(layer, Layer):
            n_in = max(given, 1) if layer.variadic else len(layer.inputs)
            return n_in, layer.n_outputs
        if isinstance(layer, Graph):
            if layer is self or self in _nested_graphs(layer):
                raise ValueError("Graph.add: a Graph cannot be a node of itself (that is a cycle)")
            if not layer._frozen:
                raise RuntimeError(
                    "Graph.add: the Graph to add as a node has no outputs yet; call its "
                    "output(...) first"
                )
            return len(layer.input_names()), len(layer._outputs)
        hint = " (a tuple: add takes the handles one by one)" if isinstance(layer, tuple) else ""
        raise TypeError(
            f"Graph.add: expected a Layer, a Sequential or a Graph, got "
            f"{type(layer).__name__}{hint}"
        )

    def output(self, *handles: Handle, names: list[str] | None = None) -> None:
        """Declare the outputs (one call, at least one handle) and freeze the graph.

        The outputs are named after their handles unless ``names`` are given
        (``Sequential`` names its output ``"J"`` or ``"x_L"``). Here every value
        used more than once is routed through an automatic fan-out ``Branch``,
        the topological order is fixed, and the parameters are named by their
        place (``"<node>.<name>"``).
        """
        self._check_open("output")
        if not handles:
            raise TypeError("Graph.output: give at least one handle")
        srcs = [self._source(h, "output", i) for i, h in enumerate(handles)]
        if len(set(srcs)) != len(srcs):
            raise ValueError("Graph.output: the same handle is given twice")
        if names is not None and (len(names) != len(handles) or len(set(names)) != len(names)):
            raise ValueError(
                f"Graph.output: names must be {len(handles)} distinct names, got {names!r}"
            )
        self._output_names = list(names) if names is not None else [h.name for h in handles]
        self._insert_fan_out(srcs)
        names = [n.name for n in self._nodes]
        self._order = topological_order([[j for j, _ in n.inputs] for n in self._nodes], names)
        self._outputs = srcs
        self._frozen = True
        self._has_params = [bool(node_params(n.layer)) for n in self._nodes]
        # What every forward and backward reads, fixed with the structure: a slot for
        # each value, and each node's step (its index, its input slots, its output slots).
        values = [(i, k) for i, n in enumerate(self._nodes) for k in range(n.n_out)]
        self._slots = {src: slot for slot, src in enumerate(values)}
        self._output_slots = [self._slots[src] for src in srcs]
        self._steps = [
            (
                i,
                self._nodes[i],
                self._nodes[i].layer,
                tuple(self._slots[src] for src in self._nodes[i].inputs),
                tuple(self._slots[(i, k)] for k in range(self._nodes[i].n_out)),
                state.step_kind(self._nodes[i]),
            )
            for i in self._order
        ]
        self._inputs = [i for i, n in enumerate(self._nodes) if n.kind == "input"]
        self._input_list = [self._nodes[i].name for i in self._inputs]
        self._layers = [n.layer for n in self._nodes if isinstance(n.layer, Layer)]
        self._nested = [n.layer for n in self._nodes if _is_graph(n.layer)]
        self._needs_by_inputs: dict[tuple[bool, ...], list[bool]] = {}
        self._plans: dict[tuple[bool, ...], state.Plan] = {}
        self._chain = state.find_chain(self)
        named = self.named_parameters()
        self._parameters = list(named.values())
        for pname, p in named.items():
            p._set_place(pname)

    def _insert_fan_out(self, srcs: list[tuple[int, int]]) -> None:
        """Give every value read more than once a fan-out layer of its own."""
        uses: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, node in enumerate(self._nodes):
            for pos, src in enumerate(node.inputs):
                uses.setdefault(src, []).append((i, pos))
        for pos, src in enumerate(srcs):
            uses.setdefault(src, []).append((-1, pos))
        for src, readers in uses.items():
            if len(readers) < 2:
                continue
            base = self._port_name(src).replace(":", "_") + "_fanout"
            label, k = base, 1
            while label in self._names:
                label, k = f"{base}{k}", k + 1
            self._claim(label)
            branch = Layer.fan_out(len(readers))
            self._layer_ids[id(branch)] = label
            node = _Node(label, "layer", branch, [src], len(readers), True, auto=True)
            first = self._new_node(node)[0]
            for copy, (i, pos) in enumerate(readers):
                if i < 0:
                    srcs[pos] = (first.node, copy)
                else:
                    self._nodes[i].inputs[pos] = (first.node, copy)

    # -- running ------------------------------------------------------------------------
    def forward(
        self, inputs: Mapping[str, Any] | None = None, /, *, cache: bool = True, **named: Any
    ) -> Any:
        """Evaluate every node in topological order; return the output (a tuple if several).

        Inputs are given by name, ``forward(x=X, y=Y)`` or ``forward({"x": X})``.
        ``cache=False`` keeps no operating point anywhere: inference only, and
        ``backward`` then raises. A failed forward (bad name, shape or dtype)
        raises an error naming the node and the shapes and leaves every node at
        its previous operating point.
        """
        self._require_outputs("forward")
        if inputs is not None and not isinstance(inputs, Mapping):
            raise TypeError(
                f"{self._kind()}.forward: pass the inputs by name, forward("
                + ", ".join(f"{n}=..." for n in self.input_names())
                + f") or forward({{name: array}}); got a {type(inputs).__name__} positionally"
            )
        given = dict(inputs or {})
        for key in named:
            if key in given:
                raise TypeError(f"{self._kind()}.forward: input {key!r} is given twice")
        given.update(named)
        self._check_names(given)
        result = run.forward(self, given, cache)
        return result[0] if len(result) == 1 else result

    def _check_names(self, given: Mapping[str, Any]) -> None:
        declared = self._input_list
        if len(given) == len(declared) and all(n in given for n in declared):
            return
        missing = [n for n in declared if n not in given]
        unknown = [
            n for n in given if n not in self._names or self._nodes[self._names[n]].kind != "input"
        ]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
            raise TypeError(
                f"{self._kind()}.forward: {'; '.join(parts)}; the inputs are "
                f"{', '.join(map(repr, declared)) or 'none'}"
            )

    def backward(
        self,
        seed: Any = None,
        *,
        mode: str = "fast",
        per_example: bool = False,
        input_grad: bool = True,
    ) -> run.Gradients:
        """Reverse-order pass from the outputs' seeds ``dJ/d(output)``.

        ``seed``: omit it for a scalar output (``dJ/dJ = 1``); otherwise an
        array of the output's shape. With several outputs: omit it when all are
        scalars (each seeded with 1: ``J`` is their sum), or give a tuple/list
        with one seed per output (``None`` = 1 for a scalar output), or a dict
        ``{output name: seed}`` where an output left out sends no gradient.

        ``mode="fast"`` uses each layer's ``backward``; ``mode="explicit"``
        multiplies by each layer's Jacobians as ``scipy.sparse`` matrices
        (Algorithm 14.1, literally). Both return the same ``Gradients``.

        ``per_example=True`` (fast mode only) returns every parameter gradient
        as ``B`` terms, an array ``(B, *θ.shape)`` whose sum over axis 0 is the
        usual gradient (eq. 14.11): row ``b`` is ``g_out,b L^θ_b`` summed over
        the uses of the Parameter, from each layer's ``per_example_grads`` (one
        vectorized product per parameter, no loop over the examples). With a
        loss (a batch mean), ``B * row[b]`` is the gradient of example ``b``'s
        own loss. ``per_use`` holds per-example terms too.

        ``input_grad=False`` computes no input gradient (``inputs`` is empty),
        which skips the first layers' input products.
        """
        if mode != "fast":
            where = f"{self._kind()}.backward"
            if mode not in run.MODES:
                raise ValueError(f"{where}: mode must be one of {run.MODES}, got {mode!r}")
            if per_example:
                raise ValueError(f"{where}: per_example=True runs in mode='fast' only")
        # The common case in one line (a model with nested graphs takes the full check).
        if (
            self._state != "cached"
            or list(map(state.operating_point, self._layers)) != self._tokens
        ):
            self._require_outputs("backward")
            self._require_cached()  # raises, saying what is missing
        if seed is None and mode == "fast" and not per_example:  # a cost's dJ/dJ = 1
            grads = run.backward_chain_cost(self, input_grad)
            if grads is not None:
                return grads
        seeds = run.seeds(self, seed, None)
        return run.backward(self, seeds, mode, per_example, input_grad)

    def evaluate(self, value: str, inputs: Mapping[str, Any] | None = None, **named: Any) -> Any:
        """The value named ``value`` (a node, or ``"node:k"``) from the inputs it needs.

        Only the nodes it depends on run, and none keeps an operating point: the
        prediction of a model that ends in a loss, without labels.
        """
        self._require_outputs("evaluate")
        return run.evaluate(self, value, {**(inputs or {}), **named})

    def seeds(self, seed: Any = None) -> list[np.ndarray | None]:
        """The seeds ``backward(seed)`` would start from: one array per output, checked
        (``None`` for an output that sends no gradient)."""
        self._require_cached("seeds")
        return run.seeds(self, seed, f"{self._kind()}.backward")

    def jacobians(self, output: str | None = None, *, order: str = "auto") -> chain.Jacobians:
        """Whole-model Jacobians ``∂out/∂input`` and ``∂out/∂θ`` at the cached point.

        Chained from the per-layer structured Jacobians (eq. 14.2); see
        ``backprop.graph.chain.jacobians`` for the two orders and the layout.
        ``output`` names the output (it may be omitted when there is one).
        """
        self._require_outputs("jacobians")
        self._require_cached("jacobians")
        return chain.jacobians(self, output, order)

    # -- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Graph:
        """Put every layer in training mode (``mode=False``: evaluation); returns the model."""
        self.training = bool(mode)
        for node in self._nodes:
            if node.layer is not None:
                node.layer.train(mode)
        return self

    def eval(self) -> Graph:
        """Put every layer in evaluation mode (Dropout off, BatchNorm's running statistics)."""
        return self.train(False)

    def require_forward(self, what: str = "backward") -> None:
        """Raise a ``RuntimeError`` unless the operating point of the last cached
        ``forward`` is still in every layer (what ``backward`` and the tools need)."""
        self._require_outputs(what)
        self._require_cached(what)

    def _require_cached(self, what: str = "backward") -> None:
        if self._state == "cached" and state.tokens(self) == self._tokens:
            return  # the common case: the last forward's operating points are in place
        where = f"{self._kind()}.{what}"
        if self._state is None:
            raise RuntimeError(
                f"{where}: no forward pass yet; call forward(...) first ({what} runs at the "
                f"operating point forward caches)"
            )
        if self._state == "uncached":
            raise RuntimeError(
                f"{where}: the last forward ran with cache=False, which keeps no operating "
                f"point; run forward(..., cache=True) before {what}"
            )
        tokens = state.tokens(self)
        if tokens != self._tokens:
            owners = self._layers + self._nested
            for owner, now, then in zip(owners, tokens, self._tokens, strict=True):
                if now is then:
                    continue
                node = self._nodes[self._names[self._layer_ids[id(owner)]]]
                i = self._nodes.index(node)
                if now is None:
                    raise RuntimeError(
                        f"{where}: {self._where(i)} has no operating point (a forward with "
                        f"cache=False keeps none); call forward(...) first"
                    )
                raise RuntimeError(
                    f"{where}: {self._where(i)} was run outside this graph since its "
                    f"forward, so its operating point is not this graph's; run the "
                    f"graph's forward(...) again"
                )

    def _value(self, src: tuple[int, int]) -> Any:
        """Value ``src`` of the last cached forward."""
        return self._values[self._slots[src]]

    def _shape(self, src: tuple[int, int]) -> Any:
        """The shape of value ``src`` at the last forward (None before any)."""
        if not self._values:
            return None
        v = self._values[self._slots[src]]
        return v.shape if v is not None else self._meta[self._slots[src]][0]

    def _dtype(self, src: tuple[int, int]) -> Any:
        """The dtype of value ``src`` at the last forward (None before any)."""
        if not self._values:
            return None
        v = self._values[self._slots[src]]
        return v.dtype if v is not None else self._meta[self._slots[src]][1]

    # -- introspection: what tools may read -------------------------------------------------
    def input_names(self) -> list[str]:
        """The input names, in the order they were declared."""
        if self._frozen:
            return list(self._input_list)
        return [n.name for n in self._nodes if n.kind == "input"]

    def output_names(self) -> list[str]:
        """The outputs' names (``"node"`` or ``"node:k"``), in ``output()`` order."""
        return list(self._output_names)

    def output_values(self) -> list[str]:
        """The values the outputs are (``"node"`` or ``"node:k"``), in ``output()`` order."""
        return [self._port_name(src) for src in self._outputs]

    @property
    def batch_size(self) -> int:
        """``B`` of the last forward: the batch axis of the first input (or value)."""
        self._require_cached("batch_size")
        for i in self._inputs:
            shape = self._shape((i, 0))
            if shape:
                return shape[0]
        return next(s[0] for src in self._slots if (s := self._shape(src)))

    @property
    def reduces_batch(self) -> bool:
        """True when the (first) output has no batch axis: a cost summed over the batch."""
        self._require_outputs("reduces_batch")
        i, port = self._outputs[0]
        return reduces_batch(self._nodes[i].layer, port)

    def nodes(self) -> list[NodeInfo]:
        """Every node (inputs, layers, automatic fan-outs) in topological order."""
        order = self._order if self._frozen else range(len(self._nodes))
        return [self._info(i) for i in order]

    def node(self, name: str) -> NodeInfo:
        """The node named ``name``, or the node that gives the output or value ``name``
        (``"node:k"``)."""
        if name in self._output_names:
            return self._info(self._outputs[self._output_names.index(name)][0])
        base = name.split(":")[0]
        if base not in self._names:
            raise KeyError(f"{self._kind()}: no node named {name!r}")
        return self._info(self._names[base])

    def _info(self, i: int) -> NodeInfo:
        node = self._nodes[i]
        ports = range(node.n_out)
        shapes = tuple(self._shape((i, k)) if self._frozen else None for k in ports)
        return NodeInfo(
            name=node.name,
            kind=node.kind,
            layer=node.layer,
            inputs=tuple(self._port_name(src) for src in node.inputs),
            shape=shapes[0],
            params=tuple(name for name, _ in node_params(node.layer)),
            auto=node.auto,
            n_outputs=node.n_out,
            shapes=shapes,
            outputs=tuple(self._port_name((i, k)) for k in ports),
            dtypes=tuple(self._dtype((i, k)) if self._frozen else None for k in ports),
            batched=tuple(
                shapes[k] != () and (node.layer is None or not reduces_batch(node.layer, k))
                for k in ports
            ),
            requires_grad=bool(self._needs[i]) if self._needs else False,
        )

    def __getitem__(self, name: str) -> Any:
        """The layer of node ``name`` (None for an input)."""
        if name not in self._names:
            raise KeyError(f"{self._kind()}: no node named {name!r}")
        return self._nodes[self._names[name]].layer

    def __len__(self) -> int:
        return len(self._nodes)

    def named_parameters(self) -> dict[str, Parameter]:
        """``{"<node>.<param>": Parameter}``, each Parameter once (tied ones by first name)."""
        named: dict[str, Parameter] = {}
        seen: set[int] = set()
        for node in self._nodes:
            for pname, p in node_params(node.layer):
                if id(p) not in seen:
                    seen.add(id(p))
                    named[f"{node.name}.{pname}"] = p
        return named

    def parameters(self) -> list[Parameter]:
        """Every Parameter once, in the order of ``named_parameters()``."""
        return list(self.named_parameters().values())

    def summary(self) -> str:
        """A text table: node, layer, inputs, output shape, parameter count."""
        return summary_table(self)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        n_in = len(self.input_names())
        n_layers = len(self._nodes) - n_in
        n_out = len(self._output_names)
        return f"Graph({n_in} input(s), {n_layers} layer node(s), {n_out} output(s))"

    # -- helpers ------------------------------------------------------------------------
    def _kind(self) -> str:
        return type(self).__name__

    def _where(self, i: int) -> str:
        """How errors name node ``i``."""
        node = self._nodes[i]
        return f"{self._kind()} node {node.name!r} ({node.layer!r})"

    def _check_open(self, what: str) -> None:
        if self._frozen:
            raise RuntimeError(
                f"{self._kind()}.{what}: the outputs were already declared, which froze the "
                f"graph; build the whole graph before calling output(...)"
            )

    def _require_outputs(self, what: str) -> None:
        if not self._frozen:
            raise RuntimeError(
                f"{self._kind()}.{what}: declare the outputs first with output(handle, ...)"
            )

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(
                f"Graph: node name must be a non-empty string without ':', got {name!r}"
            )
        if name in self._names:
            raise ValueError(f"Graph: a node named {name!r} already exists; names are unique")
        self._names[name] = len(self._nodes)

    def _new_node(self, node: _Node) -> list[Handle]:
        i = len(self._nodes)
        self._nodes.append(node)
        return [
            Handle(self, i, k, f"{node.name}:{k}" if node.multi else node.name)
            for k in range(node.n_out)
        ]

    def _source(self, h: Any, label: str, pos: int) -> tuple[int, int]:
        if isinstance(h, tuple) and h and all(isinstance(x, Handle) for x in h):
            raise TypeError(
                f"Graph: input {pos} of {label!r} is a tuple of {len(h)} handles (from a node "
                f"with several outputs); pass them one by one, e.g. add(layer, *handles)"
            )
        if not isinstance(h, Handle):
            raise TypeError(
                f"Graph: input {pos} of {label!r} is {type(h).__name__}, not a handle; declare "
                f"data with g.input(name) and pass arrays to forward"
            )
        if h.graph is not self:
            raise ValueError(
                f"Graph: input {pos} of {label!r} is handle {h.name!r} of another Graph; "
                f"handles are used only in the graph that made them (to reuse a graph, add it "
                f"as a node: g.add(other_graph, ...))"
            )
        return (h.node, h.port)

    def _port_name(self, src: tuple[int, int]) -> str:
        node = self._nodes[src[0]]
        return f"{node.name}:{src[1]}" if node.multi else node.name

    @staticmethod
    def _input_labels(layer: Any) -> list[str]:
        if isinstance(layer, Graph):
            return layer.input_names()
        return list(getattr(layer, "inputs", ()))


def _is_graph(layer: Any) -> bool:
    return layer is not None and not isinstance(layer, Layer)


def _nested_graphs(graph: Graph) -> list[Graph]:
    """Every Graph nested inside ``graph``, at any depth (iteratively)."""
    found: list[Graph] = []
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g._nodes:
            if isinstance(node.layer, Graph):
                found.append(node.layer)
                stack.append(node.layer)
    return found
