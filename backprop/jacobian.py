"""Structured Jacobian operators.

A Jacobian here is an object, not a matrix. For one example it stands for the
matrix ``L`` of shape ``(M, N)`` (``M`` outputs, ``N`` inputs, each counted as
the entries of that example's tensor, chapter 14.3), and it holds a batch of
``B`` such matrices. It keeps the structure that makes the backward pass cheap
(a diagonal is a vector, ``I ⊗ x_inᵀ`` is ``x_in``) and still becomes a matrix
when a person wants to look at one.

Conventions, stated once for every class below:

- ``g`` is a batch of row vectors, an array of shape ``(B, M)``; ``vjp(g)`` is
  the backward product ``g L`` (eq. 14.10), shape ``(B, N)``.
- ``vjp_sum(g)`` is ``sum_b g_b L_b``, shape ``(N,)``: a parameter gradient,
  computed without per-example copies where the structure allows.
- ``jvp(u)`` is the forward product ``L u`` for ``u`` of shape ``(B, N)``.
- ``to_dense()`` has shape ``(B, M, N)``; ``to_sparse(b)`` is example ``b`` as a
  ``scipy.sparse`` CSR array of shape ``(M, N)``.
- ``A @ B`` is the chain rule, ``A`` applied after ``B`` (eq. 14.2); it keeps
  the structure where it can (diagonal times diagonal is diagonal, and so on).
- ``nnz`` counts the entries one example's matrix stores.

This module knows nothing of layers.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "Dense",
    "Diagonal",
    "Identity",
    "Jacobian",
    "Kronecker",
    "Product",
    "Selection",
    "Sparse",
    "Sum",
    "Tile",
    "explicit_vjp",
]

#: ``to_dense`` refuses to build an array larger than this many bytes unless
#: it is given a larger ``max_bytes``.
DENSE_LIMIT_BYTES = 2 * 1024**3


def _index_dtype(*sizes: int) -> type[np.signedinteger[Any]]:
    """int32 when every index fits (scipy would otherwise scan and downcast int64
    index arrays on every construction, which costs more than the product)."""
    return np.int32 if max(sizes) < 2**31 - 1 else np.int64


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


class Jacobian:
    """Base class: a batch of ``B`` per-example matrices of shape ``(M, N)``.

    Subclasses implement ``_vjp``, ``_jvp``, ``to_sparse`` and ``nnz``; the rest
    has a generic form here that a subclass overrides where its structure allows
    something cheaper.
    """

    kind = "Jacobian"

    def __init__(self, shape: tuple[int, int], batch: int, dtype: Any, label: str) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.batch = int(batch)
        self.dtype = np.dtype(dtype)
        self.label = label

    #: True when every example has the same matrix.
    shared = False

    # -- products --------------------------------------------------------
    def vjp(self, g: np.ndarray) -> np.ndarray:
        """``g_b L_b`` for every example: ``g`` is ``(B, M)``, the result ``(B, N)``."""
        self._check_g(g)
        return self._vjp(g)

    def vjp_sum(self, g: np.ndarray) -> np.ndarray:
        """``Σ_b g_b L_b``, shape ``(N,)``: a parameter's gradient (eq. 14.11)."""
        self._check_g(g)
        return self._vjp_sum(g)

    def jvp(self, u: np.ndarray) -> np.ndarray:
        """``L_b u_b`` for every example: ``u`` is ``(B, N)``, the result ``(B, M)``."""
        self._check_u(u)
        return self._jvp(u)

    # A subclass writes ``_vjp`` and ``_jvp`` (and ``_vjp_sum`` where its structure
    # sums the batch more cheaply); the public methods above check shapes first.
    def _vjp(self, g: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # abstract

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self.vjp(g).sum(axis=0)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # abstract

    # -- views -----------------------------------------------------------
    def to_sparse(self, b: int = 0) -> sp.csr_array:
        raise NotImplementedError  # abstract

    @property
    def nnz(self) -> int:
        raise NotImplementedError  # abstract

    def to_dense(self, max_bytes: int = DENSE_LIMIT_BYTES) -> np.ndarray:
        """The batch of matrices as one array of shape ``(B, M, N)``."""
        self._check_dense_size(max_bytes)
        return self._dense()

    def _dense(self) -> np.ndarray:
        out = np.zeros((self.batch, *self.shape), dtype=self.dtype)
        for b in range(self.batch):
            out[b] = self.to_sparse(b).toarray()
        return out

    def _check_dense_size(self, max_bytes: int) -> None:
        need = self.batch * self.shape[0] * self.shape[1] * self.dtype.itemsize
        if need > max_bytes:
            raise ValueError(
                f"{self.kind} {self._dims()}: a dense array of shape "
                f"{(self.batch, *self.shape)} would take {_bytes(need)} "
                f"({self.dtype.name}), over the limit of {_bytes(max_bytes)}; use "
                f"to_sparse(b) for one example, or pass a larger max_bytes"
            )

    def stacked_sparse(self) -> sp.csr_array:
        """The ``B`` matrices stacked vertically, a CSR array ``(B*M, N)``."""
        if self.shared:
            return sp.csr_array(sp.vstack([self.to_sparse(0)] * self.batch, format="csr"))
        return sp.csr_array(sp.vstack([self.to_sparse(b) for b in range(self.batch)], format="csr"))

    def block_diagonal(self) -> sp.csr_array:
        """The whole batch as one block-diagonal CSR array ``(B*M, B*N)``."""
        s = self.stacked_sparse()
        m, n = self.shape
        it = _index_dtype(self.batch * m, self.batch * n, s.nnz)
        rows = np.repeat(np.arange(self.batch * m, dtype=it), np.diff(s.indptr))
        cols = s.indices.astype(it, copy=False) + (rows // max(m, 1)) * it(n)
        indptr = s.indptr.astype(it, copy=False)
        return sp.csr_array((s.data, cols, indptr), shape=(self.batch * m, self.batch * n))

    # -- algebra -----------------------------------------------------------
    def __matmul__(self, other: Jacobian) -> Jacobian:
        if not isinstance(other, Jacobian):
            return NotImplemented
        return compose(self, other)

    def __add__(self, other: Jacobian) -> Jacobian:
        if not isinstance(other, Jacobian):
            return NotImplemented
        return add(self, other)

    # -- text --------------------------------------------------------------
    def _dims(self) -> str:
        return f"{self.shape[0]}×{self.shape[1]}"

    def __repr__(self) -> str:
        per = "shared by the batch" if self.shared else "per example"
        return f"{self.kind} {self._dims()}: {self.label} (batch of {self.batch}, {per})"

    # -- helpers for subclasses ------------------------------------------
    def _check_g(self, g: np.ndarray) -> None:
        if np.shape(g) != (self.batch, self.shape[0]):
            raise ValueError(
                f"{self!r}: vjp takes g of shape {(self.batch, self.shape[0])} (one row "
                f"per example, one column per output entry), got {np.shape(g)}"
            )

    def _check_u(self, u: np.ndarray) -> None:
        if np.shape(u) != (self.batch, self.shape[1]):
            raise ValueError(
                f"{self!r}: jvp takes u of shape {(self.batch, self.shape[1])} (one row "
                f"per example, one column per input entry), got {np.shape(u)}"
            )


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
        it = _index_dtype(B * n + 1)
        indptr = np.arange(B * n + 1, dtype=it)
        indices = np.tile(np.arange(n, dtype=it), B)
        return sp.csr_array((self.d.ravel(), indices, indptr), shape=(B * n, n))

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
        B, n = self.x.shape
        m = self.m
        it = _index_dtype(B * m * n + 1)
        indptr = np.arange(0, B * m * n + 1, n, dtype=it)
        indices = np.tile(np.arange(m * n, dtype=it), B)
        data = np.broadcast_to(self.x[:, None, :], (B, m, n)).ravel()
        return sp.csr_array((data, indices, indptr), shape=(B * m, m * n))

    @property
    def nnz(self) -> int:
        return self.shape[1]


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
        rows = np.arange(self.offset, self.offset + n)
        data = np.ones(n, dtype=self.dtype)
        return sp.csr_array((data, (rows, np.arange(n))), shape=(m, n))

    @property
    def nnz(self) -> int:
        return self.shape[1]


class Tile(Jacobian):
    """``[I; I; ...; I]`` (``copies`` blocks): the Jacobian of a branch (eq. 14.45)."""

    kind = "Tile"
    shared = True

    def __init__(self, copies: int, n: int, batch: int, dtype: Any = np.float64) -> None:
        super().__init__((copies * n, n), batch, dtype, "[" + "; ".join(["I"] * copies) + "]")
        self.copies = copies

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return g.reshape(g.shape[0], self.copies, self.shape[1]).sum(axis=1)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return np.tile(u, (1, self.copies))

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        eye = sp.eye_array(self.shape[1], dtype=self.dtype)
        return sp.csr_array(sp.vstack([eye] * self.copies, format="csr"))

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


class Product(Jacobian):
    """``outer @ inner``: ``inner`` first, then ``outer`` (the chain rule, eq. 14.2).

    Kept as two factors: ``g (outer inner) = (g outer) inner`` costs two cheap
    products instead of building the matrix.
    """

    kind = "Product"

    def __init__(self, outer: Jacobian, inner: Jacobian) -> None:
        super().__init__(
            (outer.shape[0], inner.shape[1]),
            outer.batch,
            np.result_type(outer.dtype, inner.dtype),
            f"({outer.kind} {outer._dims()}) @ ({inner.kind} {inner._dims()})",
        )
        self.outer, self.inner = outer, inner
        self.shared = outer.shared and inner.shared

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return self.inner.vjp(self.outer.vjp(g))

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self.inner.vjp_sum(self.outer.vjp(g))

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return self.outer.jvp(self.inner.jvp(u))

    def _dense(self) -> np.ndarray:
        outer = self.outer._dense()
        M, K = self.outer.shape
        if M <= K:
            # Few rows: push each row of ``outer`` through ``inner`` by a vjp, which
            # keeps ``inner``'s structure (``I ⊗ xᵀ`` is never densified).
            out = np.empty((self.batch, *self.shape), dtype=self.dtype)
            for i in range(M):
                out[:, i, :] = self.inner.vjp(outer[:, i, :])
            return out
        return np.matmul(outer, self.inner._dense())

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return sp.csr_array(self.outer.to_sparse(b) @ self.inner.to_sparse(b))

    def stacked_sparse(self) -> sp.csr_array:
        return sp.csr_array(self.outer.block_diagonal() @ self.inner.stacked_sparse())

    @property
    def nnz(self) -> int:
        return int(self.to_sparse(0).nnz)


class Sum(Jacobian):
    """``A + B + ...``: the Jacobian along several paths of a graph (eq. 14.46)."""

    kind = "Sum"

    def __init__(self, terms: list[Jacobian]) -> None:
        first = terms[0]
        super().__init__(
            first.shape,
            first.batch,
            np.result_type(*[t.dtype for t in terms]),
            " + ".join(f"({t.kind} {t._dims()})" for t in terms),
        )
        self.terms = terms
        self.shared = all(t.shared for t in terms)

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return sum((t.vjp(g) for t in self.terms[1:]), self.terms[0].vjp(g))

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return sum((t.vjp_sum(g) for t in self.terms[1:]), self.terms[0].vjp_sum(g))

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return sum((t.jvp(u) for t in self.terms[1:]), self.terms[0].jvp(u))

    def _dense(self) -> np.ndarray:
        return sum((t._dense() for t in self.terms[1:]), self.terms[0]._dense())

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return sp.csr_array(
            sum((t.to_sparse(b) for t in self.terms[1:]), self.terms[0].to_sparse(b))
        )

    def stacked_sparse(self) -> sp.csr_array:
        total = self.terms[0].stacked_sparse()
        for t in self.terms[1:]:
            total = total + t.stacked_sparse()
        return sp.csr_array(total)

    @property
    def nnz(self) -> int:
        return int(self.to_sparse(0).nnz)


# -- composition ------------------------------------------------------------


def _check_chain(outer: Jacobian, inner: Jacobian) -> None:
    if outer.shape[1] != inner.shape[0]:
        raise ValueError(
            f"cannot chain {outer!r} after {inner!r}: inner has {inner.shape[0]} outputs, "
            f"outer takes {outer.shape[1]} inputs"
        )
    if outer.batch != inner.batch:
        raise ValueError(
            f"cannot chain {outer!r} after {inner!r}: batches of {outer.batch} and {inner.batch}"
        )


#: The longest label a composed or summed Jacobian keeps in full.
_LABEL_MAX = 80
_COUNTED = re.compile(r" \((\d+) (?:factors|terms)\)$")


def _join(a: str, b: str, sep: str) -> str:
    """``a + sep + b``, shortened to its first and last part and a count when long,
    so a chain of many layers keeps a label (and a ``repr``) of one line."""
    label = f"{a}{sep}{b}"
    if len(label) <= _LABEL_MAX and not (_COUNTED.search(a) or _COUNTED.search(b)):
        return label

    def count(s: str) -> int:
        m = _COUNTED.search(s)
        return int(m[1]) if m else s.count(sep) + 1

    head = _COUNTED.sub("", a).split(sep)[0][:30]
    tail = _COUNTED.sub("", b).split(sep)[-1][:30]
    word = "factors" if sep == " · " else "terms"
    return f"{head}{sep}…{sep}{tail} ({count(a) + count(b)} {word})"


def compose(outer: Jacobian, inner: Jacobian) -> Jacobian:
    """``outer @ inner`` with the structure kept where the pair allows it."""
    _check_chain(outer, inner)
    if isinstance(outer, Identity):
        return inner
    if isinstance(inner, Identity):
        return outer
    label = _join(outer.label, inner.label, " · ")
    if isinstance(outer, Diagonal) and isinstance(inner, Diagonal):
        return Diagonal(outer.d * inner.d, label)
    if isinstance(outer, Dense) and isinstance(inner, Dense):
        if outer.shared and inner.shared:
            return Dense(outer.A @ inner.A, label, batch=outer.batch)
        if inner.shared:  # (B, M, K) @ (K, N): one GEMM over the B·M rows
            B, (M, K) = outer.batch, outer.shape
            return Dense((outer.A.reshape(B * M, K) @ inner.A).reshape(B, M, -1), label)
        return Dense(np.matmul(outer.A, inner.A), label, batch=outer.batch)
    if isinstance(outer, Diagonal) and isinstance(inner, Dense):
        A = inner.A if not inner.shared else inner.A[None]
        return Dense(outer.d[:, :, None] * A, label)
    if isinstance(outer, Dense) and isinstance(inner, Diagonal):
        A = outer.A if not outer.shared else outer.A[None]
        return Dense(A * inner.d[:, None, :], label)
    if isinstance(outer, Sparse) and isinstance(inner, Sparse):
        return Sparse(outer.S @ inner.S, outer.batch, label)
    return Product(outer, inner)


def add(a: Jacobian, b: Jacobian) -> Jacobian:
    """``a + b``, for two Jacobians of the same shape and batch."""
    if a.shape != b.shape or a.batch != b.batch:
        raise ValueError(f"cannot add {a!r} and {b!r}: shapes or batches differ")
    if isinstance(a, Diagonal) and isinstance(b, Diagonal):
        return Diagonal(a.d + b.d, _join(a.label, b.label, " + "))
    if isinstance(a, Dense) and isinstance(b, Dense) and a.shared == b.shared:
        return Dense(a.A + b.A, _join(a.label, b.label, " + "), batch=a.batch)
    terms = (a.terms if isinstance(a, Sum) else [a]) + (b.terms if isinstance(b, Sum) else [b])
    return Sum(terms)


# -- the literal algorithm's product ------------------------------------------


def explicit_vjp(L: Jacobian, g: np.ndarray, sum_batch: bool = False) -> np.ndarray:
    """``g L`` through an explicit ``scipy.sparse`` matrix (Algorithm 14.1, literally).

    A Jacobian shared by the batch is one sparse matrix for all rows of ``g``
    (for ``sum_batch``, ``Σ_b g_b L = (Σ_b g_b) L``: one product). Otherwise the
    batch is stacked: ``sum_batch`` uses the ``(B*M, N)`` stack (a parameter
    gradient, eq. 14.11), and the per-example product uses the block-diagonal
    ``(B*M, B*N)`` matrix.

    These are the matrices of ``to_sparse``, ``stacked_sparse`` and
    ``block_diagonal``, with every entry of the structure stored (a ``Dense``
    block keeps its zeros). For the common kinds they are assembled here from
    index arrays cached per shape, since the sparsity pattern depends on the
    shapes alone and only the values change from call to call.
    """
    B, (M, N) = L.batch, L.shape
    if L.shared:
        v = g.sum(axis=0) if sum_batch else g.T
        if isinstance(L, Dense):
            out = _times_transpose("full", (M, N), np.ascontiguousarray(L.A).ravel(), v)
        elif isinstance(L, Identity):
            out = _times_transpose("diag", (M,), np.ones(M, dtype=L.dtype), v)
        else:
            out = np.asarray(L.to_sparse(0).T @ v)
        return out if sum_batch else out.T
    if sum_batch:
        v = g.ravel()
        if isinstance(L, Kronecker):
            # Row b*m + i of the stack holds x_b at columns i*n ...: x tiled m times per row.
            data = np.tile(L.x, (1, L.m)).ravel()
            return _times_transpose("kron", (B, L.m, L.x.shape[1]), data, v)
        if isinstance(L, Diagonal):
            return _times_transpose("diags", (B, N), np.ascontiguousarray(L.d).ravel(), v)
        if isinstance(L, Dense):
            return _times_transpose("full", (B * M, N), np.ascontiguousarray(L.A).ravel(), v)
        return np.asarray(L.stacked_sparse().T @ v)
    v = g.ravel()
    if isinstance(L, Diagonal):
        flat = _times_transpose("diag", (B * N,), np.ascontiguousarray(L.d).ravel(), v)
    elif isinstance(L, Dense):
        flat = _times_transpose("blocks", (B, M, N), np.ascontiguousarray(L.A).ravel(), v)
    else:
        flat = np.asarray(L.block_diagonal().T @ v)
    return flat.reshape(B, N)


# -- explicit_vjp's matrices: cached sparsity patterns -------------------------


#: Patterns with more stored entries than this are built for each use, not kept.
_CACHE_ENTRIES = 1 << 22


def _pattern(kind: str, *dims: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``_build_pattern``, kept for reuse unless the pattern is large."""
    if int(np.prod(dims, dtype=np.int64)) <= _CACHE_ENTRIES:
        return _cached_pattern(kind, *dims)
    return _build_pattern(kind, *dims)


def _build_pattern(kind: str, *dims: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(indices, indptr, shape)`` of a CSR pattern that depends only on shapes.

    - ``"full", R, N``: ``R × N``, every entry stored;
    - ``"diag", K``: the diagonal of a ``K × K`` matrix;
    - ``"diags", B, N``: ``B`` stacked ``N × N`` diagonals, ``(B*N, N)``;
    - ``"blocks", B, M, N``: ``B`` full ``M × N`` blocks on the diagonal,
      ``(B*M, B*N)``;
    - ``"kron", B, m, n``: ``B`` stacked ``I_m ⊗ x_bᵀ``, ``(B*m, m*n)``: row
      ``b*m + i`` holds columns ``i*n .. i*n + n-1``.

    The arrays are read-only (int32 where the sizes allow).
    """
    if kind == "full":
        R, N = dims
        shape, per_row = (R, N), N
        indices = np.tile(np.arange(N, dtype=_index_dtype(R * N + 1)), R)
    elif kind == "diag":
        (K,) = dims
        shape, per_row = (K, K), 1
        indices = np.arange(K, dtype=_index_dtype(K + 1))
    elif kind == "diags":
        B, N = dims
        shape, per_row = (B * N, N), 1
        indices = np.tile(np.arange(N, dtype=_index_dtype(B * N + 1)), B)
    elif kind == "blocks":
        B, M, N = dims
        shape, per_row = (B * M, B * N), N
        it = _index_dtype(B * M * N + 1, B * N)
        starts = np.arange(B, dtype=it)[:, None, None] * it(N)
        indices = np.broadcast_to(starts + np.arange(N, dtype=it), (B, M, N)).ravel()
    elif kind == "kron":
        B, m, n = dims
        shape, per_row = (B * m, m * n), n
        indices = np.tile(np.arange(m * n, dtype=_index_dtype(B * m * n + 1)), B)
    else:
        raise ValueError(f"unknown sparsity pattern {kind!r}")
    indptr = np.arange(shape[0] + 1, dtype=indices.dtype) * indices.dtype.type(per_row)
    indices.flags.writeable = False
    indptr.flags.writeable = False
    return indices, indptr, shape


_cached_pattern = functools.lru_cache(maxsize=64)(_build_pattern)


_workspace = threading.local()


def _times_transpose(kind: str, dims: tuple[int, ...], data: np.ndarray, v: np.ndarray) -> Any:
    """``Sᵀ @ v`` for the CSR matrix ``S`` of pattern ``(kind, dims)`` holding ``data``.

    The CSR arrays of ``S`` are the CSC arrays of ``Sᵀ``, so ``Sᵀ`` is built
    directly, without a transpose. Its scipy array is built once per pattern
    (per thread) and then only given the new values: that skips scipy's
    constructor checks, which cost more than the product for small matrices.
    The array never leaves this function, and it drops the values after use.
    """
    arrays: dict[tuple[Any, ...], Any] = _workspace.__dict__.setdefault("arrays", {})
    key = (kind, dims)
    St = arrays.get(key)
    if St is None:
        indices, indptr, (rows, cols) = _pattern(kind, *dims)
        St = sp.csc_array((data, indices, indptr), shape=(cols, rows), copy=False)
        if data.size > _CACHE_ENTRIES:
            return np.asarray(St @ v)  # too large to keep
        if len(arrays) >= 64:
            arrays.clear()
        arrays[key] = St
    else:
        St.data = data  # same pattern, so the same number of entries
    try:
        return np.asarray(St @ v)
    finally:
        St.data = data[:0]
