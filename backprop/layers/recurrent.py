"""Recurrent cells (the recurrent-nets chapter): one step ``h_t = f(x_t, h_{t-1})``.

A cell is an ordinary layer with two inputs (more for a cell with more state): the
input of this step and the state the step before left. Run over a sequence it is
*unrolled* (``backprop.recurrent.unroll``): one node per step, every node a copy of
the cell that holds the same Parameters, so the unrolled net is a DAG with tied
weights (chapter 14.7–14.8) and backprop through time is Algorithm 14.1 on it.

- ``RecurrentCell``: what every cell shares (the input checks, the state it carries,
  ``shared_copy`` for unrolling, and ``stop_state_gradient`` for truncated BPTT);
- ``RNNCell``: the Elman cell ``h' = f(W_x x_t + W_h h + b)``, ``f`` tanh or ReLU.

``LSTMCell`` lives in ``backprop.layers.lstm``.

Second order. Every cell reads its inputs through the affine map ``z = W_x x_t + W_h h
+ b``, whose tangent is ``ż = W_x ẋ_t + W_h ḣ + Ẇ_x x_t + Ẇ_h h + ḃ``. Its backward
pass, ``g_x = ĝ W_x``, ``g_h = ĝ W_h``, ``dJ/dW_x = ĝᵀ x_t``, ``dJ/dW_h = ĝᵀ h``,
``dJ/db = Σ ĝ`` for the gradient ``ĝ`` of ``z``, is bilinear in ``ĝ`` and the weights
(or inputs): it moves by ``ġ W_x + ĝ Ẇ_x``, ``ġ W_h + ĝ Ẇ_h``, ``ġᵀ x_t + ĝᵀ ẋ_t``,
``ġᵀ h + ĝᵀ ḣ`` and ``Σ ġ``, where ``ġ`` is how ``ĝ`` moves with the gates: for the
Elman cell ``ġ = g_out ⊙ f''(a) ⊙ ȧ`` (``f'' = −2 h' (1 − h'²)`` for tanh, 0 for
ReLU). ``RecurrentCell`` states that part once (``_affine_tangent``,
``_affine_hvp``); each cell states its ``ġ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from backprop.jacobian import Dense, Diagonal, Jacobian, Kronecker, Product
from backprop.jacobian.base import product_label
from backprop.layer import FLOAT_DTYPES, Layer, OperatingPoint, Parameter, _owned
from backprop.layers.linear import _as_parameter, _given_dtype
from backprop.layers.second_order import total

__all__ = ["RNNCell", "RecurrentCell", "cell_parameters", "chain"]

NONLINEARITIES = ("tanh", "relu")
Cell = TypeVar("Cell", bound="RecurrentCell")


def chain(outer: Jacobian, inner: Jacobian) -> Product:
    """``outer @ inner`` kept as its two factors (a ``Product``), labelled by both.

    A cell's Jacobians are a diagonal (the derivative of its nonlinearity) after a
    weight matrix or a ``I ⊗ xᵀ``; composing them with ``@`` would multiply them out
    into one dense matrix per example, which hides the chapter's ``R W`` form.
    """
    P = Product(outer, inner)
    P.label = product_label(outer, inner)
    return P


def _size(where: str, what: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{where}: {what} must be a positive integer, got {n!r}")
    return int(n)


def cell_parameters(
    where: str,
    given: dict[str, Any],
    n_in: int,
    n_hidden: int,
    n_rows: int,
    bias: bool,
    rng: Any,
    dtype: Any,
) -> dict[str, Parameter]:
    """``{"W_x": (n_rows, n_in), "W_h": (n_rows, n_hidden), "b": (n_rows,)}`` as Parameters.

    Given values (arrays or Parameters, to tie cells) are checked against their
    shape and ``dtype``. The others are drawn as PyTorch draws a cell's: uniformly
    in ``±1/sqrt(n_hidden)``, in the order ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh``, and ``b = b_ih + b_hh`` (the one bias the sum needs).
    """
    if given.get("b") is not None and not bias:
        raise ValueError(f"{where}: b was given but bias=False")
    gen = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(n_hidden)
    shapes: dict[str, tuple[int, ...]] = {"W_x": (n_rows, n_in), "W_h": (n_rows, n_hidden)}
    if bias:
        shapes["b"] = (n_rows,)
    params = {}
    for name, shape in shapes.items():
        value = given.get(name)
        if value is None:
            value = gen.uniform(-bound, bound, size=shape)
            if name == "b":  # b_ih + b_hh, both drawn
                value = value + gen.uniform(-bound, bound, size=shape)
            value = value.astype(dtype)
        params[name] = _as_parameter(f"{where}: {name}", value, shape, dtype)
    return params


def _column_sum(g: np.ndarray) -> np.ndarray:
    """``Σ_b g[b]`` as ``1ᵀ g``: BLAS's gemv beats numpy's column sum at these sizes."""
    return np.ones(g.shape[0], dtype=g.dtype) @ g


class RecurrentCell(Layer):
    """One step of a recurrence: inputs ``(x_t, *state)``, output the new state.

    ``x_t`` is ``(B, n_in)`` and each part of the state ``(B, n_hidden)``; ``states``
    names the parts (``("h",)`` for an Elman cell, ``("h", "c")`` for an LSTM). A
    cell with one part returns it; a cell with several returns a tuple, in the
    order of ``states``, and takes one ``g_out`` per part. The first part is the
    hidden state that the unrolled net stacks into its output.

    ``shared_copy()`` makes a cell that holds the same Parameters (tied, chapter
    14.8): ``unroll`` makes one per step.

    ``stop_state_gradient`` (False unless truncated backprop through time sets it,
    ``backprop.recurrent.truncated``) treats the incoming state as a constant: the
    forward pass and the gradients of ``x_t`` and of the parameters are unchanged,
    but no gradient flows back into the state (``None``, as for labels) and
    ``jacobians()`` gives ``None`` for its ``L^x``. That cuts the recurrence at
    this step, which is what truncation means.
    """

    states: tuple[str, ...] = ("h",)

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        where = type(self).__name__
        self.n_in = _size(where, "n_in", n_in)
        self.n_hidden = _size(where, "n_hidden", n_hidden)
        self.stop_state_gradient = False
        #: ``{name: (W, Wᵀ contiguous)}``, one dict shared by a cell and its shared copies.
        self._transposes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _parameters(
        self, where: str, given: dict[str, Any], gates: int, bias: bool, rng: Any, dtype: Any
    ) -> None:
        """``W_x``, ``W_h``, ``b`` with ``gates · n_hidden`` rows (``cell_parameters``), in
        ``dtype`` or, when None, that of a given float value (else float64). ``where``
        names the cell up to its closing parenthesis."""
        if dtype is None:
            dtype = _given_dtype(*given.values())
        if np.dtype(dtype) not in FLOAT_DTYPES:
            name = type(self).__name__
            raise TypeError(f"{name}: dtype must be float32 or float64, got {np.dtype(dtype)}")
        where += ")" if bias else ", bias=False)"
        n = self.n_hidden
        self.params.update(
            cell_parameters(where, given, self.n_in, n, gates * n, bias, rng, np.dtype(dtype))
        )

    def _transposed(self, name: str, W: np.ndarray) -> np.ndarray:
        """``Wᵀ`` as a C-contiguous array, made once per value of the Parameter.

        ``x @ W.T`` on the transposed view is about twice as slow as on a contiguous
        copy at a cell's sizes (measured, 32 × 64 @ 64 × 64 with OpenBLAS), and the
        ``T`` steps of an unrolled net all read the same ``W``: the copy is kept
        until the Parameter holds another array (values are read-only and replaced,
        never edited, so the identity of the array says when).
        """
        found = self._transposes.get(name)
        if found is not None and found[0] is W:
            return found[1]
        WT = np.ascontiguousarray(W.T)
        self._transposes[name] = (W, WT)
        return WT

    def _shared(self, copy: Cell) -> Cell:
        """``copy`` (a cell on the same Parameters) sharing this cell's transposes."""
        copy._transposes = self._transposes
        return copy

    def shared_copy(self) -> RecurrentCell:
        """A new cell of the same class holding the same Parameters (tied weights)."""
        raise NotImplementedError  # abstract

    # -- inputs ----------------------------------------------------------------------
    def _validate_inputs(self, x_in: Sequence[Any]) -> tuple[np.ndarray, ...]:
        # The common case, kept short (a cell runs once per step): float arrays of
        # the parameters' dtype. Anything else takes the general path, which words
        # the errors.
        dtype = self.params["W_x"]._value.dtype
        if len(x_in) == len(self.inputs) and all(
            type(x) is np.ndarray and x.ndim == 2 and x.dtype == dtype for x in x_in
        ):
            arrays = tuple([_owned(x) for x in x_in])
            self._check(*arrays)
            return arrays
        return super()._validate_inputs(x_in)

    def _check(self, x_t: np.ndarray, *state: np.ndarray) -> None:
        B = x_t.shape[0]
        if x_t.shape != (B, self.n_in):
            self._wrong_shape("x_t", x_t, self.n_in)
        for name, s in zip(self.states, state, strict=True):
            if s.shape != (B, self.n_hidden):
                self._wrong_shape(name, s, self.n_hidden)

    def _wrong_shape(self, what: str, x: np.ndarray, n: int) -> None:
        shapes = ", ".join(self.inputs)
        hint = " (add a batch axis: x[None])" if x.shape == (n,) else ""
        raise ValueError(
            f"{self!r}: {what} has shape {x.shape}, expected (B, {n}); a cell takes one "
            f"step's ({shapes}), each (B, size){hint}"
        )

    # -- the hooks a cell writes: the whole step, then the state cut here if asked -----
    def _step_backward(
        self, op: OperatingPoint, g_out: Any, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        raise NotImplementedError  # abstract

    def _step_jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        raise NotImplementedError  # abstract

    def _through_weights(
        self, op: OperatingPoint, front: Jacobian
    ) -> tuple[tuple[Jacobian, Jacobian], dict[str, Jacobian]]:
        """``front`` (the Jacobian of the output with respect to ``z = W_x x_t + W_h h +
        b``) after each of the affine map's Jacobians: ``(L^x, L^h)`` and ``L^θ``, each
        kept as two factors (``front W``, ``front (I ⊗ xᵀ)``, and ``front`` for ``b``)."""
        x_t, h = op.x_in[0], op.x_in[1]
        B, theta, rows = x_t.shape[0], op.theta, front.shape[1]
        L_x = (
            chain(front, Dense(theta["W_x"], "W_x", batch=B)),
            chain(front, Dense(theta["W_h"], "W_h", batch=B)),
        )
        L_theta: dict[str, Jacobian] = {
            "W_x": chain(front, Kronecker(rows, x_t, "I ⊗ x_tᵀ")),
            "W_h": chain(front, Kronecker(rows, h, "I ⊗ hᵀ")),
        }
        if "b" in theta:
            L_theta["b"] = front
        return L_x, L_theta

    def _step_hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        raise NotImplementedError  # abstract

    def _backward(
        self, op: OperatingPoint, g_out: Any, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        g_in, grads = self._step_backward(op, g_out, input_grad)
        if self.stop_state_gradient and input_grad:
            g_in = (g_in[0],) + (None,) * len(self.states)
        return g_in, grads

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        """The step's second-order term. With the state cut (truncated backprop through
        time) it is refused: the truncated gradient drops some paths of the true one and
        is the gradient of no cost, so it has no Hessian (its derivative is not even
        symmetric), and nothing here passes one off as such."""
        if self.stop_state_gradient:
            raise RuntimeError(
                f"{self!r}: the gradient of its incoming state is cut (truncated backprop "
                f"through time, bp.truncated), and a truncated gradient is the gradient of no "
                f"cost: it has no Hessian. Compute curvature outside the truncated context"
            )
        return self._step_hvp(op, g_out, dx_in, dtheta, input_grad)

    def _affine_tangent(
        self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: dict[str, np.ndarray]
    ) -> np.ndarray | None:
        """``ż = W_x ẋ_t + W_h ḣ + Ẇ_x x_t + Ẇ_h h + ḃ``, ``(B, rows)``: how the input
        of the nonlinearity (the gates) moves; None if nothing moves it."""
        theta, terms = op.theta, []
        for x, dx, name in ((op.x_in[0], dx_in[0], "W_x"), (op.x_in[1], dx_in[1], "W_h")):
            if dx is not None:
                terms.append(dx @ theta[name].T)
            dW = dtheta.get(name)
            if dW is not None:
                terms.append(x @ dW.T)
        db = dtheta.get("b")
        if db is not None:
            terms.append(np.broadcast_to(db, (op.x_in[0].shape[0], db.shape[0])))
        return total(*terms)

    def _affine_hvp(
        self,
        op: OperatingPoint,
        gz: np.ndarray,
        dgz: np.ndarray | None,
        dx_in: tuple[Any, ...],
        dtheta: dict[str, np.ndarray],
        input_grad: bool,
    ) -> tuple[list[Any], dict[str, np.ndarray]]:
        """How the affine map's backward pass moves, for the gradient ``ĝ = gz`` of ``z``
        and its move ``ġ = dgz`` (None: ``ĝ`` does not move): ``([h_x, h_h], h_theta)``
        with ``h_x = ġ W_x + ĝ Ẇ_x``, ``h_W_x = ġᵀ x_t + ĝᵀ ẋ_t`` (the same for ``h``)
        and ``h_b = Σ ġ``; None (or left out) where a term is zero."""
        theta, h_in, h_theta = op.theta, [], {}
        for x, dx, name in ((op.x_in[0], dx_in[0], "W_x"), (op.x_in[1], dx_in[1], "W_h")):
            h_W = total(None if dgz is None else dgz.T @ x, None if dx is None else gz.T @ dx)
            if h_W is not None:
                h_theta[name] = h_W
            dW = dtheta.get(name) if input_grad else None
            moved = None if dgz is None or not input_grad else dgz @ theta[name]
            h_in.append(total(moved, None if dW is None else gz @ dW))
        if dgz is not None and "b" in theta:
            h_theta["b"] = _column_sum(dgz)
        return h_in, h_theta

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        L_x, L_theta = self._step_jacobians(op)
        if self.stop_state_gradient:
            L_x = (L_x[0],) + (None,) * len(self.states)
        return L_x, L_theta


class RNNCell(RecurrentCell):
    """The Elman cell: ``h' = f(a)``, ``a = W_x x_t + W_h h + b``, per example.

    Shapes: ``x_t`` ``(B, n_in)``, ``h`` and ``h'`` ``(B, n_hidden)``; ``"W_x"`` is
    ``(n_hidden, n_in)``, ``"W_h"`` ``(n_hidden, n_hidden)`` and ``"b"``
    ``(n_hidden,)``, PyTorch's ``weight_ih``, ``weight_hh`` and ``bias_ih + bias_hh``
    (``torch.nn.RNNCell``). ``f`` is ``"tanh"`` (``f' = 1 − h'²``) or ``"relu"``
    (``f' = 1`` where ``a ≥ 0``: at 0 the chapter's convention, as ``ReLU``).

    Jacobians, with ``R = diag(f'(a))`` (the chapter's ``R``):

    - ``L^h = R W_h`` (eq. 14.16 after eq. 14.30): the per-step factor whose product
      over the steps, ``R_T W_h ⋯ R_1 W_h``, makes gradients vanish or explode;
    - ``L^x = R W_x``;
    - ``L^{W_x} = R (I ⊗ x_tᵀ)``, ``L^{W_h} = R (I ⊗ hᵀ)`` (eq. 14.14) and ``L^b = R``.

    Each is kept as its factors (a ``Product`` of a ``Diagonal`` and a ``Dense`` or a
    ``Kronecker``). The fast path is ``ĝ = g_out ⊙ f'(a)``, then ``g_x = ĝ W_x``,
    ``g_h = ĝ W_h``, ``dJ/dW_x = ĝᵀ x_t``, ``dJ/dW_h = ĝᵀ h``, ``dJ/db = Σ_b ĝ``.

    ``W_x``, ``W_h`` and ``b`` may be given as arrays or Parameters (to tie cells);
    the others are drawn as PyTorch draws them (``cell_parameters``). ``dtype``
    defaults to that of a given float value, else float64.
    """

    inputs = ("x_t", "h")

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        *,
        nonlinearity: str = "tanh",
        bias: bool = True,
        W_x: Any = None,
        W_h: Any = None,
        b: Any = None,
        rng: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(n_in, n_hidden)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"RNNCell: nonlinearity must be one of {', '.join(NONLINEARITIES)}, got "
                f"{nonlinearity!r}"
            )
        self.nonlinearity = nonlinearity
        where = f"RNNCell({self.n_in}→{self.n_hidden}, {nonlinearity}"
        self._parameters(where, {"W_x": W_x, "W_h": W_h, "b": b}, 1, bias, rng, dtype)

    def shared_copy(self) -> RNNCell:
        copy = type(self)(
            self.n_in,
            self.n_hidden,
            nonlinearity=self.nonlinearity,
            bias="b" in self.params,
            **self.params,
        )
        return self._shared(copy)

    def _forward(self, op: OperatingPoint, x_t: np.ndarray, h: np.ndarray) -> np.ndarray:
        theta = op.theta
        a = h @ self._transposed("W_h", theta["W_h"])
        a += x_t @ self._transposed("W_x", theta["W_x"])
        if "b" in theta:
            a += theta["b"]
        if self.nonlinearity == "tanh":
            return np.tanh(a, out=a)
        op.saved["active"] = a >= 0  # f'(a), as a mask
        return np.maximum(a, 0, out=a)

    def _derivative(self, op: OperatingPoint) -> np.ndarray:
        """``f'(a)`` ``(B, n_hidden)``: ``1 − h'²`` for tanh, the mask ``a ≥ 0`` for ReLU."""
        if self.nonlinearity == "tanh":
            h_new = op.x_out
            return 1.0 - h_new * h_new
        return op.saved["active"]

    def _step_backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        x_t, h = op.x_in
        theta = op.theta
        if self.nonlinearity == "tanh":  # ĝ = g_out R, R = 1 − h'², with one new array
            h_new = op.x_out
            ga = h_new * h_new
            np.subtract(1.0, ga, out=ga)
            ga *= g_out
        else:
            ga = g_out * op.saved["active"]
        grads = {"W_x": ga.T @ x_t, "W_h": ga.T @ h}
        if "b" in theta:
            grads["b"] = _column_sum(ga)
        if not input_grad:
            return (None, None), grads
        return (ga @ theta["W_x"], ga @ theta["W_h"]), grads

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        da = self._affine_tangent(op, dx_in, dtheta)  # ḣ' = f'(a) ⊙ ȧ
        return None if da is None else da * self._derivative(op)

    def _step_hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        da = self._affine_tangent(op, dx_in, dtheta)
        if da is None:
            return None
        ga = g_out * self._derivative(op)  # ĝ = g_out ⊙ f'(a)
        dga = None  # ġ = g_out ⊙ f''(a) ⊙ ȧ: zero for ReLU
        if self.nonlinearity == "tanh":
            h_new = op.x_out
            dga = g_out * (-2.0 * h_new * (1.0 - h_new * h_new)) * da
        h_in, h_theta = self._affine_hvp(op, ga, dga, dx_in, dtheta, input_grad)
        return tuple(h_in), h_theta

    def _step_jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        x_t = op.x_in[0]
        d = np.asarray(self._derivative(op), dtype=x_t.dtype)
        R = Diagonal(d, "1 − h'²" if self.nonlinearity == "tanh" else "[a ≥ 0]")
        return self._through_weights(op, R)

    def __repr__(self) -> str:
        bias = "" if "b" in self.params else ", bias=False"
        return f"RNNCell({self.n_in}→{self.n_hidden}, {self.nonlinearity}{bias})"
