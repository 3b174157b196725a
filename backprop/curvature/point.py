"""One operating point of a model, and the curvature products there (forward over reverse).

``Point(model, feed, wrt)`` runs the model's forward pass (or keeps the last one)
and a backward pass that keeps ``g_out`` of every layer. A product then costs two
more walks over the same steps:

1. **tangents, forward**: ``ẋ_out = L^x ẋ_in + Σ L^θ θ̇`` layer by layer, from the
   direction ``v`` given on the parameters (``wrt="params"``) or on the inputs
   (``wrt="inputs"``): each layer's ``_tangent``;
2. **the backward pass, differentiated**: every step of the backward network,
   ``(g_in, dJ/dθ) = backward(g_out)``, moves by ``backward(ġ_out)`` (it is linear in
   ``g``) plus the move of its own weights and gates, which are functions of the
   forward pass: the layer's ``_hvp``, the Hessian of ``<g_out, f>`` times
   ``(ẋ_in, θ̇)``. The seed ``dJ/dJ = 1`` does not move.

What reaches the parameters is ``H v`` (and what reaches the inputs, the mixed
derivatives). Keeping only the losses' ``_hvp`` gives the generalized Gauss–Newton
``Jᵀ H_loss J v``: the tangent ``J v`` is pushed to the loss, multiplied by the
loss's Hessian there and pulled back through the frozen Jacobians.

Directions and products are mappings: ``{Parameter: array}`` for the parameters,
``{input name: array}`` for the inputs; ``Space`` turns them into flat vectors (in
``model.parameters()`` order, or the inputs' declaration order) and back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from backprop.curvature.walk import Flat, Step, flatten, hvp_of, push
from backprop.graph import Graph
from backprop.layer import Loss, Parameter

__all__ = ["WRT", "Point", "Space", "direction", "feed", "give", "space_before", "take"]

WRT = ("params", "inputs")


def feed(where: str, model: Any, inputs: tuple[Any, ...], named: dict[str, Any]) -> dict:
    """A model's inputs by name: one mapping, or positionally in declaration order (a
    chain's ``x``, then its targets), updated by the ones given by name."""
    if not isinstance(model, Graph):
        raise TypeError(f"{where}: expected a Sequential or a Graph, got {type(model).__name__}")
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        given = dict(inputs[0])
    else:
        names = model.input_names()
        if len(inputs) > len(names):
            raise TypeError(
                f"{where}: the model takes {len(names)} input(s) ({', '.join(names)}), "
                f"got {len(inputs)}"
            )
        given = dict(zip(names, inputs, strict=False))
    given.update(named)
    return given


def direction(where: str, v: Any, space: Space, wrt: str) -> dict[Any, np.ndarray]:
    """``v`` (a mapping, or a flat vector) as ``{key: array}`` in ``space``, each array
    of its key's shape and dtype (absent keys: zero), or an error saying what is wrong."""
    if isinstance(v, np.ndarray):
        if v.shape != (space.size,):
            raise ValueError(f"{where}: a flat v must have shape ({space.size},), got {v.shape}")
        return space.unflat(v)
    if not isinstance(v, Mapping):
        what = "{Parameter: array}" if wrt == "params" else "{input name: array}"
        raise TypeError(f"{where}: v must be a mapping {what}, got {type(v).__name__}")
    index = {k: i for i, k in enumerate(space.keys)}
    out = {}
    for k, value in v.items():
        if k not in index:
            kind = "a parameter of the model" if wrt == "params" else "an input taking a gradient"
            raise ValueError(f"{where}: v has {k!r}, which is not {kind}")
        i = index[k]
        a = np.asarray(value)
        if a.shape != space.shapes[i] or a.dtype.kind not in "fiu":
            raise ValueError(
                f"{where}: v[{k!r}] has shape {a.shape} (dtype {a.dtype}), expected a float "
                f"array of shape {space.shapes[i]}"
            )
        out[k] = a.astype(space.dtypes[i], copy=False)
    return out


def space_before(model: Graph, given: dict, wrt: str) -> Space:
    """The space of directions, read before any forward pass: the parameters, or the float
    inputs given (or, with none given, those of the last forward)."""
    if wrt == "params":
        params = model.parameters()
        return Space(params, [p.shape for p in params], [p.dtype for p in params])
    arrays = {n: np.asarray(given[n]) for n in model.input_names() if n in given}
    if not given:
        arrays = {
            n: np.empty(info.shape or (), info.dtypes[0])
            for n in model.input_names()
            if (info := model.node(n)).dtypes[0] is not None
        }
    floats = [n for n, a in arrays.items() if a.dtype.kind == "f"]
    return Space(floats, [arrays[n].shape for n in floats], [arrays[n].dtype for n in floats])


