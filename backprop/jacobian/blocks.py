"""``DiagonalBlocks``: a grid of diagonal blocks, and its rules.

A gated unit (an LSTM cell) mixes several vectors of the same length ``n`` entry by
entry: ``c' = f ⊙ c + i ⊙ g``. The Jacobian of such a map is a grid of ``R × C``
blocks, each an ``n × n`` diagonal: block ``(r, c)`` says how entry ``k`` of input
vector ``c`` moves entry ``k`` of output vector ``r``, and no other entry. A
``Diagonal`` is the grid ``1 × 1``. Every product costs ``O(R C n)`` per example,
and the chain rule keeps the form: two grids multiply block by block, as matrices
of diagonals do.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import compose_rule, sum_rule
from backprop.jacobian.base import Jacobian, product_label, sum_label
from backprop.jacobian.basic import Diagonal

__all__ = ["DiagonalBlocks"]


class DiagonalBlocks(Jacobian):
    """``R × C`` blocks of ``n × n`` diagonals per example: ``(R·n, C·n)``.

    ``d`` is ``(B, R, C, n)``: block ``(r, c)`` of example ``b`` is ``diag(d[b, r, c])``,
    so entry ``(r·n + k, c·n + k)`` holds ``d[b, r, c, k]`` and every other entry is 0.
    ``g L`` is ``Σ_r g_r ⊙ d_rc`` for each column block ``c``; ``L u`` is
    ``Σ_c d_rc ⊙ u_c`` for each row block ``r``. Every block is stored (a zero block
    too), so ``nnz`` is ``R·C·n``.
    """

    kind = "DiagonalBlocks"

    def __init__(self, d: np.ndarray, label: str = "grid of diagonals") -> None:
        if d.ndim != 4:
            raise ValueError(f"DiagonalBlocks: d must have shape (B, R, C, n), got {d.shape}")
        B, R, C, n = d.shape
        super().__init__((R * n, C * n), B, d.dtype, label)
        self.d = d

    @property
    def grid(self) -> tuple[int, int, int]:
        """``(R, C, n)``: row blocks, column blocks, the size of each diagonal."""
        _, R, C, n = self.d.shape
        return R, C, n

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        B, R, C, n = self.d.shape
        return np.einsum("brn,brcn->bcn", g.reshape(B, R, n), self.d).reshape(B, C * n)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        B, R, C, n = self.d.shape
        return np.einsum("brn,brcn->cn", g.reshape(B, R, n), self.d).ravel()

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        B, R, C, n = self.d.shape
        return np.einsum("brcn,bcn->brn", self.d, u.reshape(B, C, n)).reshape(B, R * n)

    def _dense(self) -> np.ndarray:
        B, R, C, n = self.d.shape
        out = np.zeros((B, R, n, C, n), dtype=self.dtype)
        k = np.arange(n)
        out[:, :, k, :, k] = self.d.transpose(3, 0, 1, 2)  # the indexed axis comes first
        return out.reshape(B, R * n, C * n)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        _, R, C, n = self.d.shape
        r, c, k = np.indices((R, C, n)).reshape(3, -1)
        S = sp.coo_array((self.d[b].ravel(), (r * n + k, c * n + k)), shape=self.shape)
        return sp.csr_array(S)

    @property
    def nnz(self) -> int:
        _, R, C, n = self.d.shape
        return R * C * n

    def _details(self) -> str:
        R, C, n = self.grid
        return f" ({R}×{C} blocks of {n}×{n} diagonals)"


# -- rules ---------------------------------------------------------------------------


def _fits(outer: DiagonalBlocks, inner: DiagonalBlocks) -> bool:
    return outer.grid[2] == inner.grid[2]


@compose_rule(DiagonalBlocks, DiagonalBlocks)
def _blocks_blocks(outer: DiagonalBlocks, inner: DiagonalBlocks) -> Jacobian | None:
    """Diagonals multiply entry by entry, so the grids multiply as matrices of them."""
    if not _fits(outer, inner):
        return None
    d = np.einsum("brkn,bkcn->brcn", outer.d, inner.d)
    return DiagonalBlocks(d, product_label(outer, inner))


@compose_rule(Diagonal, DiagonalBlocks)
def _diagonal_blocks(outer: Diagonal, inner: DiagonalBlocks) -> Jacobian:
    """``diag(s)`` after a grid scales each row block by its part of ``s``."""
    B, R, C, n = inner.d.shape
    d = outer.d.reshape(B, R, 1, n) * inner.d
    return DiagonalBlocks(d, product_label(outer, inner))


@compose_rule(DiagonalBlocks, Diagonal)
def _blocks_diagonal(outer: DiagonalBlocks, inner: Diagonal) -> Jacobian:
    """``diag(s)`` before a grid scales each column block by its part of ``s``."""
    B, R, C, n = outer.d.shape
    d = outer.d * inner.d.reshape(B, 1, C, n)
    return DiagonalBlocks(d, product_label(outer, inner))


@sum_rule(DiagonalBlocks, DiagonalBlocks)
def _blocks_plus_blocks(a: DiagonalBlocks, b: DiagonalBlocks) -> Jacobian | None:
    if a.d.shape != b.d.shape:
        return None
    return DiagonalBlocks(a.d + b.d, sum_label(a, b))
