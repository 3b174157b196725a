"""The training-step contestants, their check against the numpy step, and the step case.

A contestant is built from a Problem (copying the weights) and offers ``step()``,
which does one training step (forward, loss, backward, SGD update) and returns the
loss before the update, and ``weights()``, the current ``[(W, b), ...]`` as numpy
arrays. PyTorch and HIPS autograd are optional: a missing one is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import backprop as bp

from .problems import RTOL, Problem, as_fit_batch, build_engine_net, close, make_problem
from .timing import check_note, time_against


class NumpyStep:
    """The hand-written reference: exactly the GEMMs a step needs, in place where free."""

    label = "numpy (hand-written)"

    def __init__(self, p: Problem) -> None:
        self.W = [W.copy() for W, _ in p.weights]
        self.b = [b.copy() for _, b in p.weights]
        self.X, self.y, self.lr, self.ce = p.X, p.y, p.lr, p.loss == "ce"
        self.rows = np.arange(p.batch)

    def step(self) -> float:
        W, b, n = self.W, self.b, len(self.W)
        acts = [self.X]
        a = self.X
        for i in range(n):
            z = a @ W[i].T
            z += b[i]
            if i < n - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
            a = z
        B = a.shape[0]
        if self.ce:
            z = a - a.max(axis=1, keepdims=True)
            g = np.exp(z)
            s = g.sum(axis=1, keepdims=True)
            loss = float(np.log(s).sum() - z[self.rows, self.y].sum()) / B
            g /= s
            g[self.rows, self.y] -= 1
            g *= 1.0 / B
        else:
            g = a - self.y
            loss = float(np.vdot(g, g)) / B
            g *= 2.0 / B
        grads = []
        for i in range(n - 1, -1, -1):
            grads.append((i, g.T @ acts[i], g.sum(axis=0)))
            if i > 0:
                g = g @ W[i]
                g *= acts[i] > 0
        for i, gW, gb in grads:
            W[i] -= self.lr * gW
            b[i] -= self.lr * gb
        return loss

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(zip(self.W, self.b, strict=True))


class EngineStep:
    """This engine: ``Sequential.forward``, ``backward(input_grad=False)``, ``SGD.step``,
    as ``fit`` runs them, on the data as ``fit`` hands them over (``as_fit_batch``)."""

    label = "backprop (fast)"

    #: The layers that hold a ``W`` and a ``b``, in order (what ``weights`` lists).
    weighted: tuple[type, ...] = (bp.Linear,)

    def __init__(self, p: Any) -> None:
        self.net = self.build(p)
        self.opt = bp.SGD(self.net.parameters(), lr=p.lr)
        self.X, self.y = as_fit_batch(p.X), as_fit_batch(p.y)

    @staticmethod
    def build(p: Any) -> bp.Sequential:
        return build_engine_net(p)

    def step(self) -> float:
        J = self.net.forward(self.X, self.y)
        self.opt.step(self.net.backward(input_grad=False).params)  # as fit does
        return float(J)

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        layers = [layer for layer in self.net if isinstance(layer, self.weighted)]
        return [(layer.params["W"].value, layer.params["b"].value) for layer in layers]


class TorchStep:
    """PyTorch eager on the CPU: ``nn.Sequential`` and ``torch.optim.SGD``."""

    label = "PyTorch eager"

    def __init__(self, p: Problem) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        dt = torch.float64 if p.dtype == np.float64 else torch.float32
        mods: list[Any] = []
        n = len(p.weights)
        for i, (W, b) in enumerate(p.weights):
            lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W))
                lin.bias.copy_(torch.from_numpy(b))
            mods.append(lin)
            if i < n - 1:
                mods.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*mods)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=p.lr)
        self.X = torch.from_numpy(p.X.copy())
        self.y = torch.from_numpy(p.y.copy())
        self.ce, self.B = p.loss == "ce", p.batch

    def step(self) -> float:
        F = self.torch.nn.functional
        self.opt.zero_grad(set_to_none=True)
        out = self.model(self.X)
        if self.ce:
            loss = F.cross_entropy(out, self.y)
        else:
            loss = F.mse_loss(out, self.y, reduction="sum") / self.B
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        lins = [m for m in self.model if isinstance(m, self.torch.nn.Linear)]
        return [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in lins]


class AutogradStep:
    """HIPS autograd: ``value_and_grad`` of the loss over the list of weights."""

    label = "autograd (HIPS)"

    def __init__(self, p: Problem) -> None:
        import autograd.numpy as anp
        from autograd import value_and_grad

        self.params = [a.copy() for wb in p.weights for a in wb]
        X, y, B, n = p.X, p.y, p.batch, len(p.weights)
        rows = np.arange(B)

        def loss(params: list[Any]) -> Any:
            a = X
            for i in range(n):
                a = anp.dot(a, params[2 * i].T) + params[2 * i + 1]
                if i < n - 1:
                    a = anp.maximum(a, 0)
            if p.loss == "l2":
                return anp.sum((a - y) ** 2) / B
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


# ---------------------------------------------------------------------------- who takes part


def importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def torch_version() -> str | None:
    """The installed PyTorch version, or None. Only torch 2.13.0 takes part."""
    if not importable("torch"):
        return None
    import torch

    return str(torch.__version__)


def torch_ok() -> bool:
    v = torch_version()
    return v is not None and v.split("+")[0] == "2.13.0"


def step_contestants(p: Problem) -> dict[str, Callable[[Problem], Any]]:
    """The contestants for problem ``p``: name -> factory. The reference comes first."""
    out: dict[str, Callable[[Problem], Any]] = {"numpy": NumpyStep, "engine": EngineStep}
    if torch_ok():
        out["torch"] = TorchStep
    if importable("autograd"):
        out["autograd"] = AutogradStep
    return out


# ---------------------------------------------------------------------------- the step case


def check_first_step(
    factory: Callable[[Any], Any], p: Any, reference: Callable[[Any], Any] = NumpyStep
) -> tuple[bool, str]:
    """Run one step of a fresh contestant and of a fresh numpy ``reference`` and
    compare the loss and every updated weight at the dtype's rtol."""
    rtol = RTOL[p.dtype]
    ref = reference(p)
    ref_loss = ref.step()
    c = factory(p)
    loss = c.step()
    ok, err = close(loss, ref_loss, rtol)
    worst = err
    if not ok:
        return False, f"loss {loss!r} vs reference {ref_loss!r} (rel. error {err:.2e})"
    pairs = zip(c.weights(), ref.weights(), strict=True)
    named = [
        (f"layer {i} {what}", got, want)
        for i, ((W, b), (W0, b0)) in enumerate(pairs)
        for what, got, want in (("W", W, W0), ("b", b, b0))
    ]
    return compare_weights(named, p.dtype, rtol, worst)


