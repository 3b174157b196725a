"""The basic kinds: ``Dense``, ``Diagonal``, ``Identity``, ``Sparse``, and their rules."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import compose_rule, sum_rule
from backprop.jacobian.base import Jacobian, csr, index_dtype, product_label, sum_label

__all__ = ["Dense", "Diagonal", "Identity", "Sparse"]


class Dense(Jacobian):
    """Any matrix: ``A`` of shape ``(M, N)`` shared by the batch, or ``(B, M, N)``."""

    kind = "Dense"

    def __init__(self, A: np.ndarray, label: str = "A", batch: int | None = None) -> None:
        if A.ndim == 2:
            if batch is None:
                raise ValueError("Dense: a shared (M, N) matrix needs the batch size")
            self.shared = True
            super().__init__(A.shape, batch, A.dtype, label)
        elif A.ndim == 3:
            if batch is not None and batch != A.shape[0]:
                raise ValueError(f"Dense: batch={batch} but A has shape {A.shape}")
            super().__init__(A.shape[1:], A.shape[0], A.dtype, label)
        else:
            raise ValueError(f"Dense: A must have shape (M, N) or (B, M, N), got {A.shape}")
        self.A = A

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        if self.shared:
            return g @ self.A
        return np.matmul(g[:, None, :], self.A)[:, 0, :]

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        if self.shared:
            return g.sum(axis=0) @ self.A
        return np.einsum("bm,bmn->n", g, self.A)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        if self.shared:
            return u @ self.A.T
        return np.matmul(self.A, u[:, :, None])[:, :, 0]

    def _dense(self) -> np.ndarray:
        if self.shared:
            return np.broadcast_to(self.A, (self.batch, *self.shape)).copy()
        return self.A.copy()

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return sp.csr_array(self.A if self.shared else self.A[b])

    def stacked_sparse(self) -> sp.csr_array:
        return sp.csr_array(self._dense().reshape(self.batch * self.shape[0], self.shape[1]))

    @property
    def nnz(self) -> int:
        return self.shape[0] * self.shape[1]


class Diagonal(Jacobian):
    """``diag(d)`` per example; ``d`` has shape ``(B, N)`` (eq. 14.30)."""

    kind = "Diagonal"

    def __init__(self, d: np.ndarray, label: str = "d") -> None:
        if d.ndim != 2:
            raise ValueError(f"Diagonal: d must have shape (B, N), got {d.shape}")
        super().__init__((d.shape[1], d.shape[1]), d.shape[0], d.dtype, label)
        self.d = d

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return g * self.d

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return np.einsum("bn,bn->n", g, self.d)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return u * self.d

    def _dense(self) -> np.ndarray:
        n = self.shape[0]
        out = np.zeros((self.batch, n, n), dtype=self.dtype)
        out[:, np.arange(n), np.arange(n)] = self.d
        return out

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return sp.csr_array(sp.diags_array(self.d[b], format="csr"))

    def stacked_sparse(self) -> sp.csr_array:
        n, B = self.shape[0], self.batch
        indices = np.tile(np.arange(n, dtype=index_dtype(B * n + 1)), B)
        return csr(self.d.ravel(), indices, 1, (B * n, n))

    @property
    def nnz(self) -> int:
        return self.shape[0]


class Identity(Jacobian):
    """``I`` of size ``n`` for every example."""

    kind = "Identity"
    shared = True

    def __init__(self, n: int, batch: int, dtype: Any = np.float64, label: str = "I") -> None:
        super().__init__((n, n), batch, dtype, label)

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return g

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return g.sum(axis=0)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return u

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return sp.csr_array(sp.eye_array(self.shape[0], dtype=self.dtype, format="csr"))

    @property
    def nnz(self) -> int:
        return self.shape[0]


class Sparse(Jacobian):
    """A ``scipy.sparse`` matrix ``(M, N)`` shared by the batch."""

    kind = "Sparse"
    shared = True

    def __init__(self, S: Any, batch: int, label: str = "S") -> None:
        S = sp.csr_array(S)
        super().__init__(S.shape, batch, S.dtype, label)
        self.S = S

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return np.asarray(self.S.T @ g.T).T

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return np.asarray(self.S.T @ g.sum(axis=0))

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return np.asarray(self.S @ u.T).T

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return self.S

    @property
    def nnz(self) -> int:
        return int(self.S.nnz)


# -- rules ---------------------------------------------------------------------------


@compose_rule(Identity, Jacobian)
def _identity_after(outer: Jacobian, inner: Jacobian) -> Jacobian:
    return inner


@compose_rule(Jacobian, Identity)
def _identity_before(outer: Jacobian, inner: Jacobian) -> Jacobian:
    return outer


@compose_rule(Diagonal, Diagonal)
def _diagonal_diagonal(outer: Diagonal, inner: Diagonal) -> Jacobian:
    return Diagonal(outer.d * inner.d, product_label(outer, inner))


@compose_rule(Dense, Dense)
def _dense_dense(outer: Dense, inner: Dense) -> Jacobian:
    label = product_label(outer, inner)
    if outer.shared and inner.shared:
        return Dense(outer.A @ inner.A, label, batch=outer.batch)
    if inner.shared:  # (B, M, K) @ (K, N): one GEMM over the B·M rows
        B, (M, K) = outer.batch, outer.shape
        return Dense((outer.A.reshape(B * M, K) @ inner.A).reshape(B, M, -1), label)
    return Dense(np.matmul(outer.A, inner.A), label, batch=outer.batch)


@compose_rule(Diagonal, Dense)
def _diagonal_dense(outer: Diagonal, inner: Dense) -> Jacobian:
    A = inner.A if not inner.shared else inner.A[None]
    return Dense(outer.d[:, :, None] * A, product_label(outer, inner))


@compose_rule(Dense, Diagonal)
def _dense_diagonal(outer: Dense, inner: Diagonal) -> Jacobian:
    A = outer.A if not outer.shared else outer.A[None]
    return Dense(A * inner.d[:, None, :], product_label(outer, inner))


@compose_rule(Sparse, Sparse)
def _sparse_sparse(outer: Sparse, inner: Sparse) -> Jacobian:
    return Sparse(outer.S @ inner.S, outer.batch, product_label(outer, inner))


@sum_rule(Diagonal, Diagonal)
def _diagonal_plus_diagonal(a: Diagonal, b: Diagonal) -> Jacobian:
    return Diagonal(a.d + b.d, sum_label(a, b))


@sum_rule(Dense, Dense)
def _dense_plus_dense(a: Dense, b: Dense) -> Jacobian | None:
    if a.shared != b.shared:
        return None  # a shared and a per-example matrix: the generic Sum
    return Dense(a.A + b.A, sum_label(a, b), batch=a.batch)
