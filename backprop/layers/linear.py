"""The linear layer (chapter 14.6.1)."""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import (
    Dense,
    Identity,
    Jacobian,
    Kronecker,
    KroneckerMatrix,
    RepeatedBlock,
    Tile,
)
from backprop.layer import FLOAT_DTYPES, Layer, OperatingPoint, Parameter


def _given_dtype(*values: Any) -> np.dtype[Any]:
    """The dtype of the first given float value (a Parameter or an array), else float64."""
    for v in values:
        dtype = v.dtype if isinstance(v, Parameter | np.ndarray) else None
        if dtype in FLOAT_DTYPES:
            return np.dtype(dtype)
    return np.dtype(np.float64)


def _as_parameter(where: str, value: Any, shape: tuple[int, ...], dtype: Any) -> Parameter:
    if not isinstance(value, Parameter):
        # A float array keeps its dtype, so that the check below refuses a mismatch
        # instead of converting; anything else (lists, integers) takes ``dtype``.
        given = isinstance(value, np.ndarray) and value.dtype in FLOAT_DTYPES
        value = Parameter(value if given else np.asarray(value, dtype=dtype))
    if value.shape != shape:
        raise ValueError(f"{where}: expected shape {shape}, got {value.shape}")
    if value.dtype != np.dtype(dtype):
        raise TypeError(
            f"{where}: expected dtype {np.dtype(dtype).name}, got {value.dtype.name}; "
            f"pass dtype=np.{value.dtype.name} or convert the values"
        )
    return value


def weight_and_bias(
    where: str,
    W: Any,
    b: Any,
    shape: tuple[int, ...],
    n_bias: int,
    fan_in: int,
    bias: bool,
    rng: Any,
    dtype: Any,
) -> dict[str, Parameter]:
    """``{"W": ..., "b": ...}`` as Parameters: given values checked against ``shape``
    (``b``: ``n_bias`` entries) and ``dtype``, the others drawn uniformly from
    ``±1/sqrt(fan_in)`` with ``rng``, ``W`` first, as PyTorch initialises them."""
    gen = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(fan_in)
    if W is None:
        W = gen.uniform(-bound, bound, size=shape).astype(dtype)
    params = {"W": _as_parameter(f"{where}: W", W, shape, dtype)}
    if bias:
        if b is None:
            b = gen.uniform(-bound, bound, size=n_bias).astype(dtype)
        params["b"] = _as_parameter(f"{where}: b", b, (n_bias,), dtype)
    return params


