"""Numerical Jacobians and the three-way gradient check.

"Write the analytic gradient and validate it using the numerical gradient":
``gradcheck`` evaluates a layer (or a network) at given inputs and demands that
three computations of the same numbers agree,

1. the fast path, ``backward(g_out)``;
2. the explicit Jacobians, ``g_out · jacobians()`` as dense matrices;
3. float64 central differences, ``(f(x + εe_i) - f(x - εe_i)) / 2ε``;

and that the explicit Jacobians equal the numerical ones entry by entry, plus
the dot-product test ``<v, L u> = <v L, u>`` between the forward product of the
Jacobian object and the backward pass. Any disagreement raises
``GradcheckError`` (an ``AssertionError``) with the analytic and numerical
values side by side at the worst entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from backprop.graph import Graph, _reduces_batch
from backprop.jacobian import Jacobian
from backprop.layer import Layer, Parameter

__all__ = [
    "GradcheckError",
    "GradcheckReport",
    "gradcheck",
    "gradcheck_graph",
    "numerical_jacobian",
]


class GradcheckError(AssertionError):
    """An analytic derivative disagrees with another computation of it."""


@dataclass
class GradcheckReport:
    """What a passing ``gradcheck`` compared, and the relative error of each comparison.

    Each error is normwise, ``max|analytic - numeric| / max|numeric|`` over the
    entries compared; ``worst`` is the largest of them. (Pass or fail is decided
    entry by entry, with ``rtol`` and ``atol``.)
    """

    name: str
    checks: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.checks.values(), default=0.0)

    def __str__(self) -> str:
        lines = [f"gradcheck {self.name}: {len(self.checks)} comparisons passed"]
        lines += [f"  {what:<60} rel. error {err:.2e}" for what, err in self.checks.items()]
        return "\n".join(lines)


def numerical_jacobian(
    f: Callable[[np.ndarray], Any], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """The Jacobian of ``f`` at ``x`` by float64 central differences.

    Returns an array of shape ``(f(x).size, x.size)``: row ``i`` is output entry
    ``i`` and column ``j`` is input entry ``j``, both in C order. ``x`` is not
    changed.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    flat = x.reshape(-1)
    columns = []
    for j in range(flat.size):
        orig = flat[j]
        flat[j] = orig + eps
        plus = np.array(f(x), dtype=np.float64).ravel()
        flat[j] = orig - eps
        minus = np.array(f(x), dtype=np.float64).ravel()
        flat[j] = orig
        columns.append((plus - minus) / (2 * eps))
    if not columns:
        return np.zeros((np.asarray(f(x)).size, 0))
    return np.stack(columns, axis=1)


# -- the model adapter: a Layer, or a network of them -----------------------------


def _parameters(model: Any) -> list[tuple[Any, Parameter]]:
    """``[(key, Parameter)]`` where ``key`` indexes the model's ``grads``."""
    if isinstance(model, Layer):
        return list(model.params.items())
    return [(p, p) for p in model.parameters()]


def _param_name(model: Any, key: Any, p: Parameter) -> str:
    if isinstance(key, str):
        return repr(key)
    names = {id(q): n for n, q in getattr(model, "named_parameters", dict)().items()}
    return repr(names.get(id(p), p.name or f"{p.shape}"))


def _name(model: Any) -> str:
    return repr(model).splitlines()[0] if isinstance(model, Layer) else type(model).__name__


def _full(D: np.ndarray, scalar_out: bool, param: bool) -> np.ndarray:
    """Per-example blocks ``D`` (B, M, N) as the Jacobian of the whole batch.

    A data input only moves its own example's outputs (block diagonal); a
    parameter moves every example (blocks stacked). When the output has no
    batch axis (the scalar cost, or a layer with ``reduces_batch``), the
    examples' rows add up (parameters) or sit side by side (data).
    """
    B, M, N = D.shape
    if param:
        return D.sum(axis=0) if scalar_out else D.reshape(B * M, N)
    if scalar_out:
        return D.transpose(1, 0, 2).reshape(M, B * N)
    full = np.zeros((B * M, B * N))
    for b in range(B):
        full[b * M : (b + 1) * M, b * N : (b + 1) * N] = D[b]
    return full


