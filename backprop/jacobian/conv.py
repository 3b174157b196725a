"""Convolutions: ``Convolution`` (doubly-block Toeplitz), ``ConvolutionTranspose``,
``ConvolutionWeight``, and the window arithmetic they share.

A 2-D cross-correlation ``y = conv(x; W)`` (as ``torch.nn.functional.conv2d``)
is linear in ``x`` and linear in ``W``. Per example (textbook ch. 24: "a conv
layer is a linear layer whose W is Toeplitz"):

- ``L^x`` is the doubly-block Toeplitz matrix ``(c_out·Ho·Wo, c_in·H·W)``: row
  ``(o, i, j)`` holds ``W[o, c, ky, kx]`` at column ``(c, i·sh - ph + ky·dh, j·sw
  - pw + kx·dw)`` for every tap that lands inside the unpadded input. ``L u`` is
  the convolution of ``u``, ``g L`` the transposed convolution of ``g``. It depends
  only on ``W`` and the geometry, so it is shared by the batch.
- ``L^W`` is ``I ⊗ X_colᵀ`` (``KroneckerMatrix(c_out, X_colᵀ, rows="channels")``)
  over the im2col patches ``X_col``, one block per group of channels.

A transposed convolution (``torch.nn.functional.conv_transpose2d``) is the
adjoint of a convolution: its ``L^x`` is ``Convolution``'s transpose
(``ConvolutionTranspose``), its ``L^W`` a ``ConvolutionWeight(transposed=True)``.

The module holds the shared arithmetic too: ``ConvGeometry`` (sizes, strides,
padding, dilation, groups), ``unfold`` (im2col), ``fold`` (its adjoint, col2im),
``conv2d``, ``conv2d_transpose``, ``conv2d_weight_grad`` and ``taps``, the
structural nonzeros of the Toeplitz matrix built from the geometry alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.lib.stride_tricks import sliding_window_view

from backprop.jacobian.algebra import sum_rule
from backprop.jacobian.base import Jacobian, index_dtype, sum_label

__all__ = [
    "ConvGeometry",
    "Convolution",
    "ConvolutionTranspose",
    "ConvolutionWeight",
    "conv2d",
    "conv2d_transpose",
    "conv2d_weight_grad",
    "fold",
    "taps",
    "unfold",
]

Pair = tuple[int, int]


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution from ``(c_in, H, W)`` to ``(c_out, Ho, Wo)`` with a ``kh × kw``
    kernel; ``W`` is ``(c_out, c_in // groups, kh, kw)`` as in PyTorch."""

    c_in: int
    H: int
    W: int
    c_out: int
    kernel: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1

    @property
    def Ho(self) -> int:
        return (self.H + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // (
            self.stride[0]
        ) + 1

    @property
    def Wo(self) -> int:
        return (self.W + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // (
            self.stride[1]
        ) + 1

    @property
    def P(self) -> int:
        """Output positions per channel, ``Ho·Wo``."""
        return self.Ho * self.Wo

    @property
    def Kg(self) -> int:
        """Entries of one patch within a group: ``(c_in / groups)·kh·kw``."""
        return self.c_in // self.groups * self.kernel[0] * self.kernel[1]

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def in_size(self) -> int:
        return self.c_in * self.H * self.W

    @property
    def out_size(self) -> int:
        return self.c_out * self.P

    def describe(self) -> str:
        """``"stride 1, padding 1"`` and any dilation or groups: the words of a ``repr``."""
        words = [f"stride {_pair_text(self.stride)}", f"padding {_pair_text(self.padding)}"]
        if self.dilation != (1, 1):
            words.append(f"dilation {_pair_text(self.dilation)}")
        if self.groups != 1:
            words.append(f"groups {self.groups}")
        return ", ".join(words)

    @cached_property
    def _taps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _build_taps(self)


def _pair_text(p: Pair) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}×{p[1]}"


# -- the arithmetic: im2col, col2im, and the three products ------------------------------


