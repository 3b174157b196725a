"""Small pieces for writing the chapter's worked examples as graphs.

A constant, a scalar scale (learnable or fixed), a constant shift and the sum
of each example's entries: with ``Add`` and ``Multiply`` they spell out the
expressions of the lecture notes (``L = 10 - d``, ``σ(w·x)``) node by node, so
that the graph, its Jacobians and its gradients can be looked at. Only
``Scale`` has a parameter.

They live outside the top-level ``backprop`` namespace::

    from backprop.layers.worked import Constant, Scale, Shift, SumEntries
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import Dense, Diagonal, Identity, Jacobian
from backprop.layer import Layer, OperatingPoint, Parameter, check_float
from backprop.layers.second_order import linear_hvp, linear_tangent
from backprop.layers.shape import _read_only

__all__ = ["Constant", "Scale", "Shift", "SumEntries"]


class Constant(Layer):
    """A node with no input whose output is a fixed batch ``value`` (shape ``(B, ...)``).

    It is a source of the graph, like an input that is never fed: ``L = 10 - d``
    is ``Add()(Constant([[10.0]]), Scale(-1.0, learnable=False)(d))``. It has no
    parameters and sends no gradient anywhere.
    """

    inputs: tuple[str, ...] = ()
    _hvp = linear_hvp

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> None:
        return None  # a constant does not move

    def __init__(self, value: Any) -> None:
        super().__init__()
        x = check_float("Constant", "value", np.array(value, copy=True))
        if x.ndim == 0:
            raise ValueError(
                "Constant: value is a scalar; give it a batch axis, e.g. Constant([[10.0]]) "
                "for one example with one feature"
            )
        x.flags.writeable = False
        self.value = x

    def _forward(self, op: OperatingPoint) -> np.ndarray:
        return self.value

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        return (), {}

    def __repr__(self) -> str:
        return f"Constant{self.value.shape}"


class Scale(Layer):
    """``x_out = a · x_in`` with one scalar ``a``, learnable by default.

    Shapes: ``x_in`` and ``x_out`` are ``(B, *shape)``; ``a`` is a 0-d
    Parameter (``params["a"]``), or a fixed Python float when
    ``learnable=False``. Per example ``L^x = a I`` and ``L^a = vec(x_in)``, a
    column of ``|x_in|`` rows, so ``dJ/da = Σ_b g_out,b · x_in,b``. Passing one
    Parameter ``a`` to several Scale layers ties them (eq. 14.47). ``<g, a x_in>`` is
    bilinear: along ``(ẋ, ȧ)`` its Hessian gives ``g ȧ`` for ``x_in`` and ``<g, ẋ>``
    for ``a``.
    """

    def __init__(self, a: Any = 1.0, *, learnable: bool = True, dtype: Any = np.float64) -> None:
        super().__init__()
        if isinstance(a, Parameter):
            if not learnable:
                raise ValueError("Scale: a is a Parameter but learnable=False")
            if a.shape != ():
                raise ValueError(f"Scale: a must be a 0-d Parameter, got shape {a.shape}")
            self.params["a"] = a
            self.a: float | None = None
        elif learnable:
            if np.ndim(a) != 0:
                raise ValueError(f"Scale: a must be a scalar, got shape {np.shape(a)}")
            self.params["a"] = Parameter(np.asarray(a, dtype=dtype))
            self.a = None
        else:
            self.a = float(a)

    def _factor(self, op: OperatingPoint) -> Any:
        return op.theta["a"] if self.a is None else self.a

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in * self._factor(op)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        a = self._factor(op)
        grads = {} if self.a is not None else {"a": np.asarray(np.vdot(g_out, op.x_in[0]))}
        return (g_out * a if input_grad else None), grads

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        B = x.shape[0]
        d = np.full((B, x[0].size), self._factor(op), dtype=x.dtype)
        L_theta: dict[str, Jacobian] = {}
        if self.a is None:
            L_theta["a"] = Dense(x.reshape(B, -1, 1), "vec(x_in)")
        return Diagonal(d, "a I"), L_theta

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (dx,), da = dx_in, dtheta.get("a")  # a ẋ + ȧ x_in
        out = None if dx is None else dx * self._factor(op)
        if da is not None:
            term = op.x_in[0] * da
            out = term if out is None else out + term
        return out

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        (dx,), da = dx_in, dtheta.get("a") if input_grad else None
        if dx is None and da is None:
            return None
        h_theta = {} if dx is None else {"a": np.asarray(np.vdot(g_out, dx), dx.dtype)}
        return (None if da is None else g_out * da,), h_theta

    def __repr__(self) -> str:
        if self.a is not None:
            return f"Scale({self.a:g}, learnable=False)"
        return f"Scale(a={float(self.params['a'].value):g})"


class Shift(Layer):
    """``x_out = x_in + c`` for a fixed constant ``c`` (a float, or one example's shape).

    ``L^x = I``; no parameters.
    """

    _hvp = linear_hvp

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        return dx_in[0]  # the shift does not move

    def __init__(self, c: Any) -> None:
        super().__init__()
        self.c = float(c) if np.ndim(c) == 0 else np.array(c, dtype=np.float64)

    def _check(self, x_in: np.ndarray) -> None:
        if isinstance(self.c, np.ndarray) and x_in.shape[1:] != self.c.shape:
            self.expect_features("x_in", x_in, self.c.shape)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        c = self.c.astype(x_in.dtype) if isinstance(self.c, np.ndarray) else self.c
        return x_in + c

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (_read_only(g_out) if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Identity(int(x[0].size), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        c = f"{self.c:g}" if isinstance(self.c, float) else f"array{self.c.shape}"
        return f"Shift({c})"


class SumEntries(Layer):
    """The sum of each example's entries: ``(B, *shape) -> (B, 1)``.

    Per example ``L^x`` is the row of ones ``[1 ... 1]`` (``1 × |x_in|``), so
    ``g_in`` repeats each example's ``g_out`` over its entries.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.reshape(x_in.shape[0], -1).sum(axis=1, keepdims=True)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        x = op.x_in[0]
        return np.broadcast_to(g_out.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape).copy(), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Dense(np.ones((1, x[0].size), dtype=x.dtype), "[1 ... 1]", batch=x.shape[0]), {}
