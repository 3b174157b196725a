"""Layers that turn tokens into vectors: ``Embedding`` and ``PositionalEncoding``.

A sequence of ``T`` tokens becomes a ``(T, d)`` array, one code vector per row (the
transformers chapter writes a token set as the matrix whose rows are the tokens);
a batch is ``(B, T, d)``, as in PyTorch with ``batch_first=True``.

- ``Embedding`` looks each token id up in a table ``W`` ``(n, d)``. Output entry
  ``(t, j)`` is one entry of ``W``, so ``L^W`` is a selection: one 1 per row, in the
  column the id chooses (``IndexSelection``). The ids are integer data, with no
  gradient and no ``L^x``. The output is linear in ``W`` (a selection of its
  entries): its tangent is the same selection of ``Ẇ`` and it has no second-order term.
- ``PositionalEncoding`` adds a fixed code of each position, so that the attention
  layers that follow, which treat the tokens as a set, can tell the order: ``L^x = I``
  and nothing to learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import IndexSelection, Jacobian
from backprop.layer import Layer, OperatingPoint
from backprop.layers.linear import _as_parameter, _given_dtype
from backprop.layers.second_order import linear_hvp
from backprop.layers.worked import Shift

__all__ = ["Embedding", "PositionalEncoding"]


def _positive(where: str, what: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{where}: {what} must be a positive integer, got {n!r}")
    return int(n)


class Embedding(Layer):
    """``x_out[b, t] = W[ids[b, t]]``: token ids ``(B, T)`` to vectors ``(B, T, d)``.

    As ``torch.nn.Embedding(n, d)``: ``"W"`` is ``(n, d)``, one row per id, drawn from
    N(0, 1) with ``rng`` unless given (an array or a Parameter, to tie the table to
    another layer). ``ids`` may have any shape ``(B, ...)``; the output appends ``d``.
    Ids outside ``0..n-1`` are refused with a ``ValueError``.

    Per example, output entry ``(t, j)`` is entry ``ids[t]·d + j`` of ``W`` flattened,
    so ``L^W`` is ``(T·d, n·d)`` with a single 1 in each row: a selection whose columns
    the ids choose. ``dJ/dW = g_out L^W`` scatters each row of ``g_out`` into the row of
    ``W`` its id names, and an id that occurs several times (in one sequence or across
    the batch) gets the sum of its rows' gradients, as any weight used several times
    does (eq. 14.47). Rows of ids that do not occur get zero.
    """

    inputs = ("ids",)
    label_inputs = frozenset({"ids"})

    def __init__(
        self, n: int, d: int, *, W: Any = None, rng: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.n, self.d = _positive("Embedding", "n", n), _positive("Embedding", "d", d)
        if dtype is None:
            dtype = _given_dtype(W)
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"Embedding: dtype must be float32 or float64, got {np.dtype(dtype)}")
        if W is None:
            W = np.random.default_rng(rng).standard_normal((self.n, self.d)).astype(dtype)
        self.params["W"] = _as_parameter(repr(self) + ": W", W, (self.n, self.d), dtype)

    def _check(self, ids: np.ndarray) -> None:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
            bad = ids[(ids < 0) | (ids >= self.n)]
            raise ValueError(
                f"{self!r}: ids (shape {ids.shape}) hold {bad.size} id(s) outside 0..{self.n - 1}"
                f" (e.g. {int(bad.flat[0])}); an id picks one of the {self.n} rows of W"
            )

    def _forward(self, op: OperatingPoint, ids: np.ndarray) -> np.ndarray:
        return np.take(op.theta["W"], ids, axis=0)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        W = op.theta["W"]
        grad = np.zeros_like(W)
        np.add.at(grad, op.x_in[0].ravel(), g_out.reshape(-1, self.d))  # repeats add up
        return None, {"W": grad}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        ids = op.x_in[0]
        B, d = ids.shape[0], self.d
        index = (ids.reshape(B, -1, 1) * d + np.arange(d)).reshape(B, -1)
        L_W = IndexSelection(index, self.n * d, op.theta["W"].dtype, "row ids[t] of W")
        return None, {"W": L_W}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        dW = dtheta.get("W")  # the rows of Ẇ the ids pick (the ids take no tangent)
        return None if dW is None else np.take(dW, op.x_in[0], axis=0)

    _hvp = linear_hvp  # x_out is linear in W: <g_out, x_out> has no second derivative

    def __repr__(self) -> str:
        return f"Embedding({self.n}, {self.d})"


class PositionalEncoding(Shift):
    """``x_out[b, t, j] = x_in[b, t, j] + P[t, j]`` with the sinusoidal codes of the
    transformer paper (Vaswani et al., 2017):

        P[t, 2i] = sin(t / 10000^(2i/d)),   P[t, 2i+1] = cos(t / 10000^(2i/d)),

    positions ``t = 0, 1, ...``. Feature pair ``(2i, 2i+1)`` turns at one frequency,
    from one turn per ``2π`` positions down to one per ``2π·10000``, so every position
    gets a distinct code and a shift by ``k`` positions is the same rotation of each
    pair wherever it starts.

    Shapes: ``(B, T, d)`` in and out, ``T ≤ max_len``; a longer sequence is refused.
    It is a ``Shift`` by a constant (the first ``T`` rows of the codes): ``L^x = I``, no
    parameters. The table ``codes`` is ``(max_len, d)`` in float64 (read-only), cast to
    the data's dtype.
    """

    def __init__(self, d: int, max_len: int) -> None:
        super().__init__(0.0)  # the constant added depends on T: see _forward
        self.d = _positive("PositionalEncoding", "d", d)
        self.max_len = _positive("PositionalEncoding", "max_len", max_len)
        t = np.arange(self.max_len, dtype=np.float64)[:, None]
        rate = 10000.0 ** (-(np.arange(self.d) // 2 * 2) / self.d)
        angle = t * rate
        codes = np.where(np.arange(self.d) % 2 == 0, np.sin(angle), np.cos(angle))
        codes.setflags(write=False)
        self.codes = codes
        self._cast = {np.dtype(np.float64): codes}

    def _check(self, x_in: np.ndarray) -> None:
        if x_in.ndim != 3 or x_in.shape[2] != self.d:
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected (B, T, {self.d}) (a batch of "
                f"sequences of d = {self.d} features)"
            )
        if x_in.shape[1] > self.max_len:
            raise ValueError(
                f"{self!r}: x_in has T = {x_in.shape[1]} positions (shape {x_in.shape}), more "
                f"than max_len = {self.max_len}; build the layer with a larger max_len"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        codes = self._cast.get(x_in.dtype)
        if codes is None:
            codes = self.codes.astype(x_in.dtype)
            codes.setflags(write=False)
            self._cast[x_in.dtype] = codes
        return x_in + codes[: x_in.shape[1]]

    def __repr__(self) -> str:
        return f"PositionalEncoding({self.d}, max_len={self.max_len})"
