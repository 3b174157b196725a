"""The literal product of Algorithm 14.1: ``g`` times an explicit sparse matrix."""

from __future__ import annotations

import numpy as np

from backprop.jacobian.base import Jacobian

__all__ = ["explicit_vjp"]


def explicit_vjp(L: Jacobian, g: np.ndarray, sum_batch: bool = False) -> np.ndarray:
    """``g L`` through an explicit ``scipy.sparse`` matrix (Algorithm 14.1, literally).

    ``g`` is ``(B, M)``. The matrix is the Jacobian's own sparse form:

    - shared by the batch: ``to_sparse(0)``, one ``(M, N)`` matrix for every row
      of ``g`` (with ``sum_batch``, ``Σ_b g_b L = (Σ_b g_b) L``);
    - with ``sum_batch`` (a parameter gradient, eq. 14.11): ``stacked_sparse()``,
      the ``(B*M, N)`` stack, times ``g`` flattened to one row of ``B*M``;
    - otherwise: ``block_diagonal()``, the ``(B*M, B*N)`` matrix of the whole
      batch, times ``g`` flattened, then cut back into ``B`` rows.

    The result is ``(N,)`` with ``sum_batch`` and ``(B, N)`` without.
    """
    B, N = L.batch, L.shape[1]
    if L.shared:
        S = L.to_sparse(0)
        return np.asarray(g.sum(axis=0) @ S if sum_batch else g @ S)
    if sum_batch:
        return np.asarray(g.reshape(-1) @ L.stacked_sparse())
    return np.asarray(g.reshape(-1) @ L.block_diagonal()).reshape(B, N)
