"""Pointwise nonlinearities (chapter 14.6.2).

A pointwise layer applies a scalar function ``h`` to every entry. Its Jacobian
is the diagonal matrix ``H' = diag(h'(x_in))`` (eq. 14.30), so the backward
pass is an elementwise product, ``g_in = g_out * h'(x_in)`` (eq. 14.33). Each
layer below only says ``h``, ``h'`` and ``h''``; ``h'`` and ``h''`` may use the
output ``x_out`` where that is cheaper (``σ' = σ(1 - σ)``).

Second order: the backward layer is the gate ``diag(h'(x_in))``, whose values come
from the forward pass (chapter 14.6.5). Moving ``x_in`` along ``ẋ`` moves the gate
by ``diag(h''(x_in) ẋ)``, so the Hessian of ``<g_out, h(x_in)>`` times ``ẋ`` is
``g_out * h''(x_in) * ẋ``: diagonal too. The tangent is ``h'(x_in) * ẋ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import expit

from backprop.jacobian import Diagonal, Jacobian
from backprop.layer import Layer, OperatingPoint


class Pointwise(Layer):
    """``x_out[i] = h(x_in[i])`` for a function ``h`` and its derivative ``dh``.

    Both take and return arrays of any shape, entry by entry. Input and output
    have the same shape ``(B, *shape)``; per example ``L^x`` is the diagonal
    ``diag(dh(x_in))`` of size ``|x_in|`` (eq. 14.30). ``d2h``, the second
    derivative (entry by entry, like ``dh``), is what curvature needs: without it
    the layer has first derivatives only, and ``backprop.curvature`` refuses it.
    """

    def __init__(
        self,
        h: Callable[[np.ndarray], np.ndarray] | None = None,
        dh: Callable[[np.ndarray], np.ndarray] | None = None,
        name: str | None = None,
        d2h: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        generic = type(self) is Pointwise
        if generic and not (callable(h) and callable(dh)):
            raise TypeError(
                "Pointwise(h, dh) needs the function h and its derivative dh, both callables "
                "that act entry by entry, e.g. Pointwise(np.sin, np.cos)"
            )
        if d2h is not None and not callable(d2h):
            raise TypeError(f"Pointwise: d2h must be a callable (h''), got {d2h!r}")
        self._h, self._dh, self._d2h = h, dh, d2h
        self._label: str = name or str(getattr(h, "__name__", "h"))

    @property
    def name(self) -> str:
        return self._label if type(self) is Pointwise else type(self).__name__

    # The math: subclasses override these two.
    def h(self, x: np.ndarray) -> np.ndarray:
        return self._h(x)  # type: ignore[misc]

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return self._dh(x_in)  # type: ignore[misc]

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        if self._d2h is None:
            raise NotImplementedError(
                f"{self!r} has no second derivative: curvature (Hessian products) needs "
                f"h'' as well as h'; build the layer as Pointwise(h, dh, d2h=...)"
            )
        return self._d2h(x_in)

    def _derivative(self, op: OperatingPoint, allow_bool: bool = False) -> np.ndarray:
        """``h'(x_in)`` in ``x_in``'s shape and dtype; with ``allow_bool`` a boolean
        ``h'`` (a 0/1 mask, as ReLU's) is passed on as it is, which multiplies into a
        float array without a conversion pass and without changing its dtype."""
        x_in, x_out = op.x_in[0], op.x_out
        d = self.dh(x_in, x_out)
        if not isinstance(d, np.ndarray):
            d = np.asarray(d)
        if d.shape != x_in.shape:
            if d.ndim:  # a scalar h' (a linear h) is the one shape that may differ
                raise ValueError(
                    f"{self!r}: h' returned shape {d.shape} for an input of shape "
                    f"{x_in.shape}; a pointwise h' must keep the shape (or be a scalar)"
                )
            d = np.broadcast_to(d, x_in.shape)
        if d.dtype != x_in.dtype and not (allow_bool and d.dtype == np.bool_):
            d = d.astype(x_in.dtype)
        return d

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        x_out = np.asarray(self.h(x_in))
        if x_out.shape != x_in.shape:
            raise ValueError(
                f"{self.name}: h returned shape {x_out.shape} for an input of shape {x_in.shape}; "
                f"a pointwise h must keep the shape"
            )
        if x_out.dtype != x_in.dtype:
            x_out = x_out.astype(x_in.dtype)
        return x_out

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        return np.multiply(g_out, self._derivative(op, allow_bool=True)), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        d = self._derivative(op)
        return Diagonal(d.reshape(d.shape[0], -1), f"{self.name.lower()}'(x_in)"), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (dx,) = dx_in
        return None if dx is None else np.multiply(dx, self._derivative(op, allow_bool=True))

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        (dx,) = dx_in
        if dx is None:
            return None
        x_in = op.x_in[0]
        d2 = np.asarray(self.d2h(x_in, op.x_out))
        if d2.shape != x_in.shape and d2.ndim:
            raise ValueError(
                f"{self!r}: h'' returned shape {d2.shape} for an input of shape {x_in.shape}; "
                f"a pointwise h'' must keep the shape (or be a scalar)"
            )
        if not d2.any():  # h'' = 0 (a piecewise-linear h): no second-order term
            return None
        return (g_out * d2.astype(x_in.dtype, copy=False) * dx,), {}

    def __repr__(self) -> str:
        return f"{self.name}()" if type(self) is not Pointwise else f"Pointwise({self.name})"


class ReLU(Pointwise):
    """``h(x) = max(x, 0)``; ``h'(x) = 1`` for ``x >= 0``, else 0 (eq. 14.32).

    At ``x = 0`` this follows the chapter and takes ``h'(0) = 1`` (PyTorch takes
    0; both are subgradients, and the two agree everywhere else).
    """

    def h(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0)

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return x_in >= 0  # a boolean mask; the Jacobian converts it to x_in's dtype

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return np.zeros((), x_in.dtype)  # piecewise linear: 0 away from the kink


class LeakyReLU(Pointwise):
    """``h(x) = x`` for ``x >= 0``, else ``slope * x``; ``h'`` is 1 or ``slope``.

    As for ``ReLU``, ``h'(0) = 1`` (PyTorch takes ``slope`` there).
    """

    def __init__(self, slope: float = 0.01) -> None:
        super().__init__()
        if isinstance(slope, bool) or not isinstance(slope, int | float | np.floating | np.integer):
            raise TypeError(f"LeakyReLU: slope must be a number, got {slope!r}")
        self.slope = float(slope)

    def h(self, x: np.ndarray) -> np.ndarray:
        return np.where(x >= 0, x, self.slope * x)

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return np.where(x_in >= 0, 1.0, self.slope).astype(x_in.dtype)

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return np.zeros((), x_in.dtype)  # piecewise linear: 0 away from the kink

    def __repr__(self) -> str:
        return f"LeakyReLU(slope={self.slope})"


class Sigmoid(Pointwise):
    """``h(x) = 1 / (1 + e^-x)``; ``h'(x) = h(x) (1 - h(x))``; ``h'' = h' (1 - 2h)``."""

    def h(self, x: np.ndarray) -> np.ndarray:
        return expit(x)

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return x_out * (1 - x_out)

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return x_out * (1 - x_out) * (1 - 2 * x_out)


class Tanh(Pointwise):
    """``h(x) = tanh(x)``; ``h'(x) = 1 - tanh(x)²``; ``h''(x) = -2 tanh(x) h'(x)``."""

    def h(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x)

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return 1 - x_out * x_out

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return -2 * x_out * (1 - x_out * x_out)


class Softplus(Pointwise):
    """``h(x) = log(1 + e^x)`` (computed without overflow); ``h'(x) = σ(x)``;
    ``h''(x) = σ(x) (1 - σ(x))``."""

    def h(self, x: np.ndarray) -> np.ndarray:
        return np.logaddexp(0, x)

    def dh(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        return expit(x_in)

    def d2h(self, x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
        s = expit(x_in)
        return s * (1 - s)
