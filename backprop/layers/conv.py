"""Convolutions: ``Conv2d`` and ``ConvTranspose2d`` on images ``(B, C, H, W)``.

"A conv layer is a linear layer whose W is Toeplitz" (textbook ch. 24): per
example ``L^x`` is the doubly-block Toeplitz matrix of ``W`` (``Convolution``),
``L^W`` is ``I ⊗ X_colᵀ`` over the im2col patches, and ``L^b`` copies ``b[c]``
to every position of channel ``c``. The arithmetic (im2col, col2im) lives in
``backprop.jacobian.conv``, shared with the Jacobians.

Second order: like ``Linear``, a convolution is bilinear in ``(x_in, W)``. Along a
tangent ``(ẋ, Ẇ, ḃ)`` it moves by ``conv(ẋ; W) + conv(x_in; Ẇ) + ḃ``, and the
Hessian of ``<g_out, conv(x_in; W)>`` gives ``g_out``'s transposed convolution by
``Ẇ`` for ``x_in`` and the weight gradient of ``g_out`` against the patches of ``ẋ``
for ``W``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import Jacobian, KroneckerMatrix, Sparse
from backprop.jacobian.conv import (
    ConvGeometry,
    Convolution,
    ConvolutionTranspose,
    ConvolutionWeight,
    conv2d,
    conv2d_transpose,
    conv2d_weight_grad,
    unfold,
)
from backprop.layer import Layer, OperatingPoint, Parameter
from backprop.layers.linear import _given_dtype, weight_and_bias

__all__ = ["Conv2d", "ConvTranspose2d"]

Pair = tuple[int, int]


def _pair(where: str, what: str, v: Any, least: int) -> Pair:
    """An int or a pair of ints, each at least ``least``, as a pair."""
    pair = (v, v) if isinstance(v, int | np.integer) and not isinstance(v, bool) else v
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(a, int | np.integer) and not isinstance(a, bool) for a in pair)
    ):
        raise TypeError(f"{where}: {what} must be an int or a pair of ints, got {v!r}")
    if min(pair) < least:
        kind = "positive" if least == 1 else "non-negative"
        raise ValueError(f"{where}: {what} must be {kind}, got {v!r}")
    return (int(pair[0]), int(pair[1]))


def _text(p: Pair) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}×{p[1]}"


def _bias_jacobian(c: int, P: int, batch: int, dtype: Any) -> Jacobian:
    """``L^b``: output ``(c, p)`` is ``b[c]`` plus the rest, a 0-1 matrix ``I_c ⊗ 1_P``."""
    S = sp.csr_array(sp.kron(sp.eye_array(c, dtype=dtype), np.ones((P, 1), dtype=dtype)))
    return Sparse(S, batch, "I ⊗ 1_P: b[c] at every position of channel c")


def _plus_bias(out: Any, db: Any, shape: tuple[int, ...]) -> Any:
    """``out + ḃ[c]`` at every position of channel ``c`` (``out`` None: zeros of
    ``shape``), for a bias tangent ``ḃ`` ``(c_out,)`` or None."""
    if db is None:
        return out
    if out is None:
        return np.broadcast_to(db[:, None, None], shape).copy()
    out += db[:, None, None]
    return out


class _Conv(Layer):
    """What both convolutions share: arguments, parameters, the input check."""

    _transposed = False

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        bias: bool,
        W: Any,
        b: Any,
        rng: Any,
        dtype: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for what, n in (("c_in", c_in), ("c_out", c_out), ("groups", groups)):
            if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{name}: {what} must be a positive integer, got {n!r}")
        if c_in % groups or c_out % groups:
            raise ValueError(
                f"{name}: c_in ({c_in}) and c_out ({c_out}) must both be divisible by "
                f"groups ({groups})"
            )
        self.c_in, self.c_out, self.groups = int(c_in), int(c_out), int(groups)
        self._bias = bool(bias)
        self.kernel_size = _pair(name, "kernel_size", kernel_size, 1)
        self.stride = _pair(name, "stride", stride, 1)
        self.padding = _pair(name, "padding", padding, 0)
        self.dilation = _pair(name, "dilation", dilation, 1)
        if dtype is None:
            dtype = _given_dtype(W, b)
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"{name}: dtype must be float32 or float64, got {np.dtype(dtype)}")
        if b is not None and not bias:
            raise ValueError(f"{name}: b was given but bias=False")
        # PyTorch's layouts: (c_out, c_in/groups, kh, kw), transposed (c_in, c_out/groups, kh, kw)
        first, second = (c_in, c_out) if self._transposed else (c_out, c_in)
        w_shape = (first, second // groups, *self.kernel_size)
        fan_in = w_shape[1] * self.kernel_size[0] * self.kernel_size[1]
        where = repr(self)
        self.params.update(weight_and_bias(where, W, b, w_shape, c_out, fan_in, bias, rng, dtype))

    @property
    def W(self) -> Parameter:
        """The kernel, ``params["W"]``."""
        return self.params["W"]

    @property
    def b(self) -> Parameter | None:
        """The bias, ``params["b"]`` (None without one)."""
        return self.params.get("b")

    def _check(self, x_in: np.ndarray) -> None:
        if x_in.ndim != 4 or x_in.shape[1] != self.c_in:
            hint = " (add a batch axis: x[None])" if x_in.ndim == 3 else ""
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected (B, {self.c_in}, H, W){hint}"
            )

    def _apply(self, op: OperatingPoint, x: Any, W: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # abstract: the layer's map without bias

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        """``f(ẋ; W) + f(x_in; Ẇ) + ḃ``: the layer is bilinear in ``(x_in, W)``."""
        (dx,), dW = dx_in, dtheta.get("W")
        out = None if dx is None else self._apply(op, dx, op.theta["W"])
        if dW is not None:
            term = self._apply(op, None, dW)
            out = term if out is None else out + term
        return _plus_bias(out, dtheta.get("b"), op.x_out.shape)

    def _options(self) -> list[str]:
        words = []
        for what, v, default in (
            ("stride", self.stride, 1),
            ("padding", self.padding, 0),
            ("output_padding", getattr(self, "output_padding", (0, 0)), 0),
            ("dilation", self.dilation, 1),
        ):
            if v != (default, default):
                words.append(f"{what} {_text(v)}")
        if self.groups != 1:
            words.append(f"groups {self.groups}")
        if not self._bias:
            words.append("bias=False")
        return words

    def __repr__(self) -> str:
        words = [f"{self.c_in}→{self.c_out}", f"kernel {_text(self.kernel_size)}", *self._options()]
        return f"{type(self).__name__}({', '.join(words)})"


class Conv2d(_Conv):
    """2-D cross-correlation, exactly as ``torch.nn.Conv2d``.

    ``x_out[b, o, i, j] = b[o] + Σ_{c, ky, kx} W[o, c, ky, kx] x_pad[b, g·Cg + c,
    i·sh + ky·dh, j·sw + kx·dw]`` with ``g`` the group of ``o``: a linear layer
    (eq. 14.12) whose ``W`` is Toeplitz. Shapes: ``x_in`` is ``(B, c_in, H, W)``,
    ``x_out`` is ``(B, c_out, Ho, Wo)`` with ``Ho = ⌊(H + 2ph - dh(kh - 1) - 1)/sh⌋ + 1``,
    ``"W"`` is ``(c_out, c_in // groups, kh, kw)`` and ``"b"`` is ``(c_out,)``.
    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are ints or pairs.

    Jacobians per example: ``L^x`` is the doubly-block Toeplitz matrix
    (``Convolution``, shared by the batch); ``L^W`` is ``I ⊗ X_colᵀ`` over the
    im2col patches (``KroneckerMatrix(c_out, X_colᵀ, rows="channels")``; with
    ``groups > 1``, ``ConvolutionWeight``, that structure within each group); ``L^b``
    is ``I ⊗ 1_P`` (``Sparse``). The fast path is im2col plus one matrix product per
    group: ``x_out = W X_col`` forward, ``g_in = col2im(Wᵀ g_out)`` and ``dJ/dW =
    Σ_b g_out X_colᵀ`` backward, the patches cached by ``forward``.

    Initialization as ``torch.nn.Conv2d``: ``W`` and ``b`` uniform in
    ``±1/sqrt(fan_in)``, ``fan_in = (c_in / groups)·kh·kw``, drawn with ``rng``.
    ``W`` and ``b`` may be given as arrays or Parameters (tying); ``dtype`` as in
    ``Linear``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: Any,
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        W: Any = None,
        b: Any = None,
        rng: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            c_in, c_out, kernel_size, stride, padding, dilation, groups, bias, W, b, rng, dtype
        )

    def geometry(self, H: int, W: int) -> ConvGeometry:
        """The geometry of this layer on an ``H × W`` input."""
        return ConvGeometry(
            self.c_in, H, W, self.c_out, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups,
        )  # fmt: skip

    def _check(self, x_in: np.ndarray) -> None:
        super()._check(x_in)
        geo = self.geometry(*x_in.shape[2:])
        if geo.Ho < 1 or geo.Wo < 1:
            (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, self.dilation, self.padding
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}: its padded size "
                f"{x_in.shape[2] + 2 * ph}×{x_in.shape[3] + 2 * pw} is smaller than the "
                f"(dilated) kernel {dh * (kh - 1) + 1}×{dw * (kw - 1) + 1}"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        geo = self.geometry(*x_in.shape[2:])
        cols = unfold(x_in, geo)  # (B, groups, Kg, P): what backward and L^W need
        op.saved["geo"], op.saved["cols"] = geo, cols
        x_out = conv2d(x_in, op.theta["W"], geo, cols)
        if "b" in op.theta:
            x_out += op.theta["b"][:, None, None]
        return x_out

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        geo, cols = op.saved["geo"], op.saved["cols"]
        grads = {"W": conv2d_weight_grad(g_out, cols, geo)}
        if "b" in op.theta:
            grads["b"] = g_out.sum(axis=(0, 2, 3))
        g_in = conv2d_transpose(g_out, op.theta["W"], geo) if input_grad else None
        return g_in, grads

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        (x_in,) = op.x_in
        geo, cols, B = op.saved["geo"], op.saved["cols"], x_in.shape[0]
        L_theta: dict[str, Jacobian]
        if self.groups == 1:
            X = cols[:, 0].transpose(0, 2, 1)  # X_colᵀ per example, (B, P, c_in·kh·kw)
            L_theta = {"W": KroneckerMatrix(self.c_out, X, rows="channels", label="I ⊗ X_colᵀ")}
        else:
            L_theta = {"W": ConvolutionWeight(x_in, geo)}
        if "b" in op.theta:
            L_theta["b"] = _bias_jacobian(self.c_out, geo.P, B, x_in.dtype)
        return Convolution(op.theta["W"], geo, B), L_theta

    def _apply(self, op: OperatingPoint, x: Any, W: np.ndarray) -> np.ndarray:
        """``conv(x; W)`` without bias; ``x`` None: the cached input, whose patches are kept."""
        if x is None:
            return conv2d(op.x_in[0], W, op.saved["geo"], op.saved["cols"])
        return conv2d(x, W, op.saved["geo"])

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        (dx,), dW = dx_in, dtheta.get("W") if input_grad else None
        if dx is None and dW is None:
            return None
        geo = op.saved["geo"]
        h_in = None if dW is None else conv2d_transpose(g_out, dW, geo)
        h_theta = {} if dx is None else {"W": conv2d_weight_grad(g_out, unfold(dx, geo), geo)}
        return (h_in,), h_theta


