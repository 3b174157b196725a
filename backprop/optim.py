"""Optimizers: they consume the gradients that ``backward`` returns.

An optimizer holds the Parameters it updates and, for each one, its own state
(a velocity, Adam's moment estimates). ``step(grads)`` takes a mapping
``{Parameter: dJ/dθ}`` (what ``Sequential.backward`` returns, or the object a
``Graph.backward`` returns, whose ``.params`` is that mapping). A step is all or
nothing: every gradient is checked and every new value and state is computed
first, and only then are the Parameters and states replaced, so a bad call
changes nothing. A tied Parameter (chapter 14.8) is one key of the mapping,
holding the sum of its uses (eq. 14.47), so it is updated once.

Gradients come in each parameter's own shape: the transpose ``(∂J/∂θ)ᵀ`` of the
chapter's row vector, which is exactly what the update rule (eq. 14.9) needs.

Weight decay ``λ`` means the same in every optimizer here: the step uses
``g + λθ``, the gradient of ``J + (λ/2)‖θ‖²`` (L2 regularization). ``Adam``
also offers the decoupled form (``decoupled=True``, "AdamW"), which shrinks
``θ`` by ``ηλθ`` outside the adaptive scaling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy import ndarray  # by its plain name on the hot paths: see backprop.layer

from backprop.layer import Parameter

__all__ = ["SGD", "Adam", "Optimizer"]


def _collect(owner: str, params: Any) -> list[Parameter]:
    if hasattr(params, "parameters"):
        params = params.parameters()
    if isinstance(params, Parameter):
        params = [params]
    try:
        out = list(dict.fromkeys(params))
    except TypeError:
        raise TypeError(
            f"{owner}: params must be Parameters (a list, or a model's parameters()), "
            f"got {type(params).__name__}"
        ) from None
    for p in out:
        if not isinstance(p, Parameter):
            raise TypeError(f"{owner}: expected Parameters, got {type(p).__name__}")
    if not out:
        raise ValueError(
            f"{owner}: no parameters to update (an empty list); build it over "
            f"model.parameters() of a model that has some"
        )
    return out


def _rate(owner: str, what: str, value: Any, low: float, high: float, *, open_low: bool) -> float:
    """``value`` as a float in ``(low, high)`` or ``[low, high)``, else a ValueError.

    Only a real number is taken (a Python or numpy int or float): a string such as
    ``"0.1"`` or a bool is a ``TypeError``, not converted.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):  # a complex number, say
        raise TypeError(f"{owner}: {what} must be a real number, got {value!r}") from None
    ok = (x > low if open_low else x >= low) and x < high and math.isfinite(x)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g})"
        raise ValueError(f"{owner}: {what} must lie in {interval}, got {value!r}")
    return x