class Linear(Layer):
    """``x_out = W x_in + b`` per example (eq. 14.12), on the last axis of ``x_in``.

    Shapes: ``x_in`` is ``(B, ..., n_in)`` and ``x_out`` is ``(B, ..., n_out)``
    (as ``torch.nn.Linear``: the same ``W`` at each of the ``P`` positions of the
    middle axes, ``P = 1`` for ``(B, n_in)``), ``W`` is ``(n_out, n_in)`` and
    ``b`` is ``(n_out,)``.

    Jacobians, for ``(B, n_in)``: ``L^x = W`` (eq. 14.16), ``L^W = I ⊗ x_inᵀ``
    (eq. 14.14) and ``L^b = I`` (eq. 14.17). The fast path is three matrix
    products over the batch: ``g_in = g_out W`` (eq. 14.18), ``dJ/dW = g_outᵀ
    x_in`` (eq. 14.29 in ``W``'s shape, the transpose of the chapter's ``x_in
    g_out``) and ``dJ/db = Σ_b g_out`` (eq. 14.20). With ``P`` positions the
    same hold per position: ``L^x = I_P ⊗ W`` (``RepeatedBlock``), ``L^W`` stacks
    the positions' ``I ⊗ x_pᵀ`` (``KroneckerMatrix``, positions-major) and
    ``L^b = [I; …; I]`` (``Tile``); the fast path reshapes to ``B·P`` rows, one
    matrix product each, and the gradients sum over the positions too.

    Second order: the backward layer of ``Linear`` is ``g ↦ g W`` (eq. 14.36) with
    ``W`` itself as its weight, and the weight gradient ``g_outᵀ x_in`` reads the
    forward input. ``<g_out, W x_in + b>`` is bilinear in ``(x_in, W)``: along a
    tangent ``(ẋ, Ẇ, ḃ)`` its Hessian gives ``g_out Ẇ`` for ``x_in`` and ``g_outᵀ ẋ``
    for ``W`` (nothing for ``b``, nothing from ``x_in`` to itself). The tangent is
    ``Ẇ x_in + W ẋ + ḃ``.

    ``W`` and ``b`` may be given as arrays or as Parameters (to tie layers,
    chapter 14.8). Otherwise ``W`` and ``b`` are drawn uniformly from
    ``±1/sqrt(n_in)`` with ``rng``. ``dtype`` (float32 or float64) defaults to
    that of a given float ``W`` (else ``b``), and to float64 otherwise; given
    values of another dtype are refused, not converted.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        bias: bool = True,
        W: Any = None,
        b: Any = None,
        rng: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if dtype is None:
            dtype = _given_dtype(W, b)
        self._ones = np.ones(0)  # a cached vector of B ones, for dJ/db (see _backward)
        for what, n in (("n_in", n_in), ("n_out", n_out)):
            if not isinstance(n, int | np.integer) or n < 1:
                raise ValueError(f"Linear: {what} must be a positive integer, got {n!r}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"Linear: dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.n_in, self.n_out = int(n_in), int(n_out)
        if b is not None and not bias:
            raise ValueError("Linear: b was given but bias=False")
        where = f"Linear({self.n_in}→{self.n_out}{'' if bias else ', bias=False'})"
        shape = (self.n_out, self.n_in)
        params = weight_and_bias(where, W, b, shape, self.n_out, self.n_in, bias, rng, dtype)
        self.params.update(params)

    @property
    def W(self) -> Parameter:
        return self.params["W"]

    @property
    def b(self) -> Parameter | None:
        return self.params.get("b")

    def _check(self, x_in: np.ndarray) -> None:
        shape = x_in.shape
        if len(shape) != 2 or shape[1] != self.n_in:  # the common case without a call
            if len(shape) < 2 or shape[-1] != self.n_in:
                n = self.n_in
                hint = " (add a batch axis: x[None])" if shape == (n,) else ""
                raise ValueError(
                    f"{self!r}: x_in has shape {shape}, expected (B, {n}) or (B, ..., {n}) "
                    f"(the layer acts on the last axis){hint}"
                )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        W, b = op.theta["W"], op.theta.get("b")
        if x_in.ndim != 2:
            x_out = x_in.reshape(-1, self.n_in) @ W.T  # one GEMM over the B·P rows
            if b is not None:
                x_out += b
            # Read-only under its reshaped view too: the next layer need not copy it.
            x_out.setflags(write=False)
            return x_out.reshape(*x_in.shape[:-1], self.n_out)
        x_out = x_in @ W.T
        if b is not None:
            x_out += b
        return x_out

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        (x_in,) = op.x_in
        W = op.theta["W"]
        if x_in.ndim != 2:
            return self._backward_positions(op, g_out, input_grad)
        grads = {"W": g_out.T @ x_in}
        if "b" in op.theta:
            ones = self._ones  # Σ_b g_out[b] as 1ᵀ g_out (see _column_sums), inlined
            if ones.shape[0] != g_out.shape[0] or ones.dtype != g_out.dtype:
                ones = self._ones = np.ones(g_out.shape[0], dtype=g_out.dtype)
            grads["b"] = ones @ g_out
        return (g_out @ W if input_grad else None), grads

    def _column_sums(self, g: np.ndarray) -> np.ndarray:
        """``Σ_rows g``, as the product ``1ᵀ g``: BLAS's gemv is faster than numpy's
        column sum at every size of the benchmarks."""
        ones = self._ones
        if ones.shape[0] != g.shape[0] or ones.dtype != g.dtype:
            ones = self._ones = np.ones(g.shape[0], dtype=g.dtype)
        return ones @ g

    def _backward_positions(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        """``_backward`` for ``(B, ..., n_in)``: the ``B·P`` positions as rows."""
        (x_in,) = op.x_in
        x = x_in.reshape(-1, self.n_in)
        g = g_out.reshape(-1, self.n_out)
        grads = {"W": g.T @ x}
        if "b" in op.theta:
            grads["b"] = self._column_sums(g)
        g_in = (g @ op.theta["W"]).reshape(x_in.shape) if input_grad else None
        return g_in, grads

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        (x_in,) = op.x_in
        B, W = x_in.shape[0], op.theta["W"]
        if x_in.ndim != 2:
            P = int(np.prod(x_in.shape[1:-1], dtype=np.int64))
            X = x_in.reshape(B, P, self.n_in)
            L_theta: dict[str, Jacobian] = {
                "W": KroneckerMatrix(self.n_out, X, rows="positions", label="I ⊗ x_pᵀ per position")
            }
            if "b" in op.theta:
                L_theta["b"] = Tile(P, self.n_out, B, x_in.dtype)
            return RepeatedBlock(P, W, B, "W"), L_theta
        L_theta = {"W": Kronecker(self.n_out, x_in)}
        if "b" in op.theta:
            L_theta["b"] = Identity(self.n_out, B, x_in.dtype)
        return Dense(W, "W", batch=B), L_theta

    def _tangent(
        self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: dict[str, np.ndarray]
    ) -> Any:
        (x_in,), (dx,) = op.x_in, dx_in
        dW, db = dtheta.get("W"), dtheta.get("b")
        rows = x_in.reshape(-1, self.n_in)
        out = None if dx is None else dx.reshape(-1, self.n_in) @ op.theta["W"].T  # W ẋ
        if dW is not None:  # + Ẇ x_in
            if out is None:
                out = rows @ dW.T
            else:
                out += rows @ dW.T
        if db is not None:  # + ḃ
            if out is None:
                out = np.repeat(db[None, :], rows.shape[0], axis=0)
            else:
                out += db
        return None if out is None else out.reshape(*x_in.shape[:-1], self.n_out)

    def _hvp(
        self,
        op: OperatingPoint,
        g_out: np.ndarray,
        dx_in: tuple[Any, ...],
        dtheta: dict[str, np.ndarray],
        input_grad: bool,
    ) -> Any:
        (x_in,), (dx,) = op.x_in, dx_in
        dW = dtheta.get("W") if input_grad else None
        if dx is None and dW is None:
            return None
        g = g_out.reshape(-1, self.n_out)
        h_in = None if dW is None else (g @ dW).reshape(x_in.shape)  # g_out Ẇ
        h_theta = {} if dx is None else {"W": g.T @ dx.reshape(-1, self.n_in)}  # g_outᵀ ẋ
        return (h_in,), h_theta

    def __repr__(self) -> str:
        bias = "" if "b" in self.params else ", bias=False"
        return f"Linear({self.n_in}→{self.n_out}{bias})"
