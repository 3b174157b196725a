"""The second-order check (``gradcheck(..., order=2)``): Hessian products against
finite differences of the gradient, as PyTorch's ``gradgradcheck``.

The gradient is a function of the point: of the parameters and inputs of a model,
``z ↦ ∇J(z)``; of the inputs and parameters of a layer, for a fixed ``g_out``,
``z ↦ backward(g_out)`` at ``z``. Its derivative along ``u`` is ``H u``, the
product that ``backprop.curvature`` computes forward over reverse. So:

1. ``H u`` against the central difference ``(∇(z + t u) − ∇(z − t u)) / 2t`` for
   a few random ``u`` (``mode="directions"``), or ``H e_j`` against the difference
   of every entry ``z_j`` (``mode="entries"``, the whole Hessian, when it is small:
   the rule of ``backprop.check.modes``);
2. symmetry: ``<u', H u> = <u, H u'>``, a check without finite differences;
3. for a layer, its forward tangent too (``_tangent``): against the difference of
   the output along ``u``, and the dot-product test ``<g_out, ẋ_out(u)> =
   <backward(g_out), u>``.

``z`` holds every float input and every parameter: the check covers the mixed
derivatives (how the input gradient moves with the weights) as well. The same rule
as the first-order check decides agreement (``backprop.check.compare``), and the
same second look spares a kink within the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from backprop.check.compare import (
    PRODUCT_NOISE,
    Checker,
    Comparison,
    GradcheckReport,
    require_float64,
    scalar_entry,
)
from backprop.check.differences import ULP, Differences, along
from backprop.check.layer import Outputs
from backprop.check.modes import choose_mode, random_direction
from backprop.curvature.layer import layer_hvp, layer_tangent
from backprop.curvature.point import Point, Space
from backprop.graph import Graph
from backprop.layer import Layer

__all__ = ["Settings", "check_graph_second", "check_layer_second"]


@dataclass
class _Problem:
    """What the check differentiates: the gradient as a function of the flat point ``z``."""

    name: str
    z: np.ndarray
    point: Space  # names the entries of z
    grads: Space  # names the entries of the gradient
    gradient: Callable[[np.ndarray], np.ndarray]  # z ↦ the flat gradient there
    hvp: Callable[[np.ndarray], np.ndarray]  # u ↦ H u at the point (flat)


def _run(p: _Problem, check: Checker, chosen: str, eps: float, us: list[np.ndarray]) -> None:
    """Hessian products against finite differences of the gradient, then symmetry.

    Every product is taken first, at the point itself: differencing moves it."""
    basis = list(np.eye(p.z.size)) if chosen == "entries" else us
    H = np.column_stack([p.hvp(u) for u in basis]) if basis else np.zeros((p.z.size, 0))
    u1, u2 = us[0], us[-1]
    Hu1, Hu2 = p.hvp(u1), p.hvp(u2)
    if chosen == "entries":
        fd = Differences(p.gradient, p.z, eps)

        def label(r: int, c: int) -> str:
            return f"∂{p.grads.label(r)}/∂{p.point.label(c)}"

    else:
        fd = along(p.gradient, p.z, us, eps)

        def label(r: int, c: int) -> str:
            return f"{p.grads.label(r)} along u_{c}"

    check.compare_fd(
        Comparison(
            "Hessian products vs finite differences of the gradient",
            ("H u", "numeric"),
            "H u from the tangent and second-order passes (analytic), numeric = central "
            "difference of the gradient along u",
            label,
        ),
        H,
        fd,
    )
    noise = PRODUCT_NOISE * ULP * (np.abs(u2) @ np.abs(Hu1) + np.abs(u1) @ np.abs(Hu2))
    check.compare(
        Comparison(
            "symmetry <u', H u> vs <u, H u'>",
            ("<u', H u>", "<u, H u'>"),
            "both from Hessian products (analytic), for two random directions",
            scalar_entry,
        ),
        float(u2 @ Hu1),
        float(u1 @ Hu2),
        noise=noise,
    )


@dataclass
class Settings:
    """``gradcheck``'s options: step, tolerances, seed, mode and number of directions."""

    eps: float
    rtol: float
    atol: float
    seed: int
    mode: str
    directions: int

    def start(self, name: str, z: np.ndarray) -> tuple[Checker, str, list[np.ndarray]]:
        """The checker, the mode chosen for ``z``, and the random directions."""
        chosen = choose_mode(f"gradcheck {name}", self.mode, self.directions, z.size, [z.size])
        rng = np.random.default_rng(self.seed)
        us = [random_direction(rng, z) for _ in range(max(self.directions, 2))]
        return Checker(name, self.rtol, self.atol, chosen), chosen, us


def check_graph_second(graph: Graph, feed: dict[str, Any], o: Settings) -> GradcheckReport:
    """The second-order check of a model whose outputs are scalar costs."""
    name = repr(graph).splitlines()[0].rstrip("(") + " (second order)"
    arrays = {k: np.asarray(v) for k, v in feed.items()}
    require_float64(name, arrays, graph.named_parameters(), "build the model")
    pt = Point(graph, feed, "both", "gradcheck(order=2)")
    params, space_p, space_x = pt.params, pt.param_space, pt.input_space
    keys, shapes = [*params, *space_x.keys], [*space_p.shapes, *space_x.shapes]
    both = Space(keys, shapes, [np.float64] * len(keys))
    z0 = np.concatenate([space_p.flat({p: p.value for p in params}), space_x.flat(arrays)])
    n_p = space_p.size

    def gradient(z: np.ndarray) -> np.ndarray:
        for p, v in space_p.unflat(z[:n_p]).items():
            p.value = v
        graph.forward({**arrays, **space_x.unflat(z[n_p:])})
        g = graph.backward()
        return np.concatenate([space_p.flat(g.params), space_x.flat(g.inputs)])

    def hvp(u: np.ndarray) -> np.ndarray:
        on_p, on_x = pt.product(space_p.unflat(u[:n_p]), space_x.unflat(u[n_p:]))
        return np.concatenate([space_p.flat(on_p), space_x.flat(on_x)])

    check, chosen, us = o.start(name, z0)
    try:
        _run(_Problem(name, z0, both, both, gradient, hvp), check, chosen, o.eps, us)
    finally:
        for p, v in space_p.unflat(z0[:n_p]).items():
            p.value = v
        graph.forward(arrays)
    return check.report


