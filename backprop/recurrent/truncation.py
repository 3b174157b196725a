"""Truncated backprop through time: the recurrence cut every ``k`` steps.

Backprop through the whole unrolled net costs memory and time in proportion to
``T`` and multiplies ``T`` per-step Jacobians, whose product can vanish or explode.
The chapter's remedy is to truncate: drop the dependencies longer than some
number of steps. Here that is done on the same DAG, with the same forward pass:
the ``T`` steps fall into windows of ``k`` that end at the last step (steps
``T−k … T−1``, then ``T−2k … T−k−1``, and so on; the first window may be
shorter), and the state entering each window but the first is treated as a
constant in the backward pass. So

- a loss on the last state backpropagates through exactly its last ``k`` steps;
- a loss on every state (the stacked output) backpropagates, from each step,
  only to the start of that step's window;
- ``k ≥ T`` cuts nothing: the gradient is the exact one.

The cut is each window's first step cell ignoring the gradient of its incoming
state (``RecurrentCell.stop_state_gradient``): the graph, the forward values and
every other Jacobian stay as they are, and the truncated gradient is still
Algorithm 14.1 over the DAG, minus those edges.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import numpy as np

from backprop.graph import Graph
from backprop.layers.recurrent import RecurrentCell
from backprop.recurrent.unroll import Unrolled

__all__ = ["Truncation", "cut_steps", "truncated", "truncation_error"]


def cut_steps(T: int, k: int) -> list[int]:
    """The steps whose incoming state is cut for windows of ``k`` ending at step ``T − 1``:
    ``T − k, T − 2k, …`` down to 1 (none when ``k ≥ T``)."""
    return list(range(T - k, 0, -k))


def _unrolled_in(model: Any) -> list[Unrolled]:
    """Every ``Unrolled`` graph in ``model``: itself, or nested at any depth."""
    found: list[Unrolled] = []
    stack = [model]
    while stack:
        graph = stack.pop()
        if isinstance(graph, Unrolled):
            found.append(graph)
        stack.extend(n.layer for n in graph.nodes() if isinstance(n.layer, Graph))
    return found


class Truncation:
    """Backprop through at most ``k`` steps of every recurrence in ``model``, inside a
    ``with`` block (see the module docstring); ``k=None`` changes nothing.

    Made once (it finds the unrolled recurrences and the steps to cut), it can be
    entered again and again: ``fit(..., truncate=k)`` enters it around each
    backward pass. On leaving, every cell is as it was.
    """

    def __init__(self, model: Any, k: int | None, where: str = "truncated") -> None:
        if not isinstance(model, Graph):
            raise TypeError(
                f"{where}: expected a Graph or a Sequential, got {type(model).__name__}"
            )
        self.k = k
        self.cells: list[RecurrentCell] = []
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"{where}: the truncation k must be a positive integer, got {k!r}")
        unrolled = _unrolled_in(model)
        if not unrolled:
            raise ValueError(
                f"{where}: the model has no unrolled recurrence to truncate; build one with "
                f"bp.unroll(cell, T) (as the model or as a node of it)"
            )
        self.k = int(k)
        for u in unrolled:
            self.cells += [u.steps[t] for t in cut_steps(u.T, self.k)]

    def __enter__(self) -> Truncation:
        for cell in self.cells:
            cell.stop_state_gradient = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for cell in self.cells:
            cell.stop_state_gradient = False


def truncated(model: Any, k: int | None) -> Truncation:
    """``with bp.truncated(model, k): grads = model.backward(...)``: truncated BPTT.

    Inside the block every unrolled recurrence of ``model`` backpropagates through
    windows of ``k`` steps that end at its last step (see the module docstring);
    the forward pass is untouched, so the model's cached forward serves both the
    exact and the truncated gradient.
    """
    return Truncation(model, k)


def truncation_error(model: Any, ks: Any, seed: Any = None) -> dict[int, float]:
    """``{k: ‖g_k − g‖ / ‖g‖}``: how far truncation to ``k`` steps moves the gradient.

    ``g`` is every parameter's gradient, all of them as one vector, from
    ``model.backward(seed)`` at the model's cached forward; ``g_k`` the same under
    ``truncated(model, k)``. The error is 0 for ``k ≥ T``.
    """
    full = _flat(model.backward(seed, input_grad=False).params)
    norm = float(np.linalg.norm(full))
    errors = {}
    for k in ks:
        with Truncation(model, int(k), "truncation_error"):
            cut = _flat(model.backward(seed, input_grad=False).params)
        errors[int(k)] = float(np.linalg.norm(cut - full)) / norm if norm else 0.0
    return errors


def _flat(params: dict[Any, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(g) for g in params.values()]).astype(np.float64)
