"""Kronecker structures of linear maps: ``Kronecker``, ``KroneckerMatrix``,
``RepeatedBlock``, ``BlockKronecker``.

A linear map ``x_out = W x_in`` has ``L^W`` built from ``x_in`` and ``L^x``
built from ``W``; when ``W`` acts on every position (token, pixel) of an
example, both repeat along the positions. A product of two data matrices
``Y = A C`` (attention's ``Q Kᵀ`` and ``A V``) is linear in each factor, and
each of its two Jacobians is a Kronecker product with an identity
(``BlockKronecker``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import compose_rule, sum_rule
from backprop.jacobian.base import Jacobian, csr, product_label, sum_label

__all__ = ["BlockKronecker", "Kronecker", "KroneckerMatrix", "RepeatedBlock"]


class Kronecker(Jacobian):
    """``I_M ⊗ x_bᵀ`` per example: the weight Jacobian ``L^W`` of eq. 14.14.

    Column ``j*N + k`` stands for ``W[j, k]`` (``W`` flattened row by row, as
    numpy does), so ``L^W[i, jk] = x_in[k]`` where ``i == j`` and 0 elsewhere.
    ``g L^W`` is the outer product ``g_bᵀ x_b`` (eq. 14.29, transposed to ``W``'s
    shape), and its sum over the batch is one matrix product ``gᵀ x``.
    """

    kind = "Kronecker"

    def __init__(self, m: int, x: np.ndarray, label: str = "I ⊗ x_inᵀ") -> None:
        if x.ndim != 2:
            raise ValueError(f"Kronecker: x must have shape (B, N), got {x.shape}")
        super().__init__((m, m * x.shape[1]), x.shape[0], x.dtype, label)
        self.m = m
        self.x = x

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        B, n = self.x.shape
        return (g[:, :, None] * self.x[:, None, :]).reshape(B, self.m * n)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return (g.T @ self.x).ravel()

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        B, n = self.x.shape
        return np.matmul(u.reshape(B, self.m, n), self.x[:, :, None])[:, :, 0]

    def _dense(self) -> np.ndarray:
        B, n = self.x.shape
        out = np.zeros((B, self.m, self.m, n), dtype=self.dtype)
        idx = np.arange(self.m)
        out[:, idx, idx, :] = self.x[:, None, :]
        return out.reshape(B, self.m, self.m * n)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        eye = sp.eye_array(self.m, dtype=self.dtype)
        return sp.csr_array(sp.kron(eye, self.x[b][None, :], format="csr"))

    def stacked_sparse(self) -> sp.csr_array:
        # Row b*m + i holds x_b at columns i*n .. i*n + n-1.
        B, n = self.x.shape
        m = self.m
        data = np.broadcast_to(self.x[:, None, :], (B, m, n)).ravel()
        return csr(data, np.tile(np.arange(m * n), B), n, (B * m, m * n))

    @property
    def nnz(self) -> int:
        return self.shape[1]


_ROW_ORDERS = ("positions", "channels")


class _EqualRows(Jacobian):
    """A Jacobian built from a per-example factor ``(B, ..., n)`` whose every row stores
    ``n`` entries, listed by ``_entries`` for some of the examples: its sparse forms."""

    def _factor(self) -> np.ndarray:
        raise NotImplementedError  # abstract

    def _entries(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # abstract: (data, indices) row after row

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        F = self._factor()
        data, indices = self._entries(F[b : b + 1])
        return csr(data, indices, F.shape[-1], self.shape)

    def stacked_sparse(self) -> sp.csr_array:
        F = self._factor()
        data, indices = self._entries(F)
        return csr(data, indices, F.shape[-1], (self.batch * self.shape[0], self.shape[1]))


class KroneckerMatrix(_EqualRows):
    """``L^W`` of ``out[i, p] = Σ_k W[i, k] X_b[p, k]``, per example ``(m·P, m·N)``.

    ``X`` is ``(B, P, N)``: per example ``P`` positions of ``N`` inputs each; ``W``
    is ``(m, N)``, and column ``j*N + k`` stands for ``W[j, k]`` (row-major).
    ``L[(i, p), (j, k)] = δ_ij X_b[p, k]``. ``rows`` orders the output entries:

    - ``"positions"`` (positions-major, row ``p*m + i``): the output is ``(P, m)``,
      as a ``Linear`` applied to every token of ``(B, T, n)``;
    - ``"channels"`` (channels-major, row ``i*P + p``): the output is ``(m, P)``,
      and the matrix is exactly ``I_m ⊗ X_b``: with ``X_b = X_colᵀ`` (the im2col
      patches) this is ``L^W`` of a convolution with output ``(c_out, H·W)``.

    ``Kronecker`` is the case ``P = 1``. ``g L`` is ``G_bᵀ X_b`` per example
    (``G_b`` is ``g_b`` as ``(P, m)``), and its sum over the batch is one matrix
    product ``Gᵀ X`` over all ``B·P`` rows.
    """

    kind = "KroneckerMatrix"

    def __init__(
        self, m: int, X: np.ndarray, *, rows: str = "positions", label: str = "I ⊗ X_b"
    ) -> None:
        if X.ndim != 3:
            raise ValueError(f"KroneckerMatrix: X must have shape (B, P, N), got {X.shape}")
        if rows not in _ROW_ORDERS:
            raise ValueError(f"KroneckerMatrix: rows must be one of {_ROW_ORDERS}, got {rows!r}")
        B, P, N = X.shape
        super().__init__((m * P, m * N), B, X.dtype, label)
        self.m, self.X, self.rows = m, X, rows

    def _g(self, g: np.ndarray) -> np.ndarray:
        """``g`` as ``(B, P, m)``: one row of ``m`` output entries per position."""
        B, P, _ = self.X.shape
        if self.rows == "positions":
            return g.reshape(B, P, self.m)
        return g.reshape(B, self.m, P).transpose(0, 2, 1)

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        G = self._g(g)
        return np.matmul(G.transpose(0, 2, 1), self.X).reshape(self.batch, -1)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        B, P, N = self.X.shape
        G = self._g(g).reshape(B * P, self.m)
        return (G.T @ self.X.reshape(B * P, N)).ravel()

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        U = u.reshape(self.batch, self.m, -1)
        if self.rows == "positions":
            return np.matmul(self.X, U.transpose(0, 2, 1)).reshape(self.batch, -1)
        return np.matmul(U, self.X.transpose(0, 2, 1)).reshape(self.batch, -1)

    def _entries(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The CSR ``(data, indices)`` of the examples in ``X``, ``N`` entries a row."""
        B, P, N = X.shape
        m = self.m
        cols = np.arange(m)[:, None] * N + np.arange(N)  # row i of W: columns i*N + k
        if self.rows == "positions":  # rows (b, p, i)
            return (
                np.broadcast_to(X[:, :, None, :], (B, P, m, N)).ravel(),
                np.broadcast_to(cols, (B, P, m, N)).ravel(),
            )
        return (  # rows (b, i, p)
            np.broadcast_to(X[:, None, :, :], (B, m, P, N)).ravel(),
            np.broadcast_to(cols[None, :, None, :], (B, m, P, N)).ravel(),
        )

    def _factor(self) -> np.ndarray:
        return self.X

    def _dense(self) -> np.ndarray:
        B, P, N = self.X.shape
        idx = np.arange(self.m)
        if self.rows == "positions":
            out = np.zeros((B, P, self.m, self.m, N), dtype=self.dtype)
            out[:, :, idx, idx, :] = self.X[:, :, None, :]
        else:
            out = np.zeros((B, self.m, P, self.m, N), dtype=self.dtype)
            out[:, idx, :, idx, :] = self.X[None]  # the indexed axis comes first
        return out.reshape(B, *self.shape)

    @property
    def nnz(self) -> int:
        return self.m * self.X.shape[1] * self.X.shape[2]

    def _details(self) -> str:
        return f" (rows {self.rows}-major, P = {self.X.shape[1]})"