class Space:
    """The parameters, or the inputs that take a gradient, as one flat vector."""

    def __init__(self, keys: list[Any], shapes: list[tuple[int, ...]], dtypes: list[Any]) -> None:
        self.keys, self.shapes = keys, shapes
        self.dtypes = [np.dtype(d) for d in dtypes]
        self.offsets = [0, *itertools.accumulate(math.prod(s) for s in shapes)]
        self.size = int(self.offsets[-1])

    def flat(self, mapping: Mapping[Any, np.ndarray]) -> np.ndarray:
        """The entries of ``mapping`` one key after the other (zeros where a key is absent)."""
        out = np.zeros(self.size)
        for k, start, stop in zip(self.keys, self.offsets[:-1], self.offsets[1:], strict=True):
            if k in mapping:
                out[start:stop] = np.ravel(mapping[k])
        return out

    def unflat(self, vector: np.ndarray) -> dict[Any, np.ndarray]:
        """A flat vector as ``{key: array}`` in each key's shape and dtype."""
        parts = zip(
            self.keys, self.shapes, self.dtypes, self.offsets[:-1], self.offsets[1:], strict=True
        )
        return {k: np.asarray(vector[a:b], dtype=dt).reshape(shape) for k, shape, dt, a, b in parts}

    def unit(self, j: int) -> dict[Any, np.ndarray]:
        e = np.zeros(self.size)
        e[j] = 1.0
        return self.unflat(e)

    def label(self, j: int) -> str:
        """Entry ``j`` by name: ``0.W[1, 2]``, ``x[0, 3]``."""
        i = int(np.searchsorted(self.offsets, j, side="right")) - 1
        key, shape = self.keys[i], self.shapes[i]
        name = key if isinstance(key, str) else (key.name or "θ")
        idx = np.unravel_index(j - self.offsets[i], shape) if shape else ()
        return name + (f"[{', '.join(map(str, idx))}]" if shape else "")


class Point:
    """``model`` at one operating point, ready for products along parameters or inputs
    (``wrt="both"``: along both at once, through ``product``).

    ``seeds``, one array per output, start the backward pass in place of the scalar
    cost's ``dJ/dJ = 1``: the products are then those of the Hessian of ``Σ <seed,
    output>`` (for a layer's inner graph, that of ``<g_out, f>``).
    """

    def __init__(
        self, model: Graph, given: dict, wrt: str, where: str, seeds: list[Any] | None = None
    ) -> None:
        if wrt not in WRT + ("both",):
            raise ValueError(f"{where}: wrt must be one of {WRT}, got {wrt!r}")
        self.where, self.wrt, self.model = where, wrt, model
        if given:
            model.forward(given)
        else:  # no input given: the last forward's operating point
            model.require_forward(where)
        self.flat: Flat = flatten(model)
        self.params = model.parameters()
        self.param_space = Space(
            self.params, [p.shape for p in self.params], [p.dtype for p in self.params]
        )
        takes = [n for n, (_, _, ok) in self.flat.input_info.items() if ok]
        info = self.flat.input_info
        self.input_space = Space(takes, [info[n][0] for n in takes], [info[n][1] for n in takes])
        self.flows = self._flows()
        self.g_out: dict[str, Any] = {}
        self._backward(seeds)
        self._checked = False

    @property
    def space(self) -> Space:
        """Where the directions live: the parameters or the inputs."""
        return self.input_space if self.wrt == "inputs" else self.param_space

    def _flows(self) -> dict[str, bool]:
        """Which values a direction moves: those fed by a parameter (``wrt`` params) or
        by an input that takes a gradient (``wrt`` inputs)."""
        flows = {k: False for k in self.flat.outputs}
        for name, key in self.flat.inputs.items():
            flows[key] = self.wrt != "params" and self.flat.input_info[name][2]
        params = self.wrt != "inputs"
        for step in self.flat.steps:
            moved = any(flows.get(k, False) for k in step.ins) or (params and bool(step.params))
            for k in step.outs:
                flows[k] = moved
        return flows

    def _seeds(self) -> list[Any]:
        try:
            return self.model.seeds()
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{self.where}: curvature is that of a scalar cost J, a model whose outputs are "
                f"scalars (ending in a loss); {e}"
            ) from None

    def _backward(self, seeds: list[Any] | None) -> None:
        """The backward pass, keeping ``g_out`` of every step a direction moves. A step
        none of whose inputs moves is not run: only its ``g_out`` is needed. It starts
        from ``seeds`` (one per output), or from the model's own (``dJ/dJ = 1``)."""
        if seeds is None:
            seeds = self._seeds()
        G: dict[str, Any] = dict(zip(self.flat.outputs, seeds, strict=True))
        for step in reversed(self.flat.steps):
            g_out = take(G, step)
            if g_out is None or not self.flows[step.outs[0]]:
                continue
            self.g_out[step.name] = g_out
            if any(self.flows.get(k, False) for k in step.ins):
                g_in, _ = step.layer.backward(g_out)
                give(G, step, g_in, self.flows)

    def check_direction(self, v: Any) -> dict[Any, np.ndarray]:
        """``v`` as ``{key: array}`` of the space's shapes and dtypes (absent keys: zero)."""
        return direction(self.where, v, self.space, self.wrt)

    def product(
        self,
        by_param: Mapping[Parameter, np.ndarray],
        by_input: Mapping[str, np.ndarray],
        ggn: bool = False,
    ) -> tuple[dict, dict]:
        """``(H v on the parameters, H v on the inputs)`` (or the GGN's) for a direction
        ``v`` given on the parameters and on the inputs (checked; absent keys are zero)."""
        for step in self.flat.steps:
            if step.layer.operating_point(self.where) is not step.op:
                raise RuntimeError(
                    f"{self.where}: node {step.name!r} ({step.layer!r}) was run again since this "
                    f"operating point was taken; its products would mix two points"
                )
            if not ggn and not self._checked and self.flows[step.outs[0]]:
                hvp_of(step.layer)
        self._checked = self._checked or not ggn
        seen = self._tangents(by_input, by_param)
        return self._reverse(seen, by_param, ggn)

    def apply(self, v: Any, ggn: bool = False) -> dict[Any, np.ndarray]:
        """``H v`` (or ``G v``) in the space of ``wrt``, for ``v`` in that space."""
        v = self.check_direction(v)
        on_params, on_inputs = (v, {}) if self.wrt == "params" else ({}, v)
        params, inputs = self.product(on_params, on_inputs, ggn)
        return params if self.wrt == "params" else inputs

    def matvec(self, ggn: bool = False) -> Any:
        """``H v`` (or ``G v``) as a function of flat float64 vectors."""
        space = self.space

        def mv(x: np.ndarray) -> np.ndarray:
            return space.flat(self.apply(space.unflat(np.ravel(x)), ggn))

        return mv

    def _tangents(self, by_input: Mapping, by_param: Mapping) -> dict[str, Any]:
        """The forward walk: each step's tangent ``(ẋ_in, θ̇)``, by step name."""
        T: dict[str, Any] = {self.flat.inputs[n]: d for n, d in by_input.items()}
        return push(self.flat.steps, T, by_param, lambda step: self.flows[step.outs[0]])

    def _reverse(self, seen: dict[str, Any], by_param: Mapping, ggn: bool) -> tuple[dict, dict]:
        """The backward walk, differentiated: ``ġ`` of every value, ``H v`` at the leaves."""
        D: dict[str, Any] = {}
        Hv: dict[Parameter, np.ndarray] = {}
        for step in reversed(self.flat.steps):
            g_out = self.g_out.get(step.name)
            if g_out is None:
                continue
            layer, (dx, dtheta) = step.layer, seen[step.name]
            need = any(self.flows.get(k, False) for k in step.ins)
            dg_in: Any = None
            dgrads: dict[str, np.ndarray] = {}
            dg_out = take(D, step, zeros=True)
            if dg_out is not None:  # backward is linear in g: backward(ġ_out)
                dg_in, dgrads = layer.backward(dg_out, input_grad=need)
            moved = any(d is not None for d in dx) or dtheta
            if moved and (not ggn or isinstance(layer, Loss)):
                second = hvp_of(layer)(
                    step.op, g_out, dx, dtheta, need
                )  # the backward weights move
                if second is not None:
                    dg_in, dgrads = _plus(step, dg_in, dgrads, second)
            give(D, step, dg_in, self.flows)
            for name, p in step.params:
                if name in dgrads:
                    Hv[p] = dgrads[name] + Hv[p] if p in Hv else dgrads[name]
        params = {p: Hv.get(p, np.zeros(p.shape, p.dtype)) for p in self.params}
        inputs = {}
        for n in self.input_space.keys:
            shape, dtype, _ = self.flat.input_info[n]
            d = D.get(self.flat.inputs[n])
            inputs[n] = np.zeros(shape, dtype) if d is None else d
        return params, inputs


