"""The second look: differences at other steps where an entry disagrees.

Where an entry disagrees with the central difference, the checker looks
again, at other steps for that entry only, before it calls the entry wrong
(``f(x)`` itself is evaluated once):

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

A wrong derivative keeps its error at every step, so none of these hides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from backprop.check.differences import Differences

__all__ = ["Look", "Numbers"]


@dataclass
class Numbers:
    """The numbers of one comparison, ``(rows, columns)`` each.

    ``a`` is the analytic side and ``b`` the other computation; ``allowed`` is
    the tolerance of each entry and ``noise`` its rounding part; ``scale`` the
    largest entry compared; ``mask`` the columns excluded at a kink. A second
    look refines ``b`` and ``allowed`` and extends ``mask``, in place.
    """

    a: np.ndarray
    b: np.ndarray
    noise: np.ndarray
    allowed: np.ndarray
    scale: float
    mask: np.ndarray


@dataclass
class Look:
    """Differences of ``fd`` (of ``project · f`` when given) at other steps for ``x``."""

    fd: Differences
    x: Numbers
    project: np.ndarray | None
    rtol: float
    atol: float

    def slopes(self, j: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column ``j`` of the central, right and left differences at ``factor·h_j``."""
        columns = self.fd.at(j, factor)
        if self.project is None:
            return columns
        c0, c1, c2 = (np.atleast_1d(self.project @ col) for col in columns)
        return c0, c1, c2

    def again(self, bad: np.ndarray) -> None:
        """Differences at other steps for the columns with disagreeing entries.

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
        of the central difference and of the gap); along a direction, only where
        the function behaves smoothly (``_along_direction``). What still
        disagrees gets the wide look (``wide``).
        """
        right, left = cast(np.ndarray, self.fd.right), cast(np.ndarray, self.fd.left)
        if self.project is not None:
            right, left = (self.project @ right)[None, :], (self.project @ left)[None, :]
        smooth: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for j in (int(j) for j in np.flatnonzero(bad.any(axis=0))):
            rows = np.flatnonzero(bad[:, j])
            central_h, right_h, left_h = self.slopes(j, 0.5)
            gap = right[rows, j] - left[rows, j]
            steady = np.minimum(
                np.abs(right[rows, j] - right_h[rows]), np.abs(left[rows, j] - left_h[rows])
            )
            if self._kink(j, rows, gap, steady):
                self.x.mask[j] = True
                continue
            odd = np.abs(self.x.b[rows, j] - central_h[rows])
            even = np.abs(gap - 2 * (right_h[rows] - left_h[rows]))
            smooth.append((j, rows, central_h[rows], np.maximum(odd, even)))
        if smooth:
            self._extrapolate(smooth)

    def _kink(self, j: int, rows: np.ndarray, gap: np.ndarray, steady: np.ndarray) -> bool:
        """Whether the disagreeing entries ``rows`` of column ``j`` sit at a kink."""
        x = self.x
        err = np.abs(x.a[rows, j] - x.b[rows, j])
        g, eta = np.abs(gap), x.noise[rows, j]
        kink = (g + x.allowed[rows, j] >= err) & (g > 64 * eta) & (g > 16 * steady)
        if kink.any():
            # The jump persists at wider steps, without the growth of curvature.
            _, right_w, left_w = self.slopes(j, 64.0)
            _, right_m, left_m = self.slopes(j, 32.0)
            gap_w, gap_m = right_w[rows] - left_w[rows], right_m[rows] - left_m[rows]
            kink &= (gap_w * gap > 0) & (np.abs(gap_w) >= g / 2)
            kink &= np.abs(gap_w - gap_m) <= np.abs(gap_w) / 4
        return bool(kink.any())

    def _extrapolate(self, smooth: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Compare with ``(4·c(h/2) - c(h)) / 3``; the rest gets the wide look."""
        x = self.x
        # The amplitude of rounding that would explain the errors, in units of f.
        amplitude = max(
            float((np.abs(x.a[rows, k] - x.b[rows, k]) * self.fd.steps[k]).max())
            for k, rows, _, _ in smooth
        )
        still = []
        for k, rows, central_h, rough in smooth:
            if self.fd.directional:
                refined, slack = self._along_direction(k, rows, central_h, rough)
                if x.mask[k]:
                    continue  # kinks all along the step: this direction cannot check
            else:
                refined = (4 * central_h - x.b[rows, k]) / 3
                slack = 3 * x.noise[rows, k] + 16 * rough
            x.b[rows, k] = refined
            x.allowed[rows, k] = self.rtol * np.abs(refined) + self.atol * x.scale + slack
            failing = ~(np.abs(x.a[rows, k] - refined) <= x.allowed[rows, k])
            if failing.any():
                still.append((k, rows[failing]))
        for k, rows in still:
            self.wide(k, rows, amplitude)

    def _along_direction(
        self, k: int, rows: np.ndarray, central_h: np.ndarray, rough: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(the difference to compare with, its slack)`` along direction ``k``.

        A direction moves every entry at once, so within its step it may cross
        many kinks (every ReLU unit and max-pooling window of a network), which
        neither the kink test nor the extrapolation's slack is made for: a kink
        between ``h/2`` and ``h`` spoils ``c(h)`` and makes the change ``rough``
        large, which would hide a wrong derivative. So the step shrinks until the
        function is linear on it: where ``c(s)`` and ``c(s/2)`` agree to rounding
        (``s`` = ``h/2``, ``h/16``, ``h/128``), ``c(s/2)`` is compared without
        slack for truncation. Where instead the change shrinks as a smooth
        function's does (about four-fold from one halving to the next, or stays
        at rounding), the extrapolation gets its usual slack, as entry by entry.
        Otherwise the direction crosses kinks at every step tried: it is excluded
        (counted in the report), as an entry at a kink is.
        """
        x = self.x
        c_h, noise = x.b[rows, k], x.noise[rows, k]
        c_q = self.slopes(k, 0.25)[0][rows]
        near, far = np.abs(central_h - c_q), np.abs(c_h - central_h)
        # Smooth: the change from h/2 to h/4 is about a quarter of that from h to h/2
        # (or both are rounding). A kink between h/2 and h instead leaves c(h/2) and
        # c(h/4) equal and c(h) far off: that is tried below, with the smaller steps.
        if bool(np.all((near <= far / 2) & (far <= 8 * near + 24 * noise))):
            return (4 * central_h - c_h) / 3, 3 * noise + 16 * rough
        pairs = [(central_h, c_q, 4.0)]
        pairs += [
            (self.slopes(k, f)[0][rows], self.slopes(k, f / 2)[0][rows], 2 / f)
            for f in (1 / 16, 1 / 128)
        ]
        for wide, narrow, scale in pairs:
            change = np.abs(wide - narrow)
            if bool(np.all(change <= self.rtol * np.abs(narrow) + 6 * scale * noise)):
                return narrow, 4 * scale * noise + change  # linear on [-s, s]
        x.mask[k] = True
        return c_h, np.zeros_like(c_h)

    def wide(self, k: int, rows: np.ndarray, amplitude: float) -> None:
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
        x = self.x
        for factor in (16.0, 64.0):
            c_wide = self.slopes(k, factor)[0][rows]
            c_mid = self.slopes(k, factor / 2)[0][rows]
            H = factor * self.fd.steps[k]
            prior = (
                self.rtol * np.abs(c_wide)
                + self.atol * x.scale
                + x.noise[rows, k] / factor
                + 4 * amplitude / H
            )
            change = np.abs(c_wide - c_mid)
            ok = (change <= prior) & (np.abs(x.a[rows, k] - c_wide) <= prior + 2 * change)
            x.b[rows[ok], k] = c_wide[ok]
            x.allowed[rows[ok], k] = (prior + 2 * change)[ok]
            rows = rows[~ok]
            if not rows.size:
                return
