"""Running a ``Graph``: the forward pass, and the backward pass three ways.

``forward`` evaluates the nodes in topological order (Algorithm 14.1, lines
4–6, over a DAG); ``backward`` visits them in reverse order (lines 8–13),
handing each node the gradients of its outputs and collecting those of its
inputs and parameters. Fan-out never needs special care here: a value read
twice goes through a fan-out layer, whose own backward adds (eq. 14.46).

One node's backward step comes in three kinds that must agree: the layer's
fast ``backward``; the literal algorithm, ``g_in = g_out L^x`` and
``dJ/dθ = g_out L^θ`` with each Jacobian as a ``scipy.sparse`` matrix; and the
fast step with each parameter gradient kept as ``B`` per-example terms.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from numpy import ndarray  # by its plain name on the hot paths: see backprop.layer

from backprop.graph import state
from backprop.jacobian import explicit_vjp
from backprop.layer import FLOAT_DTYPES, Layer, Parameter, check_float

if TYPE_CHECKING:
    from backprop.graph.graph import Graph

__all__ = ["MODES", "Gradients"]

MODES = ("fast", "explicit")

_forward_ids = itertools.count(1)

#: ``dJ/dJ = 1`` in each float dtype, read-only: the seed of a scalar cost.
_ONE = {dtype: np.ones((), dtype=dtype) for dtype in FLOAT_DTYPES}
for _one in _ONE.values():
    _one.setflags(write=False)


class InputsAndParams:
    """What ``Gradients`` and ``Jacobians`` share: one entry per input that gets a
    gradient (``inputs``) and per Parameter (``params``).

    ``result[name]`` and ``result[p]`` index them; the result unpacks as Algorithm
    14.1's pair ``(the first input's entry, params)``, so ``g_0, grads =
    net.backward()`` and ``L_x, L_theta = net.jacobians()`` read as in the chapter.
    """

    inputs: dict[str, Any]
    params: dict[Parameter, Any]

    def __getitem__(self, key: str | Parameter | int) -> Any:
        if isinstance(key, Parameter):
            return self.params[key]
        if isinstance(key, int):  # as the pair it unpacks to
            return tuple(self)[key]
        return self.inputs[key]

    def __iter__(self) -> Iterator[Any]:
        return iter((next(iter(self.inputs.values()), None), self.params))


class Gradients(InputsAndParams):
    """What ``backward`` returns, for any model.

    - ``inputs[name]``: ``dJ/dx`` for every float input that gets a gradient,
      in the input's shape (backprop to the data, chapter 14.9);
    - ``params[p]``: ``dJ/dθ`` for every Parameter of the model, in its shape,
      the uses of a tied Parameter summed (eq. 14.47), zeros for a Parameter no
      gradient reaches;
    - ``per_use[p]``: the terms of that sum, a list of ``(node name, gradient)``
      (``"outer/inner"`` for a node inside a nested graph).

    ``grads[name]`` and ``grads[p]`` index ``inputs`` and ``params``. For
    Algorithm 14.1's ``g_0, grads = net.backward()``, it unpacks as the pair
    ``(gradient of the first input, params)``: the first declared input that
    gets a gradient (``None`` when none does).
    """

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        params: dict[Parameter, np.ndarray],
        uses: list[tuple[Parameter, str, np.ndarray]],
    ) -> None:
        self.inputs, self.params = inputs, params
        self._uses = uses  # every (Parameter, node name, term) in the order backward met them
        self._per_use: dict[Parameter, list[tuple[str, np.ndarray]]] | None = None

    @property
    def per_use(self) -> dict[Parameter, list[tuple[str, np.ndarray]]]:
        """``{p: [(node name, term), ...]}`` for every Parameter, built when first read."""
        if self._per_use is None:
            per_use: dict[Parameter, list[tuple[str, np.ndarray]]] = {p: [] for p in self.params}
            for p, name, grad in self._uses:
                per_use[p].append((name, grad))
            self._per_use = per_use
        return self._per_use

    def __repr__(self) -> str:
        ins = ", ".join(f"{k} {v.shape}" for k, v in self.inputs.items())
        return f"Gradients(inputs: {ins or '-'}; {len(self.params)} parameters)"


# -- forward ---------------------------------------------------------------------------


def forward(graph: Graph, given: dict[str, Any], cache: bool) -> tuple[Any, ...]:
    """Evaluate every node in topological order; return the outputs' values.

    Each value has a slot; with ``cache=False`` a value is let go once its one
    consumer has read it (only its shape is kept). A failed node leaves every
    node at its previous operating point.
    """
    if cache and graph._chain is not None:
        chain = graph._chain
        return (forward_chain(graph, given[chain.foot[0]], [given[n] for n, _ in chain.extras]),)
    saved = state.snapshot(graph)
    values: list[Any] = [None] * len(graph._slots)
    meta: list[Any] = [None] * len(graph._slots) if not cache else []
    float_input: dict[int, bool] = {}
    try:
        for i, node, layer, ins, outs, kind in graph._steps:
            if kind == state.SIMPLE:  # most nodes: one value in, one out
                x = values[ins[0]]
                if not cache:
                    meta[ins[0]], values[ins[0]] = (x.shape, x.dtype), None
                try:
                    values[outs[0]] = layer.forward(x, cache=cache)
                except (ValueError, TypeError) as e:
                    _reraise(graph, i, [x], e)
                continue
            if kind == state.INPUT:
                x = values[outs[0]] = _as_array(graph, node.name, given[node.name])
                float_input[i] = x.dtype.kind == "f"
                continue
            args = [values[k] for k in ins]
            if not cache:
                for k in ins:
                    meta[k], values[k] = (values[k].shape, values[k].dtype), None
            out = _run(graph, i, args, cache)
            if node.multi:
                for k, o in zip(outs, out, strict=True):
                    values[k] = o
            else:
                values[outs[0]] = out
    except BaseException:
        state.restore(graph, saved)
        raise
    # Which inputs want a gradient: float data that requires one.
    wanted = tuple([graph._nodes[i].requires_grad and float_input[i] for i in graph._inputs])
    _done(graph, values, meta, wanted, cache)
    return tuple([values[k] for k in graph._output_slots])


def forward_chain(graph: Graph, x: Any, extras: Sequence[Any]) -> Any:
    """``forward`` (cached) of a chain (``graph._chain``; a Sequential): the plain loop
    ``x_l = f_l(x_{l-1}, θ_l)``, one value handed on. ``extras`` are the last layer's
    other inputs (a loss's targets), in order. Returns the one output's value."""
    chain: state.Chain = graph._chain  # type: ignore[assignment]
    values: list[Any] = [None] * len(graph._slots)
    name, slot = chain.foot
    x = values[slot] = x if type(x) is ndarray else _as_array(graph, name, x)
    targets = []
    for (name, slot), t in zip(chain.extras, extras, strict=True):
        t = values[slot] = t if type(t) is ndarray else _as_array(graph, name, t)
        targets.append(t)
    extras = targets
    layers = chain.layers
    before = list(map(state.operating_point, layers))
    try:
        for layer, slot in chain.steps:  # every layer but the last
            x = values[slot] = layer.forward(x)
        out = values[chain.slots[-1]] = layers[-1].forward(x, *extras)
    except BaseException as e:
        k = sum(1 for layer, op in zip(layers, before, strict=True) if layer._op is not op)
        for layer, op in zip(layers, before, strict=True):  # the layers that ran, as they were
            layer._op = op
        if isinstance(e, ValueError | TypeError):  # layer k failed: name it and its inputs
            _reraise(graph, chain.nodes[k], [x, *extras] if k == len(layers) - 1 else [x], e)
        raise
    floats = []  # which inputs want a gradient: float data that requires one
    for requires_grad, slot in chain.inputs:
        floats.append(requires_grad and values[slot].dtype.kind == "f")
    _done(graph, values, [], tuple(floats), True)
    return out


def _done(
    graph: Graph, values: list[Any], meta: list[Any], wanted: tuple[bool, ...], cache: bool
) -> None:
    """Keep what a forward leaves behind (see ``state``)."""
    graph._values, graph._meta, graph._wanted = values, meta, wanted
    graph._needs = state.needs_for(graph, wanted)
    graph._state = "cached" if cache else "uncached"
    graph._forward_id = next(_forward_ids)
    graph._tokens = state.tokens(graph) if cache else []


def _as_array(graph: Graph, name: str, x: Any) -> np.ndarray:
    """Input ``name`` as an array, or an error that names it (a ragged list, say)."""
    if type(x) is ndarray:
        return x
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{graph._kind()}.forward: input {name!r} is not an array: {e}") from None


def evaluate(graph: Graph, value: str, given: Mapping[str, Any]) -> Any:
    """The value named ``value``, from only the nodes it depends on, caching nothing.

    What a model that ends in a loss predicts: ``evaluate(loss's input, x=X)``
    needs no labels. No node's operating point changes.
    """
    base, _, port = value.partition(":")
    if base not in graph._names:
        raise ValueError(f"{graph._kind()}.evaluate: no value named {value!r}")
    target = (graph._names[base], int(port or 0))
    needed, stack = set(), [target[0]]
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(j for j, _ in graph._nodes[i].inputs)
    values: dict[tuple[int, int], Any] = {}
    for i in graph._order:
        if i not in needed:
            continue
        node = graph._nodes[i]
        if node.kind == "input":
            if node.name not in given:
                raise TypeError(f"{graph._kind()}.evaluate: {value!r} needs input {node.name!r}")
            values[(i, 0)] = _as_array(graph, node.name, given[node.name])
            continue
        out = _run(graph, i, [values[src] for src in node.inputs], False)
        for k, o in enumerate(out if node.multi else (out,)):
            values[(i, k)] = o
    return values[target]


def _run(graph: Graph, i: int, args: list[Any], cache: bool) -> Any:
    """Node ``i`` on ``args``; its errors say which node, and the shapes it was given."""
    node = graph._nodes[i]
    layer = node.layer
    try:
        if isinstance(layer, Layer):
            return layer.forward(*args, cache=cache)
        out = forward(layer, dict(zip(layer.input_names(), args, strict=True)), cache)
        return out if node.multi else out[0]
    except (ValueError, TypeError) as e:
        _reraise(graph, i, args, e)


def _reraise(graph: Graph, i: int, args: list[Any], e: Exception) -> NoReturn:
    """Raise ``e`` again, its message led by the node and the shapes it was given."""
    node = graph._nodes[i]
    shapes = ", ".join(
        f"{graph._port_name(src)} {np.shape(a)}" for src, a in zip(node.inputs, args, strict=True)
    )
    try:
        wrapped = type(e)(f"{graph._where(i)} with input(s) {shapes or '-'}: {e}")
    except Exception:  # an exception type that takes other arguments: keep it as it is
        raise e from None
    raise wrapped from e


# -- seeds -------------------------------------------------------------------------------


def seeds(graph: Graph, seed: Any, where: str | None) -> list[np.ndarray | None]:
    """The seeds ``dJ/d(output)`` as ``backward`` takes them, one per output, checked.

    ``None`` for an output that sends no gradient (left out of a dict). ``where``
    leads the errors (``"<kind>.backward"`` when None).
    """
    names = graph._output_names
    n = len(names)
    if seed is None and n == 1:
        cost = graph._values[graph._output_slots[0]]
        if cost is not None and cost.shape == ():
            return [_ONE[cost.dtype]]  # the common case: dJ/dJ = 1
    where = where or f"{graph._kind()}.backward"
    if n == 1 and isinstance(seed, tuple) and len(seed) == 1:
        seed = seed[0]
    if seed is None:
        entries: list[Any] = [None] * n
        present = [True] * n
    elif isinstance(seed, Mapping):
        unknown = [k for k in seed if k not in names]
        if unknown:
            raise ValueError(
                f"{where}: seed for unknown output(s) {', '.join(map(repr, unknown))}; "
                f"the outputs are {', '.join(map(repr, names))}"
            )
        entries = [seed.get(k) for k in names]
        present = [k in seed for k in names]
    elif n > 1:
        if not isinstance(seed, tuple | list) or len(seed) != n:
            raise TypeError(
                f"{where}: the model has {n} outputs ({', '.join(map(repr, names))}); "
                f"give one seed per output as a tuple/list, or a dict by output name"
            )
        entries, present = list(seed), [True] * n
    else:
        entries, present = [seed], [True]
    out: list[np.ndarray | None] = []
    for name, src, s, here in zip(names, graph._outputs, entries, present, strict=True):
        out.append(_seed(graph, where, name, src, s) if here else None)
    return out


def _seed(graph: Graph, where: str, name: str, src: tuple[int, int], s: Any) -> np.ndarray:
    shape, dtype = graph._shape(src), graph._dtype(src)
    if s is None:
        if shape != ():
            raise ValueError(
                f"{where}: output {name!r} has shape {shape}, not a scalar cost; "
                f"pass seed = dJ/d({name}) of that shape (e.g. np.ones({shape}))"
            )
        return np.ones((), dtype)
    if isinstance(s, int | float) and shape == ():  # a Python number takes the output's dtype
        return np.asarray(s, dtype=dtype)
    s = check_float(f"{where}: seed for output {name!r}", "the seed", s, dtype)
    if s.shape != shape:
        raise ValueError(
            f"{where}: the seed for output {name!r} has shape {s.shape}, but the output "
            f"has shape {shape}; the seed is dJ/d({name}), of the output's shape"
        )
    return s.copy()  # the caller may change their array; the gradients must not follow


# -- backward ----------------------------------------------------------------------------


def backward(
    graph: Graph,
    seed_list: list[np.ndarray | None],
    mode: str,
    per_example: bool,
    input_grad: bool,
) -> Gradients:
    """The reverse pass from the outputs' seeds; see ``Graph.backward``."""
    plan = _plan(graph, input_grad)
    fast = mode == "fast" and not per_example
    if fast and plan.chain is not None:
        return _backward_chain(graph, plan, seed_list[0])
    g: list[Any] = [None] * len(graph._slots)  # dJ/d(value), by slot
    for src, s in zip(graph._outputs, seed_list, strict=True):
        g[graph._slots[src]] = s
    uses: list[tuple[Parameter, str, np.ndarray]] = []
    grads_in: dict[str, np.ndarray] = {}
    step = _per_example_step if per_example else _STEPS[mode]
    for i, node, layer, ins, outs, need_in, want, kind in plan:
        if kind == state.SIMPLE:  # most nodes: one gradient in, one out
            g_out = g[outs[0]]
            if g_out is None:
                continue
            if fast:  # g_out is checked already, as in _backward_chain
                g_in, layer_grads = layer._backward_checked(layer._op, g_out, want)
            else:
                g_in, layer_grads = step(layer, g_out, want)
            if type(g_in) is tuple:  # a variadic layer's, or the explicit step's, tuple of one
                g_in = g_in[0]
            if layer_grads:
                params = layer.params
                for pname, grad in layer_grads.items():
                    uses.append((params[pname], node.name, grad))
            if want and g_in is not None:
                g[ins[0]] = g_in
            continue
        if kind == state.INPUT:  # an input: its gradient is complete (chapter 14.9)
            gi = g[outs[0]]
            if gi is None:
                gi = np.zeros(graph._shape((i, 0)), graph._dtype((i, 0)))
            grads_in[node.name] = gi
            continue
        g_outs = [g[k] for k in outs]
        if all(gk is None for gk in g_outs):
            continue
        if kind == state.LAYER:
            g_in, layer_grads = step(layer, tuple(g_outs) if node.multi else g_outs[0], want)
            for pname, grad in layer_grads.items():
                uses.append((layer.params[pname], node.name, grad))
        else:
            g_in = _nested_backward(layer, node.name, g_outs, mode, per_example, uses)
        if type(g_in) is not tuple:  # one input, one gradient
            g_in = (g_in,)
        for k, gi, ni in zip(ins, g_in, need_in, strict=True):
            if ni and gi is not None:
                g[k] = gi
    ordered = {n: grads_in[n] for n in graph._input_list if n in grads_in}
    return Gradients(ordered, _totals(graph, uses, per_example), uses)


def _plan(graph: Graph, input_grad: bool) -> state.Plan:
    """The backward plan for the inputs that want a gradient (none without ``input_grad``)."""
    wanted = graph._wanted if input_grad else (False,) * len(graph._inputs)
    return state.backward_plan(graph, wanted)


def backward_chain_cost(graph: Graph, input_grad: bool) -> Gradients | None:
    """The fast backward of a chain that ends in its cost, from ``dJ/dJ = 1``; None
    when the model is not such a chain (``backward`` then takes the general way)."""
    plan = _plan(graph, input_grad)
    if plan.chain is None:
        return None
    cost = graph._values[graph._output_slots[0]]
    if cost.shape != ():
        return None
    return _backward_chain(graph, plan, _ONE[cost.dtype])


def _backward_chain(graph: Graph, plan: state.Plan, seed: Any) -> Gradients:
    """The fast backward of a chain (``plan.chain``): Algorithm 14.1's loop as the
    chapter writes it, one gradient ``g`` handed from each layer to the one below."""
    uses: list[tuple[Parameter, str, np.ndarray]] = []
    g = seed
    for layer, name, want in plan.chain:  # type: ignore[union-attr]
        # g is the seed, or what the layer above returned for the value the two share:
        # checked already (see Layer._backward_checked). The tokens say _op is current.
        g_in, layer_grads = layer._backward_checked(layer._op, g, want)
        if layer_grads:
            params = layer.params
            for pname, grad in layer_grads.items():
                uses.append((params[pname], name, grad))
        g = g_in[0] if type(g_in) is tuple else g_in
    inputs = {plan.chain_input: g} if plan.chain_input is not None else {}
    return Gradients(inputs, _totals(graph, uses, False), uses)


def _totals(
    graph: Graph, uses: list[tuple[Parameter, str, np.ndarray]], per_example: bool
) -> dict[Parameter, np.ndarray]:
    """Each Parameter's gradient: the sum of its uses (eq. 14.47), zeros if none.

    The terms stay as they are (``per_use`` lists them): a tied Parameter's first
    addition makes one new array, and the later uses are added into it in place.
    """
    total: dict[Parameter, Any] = dict.fromkeys(graph._parameters)
    summed: set[Parameter] = set()  # the Parameters whose total is an array of our own
    reached = 0  # how many Parameters have a gradient
    for p, _, grad in uses:
        t = total[p]
        if t is None:
            total[p], reached = grad, reached + 1
        elif p in summed:
            t += grad
        else:  # a copy, not t + grad: that is a numpy scalar for a 0-d Parameter
            acc = np.array(t, copy=True)
            acc += grad
            total[p] = acc
            summed.add(p)
    if reached < len(total):  # some Parameter had no use
        for p, t in total.items():
            if t is None:
                shape = (graph.batch_size, *p.shape) if per_example else p.shape
                total[p] = np.zeros(shape, p.dtype)
    return total


def _nested_backward(
    inner: Graph,
    name: str,
    g_out: list[Any],
    mode: str,
    per_example: bool,
    uses: list[tuple[Parameter, str, np.ndarray]],
) -> tuple[Any, ...]:
    """A nested graph's backward, its uses named ``"outer/inner"``."""
    inner._require_cached()
    seed_list = [
        np.zeros(inner._shape(src), inner._dtype(src)) if s is None else s
        for s, src in zip(g_out, inner._outputs, strict=True)
    ]
    sub = backward(inner, seed_list, mode, per_example, True)
    for p, use, grad in sub._uses:
        uses.append((p, f"{name}/{use}", grad))
    return tuple(sub.inputs.get(n) for n in inner.input_names())


# -- one layer's step, three ways ----------------------------------------------------------

_Step = tuple[tuple[Any, ...], dict[str, np.ndarray]]


def _fast_step(layer: Layer, g_out: Any, input_grad: bool) -> _Step:
    return layer.backward(g_out, input_grad=input_grad)


def _explicit_step(layer: Layer, g_out: Any, input_grad: bool) -> _Step:
    """Algorithm 14.1, lines 11–13, for one layer with any number of inputs and outputs.

    Builds ``L^x`` and ``L^θ`` as ``scipy.sparse`` matrices and multiplies
    ``g_in = g_out L^x`` (eq. 14.10) and ``dJ/dθ = g_out L^θ`` (eq. 14.8). A
    layer with several outputs has the Jacobian of its outputs stacked, so its
    ``g_out`` is the stack ``[g_out^a, g_out^b, ...]`` (eq. 14.43).
    """
    op = layer._operating_point("backward")
    checked = layer._validate_g_out(op, g_out)
    if layer.n_outputs > 1 or layer.returns_tuple:
        B = op.x_in[0].shape[0]
        g = np.concatenate(
            [
                np.zeros((B, int(x[0].size)), x.dtype) if gk is None else gk.reshape(B, -1)
                for gk, x in zip(g_out, op.x_out, strict=True)
            ],
            axis=1,
        )
    else:
        g = layer._g_rows(op, checked)
    L_x, L_theta = layer.jacobians()  # line 11
    grads = {  # line 13
        name: explicit_vjp(L, g, sum_batch=True).reshape(layer.params[name].shape)
        for name, L in L_theta.items()
    }
    L_xs = L_x if isinstance(L_x, tuple) else (L_x,)
    g_in = tuple(  # line 12
        None if (L is None or not input_grad) else explicit_vjp(L, g).reshape(x.shape)
        for L, x in zip(L_xs, op.x_in, strict=True)
    )
    return g_in, grads


def _per_example_step(layer: Layer, g_out: Any, input_grad: bool) -> _Step:
    """The fast step, with each parameter gradient as ``B`` per-example terms."""
    if not layer.params:
        return _fast_step(layer, g_out, input_grad)
    terms = layer.per_example_grads(g_out)
    if not input_grad:
        return (None,) * len(layer.inputs), terms
    g_in, _ = _fast_step(layer, g_out, True)
    return g_in, terms


_STEPS: dict[str, Callable[[Layer, Any, bool], _Step]] = {
    "fast": _fast_step,
    "explicit": _explicit_step,
}
