"""The layer protocol: ``Layer`` and ``Loss`` (``Parameter`` is in ``backprop.parameter``).

A layer is ``x_out = f(x_in, θ)`` (eq. 14.1). ``forward`` evaluates it and
caches the operating point ``[x_in, θ]``; ``backward`` and ``jacobians`` are
evaluated at that point:

- ``backward(g_out)`` returns ``(g_in, grads)`` with ``g_in = g_out L^x``
  (eq. 14.10) and ``grads[name] = g_out L^θ`` (eq. 14.8) summed over the batch
  (eq. 14.11), in the parameter's own shape. This is the fast path.
- ``jacobians()`` returns ``(L_x, {name: L_theta})``, the explicit Jacobians as
  structured objects (``backprop.jacobian``).

Shapes, stated once: data arrays are ``(B, *shape)`` with the batch on axis 0;
``g_out`` has ``x_out``'s shape and ``g_in`` has ``x_in``'s shape; per example
``L^x`` is ``(|x_out|, |x_in|)`` and ``L^θ`` is ``(|x_out|, |θ|)``.

Rules every layer follows, enforced here once:

- data must be floating point (float32 or float64); integer data raise a
  ``TypeError`` that says how to convert it (integer class labels and boolean
  masks are the exceptions, declared by the layer: data that gets no gradient);
- a layer never changes the dtype of what flows through it;
- ``forward`` copies an input array the caller could still change, and marks its
  own outputs read-only, so no later mutation can corrupt the gradients;
- a call that fails changes nothing: validation happens before any state is set.

A subclass writes only the math: ``_forward``, ``_backward`` (optional: the
default multiplies through the Jacobians) and ``_jacobians``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NoReturn, cast

import numpy as np

# The protocol's type tests read ``ndarray`` by its plain name: numpy's module-level
# __getattr__ keeps ``np.ndarray`` out of the interpreter's attribute cache, and these
# tests run for every layer of every step.
from numpy import ndarray

from backprop.finite import loss_not_finite
from backprop.jacobian import Jacobian
from backprop.parameter import FLOAT_DTYPES, Parameter, _owned, check_float

__all__ = ["FLOAT_DTYPES", "Layer", "Loss", "OperatingPoint", "Parameter", "check_float"]


class OperatingPoint:
    """What ``forward`` caches: the inputs, the parameter values, the output.

    A layer may keep more here (``op.saved``) when recomputing it in backward
    would cost more than storing it.
    """

    __slots__ = ("x_in", "theta", "x_out", "saved")

    def __init__(self, x_in: tuple[np.ndarray, ...], theta: dict[str, np.ndarray]) -> None:
        self.x_in = x_in
        self.theta = theta
        self.x_out: Any = None
        self.saved: dict[str, Any] = {}


#: ``dJ/dJ = 1`` in each float dtype, read-only: a loss's default ``g_out``.
_ONE = {dtype: np.ones((), dtype=dtype) for dtype in FLOAT_DTYPES}
for _one in _ONE.values():
    _one.flags.writeable = False


class Layer:
    """One node of a computation: ``x_out = f(x_in, θ)``.

    Class attributes a subclass may set:

    - ``inputs``: names of the positional inputs (``("x_in",)`` by default);
    - ``label_inputs``: names among them that hold integer labels (no gradient);
    - ``mask_inputs``: names among them that hold boolean masks (no gradient);
    - ``reduces_batch``: True when the output has no batch axis (a sum over the
      examples, as a loss's ``J``).
    """

    inputs: tuple[str, ...] = ("x_in",)
    label_inputs: frozenset[str] = frozenset()
    #: Names among ``inputs`` that hold boolean masks (True where an entry is left out,
    #: PyTorch's convention for attention masks): data, not variables, like labels.
    mask_inputs: frozenset[str] = frozenset()
    #: True for a layer whose output has no batch axis: a sum over the examples.
    reduces_batch: bool = False
    #: How many outputs ``forward`` returns (a tuple of them when more than one). The
    #: Jacobian ``L^x`` of a layer with several outputs is that of the outputs
    #: stacked per example (eq. 14.45), and ``backward`` takes one ``g_out`` per output.
    n_outputs: int = 1
    #: True when ``forward`` returns a tuple of outputs (always, for several).
    returns_tuple: bool = False
    #: True for a layer that takes as many inputs as it is given (``Merge()``): a
    #: Graph calls ``take_inputs(n)`` with the number of handles passed to ``add``.
    variadic: bool = False
    #: The layer a Graph inserts where one value has several consumers:
    #: ``fan_out(n)`` makes ``n`` copies whose gradients add (eq. 14.46). Set by
    #: ``backprop.layers`` to its ``Branch``, so that a Graph needs no concrete layer.
    fan_out: ClassVar[Callable[[int], Layer]]
    #: True for a layer whose forward may mix the examples of the batch (BatchNorm in
    #: training mode). A forward that did so marks its operating point with
    #: ``op.saved["couples_batch"] = True``; its Jacobians are then ``WholeBatch``
    #: matrices over the batch (batch 1, ``B·|x|`` entries), ``_g_rows`` flattens
    #: ``g_out`` into that one row, and ``per_example_grads`` refuses.
    couples_batch: bool = False
    #: True when the class keeps ``Layer._dtype`` (set for every subclass), so the
    #: common path of ``forward`` may inline it.
    _default_dtype = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._default_dtype = cls._dtype is Layer._dtype

    def __init__(self) -> None:
        _require_hooks(type(self))
        self.params: dict[str, Parameter] = {}
        self._op: OperatingPoint | None = None
        self.training = True

    def train(self, mode: bool = True) -> Layer:
        """Training mode (``mode=False``: evaluation), as ``torch.nn.Module.train``.

        Only layers whose forward differs between the two (Dropout, BatchNorm)
        read ``self.training``. Returns the layer.
        """
        self.training = bool(mode)
        return self

    def eval(self) -> Layer:
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    # -- the public protocol --------------------------------------------------
    def forward(self, *x_in: Any, cache: bool = True) -> np.ndarray:
        """Evaluate the layer on a batch and cache the operating point.

        ``cache=False`` is inference only: no operating point is kept (the
        previous one is dropped too), so ``backward`` and ``jacobians`` raise
        until the next cached ``forward``.
        """
        arrays = self._validate_inputs(x_in)
        params = self.params
        theta = {name: p._value for name, p in params.items()} if params else {}
        op = OperatingPoint(arrays, theta)
        x_out = self._forward(op, *arrays)
        if isinstance(x_out, ndarray):
            # write=False, given by position: the keyword's parsing would cost as much again
            # as the call, on every layer's every forward (numpy's stubs list it keyword-only).
            x_out.setflags(False)  # type: ignore[call-arg]
        op.x_out = x_out
        self._op = op if cache else None
        return x_out

    def backward(
        self, g_out: Any = None, *, input_grad: bool = True
    ) -> tuple[Any, dict[str, np.ndarray]]:
        """``(g_in, grads)`` at the cached operating point (eq. 14.8, 14.10).

        ``g_in`` is one array for a one-input layer and a tuple for several
        (``None`` for an input with no gradient, such as integer labels, and for
        every input when ``input_grad=False``). ``grads`` maps each parameter
        name to ``dJ/dθ`` in the parameter's shape, summed over the batch.
        """
        op = self._op
        if op is None:
            op = self._operating_point("backward")  # raises, naming the layer
        return self._backward_checked(op, self._validate_g_out(op, g_out), input_grad)

    def _backward_checked(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        """``_backward`` on a ``g_out`` already validated, its ``g_in`` checked: each
        input's gradient has the input's shape and dtype (or is None).

        A model's executor calls it directly with the gradient that the layer above
        returned: checked there against the value the two layers share, it needs no
        second check here.
        """
        g_in, grads = self._backward(op, g_out, input_grad)
        if type(g_in) is ndarray and len(op.x_in) == 1:
            x = op.x_in[0]
            if g_in.shape != x.shape or g_in.dtype != x.dtype:
                self._wrong_g_in(g_in, 0)
        elif g_in is not None:
            self._check_g_ins(op, g_in)
        return g_in, grads

    def _check_g_ins(self, op: OperatingPoint, g_in: Any) -> None:
        """One gradient (or None) per input: a tuple of them (or an array for one input)."""
        if not isinstance(g_in, tuple) or len(g_in) != len(op.x_in):
            raise RuntimeError(
                f"{self!r}._backward returned {type(g_in).__name__} for g_in; a layer with "
                f"{len(op.x_in)} inputs returns a tuple of {len(op.x_in)} gradients (None "
                f"for an input without one)"
            )
        for k, (g, x) in enumerate(zip(g_in, op.x_in, strict=True)):
            if g is not None and (
                not isinstance(g, ndarray) or g.shape != x.shape or g.dtype != x.dtype
            ):
                self._wrong_g_in(g, k)

    def _wrong_g_in(self, g: Any, k: int) -> None:
        x = cast(OperatingPoint, self._op).x_in[k]
        what = f"{g.dtype} of shape {g.shape}" if isinstance(g, ndarray) else type(g).__name__
        raise RuntimeError(
            f"{self!r}._backward returned g_in for input {k} ({self.inputs[k]}) as {what}, "
            f"but that input is {x.dtype} of shape {x.shape}; g_in = g_out L^x has the "
            f"input's shape and dtype (a bug in the layer's _backward)"
        )

    def jacobians(self) -> tuple[Any, dict[str, Jacobian]]:
        """``(L_x, {name: L_theta})`` at the cached operating point.

        ``L_x`` is one Jacobian for a one-input layer and a tuple for several.
        """
        op = self._operating_point("jacobians")
        return self._jacobians(op)

    def per_example_grads(self, g_out: Any = None) -> dict[str, np.ndarray]:
        """``{name: array (B, *θ.shape)}``: each example's term of ``dJ/dθ``.

        Row ``b`` is ``g_out[b] L^θ_b``, so the rows sum to ``backward``'s
        gradient (eq. 14.11). They come from the structured Jacobians in one
        vectorized product per parameter (for ``Linear``, ``g_outᵀ x_in`` becomes
        ``B`` outer products), never from a Python loop over the examples.
        """
        op = self._operating_point("per_example_grads")
        if op.saved.get("couples_batch"):  # batch coupling: no per-example terms exist
            raise RuntimeError(
                f"{self!r}: per-example gradients are not defined at this operating point: "
                f"its forward mixed the examples of the batch (batch statistics), so each "
                f"example's output depends on every other example and dJ/dθ does not split "
                f"into one term per example; run the model in eval mode (model.eval()) for "
                f"per-example gradients"
            )
        rows = self._g_rows(op, self._validate_g_out(op, g_out))
        B = rows.shape[0]
        _, L_theta = self._jacobians(op)
        return {
            name: L.vjp(rows).reshape(B, *self.params[name].shape) for name, L in L_theta.items()
        }

    def inner_graph(self, where: str | None = None) -> Any:
        """The ``Graph`` this layer's forward runs, for a layer built from other layers
        (``MultiHeadAttention``); None (the default) for a layer that computes its output
        itself.

        The inner graph's first inputs are the layer's inputs, in order (an inner input
        beyond them the layer feeds itself), its outputs the layer's outputs, and its
        layers hold the layer's Parameters. The curvature tools differentiate through
        those layers, as through a Graph nested in a model, so such a layer writes no
        second-order hook of its own. With ``where`` (the caller, named in the error),
        the inner graph must still hold the operating point of this layer's last
        ``forward``: a ``RuntimeError`` otherwise.
        """
        return None

    def take_inputs(self, n: int) -> None:
        """Take ``n`` inputs from now on: a ``variadic`` layer fixes its count here.

        A Graph calls it when it adds the layer as a node with ``n`` handles. A
        layer with a fixed number of inputs refuses any other count.
        """
        if n != len(self.inputs):
            need = ", ".join(self.inputs) or "no input"
            raise TypeError(f"{self!r} takes {len(self.inputs)} input(s) ({need}), got {n}")

    # -- what a subclass writes ----------------------------------------------
    # ``_forward(op, *x_in) -> x_out`` and ``_check(*x_in)`` (optional: checks
    # of the input shapes, raising ``ValueError``) are declared here, not
    # defined: each layer writes them with its own named inputs.
    _forward: Callable[..., Any]
    _check: Callable[..., None] | None = None
    # Second order (``backprop.curvature``; ``backprop.layers.second_order`` says more):
    # ``_tangent(op, dx_in, dtheta)``, the forward tangent ``L^x ẋ + Σ L^θ θ̇`` (optional:
    # the Jacobians' ``jvp`` give it), and ``_hvp(op, g_out, dx_in, dtheta, input_grad)``,
    # the Hessian of ``<g_out, f>`` times the tangent; without it curvature refuses the layer
    # (unless it runs an ``inner_graph``, whose layers' hooks serve instead).
    _tangent: Callable[..., Any] | None = None
    _hvp: Callable[..., Any] | None = None

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        raise NotImplementedError  # abstract

    def _g_rows(self, op: OperatingPoint, g_out: np.ndarray) -> np.ndarray:
        """``g_out`` as the ``(B, M)`` rows that the Jacobian products take.

        An output with no batch axis (a loss's ``J``, or a layer with
        ``reduces_batch``) is a sum of the examples' terms, so each example's row
        is all of ``g_out``. A forward that coupled the batch (``couples_batch``) has
        Jacobians over the whole batch: ``g_out`` is then one row of all its entries.
        """
        if self.couples_batch and op.saved.get("couples_batch"):  # batch coupling
            return g_out.reshape(1, -1)
        if g_out.ndim and not self.reduces_batch:
            return g_out.reshape(g_out.shape[0], -1)
        B = op.x_in[0].shape[0]
        return np.ascontiguousarray(np.broadcast_to(g_out.reshape(1, -1), (B, max(g_out.size, 1))))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        """Default: multiply through the structured Jacobians."""
        L_x, L_theta = self._jacobians(op)
        g = self._g_rows(op, g_out)
        grads = {name: L.vjp_sum(g).reshape(self.params[name].shape) for name, L in L_theta.items()}
        if not input_grad:
            return (None if len(self.inputs) == 1 else (None,) * len(self.inputs)), grads
        if len(self.inputs) == 1:
            return L_x.vjp(g).reshape(op.x_in[0].shape), grads
        g_in = tuple(
            None if L is None else L.vjp(g).reshape(x.shape)
            for L, x in zip(L_x, op.x_in, strict=True)
        )
        return g_in, grads

    def _dtype(self) -> np.dtype[Any] | None:
        """The dtype the layer's data must have (that of its parameters), if any."""
        for p in self.params.values():
            return p._value.dtype
        return None

    # -- validation, once for every layer ------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def _validate_inputs(self, x_in: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """``x_in`` as the layer's owned input arrays, checked (``_check``); refused with
        an error that names the layer otherwise. Two common cases are tested first in
        few operations; anything else (and every error) takes ``_validate_general``."""
        n = len(x_in)
        if n == 1 and self._default_dtype and len(self.inputs) == 1 and not self.label_inputs:
            # One float array of the layer's dtype (what the layer before it returns).
            # With parameters, equal to theirs is float too (Layer._dtype, inlined).
            x = x_in[0]
            params = self.params
            if (
                type(x) is ndarray
                and x.ndim
                and (
                    x.dtype == next(iter(params.values()))._value.dtype
                    if params
                    else x.dtype in FLOAT_DTYPES
                )
            ):
                x = _owned(x)
                if self._check is not None:
                    self._check(x)
                return (x,)
        elif n == 2 and self._default_dtype and not self.params and len(self.inputs) == 2:
            # A loss's prediction and its target: float data of one dtype, or float data
            # and integer labels where the layer declares them.
            x, t = x_in
            first, second = self.inputs
            if (
                type(x) is ndarray
                and type(t) is ndarray
                and x.ndim
                and t.ndim
                and x.shape[0] == t.shape[0]
                and x.dtype in FLOAT_DTYPES
                and first not in self.label_inputs
                and second not in self.mask_inputs
                and (t.dtype.kind in "iu" if second in self.label_inputs else t.dtype == x.dtype)
            ):
                x, t = _owned(x), _owned(t)
                if self._check is not None:
                    self._check(x, t)
                return (x, t)
        return self._validate_general(x_in)

    def _validate_general(self, x_in: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """Any inputs: each converted or refused with an error naming it, then checked."""
        if len(x_in) != len(self.inputs):
            need = ", ".join(self.inputs)
            raise TypeError(
                f"{self!r}.forward takes {len(self.inputs)} input(s) ({need}), got {len(x_in)}"
            )
        dtype = self._dtype()
        arrays = []
        for what, x in zip(self.inputs, x_in, strict=True):
            x = self._as_input(what, x, dtype)
            if what not in self.label_inputs and what not in self.mask_inputs and dtype is None:
                dtype = x.dtype  # the first float input sets the dtype of the others
            arrays.append(x)
        if any(x.shape[0] != arrays[0].shape[0] for x in arrays):
            if self._check is not None:
                # The layer's own check may know the cause better (say, logits without a
                # batch axis); it raises its ValueError or TypeError. Anything else it
                # raises on these shapes is not a message for the user.
                try:
                    self._check(*arrays)
                except (ValueError, TypeError):
                    raise
                except Exception:  # noqa: BLE001, S110
                    pass
            shapes = ", ".join(f"{w} {x.shape}" for w, x in zip(self.inputs, arrays, strict=True))
            raise ValueError(f"{self!r}: inputs have different batch sizes: {shapes}")
        if self._check is not None:
            self._check(*arrays)
        return tuple(arrays)

    def _as_input(self, what: str, x: Any, dtype: np.dtype[Any] | None) -> np.ndarray:
        """Input ``what`` as an owned array: integer labels, a boolean mask, or float data
        of ``dtype``."""
        if what in self.mask_inputs:
            x = np.asarray(x)
            if x.dtype != np.bool_:
                raise TypeError(
                    f"{self!r}: {what} must be a boolean mask (True where an entry is left "
                    f"out), got dtype {x.dtype} (shape {x.shape}); convert with x.astype(bool)"
                )
        elif what in self.label_inputs:
            x = np.asarray(x)
            if x.dtype.kind not in "iu":  # signed or unsigned integers
                raise TypeError(
                    f"{self!r}: {what} must be integer class labels, got dtype {x.dtype} "
                    f"(shape {x.shape})"
                )
        elif not (
            type(x) is ndarray and x.dtype in FLOAT_DTYPES and (dtype is None or x.dtype == dtype)
        ):
            x = check_float(repr(self), what, x, dtype)
        if x.ndim == 0:
            raise ValueError(f"{self!r}: {what} is a scalar; layers take a batch of shape (B, ...)")
        return _owned(x)

    def operating_point(self, what: str = "operating_point") -> OperatingPoint:
        """What the last cached ``forward`` kept: ``x_in``, ``theta``, ``x_out``.

        A ``RuntimeError`` naming the layer (and ``what`` needed it) if there is none.
        """
        return self._operating_point(what)

    def _operating_point(self, what: str) -> OperatingPoint:
        if self._op is None:
            raise RuntimeError(
                f"{self!r}: {what}() needs the operating point that forward() caches; "
                f"call forward() first"
            )
        return self._op

    def _validate_g_out(self, op: OperatingPoint, g_out: Any) -> np.ndarray:
        if g_out is None:
            raise TypeError(f"{self!r}.backward needs g_out = dJ/dx_out, shape {op.x_out.shape}")
        if type(g_out) is ndarray and g_out.dtype == op.x_out.dtype:
            g = g_out  # the common case, without building the error text
        else:
            g = check_float(repr(self), "g_out", g_out, op.x_out.dtype)
        if g.shape != op.x_out.shape:
            raise ValueError(
                f"{self!r}.backward: g_out has shape {g.shape}, but x_out has shape "
                f"{op.x_out.shape}; g_out = dJ/dx_out must have x_out's shape"
            )
        return g

    def expect_features(self, what: str, x: np.ndarray, shape: tuple[int, ...]) -> None:
        """Raise a ``ValueError`` unless one example of ``x`` has ``shape``."""
        if x.shape[1:] != shape:
            hint = " (add a batch axis: x[None])" if x.shape == shape else ""
            raise ValueError(
                f"{self!r}: {what} has shape {x.shape}, expected (B, {', '.join(map(str, shape))})"
                f"{hint}"
            )

    def parameters(self) -> list[Parameter]:
        return list(dict.fromkeys(self.params.values()))

    def __repr__(self) -> str:
        return f"{self.name}()"


def _require_hooks(cls: type[Layer]) -> None:
    """A ``TypeError`` naming the hook a layer class does not define."""
    missing = []
    if getattr(cls, "_forward", None) is None:
        missing.append("_forward(self, op, *x_in) -> x_out: the layer's function")
    if cls._jacobians is Layer._jacobians:
        missing.append(
            "_jacobians(self, op) -> (L_x, {name: L_theta}): its Jacobians at the operating point"
        )
    if missing:
        raise TypeError(
            f"{cls.__name__} cannot be built: it does not define "
            + "; nor ".join(missing)
            + ". A layer writes _forward and _jacobians (and, optionally, a faster "
            "_backward); see 'Writing your own layer' in the README"
        )


class Loss(Layer):
    """A layer whose output is the cost ``J``: a scalar, the mean of the
    per-example losses over the batch (eq. 14.11).

    Its ``backward()`` needs no argument: ``g_out = dJ/dJ = 1``. Its per-example
    ``L^x`` has one row, ``∂J/∂x_in[b]``, which already carries the ``1/B``.
    An empty batch and a cost that is not finite are refused (``_refuse``), never
    returned as NaN.
    """

    inputs = ("y_hat", "y")

    def _refuse(self, x_in: tuple[Any, ...], J: Any = None) -> NoReturn:
        """Raise the ``ValueError`` of a batch with no cost: an empty one (``J`` None),
        or one whose ``J`` is NaN or inf, naming the input that holds NaN or inf (or
        saying that the cost itself overflowed). A loss calls it from ``_check`` or
        ``_forward``, so the failed call changes nothing."""
        raise ValueError(loss_not_finite(self, x_in, J))

    def _validate_g_out(self, op: OperatingPoint, g_out: Any) -> np.ndarray:
        if g_out is None:
            return _ONE[op.x_out.dtype]
        if type(g_out) is ndarray and g_out.shape == () and g_out.dtype == op.x_out.dtype:
            return g_out  # the common case: a seed from the executor
        if isinstance(g_out, int | float):  # a Python number takes the loss's dtype
            return np.asarray(g_out, dtype=op.x_out.dtype)
        g = check_float(repr(self), "g_out", g_out, op.x_out.dtype)
        if g.shape != ():
            raise ValueError(
                f"{self!r}.backward: g_out has shape {g.shape}, but the loss is a scalar; "
                f"pass a scalar or nothing (g_out = dJ/dJ = 1)"
            )
        return g
