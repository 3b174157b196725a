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
        s = gates * (1.0 - gates)  # σ' = σ(1 − σ) for i, f, o ...
        s[:, 2] = 1.0 - g * g  # ... and tanh' = 1 − g² for g
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
        g_h, g_c = g_out
        x_t, h, c = op.x_in
        theta, n = op.theta, self.n_hidden
        gates, tanh_c = op.saved["gates"], op.saved["tanh_c"]
        i, f, g, o = gates[:, 0], gates[:, 1], gates[:, 2], gates[:, 3]
        gc = g_h * o * (1.0 - tanh_c * tanh_c)  # through h' = o ⊙ tanh(c') ...
        gc += g_c  # ... and straight into c'
        gz = np.empty((x_t.shape[0], 4, n), dtype=x_t.dtype)  # ĝ, the gradient of z
        np.multiply(gc * g, i * (1.0 - i), out=gz[:, 0])
        np.multiply(gc * c, f * (1.0 - f), out=gz[:, 1])
        np.multiply(gc * i, 1.0 - g * g, out=gz[:, 2])
        np.multiply(g_h * tanh_c, o * (1.0 - o), out=gz[:, 3])
        gz = gz.reshape(-1, 4 * n)
        grads = {"W_x": gz.T @ x_t, "W_h": gz.T @ h}
        if "b" in theta:
            grads["b"] = _column_sum(gz)
        if not input_grad:
            return (None, None, None), grads
        return (gz @ theta["W_x"], gz @ theta["W_h"], gc * f), grads

    def _step_jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        M_d, Lc_d = self._grid(op)
        (L_x, L_h), L_theta = self._through_weights(op, DiagonalBlocks(M_d, "∂(h', c')/∂z"))
        return (L_x, L_h, DiagonalBlocks(Lc_d, "[o⊙τ⊙f ; f]")), L_theta

    def __repr__(self) -> str:
        bias = "" if "b" in self.params else ", bias=False"
        return f"LSTMCell({self.n_in}→{self.n_hidden}{bias})"
