"""Placing, copying and picking: ``Selection``, ``Tile``, ``Rows``, and their rules.

All three are 0-1 matrices shared by the batch, with at most one 1 per row
and per column block: their products are slicing, summing and copying.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import compose_rule
from backprop.jacobian.base import Jacobian, product_label
from backprop.jacobian.basic import Identity, Sparse

__all__ = ["Rows", "Selection", "Tile"]


def _eye_block(m: int, offset: int, n: int, dtype: Any, rows: bool) -> sp.csr_array:
    """``[0 I 0]`` (``rows``: ``n × m``, picking) or its transpose ``[0; I; 0]``."""
    picked = np.arange(offset, offset + n)
    data = np.ones(n, dtype=dtype)
    if rows:
        return sp.csr_array((data, (np.arange(n), picked)), shape=(n, m))
    return sp.csr_array((data, (picked, np.arange(n))), shape=(m, n))


class Selection(Jacobian):
    """Places an ``n``-vector at rows ``offset .. offset+n`` of an ``m``-vector.

    The Jacobian of one input of a merge (eq. 14.41): ``[I; 0]`` for the first
    input, ``[0; I]`` for the second; ``g L`` picks the matching slice of ``g``.
    """

    kind = "Selection"
    shared = True

    def __init__(
        self, m: int, offset: int, n: int, batch: int, dtype: Any = np.float64, label: str = ""
    ) -> None:
        if not 0 <= offset <= m - n:
            raise ValueError(f"Selection: rows {offset}..{offset + n} do not fit in {m}")
        label = label or f"rows {offset}..{offset + n - 1} of [I; 0]"
        super().__init__((m, n), batch, dtype, label)
        self.offset = offset

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return g[:, self.offset : self.offset + self.shape[1]]

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        out = np.zeros((u.shape[0], self.shape[0]), dtype=np.result_type(u, self.dtype))
        out[:, self.offset : self.offset + self.shape[1]] = u
        return out

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        m, n = self.shape
        return _eye_block(m, self.offset, n, self.dtype, rows=False)

    @property
    def nnz(self) -> int:
        return self.shape[1]


class Tile(Jacobian):
    """``[I; I; ...; I]`` (``copies`` blocks): the Jacobian of a branch (eq. 14.45)."""

    kind = "Tile"
    shared = True

    def __init__(self, copies: int, n: int, batch: int, dtype: Any = np.float64) -> None:
        label = "; ".join(["I"] * copies) if copies <= 4 else f"I; I; …; I ({copies} copies)"
        super().__init__((copies * n, n), batch, dtype, f"[{label}]")
        self.copies = copies

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return g.reshape(g.shape[0], self.copies, self.shape[1]).sum(axis=1)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return np.tile(u, (1, self.copies))

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        n = self.shape[1]
        rows = np.arange(self.copies * n)
        data = np.ones(self.copies * n, dtype=self.dtype)
        return sp.csr_array((data, (rows, rows % n)), shape=self.shape)

    @property
    def nnz(self) -> int:
        return self.shape[0]


class Rows(Jacobian):
    """Picks entries ``offset .. offset+n-1`` of an ``m``-vector: ``[0 I 0]``, ``n × m``.

    The transpose of ``Selection``. A graph takes output ``k`` of a layer whose
    Jacobian stacks its outputs (a ``Branch``, whose ``L^x`` is a ``Tile``) as
    ``Rows_k @ L``: ``g L`` scatters ``g`` into a zero vector of ``m``.
    """

    kind = "Rows"
    shared = True

    def __init__(
        self, m: int, offset: int, n: int, batch: int, dtype: Any = np.float64, label: str = ""
    ) -> None:
        if not 0 <= offset <= m - n:
            raise ValueError(f"Rows: entries {offset}..{offset + n} do not fit in {m}")
        label = label or f"entries {offset}..{offset + n - 1} of {m}: [0 I 0]"
        super().__init__((n, m), batch, dtype, label)
        self.offset = offset

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        out = np.zeros((g.shape[0], self.shape[1]), dtype=np.result_type(g, self.dtype))
        out[:, self.offset : self.offset + self.shape[0]] = g
        return out

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return u[:, self.offset : self.offset + self.shape[0]]

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        n, m = self.shape
        return _eye_block(m, self.offset, n, self.dtype, rows=True)

    @property
    def nnz(self) -> int:
        return self.shape[0]


# -- rules ---------------------------------------------------------------------------


@compose_rule(Rows, Tile)
def _rows_of_tile(outer: Rows, inner: Tile) -> Jacobian | None:
    """Entries within one copy: ``Identity`` for a whole copy, else ``Rows`` of one.

    Entries that straddle two copies get the generic ``Product``.
    """
    n, size = outer.shape[0], inner.shape[1]
    start = outer.offset % size
    if start + n > size:
        return None
    if n == size:
        return Identity(n, outer.batch, np.result_type(outer.dtype, inner.dtype))
    return Rows(size, start, n, outer.batch, outer.dtype, product_label(outer, inner))


@compose_rule(Rows, Selection)
def _rows_of_selection(outer: Rows, inner: Selection) -> Jacobian:
    """``Identity`` when the picked entries are exactly the placed block.

    Otherwise the (shared, at most ``n``-entry) ``Sparse`` product: empty, a zero
    matrix, when the two ranges do not overlap.
    """
    dtype = np.result_type(outer.dtype, inner.dtype)
    if outer.offset == inner.offset and outer.shape[0] == inner.shape[1]:
        return Identity(outer.shape[0], outer.batch, dtype)
    S = (outer.to_sparse(0) @ inner.to_sparse(0)).astype(dtype)
    return Sparse(S, outer.batch, product_label(outer, inner))


@compose_rule(Rows, Rows)
def _rows_of_rows(outer: Rows, inner: Rows) -> Jacobian:
    """Picking from a pick is one pick: the offsets add."""
    n, m = outer.shape[0], inner.shape[1]
    offset = inner.offset + outer.offset
    return Rows(m, offset, n, outer.batch, outer.dtype, product_label(outer, inner))
