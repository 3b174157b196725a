"""One layer's second-order hooks, called with checked arguments and complete results.

``layer_tangent(layer, dx_in, dtheta)`` and ``layer_hvp(layer, g_out, dx_in,
dtheta)`` run a layer's ``_tangent`` and ``_hvp`` at the operating point of its last
``forward``. Unlike the hooks, they take every tangent in full (None for an input
that does not move, a parameter left out of ``dtheta`` for one that does not) and
return every result in full: zeros where the hook said None. ``gradcheck(layer,
..., order=2)`` checks them against finite differences of ``backward``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backprop.curvature.walk import hvp_of, tangent
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
    out = tangent(layer, op, dx, dth)
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
    hvp = hvp_of(layer, "layer_hvp")
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
        second = hvp(op, g, dx, dth, True)
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
