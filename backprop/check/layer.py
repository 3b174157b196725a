"""The three-way check of one ``Layer``: fast path, explicit Jacobians, finite differences.

Only the layer's public protocol is used: ``forward``, ``backward``,
``jacobians``, ``params``, ``inputs``, ``n_outputs`` and ``reduces_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
    index,
    require_float64,
    scalar_entry,
)
from backprop.check.differences import ULP, Differences, along, ravel
from backprop.check.modes import along_entry, choose_mode, random_direction
from backprop.jacobian import Jacobian
from backprop.layer import Layer, Parameter

__all__ = ["check_layer"]


class Outputs:
    """A layer's output(s) as the one vector its batch Jacobian has rows for.

    One output is its entries in C order. Several outputs (a ``Branch``) with a
    batch axis are stacked per example, ``[out_0[b], out_1[b], ...]`` for each
    example ``b`` in turn, as the layer's Jacobian stacks them (eq. 14.45);
    without a batch axis they follow one another.
    """

    def __init__(self, out: Any, scalar_out: bool) -> None:
        self.multi = isinstance(out, tuple | list)
        self.scalar_out = scalar_out
        outs = list(out) if self.multi else [out]
        self.shapes = [np.shape(o) for o in outs]
        self.size = sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)
        self.batched = (
            self.multi
            and not scalar_out
            and all(len(s) > 0 for s in self.shapes)
            and len({s[0] for s in self.shapes}) == 1
        )
        self.sizes = [
            int(np.prod(s[1:] if self.batched else s, dtype=np.int64)) for s in self.shapes
        ]
        self.name = "J" if not self.multi and self.shapes[0] == () else "x_out"

    def flatten(self, out: Any) -> np.ndarray:
        if not self.multi:
            return np.asarray(out, dtype=np.float64).ravel()
        if self.batched:
            B = self.shapes[0][0]
            return np.concatenate(
                [np.asarray(o, dtype=np.float64).reshape(B, -1) for o in out], axis=1
            ).ravel()
        return ravel(out)

    def label(self, r: int) -> str:
        if not self.multi:
            return self.name + index(r, self.shapes[0])
        b, off = divmod(r, sum(self.sizes)) if self.batched else (0, r)
        for k, (shape, size) in enumerate(zip(self.shapes, self.sizes, strict=True)):
            if off < size:
                if self.batched:
                    inner = index(off, shape[1:])
                    idx = f"[{b}" + (", " + inner[1:-1] if inner else "") + "]"
                else:
                    idx = index(off, shape)
                return f"x_out[{k}]{idx}"
            off -= size
        return f"x_out[?{r}]"

    def seed(self, g_out: Any, rng: np.random.Generator, name: str) -> Any:
        """``g_out`` as given, or random: one array per output."""
        if not self.multi:
            if g_out is None:
                return rng.standard_normal(self.shapes[0])
            return np.asarray(g_out, np.float64)
        if g_out is None:
            return tuple(rng.standard_normal(s) for s in self.shapes)
        if not isinstance(g_out, tuple | list) or len(g_out) != len(self.shapes):
            raise TypeError(
                f"gradcheck {name}: the model has {len(self.shapes)} outputs; g_out must be a "
                f"tuple of {len(self.shapes)} arrays"
            )
        return tuple(np.asarray(g, np.float64) for g in g_out)


def full_jacobian(D: np.ndarray, scalar_out: bool, param: bool) -> np.ndarray:
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


@dataclass
class _Target:
    """One input or parameter: its value, its fast gradient, its Jacobian, and f of it."""

    what: str  # "input 0", "parameter 'W'"
    label: str  # how its entries are named: "x_in", "W"
    z: np.ndarray
    fast: Any
    L: Jacobian
    f: Callable[[np.ndarray], np.ndarray]  # the flattened output(s) as a function of z
    param: Parameter | None


@dataclass
class _Run:
    """What every target of one check shares."""

    check: Checker
    outs: Outputs
    v: Any  # g_out, one array per output
    v_flat: np.ndarray
    eps: float
    rng: np.random.Generator
    directions: int

    def v_L_u(self, t: _Target, u: np.ndarray) -> tuple[float, float]:
        """``<v, L u>`` from the Jacobian's forward product, and ``Σ|terms|`` (its rounding)."""
        B = t.L.batch
        rows = np.broadcast_to(u.ravel(), (B, u.size)) if t.param else u.reshape(B, -1)
        Lu = t.L.jvp(np.ascontiguousarray(rows))
        v_rows = self.v_flat[None, :] if self.outs.scalar_out else self.v_flat.reshape(B, -1)
        terms = v_rows * Lu
        return float(np.sum(terms)), float(np.sum(np.abs(terms)))


