"""Optimizers: they consume the gradients that ``backward`` returns.

An optimizer holds the Parameters it updates. ``step(grads)`` takes a mapping
``{Parameter: dJ/dθ}`` (what ``Sequential.backward`` returns), checks every
entry first and only then updates, so a bad call changes nothing. A tied
Parameter appears once in the mapping, so it is updated once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from backprop.layer import Parameter

__all__ = ["SGD", "Optimizer"]


def _collect(params: Any) -> list[Parameter]:
    if hasattr(params, "parameters"):
        params = params.parameters()
    out = list(dict.fromkeys(params))
    for p in out:
        if not isinstance(p, Parameter):
            raise TypeError(f"optimizer: expected Parameters, got {type(p).__name__}")
    return out


class Optimizer:
    """Base class: the parameter bookkeeping and the checks every step needs."""

    def __init__(self, params: Iterable[Parameter] | Any, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr!r}")
        self.params = _collect(params)
        self.lr = float(lr)

    def _checked(self, grads: Any) -> list[tuple[Parameter, np.ndarray]]:
        grads = getattr(grads, "params", grads)
        if not isinstance(grads, Mapping):
            raise TypeError(
                f"{type(self).__name__}.step takes a mapping {{Parameter: gradient}}, "
                f"got {type(grads).__name__}"
            )
        known = set(map(id, self.params))
        items = []
        for p, g in grads.items():
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"{type(self).__name__}.step: keys must be Parameters, got {p!r}; for one "
                    f"layer's grads use {{layer.params[name]: g for name, g in grads.items()}}"
                )
            if id(p) not in known:
                raise ValueError(
                    f"{type(self).__name__}.step: {p!r} is not one this optimizer updates"
                )
            g = np.asarray(g)
            if g.shape != p.shape:
                raise ValueError(
                    f"{type(self).__name__}.step: gradient for {p!r} has shape {g.shape}, "
                    f"expected {p.shape}"
                )
            items.append((p, g))
        return items

    def step(self, grads: Any) -> None:
        for p, g in self._checked(grads):
            p.value = self._update(p, g)

    def _update(self, p: Parameter, g: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # abstract


class SGD(Optimizer):
    """``θ ← θ - η (∂J/∂θ)ᵀ`` (eq. 14.9).

    The gradients arrive in each parameter's own shape, which is the transpose
    ``(∂J/∂θ)ᵀ`` of the chapter's row vector, so the update is a plain
    subtraction.
    """

    def _update(self, p: Parameter, g: np.ndarray) -> np.ndarray:
        return (p.value - self.lr * g).astype(p.dtype, copy=False)
