"""Tolerances: when two computations of the same derivatives agree.

Entry ``i`` of two computations ``a`` and ``b`` of the same array agrees when

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

Where an entry disagrees with finite differences, the checker looks again, at
other steps for that entry only, before it calls the entry wrong (see
``backprop.check.looks``: kinks, truncation, coarse rounding). A wrong
derivative keeps its error at every step, so none of these hides it, and the
comparisons without finite differences (fast against explicit, the
dot-product test) keep every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backprop.check.differences import ULP, Differences
from backprop.check.looks import Look, Numbers

__all__ = [
    "PRODUCT_NOISE",
    "Checker",
    "Comparison",
    "GradcheckError",
    "GradcheckReport",
    "entries",
    "index",
    "scalar_entry",
]

#: Rounding of a sum of products, in units of ``ULP·Σ|terms|``.
PRODUCT_NOISE = 16.0


class GradcheckError(AssertionError):
    """An analytic derivative disagrees with another computation of it."""


@dataclass
class GradcheckReport:
    """What a passing ``gradcheck`` compared, and the relative error of each comparison.

    ``mode`` is ``"entries"`` (every entry of every Jacobian) or
    ``"directions"`` (products along a few random directions). Each error is
    normwise, ``max|a - b| / max|b|`` over the entries compared; ``worst`` is
    the largest of them. (Pass or fail is decided entry by entry, with
    ``rtol``, ``atol`` and the rounding noise: see ``backprop.check.compare``.)
    ``excluded`` maps each comparison with finite differences to
    ``(entries excluded, entries of the input)``: the entries (or directions)
    where the function has a kink within the finite-difference step.
    """

    name: str
    mode: str = "entries"
    checks: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.checks.values(), default=0.0)

    def __str__(self) -> str:
        n_excluded = sum(1 for k, _ in self.excluded.values() if k)
        head = f"gradcheck {self.name} (mode {self.mode!r}): {len(self.checks)} comparisons passed"
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


def index(i: int, shape: tuple[int, ...]) -> str:
    """``[1, 3]``: flat index ``i`` of an array of ``shape`` (empty for a scalar)."""
    if not shape:
        return ""
    return "[" + ", ".join(str(int(k)) for k in np.unravel_index(i, shape)) + "]"


def entries(name: str, shape: tuple[int, ...]) -> Callable[[int, int], str]:
    """Labels of a gradient's entries: ``W[1, 3]``."""
    return lambda _r, c: name + index(c, shape)


def scalar_entry(_r: int, _c: int) -> str:
    return "(scalar)"


@dataclass
class Comparison:
    """One comparison: what it is, its two columns' names, what they are, entry labels."""

    what: str
    labels: tuple[str, str]
    legend: str
    entry: Callable[[int, int], str]


