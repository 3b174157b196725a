"""Diagonal plus low rank: ``diag(d_b) + U_b V_bᵀ`` per example, and its rules.

Softmax's Jacobian ``diag(p) − p pᵀ`` is ``d = p, U = −p, V = p`` (rank 1);
LayerNorm's is a diagonal plus rank 2. Every product costs ``O(N r)`` per
example, and the rules below keep the form under the chain rule and sums.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import compose_rule, sum_rule
from backprop.jacobian.base import Jacobian, product_label, sum_label
from backprop.jacobian.basic import Diagonal, Identity

__all__ = ["DiagonalPlusLowRank"]


class DiagonalPlusLowRank(Jacobian):
    """``diag(d_b) + U_b V_bᵀ`` per example, ``N × N``.

    ``d`` is ``(B, N)``; ``U`` and ``V`` are ``(B, N, r)``. The matrix is stored
    whole by ``to_sparse`` (it is dense in general), so ``nnz`` is ``N²``.
    """

    kind = "DiagonalPlusLowRank"

    def __init__(self, d: np.ndarray, U: np.ndarray, V: np.ndarray, label: str = "") -> None:
        if d.ndim != 2 or U.shape != V.shape or U.shape[:2] != d.shape or U.ndim != 3:
            raise ValueError(
                f"DiagonalPlusLowRank: d must be (B, N) and U, V (B, N, r), got "
                f"{d.shape}, {U.shape}, {V.shape}"
            )
        B, N = d.shape
        super().__init__((N, N), B, np.result_type(d, U, V), label or "diag(d) + U Vᵀ")
        self.d, self.U, self.V = d, U, V

    @classmethod
    def softmax(cls, p: np.ndarray) -> DiagonalPlusLowRank:
        """``diag(p) − p pᵀ``, the Jacobian of softmax at output ``p`` ``(B, N)``."""
        return cls(p, -p[:, :, None], p[:, :, None], "diag(p) − p pᵀ")

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        gU = np.einsum("bn,bnr->br", g, self.U)
        return g * self.d + np.einsum("br,bnr->bn", gU, self.V)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        Vu = np.einsum("bnr,bn->br", self.V, u)
        return u * self.d + np.einsum("bnr,br->bn", self.U, Vu)

    def _dense(self) -> np.ndarray:
        out = np.matmul(self.U, self.V.transpose(0, 2, 1)).astype(self.dtype, copy=False)
        n = self.shape[0]
        out[:, np.arange(n), np.arange(n)] += self.d
        return out

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        dense = self.U[b] @ self.V[b].T + np.diag(self.d[b])
        return sp.csr_array(dense.astype(self.dtype, copy=False))

    def stacked_sparse(self) -> sp.csr_array:
        return sp.csr_array(self._dense().reshape(self.batch * self.shape[0], self.shape[1]))

    @property
    def nnz(self) -> int:
        return self.shape[0] * self.shape[1]

    def _details(self) -> str:
        return f" (rank {self.rank})"


# -- rules ---------------------------------------------------------------------------

DPLR = DiagonalPlusLowRank


@compose_rule(Diagonal, DPLR)
def _diagonal_at_dplr(outer: Diagonal, inner: DPLR) -> Jacobian:
    """``diag(a) (diag(d) + U Vᵀ) = diag(a d) + (a U) Vᵀ``."""
    a = outer.d[:, :, None]
    return DPLR(outer.d * inner.d, a * inner.U, inner.V, product_label(outer, inner))


@compose_rule(DPLR, Diagonal)
def _dplr_at_diagonal(outer: DPLR, inner: Diagonal) -> Jacobian:
    """``(diag(d) + U Vᵀ) diag(a) = diag(d a) + U (a V)ᵀ``."""
    a = inner.d[:, :, None]
    return DPLR(outer.d * inner.d, outer.U, a * outer.V, product_label(outer, inner))


@compose_rule(DPLR, DPLR)
def _dplr_at_dplr(outer: DPLR, inner: DPLR) -> Jacobian:
    """``(D₁ + U₁V₁ᵀ)(D₂ + U₂V₂ᵀ) = D₁D₂ + [D₁U₂ + U₁(V₁ᵀU₂), U₁] [V₂, D₂V₁]ᵀ``: rank r₁ + r₂."""
    d1, U1, V1 = outer.d, outer.U, outer.V
    d2, U2, V2 = inner.d, inner.U, inner.V
    left = d1[:, :, None] * U2 + np.matmul(U1, np.matmul(V1.transpose(0, 2, 1), U2))
    U = np.concatenate([left, U1], axis=2)
    V = np.concatenate([V2, d2[:, :, None] * V1], axis=2)
    return DPLR(d1 * d2, U, V, product_label(outer, inner))


@sum_rule(DPLR, DPLR)
def _dplr_plus_dplr(a: DPLR, b: DPLR) -> Jacobian:
    """The diagonals add; the low-rank factors stand side by side (rank r₁ + r₂)."""
    U = np.concatenate([a.U, b.U], axis=2)
    V = np.concatenate([a.V, b.V], axis=2)
    return DPLR(a.d + b.d, U, V, sum_label(a, b))


@sum_rule(DPLR, Diagonal)
def _dplr_plus_diagonal(a: DPLR, b: Diagonal) -> Jacobian:
    return DPLR(a.d + b.d, a.U, a.V, sum_label(a, b))


@sum_rule(DPLR, Identity)
def _dplr_plus_identity(a: DPLR, b: Identity) -> Jacobian:
    return DPLR(a.d + 1, a.U, a.V, sum_label(a, b))