def compare_weights(
    named: list[tuple[str, Any, Any]], dtype: np.dtype[Any], rtol: float, worst: float
) -> tuple[bool, str]:
    """``(ok, note)`` for the weights after one step, ``(name, got, reference)`` each:
    the dtype kept and the values within ``rtol`` (``worst``: the loss's error so far)."""
    for what, got, want in named:
        if np.asarray(got).dtype != dtype:
            return False, f"{what} is {np.asarray(got).dtype}, expected {dtype}"
        ok, err = close(got, want, rtol)
        worst = max(worst, err)
        if not ok:
            return False, f"{what} after one step: rel. error {err:.2e} > {rtol}"
    return True, f"max rel. error {worst:.1e}"


def checked_timings(
    contestants: dict[str, Callable[[Any], Any]],
    p: Any,
    reference: Callable[[Any], Any],
    repeats: int,
    target: float,
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Each contestant's first step checked against ``reference`` (what the check
    said, by name), then the steps of those that passed timed against ``"numpy"``."""
    checks: dict[str, str] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for cname, factory in contestants.items():
        ok, msg = check_first_step(factory, p, reference=reference)
        checks[cname] = check_note(ok, msg)
        if ok:
            fns[cname] = factory(p).step
    return checks, time_against(fns, "numpy", repeats, target)


def run_step_case(name: str, dtype: np.dtype[Any], repeats: int, target: float) -> dict[str, Any]:
    """Check, then time, one training step of every contestant on the problem ``name``."""
    p = make_problem(name, dtype)
    checks, timings = checked_timings(step_contestants(p), p, NumpyStep, repeats, target)
    return {
        "case": f"{name} step",
        "size": name,
        "dtype": dtype.name,
        "net": "-".join(map(str, p.sizes)),
        "batch": p.batch,
        "loss": "L2" if p.loss == "l2" else "softmax CE",
        "checks": checks,
        "timings": timings,
    }
