"""The three-way check of a whole ``Graph`` (a ``Sequential`` is one).

Only the model's public interface is used: ``input_names``, ``output_names``,
``output_values``, ``node``, ``batch_size``, ``seeds``, ``forward``,
``backward``, ``jacobians`` and ``named_parameters``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from backprop.check.compare import (
    PRODUCT_NOISE,
    Checker,
    Comparison,
    GradcheckError,
    GradcheckReport,
    entries,
    require_float64,
    scalar_entry,
)
from backprop.check.differences import ULP, Differences, along
from backprop.check.modes import along_entry, choose_mode, random_direction
from backprop.graph import Graph
from backprop.layer import Parameter

__all__ = ["gradcheck_graph"]


@dataclass
class _Target:
    """One input or Parameter: its value, its two backward gradients, and φ of it."""

    what: str  # "input 'x'", "parameter '0.W'"
    key: Any  # the input's name or the Parameter: how Gradients and Jacobians index it
    label: str  # how its entries are named
    z: np.ndarray
    fast: np.ndarray
    explicit: np.ndarray
    phi: Callable[[np.ndarray], float]  # φ as a function of z alone
    param: Parameter | None


class _Phi:
    """``φ = Σ_o <s_o, output_o>`` at the graph's inputs with some of them changed."""

    def __init__(self, graph: Graph, feed: dict[str, np.ndarray], seeds: dict[str, Any]) -> None:
        self.graph, self.feed, self.seeds = graph, feed, seeds
        self.names = graph.output_names()

    def __call__(self, **changed: np.ndarray) -> float:
        values = self.graph.forward({**self.feed, **changed}, cache=False)
        values = values if len(self.names) > 1 else (values,)
        return float(
            sum(
                np.vdot(self.seeds[n], np.asarray(v, np.float64))
                for n, v in zip(self.names, values, strict=True)
                if n in self.seeds
            )
        )


def gradcheck_graph(
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    seeds: Any = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    seed: Any = 0,
    mode: str = "auto",
    directions: int = 3,
) -> GradcheckReport:
    """The three-way check of a whole ``Graph`` at ``inputs`` (a dict by input name).

    With seeds ``s_o`` for the outputs (random, drawn with ``seed``, unless
    given in any form ``Graph.backward`` accepts), the checked function is the
    scalar ``φ = Σ_o <s_o, output_o>``, whose gradient is exactly what
    ``backward(seeds)`` returns. For every input that gets a gradient and every
    Parameter (a tied one is perturbed in all its uses at once, eq. 14.47), in
    ``mode="entries"``:

    1. the fast backward equals the explicit one (Algorithm 14.1 with sparse
       Jacobian matrices), entry by entry;
    2. both equal float64 central differences of ``φ`` (step
       ``h_j = eps·max(1, |x_j|)``; entries at a kink within the step are
       excluded and counted, as ``gradcheck`` explains);
    3. the directional derivative of ``φ`` along one random direction of all
       inputs and parameters together equals ``<gradient, direction>``; the
       direction's entry ``j`` is ``r_j·max(1, |z_j|)`` with ``r`` standard
       normal (a relative step again), and zero at the entries excluded in 2.
       Should the direction still cross a kink, the comparison is excluded and
       the report says so (every input was checked entry by entry already);
    4. the dot-product test with the whole-graph Jacobians
       (``Graph.jacobians``): for a random ``u`` per input and Parameter,
       ``Σ_o <s_o, L_o u>`` from their forward products (``jvp``) equals
       ``<s L, u>`` from the backward pass.

    In ``mode="directions"`` (see ``backprop.check.modes``), 1 is the same,
    and for ``directions`` random directions ``u`` (scaled like the steps) of
    each input and Parameter, ``<s L, u>`` from the fast backward and
    ``Σ_o <s_o, L_o u>`` from the whole-graph Jacobians equal each other and
    the central difference of ``t ↦ φ(z + t·u)``. ``mode="auto"`` picks by the
    sizes. The graph is left at its operating point at ``inputs``.
    """
    name = repr(graph).splitlines()[0].rstrip("(")  # "Sequential", or the Graph one-liner
    feed = {k: np.asarray(v) for k, v in inputs.items()}
    named = graph.named_parameters()
    require_float64(name, {repr(k): x for k, x in feed.items()}, named, "build the graph")
    rng = np.random.default_rng(seed)
    outs = graph.forward(feed)  # a bad input fails here, once, before any perturbation
    try:
        outs = outs if len(graph.output_names()) > 1 else (outs,)
        phi = _Phi(graph, feed, _seed_map(graph, outs, seeds, rng))
        targets = _targets(name, graph, feed, named, phi)
        out_size = sum(int(np.size(o)) for o in outs)
        sizes = [t.z.size for t in targets]
        chosen = choose_mode(f"gradcheck {name}", mode, directions, out_size, sizes)
        check = Checker(name, rtol, atol, chosen)
        scale = max((float(np.abs(t.fast).max(initial=0.0)) for t in targets), default=0.0)
        if chosen == "entries":
            _entries(check, phi, targets, eps, scale, rng)
        else:
            _directions(check, phi, targets, eps, scale, rng, directions)
    finally:
        graph.forward(feed)
    return check.report


