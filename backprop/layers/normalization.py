"""Normalization layers: ``LayerNorm``, ``BatchNorm1d``, ``BatchNorm2d``, as PyTorch.

Each normalises groups of entries, ``x̂ = (x - μ) / s`` with ``s = sqrt(σ² + ε)``
(``σ²`` the biased variance of the group), then scales and shifts per feature,
``x_out = γ ⊙ x̂ + β``. Within one group of ``m`` entries the Jacobian is

    ∂x_out_i/∂x_j = (γ_i / s) (δ_ij − 1/m − x̂_i x̂_j / m),

a diagonal plus rank 2: ``d = γ/s``, ``U = −(γ/(s m)) [1, x̂]``, ``V = [1, x̂]``
(``DiagonalPlusLowRank``, two columns per group, zero outside it).

- ``LayerNorm`` groups the trailing ``shape`` of each example: per example.
- ``BatchNorm`` groups each channel over the batch and the positions. In training
  mode that couples the examples: its Jacobians are one ``WholeBatch`` matrix over
  the batch (``Layer.couples_batch``), and per-example gradients are refused. In
  eval mode it uses the running statistics: a diagonal per example.

Second order (``_norm_tangent``, ``_norm_hvp``): along ``ẋ`` the normalised values
move by ``ẋ̂ = (ẋ − mean ẋ − x̂ mean(x̂ ẋ))/s`` and ``s`` by ``ṡ = mean(x̂ ẋ)``
(means over the group). The backward pass ``g_in = (G − mean G − x̂ mean(G x̂))/s``,
``G = γ g``, is differentiated along ``(ẋ, γ̇)`` with ``g`` held: that is the
Hessian of ``<g, y>`` times the tangent, and it stays within each group. With fixed
statistics (BatchNorm in eval mode) the means and ``ṡ`` drop out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from backprop.jacobian import Diagonal, DiagonalPlusLowRank, Jacobian, Sparse, Tile
from backprop.jacobian.coupled import WholeBatch
from backprop.layer import Layer, OperatingPoint, Parameter
from backprop.layers.second_order import total

__all__ = ["BatchNorm1d", "BatchNorm2d", "LayerNorm"]


def _dtype_of(where: str, dtype: Any) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{where}: dtype must be float32 or float64, got {dt}")
    return dt


def _positive_eps(where: str, eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float | np.floating) or not eps > 0:
        raise ValueError(f"{where}: eps must be a positive number, got {eps!r}")
    return float(eps)


def _grouped_dplr(
    scale: np.ndarray, x_hat: np.ndarray, onehot: np.ndarray, m: int, label: str
) -> DiagonalPlusLowRank:
    """``diag(scale) (I − (1 1ᵀ + x̂ x̂ᵀ)/m)`` within each group, for rows ``(E, N)``.

    ``onehot`` ``(N, G)`` says which group each of the ``N`` entries is in.
    """
    E = onehot[None]  # (1, N, G)
    U = -np.concatenate([(scale / m)[:, :, None] * E, (scale * x_hat / m)[:, :, None] * E], 2)
    V = np.concatenate([np.broadcast_to(E, U.shape[:2] + E.shape[2:]), x_hat[:, :, None] * E], 2)
    return DiagonalPlusLowRank(scale, U, V, label)


def _centred(G: np.ndarray, x_hat: np.ndarray, axes: tuple[int, ...], stats: bool) -> np.ndarray:
    """``G − mean G − x̂ mean(G x̂)`` over each group (``G`` itself without batch ``stats``)."""
    if not stats:
        return G
    return G - G.mean(axis=axes, keepdims=True) - x_hat * (G * x_hat).mean(axis=axes, keepdims=True)


def _norm_tangent(
    x_hat: np.ndarray, s: np.ndarray, axes: tuple[int, ...], stats: bool, gamma: Any, d: dict
) -> Any:
    """``ẏ = γ ẋ̂ + γ̇ x̂ + β̇``; ``gamma`` and the tangents ``d`` (keys ``x``, ``gamma``,
    ``beta``, None for zero) broadcast against ``x̂``; ``gamma`` None without affine."""
    out = None
    if d["x"] is not None:
        out = _centred(d["x"], x_hat, axes, stats) / s
        if gamma is not None:
            out *= gamma
    if d["gamma"] is not None:
        out = total(out, x_hat * d["gamma"])
    if d["beta"] is not None:
        out = out + d["beta"] if out is not None else np.broadcast_to(d["beta"], x_hat.shape).copy()
    return out


def _norm_hvp(
    x_hat: np.ndarray,
    s: np.ndarray,
    axes: tuple[int, ...],
    stats: bool,
    gamma: Any,
    g: np.ndarray,
    d: dict,
) -> tuple[Any, Any]:
    """The Hessian of ``<g, y>`` times ``(ẋ, γ̇)``: ``(h_x, h_γ)``, ``h_γ = g ẋ̂`` not yet
    summed over the entries that share a ``γ``. Names as for ``_norm_tangent``."""
    h_x = h_gamma = None
    if d["gamma"] is not None:  # Ġ = g γ̇ through the backward pass
        h_x = _centred(g * d["gamma"], x_hat, axes, stats) / s
    if d["x"] is not None:
        dx_hat = _centred(d["x"], x_hat, axes, stats) / s
        h_gamma = g * dx_hat
        if stats:  # the means and s move with x
            G = g if gamma is None else g * gamma
            g_in = _centred(G, x_hat, axes, stats) / s
            ds = (x_hat * d["x"]).mean(axis=axes, keepdims=True)
            moved = dx_hat * (G * x_hat).mean(axis=axes, keepdims=True)
            moved += x_hat * (G * dx_hat).mean(axis=axes, keepdims=True)
            moved += g_in * ds
            h_x = total(h_x, -moved / s)
    return h_x, h_gamma


# -- LayerNorm ------------------------------------------------------------------------


class LayerNorm(Layer):
    """``torch.nn.LayerNorm(shape, eps, elementwise_affine=affine)`` on ``(B, ..., *shape)``.

    Each example's trailing ``shape`` (``n`` entries) is one group; an example of
    ``G`` groups (a sequence ``(B, T, d)`` normalised over ``d`` has ``G = T``) has
    ``L^x`` diagonal plus rank ``2G``. ``"gamma"`` and ``"beta"`` have ``shape``
    (torch's ``weight`` and ``bias``): ``L^γ = diag(x̂) [I; …; I]``, ``L^β = [I; …; I]``.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        *,
        eps: float = 1e-5,
        affine: bool = True,
        dtype: Any = np.float64,
    ) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
        if not shape or not all(isinstance(n, int | np.integer) and n >= 1 for n in shape):
            raise ValueError(f"LayerNorm: shape must be positive integers, got {shape!r}")
        self.shape = tuple(int(n) for n in shape)
        self._n = int(np.prod(self.shape))  # entries of one group
        self._means: dict[np.dtype[Any], np.ndarray] = {}
        self.eps = _positive_eps("LayerNorm", eps)
        self.affine = bool(affine)
        if self.affine:
            dt = _dtype_of("LayerNorm", dtype)
            self.params["gamma"] = Parameter(np.ones(self.shape, dt))
            self.params["beta"] = Parameter(np.zeros(self.shape, dt))

    def _check(self, x_in: np.ndarray) -> None:
        k = len(self.shape)
        if x_in.ndim < k + 1 or x_in.shape[-k:] != self.shape:
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected (B, ..., "
                f"{', '.join(map(str, self.shape))}): the trailing axes are normalised"
            )

    def _axes(self) -> tuple[int, ...]:
        """The normalised axes, counted from the end."""
        return tuple(range(-len(self.shape), 0))

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        # On rows of n entries (one group each): the centred rows are made once and
        # scaled in place, the variances are one einsum of row dot products.
        n = self._n
        X = x_in.reshape(-1, n)
        x_hat = X - (X @ self._mean_vector(x_in.dtype))[:, None]
        var = np.einsum("ij,ij->i", x_hat, x_hat)[:, None]
        var /= n
        s = np.sqrt(var + np.asarray(self.eps, x_in.dtype))
        x_hat /= s
        group = x_in.shape[: x_in.ndim - len(self.shape)] + (1,) * len(self.shape)
        op.saved["x_hat"], op.saved["s"] = x_hat.reshape(x_in.shape), s.reshape(group)
        if not self.affine:
            return op.saved["x_hat"]
        x_out = x_hat * op.theta["gamma"].reshape(n)
        x_out += op.theta["beta"].reshape(n)
        return x_out.reshape(x_in.shape)

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        n = self._n
        X = op.saved["x_hat"].reshape(-1, n)
        G = g_out.reshape(-1, n)
        grads = {}
        if self.affine:
            # Σ over the rows as products 1ᵀ A (gemv), much faster than column sums.
            ones = np.ones(G.shape[0], G.dtype)
            gx = G * X
            grads = {
                "gamma": (ones @ gx).reshape(self.shape),
                "beta": (ones @ G).reshape(self.shape),
            }
        if not input_grad:
            return None, grads
        if self.affine:
            gamma = op.theta["gamma"].reshape(n)
            g, mean_gx = G * gamma, (gx @ gamma)[:, None]
        else:
            g, mean_gx = G, np.einsum("ij,ij->i", G, X)[:, None]
        mean_gx /= n
        g_in = X * mean_gx  # (g - mean(g) - x̂ mean(g x̂)) / s, in place
        np.subtract(g, g_in, out=g_in)
        g_in -= (g @ self._mean_vector(g.dtype))[:, None]
        g_in /= op.saved["s"].reshape(-1, 1)
        return g_in.reshape(g_out.shape), grads

    def _mean_vector(self, dtype: np.dtype[Any]) -> np.ndarray:
        """``(1/n, ..., 1/n)``: a row mean as one matrix-vector product (BLAS's gemv is
        several times faster than numpy's mean along rows of tens of entries)."""
        v = self._means.get(dtype)
        if v is None:
            v = self._means[dtype] = np.full(self._n, 1.0 / self._n, dtype)
        return v

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_hat, s = op.saved["x_hat"], op.saved["s"]
        B, n = x_hat.shape[0], int(np.prod(self.shape))
        G = x_hat[0].size // n
        gamma = op.theta["gamma"] if self.affine else np.ones((), x_hat.dtype)
        scale = np.broadcast_to(gamma / s, x_hat.shape).reshape(B, -1)
        onehot = np.repeat(np.eye(G, dtype=x_hat.dtype), n, axis=0)  # entry i in group i // n
        what = "γ/s ⊙ (I − (1 1ᵀ + x̂ x̂ᵀ)/n)" + (f" per group of {n}" if G > 1 else "")
        L_x = _grouped_dplr(scale, x_hat.reshape(B, -1), onehot, n, what)
        if not self.affine:
            return L_x, {}
        tile = Tile(G, n, B, x_hat.dtype)
        L_gamma = Diagonal(x_hat.reshape(B, -1), "x̂") @ tile
        return L_x, {"gamma": L_gamma, "beta": tile}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        gamma = op.theta["gamma"] if self.affine else None
        d = {"x": dx_in[0], "gamma": dtheta.get("gamma"), "beta": dtheta.get("beta")}
        return _norm_tangent(op.saved["x_hat"], op.saved["s"], self._axes(), True, gamma, d)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        x_hat, s = op.saved["x_hat"], op.saved["s"]
        gamma = op.theta["gamma"] if self.affine else None
        d = {"x": dx_in[0], "gamma": dtheta.get("gamma")}
        h_x, h_gamma = _norm_hvp(x_hat, s, self._axes(), True, gamma, g_out, d)
        h_x = h_x if input_grad else None
        lead = tuple(range(x_hat.ndim - len(self.shape)))
        h_theta = {} if h_gamma is None or not self.affine else {"gamma": h_gamma.sum(axis=lead)}
        return (h_x,), h_theta

    def __repr__(self) -> str:
        shape = self.shape[0] if len(self.shape) == 1 else self.shape
        extra = "" if self.affine else ", affine=False"
        return f"LayerNorm({shape}, eps={self.eps:g}{extra})"


