"""Pooling and nearest-neighbour upsampling on images ``(B, C, H, W)``, as PyTorch.

Each output entry reads a window of one channel of the input; no layer here has a
parameter, and every ``L^x`` is a 0-1 or averaging matrix over the per-example
flattening ``(c, h, w)``:

- ``MaxPool2d``, ``GlobalMaxPool``: the output is the largest entry of its window,
  so per example ``L^x`` has one 1 per row, at the argmax, chosen by the data: an
  ``IndexSelection``. On a tie the first entry in row-major window order takes the
  whole gradient, as PyTorch's (a NaN wins over numbers, the last NaN over the
  others, and a window of nothing but -inf picks its first entry inside the input,
  as PyTorch's kernel does). Overlapping windows add their gradients.
- ``AvgPool2d``, ``GlobalAvgPool``: the output is the mean of its window, so
  ``L^x`` holds ``1/(kh·kw)`` at the window's entries, the same for every example: a
  ``Sparse`` matrix shared by the batch. Padding counts in the mean (PyTorch's
  default ``count_include_pad=True``) and gets no gradient.
- ``Upsample``: each output pixel copies the input pixel it falls in, so ``L^x`` has
  one 1 per row, shared by the batch (``Sparse``), and ``g_in`` sums ``g_out`` over
  each ``s_h × s_w`` block.

The window sizes follow ``torch.nn.MaxPool2d``: output height
``floor((H + 2 p_h - k_h) / s_h) + 1``, and likewise for the width. The windows are
read as ``k_h · k_w`` strided views of the (padded) input, one per offset in the
window: a max or a mean over windows is a max or a sum of those views, which costs
a few passes over the output and no copy of the windows.

Second order: every layer here is linear in its input, or piecewise linear with
the pieces chosen by the data (a max takes the argmax's value), so none adds a
second-order term; a tangent is moved as the input is (the max reads the tangent
at the argmax of the operating point).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import IndexSelection, Jacobian, Sparse
from backprop.layer import Layer, OperatingPoint
from backprop.layers.second_order import linear_hvp, linear_tangent

__all__ = ["AvgPool2d", "GlobalAvgPool", "GlobalMaxPool", "MaxPool2d", "Upsample"]


def _pair(where: str, what: str, value: Any, low: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, each at least ``low``) as a pair."""
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(pair) != 2 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in pair
    ):
        raise TypeError(f"{where}: {what} must be an int or a pair of ints, got {value!r}")
    if any(v < low for v in pair):
        least = "positive" if low == 1 else "non-negative"
        raise ValueError(f"{where}: {what} must be {least}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _show(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else str(pair)


def _at_argmax(flat: np.ndarray, dx: Any, shape: tuple[int, ...]) -> Any:
    """The tangent of a max: ``ẋ`` read at each window's argmax (``flat``, per example)."""
    if dx is None:
        return None
    B = dx.shape[0]
    return np.take_along_axis(dx.reshape(B, -1), flat.reshape(B, -1), axis=1).reshape(shape)


def _check_images(layer: Layer, x_in: np.ndarray) -> None:
    if x_in.ndim != 4:
        raise ValueError(
            f"{layer!r}: x_in has shape {x_in.shape}; it takes images of shape (B, C, H, W)"
            + (" (add a channel axis: x[:, None])" if x_in.ndim == 3 else "")
        )
    if x_in.shape[2] == 0 or x_in.shape[3] == 0:
        raise ValueError(f"{layer!r}: x_in has shape {x_in.shape}, with no pixel per channel")


class _Pool2d(Layer):
    """The windows shared by ``MaxPool2d`` and ``AvgPool2d`` (abstract)."""

    #: What a padded entry holds: -inf for a max, 0 for a mean.
    _pad_value = 0.0
    _tangent = linear_tangent  # a mean; the max reads the tangent at its argmax
    _hvp = linear_hvp

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        super().__init__()
        where = type(self).__name__
        self.kernel_size = _pair(where, "kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _pair(where, "stride", stride, 1)
        self.padding = _pair(where, "padding", padding, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(
                f"{where}: padding {_show(self.padding)} is more than half of kernel_size "
                f"{_show(self.kernel_size)}; a window could then hold nothing but padding "
                f"(PyTorch refuses it too: pad should be at most half of the kernel size)"
            )

    def _check(self, x_in: np.ndarray) -> None:
        _check_images(self, x_in)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        H, W = x_in.shape[2] + 2 * ph, x_in.shape[3] + 2 * pw
        if kh > H or kw > W:
            raise ValueError(
                f"{self!r}: the {kh}×{kw} window does not fit in x_in of shape {x_in.shape} "
                f"({x_in.shape[2]}×{x_in.shape[3]} per channel, {H}×{W} padded): "
                f"the output would be empty"
            )

    def _out_size(self, x_in: np.ndarray) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H, W = x_in.shape[2:]
        return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1

    def _views(self, x_in: np.ndarray) -> list[np.ndarray]:
        """One strided view per offset ``(a, b)`` of the window, in row-major order:
        view ``a·k_w + b`` holds, at ``(i, j)``, the entry at that offset of window
        ``(i, j)`` of the padded input."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ho, Wo = self._out_size(x_in)
        if ph or pw:
            x_in = np.pad(
                x_in, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=self._pad_value
            )
        return [
            x_in[:, :, a : a + (Ho - 1) * sh + 1 : sh, b : b + (Wo - 1) * sw + 1 : sw]
            for a in range(kh)
            for b in range(kw)
        ]

    def _window_entries(self, x_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns (in the unpadded input) of every window's entries:
        two ``(k_h·k_w, H_out, W_out)`` arrays, offsets in row-major order."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ho, Wo = self._out_size(x_in)
        a, b = np.divmod(np.arange(kh * kw), kw)
        rows = a[:, None, None] + np.arange(Ho)[None, :, None] * sh - ph
        cols = b[:, None, None] + np.arange(Wo)[None, None, :] * sw - pw
        return np.broadcast_arrays(rows, cols)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"{self.name}(kernel_size={_show(self.kernel_size)}, stride={_show(self.stride)}, "
            f"padding={_show(self.padding)})"
        )


class MaxPool2d(_Pool2d):
    """``x_out[b, c, i, j]`` = the largest entry of window ``(i, j)`` of channel ``c``.

    ``(B, C, H, W) → (B, C, H_out, W_out)``, as ``torch.nn.MaxPool2d(kernel_size,
    stride, padding)``: ``stride`` defaults to ``kernel_size``; padding is -inf and
    at most half the kernel. Per example ``L^x`` is an ``IndexSelection``: a 1 per
    row, at the window's argmax (the first maximal entry in row-major window order,
    as PyTorch picks). ``g_in`` scatters ``g_out`` to the argmaxes, adding where
    windows overlap. When the windows tile the input (stride = kernel, no padding)
    and no output is NaN, ``backward`` writes ``g_out`` straight into each window's
    first maximal entry, offset by offset; otherwise it goes through the
    ``IndexSelection``.
    """

    _pad_value = -np.inf

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        views = self._views(x_in)
        best = views[0].copy()
        for v in views[1:]:
            np.maximum(best, v, out=best)  # a NaN propagates, as in PyTorch
        return best

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        x_in, best = op.x_in[0], op.x_out
        if self.stride != self.kernel_size or self.padding != (0, 0) or np.isnan(best).any():
            return super()._backward(op, g_out, input_grad)  # through the IndexSelection
        if not input_grad:
            return None, {}
        # Windows that tile the input: (B, C, Ho·kh, Wo·kw) is (B, C, Ho, kh, Wo, kw),
        # and offset (a, b) of every window is the view [:, :, :, a, :, b].
        (kh, kw), (B, C, H, W), (Ho, Wo) = self.kernel_size, x_in.shape, best.shape[2:]
        x6 = x_in[:, :, : Ho * kh, : Wo * kw].reshape(B, C, Ho, kh, Wo, kw)
        tiled = (H, W) == (Ho * kh, Wo * kw)
        g_in = (np.empty if tiled else np.zeros)(x_in.shape, dtype=g_out.dtype)
        g6 = g_in[:, :, : Ho * kh, : Wo * kw].reshape(B, C, Ho, kh, Wo, kw)
        free = np.ones(best.shape, dtype=bool)  # windows whose max is still to be met
        for a in range(kh):
            for b in range(kw):  # row-major: the first maximal entry takes g_out
                hit = x6[:, :, :, a, :, b] == best
                hit &= free
                np.multiply(g_out, hit, out=g6[:, :, :, a, :, b])
                free ^= hit
        return g_in, {}

    def _argmax(self, op: OperatingPoint) -> np.ndarray:
        """Per example, the flat index in ``(C, H, W)`` of each window's argmax,
        ``(B, C·H_out·W_out)``; computed at the first need and kept in ``op``."""
        if "argmax" in op.saved:
            return op.saved["argmax"]
        x_in, best = op.x_in[0], op.x_out
        views = self._views(x_in)
        K = len(views)
        k = np.full(best.shape, K - 1, dtype=np.intp)
        for j in range(K - 2, -1, -1):  # the first offset holding the max wins
            k = np.where(views[j] == best, j, k)
        if np.isnan(best).any():  # PyTorch's kernel keeps the last NaN of a window
            for j in range(K):
                k = np.where(np.isnan(views[j]), j, k)
        # The flat index of offset (a, b) of window (i, j) within its channel is
        # (top_i + a)·W + left_j + b: a small table over the offsets plus the window's start.
        B, C, H, W = x_in.shape
        kw, (sh, sw), (ph, pw) = self.kernel_size[1], self.stride, self.padding
        Ho, Wo = best.shape[2:]
        top = np.arange(Ho)[:, None] * sh - ph
        left = np.arange(Wo)[None, :] * sw - pw
        a, b = np.divmod(np.arange(K), kw)
        in_channel = np.take(a * W + b, k) + (top * W + left)
        if (ph or pw) and np.isneginf(best).any():
            # Only a window of nothing but -inf can pick a padded entry; PyTorch's kernel
            # then keeps the window's first entry inside the input.
            rows, cols = top + a[k], left + b[k]
            outside = (rows < 0) | (rows >= H) | (cols < 0) | (cols >= W)
            first = np.maximum(top, 0) * W + np.maximum(left, 0)
            in_channel = np.where(outside, first, in_channel)
        flat = (in_channel + np.arange(C)[:, None, None] * (H * W)).reshape(B, -1)
        op.saved["argmax"] = flat
        return flat

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        return _at_argmax(self._argmax(op), dx_in[0], op.x_out.shape)

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_in = op.x_in[0]
        kh, kw = self.kernel_size
        return IndexSelection(
            self._argmax(op),
            int(x_in[0].size),
            x_in.dtype,
            f"argmax of {kh}×{kw} windows",
        ), {}


class AvgPool2d(_Pool2d):
    """``x_out[b, c, i, j]`` = the mean of window ``(i, j)`` of channel ``c``.

    ``(B, C, H, W) → (B, C, H_out, W_out)``, as ``torch.nn.AvgPool2d(kernel_size,
    stride, padding)`` (``count_include_pad=True``: the zero padding counts in the
    mean, which always divides by ``k_h·k_w``). ``L^x`` holds ``1/(k_h·k_w)`` at
    each window's entries inside the input, shared by the batch (``Sparse``);
    ``g_in`` adds ``g_out/(k_h·k_w)`` into every entry of each window.
    """

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        views = self._views(x_in)
        total = views[0].copy()
        for v in views[1:]:
            total += v
        return total / len(views)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        x_in = op.x_in[0]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ho, Wo = g_out.shape[2:]
        B, C, H, W = x_in.shape
        g_pad = np.zeros((B, C, H + 2 * ph, W + 2 * pw), dtype=g_out.dtype)
        share = g_out / (kh * kw)
        for a in range(kh):
            for b in range(kw):
                g_pad[:, :, a : a + (Ho - 1) * sh + 1 : sh, b : b + (Wo - 1) * sw + 1 : sw] += share
        return g_pad[:, :, ph : ph + H, pw : pw + W], {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_in = op.x_in[0]
        B, C, H, W = x_in.shape
        (kh, kw) = self.kernel_size
        rows, cols = self._window_entries(x_in)  # (K, Ho, Wo)
        K, Ho, Wo = rows.shape
        inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        out_index = np.broadcast_to(np.arange(Ho * Wo).reshape(1, Ho, Wo), rows.shape)
        o = out_index[inside]  # the output pixel each entry inside the input belongs to
        i = rows[inside] * W + cols[inside]
        channel = np.arange(C)[:, None]
        S = sp.csr_array(
            (
                np.full(C * o.size, 1 / (kh * kw), dtype=x_in.dtype),
                ((channel * (Ho * Wo) + o).ravel(), (channel * (H * W) + i).ravel()),
            ),
            shape=(C * Ho * Wo, C * H * W),
        )
        return Sparse(S, B, f"mean of {kh}×{kw} windows"), {}


class GlobalAvgPool(Layer):
    """``x_out[b, c]`` = the mean of channel ``c``: ``(B, C, H, W) → (B, C)``.

    As ``torch.nn.AdaptiveAvgPool2d(1)`` followed by a flatten. ``L^x`` holds
    ``1/(H·W)`` at each channel's entries, shared by the batch (``Sparse``); ``g_in``
    spreads ``g_out/(H·W)`` over every pixel of the channel.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def _check(self, x_in: np.ndarray) -> None:
        _check_images(self, x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return x_in.mean(axis=(2, 3))

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        shape = op.x_in[0].shape
        g_in = np.empty(shape, dtype=g_out.dtype)
        g_in[...] = (g_out / (shape[2] * shape[3]))[:, :, None, None]
        return g_in, {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_in = op.x_in[0]
        B, C, H, W = x_in.shape
        n = H * W
        S = sp.csr_array(
            (
                np.full(C * n, 1 / n, dtype=x_in.dtype),
                np.arange(C * n),
                np.arange(C + 1) * n,
            ),
            shape=(C, C * n),
        )
        return Sparse(S, B, f"mean of each channel's {H}×{W} pixels"), {}


class GlobalMaxPool(Layer):
    """``x_out[b, c]`` = the largest entry of channel ``c``: ``(B, C, H, W) → (B, C)``.

    As ``torch.nn.MaxPool2d((H, W))`` followed by a flatten, ties included (the first
    maximal pixel in row-major order takes the gradient). Per example ``L^x`` is an
    ``IndexSelection`` with one 1 per channel, at its argmax.
    """

    _hvp = linear_hvp

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        return _at_argmax(self._argmax(op), dx_in[0], op.x_out.shape)

    def _check(self, x_in: np.ndarray) -> None:
        _check_images(self, x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        B, C, H, W = x_in.shape
        return x_in.reshape(B, C, H * W).max(axis=2)

    def _argmax(self, op: OperatingPoint) -> np.ndarray:
        """Per example, the flat index in ``(C, H, W)`` of each channel's argmax."""
        if "argmax" in op.saved:
            return op.saved["argmax"]
        x_in = op.x_in[0]
        B, C, H, W = x_in.shape
        pixels = x_in.reshape(B, C, H * W)
        k = pixels.argmax(axis=2)  # the first maximum (or the first NaN)
        nan = np.isnan(op.x_out)
        if nan.any():  # PyTorch's kernel keeps the last NaN of a window
            last = H * W - 1 - np.isnan(pixels[:, :, ::-1]).argmax(axis=2)
            k = np.where(nan, last, k)
        flat = k + np.arange(C) * (H * W)
        op.saved["argmax"] = flat
        return flat

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_in = op.x_in[0]
        H, W = x_in.shape[2:]
        return IndexSelection(
            self._argmax(op),
            int(x_in[0].size),
            x_in.dtype,
            f"argmax of each channel's {H}×{W} pixels",
        ), {}


class Upsample(Layer):
    """Nearest-neighbour upsampling by whole factors: ``(B, C, H, W) → (B, C, s_h·H, s_w·W)``.

    ``x_out[b, c, i, j] = x_in[b, c, i // s_h, j // s_w]``, as
    ``torch.nn.Upsample(scale_factor=scale, mode="nearest")``; ``scale`` is a
    positive int or a pair of them. ``L^x`` has one 1 per row, shared by the batch
    (``Sparse``); ``g_in`` sums ``g_out`` over each ``s_h × s_w`` block.
    """

    _tangent = linear_tangent
    _hvp = linear_hvp

    def __init__(self, scale: Any) -> None:
        super().__init__()
        self.scale = _pair("Upsample", "scale", scale, 1)

    def _check(self, x_in: np.ndarray) -> None:
        _check_images(self, x_in)

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        return _upsample(x_in, self.scale)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        if not input_grad:
            return None, {}
        B, C, H, W = op.x_in[0].shape
        sh, sw = self.scale
        return g_out.reshape(B, C, H, sh, W, sw).sum(axis=(3, 5)), {}

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_in = op.x_in[0]
        n = int(x_in[0].size)
        picked = _upsample(np.arange(n).reshape(1, *x_in.shape[1:]), self.scale).ravel()
        m = picked.size
        S = sp.csr_array((np.ones(m, dtype=x_in.dtype), picked, np.arange(m + 1)), shape=(m, n))
        return Sparse(S, x_in.shape[0], f"nearest, ×{_show(self.scale)}"), {}

    def __repr__(self) -> str:
        return f"Upsample(scale={_show(self.scale)})"


def _upsample(x: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    B, C, H, W = x.shape
    sh, sw = scale
    wide = np.broadcast_to(x[:, :, :, None, :, None], (B, C, H, sh, W, sw))
    return wide.reshape(B, C, H * sh, W * sw)