class ConvTranspose2d(_Conv):
    """2-D transposed convolution, exactly as ``torch.nn.ConvTranspose2d``.

    The adjoint of a ``Conv2d`` from ``c_out`` to ``c_in`` channels with the same
    kernel, stride, padding, dilation and groups: ``x_out = Lᵀ x_in + b``, where
    ``L`` is that convolution's Toeplitz matrix. Shapes: ``x_in`` is ``(B, c_in, H,
    W)``, ``x_out`` is ``(B, c_out, Ho, Wo)`` with ``Ho = (H - 1)·sh - 2ph + dh(kh - 1)
    + oph + 1``; ``"W"`` is ``(c_in, c_out // groups, kh, kw)`` (PyTorch's layout) and
    ``"b"`` is ``(c_out,)``. ``output_padding`` (an int or a pair, smaller than the
    stride) adds rows and columns at the bottom and right, where the stride made
    the output size ambiguous.

    Jacobians per example: ``L^x`` is the Toeplitz matrix's transpose
    (``ConvolutionTranspose``, shared by the batch), ``L^W`` is
    ``ConvolutionWeight(x_in, ·, transposed=True)`` and ``L^b`` is ``I ⊗ 1_P``. The
    fast path is the convolution's backward: ``x_out = col2im(Wᵀ x_in)``, ``g_in =
    W·im2col(g_out)`` and ``dJ/dW = Σ_b x_in im2col(g_out)ᵀ``.

    Initialization as ``torch.nn.ConvTranspose2d``: uniform in ``±1/sqrt(fan_in)``,
    ``fan_in = (c_out / groups)·kh·kw``.
    """

    _transposed = True

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: Any,
        *,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        W: Any = None,
        b: Any = None,
        rng: Any = None,
        dtype: Any = None,
    ) -> None:
        name = type(self).__name__
        stride_pair = _pair(name, "stride", stride, 1)
        self.output_padding = _pair(name, "output_padding", output_padding, 0)
        if any(p >= s for p, s in zip(self.output_padding, stride_pair, strict=True)):
            raise ValueError(
                f"{name}: output_padding {output_padding!r} must be smaller than the stride "
                f"{stride!r} in each direction"
            )
        super().__init__(
            c_in, c_out, kernel_size, stride, padding, dilation, groups, bias, W, b, rng, dtype
        )

    def geometry(self, H: int, W: int) -> ConvGeometry:
        """The geometry of the convolution whose adjoint this layer is, on an ``H × W``
        input: from the output ``(c_out, Ho, Wo)`` back to ``(c_in, H, W)``."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation,
        )  # fmt: skip
        Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + self.output_padding[0] + 1
        Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + self.output_padding[1] + 1
        return ConvGeometry(
            self.c_out, Ho, Wo, self.c_in, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups,
        )  # fmt: skip

    def _check(self, x_in: np.ndarray) -> None:
        super()._check(x_in)
        geo = self.geometry(*x_in.shape[2:])
        if geo.H < 1 or geo.W < 1:
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, which gives an empty output "
                f"{geo.H}×{geo.W}: the padding is larger than what the kernel adds"
            )

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        geo = self.geometry(*x_in.shape[2:])
        op.saved["geo"] = geo
        x_out = conv2d_transpose(x_in, op.theta["W"], geo)
        if "b" in op.theta:
            x_out += op.theta["b"][:, None, None]
        return x_out

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        (x_in,) = op.x_in
        geo = op.saved["geo"]
        cols = unfold(g_out, geo)
        grads = {"W": conv2d_weight_grad(x_in, cols, geo)}
        if "b" in op.theta:
            grads["b"] = g_out.sum(axis=(0, 2, 3))
        g_in = conv2d(g_out, op.theta["W"], geo, cols) if input_grad else None
        return g_in, grads

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        (x_in,) = op.x_in
        geo, B = op.saved["geo"], x_in.shape[0]
        L_x = ConvolutionTranspose(Convolution(op.theta["W"], geo, B), self.output_padding)
        L_theta: dict[str, Jacobian] = {"W": ConvolutionWeight(x_in, geo, transposed=True)}
        if "b" in op.theta:
            L_theta["b"] = _bias_jacobian(self.c_out, geo.H * geo.W, B, x_in.dtype)
        return L_x, L_theta

    def _apply(self, op: OperatingPoint, x: Any, W: np.ndarray) -> np.ndarray:
        """The transposed convolution of ``x`` (None: the cached input) by ``W``, no bias."""
        return conv2d_transpose(op.x_in[0] if x is None else x, W, op.saved["geo"])

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        (dx,), dW = dx_in, dtheta.get("W") if input_grad else None
        if dx is None and dW is None:
            return None
        geo = op.saved["geo"]
        cols = unfold(g_out, geo)  # the patches of g_out, as in backward
        h_in = None if dW is None else conv2d(g_out, dW, geo, cols)
        h_theta = {} if dx is None else {"W": conv2d_weight_grad(dx, cols, geo)}
        return (h_in,), h_theta