def _forward_out(model: Any, inputs: list[np.ndarray]) -> np.ndarray:
    return np.array(model.forward(*inputs), dtype=np.float64)


class _Checker:
    def __init__(self, name: str, rtol: float, atol: float) -> None:
        self.report = GradcheckReport(name)
        self.rtol, self.atol = rtol, atol

    def compare(self, what: str, analytic: Any, numeric: Any) -> None:
        a = np.asarray(analytic, dtype=np.float64).ravel()
        n = np.asarray(numeric, dtype=np.float64).ravel()
        if a.shape != n.shape:
            raise GradcheckError(
                f"gradcheck {self.report.name}: {what}: analytic has {a.size} entries, "
                f"numeric has {n.size}"
            )
        scale = max(1.0, float(np.abs(n).max(initial=0.0)))
        err = np.abs(a - n)
        allowed = self.atol * scale + self.rtol * np.abs(n)
        rel = err / (np.abs(n) + self.atol * scale)
        # The report keeps a normwise figure, max|a - n| / max|n|: entrywise
        # ratios blow up at entries that are zero up to rounding.
        largest = float(np.abs(n).max(initial=0.0))
        self.report.checks[what] = float(err.max(initial=0.0)) / max(largest, np.finfo(float).tiny)
        if not np.all(err <= allowed):  # also catches NaN
            worst = np.argsort(-np.nan_to_num(err / allowed, nan=np.inf))[:6]
            rows = [
                f"  {'entry':>8} {'analytic':>22} {'numeric':>22} {'abs err':>10} {'rel err':>10}"
            ]
            rows += [
                f"  {i:>8} {a[i]:>22.15g} {n[i]:>22.15g} {err[i]:>10.2e} {rel[i]:>10.2e}"
                for i in worst
            ]
            raise GradcheckError(
                f"gradcheck {self.report.name}: {what} disagree "
                f"(rtol={self.rtol:g}, atol={self.atol:g}×{scale:.3g}); worst entries:\n"
                + "\n".join(rows)
            )


def gradcheck(
    model: Any,
    *inputs: Any,
    g_out: Any = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    seed: int = 0,
    **named_inputs: Any,
) -> GradcheckReport:
    """The three-way check of a layer or a network at ``inputs``.

    ``model`` is a ``Layer`` or any network with the same protocol
    (``Sequential``): ``forward(*inputs)``, ``backward(g_out)`` returning
    ``(g_in, grads)``, ``jacobians()`` and ``parameters()``. Integer inputs are
    labels and get no gradient. Everything must be float64: finite differences
    in float32 are too coarse to prove anything.

    ``model`` may also be a ``Graph``, with its inputs by name:
    ``gradcheck(graph, x=X, y=Y)``, or ``gradcheck(graph, {"x": X, "y": Y})``
    when an input's name is one of this function's keywords. See
    ``gradcheck_graph`` for what is compared then.

    ``g_out`` defaults to a random array (seeded by ``seed``) of the output's
    shape (for a Graph: the seeds, in any form ``Graph.backward`` takes).
    Returns a ``GradcheckReport``; raises ``GradcheckError`` on any
    disagreement. The model is left at its operating point at ``inputs``.
    """
    if isinstance(model, Graph):
        if len(inputs) > 1 or (inputs and not isinstance(inputs[0], Mapping)):
            raise TypeError(
                "gradcheck: a Graph takes its inputs by name, gradcheck(graph, x=X) or "
                "gradcheck(graph, {'x': X})"
            )
        feed = dict(inputs[0]) if inputs else {}
        feed.update(named_inputs)
        return gradcheck_graph(model, feed, seeds=g_out, eps=eps, rtol=rtol, atol=atol, seed=seed)
    if named_inputs:
        raise TypeError(
            f"gradcheck: unexpected keyword(s) {', '.join(map(repr, named_inputs))}; inputs "
            f"by name are for a Graph, a layer takes them positionally"
        )
    name = _name(model)
    xs = [np.asarray(x) for x in inputs]
    for i, x in enumerate(xs):
        if not np.issubdtype(x.dtype, np.integer) and x.dtype != np.float64:
            raise TypeError(
                f"gradcheck {name}: input {i} is {x.dtype}; gradcheck runs in float64 "
                f"(finite differences in float32 prove nothing)"
            )
    params = _parameters(model)
    for key, p in params:
        if p.dtype != np.float64:
            raise TypeError(
                f"gradcheck {name}: parameter {_param_name(model, key, p)} is "
                f"{p.dtype}; build the model with dtype=np.float64 to check it"
            )
    rng = np.random.default_rng(seed)
    check = _Checker(name, rtol, atol)
    out = _forward_out(model, xs)  # a bad input fails here, once, before any perturbation
    try:
        scalar_out = out.ndim == 0 or bool(getattr(model, "reduces_batch", False))
        v = rng.standard_normal(out.shape) if g_out is None else np.asarray(g_out, np.float64)
        g_in, grads = model.backward(v if v.ndim else np.asarray(v))
        g_in = g_in if isinstance(g_in, tuple) else (g_in,)
        L_x, L_theta = model.jacobians()
        L_x = L_x if isinstance(L_x, tuple) else (L_x,)
        v_flat = v.ravel()

        for i, x in enumerate(xs):
            # A chain's gradient flows to x only; its later inputs are the loss's targets.
            if np.issubdtype(x.dtype, np.integer) or (i > 0 and not isinstance(model, Layer)):
                continue
            what = f"input {i}"
            L = L_x[i]

            def f_x(xi: np.ndarray, i: int = i) -> np.ndarray:
                return _forward_out(model, xs[:i] + [xi] + xs[i + 1 :])

            _check_one(check, what, L, g_in[i], f_x, x, v, v_flat, scalar_out, False, eps, rng)

        for key, p in params:
            what = f"parameter {_param_name(model, key, p)}"
            original = p.value

            def f_p(value: np.ndarray, p: Parameter = p) -> np.ndarray:
                p.value = value
                return _forward_out(model, xs)

            try:
                _check_one(
                    check,
                    what,
                    L_theta[key],
                    grads[key],
                    f_p,
                    original,
                    v,
                    v_flat,
                    scalar_out,
                    True,
                    eps,
                    rng,
                )
            finally:
                p.value = original
    finally:
        model.forward(*xs)
    return check.report


