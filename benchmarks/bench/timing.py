"""Interleaved timing: every contestant once per round, the order rotating, medians kept."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

#: The short steps (``FINE_CASES``) are timed in this many times more rounds, each this many
#: times shorter (the same total): a step of theirs is short, and a slow spell of a
#: shared machine then falls on every contestant alike instead of on one.
FINE = 4
#: The step cases timed that way.
FINE_CASES = ("tiny", "small", "cnn")


def _calibrate(fn: Callable[[], Any], target: float) -> int:
    """How many calls of ``fn`` take about ``target`` seconds (at least 1)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, int(target / max(dt, 1e-7)))


def _time_once(fn: Callable[[], Any], k: int) -> float:
    """Seconds per call of ``k`` calls of ``fn`` in a row, with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k
    finally:
        gc.enable()


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, target: float
) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each function, measured round-robin.

    Each round times every function once (``inner`` calls in a row, about ``target``
    seconds), and the order rotates from round to round so that no contestant is
    always first after another one.
    """
    for fn in fns.values():  # warm-up: caches, lazy imports, first-call costs
        fn()
    inner = {name: _calibrate(fn, target) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(_time_once(fns[name], inner[name]))
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


def check_note(ok: bool, msg: str) -> str:
    """How a contestant's correctness check reads in the results."""
    return ("ok: " if ok else "WRONG, not timed: ") + msg


def time_against(
    fns: dict[str, Callable[[], Any]], ref: str, repeats: int, target: float
) -> dict[str, dict[str, Any]]:
    """``time_interleaved``, each timing with its ``ratio_numpy`` to the reference ``ref``."""
    timings = time_interleaved(fns, repeats, target)
    ref_s = timings[ref]["median_s"]
    for t in timings.values():
        t["ratio_numpy"] = t["median_s"] / ref_s
    return timings
