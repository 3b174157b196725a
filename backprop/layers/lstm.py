"""The LSTM cell (the recurrent-nets chapter): a cell state that gates keep or rewrite.

Per example, with ``σ`` the logistic sigmoid and ``⊙`` the entrywise product,

    z = W_x x_t + W_h h + b                      (4n entries: the four gates' inputs)
    i = σ(z_i),  f = σ(z_f),  g = tanh(z_g),  o = σ(z_o)
    c' = f ⊙ c + i ⊙ g                           (forget some of c, write some of g)
    h' = o ⊙ tanh(c')                            (read the cell state out)

in PyTorch's gate order ``i, f, g, o`` (``torch.nn.LSTMCell``). The additive path
``c → c'`` has the Jacobian ``diag(f)``: where ``f ≈ 1`` the cell state carries a
gradient over many steps without the ``W_h`` factors that make an Elman net's
gradients vanish.

Second order. Along a tangent the gates move by ``ġate = s ⊙ ż`` (``s`` their
derivatives, ``ż`` the affine map's tangent), then ``ċ' = ḟ c + f ċ + i̇ g + i ġ`` and
``ḣ' = ȯ tanh(c') + o τ ċ'`` (``τ = 1 − tanh²(c')``). The backward pass is a sum of
products of these (``ĝ_i = g_c' g s_i`` with ``g_c' = g_h' o τ + g_c``, and so on), so
each product moves by the product rule, ``s`` by ``ṡ = (1 − 2σ) σ̇`` for a sigmoid
and ``−2 g ġ`` for tanh, ``τ`` by ``−2 tanh(c') τ ċ'``: these bilinear terms between
the gates and the state are the cell's curvature.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

from backprop.jacobian import DiagonalBlocks, Jacobian
from backprop.layer import OperatingPoint
from backprop.layers.recurrent import RecurrentCell, _column_sum
from backprop.layers.timesteps import tuple_g_out

__all__ = ["LSTMCell"]


class LSTMCell(RecurrentCell):
    """``(x_t, h, c)`` → ``(h', c')``: one LSTM step, as ``torch.nn.LSTMCell``.

    Shapes: ``x_t`` ``(B, n_in)``; ``h``, ``c``, ``h'``, ``c'`` ``(B, n_hidden)``.
    ``"W_x"`` is ``(4n, n_in)``, ``"W_h"`` ``(4n, n)`` and ``"b"`` ``(4n,)`` (``n =
    n_hidden``), the row blocks in the gate order ``i, f, g, o``: PyTorch's
    ``weight_ih``, ``weight_hh`` and ``bias_ih + bias_hh``. The cell has two outputs,
    so ``backward`` takes ``(g_h', g_c')`` (``None`` for an unused one) and each
    ``L^x`` stacks the rows of ``h'`` over those of ``c'`` (``2n`` rows).

    Jacobians. Let ``s = (i(1−i), f(1−f), 1−g², o(1−o))`` be the gates' derivatives
    and ``τ = 1 − tanh²(c')``. The map from the gates' inputs ``z`` to ``(h', c')``
    is a ``2 × 4`` grid of diagonals (``DiagonalBlocks``), ``M``:

        ∂c'/∂z = [ g⊙s_i,  c⊙s_f,  i⊙s_g,  0 ]
        ∂h'/∂z = o⊙τ ⊙ ∂c'/∂z  +  [ 0, 0, 0, tanh(c')⊙s_o ]

    so ``L^x = M W_x``, ``L^h = M W_h``, ``L^{W_x} = M (I ⊗ x_tᵀ)``, ``L^{W_h} = M
    (I ⊗ hᵀ)`` and ``L^b = M``, each kept as its two factors; the direct path
    through the cell state is a ``2 × 1`` grid, ``L^c = [o⊙τ⊙f ; f]``. The fast
    path multiplies ``(g_h', g_c')`` through ``M`` entry by entry into ``ĝ`` (the
    gradient of ``z``), then ``g_x = ĝ W_x``, ``g_h = ĝ W_h``, ``dJ/dW_x = ĝᵀ x_t``,
    ``dJ/dW_h = ĝᵀ h``, ``dJ/db = Σ_b ĝ``.

    ``W_x``, ``W_h`` and ``b`` may be given (arrays or Parameters, to tie cells);
    the others are drawn as PyTorch draws them (uniform in ``±1/sqrt(n_hidden)``).
    """

    inputs = ("x_t", "h", "c")
    states = ("h", "c")
    n_outputs = 2
    returns_tuple = True

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        *,
        bias: bool = True,
        W_x: Any = None,
        W_h: Any = None,
        b: Any = None,
        rng: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(n_in, n_hidden)
        where = f"LSTMCell({self.n_in}→{self.n_hidden}"
        self._parameters(where, {"W_x": W_x, "W_h": W_h, "b": b}, 4, bias, rng, dtype)

    def shared_copy(self) -> LSTMCell:
        copy = type(self)(self.n_in, self.n_hidden, bias="b" in self.params, **self.params)
        return self._shared(copy)

    def _forward(
        self, op: OperatingPoint, x_t: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        theta, n = op.theta, self.n_hidden
        z = h @ self._transposed("W_h", theta["W_h"])
        z += x_t @ self._transposed("W_x", theta["W_x"])
        if "b" in theta:
            z += theta["b"]
        gates = z.reshape(-1, 4, n)  # a view: the gates i, f, g, o, activated in place
        g_gate = np.tanh(gates[:, 2])  # g from its input, before σ overwrites it
        expit(gates, out=gates)
        gates[:, 2] = g_gate
        i, f, g, o = gates[:, 0], gates[:, 1], gates[:, 2], gates[:, 3]
        c_new = f * c
        c_new += i * g
        tanh_c = np.tanh(c_new)
        h_new = o * tanh_c
        op.saved["gates"], op.saved["tanh_c"] = gates, tanh_c
        c_new.setflags(write=False)
        h_new.setflags(write=False)
        return h_new, c_new

    def _validate_g_out(self, op: OperatingPoint, g_out: Any) -> Any:
        return tuple_g_out(self, op, g_out)

    def _g_rows(self, op: OperatingPoint, g_out: Any) -> np.ndarray:
        return np.concatenate(g_out, axis=1)

    def _grid(self, op: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
        """``(M, L^c)`` as arrays ``(B, 2, 4, n)`` and ``(B, 2, 1, n)``: the diagonals of
        ``∂(h', c')/∂z`` and of ``∂(h', c')/∂c`` (see the class docstring)."""
        gates, tanh_c, c = op.saved["gates"], op.saved["tanh_c"], op.x_in[2]
        i, f, g, o = gates[:, 0], gates[:, 1], gates[:, 2], gates[:, 3]
        s = _slopes(gates)
        read = o * (1.0 - tanh_c * tanh_c)  # ∂h'/∂c' = o ⊙ τ
        dc = np.stack([g * s[:, 0], c * s[:, 1], i * s[:, 2], np.zeros_like(g)], axis=1)
        dh = read[:, None] * dc
        dh[:, 3] = tanh_c * s[:, 3]
        M = np.stack([dh, dc], axis=1)
        Lc = np.stack([read * f, f], axis=1)[:, :, None]
        return M, Lc

    def _step_backward(
        self, op: OperatingPoint, g_out: Any, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        x_t, h, _ = op.x_in
        theta = op.theta
        gc, gz = self._gate_grads(op, *g_out)
        gz = gz.reshape(x_t.shape[0], -1)
        grads = {"W_x": gz.T @ x_t, "W_h": gz.T @ h}
        if "b" in theta:
            grads["b"] = _column_sum(gz)
        if not input_grad:
            return (None, None, None), grads
        return (gz @ theta["W_x"], gz @ theta["W_h"], gc * op.saved["gates"][:, 1]), grads

    def _gate_grads(
        self, op: OperatingPoint, g_h: np.ndarray, g_c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(g_c', ĝ)``: the gradient reaching ``c'`` (from ``h'`` and straight in) and
        that of the gates' inputs ``z``, ``(B, 4, n)``."""
        x_t, c = op.x_in[0], op.x_in[2]
        gates, tanh_c = op.saved["gates"], op.saved["tanh_c"]
        i, f, g, o = gates[:, 0], gates[:, 1], gates[:, 2], gates[:, 3]
        gc = g_h * o * (1.0 - tanh_c * tanh_c)  # through h' = o ⊙ tanh(c') ...
        gc += g_c  # ... and straight into c'
        gz = np.empty((x_t.shape[0], 4, self.n_hidden), dtype=x_t.dtype)  # ĝ, the gradient of z
        np.multiply(gc * g, i * (1.0 - i), out=gz[:, 0])
        np.multiply(gc * c, f * (1.0 - f), out=gz[:, 1])
        np.multiply(gc * i, 1.0 - g * g, out=gz[:, 2])
        np.multiply(g_h * tanh_c, o * (1.0 - o), out=gz[:, 3])
        return gc, gz

    # -- second order (see the module docstring) ------------------------------------
    def _moves(
        self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(ġates (B, 4, n), ċ', d tanh(c'))`` along the tangent; None if nothing moves."""
        dz, dc = self._affine_tangent(op, dx_in, dtheta), dx_in[2]
        if dz is None and dc is None:
            return None
        gates, tanh_c, c = op.saved["gates"], op.saved["tanh_c"], op.x_in[2]
        dgates = np.zeros_like(gates) if dz is None else _slopes(gates) * dz.reshape(gates.shape)
        di, df, dg = dgates[:, 0], dgates[:, 1], dgates[:, 2]
        i, f, g = gates[:, 0], gates[:, 1], gates[:, 2]
        dc_new = df * c + di * g + i * dg
        if dc is not None:
            dc_new += f * dc
        return dgates, dc_new, (1.0 - tanh_c * tanh_c) * dc_new

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        moves = self._moves(op, dx_in, dtheta)
        if moves is None:
            return None
        dgates, dc_new, dtanh = moves  # ḣ' = ȯ tanh(c') + o d tanh(c')
        gates, tanh_c = op.saved["gates"], op.saved["tanh_c"]
        return dgates[:, 3] * tanh_c + gates[:, 3] * dtanh, dc_new

    def _step_hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        moves = self._moves(op, dx_in, dtheta)
        if moves is None:
            return None
        dgates, _, dtanh = moves
        # (an output no gradient reached comes as None: zero)
        g_h, g_c = (
            np.zeros_like(x) if g is None else g for g, x in zip(g_out, op.x_out, strict=True)
        )
        gc, gz = self._gate_grads(op, g_h, g_c)
        gates, tanh_c, c = op.saved["gates"], op.saved["tanh_c"], op.x_in[2]
        s = _slopes(gates)
        ds = (1.0 - 2.0 * gates) * dgates  # σ' = σ(1 − σ) moves by (1 − 2σ) σ̇ ...
        ds[:, 2] = -2.0 * gates[:, 2] * dgates[:, 2]  # ... and 1 − g² by −2 g ġ
        tau = 1.0 - tanh_c * tanh_c
        dgc = g_h * (dgates[:, 3] * tau - 2.0 * gates[:, 3] * tanh_c * dtanh)
        # ĝ_k = g_c' u_k s_k for the gates i, f, g, with u = (g, c, i): the product rule
        dc = np.zeros_like(c) if dx_in[2] is None else dx_in[2]
        u = np.stack([gates[:, 2], c, gates[:, 0]], axis=1)
        du = np.stack([dgates[:, 2], dc, dgates[:, 0]], axis=1)
        dgz = np.empty_like(gz)
        dgz[:, :3] = dgc[:, None] * u * s[:, :3] + gc[:, None] * (du * s[:, :3] + u * ds[:, :3])
        dgz[:, 3] = g_h * (dtanh * s[:, 3] + tanh_c * ds[:, 3])  # ĝ_o = g_h' tanh(c') s_o
        B = gz.shape[0]
        (h_x, h_h), h_theta = self._affine_hvp(
            op, gz.reshape(B, -1), dgz.reshape(B, -1), dx_in, dtheta, input_grad
        )
        h_c = dgc * gates[:, 1] + gc * dgates[:, 1] if input_grad else None  # g_c = g_c' f
        return (h_x, h_h, h_c), h_theta

    def _step_jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        M_d, Lc_d = self._grid(op)
        (L_x, L_h), L_theta = self._through_weights(op, DiagonalBlocks(M_d, "∂(h', c')/∂z"))
        return (L_x, L_h, DiagonalBlocks(Lc_d, "[o⊙τ⊙f ; f]")), L_theta

    def __repr__(self) -> str:
        bias = "" if "b" in self.params else ", bias=False"
        return f"LSTMCell({self.n_in}→{self.n_hidden}{bias})"


def _slopes(gates: np.ndarray) -> np.ndarray:
    """The gates' derivatives ``(B, 4, n)``: ``σ(1 − σ)`` for ``i, f, o``, ``1 − g²`` for ``g``."""
    s = gates * (1.0 - gates)
    s[:, 2] = 1.0 - gates[:, 2] * gates[:, 2]
    return s
