"""The memory case of the large step: peak memory against numpy, float64 in a float32 step."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

import backprop as bp

from .problems import Problem, build_engine_net, make_problem
from .steps import EngineStep, NumpyStep


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


class _Float64Finder:
    """Collects a line for every float64 array (or Jacobian) it is shown."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def look(self, where: str, a: Any) -> None:
        if isinstance(a, np.ndarray) and a.dtype == np.float64:
            self.found.append(f"{where}: float64 {a.shape}")

    def look_jacobian(self, where: str, L: Any) -> None:
        if L is not None and L.dtype == np.float64:
            self.found.append(f"{where}: float64 {L!r}")

    def forward(self, net: bp.Sequential) -> None:
        """What each layer's forward caches (inputs, parameters, output, saved arrays),
        and its Jacobians' dtypes."""
        for i, layer in enumerate(net):
            op, at = layer._op, f"layer {i} {layer!r}"
            assert op is not None  # forward just ran
            for k, a in enumerate(op.x_in):
                self.look(f"{at} x_in[{k}]", a)
            for name, a in op.theta.items():
                self.look(f"{at} θ {name}", a)
            self.look(f"{at} x_out", op.x_out)
            for name, a in op.saved.items():
                self.look(f"{at} saved {name}", a)
            L_x, L_th = layer.jacobians()
            for k, L in enumerate(L_x if isinstance(L_x, tuple) else (L_x,)):
                self.look_jacobian(f"{at} L_x[{k}]", L)
            for name, L in L_th.items():
                self.look_jacobian(f"{at} L_theta {name}", L)

    def backward(self, net: bp.Sequential) -> None:
        """Every ``g_in`` and parameter gradient of a layer-by-layer backward."""
        g: Any = None
        for i in range(len(net) - 1, -1, -1):
            layer = net[i]
            g_in, grads = layer.backward(g)
            g_in = g_in[0] if isinstance(g_in, tuple) else g_in
            self.look(f"layer {i} {layer!r} g_in", g_in)
            for name, a in grads.items():
                self.look(f"layer {i} {layer!r} grad {name}", a)
            g = g_in


def float64_arrays_in_float32_step(p: Problem) -> list[str]:
    """Every float64 array that a float32 step of the engine makes or keeps.

    Looks at what each layer's forward caches, at its Jacobians' dtypes, at every
    ``g_in`` and parameter gradient of a layer-by-layer backward, at the gradients of
    ``Sequential.backward``, and at the parameters after the SGD update.
    """
    net = build_engine_net(p)
    opt = bp.SGD(net.parameters(), lr=p.lr)
    finder = _Float64Finder()
    finder.look("loss J", net.forward(p.X, p.y))
    finder.forward(net)
    finder.backward(net)
    _, grads = net.backward(input_grad=False)
    for param, a in grads.items():
        finder.look(f"Sequential.backward grad {param!r}", a)
    opt.step(grads)
    for param in net.parameters():
        finder.look(f"{param!r} after SGD", param.value)
    return finder.found


def run_memory_case(dtypes: list[np.dtype[Any]]) -> dict[str, Any]:
    """Peak memory of the large step, engine against numpy, per dtype; and with float32,
    the float64 arrays of a float32 step."""
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
