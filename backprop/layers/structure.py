"""Layers that shape the graph (chapter 14.7): merge, branch, add, multiply, reshape.

Also the small pieces that worked examples need as graph nodes: a constant, a
scalar scale (learnable or fixed), a constant shift and a sum over features.

Only ``Scale`` has a parameter. The Jacobians are selections, stacks of
identities, diagonals and rows of ones, so the backward passes are slicing,
summing and elementwise products.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import Dense, Diagonal, Identity, Jacobian, Selection, Tile
from backprop.layer import Layer, OperatingPoint, Parameter, _owned, check_float


def _read_only(g: np.ndarray) -> np.ndarray:
    """A read-only view of ``g``: a gradient passed on unchanged (or reshaped, or
    sliced) cannot be edited by whoever receives it, so neither can the array it
    came from."""
    v = g.view()
    v.setflags(write=False)
    return v


class Merge(Layer):
    """Concatenation of any number of inputs along the feature axis (eq. 14.37).

    Inputs ``(B, *shape_i)`` of any shapes give ``x_out`` of shape
    ``(B, Σ_i |shape_i|)``: each example's entries, flattened, one input after
    the other. The Jacobian for input ``i`` selects its block: ``[I; 0]`` for
    the first of two inputs and ``[0; I]`` for the second (eq. 14.41), so
    ``g_in^i`` is the matching slice of ``g_out``.

    ``Merge()`` takes as many inputs as it is given (in a Graph, the handles
    passed to ``add``); ``Merge(n)`` insists on exactly ``n``.
    """

    def __init__(self, n: int | None = None) -> None:
        super().__init__()
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"Merge: n must be a positive integer, got {n!r}")
        self.n = n
        self.variadic = n is None
        self.inputs = _merge_inputs(2 if n is None else n)

    def take_inputs(self, n: int) -> None:
        """Take ``n`` inputs from now on, if built as ``Merge()`` (``Merge(n)`` keeps n)."""
        if self.variadic:
            self.inputs = _merge_inputs(n)
        super().take_inputs(n)

    def forward(self, *x_in: Any, cache: bool = True) -> np.ndarray:
        if not x_in:
            raise TypeError("Merge.forward needs at least one input to concatenate")
        if self.n is not None or len(x_in) == len(self.inputs):
            return super().forward(*x_in, cache=cache)
        before = self.inputs
        self.take_inputs(len(x_in))
        try:
            return super().forward(*x_in, cache=cache)
        except BaseException:
            self.inputs = before  # a failed call changes nothing
            raise

    def _forward(self, op: OperatingPoint, *x_in: np.ndarray) -> np.ndarray:
        B = x_in[0].shape[0]
        return np.concatenate([x.reshape(B, -1) for x in x_in], axis=1)

    def _blocks(self, op: OperatingPoint) -> list[tuple[int, int]]:
        sizes = [int(np.prod(x.shape[1:], dtype=np.int64)) for x in op.x_in]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        return list(zip(starts, sizes, strict=True))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None,) * len(op.x_in), {}
        g_in = tuple(
            _read_only(g_out[:, start : start + size].reshape(x.shape))
            for (start, size), x in zip(self._blocks(op), op.x_in, strict=True)
        )
        return g_in, {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        B, m = op.x_out.shape
        dtype = op.x_out.dtype
        return tuple(Selection(m, start, size, B, dtype) for start, size in self._blocks(op)), {}

    def __repr__(self) -> str:
        return f"Merge({len(self.inputs)})"


def _merge_inputs(n: int) -> tuple[str, ...]:
    return tuple(f"x_in[{i}]" for i in range(n))


class Branch(Layer):
    """``n`` copies of the input (eq. 14.38); backward sums the gradients (eq. 14.46).

    ``forward`` returns a tuple of ``n`` arrays, all equal to ``x_in``;
    ``backward`` takes a tuple of ``n`` gradients (``None`` counts as zero) and
    returns their sum. The Jacobian of the stacked outputs is ``[I; I; ...]``
    (eq. 14.45).

    A Branch also copies integer data (class labels read by several losses): it
    passes them on and sends no gradient back, as the labels get none.
    """

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"Branch: n must be a positive integer, got {n!r}")
        self.n = n
        self.n_outputs = n
        self.returns_tuple = True

    def _validate_inputs(self, x_in: Any) -> tuple[np.ndarray, ...]:
        if len(x_in) == 1:
            x = np.asarray(x_in[0])
            if x.dtype.kind in "iu" and x.ndim:  # labels: copied on, no gradient
                return (_owned(x),)
        return super()._validate_inputs(x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> Any:
        return (x_in,) * self.n

    def _validate_g_out(self, op: OperatingPoint, g_out: Any) -> Any:
        x = op.x_in[0]
        if x.dtype.kind in "iu":
            if isinstance(g_out, tuple | list) and all(g is None for g in g_out):
                return []
            raise TypeError(
                f"{self!r}.backward: the input is integer data (labels, shape {x.shape}), "
                f"which gets no gradient; its copies' gradients must all be None"
            )
        if not isinstance(g_out, tuple | list) or len(g_out) != self.n:
            raise TypeError(
                f"{self!r}.backward takes a tuple of {self.n} gradients (one per copy, "
                f"each of shape {x.shape}; None for a copy nobody used)"
            )
        gs = []
        for i, g in enumerate(g_out):
            if g is None:
                continue
            g = check_float(self.name, f"g_out[{i}]", g, x.dtype)
            if g.shape != x.shape:
                raise ValueError(
                    f"{self!r}.backward: g_out[{i}] has shape {g.shape}, expected {x.shape}"
                )
            gs.append(g)
        return gs

    def _backward(
        self, op: OperatingPoint, g_out: Any, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad or op.x_in[0].dtype.kind in "iu":
            return None, {}
        if not g_out:
            return np.zeros_like(op.x_in[0]), {}
        if len(g_out) == 1:
            return _read_only(g_out[0]), {}
        total = g_out[0].copy()
        for g in g_out[1:]:
            total += g
        return total, {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        if x.dtype.kind in "iu":
            raise TypeError(
                f"{self!r}.jacobians: the input is integer data (labels, shape {x.shape}), "
                f"which has no Jacobian"
            )
        return Tile(self.n, int(x[0].size), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        return f"Branch({self.n})"


Layer.fan_out = Branch


class Add(Layer):
    """``x_out = x_a + x_b`` for two inputs of the same shape; ``L^a = L^b = I``."""

    inputs = ("x_a", "x_b")

    def _check(self, x_a: np.ndarray, x_b: np.ndarray) -> None:
        if x_a.shape != x_b.shape:
            raise ValueError(f"Add: x_a has shape {x_a.shape} but x_b has shape {x_b.shape}")

    def _forward(self, op: OperatingPoint, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
        return x_a + x_b

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None), {}
        # Both gradients are g_out: one read-only view serves both, so neither can
        # be edited through the other (nor the caller's g_out through them).
        g = _read_only(g_out)
        return (g, g), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x = op.x_in[0]
        L = Identity(int(x[0].size), x.shape[0], x.dtype)
        return (L, L), {}


class Multiply(Layer):
    """``x_out = x_a * x_b`` entry by entry; ``L^a = diag(x_b)``, ``L^b = diag(x_a)``."""

    inputs = ("x_a", "x_b")

    def _check(self, x_a: np.ndarray, x_b: np.ndarray) -> None:
        if x_a.shape != x_b.shape:
            raise ValueError(f"Multiply: x_a has shape {x_a.shape} but x_b has shape {x_b.shape}")

    def _forward(self, op: OperatingPoint, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
        return x_a * x_b

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        x_a, x_b = op.x_in
        return ((g_out * x_b, g_out * x_a) if input_grad else (None, None)), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x_a, x_b = op.x_in
        B = x_a.shape[0]
        return (Diagonal(x_b.reshape(B, -1), "x_b"), Diagonal(x_a.reshape(B, -1), "x_a")), {}


class Reshape(Layer):
    """Gives each example the shape ``shape`` (one entry may be -1); ``L^x = I``."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        self.shape = tuple(int(s) for s in shape)
        if self.shape.count(-1) > 1 or any(s < -1 or s == 0 for s in self.shape):
            raise ValueError(
                f"Reshape: each entry of the shape must be a positive size, and at most one "
                f"may be -1 (inferred); got {self.shape}"
            )

    def _check(self, x_in: np.ndarray) -> None:
        size = int(np.prod(x_in.shape[1:], dtype=np.int64))
        known = int(np.prod([s for s in self.shape if s != -1], dtype=np.int64))
        fits = size % known == 0 if -1 in self.shape and known else size == known
        if not fits:
            raise ValueError(
                f"{self!r}: cannot reshape input of shape {x_in.shape} to (B, "
                f"{', '.join(map(str, self.shape))}): {size} entries per example"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.reshape(x_in.shape[0], *self.shape)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (_read_only(g_out.reshape(op.x_in[0].shape)) if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Identity(int(x[0].size), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        return f"Reshape{self.shape}"


class Flatten(Reshape):
    """Flattens each example to a vector: ``(B, *shape) -> (B, |shape|)``."""

    def __init__(self) -> None:
        super().__init__(-1)

    def __repr__(self) -> str:
        return "Flatten()"


# -- small pieces for writing worked examples as graphs --------------------------


class Constant(Layer):
    """A node with no input whose output is a fixed batch ``value`` (shape ``(B, ...)``).

    It is a source of the graph, like an input that is never fed: ``L = 10 - d``
    is ``Add()(Constant([[10.0]]), Scale(-1.0, learnable=False)(d))``. It has no
    parameters and sends no gradient anywhere.
    """

    inputs: tuple[str, ...] = ()

    def __init__(self, value: Any) -> None:
        super().__init__()
        x = check_float("Constant", "value", np.array(value, copy=True))
        if x.ndim == 0:
            raise ValueError(
                "Constant: value is a scalar; give it a batch axis, e.g. Constant([[10.0]]) "
                "for one example with one feature"
            )
        x.flags.writeable = False
        self.value = x

    def _forward(self, op: OperatingPoint) -> np.ndarray:
        return self.value

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        return (), {}

    def __repr__(self) -> str:
        return f"Constant{self.value.shape}"


class Scale(Layer):
    """``x_out = a · x_in`` with one scalar ``a``, learnable by default.

    Shapes: ``x_in`` and ``x_out`` are ``(B, *shape)``; ``a`` is a 0-d
    Parameter (``params["a"]``), or a fixed Python float when
    ``learnable=False``. Per example ``L^x = a I`` and ``L^a = vec(x_in)``, a
    column of ``|x_in|`` rows, so ``dJ/da = Σ_b g_out,b · x_in,b``. Passing one
    Parameter ``a`` to several Scale layers ties them (eq. 14.47).
    """

    def __init__(self, a: Any = 1.0, *, learnable: bool = True, dtype: Any = np.float64) -> None:
        super().__init__()
        if isinstance(a, Parameter):
            if not learnable:
                raise ValueError("Scale: a is a Parameter but learnable=False")
            if a.shape != ():
                raise ValueError(f"Scale: a must be a 0-d Parameter, got shape {a.shape}")
            self.params["a"] = a
            self.a: float | None = None
        elif learnable:
            if np.ndim(a) != 0:
                raise ValueError(f"Scale: a must be a scalar, got shape {np.shape(a)}")
            self.params["a"] = Parameter(np.asarray(a, dtype=dtype))
            self.a = None
        else:
            self.a = float(a)

    def _factor(self, op: OperatingPoint) -> Any:
        return op.theta["a"] if self.a is None else self.a

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in * self._factor(op)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        a = self._factor(op)
        grads = {} if self.a is not None else {"a": np.asarray(np.vdot(g_out, op.x_in[0]))}
        return (g_out * a if input_grad else None), grads

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        B = x.shape[0]
        d = np.full((B, x[0].size), self._factor(op), dtype=x.dtype)
        L_theta: dict[str, Jacobian] = {}
        if self.a is None:
            L_theta["a"] = Dense(x.reshape(B, -1, 1), "vec(x_in)")
        return Diagonal(d, "a I"), L_theta

    def __repr__(self) -> str:
        if self.a is not None:
            return f"Scale({self.a:g}, learnable=False)"
        return f"Scale(a={float(self.params['a'].value):g})"


class Shift(Layer):
    """``x_out = x_in + c`` for a fixed constant ``c`` (a float, or one example's shape).

    ``L^x = I``; no parameters.
    """

    def __init__(self, c: Any) -> None:
        super().__init__()
        self.c = float(c) if np.ndim(c) == 0 else np.array(c, dtype=np.float64)

    def _check(self, x_in: np.ndarray) -> None:
        if isinstance(self.c, np.ndarray) and x_in.shape[1:] != self.c.shape:
            self.expect_features("x_in", x_in, self.c.shape)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        c = self.c.astype(x_in.dtype) if isinstance(self.c, np.ndarray) else self.c
        return x_in + c

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        return (_read_only(g_out) if input_grad else None), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Identity(int(x[0].size), x.shape[0], x.dtype), {}

    def __repr__(self) -> str:
        c = f"{self.c:g}" if isinstance(self.c, float) else f"array{self.c.shape}"
        return f"Shift({c})"


class Sum(Layer):
    """The sum of each example's entries: ``(B, *shape) -> (B, 1)``.

    Per example ``L^x`` is the row of ones ``[1 ... 1]`` (``1 × |x_in|``), so
    ``g_in`` repeats each example's ``g_out`` over its entries.
    """

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.reshape(x_in.shape[0], -1).sum(axis=1, keepdims=True)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        x = op.x_in[0]
        return np.broadcast_to(g_out.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape).copy(), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x = op.x_in[0]
        return Dense(np.ones((1, x[0].size), dtype=x.dtype), "[1 ... 1]", batch=x.shape[0]), {}
