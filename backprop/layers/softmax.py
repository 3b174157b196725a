"""``Softmax`` and ``LogSoftmax`` along one axis of each example, as PyTorch.

``axis`` counts the axes of the batch tensor, as torch's ``dim`` (axis 0, the
batch, is refused: a softmax across examples would couple them). A softmax
"row" is the set of entries that share every index but ``axis``; an example of
``R`` rows of ``n`` entries has, per example,

- Softmax: ``L^x = (diag(p) − Σ_r p_r p_rᵀ) / τ``, where ``p_r`` is ``p`` on row
  ``r`` and zero elsewhere: ``DiagonalPlusLowRank`` with one column per row
  (``d = p/τ``, ``U[:, r] = −p_r/τ``, ``V[:, r] = p_r``); rank 1,
  ``diag(p) − p pᵀ``, when the axis is the last one and the example is one row;
- LogSoftmax: ``L^x = I − Σ_r 1_r p_rᵀ`` (``d = 1``, ``U[:, r] = −1_r``,
  ``V[:, r] = p_r``).

Storing the factors costs ``N·R`` numbers per example (``N²/n``): plain for rows
of a few classes, and the price of one uniform structure for any axis.

Second order, per row, with ``ṗ = p ⊙ (ż − <p, ż>)`` the tangent of ``p`` for
``ż = ẋ/τ``: the backward pass of Softmax, ``(g ⊙ p − p <g, p>)/τ``, moves by
``(g ⊙ ṗ − ṗ <g, p> − p <g, ṗ>)/τ``; that of LogSoftmax, ``g − p Σg``, by
``−ṗ Σg``. These are the Hessians of ``<g, softmax>`` and ``<g, log softmax>``
times ``ẋ``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import DiagonalPlusLowRank, Jacobian
from backprop.layer import Layer, OperatingPoint

__all__ = ["LogSoftmax", "Softmax"]


def _axis(layer: Layer, axis: int, x_in: np.ndarray) -> int:
    """``axis`` of ``x_in`` as a non-negative int, or a ``ValueError`` naming ``layer``."""
    a = axis + x_in.ndim if axis < 0 else axis
    if not 0 <= a < x_in.ndim:
        raise ValueError(f"{layer!r}: axis {axis} is out of range for x_in of shape {x_in.shape}")
    if a == 0:
        raise ValueError(
            f"{layer!r}: axis {axis} is the batch axis of x_in {x_in.shape}; a softmax runs "
            f"along an axis of each example (axis counts the batch axis, as torch's dim)"
        )
    return a


def _rows(shape: tuple[int, ...], a: int, dtype: Any) -> np.ndarray:
    """``(N, R)``: entry ``i`` of one example (shape ``shape``, C order) is in row ``r``.

    ``a`` is the softmax axis among the example's axes.
    """
    others = shape[:a] + shape[a + 1 :]
    R = int(np.prod(others, dtype=np.int64))
    row = np.broadcast_to(np.expand_dims(np.arange(R).reshape(others), a), shape).reshape(-1)
    return (row[:, None] == np.arange(R)[None, :]).astype(dtype)


def _check_axis(where: str, axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{where}: axis must be an integer, got {axis!r}")
    return int(axis)


class Softmax(Layer):
    """``x_out = softmax(x_in / τ)`` along ``axis`` (``torch.softmax(x / τ, dim=axis)``).

    Any shape ``(B, *shape)`` in and out; ``temperature`` ``τ > 0``.
    """

    def __init__(self, axis: int = -1, temperature: float = 1.0) -> None:
        super().__init__()
        self.axis = _check_axis("Softmax", axis)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float | np.floating)
            or not temperature > 0
            or not np.isfinite(temperature)
        ):
            raise ValueError(f"Softmax: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def _check(self, x_in: np.ndarray) -> None:
        _axis(self, self.axis, x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        a = _axis(self, self.axis, x_in)
        z = x_in / np.asarray(self.temperature, x_in.dtype)
        e = np.exp(z - z.max(axis=a, keepdims=True))
        return e / e.sum(axis=a, keepdims=True)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        p, a = op.x_out, _axis(self, self.axis, op.x_out)
        gp = g_out * p
        return (gp - p * gp.sum(axis=a, keepdims=True)) / np.asarray(self.temperature, p.dtype), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        p = op.x_out
        B, a, t = p.shape[0], _axis(self, self.axis, p), self.temperature
        rows = _rows(p.shape[1:], a - 1, p.dtype)
        flat = p.reshape(B, -1)
        if rows.shape[1] == 1 and t == 1.0:
            return DiagonalPlusLowRank.softmax(flat), {}
        tau = np.asarray(t, p.dtype)
        U = -(flat / tau)[:, :, None] * rows[None]
        V = flat[:, :, None] * rows[None]
        label = "diag(p) − p pᵀ" if rows.shape[1] == 1 else "diag(p) − Σ_rows p_r p_rᵀ"
        return DiagonalPlusLowRank(flat / tau, U, V, f"({label})/{t:g}" if t != 1 else label), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (dx,) = dx_in
        if dx is None:
            return None
        p, a = op.x_out, _axis(self, self.axis, op.x_out)
        return _moved(p, dx / np.asarray(self.temperature, p.dtype), a)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        (dx,) = dx_in
        if dx is None:
            return None
        p, a = op.x_out, _axis(self, self.axis, op.x_out)
        tau = np.asarray(self.temperature, p.dtype)
        dp = _moved(p, dx / tau, a)
        h = g_out * dp - dp * (g_out * p).sum(axis=a, keepdims=True)
        h -= p * (g_out * dp).sum(axis=a, keepdims=True)
        return (h / tau,), {}

    def __repr__(self) -> str:
        t = f", temperature={self.temperature:g}" if self.temperature != 1.0 else ""
        return f"Softmax(axis={self.axis}{t})"


class LogSoftmax(Layer):
    """``x_out = x_in − logsumexp(x_in)`` along ``axis`` (``torch.log_softmax(x, dim=axis)``)."""

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        self.axis = _check_axis("LogSoftmax", axis)

    def _check(self, x_in: np.ndarray) -> None:
        _axis(self, self.axis, x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        a = _axis(self, self.axis, x_in)
        z = x_in - x_in.max(axis=a, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=a, keepdims=True))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        a = _axis(self, self.axis, op.x_out)
        return g_out - np.exp(op.x_out) * g_out.sum(axis=a, keepdims=True), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        p = np.exp(op.x_out)
        B, a = p.shape[0], _axis(self, self.axis, p)
        rows = _rows(p.shape[1:], a - 1, p.dtype)
        flat = p.reshape(B, -1)
        U = np.broadcast_to(-rows[None], (B, *rows.shape))
        V = flat[:, :, None] * rows[None]
        label = "I − 1 pᵀ" if rows.shape[1] == 1 else "I − Σ_rows 1_r p_rᵀ"
        return DiagonalPlusLowRank(np.ones_like(flat), U, V, label), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (dx,) = dx_in  # ẋ − <p, ẋ> per row
        if dx is None:
            return None
        a = _axis(self, self.axis, op.x_out)
        return dx - (np.exp(op.x_out) * dx).sum(axis=a, keepdims=True)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        (dx,) = dx_in  # −ṗ Σg per row
        if dx is None:
            return None
        a = _axis(self, self.axis, op.x_out)
        dp = _moved(np.exp(op.x_out), dx, a)
        return (-dp * g_out.sum(axis=a, keepdims=True),), {}

    def __repr__(self) -> str:
        return f"LogSoftmax(axis={self.axis})"


def _moved(p: np.ndarray, dz: np.ndarray, a: int) -> np.ndarray:
    """``ṗ = p ⊙ (ż − <p, ż>)``: how ``p = softmax(z)`` moves along ``ż``, row by row."""
    return p * (dz - (p * dz).sum(axis=a, keepdims=True))
