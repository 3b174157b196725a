"""One pre-norm transformer encoder block and its training-step contestants.

The block is ``bp.transformer_block`` (``torch.nn.TransformerEncoderLayer`` with
``norm_first=True``, no dropout): ``h = x + MHA(LN₁(x))``, ``y = h + FFN(LN₂(h))`` with
a ReLU, on ``(B, T, d)`` tokens, under the L2 loss ``Σ‖y − t‖² / B`` against a random
target. As in ``steps``, a contestant offers ``step()`` (forward, loss, backward, SGD
update; returns the loss before the update) and ``weights()``: ``[(W, b), ...]`` in
the order ``(γ₁, β₁), (W_q, b_q), (W_k, b_k), (W_v, b_v), (W_o, b_o), (γ₂, β₂), (W₁,
b₁), (W₂, b₂)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import backprop as bp

from .problems import as_fit_batch
from .steps import checked_timings, torch_ok

#: B, T, d, heads, feed-forward width.
BLOCK = {"batch": 32, "T": 16, "d": 64, "heads": 4, "ff": 256}
EPS = 1e-5
#: The step of SGD: the loss sums T·d squares per example, and at the MLPs' step the
#: repeated steps of a timing run diverge (float32 overflows after a few hundred).
BLOCK_LR = 1e-3


@dataclass
class BlockProblem:
    """The block's data and initial weights, as ``weights()`` lists them (biases and
    LayerNorm parameters random too, so that every gradient is checked)."""

    batch: int
    T: int
    d: int
    heads: int
    ff: int
    dtype: np.dtype[Any]
    X: np.ndarray
    y: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]
    lr: float = BLOCK_LR


def make_block_problem(dtype: Any = np.float64, seed: int = 0, **sizes: int) -> BlockProblem:
    """The block of ``BLOCK`` (or of ``sizes``) in ``dtype``."""
    s = {**BLOCK, **sizes}
    B, T, d, ff = s["batch"], s["T"], s["d"], s["ff"]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)

    def pair(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        bound = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(dtype)
        return W, rng.uniform(-bound, bound, size=n_out).astype(dtype)

    def norm() -> tuple[np.ndarray, np.ndarray]:
        gamma, beta = 1 + 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)
        return gamma.astype(dtype), beta.astype(dtype)

    weights = [norm(), *(pair(d, d) for _ in range(4)), norm(), pair(ff, d), pair(d, ff)]
    X = rng.standard_normal((B, T, d)).astype(dtype)
    y = rng.standard_normal((B, T, d)).astype(dtype)
    return BlockProblem(B, T, d, s["heads"], ff, dtype, X, y, weights)


# ---------------------------------------------------------------------------- contestants


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> Any:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    s = np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + np.asarray(EPS, x.dtype))
    x_hat = xc / s
    return x_hat * gamma + beta, (x_hat, s)


def _layer_norm_back(g: np.ndarray, gamma: np.ndarray, saved: Any) -> Any:
    x_hat, s = saved
    gg = g * gamma
    g_in = (gg - gg.mean(-1, keepdims=True) - x_hat * (gg * x_hat).mean(-1, keepdims=True)) / s
    return g_in, (g * x_hat).sum(axis=(0, 1)), g.sum(axis=(0, 1))


class NumpyBlockStep:
    """The hand-written reference: the block's forward and backward written out, every
    token-wise product one GEMM over the ``B·T`` rows, the attention products batched
    over ``(B, heads)``."""

    label = "numpy (hand-written)"

    def __init__(self, p: BlockProblem) -> None:
        self.w = [(W.copy(), b.copy()) for W, b in p.weights]
        self.X, self.y, self.lr = p.X, p.y, p.lr
        self.h, self.m = p.heads, p.d // p.heads
        self.scale = 1 / np.sqrt(self.m)  # of the scores

    def _heads(self, a: np.ndarray) -> np.ndarray:  # (B, T, d) -> (B, h, T, m)
        B, T, _ = a.shape
        return a.reshape(B, T, self.h, self.m).transpose(0, 2, 1, 3)

    def step(self) -> float:
        (g1, be1), (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo), (g2, be2), (W1, b1), (W2, b2) = self.w
        x = self.X
        B, T, d = x.shape
        n1, ln1 = _layer_norm(x, g1, be1)
        rows = n1.reshape(-1, d)
        Q, K, V = (
            self._heads((rows @ W.T + b).reshape(B, T, d))
            for W, b in ((Wq, bq), (Wk, bk), (Wv, bv))
        )
        S = Q @ K.transpose(0, 1, 3, 2) * np.asarray(self.scale, x.dtype)
        A = np.exp(S - S.max(-1, keepdims=True))
        A /= A.sum(-1, keepdims=True)
        C = (A @ V).transpose(0, 2, 1, 3).reshape(-1, d)
        h = x + (C @ Wo.T + bo).reshape(B, T, d)
        n2, ln2 = _layer_norm(h, g2, be2)
        f = n2.reshape(-1, d) @ W1.T + b1
        r = np.maximum(f, 0)
        out = h + (r @ W2.T + b2).reshape(B, T, d)
        diff = out - self.y
        loss = float(np.vdot(diff, diff)) / B
        g = diff * np.asarray(2.0 / B, x.dtype)  # dJ/dy
        gf = g.reshape(-1, d)
        grads: list[Any] = [None] * 8
        grads[7] = (gf.T @ r, gf.sum(0))
        gr = (gf @ W2) * (f > 0)
        grads[6] = (gr.T @ n2.reshape(-1, d), gr.sum(0))
        gh, gg2, gbe2 = _layer_norm_back((gr @ W1).reshape(B, T, d), g2, ln2)
        grads[5] = (gg2, gbe2)
        gh = gh + g  # the residual: both paths
        ga = gh.reshape(-1, d)
        grads[4] = (ga.T @ C, ga.sum(0))
        gC = self._heads((ga @ Wo).reshape(B, T, d))
        gA = gC @ V.transpose(0, 1, 3, 2)
        gV = A.transpose(0, 1, 3, 2) @ gC
        gS = A * (gA - (gA * A).sum(-1, keepdims=True)) * np.asarray(self.scale, x.dtype)
        gQ, gK = gS @ K, gS.transpose(0, 1, 3, 2) @ Q
        g_n1 = np.zeros_like(rows)
        for i, (gP, W) in enumerate(((gQ, Wq), (gK, Wk), (gV, Wv))):
            gp = gP.transpose(0, 2, 1, 3).reshape(-1, d)
            grads[1 + i] = (gp.T @ rows, gp.sum(0))
            g_n1 += gp @ W
        _, gg1, gbe1 = _layer_norm_back(g_n1.reshape(B, T, d), g1, ln1)
        grads[0] = (gg1, gbe1)
        for (W, b), (gW, gb) in zip(self.w, grads, strict=True):
            W -= self.lr * gW
            b -= self.lr * gb
        return loss

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.w


def build_engine_block(p: BlockProblem) -> tuple[bp.Graph, bp.Graph]:
    """``bp.transformer_block`` with the problem's weights, and a model ``J(x, y)`` that
    ends it with ``L2Loss``: the block is the model's node ``"block"``."""
    block = bp.transformer_block(p.d, p.heads, p.ff, dtype=p.dtype)
    mha = block["attn"]
    owners = [
        (block["norm1"], "gamma", "beta"),
        *((mha, f"W{k}", f"b{k}") for k in "qkvo"),
        (block["norm2"], "gamma", "beta"),
        (block["ff1"], "W", "b"),
        (block["ff2"], "W", "b"),
    ]
    for (layer, w, b), (W0, b0) in zip(owners, p.weights, strict=True):
        layer.params[w].value, layer.params[b].value = W0, b0
    model = bp.Graph()
    x, y = model.input("x"), model.input("y")
    model.output(model.add(bp.L2Loss(), model.add(block, x, name="block"), y), names=["J"])
    return model, block


