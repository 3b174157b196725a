"""``Dropout``: inverted dropout, as ``torch.nn.Dropout``.

In training mode each entry is kept with probability ``1 − p`` and scaled by
``1/(1 − p)``, so the expected output is the input: ``x_out = x_in ⊙ mask/(1 − p)``.
Per example ``L^x = diag(mask/(1 − p))``, the mask that forward drew. In eval mode
the layer is the identity.

Second order: for the mask of the cached forward the layer is linear, so it moves a
tangent by the same mask and adds no second-order term. Curvature in training mode
is therefore that of the cost with this one mask held fixed, as ``backward`` is its
gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import Diagonal, Identity, Jacobian
from backprop.layer import Layer, OperatingPoint
from backprop.layers.second_order import linear_hvp

__all__ = ["Dropout"]


class Dropout(Layer):
    """Inverted dropout with drop probability ``p`` in ``[0, 1)``, any shape ``(B, *shape)``.

    Every training-mode forward (``cache=False`` too) draws a fresh mask from the
    layer's own generator, ``keep = rng.random(x_in.shape) >= p``, where ``rng`` is
    ``np.random.default_rng(rng)``: the masks are the same for the same seed and
    the same sequence of calls. ``backward`` and ``jacobians`` use the mask of the
    cached forward. A forward that fails its input checks draws nothing.
    """

    _hvp = linear_hvp

    def __init__(self, p: float = 0.5, *, rng: Any = None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, int | float | np.floating) or not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self._rng = np.random.default_rng(rng)

    def _draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """The kept entries (booleans) for an input of ``shape``: the layer's random draw."""
        return self._rng.random(shape) >= self.p

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        if not self.training:
            return x_in
        scale = (self._draw(x_in.shape) / (1.0 - self.p)).astype(x_in.dtype)
        op.saved["scale"] = scale
        return x_in * scale

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        scale = op.saved.get("scale")
        return (g_out.copy() if scale is None else g_out * scale), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        scale = op.saved.get("scale")
        if scale is None:  # eval mode
            return Identity(x[0].size, x.shape[0], x.dtype, "I (dropout off)"), {}
        return Diagonal(scale.reshape(x.shape[0], -1), f"mask/(1 − {self.p:g})"), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (dx,), scale = dx_in, op.saved.get("scale")
        return dx if dx is None or scale is None else dx * scale

    def __repr__(self) -> str:
        return f"Dropout(p={self.p:g})"
