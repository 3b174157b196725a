"""Executors: ``Sequential`` runs Algorithm 14.1 over a chain of layers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

import numpy as np

from backprop.jacobian import Jacobian, explicit_vjp
from backprop.layer import Layer, Loss, Parameter

__all__ = ["Sequential", "named_parameters"]

MODES = ("fast", "explicit")


def named_parameters(layers: Iterable[tuple[str, Layer]]) -> dict[str, Parameter]:
    """``{"<layer>.<param>": Parameter}``, each Parameter once (tied ones by first name)."""
    named: dict[str, Parameter] = {}
    seen: set[int] = set()
    for prefix, layer in layers:
        for name, p in layer.params.items():
            if id(p) not in seen:
                seen.add(id(p))
                named[f"{prefix}.{name}"] = p
    return named


class Sequential:
    """A chain ``f_L ∘ ... ∘ f_1`` run by Algorithm 14.1.

    ``forward(x_0)`` is the forward loop (lines 4–6). When the last layer is a
    loss, ``forward(x_0, y)`` hands it the target and returns the cost ``J``.
    ``backward(g_L)`` is the backward loop (lines 8–13) and returns
    ``(g_0, grads)`` with ``grads`` keyed by Parameter (tied Parameters summed,
    eq. 14.47). Gradients are returned, never accumulated: there is nothing to
    zero between steps.

    ``backward(..., mode="explicit")`` runs the algorithm literally: at each
    layer it builds ``L_l`` as ``scipy.sparse`` matrices and multiplies
    ``g_{l-1} = g_l L^x_l`` and ``∂J/∂θ_l = g_l L^θ_l``. It agrees with the
    fast path to rounding and exists for teaching and checking.
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers: list[Layer] = list(layers)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        seen: set[int] = set()
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a Layer")
            if id(layer) in seen:
                raise ValueError(
                    f"Sequential: layer {i} ({layer!r}) is already in the chain; a layer instance "
                    f"is one node. To share weights, build a second layer with the same "
                    f"Parameters, e.g. Linear(n_in, n_out, W=first.W, b=first.b)"
                )
            seen.add(id(layer))
            last = i == len(self.layers) - 1
            if not last and (isinstance(layer, Loss) or len(layer.inputs) != 1):
                raise ValueError(
                    f"Sequential: layer {i} ({layer!r}) takes {len(layer.inputs)} inputs; only the "
                    f"last layer of a chain may take more (a loss and its target)"
                )

    # -- Algorithm 14.1 ---------------------------------------------------------
    def forward(self, x: Any, *targets: Any) -> np.ndarray:
        """Forward pass: ``x_l = f_l(x_{l-1}, θ_l)`` for ``l = 1..L``."""
        last = self.layers[-1]
        if len(targets) != len(last.inputs) - 1:
            need = ", ".join(last.inputs[1:]) or "nothing"
            raise TypeError(
                f"Sequential.forward: the last layer {last!r} takes {need} after x; "
                f"got {len(targets)} extra argument(s)"
            )
        saved = [layer._op for layer in self.layers]
        try:
            for layer in self.layers[:-1]:
                x = layer.forward(x)
            return last.forward(x, *targets)
        except Exception:
            for layer, op in zip(self.layers, saved, strict=True):
                layer._op = op
            raise

    def backward(
        self, g_L: Any = None, *, mode: str = "fast", input_grad: bool = True
    ) -> tuple[np.ndarray | None, dict[Parameter, np.ndarray]]:
        """Backward pass: ``g_{l-1} = g_l L^x_l`` and ``∂J/∂θ_l = g_l L^θ_l``.

        ``g_L`` is ``∂J/∂x_L`` (omit it when the last layer is a loss).
        ``input_grad=False`` skips ``g_0`` and so the first layer's input product.
        """
        if mode not in MODES:
            raise ValueError(f"Sequential.backward: mode must be one of {MODES}, got {mode!r}")
        for i, layer in enumerate(self.layers):
            layer._operating_point(f"backward (layer {i} of the Sequential)")
        grads: dict[Parameter, np.ndarray] = {}
        g = g_L
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            need = input_grad or i > 0
            if mode == "fast":
                g_in, layer_grads = layer.backward(g, input_grad=need)
            else:
                g_in, layer_grads = self._explicit_step(layer, g, need)
            if isinstance(g_in, tuple):
                g_in = g_in[0]
            for name, grad in layer_grads.items():
                p = layer.params[name]
                grads[p] = grads[p] + grad if p in grads else grad
            g = g_in
        return g, grads

    @staticmethod
    def _explicit_step(
        layer: Layer, g_out: Any, need_input: bool
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """One step of the literal algorithm (lines 11–13) with sparse matrices."""
        op = layer._operating_point("backward")
        g_out = layer._validate_g_out(op, g_out)
        L_x, L_theta = layer.jacobians()  # line 11: L_l = f'_l(x_{l-1}, θ_l)
        x_in = op.x_in[0]
        B = x_in.shape[0]
        g = g_out.reshape(B, -1) if g_out.ndim else np.full((B, 1), g_out, dtype=g_out.dtype)
        grads = {  # line 13
            name: explicit_vjp(L, g, sum_batch=True).reshape(layer.params[name].shape)
            for name, L in L_theta.items()
        }
        if not need_input:
            return None, grads
        L = L_x[0] if isinstance(L_x, tuple) else L_x
        return explicit_vjp(L, g).reshape(x_in.shape), grads  # line 12

    # -- whole-chain Jacobians ----------------------------------------------------
    def jacobians(self) -> tuple[Jacobian, dict[Parameter, Jacobian]]:
        """``(∂x_L/∂x_0, {θ: ∂x_L/∂θ})`` at the cached operating point.

        Both are chained from the per-layer structured Jacobians (eq. 14.2),
        from the output side, so each product is shared by all the layers below
        it (the reuse of chapter 14.2). A tied Parameter gets the sum of its uses.
        """
        suffix: Jacobian | None = None
        L_theta: dict[Parameter, Jacobian] = {}
        for layer in reversed(self.layers):
            L_x, L_th = layer.jacobians()
            L_x = L_x[0] if isinstance(L_x, tuple) else L_x
            for name, L in L_th.items():
                J = L if suffix is None else suffix @ L
                p = layer.params[name]
                L_theta[p] = L_theta[p] + J if p in L_theta else J
            suffix = L_x if suffix is None else suffix @ L_x
        return cast(Jacobian, suffix), L_theta  # the chain is never empty

    # -- parameters and text --------------------------------------------------------
    def named_parameters(self) -> dict[str, Parameter]:
        """``{"<index>.<name>": Parameter}``, e.g. ``"0.W"``; tied ones once."""
        return named_parameters((str(i), layer) for i, layer in enumerate(self.layers))

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters().values())

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("x",) + tuple(self.layers[-1].inputs[1:])

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __repr__(self) -> str:
        lines = ["Sequential("]
        for i, layer in enumerate(self.layers):
            n = sum(p.size for p in layer.params.values())
            lines.append(f"  ({i}) {layer!r}" + (f"  [{n} parameters]" if n else ""))
        total = sum(p.size for p in self.parameters())
        lines.append(f")  {total} parameters")
        return "\n".join(lines)
