"""The forward-backward network (chapter 14.6.5): the backward pass as a ``Graph``.

``backward_graph(model)`` reads a ``Graph`` or ``Sequential`` at the operating
point of its last ``forward`` and builds a new, ordinary ``Graph`` that computes
the backward pass with the library's own layers. Every step multiplies ``g`` by
a Jacobian frozen at the forward pass, so the backward network is linear in its
input, the seed; the forward activations are its constants (the forward network
is a hypernetwork of the backward one, as the chapter puts it).

How each forward step becomes a backward layer, read off its Jacobian ``L``:

===============================  ==================================================
forward step (``L``)              backward layer
===============================  ==================================================
``Linear`` (``L^x = W``)          ``Linear(n_out, n_in, bias=False, W=Parameter(Wᵀ))``
                                  (eq. 14.36); any other ``L`` shared by the batch
                                  between flat vectors likewise
pointwise, ``Multiply``, fixed    ``Gate(d)``, ``g ↦ g * d`` with ``d = h'(x_in)`` from
``Scale`` (``L`` diagonal)        the forward activations (eq. 14.33)
``Branch``                        ``Add``: the copies' gradients add (eq. 14.46)
``Merge`` (selection)             ``Slice`` of ``g_out`` per input (eq. 14.41)
``Add``, ``Shift`` (``L = I``)    nothing: ``g`` passes through
``Reshape``/``Flatten``           ``Reshape`` back to the input's shape
a loss                            ``VJP(row)``: the seed times ``2(ŷ - y)/B`` (or
                                  ``(softmax - onehot)/B``)
anything else                     ``VJP(L)``, ``g ↦ g L`` with the frozen Jacobian
``W`` of a ``Linear`` (Kronecker)  ``WeightGrad(x_in)``: ``dJ/dW = g_outᵀ x_in``
``b`` (``L^b = I``)               ``BatchSum()``: ``dJ/db = Σ_b g_out,b``
any other parameter               ``VJP(L^θ, θ.shape, sum_batch=True)``
===============================  ==================================================

A Parameter used by several layers gets one gradient node per use, added up
(eq. 14.47).
"""

from __future__ import annotations

import re
from typing import Any, cast

import numpy as np

from backprop.graph import Graph, Handle, Sequential
from backprop.jacobian import Dense, Diagonal, Identity, Jacobian, Kronecker, Selection
from backprop.layer import Layer, Loss, Parameter
from backprop.layers.backward import VJP, BatchSum, Gate, Slice, WeightGrad
from backprop.layers.linear import Linear
from backprop.layers.structure import Add, Branch, Reshape

__all__ = ["backward_graph"]


