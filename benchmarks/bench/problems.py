"""The problems every contestant starts from, and the closeness check of their results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import backprop as bp

#: name -> (layer sizes, batch, loss). Hidden layers use ReLU.
STEP_SIZES: dict[str, tuple[tuple[int, ...], int, str]] = {
    "tiny": ((2, 16, 16, 1), 100, "l2"),
    "small": ((64, 128, 10), 64, "ce"),
    "large": ((784, 1024, 1024, 10), 256, "ce"),
}
DTYPES = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32)}
#: rtol of the first-step (and Jacobian) check, per dtype.
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
LR = 0.01


@dataclass
class Problem:
    """One MLP, its data and its initial weights: what every contestant starts from.

    ``weights`` is a list of ``(W, b)`` with ``W`` of shape ``(n_out, n_in)``.
    ``y`` is ``(B, n_L)`` floats for the L2 loss and ``(B,)`` int64 labels for
    softmax cross-entropy.
    """

    name: str
    sizes: tuple[int, ...]
    batch: int
    loss: str
    dtype: np.dtype[Any]
    X: np.ndarray
    y: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]
    lr: float = LR


def make_problem(name: str, dtype: Any = np.float64, seed: int = 0) -> Problem:
    """The problem ``name`` (a key of ``STEP_SIZES``) in ``dtype``."""
    sizes, batch, loss = STEP_SIZES[name]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    weights = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(dtype)
        b = rng.uniform(-bound, bound, size=n_out).astype(dtype)
        weights.append((W, b))
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    if loss == "l2":
        y = rng.standard_normal((batch, sizes[-1])).astype(dtype)
    else:
        y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
    return Problem(name, sizes, batch, loss, dtype, X, y, weights)


def build_engine_net(p: Problem, loss: bool = True) -> bp.Sequential:
    """The problem's MLP as a ``bp.Sequential`` (Linear, ReLU, ..., Linear[, loss])."""
    layers: list[bp.Layer] = []
    n = len(p.weights)
    for i, (W, b) in enumerate(p.weights):
        layers.append(bp.Linear(W.shape[1], W.shape[0], W=W.copy(), b=b.copy(), dtype=p.dtype))
        if i < n - 1:
            layers.append(bp.ReLU())
    if loss:
        layers.append(bp.L2Loss() if p.loss == "l2" else bp.SoftmaxCrossEntropy())
    return bp.Sequential(layers)


def as_fit_batch(a: np.ndarray) -> np.ndarray:
    """``a`` as ``fit`` hands a training step its minibatch: a fresh read-only array that
    only the step sees (so a layer caches it without copying it)."""
    batch = a.copy()
    batch.setflags(write=False)
    return batch


def close(a: Any, b: Any, rtol: float) -> tuple[bool, float]:
    """Relative closeness scaled by the reference ``b``'s largest entry; also the error."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False, float("inf")
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    err = float(np.abs(a - b).max(initial=0.0)) / scale
    return err <= rtol, err
