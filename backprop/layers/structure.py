"""Layers that shape the graph (chapter 14.7): merge, branch, add, multiply, matmul.

None has a parameter. The Jacobians are selections, stacks of identities and
diagonals, so the backward passes are slicing, summing and elementwise products;
``MatMul``'s are Kronecker products with an identity, and its backward pass is two
matrix products.
Merge, Branch and Add are linear in their inputs: their tangent is the layer applied
to the tangents and they add no second-order term. Multiply is bilinear:
``<g, x_a * x_b>`` has the Hessian ``[0 diag(g); diag(g) 0]``. ``Reshape`` and ``Flatten`` live
in ``backprop.layers.shape`` (with ``Transpose``) and are importable from here too;
the small pieces for worked examples (``Constant``, ``Scale``, ``Shift``,
``SumEntries``) live in ``backprop.layers.worked``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import (
    BlockKronecker,
    Diagonal,
    Identity,
    Jacobian,
    Selection,
    Sparse,
    Tile,
)
from backprop.layer import Layer, OperatingPoint, _owned, check_float
from backprop.layers.second_order import linear_hvp, linear_tangent, total
from backprop.layers.shape import Flatten, Reshape, _read_only

__all__ = ["Add", "Branch", "Flatten", "MatMul", "Merge", "Multiply", "Reshape"]


class Merge(Layer):
    """Concatenation of any number of inputs (eq. 14.37).

    ``Merge()`` (``axis=None``) flattens each example and concatenates: inputs
    ``(B, *shape_i)`` of any shapes give ``x_out`` of shape ``(B, Σ_i |shape_i|)``,
    one input's entries after the other. The Jacobian for input ``i`` selects its
    block: ``[I; 0]`` for the first of two inputs and ``[0; I]`` for the second
    (eq. 14.41), so ``g_in^i`` is the matching slice of ``g_out``.

    ``Merge(axis=k)`` concatenates the batch tensors along axis ``k`` instead, as
    ``torch.cat(dim=k)``: ``axis=1`` stacks the channels of ``(B, C_i, H, W)``
    inputs (a U-Net skip), ``axis=-1`` the features of ``(B, T, d_i)``. Negative
    axes count from the end; the batch axis 0 cannot be merged. The inputs agree
    on every other axis. ``L^x`` for input ``i`` is still a 0-1 selection: a
    ``Selection`` when its block is contiguous in the per-example flattening
    (every axis before ``k`` has size 1, as for ``axis=1``), else a ``Sparse``
    matrix shared by the batch. ``g_in^i`` is ``g_out`` sliced along ``k``.

    ``Merge()`` takes as many inputs as it is given (in a Graph, the handles
    passed to ``add``); ``Merge(n)`` insists on exactly ``n``.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, n: int | None = None, *, axis: int | None = None) -> None:
        super().__init__()
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"Merge: n must be a positive integer, got {n!r}")
        if axis is not None:
            if not isinstance(axis, int | np.integer) or isinstance(axis, bool):
                raise TypeError(f"Merge: axis must be an integer or None, got {axis!r}")
            if axis == 0:
                raise ValueError(
                    "Merge: axis=0 is the batch axis, which cannot be concatenated (every "
                    "input holds the same B examples); use axis=1 for channels, or "
                    "axis=None to flatten and concatenate each example"
                )
            axis = int(axis)
        self.n = n
        self.axis = axis
        self.variadic = n is None
        self.inputs = _merge_inputs(2 if n is None else n)

    def take_inputs(self, n: int) -> None:
        """Take ``n`` inputs from now on, if built as ``Merge()`` (``Merge(n)`` keeps n)."""
        if self.variadic:
            self.inputs = _merge_inputs(n)
        super().take_inputs(n)

    def forward(self, *x_in: Any, cache: bool = True) -> np.ndarray:
        if not x_in:
            raise TypeError("Merge.forward needs at least one input to concatenate")
        if self.n is not None or len(x_in) == len(self.inputs):
            return super().forward(*x_in, cache=cache)
        before = self.inputs
        self.take_inputs(len(x_in))
        try:
            return super().forward(*x_in, cache=cache)
        except BaseException:
            self.inputs = before  # a failed call changes nothing
            raise

    def _check(self, *x_in: np.ndarray) -> None:
        if self.axis is None:
            return
        shapes = ", ".join(str(x.shape) for x in x_in)
        ndim = x_in[0].ndim
        if any(x.ndim != ndim for x in x_in):
            raise ValueError(
                f"{self!r}: inputs have shapes {shapes}; concatenating along an axis needs "
                f"inputs with the same number of axes"
            )
        if not -ndim <= self.axis < ndim or self.axis % ndim == 0:
            raise ValueError(
                f"{self!r}: axis {self.axis} is not an axis of the examples of inputs with "
                f"shapes {shapes}: it must lie in 1..{ndim - 1} or -{ndim - 1}..-1 (axis 0 "
                f"is the batch)"
            )
        k = self.axis % ndim
        rest = [x.shape[:k] + x.shape[k + 1 :] for x in x_in]
        if any(r != rest[0] for r in rest):
            raise ValueError(
                f"{self!r}: inputs have shapes {shapes}; they must agree on every axis but axis {k}"
            )

    def _forward(self, op: OperatingPoint, *x_in: np.ndarray) -> np.ndarray:
        if self.axis is not None:
            return np.concatenate(x_in, axis=self.axis)
        B = x_in[0].shape[0]
        return np.concatenate([x.reshape(B, -1) for x in x_in], axis=1)

    def _blocks(self, op: OperatingPoint) -> list[tuple[int, int]]:
        """``(start, size)`` of each input's block along the merged axis of ``x_out``."""
        if self.axis is None:
            sizes = [int(np.prod(x.shape[1:], dtype=np.int64)) for x in op.x_in]
        else:
            sizes = [x.shape[self.axis] for x in op.x_in]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        return list(zip(starts, sizes, strict=True))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None,) * len(op.x_in), {}
        if self.axis is not None:
            before = (slice(None),) * (self.axis % g_out.ndim)
            g_in = tuple(
                _read_only(g_out[before + (slice(start, start + size),)])
                for start, size in self._blocks(op)
            )
            return g_in, {}
        g_in = tuple(
            _read_only(g_out[:, start : start + size].reshape(x.shape))
            for (start, size), x in zip(self._blocks(op), op.x_in, strict=True)
        )
        return g_in, {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x_out = op.x_out
        B, m, dtype = x_out.shape[0], int(x_out[0].size), x_out.dtype
        blocks = self._blocks(op)
        if self.axis is None:
            return tuple(Selection(m, start, size, B, dtype) for start, size in blocks), {}
        k = self.axis % x_out.ndim
        inner = int(np.prod(x_out.shape[k + 1 :], dtype=np.int64))  # entries per slice along k
        if int(np.prod(x_out.shape[1:k], dtype=np.int64)) == 1:  # each block is contiguous
            return tuple(Selection(m, s * inner, n * inner, B, dtype) for s, n in blocks), {}
        index = np.arange(m).reshape(x_out.shape[1:])  # where each output entry sits
        L_x = []
        for start, size in blocks:
            rows = index[(slice(None),) * (k - 1) + (slice(start, start + size),)].ravel()
            n = rows.size
            S = sp.csr_array((np.ones(n, dtype=dtype), (rows, np.arange(n))), shape=(m, n))
            L_x.append(Sparse(S, B, f"entries {start}..{start + size - 1} of axis {k}"))
        return tuple(L_x), {}

    def __repr__(self) -> str:
        axis = "" if self.axis is None else f", axis={self.axis}"
        return f"Merge({len(self.inputs)}{axis})"


def _merge_inputs(n: int) -> tuple[str, ...]:
    return tuple(f"x_in[{i}]" for i in range(n))


class Branch(Layer):
    """``n`` copies of the input (eq. 14.38); backward sums the gradients (eq. 14.46).

    ``forward`` returns a tuple of ``n`` arrays, all equal to ``x_in``;
    ``backward`` takes a tuple of ``n`` gradients (``None`` counts as zero) and
    returns their sum. The Jacobian of the stacked outputs is ``[I; I; ...]``
    (eq. 14.45).

    A Branch also copies integer data (class labels read by several losses) and
    boolean masks (one key padding mask read by several attention layers): it passes
    them on and sends no gradient back, as such data gets none.
    """

    _hvp = linear_hvp

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"Branch: n must be a positive integer, got {n!r}")
        self.n = n
        self.n_outputs = n
        self.returns_tuple = True

    def _validate_inputs(self, x_in: Any) -> tuple[np.ndarray, ...]:
        if len(x_in) == 1:
            x = np.asarray(x_in[0])
            if x.dtype.kind in "iub" and x.ndim:  # labels, masks: copied on, no gradient
                return (_owned(x),)
        return super()._validate_inputs(x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> Any:
        return (x_in,) * self.n

    def _validate_g_out(self, op: OperatingPoint, g_out: Any) -> Any:
        x = op.x_in[0]
        if x.dtype.kind in "iub":
            if isinstance(g_out, tuple | list) and all(g is None for g in g_out):
                return []
            raise TypeError(
                f"{self!r}.backward: the input is {_data(x)}, which gets no gradient; its "
                f"copies' gradients must all be None"
            )
        if not isinstance(g_out, tuple | list) or len(g_out) != self.n:
            raise TypeError(
                f"{self!r}.backward takes a tuple of {self.n} gradients (one per copy, "
                f"each of shape {x.shape}; None for a copy nobody used)"
            )
        gs = []
        for i, g in enumerate(g_out):
            if g is None:
                continue
            g = check_float(self.name, f"g_out[{i}]", g, x.dtype)
            if g.shape != x.shape:
                raise ValueError(
                    f"{self!r}.backward: g_out[{i}] has shape {g.shape}, expected {x.shape}"
                )
            gs.append(g)
        return gs

    def _backward(
        self, op: OperatingPoint, g_out: Any, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad or op.x_in[0].dtype.kind in "iub":
            return None, {}
        if not g_out:
            return np.zeros_like(op.x_in[0]), {}
        if len(g_out) == 1:
            return _read_only(g_out[0]), {}
        total = g_out[0] + g_out[1]
        for g in g_out[2:]:
            total += g
        return total, {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        return None if dx_in[0] is None else (dx_in[0],) * self.n

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        if x.dtype.kind in "iub":
            raise TypeError(f"{self!r}.jacobians: the input is {_data(x)}, which has no Jacobian")
        return Tile(self.n, int(x[0].size), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        return f"Branch({self.n})"


Layer.fan_out = Branch


def _data(x: np.ndarray) -> str:
    """How errors name data that gets no gradient: labels or a mask."""
    what = "integer data (labels" if x.dtype.kind in "iu" else "boolean data (a mask"
    return f"{what}, shape {x.shape})"


class Add(Layer):
    """``x_out = x_a + x_b`` for two inputs of the same shape; ``L^a = L^b = I``."""

    inputs = ("x_a", "x_b")
    _hvp = linear_hvp

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        return total(*dx_in)

    def _check(self, x_a: np.ndarray, x_b: np.ndarray) -> None:
        if x_a.shape != x_b.shape:
            raise ValueError(f"Add: x_a has shape {x_a.shape} but x_b has shape {x_b.shape}")

    def _forward(self, op: OperatingPoint, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
        return x_a + x_b

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None), {}
        # Both gradients are g_out: one read-only view serves both, so neither can
        # be edited through the other (nor the caller's g_out through them).
        g = _read_only(g_out)
        return (g, g), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x = op.x_in[0]
        L = Identity(int(x[0].size), x.shape[0], x.dtype)
        return (L, L), {}


class Multiply(Layer):
    """``x_out = x_a * x_b`` entry by entry; ``L^a = diag(x_b)``, ``L^b = diag(x_a)``."""

    inputs = ("x_a", "x_b")

    def _check(self, x_a: np.ndarray, x_b: np.ndarray) -> None:
        if x_a.shape != x_b.shape:
            raise ValueError(f"Multiply: x_a has shape {x_a.shape} but x_b has shape {x_b.shape}")

    def _forward(self, op: OperatingPoint, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
        return x_a * x_b

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        x_a, x_b = op.x_in
        return ((g_out * x_b, g_out * x_a) if input_grad else (None, None)), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x_a, x_b = op.x_in
        B = x_a.shape[0]
        return (Diagonal(x_b.reshape(B, -1), "x_b"), Diagonal(x_a.reshape(B, -1), "x_a")), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (x_a, x_b), (d_a, d_b) = op.x_in, dx_in  # ẋ_a x_b + x_a ẋ_b
        return total(None if d_a is None else d_a * x_b, None if d_b is None else x_a * d_b)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        # x_a gets g ẋ_b, x_b gets g ẋ_a
        return _bilinear_hvp(dx_in, input_grad, lambda d_b: g_out * d_b, lambda d_a: g_out * d_a)


def _bilinear_hvp(
    dx_in: tuple[Any, ...],
    input_grad: bool,
    to_a: Callable[[np.ndarray], np.ndarray],
    to_b: Callable[[np.ndarray], np.ndarray],
) -> Any:
    """The second-order term of a layer bilinear in its two inputs (``Multiply``,
    ``MatMul``): input ``a`` moves by ``to_a(ẋ_b)``, ``b`` by ``to_b(ẋ_a)``, and neither
    by its own tangent. All of it is on the inputs: nothing without ``input_grad``."""
    if not input_grad:
        return None
    d_a, d_b = dx_in
    if d_a is None and d_b is None:
        return None
    return (None if d_b is None else to_a(d_b), None if d_a is None else to_b(d_a)), {}


class MatMul(Layer):
    """``x_out = a @ b`` over the last two axes, batched over the axes before them.

    Shapes: ``a`` is ``(B, ..., m, k)``, ``b`` is ``(B, ..., k, n)`` with the same
    middle axes (no broadcasting), ``x_out`` is ``(B, ..., m, n)``: per example ``P``
    products ``Y_p = A_p C_p``, ``P`` the product of the middle axes (the heads of
    attention, ``Q Kᵀ`` and ``A V``). As ``torch.matmul`` on such shapes.

    Each entry ``Y[i, j]`` reads row ``i`` of ``A`` and column ``j`` of ``C``. Flattening
    row by row, ``vec(A C) = (I_m ⊗ Cᵀ) vec(A) = (A ⊗ I_n) vec(C)``, so per example
    ``L^a`` is block diagonal with blocks ``I_m ⊗ C_pᵀ`` and ``L^b`` with blocks
    ``A_p ⊗ I_n`` (``BlockKronecker``). The fast path is their products without the
    blocks: ``g_a = G Cᵀ`` and ``g_b = Aᵀ G``, each one batched matrix product.

    Second order: the product is bilinear. Its tangent is ``Ȧ C + A Ċ``, and the
    backward pass moves only through the other factor, ``g_a`` by ``G Ċᵀ`` and ``g_b``
    by ``Ȧᵀ G``: the Hessian of ``<G, A C>`` pairs the two inputs and has no block
    within one of them (as ``Multiply``, with matrix products for entrywise ones).
    """

    inputs = ("a", "b")

    def _check(self, a: np.ndarray, b: np.ndarray) -> None:
        if (
            a.ndim < 3
            or a.ndim != b.ndim
            or a.shape[:-2] != b.shape[:-2]
            or a.shape[-1] != b.shape[-2]
        ):
            raise ValueError(
                f"{self!r}: cannot multiply a {a.shape} by b {b.shape}: they must be "
                f"(B, ..., m, k) and (B, ..., k, n) with the same axes before the last two "
                f"(each example holds matrices; no broadcasting)"
            )

    def _forward(self, op: OperatingPoint, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # np.matmul straight on the heads' strided views: measured faster than einsum
        # (with or without its optimizer) and than copying them contiguous first.
        return np.matmul(a, b)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None), {}
        a, b = op.x_in
        return (np.matmul(g_out, b.swapaxes(-1, -2)), np.matmul(a.swapaxes(-1, -2), g_out)), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        a, b = op.x_in
        B, (m, k), n = a.shape[0], a.shape[-2:], b.shape[-1]
        A = a.reshape(B, -1, m, k)
        C = b.reshape(B, -1, k, n)
        L_a = BlockKronecker(C.swapaxes(2, 3), m, "left", f"I_{m} ⊗ bᵀ")
        L_b = BlockKronecker(A, n, "right", f"a ⊗ I_{n}")
        return (L_a, L_b), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (a, b), (d_a, d_b) = op.x_in, dx_in  # Ȧ C + A Ċ
        return total(None if d_a is None else d_a @ b, None if d_b is None else a @ d_b)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        return _bilinear_hvp(  # a gets G Ċᵀ, b gets Ȧᵀ G
            dx_in,
            input_grad,
            lambda d_b: np.matmul(g_out, d_b.swapaxes(-1, -2)),
            lambda d_a: np.matmul(d_a.swapaxes(-1, -2), g_out),
        )