def _check_one(
    check: _Checker,
    what: str,
    L: Jacobian,
    fast: np.ndarray,
    f: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    v: np.ndarray,
    v_flat: np.ndarray,
    scalar_out: bool,
    param: bool,
    eps: float,
    rng: np.random.Generator,
) -> None:
    """Fast path, explicit Jacobian and finite differences for one input."""
    if fast is None:
        raise GradcheckError(f"gradcheck {check.report.name}: backward gave no gradient for {what}")
    if np.shape(fast) != x.shape:
        raise GradcheckError(
            f"gradcheck {check.report.name}: gradient for {what} has shape {np.shape(fast)}, "
            f"expected {x.shape}"
        )
    full = _full(L.to_dense(), scalar_out, param)
    numeric = numerical_jacobian(f, x, eps)
    check.compare(f"{what}: explicit Jacobian vs finite differences", full, numeric)
    explicit = v_flat @ full
    check.compare(f"{what}: fast backward vs explicit g·L", fast, explicit)
    check.compare(f"{what}: fast backward vs finite differences", fast, v_flat @ numeric)
    # The dot-product test: <v, L u> from the forward product equals <v L, u>.
    u = rng.standard_normal(x.shape)
    B = L.batch
    u_rows = np.broadcast_to(u.ravel(), (B, u.size)) if param else u.reshape(B, -1)
    Lu = L.jvp(np.ascontiguousarray(u_rows))
    v_rows = v_flat[None, :] if scalar_out else v.reshape(B, -1)
    lhs = float(np.sum(v_rows * Lu))
    rhs = float(np.sum(np.asarray(fast) * u))
    check.compare(f"{what}: dot-product test <v, L u> vs <v L, u>", rhs, lhs)


# -- whole graphs ----------------------------------------------------------------------


