"""The forward-backward network (chapter 14.6.5): the backward pass as a ``Graph``.

``backward_graph(model)`` reads a model at the operating point of its last
``forward`` and builds a new, ordinary ``Graph`` that computes the backward pass
with the library's own layers. Every step multiplies ``g`` by a Jacobian frozen
at the forward pass, so the backward network is linear in its input, the seed;
the forward activations are its constants (the forward network is a
hypernetwork of the backward one, as the chapter puts it).

Each forward step becomes the backward layer that its Jacobian ``L`` calls for,
looked up by ``L``'s class (``backward_layer``, a table that a new Jacobian
class may extend with ``backward_layer.register``):

===============================  ==================================================
``L`` of the forward step         backward layer
===============================  ==================================================
``Dense`` shared by the batch,    ``Linear(M, N, bias=False, W=Parameter(Lᵀ))``
flat vectors (``L^x = W``)        (eq. 14.36)
``Diagonal`` (pointwise,          ``Gate(d)``, ``g ↦ g * d`` with ``d = h'(x_in)`` from
``Multiply``, a fixed ``Scale``)  the forward activations (eq. 14.33)
``Selection`` (``Merge``)         ``Slice`` of ``g_out`` per input (eq. 14.41)
``Identity`` (``Add``, reshapes)  nothing, or a ``Reshape`` back to the input's shape
anything else (a loss's row)      ``VJP(L)``, ``g ↦ g L`` with the frozen Jacobian
===============================  ==================================================

A layer with several outputs (a ``Branch``) has the Jacobian of its outputs
stacked; output ``k``'s gradient goes through ``Rows_k @ L`` (for a ``Branch``
the identity) and the results add (eq. 14.46). A parameter's gradient node is
``WeightGrad(x_in)`` for ``L^W = I ⊗ x_inᵀ`` (``dJ/dW = g_outᵀ x_in``),
``BatchSum()`` for ``L^b = I`` (``dJ/db = Σ_b g_out,b``), and
``VJP(L^θ, θ.shape, sum_batch=True)`` otherwise. A Parameter used by several
layers gets one gradient node per use, added up (eq. 14.47).
"""

from __future__ import annotations

import functools
from typing import Any, cast

import numpy as np

from backprop.graph import Graph, Handle, NodeInfo
from backprop.graph.chain import output_rows
from backprop.jacobian import Dense, Diagonal, Identity, Jacobian, Kronecker, Selection
from backprop.layer import Layer, Parameter
from backprop.layers.backward import VJP, BatchSum, Gate, Slice, WeightGrad
from backprop.layers.linear import Linear
from backprop.layers.structure import Add, Reshape

__all__ = ["backward_graph", "backward_layer"]


def backward_graph(model: Graph) -> Graph:
    """The backward pass of ``model`` at its last ``forward``, as a new ``Graph``.

    ``model`` is any model (a ``Graph``; a ``Sequential`` is one) on which
    ``forward`` ran with caching. The result is an ordinary ``Graph`` (print it
    with ``summary()``, draw it, gradcheck it) with:

    - **inputs**, the seeds: ``g_<output>`` for each output, in ``output()``
      order (``":"`` in a name becomes ``"_"``; a chain's is ``g_J`` when it
      ends in a loss, else ``g_x_L``). A seed has the output's shape, except
      for a scalar cost ``J``, whose seed is an array of shape ``(B, 1)``: one
      ``dJ/dJ`` per example, all ones to reproduce ``backward()`` (a network's
      inputs carry a batch axis).
    - **outputs**: ``g_<input>`` for every input that ``backward`` gives a
      gradient (a chain's is ``g_x``), then ``dJ/d<name>`` for every Parameter,
      named as in ``model.named_parameters()``, each in the parameter's shape
      (summed over the batch, as ``backward`` returns it).

    ``backward_graph(model).forward(g_J=np.ones((B, 1)))`` returns, in that
    order, the same arrays as ``model.backward()`` (to rounding). The backward
    network holds copies of what it needs (``Wᵀ``, ``h'(x_in)``, ``x_in``), so a
    later ``forward`` of ``model`` does not change it.
    """
    if not isinstance(model, Graph):
        raise TypeError(
            f"backward_graph: expected a Sequential or a Graph, got {type(model).__name__}"
        )
    model.require_forward("backward_graph")
    return _Builder(model).build()


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def _label(info: NodeInfo) -> str:
    """A node's name in the backward network's node names: a chain's node, named by
    its position alone (``"4"``), gets its layer's kind in front (``"linear_4"``)."""
    if info.name.isdigit():
        return f"{type(info.layer).__name__.lower()}_{info.name}"
    return info.name


