"""The ``Jacobian`` protocol: shape checks, the size limit of ``to_dense``, text.

The conventions (shapes of ``g`` and ``u``, index orders) are stated once, in
the package's docstring.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import add, compose

__all__ = ["DENSE_LIMIT_BYTES", "Jacobian", "product_label", "sum_label"]

#: ``to_dense`` refuses to build an array larger than this many bytes unless
#: it is given a larger ``max_bytes``.
DENSE_LIMIT_BYTES = 2 * 1024**3


def index_dtype(*sizes: int) -> type[np.signedinteger[Any]]:
    """int32 when every index fits (scipy would otherwise scan and downcast int64
    index arrays on every construction, which costs more than the product)."""
    return np.int32 if max(sizes) < 2**31 - 1 else np.int64


def csr(data: np.ndarray, indices: np.ndarray, per_row: int, shape: tuple[int, int]) -> Any:
    """A CSR array whose rows all store ``per_row`` entries, ``data`` and
    ``indices`` listed row after row."""
    it = index_dtype(shape[0] * per_row + 1, shape[1])
    indptr = np.arange(shape[0] + 1, dtype=it) * it(per_row)
    return sp.csr_array((data, indices.astype(it, copy=False), indptr), shape=shape)


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
    something cheaper. The public ``vjp``, ``vjp_sum`` and ``jvp`` check shapes
    once, here, before calling the subclass's ``_vjp``, ``_vjp_sum``, ``_jvp``.
    """

    kind = "Jacobian"
    #: True when every example has the same matrix.
    shared = False

    def __init__(self, shape: tuple[int, int], batch: int, dtype: Any, label: str) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.batch = int(batch)
        self.dtype = np.dtype(dtype)
        self.label = label

    # -- products --------------------------------------------------------
    def vjp(self, g: np.ndarray) -> np.ndarray:
        """``g_b L_b`` for every example: ``g`` is ``(B, M)``, the result ``(B, N)``."""
        self._check_rows(g, "vjp", "g", 0)
        return self._vjp(g)

    def vjp_sum(self, g: np.ndarray) -> np.ndarray:
        """``Σ_b g_b L_b``, shape ``(N,)``: a parameter's gradient (eq. 14.11)."""
        self._check_rows(g, "vjp", "g", 0)
        return self._vjp_sum(g)

    def jvp(self, u: np.ndarray) -> np.ndarray:
        """``L_b u_b`` for every example: ``u`` is ``(B, N)``, the result ``(B, M)``."""
        self._check_rows(u, "jvp", "u", 1)
        return self._jvp(u)

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # abstract

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self._vjp(g).sum(axis=0)

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
        need = self.batch * self.shape[0] * self.shape[1] * self.dtype.itemsize
        if need > max_bytes:
            raise ValueError(
                f"{self.kind} {self._dims()}: a dense array of shape "
                f"{(self.batch, *self.shape)} would take {_bytes(need)} "
                f"({self.dtype.name}), over the limit of {_bytes(max_bytes)}; use "
                f"to_sparse(b) for one example, or pass a larger max_bytes"
            )
        return self._dense()

    def _dense(self) -> np.ndarray:
        out = np.zeros((self.batch, *self.shape), dtype=self.dtype)
        for b in range(self.batch):
            out[b] = self.to_sparse(b).toarray()
        return out

    def stacked_sparse(self) -> sp.csr_array:
        """The ``B`` matrices stacked vertically, a CSR array ``(B*M, N)``."""
        if self.shared:
            S = sp.csr_array(self.to_sparse(0))
            B, nnz = self.batch, S.nnz
            it = index_dtype(B * nnz + 1, self.shape[1])
            starts = np.arange(B, dtype=it)[:, None] * it(nnz)
            indptr = np.append((starts + S.indptr[:-1].astype(it)).ravel(), it(B * nnz))
            indices = np.tile(S.indices.astype(it, copy=False), B)
            data = np.tile(S.data, B)
            return sp.csr_array((data, indices, indptr), shape=(B * self.shape[0], self.shape[1]))
        return sp.csr_array(sp.vstack([self.to_sparse(b) for b in range(self.batch)], format="csr"))

    def block_diagonal(self) -> sp.csr_array:
        """The whole batch as one block-diagonal CSR array ``(B*M, B*N)``."""
        s = self.stacked_sparse()
        m, n = self.shape
        it = index_dtype(self.batch * m, self.batch * n, s.nnz)
        rows = np.repeat(np.arange(self.batch * m, dtype=it), np.diff(s.indptr))
        cols = s.indices.astype(it, copy=False) + (rows // max(m, 1)) * it(n)
        indptr = s.indptr.astype(it, copy=False)
        return sp.csr_array((s.data, cols, indptr), shape=(self.batch * m, self.batch * n))

    # -- algebra (dispatched on the rules each class declares) -------------
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

    def _details(self) -> str:
        """Words after the label in ``repr`` (a rank, a row order), or ``""``."""
        return ""

    def __repr__(self) -> str:
        per = "shared by the batch" if self.shared else "per example"
        return (
            f"{self.kind} {self._dims()}: {self.label}{self._details()} "
            f"(batch of {self.batch}, {per})"
        )

    def _check_rows(self, a: np.ndarray, method: str, name: str, axis: int) -> None:
        want = (self.batch, self.shape[axis])
        if np.shape(a) != want:
            entry = "output" if axis == 0 else "input"
            raise ValueError(
                f"{self!r}: {method} takes {name} of shape {want} (one row per example, "
                f"one column per {entry} entry), got {np.shape(a)}"
            )


# -- labels of composed and summed Jacobians ------------------------------------

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


def product_label(outer: Jacobian, inner: Jacobian) -> str:
    """The label of ``outer @ inner``: ``"a · b"``, shortened when long."""
    return _join(outer.label, inner.label, " · ")


def sum_label(a: Jacobian, b: Jacobian) -> str:
    """The label of ``a + b``: ``"a + b"``, shortened when long."""
    return _join(a.label, b.label, " + ")
