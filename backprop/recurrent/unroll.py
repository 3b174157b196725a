"""``unroll``: a recurrent cell over ``T`` steps, as a DAG with tied weights.

The recurrent-nets chapter trains a recurrent net by unrolling it: ``T`` copies of
the cell, copy ``t`` fed the input of step ``t`` and the state copy ``t − 1``
left, every copy holding the same Parameters. The result is a DAG (chapter 14.7)
with tied weights (chapter 14.8), so backprop through time is Algorithm 14.1 on
that DAG, run by the same executor as any other model:

- the hidden state ``h_t`` feeds both the next step and the output, so the Graph
  routes it through a fan-out ``Branch``, whose backward adds the two gradients
  that come back (eq. 14.46): the one from the output at step ``t`` and the one
  from every later step;
- the Parameters are used once per step, so their gradient is the sum of ``T``
  terms (eq. 14.47), and ``Gradients.per_use`` lists them step by step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.graph import Graph, Handle
from backprop.layers import Merge, Reshape
from backprop.layers.recurrent import RecurrentCell
from backprop.layers.timesteps import Unstack, ZeroState

__all__ = ["Unrolled", "unroll"]

INITIAL = ("input", "zeros")


class Unrolled(Graph):
    """A ``Graph``: ``cell`` unrolled over ``T`` steps (build it with ``unroll``).

    Inputs ``"x"`` ``(B, T, n_in)`` and, with ``h0="input"``, the initial state
    ``"h0"`` ``(B, n_hidden)`` (and ``"c0"`` for a cell with a cell state); with
    ``h0="zeros"`` the initial state is zero (``ZeroState`` nodes named ``"h0"``,
    ``"c0"``) and ``"x"`` is the only input. Output ``"states"``: the hidden states
    ``h_1 … h_T`` stacked, ``(B, T, n_hidden)``.

    Nodes: ``"unstack"`` (``Unstack(T)``: ``x`` split into its steps), ``"step0"`` …
    ``"step{T-1}"`` (``cell.shared_copy()`` each, so every step holds the cell's
    Parameters), ``"stack"`` (``Merge`` of the ``T`` hidden states) and ``"states"``
    (``Reshape(T, n_hidden)``), plus the fan-out ``Branch`` of each state the Graph
    inserts. ``steps`` lists the step cells, step 0 first; ``cell`` is the cell it
    was built from (not itself a node: it can be unrolled again).
    """

    def __init__(self, cell: RecurrentCell, T: int, *, h0: str = "input") -> None:
        super().__init__()
        if not isinstance(cell, RecurrentCell):
            raise TypeError(
                f"unroll: expected a recurrent cell (RNNCell, LSTMCell), got {type(cell).__name__}"
            )
        if isinstance(T, bool) or not isinstance(T, int | np.integer) or T < 1:
            raise ValueError(f"unroll: T must be a positive integer, got {T!r}")
        if h0 not in INITIAL:
            raise ValueError(f"unroll: h0 must be one of {', '.join(INITIAL)}, got {h0!r}")
        self.cell, self.T, self.initial = cell, int(T), h0
        self.steps: list[RecurrentCell] = []
        x = self.input("x")
        state = [self._initial(f"{name}0", x) for name in cell.states]
        x_steps = self.add(Unstack(self.T), x, name="unstack")
        hidden: list[Handle] = []
        for t in range(self.T):
            step = cell.shared_copy()
            self.steps.append(step)
            out = self.add(step, x_steps[t], *state, name=f"step{t}")
            state = list(out) if isinstance(out, tuple) else [out]
            hidden.append(state[0])
        stacked = self.add(Merge(self.T), *hidden, name="stack")
        self.output(self.add(Reshape(self.T, cell.n_hidden), stacked, name="states"))

    def _initial(self, name: str, x: Handle) -> Handle:
        if self.initial == "input":
            return self.input(name)
        return self.add(ZeroState(self.cell.n_hidden), x, name=name)

    def __repr__(self) -> str:
        zeros = ", h0=zeros" if self.initial == "zeros" else ""
        return f"Unrolled({self.cell!r}, T={self.T}{zeros})"


def unroll(cell: Any, T: int, *, h0: str = "input") -> Unrolled:
    """``cell`` unrolled over ``T`` steps: a ``Graph`` whose backward is backprop through time.

    ``unroll(cell, T)`` has inputs ``"x"`` ``(B, T, n_in)`` and ``"h0"`` ``(B,
    n_hidden)`` (plus ``"c0"`` for an ``LSTMCell``) and one output, the hidden states
    ``(B, T, n_hidden)``; ``h0="zeros"`` starts from the zero state and takes ``"x"``
    only (a model for ``fit``). One node per step, ``"step0"`` …, each a copy of
    ``cell`` holding its Parameters (tied across the steps, chapter 14.8); see
    ``Unrolled``.
    """
    return Unrolled(cell, T, h0=h0)
