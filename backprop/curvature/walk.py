"""A model as one flat list of layer steps, read through its public interface.

The curvature products walk a model forward (tangents) and backward (gradients and
their tangents), over and over. A nested ``Graph`` is unrolled once here into the
steps of its layers, and every value gets one key (``"node"``, ``"outer/node:1"``),
so that the walks are plain loops. A layer that runs an inner graph
(``Layer.inner_graph``, as ``MultiHeadAttention``) is unrolled the same way: its
second derivatives are those of its inner layers, composed by the same walks. Only
the public members of a model are read: ``nodes()``, ``input_names()``,
``output_values()``, ``parameters()``, each layer's ``operating_point()`` and
``inner_graph()``.

A layer's second-order hooks are looked up here too: ``tangent`` falls back on the
Jacobians' forward products for a layer without ``_tangent``, and ``hvp_of``
refuses a layer without ``_hvp``, by name. ``push`` is the forward walk of tangents.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backprop.graph import Graph
from backprop.layer import Layer, OperatingPoint, Parameter

__all__ = ["Flat", "Step", "flatten", "hvp_of", "layers", "push", "tangent"]


@dataclass
class Step:
    """One layer of the model: its node's path, the keys of the values it reads and
    gives, and its parameters by the layer's own names."""

    name: str
    layer: Layer
    ins: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[tuple[str, Parameter], ...]
    op: OperatingPoint = field(init=False, repr=False)


@dataclass
class Flat:
    """A model unrolled: its steps in a topological order, the keys of its inputs (by
    input name, with their shape and dtype at the last forward and whether they take
    a gradient) and of its outputs."""

    steps: list[Step]
    inputs: dict[str, str]
    input_info: dict[str, tuple[tuple[int, ...], np.dtype[Any], bool]]
    outputs: list[str]


#: A frozen model's structure does not change: its unrolled steps (without operating
#: points) are kept per model, so that each product at a new point reads it once.
_Skeleton = tuple[list[tuple], list[str], list[Layer]]
_SKELETONS: weakref.WeakKeyDictionary[Graph, _Skeleton] = weakref.WeakKeyDictionary()


def _cached(model: Graph) -> _Skeleton:
    skeleton = _SKELETONS.get(model)
    if skeleton is None:
        skeleton = _SKELETONS[model] = _skeleton(model)
    return skeleton


def layers(model: Graph) -> list[Layer]:
    """Every layer of ``model``, nested graphs unrolled, in a topological order."""
    return [row[1] for row in _cached(model)[0]]


def flatten(model: Graph) -> Flat:
    """The steps of ``model`` and of every graph nested in it, with their operating points."""
    rows, outputs, owners = _cached(model)
    for owner in owners:  # a layer that runs an inner graph: still at its own forward?
        owner.inner_graph("curvature")
    steps = []
    for name, layer, ins, outs in rows:
        step = Step(name, layer, ins, outs, tuple(layer.params.items()))
        step.op = layer.operating_point("curvature")
        steps.append(step)
    inputs, input_info = {}, {}
    for name in model.input_names():
        info = model.node(name)
        inputs[name] = name
        dtype = np.dtype(info.dtypes[0])
        takes = bool(info.requires_grad) and dtype.kind == "f"
        input_info[name] = (tuple(info.shape or ()), dtype, takes)
    return Flat(steps, inputs, input_info, outputs)


def _skeleton(model: Graph) -> _Skeleton:
    """``(name, layer, input keys, output keys)`` of every layer, the output keys, and the
    layers unrolled into their inner graphs."""
    rows: list[tuple] = []
    alias: dict[str, str] = {}
    owners: list[Layer] = []

    def resolve(key: str) -> str:
        while key in alias:
            key = alias[key]
        return key

    def walk(graph: Graph, prefix: str, bound: dict[str, str]) -> list[str]:
        def key(value: str) -> str:
            return resolve(bound.get(value, prefix + value))

        for info in graph.nodes():
            if info.kind == "input":
                continue
            ins = tuple(key(v) for v in info.inputs)
            layer = info.layer
            inner: Graph | None = layer.inner_graph() if isinstance(layer, Layer) else layer
            if inner is None:
                outs = tuple(prefix + v for v in info.outputs)
                rows.append((prefix + info.name, layer, ins, outs))
                continue
            if isinstance(layer, Layer):
                owners.append(layer)
            # The node's inputs bind the inner graph's first inputs; one beyond them (fed
            # by the layer itself, as attention's absent mask) is a value nothing moves.
            bound_inner = dict(zip(inner.input_names(), ins, strict=False))
            inner_outs = walk(inner, f"{prefix}{info.name}/", bound_inner)
            for v, k in zip(info.outputs, inner_outs, strict=True):
                alias[prefix + v] = k
        return [key(v) for v in graph.output_values()]

    outputs = walk(model, "", {})
    return rows, outputs, owners


