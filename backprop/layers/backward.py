"""Layers of the backward network (chapter 14.6.5).

The backward pass of any network is itself a network, and a linear one: every
step multiplies ``g`` by a Jacobian frozen at the forward pass's operating
point. These layers are those steps, as ordinary layers with a fast path and
explicit Jacobians. Each is linear in its input ``g``; the numbers it holds
(``d``, ``L``, ``x_in``) are constants taken from the forward pass:

- ``Gate(d)``: ``g ↦ g * d``, a pointwise layer's ``diag(h'(x_in))`` (eq. 14.33);
- ``Slice(start, stop, shape)``: the part of ``g`` that belongs to one input of
  a merge (the transpose of eq. 14.41's selection);
- ``VJP(L, shape)``: ``g ↦ g L`` for any fixed structured Jacobian ``L`` (a
  loss's row ``2(ŷ - y)/B``, or anything without a more specific layer);
- ``WeightGrad(x_in)``: ``g ↦ gᵀ x_in``, the weight gradient of a linear layer
  (eq. 14.29) as one matrix product over the batch;
- ``BatchSum()``: ``g ↦ Σ_b g_b``, the bias gradient (eq. 14.20).

``WeightGrad``, ``BatchSum`` and ``VJP(..., sum_batch=True)`` add the examples
up, as a loss does: their output has no batch axis (it has the parameter's
shape) and ``reduces_batch`` is True. Their per-example Jacobian is that of one
example's term, and the terms add, the convention of a loss's Jacobian.

Being linear in their input, with frozen constants, all of them move a tangent as
they move their input and have no second-order term: differentiating this network
twice gives zero. The curvature of the model is in how those constants depend on
the forward pass, which ``backprop.curvature`` follows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import Dense, Diagonal, Identity, Jacobian, Sparse
from backprop.layer import Layer, OperatingPoint, check_float
from backprop.layers.second_order import linear_hvp, linear_tangent

__all__ = ["BatchSum", "Gate", "Slice", "VJP", "WeightGrad"]


def _frozen(where: str, value: Any) -> np.ndarray:
    x = check_float(where, "the constant", np.array(value, copy=True))
    x.flags.writeable = False
    return x


def _transpose(L: Jacobian, label: str) -> Jacobian:
    """``Lᵀ`` for every example: sparse when ``L`` is shared, else dense."""
    if L.shared:
        return Sparse(sp.csr_array(L.to_sparse(0).T), L.batch, label)
    return Dense(np.ascontiguousarray(L.to_dense().transpose(0, 2, 1)), label)


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


class Gate(Layer):
    """``x_out = x_in * d`` for a fixed array ``d`` of shape ``(B, *shape)``.

    In the backward network ``x_in`` is ``g_out`` of a pointwise layer and ``d``
    is ``h'(x_in)`` of the forward pass, so ``x_out = g_in`` (eq. 14.33): the
    gating matrix ``diag(d)`` whose values come from the forward activations.
    Per example ``L^x = diag(d_b)``.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, d: Any, label: str = "d") -> None:
        super().__init__()
        self.d = _frozen("Gate", d)
        if self.d.ndim < 1:
            raise ValueError("Gate: d needs a batch axis, shape (B, ...)")
        self.label = label

    def _dtype(self) -> np.dtype[Any]:
        return self.d.dtype

    def _check(self, x_in: np.ndarray) -> None:
        if x_in.shape != self.d.shape:
            raise ValueError(f"{self!r}: x_in has shape {x_in.shape}, expected {self.d.shape}")

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in * self.d

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (g_out * self.d if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        B = self.d.shape[0]
        return Diagonal(self.d.reshape(B, -1), self.label), {}

    def __repr__(self) -> str:
        return f"Gate({self.label})"


class Slice(Layer):
    """Entries ``start .. stop-1`` of each example, reshaped to ``shape``.

    ``x_in`` is ``(B, m)`` (or any ``(B, ...)`` with ``m`` entries per example);
    ``x_out`` is ``(B, *shape)`` with ``|shape| = stop - start``. It undoes a
    ``Merge``: the gradient of merge input ``i`` is its block of ``g_out``.
    Per example ``L^x`` is ``[0 I 0]``, the transpose of eq. 14.41's selection.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, start: int, stop: int, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if not 0 <= start < stop:
            raise ValueError(f"Slice: need 0 <= start < stop, got {start}, {stop}")
        self.start, self.stop = int(start), int(stop)
        self.shape = (self.stop - self.start,) if shape is None else tuple(shape)
        if _size(self.shape) != self.stop - self.start:
            raise ValueError(
                f"Slice: shape {self.shape} does not hold {self.stop - self.start} entries"
            )

    def _check(self, x_in: np.ndarray) -> None:
        m = _size(x_in.shape[1:])
        if m < self.stop:
            raise ValueError(f"{self!r}: x_in has shape {x_in.shape}, {m} entries per example")

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        B = x_in.shape[0]
        return x_in.reshape(B, -1)[:, self.start : self.stop].reshape(B, *self.shape)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        x = op.x_in[0]
        g_in = np.zeros((x.shape[0], _size(x.shape[1:])), dtype=g_out.dtype)
        g_in[:, self.start : self.stop] = g_out.reshape(x.shape[0], -1)
        return g_in.reshape(x.shape), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        n, m = self.stop - self.start, _size(x.shape[1:])
        S = sp.csr_array(
            (np.ones(n, x.dtype), (np.arange(n), np.arange(self.start, self.stop))), shape=(n, m)
        )
        return Sparse(S, x.shape[0], f"entries {self.start}..{self.stop - 1}"), {}

    def __repr__(self) -> str:
        return f"Slice({self.start}:{self.stop})"


class VJP(Layer):
    """``x_out = x_in L`` per example, for a fixed structured Jacobian ``L`` (eq. 14.10).

    ``L`` holds ``B`` matrices ``(M, N)``. ``x_in`` is ``(B, ...)`` with ``M``
    entries per example (a ``g_out``); ``x_out`` is ``(B, *shape)`` with
    ``|shape| = N`` (the ``g_in``). With ``sum_batch=True`` the examples' rows
    add up (``Σ_b x_in,b L_b``, a parameter gradient, eq. 14.11) and ``x_out``
    has shape ``shape``, with no batch axis. The map is linear in ``x_in``:
    per example ``L^x = L_bᵀ``.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(
        self, L: Jacobian, shape: tuple[int, ...], *, sum_batch: bool = False, label: str = ""
    ) -> None:
        super().__init__()
        if not isinstance(L, Jacobian):
            raise TypeError(f"VJP: L must be a backprop.jacobian object, got {type(L).__name__}")
        self.L = L
        self.shape = tuple(int(s) for s in shape)
        if _size(self.shape) != L.shape[1]:
            raise ValueError(f"VJP: shape {self.shape} does not hold the {L.shape[1]} columns of L")
        self.reduces_batch = bool(sum_batch)
        self.label = label or L.label

    def _dtype(self) -> np.dtype[Any]:
        return self.L.dtype

    def _check(self, x_in: np.ndarray) -> None:
        B, M = self.L.batch, self.L.shape[0]
        if x_in.shape[0] != B or _size(x_in.shape[1:]) != M:
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected a batch of {B} with {M} "
                f"entries per example"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        rows = x_in.reshape(x_in.shape[0], -1)
        if self.reduces_batch:
            return np.array(self.L.vjp_sum(rows), dtype=x_in.dtype).reshape(self.shape)
        return np.array(self.L.vjp(rows), dtype=x_in.dtype).reshape(x_in.shape[0], *self.shape)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        x = op.x_in[0]
        u = np.ascontiguousarray(self._g_rows(op, g_out))
        return np.asarray(self.L.jvp(u), dtype=x.dtype).reshape(x.shape), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        return _transpose(self.L, f"({self.label})ᵀ"), {}

    def __repr__(self) -> str:
        M, N = self.L.shape
        total = ", summed over the batch" if self.reduces_batch else ""
        return f"VJP({M}→{N}: g · {self.label}{total})"


class WeightGrad(Layer):
    """``x_out = x_inᵀ x`` for a fixed batch ``x`` ``(B, n_in)``: a linear layer's ``dJ/dW``.

    ``x_in`` is ``g_out`` of the linear layer, ``(B, n_out)``, and ``x`` is the
    forward pass's input to it; ``x_out = Σ_b g_b x_bᵀ`` has ``W``'s shape
    ``(n_out, n_in)`` (eq. 14.29, transposed to ``W``'s shape), one matrix
    product over the batch. Per example ``L^x`` is ``(I ⊗ x_bᵀ)ᵀ``, of shape
    ``(n_out·n_in, n_out)``, and the examples' terms add (``reduces_batch``).
    """

    reduces_batch = True
    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, x: Any) -> None:
        super().__init__()
        self.x = _frozen("WeightGrad", x)
        if self.x.ndim != 2:
            raise ValueError(f"WeightGrad: x must have shape (B, n_in), got {self.x.shape}")

    def _dtype(self) -> np.dtype[Any]:
        return self.x.dtype

    def _check(self, x_in: np.ndarray) -> None:
        if x_in.ndim != 2 or x_in.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected ({self.x.shape[0]}, n_out)"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.T @ self.x

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (self.x @ g_out.T if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        m = op.x_in[0].shape[1]
        B, n = self.x.shape
        A = np.zeros((B, m, n, m), dtype=self.x.dtype)
        idx = np.arange(m)
        A[:, idx, :, idx] = self.x[None, :, :]
        return Dense(A.reshape(B, m * n, m), "(I ⊗ x_inᵀ)ᵀ"), {}

    def __repr__(self) -> str:
        return f"WeightGrad(gᵀ x_in, x_in {self.x.shape})"


class BatchSum(Layer):
    """``x_out = Σ_b x_in[b]``: ``(B, *shape) -> shape``; a bias gradient (eq. 14.20).

    Per example ``L^x = I``, and the examples' terms add (``reduces_batch``).
    """

    reduces_batch = True
    _tangent = linear_tangent
    _hvp = linear_hvp

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.sum(axis=0)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        x = op.x_in[0]
        return np.broadcast_to(g_out, x.shape).copy(), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Identity(_size(x.shape[1:]), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        return "BatchSum()"
