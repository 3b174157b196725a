"""The curvature cases: a Hessian-vector product, and the top eigenvalue of a Hessian.

- **hvp, small MLP** (64-128-10, batch 64, float64, softmax cross-entropy): one
  ``bp.hvp`` (forward pass, backward pass, tangents forward, the backward pass
  differentiated) against one gradient of the same network by the engine
  (``forward`` and ``backward``) and by hand in numpy, and against PyTorch's
  ``torch.func.jvp(torch.func.grad(f))``, eager, the forward-over-reverse product of
  ``torch.func``, and torch's reverse over reverse (``autograd.grad`` twice, the
  first with ``create_graph=True``). Every product is first checked against
  ``torch.func``'s.
- **top eigenvalue, digits MLP** (the demo's 64-256-10, 19,210 parameters, on the
  1,347 training images): ``bp.hessian_eigs(k=1)`` from scratch (forward and backward
  included) against ``scipy.sparse.linalg.eigsh`` on torch's products, same start
  vector and tolerance. The goal is on the engine's seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

import backprop as bp
from backprop.datasets import load_digits, train_test_split
from backprop.demo import build_mlp

from .problems import build_engine_net, close, make_problem
from .steps import torch_ok
from .timing import check_note, time_against

#: rtol of the products' check against torch, float64.
RTOL = 1e-10
#: eigsh's tolerance in the eigenvalue case, and its seed for the start vector.
TOL, SEED = 1e-8, 0


def numpy_gradient(net: bp.Sequential, X: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
    """One gradient of the small MLP by hand (forward, softmax cross-entropy, backward)."""
    (W1, b1), (W2, b2) = ((layer.W.value, layer.b.value) for layer in (net[0], net[2]))
    rows = np.arange(X.shape[0])

    def run() -> list[np.ndarray]:
        z1 = X @ W1.T
        z1 += b1
        a1 = np.maximum(z1, 0)
        z = a1 @ W2.T
        z += b2
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        p[rows, y] -= 1
        p /= X.shape[0]
        g1 = p @ W2
        g1 *= z1 > 0
        return [g1.T @ X, g1.sum(axis=0), p.T @ a1, p.sum(axis=0)]

    return run


def _torch_functions(net: bp.Sequential, X: np.ndarray, y: np.ndarray) -> tuple[Any, Any, Any]:
    """``J(θ)`` in torch for an MLP of ``Linear``/``ReLU`` layers and cross-entropy, and
    the parameters as a tuple of tensors (``net.parameters()`` order)."""
    import torch

    torch.set_num_threads(1)
    F = torch.nn.functional
    Xt, yt = torch.from_numpy(X.copy()), torch.from_numpy(y.copy())
    n = len([layer for layer in net if isinstance(layer, bp.Linear)])

    def f(*params: Any) -> Any:
        h = Xt
        for i in range(n):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i < n - 1:
                h = F.relu(h)
        return F.cross_entropy(h, yt)

    theta = tuple(torch.from_numpy(p.value.copy()) for p in net.parameters())
    return torch, f, theta


def torch_hvp_fn(net: bp.Sequential, X: np.ndarray, y: np.ndarray, v: list[np.ndarray]) -> Any:
    """``H v`` by ``torch.func.jvp(torch.func.grad(f))``, eager."""
    torch, f, theta = _torch_functions(net, X, y)
    grad = torch.func.grad(f, argnums=tuple(range(len(theta))))
    vt = tuple(torch.from_numpy(a.copy()) for a in v)

    def run() -> list[np.ndarray]:
        _, hv = torch.func.jvp(lambda *p: grad(*p), theta, vt)
        return [h.numpy() for h in hv]

    return run


def torch_double_backward_fn(
    net: bp.Sequential, X: np.ndarray, y: np.ndarray, v: list[np.ndarray]
) -> Any:
    """``H v`` reverse over reverse: torch's gradient with ``create_graph=True``, then the
    gradient of ``<∇J, v>``: the other way to differentiate the backward pass."""
    torch, f, theta = _torch_functions(net, X, y)
    leaves = [t.clone().requires_grad_(True) for t in theta]
    vt = [torch.from_numpy(a.copy()) for a in v]

    def run() -> list[np.ndarray]:
        grads = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, vt, strict=True))
        return [h.numpy() for h in torch.autograd.grad(dot, leaves)]

    return run


def run_hvp_case(repeats: int, target: float) -> dict[str, Any]:
    """Check, then time, one Hessian-vector product of the small MLP against a gradient."""
    p = make_problem("small", np.float64)
    net = build_engine_net(p)
    params = net.parameters()
    v = [np.random.default_rng(1).standard_normal(q.shape) for q in params]
    v_map = dict(zip(params, v, strict=True))

    def engine_hvp() -> list[np.ndarray]:
        Hv = bp.hvp(net, p.X, p.y, v=v_map)
        return [Hv[q] for q in params]

    def engine_gradient() -> Any:
        net.forward(p.X, p.y)
        return net.backward()

    fns: dict[str, Callable[[], Any]] = {
        "numpy_grad": numpy_gradient(net, p.X, p.y),
        "engine_grad": engine_gradient,
        "engine_hvp": engine_hvp,
    }
    checks = {"numpy_grad": "ok: the reference", "engine_grad": "ok: the engine's own gradient"}
    if torch_ok():
        fns["torch_hvp"] = torch_hvp_fn(net, p.X, p.y, v)
        fns["torch_rr"] = torch_double_backward_fn(net, p.X, p.y, v)
        want = fns["torch_hvp"]()
        for name in ("engine_hvp", "torch_rr"):
            err = max(close(a, b, RTOL)[1] for a, b in zip(fns[name](), want, strict=True))
            checks[name] = check_note(err <= RTOL, f"max rel. error {err:.1e} against torch.func")
            if err > RTOL:
                del fns[name]
        checks["torch_hvp"] = "ok: the reference of the products"
    else:
        checks["engine_hvp"] = "ok: torch not installed, not compared"
    return {
        "case": "hvp, small MLP",
        "size": "small",
        "dtype": "float64",
        "net": "-".join(map(str, p.sizes)),
        "batch": p.batch,
        "loss": "softmax CE",
        "checks": checks,
        "timings": time_against(fns, "numpy_grad", repeats, target),
    }


def run_eigen_case(repeats: int, target: float) -> dict[str, Any]:
    """Check, then time, the top Hessian eigenvalue of the demo's digits MLP."""
    X, y = load_digits()
    X_train, _, y_train, _ = train_test_split(X, y, test_fraction=0.25, rng=0)
    net = build_mlp([256], X.shape[1], 10, seed=0)
    n = sum(q.size for q in net.parameters())

    def engine_top() -> float:
        return float(bp.hessian_eigs(net, X_train, y_train, k=1, tol=TOL, rng=SEED).values[0])

    fns: dict[str, Callable[[], Any]] = {"engine_eigs": engine_top}
    checks: dict[str, str] = {}
    if torch_ok():
        torch, f, theta = _torch_functions(net, X_train, y_train)
        grad = torch.func.grad(f, argnums=tuple(range(len(theta))))
        sizes = [t.numel() for t in theta]

        def mv(x: np.ndarray) -> np.ndarray:
            parts = np.split(np.asarray(x, dtype=np.float64), np.cumsum(sizes)[:-1])
            vt = tuple(
                torch.from_numpy(a.reshape(t.shape)) for a, t in zip(parts, theta, strict=True)
            )
            _, hv = torch.func.jvp(lambda *q: grad(*q), theta, vt)
            return np.concatenate([h.numpy().ravel() for h in hv])

        def torch_top() -> float:
            v0 = np.random.default_rng(SEED).standard_normal(n)
            op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
            return float(eigsh(op, k=1, which="LA", v0=v0, tol=TOL)[0][0])

        fns["torch_eigs"] = torch_top
        ok, err = close(engine_top(), torch_top(), 1e-6)
        checks["engine_eigs"] = checks["torch_eigs"] = check_note(ok, f"rel. difference {err:.1e}")
        if not ok:
            fns.pop("torch_eigs")
    else:
        checks["engine_eigs"] = "ok: torch not installed, not compared"
    return {
        "case": "top Hessian eigenvalue, digits MLP",
        "size": "digits",
        "dtype": "float64",
        "net": f"64-256-10 ({n} parameters)",
        "batch": X_train.shape[0],
        "loss": "softmax CE",
        "checks": checks,
        "timings": time_against(fns, "engine_eigs", max(3, repeats // 3), target),
    }