def hvp_of(layer: Layer, where: str = "curvature") -> Callable[..., Any]:
    """The layer's ``_hvp``, or a ``NotImplementedError`` naming it if it has none."""
    if layer._hvp is None:
        raise NotImplementedError(
            f"{where}: {layer!r} has no second-order hook: {type(layer).__name__} defines no "
            f"_hvp(op, g_out, dx_in, dtheta), the Hessian of <g_out, f(x_in, θ)> times a "
            f"tangent, so the curvature through it is unknown (it is not taken as zero). "
            f"Write _hvp for it (see backprop.layers.second_order), or use the generalized "
            f"Gauss-Newton (bp.ggn_vp), which needs first derivatives only"
        )
    return layer._hvp


def push(
    steps: list[Step],
    T: dict[str, Any],
    by_param: Mapping[Parameter, np.ndarray],
    moves: Callable[[Step], bool] | None = None,
) -> dict[str, Any]:
    """The forward walk of tangents: ``T`` (tangents by value key, those of the inputs
    given) gets every step's output tangent, from its inputs' and its parameters'
    (``by_param``). Returns each step's ``(ẋ_in, θ̇)`` by step name; ``moves`` (all by
    default) says which steps a direction can reach at all."""
    seen: dict[str, Any] = {}
    for step in steps:
        if moves is not None and not moves(step):
            continue
        dx = tuple(T.get(k) for k in step.ins)
        dtheta = {name: by_param[p] for name, p in step.params if p in by_param}
        seen[step.name] = (dx, dtheta)
        if all(d is None for d in dx) and not dtheta:
            continue
        out = tangent(step.layer, step.op, dx, dtheta)
        if len(step.outs) == 1:
            T[step.outs[0]] = out
        elif out is not None:
            T.update(zip(step.outs, out, strict=True))
    return seen


def tangent(layer: Layer, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: dict) -> Any:
    """The forward tangent of ``layer``: its ``_tangent``, else the Jacobians' ``jvp``."""
    if layer._tangent is not None:
        return layer._tangent(op, dx_in, dtheta)
    return _jacobian_tangent(layer, op, dx_in, dtheta)


def _jacobian_tangent(
    layer: Layer, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: dict
) -> Any:
    """``L^x ẋ + Σ L^θ θ̇`` from the Jacobian objects, in the output's shape."""
    L_x, L_theta = layer.jacobians()
    L_xs = L_x if isinstance(L_x, tuple) else (L_x,)
    rows = None
    for L, u in zip(L_xs, dx_in, strict=True):
        if L is not None and u is not None:
            term = L.jvp(np.ascontiguousarray(u.reshape(L.batch, -1)))
            rows = term if rows is None else rows + term
    for name, u in dtheta.items():
        L = L_theta[name]
        term = L.jvp(np.ascontiguousarray(np.broadcast_to(u.reshape(1, -1), (L.batch, u.size))))
        rows = term if rows is None else rows + term
    if rows is None:
        return None
    x_out = op.x_out
    if isinstance(x_out, tuple):  # outputs stacked per example (eq. 14.45)
        parts, start = [], 0
        for x in x_out:
            n = int(x[0].size)
            parts.append(rows[:, start : start + n].reshape(x.shape))
            start += n
        return tuple(parts)
    if x_out.ndim == 0 or layer.reduces_batch:  # a sum over the examples
        return rows.sum(axis=0).reshape(x_out.shape)
    return rows.reshape(x_out.shape)
