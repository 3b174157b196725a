"""Curvature: Hessian products, the generalized Gauss–Newton, their spectra.

Chapter 14.6.5: the backward pass is itself a network, linear in its seed, whose
weights (``Wᵀ``) and gates (``h'(x_in)``) are set by the forward network (a
hypernetwork). ``bp.backward_graph`` builds it with those numbers frozen, so
differentiating it again gives nothing new. Curvature is what the frozen picture
leaves out: how the backward network's weights and gates move when the parameters
(or the inputs) move. Differentiating the whole forward-backward network along a
direction ``v`` gives ``H v``.

Two ways to do that. *Reverse over reverse* builds the forward-backward network with
its dependence on ``x`` and ``θ`` kept (every backward layer becomes a layer with a
second input, the activation or weight that sets its gate) and backpropagates
through all of it: a forward pass and a backward pass over a network twice the size
of the forward one, built anew at every point. *Forward over reverse* pushes a
tangent through the same network once, forwards: the forward pass carries
``ẋ = L^x ẋ + L^θ θ̇`` and each step of the backward pass carries
``ġ_in = ġ_out L^x + g_out L̇^x``, where the second term is the layer's one new piece,
the Hessian of ``<g_out, f(x_in, θ)>`` times the tangent (``_hvp``: ``g h''(x) ẋ``
for a pointwise layer, ``g_out Ẇ`` and ``g_outᵀ ẋ`` for a linear one, ``H_loss ż``
for a loss).

This package takes forward over reverse, for clarity first: each layer states its
second derivative once, in closed form, next to its backward pass, and the backward
pass itself is reused unchanged (it is linear in ``g``, so ``backward(ġ_out)`` is the
first term); no second set of layers is needed. And for speed: the forward and
backward passes at a point are done once and shared by every product there (an
eigensolver asks for dozens), and a product then costs one tangent pass forward and
the backward pass once more with the layers' terms added. ``benchmarks/``
(``--cases curvature``) times a product against a gradient, against ``torch.func``'s
``jvp(grad(f))`` and against torch's own reverse over reverse; the README reports it.

Modules: ``walk`` (a model as a flat list of layer steps, through its public
interface: a nested graph, or a layer that runs one such as attention, becomes the
steps of its layers), ``point`` (one operating point, the two walks), ``products`` (``hvp``,
``hessian``, ``ggn_vp``, ``ggn``), ``blocks`` (exact per-layer GGN blocks),
``spectrum`` (``hessian_eigs``, ``hessian_trace``, ``hessian_spectrum``) and
``layer`` (the hooks of one layer, checked).
"""

from backprop.curvature.blocks import ggn_blocks, loss_hessian
from backprop.curvature.layer import layer_hvp, layer_tangent
from backprop.curvature.point import Point, Space
from backprop.curvature.products import ggn, ggn_vp, hessian, hvp
from backprop.curvature.spectrum import (
    Eigen,
    Spectrum,
    TraceEstimate,
    hessian_eigs,
    hessian_spectrum,
    hessian_trace,
)

__all__ = [
    "Eigen",
    "Point",
    "Space",
    "Spectrum",
    "TraceEstimate",
    "ggn",
    "ggn_blocks",
    "ggn_vp",
    "hessian",
    "hessian_eigs",
    "hessian_spectrum",
    "hessian_trace",
    "hvp",
    "layer_hvp",
    "layer_tangent",
    "loss_hessian",
]