def _entries(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


class _Builder:
    """Walks a forward model in reverse order, adding one backward layer per step."""

    def __init__(self, model: Graph) -> None:
        self.model = model
        self.g = Graph()
        named = model.named_parameters()
        self.param_names = {p: name for name, p in named.items()}
        self.param_grads: dict[Parameter, list[Handle]] = {p: [] for p in named.values()}
        self.uses: dict[Parameter, int] = dict.fromkeys(named.values(), 0)
        self._count_uses(model)
        self.seeds: list[tuple[Handle, tuple[int, ...], np.dtype[Any]]] = []

    def build(self) -> Graph:
        model, B = self.model, self.model.batch_size
        handles: list[Handle | None] = []
        for name, value in zip(model.output_names(), model.output_values(), strict=True):
            info = model.node(value)
            k = info.outputs.index(value)
            shape, dtype = cast(tuple, info.shapes[k]), info.dtypes[k]
            h = self.g.input(f"g_{_identifier(name)}")
            self.seeds.append((h, (B, 1) if shape == () else shape, np.dtype(dtype)))
            handles.append(h)
        grads = self._graph_back(model, handles, "", top=True)
        outputs = []
        for info in model.nodes():
            if info.kind == "input" and info.name in grads:
                shape = cast(tuple, info.shape)[1:]
                g_in = grads[info.name]
                name = f"g_{info.name}"
                outputs.append(
                    self._zeros(shape, name, False)
                    if g_in is None
                    else self._rename(g_in, name, shape)
                )
        return self._finish(outputs)

    # -- outputs -------------------------------------------------------------------------
    def _rename(self, h: Handle, name: str, shape: tuple[int, ...]) -> Handle:
        """``h`` itself if it has that name, else an identity ``Reshape`` node of that name."""
        if h.name == name:
            return h
        return cast(Handle, self.g.add(Reshape(*shape), h, name=name))

    def _zeros(self, shape: tuple[int, ...], name: str, batch_sum: bool) -> Handle:
        """A gradient no path reaches: the first seed times a zero Jacobian."""
        h, seed_shape, dtype = self.seeds[0]
        B = seed_shape[0]
        L = Dense(np.zeros((_entries(seed_shape[1:]), _entries(shape)), dtype), "0", batch=B)
        return cast(Handle, self.g.add(VJP(L, shape, sum_batch=batch_sum, label="0"), h, name=name))

    def _finish(self, outputs: list[Handle]) -> Graph:
        for p, handles in self.param_grads.items():
            name = f"dJ/d{self.param_names[p]}"
            if not handles:
                outputs.append(self._zeros(p.shape, name, True))
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

    def _count_uses(self, model: Graph) -> None:
        """How many layers use each Parameter (a tied one gets a gradient node per use)."""
        for info in model.nodes():
            if isinstance(info.layer, Layer):
                for p in info.layer.params.values():
                    self.uses[p] = self.uses.get(p, 0) + 1
            elif info.layer is not None:
                self._count_uses(info.layer)

    # -- the walk -----------------------------------------------------------------------------
    def _graph_back(
        self, model: Graph, seeds: list[Handle | None], prefix: str, top: bool
    ) -> dict[str, Handle | None]:
        """Gradient handles for ``model``'s inputs, given handles for its outputs."""
        G = {v: h for v, h in zip(model.output_values(), seeds, strict=True) if h is not None}
        infos = model.nodes()
        inputs = {i.name for i in infos if i.kind == "input" and i.requires_grad}
        grads: dict[str, Handle | None] = {}
        for info in reversed(infos):
            if not info.requires_grad:
                continue
            if info.kind == "input":
                grads[info.name] = G.pop(info.name, None)
                continue
            outs = [G.pop(v, None) for v in info.outputs]
            if all(h is None for h in outs):
                continue
            names = [f"g_{v}" if top and v in inputs else None for v in info.inputs]
            need = [v in inputs or model.node(v).requires_grad for v in info.inputs]
            back = self._node_back(info, outs, prefix + _label(info), names, need)
            for v, h in zip(info.inputs, back, strict=True):
                if h is not None:
                    G[v] = h
        return grads

    def _node_back(
        self,
        info: NodeInfo,
        outs: list[Handle | None],
        label: str,
        names: list[str | None],
        need: list[bool],
    ) -> list[Handle | None]:
        if isinstance(info.layer, Layer):
            return self._layer_back(info.layer, outs, label, names, need)
        inner: Graph = info.layer
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
        op = layer.operating_point("backward_graph")
        if all(h is None for h in outs):
            return [None] * len(layer.inputs)
        L_x, L_theta = layer.jacobians()
        L_xs = L_x if isinstance(L_x, tuple) else (L_x,)
        x_out = op.x_out
        for pname, L in L_theta.items():
            self._param_back(layer, layer.params[pname], L, outs, f"{label}_d{pname}")
        several = len(L_xs) > 1
        back: list[Handle | None] = []
        for k, (L, x) in enumerate(zip(L_xs, op.x_in, strict=True)):
            if L is None or not need[k]:
                back.append(None)
                continue
            name = names[k] or (f"{label}_back{k}" if several else f"{label}_back")
            back.append(self._pull(layer, L, outs, x, x_out, name))
        return back

    def _pull(
        self,
        layer: Layer,
        L: Jacobian,
        outs: list[Handle | None],
        x_in: np.ndarray,
        x_out: Any,
        name: str,
    ) -> Handle | None:
        """``Σ_k g_k (Rows_k L)``: one backward step per output, added (eq. 14.46)."""
        if layer.n_outputs == 1:
            return self._step(L, cast(Handle, outs[0]), x_in, x_out, name)
        parts = output_rows(layer, L)
        steps: list[Handle] = [
            self._step(part, h, x_in, x_out[k], f"{name}_out{k}")
            for k, (part, h) in enumerate(zip(parts, outs, strict=True))
            if h is not None
        ]
        total = steps[0]
        for k, h in enumerate(steps[1:], start=1):
            last = k == len(steps) - 1
            total = self.g.add(Add(), total, h, name=name if last else f"{name}_sum{k}")
        return total

    def _step(
        self, L: Jacobian, g: Handle, x_in: np.ndarray, x_out: np.ndarray, name: str
    ) -> Handle:
        """One backward layer ``g ↦ g L`` for input ``x_in`` of a forward step."""
        layer = backward_layer(L, x_in.shape, x_out.shape)
        if layer is None:
            return g  # L = I between equal shapes: g passes through
        return cast(Handle, self.g.add(layer, g, name=name))

    def _param_back(
        self,
        layer: Layer,
        p: Parameter,
        L: Jacobian,
        outs: list[Handle | None],
        label: str,
    ) -> None:
        """The node computing one use's ``dJ/dθ`` from ``g_out``.

        A Parameter used once gets its gradient directly (summed over the
        batch); one used several times gets per-example terms per use, which
        ``_finish`` adds up and then sums over the batch (eq. 14.47).
        """
        g = cast(Handle, outs[0])  # layers with parameters have one output
        x_out = cast(np.ndarray, layer.operating_point("backward_graph").x_out)
        if self.uses.get(p, 0) > 1:
            term = VJP(L, p.shape, label=f"{L.label}, per example")
            self.param_grads[p].append(cast(Handle, self.g.add(term, g, name=label)))
            return
        name = f"dJ/d{self.param_names[p]}"
        grad: Layer
        if isinstance(L, Kronecker):
            grad = WeightGrad(L.x)
        elif isinstance(L, Identity) and x_out.shape[1:] == p.shape:
            grad = BatchSum()
        else:
            grad = VJP(L, p.shape, sum_batch=True)
        self.param_grads[p].append(cast(Handle, self.g.add(grad, g, name=name)))


# -- the table: which backward layer a Jacobian calls for ---------------------------------


@functools.singledispatch
def backward_layer(L: Jacobian, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Any:
    """The backward layer ``g ↦ g L`` for a forward step ``in_shape → out_shape``.

    ``None`` means ``g`` passes through unchanged. Any Jacobian has one:
    ``VJP(L)`` with the frozen matrix. A Jacobian class with a plainer layer
    registers it: ``@backward_layer.register(MyJacobian)``.
    """
    return VJP(L, in_shape[1:])


@backward_layer.register
def _(L: Identity, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Layer | None:
    return None if in_shape == out_shape else Reshape(*in_shape[1:])


@backward_layer.register
def _(L: Diagonal, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Layer:
    return Gate(L.d.reshape(in_shape), L.label)


@backward_layer.register
def _(L: Selection, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Layer:
    return Slice(L.offset, L.offset + L.shape[1], in_shape[1:])


@backward_layer.register
def _(L: Dense, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Layer:
    if not (L.shared and len(in_shape) == 2 and len(out_shape) == 2):
        return VJP(L, in_shape[1:])
    M, N = L.shape
    W = Parameter(np.ascontiguousarray(L.A.T), name=f"({L.label})ᵀ")
    return Linear(M, N, bias=False, W=W, dtype=L.dtype)
