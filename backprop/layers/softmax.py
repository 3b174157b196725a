"""``Softmax`` and ``LogSoftmax`` along one axis of each example, as PyTorch.

``axis`` counts the axes of the batch tensor, as torch's ``dim`` (axis 0, the
batch, is refused: a softmax across examples would couple them). A softmax
"row" is the set of entries that share every index but ``axis``; an example of
``R`` rows of ``n`` entries has, per example,

- Softmax: ``L^x = (diag(p) − Σ_r p_r p_rᵀ) / τ``, where ``p_r`` is ``p`` on row
  ``r`` and zero elsewhere: ``DiagonalPlusLowRank`` with one column per row
  (``d = p/τ``, ``U[:, r] = −p_r/τ``, ``V[:, r] = p_r``); rank 1,
  ``diag(p) − p pᵀ``, when the axis is the last one and the example is one row.
  With a mask (attention), ``p`` is zero at the masked entries and the same form
  holds;
- LogSoftmax: ``L^x = I − Σ_r 1_r p_rᵀ`` (``d = 1``, ``U[:, r] = −1_r``,
  ``V[:, r] = p_r``).

Storing the factors costs ``N·R`` numbers per example (``N²/n``): plain for rows
of a few classes, and the price of one uniform structure for any axis.

Second order, per row, with ``ṗ = p ⊙ (ż − <p, ż>)`` the tangent of ``p`` for
``ż = ẋ/τ``: the backward pass of Softmax, ``(g ⊙ p − p <g, p>)/τ``, moves by
``(g ⊙ ṗ − ṗ <g, p> − p <g, ṗ>)/τ``; that of LogSoftmax, ``g − p Σg``, by
``−ṗ Σg``. These are the Hessians of ``<g, softmax>`` and ``<g, log softmax>``
times ``ẋ``. A masked entry has ``p = 0``, so ``ṗ = 0`` there and none of these
terms reaches it or reads its ``ẋ``: masked entries carry no curvature, and a row with
every entry masked gives zeros. The mask, data, takes no tangent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.jacobian import DiagonalPlusLowRank, Jacobian
from backprop.layer import Layer, OperatingPoint

__all__ = ["LogSoftmax", "Softmax"]


def _axis(layer: Layer, axis: int, x_in: np.ndarray) -> int:
    """``axis`` of ``x_in`` as a non-negative int, or a ``ValueError`` naming ``layer``."""
    a = axis + x_in.ndim if axis < 0 else axis
    if not 0 <= a < x_in.ndim:
        raise ValueError(f"{layer!r}: axis {axis} is out of range for x_in of shape {x_in.shape}")
    if a == 0:
        raise ValueError(
            f"{layer!r}: axis {axis} is the batch axis of x_in {x_in.shape}; a softmax runs "
            f"along an axis of each example (axis counts the batch axis, as torch's dim)"
        )
    return a


def _rows(shape: tuple[int, ...], a: int, dtype: Any) -> np.ndarray:
    """``(N, R)``: entry ``i`` of one example (shape ``shape``, C order) is in row ``r``.

    ``a`` is the softmax axis among the example's axes.
    """
    others = shape[:a] + shape[a + 1 :]
    R = int(np.prod(others, dtype=np.int64))
    row = np.broadcast_to(np.expand_dims(np.arange(R).reshape(others), a), shape).reshape(-1)
    return (row[:, None] == np.arange(R)[None, :]).astype(dtype)


#: By item size (float32, float64): within ±bound, exp neither overflows, even summed
#: over 10^9 entries, nor underflows below the normal numbers.
_NO_SHIFT = {4: 64.0, 8: 600.0}


def _check_axis(where: str, axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{where}: axis must be an integer, got {axis!r}")
    return int(axis)


class Softmax(Layer):
    """``x_out = softmax(x_in / τ)`` along ``axis`` (``torch.softmax(x / τ, dim=axis)``),
    optionally masked.

    Any shape ``(B, *shape)`` in and out; ``temperature`` ``τ > 0``.

    Masking, for attention: a masked entry is left out of its row, whose mass goes to
    the entries still allowed (as filling the masked scores with ``−∞`` first). Two
    ways, which combine:

    - ``causal=True``: along the last axis, entry ``[..., i, j]`` of the trailing
      ``(T_q, T_k)`` matrices is masked when ``j > i`` (query ``i`` sees the keys up to
      ``i``), as ``torch.nn.Transformer.generate_square_subsequent_mask`` (aligned at
      the top left when ``T_q ≠ T_k``, as torch's ``is_causal``);
    - ``masked=True``: the layer takes a second input ``mask``, booleans with True
      where an entry is left out (PyTorch's convention). Its shape is ``(B, *s)``,
      ``s`` broadcasting against one example's shape aligned at the trailing axes, as
      numpy aligns: a key padding mask ``(B, T)`` against attention scores
      ``(B, h, T, T)`` masks the same keys for every head and query. The mask is data:
      it gets no gradient (``None``) and no Jacobian.

    A row whose entries are all masked has no distribution to give: its output and
    its gradient are zeros, never NaN (``exp(−∞)/0``). Masked entries are outputs
    that no input moves, and inputs that move no output: the Jacobian keeps its form
    below, with ``p`` zero there, so their rows and columns are zero.
    """

    mask_inputs = frozenset({"mask"})

    def __init__(
        self,
        axis: int = -1,
        temperature: float = 1.0,
        *,
        causal: bool = False,
        masked: bool = False,
    ) -> None:
        super().__init__()
        self.axis = _check_axis("Softmax", axis)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float | np.floating)
            or not temperature > 0
            or not np.isfinite(temperature)
        ):
            raise ValueError(f"Softmax: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.causal, self.masked = bool(causal), bool(masked)
        if self.masked:
            self.inputs = ("x_in", "mask")
        self._triangles: dict[tuple[int, int], np.ndarray] = {}
        self._ones: dict[tuple[int, Any], np.ndarray] = {}

    def _check(self, x_in: np.ndarray, mask: np.ndarray | None = None) -> None:
        a = _axis(self, self.axis, x_in)
        if self.causal and (x_in.ndim < 3 or a != x_in.ndim - 1):
            raise ValueError(
                f"{self!r}: causal masking runs along the last axis of (B, ..., T_q, T_k) "
                f"scores; got x_in of shape {x_in.shape} and axis {self.axis}"
            )
        if mask is not None:
            s, shape = mask.shape[1:], x_in.shape[1:]
            fits = len(s) <= len(shape) and all(
                m in (1, n) for m, n in zip(s, shape[len(shape) - len(s) :], strict=True)
            )
            if not fits:
                raise ValueError(
                    f"{self!r}: mask of shape {mask.shape} does not broadcast against x_in of "
                    f"shape {x_in.shape}: after the batch axis, its axes align with the last "
                    f"axes of x_in and each is 1 or the same size"
                )

    def _blocked(self, x_in: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        """The masked entries, broadcastable against ``x_in`` (None: nothing masked)."""
        blocked = None
        if mask is not None and mask.any():
            lead = (1,) * (x_in.ndim - mask.ndim)
            blocked = mask.reshape(mask.shape[0], *lead, *mask.shape[1:])
        if self.causal:
            T = x_in.shape[-2:]
            tri = self._triangles.get(T)
            if tri is None:
                tri = self._triangles[T] = np.triu(np.ones(T, dtype=bool), k=1)
            blocked = tri if blocked is None else blocked | tri
        return blocked

    def _forward(
        self, op: OperatingPoint, x_in: np.ndarray, mask: np.ndarray | None = None
    ) -> np.ndarray:
        a = _axis(self, self.axis, x_in)
        z = x_in if self.temperature == 1.0 else x_in / np.asarray(self.temperature, x_in.dtype)
        blocked = self._blocked(x_in, mask)
        # The shift by each row's maximum only keeps exp from overflowing (softmax does
        # not change). Within ±_NO_SHIFT no exp over- or underflows, and two reductions
        # over all entries are much cheaper than one along rows of a few entries.
        bound = _NO_SHIFT[z.dtype.itemsize]
        shift = not (-bound <= float(z.min()) and float(z.max()) <= bound) if z.size else False
        if blocked is not None:
            z = np.where(blocked, -np.inf, z)
        if shift:
            top = z.max(axis=a, keepdims=True)
            top[np.isneginf(top)] = 0  # a row with nothing allowed: e = 0 there
            e = z - top
            np.exp(e, out=e)
        else:
            e = np.exp(z)
        total = self._row_sums(e, a)
        if blocked is not None:
            total[total == 0] = 1  # ... and x_out = 0, not 0/0
        e /= total
        return e

    def _row_sums(self, e: np.ndarray, a: int) -> np.ndarray:
        """``e.sum(axis=a, keepdims=True)``; along the last axis as the product with a
        vector of ones (several times faster for rows of a few entries)."""
        if a != e.ndim - 1:
            return e.sum(axis=a, keepdims=True)
        key = (e.shape[-1], e.dtype)
        ones = self._ones.get(key)
        if ones is None:
            ones = self._ones[key] = np.ones(e.shape[-1], e.dtype)
        return (e @ ones)[..., None]

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return (None, None) if self.masked else None, {}
        p, a = op.x_out, _axis(self, self.axis, op.x_out)
        g_in = g_out * p  # p ⊙ (g − Σ_row g p), in place
        g_in -= p * self._row_sums(g_in, a)
        if self.temperature != 1.0:
            g_in /= np.asarray(self.temperature, p.dtype)
        return ((g_in, None) if self.masked else g_in), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Any, dict[str, Jacobian]]:
        p = op.x_out
        B, a, t = p.shape[0], _axis(self, self.axis, p), self.temperature
        rows = _rows(p.shape[1:], a - 1, p.dtype)
        flat = p.reshape(B, -1)
        if rows.shape[1] == 1 and t == 1.0:
            L: Jacobian = DiagonalPlusLowRank.softmax(flat)
        else:
            tau = np.asarray(t, p.dtype)
            U = -(flat / tau)[:, :, None] * rows[None]
            V = flat[:, :, None] * rows[None]
            label = "diag(p) − p pᵀ" if rows.shape[1] == 1 else "diag(p) − Σ_rows p_r p_rᵀ"
            L = DiagonalPlusLowRank(flat / tau, U, V, f"({label})/{t:g}" if t != 1 else label)
        return ((L, None) if self.masked else L), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        dx = dx_in[0]  # (a mask, the second input, takes none)
        if dx is None:
            return None
        p, a = op.x_out, _axis(self, self.axis, op.x_out)
        return _moved(p, dx / np.asarray(self.temperature, p.dtype), a)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        dx = dx_in[0]
        if dx is None:
            return None
        p, a = op.x_out, _axis(self, self.axis, op.x_out)
        tau = np.asarray(self.temperature, p.dtype)
        dp = _moved(p, dx / tau, a)  # zero where p is: at every masked entry
        h = g_out * dp - dp * (g_out * p).sum(axis=a, keepdims=True)
        h -= p * (g_out * dp).sum(axis=a, keepdims=True)
        h /= tau
        return ((h, None) if self.masked else (h,)), {}

    def __repr__(self) -> str:
        t = f", temperature={self.temperature:g}" if self.temperature != 1.0 else ""
        masks = (", causal=True" if self.causal else "") + (", masked=True" if self.masked else "")
        return f"Softmax(axis={self.axis}{t}{masks})"


class LogSoftmax(Layer):
    """``x_out = x_in − logsumexp(x_in)`` along ``axis`` (``torch.log_softmax(x, dim=axis)``)."""

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        self.axis = _check_axis("LogSoftmax", axis)

    def _check(self, x_in: np.ndarray) -> None:
        _axis(self, self.axis, x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        a = _axis(self, self.axis, x_in)
        z = x_in - x_in.max(axis=a, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=a, keepdims=True))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        a = _axis(self, self.axis, op.x_out)
        return g_out - np.exp(op.x_out) * g_out.sum(axis=a, keepdims=True), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        p = np.exp(op.x_out)
        B, a = p.shape[0], _axis(self, self.axis, p)
        rows = _rows(p.shape[1:], a - 1, p.dtype)
        flat = p.reshape(B, -1)
        U = np.broadcast_to(-rows[None], (B, *rows.shape))
        V = flat[:, :, None] * rows[None]
        label = "I − 1 pᵀ" if rows.shape[1] == 1 else "I − Σ_rows 1_r p_rᵀ"
        return DiagonalPlusLowRank(np.ones_like(flat), U, V, label), {}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        (dx,) = dx_in  # ẋ − <p, ẋ> per row
        if dx is None:
            return None
        a = _axis(self, self.axis, op.x_out)
        return dx - (np.exp(op.x_out) * dx).sum(axis=a, keepdims=True)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        if not input_grad:  # its only term is on the inputs
            return None
        (dx,) = dx_in  # −ṗ Σg per row
        if dx is None:
            return None
        a = _axis(self, self.axis, op.x_out)
        dp = _moved(np.exp(op.x_out), dx, a)
        return (-dp * g_out.sum(axis=a, keepdims=True),), {}

    def __repr__(self) -> str:
        return f"LogSoftmax(axis={self.axis})"


def _moved(p: np.ndarray, dz: np.ndarray, a: int) -> np.ndarray:
    """``ṗ = p ⊙ (ż − <p, ż>)``: how ``p = softmax(z)`` moves along ``ż``, row by row."""
    return p * (dz - (p * dz).sum(axis=a, keepdims=True))
