"""Side-by-side benchmark of the engine against hand-written numpy, PyTorch and autograd.

Run it with ``make bench`` (or ``python benchmarks/run.py``). In one run it

- times one training step (forward, loss, backward, SGD update) of three MLPs in
  float64 and float32, with the contestants interleaved round by round, and reports
  the median of the repeats and its ratio to the hand-written numpy step;
- times the Jacobians of the large MLP (``∂y/∂x`` for 1 and for 32 examples,
  ``∂y/∂W1`` for 1 example) against the explicit numpy chain ``W3 diag W2 diag W1``
  and ``torch.func.jacrev``;
- measures the peak memory of the large step with ``tracemalloc`` against the numpy
  step, and lists any float64 array that shows up in a float32 step.

Every contestant's first step (or Jacobian) is checked against the numpy reference
before it is timed, so only correct work is timed. BLAS runs on one thread. The
results go to ``benchmarks/results.json`` and ``benchmarks/results.md``.

PyTorch and HIPS autograd are optional: a contestant whose package is missing is
left out of the table.
"""

from __future__ import annotations

# Run as a script, pin every BLAS / OpenMP pool to one thread before numpy (or torch)
# is imported. (Imported by the tests, the module leaves the environment alone.)
import os

if __name__ == "__main__":
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402

import backprop as bp  # noqa: E402

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------- problems

#: name -> (layer sizes, batch, loss). Hidden layers use ReLU.
STEP_SIZES: dict[str, tuple[tuple[int, ...], int, str]] = {
    "tiny": ((2, 16, 16, 1), 100, "l2"),
    "small": ((64, 128, 10), 64, "ce"),
    "large": ((784, 1024, 1024, 10), 256, "ce"),
}
DTYPES = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32)}
#: rtol of the first-step check, per dtype.
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
LR = 0.01


@dataclass
class Problem:
    """One MLP, its data and its initial weights: what every contestant starts from.

    ``weights`` is a list of ``(W, b)`` with ``W`` of shape ``(n_out, n_in)``.
    ``y`` is ``(B, n_L)`` floats for the L2 loss and ``(B,)`` int64 labels for
    softmax cross-entropy.
    """

    name: str
    sizes: tuple[int, ...]
    batch: int
    loss: str
    dtype: np.dtype[Any]
    X: np.ndarray
    y: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]
    lr: float = LR


def make_problem(name: str, dtype: Any = np.float64, seed: int = 0) -> Problem:
    """The problem ``name`` (a key of ``STEP_SIZES``) in ``dtype``."""
    sizes, batch, loss = STEP_SIZES[name]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    weights = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(dtype)
        b = rng.uniform(-bound, bound, size=n_out).astype(dtype)
        weights.append((W, b))
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    if loss == "l2":
        y = rng.standard_normal((batch, sizes[-1])).astype(dtype)
    else:
        y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
    return Problem(name, sizes, batch, loss, dtype, X, y, weights)


# ---------------------------------------------------------------------------- contestants
#
# A contestant is built from a Problem (copying the weights) and offers ``step()``,
# which does one training step and returns the loss before the update, and
# ``weights()``, the current ``[(W, b), ...]`` as numpy arrays.


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


def build_engine_net(p: Problem, loss: bool = True) -> bp.Sequential:
    """The problem's MLP as a ``bp.Sequential`` (Linear, ReLU, ..., Linear[, loss])."""
    layers: list[bp.Layer] = []
    n = len(p.weights)
    for i, (W, b) in enumerate(p.weights):
        layers.append(bp.Linear(W.shape[1], W.shape[0], W=W.copy(), b=b.copy(), dtype=p.dtype))
        if i < n - 1:
            layers.append(bp.ReLU())
    if loss:
        layers.append(bp.L2Loss() if p.loss == "l2" else bp.SoftmaxCrossEntropy())
    return bp.Sequential(layers)