def _seed_map(
    graph: Graph, outs: tuple[Any, ...], seeds: Any, rng: np.random.Generator
) -> dict[str, Any]:
    """``{output name: s_o}``: random seeds, or the given ones (an output may send none)."""
    if seeds is None:
        seed_list: list[Any] = [rng.standard_normal(np.shape(o)) for o in outs]
    else:
        seed_list = graph.seeds(seeds)
    return {n: s for n, s in zip(graph.output_names(), seed_list, strict=True) if s is not None}


def _targets(
    name: str,
    graph: Graph,
    feed: dict[str, np.ndarray],
    named: dict[str, Parameter],
    phi: _Phi,
) -> list[_Target]:
    """Every input that gets a gradient, then every Parameter, with both backward passes."""
    fast = graph.backward(phi.seeds)
    explicit = graph.backward(phi.seeds, mode="explicit")
    if set(fast.inputs) != set(explicit.inputs):
        raise GradcheckError(
            f"gradcheck {name}: fast and explicit modes give gradients for different inputs: "
            f"{sorted(fast.inputs)} vs {sorted(explicit.inputs)}"
        )
    targets = []
    for key, g in fast.inputs.items():

        def f_x(v: np.ndarray, key: str = key) -> float:
            return phi(**{key: v})

        what = f"input {key!r}"
        targets.append(_Target(what, key, key, feed[key], g, explicit.inputs[key], f_x, None))
    for pname, p in named.items():

        def f_p(value: np.ndarray, p: Parameter = p) -> float:
            p.value = value
            return phi()

        what = f"parameter {pname!r}"
        g, g_explicit = fast.params[p], explicit.params[p]
        targets.append(_Target(what, p, pname, p.value, g, g_explicit, f_p, p))
    for t in targets:
        if np.shape(t.fast) != t.z.shape:
            raise GradcheckError(
                f"gradcheck {name}: gradient for {t.what} has shape {np.shape(t.fast)}, "
                f"expected {t.z.shape}"
            )
    return targets


def _fast_vs_explicit(check: Checker, t: _Target, scale: float) -> None:
    """The two backward passes, entry by entry: no differences, so cheap at any size."""
    check.compare(
        Comparison(
            f"{t.what}: fast backward vs explicit Algorithm 14.1",
            ("fast", "explicit"),
            "fast = backward(seeds), explicit = backward(seeds, mode='explicit'): both analytic",
            entries(t.label, t.z.shape),
        ),
        t.fast,
        t.explicit,
        noise=PRODUCT_NOISE * ULP * scale,
    )


@contextmanager
def _restored(t: _Target) -> Iterator[None]:
    """Put ``t``'s Parameter back at its value afterwards."""
    try:
        yield
    finally:
        if t.param is not None:
            t.param.value = t.z


