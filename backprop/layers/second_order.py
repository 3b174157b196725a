"""What the layers share for second order: the hooks of a layer linear in its inputs.

The curvature tools (``backprop.curvature``) differentiate the backward pass. For
that each layer gives two hooks at its operating point (see ``Layer``):

- ``_tangent(op, dx_in, dtheta)``: the forward tangent ``ẋ_out = L^x ẋ_in + Σ L^θ θ̇``,
  how the output moves when the inputs move along ``ẋ_in`` and the parameters along
  ``θ̇``;
- ``_hvp(op, g_out, dx_in, dtheta, input_grad)``: ``H (ẋ_in, θ̇)``, where ``H`` is the Hessian of
  the scalar ``<g_out, f(x_in, θ)>`` in ``(x_in, θ)``. The backward pass computes
  ``(g_in, dJ/dθ) = ∇<g_out, f>``; moving the operating point along the tangent
  moves them by ``H`` times it (the gates and weights of the backward network are
  functions of the forward pass, chapter 14.6.5). It returns ``(h_in, h_theta)``:
  one array (or None) per input and ``{name: array}`` in the parameters' shapes,
  summed over the batch; None for all zero. With ``input_grad`` False nobody wants
  ``h_in`` (no gradient flows to the inputs), as for ``_backward``.

Tangents, like gradients, have the shape of what they belong to; None (or a name left
out of ``dtheta``) stands for zero, so that a product skips what cannot move.

A layer whose output is linear in its inputs and that has no parameter (a reshape,
a merge, average pooling, the layers of the backward network) has ``f(ẋ)`` as its
tangent and no second-order term: ``_tangent = linear_tangent``, ``_hvp = linear_hvp``.
A layer that runs an inner graph of other layers (``Layer.inner_graph``, as
``MultiHeadAttention``) writes neither hook: the curvature tools go through its layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.layer import Layer, OperatingPoint

__all__ = ["linear_hvp", "linear_tangent", "total"]


def linear_tangent(
    layer: Layer, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: dict[str, np.ndarray]
) -> Any:
    """``f(ẋ_in)`` for a layer linear in its inputs: its forward pass on the tangents.

    An input without a tangent counts as zeros; with none at all the tangent is None.
    The forward pass runs on a scratch operating point, so the cached one is untouched.
    """
    if all(d is None for d in dx_in):
        return None
    dx = tuple(np.zeros_like(x) if d is None else d for d, x in zip(dx_in, op.x_in, strict=True))
    return layer._forward(OperatingPoint(dx, {}), *dx)


def linear_hvp(
    layer: Layer,
    op: OperatingPoint,
    g_out: Any,
    dx_in: tuple[Any, ...],
    dtheta: dict[str, np.ndarray],
    input_grad: bool,
) -> None:
    """No second-order term: ``<g_out, f>`` is linear in the inputs, its Hessian is zero."""
    return None


def total(*terms: Any) -> Any:
    """The sum of the terms that are not None (None if all are)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out