class EngineBlockStep:
    """This engine: the model's ``forward``, ``backward(input_grad=False)``, ``SGD.step``."""

    label = "backprop (fast)"

    def __init__(self, p: BlockProblem) -> None:
        self.model, block = build_engine_block(p)
        mha = block["attn"]
        self._owned = [
            block["norm1"].params["gamma"], block["norm1"].params["beta"],
            *(mha.params[f"{w}{k}"] for k in "qkvo" for w in "Wb"),
            block["norm2"].params["gamma"], block["norm2"].params["beta"],
            block["ff1"].params["W"], block["ff1"].params["b"],
            block["ff2"].params["W"], block["ff2"].params["b"],
        ]  # fmt: skip
        self.opt = bp.SGD(self.model.parameters(), lr=p.lr)
        self.X, self.y = as_fit_batch(p.X), as_fit_batch(p.y)

    def step(self) -> float:
        J = self.model.forward(x=self.X, y=self.y)
        grads = self.model.backward(input_grad=False)
        self.opt.step(grads)
        return float(J)

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        values = [p.value for p in self._owned]
        return list(zip(values[::2], values[1::2], strict=True))


class TorchBlockStep:
    """PyTorch eager on the CPU: ``nn.TransformerEncoderLayer(norm_first=True,
    dropout=0)`` in training mode and ``torch.optim.SGD``."""

    label = "PyTorch eager"

    def __init__(self, p: BlockProblem) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        dt = torch.float64 if p.dtype == np.float64 else torch.float32
        layer = torch.nn.TransformerEncoderLayer(
            p.d, p.heads, p.ff, dropout=0.0, batch_first=True, norm_first=True, dtype=dt
        )
        w = [tuple(torch.from_numpy(a.copy()) for a in pair) for pair in p.weights]
        with torch.no_grad():
            layer.norm1.weight.copy_(w[0][0])
            layer.norm1.bias.copy_(w[0][1])
            layer.self_attn.in_proj_weight.copy_(torch.cat([w[1][0], w[2][0], w[3][0]]))
            layer.self_attn.in_proj_bias.copy_(torch.cat([w[1][1], w[2][1], w[3][1]]))
            layer.self_attn.out_proj.weight.copy_(w[4][0])
            layer.self_attn.out_proj.bias.copy_(w[4][1])
            for mod, (W, b) in ((layer.norm2, w[5]), (layer.linear1, w[6]), (layer.linear2, w[7])):
                mod.weight.copy_(W)
                mod.bias.copy_(b)
        self.layer = layer.train()
        self.opt = torch.optim.SGD(layer.parameters(), lr=p.lr)
        self.X = torch.from_numpy(p.X.copy())
        self.y = torch.from_numpy(p.y.copy())
        self.B = p.batch

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        diff = self.layer(self.X) - self.y
        loss = (diff * diff).sum() / self.B
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        t, a = self.layer, self.layer.self_attn
        d = a.embed_dim
        W_in, b_in = a.in_proj_weight.detach().numpy(), a.in_proj_bias.detach().numpy()
        qkv = [(W_in[i * d : (i + 1) * d], b_in[i * d : (i + 1) * d]) for i in range(3)]
        mods = [t.norm1, None, t.norm2, t.linear1, t.linear2]
        pairs = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in mods if m]
        out_proj = (a.out_proj.weight.detach().numpy(), a.out_proj.bias.detach().numpy())
        return [pairs[0], *qkv, out_proj, *pairs[1:]]


def block_contestants(p: BlockProblem) -> dict[str, Callable[[BlockProblem], Any]]:
    """The contestants: name -> factory. The reference comes first."""
    out: dict[str, Callable[[BlockProblem], Any]] = {
        "numpy": NumpyBlockStep,
        "engine": EngineBlockStep,
    }
    if torch_ok():
        out["torch"] = TorchBlockStep
    return out


def run_transformer_case(dtype: np.dtype[Any], repeats: int, target: float) -> dict[str, Any]:
    """Check, then time, one training step of every contestant on the block."""
    p = make_block_problem(dtype)
    checks, timings = checked_timings(block_contestants(p), p, NumpyBlockStep, repeats, target)
    return {
        "case": "transformer step",
        "size": "transformer",
        "dtype": dtype.name,
        "net": f"pre-norm encoder block: d {p.d}, {p.heads} heads, feed-forward {p.ff}, T {p.T}",
        "batch": p.batch,
        "loss": "L2",
        "checks": checks,
        "timings": timings,
    }
