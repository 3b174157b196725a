"""``gradcheck``: the three-way check of a model, a ``Layer`` or a ``Graph``."""

from __future__ import annotations

from typing import Any

from backprop.check.compare import GradcheckReport
from backprop.check.graph import gradcheck_graph
from backprop.check.layer import check_layer
from backprop.check.second import Settings, check_graph_second, check_layer_second
from backprop.curvature.point import feed
from backprop.graph import Graph
from backprop.layer import Layer

__all__ = ["gradcheck"]


def gradcheck(
    model: Any,
    *inputs: Any,
    g_out: Any = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    rng: Any = None,
    mode: str = "auto",
    directions: int = 3,
    order: int = 1,
    seed: Any = None,
    **named_inputs: Any,
) -> GradcheckReport:
    """The three-way check of a layer or a network at ``inputs``.

    "Write the analytic gradient and validate it using the numerical gradient":
    three computations of the same numbers must agree,

    1. the fast path, ``backward(g_out)``;
    2. the explicit Jacobians, ``g_out · jacobians()``;
    3. float64 central differences, ``(f(x + h_j e_j) - f(x - h_j e_j)) / 2h_j``
       with a step ``h_j = ε·max(1, |x_j|)`` that follows the size of each entry;

    and the Jacobian objects' forward products ``L u`` (``jvp``) must pass the
    dot-product test ``<v, L u> = <v L, u>`` against the backward pass. Any
    disagreement raises ``GradcheckError`` (an ``AssertionError``) with the two
    computations side by side, labelled by what they are, at the worst entries.

    ``model`` is a ``Layer`` (inputs positionally; integer inputs (labels) and
    boolean inputs (masks) are data and get no gradient; a layer with several
    outputs, such as ``Branch``, gets one ``g_out`` per output, and its Jacobian
    is that of the outputs stacked per example) or a ``Graph`` (a ``Sequential``
    is one), with its inputs by name, ``gradcheck(graph, x=X, y=Y)``,
    positionally in declaration order
    (a chain's ``x``, then its targets), or ``gradcheck(graph, {"x": X})`` when
    an input's name is one of this function's keywords. See ``gradcheck_graph``
    for what is compared for a Graph. Everything must be float64: finite
    differences in float32 are too coarse to prove anything.

    ``mode``: ``"entries"`` compares every entry of every Jacobian (the batch
    Jacobians made dense, each input entry differenced); ``"directions"``
    densifies nothing and compares the products along ``directions`` random
    directions of each input and parameter; ``"auto"`` checks entry by entry
    when every batch Jacobian has at most 2·10^5 entries and every input and
    parameter at most 2,000 (``backprop.check.modes``). The report names the
    mode.

    ``g_out`` defaults to a random array (drawn with ``rng``, a seed or a
    ``numpy.random.Generator``, 0 by default; ``seed`` is its old name) of the output's
    shape, or a tuple of them for several outputs (for a Graph: the seeds, in
    any form ``Graph.backward`` takes). ``eps`` is the relative finite-difference
    step; ``rtol`` and ``atol`` are relative to the entry and to the largest
    entry compared (``backprop.check.compare`` states the rule and the rounding
    noise it allows; ``backprop.check.looks`` the entries it excludes at a
    kink). Returns a ``GradcheckReport``; raises ``GradcheckError`` on any
    disagreement. The model is left at its operating point at ``inputs``.

    ``order=2`` checks second derivatives instead, as PyTorch's ``gradgradcheck``:
    the Hessian products of ``backprop.curvature`` against central differences of
    the gradient (for a layer, of ``backward(g_out)`` in its inputs and parameters),
    along random directions or entry by entry as ``mode`` says, plus their symmetry
    and, for a layer, its forward tangent (``backprop.check.second``). A model must
    end in a loss (a scalar cost).
    """
    if rng is not None and seed is not None:
        raise TypeError("gradcheck: give rng= (or its old name seed=), not both")
    rng = seed if rng is None else rng
    options: dict[str, Any] = dict(
        eps=eps, rtol=rtol, atol=atol, seed=0 if rng is None else rng, mode=mode,
        directions=directions,
    )  # fmt: skip
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"gradcheck: order must be 1 or 2, got {order!r}")
    if isinstance(model, Graph):
        given = feed("gradcheck", model, inputs, named_inputs)
        if order == 2:
            if g_out is not None:
                raise TypeError("gradcheck(order=2): a model's cost has no g_out to give")
            return check_graph_second(model, given, Settings(**options))
        return gradcheck_graph(model, given, seeds=g_out, **options)
    if not isinstance(model, Layer):
        raise TypeError(
            f"gradcheck: expected a Layer or a Graph (a Sequential is one), got "
            f"{type(model).__name__}"
        )
    if named_inputs:
        raise TypeError(
            f"gradcheck: unexpected keyword(s) {', '.join(map(repr, named_inputs))}; inputs "
            f"by name are for a Graph, a layer takes them positionally"
        )
    if order == 2:
        return check_layer_second(model, inputs, g_out, Settings(**options))
    return check_layer(model, inputs, g_out=g_out, **options)
