"""Backprop through time: one training step of an Elman RNN, and its contestants.

The net is ``h_t = tanh(W_x x_t + W_h h_{t−1} + b)`` from ``h_0 = 0`` over ``T`` steps,
and the loss the squared error of every state against a target sequence, averaged
over the batch: ``J = (1/B) Σ_b Σ_t ‖h_t − y_t‖²``. One step is the forward pass,
the loss, backprop through time and an SGD update of ``W_x``, ``W_h`` and ``b``.

Contestants: a hand-written numpy BPTT (the reference: two GEMMs a step forward,
three back), the engine (``bp.unroll`` in a Graph with ``L2Loss``, ``SGD``),
PyTorch eager with an ``nn.RNNCell`` called once per step, and PyTorch's fused
``nn.RNN``. PyTorch's cells hold two biases; ``bias_hh`` is kept at zero and frozen
so that ``bias_ih`` is the engine's ``b`` and one SGD step moves both alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import backprop as bp

from .problems import LR, RTOL, as_fit_batch, close
from .steps import compare_weights, torch_ok
from .timing import check_note, time_against

#: T steps, a batch of B, n_in inputs and n hidden units per step.
RNN_SIZE = {"T": 32, "B": 32, "n_in": 16, "n": 64}


@dataclass
class RNNProblem:
    """The sequences ``X`` ``(B, T, n_in)``, the targets ``Y`` ``(B, T, n)`` and the
    initial weights ``W_x`` ``(n, n_in)``, ``W_h`` ``(n, n)``, ``b`` ``(n,)`` (uniform in
    ``±1/sqrt(n)``, as PyTorch draws them)."""

    dtype: np.dtype[Any]
    X: np.ndarray
    Y: np.ndarray
    W_x: np.ndarray
    W_h: np.ndarray
    b: np.ndarray
    lr: float = LR


def make_rnn_problem(dtype: Any = np.float64, seed: int = 0) -> RNNProblem:
    T, B, n_in, n = (RNN_SIZE[k] for k in ("T", "B", "n_in", "n"))
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(n)
    W_x, W_h = rng.uniform(-bound, bound, (n, n_in)), rng.uniform(-bound, bound, (n, n))
    b = rng.uniform(-bound, bound, n)
    X, Y = rng.standard_normal((B, T, n_in)), 0.5 * rng.standard_normal((B, T, n))
    arrays = (a.astype(dtype) for a in (X, Y, W_x, W_h, b))
    return RNNProblem(dtype, *arrays)


class NumpyRNNStep:
    """The reference: BPTT written out, the states kept for the way back."""

    label = "numpy (hand-written)"

    def __init__(self, p: RNNProblem) -> None:
        self.W_x, self.W_h, self.b = p.W_x.copy(), p.W_h.copy(), p.b.copy()
        self.X, self.Y, self.lr = p.X, p.Y, p.lr

    def step(self) -> float:
        X, W_x, W_h = self.X, self.W_x, self.W_h
        B, T, _ = X.shape
        hs = np.empty((T + 1, B, W_h.shape[0]), dtype=X.dtype)
        hs[0] = 0.0
        U = X @ W_x.T + self.b  # every step's input term at once: (B, T, n)
        for t in range(T):
            a = hs[t] @ W_h.T
            a += U[:, t]
            np.tanh(a, out=hs[t + 1])
        diff = hs[1:].transpose(1, 0, 2) - self.Y  # (B, T, n)
        loss = float(np.vdot(diff, diff)) / B
        g_states = (2.0 / B) * diff
        gW_h = np.zeros_like(W_h)
        GA = np.empty_like(g_states)  # dJ/da_t for every step
        g = np.zeros((B, W_h.shape[0]), dtype=X.dtype)
        for t in range(T - 1, -1, -1):
            g += g_states[:, t]
            ga = GA[:, t]
            np.multiply(g, 1.0 - hs[t + 1] * hs[t + 1], out=ga)
            gW_h += ga.T @ hs[t]
            g = ga @ W_h
        gW_x = GA.reshape(B * T, -1).T @ X.reshape(B * T, -1)
        gb = GA.sum(axis=(0, 1))
        self.W_x -= self.lr * gW_x
        self.W_h -= self.lr * gW_h
        self.b -= self.lr * gb
        return loss

    def weights(self) -> list[np.ndarray]:
        return [self.W_x, self.W_h, self.b]


class EngineRNNStep:
    """The engine: ``unroll(RNNCell)`` from the zero state, ``L2Loss`` on the states,
    ``backward(input_grad=False)`` and ``SGD.step``."""

    label = "backprop (fast)"

    def __init__(self, p: RNNProblem) -> None:
        T, n_in, n = p.X.shape[1], p.X.shape[2], p.W_h.shape[0]
        self.cell = bp.RNNCell(n_in, n, W_x=p.W_x.copy(), W_h=p.W_h.copy(), b=p.b.copy())
        model = bp.Graph()
        x, y = model.input("x"), model.input("y")
        states = model.add(bp.unroll(self.cell, T, h0="zeros"), x, name="rnn")
        model.output(model.add(bp.L2Loss(), states, y, name="loss"))
        self.model, self.X, self.Y = model, as_fit_batch(p.X), as_fit_batch(p.Y)
        self.opt = bp.SGD(model.parameters(), lr=p.lr)

    def step(self) -> float:
        J = self.model.forward(x=self.X, y=self.Y)
        self.opt.step(self.model.backward(input_grad=False).params)
        return float(J)

    def weights(self) -> list[np.ndarray]:
        return [self.cell.params[k].value for k in ("W_x", "W_h", "b")]


class TorchRNNStep:
    """PyTorch eager: ``nn.RNNCell`` once per step, the states stacked, ``optim.SGD``."""

    label = "PyTorch eager"

    def __init__(self, p: RNNProblem) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        n_in, n = p.X.shape[2], p.W_h.shape[0]
        dt = torch.float64 if p.dtype == np.float64 else torch.float32
        self.module = self.build(n_in, n, dt)
        self.params = self._load(p)
        self.opt = torch.optim.SGD([q for q in self.params if q.requires_grad], lr=p.lr)
        self.X, self.Y = torch.from_numpy(p.X.copy()), torch.from_numpy(p.Y.copy())

    def build(self, n_in: int, n: int, dt: Any) -> Any:
        return self.torch.nn.RNNCell(n_in, n, dtype=dt)

    def _load(self, p: RNNProblem) -> list[Any]:
        """The weights into the module, ``bias_hh`` zero and frozen; the four tensors."""
        m = self.module
        suffix = "_l0" if isinstance(m, self.torch.nn.RNN) else ""
        tensors = [getattr(m, f"{k}{suffix}") for k in ("weight_ih", "weight_hh", "bias_ih")]
        bias_hh = getattr(m, f"bias_hh{suffix}")
        with self.torch.no_grad():
            for t, a in zip(tensors, (p.W_x, p.W_h, p.b), strict=True):
                t.copy_(self.torch.from_numpy(a))
            bias_hh.zero_()
        bias_hh.requires_grad_(False)
        return [*tensors, bias_hh]

    def states(self) -> Any:
        h = self.X.new_zeros(self.X.shape[0], self.params[1].shape[0])
        outs = []
        for t in range(self.X.shape[1]):
            h = self.module(self.X[:, t], h)
            outs.append(h)
        return self.torch.stack(outs, dim=1)

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        diff = self.states() - self.Y
        loss = (diff * diff).sum() / self.X.shape[0]
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def weights(self) -> list[np.ndarray]:
        return [t.detach().numpy() for t in self.params[:3]]


class TorchFusedRNNStep(TorchRNNStep):
    """PyTorch's fused ``nn.RNN`` (one call for all the steps), otherwise as above."""

    label = "PyTorch nn.RNN (fused)"

    def build(self, n_in: int, n: int, dt: Any) -> Any:
        return self.torch.nn.RNN(n_in, n, batch_first=True, dtype=dt)

    def states(self) -> Any:
        return self.module(self.X)[0]