def check_layer(
    layer: Layer,
    inputs: Sequence[Any],
    *,
    g_out: Any,
    eps: float,
    rtol: float,
    atol: float,
    seed: Any,
    mode: str,
    directions: int,
) -> GradcheckReport:
    """``gradcheck`` of a ``Layer``: see ``backprop.check.gradcheck``."""
    name = repr(layer).splitlines()[0]
    xs = [np.asarray(x) for x in inputs]
    arrays = {str(i): x for i, x in enumerate(xs)}
    require_float64(name, arrays, layer.params, "build the model with dtype=np.float64")
    rng = np.random.default_rng(seed)
    out = layer.forward(*xs)  # a bad input fails here, once, before any perturbation
    try:
        outs_ = out if isinstance(out, tuple | list) else [out]
        outs = Outputs(out, layer.reduces_batch or all(np.ndim(o) == 0 for o in outs_))
        v = outs.seed(g_out, rng, name)
        targets = list(_targets(layer, xs, outs, v))
        sizes = [t.z.size for t in targets]
        chosen = choose_mode(f"gradcheck {name}", mode, directions, outs.size, sizes)
        run = _Run(
            Checker(name, rtol, atol, chosen), outs, v, outs.flatten(v), eps, rng, directions
        )
        for t in targets:
            _require_gradient(run.check, t)
            try:
                (_entries if chosen == "entries" else _directions)(run, t)
            finally:
                if t.param is not None:
                    t.param.value = t.z
    finally:
        layer.forward(*xs)
    return run.check.report


def _targets(layer: Layer, xs: list[np.ndarray], outs: Outputs, v: Any) -> Iterator[_Target]:
    """Every float input, then every parameter, at the layer's operating point."""
    g_in, grads = layer.backward(v)
    g_in = g_in if isinstance(g_in, tuple) else (g_in,)
    L_x, L_theta = layer.jacobians()
    L_x = L_x if isinstance(L_x, tuple) else (L_x,)

    def evaluate(args: list[np.ndarray]) -> np.ndarray:
        return outs.flatten(layer.forward(*args))

    for i, x in enumerate(xs):
        if x.dtype.kind != "f":  # labels and masks are data: no gradient
            continue
        label = layer.inputs[i] if i < len(layer.inputs) else f"x{i}"

        def f_x(xi: np.ndarray, i: int = i) -> np.ndarray:
            return evaluate(xs[:i] + [xi] + xs[i + 1 :])

        yield _Target(f"input {i}", label, x, g_in[i], L_x[i], f_x, None)
    for key, p in layer.params.items():

        def f_p(value: np.ndarray, p: Parameter = p) -> np.ndarray:
            p.value = value
            return evaluate(xs)

        yield _Target(f"parameter {key!r}", key, p.value, grads.get(key), L_theta[key], f_p, p)


def _require_gradient(check: Checker, t: _Target) -> None:
    if t.fast is None:
        raise GradcheckError(
            f"gradcheck {check.report.name}: backward gave no gradient for {t.what}"
        )
    if np.shape(t.fast) != t.z.shape:
        raise GradcheckError(
            f"gradcheck {check.report.name}: gradient for {t.what} has shape "
            f"{np.shape(t.fast)}, expected {t.z.shape}"
        )


