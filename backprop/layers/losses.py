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
        # One reduction checks both ends: viewed as unsigned, a negative label is huge.
        unsigned = labels.view(f"u{labels.dtype.itemsize}") if labels.dtype.kind == "i" else labels
        if labels.size and unsigned.max() >= C:
            bad = labels[(labels < 0) | (labels >= C)]
            raise ValueError(
                f"SoftmaxCrossEntropy: labels must lie in 0..{C - 1} for logits of shape "
                f"{logits.shape}; got {bad[:5].tolist()}"
            )

    def _forward(self, op: OperatingPoint, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        B = logits.shape[0]
        rows = np.arange(B)
        p = logits - logits.max(axis=1, keepdims=True)  # shifted logits
        picked = p[rows, labels]
        np.exp(p, out=p)
        total = p.sum(axis=1, keepdims=True)
        p /= total  # softmax(z), kept for backward
        op.saved["p"] = p
        op.saved["rows"] = rows
        # J = mean_b (log Σ_c e^{z_bc - m_b} - (z_{b,y_b} - m_b))
        return np.asarray((np.log(total).sum() - picked.sum()) / B, dtype=logits.dtype)

    def _error(self, op: OperatingPoint, scale: float = 1.0) -> np.ndarray:
        """``scale · ∂J/∂z = scale · (softmax(z) - onehot(y)) / B`` (a new array)."""
        labels = op.x_in[1]
        e = op.saved["p"].copy()
        e[op.saved["rows"], labels] -= 1
        e *= scale / labels.shape[0]
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
