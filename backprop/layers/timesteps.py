"""Layers that take a sequence apart for a recurrence: ``Unstack`` and ``ZeroState``.

An unrolled recurrent net (``backprop.recurrent.unroll``) reads the input of step
``t`` out of a batch of sequences ``(B, T, n_in)`` and starts from a state. Both
moves are linear and parameter-free:

- ``Unstack(T)`` splits ``(B, T, *shape)`` into its ``T`` steps, ``T`` outputs of
  ``(B, *shape)``. The outputs stacked per example are the example's entries in
  their own order, so ``L^x = I``; the backward pass stacks the ``T`` gradients
  back into one array.
- ``ZeroState(n)`` gives the all-zero initial state ``(B, n)`` for a batch of any
  input; its ``L^x`` is the zero matrix.

Both are linear in their input with no parameter: the tangent is the layer applied to
the input's tangent, and there is no second-order term (``linear_tangent``,
``linear_hvp``).

The stacking of the hidden states needs no layer of its own: ``Merge`` joins the
``T`` states of ``(B, n)`` into ``(B, T·n)`` and ``Reshape(T, n)`` makes it
``(B, T, n)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import Identity, Jacobian, Sparse
from backprop.layer import Layer, OperatingPoint, check_float
from backprop.layers.second_order import linear_hvp, linear_tangent

__all__ = ["Unstack", "ZeroState", "tuple_g_out"]


def tuple_g_out(layer: Layer, op: OperatingPoint, g_out: Any) -> tuple[np.ndarray, ...]:
    """``g_out`` of a layer with several outputs: one array per output, checked.

    ``None`` stands for an output nobody used (its gradient is zero) and becomes
    zeros. A ``TypeError`` or ``ValueError`` names the layer and the shapes.
    """
    outs = op.x_out
    if not isinstance(g_out, tuple | list) or len(g_out) != len(outs):
        shapes = ", ".join(str(o.shape) for o in outs)
        raise TypeError(
            f"{layer!r}.backward takes a tuple of {len(outs)} gradients, one per output "
            f"(shapes {shapes}; None for an output nobody used), got {type(g_out).__name__}"
        )
    gs = []
    for k, (g, out) in enumerate(zip(g_out, outs, strict=True)):
        if g is None:
            gs.append(np.zeros_like(out))
            continue
        if not (type(g) is np.ndarray and g.dtype == out.dtype):
            g = check_float(repr(layer), f"g_out[{k}]", g, out.dtype)
        if g.shape != out.shape:
            raise ValueError(
                f"{layer!r}.backward: g_out[{k}] has shape {g.shape}, but output {k} has "
                f"shape {out.shape}"
            )
        gs.append(g)
    return tuple(gs)


class Unstack(Layer):
    """``(B, T, *shape)`` → ``T`` outputs ``x[:, 0], …, x[:, T-1]``, each ``(B, *shape)``.

    The input of an unrolled recurrence, one output per step. The outputs are
    read-only views of the input (no copy). Per example the stacked outputs are the
    input's entries in the same order, so ``L^x = I`` (eq. 14.45 for a layer with
    several outputs); the backward pass stacks the ``T`` gradients along axis 1.
    The input must have exactly ``T`` steps: a longer or shorter sequence is refused
    rather than cut or padded.
    """

    returns_tuple = True
    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, T: int) -> None:
        super().__init__()
        if isinstance(T, bool) or not isinstance(T, int | np.integer) or T < 1:
            raise ValueError(f"Unstack: T must be a positive integer, got {T!r}")
        self.T = int(T)
        self.n_outputs = self.T

    def _check(self, x_in: np.ndarray) -> None:
        if x_in.ndim < 2 or x_in.shape[1] != self.T:
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected (B, {self.T}, ...): a batch "
                f"of sequences of {self.T} steps, time on axis 1"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple([x_in[:, t] for t in range(self.T)])

    def _validate_g_out(self, op: OperatingPoint, g_out: Any) -> Any:
        return tuple_g_out(self, op, g_out)

    def _g_rows(self, op: OperatingPoint, g_out: Any) -> np.ndarray:
        B = op.x_in[0].shape[0]
        return np.concatenate([g.reshape(B, -1) for g in g_out], axis=1)

    def _backward(
        self, op: OperatingPoint, g_out: Any, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (np.stack(g_out, axis=1) if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Identity(int(x[0].size), x.shape[0], x.dtype, "I (the steps, stacked)"), {}

    def __repr__(self) -> str:
        return f"Unstack(T={self.T})"


class ZeroState(Layer):
    """``(B, ...)`` → zeros ``(B, n)`` in the input's dtype: the initial state ``h_0 = 0``.

    The input only says the batch size and the dtype. ``L^x`` is the zero matrix
    ``(n, |x_in|)`` (no entry stored) and ``g_in`` is zeros.
    """

    _tangent = linear_tangent  # zeros: nothing moves the state it gives
    _hvp = linear_hvp

    def __init__(self, n: int) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"ZeroState: n must be a positive integer, got {n!r}")
        self.n = int(n)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return np.zeros((x_in.shape[0], self.n), dtype=x_in.dtype)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (np.zeros_like(op.x_in[0]) if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        zero = sp.csr_array((self.n, int(x[0].size)), dtype=x.dtype)
        return Sparse(zero, x.shape[0], "0"), {}

    def __repr__(self) -> str:
        return f"ZeroState({self.n})"