def _three_way(
    check: _Checker,
    what: str,
    fast: np.ndarray,
    explicit: np.ndarray,
    f: Callable[[np.ndarray], float],
    x: np.ndarray,
    eps: float,
) -> None:
    """Fast path, explicit Algorithm 14.1 and finite differences of a scalar ``f`` agree."""
    numeric = numerical_jacobian(f, x, eps)[0]
    check.compare(f"{what}: fast backward vs explicit Algorithm 14.1", fast, explicit)
    check.compare(f"{what}: fast backward vs finite differences", fast, numeric)
    check.compare(f"{what}: explicit Algorithm 14.1 vs finite differences", explicit, numeric)


def gradcheck_graph(
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    seeds: Any = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    seed: int = 0,
) -> GradcheckReport:
    """The three-way check of a whole ``Graph`` at ``inputs`` (a dict by input name).

    With seeds ``s_o`` for the outputs (random, drawn with ``seed``, unless
    given in any form ``Graph.backward`` accepts), the checked function is the
    scalar ``φ = Σ_o <s_o, output_o>``, whose gradient is exactly what
    ``backward(seeds)`` returns. For every input that gets a gradient and every
    Parameter (a tied one is perturbed in all its uses at once, eq. 14.47):

    1. the fast backward equals the explicit one (Algorithm 14.1 with sparse
       Jacobian matrices), entry by entry;
    2. both equal float64 central differences of ``φ``;
    3. the directional derivative of ``φ`` along one random direction of all
       inputs and parameters together equals ``<gradient, direction>``;
    4. the dot-product test with the whole-graph Jacobians
       (``Graph.jacobians``): for a random ``u`` per input and Parameter,
       ``Σ_o <s_o, L_o u>`` from their forward products (``jvp``) equals
       ``<s L, u>`` from the backward pass.

    The graph is left at its operating point at ``inputs``.
    """
    name = repr(graph)
    feed = {k: np.asarray(v) for k, v in inputs.items()}
    for key, x in feed.items():
        if not np.issubdtype(x.dtype, np.integer) and x.dtype != np.float64:
            raise TypeError(
                f"gradcheck {name}: input {key!r} is {x.dtype}; gradcheck runs in float64 "
                f"(finite differences in float32 prove nothing)"
            )
    named = graph.named_parameters()
    for pname, p in named.items():
        if p.dtype != np.float64:
            raise TypeError(
                f"gradcheck {name}: parameter {pname!r} is {p.dtype}; build the graph in "
                f"float64 to check it"
            )
    rng = np.random.default_rng(seed)
    check = _Checker(name, rtol, atol)
    outs_names = graph.output_names()
    outs = graph.forward(feed)  # a bad input fails here, once, before any perturbation
    try:
        outs = outs if len(outs_names) > 1 else (outs,)
        if seeds is None:
            seed_list: list[Any] = [rng.standard_normal(np.shape(o)) for o in outs]
        else:
            seed_list = graph._seeds(seeds)
        seed_map = {n: s for n, s in zip(outs_names, seed_list, strict=True) if s is not None}

        def phi(**changed: np.ndarray) -> float:
            values = graph.forward({**feed, **changed}, cache=False)
            values = values if len(outs_names) > 1 else (values,)
            return float(
                sum(
                    np.vdot(seed_map[n], np.asarray(v, np.float64))
                    for n, v in zip(outs_names, values, strict=True)
                    if n in seed_map
                )
            )

        graph.forward(feed)
        fast = graph.backward(seed_map)
        explicit = graph.backward(seed_map, mode="explicit")
        if set(fast.inputs) != set(explicit.inputs):
            raise GradcheckError(
                f"gradcheck {name}: fast and explicit modes give gradients for different inputs: "
                f"{sorted(fast.inputs)} vs {sorted(explicit.inputs)}"
            )
        direction: list[tuple[np.ndarray, np.ndarray]] = []  # (gradient, direction)
        for key, g_fast in fast.inputs.items():
            x = feed[key]
            what = f"input {key!r}"
            _compare_shape(check, what, g_fast, x.shape)

            def f_x(v: np.ndarray, key: str = key) -> float:
                return phi(**{key: v})

            _three_way(check, what, g_fast, explicit.inputs[key], f_x, x, eps)
            direction.append((g_fast, rng.standard_normal(x.shape)))
        for pname, p in named.items():
            what = f"parameter {pname!r}"
            g_fast = fast.params[p]
            _compare_shape(check, what, g_fast, p.shape)
            original = p.value

            def f_p(value: np.ndarray, p: Parameter = p) -> float:
                p.value = value
                return phi()

            try:
                _three_way(check, what, g_fast, explicit.params[p], f_p, original, eps)
            finally:
                p.value = original
            direction.append((g_fast, rng.standard_normal(p.shape)))
        if direction:
            _directional(check, graph, feed, named, fast, direction, phi, eps)
        graph.forward(feed)  # back to the operating point (φ ran without caching)
        _jacobian_dot_test(check, graph, seed_map, fast, named, rng)
    finally:
        graph.forward(feed)
    return check.report


