"""``Sequential``: a chain of layers, the DAG that Algorithm 14.1 runs on."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from backprop.graph import run
from backprop.graph.chain import Jacobians
from backprop.graph.graph import Graph
from backprop.layer import Layer, Loss

__all__ = ["Sequential"]


class Sequential(Graph):
    """A chain ``f_L ∘ ... ∘ f_1`` run by Algorithm 14.1: a ``Graph`` whose nodes
    form a chain, named by their position (``"0"``, ``"1"``, ...; so the
    parameters are ``"0.W"``, ``"2.b"``).

    ``forward(x_0)`` is the forward loop (lines 4–6). When the last layer is a
    loss, ``forward(x_0, y)`` hands it the target and returns the cost ``J``.
    ``backward(g_L)`` is the backward loop (lines 8–13) and returns the same
    ``Gradients`` as any Graph, which unpacks as ``g_0, grads``: the gradient of
    the input and ``{Parameter: dJ/dθ}`` (tied Parameters summed, eq. 14.47).
    Gradients are returned, never accumulated: there is nothing to zero between
    steps.

    ``backward(..., mode="explicit")`` runs the algorithm literally: at each
    layer it builds ``L_l`` as ``scipy.sparse`` matrices and multiplies
    ``g_{l-1} = g_l L^x_l`` and ``∂J/∂θ_l = g_l L^θ_l``.
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        super().__init__()
        self.layers: list[Layer] = list(layers)
        _check_chain(self.layers)
        last = self.layers[-1]
        h = self.input("x")
        taken = {"x"}
        targets = []
        for label in last.inputs[1:]:
            name = re.sub(r"\W", "_", label).strip("_") or "target"
            while name in taken:
                name += "_"
            taken.add(name)
            targets.append(self.input(name))
        for i, layer in enumerate(self.layers[:-1]):
            h = self.add(layer, h, name=str(i))
        out = self.add(last, h, *targets, name=str(len(self.layers) - 1))
        if isinstance(out, tuple):
            self.output(*out)
        else:  # the cost J, or the last activation x_L
            self.output(out, names=["J" if isinstance(last, Loss) else "x_L"])

    # -- Algorithm 14.1 ---------------------------------------------------------
    def forward(self, x: Any, *targets: Any, cache: bool = True) -> Any:  # type: ignore[override]
        """Forward pass: ``x_l = f_l(x_{l-1}, θ_l)`` for ``l = 1..L``.

        ``targets`` are the last layer's other inputs (a loss's ``y``). As for
        any model, the inputs may also be given by name, ``forward({"x": X})``.
        ``cache=False`` keeps no operating point in any layer (inference only).
        """
        if type(x) is not np.ndarray and isinstance(x, Mapping):  # inputs by name
            if targets:
                raise TypeError("Sequential.forward: give the inputs by name or in order, not both")
            return super().forward(x, cache=cache)
        names = self._input_list
        if len(targets) != len(names) - 1:
            last = self.layers[-1]
            need = ", ".join(last.inputs[1:]) or "nothing"
            raise TypeError(
                f"Sequential.forward: the last layer {last!r} takes {need} after x; "
                f"got {len(targets)} extra argument(s)"
            )
        if cache and self._chain is not None:  # the plain loop; a nested Graph takes the walk
            return run.forward_chain(self, x, targets)
        # The names are the chain's own, in order: nothing for Graph.forward to check.
        out = run.forward(self, dict(zip(names, (x, *targets), strict=True)), cache)
        return out if len(out) > 1 else out[0]

    def backward(
        self,
        g_L: Any = None,
        *,
        mode: str = "fast",
        input_grad: bool = True,
        per_example: bool = False,
    ) -> run.Gradients:
        """Backward pass: ``g_{l-1} = g_l L^x_l`` and ``∂J/∂θ_l = g_l L^θ_l``.

        ``g_L`` is ``∂J/∂x_L`` (omit it when the last layer is a loss).
        ``input_grad=False`` skips ``g_0`` and so the first layer's input product.
        ``per_example=True`` returns each parameter's gradient as ``B`` terms
        (see ``Graph.backward``).
        """
        if g_L is None and self._state == "cached":
            shape = self._values[self._output_slots[0]].shape
            if shape != ():
                raise TypeError(
                    f"Sequential.backward needs g_L = dJ/dx_L, shape {shape}: the last layer "
                    f"{self.layers[-1]!r} is not a loss"
                )
        return Graph.backward(self, g_L, mode=mode, per_example=per_example, input_grad=input_grad)

    def jacobians(self, output: str | None = None, *, order: str = "auto") -> Jacobians:
        """``∂x_L/∂x_0`` and ``{θ: ∂x_L/∂θ}`` chained from the layers' Jacobians (eq. 14.2).

        Unpacks as ``L_x, L_theta``. ``order`` is as for ``Graph.jacobians``:
        ``"reverse"`` from the output side, so each suffix product is shared by
        all the layers below it (the reuse of chapter 14.2); ``"forward"`` from
        the input side; ``"auto"`` picks by the sizes.
        """
        return super().jacobians(output, order=order)

    # -- a list of layers ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, i: int | str) -> Any:
        if isinstance(i, str):
            return super().__getitem__(i)
        return self.layers[i]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The names of ``forward``'s arguments: ``x``, then the last layer's targets."""
        return tuple(self.input_names())

    def _where(self, i: int) -> str:
        node = self._nodes[i]
        return f"Sequential layer {node.name} ({node.layer!r})"

    def __str__(self) -> str:
        return repr(self)  # the chain, one layer a line; summary() gives the node table

    def __repr__(self) -> str:
        lines = ["Sequential("]
        for i, layer in enumerate(self.layers):
            n = sum(p.size for p in layer.params.values())
            lines.append(f"  ({i}) {layer!r}" + (f"  [{n} parameters]" if n else ""))
        total = sum(p.size for p in self.parameters())
        lines.append(f")  {total} parameters")
        return "\n".join(lines)


def _check_chain(layers: list[Layer]) -> None:
    """Every item a Layer, once; every layer but the last takes one input and gives one."""
    if not layers:
        raise ValueError("Sequential needs at least one layer")
    seen: set[int] = set()
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a Layer")
        if id(layer) in seen:
            raise ValueError(
                f"Sequential: layer {i} ({layer!r}) is already in the chain; a layer instance "
                f"is one node. To share weights, build a second layer with the same "
                f"Parameters, e.g. Linear(n_in, n_out, W=first.W, b=first.b)"
            )
        seen.add(id(layer))
        if i == len(layers) - 1:
            continue
        if isinstance(layer, Loss) or len(layer.inputs) != 1:
            raise ValueError(
                f"Sequential: layer {i} ({layer!r}) takes {len(layer.inputs)} inputs; only the "
                f"last layer of a chain may take more (a loss and its target)"
            )
        if layer.n_outputs != 1 or layer.returns_tuple:
            raise ValueError(
                f"Sequential: layer {i} ({layer!r}) has {layer.n_outputs} outputs, but each "
                f"layer of a chain takes one input; fan-out needs a Graph (g.add(layer, x) "
                f"uses a value twice)"
            )
