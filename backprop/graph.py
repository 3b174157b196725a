"""Executors: ``Sequential`` runs Algorithm 14.1 over a chain of layers; ``Graph``
runs it over any DAG of layers (chapter 14.7–14.9)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from backprop.jacobian import Dense, Identity, Jacobian, explicit_vjp
from backprop.layer import FLOAT_DTYPES, Layer, Loss, Parameter, check_float
from backprop.layers.structure import Branch, Merge

__all__ = [
    "Gradients",
    "Graph",
    "Handle",
    "NodeInfo",
    "Sequential",
    "named_parameters",
    "topological_order",
]

MODES = ("fast", "explicit")


def named_parameters(layers: Iterable[tuple[str, Layer]]) -> dict[str, Parameter]:
    """``{"<layer>.<param>": Parameter}``, each Parameter once (tied ones by first name)."""
    named: dict[str, Parameter] = {}
    seen: set[int] = set()
    for prefix, layer in layers:
        for name, p in layer.params.items():
            if id(p) not in seen:
                seen.add(id(p))
                named[f"{prefix}.{name}"] = p
    return named


class Sequential:
    """A chain ``f_L ∘ ... ∘ f_1`` run by Algorithm 14.1.

    ``forward(x_0)`` is the forward loop (lines 4–6). When the last layer is a
    loss, ``forward(x_0, y)`` hands it the target and returns the cost ``J``.
    ``backward(g_L)`` is the backward loop (lines 8–13) and returns
    ``(g_0, grads)`` with ``grads`` keyed by Parameter (tied Parameters summed,
    eq. 14.47). Gradients are returned, never accumulated: there is nothing to
    zero between steps.

    ``backward(..., mode="explicit")`` runs the algorithm literally: at each
    layer it builds ``L_l`` as ``scipy.sparse`` matrices and multiplies
    ``g_{l-1} = g_l L^x_l`` and ``∂J/∂θ_l = g_l L^θ_l``. It agrees with the
    fast path to rounding and exists for teaching and checking.
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers: list[Layer] = list(layers)
        self._ops: list[Any] | None = None  # the operating points of the last forward
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        seen: set[int] = set()
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a Layer")
            if id(layer) in seen:
                raise ValueError(
                    f"Sequential: layer {i} ({layer!r}) is already in the chain; a layer instance "
                    f"is one node. To share weights, build a second layer with the same "
                    f"Parameters, e.g. Linear(n_in, n_out, W=first.W, b=first.b)"
                )
            seen.add(id(layer))
            last = i == len(self.layers) - 1
            if not last and (isinstance(layer, Loss) or len(layer.inputs) != 1):
                raise ValueError(
                    f"Sequential: layer {i} ({layer!r}) takes {len(layer.inputs)} inputs; only the "
                    f"last layer of a chain may take more (a loss and its target)"
                )
            if not last and isinstance(layer, Branch):
                raise ValueError(
                    f"Sequential: layer {i} ({layer!r}) has {layer.n} outputs, but each layer of a "
                    f"chain takes one input; fan-out needs a Graph (g.add(layer, x) uses a value "
                    f"twice)"
                )

    # -- Algorithm 14.1 ---------------------------------------------------------
    def forward(self, x: Any, *targets: Any, cache: bool = True) -> np.ndarray:
        """Forward pass: ``x_l = f_l(x_{l-1}, θ_l)`` for ``l = 1..L``.

        ``cache=False`` keeps no operating point in any layer (inference only).
        """
        last = self.layers[-1]
        if len(targets) != len(last.inputs) - 1:
            need = ", ".join(last.inputs[1:]) or "nothing"
            raise TypeError(
                f"Sequential.forward: the last layer {last!r} takes {need} after x; "
                f"got {len(targets)} extra argument(s)"
            )
        saved = [layer._op for layer in self.layers]
        try:
            for layer in self.layers[:-1]:
                x = layer.forward(x, cache=cache)
            out = last.forward(x, *targets, cache=cache)
        except Exception:
            for layer, op in zip(self.layers, saved, strict=True):
                layer._op = op
            raise
        # What this forward left in each layer: backward refuses to run if any layer
        # has since been run on its own (its operating point would not be this chain's).
        self._ops = [layer._op for layer in self.layers] if cache else None
        return out

    def backward(
        self,
        g_L: Any = None,
        *,
        mode: str = "fast",
        input_grad: bool = True,
        per_example: bool = False,
    ) -> tuple[np.ndarray | None, dict[Parameter, np.ndarray]]:
        """Backward pass: ``g_{l-1} = g_l L^x_l`` and ``∂J/∂θ_l = g_l L^θ_l``.

        ``g_L`` is ``∂J/∂x_L`` (omit it when the last layer is a loss).
        ``input_grad=False`` skips ``g_0`` and so the first layer's input product.
        ``per_example=True`` returns each parameter's gradient as ``B`` terms,
        an array ``(B, *θ.shape)`` whose sum over axis 0 is the usual gradient
        (eq. 14.11); with a loss (a batch mean), ``B * terms[b]`` is the gradient
        of example ``b``'s own loss, and the mean of those is the batch gradient.
        """
        if mode not in MODES:
            raise ValueError(f"Sequential.backward: mode must be one of {MODES}, got {mode!r}")
        if per_example and mode != "fast":
            raise ValueError("Sequential.backward: per_example=True runs in mode='fast' only")
        self._require_operating_points("backward")
        last = self.layers[-1]
        if g_L is None and not isinstance(last, Loss):
            raise TypeError(
                f"Sequential.backward needs g_L = dJ/dx_L, shape "
                f"{last._op.x_out.shape}: the last layer {last!r} is not a loss"  # type: ignore[union-attr]
            )
        grads: dict[Parameter, np.ndarray] = {}
        g = g_L
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            need = input_grad or i > 0
            if per_example:
                layer_grads = layer.per_example_grads(g)
                g_in, _ = layer.backward(g, input_grad=need) if need else (None, None)
            elif mode == "fast":
                g_in, layer_grads = layer.backward(g, input_grad=need)
            else:
                g_ins, layer_grads = _explicit_layer_step(layer, g, need)
                g_in = g_ins[0]
            if isinstance(g_in, tuple):
                g_in = g_in[0]
            for name, grad in layer_grads.items():
                p = layer.params[name]
                grads[p] = grads[p] + grad if p in grads else grad
            g = g_in
        return g, grads

    def _require_operating_points(self, what: str) -> None:
        """A ``RuntimeError`` naming the first layer that has no cached forward."""
        ops = self._ops
        for i, layer in enumerate(self.layers):
            if layer._op is None:
                raise RuntimeError(
                    f"Sequential.{what}: layer {i} ({layer!r}) has no operating point; "
                    f"call forward() first (a forward with cache=False keeps none)"
                )
            if ops is not None and layer._op is not ops[i]:
                raise RuntimeError(
                    f"Sequential.{what}: layer {i} ({layer!r}) was run on its own since the "
                    f"chain's forward, so its operating point is not this chain's; run the "
                    f"chain's forward() again"
                )

    @property
    def reduces_batch(self) -> bool:
        """True when the chain's output has no batch axis (its last layer's sums)."""
        return self.layers[-1].reduces_batch

    # -- whole-chain Jacobians ----------------------------------------------------
    def jacobians(self, *, order: str = "auto") -> tuple[Jacobian, dict[Parameter, Jacobian]]:
        """``(∂x_L/∂x_0, {θ: ∂x_L/∂θ})`` at the cached operating point.

        Both are chained from the per-layer structured Jacobians (eq. 14.2). A
        tied Parameter gets the sum of its uses (eq. 14.47). ``order`` picks the
        multiplication order, as ``Graph.jacobians`` does: ``"reverse"`` from the
        output side, so each suffix product is shared by all the layers below it
        (the reuse of chapter 14.2); ``"forward"`` from the input side, one sweep
        for ``x_0`` and one per Parameter; ``"auto"`` takes ``"reverse"`` unless
        one example of ``x_L`` has more entries than ``x_0`` and all the
        parameters together.
        """
        if order not in ORDERS:
            raise ValueError(f"Sequential.jacobians: order must be one of {ORDERS}, got {order!r}")
        layers = self.layers
        self._require_operating_points("jacobians")
        steps = []
        for layer in layers:
            L_x, L_th = layer.jacobians()
            steps.append((L_x[0] if isinstance(L_x, tuple) else L_x, L_th))
        if order == "auto":
            x_out = layers[-1]._op.x_out  # type: ignore[union-attr]
            M = int(np.prod(x_out.shape[1:], dtype=np.int64)) if x_out.ndim else 1
            N = steps[0][0].shape[1] + sum(p.size for p in self.parameters())
            order = "reverse" if M <= N else "forward"
        L_theta: dict[Parameter, Jacobian] = {}
        if order == "reverse":
            suffix: Jacobian | None = None
            for layer, (L_x, L_th) in zip(reversed(layers), reversed(steps), strict=True):
                for name, L in L_th.items():
                    J = L if suffix is None else suffix @ L
                    p = layer.params[name]
                    L_theta[p] = L_theta[p] + J if p in L_theta else J
                suffix = L_x if suffix is None else suffix @ L_x
            return cast(Jacobian, suffix), L_theta  # the chain is never empty
        prefix = steps[0][0]
        for L_x, _ in steps[1:]:
            prefix = L_x @ prefix
        for i, (layer, (_, L_th)) in enumerate(zip(layers, steps, strict=True)):
            for name, L in L_th.items():
                J = L
                for L_x, _ in steps[i + 1 :]:
                    J = L_x @ J
                p = layer.params[name]
                L_theta[p] = L_theta[p] + J if p in L_theta else J
        return prefix, L_theta

    # -- parameters and text --------------------------------------------------------
    def named_parameters(self) -> dict[str, Parameter]:
        """``{"<index>.<name>": Parameter}``, e.g. ``"0.W"``; tied ones once."""
        return named_parameters((str(i), layer) for i, layer in enumerate(self.layers))

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters().values())

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("x",) + tuple(self.layers[-1].inputs[1:])

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __repr__(self) -> str:
        lines = ["Sequential("]
        for i, layer in enumerate(self.layers):
            n = sum(p.size for p in layer.params.values())
            lines.append(f"  ({i}) {layer!r}" + (f"  [{n} parameters]" if n else ""))
        total = sum(p.size for p in self.parameters())
        lines.append(f")  {total} parameters")
        return "\n".join(lines)


