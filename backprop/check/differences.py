"""Finite differences: central and one-sided, entry by entry or along directions.

The step of entry ``j`` is ``h_j = eps·max(1, |x_j|)``: an absolute step near 0
and a relative one for large entries, where a fixed step would drown in the
rounding of ``f``. ``numerical_jacobian`` gives a Jacobian in the layout of
``Jacobian.to_dense()``; ``Differences`` is what ``gradcheck`` uses, with the
one-sided differences and the rounding noise it needs to tell a wrong
derivative from a kink.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

__all__ = ["FD_NOISE", "ULP", "Differences", "along", "numerical_jacobian", "ravel"]

#: The spacing of float64 numbers at 1.
ULP = 2.0**-52
#: Rounding of a function value, in units of ``ULP·max|f|``.
FD_NOISE = 4.0


def ravel(y: Any) -> np.ndarray:
    """A function value as one float64 vector (several outputs one after the other)."""
    if isinstance(y, tuple | list):
        parts = [np.asarray(v, dtype=np.float64).ravel() for v in y]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(y, dtype=np.float64).ravel()


class Differences:
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
        self.f0 = ravel(f(self._x)) if one_sided or flat.size == 0 else None
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
        self.noise = FD_NOISE * ULP * fmax / self.steps
        #: True for differences along directions (``along``), which move every entry.
        self.directional = False
        self._more: dict[tuple[int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _pair(self, j: int, h: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        flat = self._x.reshape(-1)
        orig = float(flat[j])
        flat[j] = orig + h
        hp = float(flat[j]) - orig
        plus = ravel(self._f(self._x))
        flat[j] = orig - h
        hm = orig - float(flat[j])
        minus = ravel(self._f(self._x))
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


def along(
    f: Callable[[np.ndarray], Any], z: np.ndarray, us: Sequence[np.ndarray], eps: float
) -> Differences:
    """Differences of ``t ↦ f(z + Σ_k t_k·u_k)`` at ``t = 0``: column ``k`` is along ``u_k``.

    Each ``u_k`` (of ``z``'s shape) already carries the scale of each entry, so
    the step in ``t_k`` is ``eps``; one column costs two evaluations of ``f``
    whatever the size of ``z``.
    """
    z = np.asarray(z, dtype=np.float64)
    stack = np.stack([np.asarray(u, dtype=np.float64) for u in us])

    def moved(t: np.ndarray) -> Any:
        return f(z + np.tensordot(t, stack, axes=1))

    fd = Differences(moved, np.zeros(len(stack)), eps)
    fd.directional = True
    return fd


def numerical_jacobian(
    f: Callable[[np.ndarray], Any],
    x: np.ndarray,
    eps: float = 1e-6,
    *,
    wrt_batch: bool = True,
    flat: bool = False,
) -> np.ndarray:
    """The Jacobian of ``f`` at ``x`` by float64 central differences, as ``to_dense()`` lays it out.

    The layout is that of ``Jacobian.to_dense()``, ``(B, M, N)``, with ``M`` and
    ``N`` the entries of one example (C order):

    - ``x`` of shape ``(B, ...)`` and ``f(x)`` of shape ``(B, ...)``: block ``b``
      is ``∂f(x)[b]/∂x[b]``. An ``f`` that couples the examples (one whose
      ``f(x)[b]`` moves with ``x[b']``) is refused: its blocks are not its
      whole Jacobian (use ``flat=True``);
    - ``f(x)`` a scalar (a cost, the mean over the batch): row ``b`` is
      ``∂f/∂x[b]``, shape ``(B, 1, N)``: a loss's per-example rows, which add up
      to the batch gradient;
    - ``wrt_batch=False``: ``x`` has no batch axis (a parameter ``θ``), and the
      result is ``(B, M, |θ|)`` with ``B`` from the output (``(1, 1, |θ|)`` for
      a scalar ``f``);
    - ``flat=True``: the whole batch matrix, ``(f(x).size, x.size)``, row ``i``
      an output entry and column ``j`` an input entry (a tuple of outputs counts
      as their entries one after the other): for coupled examples and for
      several outputs.

    For example, with ``B = 2`` examples of 2 entries:

    >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> numerical_jacobian(lambda v: v**2, x).round(6)  # block b: diag(2·x[b])
    array([[[2., 0.],
            [0., 4.]],
    <BLANKLINE>
           [[6., 0.],
            [0., 8.]]])
    >>> numerical_jacobian(lambda v: (v**2).sum() / 2, x).round(6)  # rows of ∂J/∂x[b]
    array([[[1., 2.]],
    <BLANKLINE>
           [[3., 4.]]])
    >>> numerical_jacobian(lambda v: v**2, x, flat=True).shape
    (4, 4)

    Entry ``j`` moves by ``h_j = eps·max(1, |x_j|)``. ``x`` is not changed.
    """
    x = np.asarray(x)
    full = Differences(f, x, eps, one_sided=False).central
    if flat:
        return full
    y = f(np.array(x, dtype=np.float64, copy=True))
    if isinstance(y, tuple | list):
        raise TypeError(
            f"numerical_jacobian: f returns {len(y)} outputs; pass flat=True for the Jacobian "
            f"of their entries one after the other, shape ({full.shape[0]}, {x.size})"
        )
    y_shape = np.shape(y)
    if not wrt_batch:
        B = y_shape[0] if y_shape else 1
        return full.reshape(B, -1, x.size)
    if x.ndim == 0:
        raise ValueError(
            "numerical_jacobian: x is a scalar, with no batch axis; pass wrt_batch=False "
            "(or flat=True)"
        )
    B, N = x.shape[0], x.size // max(x.shape[0], 1)
    if not y_shape:
        return full.reshape(1, B, N).transpose(1, 0, 2)
    if y_shape[0] != B:
        raise ValueError(
            f"numerical_jacobian: x has shape {x.shape} (B = {B}) but f(x) has shape {y_shape}; "
            f"the per-example layout needs the same batch axis in both (wrt_batch=False for a "
            f"parameter, flat=True for the whole matrix)"
        )
    blocks = full.reshape(B, -1, B, N).transpose(0, 2, 1, 3)  # (b_out, b_in, M, N)
    diagonal = blocks[np.arange(B), np.arange(B)]
    off = np.abs(blocks).sum(axis=(2, 3)) * (1 - np.eye(B))
    if off.any():
        b_out, b_in = np.unravel_index(int(np.argmax(off)), off.shape)
        raise ValueError(
            f"numerical_jacobian: f couples the examples: f(x)[{b_out}] moves with x[{b_in}], "
            f"so the per-example blocks are not the whole Jacobian; pass flat=True for the "
            f"whole batch matrix, shape {full.shape}"
        )
    return diagonal
