"""The two small convnets (the digits CNN and LeNet-5) and their training-step contestants.

A net is one row of ``CONV_NETS``: the image shape, the batch and the layers, each a
tuple ``("conv", c_in, c_out, k, padding)``, ``("relu",)``, ``("pool", k)`` (max
pooling, stride ``k``), ``("flatten",)`` or ``("linear", n_in, n_out)``; the loss is
softmax cross-entropy. Every contestant is built from that row, so they all run the
same net. As in ``steps``, a contestant offers ``step()`` (forward, loss, backward,
SGD update; returns the loss before the update) and ``weights()`` (``[(W, b), ...]``
of the conv and linear layers, in order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import backprop as bp

from .problems import LR
from .steps import EngineStep, checked_timings, importable, torch_ok

Spec = tuple[Any, ...]

#: name -> (image shape (C, H, W), batch, layers, what the table calls it).
CONV_NETS: dict[str, tuple[tuple[int, int, int], int, tuple[Spec, ...], str]] = {
    "cnn": (
        (1, 8, 8),
        64,
        (
            ("conv", 1, 16, 3, 1), ("relu",), ("pool", 2),
            ("conv", 16, 32, 3, 1), ("relu",),
            ("flatten",), ("linear", 512, 10),
        ),
        "digits CNN",
    ),
    "lenet": (
        (1, 28, 28),
        64,
        (
            ("conv", 1, 6, 5, 0), ("relu",), ("pool", 2),
            ("conv", 6, 16, 5, 0), ("relu",), ("pool", 2),
            ("flatten",),
            ("linear", 256, 120), ("relu",),
            ("linear", 120, 84), ("relu",),
            ("linear", 84, 10),
        ),
        "LeNet-5",
    ),
}  # fmt: skip
N_CLASSES = 10


@dataclass
class ConvProblem:
    """One convnet, its data and its initial weights: what every contestant starts from.

    ``X`` is ``(B, C, H, W)``, ``y`` ``(B,)`` int64 labels; ``weights`` lists ``(W, b)``
    of each conv (``W`` ``(c_out, c_in, k, k)``) and linear (``W`` ``(n_out, n_in)``)
    layer in order, initialized as PyTorch does (uniform in ``±1/sqrt(fan_in)``).
    """

    name: str
    layers: tuple[Spec, ...]
    batch: int
    dtype: np.dtype[Any]
    X: np.ndarray
    y: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]
    lr: float = LR
    loss: str = "ce"


def make_conv_problem(name: str, dtype: Any = np.float64, seed: int = 0) -> ConvProblem:
    """The convnet ``name`` (a key of ``CONV_NETS``) in ``dtype``."""
    image, batch, layers, _ = CONV_NETS[name]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    weights = []
    for spec in layers:
        if spec[0] == "conv":
            _, c_in, c_out, k, _ = spec
            shape, fan_in, n = (c_out, c_in, k, k), c_in * k * k, c_out
        elif spec[0] == "linear":
            _, n_in, n = spec
            shape, fan_in = (n, n_in), n_in
        else:
            continue
        bound = 1.0 / np.sqrt(fan_in)
        W = rng.uniform(-bound, bound, size=shape).astype(dtype)
        b = rng.uniform(-bound, bound, size=n).astype(dtype)
        weights.append((W, b))
    X = rng.standard_normal((batch, *image)).astype(dtype)
    y = rng.integers(0, N_CLASSES, size=batch).astype(np.int64)
    return ConvProblem(name, layers, batch, dtype, X, y, weights)


def describe(p: ConvProblem) -> str:
    """The net in one line: ``conv 1→16 k3 p1, relu, pool 2, ...``."""
    words = []
    for s in p.layers:
        if s[0] == "conv":
            words.append(f"conv {s[1]}→{s[2]} k{s[3]}" + (f" p{s[4]}" if s[4] else ""))
        elif s[0] == "linear":
            words.append(f"linear {s[1]}→{s[2]}")
        else:
            words.append(" ".join(map(str, s)))
    return ", ".join(words)


# ---------------------------------------------------------------------------- contestants


class NumpyConvStep:
    """The hand-written reference: im2col by a strided view, one GEMM per product.

    Images stay ``(B, C, H, W)``, as every other contestant holds them. A conv is
    ``W (B, C·k·k, H·W)``, one batched matrix product over the patches ``cols`` (a
    strided view of the padded input, copied once into GEMM order); its gradients
    are ``dW = Σ_b G_b cols_bᵀ`` (batched, then summed: a ``tensordot`` over the
    batch and the positions would copy both operands) and ``dcols = Wᵀ G`` (batched),
    summed back into the image by ``k·k`` strided adds (col2im). Max pooling reshapes
    each window to the last axis and keeps the argmax for the backward scatter. The
    first conv computes no input gradient.
    """

    label = "numpy (hand-written)"

    def __init__(self, p: ConvProblem) -> None:
        self.layers = p.layers
        self.W = [W.copy() for W, _ in p.weights]
        self.b = [b.copy() for _, b in p.weights]
        self.X, self.y, self.lr, self.B = p.X, p.y, p.lr, p.batch
        self.rows = np.arange(p.batch)

    # -- the layers: forward returns (output, what backward needs)
    @staticmethod
    def _conv(a: np.ndarray, W: np.ndarray, b: np.ndarray, k: int, pad: int) -> Any:
        if pad:
            a = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        B, C, H, Wd = a.shape
        Ho, Wo = H - k + 1, Wd - k + 1
        win = sliding_window_view(a, (k, k), axis=(2, 3))  # (B, C, Ho, Wo, k, k)
        cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(B, C * k * k, Ho * Wo)
        z = np.matmul(W.reshape(W.shape[0], -1), cols)  # (B, O, Ho·Wo)
        z += b[:, None]
        return z.reshape(B, -1, Ho, Wo), (cols, a.shape)

    @staticmethod
    def _conv_back(
        g: np.ndarray, W: np.ndarray, saved: Any, k: int, pad: int, input_grad: bool
    ) -> Any:
        cols, (B, C, H, Wd) = saved
        c_out = W.shape[0]
        g3 = g.reshape(B, c_out, -1)
        gW = np.matmul(g3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(W.shape)
        gb = g3.sum(axis=(0, 2))
        if not input_grad:
            return None, gW, gb
        Ho, Wo = H - k + 1, Wd - k + 1
        dcols = np.matmul(W.reshape(c_out, -1).T, g3).reshape(B, C, k, k, Ho, Wo)
        g_in = np.zeros((B, C, H, Wd), dtype=g.dtype)
        for ky in range(k):
            for kx in range(k):
                g_in[:, :, ky : ky + Ho, kx : kx + Wo] += dcols[:, :, ky, kx]
        if pad:
            g_in = g_in[:, :, pad:-pad, pad:-pad]
        return g_in, gW, gb

    @staticmethod
    def _pool(a: np.ndarray, k: int) -> Any:
        B, C, H, Wd = a.shape
        Ho, Wo = H // k, Wd // k
        win = a[:, :, : Ho * k, : Wo * k].reshape(B, C, Ho, k, Wo, k)
        win = win.transpose(0, 1, 2, 4, 3, 5).reshape(B, C, Ho, Wo, k * k)
        idx = win.argmax(axis=-1)  # the first maximum, as PyTorch
        out = np.take_along_axis(win, idx[..., None], axis=-1)[..., 0]
        return out, (idx, a.shape)

    @staticmethod
    def _pool_back(g: np.ndarray, saved: Any, k: int) -> np.ndarray:
        idx, (B, C, H, Wd) = saved
        Ho, Wo = idx.shape[2:]
        hit = idx[..., None] == np.arange(k * k)  # (B, C, Ho, Wo, k·k)
        g_win = (hit * g[..., None]).reshape(B, C, Ho, Wo, k, k).transpose(0, 1, 2, 4, 3, 5)
        g_in = g_win.reshape(B, C, Ho * k, Wo * k)
        if (H, Wd) != (Ho * k, Wo * k):
            g_in = np.pad(g_in, ((0, 0), (0, 0), (0, H - Ho * k), (0, Wd - Wo * k)))
        return g_in

    def step(self) -> float:
        a, saved, i = self.X, [], 0
        for spec in self.layers:
            kind = spec[0]
            if kind == "conv":
                a, s = self._conv(a, self.W[i], self.b[i], spec[3], spec[4])
                i += 1
            elif kind == "linear":
                s = a
                a = a @ self.W[i].T
                a += self.b[i]
                i += 1
            elif kind == "relu":
                np.maximum(a, 0, out=a)  # a is this step's own array
                s = a
            elif kind == "pool":
                a, s = self._pool(a, spec[1])
            else:  # flatten
                s = a.shape
                a = a.reshape(a.shape[0], -1)
            saved.append(s)
        B = self.B
        z = a - a.max(axis=1, keepdims=True)
        g = np.exp(z)
        sums = g.sum(axis=1, keepdims=True)
        loss = float(np.log(sums).sum() - z[self.rows, self.y].sum()) / B
        g /= sums
        g[self.rows, self.y] -= 1
        g *= 1.0 / B
        grads: list[Any] = [None] * len(self.W)
        for j in range(len(self.layers) - 1, -1, -1):
            spec, s = self.layers[j], saved[j]
            kind = spec[0]
            if kind == "conv":
                i -= 1
                g, gW, gb = self._conv_back(g, self.W[i], s, spec[3], spec[4], j > 0)
                grads[i] = (gW, gb)
            elif kind == "linear":
                i -= 1
                grads[i] = (g.T @ s, g.sum(axis=0))
                g = g @ self.W[i]
            elif kind == "relu":
                g = g * (s > 0)
            elif kind == "pool":
                g = self._pool_back(g, s, spec[1])
            else:
                g = g.reshape(s)
        for W, b, (gW, gb) in zip(self.W, self.b, grads, strict=True):
            W -= self.lr * gW
            b -= self.lr * gb
        return loss

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(zip(self.W, self.b, strict=True))


def build_engine_convnet(p: ConvProblem) -> bp.Sequential:
    """The problem's convnet as a ``bp.Sequential`` ending in ``SoftmaxCrossEntropy``."""
    layers: list[bp.Layer] = []
    weights = iter(p.weights)
    for spec in p.layers:
        kind = spec[0]
        if kind == "conv":
            W, b = next(weights)
            _, c_in, c_out, k, pad = spec
            layers.append(
                bp.Conv2d(c_in, c_out, k, padding=pad, W=W.copy(), b=b.copy(), dtype=p.dtype)
            )
        elif kind == "linear":
            W, b = next(weights)
            layers.append(bp.Linear(spec[1], spec[2], W=W.copy(), b=b.copy(), dtype=p.dtype))
        elif kind == "relu":
            layers.append(bp.ReLU())
        elif kind == "pool":
            layers.append(bp.MaxPool2d(spec[1]))
        else:
            layers.append(bp.Flatten())
    layers.append(bp.SoftmaxCrossEntropy())
    return bp.Sequential(layers)