def unfold(x: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """im2col: ``x`` ``(B, c_in, H, W)`` as patches ``(B, groups, Kg, P)``.

    ``cols[b, g, (c, ky, kx), (i, j)] = x_pad[b, g·Cg + c, i·sh + ky·dh, j·sw + kx·dw]``,
    the patch entries in the order of ``W[o].ravel()`` (zero where a tap falls on
    the padding).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw][:, :, : geo.Ho, : geo.Wo]
    B = x.shape[0]
    # (B, C, Ho, Wo, kh, kw) -> (B, C, kh, kw, Ho, Wo): one copy, in GEMM order
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(B, geo.groups, geo.Kg, geo.P)


def fold(cols: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """col2im, the adjoint of ``unfold``: patches ``(B, groups, Kg, P)`` summed back
    into ``(B, c_in, H, W)`` (overlapping windows add; padding is dropped)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    B, Ho, Wo = cols.shape[0], geo.Ho, geo.Wo
    c6 = cols.reshape(B, geo.c_in, kh, kw, Ho, Wo)
    out = np.zeros((B, geo.c_in, geo.H + 2 * ph, geo.W + 2 * pw), dtype=cols.dtype)
    for ky in range(kh):
        rows = slice(ky * dh, ky * dh + sh * (Ho - 1) + 1, sh)
        for kx in range(kw):
            out[:, :, rows, kx * dw : kx * dw + sw * (Wo - 1) + 1 : sw] += c6[:, :, ky, kx]
    if ph or pw:
        out = np.ascontiguousarray(out[:, :, ph : ph + geo.H, pw : pw + geo.W])
    return out


def _grouped(W: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """``W`` ``(c_out, Cg, kh, kw)`` as ``(groups, c_out / groups, Kg)``."""
    return W.reshape(geo.groups, geo.c_out // geo.groups, geo.Kg)


def conv2d(x: np.ndarray, W: np.ndarray, geo: ConvGeometry, cols: Any = None) -> np.ndarray:
    """``y = conv(x; W)``, ``(B, c_out, Ho, Wo)``, without bias: one matrix product per
    group, ``W_g X_col`` (``cols``: the patches of ``x``, when already at hand)."""
    if cols is None:
        cols = unfold(x, geo)
    y = np.matmul(_grouped(W, geo), cols)  # (B, groups, c_out/groups, P)
    return y.reshape(cols.shape[0], geo.c_out, geo.Ho, geo.Wo)


def conv2d_transpose(g: np.ndarray, W: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """``g L^x`` of ``conv(·; W)``: ``g`` ``(B, c_out, Ho, Wo)`` to ``(B, c_in, H, W)``,
    ``fold(W_gᵀ g)`` (the transposed convolution).

    ``fold`` with the batch as the last axis: ``g`` copied to ``(groups, c_out/groups,
    P·B)``, one matrix product per group for the whole batch, the ``kh·kw`` adds into
    ``(c_in, H, W, B)``, each over runs of ``Wo·B`` contiguous entries rather than
    ``Wo``, and one copy back. ``benchmarks/conv_paths.py`` measured it 1.4 to 2.7
    times faster than ``fold`` on ``(B, c_in, H, W)`` for the second conv layers of
    the digits CNN and LeNet-5; on their first layers (``c_in = 1``, whose input
    gradient a training step does not need) from 1.2 times faster to 1.9 slower.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    B, G, Ho, Wo = g.shape[0], geo.groups, geo.Ho, geo.Wo
    g_last = g.reshape(B, G, -1, geo.P).transpose(1, 2, 3, 0).reshape(G, -1, geo.P * B)
    cols = np.matmul(_grouped(W, geo).transpose(0, 2, 1), g_last)  # (G, Kg, P·B)
    c6 = cols.reshape(geo.c_in, kh, kw, Ho, Wo, B)
    out = np.zeros((geo.c_in, geo.H + 2 * ph, geo.W + 2 * pw, B), dtype=cols.dtype)
    for ky in range(kh):
        rows = slice(ky * dh, ky * dh + sh * (Ho - 1) + 1, sh)
        for kx in range(kw):
            out[:, rows, kx * dw : kx * dw + sw * (Wo - 1) + 1 : sw] += c6[:, ky, kx]
    return np.ascontiguousarray(out[:, ph : ph + geo.H, pw : pw + geo.W].transpose(3, 0, 1, 2))


def conv2d_weight_grad(g: np.ndarray, cols: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """``Σ_b g_b L^W_b`` in ``W``'s shape: ``Σ_b G_b X_colᵀ`` per group, where ``g`` is
    ``(B, c_out, Ho, Wo)`` and ``cols`` the patches ``(B, groups, Kg, P)``."""
    B, G = g.shape[0], geo.groups
    gg = g.reshape(B, G, geo.c_out // G, geo.P)
    if geo.P >= 64:
        # B products G_b X_colᵀ and their sum: measured 2 to 8 times faster than one
        # contraction over (b, p) on the first layers of the digits CNN and LeNet-5,
        # whose patches are short; at par or slower below 64 positions.
        dW = np.matmul(gg, cols.transpose(0, 1, 3, 2)).sum(axis=0)
    elif G == 1:
        dW = np.tensordot(gg[:, 0], cols[:, 0], axes=([0, 2], [0, 2]))
    else:
        dW = np.einsum("bgop,bgkp->gok", gg, cols, optimize=True)
    return dW.reshape(geo.weight_shape)


# -- the structural nonzeros, from the geometry alone ------------------------------------


def _axis_taps(n_in: int, n_out: int, k: int, s: int, p: int, d: int) -> tuple[np.ndarray, ...]:
    """Along one axis: the (output index, tap, input index) of every tap that lands
    inside the unpadded input."""
    out, tap = np.meshgrid(np.arange(n_out), np.arange(k), indexing="ij")
    idx = out * s - p + tap * d
    keep = (idx >= 0) & (idx < n_in)
    return out[keep], tap[keep], idx[keep]


def _build_taps(geo: ConvGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    iy, ky, y = _axis_taps(geo.H, geo.Ho, kh, sh, ph, dh)
    ix, kx, x = _axis_taps(geo.W, geo.Wo, kw, sw, pw, dw)
    # every valid row tap with every valid column tap: (ny, nx)
    pos = (iy[:, None] * geo.Wo + ix[None, :]).ravel()  # output position i·Wo + j
    tap = (ky[:, None] * kw + kx[None, :]).ravel()  # tap ky·kw + kx
    inp = (y[:, None] * geo.W + x[None, :]).ravel()  # input position
    Cg, og = geo.c_in // geo.groups, geo.c_out // geo.groups
    o = np.arange(geo.c_out)[:, None, None]
    c = np.arange(Cg)[None, :, None]
    channel = (o // og) * Cg + c  # the input channel of local channel c for output o
    it = index_dtype(geo.out_size, geo.in_size, int(np.prod(geo.weight_shape)))
    shape = (geo.c_out, Cg, pos.size)
    rows = np.broadcast_to(o * geo.P + pos, shape).ravel().astype(it)
    cols = np.broadcast_to(channel * (geo.H * geo.W) + inp, shape).ravel().astype(it)
    widx = np.broadcast_to((o * Cg + c) * (kh * kw) + tap, shape).ravel().astype(it)
    return rows, cols, widx


def taps(geo: ConvGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The structural nonzeros of the Toeplitz matrix ``L^x`` of ``conv(·; W)``:
    ``(rows, cols, widx)``, one entry per (output entry, kernel tap) that lands
    inside the unpadded input, with ``L^x[rows, cols] = W.ravel()[widx]``.

    Built from the geometry alone, vectorized, and cached on it (read-only).
    """
    found = geo._taps
    for a in found:
        a.setflags(write=False)
    return found


def taps_count(geo: ConvGeometry) -> int:
    """``len(taps(geo)[0])`` without building them: the count is separable in the axes."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    ny = _axis_taps(geo.H, geo.Ho, kh, sh, ph, dh)[0].size
    nx = _axis_taps(geo.W, geo.Wo, kw, sw, pw, dw)[0].size
    return geo.c_out * (geo.c_in // geo.groups) * ny * nx


# -- the Jacobians -------------------------------------------------------------------------


class Convolution(Jacobian):
    """``L^x`` of ``y = conv(x; W)``: the doubly-block Toeplitz matrix, shared by the batch.

    Per example ``(c_out·Ho·Wo, c_in·H·W)``, rows and columns in the row-major order
    of ``(c_out, Ho, Wo)`` and ``(c_in, H, W)``. ``L u`` is the convolution of ``u``
    (``conv2d``), ``g L`` the transposed convolution of ``g`` (``conv2d_transpose``),
    and ``Σ_b g_b L`` that of ``Σ_b g_b``. ``to_sparse`` stores exactly the
    structural nonzeros: one entry per (output entry, kernel tap) that lands inside
    the unpadded input (``taps``); taps on the zero padding are not stored.
    """

    kind = "Convolution"
    shared = True

    def __init__(self, W: np.ndarray, geo: ConvGeometry, batch: int, label: str = "") -> None:
        if W.shape != geo.weight_shape:
            raise ValueError(
                f"Convolution: W has shape {W.shape}, the geometry needs {geo.weight_shape}"
            )
        label = label or f"W {'×'.join(map(str, W.shape))}, {geo.describe()}"
        super().__init__((geo.out_size, geo.in_size), batch, W.dtype, label)
        self.W, self.geo = W, geo

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        geo = self.geo
        g4 = g.reshape(g.shape[0], geo.c_out, geo.Ho, geo.Wo)
        return conv2d_transpose(g4, self.W, geo).reshape(g.shape[0], -1)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self._vjp(g.sum(axis=0, keepdims=True))[0]

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        geo = self.geo
        u4 = u.reshape(u.shape[0], geo.c_in, geo.H, geo.W)
        return conv2d(u4, self.W, geo).reshape(u.shape[0], -1)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        rows, cols, widx = taps(self.geo)
        return sp.csr_array((self.W.ravel()[widx], (rows, cols)), shape=self.shape)

    def _dense(self) -> np.ndarray:
        return np.broadcast_to(self.to_sparse(0).toarray(), (self.batch, *self.shape)).copy()

    @property
    def nnz(self) -> int:
        return taps_count(self.geo)

    def _details(self) -> str:
        return " (doubly-block Toeplitz)"


class ConvolutionTranspose(Jacobian):
    """``L^x`` of a transposed convolution: the transpose of a ``Convolution``.

    ``conv`` is the convolution whose adjoint this is: it maps the transposed
    convolution's output ``(c_out, Ho, Wo)`` to its input ``(c_in, H, W)``, with
    ``W`` ``(c_in, c_out / groups, kh, kw)`` (PyTorch's layout of a transposed
    convolution's weight is that of this convolution). So ``L u`` is ``conv``'s
    ``g L`` and ``g L`` is ``conv``'s ``L u``; the sparse form is ``conv``'s,
    transposed, with the same structural nonzeros.
    """

    kind = "ConvolutionTranspose"
    shared = True

    def __init__(self, conv: Convolution, output_padding: Pair = (0, 0), label: str = "") -> None:
        geo = conv.geo
        extra = "" if output_padding == (0, 0) else f", output_padding {_pair_text(output_padding)}"
        label = label or f"W {'×'.join(map(str, conv.W.shape))}, {geo.describe()}{extra}"
        super().__init__((conv.shape[1], conv.shape[0]), conv.batch, conv.dtype, label)
        self.conv = conv
        self.output_padding = output_padding

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        return self.conv._jvp(g)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        return self.conv._jvp(g.sum(axis=0, keepdims=True))[0]

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        return self.conv._vjp(u)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        return sp.csr_array(self.conv.to_sparse(0).T.tocsr())

    def _dense(self) -> np.ndarray:
        return np.broadcast_to(self.to_sparse(0).toarray(), (self.batch, *self.shape)).copy()

    @property
    def nnz(self) -> int:
        return self.conv.nnz

    def _details(self) -> str:
        return " (transpose of a doubly-block Toeplitz)"


class ConvolutionWeight(Jacobian):
    """``L^W`` of ``y = conv(x; W)`` (or, ``transposed``, of ``y = convᵀ(x; W)``), per example.

    ``geo`` is the convolution's geometry, ``x`` ``(B, *input)`` the data. For a
    convolution ``x`` is its input ``(B, c_in, H, W)`` and ``L^W[(o, p), w] = x_b``
    at the input entry that tap ``w`` of output ``(o, p)`` reads: ``I ⊗ X_colᵀ``
    within each group of channels (block diagonal over the groups). For a
    transposed convolution ``x`` is ``(B, c_out, Ho, Wo)`` in ``geo``'s terms (the
    transposed convolution's input) and ``L^W[(c, q), w] = x_b[o, p]`` wherever the
    Toeplitz matrix of ``geo`` has ``W[w]`` at ``(o, p), (c, q)``. Products are one
    matrix product per example and group over the patches; the sparse form stores
    the structural nonzeros of ``taps`` (patch entries on the padding are not stored).
    """

    kind = "ConvolutionWeight"

    def __init__(
        self, x: np.ndarray, geo: ConvGeometry, *, transposed: bool = False, label: str = ""
    ) -> None:
        n_w = int(np.prod(geo.weight_shape))
        M = geo.in_size if transposed else geo.out_size
        need = (geo.c_out, geo.Ho, geo.Wo) if transposed else (geo.c_in, geo.H, geo.W)
        if x.shape[1:] != need:
            raise ValueError(f"ConvolutionWeight: x has shape {x.shape}, expected (B, {need})")
        label = label or ("convᵀ(x_b; ·)" if transposed else "I ⊗ X_colᵀ per group")
        super().__init__((M, n_w), x.shape[0], x.dtype, label)
        self.x, self.geo, self.transposed = x, geo, transposed
        self._cols: np.ndarray | None = None

    @property
    def cols(self) -> np.ndarray:
        """The patches of ``x`` (a convolution) ``(B, groups, Kg, P)``, built once."""
        if self._cols is None:
            self._cols = unfold(self.x, self.geo)
        return self._cols

    def _split(self, a: np.ndarray, channels: int) -> np.ndarray:
        """Rows ``(B, channels·positions)`` as ``(B, groups, channels/groups, positions)``."""
        return a.reshape(a.shape[0], self.geo.groups, channels // self.geo.groups, -1)

    def _vjp(self, g: np.ndarray) -> np.ndarray:
        geo, B = self.geo, self.batch
        if not self.transposed:  # G_b X_colᵀ per group
            dW = np.matmul(self._split(g, geo.c_out), self.cols.transpose(0, 1, 3, 2))
        else:  # x_b unfold(g_b)ᵀ per group
            cols_g = unfold(g.reshape(B, geo.c_in, geo.H, geo.W), geo)
            dW = np.matmul(
                self._split(self.x.reshape(B, -1), geo.c_out), cols_g.transpose(0, 1, 3, 2)
            )
        return dW.reshape(B, -1)

    def _vjp_sum(self, g: np.ndarray) -> np.ndarray:
        geo, B = self.geo, self.batch
        if not self.transposed:
            return conv2d_weight_grad(
                g.reshape(B, geo.c_out, geo.Ho, geo.Wo), self.cols, geo
            ).ravel()
        cols_g = unfold(g.reshape(B, geo.c_in, geo.H, geo.W), geo)
        return conv2d_weight_grad(self.x, cols_g, geo).ravel()

    def _jvp(self, u: np.ndarray) -> np.ndarray:
        geo, B = self.geo, self.batch
        U = u.reshape(B, geo.groups, geo.c_out // geo.groups, geo.Kg)  # one W per example
        if not self.transposed:  # conv(x_b; U_b)
            return np.matmul(U, self.cols).reshape(B, -1)
        cols = np.matmul(U.transpose(0, 1, 3, 2), self._split(self.x.reshape(B, -1), geo.c_out))
        return fold(cols, geo).reshape(B, -1)

    def to_sparse(self, b: int = 0) -> sp.csr_array:
        rows, cols, widx = taps(self.geo)
        if self.transposed:  # y[cols] gets W[widx]·x[rows]
            data, r = self.x[b].ravel()[rows], cols
        else:  # y[rows] gets W[widx]·x[cols]
            data, r = self.x[b].ravel()[cols], rows
        return sp.csr_array((data, (r, widx)), shape=self.shape)

    @property
    def nnz(self) -> int:
        return taps_count(self.geo)

    def _details(self) -> str:
        return f" ({self.geo.describe()})"


# -- rules ---------------------------------------------------------------------------


@sum_rule(Convolution, Convolution)
def _convolution_sum(a: Convolution, b: Convolution) -> Jacobian | None:
    """Two convolutions of the same geometry: the convolution by ``W_a + W_b``."""
    if a.geo != b.geo:
        return None
    return Convolution(a.W + b.W, a.geo, a.batch, sum_label(a, b))


@sum_rule(ConvolutionTranspose, ConvolutionTranspose)
def _convolution_transpose_sum(a: ConvolutionTranspose, b: ConvolutionTranspose) -> Jacobian | None:
    if a.conv.geo != b.conv.geo:
        return None
    conv = Convolution(a.conv.W + b.conv.W, a.conv.geo, a.batch)
    return ConvolutionTranspose(conv, a.output_padding, sum_label(a, b))