class Checker:
    """Runs comparisons under one ``rtol``/``atol`` and fills a ``GradcheckReport``."""

    def __init__(self, name: str, rtol: float, atol: float, mode: str = "entries") -> None:
        self.report = GradcheckReport(name, mode)
        self.rtol, self.atol = rtol, atol

    def _arrays(self, c: Comparison, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
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

    def compare(self, c: Comparison, a: Any, b: Any, noise: Any = 0.0) -> None:
        """``a`` against ``b``, two computations without finite differences; every entry counts."""
        a, b = self._arrays(c, a, b)
        a, b = a.reshape(1, -1), b.reshape(1, -1)
        noise = np.broadcast_to(np.asarray(noise, dtype=np.float64).reshape(1, -1), a.shape)
        allowed, scale = self._allowed(a, b, noise)
        self._judge(c, Numbers(a, b, noise, allowed, scale, np.zeros(a.shape[1], bool)))

    def compare_fd(
        self,
        c: Comparison,
        a: Any,
        fd: Differences,
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
        excluded at a kink, ``excluded`` included; with ``required=False`` a
        comparison whose columns are all excluded passes (and says so).
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
                + PRODUCT_NOISE * ULP * (np.abs(project) @ np.abs(fd.central))
            )[None, :]
        a, n = self._arrays(c, a, n)
        a = a.reshape(n.shape)
        allowed, scale = self._allowed(a, n, noise)
        x = Numbers(a, n, noise, np.array(allowed), scale, mask)
        bad = ~(np.abs(a - n) <= x.allowed) & ~mask[None, :]
        if fd.right is not None and bad.any():
            Look(fd, x, project, self.rtol, self.atol).again(bad)
        self._judge(c, x, required=required, differences=True)
        return mask

    def _judge(
        self, c: Comparison, x: Numbers, *, required: bool = True, differences: bool = False
    ) -> None:
        """Record the comparison in the report, or raise with the worst entries."""
        k, total = int(x.mask.sum()), int(x.mask.size)
        keep = np.broadcast_to(~x.mask[None, :], x.a.shape)
        err = np.abs(x.a - x.b)
        if k:
            self.report.excluded[c.what] = (k, total)
            if k == total and required:
                raise GradcheckError(
                    f"gradcheck {self.report.name}: {c.what}: could not check: all {total} "
                    f"entries lie within the finite-difference step of a kink (the function is "
                    f"not differentiable there); check it at another point"
                    + (
                        " or entry by entry (mode='entries'), which excludes only the entries "
                        "at the kink"
                        if self.report.mode == "directions"
                        else ""
                    )
                )
        # The report keeps a normwise figure, max|a - b| / max|b|: entrywise ratios
        # blow up at entries that are zero up to rounding.
        largest = float(np.abs(x.b[keep]).max(initial=0.0))
        self.report.checks[c.what] = float(err[keep].max(initial=0.0)) / max(
            largest, np.finfo(float).tiny
        )
        failed = ~(err <= x.allowed) & keep  # also catches NaN
        if failed.any():
            raise GradcheckError(self._message(c, x, failed, int(keep.sum()), differences))

    def _message(
        self, c: Comparison, x: Numbers, failed: np.ndarray, kept: int, differences: bool
    ) -> str:
        """The two computations side by side at the worst entries."""
        err = np.abs(x.a - x.b)
        ratio = np.where(failed, np.nan_to_num(err / x.allowed, nan=np.inf, posinf=np.inf), -1.0)
        worst = np.argsort(-ratio, axis=None, kind="stable")[:6]
        worst = worst[ratio.ravel()[worst] >= 0]
        la, lb = c.labels
        cells = [
            (
                c.entry(*divmod(int(i), x.a.shape[1])),
                x.a.flat[i],
                x.b.flat[i],
                err.flat[i],
                x.allowed.flat[i],
            )
            for i in worst
        ]
        width = max(len("entry"), *(len(cell[0]) for cell in cells))
        rows = [f"  {'entry':<{width}}  {la:>22}  {lb:>22}  {'abs err':>9}  {'allowed':>9}"]
        rows += [
            f"  {e:<{width}}  {p:>22.15g}  {q:>22.15g}  {d:>9.2e}  {t:>9.2e}"
            for e, p, q, d, t in cells
        ]
        k, total = int(x.mask.sum()), int(x.mask.size)
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
        return (
            f"gradcheck {self.report.name}: {c.what} disagree at {int(failed.sum())} of "
            f"{kept} entries; worst entries:\n"
            f"  {c.legend}\n"
            f"  allowed = rtol·|{lb}| + atol·{x.scale:.3g} (the largest entry) + rounding noise "
            f"(up to {float(x.noise.max(initial=0.0)):.2g}); rtol={self.rtol:g}, "
            f"atol={self.atol:g}{note}\n" + "\n".join(rows)
        )


def require_float64(
    name: str, inputs: dict[str, np.ndarray], params: dict[str, Any], fix: str
) -> None:
    """A ``TypeError`` for a float input or a parameter that is not float64: finite
    differences in float32 prove nothing. ``fix`` says how to build a float64 model."""
    for label, x in inputs.items():
        if x.dtype.kind == "f" and x.dtype != np.float64:  # labels, masks: no gradient
            raise TypeError(
                f"gradcheck {name}: input {label} is {x.dtype}; gradcheck runs in float64 "
                f"(finite differences in float32 prove nothing)"
            )
    for label, p in params.items():
        if p.dtype != np.float64:
            raise TypeError(
                f"gradcheck {name}: parameter {label!r} is {p.dtype}; {fix} in float64 to check it"
            )