class EngineConvStep(EngineStep):
    """This engine on a convnet: the MLP step's forward, backward and SGD update."""

    weighted = (bp.Conv2d, bp.Linear)

    @staticmethod
    def build(p: Any) -> bp.Sequential:
        return build_engine_convnet(p)


class TorchConvStep:
    """PyTorch eager on the CPU: ``nn.Sequential`` of the same layers, ``optim.SGD``."""

    label = "PyTorch eager"

    def __init__(self, p: ConvProblem) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        nn = torch.nn
        dt = torch.float64 if p.dtype == np.float64 else torch.float32
        mods: list[Any] = []
        weights = iter(p.weights)
        for spec in p.layers:
            kind = spec[0]
            if kind in ("conv", "linear"):
                if kind == "conv":
                    mod = nn.Conv2d(spec[1], spec[2], spec[3], padding=spec[4], dtype=dt)
                else:
                    mod = nn.Linear(spec[1], spec[2], dtype=dt)
                W, b = next(weights)
                with torch.no_grad():
                    mod.weight.copy_(torch.from_numpy(W))
                    mod.bias.copy_(torch.from_numpy(b))
                mods.append(mod)
            elif kind == "relu":
                mods.append(nn.ReLU())
            elif kind == "pool":
                mods.append(nn.MaxPool2d(spec[1]))
            else:
                mods.append(nn.Flatten())
        self.model = nn.Sequential(*mods)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=p.lr)
        self.X = torch.from_numpy(p.X.copy())
        self.y = torch.from_numpy(p.y.copy())

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.X), self.y)
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        nn = self.torch.nn
        return [
            (m.weight.detach().numpy(), m.bias.detach().numpy())
            for m in self.model
            if isinstance(m, nn.Conv2d | nn.Linear)
        ]