class EngineStep:
    """This engine: ``Sequential.forward``, ``backward(input_grad=False)``, ``SGD.step``."""

    label = "backprop (fast)"
    mode = "fast"

    def __init__(self, p: Problem) -> None:
        self.net = build_engine_net(p)
        self.opt = bp.SGD(self.net.parameters(), lr=p.lr)
        self.X, self.y = p.X, p.y

    def step(self) -> float:
        J = self.net.forward(self.X, self.y)
        _, grads = self.net.backward(mode=self.mode, input_grad=False)
        self.opt.step(grads)
        return float(J)

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        lins = [layer for layer in self.net if isinstance(layer, bp.Linear)]
        return [(lin.params["W"].value, lin.params["b"].value) for lin in lins]


class EngineExplicitStep(EngineStep):
    """This engine, running Algorithm 14.1 literally with ``scipy.sparse`` Jacobians."""

    label = "backprop (explicit sparse)"
    mode = "explicit"


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


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def torch_version() -> str | None:
    """The installed PyTorch version, or None. Only torch 2.13.0 takes part."""
    if not _importable("torch"):
        return None
    import torch

    return str(torch.__version__)


def torch_ok() -> bool:
    v = torch_version()
    return v is not None and v.split("+")[0] == "2.13.0"


def step_contestants(p: Problem) -> dict[str, Callable[[Problem], Any]]:
    """The contestants for problem ``p``: name -> factory. The reference comes first."""
    out: dict[str, Callable[[Problem], Any]] = {"numpy": NumpyStep, "engine": EngineStep}
    if p.name in ("tiny", "small"):
        out["engine_explicit"] = EngineExplicitStep
    if torch_ok():
        out["torch"] = TorchStep
    if _importable("autograd"):
        out["autograd"] = AutogradStep
    return out


# ---------------------------------------------------------------------------- checks


def _close(a: Any, b: Any, rtol: float) -> tuple[bool, float]:
    """Relative closeness scaled by the reference's largest entry; also the error."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False, float("inf")
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    err = float(np.abs(a - b).max(initial=0.0)) / scale
    return err <= rtol, err


def check_first_step(factory: Callable[[Problem], Any], p: Problem) -> tuple[bool, str]:
    """Run one step of a fresh contestant and of a fresh numpy reference and compare
    the loss and every updated weight at the dtype's rtol."""
    rtol = RTOL[p.dtype]
    ref = NumpyStep(p)
    ref_loss = ref.step()
    c = factory(p)
    loss = c.step()
    ok, err = _close(loss, ref_loss, rtol)
    worst = err
    if not ok:
        return False, f"loss {loss!r} vs reference {ref_loss!r} (rel. error {err:.2e})"
    for i, ((W, b), (W0, b0)) in enumerate(zip(c.weights(), ref.weights(), strict=True)):
        for what, got, want in (("W", W, W0), ("b", b, b0)):
            if np.asarray(got).dtype != p.dtype:
                return False, f"layer {i} {what} is {np.asarray(got).dtype}, expected {p.dtype}"
            ok, err = _close(got, want, rtol)
            worst = max(worst, err)
            if not ok:
                return False, f"layer {i} {what} after one step: rel. error {err:.2e} > {rtol}"
    return True, f"max rel. error {worst:.1e}"


# ---------------------------------------------------------------------------- timing


def _calibrate(fn: Callable[[], Any], target: float) -> int:
    """How many calls of ``fn`` take about ``target`` seconds (at least 1)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, int(target / max(dt, 1e-7)))


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, target: float
) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each function, measured round-robin.

    Each round times every function once (``inner`` calls in a row, with the
    garbage collector off), and the order rotates from round to round so that no
    contestant is always first after another one.
    """
    for fn in fns.values():  # warm-up: caches, lazy imports, first-call costs
        fn()
    inner = {name: _calibrate(fn, target) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], inner[name]
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                dt = (time.perf_counter() - t0) / k
            finally:
                gc.enable()
            samples[name].append(dt)
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "repeats": len(s),
            "calls_per_repeat": inner[name],
        }
        for name, s in samples.items()
    }