# -- entry by entry ---------------------------------------------------------------------


def _entries(
    check: Checker,
    phi: _Phi,
    targets: list[_Target],
    eps: float,
    scale: float,
    rng: np.random.Generator,
) -> None:
    """Items 1–4 of ``gradcheck_graph``'s list."""
    direction: list[np.ndarray] = []
    for t in targets:
        with _restored(t):
            mask = _three_way(check, t, eps, scale)
        direction.append(random_direction(rng, t.z, mask))
    if targets:
        _directional(check, phi, targets, direction, eps)
    phi.graph.forward(phi.feed)  # back to the operating point (φ ran without caching)
    us = {t.key: [rng.standard_normal(t.z.shape)] for t in targets}
    products = _jacobian_products(phi, targets, us)
    for t in targets:
        (v_L_u,), (size,) = products[t.key]
        gu = np.asarray(t.fast, np.float64) * us[t.key][0]
        check.compare(
            _dot_test(t.what, scalar_entry),
            float(np.sum(gu)),
            v_L_u,
            noise=4 * PRODUCT_NOISE * ULP * (float(np.sum(np.abs(gu))) + size),
        )


def _three_way(check: Checker, t: _Target, eps: float, scale: float) -> np.ndarray:
    """Fast path, explicit Algorithm 14.1 and finite differences of ``φ`` agree.

    ``scale`` is the largest gradient entry of the whole graph: the two backward
    passes round relative to the numbers that flow through them. Returns the
    entries of ``z`` excluded at a kink.
    """
    _fast_vs_explicit(check, t, scale)
    gradient = entries(t.label, t.z.shape)
    fd = Differences(t.phi, t.z, eps)
    mask = check.compare_fd(
        Comparison(
            f"{t.what}: fast backward vs finite differences",
            ("fast", "numeric"),
            "fast = backward(seeds) (analytic), numeric = central differences of φ",
            gradient,
        ),
        np.asarray(t.fast).reshape(1, -1),
        fd,
    )
    return check.compare_fd(
        Comparison(
            f"{t.what}: explicit Algorithm 14.1 vs finite differences",
            ("explicit", "numeric"),
            "explicit = backward(seeds, mode='explicit') (analytic), numeric = central "
            "differences of φ",
            gradient,
        ),
        np.asarray(t.explicit).reshape(1, -1),
        fd,
        excluded=mask,
    )


def _directional(
    check: Checker, phi: _Phi, targets: list[_Target], us: list[np.ndarray], eps: float
) -> None:
    """``<∇φ, d>`` against the central difference of ``t ↦ φ(z + t·d)`` at ``t = 0``.

    All inputs and parameters move at once; ``d`` already carries each entry's
    scale, so the step in ``t`` is ``eps``.
    """

    def at(t: np.ndarray) -> float:
        s = float(t.reshape(-1)[0])
        changed = {}
        for target, u in zip(targets, us, strict=True):
            if target.param is not None:
                target.param.value = target.z + s * u
            else:
                changed[target.key] = target.z + s * u
        return phi(**changed)

    def run() -> None:
        fd = Differences(at, np.zeros(1), eps)
        check.compare_fd(
            Comparison(
                "all inputs and parameters: directional derivative <∇φ, u>",
                ("<∇φ, u>", "numeric"),
                "<∇φ, u> from backward (analytic), numeric = central difference of φ along u",
                scalar_entry,
            ),
            np.array([[sum(float(np.vdot(t.fast, u)) for t, u in zip(targets, us, strict=True))]]),
            fd,
            required=False,
        )

    try:
        run()
    finally:
        for t in targets:
            if t.param is not None:
                t.param.value = t.z


# -- along directions ---------------------------------------------------------------------


