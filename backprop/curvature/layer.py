"""One layer's second-order hooks, called with checked arguments and complete results.

``layer_tangent(layer, dx_in, dtheta)`` and ``layer_hvp(layer, g_out, dx_in,
dtheta)`` run a layer's ``_tangent`` and ``_hvp`` at the operating point of its last
``forward``. Unlike the hooks, they take every tangent in full (None for an input
that does not move, a parameter left out of ``dtheta`` for one that does not) and
return every result in full: zeros where the hook said None. ``gradcheck(layer,
..., order=2)`` checks them against finite differences of ``backward``.

A layer that runs an inner graph (``Layer.inner_graph``) has no hooks of its own: its
tangent is the forward walk of tangents through the inner graph (``push``), and its
Hessian product a ``Point`` of the inner graph seeded with ``g_out``, along the
tangents of the inner inputs and of the layer's Parameters at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backprop.curvature.point import Point
from backprop.curvature.walk import flatten, hvp_of, push, tangent
from backprop.graph import Graph
from backprop.layer import Layer

__all__ = ["layer_hvp", "layer_tangent"]


def _checked(
    layer: Layer, dx_in: Sequence[Any], dtheta: Mapping[str, Any] | None, where: str
) -> tuple[tuple[Any, ...], dict[str, np.ndarray]]:
    op = layer.operating_point(where)
    if len(dx_in) != len(op.x_in):
        raise ValueError(
            f"{where}: {layer!r} takes {len(op.x_in)} input(s), got {len(dx_in)} tangents"
        )
    dx: list[Any] = []
    for k, (d, x) in enumerate(zip(dx_in, op.x_in, strict=True)):
        if d is None:
            dx.append(None)
            continue
        d = np.asarray(d)
        if x.dtype.kind != "f" or d.shape != x.shape:
            raise ValueError(
                f"{where}: the tangent of input {k} of {layer!r} has shape {d.shape}; the input "
                f"has shape {x.shape} and dtype {x.dtype} (integer labels take no tangent: None)"
            )
        dx.append(d.astype(x.dtype, copy=False))
    dth = {}
    for name, d in (dtheta or {}).items():
        if name not in layer.params:
            raise ValueError(f"{where}: {layer!r} has no parameter {name!r}")
        p, d = layer.params[name], np.asarray(d)
        if d.shape != p.shape:
            raise ValueError(
                f"{where}: the tangent of parameter {name!r} of {layer!r} has shape {d.shape}, "
                f"expected {p.shape}"
            )
        dth[name] = d.astype(p.dtype, copy=False)
    return tuple(dx), dth


def layer_tangent(
    layer: Layer, dx_in: Sequence[Any], dtheta: Mapping[str, Any] | None = None
) -> Any:
    """``ẋ_out = L^x ẋ_in + Σ L^θ θ̇`` at the layer's operating point, in ``x_out``'s
    shape (a tuple for several outputs); zeros when nothing moves."""
    dx, dth = _checked(layer, dx_in, dtheta, "layer_tangent")
    op = layer.operating_point("layer_tangent")
    inner = layer.inner_graph("layer_tangent")
    out = tangent(layer, op, dx, dth) if inner is None else _inner_tangent(layer, inner, dx, dth)
    if out is None:
        x_out = op.x_out
        if isinstance(x_out, tuple):
            return tuple(np.zeros_like(x) for x in x_out)
        return np.zeros_like(x_out)
    return out


def layer_hvp(
    layer: Layer, g_out: Any, dx_in: Sequence[Any], dtheta: Mapping[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, np.ndarray]]:
    """``H (ẋ_in, θ̇)`` for the Hessian ``H`` of ``<g_out, f(x_in, θ)>`` at the layer's
    operating point: ``(h_in, h_theta)``, one array per input (None for integer
    labels) and one per parameter, in their shapes (zeros where nothing moves).

    ``g_out`` has ``x_out``'s shape (a tuple for several outputs; a scalar for a loss).
    A layer without a second-order hook is refused, by name.
    """
    dx, dth = _checked(layer, dx_in, dtheta, "layer_hvp")
    op = layer.operating_point("layer_hvp")
    inner = layer.inner_graph("layer_hvp")
    hvp = hvp_of(layer, "layer_hvp") if inner is None else None
    if isinstance(g_out, tuple | list):
        g: Any = tuple(np.asarray(x) for x in g_out)
    else:
        g = np.asarray(g_out)
    shapes = [np.shape(x) for x in op.x_out] if isinstance(op.x_out, tuple) else np.shape(op.x_out)
    given = [np.shape(x) for x in g] if isinstance(g, tuple) else np.shape(g)
    if given != shapes:
        raise ValueError(f"layer_hvp: g_out has shape {given}, but x_out of {layer!r} has {shapes}")
    second = None
    if any(d is not None for d in dx) or dth:
        second = hvp(op, g, dx, dth, True) if hvp is not None else _inner_hvp(layer, g, dx, dth)
    h_in, h_theta = second if second is not None else ((None,) * len(dx), {})
    ins = tuple(
        None if x.dtype.kind != "f" else (np.zeros_like(x) if h is None else h)
        for h, x in zip(h_in, op.x_in, strict=True)
    )
    params = {
        name: np.asarray(h_theta.get(name, np.zeros(p.shape, p.dtype))).reshape(p.shape)
        for name, p in layer.params.items()
    }
    return ins, params


def _inner_tangent(
    layer: Layer, inner: Graph, dx: tuple[Any, ...], dtheta: dict[str, np.ndarray]
) -> Any:
    """The output tangent of a layer that runs ``inner``: tangents pushed through it
    (zeros for an output none reaches; None if none is reached)."""
    flat = flatten(inner)
    T = {flat.inputs[n]: d for n, d in zip(inner.input_names(), dx, strict=False) if d is not None}
    push(flat.steps, T, {layer.params[name]: d for name, d in dtheta.items()})
    outs = [T.get(k) for k in flat.outputs]
    if all(t is None for t in outs):
        return None
    if len(outs) == 1:
        return outs[0]
    x_out = layer.operating_point("layer_tangent").x_out
    return tuple(np.zeros_like(x) if t is None else t for t, x in zip(outs, x_out, strict=True))


def _inner_hvp(
    layer: Layer, g_out: Any, dx: tuple[Any, ...], dtheta: dict[str, np.ndarray]
) -> tuple[tuple[Any, ...], dict[str, np.ndarray]]:
    """``(h_in, h_theta)`` of a layer that runs an inner graph: the Hessian of ``<g_out,
    f>`` times the tangent, from a ``Point`` of the inner graph seeded with ``g_out``."""
    inner = layer.inner_graph("layer_hvp")
    seeds = list(g_out) if isinstance(g_out, tuple) else [g_out]
    pt = Point(inner, {}, "both", "layer_hvp", seeds=seeds)
    names = inner.input_names()[: len(dx)]
    by_input = {n: d for n, d in zip(names, dx, strict=True) if d is not None}
    on_params, on_inputs = pt.product(
        {layer.params[name]: d for name, d in dtheta.items()}, by_input
    )
    h_in = tuple(on_inputs.get(n) for n in names)
    return h_in, {name: on_params[p] for name, p in layer.params.items() if p in on_params}
