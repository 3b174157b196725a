"""Loss layers (chapter 14.6.3).

A loss layer's output is the cost ``J``: the mean over the batch of the
per-example losses (eq. 14.11). Its gradient therefore already carries the
``1/B``, and its ``backward()`` starts from ``g_out = dJ/dJ = 1``.
Per example, ``L^x`` is a single row: ``[1 × |x_in|]`` (eq. 14.34).

Second order: with ``g_out = dJ/dJ``, the Hessian of ``g_out·J`` in the loss's
input is the loss's own Hessian, the ``H_loss`` of the generalized Gauss–Newton
``Jᵀ H_loss J``: ``2 I / B`` for the L2 loss, ``(diag(p) − p pᵀ) / N`` per labelled
position for softmax cross-entropy. Both are positive semidefinite, and both are
block diagonal over the examples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from backprop.jacobian import Dense, Jacobian
from backprop.layer import Loss, OperatingPoint

#: Each signed integer dtype's unsigned twin, for the one-pass label check.
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
        if not y.shape[0]:
            self._refuse((y_hat, y))

    def _forward(self, op: OperatingPoint, y_hat: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = y_hat - y  # kept: backward scales it instead of subtracting again
        op.saved["r"] = r
        J = np.vdot(r, r) / y.shape[0]
        if not math.isfinite(J):
            self._refuse(op.x_in, J)
        return np.asarray(J, dtype=y.dtype)

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

    def _moved(self, dx_in: tuple[Any, ...]) -> Any:
        """``ẏ_hat − ẏ``: how the residual ``ŷ − y`` moves (None if it does not)."""
        d_hat, d_y = dx_in
        if d_y is None:
            return d_hat
        return -d_y if d_hat is None else d_hat - d_y

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        dr = self._moved(dx_in)  # J̇ = 2 <ŷ − y, ẏ_hat − ẏ> / B
        return None if dr is None else np.asarray(np.vdot(self._error(op), dr), dr.dtype)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        dr = self._moved(dx_in)  # H = (2 g_out / B) [I −I; −I I]
        if dr is None:
            return None
        h = dr * (2.0 * float(g_out) / dr.shape[0])
        return (h, -h), {}


class SoftmaxCrossEntropy(Loss):
    """``J = mean -log softmax(z)[y]`` over every labelled position, as
    ``torch.nn.CrossEntropyLoss()``.

    ``logits`` is ``(B, C)``, or ``(B, C, d1, ...)`` with the classes on axis 1
    (a class score per pixel or per token); ``labels`` holds integers in
    ``0..C-1`` of shape ``(B,)``, or ``(B, d1, ...)``. ``J`` is the mean over the
    ``N = B·d1·...`` labelled positions. The log-sum-exp is shifted by each
    position's maximum, so ``J`` and its gradient are finite and warning-free for
    any finite logits. Per example ``L^z`` is one row ``(1, C·d1·...)``: the
    entries of ``(softmax(z) - onehot(y)) / N`` over the classes of each
    position; the labels get no gradient.

    The general case moves the class axis last and is then the ``(B, C)`` case on
    ``(N, C)`` rows.
    """

    inputs = ("logits", "labels")
    label_inputs = frozenset({"labels"})

    def __init__(self) -> None:
        super().__init__()
        self._starts = np.arange(0)  # cached n*C for n = 0..N-1: where each row starts
        self._ones = np.ones(0)  # cached C ones: row sums as one matrix-vector product
        self._batch_ones = np.ones(0)  # cached N ones: the sum over rows as one dot product

    def _check(self, logits: np.ndarray, labels: np.ndarray) -> None:
        shape = labels.shape
        if logits.ndim != 2 or labels.ndim != 1:
            self._check_shapes(logits, labels)
            labels = labels.reshape(-1)  # the range check below reads one axis
        elif labels.shape[0] != logits.shape[0]:
            self._check_shapes(logits, labels)
        C = logits.shape[1]
        if not labels.size:
            raise ValueError(
                f"SoftmaxCrossEntropy: no labelled position (logits {logits.shape}, labels "
                f"{shape}); the cost is a mean over them, and there are none"
            )
        dtype = labels.dtype
        unsigned = labels
        if dtype in _UNSIGNED and C <= 1 << (8 * dtype.itemsize - 1):
            # Viewed as unsigned, a negative label is at least 2^(bits-1), so at least C
            # (the condition above): one test against C checks both ends.
            unsigned = labels.view(_UNSIGNED[dtype])
        if unsigned.dtype.kind == "u":
            # The largest label by argmax and one read, on every step's path: a plain
            # loop, several times cheaper than the reduction behind labels.max().
            outside = unsigned[unsigned.argmax()] >= C
        else:  # many classes for a small signed dtype, or the other byte order
            outside = labels.min() < 0 or labels.max() >= C
        if outside:
            bad = labels[(labels < 0) | (labels >= C)]
            raise ValueError(
                f"SoftmaxCrossEntropy: labels must lie in 0..{C - 1} for logits of shape "
                f"{logits.shape} (classes on axis 1); got {bad[:5].tolist()}"
            )

    def _check_shapes(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """A ``ValueError`` unless logits are ``(B, C, *D)`` and labels ``(B, *D)``."""
        if logits.ndim < 2:
            raise ValueError(
                f"SoftmaxCrossEntropy: logits must have shape (B, C), got {logits.shape} "
                f"(with labels of shape {labels.shape}); (B, C, d1, ...), the classes on "
                f"axis 1, is accepted too"
            )
        expected = logits.shape[:1] + logits.shape[2:]
        if labels.shape != expected:
            raise ValueError(
                f"SoftmaxCrossEntropy: labels have shape {labels.shape}, expected {expected} "
                f"for logits of shape {logits.shape}: one label per example"
                + (" and position" if logits.ndim > 2 else "")
                + " (the class axis 1 of the logits removed)"
            )

    def _forward(self, op: OperatingPoint, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if logits.ndim != 2:  # (B, C, *D): one row of C scores per labelled position
            logits = np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])
            labels = labels.reshape(-1)
        N, C = logits.shape
        starts = self._starts
        if starts.shape[0] != N or (N > 1 and starts[1] != C):
            starts = self._starts = np.arange(0, N * C, C, dtype=np.intp)
        ones = self._ones
        if ones.shape[0] != C or ones.dtype != logits.dtype:
            ones = self._ones = np.ones(C, dtype=logits.dtype)
        # Each row's maximum m_n. With few classes, numpy reduces a transposed copy
        # (C rows of N) about twice as fast as the N short rows.
        # (np.maximum.reduce is .max() without its Python wrapper.)
        if C <= 64:
            m = np.maximum.reduce(np.ascontiguousarray(logits.T), axis=0)
        else:
            m = np.maximum.reduce(logits, axis=1)
        if not (math.isfinite(m[m.argmax()]) and math.isfinite(m[m.argmin()])):
            # A row holding NaN or +inf, or only -inf, has no softmax (and inf - inf would
            # warn): refuse it here, naming the logits, before any state changes. argmax
            # and argmin both pick a NaN where there is one, so the largest and the
            # smallest m_n tell.
            self._refuse(op.x_in, math.nan)
        p = logits - m[:, None]  # shifted logits, every entry <= 0
        if labels.dtype != _INTP:  # labels are checked to lie in 0..C-1: this is exact
            labels = labels.astype(np.intp)
        flat = starts + labels  # the index of z_{n, y_n} in the flattened rows
        picked = p.ravel()[flat]
        np.exp(p, out=p)
        total = p @ ones  # Σ_c e^{z_nc - m_n}, each >= 1
        p /= total[:, None]  # softmax(z), kept for backward
        op.saved["p"] = p
        op.saved["flat"] = flat
        # J = mean_n (log Σ_c e^{z_nc - m_n} - (z_{n,y_n} - m_n))
        lse = np.log(total)
        lse -= picked
        batch_ones = self._batch_ones
        if batch_ones.shape[0] != N or batch_ones.dtype != logits.dtype:
            batch_ones = self._batch_ones = np.ones(N, dtype=logits.dtype)
        J = np.dot(lse, batch_ones) / N
        if not math.isfinite(J):  # finite logits, but a label's logit at -inf
            self._refuse(op.x_in, J)
        return np.asarray(J, dtype=logits.dtype)

    def _error(self, op: OperatingPoint, scale: float = 1.0) -> np.ndarray:
        """``scale · ∂J/∂z = scale · (softmax(z) - onehot(y)) / N`` in the logits' shape
        (a new array)."""
        e = op.saved["p"].copy()
        e.ravel()[op.saved["flat"]] -= 1  # e is a fresh C-contiguous array: ravel is a view
        e *= scale / e.shape[0]
        shape = op.x_in[0].shape
        if len(shape) != 2:  # rows (N, C) back to (B, C, *D)
            e = np.moveaxis(e.reshape(*shape[:1], *shape[2:], shape[1]), -1, 1)
            e = np.ascontiguousarray(e)
        return e

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None), {}
        return (self._error(op, float(g_out)), None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        e = self._error(op)
        row = e.reshape(e.shape[0], 1, -1)
        return (Dense(row, "(softmax(z) - onehot(y))/N"), None), {}

    def _rows(self, op: OperatingPoint, z: np.ndarray) -> np.ndarray:
        """An array of the logits' shape as the ``(N, C)`` rows of the labelled positions."""
        return z if z.ndim == 2 else np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        dz = dx_in[0]  # J̇ = <(p − onehot(y)) / N, ż>
        return None if dz is None else np.asarray(np.vdot(self._error(op), dz), dz.dtype)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        dz = dx_in[0]
        if dz is None:
            return None
        p = op.saved["p"]  # (N, C): per position, (diag(p) − p pᵀ) ż / N
        pz = p * self._rows(op, dz)
        h = pz - p * pz.sum(axis=1, keepdims=True)
        h *= float(g_out) / p.shape[0]
        shape = dz.shape
        if len(shape) != 2:  # rows (N, C) back to (B, C, *D)
            h = np.moveaxis(h.reshape(*shape[:1], *shape[2:], shape[1]), -1, 1)
            h = np.ascontiguousarray(h)
        return (h, None), {}
