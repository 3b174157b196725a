"""Loss layers (chapter 14.6.3).

A loss layer's output is the cost ``J``: the mean over the batch of the
per-example losses (eq. 14.11). Its gradient therefore already carries the
``1/B``, and its ``backward()`` starts from ``g_out = dJ/dJ = 1``.
Per example, ``L^x`` is a single row: ``[1 × |x_in|]`` (eq. 14.34).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import Dense, Jacobian
from backprop.layer import Loss, OperatingPoint

#: Each signed integer dtype's unsigned twin, for the one-reduction label check.
_UNSIGNED = {np.dtype(f"i{n}"): np.dtype(f"u{n}") for n in (1, 2, 4, 8)}
#: The index dtype, as a dtype: comparing with it is cheaper than with ``np.intp``.
_INTP = np.dtype(np.intp)


class L2Loss(Loss):
    """``J = (1/B) Σ_b ‖ŷ_b - y_b‖²`` (eq. 14.34, averaged as in eq. 14.11).

    ``y_hat`` and ``y`` have the same shape ``(B, *shape)``. Per example,
    ``L^ŷ = 2(ŷ_b - y_b) / B`` (eq. 14.35 with the batch mean) and
    ``L^y = -L^ŷ``.
    """

    inputs = ("y_hat", "y")

    def _check(self, y_hat: np.ndarray, y: np.ndarray) -> None:
        if y_hat.shape != y.shape:
            raise ValueError(
                f"L2Loss: y_hat has shape {y_hat.shape} but y has shape {y.shape}; "
                f"the prediction and the target must have the same shape"
            )

    def _forward(self, op: OperatingPoint, y_hat: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = y_hat - y  # kept: backward scales it instead of subtracting again
        op.saved["r"] = r
        return np.asarray(np.vdot(r, r) / y.shape[0], dtype=y.dtype)

    def _error(self, op: OperatingPoint, scale: float = 1.0) -> np.ndarray:
        """``scale · ∂J/∂ŷ = scale · 2(ŷ - y) / B``, in ``ŷ``'s shape (a new array)."""
        r = op.saved["r"]
        return r * (2.0 * scale / r.shape[0])

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None), {}
        g = self._error(op, float(g_out))
        return (g, -g), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        e = self._error(op)
        row = e.reshape(e.shape[0], 1, -1)
        return (Dense(row, "2(ŷ - y)/B"), Dense(-row, "-2(ŷ - y)/B")), {}


class SoftmaxCrossEntropy(Loss):
    """``J = (1/B) Σ_b -log softmax(z_b)[y_b]`` for logits ``z`` and labels ``y``.

    ``logits`` is ``(B, C)``; ``labels`` holds integers in ``0..C-1``, shape
    ``(B,)``. The log-sum-exp is shifted by each row's maximum, so ``J`` and its
    gradient are finite and warning-free for any finite logits. Per example,
    ``L^z = (softmax(z_b) - onehot(y_b)) / B``; the labels get no gradient.
    """

    inputs = ("logits", "labels")
    label_inputs = frozenset({"labels"})

    def __init__(self) -> None:
        super().__init__()
        self._starts = np.arange(0)  # cached b*C for b = 0..B-1: where each row starts
        self._ones = np.ones(0)  # cached C ones: row sums as one matrix-vector product
        self._batch_ones = np.ones(0)  # cached B ones: the batch sum as one dot product

    def _check(self, logits: np.ndarray, labels: np.ndarray) -> None:
        if logits.ndim != 2:
            raise ValueError(
                f"SoftmaxCrossEntropy: logits must have shape (B, C), got {logits.shape}"
            )
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"SoftmaxCrossEntropy: labels have shape {labels.shape}, expected "
                f"({logits.shape[0]},) for logits of shape {logits.shape}"
            )
        C = logits.shape[1]
        if not labels.size:
            return
        # np.maximum.reduce, not labels.max(): the same reduction without the Python
        # wrapper around it, on every step's path.
        dtype = labels.dtype
        if dtype.kind == "u":
            outside = np.maximum.reduce(labels) >= C
        elif dtype in _UNSIGNED and C <= 1 << (8 * dtype.itemsize - 1):
            # One reduction checks both ends: viewed as unsigned, a negative label is at
            # least 2^(bits-1), so at least C (the condition above).
            outside = np.maximum.reduce(labels.view(_UNSIGNED[dtype])) >= C
        else:  # many classes for a small signed dtype, or the other byte order
            outside = labels.min() < 0 or labels.max() >= C
        if outside:
            bad = labels[(labels < 0) | (labels >= C)]
            raise ValueError(
                f"SoftmaxCrossEntropy: labels must lie in 0..{C - 1} for logits of shape "
                f"{logits.shape}; got {bad[:5].tolist()}"
            )

    def _forward(self, op: OperatingPoint, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        B, C = logits.shape
        starts = self._starts
        if starts.shape[0] != B or (B > 1 and starts[1] != C):
            starts = self._starts = np.arange(0, B * C, C, dtype=np.intp)
        ones = self._ones
        if ones.shape[0] != C or ones.dtype != logits.dtype:
            ones = self._ones = np.ones(C, dtype=logits.dtype)
        # Each row's maximum m_b. With few classes, numpy reduces a transposed copy
        # (C rows of B) about twice as fast as the B short rows.
        # (np.maximum.reduce is .max() without its Python wrapper.)
        if C <= 64:
            m = np.maximum.reduce(np.ascontiguousarray(logits.T), axis=0)
        else:
            m = np.maximum.reduce(logits, axis=1)
        p = logits - m[:, None]  # shifted logits, every entry <= 0
        if labels.dtype != _INTP:  # labels are checked to lie in 0..C-1: this is exact
            labels = labels.astype(np.intp)
        flat = starts + labels  # the index of z_{b, y_b} in the flattened logits
        picked = p.ravel()[flat]
        np.exp(p, out=p)
        total = p @ ones  # Σ_c e^{z_bc - m_b}, each >= 1
        p /= total[:, None]  # softmax(z), kept for backward
        op.saved["p"] = p
        op.saved["flat"] = flat
        # J = mean_b (log Σ_c e^{z_bc - m_b} - (z_{b,y_b} - m_b))
        lse = np.log(total)
        lse -= picked
        batch_ones = self._batch_ones
        if batch_ones.shape[0] != B or batch_ones.dtype != logits.dtype:
            batch_ones = self._batch_ones = np.ones(B, dtype=logits.dtype)
        return np.asarray(np.dot(lse, batch_ones) / B, dtype=logits.dtype)

    def _error(self, op: OperatingPoint, scale: float = 1.0) -> np.ndarray:
        """``scale · ∂J/∂z = scale · (softmax(z) - onehot(y)) / B`` (a new array)."""
        e = op.saved["p"].copy()
        e.ravel()[op.saved["flat"]] -= 1  # e is a fresh C-contiguous array: ravel is a view
        e *= scale / e.shape[0]
        return e

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None), {}
        return (self._error(op, float(g_out)), None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        e = self._error(op)
        return (Dense(e[:, None, :], "(softmax(z) - onehot(y))/B"), None), {}