class AutogradConvStep:
    """HIPS autograd: ``value_and_grad`` of the loss; im2col by index arrays, one
    ``einsum`` per conv, max pooling as a max over reshaped windows."""

    label = "autograd (HIPS)"

    def __init__(self, p: ConvProblem) -> None:
        import autograd.numpy as anp
        from autograd import value_and_grad

        self.params = [a.copy() for wb in p.weights for a in wb]
        X, y, B, layers = p.X, p.y, p.batch, p.layers
        rows = np.arange(B)

        def conv(a: Any, W: Any, b: Any, k: int, pad: int) -> Any:
            if pad:
                a = anp.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="constant")
            Ho, Wo = a.shape[2] - k + 1, a.shape[3] - k + 1
            r = np.arange(k)[:, None, None, None] + np.arange(Ho)[None, None, :, None]
            c = np.arange(k)[None, :, None, None] + np.arange(Wo)[None, None, None, :]
            cols = a[:, :, r, c]  # (B, C, k, k, Ho, Wo)
            cols = anp.reshape(cols, (B, -1, Ho * Wo))
            z = anp.einsum("ok,bkp->bop", anp.reshape(W, (W.shape[0], -1)), cols)
            return anp.reshape(z + b[:, None], (B, W.shape[0], Ho, Wo))

        def loss(params: list[Any]) -> Any:
            a, i = X, 0
            for spec in layers:
                kind = spec[0]
                if kind == "conv":
                    a = conv(a, params[i], params[i + 1], spec[3], spec[4])
                    i += 2
                elif kind == "linear":
                    a = anp.dot(a, params[i].T) + params[i + 1]
                    i += 2
                elif kind == "relu":
                    a = anp.maximum(a, 0)
                elif kind == "pool":
                    k = spec[1]
                    _, C, H, Wd = a.shape
                    a = anp.max(anp.reshape(a, (B, C, H // k, k, Wd // k, k)), axis=(3, 5))
                else:
                    a = anp.reshape(a, (B, -1))
            z = a - anp.max(a, axis=1, keepdims=True)
            lse = anp.log(anp.sum(anp.exp(z), axis=1))
            return anp.sum(lse - z[rows, y]) / B

        self.vg = value_and_grad(loss)
        self.lr = p.lr

    def step(self) -> float:
        value, grads = self.vg(self.params)
        for a, g in zip(self.params, grads, strict=True):
            a -= self.lr * g
        return float(value)

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.params[i], self.params[i + 1]) for i in range(0, len(self.params), 2)]


def conv_contestants(p: ConvProblem) -> dict[str, Callable[[ConvProblem], Any]]:
    """The contestants for convnet ``p``: name -> factory. The reference comes first."""
    out: dict[str, Callable[[ConvProblem], Any]] = {
        "numpy": NumpyConvStep,
        "engine": EngineConvStep,
    }
    if torch_ok():
        out["torch"] = TorchConvStep
    if importable("autograd"):
        out["autograd"] = AutogradConvStep
    return out


# ---------------------------------------------------------------------------- the case


def run_conv_case(name: str, dtype: np.dtype[Any], repeats: int, target: float) -> dict[str, Any]:
    """Check, then time, one training step of every contestant on the convnet ``name``."""
    p = make_conv_problem(name, dtype)
    checks, timings = checked_timings(conv_contestants(p), p, NumpyConvStep, repeats, target)
    return {
        "case": f"{name} step",
        "size": name,
        "dtype": dtype.name,
        "net": f"{CONV_NETS[name][3]}: {describe(p)}",
        "batch": p.batch,
        "loss": "softmax CE",
        "checks": checks,
        "timings": timings,
    }
