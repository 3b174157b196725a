"""Whole-model Jacobians: the per-layer structured Jacobians chained (eq. 14.2).

``∂out/∂input`` and ``∂out/∂θ`` of a graph at its cached operating point, in
one of two orders with the same result:

- ``"reverse"``: from the output side, like the backward pass. Each node gets
  the suffix ``∂out/∂(its output)``, computed once and shared by everything
  below it (the reuse of chapter 14.2); cost about ``M`` times the size of
  the graph for ``M`` output entries.
- ``"forward"``: from the input side, one sweep per input and Parameter, each
  carrying ``∂(value)/∂(that input)`` through the graph; cost about
  ``N_total`` times the size of the graph, the entries of all inputs and
  parameters together.
- ``"auto"`` picks ``"reverse"`` when ``M <= N_total`` (few outputs: a cost, a
  logit vector) and ``"forward"`` otherwise.

A layer with several outputs has ``L^x`` of its outputs stacked; output ``k``'s
part is ``Rows_k @ L^x``, the rows of that output (for a fan-out ``Branch``,
``L^x`` is ``[I; I; ...]`` and ``Rows_k @ L^x`` is ``I``: the paths add,
eq. 14.46).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from backprop.graph.run import InputsAndParams
from backprop.jacobian import Dense, Identity, Jacobian, Rows
from backprop.layer import Layer, Parameter

if TYPE_CHECKING:
    from backprop.graph.graph import Graph

__all__ = ["ORDERS", "Jacobians", "jacobians"]

ORDERS = ("auto", "reverse", "forward")

_Cache = dict[int, tuple[tuple[Any, ...], dict[str, Jacobian]]]


@dataclass(frozen=True)
class Jacobians(InputsAndParams):
    """What ``jacobians()`` returns, for any model.

    ``inputs[name]`` is ``∂out/∂(input)`` for every input that ``backward``
    gives a gradient, ``params[p]`` is ``∂out/∂θ`` for every Parameter; each is a
    structured ``backprop.jacobian`` object whose example ``b`` is ``(M, N)``,
    with ``M`` the entries of one example's output (1 for a scalar cost, whose
    per-example rows add up to the batch cost, eq. 14.11) and ``N`` those of one
    example's input, or ``|θ|``. Paths through a branch add (eq. 14.46); a tied
    Parameter gets the sum of its uses (eq. 14.47); an input or Parameter the
    output does not depend on gets a zero matrix.

    Like ``Gradients``, it unpacks as the pair ``(Jacobian of the first input,
    params)``: ``L_x, L_theta = net.jacobians()``.
    """

    inputs: dict[str, Jacobian]
    params: dict[Parameter, Jacobian]


def jacobians(graph: Graph, output: str | None, order: str) -> Jacobians:
    """``Graph.jacobians``: see the module docstring."""
    where = f"{graph._kind()}.jacobians"
    if order not in ORDERS:
        raise ValueError(f"{where}: order must be one of {ORDERS}, got {order!r}")
    src = _output_source(graph, output, where)
    B = graph.batch_size
    dtype = graph._dtype(src)
    M = _entries(graph, src)
    wanted = [n.name for i, n in enumerate(graph._nodes) if n.kind == "input" and graph._needs[i]]
    sizes = {n: _entries(graph, (graph._names[n], 0)) for n in wanted}
    params = graph._parameters
    if order == "auto":
        order = "reverse" if M <= sum(sizes.values()) + sum(p.size for p in params) else "forward"
    cache: _Cache = {}
    if order == "reverse":
        ins, by_param = reverse(graph, {src: Identity(M, B, dtype)}, cache)
    else:
        ins, by_param = {}, {}
        port = graph._outputs.index(src)
        for name in wanted:
            seed: dict[str, Jacobian] = {
                name: Identity(sizes[name], B, graph._dtype((graph._names[name], 0)))
            }
            J = forward(graph, seed, None, cache)[port]
            if J is not None:
                ins[name] = J
        for p in params:
            J = forward(graph, {}, p, cache)[port]
            if J is not None:
                by_param[p] = J

    def zero(n: int) -> Jacobian:
        return Dense(np.zeros((M, n), dtype), "0 (no path)", batch=B)

    return Jacobians(
        {n: ins[n] if n in ins else zero(sizes[n]) for n in wanted},
        {p: by_param[p] if p in by_param else zero(p.size) for p in params},
    )


def _output_source(graph: Graph, output: str | None, where: str) -> tuple[int, int]:
    names = graph._output_names
    if output is None:
        if len(names) != 1:
            raise ValueError(
                f"{where}: the model has {len(names)} outputs ({', '.join(map(repr, names))}); "
                f"name one with output=..."
            )
        return graph._outputs[0]
    if output not in names:
        raise ValueError(
            f"{where}: no output named {output!r}; the outputs are {', '.join(map(repr, names))}"
        )
    return graph._outputs[names.index(output)]


def _entries(graph: Graph, src: tuple[int, int]) -> int:
    """Entries of one example of value ``src`` (all of it when it has no batch axis)."""
    shape = graph._shape(src)
    if not shape:
        return 1
    if not graph._info(src[0]).batched[src[1]]:
        return int(np.prod(shape, dtype=np.int64))
    return int(np.prod(shape[1:], dtype=np.int64))


def _plus(a: Jacobian | None, b: Jacobian | None) -> Jacobian | None:
    return b if a is None else a if b is None else a + b


def _layer_jacobians(layer: Layer, cache: _Cache) -> tuple[tuple[Any, ...], dict[str, Jacobian]]:
    """``layer.jacobians()`` once per layer, with ``L_x`` always a tuple."""
    if id(layer) not in cache:
        # A layer that coupled the batch (BatchNorm in training mode) has one Jacobian
        # over the whole batch, which per-example chaining cannot take: refuse clearly.
        op = layer.operating_point("jacobians")
        if layer.couples_batch and op.saved.get("couples_batch") and op.x_in[0].shape[0] > 1:
            raise RuntimeError(
                f"{layer!r} mixed the examples of its batch of {op.x_in[0].shape[0]} (batch "
                f"statistics): its Jacobian is one matrix over the whole batch, and whole-model "
                f"Jacobians are chained per example; put the model in eval mode "
                f"(model.eval()), or look at the layer's own layer.jacobians()"
            )
        L_x, L_theta = layer.jacobians()
        cache[id(layer)] = (L_x if isinstance(L_x, tuple) else (L_x,), L_theta)
    return cache[id(layer)]


def output_rows(layer: Layer, L: Jacobian) -> list[Jacobian]:
    """``[Rows_k @ L]``: the part of a stacked ``L`` that belongs to each output ``k``.

    For a fan-out ``Branch`` (``L = [I; I; ...]``) each part is ``I`` itself.
    """
    op = layer.operating_point("jacobians")
    sizes = [int(x[0].size) for x in op.x_out]
    total, start, parts = sum(sizes), 0, []
    for n in sizes:
        parts.append(Rows(total, start, n, L.batch, L.dtype) @ L)
        start += n
    return parts


# -- reverse: suffixes ---------------------------------------------------------------------


def reverse(
    graph: Graph, seeds: dict[tuple[int, int], Jacobian], cache: _Cache
) -> tuple[dict[str, Jacobian], dict[Parameter, Jacobian]]:
    """The backward pass with ``∂out/∂(value)`` in place of ``g``: suffix products."""
    S: dict[tuple[int, int], Jacobian] = dict(seeds)
    ins: dict[str, Jacobian] = {}
    by_param: dict[Parameter, Jacobian] = {}
    for i in reversed(graph._order):
        node = graph._nodes[i]
        if not graph._needs[i]:
            continue
        if node.kind == "input":
            if (i, 0) in S:
                ins[node.name] = S.pop((i, 0))
            continue
        outs = [S.pop((i, k), None) for k in range(node.n_out)]
        if all(o is None for o in outs):
            continue
        need_in = [graph._needs[j] for j, _ in node.inputs]
        if isinstance(node.layer, Layer):
            back = _layer_back(node.layer, outs, need_in, by_param, cache)
        else:
            inner: Graph = node.layer
            pairs = zip(inner._outputs, outs, strict=True)
            inner_ins, inner_params = reverse(
                inner, {src: J for src, J in pairs if J is not None}, cache
            )
            for p, J_p in inner_params.items():
                by_param[p] = _plus(by_param.get(p), J_p)  # type: ignore[assignment]
            back = [inner_ins.get(n) for n in inner.input_names()]
        for src, J_in in zip(node.inputs, back, strict=True):
            if J_in is not None:
                S[src] = J_in  # one consumer per value (fan-out goes through a Branch)
    return ins, by_param


def _layer_back(
    layer: Layer,
    outs: list[Jacobian | None],
    need_in: list[bool],
    by_param: dict[Parameter, Jacobian],
    cache: _Cache,
) -> list[Jacobian | None]:
    """Suffixes ``∂out/∂x_in`` of one layer from those of its outputs; adds ``∂out/∂θ``."""
    L_xs, L_theta = _layer_jacobians(layer, cache)

    def pull(L: Jacobian) -> Jacobian | None:
        """``Σ_k S_k @ (Rows_k @ L)``: just ``S @ L`` for a layer with one output."""
        if layer.n_outputs == 1:
            return outs[0] @ L  # type: ignore[operator]
        total = None
        for S_k, part in zip(outs, output_rows(layer, L), strict=True):
            if S_k is not None:
                total = _plus(total, S_k @ part)
        return total

    for name, L in L_theta.items():
        p = layer.params[name]
        by_param[p] = _plus(by_param.get(p), pull(L))  # type: ignore[assignment]
    return [
        pull(L) if (L is not None and need) else None for L, need in zip(L_xs, need_in, strict=True)
    ]


# -- forward: prefixes ---------------------------------------------------------------------


def forward(
    graph: Graph, given: dict[str, Jacobian], target: Parameter | None, cache: _Cache
) -> list[Jacobian | None]:
    """One forward sweep: ``∂(value)/∂z`` for ``z`` an input (``given``) or ``target``."""
    P: dict[tuple[int, int], Jacobian] = {}
    for i in graph._order:
        node = graph._nodes[i]
        if node.kind == "input":
            if node.name in given:
                P[(i, 0)] = given[node.name]
            continue
        ins = [P.pop(src, None) for src in node.inputs]
        if isinstance(node.layer, Layer):
            outs = _layer_forward(node.layer, ins, target, cache)
        else:
            inner: Graph = node.layer
            names = inner.input_names()
            outs = forward(
                inner,
                {n: J for n, J in zip(names, ins, strict=True) if J is not None},
                target,
                cache,
            )
        for k, J in enumerate(outs):
            if J is not None:
                P[(i, k)] = J
    return [P.get(src) for src in graph._outputs]


def _layer_forward(
    layer: Layer, ins: list[Jacobian | None], target: Parameter | None, cache: _Cache
) -> list[Jacobian | None]:
    """Prefixes ``∂x_out/∂z`` of one layer from those of its inputs (and ``target = z``)."""
    uses = [name for name, p in layer.params.items() if p is target]
    if all(P is None for P in ins) and not uses:
        return [None] * layer.n_outputs
    L_xs, L_theta = _layer_jacobians(layer, cache)
    terms: list[tuple[Jacobian, Jacobian | None]] = [
        (L, P) for L, P in zip(L_xs, ins, strict=True) if L is not None and P is not None
    ]
    terms += [(L_theta[name], None) for name in uses]
    outs: list[Jacobian | None] = [None] * layer.n_outputs
    for L, P in terms:
        # A layer with several outputs: each output's rows of the stacked Jacobian.
        parts = [L] if layer.n_outputs == 1 else output_rows(layer, L)
        for k, part in enumerate(parts):
            outs[k] = _plus(outs[k], part if P is None else part @ P)
    return outs