def check_layer_second(
    layer: Layer, inputs: tuple[Any, ...], g_out: Any, o: Settings
) -> GradcheckReport:
    """The second-order check of one layer, for ``g_out`` (random by default)."""
    name = f"{repr(layer).splitlines()[0]} (second order)"
    xs = [np.asarray(x) for x in inputs]
    require_float64(name, {str(i): x for i, x in enumerate(xs)}, layer.params, "build the layer")
    out = layer.forward(*xs)
    outs_ = out if isinstance(out, tuple | list) else [out]
    outs = Outputs(out, layer.reduces_batch or all(np.ndim(y) == 0 for y in outs_))
    v = outs.seed(g_out, np.random.default_rng(o.seed + 1), name)
    floats = [i for i, x in enumerate(xs) if x.dtype.kind == "f"]
    names = list(layer.params)
    space = Space(
        [layer.inputs[i] if i < len(layer.inputs) else f"x{i}" for i in floats] + names,
        [xs[i].shape for i in floats] + [layer.params[n].shape for n in names],
        [np.float64] * (len(floats) + len(names)),
    )
    keys = space.keys
    original = {n: layer.params[n].value for n in names}

    def place(z: np.ndarray) -> list[np.ndarray]:
        parts = space.unflat(z)
        for n in names:
            layer.params[n].value = parts[n]
        args = list(xs)
        for i, k in zip(floats, keys, strict=False):
            args[i] = parts[k]
        return args

    def pack(ins: Any, grads: dict[str, Any]) -> np.ndarray:
        ins = ins if isinstance(ins, tuple) else (ins,)
        mapping = {k: ins[i] for i, k in zip(floats, keys, strict=False)}
        mapping.update(grads)
        return space.flat({k: a for k, a in mapping.items() if a is not None})

    def gradient(z: np.ndarray) -> np.ndarray:
        layer.forward(*place(z))
        return pack(*layer.backward(v))

    def split(u: np.ndarray) -> tuple[list[Any], dict[str, np.ndarray]]:
        parts = space.unflat(u)
        dx: list[Any] = [None] * len(xs)
        for i, k in zip(floats, keys, strict=False):
            dx[i] = parts[k]
        return dx, {n: parts[n] for n in names}

    def hvp(u: np.ndarray) -> np.ndarray:
        return pack(*layer_hvp(layer, v, *split(u)))

    z0 = space.flat({**{k: xs[i] for i, k in zip(floats, keys, strict=False)}, **original})
    check, chosen, us = o.start(name, z0)
    try:
        _run(_Problem(name, z0, space, space, gradient, hvp), check, chosen, o.eps, us)
        place(z0)
        _tangents(layer, check, outs, v, place, z0, split, us, o.eps)
    finally:
        place(z0)
        layer.forward(*xs)
    return check.report


def _tangents(
    layer: Layer,
    check: Checker,
    outs: Any,
    v: Any,
    place: Callable[[np.ndarray], list[np.ndarray]],
    z0: np.ndarray,
    split: Callable[[np.ndarray], tuple[list[Any], dict[str, np.ndarray]]],
    us: list[np.ndarray],
    eps: float,
) -> None:
    """The layer's forward tangent: against differences of its output along ``u``, and
    the dot-product test ``<g_out, ẋ_out(u)> = <backward(g_out), u>``."""
    layer.forward(*place(z0))
    tangents = np.column_stack([outs.flatten(layer_tangent(layer, *split(u))) for u in us])
    g_in, grads = layer.backward(v)
    fd = along(lambda z: outs.flatten(layer.forward(*place(z))), z0, us, eps)
    check.compare_fd(
        Comparison(
            "forward tangent vs finite differences of the output",
            ("tangent", "numeric"),
            "tangent = the layer's _tangent (analytic), numeric = central difference of the "
            "output along u",
            lambda r, c: f"{outs.label(r)} along u_{c}",
        ),
        tangents,
        fd,
    )
    v_flat = outs.flatten(v)
    backward_u, tangent_u, size = [], [], []
    for k, u in enumerate(us):
        dx, dth = split(u)
        ins = g_in if isinstance(g_in, tuple) else (g_in,)
        terms = [np.vdot(g, d) for g, d in zip(ins, dx, strict=True) if d is not None]
        terms += [np.vdot(grads[n], d) for n, d in dth.items()]
        backward_u.append(float(sum(terms)))
        tangent_u.append(float(v_flat @ tangents[:, k]))
        size.append(float(np.abs(v_flat) @ np.abs(tangents[:, k])) + float(np.sum(np.abs(terms))))
    check.compare(
        Comparison(
            "dot-product test <g_out, tangent(u)> vs <backward(g_out), u>",
            ("<g, ẋ(u)>", "<g L, u>"),
            "both analytic: the forward tangent and the backward pass",
            lambda _r, c: f"along u_{c}",
        ),
        tangent_u,
        backward_u,
        noise=4 * PRODUCT_NOISE * ULP * np.array(size),
    )
