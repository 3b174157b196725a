"""Backpropagation to the data (chapter 14.9): optimizing an input instead of θ.

Backward does not care whether a leaf of the graph is a parameter or data, so the
gradient of a cost with respect to the input, ``dJ/dx_0``, comes out of the
same pass that gives ``dJ/dθ``. Descending it changes the input and leaves the
parameters alone. The classic use: find the input that most excites one unit
of a trained network. The cost is then the *negative* of that unit's value,
``J(x_0) = -x_L[k]``, so that minimizing ``J`` maximizes the unit.

- ``input_gradient(model, x, objective)`` returns ``(J, dJ/dx)`` at ``x``;
- ``optimize_input(model, x0, objective, steps=..., lr=...)`` runs gradient
  descent (or Adam) on ``x`` and returns the final ``x`` and the history of ``J``.

``objective`` says what ``J`` is, for ``x_out`` the model's output
``(B, *shape)``:

- an ``int`` ``k`` (or a tuple index into one example's output): the unit to
  maximize, ``J = -(1/B) Σ_b x_out[b][k]`` (a batch mean, like a loss);
- ``None``: the model's output is already a scalar cost (the model ends in a
  loss, whose targets are passed in ``fixed``), and ``J`` is that cost;
- a callable ``f(x_out) -> (J, dJ/dx_out)``: any other cost, minimized.

With ``l2 = λ > 0`` the cost gets ``(λ/2)(1/B) Σ_b ‖x_b‖²``, which keeps the
input from growing without bound (the simplest "natural image prior").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from backprop.graph import Graph
from backprop.layer import Parameter, check_float
from backprop.optim import SGD, Adam, Optimizer

__all__ = ["input_gradient", "optimize_input"]

Objective = int | tuple[int, ...] | Callable[[np.ndarray], tuple[Any, Any]] | None


def input_gradient(
    model: Graph,
    x: Any,
    objective: Objective = None,
    *,
    input: str | None = None,
    fixed: Any = None,
    output: str | None = None,
    l2: float = 0.0,
) -> tuple[float, np.ndarray]:
    """``(J, dJ/dx)`` at input ``x`` by one forward and one backward pass.

    ``model`` is any model (a ``Sequential`` or a ``Graph``). ``x`` feeds the
    input named ``input`` (default: the first declared input, a chain's
    ``x_0``); ``fixed`` gives the other inputs, as a dict by name or a tuple in
    declaration order (a loss's targets); ``output`` names the output when there
    are several. ``objective`` and ``l2`` define ``J`` (see the
    module docstring). ``dJ/dx`` has ``x``'s shape and dtype. The parameters
    are not changed; the model is left at its operating point at ``x``.
    """
    J, g, _ = _evaluate(model, x, objective, input, fixed, output, l2)
    return J, g


def _evaluate(
    model: Any,
    x: Any,
    objective: Objective,
    input: str | None,
    fixed: Any,
    output: str | None,
    l2: float,
    where: str = "input_gradient",
) -> tuple[float, np.ndarray, np.ndarray]:
    """``(J, dJ/dx, x_out)``: what ``input_gradient`` computes, and the output.

    ``where`` names the public function in errors about its own arguments.
    """
    x = check_float("input_gradient", "x", x)
    if x.ndim == 0:
        raise ValueError("input_gradient: x is a scalar; give a batch of shape (B, ...)")
    l2 = _non_negative(where, "l2", l2)
    if not isinstance(model, Graph):
        raise TypeError(
            f"input_gradient: model must be a Sequential or a Graph, got {type(model).__name__}"
        )
    name = _graph_input(model, input, fixed)
    feed = _fixed_inputs(model, name, fixed)
    feed[name] = x
    outs = model.forward(feed)
    names = model.output_names()
    if output is None and len(names) > 1:
        raise ValueError(
            f"input_gradient: the model has outputs {', '.join(map(repr, names))}; "
            f"choose one with output=..."
        )
    out_name = names[0] if output is None else output
    if out_name not in names:
        raise ValueError(
            f"input_gradient: no output {out_name!r}; the outputs are {', '.join(map(repr, names))}"
        )
    x_out = outs[names.index(out_name)] if len(names) > 1 else outs
    J, g_out = _cost(objective, x_out, f"output {out_name!r}")
    grads = model.backward({out_name: g_out})
    if name not in grads.inputs:
        raise ValueError(
            f"input_gradient: input {name!r} gets no gradient (declared with "
            f"requires_grad=False, or not floating point)"
        )
    g = grads.inputs[name]
    if l2:
        B = x.shape[0]
        J += 0.5 * l2 * float(np.vdot(x, x)) / B
        g = g + x * (l2 / B)
    return J, g, x_out


def optimize_input(
    model: Graph,
    x0: Any,
    objective: Objective = None,
    *,
    steps: int = 100,
    lr: float = 0.1,
    optimizer: str = "sgd",
    clip: tuple[float, float] | None = None,
    l2: float = 0.0,
    input: str | None = None,
    fixed: Any = None,
    output: str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Minimize ``J(x)`` over the input ``x``, from ``x0``, with the model fixed.

    Each of the ``steps`` steps runs ``input_gradient`` and then one update of
    ``x``: ``x ← x - lr · dJ/dx`` (``optimizer="sgd"``, eq. 14.9 applied to
    the data) or an Adam step (``optimizer="adam"``, whose step size does not
    depend on the gradient's scale). ``clip=(lo, hi)`` clips ``x`` into that
    box after every update (e.g. the pixel range). ``objective``, ``l2``,
    ``input``, ``fixed`` and ``output`` are as in ``input_gradient``; for a unit
    ``k`` this is gradient *ascent* on the unit's mean value.

    Returns ``(x, history)``: the final input (a new array, ``x0``'s shape and
    dtype) and a dict of arrays of length ``steps + 1``, one entry per iterate
    ``x_0 .. x_steps``: ``"J"``, the cost (with the ``l2`` term), and, for a
    unit objective, ``"unit"``, the unit's mean value over the batch. Only the
    model's operating point changes (it is left at the final ``x``); its
    parameters never do.
    """
    x = check_float("optimize_input", "x0", x0)
    if not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"optimize_input: steps must be a non-negative integer, got {steps!r}")
    if clip is not None:
        lo, hi = (float(c) for c in clip)
        if not lo < hi:
            raise ValueError(f"optimize_input: clip must be (lo, hi) with lo < hi, got {clip!r}")
    p = Parameter(x, name="x")
    opt: Optimizer
    if optimizer == "sgd":
        opt = SGD([p], lr)
    elif optimizer == "adam":
        opt = Adam([p], lr)
    else:
        raise ValueError(f"optimize_input: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    unit = objective is not None and not callable(objective)
    costs: list[float] = []
    values: list[float] = []
    for t in range(steps + 1):
        J, g, x_out = _evaluate(
            model, p.value, objective, input, fixed, output, l2, "optimize_input"
        )
        costs.append(J)
        if unit:
            index = _unit_index(objective, x_out, "the output")
            values.append(float(x_out[(slice(None),) + index].mean()))
        if t == steps:
            break
        opt.step({p: g})
        if clip is not None:
            p.value = np.clip(p.value, lo, hi).astype(p.dtype, copy=False)
    history = {"J": np.asarray(costs)}
    if unit:
        history["unit"] = np.asarray(values)
    return np.array(p.value, copy=True), history


# -- helpers ---------------------------------------------------------------------------


def _non_negative(where: str, what: str, value: Any) -> float:
    v = float(value)
    if not v >= 0.0:
        raise ValueError(f"{where}: {what} must be >= 0, got {value!r}")
    return v


def _graph_input(model: Graph, name: str | None, fixed: Any) -> str:
    """The input ``x`` feeds: ``name``, or the first declared input when ``fixed``
    gives the others (a dict naming them all, or a tuple)."""
    names = model.input_names()
    if name is None:
        named = set(fixed) if isinstance(fixed, Mapping) else None
        if len(names) > 1 and named is not None and not set(names[1:]) <= named:
            raise ValueError(
                f"input_gradient: the model has inputs {', '.join(map(repr, names))}; say which "
                f"one to optimize with input=... and give the others in fixed={{...}}"
            )
        if len(names) > 1 and fixed is None:
            raise ValueError(
                f"input_gradient: the model has inputs {', '.join(map(repr, names))}; say which "
                f"one to optimize with input=... and give the others in fixed=..."
            )
        return names[0]
    if name not in names:
        raise ValueError(
            f"input_gradient: no input {name!r}; the inputs are {', '.join(map(repr, names))}"
        )
    return name


def _fixed_inputs(model: Graph, name: str, fixed: Any) -> dict[str, Any]:
    """The other inputs by name: ``fixed`` as a dict, or a tuple in declaration order."""
    others = [n for n in model.input_names() if n != name]
    if fixed is None:
        feed: dict[str, Any] = {}
    elif isinstance(fixed, Mapping):
        feed = dict(fixed)
    else:
        values = tuple(fixed)
        if len(values) != len(others):
            raise ValueError(
                f"input_gradient: fixed has {len(values)} value(s), but the other inputs are "
                f"{', '.join(map(repr, others)) or 'none'}"
            )
        feed = dict(zip(others, values, strict=True))
    if name in feed:
        raise ValueError(f"input_gradient: input {name!r} is both x and in fixed")
    return feed


def _unit_index(objective: Any, x_out: np.ndarray, where: str) -> tuple[int, ...]:
    """The unit as an index into one example's output, checked against its shape."""
    shape = x_out.shape[1:]
    if isinstance(objective, int | np.integer) and len(shape) > 1:
        size = int(np.prod(shape, dtype=np.int64))
        if not -size <= objective < size:
            raise ValueError(
                f"input_gradient: unit {objective} is out of range for {where} of shape "
                f"{x_out.shape} ({size} units per example)"
            )
        return tuple(int(i) for i in np.unravel_index(int(objective) % size, shape))
    index = (objective,) if isinstance(objective, int | np.integer) else tuple(objective)
    if len(index) != len(shape) or not all(
        isinstance(i, int | np.integer) and -n <= i < n for i, n in zip(index, shape, strict=True)
    ):
        raise ValueError(
            f"input_gradient: unit {objective!r} does not index one example of {where}, "
            f"shape {x_out.shape} (per example {shape})"
        )
    return tuple(int(i) for i in index)


def _cost(objective: Any, x_out: np.ndarray, where: str) -> tuple[float, Any]:
    """``(J, dJ/dx_out)`` for the objective; ``dJ/dx_out`` is None for a loss output."""
    if objective is None:
        if x_out.ndim != 0:
            raise ValueError(
                f"input_gradient: objective=None needs a scalar cost, but {where} has shape "
                f"{x_out.shape}; pass a unit index or a callable objective"
            )
        return float(x_out), None
    if callable(objective):
        J, g = objective(x_out)
        g = check_float("input_gradient", "the objective's gradient", g, x_out.dtype)
        if g.shape != x_out.shape:
            raise ValueError(
                f"input_gradient: the objective returned a gradient of shape {g.shape}, but "
                f"{where} has shape {x_out.shape}"
            )
        return float(J), g
    if x_out.ndim < 2:
        raise ValueError(
            f"input_gradient: a unit objective needs an output of shape (B, ...); {where} has "
            f"shape {x_out.shape}"
        )
    index = _unit_index(objective, x_out, where)
    B = x_out.shape[0]
    g = np.zeros_like(x_out)
    where_unit = (slice(None),) + index
    g[where_unit] = -1.0 / B
    return -float(x_out[where_unit].mean()), g