# ---------------------------------------------------------------------------- step cases


LABELS = {
    "numpy": NumpyStep.label,
    "engine": EngineStep.label,
    "engine_explicit": EngineExplicitStep.label,
    "torch": TorchStep.label,
    "autograd": AutogradStep.label,
    "numpy_chain": "numpy chain W3 diag W2 diag W1",
    "jacrev": "torch.func.jacrev",
}


def run_step_case(name: str, dtype: np.dtype[Any], repeats: int, target: float) -> dict[str, Any]:
    p = make_problem(name, dtype)
    checks: dict[str, str] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for cname, factory in step_contestants(p).items():
        ok, msg = check_first_step(factory, p)
        checks[cname] = ("ok: " if ok else "WRONG, not timed: ") + msg
        if ok:
            fns[cname] = factory(p).step
    timings = time_interleaved(fns, repeats, target)
    ref = timings["numpy"]["median_s"]
    for t in timings.values():
        t["ratio_numpy"] = t["median_s"] / ref
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


# ---------------------------------------------------------------------------- jacobians


def numpy_chain(p: Problem, X: np.ndarray, wrt: str) -> np.ndarray:
    """``∂y/∂x`` (``(B, 10, 784)``) or ``∂y/∂W1`` (``(B, 10, 1024*784)``) by hand."""
    (W1, b1), (W2, b2), (W3, b3) = p.weights
    B = X.shape[0]
    h1 = X @ W1.T
    h1 += b1
    m1 = h1 > 0
    a1 = h1 * m1
    h2 = a1 @ W2.T
    h2 += b2
    m2 = h2 > 0
    y = (h2 * m2) @ W3.T + b3
    del y  # the output itself is part of evaluating the point, not of the Jacobian
    J = W3[None, :, :] * m2[:, None, :]  # W3 diag(m2): (B, 10, 1024)
    J = (J.reshape(-1, W2.shape[0]) @ W2).reshape(B, -1, W2.shape[1])
    J *= m1[:, None, :]  # ... W2 diag(m1)
    if wrt == "W1":  # ∂y/∂W1[i, j*784 + k] = J[i, j] x[k]
        return (J[:, :, :, None] * X[:, None, None, :]).reshape(B, J.shape[1], -1)
    return (J.reshape(-1, W1.shape[0]) @ W1).reshape(B, -1, W1.shape[1])


def engine_jacobian(net: bp.Sequential, X: np.ndarray, wrt: str) -> np.ndarray:
    net.forward(X)
    L_x, L_theta = net.jacobians()
    if wrt == "W1":
        return L_theta[net[0].params["W"]].to_dense()
    return L_x.to_dense()


def torch_jacobian_fn(p: Problem, X: np.ndarray, wrt: str) -> Callable[[], np.ndarray]:
    import torch
    from torch.func import functional_call, jacrev, vmap

    torch.set_num_threads(1)
    model = TorchStep(p).model
    params = {k: v.detach() for k, v in model.named_parameters()}
    Xt = torch.from_numpy(X.copy())
    B = X.shape[0]

    if wrt == "W1":

        def f(W1: Any) -> Any:
            return functional_call(model, {**params, "0.weight": W1}, (Xt[0],))

        def run() -> np.ndarray:
            J = jacrev(f)(params["0.weight"])  # (10, 1024, 784)
            return J.reshape(1, J.shape[0], -1).numpy()

        return run

    def g(x: Any) -> Any:
        return functional_call(model, params, (x,))

    def run_x() -> np.ndarray:
        return vmap(jacrev(g))(Xt).numpy().reshape(B, -1, X.shape[1])

    return run_x