class RepeatedBlock(Jacobian):
    """``I_P ⊗ A`` per example: the ``(M, N)`` block ``A`` repeated ``P`` times
    along the diagonal, ``(P·M, P·N)``, shared by the batch.

    ``L^x`` of a ``Linear`` applied to every token of ``(B, T, n)`` (``A = W``, one
    block per token). Products reshape the batch to ``B·P`` rows and make one
    matrix product with ``A``.
    """

    kind = "RepeatedBlock"
    shared = True

    def __init__(self, P: int, A: np.ndarray, batch: int, label: str = "A") -> None:
        if A.ndim != 2:
            raise ValueError(f"RepeatedBlock: A must have shape (M, N), got {A.shape}")
        M, N = A.shape
        super().__init__((P * M, P * N), batch, A.dtype, label)
        self.P, self.A = P, A

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        M, N = self.A.shape
        return (g.reshape(-1, M) @ self.A).reshape(self.batch, self.P * N)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        M = self.A.shape[0]
        return (g.reshape(self.batch, self.P, M).sum(axis=0) @ self.A).ravel()

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        M, N = self.A.shape
        return (u.reshape(-1, N) @ self.A.T).reshape(self.batch, self.P * M)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        # Row p*M + i holds A[i] at columns p*N .. p*N + N-1 (every entry stored).
        P, (M, N) = self.P, self.A.shape
        cols = np.arange(P)[:, None, None] * N + np.arange(N)
        data = np.broadcast_to(self.A, (P, M, N)).ravel()
        return csr(data, np.broadcast_to(cols, (P, M, N)).ravel(), N, self.shape)

    def _dense(self) -> np.ndarray:
        block = np.kron(np.eye(self.P, dtype=self.dtype), self.A)
        return np.broadcast_to(block, (self.batch, *self.shape)).copy()

    @property
    def nnz(self) -> int:
        return self.P * self.A.size

    def _details(self) -> str:
        return f" (I_{self.P} ⊗ {self.A.shape[0]}×{self.A.shape[1]} block)"