def rnn_contestants() -> dict[str, Callable[[RNNProblem], Any]]:
    """name -> factory; the reference first. PyTorch only at version 2.13.0."""
    out: dict[str, Callable[[RNNProblem], Any]] = {
        "numpy": NumpyRNNStep,
        "engine": EngineRNNStep,
    }
    if torch_ok():
        out["torch"] = TorchRNNStep
        out["torch_fused"] = TorchFusedRNNStep
    return out


def check_rnn_first_step(factory: Callable[[RNNProblem], Any], p: RNNProblem) -> tuple[bool, str]:
    """One step of a fresh contestant and of a fresh numpy reference: the loss and the
    three updated weights must agree at the dtype's rtol."""
    rtol = RTOL[p.dtype]
    ref, c = NumpyRNNStep(p), factory(p)
    ok, worst = close(c.step(), ref.step(), rtol)
    if not ok:
        return False, f"loss: rel. error {worst:.2e} > {rtol}"
    named = list(zip(("W_x", "W_h", "b"), c.weights(), ref.weights(), strict=True))
    return compare_weights(named, p.dtype, rtol, worst)


def run_rnn_case(name: str, dtype: np.dtype[Any], repeats: int, target: float) -> dict[str, Any]:
    """Check, then time, one BPTT training step of every contestant."""
    p = make_rnn_problem(dtype)
    checks: dict[str, str] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for cname, factory in rnn_contestants().items():
        ok, msg = check_rnn_first_step(factory, p)
        checks[cname] = check_note(ok, msg)
        if ok:
            fns[cname] = factory(p).step
    T, B, n_in, n = (RNN_SIZE[k] for k in ("T", "B", "n_in", "n"))
    return {
        "case": f"{name} step",
        "size": name,
        "dtype": dtype.name,
        "net": f"Elman RNN, tanh, {n_in}→{n}, T = {T}",
        "batch": B,
        "loss": "L2 on every state",
        "checks": checks,
        "timings": time_against(fns, "numpy", repeats, target),
    }