def take(G: dict[str, Any], step: Step, zeros: bool = False) -> Any:
    """``g_out`` of ``step`` from ``G`` (popped): an array, a tuple for several outputs
    (zeros for an output no gradient reached, with ``zeros``), or None if none did."""
    if len(step.outs) == 1:
        return G.pop(step.outs[0], None)
    gs = [G.pop(k, None) for k in step.outs]
    if all(g is None for g in gs):
        return None
    if zeros:
        x_out = step.op.x_out
        gs = [np.zeros_like(x) if g is None else g for g, x in zip(gs, x_out, strict=True)]
    return tuple(gs)


def give(G: dict[str, Any], step: Step, g_in: Any, flows: dict[str, bool]) -> None:
    """Add ``g_in`` of ``step`` to its inputs' entries of ``G`` (where a direction flows)."""
    if g_in is None:
        return
    parts = g_in if isinstance(g_in, tuple) else (g_in,)
    for k, g in zip(step.ins, parts, strict=True):
        if g is not None and flows.get(k, False):
            G[k] = g + G[k] if k in G else g


def _plus(step: Step, g_in: Any, grads: dict, second: tuple[Any, dict]) -> tuple[Any, dict]:
    """``backward(ġ_out)`` plus the second-order term ``(h_in, h_theta)``."""
    h_in, h_theta = second
    n = len(step.ins)
    ins = g_in if isinstance(g_in, tuple) else ((g_in,) if n == 1 else (None,) * n)
    summed = tuple(
        h if g is None else (g if h is None else g + h) for g, h in zip(ins, h_in, strict=True)
    )
    total = dict(grads)
    for name, h in h_theta.items():
        total[name] = total[name] + h if name in total else h
    return summed, total
