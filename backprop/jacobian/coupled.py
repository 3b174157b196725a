"""A Jacobian over the whole batch, for a layer that couples its examples.

BatchNorm in training mode normalises each channel with statistics of the whole
batch, so every output depends on every example: there is no per-example
``(|x_out|, |x_in|)`` matrix. Its Jacobian is one matrix over the batch taken as
a single "example" of ``B·|x|`` entries (``batch = 1``), indexed in the row-major
order of the batch tensor ``(B, *shape)``. ``WholeBatch`` wraps that matrix (any
structured Jacobian with ``batch = 1``) and says so in its ``repr``; products,
``to_dense`` and ``to_sparse`` are those of the matrix it wraps.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from backprop.jacobian.base import Jacobian

__all__ = ["WholeBatch"]


class WholeBatch(Jacobian):
    """``inner``, a ``(B·M, B·N)`` matrix over a batch of ``examples`` that it couples.

    ``g`` for ``vjp`` is one row of ``B·M`` entries (``g_out`` flattened over the
    batch); ``vjp`` returns one row of ``B·N``.
    """

    kind = "WholeBatch"

    def __init__(self, inner: Jacobian, examples: int) -> None:
        if inner.batch != 1:
            raise ValueError(
                f"WholeBatch: the matrix over the whole batch has batch 1 (one block for "
                f"all the examples), got {inner!r}"
            )
        if inner.shape[0] % examples:
            raise ValueError(
                f"WholeBatch: {inner.shape[0]} rows do not split into {examples} examples"
            )
        super().__init__(inner.shape, 1, inner.dtype, inner.label)
        self.inner = inner
        self.examples = int(examples)
        self.shared = inner.shared

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return self.inner._vjp(g)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self.inner._vjp_sum(g)

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return self.inner._jvp(u)

    def _dense(self) -> np.ndarray:
        return self.inner._dense()

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return self.inner.to_sparse(b)

    def stacked_sparse(self) -> sp.csr_array:
        return self.inner.stacked_sparse()

    @property
    def nnz(self) -> int:
        return self.inner.nnz

    def __repr__(self) -> str:
        return (
            f"WholeBatch {self._dims()}: {self.label} ({self.inner.kind}{self.inner._details()}; "
            f"couples the batch: one matrix over all {self.examples} examples, batch of 1)"
        )
