"""The Jacobian cases of the large MLP: the engine against a numpy chain and ``jacrev``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import backprop as bp

from .problems import RTOL, Problem, build_engine_net, close, make_problem
from .steps import TorchStep, torch_ok
from .timing import check_note, time_against


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
    """The engine's dense ``∂y/∂x`` or ``∂y/∂W1`` of the network ``net`` at ``X``."""
    net.forward(X)
    L_x, L_theta = net.jacobians()
    if wrt == "W1":
        return L_theta[net[0].params["W"]].to_dense()
    return L_x.to_dense()


def torch_jacobian_fn(p: Problem, X: np.ndarray, wrt: str) -> Callable[[], np.ndarray]:
    """A function computing the same Jacobian with ``torch.func.jacrev``."""
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


def dense_W1_refusal(batch: int) -> str:
    """What asking for the dense ``∂y/∂W1`` of ``batch`` examples gives: a refusal, sized."""
    p = make_problem("large", np.float64)
    net = build_engine_net(p, loss=False)
    net.forward(p.X[:batch].copy())
    try:
        net.jacobians()[1][net[0].params["W"]].to_dense()
    except ValueError as e:
        return f"batch {batch}: ValueError: {e}"
    return f"batch {batch}: built (not refused)"


def run_jacobian_case(
    wrt: str, batch: int, repeats: int, target: float, limit_batch: int
) -> dict[str, Any]:
    """Check, then time, ``∂y/∂wrt`` of the large MLP for ``batch`` examples (float64)."""
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
        ok, err = close(fn(), want, RTOL[p.dtype])
        checks[cname] = check_note(ok, f"max rel. error {err:.1e}")
        if ok:
            fns[cname] = fn
    del want
    out: dict[str, Any] = {
        "case": f"∂y/∂{'x' if wrt == 'x' else 'W1'}, batch {batch}",
        "size": "large",
        "dtype": "float64",
        "net": "784-1024-1024-10",
        "batch": batch,
        "checks": checks,
        "timings": time_against(fns, "numpy_chain", repeats, target),
    }
    if wrt == "W1":  # the dense ∂y/∂W1 of a whole large batch is refused, with its size
        out["refusal"] = dense_W1_refusal(limit_batch)
    return out
