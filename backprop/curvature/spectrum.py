"""The Hessian's spectrum without the matrix: extreme eigenvalues, trace, density.

All three only multiply by ``H`` (``Point.matvec``), at one operating point whose
forward and backward passes are done once:

- ``hessian_eigs``: the ``k`` largest eigenvalues and their eigenvectors, by
  ``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos) on a
  ``LinearOperator``;
- ``hessian_trace``: Hutchinson's estimate ``tr H = E[zᵀ H z]`` for Rademacher ``z``
  (entries ±1), the mean of ``n`` samples, with its standard error;
- ``hessian_spectrum``: the spectral density by stochastic Lanczos quadrature:
  ``m`` Lanczos steps from a random unit vector give a tridiagonal ``T_m`` whose
  eigenvalues ``θ_i`` (nodes) and squared first eigenvector entries ``τ_i``
  (weights) are a quadrature for ``vᵀ f(H) v``; averaged over a few vectors, the
  weighted nodes approximate the distribution of the eigenvalues.

``ggn=True`` does the same for the generalized Gauss–Newton matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from backprop.curvature.products import point

__all__ = [
    "Eigen",
    "Spectrum",
    "TraceEstimate",
    "hessian_eigs",
    "hessian_spectrum",
    "hessian_trace",
]

_WHICH = ("LA", "SA", "LM")


@dataclass
class Eigen:
    """``values``: ``k`` eigenvalues, largest first; ``vectors``: the unit eigenvectors,
    each a mapping like ``hvp``'s ``v`` (``{Parameter: array}`` or ``{input: array}``)."""

    values: np.ndarray
    vectors: list[dict[Any, np.ndarray]]


@dataclass
class TraceEstimate:
    """Hutchinson's estimate of ``tr H``: ``value`` (the mean of ``samples``), its
    standard error ``stderr`` (``std/√n``), and the ``n`` samples ``zᵀ H z``."""

    value: float
    stderr: float
    samples: np.ndarray

    def __float__(self) -> float:
        return self.value


@dataclass
class Spectrum:
    """Stochastic Lanczos quadrature: ``nodes`` and ``weights``, ``(runs, m)``; each run's
    weights sum to 1 (zero weight pads a run that stopped early)."""

    nodes: np.ndarray
    weights: np.ndarray

    def density(self, grid: Any, sigma: float) -> np.ndarray:
        """The density on ``grid``: every node a Gaussian of width ``sigma`` times its
        weight, averaged over the runs; it integrates to 1."""
        t = np.asarray(grid, dtype=np.float64)[:, None]
        bumps = np.exp(-0.5 * ((t - self.nodes.ravel()[None, :]) / sigma) ** 2)
        bumps /= sigma * np.sqrt(2 * np.pi)
        return (bumps @ self.weights.ravel()) / self.nodes.shape[0]


def hessian_eigs(
    model: Any,
    *inputs: Any,
    k: int = 1,
    wrt: str = "params",
    which: str = "LA",
    tol: float = 1e-8,
    rng: Any = None,
    ggn: bool = False,
    **named: Any,
) -> Eigen:
    """The ``k`` largest eigenvalues of the Hessian (and their eigenvectors), matrix-free.

    ``which`` is eigsh's: ``"LA"`` the largest (the sharpness, for ``k=1``), ``"SA"``
    the smallest (the most negative curvature), ``"LM"`` the largest in magnitude.
    ``tol`` is eigsh's relative accuracy; ``rng`` seeds its starting vector, so that a
    run is repeatable. Inputs as for ``bp.hvp``.
    """
    if which not in _WHICH:
        raise ValueError(f"hessian_eigs: which must be one of {_WHICH}, got {which!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"hessian_eigs: k must be a positive int, got {k!r}")
    pt = point("hessian_eigs", model, inputs, named, wrt, ggn=ggn)
    n = pt.space.size
    if k > n:
        raise ValueError(f"hessian_eigs: k must be at most {n} (the size), got {k!r}")
    mv = pt.matvec(ggn)
    if k >= n - 1:  # too small for Lanczos: the dense matrix
        H = np.column_stack([mv(e) for e in np.eye(n)])
        values, vecs = np.linalg.eigh((H + H.T) / 2)
    else:
        op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(rng).standard_normal(n)
        values, vecs = eigsh(op, k=k, which=which, v0=v0, tol=tol)
    order = np.argsort(values)[::-1]
    if len(values) > k:  # from the dense path: keep what eigsh's `which` would
        pick = {"LA": order[:k], "SA": order[::-1][:k], "LM": np.argsort(-np.abs(values))[:k]}
        order = np.array(sorted(pick[which], key=lambda i: -values[i]))
    return Eigen(values[order], [pt.space.unflat(vecs[:, i]) for i in order])


def hessian_trace(
    model: Any,
    *inputs: Any,
    n: int = 100,
    rng: Any = None,
    wrt: str = "params",
    ggn: bool = False,
    **named: Any,
) -> TraceEstimate:
    """Hutchinson's estimate of the trace of the Hessian from ``n`` Rademacher vectors.

    The estimate is unbiased; its standard error, reported, shrinks as ``1/√n``.
    ``rng`` (a seed or a ``numpy.random.Generator``) draws the vectors.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"hessian_trace: n must be an int of at least 2, got {n!r}")
    pt = point("hessian_trace", model, inputs, named, wrt, ggn=ggn)
    mv, gen = pt.matvec(ggn), np.random.default_rng(rng)
    samples = np.empty(n)
    for i in range(n):
        z = gen.choice([-1.0, 1.0], size=pt.space.size)
        samples[i] = z @ mv(z)
    return TraceEstimate(float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(n)), samples)


def hessian_spectrum(
    model: Any,
    *inputs: Any,
    steps: int = 40,
    runs: int = 4,
    rng: Any = None,
    wrt: str = "params",
    ggn: bool = False,
    **named: Any,
) -> Spectrum:
    """The spectral density of the Hessian by stochastic Lanczos quadrature.

    ``runs`` random unit vectors (Rademacher entries), ``steps`` Lanczos steps each
    (with full reorthogonalization, so the nodes are the Ritz values of a true Krylov
    space). Read it with ``Spectrum.density(grid, sigma)``.
    """
    for what, value in (("steps", steps), ("runs", runs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"hessian_spectrum: {what} must be a positive int, got {value!r}")
    pt = point("hessian_spectrum", model, inputs, named, wrt, ggn=ggn)
    mv, gen, n = pt.matvec(ggn), np.random.default_rng(rng), pt.space.size
    m = min(steps, n)
    nodes, weights = np.zeros((runs, m)), np.zeros((runs, m))
    for r in range(runs):
        v = gen.choice([-1.0, 1.0], size=n) / np.sqrt(n)
        theta, tau = _lanczos(mv, v, m)
        nodes[r, : len(theta)], weights[r, : len(tau)] = theta, tau
    return Spectrum(nodes, weights)


def _lanczos(mv: Any, v: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``m`` Lanczos steps from the unit vector ``v``."""
    V = np.zeros((m, v.size))
    alpha, beta = [], []
    V[0] = v
    for j in range(m):
        w = mv(V[j])
        alpha.append(float(V[j] @ w))
        w -= V[: j + 1].T @ (V[: j + 1] @ w)  # full reorthogonalization, twice
        w -= V[: j + 1].T @ (V[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        if j == m - 1 or b <= 1e-12 * max(1.0, abs(alpha[-1])):
            break
        beta.append(b)
        V[j + 1] = w / b
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    theta, U = np.linalg.eigh(T)
    return theta, U[0] ** 2