# -- BatchNorm ------------------------------------------------------------------------


class _BatchNorm(Layer):
    """What ``BatchNorm1d`` and ``BatchNorm2d`` share; they differ only in the
    shapes they accept. Channels are on axis 1; statistics are per channel over
    the batch and every position, ``m = B·L`` entries each.

    Training mode (``layer.training``): the batch statistics (biased variance),
    and ``running_mean``/``running_var`` updated by ``(1 − momentum) r + momentum
    · stat`` with the unbiased variance, on every training-mode forward (with
    ``cache=False`` too, as torch does). Eval mode: the running statistics.
    The running statistics are buffers, not Parameters: read-only arrays, set
    from outside only through ``set_running_stats``.
    """

    couples_batch = True
    _ranks: tuple[int, ...] = ()
    _shapes = ""

    def __init__(
        self, c: int, *, eps: float = 1e-5, momentum: float = 0.1, dtype: Any = np.float64
    ) -> None:
        super().__init__()
        where = type(self).__name__
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 1:
            raise ValueError(
                f"{where}: c (the number of channels) must be a positive integer, got {c!r}"
            )
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float | np.floating)
            or not 0 <= momentum <= 1
        ):
            raise ValueError(f"{where}: momentum must be a number in [0, 1], got {momentum!r}")
        dt = _dtype_of(where, dtype)
        self.c, self.eps, self.momentum = int(c), _positive_eps(where, eps), float(momentum)
        self.params["gamma"] = Parameter(np.ones(self.c, dt))
        self.params["beta"] = Parameter(np.zeros(self.c, dt))
        self._running_mean = _frozen(np.zeros(self.c, dt))
        self._running_var = _frozen(np.ones(self.c, dt))

    # -- the buffers ---------------------------------------------------------------
    @property
    def running_mean(self) -> np.ndarray:
        """The running mean per channel (read-only; see ``set_running_stats``)."""
        return self._running_mean

    @property
    def running_var(self) -> np.ndarray:
        """The running unbiased variance per channel (read-only)."""
        return self._running_var

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        """``{"running_mean": ..., "running_var": ...}``: the state that is not a Parameter."""
        return {"running_mean": self._running_mean, "running_var": self._running_var}

    def set_buffers(self, values: dict[str, Any]) -> None:
        """Set buffers by their names in ``buffers`` (what a checkpoint restores)."""
        unknown = set(values) - {"running_mean", "running_var"}
        if unknown:
            raise ValueError(f"{self!r}: no buffer named {', '.join(sorted(unknown))}")
        self.set_running_stats(values.get("running_mean"), values.get("running_var"))

    def set_running_stats(self, mean: Any = None, var: Any = None) -> None:
        """Replace the running statistics (copied), each ``(c,)`` in the layer's dtype;
        ``var`` must be non-negative. Both are checked before either changes."""
        new = {}
        for what, value in (("mean", mean), ("var", var)):
            if value is None:
                continue
            a = np.asarray(value)
            if a.shape != (self.c,) or a.dtype != self._running_mean.dtype:
                raise ValueError(
                    f"{self!r}: running {what} must have shape ({self.c},) and dtype "
                    f"{self._running_mean.dtype}, got shape {a.shape}, dtype {a.dtype}"
                )
            if what == "var" and not np.all(a >= 0):
                raise ValueError(f"{self!r}: running var must be non-negative")
            new[what] = _frozen(a.copy())
        if "mean" in new:
            self._running_mean = new["mean"]
        if "var" in new:
            self._running_var = new["var"]

    # -- the math ------------------------------------------------------------------
    def _check(self, x_in: np.ndarray) -> None:
        if x_in.ndim not in self._ranks or x_in.shape[1] != self.c:
            want = self._shapes
            raise ValueError(
                f"{self!r}: x_in has shape {x_in.shape}, expected {want} with C = {self.c}"
            )
        if self.training and x_in.size // self.c < 2:
            raise ValueError(
                f"{self!r}: training mode needs more than one value per channel to take batch "
                f"statistics, got x_in of shape {x_in.shape}; use a larger batch or eval mode"
            )

    def _stat_axes(self, x: np.ndarray) -> tuple[int, ...]:
        return (0, *range(2, x.ndim))

    def _per_channel(self, v: np.ndarray, x: np.ndarray) -> np.ndarray:
        """A ``(C,)`` vector shaped to broadcast against ``x`` ``(B, C, ...)``."""
        return v.reshape((1, self.c) + (1,) * (x.ndim - 2))

    def _forward(self, op: OperatingPoint, x_in: np.ndarray) -> np.ndarray:
        dt, axes = x_in.dtype, self._stat_axes(x_in)
        if self.training:
            m = x_in.size // self.c
            mean = x_in.mean(axis=axes)
            var = np.square(x_in - self._per_channel(mean, x_in)).mean(axis=axes)
            mom = np.asarray(self.momentum, dt)
            new_mean = (1 - mom) * self._running_mean + mom * mean
            new_var = (1 - mom) * self._running_var + mom * (var * np.asarray(m / (m - 1), dt))
            op.saved["couples_batch"] = True
        else:
            mean, var = self._running_mean, self._running_var
        mu = self._per_channel(mean, x_in)
        s = np.sqrt(self._per_channel(var, x_in) + np.asarray(self.eps, dt))
        x_hat = (x_in - mu) / s
        op.saved["x_hat"], op.saved["s"] = x_hat, s
        x_out = x_hat * self._per_channel(op.theta["gamma"], x_in)
        x_out += self._per_channel(op.theta["beta"], x_in)
        if self.training:  # last: nothing below can fail, so a failed call changes nothing
            self._running_mean, self._running_var = _frozen(new_mean), _frozen(new_var)
        return x_out

    def _backward(
        self, op: OperatingPoint, g_out: np.ndarray, input_grad: bool
    ) -> tuple[Any, dict[str, np.ndarray]]:
        x_hat, s = op.saved["x_hat"], op.saved["s"]
        axes = self._stat_axes(x_hat)
        grads = {"gamma": (g_out * x_hat).sum(axis=axes), "beta": g_out.sum(axis=axes)}
        if not input_grad:
            return None, grads
        g = g_out * self._per_channel(op.theta["gamma"], x_hat)
        if not op.saved.get("couples_batch"):  # eval: a fixed affine map per channel
            return g / s, grads
        mean_g = g.mean(axis=axes, keepdims=True)
        mean_gx = (g * x_hat).mean(axis=axes, keepdims=True)
        return (g - mean_g - x_hat * mean_gx) / s, grads

    def _jacobians(self, op: OperatingPoint) -> tuple[Jacobian, dict[str, Jacobian]]:
        x_hat, s = op.saved["x_hat"], op.saved["s"]
        B, C = x_hat.shape[:2]
        L = x_hat[0, 0].size  # positions per channel
        gamma = self._per_channel(op.theta["gamma"], x_hat)
        scale = np.broadcast_to(gamma / s, x_hat.shape)
        dt = x_hat.dtype
        if not op.saved.get("couples_batch"):  # eval: per example
            # Entry (c, l) of an example belongs to channel c: the (C·L, C) spreading matrix.
            spread = Sparse(
                sp.kron(sp.eye_array(C, dtype=dt), np.ones((L, 1), dt)), B, "[c(i) = k]"
            )
            L_gamma = Diagonal(x_hat.reshape(B, -1), "x̂") @ spread
            return Diagonal(scale.reshape(B, -1), "γ/sqrt(running_var + ε)"), {
                "gamma": L_gamma,
                "beta": spread,
            }
        # Training: one matrix over the whole batch, entries in (b, c, l) order.
        onehot = np.tile(np.repeat(np.eye(C, dtype=dt), L, axis=0), (B, 1))  # (B·C·L, C)
        m = B * L
        what = f"γ/s ⊙ (I − (1 1ᵀ + x̂ x̂ᵀ)/{m}) per channel over the batch"
        L_x = _grouped_dplr(scale.reshape(1, -1), x_hat.reshape(1, -1), onehot, m, what)
        spread = Sparse(sp.csr_array(onehot), 1, "[c(i) = k]")
        L_gamma = Diagonal(x_hat.reshape(1, -1), "x̂") @ spread
        return WholeBatch(L_x, B), {"gamma": WholeBatch(L_gamma, B), "beta": WholeBatch(spread, B)}

    def _tangent(self, op: OperatingPoint, dx_in: tuple[Any, ...], dtheta: Any) -> Any:
        x_hat = op.saved["x_hat"]
        d = {"x": dx_in[0]}
        for name in ("gamma", "beta"):
            v = dtheta.get(name)
            d[name] = None if v is None else self._per_channel(v, x_hat)
        gamma = self._per_channel(op.theta["gamma"], x_hat)
        stats = bool(op.saved.get("couples_batch"))
        return _norm_tangent(x_hat, op.saved["s"], self._stat_axes(x_hat), stats, gamma, d)

    def _hvp(
        self, op: OperatingPoint, g_out: Any, dx_in: tuple[Any, ...], dtheta: Any, input_grad: bool
    ) -> Any:
        x_hat, axes = op.saved["x_hat"], self._stat_axes(op.saved["x_hat"])
        dgamma = dtheta.get("gamma")
        d = {"x": dx_in[0], "gamma": None if dgamma is None else self._per_channel(dgamma, x_hat)}
        gamma = self._per_channel(op.theta["gamma"], x_hat)
        stats = bool(op.saved.get("couples_batch"))
        h_x, h_gamma = _norm_hvp(x_hat, op.saved["s"], axes, stats, gamma, g_out, d)
        h_x = h_x if input_grad else None
        return (h_x,), ({} if h_gamma is None else {"gamma": h_gamma.sum(axis=axes)})

    def __repr__(self) -> str:
        mode = "" if self.training else ", eval"
        return (
            f"{type(self).__name__}({self.c}, eps={self.eps:g}, momentum={self.momentum:g}{mode})"
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d(c, eps, momentum)`` on ``(B, C)`` or ``(B, C, L)``."""

    _ranks = (2, 3)
    _shapes = "(B, C) or (B, C, L)"


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d(c, eps, momentum)`` on ``(B, C, H, W)``."""

    _ranks = (4,)
    _shapes = "(B, C, H, W)"