# =====================================================================================
# Graph: any DAG of layers (chapter 14.7–14.9)
# =====================================================================================


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

    def __init__(self, graph: Graph, node: int, port: int, name: str) -> None:
        self.graph, self.node, self.port, self.name = graph, node, port, name

    def __repr__(self) -> str:
        return f"<Handle {self.name}>"


@dataclass(frozen=True)
class NodeInfo:
    """A node of a ``Graph`` as ``Graph.nodes()`` lists it.

    ``kind`` is ``"input"`` or ``"layer"``; ``auto`` is True for a ``Branch`` the
    Graph inserted for a fan-out. ``inputs`` names the upstream values
    (``"name"``, or ``"name:k"`` for output ``k`` of a node with several
    outputs). ``shape`` is the output shape at the last ``forward`` (that of
    output 0 for a node with several outputs; all are in ``shapes``), else
    None. ``params`` are the layer's parameter names.
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


@dataclass(frozen=True)
class Gradients:
    """What ``Graph.backward`` returns.

    - ``inputs[name]``: ``dJ/dx`` for every float input that requires a
      gradient, in the input's shape (chapter 14.9);
    - ``params[p]``: ``dJ/dθ`` for every Parameter of the graph, in its shape,
      the uses of a tied Parameter summed (eq. 14.47), zeros for a Parameter no
      gradient reaches;
    - ``per_use[p]``: the terms of that sum, a list of ``(node name, gradient)``
      (``"outer/inner"`` for a node inside a nested Graph or Sequential).

    ``grads[name]`` and ``grads[p]`` index ``inputs`` and ``params``.
    """

    inputs: dict[str, np.ndarray]
    params: dict[Parameter, np.ndarray]
    per_use: dict[Parameter, list[tuple[str, np.ndarray]]]

    def __getitem__(self, key: str | Parameter) -> np.ndarray:
        if isinstance(key, Parameter):
            return self.params[key]
        return self.inputs[key]

    def __repr__(self) -> str:
        ins = ", ".join(f"{k} {v.shape}" for k, v in self.inputs.items())
        return f"Gradients(inputs: {ins or '-'}; {len(self.params)} parameters)"


class _Node:
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


_forward_ids = itertools.count(1)
_RESERVED = frozenset({"cache"})


def _leaf_layers(layer: Any) -> list[Layer]:
    """Every Layer instance inside ``layer`` (itself, a chain's, a graph's at any depth)."""
    leaves: list[Layer] = []
    stack = [layer]
    while stack:
        item = stack.pop()
        if isinstance(item, Layer):
            leaves.append(item)
        elif isinstance(item, Sequential):
            leaves.extend(item.layers)
        elif isinstance(item, Graph):
            stack.extend(n.layer for n in item._nodes if n.layer is not None)
    return leaves


def _explicit_layer_step(
    layer: Layer, g_out: Any, input_grad: bool
) -> tuple[tuple[np.ndarray | None, ...], dict[str, np.ndarray]]:
    """Algorithm 14.1, lines 11–13, for one layer with any number of inputs.

    Builds ``L^x`` and ``L^θ`` as ``scipy.sparse`` matrices and multiplies
    ``g_in = g_out L^x`` (eq. 14.10) and ``dJ/dθ = g_out L^θ`` (eq. 14.8). A
    branch's ``g_out`` is the stack ``[g_out^a, g_out^b, ...]`` (eq. 14.43).
    """
    op = layer._operating_point("backward")
    if isinstance(layer, Branch):
        gs = list(g_out)
        x = op.x_in[0]
        layer._validate_g_out(op, gs)
        B = x.shape[0]
        g = np.concatenate(
            [np.zeros((B, x[0].size), x.dtype) if gi is None else gi.reshape(B, -1) for gi in gs],
            axis=1,
        )
    else:
        g = layer._g_rows(op, layer._validate_g_out(op, g_out))
    L_x, L_theta = layer.jacobians()  # line 11
    grads = {  # line 13
        name: explicit_vjp(L, g, sum_batch=True).reshape(layer.params[name].shape)
        for name, L in L_theta.items()
    }
    L_xs = L_x if isinstance(L_x, tuple) else (L_x,)
    g_in = tuple(  # line 12
        None if (L is None or not input_grad) else explicit_vjp(L, g).reshape(x.shape)
        for L, x in zip(L_xs, op.x_in, strict=True)
    )
    return g_in, grads


def _fast_layer_step(
    layer: Layer, g_out: Any, input_grad: bool
) -> tuple[tuple[np.ndarray | None, ...], dict[str, np.ndarray]]:
    g_in, grads = layer.backward(g_out, input_grad=input_grad)
    return (g_in if isinstance(g_in, tuple) else (g_in,)), grads


def _per_example_layer_step(
    layer: Layer, g_out: Any, input_grad: bool
) -> tuple[tuple[np.ndarray | None, ...], dict[str, np.ndarray]]:
    """The fast step, with each parameter gradient as ``B`` per-example terms."""
    if not layer.params:
        return _fast_layer_step(layer, g_out, input_grad)
    terms = layer.per_example_grads(g_out)
    if not input_grad:
        return (None,) * len(layer.inputs), terms
    g_in, _ = _fast_layer_step(layer, g_out, True)
    return g_in, terms


_LAYER_STEPS = {"fast": _fast_layer_step, "explicit": _explicit_layer_step}

# -- whole-graph Jacobians: one node's step, backward (suffixes) and forward (prefixes) --

ORDERS = ("auto", "reverse", "forward")
_JacCache = dict[int, tuple[Any, dict[str, Jacobian]]]


def _reduces_batch(layer: Any, port: int = 0) -> bool:
    """True when output ``port`` of ``layer`` has no batch axis (a sum over the batch)."""
    if isinstance(layer, Sequential):
        layer = layer.layers[-1]
    if isinstance(layer, Graph):
        src = cast(list, layer._outputs)[port]
        return _reduces_batch(layer._nodes[src[0]].layer, src[1])
    return bool(getattr(layer, "reduces_batch", False))


def _layer_jacobians(layer: Layer, cache: _JacCache) -> tuple[tuple[Any, ...], dict[str, Jacobian]]:
    """``layer.jacobians()`` once per layer, with ``L_x`` always a tuple."""
    if id(layer) not in cache:
        L_x, L_theta = layer.jacobians()
        cache[id(layer)] = (L_x if isinstance(L_x, tuple) else (L_x,), L_theta)
    return cache[id(layer)]


def _plus(a: Jacobian | None, b: Jacobian | None) -> Jacobian | None:
    return b if a is None else a if b is None else a + b


def _node_jacobians_back(
    layer: Any,
    outs: list[Jacobian | None],
    need_in: list[bool],
    by_param: dict[Parameter, Jacobian],
    cache: _JacCache,
) -> list[Jacobian | None]:
    """Suffixes ``∂out/∂x_in`` of one node from those of its outputs; adds ``∂out/∂θ``."""
    if isinstance(layer, Branch):  # each copy is I: the paths add (eq. 14.46)
        total = None
        for J in outs:
            total = _plus(total, J)
        return [total]
    if isinstance(layer, Layer):
        S = cast(Jacobian, outs[0])
        L_xs, L_theta = _layer_jacobians(layer, cache)
        for name, L in L_theta.items():
            p = layer.params[name]
            by_param[p] = cast(Jacobian, _plus(by_param.get(p), S @ L))
        return [
            S @ L if (L is not None and need) else None
            for L, need in zip(L_xs, need_in, strict=True)
        ]
    if isinstance(layer, Sequential):
        S = cast(Jacobian, outs[0])
        targets: list[Jacobian | None] = []
        last = len(layer.layers) - 1
        for idx in range(last, -1, -1):
            L_xs, L_theta = _layer_jacobians(layer.layers[idx], cache)
            for name, L in L_theta.items():
                p = layer.layers[idx].params[name]
                by_param[p] = cast(Jacobian, _plus(by_param.get(p), S @ L))
            if idx == last:
                targets = [
                    S @ L if (L is not None and need) else None
                    for L, need in zip(L_xs[1:], need_in[1:], strict=True)
                ]
            if idx == 0 and not need_in[0]:
                return [None, *targets]
            S = S @ L_xs[0]
        return [S, *targets]
    inner: Graph = layer
    seeds = {
        src: J for src, J in zip(cast(list, inner._outputs), outs, strict=True) if J is not None
    }
    ins, inner_params = inner._reverse_jacobians(seeds, cache)
    for p, J in inner_params.items():
        by_param[p] = cast(Jacobian, _plus(by_param.get(p), J))
    return [ins.get(n) for n in inner.input_names()]


def _node_jacobians_forward(
    layer: Any, ins: list[Jacobian | None], target: Parameter | None, cache: _JacCache
) -> list[Jacobian | None]:
    """Prefixes ``∂x_out/∂z`` of one node from those of its inputs (and ``target = z``)."""
    if isinstance(layer, Branch):
        return [ins[0]] * layer.n
    if isinstance(layer, Layer):
        uses = [name for name, p in layer.params.items() if p is target]
        if all(P is None for P in ins) and not uses:
            return [None]
        L_xs, L_theta = _layer_jacobians(layer, cache)
        total: Jacobian | None = None
        for L, P in zip(L_xs, ins, strict=True):
            if L is not None and P is not None:
                total = _plus(total, L @ P)
        for name in uses:
            total = _plus(total, L_theta[name])
        return [total]
    if isinstance(layer, Sequential):
        out: list[Jacobian | None] = ins[:1]
        for idx, leaf in enumerate(layer.layers):
            given = out + (ins[1:] if idx == len(layer.layers) - 1 else [])
            out = _node_jacobians_forward(leaf, given, target, cache)
        return out
    inner: Graph = layer
    given_in = {n: P for n, P in zip(inner.input_names(), ins, strict=True) if P is not None}
    return inner._forward_jacobians(given_in, target, cache)


class Graph:
    """Any DAG of layers, run forward then backward (chapter 14.7–14.9).

    Build it with ``input(name)``, ``add(layer, *handles)`` and
    ``output(*handles)``; then ``forward(**inputs)`` evaluates it in a
    topological order and ``backward(seed)`` runs the reverse order, returning
    ``Gradients`` with ``.inputs[name]`` (backprop to the data, 14.9) and
    ``.params[p]``.

    - A value used more than once (by several nodes, twice by one node, or by a
      node and as an output) is routed through a ``Branch`` that ``output()``
      inserts (``auto=True`` in ``nodes()``), so fan-out means "gradients add"
      (eq. 14.46) and every value has exactly one consumer.
    - A Parameter used by several layers gets the sum of its uses (eq. 14.47);
      ``Gradients.per_use`` lists the terms.
    - A ``Sequential`` or another ``Graph`` can be a node: a Graph node takes
      its inputs in the order its inputs were declared and gives its outputs in
      the order of its ``output()`` call.
    - ``backward(mode="explicit")`` is the literal Algorithm 14.1 over the DAG:
      every layer's Jacobians as sparse matrices, multiplied one by one.
    - ``forward(..., cache=False)`` is inference only: no layer keeps its
      operating point (the counterpart of ``torch.no_grad``).

    The node order is found by Kahn's algorithm, with no recursion, so a chain
    of 10^5 layers runs. Nodes cannot be added after ``output()``.
    """

    def __init__(self) -> None:
        self._nodes: list[_Node] = []
        self._names: dict[str, int] = {}
        self._layer_ids: dict[int, str] = {}
        self._counter = 0
        self._outputs: list[tuple[int, int]] | None = None
        self._output_names: list[str] = []
        self._order: list[int] = []
        # set by forward
        self._state: str | None = None  # None, "cached" or "uncached"
        self._shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        self._dtypes: dict[tuple[int, int], np.dtype[Any]] = {}
        self._needs: list[bool] = []
        self._tokens: list[Any] = []
        self._forward_id = 0

    # -- building -------------------------------------------------------------------
    def input(self, name: str, *, requires_grad: bool = True) -> Handle:
        """Declare a graph input, fed by ``forward(name=array)``.

        ``requires_grad=False`` says that ``dJ/d(name)`` is never wanted: it is
        not computed and ``Gradients.inputs`` omits it. Integer inputs (class
        labels) never get a gradient.
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
        return self._new_node(
            _Node(name, "input", None, [], 1, False, requires_grad=requires_grad)
        )[0]

    def add(self, layer: Any, *inputs: Handle, name: str | None = None) -> Any:
        """Add ``layer`` as a node fed by ``inputs``; return its output handle.

        ``layer`` is a ``Layer``, a ``Sequential`` (fed ``x`` and then the last
        layer's targets) or a ``Graph`` whose ``output()`` was declared (fed its
        inputs in declaration order). A node with several outputs (``Branch``,
        a Graph with several outputs) returns a tuple of handles. ``name``
        defaults to ``"<layer type>_<k>"``, e.g. ``"linear_0"``.
        """
        self._check_open("add")
        kind = type(layer).__name__
        if isinstance(layer, Merge) and layer.n is None:
            n_in = max(len(inputs), 1)  # Merge() takes what it is given: fixed by this node
            n_out, multi = 1, False
        elif isinstance(layer, Layer):
            n_in = len(layer.inputs)
            multi = isinstance(layer, Branch)
            n_out = layer.n if isinstance(layer, Branch) else 1
        elif isinstance(layer, Sequential):
            n_in, n_out, multi = len(layer.inputs), 1, False
        elif isinstance(layer, Graph):
            if layer is self or self in _nested_graphs(layer):
                raise ValueError("Graph.add: a Graph cannot be a node of itself (that is a cycle)")
            if layer._outputs is None:
                raise RuntimeError(
                    "Graph.add: the Graph to add as a node has no outputs yet; call its "
                    "output(...) first"
                )
            n_in, n_out = len(layer.input_names()), len(layer._outputs)
            multi = n_out > 1
        else:
            raise TypeError(
                f"Graph.add: expected a Layer, a Sequential or a Graph, got {kind}"
                + (
                    " (a tuple: add takes the handles one by one)"
                    if isinstance(layer, tuple)
                    else ""
                )
            )
        label = name if name is not None else f"{kind.lower()}_{self._counter}"
        for leaf in [layer, *_leaf_layers(layer)]:
            if id(leaf) in self._layer_ids:
                raise ValueError(
                    f"Graph.add: {leaf!r} is already node {self._layer_ids[id(leaf)]!r} of this "
                    f"graph; a layer instance is one node. To share weights, build a second "
                    f"layer with the same Parameters, e.g. Linear(n_in, n_out, W=first.W, "
                    f"b=first.b): their gradients add up (eq. 14.47)"
                )
        if len(inputs) != n_in:
            need = ", ".join(self._input_labels(layer)) or "no input"
            hint = "; Merge() takes any number of inputs" if isinstance(layer, Merge) else ""
            raise TypeError(
                f"Graph.add: node {label!r} ({layer!r}) takes {n_in} input(s) ({need}), "
                f"got {len(inputs)}{hint}"
            )
        srcs = [self._source(h, label, i) for i, h in enumerate(inputs)]
        self._claim(label)
        self._counter += 1
        for leaf in [layer, *_leaf_layers(layer)]:
            self._layer_ids[id(leaf)] = label
        if isinstance(layer, Merge):
            layer.take_inputs(n_in)
        handles = self._new_node(_Node(label, "layer", layer, srcs, n_out, multi))
        return tuple(handles) if multi else handles[0]

    def output(self, *handles: Handle) -> None:
        """Declare the outputs (one call, at least one handle) and freeze the graph.

        Here every value used more than once is routed through an automatic
        ``Branch``, and the topological order is fixed.
        """
        self._check_open("output")
        if not handles:
            raise TypeError("Graph.output: give at least one handle")
        srcs = [self._source(h, "output", i) for i, h in enumerate(handles)]
        if len(set(srcs)) != len(srcs):
            raise ValueError("Graph.output: the same handle is given twice")
        self._output_names = [h.name for h in handles]
        # Fan-out: every (node, port) read more than once gets a Branch of its own.
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
            branch = Branch(len(readers))
            self._layer_ids[id(branch)] = label
            b = self._new_node(_Node(label, "layer", branch, [src], len(readers), True, auto=True))
            for copy, (i, pos) in enumerate(readers):
                if i < 0:
                    srcs[pos] = (b[0].node, copy)
                else:
                    self._nodes[i].inputs[pos] = (b[0].node, copy)
        names = [n.name for n in self._nodes]
        self._order = topological_order([[j for j, _ in n.inputs] for n in self._nodes], names)
        self._outputs = srcs

    # -- forward ------------------------------------------------------------------------
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
        outputs = self._require_outputs("forward")
        given = dict(inputs or {})
        for key in named:
            if key in given:
                raise TypeError(f"Graph.forward: input {key!r} is given twice")
        given.update(named)
        declared = self.input_names()
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
                f"Graph.forward: {'; '.join(parts)}; the graph's inputs are "
                f"{', '.join(map(repr, declared)) or 'none'}"
            )
        snapshot = self._snapshot()
        nodes = self._nodes
        values: dict[tuple[int, int], Any] = {}
        shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        dtypes: dict[tuple[int, int], np.dtype[Any]] = {}
        needs = [False] * len(nodes)
        try:
            for i in self._order:
                node = nodes[i]
                if node.kind == "input":
                    x = np.asarray(given[node.name])
                    values[(i, 0)] = x
                    shapes[(i, 0)], dtypes[(i, 0)] = x.shape, x.dtype
                    needs[i] = node.requires_grad and x.dtype in FLOAT_DTYPES
                    continue
                args = [values.pop(src) for src in node.inputs]
                out = self._run(node, args, cache)
                outs = out if node.multi else (out,)
                for k, o in enumerate(outs):
                    values[(i, k)] = o
                    shapes[(i, k)], dtypes[(i, k)] = o.shape, o.dtype
                needs[i] = self._has_params(node) or any(needs[j] for j, _ in node.inputs)
        except BaseException:
            self._restore(snapshot)
            raise
        self._shapes, self._dtypes, self._needs = shapes, dtypes, needs
        self._state = "cached" if cache else "uncached"
        self._forward_id = next(_forward_ids)
        self._tokens = [self._token(n) for n in nodes] if cache else []
        result = tuple(values[src] for src in outputs)
        return result[0] if len(result) == 1 else result

    def _run(self, node: _Node, args: list[Any], cache: bool) -> Any:
        layer = node.layer
        try:
            if isinstance(layer, Graph):
                return layer.forward(dict(zip(layer.input_names(), args, strict=True)), cache=cache)
            return layer.forward(*args, cache=cache)
        except (ValueError, TypeError) as e:
            shapes = ", ".join(
                f"{self._port_name(src)} {np.shape(a)}"
                for src, a in zip(node.inputs, args, strict=True)
            )
            msg = f"Graph node {node.name!r} ({layer!r}) with input(s) {shapes or '-'}: {e}"
            try:
                wrapped = type(e)(msg)
            except Exception:
                raise e from None
            raise wrapped from e

    # -- backward -----------------------------------------------------------------------
    def backward(
        self, seed: Any = None, *, mode: str = "fast", per_example: bool = False
    ) -> Gradients:
        """Reverse-order pass from the outputs' seeds ``dJ/d(output)``.

        ``seed``: omit it for a scalar output (``dJ/dJ = 1``); otherwise an
        array of the output's shape. With several outputs: omit it when all are
        scalars (each seeded with 1: ``J`` is their sum), or give a tuple/list
        with one seed per output (``None`` = 1 for a scalar output), or a dict
        ``{output name: seed}`` where an output left out sends no gradient.

        ``mode="fast"`` uses each layer's ``backward``; ``mode="explicit"``
        multiplies by each layer's Jacobians as ``scipy.sparse`` matrices
        (Algorithm 14.1, literally). Both return the same ``Gradients``.

        ``per_example=True`` (fast mode only) returns every parameter gradient as
        ``B`` terms, an array ``(B, *θ.shape)`` whose sum over axis 0 is the usual
        gradient (eq. 14.11), as ``Sequential.backward(per_example=True)`` does:
        row ``b`` is ``g_out,b L^θ_b`` summed over the uses of the Parameter, from
        each layer's ``per_example_grads`` (one vectorized product per parameter,
        no loop over the examples). With a loss (a batch mean), ``B * row[b]`` is
        the gradient of example ``b``'s own loss. ``per_use`` holds per-example
        terms too; ``inputs`` are unchanged (they are per example already).
        """
        if mode not in MODES:
            raise ValueError(f"Graph.backward: mode must be one of {MODES}, got {mode!r}")
        if per_example and mode != "fast":
            raise ValueError("Graph.backward: per_example=True runs in mode='fast' only")
        outputs = self._require_outputs("backward")
        self._require_cached()
        seeds = self._seeds(seed)
        return self._backward(outputs, seeds, mode, per_example)

    def _require_cached(self, what: str = "backward") -> None:
        if self._state is None:
            raise RuntimeError(
                f"Graph.{what}: no forward pass yet; call forward(...) first ({what} runs "
                f"at the operating point forward caches)"
            )
        if self._state == "uncached":
            raise RuntimeError(
                f"Graph.{what}: the last forward ran with cache=False, which keeps no "
                f"operating point; run forward(..., cache=True) before {what}"
            )
        for node, token in zip(self._nodes, self._tokens, strict=True):
            if self._token(node) != token:
                raise RuntimeError(
                    f"Graph.{what}: node {node.name!r} ({node.layer!r}) was run outside this "
                    f"graph since its forward; run the graph's forward(...) again"
                )

    def _backward(
        self,
        outputs: list[tuple[int, int]],
        seeds: list[np.ndarray | None],
        mode: str,
        per_example: bool = False,
    ) -> Gradients:
        nodes, needs = self._nodes, self._needs
        g: dict[tuple[int, int], Any] = {}
        for src, s in zip(outputs, seeds, strict=True):
            if s is not None:
                g[src] = s
        per_use: dict[Parameter, list[tuple[str, np.ndarray]]] = {}
        grads_in: dict[str, np.ndarray] = {}
        for i in reversed(self._order):
            node = nodes[i]
            if not needs[i]:
                continue
            if node.kind == "input":
                x = g.pop((i, 0), None)
                grads_in[node.name] = (
                    np.zeros(self._shapes[(i, 0)], self._dtypes[(i, 0)]) if x is None else x
                )
                continue
            g_out = [g.pop((i, k), None) for k in range(node.n_out)]
            if all(gk is None for gk in g_out):
                continue
            need_in = [needs[j] for j, _ in node.inputs]
            g_in = self._node_backward(node, i, g_out, need_in, mode, per_use, per_example)
            for src, gi, ni in zip(node.inputs, g_in, need_in, strict=True):
                if ni and gi is not None:
                    g[src] = gi
        params: dict[Parameter, np.ndarray] = {}
        for p in self.parameters():
            terms = per_use.get(p)
            if not terms:
                per_use[p] = []
                shape = (self._batch_size(), *p.shape) if per_example else p.shape
                params[p] = np.zeros(shape, p.dtype)
                continue
            total = terms[0][1].copy() if len(terms) > 1 else terms[0][1]
            for _, t in terms[1:]:
                total += t
            params[p] = total
        names = self.input_names()
        ordered = {n: grads_in[n] for n in names if n in grads_in}
        return Gradients(ordered, params, {p: per_use[p] for p in params})

    def _node_backward(
        self,
        node: _Node,
        i: int,
        g_out: list[Any],
        need_in: list[bool],
        mode: str,
        per_use: dict[Parameter, list[tuple[str, np.ndarray]]],
        per_example: bool = False,
    ) -> tuple[Any, ...]:
        layer = node.layer
        want = any(need_in)
        if isinstance(layer, Layer):
            step = _per_example_layer_step if per_example else _LAYER_STEPS[mode]
            g_in, grads = step(layer, tuple(g_out) if node.multi else g_out[0], want)
            for pname, grad in grads.items():
                per_use.setdefault(layer.params[pname], []).append((node.name, grad))
            return g_in
        if isinstance(layer, Sequential):
            return self._sequential_backward(node, g_out[0], need_in, mode, per_use, per_example)
        inner: Graph = layer
        inner._require_cached()
        seeds = [
            np.zeros(inner._shapes[src], inner._dtypes[src]) if s is None else s
            for s, src in zip(g_out, cast(list, inner._outputs), strict=True)
        ]
        sub = inner._backward(cast(list, inner._outputs), seeds, mode, per_example)
        for p, terms in sub.per_use.items():
            for use, grad in terms:
                per_use.setdefault(p, []).append((f"{node.name}/{use}", grad))
        return tuple(sub.inputs.get(n) for n in inner.input_names())

    @staticmethod
    def _sequential_backward(
        node: _Node,
        g: Any,
        need_in: list[bool],
        mode: str,
        per_use: dict[Parameter, list[tuple[str, np.ndarray]]],
        per_example: bool = False,
    ) -> tuple[Any, ...]:
        """Algorithm 14.1 over a nested chain, keeping the gradients of the targets too."""
        seq: Sequential = node.layer
        step = _per_example_layer_step if per_example else _LAYER_STEPS[mode]
        last = len(seq.layers) - 1
        targets: tuple[Any, ...] = ()
        for idx in range(last, -1, -1):
            layer = seq.layers[idx]
            want = idx > 0 or need_in[0] or (idx == last and any(need_in[1:]))
            g_in, grads = step(layer, g, want)
            for pname, grad in grads.items():
                per_use.setdefault(layer.params[pname], []).append((f"{node.name}/{idx}", grad))
            if idx == last:
                targets = tuple(g_in[1:])
            g = g_in[0]
        return (g, *targets)

    # -- whole-graph Jacobians ---------------------------------------------------------
    def jacobians(
        self, output: str | None = None, *, order: str = "auto"
    ) -> tuple[dict[str, Jacobian], dict[Parameter, Jacobian]]:
        """``({input: ∂out/∂input}, {θ: ∂out/∂θ})`` for one output, at the cached point.

        ``out`` is the output named ``output`` (it may be omitted when the graph
        has one). The keys are the inputs that ``backward`` gives a gradient
        (float inputs that require one) and every Parameter; the values are
        structured ``backprop.jacobian`` objects with the per-example layout of
        the layers: example ``b``'s matrix is ``(M, N)`` with ``M`` the entries of
        one example's output (1 for a scalar cost, whose per-example rows add up
        to the batch cost, eq. 14.11) and ``N`` those of one example's input, or
        ``|θ|``. Paths through a branch add (eq. 14.46); a tied Parameter gets
        the sum of its uses (eq. 14.47); an input or Parameter the output does
        not depend on gets a zero matrix.

        They are chained from the per-layer Jacobians (eq. 14.2) in one of two
        orders, with the same result:

        - ``"reverse"``: from the output side, like the backward pass. Each node
          gets the suffix ``∂out/∂(its output)``, computed once and shared by
          everything below it (the reuse of chapter 14.2); cost about ``M`` times
          the size of the graph.
        - ``"forward"``: from the input side, one sweep per input and Parameter,
          each carrying ``∂(value)/∂(that input)`` through the graph; cost about
          ``N_total`` times the size of the graph, where ``N_total`` is the
          number of entries of all inputs and parameters together.
        - ``"auto"`` (default) picks ``"reverse"`` when ``M <= N_total`` (few
          outputs: a cost, a logit vector) and ``"forward"`` otherwise.
        """
        if order not in ORDERS:
            raise ValueError(f"Graph.jacobians: order must be one of {ORDERS}, got {order!r}")
        outputs = self._require_outputs("jacobians")
        self._require_cached("jacobians")
        if output is None:
            if len(outputs) != 1:
                raise ValueError(
                    f"Graph.jacobians: the graph has {len(outputs)} outputs "
                    f"({', '.join(map(repr, self._output_names))}); name one with output=..."
                )
            src = outputs[0]
        elif output in self._output_names:
            src = outputs[self._output_names.index(output)]
        else:
            raise ValueError(
                f"Graph.jacobians: no output named {output!r}; the outputs are "
                f"{', '.join(map(repr, self._output_names))}"
            )
        B = self._batch_size()
        dtype = self._dtypes[src]
        M = self._entries(src)
        wanted = [n.name for i, n in enumerate(self._nodes) if n.kind == "input" and self._needs[i]]
        entries = {n: self._entries((self._names[n], 0)) for n in wanted}
        params = self.parameters()
        if order == "auto":
            n_total = sum(entries.values()) + sum(p.size for p in params)
            order = "reverse" if M <= n_total else "forward"
        cache: dict[int, tuple[Any, dict[str, Jacobian]]] = {}
        if order == "reverse":
            ins, by_param = self._reverse_jacobians({src: Identity(M, B, dtype)}, cache)
        else:
            ins, by_param = {}, {}
            port = self._outputs.index(src) if self._outputs else 0
            for name in wanted:
                seed: dict[str, Jacobian] = {
                    name: Identity(entries[name], B, self._dtypes[(self._names[name], 0)])
                }
                J = self._forward_jacobians(seed, None, cache)[port]
                if J is not None:
                    ins[name] = J
            for p in params:
                J = self._forward_jacobians({}, p, cache)[port]
                if J is not None:
                    by_param[p] = J

        def zero(n: int) -> Jacobian:
            return Dense(np.zeros((M, n), dtype), "0 (no path)", batch=B)

        inputs = {n: ins[n] if n in ins else zero(entries[n]) for n in wanted}
        return inputs, {p: by_param[p] if p in by_param else zero(p.size) for p in params}

    def _entries(self, src: tuple[int, int]) -> int:
        """Entries of one example of value ``src`` (all of it when it has no batch axis)."""
        shape = self._shapes[src]
        if not shape:
            return 1
        if _reduces_batch(self._nodes[src[0]].layer, src[1]):
            return int(np.prod(shape, dtype=np.int64))
        return int(np.prod(shape[1:], dtype=np.int64))

    def _reverse_jacobians(
        self,
        seeds: dict[tuple[int, int], Jacobian],
        cache: dict[int, tuple[Any, dict[str, Jacobian]]],
    ) -> tuple[dict[str, Jacobian], dict[Parameter, Jacobian]]:
        """The backward pass with ``∂out/∂(value)`` in place of ``g``: suffix products."""
        S: dict[tuple[int, int], Jacobian] = dict(seeds)
        ins: dict[str, Jacobian] = {}
        by_param: dict[Parameter, Jacobian] = {}
        for i in reversed(self._order):
            node = self._nodes[i]
            if not self._needs[i]:
                continue
            if node.kind == "input":
                if (i, 0) in S:
                    ins[node.name] = S.pop((i, 0))
                continue
            outs = [S.pop((i, k), None) for k in range(node.n_out)]
            if all(o is None for o in outs):
                continue
            need_in = [self._needs[j] for j, _ in node.inputs]
            back = _node_jacobians_back(node.layer, outs, need_in, by_param, cache)
            for src, J in zip(node.inputs, back, strict=True):
                if J is not None:
                    S[src] = J  # one consumer per value (fan-out goes through a Branch)
        return ins, by_param

    def _forward_jacobians(
        self,
        given: dict[str, Jacobian],
        target: Parameter | None,
        cache: dict[int, tuple[Any, dict[str, Jacobian]]],
    ) -> list[Jacobian | None]:
        """One forward sweep: ``∂(value)/∂z`` for ``z`` an input (``given``) or ``target``."""
        P: dict[tuple[int, int], Jacobian] = {}
        for i in self._order:
            node = self._nodes[i]
            if node.kind == "input":
                if node.name in given:
                    P[(i, 0)] = given[node.name]
                continue
            ins = [P.pop(src, None) for src in node.inputs]
            outs = _node_jacobians_forward(node.layer, ins, target, cache)
            for k, J in enumerate(outs):
                if J is not None:
                    P[(i, k)] = J
        return [P.get(src) for src in cast(list, self._outputs)]

    def _batch_size(self) -> int:
        """``B`` of the last forward: the batch axis of the first input (or value)."""
        for i in self._order:
            shape = self._shapes.get((i, 0))
            if self._nodes[i].kind == "input" and shape:
                return shape[0]
        return next(s[0] for s in self._shapes.values() if s)

    def _seeds(self, seed: Any) -> list[np.ndarray | None]:
        outputs = cast(list, self._outputs)
        names = self._output_names
        n = len(outputs)
        if n == 1 and isinstance(seed, tuple) and len(seed) == 1:
            seed = seed[0]
        if seed is None:
            entries: list[Any] = [None] * n
            present = [True] * n
        elif isinstance(seed, Mapping):
            unknown = [k for k in seed if k not in names]
            if unknown:
                raise ValueError(
                    f"Graph.backward: seed for unknown output(s) {', '.join(map(repr, unknown))}; "
                    f"the outputs are {', '.join(map(repr, names))}"
                )
            entries = [seed.get(k) for k in names]
            present = [k in seed for k in names]
        elif n > 1:
            if not isinstance(seed, tuple | list) or len(seed) != n:
                raise TypeError(
                    f"Graph.backward: the graph has {n} outputs ({', '.join(map(repr, names))}); "
                    f"give one seed per output as a tuple/list, or a dict by output name"
                )
            entries, present = list(seed), [True] * n
        else:
            entries, present = [seed], [True]
        seeds: list[np.ndarray | None] = []
        for name, src, s, here in zip(names, outputs, entries, present, strict=True):
            shape, dtype = self._shapes[src], self._dtypes[src]
            if not here:
                seeds.append(None)
                continue
            if s is None:
                if shape != ():
                    raise ValueError(
                        f"Graph.backward: output {name!r} has shape {shape}, not a scalar cost; "
                        f"pass seed = dJ/d({name}) of that shape (e.g. np.ones({shape}))"
                    )
                seeds.append(np.ones((), dtype))
                continue
            if not isinstance(s, np.ndarray):
                s = np.asarray(s, dtype=dtype)
            s = check_float(f"Graph.backward: seed for output {name!r}", "the seed", s, dtype)
            s = s.copy()  # the caller may change their array; the gradients must not follow
            if s.shape != shape:
                raise ValueError(
                    f"Graph.backward: the seed for output {name!r} has shape {s.shape}, but the "
                    f"output has shape {shape}; the seed is dJ/d({name}), of the output's shape"
                )
            seeds.append(s)
        return seeds

    # -- state: snapshots for a failed forward, tokens for a stale backward --------------
    @staticmethod
    def _token(node: _Node) -> Any:
        layer = node.layer
        if isinstance(layer, Layer):
            return layer._op
        if isinstance(layer, Sequential):
            return tuple(leaf._op for leaf in layer.layers)
        if isinstance(layer, Graph):
            return layer._forward_id
        return None

    def _snapshot(self) -> tuple[Any, ...]:
        own = (self._state, self._shapes, self._dtypes, self._needs, self._tokens, self._forward_id)
        return own, [
            n.layer._snapshot() if isinstance(n.layer, Graph) else self._token(n)
            for n in self._nodes
        ]

    def _restore(self, snapshot: tuple[Any, ...]) -> None:
        own, per_node = snapshot
        (self._state, self._shapes, self._dtypes, self._needs, self._tokens, self._forward_id) = own
        for node, saved in zip(self._nodes, per_node, strict=True):
            layer = node.layer
            if isinstance(layer, Layer):
                layer._op = saved
            elif isinstance(layer, Sequential):
                for leaf, op in zip(layer.layers, saved, strict=True):
                    leaf._op = op
            elif isinstance(layer, Graph):
                layer._restore(saved)

    # -- introspection -----------------------------------------------------------------
    def input_names(self) -> list[str]:
        """The input names, in the order they were declared."""
        return [n.name for n in self._nodes if n.kind == "input"]

    def output_names(self) -> list[str]:
        """The outputs' names (``"node"`` or ``"node:k"``), in ``output()`` order."""
        return list(self._output_names)

    def nodes(self) -> list[NodeInfo]:
        """Every node (inputs, layers, automatic branches) in topological order."""
        order = self._order if self._outputs is not None else range(len(self._nodes))
        infos = []
        for i in order:
            node = self._nodes[i]
            shapes = tuple(self._shapes.get((i, k)) for k in range(node.n_out))
            infos.append(
                NodeInfo(
                    name=node.name,
                    kind=node.kind,
                    layer=node.layer,
                    inputs=tuple(self._port_name(src) for src in node.inputs),
                    shape=shapes[0],
                    params=tuple(self._param_names(node.layer)),
                    auto=node.auto,
                    n_outputs=node.n_out,
                    shapes=shapes,
                )
            )
        return infos

    def __getitem__(self, name: str) -> Any:
        """The layer of node ``name`` (None for an input)."""
        if name not in self._names:
            raise KeyError(f"Graph: no node named {name!r}")
        return self._nodes[self._names[name]].layer

    def __len__(self) -> int:
        return len(self._nodes)

    def named_parameters(self) -> dict[str, Parameter]:
        """``{"<node>.<param>": Parameter}``, each Parameter once (tied ones by first name)."""
        named: dict[str, Parameter] = {}
        seen: set[int] = set()
        for node in self._nodes:
            for pname, p in self._node_params(node.layer):
                if id(p) not in seen:
                    seen.add(id(p))
                    named[f"{node.name}.{pname}"] = p
        return named

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters().values())

    def summary(self) -> str:
        """A text table: node, layer, inputs, output shape, parameter count."""
        rows = [("node", "layer", "inputs", "output shape", "params")]
        for info in self.nodes():
            layer = "input" if info.layer is None else repr(info.layer).splitlines()[0]
            if info.auto:
                layer += " (auto)"
            count = sum(p.size for _, p in self._node_params(info.layer))
            shape = "-" if info.shape is None else str(info.shape)
            if info.n_outputs > 1 and info.shape is not None:
                shape = f"{info.n_outputs} × {shape}"
            rows.append((info.name, layer, ", ".join(info.inputs) or "-", shape, str(count)))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        total = sum(p.size for p in self.parameters())
        outs = ", ".join(self._output_names) or "(not declared)"
        lines.append(f"outputs: {outs}; {total} parameters")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        n_in = len(self.input_names())
        n_layers = len(self._nodes) - n_in
        n_out = len(self._output_names)
        return f"Graph({n_in} input(s), {n_layers} layer node(s), {n_out} output(s))"

    # -- helpers ------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._outputs is not None:
            raise RuntimeError(
                f"Graph.{what}: the outputs were already declared, which froze the graph; "
                f"build the whole graph before calling output(...)"
            )

    def _require_outputs(self, what: str) -> list[tuple[int, int]]:
        if self._outputs is None:
            raise RuntimeError(f"Graph.{what}: declare the outputs first with output(handle, ...)")
        return self._outputs

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

    @staticmethod
    def _node_params(layer: Any) -> list[tuple[str, Parameter]]:
        if isinstance(layer, Layer):
            return list(layer.params.items())
        if isinstance(layer, Sequential | Graph):
            return list(layer.named_parameters().items())
        return []

    def _param_names(self, layer: Any) -> list[str]:
        return [name for name, _ in self._node_params(layer)]

    def _has_params(self, node: _Node) -> bool:
        layer = node.layer
        if isinstance(layer, Layer):
            return bool(layer.params)
        return bool(self._node_params(layer))


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