def _entries(run: _Run, t: _Target) -> None:
    """Every entry: explicit Jacobian, fast backward and finite differences; the dot test."""
    check, outs = run.check, run.outs
    full = full_jacobian(t.L.to_dense(), outs.scalar_out, t.param is not None)
    fd = Differences(t.f, t.z, run.eps)
    gradient = entries(t.label, t.z.shape)
    mask = check.compare_fd(
        Comparison(
            f"{t.what}: explicit Jacobian vs finite differences",
            ("explicit", "numeric"),
            "explicit = jacobians() as the batch Jacobian (analytic), "
            "numeric = central differences",
            lambda r, c: f"∂{outs.label(r)}/∂{t.label}{index(c, t.z.shape)}",
        ),
        full,
        fd,
    )
    abs_vL = np.abs(run.v_flat) @ np.abs(full)
    check.compare(
        Comparison(
            f"{t.what}: fast backward vs explicit g·L",
            ("fast", "explicit"),
            "fast = backward(g_out), explicit = g_out · jacobians(): both analytic",
            gradient,
        ),
        t.fast,
        run.v_flat @ full,
        noise=PRODUCT_NOISE * ULP * abs_vL,
    )
    check.compare_fd(
        Comparison(
            f"{t.what}: fast backward vs finite differences",
            ("fast", "numeric"),
            "fast = backward(g_out) (analytic), numeric = g_out · central differences",
            gradient,
        ),
        np.asarray(t.fast).reshape(1, -1),
        fd,
        project=run.v_flat,
        support=(full != 0) | (fd.central != 0),
        excluded=mask,
    )
    # The dot-product test: <v, L u> from the forward product equals <v L, u>.
    u = run.rng.standard_normal(t.z.shape)
    v_L_u, _ = run.v_L_u(t, u)
    vL_u = np.asarray(t.fast) * u
    noise = PRODUCT_NOISE * ULP * (float(abs_vL @ np.abs(u.ravel())) + float(np.sum(np.abs(vL_u))))
    check.compare(_dot_test(t.what), float(np.sum(vL_u)), v_L_u, noise=noise)


def _dot_test(what: str, entry: Callable[[int, int], str] = scalar_entry) -> Comparison:
    return Comparison(
        f"{what}: dot-product test <v, L u> vs <v L, u>",
        ("<v L, u>", "<v, L u>"),
        "<v L, u> from backward (analytic), <v, L u> from the Jacobian's forward product "
        "jvp (analytic)",
        entry,
    )


def _directions(run: _Run, t: _Target) -> None:
    """Along a few random directions ``u``: backward, ``jvp`` and finite differences agree."""
    check = run.check
    us = [random_direction(run.rng, t.z) for _ in range(run.directions)]
    fast = np.array([[float(np.vdot(t.fast, u)) for u in us]])
    products = [run.v_L_u(t, u) for u in us]
    explicit = np.array([[p for p, _ in products]])
    fd = along(t.f, t.z, us, run.eps)
    mask = check.compare_fd(
        Comparison(
            f"{t.what}: fast backward vs finite differences along u",
            ("<v L, u>", "numeric"),
            "<v L, u> from backward(g_out) (analytic), numeric = central difference of "
            "<g_out, f(z + t·u)> at t = 0",
            along_entry,
        ),
        fast,
        fd,
        project=run.v_flat,
    )
    check.compare_fd(
        Comparison(
            f"{t.what}: explicit Jacobian vs finite differences along u",
            ("<v, L u>", "numeric"),
            "<v, L u> from the forward product jvp of jacobians() (analytic), numeric = "
            "central difference of <g_out, f(z + t·u)> at t = 0",
            along_entry,
        ),
        explicit,
        fd,
        project=run.v_flat,
        excluded=mask,
    )
    size = [
        float(np.sum(np.abs(np.asarray(t.fast) * u))) + s
        for u, (_, s) in zip(us, products, strict=True)
    ]
    noise = 4 * PRODUCT_NOISE * ULP * np.array(size)
    check.compare(_dot_test(t.what, along_entry), fast, explicit, noise=noise)