def run_jacobian_case(
    wrt: str, batch: int, repeats: int, target: float, limit_batch: int
) -> dict[str, Any]:
    p = make_problem("large", np.float64)
    X = p.X[:batch].copy()
    net = build_engine_net(p, loss=False)
    contestants: dict[str, Callable[[], np.ndarray]] = {
        "numpy_chain": lambda: numpy_chain(p, X, wrt),
        "engine": lambda: engine_jacobian(net, X, wrt),
    }
    if torch_ok():
        contestants["jacrev"] = torch_jacobian_fn(p, X, wrt)
    want = numpy_chain(p, X, wrt)
    checks: dict[str, str] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for cname, fn in contestants.items():
        ok, err = _close(fn(), want, RTOL[p.dtype])
        checks[cname] = ("ok: " if ok else "WRONG, not timed: ") + f"max rel. error {err:.1e}"
        if ok:
            fns[cname] = fn
    del want
    timings = time_interleaved(fns, repeats, target)
    ref = timings["numpy_chain"]["median_s"]
    for t in timings.values():
        t["ratio_numpy"] = t["median_s"] / ref
    out: dict[str, Any] = {
        "case": f"∂y/∂{'x' if wrt == 'x' else 'W1'}, batch {batch}",
        "size": "large",
        "dtype": "float64",
        "net": "784-1024-1024-10",
        "batch": batch,
        "checks": checks,
        "timings": timings,
    }
    if wrt == "W1":  # the dense ∂y/∂W1 of a whole large batch is refused, with its size
        Xb = make_problem("large", np.float64).X[:limit_batch].copy()
        net.forward(Xb)
        try:
            net.jacobians()[1][net[0].params["W"]].to_dense()
            out["refusal"] = f"batch {limit_batch}: built (not refused)"
        except ValueError as e:
            out["refusal"] = f"batch {limit_batch}: ValueError: {e}"
    return out


# ---------------------------------------------------------------------------- memory


def _traced_step_memory(factory: Callable[[Problem], Any], p: Problem) -> dict[str, int]:
    """Bytes traced by ``tracemalloc`` around the second step of a fresh contestant.

    ``held`` is what is alive just before the step (weights, copies of the data,
    whatever the contestant keeps between steps); ``peak`` is the highest total
    during the step; ``step_extra = peak - held``.
    """
    gc.collect()
    tracemalloc.start()
    try:
        c = factory(p)
        c.step()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        c.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"held": held, "peak": peak, "step_extra": peak - held}


def float64_arrays_in_float32_step(p: Problem) -> list[str]:
    """Every float64 array that a float32 step of the engine makes or keeps.

    Looks at what each layer's forward caches (inputs, parameters, output, saved
    arrays), at every ``g_in`` and parameter gradient of a layer-by-layer backward,
    at the Jacobians' dtypes, and at the parameters after the SGD update.
    """
    net = build_engine_net(p)
    opt = bp.SGD(net.parameters(), lr=p.lr)
    found: list[str] = []

    def look(where: str, a: Any) -> None:
        if isinstance(a, np.ndarray) and a.dtype == np.float64:
            found.append(f"{where}: float64 {a.shape}")

    J = net.forward(p.X, p.y)
    look("loss J", J)
    for i, layer in enumerate(net):
        op = layer._op
        assert op is not None  # forward just ran
        for k, a in enumerate(op.x_in):
            look(f"layer {i} {layer!r} x_in[{k}]", a)
        for name, a in op.theta.items():
            look(f"layer {i} {layer!r} θ {name}", a)
        look(f"layer {i} {layer!r} x_out", op.x_out)
        for name, a in op.saved.items():
            look(f"layer {i} {layer!r} saved {name}", a)
        L_x, L_th = layer.jacobians()
        for k, L in enumerate(L_x if isinstance(L_x, tuple) else (L_x,)):
            if L is not None and L.dtype == np.float64:
                found.append(f"layer {i} {layer!r} L_x[{k}]: float64 {L!r}")
        for name, L in L_th.items():
            if L.dtype == np.float64:
                found.append(f"layer {i} {layer!r} L_theta {name}: float64 {L!r}")
    grads_all: dict[Any, np.ndarray] = {}
    g: Any = None
    for i in range(len(net) - 1, -1, -1):
        layer = net[i]
        g_in, grads = layer.backward(g)
        g_in = g_in[0] if isinstance(g_in, tuple) else g_in
        look(f"layer {i} {layer!r} g_in", g_in)
        for name, a in grads.items():
            look(f"layer {i} {layer!r} grad {name}", a)
            grads_all[layer.params[name]] = a
        g = g_in
    _, grads_seq = net.backward(input_grad=False)
    for param, a in grads_seq.items():
        look(f"Sequential.backward grad {param!r}", a)
    opt.step(grads_seq)
    for param in net.parameters():
        look(f"{param!r} after SGD", param.value)
    return found


