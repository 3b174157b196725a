"""The generic combinators: ``Product`` (eq. 14.2) and ``Sum`` (eq. 14.46).

They are the fallback of ``@`` and ``+`` for any pair that has no rule keeping
more structure (registered here for ``(Jacobian, Jacobian)``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.algebra import compose_rule, sum_rule
from backprop.jacobian.base import Jacobian

__all__ = ["Product", "Sum"]


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


# -- the fallbacks: the least specific pair, tried after every other rule -------------


@compose_rule(Jacobian, Jacobian)
def _product(outer: Jacobian, inner: Jacobian) -> Jacobian:
    return Product(outer, inner)


@sum_rule(Jacobian, Jacobian)
def _sum(a: Jacobian, b: Jacobian) -> Jacobian:
    """A flat ``Sum``: the terms of a ``Sum`` operand join the new one's."""
    terms = (a.terms if isinstance(a, Sum) else [a]) + (b.terms if isinstance(b, Sum) else [b])
    return Sum(terms)