def backward_graph(model: Graph | Sequential) -> Graph:
    """The backward pass of ``model`` at its last ``forward``, as a new ``Graph``.

    ``model`` is a ``Graph`` or a ``Sequential`` on which ``forward`` ran (with
    caching). The result is an ordinary ``Graph`` (print it with ``summary()``,
    draw it, gradcheck it) with:

    - **inputs**, the seeds: ``g_<output>`` for each output of a Graph
      (``":"`` in a name becomes ``"_"``), in ``output()`` order; for a
      Sequential, ``g_J`` when its last layer is a loss and ``g_L`` otherwise.
      A seed has the output's shape, except for a scalar cost ``J``, whose seed
      is an array of shape ``(B, 1)``: one ``dJ/dJ`` per example, all ones to
      reproduce ``backward()`` (a network's inputs carry a batch axis).
    - **outputs**: ``g_<input>`` for every input that ``backward`` gives a
      gradient (for a Sequential, ``g_x``), then ``dJ/d<name>`` for every
      Parameter, named as in ``model.named_parameters()``, each in the
      parameter's shape (summed over the batch, as ``backward`` returns it).

    ``backward_graph(model).forward(g_J=np.ones((B, 1)))`` returns, in that
    order, the same arrays as ``model.backward()`` (to rounding). The backward
    network holds copies of what it needs (``Wᵀ``, ``h'(x_in)``, ``x_in``), so a
    later ``forward`` of ``model`` does not change it.
    """
    if isinstance(model, Sequential):
        return _Builder(model.named_parameters()).sequential(model)
    if isinstance(model, Graph):
        return _Builder(model.named_parameters()).graph(model)
    raise TypeError(f"backward_graph: expected a Graph or a Sequential, got {type(model).__name__}")


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _entries(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


class _Builder:
    """Walks a forward network in reverse order, adding one backward layer per step."""

    def __init__(self, named: dict[str, Parameter]) -> None:
        self.g = Graph()
        self.param_names = {p: name for name, p in named.items()}
        self.param_grads: dict[Parameter, list[Handle]] = {p: [] for p in named.values()}
        self.uses: dict[Parameter, int] = dict.fromkeys(named.values(), 0)
        self.seeds: list[tuple[Handle, tuple[int, ...], np.dtype[Any]]] = []

    # -- the two kinds of model ---------------------------------------------------------
    def graph(self, model: Graph) -> Graph:
        model._require_outputs("backward_graph")
        model._require_cached("backward_graph")
        self._count_uses(model)
        handles: list[Handle | None] = []
        for name, src in zip(model.output_names(), cast(list, model._outputs), strict=True):
            handles.append(self._seed(f"g_{_identifier(name)}", model, src))
        grads = self._graph_back(model, handles, "", top=True)
        order = [n for n in model.input_names() if n in grads]
        outputs = [self._named(grads[n], f"g_{n}", model, n) for n in order]
        return self._finish(outputs)

    def sequential(self, model: Sequential) -> Graph:
        for i, layer in enumerate(model.layers):
            layer._operating_point(f"backward_graph (layer {i} of the Sequential)")
        for layer in model.layers:
            self._count_layer(layer)
        last = model.layers[-1]
        x_out = cast(Any, last._op).x_out
        name = "g_J" if isinstance(last, Loss) else "g_L"
        B = cast(Any, last._op).x_in[0].shape[0]
        g: Handle | None = self._add_seed(name, x_out.shape, x_out.dtype, B)
        x = cast(Any, model.layers[0]._op).x_in[0]
        for idx in range(len(model.layers) - 1, -1, -1):
            layer = model.layers[idx]
            label = f"{type(layer).__name__.lower()}_{idx}"
            names: list[str | None] = ["g_x"] if idx == 0 else [None]
            back = self._layer_back(layer, [g], label, names, [True])  # targets: no gradient
            g = back[0]
        if g is None:
            g = self._zeros(x.shape[1:], "g_x", batch_sum=False)
        return self._finish([self._rename(g, "g_x", x.shape[1:])])

    # -- seeds and outputs ------------------------------------------------------------------
    def _seed(self, name: str, model: Graph, src: tuple[int, int]) -> Handle:
        return self._add_seed(name, model._shapes[src], model._dtypes[src], model._batch_size())

    def _add_seed(self, name: str, shape: tuple[int, ...], dtype: Any, B: int) -> Handle:
        h = self.g.input(name)
        self.seeds.append((h, (B, 1) if shape == () else shape, np.dtype(dtype)))
        return h

    def _named(self, h: Handle | None, name: str, model: Graph, input_name: str) -> Handle:
        shape = model._shapes[(model._names[input_name], 0)][1:]
        if h is None:
            return self._zeros(shape, name, batch_sum=False)
        return self._rename(h, name, shape)

    def _rename(self, h: Handle, name: str, shape: tuple[int, ...]) -> Handle:
        """``h`` itself if it has that name, else an identity ``Reshape`` node of that name."""
        if h.name == name:
            return h
        return cast(Handle, self.g.add(Reshape(*shape), h, name=name))

    def _zeros(self, shape: tuple[int, ...], name: str, *, batch_sum: bool) -> Handle:
        """A gradient no path reaches: the first seed times a zero Jacobian."""
        h, seed_shape, dtype = self.seeds[0]
        B = seed_shape[0]
        L = Dense(np.zeros((_entries(seed_shape[1:]), _entries(shape)), dtype), "0", batch=B)
        return cast(Handle, self.g.add(VJP(L, shape, sum_batch=batch_sum, label="0"), h, name=name))

    def _finish(self, outputs: list[Handle]) -> Graph:
        for p, handles in self.param_grads.items():
            name = f"dJ/d{self.param_names[p]}"
            if not handles:
                outputs.append(self._zeros(p.shape, name, batch_sum=True))
                continue
            if len(handles) == 1:
                outputs.append(handles[0])
                continue
            total = handles[0]  # per-example terms of each use: add them, then sum the batch
            for k, h in enumerate(handles[1:], start=1):
                total = self.g.add(Add(), total, h, name=f"{name}_uses{k + 1}")
            outputs.append(cast(Handle, self.g.add(BatchSum(), total, name=name)))
        self.g.output(*outputs)
        return self.g

    # -- parameter uses (a tied Parameter gets one gradient node per use) -------------------
    def _count_uses(self, model: Graph) -> None:
        for node in model._nodes:
            layer = node.layer
            if isinstance(layer, Graph):
                self._count_uses(layer)
            elif isinstance(layer, Sequential):
                for leaf in layer.layers:
                    self._count_layer(leaf)
            elif isinstance(layer, Layer):
                self._count_layer(layer)

    def _count_layer(self, layer: Layer) -> None:
        for p in layer.params.values():
            self.uses[p] = self.uses.get(p, 0) + 1

    # -- the walk -----------------------------------------------------------------------------
    def _graph_back(
        self, model: Graph, seeds: list[Handle | None], prefix: str, top: bool
    ) -> dict[str, Handle | None]:
        """Gradient handles for ``model``'s inputs, given handles for its outputs."""
        G: dict[tuple[int, int], Handle] = {
            src: h
            for src, h in zip(cast(list, model._outputs), seeds, strict=True)
            if h is not None
        }
        grads: dict[str, Handle | None] = {}
        for i in reversed(model._order):
            node = model._nodes[i]
            if not model._needs[i]:
                continue
            if node.kind == "input":
                grads[node.name] = G.pop((i, 0), None)
                continue
            outs = [G.pop((i, k), None) for k in range(node.n_out)]
            if all(h is None for h in outs):
                continue
            names = [
                f"g_{model._nodes[j].name}"
                if top and model._nodes[j].kind == "input" and model._needs[j]
                else None
                for j, _ in node.inputs
            ]
            need = [model._needs[j] for j, _ in node.inputs]
            back = self._node_back(node.layer, outs, prefix + node.name, names, need)
            for src, h in zip(node.inputs, back, strict=True):
                if h is not None:
                    G[src] = h
        return grads

    def _node_back(
        self,
        layer: Any,
        outs: list[Handle | None],
        label: str,
        names: list[str | None],
        need: list[bool],
    ) -> list[Handle | None]:
        if isinstance(layer, Layer):
            return self._layer_back(layer, outs, label, names, need)
        if isinstance(layer, Sequential):
            g = outs[0]
            targets: list[Handle | None] = []
            last = len(layer.layers) - 1
            for idx in range(last, -1, -1):
                leaf = layer.layers[idx]
                leaf_label = f"{label}/{idx}"
                leaf_names: list[str | None] = [names[0]] if idx == 0 else [None]
                leaf_need = [True] if idx > 0 else need[:1]
                if idx == last:
                    leaf_names += names[1:]
                    leaf_need += need[1:]
                back = self._layer_back(leaf, [g], leaf_label, leaf_names, leaf_need)
                if idx == last:
                    targets = back[1:]
                g = back[0]
            return [g, *targets]
        inner: Graph = layer
        grads = self._graph_back(inner, outs, label + "/", top=False)
        return [
            grads.get(n) if ok else None for n, ok in zip(inner.input_names(), need, strict=True)
        ]

    def _layer_back(
        self,
        layer: Layer,
        outs: list[Handle | None],
        label: str,
        names: list[str | None],
        need: list[bool],
    ) -> list[Handle | None]:
        """Backward layers for one forward layer: handles for ``g_in`` of each input.

        ``names[k]`` names the node of input ``k`` (None: ``<label>_back``);
        ``need[k]`` False skips that input (the parameters' nodes are always made).
        """
        n_in = len(layer.inputs)
        names = (names + [None] * n_in)[:n_in]
        need = (need + [False] * n_in)[:n_in]
        op = layer._operating_point("backward_graph")
        if isinstance(layer, Branch):  # the copies' gradients add (eq. 14.46)
            present = [h for h in outs if h is not None]
            if not present or not need[0]:
                return [None]
            total = present[0]
            for k, h in enumerate(present[1:], start=1):
                last = k == len(present) - 1
                name = (names[0] if last else None) or f"{label}_sum{k}"
                total = self.g.add(Add(), total, h, name=name)
            return [total]
        g = outs[0]
        if g is None:
            return [None] * len(layer.inputs)
        L_x, L_theta = layer.jacobians()
        L_xs = L_x if isinstance(L_x, tuple) else (L_x,)
        x_out = op.x_out
        for pname, L in L_theta.items():
            self._param_back(layer.params[pname], L, g, x_out, f"{label}_d{pname}")
        several = len(L_xs) > 1
        back: list[Handle | None] = []
        for k, (L, x) in enumerate(zip(L_xs, op.x_in, strict=True)):
            if L is None or not need[k]:
                back.append(None)
                continue
            name = names[k] or (f"{label}_back{k}" if several else f"{label}_back")
            back.append(self._step(L, g, x, x_out, name))
        return back

    def _step(
        self, L: Jacobian, g: Handle, x_in: np.ndarray, x_out: np.ndarray, name: str
    ) -> Handle:
        """One backward layer ``g ↦ g L`` for input ``x_in`` of a forward step."""
        shape = x_in.shape[1:]
        if isinstance(L, Identity):
            if x_out.shape == x_in.shape:
                return g  # Add, Shift: g passes through
            return cast(Handle, self.g.add(Reshape(*shape), g, name=name))
        if isinstance(L, Diagonal):
            return cast(Handle, self.g.add(Gate(L.d.reshape(x_in.shape), L.label), g, name=name))
        if isinstance(L, Selection):
            slc = Slice(L.offset, L.offset + L.shape[1], shape)
            return cast(Handle, self.g.add(slc, g, name=name))
        if isinstance(L, Dense) and L.shared and x_in.ndim == 2 and x_out.ndim == 2:
            M, N = L.shape
            W = Parameter(np.ascontiguousarray(L.A.T), name=f"({L.label})ᵀ")
            lin = Linear(M, N, bias=False, W=W, dtype=L.dtype)
            return cast(Handle, self.g.add(lin, g, name=name))
        return cast(Handle, self.g.add(VJP(L, shape), g, name=name))

    def _param_back(
        self, p: Parameter, L: Jacobian, g: Handle, x_out: np.ndarray, label: str
    ) -> None:
        """The node computing one use's ``dJ/dθ`` from ``g_out``.

        A Parameter used once gets its gradient directly (summed over the
        batch); one used several times gets per-example terms per use, which
        ``_finish`` adds up and then sums over the batch (eq. 14.47).
        """
        if self.uses.get(p, 0) > 1:
            term = VJP(L, p.shape, label=f"{L.label}, per example")
            self.param_grads[p].append(cast(Handle, self.g.add(term, g, name=label)))
            return
        name = f"dJ/d{self.param_names[p]}"
        if isinstance(L, Kronecker):
            layer: Layer = WeightGrad(L.x)
        elif isinstance(L, Identity) and x_out.shape[1:] == p.shape:
            layer = BatchSum()
        else:
            layer = VJP(L, p.shape, sum_batch=True)
        self.param_grads[p].append(cast(Handle, self.g.add(layer, g, name=name)))