def run_memory_case(dtypes: list[np.dtype[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"case": "peak memory, large step", "by_dtype": {}}
    for dtype in dtypes:
        p = make_problem("large", dtype)
        ref = _traced_step_memory(NumpyStep, p)
        eng = _traced_step_memory(EngineStep, p)
        out["by_dtype"][dtype.name] = {
            "numpy": ref,
            "engine": eng,
            "ratio_peak": eng["peak"] / ref["peak"],
            "ratio_step_extra": eng["step_extra"] / ref["step_extra"],
        }
    if np.dtype(np.float32) in dtypes:
        out["float64_in_float32_step"] = float64_arrays_in_float32_step(
            make_problem("large", np.float32)
        )
        if np.dtype(np.float64) in dtypes:
            d = out["by_dtype"]
            out["engine_peak_f32_over_f64"] = (
                d["float32"]["engine"]["peak"] / d["float64"]["engine"]["peak"]
            )
    return out


# ---------------------------------------------------------------------------- machine


def blas_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        cfg = np.show_config(mode="dicts")  # type: ignore[func-returns-value]
        blas = cfg["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
        info["numpy_blas_config"] = blas.get("openblas configuration", "")
    except Exception as e:  # show_config's layout is not an API
        info["numpy_blas"] = f"unknown ({type(e).__name__})"
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for d in threadpool_info()
        ]
    except ImportError:
        pass
    info["threads_env"] = {
        v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    return info


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "backprop": bp.__version__,
        "torch": torch_version(),
    }
    if _importable("autograd"):
        from importlib.metadata import version

        versions["autograd"] = version("autograd")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
        "blas": blas_info(),
    }


# ---------------------------------------------------------------------------- goals


def _ratio(results: list[dict[str, Any]], case: str, dtype: str, a: str, b: str) -> float | None:
    for r in results:
        if r["case"] == case and r["dtype"] == dtype:
            t = r["timings"]
            if a in t and b in t:
                return float(t[a]["median_s"] / t[b]["median_s"])
    return None


def evaluate_goals(
    results: list[dict[str, Any]], memory: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The goals table, each with the ratio measured in this run (None: not measured)."""
    goals: list[dict[str, Any]] = []

    def add(what: str, ratio: float | None, bound: float, note: str = "") -> None:
        holds = None if ratio is None else ratio <= bound
        goals.append({"goal": what, "ratio": ratio, "bound": bound, "holds": holds, "note": note})

    for dt in ("float64", "float32"):
        add(
            f"large step {dt}: engine / numpy",
            _ratio(results, "large step", dt, "engine", "numpy"),
            1.10,
        )
    for dt in ("float64", "float32"):
        add(
            f"small step {dt}: engine / numpy",
            _ratio(results, "small step", dt, "engine", "numpy"),
            1.5,
        )
        add(
            f"small step {dt}: engine / numpy (stretch)",
            _ratio(results, "small step", dt, "engine", "numpy"),
            1.25,
        )
        add(
            f"small step {dt}: engine / PyTorch",
            _ratio(results, "small step", dt, "engine", "torch"),
            0.6,
        )
    for dt in ("float64", "float32"):
        add(
            f"tiny step {dt}: engine / numpy",
            _ratio(results, "tiny step", dt, "engine", "numpy"),
            3.0,
        )
    for case in ("∂y/∂x, batch 1", "∂y/∂x, batch 32"):
        add(
            f"{case}: engine / numpy chain",
            _ratio(results, case, "float64", "engine", "numpy_chain"),
            1.2,
        )
        add(f"{case}: engine / jacrev", _ratio(results, case, "float64", "engine", "jacrev"), 1.0)
    if memory is not None:
        for dt, m in memory["by_dtype"].items():
            add(f"peak memory, large step {dt}: engine / numpy", m["ratio_peak"], 1.25)
        if "float64_in_float32_step" in memory:
            n = len(memory["float64_in_float32_step"])
            goals.append(
                {
                    "goal": "no float64 arrays in a float32 step",
                    "ratio": None,
                    "bound": None,
                    "holds": n == 0,
                    "note": f"{n} found",
                }
            )
    for dt in ("float64", "float32"):
        add(
            f"small step {dt}: explicit sparse / fast",
            _ratio(results, "small step", dt, "engine_explicit", "engine"),
            5.0,
        )
    return goals


# ---------------------------------------------------------------------------- report


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def timing_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        t = r["timings"]
        torch_t = t.get("torch", t.get("jacrev"))
        for cname, v in t.items():
            vs_torch = "" if torch_t is None else f"{v['median_s'] / torch_t['median_s']:.2f}"
            rows.append(
                [
                    r["case"],
                    r["dtype"],
                    LABELS[cname],
                    _ms(v["median_s"]),
                    f"{v['ratio_numpy']:.2f}",
                    vs_torch,
                ]
            )
    return rows


HEADER = ["case", "dtype", "contestant", "median ms", "× numpy", "× PyTorch"]


def format_text_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def format_md_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def goal_rows(goals: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for g in goals:
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        bound = "" if g["bound"] is None else f"<= {g['bound']}"
        holds = {True: "yes", False: "NO", None: "not measured"}[g["holds"]]
        rows.append([g["goal"], ratio, bound, holds, g["note"]])
    return rows


GOAL_HEADER = ["goal", "measured", "bound", "holds", "note"]


def memory_rows(memory: dict[str, Any]) -> list[list[str]]:
    rows = []
    for dt, m in memory["by_dtype"].items():
        for who in ("numpy", "engine"):
            v = m[who]
            rows.append(
                [
                    dt,
                    LABELS[who],
                    f"{v['held'] / 2**20:.1f}",
                    f"{v['step_extra'] / 2**20:.1f}",
                    f"{v['peak'] / 2**20:.1f}",
                    "" if who == "numpy" else f"{m['ratio_peak']:.2f}",
                ]
            )
    return rows


MEMORY_HEADER = ["dtype", "contestant", "held MiB", "step extra MiB", "peak MiB", "peak × numpy"]


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [
        "<!-- written by benchmarks/run.py; do not edit by hand -->",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; Python {v['python']}, "
        f"numpy {v['numpy']}, scipy {v['scipy']}, BLAS {m['blas'].get('numpy_blas')} "
        f"(one thread), PyTorch {v.get('torch') or 'not installed'}, "
        f"autograd {v.get('autograd') or 'not installed'}. "
        f"Medians of {report['repeats']} interleaved repeats "
        f"({report['repeats'] * FINE} shorter ones for the tiny and small steps)"
        + (" (quick run)" if report["quick"] else "")
        + ".",
        "",
        format_md_table(timing_rows(report["results"]), HEADER),
    ]
    if report.get("memory"):
        mem = report["memory"]
        lines += ["", "Peak memory of the large step (tracemalloc):", ""]
        lines.append(format_md_table(memory_rows(mem), MEMORY_HEADER))
        if "float64_in_float32_step" in mem:
            found = mem["float64_in_float32_step"]
            lines += ["", f"float64 arrays in a float32 step: {len(found) or 'none'}"]
            lines += [f"- {f}" for f in found]
    for r in report["results"]:
        if "refusal" in r:
            lines += ["", f"Dense ∂y/∂W1 for a large batch: {r['refusal']}"]
    lines += ["", "Goals:", "", format_md_table(goal_rows(report["goals"]), GOAL_HEADER)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main

ALL_CASES = ("tiny", "small", "large", "jacobians", "memory")
#: The tiny and small steps are timed in this many times more, shorter rounds.
FINE = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="few, short repeats (a smoke run)")
    ap.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated subset of {','.join(ALL_CASES)} (default: all)",
    )
    ap.add_argument("--dtypes", default="float64,float32", help="comma-separated dtypes")
    ap.add_argument(
        "--repeats", type=int, default=None, help="repeats per case (default 15, quick 3)"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="where to write the JSON (default benchmarks/results.json; a --quick run "
        "writes nothing unless given a path)",
    )
    ap.add_argument("--md", default=None, help="where to write the markdown table (as --json)")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in ALL_CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {ALL_CASES}")
    args.dtypes = [c.strip() for c in args.dtypes.split(",") if c.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; choose from {tuple(DTYPES)}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if not args.quick:
        args.json = args.json or str(HERE / "results.json")
        args.md = args.md or str(HERE / "results.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = 0.01 if args.quick else 0.05  # seconds per timed repeat
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['platform']}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(f"BLAS: {machine['blas'].get('numpy_blas')}; {machine['blas'].get('numpy_blas_config')}")
    print("threads:", machine["blas"]["threads_env"], machine["blas"].get("threadpools", ""))
    if not torch_ok():
        print(f"PyTorch 2.13.0 not importable (found {torch_version()}): left out")
    dtypes = [DTYPES[d] for d in args.dtypes]
    results: list[dict[str, Any]] = []
    for size in ("tiny", "small", "large"):
        if size in args.cases:
            # A step of the tiny and small nets takes well under a millisecond: time
            # them in FINE times as many rounds, each FINE times shorter (the same
            # total), so that a slow spell of a shared machine, which can last a
            # second, falls on every contestant alike instead of on one.
            fine = 1 if size == "large" else FINE
            for dt in dtypes:
                print(f"timing {size} step, {dt.name} ...", flush=True)
                results.append(run_step_case(size, dt, args.repeats * fine, target / fine))
    if "jacobians" in args.cases:
        for wrt, batch in (("x", 1), ("x", 32), ("W1", 1)):
            print(f"timing ∂y/∂{wrt}, batch {batch} ...", flush=True)
            results.append(
                run_jacobian_case(wrt, batch, max(3, args.repeats), target, limit_batch=256)
            )
    memory = None
    if "memory" in args.cases:
        print("measuring peak memory of the large step ...", flush=True)
        memory = run_memory_case(dtypes)
    for r in results:
        for cname, msg in r["checks"].items():
            if not msg.startswith("ok"):
                print(f"CHECK FAILED: {r['case']} {r['dtype']} {LABELS[cname]}: {msg}")
    goals = evaluate_goals(results, memory)
    report = {
        "machine": machine,
        "repeats": args.repeats,
        "quick": args.quick,
        "results": results,
        "memory": memory,
        "goals": goals,
    }
    print()
    print(format_text_table(timing_rows(results), HEADER))
    if memory:
        print()
        print(format_text_table(memory_rows(memory), MEMORY_HEADER))
        if "float64_in_float32_step" in memory:
            found = memory["float64_in_float32_step"]
            print(f"float64 arrays in a float32 step: {len(found) or 'none'}")
            for f in found:
                print("  ", f)
    for r in results:
        if "refusal" in r:
            print(f"dense ∂y/∂W1, {r['refusal']}")
    print()
    print(format_text_table(goal_rows(goals), GOAL_HEADER))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    if args.md:
        Path(args.md).write_text(render_markdown(report))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
