"""Recurrent nets (the recurrent-nets chapter) on the executor: unrolling, truncation,
and the gradient diagnostics that explicit Jacobians give.

- ``unroll``: a cell over ``T`` steps as a DAG with tied weights (``Unrolled``);
- ``truncation``: truncated backprop through time (``truncated``, ``truncation_error``);
- ``diagnostics``: the per-step Jacobians of the state, their products ``∂h_T/∂h_t``,
  norms and singular values: vanishing and exploding gradients.
"""

from backprop.recurrent.diagnostics import (
    gradient_norms,
    singular_values,
    state_jacobians,
    step_jacobians,
)
from backprop.recurrent.truncation import Truncation, cut_steps, truncated, truncation_error
from backprop.recurrent.unroll import Unrolled, unroll

__all__ = [
    "Truncation",
    "Unrolled",
    "cut_steps",
    "gradient_norms",
    "singular_values",
    "state_jacobians",
    "step_jacobians",
    "truncated",
    "truncation_error",
    "unroll",
]
