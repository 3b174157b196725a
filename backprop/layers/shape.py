"""Layers that rearrange each example's entries: reshape, flatten, transpose.

None of them changes a value, only where it sits, so ``L^x`` is a permutation
of the per-example flattening (the chapter: "the shape of the data tensor has
no impact on the math"). For ``Reshape`` and ``Flatten`` the C-order
flattening does not move at all and ``L^x = I``; ``Transpose`` reorders it,
and its ``L^x`` is a permutation matrix. The backward passes are views of
``g_out``: reshaped back, or transposed back by the inverse permutation. Being
linear, each moves a tangent as it moves its input and has no second-order term.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import Identity, Jacobian, Sparse
from backprop.layer import Layer, OperatingPoint
from backprop.layers.second_order import linear_hvp, linear_tangent

__all__ = ["Flatten", "Reshape", "Transpose"]


def _read_only(g: np.ndarray) -> np.ndarray:
    """A read-only view of ``g``: a gradient passed on unchanged (or reshaped, or
    sliced) cannot be edited by whoever receives it, so neither can the array it
    came from."""
    v = g.view()
    v.setflags(write=False)
    return v


class Reshape(Layer):
    """Gives each example the shape ``shape`` (one entry may be -1); ``L^x = I``."""

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, *shape: int) -> None:
        super().__init__()
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        self.shape = tuple(int(s) for s in shape)
        self._known = math.prod(s for s in self.shape if s != -1)  # all but the -1
        if self.shape.count(-1) > 1 or any(s < -1 or s == 0 for s in self.shape):
            raise ValueError(
                f"Reshape: each entry of the shape must be a positive size, and at most one "
                f"may be -1 (inferred); got {self.shape}"
            )

    def _check(self, x_in: np.ndarray) -> None:
        size = math.prod(x_in.shape[1:])
        known = self._known
        fits = size % known == 0 if -1 in self.shape and known else size == known
        if not fits:
            raise ValueError(
                f"{self!r}: cannot reshape input of shape {x_in.shape} to (B, "
                f"{', '.join(map(str, self.shape))}): {size} entries per example"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        if not x_in.flags.c_contiguous:  # a transposed view: the reshape must copy it
            x_in = np.ascontiguousarray(x_in)
            x_in.setflags(write=False)  # so that the view returned is read-only to its base
        return x_in.reshape(x_in.shape[0], *self.shape)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (_read_only(g_out.reshape(op.x_in[0].shape)) if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Identity(int(x[0].size), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        return f"Reshape{self.shape}"


class Flatten(Reshape):
    """Flattens each example to a vector: ``(B, *shape) -> (B, |shape|)``."""

    def __init__(self) -> None:
        super().__init__(-1)

    def __repr__(self) -> str:
        return "Flatten()"


class Transpose(Layer):
    """Permutes the axes of each example: ``x_out[b] = x_in[b].transpose(axes)``.

    ``axes`` excludes the batch axis: for examples with ``k`` axes it is a
    permutation of ``0..k-1``, so ``Transpose((1, 0))`` turns ``(B, T, d)`` into
    ``(B, d, T)`` (``torch.permute(x, (0, 2, 1))``). Per example ``L^x`` is the
    permutation matrix with a 1 at ``(i, π(i))``, where ``π`` lists the input
    entries in the order the output reads them:
    ``π = arange(|x_in|).reshape(shape).transpose(axes).ravel()``. The backward
    pass transposes ``g_out`` back by the inverse permutation.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, *axes: Any) -> None:
        super().__init__()
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        if not all(isinstance(a, int | np.integer) and not isinstance(a, bool) for a in axes):
            raise TypeError(f"Transpose: axes must be integers, got {axes!r}")
        self.axes = tuple(int(a) for a in axes)
        if sorted(self.axes) != list(range(len(self.axes))) or not self.axes:
            raise ValueError(
                f"Transpose: axes {self.axes} must be a permutation of 0..k-1 for examples "
                f"with k axes (the batch axis is not counted), e.g. Transpose((1, 0)) for "
                f"(B, T, d) -> (B, d, T)"
            )
        self.inverse = tuple(int(a) for a in np.argsort(self.axes))

    def _check(self, x_in: np.ndarray) -> None:
        if x_in.ndim - 1 != len(self.axes):
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, examples with {x_in.ndim - 1} axes; "
                f"axes {self.axes} permute examples with {len(self.axes)} axes"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.transpose(0, *(a + 1 for a in self.axes))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        return _read_only(g_out.transpose(0, *(a + 1 for a in self.inverse))), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        n = int(x[0].size)
        perm = np.arange(n).reshape(x.shape[1:]).transpose(self.axes).ravel()
        P = sp.csr_array((np.ones(n, dtype=x.dtype), perm, np.arange(n + 1)), shape=(n, n))
        return Sparse(P, x.shape[0], f"permutation of axes {self.axes}"), {}

    def __repr__(self) -> str:
        return f"Transpose({self.axes})"
