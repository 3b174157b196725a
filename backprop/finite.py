"""Where the non-finite values are: NaN and ±inf, counted and placed by example.

A NaN that enters a network spreads through every product it meets, and by the
time it reaches a parameter nothing says where it came from. The checks that
stop it (``fit`` before its first step, a loss whose cost is not finite, the
optimizers' last defence) all need the same two facts about an array: how many
entries are not finite, and which example (row of axis 0) holds the first one.
This module gives them, scanning a large array in slices so that the boolean
mask never costs more than a few megabytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["describe_non_finite", "first_bad_row", "loss_not_finite", "non_finite"]

#: How many entries one slice of the scan covers.
_SLICE = 1 << 20


def non_finite(x: Any) -> tuple[int, int | None]:
    """``(count, first row)`` of the non-finite entries of ``x`` (a batch, axis 0 first).

    ``(0, None)`` for an array that is all finite, or that holds no floats at all.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fc" or x.size == 0:
        return 0, None
    if x.ndim == 0:
        return (0, None) if math.isfinite(abs(complex(x))) else (1, 0)
    rows = x.reshape(x.shape[0], -1)
    step = max(1, _SLICE // max(rows.shape[1], 1))
    count, first = 0, None
    for start in range(0, rows.shape[0], step):
        bad = ~np.isfinite(rows[start : start + step])
        n = int(np.count_nonzero(bad))
        if n and first is None:
            first = start + int(np.flatnonzero(bad.any(axis=1))[0])
        count += n
    return count, first


def first_bad_row(ok: np.ndarray) -> int | None:
    """The index of the first False in a boolean vector, or None when all are True."""
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def describe_non_finite(what: str, x: Any) -> str | None:
    """``"<what> has k non-finite entries (NaN or inf), the first in example i"``, or
    None when ``x`` is all finite."""
    count, first = non_finite(x)
    if not count:
        return None
    where = f", the first in example {first}" if first is not None and np.ndim(x) else ""
    return f"{what} has {count} non-finite entries (NaN or inf){where}"


def loss_not_finite(loss: Any, x_in: tuple[Any, ...], J: Any) -> str:
    """Why a loss refuses a batch: it is empty (``J`` None), or ``J`` is NaN or inf.

    Names the data inputs that hold non-finite entries; when all are finite, the
    cost itself overflowed its dtype.
    """
    names = loss.inputs
    if J is None:
        return (
            f"{loss!r}: the batch is empty ({names[0]} has shape {np.shape(x_in[0])}); a cost "
            f"is a mean over the examples, and there are none"
        )
    causes = [
        describe_non_finite(f"{what} (shape {np.shape(x)})", x)
        for what, x in zip(names, x_in, strict=False)
        if what not in loss.label_inputs
    ]
    cause = "; ".join(c for c in causes if c) or (
        f"the inputs are finite, so the cost itself overflowed {np.asarray(J).dtype.name}"
    )
    return f"{loss!r}: the cost J is {float(J)}: {cause}"