def _directions(
    check: Checker,
    phi: _Phi,
    targets: list[_Target],
    eps: float,
    scale: float,
    rng: np.random.Generator,
    k: int,
) -> None:
    """Fast against explicit backward entry by entry, then along ``k`` directions each."""
    for t in targets:
        _fast_vs_explicit(check, t, scale)
    us = {t.key: [random_direction(rng, t.z) for _ in range(k)] for t in targets}
    products = _jacobian_products(phi, targets, us)  # before φ drops the operating point
    for t in targets:
        fast = np.array([[float(np.vdot(t.fast, u)) for u in us[t.key]]])
        explicit = np.array([products[t.key][0]])
        with _restored(t):
            _along(check, t, fast, explicit, us[t.key], eps)
        size = [float(np.sum(np.abs(t.fast * u))) for u in us[t.key]]
        noise = 4 * PRODUCT_NOISE * ULP * (np.array(size) + products[t.key][1])
        check.compare(_dot_test(t.what, along_entry), fast, explicit, noise=noise)


def _along(
    check: Checker,
    t: _Target,
    fast: np.ndarray,
    explicit: np.ndarray,
    us: list[np.ndarray],
    eps: float,
) -> None:
    """``<s L, u>`` (backward) and ``<s, L u>`` (graph Jacobians) against ``dφ(z + t·u)/dt``."""
    fd = along(t.phi, t.z, us, eps)
    mask = check.compare_fd(
        Comparison(
            f"{t.what}: fast backward vs finite differences along u",
            ("<s L, u>", "numeric"),
            "<s L, u> from backward(seeds) (analytic), numeric = central difference of "
            "φ(z + t·u) at t = 0",
            along_entry,
        ),
        fast,
        fd,
    )
    check.compare_fd(
        Comparison(
            f"{t.what}: graph Jacobians vs finite differences along u",
            ("<s, L u>", "numeric"),
            "<s, L u> from the forward products jvp of jacobians() (analytic), numeric = "
            "central difference of φ(z + t·u) at t = 0",
            along_entry,
        ),
        explicit,
        fd,
        excluded=mask,
    )


# -- the whole-graph Jacobians -------------------------------------------------------------


def _dot_test(what: str, entry: Callable[[int, int], str]) -> Comparison:
    return Comparison(
        f"{what}: dot-product test <s, L u> (graph Jacobians) vs <s L, u> (backward)",
        ("<s L, u>", "<s, L u>"),
        "<s L, u> from backward (analytic), <s, L u> from the graph Jacobians' forward "
        "products jvp (analytic)",
        entry,
    )


def _jacobian_products(
    phi: _Phi, targets: list[_Target], us: dict[Any, list[np.ndarray]]
) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """``Σ_o <s_o, L_o u>`` through the whole-graph Jacobians, for each target's ``u``s.

    Returns ``{key: (products, Σ|terms|)}``, one entry per direction. Per example
    the Jacobians map one example's input (or all of ``θ``) to one example's
    output; an output without a batch axis (a cost) is the sum of the
    examples' rows, so its seed multiplies every row.
    """
    graph = phi.graph
    B = graph.batch_size
    out = {t.key: (np.zeros(len(us[t.key])), np.zeros(len(us[t.key]))) for t in targets}
    for name, value in zip(graph.output_names(), graph.output_values(), strict=True):
        if name not in phi.seeds:
            continue
        s = np.asarray(phi.seeds[name], dtype=np.float64)
        jac = graph.jacobians(name)
        info = graph.node(value)
        if s.ndim == 0 or not info.batched[info.outputs.index(value)]:
            v = np.broadcast_to(s.reshape(1, -1), (B, s.size))
        else:
            v = s.reshape(B, -1)
        for t in targets:
            L = jac.params[t.key] if t.param is not None else jac.inputs[t.key]
            for k, u in enumerate(us[t.key]):
                if t.param is not None:
                    rows = np.broadcast_to(u.reshape(1, -1), (B, u.size))
                else:
                    rows = u.reshape(B, -1)
                terms = v * L.jvp(np.ascontiguousarray(rows))
                out[t.key][0][k] += float(np.sum(terms))
                out[t.key][1][k] += float(np.sum(np.abs(terms)))
    return out