class Optimizer:
    """Base class: parameter bookkeeping, per-Parameter state, all-or-nothing steps.

    A subclass writes ``_update(p, g, state) -> (new_value, new_state)``, a pure
    function of its arguments: it must not modify ``state`` in place.
    """

    def __init__(
        self, params: Iterable[Parameter] | Any, lr: float, *, weight_decay: float = 0.0
    ) -> None:
        name = type(self).__name__
        self.lr = _rate(name, "lr", lr, 0.0, math.inf, open_low=True)
        self.weight_decay = _rate(name, "weight_decay", weight_decay, 0.0, math.inf, open_low=False)
        self.params = _collect(name, params)
        #: ``{Parameter: {name: array or number}}``: what each Parameter's updates remember.
        self.state: dict[Parameter, dict[str, Any]] = {p: {} for p in self.params}

    def _checked(self, grads: Any) -> list[tuple[Parameter, np.ndarray]]:
        if type(grads) is not dict:
            grads = getattr(grads, "params", grads)
        if type(grads) is not dict and not isinstance(grads, Mapping):
            raise TypeError(
                f"{type(self).__name__}.step takes a mapping {{Parameter: gradient}}, "
                f"got {type(grads).__name__}"
            )
        state = self.state
        items = []
        for p, g in grads.items():
            # The common case in as few operations as it takes: a Parameter this optimizer
            # updates and a float array of its shape and dtype. _convert says what else is
            # wrong (it also checks that p is a Parameter: only Parameters are in state).
            if (
                p not in state
                or type(g) is not ndarray
                or g.shape != p._value.shape
                or g.dtype != p._value.dtype
            ):
                g = self._convert(p, np.asarray(g))
            # A NaN or inf anywhere makes Σ g² non-finite: one BLAS dot product, and the
            # exact test only when it fires (huge finite entries may also overflow it).
            # The method on the flat view costs about half of np.vdot's call.
            flat = g.ravel()
            if not math.isfinite(flat.dot(flat)) and not np.all(np.isfinite(g)):
                self._non_finite(p, g)
            items.append((p, g))
        return items

    def _non_finite(self, p: Parameter, g: np.ndarray) -> None:
        """The last defence against a NaN step: name the parameter and its first bad entry."""
        bad = ~np.isfinite(g)
        first = tuple(int(i) for i in np.argwhere(bad)[0]) if g.ndim else ()
        where = f" (the first at index {first})" if first else ""
        raise ValueError(
            f"{type(self).__name__}.step: the gradient of parameter {p.name or '?'!r} "
            f"{tuple(p.shape)} has {int(bad.sum())} non-finite entries (NaN or inf){where}; "
            f"no parameter was updated. Something overflowed before the update: the data "
            f"fed to the model, its output or the loss (fit checks the data first and says "
            f"which); a smaller learning rate often helps"
        )

    def _convert(self, p: Any, g: np.ndarray) -> np.ndarray:
        """``g`` in ``p``'s dtype after the checks, or the error that says what is wrong."""
        name = type(self).__name__
        if not isinstance(p, Parameter):
            raise TypeError(
                f"{name}.step: keys must be Parameters, got {p!r}; for one layer's "
                f"grads use {{layer.params[name]: g for name, g in grads.items()}}"
            )
        if p not in self.state:
            raise ValueError(f"{name}.step: {p!r} is not one this optimizer updates")
        if g.shape != p.shape:
            raise ValueError(
                f"{name}.step: gradient for {p!r} has shape {g.shape}, expected {p.shape}"
            )
        if g.dtype.kind != "f":
            raise TypeError(f"{name}.step: gradient for {p!r} has dtype {g.dtype}")
        return g if g.dtype == p.dtype else g.astype(p.dtype)

    def step(self, grads: Any) -> None:
        """Update every Parameter that has a gradient in ``grads``; all or nothing."""
        state = self.state
        updates = []
        for p, g in self._checked(grads):
            value, new_state = self._update(p, g, state[p])
            value = np.asarray(value)
            if value.shape != p._value.shape or value.dtype != p._value.dtype:
                raise ValueError(  # checked before any Parameter changes
                    f"{type(self).__name__}.step: the update of {p!r} has shape "
                    f"{value.shape} and dtype {value.dtype}; no parameter was updated"
                )
            updates.append((p, value, new_state))
        for p, value, new_state in updates:
            p._assign(value)
            state[p] = new_state

    def _decayed(self, p: Parameter, g: np.ndarray) -> np.ndarray:
        """``g + λθ``: the gradient of ``J + (λ/2)‖θ‖²``."""
        return g + self.weight_decay * p.value if self.weight_decay else g

    def _update(
        self, p: Parameter, g: np.ndarray, state: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError  # abstract

    def _options(self) -> dict[str, Any]:
        """The settings that differ from their defaults, for ``repr``."""
        return {"weight_decay": self.weight_decay} if self.weight_decay else {}

    def __repr__(self) -> str:
        options = "".join(
            f", {k}={v}" if isinstance(v, bool) else f", {k}={v:g}"
            for k, v in self._options().items()
        )
        return f"{type(self).__name__}(lr={self.lr:g}{options})"


class SGD(Optimizer):
    """Stochastic gradient descent, ``θ ← θ - η g`` (eq. 14.9), with optional momentum.

    With ``momentum=μ > 0`` each Parameter keeps a velocity ``v`` (zero at the
    start) and the step is ``v ← μ v + g``, ``θ ← θ - η v``: a running sum of
    past gradients that damps the zig-zag across a narrow valley. ``g``
    includes the weight decay term ``λθ`` when ``weight_decay=λ > 0``.

    ``nesterov=True`` (with ``μ > 0``) looks one step ahead along the velocity:
    ``θ ← θ - η (g + μ v)`` with the new ``v``, as ``torch.optim.SGD(nesterov=True)``.
    """

    def __init__(
        self,
        params: Iterable[Parameter] | Any,
        lr: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr, weight_decay=weight_decay)
        self.momentum = _rate("SGD", "momentum", momentum, 0.0, 1.0, open_low=False)
        if not isinstance(nesterov, bool | np.bool_):
            raise TypeError(f"SGD: nesterov must be True or False, got {nesterov!r}")
        if nesterov and not self.momentum:
            raise ValueError("SGD: nesterov=True needs a momentum > 0 (it looks ahead along v)")
        self.nesterov = bool(nesterov)

    def step(self, grads: Any) -> None:
        """Update every Parameter that has a gradient in ``grads``; all or nothing."""
        if self.momentum or self.weight_decay:
            super().step(grads)
            return
        # Plain θ ← θ - ηg keeps no state: the same update as ``_update``, in one loop.
        # Every gradient is checked (shape, dtype, finite) before any new value exists.
        step = -self.lr
        news = []
        for p, g in self._checked(grads):
            new = g * step  # one new array, then θ added in place: θ - ηg, same rounding
            new += p._value
            new.setflags(False)  # type: ignore[call-arg]  # write=False, as in Layer.forward
            news.append((p, new))
        for p, new in news:
            p._value = new

    def _update(
        self, p: Parameter, g: np.ndarray, state: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if self.weight_decay:
            g = self._decayed(p, g)
        if self.momentum:
            # The first velocity is a copy: the caller's gradient array stays theirs.
            v = self.momentum * state["v"] + g if "v" in state else np.array(g, copy=True)
            state = {"v": v}
            g = g + self.momentum * v if self.nesterov else v
        new = g * -self.lr  # one new array, then θ added in place: θ - ηg, same rounding
        new += p._value
        return new, state

    def _options(self) -> dict[str, Any]:
        momentum = {"momentum": self.momentum} if self.momentum else {}
        nesterov = {"nesterov": True} if self.nesterov else {}
        return momentum | nesterov | super()._options()


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015): a step per entry scaled by a running gradient size.

    Each Parameter keeps ``m`` and ``v`` (zero at the start) and a step count
    ``t``; for its gradient ``g``:

    - ``m ← β₁ m + (1 - β₁) g`` and ``v ← β₂ v + (1 - β₂) g²``;
    - ``m̂ = m / (1 - β₁ᵗ)`` and ``v̂ = v / (1 - β₂ᵗ)`` (undoing the zero start);
    - ``θ ← θ - η m̂ / (√v̂ + ε)``.

    ``weight_decay=λ`` adds ``λθ`` to ``g`` (L2, as in ``SGD``); with
    ``decoupled=True`` it instead subtracts ``ηλθ`` from ``θ`` next to the
    adaptive step (AdamW, Loshchilov and Hutter, 2019).
    """

    def __init__(
        self,
        params: Iterable[Parameter] | Any,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        super().__init__(params, lr, weight_decay=weight_decay)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be a pair (β₁, β₂), got {betas!r}")
        self.beta1 = _rate("Adam", "betas[0]", betas[0], 0.0, 1.0, open_low=False)
        self.beta2 = _rate("Adam", "betas[1]", betas[1], 0.0, 1.0, open_low=False)
        self.eps = _rate("Adam", "eps", eps, 0.0, math.inf, open_low=True)
        self.decoupled = bool(decoupled)

    def _update(
        self, p: Parameter, g: np.ndarray, state: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if not self.decoupled:
            g = self._decayed(p, g)
        t = state.get("t", 0) + 1
        m = (1.0 - self.beta1) * g + (self.beta1 * state["m"] if t > 1 else 0.0)
        v = (1.0 - self.beta2) * g * g + (self.beta2 * state["v"] if t > 1 else 0.0)
        m_hat = m / (1.0 - self.beta1**t)
        v_hat = v / (1.0 - self.beta2**t)
        step = m_hat / (np.sqrt(v_hat) + self.eps)
        if self.decoupled and self.weight_decay:
            step = step + self.weight_decay * p.value
        value = (p.value - self.lr * step).astype(p.dtype, copy=False)
        return value, {"m": m, "v": v, "t": t}
