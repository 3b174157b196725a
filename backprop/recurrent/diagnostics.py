"""Vanishing and exploding gradients, read off the explicit Jacobians of an unrolled net.

Step ``t`` of an Elman net maps the state ``h_{t−1}`` to ``h_t = f(W_x x_t + W_h h_{t−1}
+ b)``; its Jacobian with respect to the state is ``L_t = R_t W_h`` with ``R_t =
diag(f'(a_t))`` (the chapter's ``R W``). The gradient that reaches ``h_t`` from a loss
on ``h_T`` is ``g_T ∂h_T/∂h_t``, and by the chain rule (eq. 14.2)

    ∂h_T/∂h_t = L_T L_{T−1} ⋯ L_{t+1},

a product of ``T − t`` factors. Its norm is at most the product of the factors'
norms, ``Π ‖R_s W_h‖ ≤ (max|f'| · σ_max(W_h))^{T−t}``: it shrinks geometrically when
that is below 1 (vanishing gradients, ``tanh`` with small weights) and can grow
geometrically when the factors' smallest singular values exceed 1 (exploding).

Every factor here is the engine's own ``L^x`` of the step cell for its state input,
at the operating point of the last forward pass; for a cell whose state has several
parts (an LSTM's ``(h, c)``) the state is the parts stacked and ``L_t`` the ``2n ×
2n`` Jacobian of ``(h_t, c_t)`` with respect to ``(h_{t−1}, c_{t−1})``. Index ``t``
counts the states ``h_0`` (the initial one) to ``h_T``; ``step{t}`` of the graph
makes ``h_{t+1}``.
"""

from __future__ import annotations

import numpy as np

from backprop.jacobian import Dense, Jacobian
from backprop.recurrent.unroll import Unrolled

__all__ = ["gradient_norms", "singular_values", "state_jacobians", "step_jacobians"]


def _require(unrolled: Unrolled, what: str) -> None:
    if not isinstance(unrolled, Unrolled):
        raise TypeError(
            f"{what}: expected an unrolled net (bp.unroll), got {type(unrolled).__name__}"
        )
    unrolled.require_forward(what)


def step_jacobians(unrolled: Unrolled) -> list[Jacobian]:
    """``[L_1, …, L_T]``: ``L_t = ∂h_t/∂h_{t−1}``, the Jacobian of step ``t − 1``'s cell
    with respect to its incoming state, at the last forward pass.

    For an ``RNNCell`` this is the cell's own ``L^h``, the ``Product`` of ``R_t =
    diag(f'(a_t))`` and ``W_h``; for a cell with several state parts, the parts'
    ``L^x`` side by side as one ``Dense`` per example.
    """
    _require(unrolled, "step_jacobians")
    out = []
    n_parts = len(unrolled.cell.states)
    for t, step in enumerate(unrolled.steps):
        L_x, _ = step.jacobians()
        parts = L_x[1 : 1 + n_parts]
        if any(L is None for L in parts):
            raise RuntimeError(
                f"step_jacobians: step{t} treats its incoming state as a constant (inside "
                f"bp.truncated); read the Jacobians outside the truncation"
            )
        if n_parts == 1:
            out.append(parts[0])
        else:
            dense = np.concatenate([L.to_dense() for L in parts], axis=2)
            state = ", ".join(unrolled.cell.states)
            out.append(Dense(dense, f"∂({state})_t / ∂({state})_(t−1)"))
    return out


def state_jacobians(unrolled: Unrolled) -> list[Jacobian]:
    """``[∂h_T/∂h_0, ∂h_T/∂h_1, …, ∂h_T/∂h_{T−1}]``, one ``Dense`` per ``t``.

    Chained from the last step back (eq. 14.2), each product reusing the one after
    it: ``∂h_T/∂h_{t−1} = (∂h_T/∂h_t) L_t``, the reuse of computation of chapter 14.2.
    """
    J: Jacobian | None = None
    out: list[Jacobian] = []
    for L in reversed(step_jacobians(unrolled)):
        factor = Dense(L.to_dense(), L.label)
        J = factor if J is None else J @ factor  # Dense @ Dense: one batched product
        J.label = f"∂h_T/∂h_{len(unrolled.steps) - 1 - len(out)}"
        out.append(J)
    return out[::-1]


def singular_values(jacobians: list[Jacobian]) -> np.ndarray:
    """The singular values of each example's matrix: ``(B, len(jacobians), n)``, each
    row in decreasing order."""
    return np.stack([np.linalg.svd(J.to_dense(), compute_uv=False) for J in jacobians], axis=1)


def gradient_norms(unrolled: Unrolled) -> np.ndarray:
    """``‖∂h_T/∂h_t‖`` (the spectral norm, the largest singular value) for ``t = 0 …
    T − 1``, per example: ``(B, T)``. How strongly the state ``t`` steps into the
    sequence still moves the last one; a gradient from a loss on ``h_T`` reaches
    ``h_t`` scaled by at most this much."""
    return singular_values(state_jacobians(unrolled))[..., 0]
