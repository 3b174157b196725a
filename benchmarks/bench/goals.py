"""The goals: bounds on the ratios of medians (and on memory) that the engine is held to."""

from __future__ import annotations

from typing import Any

BOTH = ("float64", "float32")
#: The reference of a goal on time itself: the median in seconds, not a ratio.
SECONDS = "seconds"

#: Ratio goals in the order of the table: (case, dtypes, ((contestant, reference, bound,
#: what), ...)). A step goal names its dtype; a Jacobian or curvature goal (float64 only)
#: does not. The reference ``SECONDS`` bounds the contestant's median time itself.
RATIO_GOALS: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, str, float, str], ...]], ...] = (
    ("large step", BOTH, (("engine", "numpy", 1.10, "engine / numpy"),)),
    (
        "small step",
        BOTH,
        (
            ("engine", "numpy", 1.5, "engine / numpy"),
            ("engine", "numpy", 1.25, "engine / numpy (stretch)"),
            ("engine", "torch", 0.6, "engine / PyTorch"),
        ),
    ),
    ("tiny step", BOTH, (("engine", "numpy", 3.0, "engine / numpy"),)),
    *(
        goal
        for case in ("cnn step", "lenet step")
        for goal in (
            (case, BOTH, (("engine", "numpy", 1.25, "engine / numpy"),)),
            (case, ("float64",), (("engine", "torch", 1.0, "engine / PyTorch"),)),
            (
                case,
                ("float32",),
                (
                    ("engine", "torch", 1.5, "engine / PyTorch"),
                    ("engine", "torch", 1.0, "engine / PyTorch (stretch)"),
                ),
            ),
        )
    ),
    ("transformer step", ("float64",), (("engine", "torch", 1.0, "engine / PyTorch"),)),
    ("transformer step", ("float32",), (("engine", "torch", 1.5, "engine / PyTorch"),)),
    ("rnn step", BOTH, (("engine", "torch", 1.0, "engine / PyTorch nn.RNNCell loop"),)),
    *(
        (
            case,
            ("float64",),
            (
                ("engine", "numpy_chain", 1.2, "engine / numpy chain"),
                ("engine", "jacrev", 1.0, "engine / jacrev"),
            ),
        )
        for case in ("∂y/∂x, batch 1", "∂y/∂x, batch 32")
    ),
    (
        "hvp, small MLP",
        ("float64",),
        (
            ("engine_hvp", "engine_grad", 3.0, "hvp / one gradient"),
            ("engine_hvp", "torch_hvp", 1.0, "hvp / torch.func jvp(grad)"),
        ),
    ),
    (
        "top Hessian eigenvalue, digits MLP",
        ("float64",),
        (("engine_eigs", SECONDS, 2.0, "seconds"),),
    ),
)
#: Ratios reported without a bound: (case, dtypes, contestant, reference, what).
REPORTED: tuple[tuple[str, tuple[str, ...], str, str, str], ...] = (
    ("rnn step", BOTH, "engine", "torch_fused", "engine / PyTorch nn.RNN (fused)"),
)
#: Peak memory of the large step, engine / numpy, per dtype measured.
MEMORY_BOUND = 1.25


def _ratio(results: list[dict[str, Any]], case: str, dtype: str, a: str, b: str) -> float | None:
    """Median of ``a`` over median of ``b`` in the case ``case``, or None if not measured."""
    for r in results:
        if r["case"] == case and r["dtype"] == dtype:
            t = r["timings"]
            if a in t and b == SECONDS:
                return float(t[a]["median_s"])
            if a in t and b in t:
                return float(t[a]["median_s"] / t[b]["median_s"])
    return None


def _goal(
    what: str, ratio: float | None, bound: float | None, holds: bool | None, note: str = ""
) -> dict[str, Any]:
    return {"goal": what, "ratio": ratio, "bound": bound, "holds": holds, "note": note}


def _bounded(what: str, ratio: float | None, bound: float) -> dict[str, Any]:
    return _goal(what, ratio, bound, None if ratio is None else ratio <= bound)


def evaluate_goals(
    results: list[dict[str, Any]], memory: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The goals table, each with the ratio measured in this run (None: not measured)."""
    goals: list[dict[str, Any]] = []
    for case, dtypes, bounds in RATIO_GOALS:
        for dt in dtypes:
            name = f"{case} {dt}" if case.endswith(" step") else case
            for a, b, bound, what in bounds:
                goals.append(_bounded(f"{name}: {what}", _ratio(results, case, dt, a, b), bound))
    for case, dtypes, a, b, what in REPORTED:
        for dt in dtypes:
            ratio = _ratio(results, case, dt, a, b)
            if ratio is not None:
                goals.append(_goal(f"{case} {dt}: {what}", ratio, None, None, "reported"))
    if memory is not None:
        for dt, m in memory["by_dtype"].items():
            what = f"peak memory, large step {dt}: engine / numpy"
            goals.append(_bounded(what, m["ratio_peak"], MEMORY_BOUND))
        if "float64_in_float32_step" in memory:
            n = len(memory["float64_in_float32_step"])
            goals.append(
                _goal("no float64 arrays in a float32 step", None, None, n == 0, f"{n} found")
            )
    return goals