_SIDES = ("left", "right")


class BlockKronecker(_EqualRows):
    """Per example, ``P`` blocks on the diagonal, block ``p`` a Kronecker product of a
    matrix ``F_p`` ``(r, c)`` with an identity ``I_s``: ``I_s ⊗ F_p`` (``side="left"``,
    the identity on the left) or ``F_p ⊗ I_s`` (``side="right"``). Each block is
    ``(s·r, s·c)``; one example's matrix is ``(P·s·r, P·s·c)``.

    These are the two Jacobians of a batch of matrix products ``Y_p = A_p C_p``
    (``A_p`` is ``m × k``, ``C_p`` is ``k × n``). Flattening row by row,
    ``vec(A C) = (I_m ⊗ Cᵀ) vec(A) = (A ⊗ I_n) vec(C)``, so ``L^A`` has the blocks
    ``I_m ⊗ C_pᵀ`` and ``L^C`` the blocks ``A_p ⊗ I_n``: each entry of ``Y`` reads one
    row of ``A`` and one column of ``C``, and nothing across the ``P`` products.

    ``F`` is ``(B, P, r, c)``, one stack per example. No block is ever formed:
    seeing ``g`` as ``P`` matrices ``G_p``, ``g L`` is ``G_p F_p`` (left, ``G_p`` is
    ``s × r``) or ``F_pᵀ G_p`` (right, ``G_p`` is ``r × s``), one batched matrix
    product, and ``L u`` is ``U_p F_pᵀ`` or ``F_p U_p``.
    """

    kind = "BlockKronecker"

    def __init__(self, F: np.ndarray, s: int, side: str, label: str = "") -> None:
        if F.ndim != 4:
            raise ValueError(f"BlockKronecker: F must have shape (B, P, r, c), got {F.shape}")
        if side not in _SIDES:
            raise ValueError(f"BlockKronecker: side must be one of {_SIDES}, got {side!r}")
        if s < 1:
            raise ValueError(f"BlockKronecker: s must be a positive integer, got {s!r}")
        B, P, r, c = F.shape
        default = f"I_{s} ⊗ F_p" if side == "left" else f"F_p ⊗ I_{s}"
        super().__init__((P * s * r, P * s * c), B, F.dtype, label or default)
        self.F, self.s, self.side = F, int(s), side

    def _matrices(self, a: np.ndarray, rows: int) -> np.ndarray:
        """``a`` ``(B, P·s·rows)`` as ``P`` matrices per example, in the block's layout."""
        B, P = self.F.shape[:2]
        if self.side == "left":
            return a.reshape(B, P, self.s, rows)
        return a.reshape(B, P, rows, self.s)

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        G = self._matrices(g, self.F.shape[2])
        F = self.F
        out = np.matmul(G, F) if self.side == "left" else np.matmul(F.swapaxes(2, 3), G)
        return out.reshape(self.batch, -1)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        U = self._matrices(u, self.F.shape[3])
        F = self.F
        out = np.matmul(U, F.swapaxes(2, 3)) if self.side == "left" else np.matmul(F, U)
        return out.reshape(self.batch, -1)

    def _entries(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The CSR ``(data, indices)`` of the examples in ``F``, ``c`` entries a row."""
        B, P, r, c = F.shape
        s = self.s
        block = np.arange(P)[:, None, None, None] * (s * c)
        if self.side == "left":  # row (p, i, a): F[p, a, j] in column p·s·c + i·c + j
            cols = block + np.arange(s)[None, :, None, None] * c + np.arange(c)
            shape, data = (B, P, s, r, c), F[:, :, None]
        else:  # row (p, a, i): F[p, a, j] in column p·c·s + j·s + i
            cols = block + np.arange(s)[None, None, :, None] + np.arange(c) * s
            shape, data = (B, P, r, s, c), F[:, :, :, None]
        return np.broadcast_to(data, shape).ravel(), np.broadcast_to(cols, shape).ravel()

    def _factor(self) -> np.ndarray:
        return self.F

    def _dense(self) -> np.ndarray:
        B, P, r, c = self.F.shape
        s = self.s
        p, i = np.arange(P)[:, None], np.arange(s)[None, :]
        values = self.F.transpose(1, 0, 2, 3)[:, None]  # (P, 1, B, r, c)
        if self.side == "left":
            out = np.zeros((B, P, s, r, P, s, c), dtype=self.dtype)
            out[:, p, i, :, p, i, :] = values
        else:
            out = np.zeros((B, P, r, s, P, c, s), dtype=self.dtype)
            out[:, p, :, i, p, :, i] = values
        return out.reshape(B, *self.shape)

    @property
    def nnz(self) -> int:
        B, P, r, c = self.F.shape
        return P * self.s * r * c

    def _details(self) -> str:
        P, r, c = self.F.shape[1:]
        return f" ({P} block(s) of {self.s * r}×{self.s * c})"


# -- rules ---------------------------------------------------------------------------


@sum_rule(KroneckerMatrix, KroneckerMatrix)
def _kronecker_matrix_sum(a: KroneckerMatrix, b: KroneckerMatrix) -> Jacobian | None:
    """``δ_ij X_b + δ_ij Y_b = δ_ij (X_b + Y_b)`` for the same layout."""
    if a.m != b.m or a.rows != b.rows or a.X.shape != b.X.shape:
        return None
    return KroneckerMatrix(a.m, a.X + b.X, rows=a.rows, label=sum_label(a, b))


@compose_rule(RepeatedBlock, RepeatedBlock)
def _repeated_repeated(outer: RepeatedBlock, inner: RepeatedBlock) -> Jacobian | None:
    """``(I_P ⊗ A)(I_P ⊗ C) = I_P ⊗ AC``.

    With a ``Diagonal`` on either side the blocks would differ per position and
    per example (a dense ``(B, P·M, P·N)`` batch): that pair stays a ``Product``.
    """
    if outer.P != inner.P:
        return None
    return RepeatedBlock(outer.P, outer.A @ inner.A, outer.batch, product_label(outer, inner))


@sum_rule(RepeatedBlock, RepeatedBlock)
def _repeated_plus_repeated(a: RepeatedBlock, b: RepeatedBlock) -> Jacobian | None:
    """``I_P ⊗ A + I_P ⊗ C = I_P ⊗ (A + C)``."""
    if a.P != b.P:
        return None
    return RepeatedBlock(a.P, a.A + b.A, a.batch, sum_label(a, b))
