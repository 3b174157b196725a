"""Numerical Jacobians and the three-way gradient check.

"Write the analytic gradient and validate it using the numerical gradient":
``gradcheck`` evaluates a layer (or a network) at given inputs and demands that
three computations of the same numbers agree,

1. the fast path, ``backward(g_out)``;
2. the explicit Jacobians, ``g_out · jacobians()`` as dense matrices;
3. float64 central differences, ``(f(x + h_j e_j) - f(x - h_j e_j)) / 2h_j``
   with a step ``h_j = ε·max(1, |x_j|)`` that follows the size of each entry;

and that the explicit Jacobians equal the numerical ones entry by entry, plus
the dot-product test ``<v, L u> = <v L, u>`` between the forward product of the
Jacobian object and the backward pass. Any disagreement raises
``GradcheckError`` (an ``AssertionError``) with the two computations side by
side, labelled by what they are, at the worst entries.

When is a difference a disagreement? Entry ``i`` of two computations ``a`` and
``b`` of the same array agrees when

    |a_i - b_i| <= rtol·|b_i| + atol·max(max|a|, max|b|) + noise_i.

Nothing in it is absolute: scaling the function, the seed ``g_out`` or the
inputs scales both sides alike, so a 0.1 % error fails whether the gradients
are of size 1e-9 or 1e9. ``atol`` is relative to the largest entry compared:
an entry that is zero up to rounding next to entries of size 1 passes, but a
comparison whose entries are all tiny is judged on their own scale.
``noise_i`` bounds the rounding error that neither side can avoid:

- in a central difference, rounding of the function values, about
  ``2^-52·|f|`` each, is divided by the step:
  ``noise_j = 4·2^-52·max|f| / h_j``, where ``max|f|`` is the largest value of
  ``f`` met while differencing. It depends on the size of the function values,
  not of the gradient: a function of size 1e8 has derivatives known to about
  ``1e-8 / ε`` only.
- in a product such as ``g·L``, rounding of the sum of the terms:
  ``16·2^-52·Σ|g_i||L_ij|``.

Where an entry disagrees, ``gradcheck`` looks again, at other steps for that
entry only, before it calls the entry wrong (``f(x)`` itself is evaluated once):

- a kink. A function that is not differentiable within the step (a ReLU whose
  pre-activation sits within ``h_j`` of 0, ``|x|`` at 0) makes the central
  difference the mean of two one-sided slopes, which a correct subgradient need
  not equal. The one-sided differences ``(f(x + h) - f(x)) / h`` and
  ``(f(x) - f(x - h)) / h`` then disagree by far more than the noise and by
  enough to explain the disagreement, one of them barely changes from ``h`` to
  ``h/2``, and their jump is still there at ``32h`` and ``64h`` (the gap of a
  smooth function, ``h·f''``, grows with the step; one made by rounding
  shrinks). Such entries (the column ``j`` of input ``x``) are excluded from
  the comparisons with finite differences, and the report counts them; an
  input whose entries are all excluded could not be checked, and that is a
  failure.
- truncation: the entry is compared with ``(4·c(h/2) - c(h)) / 3``, free of the
  ``h²`` error of the central difference ``c(h)``, allowing 16 times the change
  measured from ``h`` to ``h/2``.
- rounding coarser than ``2^-52·|f|`` (a sum near 1, a softmax's normaliser,
  rounds in steps of ``2^-52`` however small ``f`` is): the entry is compared
  at 16 (or 64) times the step, where rounding costs 16 times less, once the
  differences at that step and half of it agree.

A wrong derivative keeps its error at every step, so none of these hides it,
and the comparisons without finite differences (fast against explicit, the
dot-product test) keep every entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from backprop.graph import Graph
from backprop.jacobian import Jacobian
from backprop.layer import Layer, Parameter

__all__ = [
    "GradcheckError",
    "GradcheckReport",
    "gradcheck",
    "gradcheck_graph",
    "numerical_jacobian",
]

#: The spacing of float64 numbers at 1.
_ULP = 2.0**-52
#: Rounding of a function value, in units of ``_ULP·max|f|``.
_FD_NOISE = 4.0
#: Rounding of a sum of products, in units of ``_ULP·Σ|terms|``.
_PRODUCT_NOISE = 16.0


class GradcheckError(AssertionError):
    """An analytic derivative disagrees with another computation of it."""


@dataclass
class GradcheckReport:
    """What a passing ``gradcheck`` compared, and the relative error of each comparison.

    Each error is normwise, ``max|a - b| / max|b|`` over the entries compared;
    ``worst`` is the largest of them. (Pass or fail is decided entry by entry,
    with ``rtol``, ``atol`` and the rounding noise: see the module's docstring.)
    ``excluded`` maps each comparison with finite differences to
    ``(entries excluded, entries of the input)``: the entries where the function
    has a kink within the finite-difference step.
    """

    name: str
    checks: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.checks.values(), default=0.0)

    def __str__(self) -> str:
        n_excluded = sum(1 for k, _ in self.excluded.values() if k)
        head = f"gradcheck {self.name}: {len(self.checks)} comparisons passed"
        if n_excluded:
            head += f"; {n_excluded} of them excluded entries at a kink within the step"
        lines = [head]
        for what, err in self.checks.items():
            line = f"  {what:<60} rel. error {err:.2e}"
            k, total = self.excluded.get(what, (0, 0))
            if k:
                line += f"  ({k} of {total} entries excluded: a kink within the step)"
            lines.append(line)
        return "\n".join(lines)


# -- finite differences ------------------------------------------------------------------


def _ravel(y: Any) -> np.ndarray:
    """A function value as one float64 vector (several outputs one after the other)."""
    if isinstance(y, tuple | list):
        parts = [np.asarray(v, dtype=np.float64).ravel() for v in y]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(y, dtype=np.float64).ravel()


class _Differences:
    """Central (and one-sided) differences of ``f`` at ``x``, one column per entry of ``x``.

    The step of entry ``j`` is ``h_j = eps·max(1, |x_j|)``; the steps actually
    taken, ``fl(x_j ± h_j) - x_j``, are the ones divided by. ``central`` is
    ``(f(x + h) - f(x - h)) / 2h`` and, with ``one_sided``, ``right`` and
    ``left`` are ``(f(x + h) - f(x)) / h`` and ``(f(x) - f(x - h)) / h`` (all of
    shape ``(|f|, |x|)``); ``noise[j]`` bounds the rounding error of column
    ``j`` of ``central``. ``at(j, factor)`` gives the same three columns at
    another step, ``factor·h_j``.
    """

    def __init__(
        self,
        f: Callable[[np.ndarray], Any],
        x: np.ndarray,
        eps: float,
        one_sided: bool = True,
    ) -> None:
        self._f = f
        self._x = np.array(x, dtype=np.float64, copy=True)
        flat = self._x.reshape(-1)
        self.steps = eps * np.maximum(1.0, np.abs(flat))
        self.f0 = _ravel(f(self._x)) if one_sided or flat.size == 0 else None
        fmax = float(np.abs(self.f0).max(initial=0.0)) if self.f0 is not None else 0.0
        columns = []
        for j in range(flat.size):
            plus, minus, hp, hm = self._pair(j, float(self.steps[j]))
            columns.append(self._slopes(plus, minus, hp, hm))
            fmax = max(fmax, float(np.abs(plus).max(initial=0.0)), float(np.abs(minus).max()))
        m = columns[0][0].size if columns else cast(np.ndarray, self.f0).size
        stacked = [
            np.stack([c[k] for c in columns], axis=1) if columns else np.zeros((m, 0))
            for k in range(3)
        ]
        self.central = stacked[0]
        self.right: np.ndarray | None = stacked[1] if one_sided else None
        self.left: np.ndarray | None = stacked[2] if one_sided else None
        self.fmax = fmax
        self.noise = _FD_NOISE * _ULP * fmax / self.steps
        self._more: dict[tuple[int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _pair(self, j: int, h: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        flat = self._x.reshape(-1)
        orig = float(flat[j])
        flat[j] = orig + h
        hp = float(flat[j]) - orig
        plus = _ravel(self._f(self._x))
        flat[j] = orig - h
        hm = orig - float(flat[j])
        minus = _ravel(self._f(self._x))
        flat[j] = orig
        return plus, minus, hp, hm

    def _slopes(
        self, plus: np.ndarray, minus: np.ndarray, hp: float, hm: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        central = (plus - minus) / (hp + hm)
        if self.f0 is None:
            return central, central, central
        return central, (plus - self.f0) / hp, (self.f0 - minus) / hm

    def at(self, j: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column ``j`` of ``central``, ``right`` and ``left`` at ``factor`` times the step."""
        key = (j, factor)
        if key not in self._more:
            self._more[key] = self._slopes(*self._pair(j, float(self.steps[j]) * factor))
        return self._more[key]


def numerical_jacobian(
    f: Callable[[np.ndarray], Any], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """The Jacobian of ``f`` at ``x`` by float64 central differences.

    Returns an array of shape ``(f(x).size, x.size)``: row ``i`` is output entry
    ``i`` and column ``j`` is input entry ``j``, both in C order (a tuple of
    outputs counts as their entries one after the other). Entry ``j`` moves by
    ``h_j = eps·max(1, |x_j|)``: an absolute step near 0 and a relative one for
    large entries, where a fixed step would drown in the rounding of ``f``.
    ``x`` is not changed.
    """
    return _Differences(f, x, eps, one_sided=False).central


# -- comparing two computations ----------------------------------------------------------


def _index(i: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return ""
    return "[" + ", ".join(str(int(k)) for k in np.unravel_index(i, shape)) + "]"


def _entries(name: str, shape: tuple[int, ...]) -> Callable[[int, int], str]:
    """Labels of a gradient's entries: ``W[1, 3]``."""
    return lambda _r, c: name + _index(c, shape)


def _scalar_entry(_r: int, _c: int) -> str:
    return "(scalar)"


@dataclass
class _Comparison:
    what: str
    labels: tuple[str, str]
    legend: str
    entry: Callable[[int, int], str]


class _Checker:
    def __init__(self, name: str, rtol: float, atol: float) -> None:
        self.report = GradcheckReport(name)
        self.rtol, self.atol = rtol, atol

    def _arrays(self, c: _Comparison, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.size != b.size:
            raise GradcheckError(
                f"gradcheck {self.report.name}: {c.what}: {c.labels[0]} has {a.size} entries, "
                f"{c.labels[1]} has {b.size}"
            )
        return a, b

    def _allowed(self, a: np.ndarray, b: np.ndarray, noise: Any) -> tuple[np.ndarray, float]:
        scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
        return self.rtol * np.abs(b) + self.atol * scale + noise, scale

    def compare(self, c: _Comparison, a: Any, b: Any, noise: Any = 0.0) -> None:
        """``a`` against ``b``, two computations without finite differences; every entry counts."""
        a, b = self._arrays(c, a, b)
        a, b = a.reshape(1, -1), b.reshape(1, -1)
        noise = np.broadcast_to(np.asarray(noise, dtype=np.float64).reshape(1, -1), a.shape)
        allowed, scale = self._allowed(a, b, noise)
        self._judge(c, a, b, allowed, scale, noise, np.zeros(a.shape[1], bool), required=True)

    def compare_fd(
        self,
        c: _Comparison,
        a: Any,
        fd: _Differences,
        *,
        project: np.ndarray | None = None,
        support: np.ndarray | None = None,
        excluded: np.ndarray | None = None,
        required: bool = True,
    ) -> np.ndarray:
        """``a`` against the finite differences ``fd`` (of ``project · f`` when given).

        ``a`` has one row per output entry (or one row, with ``project``) and one
        column per entry of the differenced input. ``support`` (with ``project``)
        marks the entries of the Jacobian that either computation finds nonzero:
        only those carry rounding noise into ``project · f``. Returns the columns
        excluded at a kink, ``excluded`` included.
        """
        mask = np.zeros(fd.central.shape[1], bool) if excluded is None else excluded.copy()
        if project is None:
            n = fd.central.copy()
            noise = np.broadcast_to(fd.noise[None, :], n.shape)
        else:
            n = (project @ fd.central)[None, :]
            touched = np.ones(fd.central.shape) if support is None else support
            noise = (
                (np.abs(project) @ touched) * fd.noise
                + _PRODUCT_NOISE * _ULP * (np.abs(project) @ np.abs(fd.central))
            )[None, :]
        a, n = self._arrays(c, a, n)
        a = a.reshape(n.shape)
        allowed, scale = self._allowed(a, n, noise)
        allowed = np.array(allowed)
        bad = ~(np.abs(a - n) <= allowed) & ~mask[None, :]
        if fd.right is not None and bad.any():
            self._second_look(fd, a, n, noise, allowed, scale, bad, mask, project)
        self._judge(c, a, n, allowed, scale, noise, mask, required=required, differences=True)
        return mask

    def _second_look(
        self,
        fd: _Differences,
        a: np.ndarray,
        n: np.ndarray,
        noise: np.ndarray,
        allowed: np.ndarray,
        scale: float,
        bad: np.ndarray,
        mask: np.ndarray,
        project: np.ndarray | None,
    ) -> None:
        """Differences at other steps for the columns with disagreeing entries.

        Updates ``mask`` (the columns with a kink within the step) and, for the
        other disagreeing entries, ``n`` and ``allowed`` (the refined difference
        and its measured error), in place.

        A kink is told from curvature and from rounding by how the jump between
        the one-sided differences, ``gap = (f(x+h) - f(x))/h - (f(x) - f(x-h))/h``,
        changes with the step. A smooth function has ``gap ≈ h·f''``: it halves
        with the step and grows 64-fold at ``64h``. Rounding makes a gap of about
        ``2^-52·|f|/h``: it shrinks at ``64h``. A kink inside ``[x - h, x + h]``
        keeps its jump at every larger step, and leaves one side of ``x``
        smooth, where the one-sided difference barely changes from ``h`` to
        ``h/2``. So an entry is at a kink when its ``gap`` far exceeds the noise,
        is large enough to explain the error (a correct subgradient lies between
        the one-sided slopes, at most ``gap/2`` from their mean, the central
        difference), exceeds 16 times the change of the steadier side from
        ``h`` to ``h/2``, and is still there at ``32h`` and ``64h`` (at least half
        as large, the same sign, and changing by at most a quarter between the
        two, where curvature would double it).

        Any other entry is compared again with the extrapolated
        ``(4·c(h/2) - c(h)) / 3``, free of the ``h²`` error of ``c(h)``, allowing
        16 times the error that halving the step measured (``rough``: the change
        of the central difference and of the gap). What still disagrees gets
        the wide look (``_wide_look``).
        """
        rtol, atol = self.rtol, self.atol
        err = np.abs(a - n)
        right, left = cast(np.ndarray, fd.right), cast(np.ndarray, fd.left)
        if project is not None:
            right, left = (project @ right)[None, :], (project @ left)[None, :]

        def slopes(j: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            columns = fd.at(j, factor)
            if project is None:
                return columns
            c0, c1, c2 = (np.atleast_1d(project @ col) for col in columns)
            return c0, c1, c2

        smooth: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for j in (int(j) for j in np.flatnonzero(bad.any(axis=0))):
            central_h, right_h, left_h = slopes(j, 0.5)
            rows = np.flatnonzero(bad[:, j])
            gap = right[rows, j] - left[rows, j]
            g, eta = np.abs(gap), noise[rows, j]
            steady = np.minimum(
                np.abs(right[rows, j] - right_h[rows]), np.abs(left[rows, j] - left_h[rows])
            )
            kink = (g + allowed[rows, j] >= err[rows, j]) & (g > 64 * eta) & (g > 16 * steady)
            if kink.any():
                # The jump persists at wider steps, without the growth of curvature.
                _, right_w, left_w = slopes(j, 64.0)
                _, right_m, left_m = slopes(j, 32.0)
                gap_w, gap_m = right_w[rows] - left_w[rows], right_m[rows] - left_m[rows]
                kink &= (gap_w * gap > 0) & (np.abs(gap_w) >= g / 2)
                kink &= np.abs(gap_w - gap_m) <= np.abs(gap_w) / 4
            if kink.any():
                mask[j] = True
                continue
            odd = np.abs(n[rows, j] - central_h[rows])
            even = np.abs(gap - 2 * (right_h[rows] - left_h[rows]))
            smooth.append((j, rows, central_h[rows], np.maximum(odd, even)))
        if not smooth:
            return
        # The amplitude of rounding that would explain the errors, in units of f.
        amplitude = max(float((err[rows, k] * fd.steps[k]).max()) for k, rows, _, _ in smooth)
        still = []
        for k, rows, central_h, rough in smooth:
            refined = (4 * central_h - n[rows, k]) / 3
            n[rows, k] = refined
            allowed[rows, k] = (
                rtol * np.abs(refined) + atol * scale + 3 * noise[rows, k] + 16 * rough
            )
            failing = ~(np.abs(a[rows, k] - refined) <= allowed[rows, k])
            if failing.any():
                still.append((k, rows[failing]))
        if still:
            self._wide_look(fd, a, n, noise, allowed, scale, amplitude, still, project)

    def _wide_look(
        self,
        fd: _Differences,
        a: np.ndarray,
        n: np.ndarray,
        noise: np.ndarray,
        allowed: np.ndarray,
        scale: float,
        amplitude: float,
        still: list[tuple[int, np.ndarray]],
        project: np.ndarray | None,
    ) -> None:
        """Differences at 16 (then 64) times the step, for entries that still disagree.

        Rounding of ``f`` need not be random, nor as small as ``2^-52·|f|``: a
        sum near 1 (a softmax's normaliser) rounds in steps of ``2^-52`` however
        small ``f`` is, and the rounded function is a staircase whose
        differences can agree from ``h`` to ``h/2`` and still be wrong. The
        effect of rounding on a difference shrinks like ``1/step``; that of a
        wrong derivative does not. ``amplitude`` is the largest error of the
        disagreeing entries in units of ``f`` (``err·h``): rounding that
        explains the errors has about that size, ``A``, and costs about ``A/H``
        at the step ``H = F·h``. An entry is confirmed at ``H`` when its
        differences at ``H/2`` and ``H`` agree with each other to within
        ``4·A/H`` plus the usual slack (no truncation error, and no kink, hides
        at that step), and the one at ``H`` agrees with the derivative to within
        that plus twice their change. ``F = 16`` is tried first, then 64 where
        a kink or curvature spoils it. A wrong derivative keeps its error ``E``
        at every step: the entry that sets ``A`` then gets at most
        ``4·E·h/H = E/4`` and still fails.
        """
        rtol, atol = self.rtol, self.atol
        for k, rows in still:
            for factor in (16.0, 64.0):
                c_wide, c_mid = fd.at(k, factor)[0], fd.at(k, factor / 2)[0]
                if project is not None:
                    c_wide = np.atleast_1d(project @ c_wide)
                    c_mid = np.atleast_1d(project @ c_mid)
                c_wide, c_mid = c_wide[rows], c_mid[rows]
                H = factor * fd.steps[k]
                prior = (
                    rtol * np.abs(c_wide)
                    + atol * scale
                    + noise[rows, k] / factor
                    + 4 * amplitude / H
                )
                change = np.abs(c_wide - c_mid)
                ok = (change <= prior) & (np.abs(a[rows, k] - c_wide) <= prior + 2 * change)
                n[rows[ok], k] = c_wide[ok]
                allowed[rows[ok], k] = (prior + 2 * change)[ok]
                rows = rows[~ok]
                if not rows.size:
                    break

    def _judge(
        self,
        c: _Comparison,
        a: np.ndarray,
        b: np.ndarray,
        allowed: np.ndarray,
        scale: float,
        noise: np.ndarray,
        mask: np.ndarray,
        *,
        required: bool,
        differences: bool = False,
    ) -> None:
        name = self.report.name
        k, total = int(mask.sum()), int(mask.size)
        keep = np.broadcast_to(~mask[None, :], a.shape)
        err = np.abs(a - b)
        if k:
            self.report.excluded[c.what] = (k, total)
            if k == total and required:
                raise GradcheckError(
                    f"gradcheck {name}: {c.what}: could not check: all {total} entries lie "
                    f"within the finite-difference step of a kink (the function is not "
                    f"differentiable there); check it at another point"
                )
        # The report keeps a normwise figure, max|a - b| / max|b|: entrywise ratios
        # blow up at entries that are zero up to rounding.
        largest = float(np.abs(b[keep]).max(initial=0.0))
        self.report.checks[c.what] = float(err[keep].max(initial=0.0)) / max(
            largest, np.finfo(float).tiny
        )
        failed = ~(err <= allowed) & keep  # also catches NaN
        if not failed.any():
            return
        ratio = np.where(failed, np.nan_to_num(err / allowed, nan=np.inf, posinf=np.inf), -1.0)
        worst = np.argsort(-ratio, axis=None, kind="stable")[:6]
        worst = worst[ratio.ravel()[worst] >= 0]
        la, lb = c.labels
        cells = [
            (
                c.entry(*divmod(int(i), a.shape[1])),
                a.flat[i],
                b.flat[i],
                err.flat[i],
                allowed.flat[i],
            )
            for i in worst
        ]
        width = max(len("entry"), *(len(cell[0]) for cell in cells))
        rows = [f"  {'entry':<{width}}  {la:>22}  {lb:>22}  {'abs err':>9}  {'allowed':>9}"]
        rows += [
            f"  {e:<{width}}  {x:>22.15g}  {y:>22.15g}  {d:>9.2e}  {t:>9.2e}"
            for e, x, y, d, t in cells
        ]
        note = f"\n  ({k} of {total} entries excluded: a kink within the step)" if k else ""
        if differences:
            note += (
                "\n  (the disagreeing entries were differenced again at other steps; "
                f"{lb} and allowed show that second look)"
            )
            if any(cell[2] == 0 and cell[1] != 0 for cell in cells):
                note += (
                    f"\n  ({lb} 0: f did not change at any step tried; a derivative this "
                    f"small is below the resolution of f here: check at a less saturated point)"
                )
        raise GradcheckError(
            f"gradcheck {name}: {c.what} disagree at {int(failed.sum())} of "
            f"{int(keep.sum())} entries; worst entries:\n"
            f"  {c.legend}\n"
            f"  allowed = rtol·|{lb}| + atol·{scale:.3g} (the largest entry) + rounding noise "
            f"(up to {float(noise.max(initial=0.0)):.2g}); rtol={self.rtol:g}, "
            f"atol={self.atol:g}{note}\n" + "\n".join(rows)
        )


# -- the model adapter: a Layer, or a network of them -----------------------------


def _parameters(model: Any) -> list[tuple[Any, Parameter]]:
    """``[(key, Parameter)]`` where ``key`` indexes the model's ``grads``."""
    if isinstance(model, Layer):
        return list(model.params.items())
    return [(p, p) for p in model.parameters()]


def _plain_param_name(model: Any, key: Any, p: Parameter) -> str:
    if isinstance(key, str):
        return key
    names = {id(q): n for n, q in getattr(model, "named_parameters", dict)().items()}
    return str(names.get(id(p), p.name or f"{p.shape}"))


def _param_name(model: Any, key: Any, p: Parameter) -> str:
    return repr(_plain_param_name(model, key, p))


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


class _Outputs:
    """A model's output(s) as the one vector its batch Jacobian has rows for.

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
        return _ravel(out)

    def label(self, r: int) -> str:
        if not self.multi:
            return self.name + _index(r, self.shapes[0])
        b, off = divmod(r, sum(self.sizes)) if self.batched else (0, r)
        for k, (shape, size) in enumerate(zip(self.shapes, self.sizes, strict=True)):
            if off < size:
                if self.batched:
                    inner = _index(off, shape[1:])
                    idx = f"[{b}" + (", " + inner[1:-1] if inner else "") + "]"
                else:
                    idx = _index(off, shape)
                return f"x_out[{k}]{idx}"
            off -= size
        return f"x_out[?{r}]"


def _jacobian_entries(
    outs: _Outputs, name: str, shape: tuple[int, ...]
) -> Callable[[int, int], str]:
    """Labels of a batch Jacobian's entries: ``∂x_out[0, 2]/∂x_in[0, 3]``."""
    return lambda r, c: f"∂{outs.label(r)}/∂{name}{_index(c, shape)}"


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
    in float32 are too coarse to prove anything. A layer with several outputs
    (``Branch``: ``forward`` returns a tuple) gets one ``g_out`` per output, and
    its Jacobian is that of the outputs stacked per example.

    ``model`` may also be a ``Graph``, with its inputs by name:
    ``gradcheck(graph, x=X, y=Y)``, or ``gradcheck(graph, {"x": X, "y": Y})``
    when an input's name is one of this function's keywords. See
    ``gradcheck_graph`` for what is compared then.

    ``g_out`` defaults to a random array (seeded by ``seed``) of the output's
    shape, or a tuple of them for several outputs (for a Graph: the seeds, in
    any form ``Graph.backward`` takes). ``eps`` is the relative finite-difference
    step, ``h_j = eps·max(1, |x_j|)``; ``rtol`` and ``atol`` are relative to the
    entry and to the largest entry compared (see the module's docstring for the
    rule and the rounding noise it allows, and for the entries it excludes at a
    kink). Returns a ``GradcheckReport``; raises ``GradcheckError`` on any
    disagreement. The model is left at its operating point at ``inputs``.
    """
    if isinstance(model, Graph):
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            feed = dict(inputs[0])
        else:  # positional: the inputs in declaration order (a chain's x, then its targets)
            names = model.input_names()
            if len(inputs) > len(names):
                raise TypeError(
                    f"gradcheck: the model takes {len(names)} input(s) "
                    f"({', '.join(names)}), got {len(inputs)}"
                )
            feed = dict(zip(names, inputs, strict=False))
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
    out = model.forward(*xs)  # a bad input fails here, once, before any perturbation
    try:
        scalar_out = bool(getattr(model, "reduces_batch", False)) or all(
            np.ndim(o) == 0 for o in (out if isinstance(out, tuple | list) else [out])
        )
        outs = _Outputs(out, scalar_out)
        v = _seed(outs, g_out, rng, name)
        g_in, grads = model.backward(v)
        g_in = g_in if isinstance(g_in, tuple) else (g_in,)
        L_x, L_theta = model.jacobians()
        L_x = L_x if isinstance(L_x, tuple) else (L_x,)
        v_flat = outs.flatten(v)
        in_names = tuple(getattr(model, "inputs", ()))

        def evaluate(args: list[np.ndarray]) -> np.ndarray:
            return outs.flatten(model.forward(*args))

        for i, x in enumerate(xs):
            # A chain's gradient flows to x only; its later inputs are the loss's targets.
            if np.issubdtype(x.dtype, np.integer) or (i > 0 and not isinstance(model, Layer)):
                continue
            label = in_names[i] if i < len(in_names) else f"x{i}"

            def f_x(xi: np.ndarray, i: int = i) -> np.ndarray:
                return evaluate(xs[:i] + [xi] + xs[i + 1 :])

            _check_one(
                check,
                f"input {i}",
                label,
                L_x[i],
                g_in[i],
                f_x,
                x,
                v,
                v_flat,
                outs,
                False,
                eps,
                rng,
            )

        for key, p in params:
            original = p.value

            def f_p(value: np.ndarray, p: Parameter = p) -> np.ndarray:
                p.value = value
                return evaluate(xs)

            try:
                _check_one(
                    check,
                    f"parameter {_param_name(model, key, p)}",
                    _plain_param_name(model, key, p),
                    L_theta[key],
                    grads[key],
                    f_p,
                    original,
                    v,
                    v_flat,
                    outs,
                    True,
                    eps,
                    rng,
                )
            finally:
                p.value = original
    finally:
        model.forward(*xs)
    return check.report


def _seed(outs: _Outputs, g_out: Any, rng: np.random.Generator, name: str) -> Any:
    """``g_out`` as given, or random: one array per output."""
    if not outs.multi:
        return (
            rng.standard_normal(outs.shapes[0]) if g_out is None else np.asarray(g_out, np.float64)
        )
    if g_out is None:
        return tuple(rng.standard_normal(s) for s in outs.shapes)
    if not isinstance(g_out, tuple | list) or len(g_out) != len(outs.shapes):
        raise TypeError(
            f"gradcheck {name}: the model has {len(outs.shapes)} outputs; g_out must be a "
            f"tuple of {len(outs.shapes)} arrays"
        )
    return tuple(np.asarray(g, np.float64) for g in g_out)


def _check_one(
    check: _Checker,
    what: str,
    label: str,
    L: Jacobian,
    fast: np.ndarray,
    f: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    v: Any,
    v_flat: np.ndarray,
    outs: _Outputs,
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
    scalar_out = outs.scalar_out
    full = _full(L.to_dense(), scalar_out, param)
    fd = _Differences(f, x, eps)
    gradient = _entries(label, x.shape)
    mask = check.compare_fd(
        _Comparison(
            f"{what}: explicit Jacobian vs finite differences",
            ("explicit", "numeric"),
            "explicit = jacobians() as the batch Jacobian (analytic), "
            "numeric = central differences",
            _jacobian_entries(outs, label, x.shape),
        ),
        full,
        fd,
    )
    abs_vL = np.abs(v_flat) @ np.abs(full)
    explicit = v_flat @ full
    check.compare(
        _Comparison(
            f"{what}: fast backward vs explicit g·L",
            ("fast", "explicit"),
            "fast = backward(g_out), explicit = g_out · jacobians(): both analytic",
            gradient,
        ),
        fast,
        explicit,
        noise=_PRODUCT_NOISE * _ULP * abs_vL,
    )
    check.compare_fd(
        _Comparison(
            f"{what}: fast backward vs finite differences",
            ("fast", "numeric"),
            "fast = backward(g_out) (analytic), numeric = g_out · central differences",
            gradient,
        ),
        np.asarray(fast).reshape(1, -1),
        fd,
        project=v_flat,
        support=(full != 0) | (fd.central != 0),
        excluded=mask,
    )
    # The dot-product test: <v, L u> from the forward product equals <v L, u>.
    u = rng.standard_normal(x.shape)
    B = L.batch
    u_rows = np.broadcast_to(u.ravel(), (B, u.size)) if param else u.reshape(B, -1)
    Lu = L.jvp(np.ascontiguousarray(u_rows))
    v_rows = v_flat[None, :] if scalar_out else v_flat.reshape(B, -1)
    lhs = float(np.sum(v_rows * Lu))
    rhs = float(np.sum(np.asarray(fast) * u))
    noise = (
        _PRODUCT_NOISE
        * _ULP
        * (float(abs_vL @ np.abs(u.ravel())) + float(np.sum(np.abs(np.asarray(fast) * u))))
    )
    check.compare(
        _Comparison(
            f"{what}: dot-product test <v, L u> vs <v L, u>",
            ("<v L, u>", "<v, L u>"),
            "<v L, u> from backward (analytic), <v, L u> from the Jacobian's forward product "
            "jvp (analytic)",
            _scalar_entry,
        ),
        rhs,
        lhs,
        noise=noise,
    )


# -- whole graphs ----------------------------------------------------------------------


def _three_way(
    check: _Checker,
    what: str,
    label: str,
    fast: np.ndarray,
    explicit: np.ndarray,
    f: Callable[[np.ndarray], float],
    x: np.ndarray,
    eps: float,
    scale: float,
) -> np.ndarray:
    """Fast path, explicit Algorithm 14.1 and finite differences of a scalar ``f`` agree.

    ``scale`` is the largest gradient entry of the whole graph: the two backward
    passes round relative to the numbers that flow through them. Returns the
    entries of ``x`` excluded at a kink.
    """
    gradient = _entries(label, x.shape)
    check.compare(
        _Comparison(
            f"{what}: fast backward vs explicit Algorithm 14.1",
            ("fast", "explicit"),
            "fast = backward(seeds), explicit = backward(seeds, mode='explicit'): both analytic",
            gradient,
        ),
        fast,
        explicit,
        noise=_PRODUCT_NOISE * _ULP * scale,
    )
    fd = _Differences(f, x, eps)
    mask = check.compare_fd(
        _Comparison(
            f"{what}: fast backward vs finite differences",
            ("fast", "numeric"),
            "fast = backward(seeds) (analytic), numeric = central differences of φ",
            gradient,
        ),
        np.asarray(fast).reshape(1, -1),
        fd,
    )
    return check.compare_fd(
        _Comparison(
            f"{what}: explicit Algorithm 14.1 vs finite differences",
            ("explicit", "numeric"),
            "explicit = backward(seeds, mode='explicit') (analytic), numeric = central "
            "differences of φ",
            gradient,
        ),
        np.asarray(explicit).reshape(1, -1),
        fd,
        excluded=mask,
    )


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
            seed_list = graph.seeds(seeds)
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
        every = [*fast.inputs.values(), *(fast.params[p] for p in named.values())]
        scale = max(
            (float(np.abs(np.asarray(g, np.float64)).max(initial=0.0)) for g in every), default=0.0
        )
        direction: list[tuple[np.ndarray, np.ndarray]] = []  # (gradient, direction)
        for key, g_fast in fast.inputs.items():
            x = feed[key]
            what = f"input {key!r}"
            _compare_shape(check, what, g_fast, x.shape)

            def f_x(v: np.ndarray, key: str = key) -> float:
                return phi(**{key: v})

            mask = _three_way(check, what, key, g_fast, explicit.inputs[key], f_x, x, eps, scale)
            direction.append((g_fast, _direction(rng, x, mask)))
        for pname, p in named.items():
            what = f"parameter {pname!r}"
            g_fast = fast.params[p]
            _compare_shape(check, what, g_fast, p.shape)
            original = p.value

            def f_p(value: np.ndarray, p: Parameter = p) -> float:
                p.value = value
                return phi()

            try:
                mask = _three_way(
                    check, what, pname, g_fast, explicit.params[p], f_p, original, eps, scale
                )
            finally:
                p.value = original
            direction.append((g_fast, _direction(rng, original, mask)))
        if direction:
            _directional(check, graph, feed, named, fast, direction, phi, eps)
        graph.forward(feed)  # back to the operating point (φ ran without caching)
        _jacobian_dot_test(check, graph, seed_map, fast, named, rng)
    finally:
        graph.forward(feed)
    return check.report


def _direction(rng: np.random.Generator, z: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """A random direction scaled entry by entry like the steps, zero where excluded."""
    r = rng.standard_normal(np.shape(z))
    d = r * np.maximum(1.0, np.abs(np.asarray(z, np.float64)))
    d.reshape(-1)[excluded] = 0.0
    return d


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
    """``<∇φ, d>`` against the central difference of ``t ↦ φ(z + t·d)`` at ``t = 0``.

    All inputs and parameters move at once; ``d`` already carries each entry's
    scale, so the step in ``t`` is ``eps``.
    """
    keys = list(fast.inputs)
    params = list(named.values())
    u_in = {k: u for k, (_, u) in zip(keys, direction, strict=False)}
    u_par = [u for _, u in direction[len(keys) :]]
    originals = [p.value for p in params]

    def at(t: np.ndarray) -> float:
        s = float(t.reshape(-1)[0])
        for p, v, u in zip(params, originals, u_par, strict=True):
            p.value = v + s * u
        return phi(**{k: feed[k] + s * u for k, u in u_in.items()})

    analytic = sum(float(np.vdot(g, u)) for g, u in direction)
    try:
        fd = _Differences(at, np.zeros(1), eps)
    finally:
        for p, v in zip(params, originals, strict=True):
            p.value = v
    try:
        check.compare_fd(
            _Comparison(
                "all inputs and parameters: directional derivative <∇φ, u>",
                ("<∇φ, u>", "numeric"),
                "<∇φ, u> from backward (analytic), numeric = central difference of φ along u",
                _scalar_entry,
            ),
            np.array([[analytic]]),
            fd,
            required=False,
        )
    finally:
        for p, v in zip(params, originals, strict=True):
            p.value = v


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
    B = graph.batch_size
    directions: dict[Any, tuple[str, np.ndarray, np.ndarray, bool]] = {}
    for key, g in fast.inputs.items():
        directions[key] = (f"input {key!r}", g, rng.standard_normal(np.shape(g)), False)
    for pname, p in named.items():
        directions[p] = (f"parameter {pname!r}", fast.params[p], rng.standard_normal(p.shape), True)
    lhs = dict.fromkeys(directions, 0.0)
    size = dict.fromkeys(directions, 0.0)  # Σ|terms| of lhs, for its rounding
    for name, value in zip(graph.output_names(), graph.output_values(), strict=True):
        if name not in seed_map:
            continue
        s = np.asarray(seed_map[name], dtype=np.float64)
        jac = graph.jacobians(name)
        ins, params = jac.inputs, jac.params
        info = graph.node(value)
        if s.ndim == 0 or not info.batched[info.outputs.index(value)]:
            v = np.broadcast_to(s.reshape(1, -1), (B, s.size))
        else:
            v = s.reshape(B, -1)
        for key, (_, _, u, is_param) in directions.items():
            L = params[key] if is_param else ins[key]
            rows = np.broadcast_to(u.reshape(1, -1), (B, u.size)) if is_param else u.reshape(B, -1)
            terms = v * L.jvp(np.ascontiguousarray(rows))
            lhs[key] += float(np.sum(terms))
            size[key] += float(np.sum(np.abs(terms)))
    for key, (what, g, u, _) in directions.items():
        gu = np.asarray(g, np.float64) * u
        check.compare(
            _Comparison(
                f"{what}: dot-product test <s, L u> (graph Jacobians) vs <s L, u> (backward)",
                ("<s L, u>", "<s, L u>"),
                "<s L, u> from backward (analytic), <s, L u> from the graph Jacobians' forward "
                "products jvp (analytic)",
                _scalar_entry,
            ),
            float(np.sum(gu)),
            lhs[key],
            noise=4 * _PRODUCT_NOISE * _ULP * (float(np.sum(np.abs(gu))) + size[key]),
        )
