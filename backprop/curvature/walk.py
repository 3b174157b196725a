"""A model as one flat list of layer steps, read through its public interface.

The curvature products walk a model forward (tangents) and backward (gradients and
their tangents), over and over. A nested ``Graph`` is unrolled once here into the
steps of its layers, and every value gets one key (``"node"``, ``"outer/node:1"``),
so that the walks are plain loops. Only the public members of a model are read:
``nodes()``, ``input_names()``, ``output_values()``, ``parameters()`` and each layer's
``operating_point()``.

A layer's second-order hooks are looked up here too: ``tangent`` falls back on the
Jacobians' forward products for a layer without ``_tangent``, and ``hvp_of``
refuses a layer without ``_hvp``, by name.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backprop.graph import Graph
from backprop.layer import Layer, OperatingPoint, Parameter

__all__ = ["Flat", "Step", "flatten", "hvp_of", "layers", "tangent"]


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
_SKELETONS: weakref.WeakKeyDictionary[Graph, tuple[list[tuple], list[str]]] = (
    weakref.WeakKeyDictionary()
)


def _cached(model: Graph) -> tuple[list[tuple], list[str]]:
    skeleton = _SKELETONS.get(model)
    if skeleton is None:
        skeleton = _SKELETONS[model] = _skeleton(model)
    return skeleton


def layers(model: Graph) -> list[Layer]:
    """Every layer of ``model``, nested graphs unrolled, in a topological order."""
    return [row[1] for row in _cached(model)[0]]


def flatten(model: Graph) -> Flat:
    """The steps of ``model`` and of every graph nested in it, with their operating points."""
    rows, outputs = _cached(model)
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


def _skeleton(model: Graph) -> tuple[list[tuple], list[str]]:
    """``(name, layer, input keys, output keys)`` of every layer, and the output keys."""
    rows: list[tuple] = []
    alias: dict[str, str] = {}

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
            if isinstance(info.layer, Layer):
                outs = tuple(prefix + v for v in info.outputs)
                rows.append((prefix + info.name, info.layer, ins, outs))
                continue
            inner: Graph = info.layer
            bound_inner = dict(zip(inner.input_names(), ins, strict=True))
            inner_outs = walk(inner, f"{prefix}{info.name}/", bound_inner)
            for v, k in zip(info.outputs, inner_outs, strict=True):
                alias[prefix + v] = k
        return [key(v) for v in graph.output_values()]

    outputs = walk(model, "", {})
    return rows, outputs


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