def _compare_shape(check: _Checker, what: str, g: Any, shape: tuple[int, ...]) -> None:
    if np.shape(g) != shape:
        raise GradcheckError(
            f"gradcheck {check.report.name}: gradient for {what} has shape {np.shape(g)}, "
            f"expected {shape}"
        )


def _directional(
    check: _Checker,
    graph: Graph,
    feed: dict[str, np.ndarray],
    named: dict[str, Parameter],
    fast: Any,
    direction: list[tuple[np.ndarray, np.ndarray]],
    phi: Callable[..., float],
    eps: float,
) -> None:
    """``<∇φ, u>`` against ``(φ(z + εu) - φ(z - εu)) / 2ε``, all inputs and parameters at once."""
    keys = list(fast.inputs)
    params = list(named.values())
    u_in = {k: u for k, (_, u) in zip(keys, direction, strict=False)}
    u_par = [u for _, u in direction[len(keys) :]]
    originals = [p.value for p in params]

    def at(t: float) -> float:
        for p, v, u in zip(params, originals, u_par, strict=True):
            p.value = v + t * u
        return phi(**{k: feed[k] + t * u for k, u in u_in.items()})

    try:
        numeric = (at(eps) - at(-eps)) / (2 * eps)
    finally:
        for p, v in zip(params, originals, strict=True):
            p.value = v
    analytic = sum(float(np.vdot(g, u)) for g, u in direction)
    check.compare("all inputs and parameters: directional derivative <∇φ, u>", analytic, numeric)


def _jacobian_dot_test(
    check: _Checker,
    graph: Graph,
    seed_map: dict[str, np.ndarray],
    fast: Any,
    named: dict[str, Parameter],
    rng: np.random.Generator,
) -> None:
    """``<v, L u>`` through the whole-graph Jacobians against ``<v L, u>`` from backward.

    Per example the Jacobians map one example's input (or all of ``θ``) to one
    example's output; an output without a batch axis (a cost) is the sum of
    the examples' rows, so its seed multiplies every row.
    """
    B = graph._batch_size()
    outputs = cast(list, graph._outputs)
    directions: dict[Any, tuple[str, np.ndarray, np.ndarray, bool]] = {}
    for key, g in fast.inputs.items():
        directions[key] = (f"input {key!r}", g, rng.standard_normal(np.shape(g)), False)
    for pname, p in named.items():
        directions[p] = (f"parameter {pname!r}", fast.params[p], rng.standard_normal(p.shape), True)
    lhs = dict.fromkeys(directions, 0.0)
    for name, src in zip(graph.output_names(), outputs, strict=True):
        if name not in seed_map:
            continue
        s = np.asarray(seed_map[name], dtype=np.float64)
        ins, params = graph.jacobians(name)
        node_layer = graph._nodes[src[0]].layer
        if s.ndim == 0 or _reduces_batch(node_layer, src[1]):
            v = np.broadcast_to(s.reshape(1, -1), (B, s.size))
        else:
            v = s.reshape(B, -1)
        for key, (_, _, u, is_param) in directions.items():
            L = params[key] if is_param else ins[key]
            rows = np.broadcast_to(u.reshape(1, -1), (B, u.size)) if is_param else u.reshape(B, -1)
            lhs[key] += float(np.sum(v * L.jvp(np.ascontiguousarray(rows))))
    for key, (what, g, u, _) in directions.items():
        check.compare(
            f"{what}: dot-product test <s, L u> (graph Jacobians) vs <s L, u> (backward)",
            float(np.vdot(np.asarray(g, np.float64), u)),
            lhs[key],
        )
